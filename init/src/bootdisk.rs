//! Which disk the node booted from, when the slot's partitions are on more
//! than one: a Basalt USB stick left in after installing to the internal
//! disk, an old card in a reader, the disk of another node. Stage 1 must
//! mount the root, grow the data partition and let updates write slots only
//! on the disk the firmware started, never on whichever sorts first.
//!
//! UEFI: systemd-boot leaves `LoaderDevicePartUUID` (the unique partition
//! GUID of the ESP it was started from; systemd's Boot Loader Interface) in
//! EFI variables;
//! the disk whose GPT has that partition is the one. Only read when the
//! partitions are on several disks, so a usual boot mounts no efivarfs and
//! loads no module for it. The Raspberry Pi 4/5 EEPROM bootloader names the
//! bus it booted from (`/chosen/bootloader/boot-mode`, a `BOOT_ORDER` mode:
//! 1 SD card/eMMC, 4 and 5 USB mass storage, 6 NVMe): that tells an SD card
//! from a USB SSD, not two USB disks. When nothing decides (two copies of
//! one image share their GUIDs; no hint at all): the first disk by kernel
//! name, with a warning naming them all (docs/boot-protocol.md, Stage 1, 3).

use std::path::Path;

use crate::boottime::LOADER_GUID;
use crate::say;

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
/// A disk whose table cannot be read is left out, and said.
pub fn disks_with_partition(
    dev: &Path,
    class_block: &Path,
    disks: &[String],
    uuid: &str,
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
                    say!("warning storage: {}: {e}", path.display());
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

/// UEFI: the disks holding the ESP systemd-boot was started from.
pub fn loader_hint(
    efivars: &Path,
    dev: &Path,
    class_block: &Path,
    disks: &[String],
) -> Result<Hint, String> {
    let uuid = loader_part_uuid(efivars)?;
    Ok(Hint {
        what: format!("the ESP systemd-boot started from ({uuid})"),
        matching: disks_with_partition(dev, class_block, disks, &uuid),
    })
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
        let got = disks_with_partition(t.path(), t.path(), &disks, &esp.to_ascii_lowercase());
        assert_eq!(got, ["sda"], "vdq does not exist and is left out");
    }
}
