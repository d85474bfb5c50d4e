//! Raspberry Pi boot files: what the builder puts on the config FAT (p1) and on a
//! slot's boot FAT (p2 for slot a), from the board's `[boot]`/`[firmware]` tables and
//! the image definition's `[rpi]` additions (docs/raspberry-pi.md, "The SD card";
//! ../shared/REFERENCE.md §1.2 for `config.txt`, §1.4 for `autoboot.txt`).
//!
//! `autoboot.txt` is not written here: it comes from `basalt_init::rpi::Autoboot`,
//! the same code init rewrites it with on a commit. This module only reads the root
//! tree and renders text; it never writes the image.

use std::path::{Path, PathBuf};

use basalt_init::rpi::{self, Autoboot};
use basalt_init::slot::Slot;
use basalt_rootfs::overlay::glob_match;
use basalt_rootfs::tree::{EntryKind, FileData, Tree};

use crate::board::{Board, PiBoot};
use crate::imagedef::RaspberryPi;

/// `config.txt`: the firmware's settings on a slot boot partition.
pub const CONFIG_TXT: &str = "config.txt";
/// `cmdline.txt`: the kernel command line, one line.
pub const CMDLINE_TXT: &str = "cmdline.txt";
/// Volume label of the config FAT (p1).
pub const CONFIG_LABEL: &str = "BASALT-CFG";

/// Volume label of a slot's boot FAT.
pub fn boot_label(slot: Slot) -> &'static str {
    match slot {
        Slot::A => "BASALT-A",
        Slot::B => "BASALT-B",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RpiBootError {
    #[error("board {board} is not a Raspberry Pi board (no [boot]/[firmware] tables)")]
    NotPi { board: String },
    #[error(
        "{key} = {pattern:?} matches {count} directories in the root tree (need exactly one){found}"
    )]
    Dir {
        key: &'static str,
        pattern: String,
        count: usize,
        found: String,
    },
    #[error(
        "{key}: {name:?} is not a file in {dir}/ of the root tree — is the overlay holding it listed in the image definition?"
    )]
    Missing {
        key: &'static str,
        name: String,
        dir: String,
    },
}

/// The files of a slot boot partition besides the kernel, initramfs, `config.txt` and
/// `cmdline.txt`, and those of p1 besides `autoboot.txt` and the node config. Names
/// are paths on the FAT (`overlays/disable-bt.dtbo`).
#[derive(Debug, Clone)]
pub struct PiBootFiles {
    pub boot: Vec<(String, FileData)>,
    pub config: Vec<(String, FileData)>,
}

/// The directory `pattern` names in `tree` (may hold `*`/`?`; exactly one match).
fn find_dir(tree: &Tree, key: &'static str, pattern: &str) -> Result<PathBuf, RpiBootError> {
    let pat = pattern.trim_matches('/');
    let found: Vec<PathBuf> = tree
        .iter()
        .filter(|(p, e)| e.is_dir() && glob_match(pat, &p.to_string_lossy()))
        .map(|(p, _)| p.to_path_buf())
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(RpiBootError::Dir {
            key,
            pattern: pattern.to_string(),
            count: found.len(),
            found: if found.is_empty() {
                String::new()
            } else {
                format!(
                    ": {}",
                    found
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        }),
    }
}

fn file_in(
    tree: &Tree,
    key: &'static str,
    dir: &Path,
    name: &str,
) -> Result<FileData, RpiBootError> {
    match tree.get(dir.join(name)).map(|e| &e.kind) {
        Some(EntryKind::File(d)) => Ok(d.clone()),
        _ => Err(RpiBootError::Missing {
            key,
            name: name.to_string(),
            dir: dir.display().to_string(),
        }),
    }
}

/// The board's DTBs and overlays after the image definition's replacements.
pub fn dtbs_and_overlays<'a>(
    boot: &'a PiBoot,
    def: &'a RaspberryPi,
) -> (&'a [String], &'a [String]) {
    (
        def.dtbs.as_deref().unwrap_or(&boot.dtbs),
        def.overlays.as_deref().unwrap_or(&boot.overlays),
    )
}

/// Finds the firmware files, DTBs and overlays in the root tree.
pub fn collect(tree: &Tree, board: &Board, def: &RaspberryPi) -> Result<PiBootFiles, RpiBootError> {
    let Some((boot, firmware)) = board.pi() else {
        return Err(RpiBootError::NotPi {
            board: board.name.clone(),
        });
    };
    // The image definition's `[rpi]` path wins over the board's `[root]` one; errors
    // name the key that was used.
    let (dtbs_pat, dtbs_key) = match &def.dtbs_dir {
        Some(p) => (p.as_str(), "rpi.dtbs_dir"),
        None => (
            board.root.dtbs_dir.as_deref().unwrap_or(""),
            "root.dtbs_dir",
        ),
    };
    let (fw_pat, fw_key) = match &def.firmware_dir {
        Some(p) => (p.as_str(), "rpi.firmware_dir"),
        None => (
            board.root.firmware_dir.as_deref().unwrap_or(""),
            "root.firmware_dir",
        ),
    };
    let dtbs_dir = find_dir(tree, dtbs_key, dtbs_pat)?;
    let fw_dir = find_dir(tree, fw_key, fw_pat)?;

    let mut out = PiBootFiles {
        boot: Vec::new(),
        config: Vec::new(),
    };
    for f in &firmware.files {
        out.boot
            .push((f.clone(), file_in(tree, "firmware.files", &fw_dir, f)?));
    }
    for f in &firmware.config_partition_files {
        out.config.push((
            f.clone(),
            file_in(tree, "firmware.config_partition_files", &fw_dir, f)?,
        ));
    }
    let (dtbs, overlays) = dtbs_and_overlays(boot, def);
    for d in dtbs {
        out.boot
            .push((d.clone(), file_in(tree, "boot.dtbs", &dtbs_dir, d)?));
    }
    let overlays_dir = dtbs_dir.join("overlays");
    for o in overlays {
        let name = format!("{o}.dtbo");
        let data = file_in(tree, "boot.overlays", &overlays_dir, &name)?;
        out.boot.push((format!("overlays/{name}"), data));
    }
    Ok(out)
}

/// `config.txt` of a slot boot partition. The kernel and initramfs are named
/// explicitly (no firmware default decides what boots); `[pi4]` switches the kernel
/// name on boards that give `kernel_file_pi4`. The board's lines follow, then the
/// image definition's.
pub fn config_txt(boot: &PiBoot, def: &RaspberryPi, os_version: &str, slot: Slot) -> String {
    let mut t = format!(
        "# Basalt {os_version}, slot {}: written by basalt build.\n[all]\nkernel={}\n",
        slot.name(),
        boot.kernel_file
    );
    if let Some(k) = &boot.kernel_file_pi4 {
        t.push_str(&format!("[pi4]\nkernel={k}\n[all]\n"));
    }
    t.push_str(&format!("initramfs {} followkernel\n", boot.initramfs_file));
    for l in boot.config.iter().chain(&def.config) {
        t.push_str(l.trim());
        t.push('\n');
    }
    t
}

/// `cmdline.txt`: one line. The board's command line, the image definition's
/// additions, the slot and its root partition number (MBR partitions have no names).
pub fn cmdline_txt(board_cmdline: &str, def_cmdline: &str, slot: Slot) -> String {
    let mut words: Vec<&str> = board_cmdline
        .split_whitespace()
        .chain(def_cmdline.split_whitespace())
        .collect();
    let slot_key = format!("basalt.slot={}", slot.name());
    let root_key = format!("basalt.root={}", rpi::root_partition(slot));
    words.push(&slot_key);
    words.push(&root_key);
    format!("{}\n", words.join(" "))
}

/// `autoboot.txt` of a fresh image: slot a primary (init's own renderer).
pub fn autoboot_txt() -> String {
    Autoboot { primary: Slot::A }.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_rootfs::tree::Entry;
    use std::sync::Arc;

    fn pi4() -> Board {
        Board::embedded("rpi4").unwrap()
    }

    #[test]
    fn config_txt_names_kernel_and_initramfs() {
        let b = pi4();
        let boot = b.boot.as_ref().unwrap();
        let def = RaspberryPi {
            config: vec!["dtoverlay=vc4-kms-v3d".into()],
            ..Default::default()
        };
        let t = config_txt(boot, &def, "0.1.0", Slot::A);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[1], "[all]");
        assert_eq!(lines[2], "kernel=kernel8.img");
        assert_eq!(lines[3], "initramfs initramfs followkernel");
        assert_eq!(lines.last(), Some(&"dtoverlay=vc4-kms-v3d"));
        assert!(lines.contains(&"dtoverlay=disable-bt"));

        let armv7 = Board::embedded("rpi-armv7").unwrap();
        let t = config_txt(
            armv7.boot.as_ref().unwrap(),
            &RaspberryPi::default(),
            "0.1.0",
            Slot::A,
        );
        assert!(
            t.contains("kernel=kernel7.img\n[pi4]\nkernel=kernel7l.img\n[all]\ninitramfs"),
            "{t}"
        );
    }

    #[test]
    fn cmdline_is_one_line_with_slot_and_root() {
        let t = cmdline_txt(
            "console=ttyAMA0,115200  cgroup_memory=1",
            " quiet\t",
            Slot::A,
        );
        assert_eq!(
            t,
            "console=ttyAMA0,115200 cgroup_memory=1 quiet basalt.slot=a basalt.root=5\n"
        );
        assert!(cmdline_txt("", "", Slot::B).ends_with("basalt.slot=b basalt.root=6\n"));
    }

    #[test]
    fn autoboot_is_inits_canonical_file() {
        assert_eq!(
            autoboot_txt(),
            "[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n"
        );
    }

    #[test]
    fn collect_finds_files_and_names_what_is_missing() {
        let b = pi4();
        let mut tree = Tree::new();
        let file = |s: &str| Entry::file(FileData::Bytes(Arc::new(s.as_bytes().to_vec())), 0o644);
        for f in ["start4.elf", "fixup4.dat"] {
            tree.insert(format!("fw/{f}"), file(f)).unwrap();
        }
        tree.insert("k/6.1/broadcom/bcm2711-rpi-4-b.dtb", file("dtb"))
            .unwrap();
        let def = RaspberryPi {
            dtbs: Some(vec!["bcm2711-rpi-4-b.dtb".into()]),
            overlays: Some(vec![]),
            dtbs_dir: Some("k/*/broadcom".into()),
            firmware_dir: Some("fw".into()),
            ..Default::default()
        };
        let got = collect(&tree, &b, &def).unwrap();
        let names: Vec<&str> = got.boot.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["start4.elf", "fixup4.dat", "bcm2711-rpi-4-b.dtb"]);
        assert!(got.config.is_empty());

        // The board's own DTB list: bcm2711-rpi-400.dtb is not there.
        let def2 = RaspberryPi {
            dtbs: None,
            ..def.clone()
        };
        let e = collect(&tree, &b, &def2).unwrap_err().to_string();
        assert!(
            e.contains("bcm2711-rpi-400.dtb") && e.contains("boot.dtbs"),
            "{e}"
        );

        // Two directories match the pattern.
        tree.insert("k/6.2/broadcom/x.dtb", file("x")).unwrap();
        let e = collect(&tree, &b, &def).unwrap_err().to_string();
        assert!(
            e.contains("rpi.dtbs_dir") && e.contains("2 directories"),
            "{e}"
        );
    }
}
