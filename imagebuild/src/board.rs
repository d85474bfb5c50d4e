//! Boards: what the hardware needs, read from `boards/<name>.toml`
//! (schema: docs/board.md). The board files of this repository are embedded in
//! the `basalt` binary, so `basalt build --board x86_64` needs no checkout.
//!
//! A board says nothing about what the image holds (that is the image
//! definition's job); it says how to boot it and where in the root tree the
//! boot files are found.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Boards shipped with basalt: (name, file content).
pub const EMBEDDED: &[(&str, &str)] = &[
    ("x86_64", include_str!("../../boards/x86_64.toml")),
    ("rpi4", include_str!("../../boards/rpi4.toml")),
    ("rpi5", include_str!("../../boards/rpi5.toml")),
    ("rpi3", include_str!("../../boards/rpi3.toml")),
    ("rpi-armv7", include_str!("../../boards/rpi-armv7.toml")),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionTable {
    Gpt,
    Mbr,
}

impl PartitionTable {
    pub fn name(self) -> &'static str {
        match self {
            PartitionTable::Gpt => "gpt",
            PartitionTable::Mbr => "mbr",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootMethod {
    /// UEFI + systemd-boot with boot counting (GPT boards).
    SystemdBoot,
    /// Raspberry Pi firmware `autoboot.txt` `[tryboot]` + `reboot "0 tryboot"` (MBR boards).
    Tryboot,
    /// Raspberry Pi `reboot N` + trial marker + watchdog (MBR boards without tryboot).
    RebootPartition,
}

impl BootMethod {
    pub fn name(self) -> &'static str {
        match self {
            BootMethod::SystemdBoot => "systemd-boot",
            BootMethod::Tryboot => "tryboot",
            BootMethod::RebootPartition => "reboot-partition",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Board {
    pub name: String,
    /// Architecture name as the kernel uses it (`x86_64`, `aarch64`, `armv7l`).
    pub arch: String,
    /// Alpine's name for the architecture (`x86_64`, `aarch64`, `armhf`).
    pub alpine_arch: String,
    /// Rust target the device binaries (init) are built for.
    pub rust_target: String,
    pub partition_table: PartitionTable,
    pub boot_method: BootMethod,
    /// Console device name without `/dev/` (`ttyS0`).
    pub console: String,
    /// Kernel command line (the slot key is added by the builder).
    pub cmdline: String,
    pub initramfs: Initramfs,
    pub partitions: Partitions,
    pub root: RootPaths,
    /// Where the Raspberry Pi kernel and firmware come from (informational until the
    /// Alpine package source lands; the image definition's overlays provide them).
    pub packages: Option<Packages>,
    /// Raspberry Pi firmware files (MBR boards).
    pub firmware: Option<Firmware>,
    /// What a Raspberry Pi slot boot partition holds (MBR boards).
    pub boot: Option<PiBoot>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Packages {
    pub kernel: String,
    pub firmware: String,
}

/// Raspberry Pi firmware files, by name in `root.firmware_dir`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Firmware {
    /// Copied to each slot boot partition.
    pub files: Vec<String>,
    /// Copied to the config partition p1 as well (`bootcode.bin` on Pi 2/3).
    #[serde(default)]
    pub config_partition_files: Vec<String>,
}

/// A Raspberry Pi slot boot partition: kernel name, DTBs, overlays, `config.txt`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PiBoot {
    /// The kernel's name on the boot partition (`kernel8.img`, `kernel_2712.img`, `kernel7.img`).
    pub kernel_file: String,
    /// On `rpi-armv7`: the name Pi 4 boots (`kernel7l.img`), written under `[pi4]`.
    pub kernel_file_pi4: Option<String>,
    pub initramfs_file: String,
    /// Device tree blobs, by name in `root.dtbs_dir`.
    pub dtbs: Vec<String>,
    /// Device tree overlays, by name without `.dtbo`, from `root.dtbs_dir/overlays/`.
    #[serde(default)]
    pub overlays: Vec<String>,
    /// `config.txt` lines after the builder's `kernel=` and `initramfs` lines.
    #[serde(default)]
    pub config: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Initramfs {
    /// Module names (as `modprobe` takes them; `-` and `_` are the same).
    pub modules: Vec<String>,
    /// Modules the path to Kubernetes does not need (a watchdog driver,
    /// efivarfs): in the initramfs too, but PID 1 loads them right after it
    /// started Kubernetes (stage 1 at once on a trial boot). Docs/board.md.
    #[serde(default)]
    pub late_modules: Vec<String>,
}

/// Partition sizes in MiB. GPT boards give `esp_mib`; MBR boards `config_mib` and
/// `boot_mib` (0 = not given; `validate` checks the right ones are there).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partitions {
    #[serde(default)]
    pub esp_mib: u64,
    /// MBR: the config FAT p1.
    #[serde(default)]
    pub config_mib: u64,
    /// MBR: each slot boot FAT (p2, p3).
    #[serde(default)]
    pub boot_mib: u64,
    /// Size of each root slot (root-a and root-b).
    pub root_mib: u64,
    /// Size of the data partition in the image (grown on first boot).
    pub data_mib: u64,
}

/// Where the boot files are found in the root tree (relative paths; `kernel` may
/// hold `*`/`?` and must match exactly one file).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootPaths {
    pub kernel: String,
    pub modules_dir: String,
    /// GPT boards: the EFI boot loader.
    pub bootloader: Option<String>,
    /// MBR boards: directory holding the DTBs and `overlays/` (may hold `*`/`?`
    /// and must match exactly one directory).
    pub dtbs_dir: Option<String>,
    /// MBR boards: directory holding the firmware files.
    pub firmware_dir: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    #[error("board file {file}: {err}")]
    Parse {
        file: String,
        err: Box<toml::de::Error>,
    },
    #[error("board file {file}: key `{key}`: {why}")]
    Invalid {
        file: String,
        key: &'static str,
        why: String,
    },
    #[error("cannot read board file {file}: {err}")]
    Read { file: PathBuf, err: std::io::Error },
    #[error(
        "unknown board {name:?}: boards shipped with basalt are {known}; or give a path to a board file"
    )]
    Unknown { name: String, known: String },
}

impl Board {
    /// Parse a board file's text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Board, BoardError> {
        let board: Board = toml::from_str(text).map_err(|err| BoardError::Parse {
            file: file.to_string(),
            err: Box::new(err),
        })?;
        board.validate(file)?;
        Ok(board)
    }

    fn validate(&self, file: &str) -> Result<(), BoardError> {
        let bad = |key, why: &str| {
            Err(BoardError::Invalid {
                file: file.to_string(),
                key,
                why: why.to_string(),
            })
        };
        if self.name.is_empty() {
            return bad("name", "must not be empty");
        }
        if self.console.starts_with("/dev/") {
            return bad("console", "give the device name without /dev/ (\"ttyS0\")");
        }
        if let Some(m) = self
            .initramfs
            .modules
            .iter()
            .find(|m| m.is_empty() || m.contains('/') || m.ends_with(".ko"))
        {
            return bad(
                "initramfs.modules",
                &format!("{m:?} is not a module name (write \"virtio_blk\", not a path)"),
            );
        }
        let p = self.partitions;
        for (key, v) in [
            ("partitions.root_mib", p.root_mib),
            ("partitions.data_mib", p.data_mib),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if p.data_mib < crate::data::MIN_MIB {
            return bad(
                "partitions.data_mib",
                &format!(
                    "must be at least {} (the ext4's journal and inode table)",
                    crate::data::MIN_MIB
                ),
            );
        }
        let path_ok = |v: &str| !v.is_empty() && !v.split('/').any(|c| c == "..");
        for (key, v) in [
            ("root.kernel", &self.root.kernel),
            ("root.modules_dir", &self.root.modules_dir),
        ] {
            if !path_ok(v) {
                return bad(key, "must be a path inside the root tree");
            }
        }
        match self.partition_table {
            PartitionTable::Gpt => self.validate_gpt(file),
            PartitionTable::Mbr => self.validate_mbr(file),
        }
    }

    fn validate_gpt(&self, file: &str) -> Result<(), BoardError> {
        let bad = |key, why: &str| {
            Err(BoardError::Invalid {
                file: file.to_string(),
                key,
                why: why.to_string(),
            })
        };
        if self.boot_method != BootMethod::SystemdBoot {
            return bad("boot_method", "\"gpt\" boards boot with \"systemd-boot\"");
        }
        // FAT32 needs at least 65525 clusters: 33 MiB with 512-byte clusters.
        if self.partitions.esp_mib < 33 {
            return bad("partitions.esp_mib", "FAT32 needs at least 33 MiB");
        }
        match &self.root.bootloader {
            Some(b) if !b.is_empty() && !b.split('/').any(|c| c == "..") => {}
            _ => return bad("root.bootloader", "must be a path inside the root tree"),
        }
        for (key, set) in [
            ("firmware", self.firmware.is_some()),
            ("boot", self.boot.is_some()),
            ("root.dtbs_dir", self.root.dtbs_dir.is_some()),
        ] {
            if set {
                return bad(key, "is for \"mbr\" (Raspberry Pi) boards only");
            }
        }
        Ok(())
    }

    fn validate_mbr(&self, file: &str) -> Result<(), BoardError> {
        let bad = |key, why: &str| {
            Err(BoardError::Invalid {
                file: file.to_string(),
                key,
                why: why.to_string(),
            })
        };
        if self.boot_method == BootMethod::SystemdBoot {
            return bad(
                "boot_method",
                "\"mbr\" boards boot with \"tryboot\" or \"reboot-partition\"",
            );
        }
        let p = self.partitions;
        if p.esp_mib != 0 {
            return bad(
                "partitions.esp_mib",
                "is for \"gpt\" boards; \"mbr\" boards give config_mib and boot_mib",
            );
        }
        // FAT32 needs 65525 clusters: 33 MiB with 512-byte clusters.
        for (key, v) in [
            ("partitions.config_mib", p.config_mib),
            ("partitions.boot_mib", p.boot_mib),
        ] {
            if v < 33 {
                return bad(key, "FAT32 needs at least 33 MiB");
            }
        }
        let Some(boot) = &self.boot else {
            return bad("boot", "\"mbr\" boards need a [boot] table");
        };
        if self.firmware.is_none() {
            return bad("firmware", "\"mbr\" boards need a [firmware] table");
        }
        for (key, v) in [
            ("root.dtbs_dir", &self.root.dtbs_dir),
            ("root.firmware_dir", &self.root.firmware_dir),
        ] {
            match v {
                Some(v) if !v.is_empty() && !v.split('/').any(|c| c == "..") => {}
                _ => return bad(key, "must be a path inside the root tree"),
            }
        }
        let plain = |n: &str| {
            !n.is_empty() && !n.contains('/') && !n.contains(char::is_whitespace) && n != ".."
        };
        let mut names = vec![("boot.kernel_file", &boot.kernel_file)];
        names.push(("boot.initramfs_file", &boot.initramfs_file));
        if let Some(k) = &boot.kernel_file_pi4 {
            names.push(("boot.kernel_file_pi4", k));
        }
        names.extend(boot.dtbs.iter().map(|d| ("boot.dtbs", d)));
        names.extend(boot.overlays.iter().map(|d| ("boot.overlays", d)));
        let fw = self
            .firmware
            .as_ref()
            .map(|f| f.files.iter().chain(&f.config_partition_files));
        names.extend(fw.into_iter().flatten().map(|f| ("firmware.files", f)));
        if let Some((key, n)) = names.into_iter().find(|(_, n)| !plain(n)) {
            return bad(key, &format!("{n:?} is not a plain file name"));
        }
        if let Some(l) = boot.config.iter().find(|l| l.contains('\n')) {
            return bad("boot.config", &format!("{l:?}: one line per entry"));
        }
        if self.cmdline.contains('\n') {
            return bad("cmdline", "cmdline.txt is a single line");
        }
        Ok(())
    }

    /// A board shipped with basalt, by name.
    pub fn embedded(name: &str) -> Result<Board, BoardError> {
        match EMBEDDED.iter().find(|(n, _)| *n == name) {
            Some((n, text)) => Board::parse(text, &format!("boards/{n}.toml (embedded)")),
            None => Err(BoardError::Unknown {
                name: name.to_string(),
                known: EMBEDDED
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// A board by name (embedded) or by path to a `.toml` file.
    pub fn load(name_or_path: &str, base: &Path) -> Result<Board, BoardError> {
        if name_or_path.ends_with(".toml") || name_or_path.contains('/') {
            let file = base.join(name_or_path);
            let text = std::fs::read_to_string(&file).map_err(|err| BoardError::Read {
                file: file.clone(),
                err,
            })?;
            Board::parse(&text, &file.display().to_string())
        } else {
            Board::embedded(name_or_path)
        }
    }

    /// The Raspberry Pi tables of an MBR board (validated to be present).
    pub fn pi(&self) -> Option<(&PiBoot, &Firmware)> {
        self.boot.as_ref().zip(self.firmware.as_ref())
    }

    /// Kernel architecture names map to the EFI removable-media loader name.
    pub fn efi_boot_file(&self) -> &'static str {
        match self.arch.as_str() {
            "aarch64" => "BOOTAA64.EFI",
            _ => "BOOTX64.EFI",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = include_str!("../../boards/x86_64.toml");

    #[test]
    fn embedded_x86_64_parses() {
        let b = Board::embedded("x86_64").unwrap();
        assert_eq!(b.partition_table, PartitionTable::Gpt);
        assert_eq!(b.console, "ttyS0");
        // virtio disk, squashfs, vfat + nls, dm-verity, ext4 + crc32c,
        // efivarfs; late: softdog.
        assert_eq!(b.initramfs.modules.len(), 18);
        for m in ["dm-verity", "ext4", "crc32c_generic"] {
            assert!(b.initramfs.modules.iter().any(|x| x == m), "{m}");
        }
        assert_eq!(b.initramfs.late_modules, ["softdog"]);
        assert_eq!(b.initramfs.modules[0], "virtio_ring");
        assert_eq!(b.efi_boot_file(), "BOOTX64.EFI");
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let text = GOOD.replace("console = ", "consol = ");
        let e = Board::parse(&text, "boards/bad.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("boards/bad.toml"), "{e}");
        assert!(e.contains("consol"), "{e}");
    }

    #[test]
    fn wrong_type_and_bad_values_are_precise() {
        let text = GOOD.replace("esp_mib = 128", "esp_mib = \"big\"");
        let e = Board::parse(&text, "b.toml").unwrap_err().to_string();
        assert!(e.contains("esp_mib") || e.contains("line"), "{e}");

        let text = GOOD.replace("esp_mib = 128", "esp_mib = 8");
        let e = Board::parse(&text, "b.toml").unwrap_err().to_string();
        assert!(e.contains("partitions.esp_mib"), "{e}");

        let text = GOOD.replace("data_mib = 64", "data_mib = 8");
        let e = Board::parse(&text, "b.toml").unwrap_err().to_string();
        assert!(
            e.contains("partitions.data_mib") && e.contains("at least 16"),
            "{e}"
        );
        let text = GOOD.replace("data_mib = 64", "data_mib = 16");
        Board::parse(&text, "b.toml").unwrap();

        let text = GOOD.replace("\"virtio_ring\"", "\"kernel/virtio_ring.ko\"");
        let e = Board::parse(&text, "b.toml").unwrap_err().to_string();
        assert!(e.contains("initramfs.modules"), "{e}");

        let text = GOOD.replace("boot_method = \"systemd-boot\"", "boot_method = \"grub\"");
        let e = Board::parse(&text, "b.toml").unwrap_err().to_string();
        assert!(e.contains("grub"), "{e}");
    }

    #[test]
    fn unknown_board_lists_known() {
        let e = Board::embedded("pi9").unwrap_err().to_string();
        assert!(e.contains("x86_64"), "{e}");
    }

    #[test]
    fn raspberry_pi_boards_parse() {
        for (name, method, kernel) in [
            ("rpi4", BootMethod::Tryboot, "kernel8.img"),
            ("rpi5", BootMethod::Tryboot, "kernel_2712.img"),
            ("rpi3", BootMethod::RebootPartition, "kernel8.img"),
            ("rpi-armv7", BootMethod::RebootPartition, "kernel7.img"),
        ] {
            let b = Board::embedded(name).unwrap();
            assert_eq!(b.partition_table, PartitionTable::Mbr, "{name}");
            assert_eq!(b.boot_method, method, "{name}");
            let (boot, _) = b.pi().unwrap();
            assert_eq!(boot.kernel_file, kernel, "{name}");
            assert!(b.cmdline.contains("cgroup_memory=1 cgroup_enable=memory"));
            assert!(b.initramfs.modules.iter().any(|m| m == "bcm2835_wdt"));
        }
        let armv7 = Board::embedded("rpi-armv7").unwrap();
        assert_eq!(
            armv7.pi().unwrap().0.kernel_file_pi4.as_deref(),
            Some("kernel7l.img")
        );
    }

    #[test]
    fn mismatched_table_and_method_are_refused() {
        const PI: &str = include_str!("../../boards/rpi4.toml");
        let e = Board::parse(
            &PI.replace(
                "boot_method = \"tryboot\"",
                "boot_method = \"systemd-boot\"",
            ),
            "p.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("boot_method"), "{e}");
        let e = Board::parse(&PI.replace("[boot]", "[boot_]"), "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("boot"), "{e}");
        let e = Board::parse(&PI.replace("config_mib = 64", "config_mib = 8"), "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("partitions.config_mib"), "{e}");
        let e = Board::parse(
            &PI.replace("kernel_file = \"kernel8.img\"", "kernel_file = \"a/b.img\""),
            "p.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("boot.kernel_file"), "{e}");
        let e = Board::parse(&GOOD.replace("systemd-boot\"", "tryboot\""), "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("boot_method"), "{e}");
    }
}
