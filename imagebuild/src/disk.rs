//! The disk: partition layout, GPT (gptman), identifiers derived from the
//! image's inputs, and writes of partition payloads into the (sparse) image file:
//! each payload whole, zeros included; what lies past it stays a hole.
//!
//! Layout (docs/boot-protocol.md, "Disk"): 1 MiB for the protective MBR and
//! primary GPT, then esp, root-a, root-b, data, each 1 MiB aligned, then
//! 1 MiB holding the backup GPT. Never touches a block device.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};

use basalt_init::slot::{DATA_PARTITION_NAME, ESP_PARTITION_NAME, Slot};
use gptman::{GPT, GPTPartitionEntry};
use sha2::{Digest, Sha256};

use crate::board::Partitions;

pub const SECTOR: u64 = 512;
pub const MIB: u64 = 1024 * 1024;

/// EFI system partition type.
pub const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// Linux filesystem data type (root-a, root-b, data).
pub const LINUX_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("partition table: {0}")]
    Gpt(#[from] gptman::Error),
    #[error("image file: {what}: {err}")]
    Io { what: String, err: io::Error },
    #[error(
        "{part} content is {size} bytes but the partition holds {cap} (board partitions.{key})"
    )]
    TooBig {
        part: &'static str,
        key: &'static str,
        size: u64,
        cap: u64,
    },
}

/// One partition: GPT name, type, byte range.
#[derive(Debug, Clone, Copy)]
pub struct Part {
    pub name: &'static str,
    pub type_guid: &'static str,
    pub start: u64,
    pub len: u64,
}

#[derive(Debug, Clone)]
pub struct Layout {
    pub parts: [Part; 4],
    pub total: u64,
}

impl Layout {
    pub fn new(p: &Partitions) -> Layout {
        let mut at = MIB;
        let mut next = |name, type_guid, mib: u64| {
            let part = Part {
                name,
                type_guid,
                start: at,
                len: mib * MIB,
            };
            at += mib * MIB;
            part
        };
        let parts = [
            next(ESP_PARTITION_NAME, ESP_TYPE, p.esp_mib),
            next(Slot::A.root_partition_name(), LINUX_TYPE, p.root_mib),
            next(Slot::B.root_partition_name(), LINUX_TYPE, p.root_mib),
            next(DATA_PARTITION_NAME, LINUX_TYPE, p.data_mib),
        ];
        Layout {
            parts,
            total: at + MIB,
        }
    }

    pub fn esp(&self) -> Part {
        self.parts[0]
    }
    pub fn root_a(&self) -> Part {
        self.parts[1]
    }
    pub fn data(&self) -> Part {
        self.parts[3]
    }
}

/// A GUID as its 16 on-disk bytes (first three fields little-endian), from
/// the usual text form.
pub fn guid_bytes(s: &str) -> [u8; 16] {
    let hex: Vec<u8> = s
        .bytes()
        .filter(|c| *c != b'-')
        .collect::<Vec<_>>()
        .chunks(2)
        .map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap_or("00"), 16).unwrap_or(0))
        .collect();
    let mut b = [0u8; 16];
    b.copy_from_slice(&hex[..16]);
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    b
}

/// A version-4-shaped UUID derived from `seed` and a purpose label, as
/// big-endian bytes (text order).
pub fn derived_uuid(seed: &[u8], purpose: &str) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(seed);
    h.update(b"\0");
    h.update(purpose.as_bytes());
    let d = h.finalize();
    let mut u = [0u8; 16];
    u.copy_from_slice(&d[..16]);
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

pub fn uuid_text(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Text-order UUID → on-disk GUID bytes.
pub fn uuid_to_guid(u: &[u8; 16]) -> [u8; 16] {
    guid_bytes(&uuid_text(u))
}

/// Create the image file (sparse, `layout.total` bytes) with its protective
/// MBR and GPT. GUIDs are derived from `seed`.
pub fn create(path: &std::path::Path, layout: &Layout, seed: &[u8]) -> Result<File, DiskError> {
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |err| DiskError::Io { what, err }
    };
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io("creating"))?;
    f.set_len(layout.total).map_err(io("sizing"))?;
    let mut gpt = GPT::new_from(&mut f, SECTOR, uuid_to_guid(&derived_uuid(seed, "disk")))?;
    for (i, p) in layout.parts.iter().enumerate() {
        gpt[(i + 1) as u32] = GPTPartitionEntry {
            partition_type_guid: guid_bytes(p.type_guid),
            unique_partition_guid: uuid_to_guid(&derived_uuid(seed, p.name)),
            starting_lba: p.start / SECTOR,
            ending_lba: (p.start + p.len) / SECTOR - 1,
            attribute_bits: 0,
            partition_name: p.name.into(),
        };
    }
    GPT::write_protective_mbr_into(&mut f, SECTOR)?;
    gpt.write_into(&mut f)?;
    Ok(f)
}

/// Write `data` into `part`, every byte of it, zeros included: the image's
/// block map then maps all of it and a flasher writes all of it, so nothing
/// of a partition's content is left to what the card held before (see
/// [`copy_part`]; the root's squashfs and hash tree are all read through
/// dm-verity, which fails a block that is not as built). Only the rest of
/// the partition, past `data`, stays a hole.
pub fn write_part(
    f: &mut File,
    part: &Part,
    key: &'static str,
    data: &[u8],
) -> Result<(), DiskError> {
    let size = data.len() as u64;
    if size > part.len {
        return Err(DiskError::TooBig {
            part: part.name,
            key,
            size,
            cap: part.len,
        });
    }
    f.seek(SeekFrom::Start(part.start))
        .and_then(|_| f.write_all(data))
        .map_err(|err| DiskError::Io {
            what: format!("writing partition {}", part.name),
            err,
        })
}

/// Copy the file at `src` into `part` in 1 MiB pieces, every byte of it,
/// zeros included, as [`write_part`] does. The data partition's ext4 needs
/// that: mke2fs leaves its journal and its inode tables as zeros (holes in
/// its file, which it says are zeroed: `ITABLE_ZEROED`), and a card that
/// held a filesystem before would keep those bytes where the image had a
/// hole — a stale journal that a recovery after a power cut may replay (the
/// same image flashed again has the same filesystem UUID, so the old
/// transactions' checksums hold), stale inodes in tables said to be zero.
/// The rest of the partition, past the file, stays a hole.
pub fn copy_part(
    f: &mut File,
    part: &Part,
    key: &'static str,
    src: &std::path::Path,
) -> Result<(), DiskError> {
    use std::io::Read;
    let io = |what: String| move |err| DiskError::Io { what, err };
    let mut r = File::open(src).map_err(io(format!("opening {}", src.display())))?;
    let size = r
        .metadata()
        .map_err(io(format!("reading {}", src.display())))?
        .len();
    if size > part.len {
        return Err(DiskError::TooBig {
            part: part.name,
            key,
            size,
            cap: part.len,
        });
    }
    let mut buf = vec![0u8; MIB as usize];
    let mut at = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            let k = r
                .read(&mut buf[n..])
                .map_err(io(format!("reading {}", src.display())))?;
            if k == 0 {
                break;
            }
            n += k;
        }
        if n == 0 {
            return Ok(());
        }
        let sub = Part {
            start: part.start + at,
            len: n as u64,
            ..*part
        };
        write_part(f, &sub, key, &buf[..n])?;
        at += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_text_to_disk_bytes() {
        let b = guid_bytes(ESP_TYPE);
        assert_eq!(
            b,
            [
                0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
                0xc9, 0x3b
            ]
        );
    }

    #[test]
    fn derived_uuids_are_stable_v4_and_distinct() {
        let a = derived_uuid(b"seed", "esp");
        assert_eq!(a, derived_uuid(b"seed", "esp"));
        assert_ne!(a, derived_uuid(b"seed", "data"));
        assert_ne!(a, derived_uuid(b"seed2", "esp"));
        let t = uuid_text(&a);
        assert_eq!(t.len(), 36);
        assert_eq!(&t[14..15], "4");
        assert!("89ab".contains(&t[19..20]));
    }

    #[test]
    fn layout_is_mib_aligned_and_ordered() {
        let l = Layout::new(&Partitions {
            esp_mib: 128,
            config_mib: 0,
            boot_mib: 0,
            root_mib: 512,
            data_mib: 64,
        });
        let names: Vec<_> = l.parts.iter().map(|p| p.name).collect();
        assert_eq!(names, ["esp", "root-a", "root-b", "data"]);
        assert!(
            l.parts
                .iter()
                .all(|p| p.start % MIB == 0 && p.len % MIB == 0)
        );
        assert_eq!(l.total, (1 + 128 + 1024 + 64 + 1) * MIB);
    }
}
