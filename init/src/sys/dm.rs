//! Device-mapper ioctls (`linux/dm-ioctl.h`, REFERENCE.md §4.4): create a
//! mapped device, load its table, resume it (make the table live), remove
//! it, and read a target's status. Buffers are built byte by byte at the
//! UAPI offsets, so no `repr(C)` mirror of `struct dm_ioctl` is needed.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::errno::Errno;

/// `sizeof(struct dm_ioctl)`.
const HEADER: usize = 312;
/// `sizeof(struct dm_target_spec)`.
const SPEC: usize = 40;
const NAME_OFF: usize = 48;
const NAME_LEN: usize = 128;

const DM_DEV_CREATE: u8 = 3;
const DM_DEV_REMOVE: u8 = 4;
const DM_DEV_SUSPEND: u8 = 6;
const DM_TABLE_LOAD: u8 = 9;
const DM_TABLE_STATUS: u8 = 12;

pub const DM_READONLY_FLAG: u32 = 1 << 0;
const DM_BUFFER_FULL_FLAG: u32 = 1 << 8;

/// `_IOWR(0xfd, nr, struct dm_ioctl)`.
fn request(nr: u8) -> u32 {
    // dir (read|write = 3) << 30 | size << 16 | type << 8 | nr
    (3u32 << 30) | ((HEADER as u32) << 16) | (0xfd << 8) | nr as u32
}

/// One target of a table: `start` and `len` in 512-byte sectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub start: u64,
    pub len: u64,
    pub kind: String,
    pub params: String,
}

/// `/dev/mapper/control`, opened.
#[derive(Debug)]
pub struct Control {
    file: File,
}

/// Header-only buffer (`data_size` = `len`), name filled in.
fn buffer(name: &str, len: usize, flags: u32, targets: u32) -> Result<Vec<u8>, Errno> {
    let n = name.as_bytes();
    if n.is_empty() || n.len() >= NAME_LEN || n.contains(&0) {
        return Err(Errno::EINVAL);
    }
    let len = len.max(HEADER).next_multiple_of(8);
    let mut b = vec![0u8; len];
    b[0..4].copy_from_slice(&4u32.to_ne_bytes()); // version {4, 0, 0}
    b[12..16].copy_from_slice(&(len as u32).to_ne_bytes()); // data_size
    b[16..20].copy_from_slice(&(HEADER as u32).to_ne_bytes()); // data_start
    b[20..24].copy_from_slice(&targets.to_ne_bytes()); // target_count
    b[28..32].copy_from_slice(&flags.to_ne_bytes()); // flags
    b[NAME_OFF..NAME_OFF + n.len()].copy_from_slice(n);
    Ok(b)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_ne_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_ne_bytes(a)
}

/// Split the kernel's `dev` (`huge_encode_dev`) into major and minor.
pub fn decode_dev(dev: u64) -> (u32, u32) {
    let major = ((dev & 0xfff00) >> 8) as u32;
    let minor = ((dev & 0xff) | ((dev >> 12) & 0xfff00)) as u32;
    (major, minor)
}

impl Control {
    pub fn open(path: &Path) -> Result<Control, Errno> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map(|file| Control { file })
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
    }

    fn call(&self, nr: u8, buf: &mut [u8]) -> Result<(), Errno> {
        // SAFETY: `buf` is a live, writable buffer of `data_size` bytes (set
        // by `buffer`), at least `sizeof(struct dm_ioctl)` long; the kernel
        // reads and writes at most `data_size` bytes of it.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), request(nr) as _, buf.as_mut_ptr()) };
        if r < 0 { Err(Errno::last()) } else { Ok(()) }
    }

    /// `DM_DEV_CREATE`: a new, empty mapped device; returns its (major, minor).
    pub fn create(&self, name: &str) -> Result<(u32, u32), Errno> {
        let mut b = buffer(name, HEADER, 0, 0)?;
        self.call(DM_DEV_CREATE, &mut b)?;
        Ok(decode_dev(u64_at(&b, 40)))
    }

    /// `DM_TABLE_LOAD`: load `targets` as the inactive table.
    pub fn load_table(&self, name: &str, targets: &[Target], flags: u32) -> Result<(), Errno> {
        let mut payload = Vec::new();
        for t in targets {
            let kind = t.kind.as_bytes();
            if kind.len() >= 16 || t.params.as_bytes().contains(&0) {
                return Err(Errno::EINVAL);
            }
            let next = (SPEC + t.params.len() + 1).next_multiple_of(8);
            let mut spec = vec![0u8; next];
            spec[0..8].copy_from_slice(&t.start.to_ne_bytes());
            spec[8..16].copy_from_slice(&t.len.to_ne_bytes());
            spec[20..24].copy_from_slice(&(next as u32).to_ne_bytes());
            spec[24..24 + kind.len()].copy_from_slice(kind);
            spec[SPEC..SPEC + t.params.len()].copy_from_slice(t.params.as_bytes());
            payload.extend_from_slice(&spec);
        }
        let mut b = buffer(name, HEADER + payload.len(), flags, targets.len() as u32)?;
        b[HEADER..HEADER + payload.len()].copy_from_slice(&payload);
        self.call(DM_TABLE_LOAD, &mut b)
    }

    /// `DM_DEV_SUSPEND` without the suspend flag: resume, making the loaded table live.
    pub fn resume(&self, name: &str) -> Result<(), Errno> {
        let mut b = buffer(name, HEADER, 0, 0)?;
        self.call(DM_DEV_SUSPEND, &mut b)
    }

    /// `DM_DEV_REMOVE`.
    pub fn remove(&self, name: &str) -> Result<(), Errno> {
        let mut b = buffer(name, HEADER, 0, 0)?;
        self.call(DM_DEV_REMOVE, &mut b)
    }

    /// `DM_TABLE_STATUS` (info, not the table): each live target with its status text
    /// (dm-verity: `V` verified so far, `C` a corruption was detected).
    pub fn status(&self, name: &str) -> Result<Vec<Target>, Errno> {
        let mut b = buffer(name, 4096, 0, 0)?;
        self.call(DM_TABLE_STATUS, &mut b)?;
        if u32_at(&b, 28) & DM_BUFFER_FULL_FLAG != 0 {
            return Err(Errno::ENOSPC);
        }
        let count = u32_at(&b, 20) as usize;
        let data_start = u32_at(&b, 16) as usize;
        let mut out = Vec::new();
        let mut at = data_start;
        for _ in 0..count {
            let Some(spec) = b.get(at..at + SPEC) else {
                break;
            };
            let cstr = |s: &[u8]| {
                let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
                String::from_utf8_lossy(&s[..end]).into_owned()
            };
            let params = b.get(at + SPEC..).map(cstr).unwrap_or_default();
            out.push(Target {
                start: u64_at(spec, 0),
                len: u64_at(spec, 8),
                kind: cstr(&spec[24..40]),
                params,
            });
            // On output `next` counts from the start of the data area.
            at = data_start + u32_at(spec, 20) as usize;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_reference() {
        assert_eq!(request(DM_DEV_CREATE), 0xC138_FD03);
        assert_eq!(request(DM_DEV_SUSPEND), 0xC138_FD06);
        assert_eq!(request(DM_TABLE_LOAD), 0xC138_FD09);
        assert_eq!(request(DM_TABLE_STATUS), 0xC138_FD0C);
    }

    #[test]
    fn header_layout() {
        let b = buffer("root-a", HEADER, DM_READONLY_FLAG, 1).unwrap();
        assert_eq!(b.len(), 312);
        assert_eq!(u32_at(&b, 0), 4);
        assert_eq!(u32_at(&b, 12), 312);
        assert_eq!(u32_at(&b, 16), 312);
        assert_eq!(u32_at(&b, 20), 1);
        assert_eq!(u32_at(&b, 28), 1);
        assert_eq!(&b[48..54], b"root-a");
        assert!(buffer("", HEADER, 0, 0).is_err());
        assert!(buffer(&"x".repeat(128), HEADER, 0, 0).is_err());
    }

    #[test]
    fn dev_decoding() {
        assert_eq!(decode_dev((253 << 8) | 3), (253, 3));
        assert_eq!(decode_dev((254 << 8) | 0x12 | (0x300 << 12)), (254, 0x312));
    }
}
