//! dm-verity on the device (docs/boot-protocol.md "dm-verity"): the table
//! for a slot's root partition built from the kernel command line (root
//! hash, data block count: trusted, they come with the signed/booted kernel
//! entry) and the veritysetup superblock the builder put after the squashfs
//! (salt: untrusted, but the root hash covers it, so a forged salt only
//! makes every read fail). Creating the mapping goes through the small
//! `DeviceMapper` seam so stage 1 can be tested with a fake.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::slot::VERITY_BLOCK;
use crate::sys::dm;

/// Name of the mapped device for a slot's root (`/dev/mapper/<name>`, `dm-N`).
pub fn mapping_name(partition: &str) -> String {
    format!("basalt-{partition}")
}

#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    #[error("reading the verity superblock of {dev} at byte {offset}: {source}")]
    Read {
        dev: PathBuf,
        offset: u64,
        source: std::io::Error,
    },
    #[error("verity superblock of {dev} at byte {offset}: {why}")]
    Superblock {
        dev: PathBuf,
        offset: u64,
        why: String,
    },
    #[error("{dev} holds {size} bytes, less than {data_blocks} data blocks plus the hash area")]
    TooSmall {
        dev: PathBuf,
        size: u64,
        data_blocks: u64,
    },
    #[error("device-mapper {what} {name}: {errno}")]
    Dm {
        what: &'static str,
        name: String,
        errno: crate::sys::Errno,
    },
    #[error("/dev/dm-{minor} did not appear within {secs} s")]
    NoNode { minor: u32, secs: u64 },
}

/// What the kernel table needs from the on-disk superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub data_blocks: u64,
    pub salt: Vec<u8>,
}

/// Parse and check a veritysetup superblock (REFERENCE.md §4.1) against
/// what the builder writes: version 1, hash type 1, sha256, 4096/4096.
pub fn parse_superblock(b: &[u8]) -> Result<Superblock, String> {
    if b.len() < 512 {
        return Err(format!("{} bytes, need 512", b.len()));
    }
    if &b[0..8] != b"verity\0\0" {
        return Err("no \"verity\" signature".into());
    }
    let u32le = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let mut d = [0u8; 8];
    d.copy_from_slice(&b[72..80]);
    let data_blocks = u64::from_le_bytes(d);
    let (version, hash_type) = (u32le(8), u32le(12));
    if version != 1 || hash_type != 1 {
        return Err(format!(
            "version {version} hash type {hash_type}, need 1 and 1"
        ));
    }
    let alg_end = b[32..64].iter().position(|&c| c == 0).unwrap_or(32);
    if &b[32..32 + alg_end] != b"sha256" {
        return Err(format!(
            "algorithm {:?}, need sha256",
            String::from_utf8_lossy(&b[32..32 + alg_end])
        ));
    }
    let (dbs, hbs) = (u32le(64), u32le(68));
    if u64::from(dbs) != VERITY_BLOCK || u64::from(hbs) != VERITY_BLOCK {
        return Err(format!("block sizes {dbs}/{hbs}, need 4096/4096"));
    }
    let salt_size = u16::from_le_bytes([b[80], b[81]]) as usize;
    if salt_size > 256 {
        return Err(format!("salt size {salt_size} > 256"));
    }
    Ok(Superblock {
        data_blocks,
        salt: b[88..88 + salt_size].to_vec(),
    })
}

/// The dm-verity table for data and hash area on the same device `dev`
/// (REFERENCE.md §4.3): `(length in sectors, parameters)`. No corruption
/// option: a corrupted block reads as EIO (see docs/verity.md).
pub fn table(dev: &str, root_hash: &str, data_blocks: u64, salt: &[u8]) -> (u64, String) {
    let salt_hex = if salt.is_empty() {
        "-".to_string()
    } else {
        salt.iter().map(|b| format!("{b:02x}")).collect()
    };
    let bs = VERITY_BLOCK;
    // The hash area starts with the superblock; the tree is one block later.
    let hash_start = data_blocks + 1;
    (
        data_blocks * bs / 512,
        format!("1 {dev} {dev} {bs} {bs} {data_blocks} {hash_start} sha256 {root_hash} {salt_hex}"),
    )
}

/// Read the superblock of the root partition `dev` that the command line
/// says covers `data_blocks`, and check that the two agree.
pub fn read_superblock(dev: &Path, data_blocks: u64) -> Result<Superblock, VerityError> {
    let offset = data_blocks.saturating_mul(VERITY_BLOCK);
    let read_err = |source| VerityError::Read {
        dev: dev.to_path_buf(),
        offset,
        source,
    };
    let mut f = std::fs::File::open(dev).map_err(read_err)?;
    let size = f.seek(SeekFrom::End(0)).map_err(read_err)?;
    if size < offset + 2 * VERITY_BLOCK {
        return Err(VerityError::TooSmall {
            dev: dev.to_path_buf(),
            size,
            data_blocks,
        });
    }
    f.seek(SeekFrom::Start(offset)).map_err(read_err)?;
    let mut b = [0u8; 512];
    f.read_exact(&mut b).map_err(read_err)?;
    let bad = |why: String| VerityError::Superblock {
        dev: dev.to_path_buf(),
        offset,
        why,
    };
    let sb = parse_superblock(&b).map_err(bad)?;
    if sb.data_blocks != data_blocks {
        return Err(bad(format!(
            "{} data blocks, the command line says {data_blocks}",
            sb.data_blocks
        )));
    }
    Ok(sb)
}

/// Creating and watching mapped devices.
pub trait DeviceMapper {
    /// Create the read-only verity mapping `name`; returns the block device path.
    fn create_verity(
        &mut self,
        name: &str,
        sectors: u64,
        params: &str,
    ) -> Result<PathBuf, VerityError>;
    /// The verity target's status text (`V` or `C`).
    fn verity_status(&mut self, name: &str) -> Result<String, VerityError>;
}

/// The kernel's device-mapper through `/dev/mapper/control`.
#[derive(Debug)]
pub struct KernelDeviceMapper {
    pub control: PathBuf,
    pub dev: PathBuf,
}

impl Default for KernelDeviceMapper {
    fn default() -> Self {
        KernelDeviceMapper {
            control: PathBuf::from("/dev/mapper/control"),
            dev: PathBuf::from("/dev"),
        }
    }
}

impl KernelDeviceMapper {
    fn control(&self, name: &str) -> Result<dm::Control, VerityError> {
        dm::Control::open(&self.control).map_err(|errno| VerityError::Dm {
            what: "opening /dev/mapper/control for",
            name: name.to_string(),
            errno,
        })
    }
}

const NODE_WAIT: Duration = Duration::from_secs(5);

impl DeviceMapper for KernelDeviceMapper {
    fn create_verity(
        &mut self,
        name: &str,
        sectors: u64,
        params: &str,
    ) -> Result<PathBuf, VerityError> {
        let c = self.control(name)?;
        let err = |what, errno| VerityError::Dm {
            what,
            name: name.to_string(),
            errno,
        };
        let (_major, minor) = c.create(name).map_err(|e| err("create", e))?;
        let target = dm::Target {
            start: 0,
            len: sectors,
            kind: "verity".into(),
            params: params.to_string(),
        };
        if let Err(e) = c
            .load_table(name, &[target], dm::DM_READONLY_FLAG)
            .and_then(|()| c.resume(name))
        {
            let _ = c.remove(name);
            return Err(err("load/resume", e));
        }
        // devtmpfs makes the node; wait for it rather than mknod our own.
        let node = self.dev.join(format!("dm-{minor}"));
        let start = Instant::now();
        while !node.exists() {
            if start.elapsed() > NODE_WAIT {
                return Err(VerityError::NoNode {
                    minor,
                    secs: NODE_WAIT.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(node)
    }

    fn verity_status(&mut self, name: &str) -> Result<String, VerityError> {
        let c = self.control(name)?;
        let targets = c.status(name).map_err(|errno| VerityError::Dm {
            what: "status",
            name: name.to_string(),
            errno,
        })?;
        Ok(targets
            .into_iter()
            .find(|t| t.kind == "verity")
            .map(|t| t.params)
            .unwrap_or_default())
    }
}

/// Whether a verity status text says a corrupted block was seen.
pub fn corrupted(status: &str) -> bool {
    status.trim_start().starts_with('C')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb(data_blocks: u64) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[0..8].copy_from_slice(b"verity\0\0");
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b[12..16].copy_from_slice(&1u32.to_le_bytes());
        b[32..38].copy_from_slice(b"sha256");
        b[64..68].copy_from_slice(&4096u32.to_le_bytes());
        b[68..72].copy_from_slice(&4096u32.to_le_bytes());
        b[72..80].copy_from_slice(&data_blocks.to_le_bytes());
        b[80..82].copy_from_slice(&2u16.to_le_bytes());
        b[88] = 0xab;
        b[89] = 0x01;
        b
    }

    #[test]
    fn superblock_checks() {
        let s = parse_superblock(&sb(52224)).unwrap();
        assert_eq!(s.data_blocks, 52224);
        assert_eq!(s.salt, vec![0xab, 0x01]);
        let mut bad = sb(1);
        bad[0] = b'x';
        assert!(parse_superblock(&bad).is_err());
        let mut bad = sb(1);
        bad[32..38].copy_from_slice(b"sha1\0\0");
        assert!(parse_superblock(&bad).is_err());
        let mut bad = sb(1);
        bad[64..68].copy_from_slice(&512u32.to_le_bytes());
        assert!(parse_superblock(&bad).is_err());
        let mut bad = sb(1);
        bad[80..82].copy_from_slice(&300u16.to_le_bytes());
        assert!(parse_superblock(&bad).is_err());
        assert!(parse_superblock(&[0u8; 100]).is_err());
    }

    #[test]
    fn table_line() {
        let (sectors, p) = table("/dev/vda2", &"a".repeat(64), 100, &[0xab, 0x01]);
        assert_eq!(sectors, 800);
        assert_eq!(
            p,
            format!(
                "1 /dev/vda2 /dev/vda2 4096 4096 100 101 sha256 {} ab01",
                "a".repeat(64)
            )
        );
        assert!(table("d", "r", 1, &[]).1.ends_with(" -"));
    }

    #[test]
    fn read_superblock_checks_the_cmdline_count() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("part");
        let mut img = vec![0u8; 3 * 4096];
        img.extend_from_slice(&sb(3));
        img.resize(5 * 4096, 0);
        std::fs::write(&p, &img).unwrap();
        assert_eq!(read_superblock(&p, 3).unwrap().data_blocks, 3);
        assert!(matches!(
            read_superblock(&p, 2),
            Err(VerityError::Superblock { .. })
        ));
        assert!(matches!(
            read_superblock(&p, 4),
            Err(VerityError::TooSmall { .. })
        ));
    }

    #[test]
    fn corruption_status() {
        assert!(corrupted("C"));
        assert!(!corrupted("V"));
        assert!(!corrupted(""));
    }
}
