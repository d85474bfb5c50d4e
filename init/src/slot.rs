//! Slot naming shared by the builder and the device: partition names, the
//! kernel command line keys that tell stage 1 which slot booted, and the
//! paths both sides agree on. See docs/boot-protocol.md.

/// One of the two copies of the OS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    pub fn parse(s: &str) -> Option<Slot> {
        match s {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }

    /// GPT partition name of this slot's root filesystem (`root-a`).
    pub fn root_partition_name(self) -> &'static str {
        match self {
            Slot::A => "root-a",
            Slot::B => "root-b",
        }
    }
}

/// GPT name of the EFI system partition (x86_64).
pub const ESP_PARTITION_NAME: &str = "esp";
/// GPT name of the data partition mounted at `/var`.
pub const DATA_PARTITION_NAME: &str = "data";

/// Kernel command line key naming the booted slot: `basalt.slot=a`.
pub const CMDLINE_SLOT: &str = "basalt.slot";

/// Kernel command line key with the slot's dm-verity root hash (64 hex digits).
pub const CMDLINE_VERITY: &str = "basalt.verity";
/// Kernel command line key with the number of 4096-byte data blocks the
/// verity tree covers; the hash area (superblock first) starts right after them.
pub const CMDLINE_VERITY_DATA_BLOCKS: &str = "basalt.verity_data_blocks";
/// dm-verity data and hash block size used by the builder.
pub const VERITY_BLOCK: u64 = 4096;

/// Marker file present only in the initramfs: its presence makes init run stage 1.
pub const INITRAMFS_MARKER: &str = "/etc/basalt/initramfs.toml";
/// Where the builder puts the init binary inside the root filesystem.
pub const ROOT_INIT_PATH: &str = "/usr/lib/basalt/init";
/// Image facts the builder writes into the root filesystem.
pub const IMAGE_FACTS_PATH: &str = "/etc/basalt/image.toml";
/// Directory of service definitions in the root filesystem.
pub const SERVICES_DIR: &str = "/etc/basalt/services";
/// Node config file name on the config FAT partition.
pub const NODE_CONFIG_FILE: &str = "node.toml";
/// Mount point of the config FAT partition (the ESP on x86_64) in the real root.
pub const BOOT_MOUNT: &str = "/boot";
/// Unix socket on which PID 1 serves `basaltctl`.
pub const CONTROL_SOCKET: &str = "/run/basalt/control.sock";
/// Persistent machine id, kept on the data partition.
pub const MACHINE_ID_PATH: &str = "/var/lib/basalt/machine-id";
