//! A newc ("070701") cpio writer, the only archive format the kernel unpacks
//! as an initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Deterministic: inode numbers count up from 1 in write order, nlink is 1
//! for everything but directories (2), check is 0. The caller writes parents
//! before children.

use std::io::{self, Write};

const TRAILER: &str = "TRAILER!!!";
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

pub struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

/// Ownership and time shared by the entries of one archive.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    pub uid: u32,
    pub gid: u32,
    pub mtime: u32,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            ino: 0,
            written: 0,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        meta: Meta,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
        ino: u32,
    ) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cpio entry name {name:?} is empty or holds NUL"),
            ));
        }
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cpio entry {name} is larger than 4 GiB"),
            )
        })?;
        let namesize = name.len() + 1;
        let header = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            ino,
            mode,
            meta.uid,
            meta.gid,
            nlink,
            meta.mtime,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            namesize,
            0
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    fn next_ino(&mut self) -> u32 {
        self.ino += 1;
        self.ino
    }

    pub fn dir(&mut self, name: &str, perm: u32, meta: Meta) -> io::Result<()> {
        let ino = self.next_ino();
        self.entry(name, S_IFDIR | (perm & 0o7777), meta, 2, (0, 0), &[], ino)
    }

    pub fn file(&mut self, name: &str, perm: u32, meta: Meta, data: &[u8]) -> io::Result<()> {
        let ino = self.next_ino();
        self.entry(name, S_IFREG | (perm & 0o7777), meta, 1, (0, 0), data, ino)
    }

    pub fn symlink(&mut self, name: &str, target: &str, meta: Meta) -> io::Result<()> {
        let ino = self.next_ino();
        self.entry(
            name,
            S_IFLNK | 0o777,
            meta,
            1,
            (0, 0),
            target.as_bytes(),
            ino,
        )
    }

    pub fn char_dev(
        &mut self,
        name: &str,
        perm: u32,
        meta: Meta,
        major: u32,
        minor: u32,
    ) -> io::Result<()> {
        let ino = self.next_ino();
        self.entry(
            name,
            S_IFCHR | (perm & 0o7777),
            meta,
            1,
            (major, minor),
            &[],
            ino,
        )
    }

    /// Write the trailer and return the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        let meta = Meta {
            uid: 0,
            gid: 0,
            mtime: 0,
        };
        self.entry(TRAILER, 0, meta, 1, (0, 0), &[], 0)?;
        // Pad the archive to 512 bytes like GNU cpio; the kernel ignores it.
        let n = ((512 - self.written % 512) % 512) as usize;
        self.put(&vec![0u8; n])?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn cpio_tool_lists_our_archive() {
        let meta = Meta {
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
        };
        let mut w = CpioWriter::new(Vec::new());
        w.dir("dev", 0o755, meta).unwrap();
        w.char_dev("dev/console", 0o600, meta, 5, 1).unwrap();
        w.file("init", 0o755, meta, b"#!/bin/sh\necho odd-length\n")
            .unwrap();
        w.symlink("sbin", "/bin", meta).unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 512, 0);

        let dir = std::env::temp_dir().join(format!("basalt-cpio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t.cpio");
        std::fs::write(&f, &bytes).unwrap();
        let out = Command::new("cpio")
            .args(["-itv", "--quiet", "-F"])
            .arg(&f)
            .stderr(Stdio::inherit())
            .output()
            .expect("cpio is installed (Debian package cpio)");
        assert!(out.status.success());
        let list = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = list.lines().collect();
        assert_eq!(lines.len(), 4, "{list}");
        assert!(
            lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" dev"),
            "{list}"
        );
        assert!(
            lines[1].starts_with("crw-------") && lines[1].contains("5,"),
            "{list}"
        );
        assert!(lines[1].ends_with("dev/console"), "{list}");
        assert!(
            lines[2].starts_with("-rwxr-xr-x") && lines[2].contains(" 26 "),
            "{list}"
        );
        assert!(
            lines[3].starts_with("lrwxrwxrwx") && lines[3].ends_with("sbin -> /bin"),
            "{list}"
        );
        assert!(lines.iter().all(|l| l.contains("root")), "{list}");

        // Content round-trips through the independent tool.
        let out = Command::new("cpio")
            .args(["-i", "--quiet", "--to-stdout", "-F"])
            .arg(&f)
            .arg("init")
            .output()
            .unwrap();
        assert_eq!(out.stdout, b"#!/bin/sh\necho odd-length\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
