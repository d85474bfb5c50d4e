//! Mounting, behind a trait so stage 1 and shutdown can be tested with a
//! recording fake. Owns the list of mounts stage 2 must undo at shutdown.

use std::path::{Path, PathBuf};

use crate::sys::{self, Errno, MntFlags, MsFlags};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mounting {fstype} {device} on {target}: {errno}")]
    Mount {
        fstype: String,
        device: String,
        target: PathBuf,
        errno: Errno,
    },
    #[error("moving mount {from} to {to}: {errno}")]
    Move {
        from: PathBuf,
        to: PathBuf,
        errno: Errno,
    },
    #[error("unmounting {target}: {errno}")]
    Umount { target: PathBuf, errno: Errno },
    #[error("remounting {target} read-only: {errno}")]
    RemountRo { target: PathBuf, errno: Errno },
    #[error("creating mount point {target}: {source}")]
    MountPoint {
        target: PathBuf,
        source: std::io::Error,
    },
}

/// The mount operations init needs.
pub trait Mounts {
    fn mount(
        &mut self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Errno>;
    fn umount(&mut self, target: &Path, flags: MntFlags) -> Result<(), Errno>;
}

/// The kernel's mount table.
#[derive(Debug, Default)]
pub struct KernelMounts;

impl Mounts for KernelMounts {
    fn mount(
        &mut self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Errno> {
        sys::mount(source, target, fstype, flags, data)
    }

    fn umount(&mut self, target: &Path, flags: MntFlags) -> Result<(), Errno> {
        sys::umount(target, flags)
    }
}

/// Mount `fstype` from `source` at `target`, creating `target` if missing.
pub fn mount_fs(
    m: &mut dyn Mounts,
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), MountError> {
    if !target.exists() {
        std::fs::create_dir_all(target).map_err(|source| MountError::MountPoint {
            target: target.to_path_buf(),
            source,
        })?;
    }
    m.mount(Some(source), target, Some(fstype), flags, data)
        .map_err(|errno| MountError::Mount {
            fstype: fstype.to_string(),
            device: source.to_string(),
            target: target.to_path_buf(),
            errno,
        })
}

/// `mount --move from to`.
pub fn move_mount(m: &mut dyn Mounts, from: &Path, to: &Path) -> Result<(), MountError> {
    let from_s = from.to_string_lossy();
    m.mount(Some(&from_s), to, None, MsFlags::MS_MOVE, None)
        .map_err(|errno| MountError::Move {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            errno,
        })
}

/// Unmount `target`; if it is busy, remount it read-only so its data is safe
/// before `reboot(2)`.
pub fn unmount_or_remount_ro(m: &mut dyn Mounts, target: &Path) -> Result<(), MountError> {
    match m.umount(target, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(_) => m
            .mount(
                None,
                target,
                None,
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None,
            )
            .map_err(|errno| MountError::RemountRo {
                target: target.to_path_buf(),
                errno,
            }),
    }
}

/// Mount points listed in a `/proc/self/mounts` text, in mount order,
/// with octal escapes (`\040` for space) decoded.
pub fn parse_mount_points(mounts: &str) -> Vec<PathBuf> {
    mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|p| PathBuf::from(unescape_octal(p)))
        .collect()
}

pub fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
pub mod fake {
    //! A recording fake of [`Mounts`] that can be told to fail.
    use super::*;

    #[derive(Debug, Default)]
    pub struct FakeMounts {
        pub calls: Vec<String>,
        pub fail_umount: Vec<PathBuf>,
    }

    impl Mounts for FakeMounts {
        fn mount(
            &mut self,
            source: Option<&str>,
            target: &Path,
            fstype: Option<&str>,
            flags: MsFlags,
            _data: Option<&str>,
        ) -> Result<(), Errno> {
            self.calls.push(format!(
                "mount {} {} {} {:?}",
                source.unwrap_or("-"),
                target.display(),
                fstype.unwrap_or("-"),
                flags
            ));
            Ok(())
        }

        fn umount(&mut self, target: &Path, _flags: MntFlags) -> Result<(), Errno> {
            self.calls.push(format!("umount {}", target.display()));
            if self.fail_umount.iter().any(|p| p == target) {
                Err(Errno::EBUSY)
            } else {
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mount_points_with_escapes() {
        let text =
            "proc /proc proc rw 0 0\n/dev/vda4 /var ext4 rw 0 0\nx /mnt/a\\040b tmpfs rw 0 0\n";
        assert_eq!(
            parse_mount_points(text),
            vec![
                PathBuf::from("/proc"),
                PathBuf::from("/var"),
                PathBuf::from("/mnt/a b")
            ]
        );
    }

    #[test]
    fn busy_unmount_falls_back_to_read_only() {
        let mut m = fake::FakeMounts {
            fail_umount: vec![PathBuf::from("/var")],
            ..Default::default()
        };
        unmount_or_remount_ro(&mut m, Path::new("/var")).unwrap();
        assert_eq!(m.calls[0], "umount /var");
        assert!(m.calls[1].starts_with("mount - /var -"), "{:?}", m.calls);
        assert!(m.calls[1].contains("MS_RDONLY"));
    }
}
