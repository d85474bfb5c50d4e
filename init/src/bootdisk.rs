//! Which disk the node booted from, when the slot's partitions are on more
//! than one: a Basalt USB stick left in after installing to the internal
//! disk, an old card in a reader, the disk of another node. Stage 1 must
//! mount the root, grow the data partition and let updates write slots only
//! on the disk the firmware started, never on whichever sorts first.
//!
//! UEFI: systemd-boot leaves `LoaderDevicePartUUID` (the unique partition
//! GUID of the ESP it was started from; systemd's Boot Loader Interface) in
//! EFI variables;
//! the disk whose GPT has that partition is the one; when several have it
//! (copies of one image before their first boot), the PCI device in the
//! firmware's `BootCurrent` entry's device path narrows them. Asked on every
//! boot, also when one disk holds the slot's partitions: an internal disk
//! with another Basalt install appears before the USB disk the firmware
//! started, and stage 1 waits for that one ([`decide`]). The Raspberry Pi 4/5 EEPROM bootloader names the
//! bus it booted from (`/chosen/bootloader/boot-mode`, a `BOOT_ORDER` mode:
//! 1 SD card/eMMC, 4 and 5 USB mass storage, 6 NVMe): that tells an SD card
//! from a USB SSD, not two USB disks. When nothing decides (two copies of
//! one image share their GUIDs; no hint at all): the first disk by kernel
//! name, with a warning naming them all (docs/boot-protocol.md, Stage 1, 3).

use std::path::Path;

use crate::boottime::LOADER_GUID;

/// systemd-boot's variable: the ESP's unique partition GUID as text.
pub const LOADER_DEVICE_PART_UUID: &str = "LoaderDevicePartUUID";

/// The variable as efivarfs shows it (4 attribute bytes, then a UTF-16LE
/// string, NUL-terminated or not), lower case; `None` unless it is a GUID.
pub fn parse_part_uuid(raw: &[u8]) -> Option<String> {
    let units: Vec<u16> = raw
        .get(4..)?
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    let text = String::from_utf16(&units).ok()?.trim().to_ascii_lowercase();
    let groups: Vec<&str> = text.split('-').collect();
    let shape = [8, 4, 4, 4, 12];
    let is_guid = groups.len() == shape.len()
        && groups
            .iter()
            .zip(shape)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    is_guid.then_some(text)
}

/// The ESP's GUID from the variables under `efivars`, or why there is none.
pub fn loader_part_uuid(efivars: &Path) -> Result<String, String> {
    let path = efivars.join(format!("{LOADER_DEVICE_PART_UUID}-{LOADER_GUID}"));
    let raw = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_part_uuid(&raw).ok_or_else(|| format!("{}: not a GUID", path.display()))
}

/// The disks among `disks` whose GPT (read from `dev`/<disk>, sector size
/// from `class_block`/<disk>/queue) has a partition with unique GUID `uuid`.
/// A disk whose table cannot be read is left out, and given to `warn`
/// (`<device>: <why>`; the caller says it, once per boot).
pub fn disks_with_partition(
    dev: &Path,
    class_block: &Path,
    disks: &[String],
    uuid: &str,
    warn: &mut dyn FnMut(String),
) -> Vec<String> {
    disks
        .iter()
        .filter(|disk| {
            let sector = std::fs::read_to_string(
                class_block
                    .join(disk.as_str())
                    .join("queue/logical_block_size"),
            )
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(512);
            let path = dev.join(disk.as_str());
            let gpt = std::fs::File::open(&path)
                .map_err(|e| e.to_string())
                .and_then(|mut f| crate::gpt::Gpt::read(&mut f, sector).map_err(|e| e.to_string()));
            match gpt {
                Ok(g) => g.partitions().iter().any(|p| p.unique_guid == uuid),
                Err(e) => {
                    warn(format!("{}: {e}", path.display()));
                    false
                }
            }
        })
        .cloned()
        .collect()
}

/// What the firmware said, and which of the disks match it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    /// For the console: `the ESP systemd-boot started from (<guid>)`.
    pub what: String,
    pub matching: Vec<String>,
}

/// UEFI: the disks holding the ESP systemd-boot was started from (narrowed
/// by the firmware's boot entry when that is several).
pub fn loader_hint(
    efivars: &Path,
    dev: &Path,
    class_block: &Path,
    disks: &[String],
    warn: &mut dyn FnMut(String),
) -> Result<Hint, String> {
    let uuid = loader_part_uuid(efivars)?;
    let hint = Hint {
        what: format!("the ESP systemd-boot started from ({uuid})"),
        matching: disks_with_partition(dev, class_block, disks, &uuid, warn),
    };
    Ok(narrowed(hint, efivars, class_block))
}

/// The UEFI spec's global variables (`BootCurrent`, `Boot####`).
pub const EFI_GLOBAL_GUID: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";

/// The firmware's boot device, from `Boot####` (an `EFI_LOAD_OPTION`, UEFI
/// spec §3.1.3) as efivarfs shows it: its device path in the spec's text
/// form, for the console, and the PCI (device, function) chain in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootDevice {
    pub text: String,
    pub pci: Vec<(u8, u8)>,
    /// The AHCI port of a `Sata(...)` node (0-based, the spec's HBA port).
    pub sata_port: Option<u16>,
}

/// `BootCurrent` as efivarfs shows it: 4 attribute bytes, then a u16 (LE).
pub fn parse_boot_current(raw: &[u8]) -> Option<u16> {
    match raw {
        [_, _, _, _, lo, hi] => Some(u16::from_le_bytes([*lo, *hi])),
        _ => None,
    }
}

/// A `Boot####` variable: attributes (u32), the device path list's length
/// (u16), a NUL-terminated UTF-16 description, then the device path nodes
/// (type, subtype, u16 length; the spec §10.3). Only the first path
/// instance is read; `None` when the option is malformed.
pub fn parse_load_option(raw: &[u8]) -> Option<BootDevice> {
    let v = raw.get(4..)?;
    let list_len = usize::from(u16::from_le_bytes([*v.get(4)?, *v.get(5)?]));
    let mut i = 6;
    loop {
        let u = u16::from_le_bytes([*v.get(i)?, *v.get(i + 1)?]);
        i += 2;
        if u == 0 {
            break;
        }
    }
    let mut path = v.get(i..i.checked_add(list_len)?)?;
    let (mut text, mut pci, mut sata_port) = (Vec::new(), Vec::new(), None);
    while let [kind, sub, l0, l1, ..] = *path {
        let len = usize::from(u16::from_le_bytes([l0, l1]));
        if len < 4 {
            return None;
        }
        let node = path.get(4..len)?;
        let le16 = |o: usize| node.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let le32 = |o: usize| {
            node.get(o..o + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        text.push(match (kind, sub) {
            (0x7f, _) => break,
            (0x01, 0x01) => {
                let (f, d) = (*node.first()?, *node.get(1)?);
                pci.push((d, f));
                format!("Pci(0x{d:X},0x{f:X})")
            }
            (0x02, 0x01) if le32(0)? == 0x0a03_41d0 => format!("PciRoot(0x{:X})", le32(4)?),
            (0x03, 0x12) => {
                sata_port = Some(le16(0)?);
                format!("Sata(0x{:X},0x{:X},0x{:X})", le16(0)?, le16(2)?, le16(4)?)
            }
            (0x03, 0x17) => format!("NVMe(0x{:X})", le32(0)?),
            (0x03, 0x05) => format!("USB(0x{:X},0x{:X})", node.first()?, node.get(1)?),
            (0x03, 0x02) => format!("Scsi(0x{:X},0x{:X})", le16(0)?, le16(2)?),
            (0x04, 0x01) => format!("HD({},GPT,...)", le32(0)?),
            (0x04, 0x04) => "File(...)".to_string(),
            (k, s) => format!("Path({k},{s})"),
        });
        path = &path[len..];
    }
    Some(BootDevice {
        text: text.join("/"),
        pci,
        sata_port,
    })
}

/// The PCI (device, function) chain in a sysfs device path
/// (`../../devices/pci0000:00/0000:00:1f.2/ata1/...`: each `dddd:bb:dd.f`).
pub fn sysfs_pci_chain(link: &str) -> Vec<(u8, u8)> {
    link.split('/')
        .filter_map(|c| {
            let b = c.as_bytes();
            let hex = |r: std::ops::Range<usize>| {
                std::str::from_utf8(b.get(r)?)
                    .ok()
                    .and_then(|t| u8::from_str_radix(t, 16).ok())
            };
            if b.len() != 12 || b[4] != b':' || b[7] != b':' || b[10] != b'.' {
                return None;
            }
            hex(0..2)?;
            Some((hex(8..10)?, hex(11..12)?))
        })
        .collect()
}

/// The AHCI port (0-based) of a disk whose sysfs path (`link`, relative to
/// `class_block`) runs through `.../ataN/`: libata's `ata_port/ataN/port_no`
/// there is 1-based within its controller. `None` when it is not a SATA disk
/// or the attribute cannot be read.
pub fn sysfs_sata_port(class_block: &Path, link: &str) -> Option<u16> {
    let parts: Vec<&str> = link.split('/').collect();
    let at = parts.iter().position(|c| {
        c.strip_prefix("ata")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })?;
    let port_dir = class_block.join(parts[..=at].join("/"));
    let text =
        std::fs::read_to_string(port_dir.join("ata_port").join(parts[at]).join("port_no")).ok()?;
    text.trim().parse::<u16>().ok()?.checked_sub(1)
}

/// UEFI, when the ESP's GUID matched several disks (copies of one image
/// before the first boot renewed them): the one among `candidates` behind
/// the PCI device of the firmware's `BootCurrent` entry, and for a SATA
/// entry its AHCI port (when libata shows it). Disks behind one USB or NVMe
/// controller are not told apart by this.
pub fn firmware_device_hint(
    efivars: &Path,
    class_block: &Path,
    candidates: &[String],
) -> Result<Hint, String> {
    let read = |name: &str| {
        let path = efivars.join(format!("{name}-{EFI_GLOBAL_GUID}"));
        std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))
    };
    let current = parse_boot_current(&read("BootCurrent")?)
        .ok_or_else(|| "BootCurrent is not a 16-bit number".to_string())?;
    let name = format!("Boot{current:04X}");
    let device = parse_load_option(&read(&name)?)
        .ok_or_else(|| format!("{name} is not a load option the spec describes"))?;
    if device.pci.is_empty() {
        return Err(format!("{name} ({}) names no PCI device", device.text));
    }
    let matching = candidates
        .iter()
        .filter(|disk| {
            std::fs::read_link(class_block.join(disk.as_str())).is_ok_and(|l| {
                let l = l.to_string_lossy();
                sysfs_pci_chain(&l) == device.pci
                    && match (device.sata_port, sysfs_sata_port(class_block, &l)) {
                        (Some(want), Some(port)) => want == port,
                        _ => true,
                    }
            })
        })
        .cloned()
        .collect();
    Ok(Hint {
        what: format!("the firmware's boot entry {name} ({})", device.text),
        matching,
    })
}

/// The loader's hint, narrowed by the firmware's boot entry when it matched
/// several disks; else as it was, with why the entry did not decide.
pub fn narrowed(hint: Hint, efivars: &Path, class_block: &Path) -> Hint {
    if hint.matching.len() < 2 {
        return hint;
    }
    match firmware_device_hint(efivars, class_block, &hint.matching) {
        Ok(h) if h.matching.len() == 1 => Hint {
            what: format!("{} and {}", hint.what, h.what),
            matching: h.matching,
        },
        Ok(h) => Hint {
            what: format!(
                "{} ({} matches {})",
                hint.what,
                h.what,
                if h.matching.is_empty() {
                    "none of them"
                } else {
                    "them all"
                }
            ),
            ..hint
        },
        Err(e) => Hint {
            what: format!("{} ({e})", hint.what),
            ..hint
        },
    }
}

/// Raspberry Pi 4/5: the disks on the bus the bootloader's `boot-mode`
/// (under `dt_dir`, normally [`crate::rpi::BOOTLOADER_DT_DIR`]) names.
pub fn pi_boot_mode_hint(dt_dir: &Path, disks: &[String]) -> Result<Hint, String> {
    let mode = crate::rpi::read_dt_u32(&dt_dir.join("boot-mode"))
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            "neither EFI nor the Raspberry Pi firmware says which the node booted from".to_string()
        })?;
    let (bus, prefix) = match mode {
        1 => ("SD card or eMMC", "mmcblk"),
        4 | 5 => ("USB mass storage", "sd"),
        6 => ("NVMe", "nvme"),
        m => return Err(format!("the firmware's boot-mode {m} names no disk bus")),
    };
    Ok(Hint {
        what: format!("the firmware's boot-mode {mode} ({bus})"),
        matching: disks
            .iter()
            .filter(|d| d.starts_with(prefix))
            .cloned()
            .collect(),
    })
}

/// The choice among `disks` (the ones holding the slot's root, sorted):
/// the one the hint matches when it is exactly one, else the first. Returns
/// the disk, why (for the console) and whether the hint decided.
pub fn choose(disks: &[String], hint: Result<Hint, String>) -> (String, String, bool) {
    let first = disks.first().cloned().unwrap_or_default();
    let why = match hint {
        Ok(Hint { what, matching }) => match matching.as_slice() {
            [one] => return (one.clone(), format!("the one matching {what}"), true),
            [] => format!("none matches {what}"),
            _ => format!("{} all match {what}", matching.join(", ")),
        },
        Err(why) => why,
    };
    (first, format!("{why}; the first by kernel name"), false)
}

/// What stage 1 does with the disks now holding the slot's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Boot from `disk`; `said`: the line for the console (`None`: one disk
    /// and the firmware agrees, the usual boot, nothing to say), and
    /// whether it is a warning.
    Use {
        disk: String,
        said: Option<(String, bool)>,
    },
    /// The firmware names a disk none of these is: the disk it started
    /// has not appeared yet (a USB disk enumerates after an internal one
    /// holding another Basalt install). Why, for the console.
    Wait(String),
}

/// The decision for `disks` (sorted) given the firmware's `hint`; with
/// `last_chance` (the wait for the boot disk is over) never `Wait`.
pub fn decide(disks: &[String], hint: Result<Hint, String>, last_chance: bool) -> Decision {
    let all = disks.join(", ");
    if let Ok(h) = &hint
        && h.matching.is_empty()
        && !last_chance
    {
        let holds = if disks.len() == 1 { "holds" } else { "hold" };
        return Decision::Wait(format!(
            "{all} {holds} the slot's partitions, but not {}",
            h.what
        ));
    }
    if let [one] = disks {
        let said = match hint {
            Ok(h) if h.matching.is_empty() => Some((
                format!(
                    "the slot's partitions are on {one} only, which does not match {}: using it",
                    h.what
                ),
                true,
            )),
            _ => None,
        };
        return Decision::Use {
            disk: one.clone(),
            said,
        };
    }
    let (disk, why, decided) = choose(disks, hint);
    let said = if decided {
        format!("the slot's partitions are on {all}: using {disk}, {why}")
    } else {
        format!("the slot's partitions are on {all}: using {disk}: {why}")
    };
    Decision::Use {
        disk,
        said: Some((said, !decided)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(text: &str, nul: bool) -> Vec<u8> {
        let mut raw = vec![7, 0, 0, 0];
        for u in text.encode_utf16().chain(nul.then_some(0)) {
            raw.extend_from_slice(&u.to_le_bytes());
        }
        raw
    }

    #[test]
    fn the_variable_is_a_guid_in_utf16() {
        let g = "8C3B0C9A-6E4F-4B5B-9E3C-0123456789AB";
        let want = Some(g.to_ascii_lowercase());
        assert_eq!(parse_part_uuid(&var(g, true)), want);
        assert_eq!(parse_part_uuid(&var(g, false)), want);
        assert_eq!(parse_part_uuid(&var("not-a-guid", true)), None);
        assert_eq!(
            parse_part_uuid(&var("8c3b0c9a-6e4f-4b5b-9e3c-0123456789a", true)),
            None
        );
        assert_eq!(parse_part_uuid(&[7, 0]), None);
    }

    /// `Boot0001` as OVMF writes it for a SATA disk: attributes, path list
    /// length, "UEFI QEMU HARDDISK" in UTF-16, then PciRoot(0x0) (ACPI
    /// PNP0A03), Pci(0x1F,0x2), Sata(0x0,0xFFFF,0x0), end (spec §10.3).
    fn ovmf_sata_option() -> Vec<u8> {
        let mut path = Vec::new();
        path.extend_from_slice(&[0x02, 0x01, 12, 0]);
        path.extend_from_slice(&0x0a03_41d0u32.to_le_bytes());
        path.extend_from_slice(&0u32.to_le_bytes());
        path.extend_from_slice(&[0x01, 0x01, 6, 0, 0x02, 0x1f]);
        path.extend_from_slice(&[0x03, 0x12, 10, 0, 0, 0, 0xff, 0xff, 0, 0]);
        path.extend_from_slice(&[0x7f, 0xff, 4, 0]);
        let mut raw = vec![7, 0, 0, 0];
        raw.extend_from_slice(&1u32.to_le_bytes());
        raw.extend_from_slice(&(path.len() as u16).to_le_bytes());
        for u in "UEFI QEMU HARDDISK".encode_utf16().chain([0]) {
            raw.extend_from_slice(&u.to_le_bytes());
        }
        raw.extend_from_slice(&path);
        raw.extend_from_slice(b"optional data");
        raw
    }

    #[test]
    fn the_firmware_boot_entry_names_a_pci_device() {
        assert_eq!(parse_boot_current(&[7, 0, 0, 0, 0x01, 0x00]), Some(1));
        assert_eq!(parse_boot_current(&[7, 0, 0, 0, 0x01]), None);
        let raw = ovmf_sata_option();
        let d = parse_load_option(&raw).unwrap();
        assert_eq!(d.text, "PciRoot(0x0)/Pci(0x1F,0x2)/Sata(0x0,0xFFFF,0x0)");
        assert_eq!(d.pci, [(0x1f, 2)]);
        // Every truncation, and a node length under 4, is refused, not a panic.
        for n in 0..raw.len() - 13 {
            assert_eq!(parse_load_option(&raw[..n]), None, "{n}");
        }
        let mut short = raw.clone();
        short[10 + 38 + 12 + 2] = 2;
        assert_eq!(parse_load_option(&short), None);
        assert_eq!(
            sysfs_pci_chain(
                "../../devices/pci0000:00/0000:00:1c.0/0000:01:00.0/nvme/nvme0/nvme0n1"
            ),
            [(0x1c, 0), (0, 0)]
        );
        assert_eq!(
            sysfs_pci_chain(
                "../../devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda"
            ),
            [(0x1f, 2)]
        );
        assert!(sysfs_pci_chain("../../devices/platform/fe340000.mmc/mmc_host/mmc0").is_empty());
    }

    #[test]
    fn the_firmware_entry_narrows_copies_of_one_image() {
        let t = tempfile::tempdir().unwrap();
        // Laid out like /sys: the links climb from class/block to devices.
        let (efivars, class_block) = (t.path().join("efivars"), t.path().join("class/block"));
        std::fs::create_dir_all(&efivars).unwrap();
        std::fs::create_dir_all(&class_block).unwrap();
        for (disk, link) in [
            (
                "sda",
                "../../devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda",
            ),
            (
                "nvme0n1",
                "../../devices/pci0000:00/0000:00:03.0/nvme/nvme0/nvme0n1",
            ),
        ] {
            std::os::unix::fs::symlink(link, class_block.join(disk)).unwrap();
        }
        let both = || Hint {
            what: "the ESP systemd-boot started from (g)".into(),
            matching: vec!["nvme0n1".into(), "sda".into()],
        };
        // No BootCurrent: as it was, with why.
        let h = narrowed(both(), &efivars, &class_block);
        assert_eq!(h.matching, ["nvme0n1", "sda"]);
        assert!(h.what.contains("BootCurrent-8be4df61"), "{}", h.what);
        let var = |name: &str, raw: &[u8]| {
            std::fs::write(efivars.join(format!("{name}-{EFI_GLOBAL_GUID}")), raw).unwrap()
        };
        var("BootCurrent", &[7, 0, 0, 0, 1, 0]);
        var("Boot0001", &ovmf_sata_option());
        let h = narrowed(both(), &efivars, &class_block);
        assert_eq!(h.matching, ["sda"]);
        assert_eq!(
            h.what,
            "the ESP systemd-boot started from (g) and the firmware's boot entry Boot0001 (PciRoot(0x0)/Pci(0x1F,0x2)/Sata(0x0,0xFFFF,0x0))"
        );
        // One disk matching: the entry is not read.
        let one = Hint {
            matching: vec!["nvme0n1".into()],
            ..both()
        };
        assert_eq!(narrowed(one.clone(), &efivars, &class_block), one);
        // Two SATA disks behind the entry's controller, libata's port_no
        // unreadable: undecided, said.
        std::fs::remove_file(class_block.join("nvme0n1")).unwrap();
        std::os::unix::fs::symlink(
            "../../devices/pci0000:00/0000:00:1f.2/ata2/host1/target1:0:0/1:0:0:0/block/sdb",
            class_block.join("nvme0n1"),
        )
        .unwrap();
        let h = narrowed(both(), &efivars, &class_block);
        assert_eq!(h.matching.len(), 2);
        assert!(h.what.ends_with("matches them all)"), "{}", h.what);
        // With port_no (1-based; the entry's Sata(0x0,..) is port 0): told apart.
        for (ata, port) in [("ata1", 1), ("ata2", 2)] {
            let d = t
                .path()
                .join("devices/pci0000:00/0000:00:1f.2")
                .join(ata)
                .join("ata_port")
                .join(ata);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("port_no"), format!("{port}\n")).unwrap();
        }
        let h = narrowed(both(), &efivars, &class_block);
        assert_eq!(h.matching, ["sda"], "{}", h.what);
        // The same controller's disks under another port: none of them.
        std::fs::write(
            t.path()
                .join("devices/pci0000:00/0000:00:1f.2/ata1/ata_port/ata1/port_no"),
            "3\n",
        )
        .unwrap();
        let h = narrowed(both(), &efivars, &class_block);
        assert_eq!(h.matching.len(), 2);
        assert!(h.what.ends_with("matches none of them)"), "{}", h.what);
    }

    #[test]
    fn the_one_disk_the_hint_matches_is_chosen() {
        let disks = vec!["nvme0n1".to_string(), "sda".to_string()];
        let hint = |matching: &[&str]| {
            Ok(Hint {
                what: "the ESP systemd-boot started from (g)".into(),
                matching: matching.iter().map(|m| m.to_string()).collect(),
            })
        };
        let (d, why, decided) = choose(&disks, hint(&["sda"]));
        assert_eq!((d.as_str(), decided), ("sda", true));
        assert_eq!(
            why,
            "the one matching the ESP systemd-boot started from (g)"
        );
        // Copies of one image: both match; nothing matches; no hint.
        let (d, why, decided) = choose(&disks, hint(&["nvme0n1", "sda"]));
        assert_eq!((d.as_str(), decided), ("nvme0n1", false));
        assert!(why.starts_with("nvme0n1, sda all match"), "{why}");
        assert!(!choose(&disks, hint(&[])).2);
        let (d, why, decided) = choose(&disks, Err("no EFI firmware".into()));
        assert_eq!((d.as_str(), decided), ("nvme0n1", false));
        assert_eq!(why, "no EFI firmware; the first by kernel name");
    }

    /// One disk the firmware agrees with: quiet. One it does not name: wait
    /// for the firmware's, then (last chance) use it with a warning. Several:
    /// as `choose`, waiting when none matches. No hint: no wait.
    #[test]
    fn a_disk_the_firmware_did_not_start_is_waited_past() {
        let one = vec!["nvme0n1".to_string()];
        let two = vec!["nvme0n1".to_string(), "sda".to_string()];
        let hint = |matching: &[&str]| {
            Ok(Hint {
                what: "the ESP systemd-boot started from (g)".into(),
                matching: matching.iter().map(|m| m.to_string()).collect(),
            })
        };
        let quiet = |d: &str| Decision::Use {
            disk: d.into(),
            said: None,
        };
        assert_eq!(decide(&one, hint(&["nvme0n1"]), false), quiet("nvme0n1"));
        assert_eq!(
            decide(&one, hint(&[]), false),
            Decision::Wait(
                "nvme0n1 holds the slot's partitions, but not the ESP systemd-boot started from (g)"
                    .into()
            )
        );
        assert_eq!(
            decide(&one, hint(&[]), true),
            Decision::Use {
                disk: "nvme0n1".into(),
                said: Some((
                    "the slot's partitions are on nvme0n1 only, which does not match the ESP systemd-boot started from (g): using it".into(),
                    true
                ))
            }
        );
        assert_eq!(decide(&one, Err("no EFI".into()), false), quiet("nvme0n1"));
        assert!(
            matches!(decide(&two, hint(&[]), false), Decision::Wait(w) if w.starts_with("nvme0n1, sda hold"))
        );
        assert_eq!(
            decide(&two, hint(&["sda"]), false),
            Decision::Use {
                disk: "sda".into(),
                said: Some((
                    "the slot's partitions are on nvme0n1, sda: using sda, the one matching the ESP systemd-boot started from (g)".into(),
                    false
                ))
            }
        );
        let Decision::Use { disk, said } = decide(&two, hint(&["nvme0n1", "sda"]), false) else {
            panic!("copies are not waited for")
        };
        assert_eq!(disk, "nvme0n1");
        assert!(said.is_some_and(|(s, warn)| warn && s.contains("all match")));
        let Decision::Use { said, .. } = decide(&two, hint(&[]), true) else {
            panic!("last chance")
        };
        assert!(said.is_some_and(|(s, warn)| warn && s.contains("none matches")));
    }

    #[test]
    fn the_pi_boot_mode_names_a_bus() {
        let t = tempfile::tempdir().unwrap();
        let disks = vec![
            "mmcblk0".to_string(),
            "nvme0n1".to_string(),
            "sda".to_string(),
        ];
        let with_mode = |mode: u32| {
            std::fs::write(t.path().join("boot-mode"), mode.to_be_bytes()).unwrap();
            pi_boot_mode_hint(t.path(), &disks)
        };
        let err = pi_boot_mode_hint(t.path(), &disks).unwrap_err();
        assert!(err.contains("neither EFI nor"), "{err}");
        assert_eq!(with_mode(1).unwrap().matching, ["mmcblk0"]);
        let usb = with_mode(4).unwrap();
        assert_eq!(usb.matching, ["sda"]);
        assert_eq!(usb.what, "the firmware's boot-mode 4 (USB mass storage)");
        assert_eq!(with_mode(5).unwrap().matching, ["sda"]);
        assert_eq!(with_mode(6).unwrap().matching, ["nvme0n1"]);
        assert!(
            with_mode(2)
                .unwrap_err()
                .contains("boot-mode 2 names no disk bus")
        );
        std::fs::write(t.path().join("boot-mode"), [0, 1]).unwrap();
        assert!(pi_boot_mode_hint(t.path(), &disks).is_err());
    }

    #[test]
    fn disks_are_told_apart_by_their_gpt() {
        // Two disk files with GPTs by sfdisk, one with the ESP's GUID.
        let t = tempfile::tempdir().unwrap();
        let esp = "8C3B0C9A-6E4F-4B5B-9E3C-0123456789AB";
        for (disk, uuid) in [
            ("nvme0n1", "11111111-2222-3333-4444-555555555555"),
            ("sda", esp),
        ] {
            let path = t.path().join(disk);
            std::fs::File::create(&path)
                .unwrap()
                .set_len(4 << 20)
                .unwrap();
            let script = format!(
                "label: gpt\nstart=2048, size=2048, type=uefi, name=\"esp\", uuid={uuid}\n"
            );
            let mut child = match std::process::Command::new("sfdisk")
                .arg("--quiet")
                .arg(&path)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
            {
                Ok(c) => c,
                Err(_) => {
                    eprintln!("sfdisk not available; skipping");
                    return;
                }
            };
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(script.as_bytes())
                .unwrap();
            assert!(child.wait().unwrap().success());
        }
        let disks = vec!["nvme0n1".to_string(), "sda".to_string(), "vdq".to_string()];
        let mut warned = Vec::new();
        let got = disks_with_partition(
            t.path(),
            t.path(),
            &disks,
            &esp.to_ascii_lowercase(),
            &mut |w| warned.push(w),
        );
        assert_eq!(got, ["sda"], "vdq does not exist and is left out");
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(
            warned[0].starts_with(&format!("{}: ", t.path().join("vdq").display())),
            "{warned:?}"
        );
    }
}
