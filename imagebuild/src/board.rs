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
pub const EMBEDDED: &[(&str, &str)] = &[("x86_64", include_str!("../../boards/x86_64.toml"))];

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
    SystemdBoot,
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Initramfs {
    /// Module names (as `modprobe` takes them; `-` and `_` are the same).
    pub modules: Vec<String>,
}

/// Partition sizes in MiB.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partitions {
    pub esp_mib: u64,
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
    pub bootloader: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    #[error("board file {file}: {err}")]
    Parse {
        file: String,
        #[source]
        err: Box<toml::de::Error>,
    },
    #[error("board file {file}: key `{key}`: {why}")]
    Invalid {
        file: String,
        key: &'static str,
        why: String,
    },
    #[error("cannot read board file {file}: {err}")]
    Read {
        file: PathBuf,
        #[source]
        err: std::io::Error,
    },
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
        if self.partition_table == PartitionTable::Mbr {
            return bad(
                "partition_table",
                "\"mbr\" boards are not built yet (only \"gpt\")",
            );
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
            ("partitions.esp_mib", p.esp_mib),
            ("partitions.root_mib", p.root_mib),
            ("partitions.data_mib", p.data_mib),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1");
            }
        }
        // FAT32 needs at least 65525 clusters: 33 MiB with 512-byte clusters.
        if p.esp_mib < 33 {
            return bad("partitions.esp_mib", "FAT32 needs at least 33 MiB");
        }
        if p.data_mib < 2 {
            return bad("partitions.data_mib", "ext4 needs at least 2 MiB");
        }
        for (key, v) in [
            ("root.kernel", &self.root.kernel),
            ("root.modules_dir", &self.root.modules_dir),
            ("root.bootloader", &self.root.bootloader),
        ] {
            if v.is_empty() || v.split('/').any(|c| c == "..") {
                return bad(key, "must be a path inside the root tree");
            }
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
        assert_eq!(b.initramfs.modules.len(), 11);
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
}
