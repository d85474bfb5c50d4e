//! The node's own disk going away under it: a USB SSD that drops off the
//! bus (a Pi's power supply sagging), a card reader pulled, an NVMe drive
//! that resets and comes back under a new name. The partitions stage 1
//! mounted — the slot's root (under dm-verity), the data partition on
//! `/var`, the boot partition on `/boot` — are then gone for good: a disk
//! that comes back is a new device, and the old mounts stay dead. PID 1
//! runs from RAM and lives on, but Kubernetes and every service read their
//! programs from the root and keep their state in `/var`, so the node
//! would be a zombie that still answers pings. PID 1 watches the kernel's
//! device events for the removal of those partitions, says which one went
//! and reboots in order (services stopped with their timeouts, what can be
//! unmounted unmounted): a fresh boot is the only way back to a working
//! node, and a disk that is really gone leaves the node at the firmware,
//! which is honest. docs/boot-protocol.md, "Storage lost".

use crate::sys::{Errno, Uevents};
use std::path::{Path, PathBuf};

/// One partition PID 1 keeps watching: its kernel name (`sda2`,
/// `mmcblk0p2`, the uevent's `DEVNAME`) and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    pub name: String,
    pub role: &'static str,
}

impl Watched {
    /// From a device path stage 1 mounted (`/dev/sda2`); `None` for an
    /// empty path (a partition this boot did not have).
    pub fn from_dev_path(path: &str, role: &'static str) -> Option<Watched> {
        let name = path.strip_prefix("/dev/").unwrap_or(path);
        (!name.is_empty()).then(|| Watched {
            name: name.to_string(),
            role,
        })
    }
}

/// The kernel name of the block device a uevent says was removed
/// (`ACTION=remove`, `SUBSYSTEM=block`, `DEVNAME=…`), if that is what
/// `msg` says. The message is `remove@<devpath>` and then `KEY=value`
/// fields, each ending in a NUL; anything else (udev's own messages start
/// with `libudev`) is not a removal.
pub fn removed_block_device(msg: &[u8]) -> Option<&str> {
    let mut fields = msg.split(|b| *b == 0);
    let header = fields.next()?;
    if !header.starts_with(b"remove@") {
        return None;
    }
    let (mut action, mut block, mut name) = (false, false, None);
    for f in fields {
        match f {
            b"ACTION=remove" => action = true,
            b"SUBSYSTEM=block" => block = true,
            _ => {
                if let Some(v) = f.strip_prefix(b"DEVNAME=") {
                    name = std::str::from_utf8(v).ok();
                }
            }
        }
    }
    if action && block {
        name.filter(|n| !n.is_empty())
    } else {
        None
    }
}

/// The watch: the kernel's device events and the partitions to look for.
#[derive(Debug)]
pub struct StorageWatch {
    events: Uevents,
    watched: Vec<Watched>,
    /// `/sys/class/block`: where to look when the kernel dropped events.
    sys_block: PathBuf,
    lost: Vec<String>,
}

impl StorageWatch {
    /// Listen for the removal of `watched`; `None` when there is nothing
    /// to watch. The socket's error is returned for the caller to report.
    pub fn open(watched: Vec<Watched>, sys_block: &Path) -> Result<Option<StorageWatch>, Errno> {
        if watched.is_empty() {
            return Ok(None);
        }
        Ok(Some(StorageWatch {
            events: Uevents::open()?,
            watched,
            sys_block: sys_block.to_path_buf(),
            lost: Vec::new(),
        }))
    }

    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.events.as_fd()
    }

    /// Read the queued events; the watched partitions that went since the
    /// last call (each reported once). When the kernel dropped events (its
    /// queue overflowed, as it can while pods come and go by the hundred),
    /// the watched partitions are looked up in sysfs instead.
    pub fn take_lost(&mut self) -> Result<Vec<Watched>, Errno> {
        let mut gone: Vec<String> = Vec::new();
        let r = self.events.drain(|msg| {
            if let Some(n) = removed_block_device(msg) {
                gone.push(n.to_string());
            }
        });
        match r {
            Ok(()) => Ok(self.select(gone, false)),
            Err(Errno::ENOBUFS) => Ok(self.select(gone, true)),
            Err(e) => Err(e),
        }
    }

    /// The watched partitions among `gone`, or (`overflowed`: events were
    /// dropped) missing from sysfs, not reported before.
    fn select(&mut self, mut gone: Vec<String>, overflowed: bool) -> Vec<Watched> {
        if overflowed {
            gone.extend(
                self.watched
                    .iter()
                    .filter(|w| !self.sys_block.join(&w.name).exists())
                    .map(|w| w.name.clone()),
            );
        }
        let mut out = Vec::new();
        for w in &self.watched {
            if gone.contains(&w.name) && !self.lost.contains(&w.name) {
                self.lost.push(w.name.clone());
                out.push(w.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(header: &str, fields: &[&str]) -> Vec<u8> {
        let mut v = header.as_bytes().to_vec();
        for f in fields {
            v.push(0);
            v.extend_from_slice(f.as_bytes());
        }
        v.push(0);
        v
    }

    #[test]
    fn a_partition_removal_is_recognised() {
        // As the kernel sends it for a SCSI disk's partition (captured from
        // the QEMU test's guest).
        let m = event(
            "remove@/devices/pci0000:00/0000:00:03.0/virtio1/host0/target0:0:0/0:0:0:0/block/sda/sda2",
            &[
                "ACTION=remove",
                "DEVPATH=/devices/pci0000:00/0000:00:03.0/virtio1/host0/target0:0:0/0:0:0:0/block/sda/sda2",
                "SUBSYSTEM=block",
                "MAJOR=8",
                "MINOR=2",
                "DEVNAME=sda2",
                "DEVTYPE=partition",
                "DISKSEQ=9",
                "PARTN=2",
                "PARTNAME=root-a",
                "SEQNUM=1234",
            ],
        );
        assert_eq!(removed_block_device(&m), Some("sda2"));
        let nested = event(
            "remove@/devices/x/block/mmcblk0/mmcblk0p2",
            &["ACTION=remove", "SUBSYSTEM=block", "DEVNAME=mmcblk0p2"],
        );
        assert_eq!(removed_block_device(&nested), Some("mmcblk0p2"));
    }

    #[test]
    fn other_events_are_not_removals() {
        let add = event(
            "add@/devices/x/block/sda/sda2",
            &["ACTION=add", "SUBSYSTEM=block", "DEVNAME=sda2"],
        );
        let net = event(
            "remove@/devices/virtual/net/veth1234",
            &["ACTION=remove", "SUBSYSTEM=net", "INTERFACE=veth1234"],
        );
        let change = event(
            "change@/devices/virtual/block/dm-0",
            &["ACTION=change", "SUBSYSTEM=block", "DEVNAME=dm-0"],
        );
        // udev's re-broadcast carries a binary header; we only bind the
        // kernel's group, but a stray one must not count.
        let udev =
            b"libudev\0\xfe\xed\xca\xfeACTION=remove\0SUBSYSTEM=block\0DEVNAME=sda2\0".to_vec();
        let no_name = event(
            "remove@/devices/x/block/sda",
            &["ACTION=remove", "SUBSYSTEM=block"],
        );
        for m in [
            add,
            net,
            change,
            udev,
            no_name,
            Vec::new(),
            b"remove@".to_vec(),
        ] {
            assert_eq!(
                removed_block_device(&m),
                None,
                "{:?}",
                String::from_utf8_lossy(&m)
            );
        }
    }

    #[test]
    fn watched_names_from_device_paths() {
        assert_eq!(
            Watched::from_dev_path("/dev/sda2", "root"),
            Some(Watched {
                name: "sda2".into(),
                role: "root"
            })
        );
        assert_eq!(
            Watched::from_dev_path("/dev/mmcblk0p3", "data").map(|w| w.name),
            Some("mmcblk0p3".into())
        );
        assert_eq!(Watched::from_dev_path("", "boot"), None);
    }

    #[test]
    fn nothing_to_watch_opens_nothing() {
        let r = StorageWatch::open(Vec::new(), Path::new("/sys/class/block"));
        assert!(matches!(r, Ok(None)));
    }

    #[test]
    fn lost_partitions_reported_once_and_looked_up_after_an_overflow() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("sda2")).unwrap();
        std::fs::create_dir(t.path().join("sda3")).unwrap();
        let Ok(Some(mut w)) = StorageWatch::open(
            vec![
                Watched::from_dev_path("/dev/sda2", "root").unwrap(),
                Watched::from_dev_path("/dev/sda3", "data").unwrap(),
                Watched::from_dev_path("/dev/sda1", "boot").unwrap(),
            ],
            t.path(),
        ) else {
            // The sandbox refuses the kernel's event socket: nothing to run.
            return;
        };
        // Nothing queued on a quiet test machine's socket for these names.
        assert_eq!(w.take_lost(), Ok(Vec::new()));
        // Someone else's disk goes: not ours.
        assert_eq!(w.select(vec!["sdb1".into()], false), Vec::new());
        let got = w.select(vec!["sdb1".into(), "sda3".into()], false);
        assert_eq!(got.iter().map(|x| x.role).collect::<Vec<_>>(), ["data"]);
        // Said once, even when the kernel repeats itself.
        assert_eq!(w.select(vec!["sda3".into()], false), Vec::new());
        // Events dropped: sysfs says sda1 is not there (sda2 is, sda3 was told).
        let got = w.select(Vec::new(), true);
        assert_eq!(
            got.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(),
            ["sda1"]
        );
        std::fs::remove_dir(t.path().join("sda2")).unwrap();
        let got = w.select(Vec::new(), true);
        assert_eq!(got.iter().map(|x| x.role).collect::<Vec<_>>(), ["root"]);
        assert_eq!(w.select(Vec::new(), true), Vec::new());
    }
}
