//! Block devices: finding partitions by GPT name in sysfs (`PARTNAME=` in
//! each `uevent`) and the operations the data-partition growth needs, behind
//! the [`BlockDevices`] trait so the logic is tested on fixture trees and
//! in-memory disks. The sysfs root is a parameter, never hard-coded below it.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sys::Errno;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("partitions {missing:?} did not appear in {dir} within {waited_ms} ms")]
    Timeout {
        missing: Vec<String>,
        dir: PathBuf,
        waited_ms: u128,
    },
    #[error("{what} on {device}: {errno}")]
    Ioctl {
        what: &'static str,
        device: PathBuf,
        errno: Errno,
    },
    #[error("opening {device}: {source}")]
    Open {
        device: PathBuf,
        source: std::io::Error,
    },
}

/// One partition as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// GPT partition name (`PARTNAME=`); empty on MBR disks.
    pub name: String,
    /// Kernel name of the partition (`vda4`); the node is `/dev/<devname>`.
    pub devname: String,
    /// Partition number (`PARTN=`), 1-based.
    pub number: u32,
    /// Kernel name of the whole disk (`vda`).
    pub disk: String,
    /// Start and size in 512-byte units (sysfs always counts 512-byte sectors).
    pub start_512: u64,
    pub size_512: u64,
}

impl Partition {
    pub fn dev_path(&self, dev: &Path) -> PathBuf {
        dev.join(&self.devname)
    }
    pub fn disk_path(&self, dev: &Path) -> PathBuf {
        dev.join(&self.disk)
    }
}

fn uevent_fields(text: &str) -> BTreeMap<&str, &str> {
    text.lines().filter_map(|l| l.split_once('=')).collect()
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Every named partition under `class_block` (normally `/sys/class/block`).
/// Entries that are not partitions, or lack a name, are skipped.
pub fn scan(class_block: &Path) -> Result<Vec<Partition>, BlockError> {
    let rd = std::fs::read_dir(class_block).map_err(|source| BlockError::Read {
        path: class_block.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in rd.flatten() {
        let dir = entry.path();
        let Ok(text) = std::fs::read_to_string(dir.join("uevent")) else {
            continue;
        };
        let f = uevent_fields(&text);
        if f.get("DEVTYPE") != Some(&"partition") {
            continue;
        }
        // MBR partitions have no PARTNAME: kept with an empty name, found by number.
        let name = f.get("PARTNAME").copied().unwrap_or("");
        let Some(devname) = f.get("DEVNAME") else {
            continue;
        };
        let Some(number) = f.get("PARTN").and_then(|n| n.parse().ok()) else {
            continue;
        };
        // /sys/class/block/vda4 links to .../block/vda/vda4: the parent is
        // the disk (the link itself says so: no realpath walk needed).
        let Some(disk) = std::fs::read_link(&dir).ok().and_then(|p| {
            p.parent()
                .and_then(|d| d.file_name())
                .map(|n| n.to_string_lossy().into_owned())
        }) else {
            continue;
        };
        out.push(Partition {
            name: (*name).to_string(),
            devname: (*devname).to_string(),
            number,
            disk,
            start_512: read_u64(&dir.join("start")).unwrap_or(0),
            size_512: read_u64(&dir.join("size")).unwrap_or(0),
        });
    }
    out.sort_by(|a, b| a.devname.cmp(&b.devname));
    Ok(out)
}

/// Find partitions by name; when a name exists on several disks the first
/// (by kernel name) wins, which is the disk the firmware enumerated first.
pub fn find(class_block: &Path, names: &[&str]) -> Result<BTreeMap<String, Partition>, BlockError> {
    let mut found = BTreeMap::new();
    for p in scan(class_block)? {
        if !p.name.is_empty() && names.contains(&p.name.as_str()) && !found.contains_key(&p.name) {
            found.insert(p.name.clone(), p);
        }
    }
    Ok(found)
}

/// How partitions are identified: GPT names, or MBR numbers under role names.
/// The first role is the key (the slot's root): the others are taken from
/// the disk that holds it.
#[derive(Debug, Clone, Copy)]
pub enum Lookup<'a> {
    Names(&'a [&'a str]),
    Numbered(&'a [(&'a str, u32)]),
}

/// What a look found: the roles' partitions, all on one disk once the key
/// role is there, and every disk that holds the key role (kernel names,
/// sorted): more than one means the caller must say which disk it booted
/// from ([`Lookup::find_on`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    pub parts: BTreeMap<String, Partition>,
    pub disks: Vec<String>,
}

impl Lookup<'_> {
    pub fn roles(&self) -> Vec<&str> {
        match self {
            Lookup::Names(n) => n.to_vec(),
            Lookup::Numbered(n) => n.iter().map(|(r, _)| *r).collect(),
        }
    }

    /// Whether partition `p` is the one of `role`.
    fn matches(&self, role: usize, p: &Partition) -> bool {
        match self {
            Lookup::Names(n) => n.get(role).is_some_and(|n| !n.is_empty() && p.name == *n),
            Lookup::Numbered(n) => n.get(role).is_some_and(|(_, number)| p.number == *number),
        }
    }

    pub fn find(&self, class_block: &Path) -> Result<BTreeMap<String, Partition>, BlockError> {
        Ok(self.find_on(class_block, None)?.parts)
    }

    /// Look once. Every role is taken from one disk: `disk` when it holds the
    /// key role, else the first (by kernel name) that does. Before any disk
    /// holds the key role, each other role from the first disk that has it
    /// (so a wait can say what is still missing).
    pub fn find_on(&self, class_block: &Path, disk: Option<&str>) -> Result<Found, BlockError> {
        let all = scan(class_block)?;
        let mut disks: Vec<String> = all
            .iter()
            .filter(|p| self.matches(0, p))
            .map(|p| p.disk.clone())
            .collect();
        disks.sort();
        disks.dedup();
        let chosen = disk
            .filter(|d| disks.iter().any(|x| x == d))
            .or(disks.first().map(String::as_str));
        let mut parts = BTreeMap::new();
        for (i, role) in self.roles().into_iter().enumerate() {
            let p = all
                .iter()
                .find(|p| chosen.is_none_or(|d| p.disk == d) && self.matches(i, p));
            if let Some(p) = p {
                parts.insert(role.to_string(), p.clone());
            }
        }
        Ok(Found { parts, disks })
    }
}

/// Look in `class_block` until all `names` are present or `timeout`
/// passes, calling `pause` with the time left between two looks (it sleeps,
/// or waits for the kernel's next device event). Devices appear
/// asynchronously after their driver loads.
pub fn wait_for(
    class_block: &Path,
    names: &[&str],
    timeout: Duration,
    pause: &mut dyn FnMut(Duration),
) -> Result<BTreeMap<String, Partition>, BlockError> {
    wait_for_lookup(class_block, Lookup::Names(names), timeout, pause).map(|f| f.parts)
}

/// `wait_for` for either kind of partition table: done when one disk holds
/// every role.
pub fn wait_for_lookup(
    class_block: &Path,
    lookup: Lookup<'_>,
    timeout: Duration,
    pause: &mut dyn FnMut(Duration),
) -> Result<Found, BlockError> {
    let start = Instant::now();
    let roles = lookup.roles();
    loop {
        let found = lookup.find_on(class_block, None).unwrap_or_default();
        if roles.iter().all(|n| found.parts.contains_key(*n)) {
            return Ok(found);
        }
        if start.elapsed() >= timeout {
            return Err(BlockError::Timeout {
                missing: roles
                    .iter()
                    .filter(|n| !found.parts.contains_key(**n))
                    .map(|n| n.to_string())
                    .collect(),
                dir: class_block.to_path_buf(),
                waited_ms: start.elapsed().as_millis(),
            });
        }
        pause(timeout.saturating_sub(start.elapsed()));
    }
}

/// The block-device operations growing the data partition needs.
pub trait BlockDevices {
    /// Open a whole disk for reading and writing its partition table.
    fn open_disk(&mut self, disk: &Path) -> Result<File, BlockError>;
    fn size_bytes(&mut self, disk: &File, path: &Path) -> Result<u64, BlockError>;
    fn sector_size(&mut self, disk: &File, path: &Path) -> Result<u32, BlockError>;
    /// Tell the kernel about the partition's new extent.
    fn resize_partition(
        &mut self,
        disk: &File,
        path: &Path,
        number: u32,
        start_bytes: u64,
        length_bytes: u64,
    ) -> Result<(), BlockError>;
    /// Grow the ext4 mounted at `mount_point` to `size_bytes`; returns the block count.
    fn grow_ext4(&mut self, mount_point: &Path, size_bytes: u64) -> Result<u64, BlockError>;
    /// 16 random bytes for a new GUID (unique, not secret).
    fn random_bytes(&mut self) -> [u8; 16];
}

/// The kernel's block layer.
#[derive(Debug, Default)]
pub struct KernelBlockDevices;

impl BlockDevices for KernelBlockDevices {
    fn open_disk(&mut self, disk: &Path) -> Result<File, BlockError> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(disk)
            .map_err(|source| BlockError::Open {
                device: disk.to_path_buf(),
                source,
            })
    }

    fn size_bytes(&mut self, disk: &File, path: &Path) -> Result<u64, BlockError> {
        crate::sys::block::size_bytes(disk).map_err(|errno| BlockError::Ioctl {
            what: "BLKGETSIZE64",
            device: path.to_path_buf(),
            errno,
        })
    }

    fn sector_size(&mut self, disk: &File, path: &Path) -> Result<u32, BlockError> {
        crate::sys::block::logical_sector_size(disk).map_err(|errno| BlockError::Ioctl {
            what: "BLKSSZGET",
            device: path.to_path_buf(),
            errno,
        })
    }

    fn resize_partition(
        &mut self,
        disk: &File,
        path: &Path,
        number: u32,
        start_bytes: u64,
        length_bytes: u64,
    ) -> Result<(), BlockError> {
        crate::sys::block::resize_partition(disk, number, start_bytes, length_bytes).map_err(
            |errno| BlockError::Ioctl {
                what: "BLKPG_RESIZE_PARTITION",
                device: path.to_path_buf(),
                errno,
            },
        )
    }

    fn grow_ext4(&mut self, mount_point: &Path, size_bytes: u64) -> Result<u64, BlockError> {
        let ioctl_err = |what, errno| BlockError::Ioctl {
            what,
            device: mount_point.to_path_buf(),
            errno,
        };
        let (block_size, _) =
            crate::sys::statfs_blocks(mount_point).map_err(|e| ioctl_err("statfs", e))?;
        let blocks = size_bytes / block_size.max(1);
        let dir = File::open(mount_point).map_err(|source| BlockError::Open {
            device: mount_point.to_path_buf(),
            source,
        })?;
        crate::sys::block::resize_ext4(&dir, blocks)
            .map_err(|e| ioctl_err("EXT4_IOC_RESIZE_FS", e))?;
        Ok(blocks)
    }

    fn random_bytes(&mut self) -> [u8; 16] {
        let mut b = [0u8; 16];
        // getrandom(2) exists on every kernel Basalt ships (Linux >= 3.17);
        // were it to fail, the zero GUIDs would be shared by copies, as the
        // image's own are: said, and no worse than not renewing.
        if let Err(e) = crate::sys::getrandom_insecure(&mut b) {
            crate::console::error("storage", format_args!("getrandom for a new GUID: {e}"));
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Build a sysfs-like fixture: devices/<disk>/<part>/uevent and
    /// class/block/<name> symlinks, as the kernel lays them out.
    fn fixture(parts: &[(&str, &str, u32, Option<&str>)]) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let class = t.path().join("class/block");
        std::fs::create_dir_all(&class).unwrap();
        let mut disks = std::collections::BTreeSet::new();
        for (disk, dev, n, name) in parts {
            let d = t.path().join("devices").join(disk).join(dev);
            std::fs::create_dir_all(&d).unwrap();
            let mut ue =
                format!("MAJOR=254\nMINOR={n}\nDEVNAME={dev}\nDEVTYPE=partition\nPARTN={n}\n");
            if let Some(name) = name {
                ue.push_str(&format!("PARTNAME={name}\n"));
            }
            std::fs::write(d.join("uevent"), ue).unwrap();
            std::fs::write(d.join("start"), format!("{}\n", 2048 * n)).unwrap();
            std::fs::write(d.join("size"), "2048\n").unwrap();
            std::os::unix::fs::symlink(format!("../../devices/{disk}/{dev}"), class.join(dev))
                .unwrap();
            disks.insert(*disk);
        }
        for disk in disks {
            let d = t.path().join("devices").join(disk);
            std::fs::write(d.join("uevent"), format!("DEVNAME={disk}\nDEVTYPE=disk\n")).unwrap();
            std::os::unix::fs::symlink(format!("../../devices/{disk}"), class.join(disk)).unwrap();
        }
        t
    }

    #[test]
    fn finds_partitions_by_gpt_name() {
        let t = fixture(&[
            ("vda", "vda1", 1, Some("esp")),
            ("vda", "vda2", 2, Some("root-a")),
            ("vda", "vda3", 3, Some("root-b")),
            ("vda", "vda4", 4, Some("data")),
            ("vdb", "vdb1", 1, None),
        ]);
        let class = t.path().join("class/block");
        let found = find(&class, &["root-a", "data", "esp"]).unwrap();
        assert_eq!(found.len(), 3);
        let data = &found["data"];
        assert_eq!(data.devname, "vda4");
        assert_eq!(data.disk, "vda");
        assert_eq!(data.number, 4);
        assert_eq!(data.start_512, 8192);
        assert_eq!(data.size_512, 2048);
        assert_eq!(data.dev_path(Path::new("/dev")), PathBuf::from("/dev/vda4"));
        assert_eq!(data.disk_path(Path::new("/dev")), PathBuf::from("/dev/vda"));
        assert!(!find(&class, &["root-b"]).unwrap().is_empty());
    }

    #[test]
    fn first_disk_wins_on_duplicate_names() {
        let t = fixture(&[
            ("vdb", "vdb2", 2, Some("root-a")),
            ("vda", "vda2", 2, Some("root-a")),
        ]);
        let found = find(&t.path().join("class/block"), &["root-a"]).unwrap();
        assert_eq!(found["root-a"].devname, "vda2");
    }

    #[test]
    fn wait_times_out_naming_the_missing() {
        let t = fixture(&[("vda", "vda2", 2, Some("root-a"))]);
        let err = wait_for(
            &t.path().join("class/block"),
            &["root-a", "data"],
            Duration::from_millis(60),
            &mut |left| std::thread::sleep(left.min(Duration::from_millis(20))),
        )
        .unwrap_err();
        match err {
            BlockError::Timeout { missing, .. } => assert_eq!(missing, vec!["data".to_string()]),
            e => panic!("{e}"),
        }
    }

    #[test]
    fn wait_sees_late_partitions() {
        let t = fixture(&[("vda", "vda2", 2, Some("root-a"))]);
        let class = t.path().join("class/block");
        let root = t.path().to_path_buf();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(80));
            let d = root.join("devices/vda/vda4");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("uevent"),
                "DEVNAME=vda4\nDEVTYPE=partition\nPARTN=4\nPARTNAME=data\n",
            )
            .unwrap();
            std::os::unix::fs::symlink("../../devices/vda/vda4", root.join("class/block/vda4"))
                .unwrap();
        });
        let found = wait_for(
            &class,
            &["root-a", "data"],
            Duration::from_secs(5),
            &mut |left| std::thread::sleep(left.min(Duration::from_millis(20))),
        )
        .unwrap();
        h.join().unwrap();
        assert_eq!(found["data"].devname, "vda4");
    }

    #[test]
    fn mbr_partitions_by_number_on_one_disk() {
        // An SD card (no PARTNAME) and a USB stick that also has a partition 1.
        let t = fixture(&[
            ("mmcblk0", "mmcblk0p1", 1, None),
            ("mmcblk0", "mmcblk0p5", 5, None),
            ("mmcblk0", "mmcblk0p7", 7, None),
            ("sda", "sda1", 1, None),
        ]);
        let class = t.path().join("class/block");
        let wanted = [("root-a", 5), ("data", 7), ("esp", 1)];
        let got = wait_for_lookup(
            &class,
            Lookup::Numbered(&wanted),
            Duration::from_millis(10),
            &mut |_| std::thread::sleep(Duration::from_millis(1)),
        )
        .unwrap();
        assert_eq!(got.parts["root-a"].devname, "mmcblk0p5");
        assert_eq!(
            got.parts["esp"].devname, "mmcblk0p1",
            "config FAT from the root's disk"
        );
        assert_eq!(got.parts["data"].number, 7);
        // By name, unnamed partitions are never matched.
        assert!(find(&class, &["", "root-a"]).unwrap().is_empty());
    }

    #[test]
    fn all_roles_from_one_disk_and_every_disk_holding_the_root_named() {
        // Two disks with the same image's names (an install stick left in):
        // nvme0n1 sorts first; sda lacks its data partition.
        let t = fixture(&[
            ("nvme0n1", "nvme0n1p1", 1, Some("esp")),
            ("nvme0n1", "nvme0n1p2", 2, Some("root-a")),
            ("nvme0n1", "nvme0n1p4", 4, Some("data")),
            ("sda", "sda1", 1, Some("esp")),
            ("sda", "sda2", 2, Some("root-a")),
        ]);
        let class = t.path().join("class/block");
        let names = ["root-a", "data", "esp"];
        let lookup = Lookup::Names(&names);
        let first = lookup.find_on(&class, None).unwrap();
        assert_eq!(first.disks, ["nvme0n1", "sda"]);
        assert!(first.parts.values().all(|p| p.disk == "nvme0n1"));
        // Told sda: everything from sda, the data partition it lacks is not
        // taken from the other disk.
        let sda = lookup.find_on(&class, Some("sda")).unwrap();
        assert_eq!(sda.parts["root-a"].devname, "sda2");
        assert_eq!(sda.parts["esp"].devname, "sda1");
        assert!(!sda.parts.contains_key("data"));
        // A disk that does not hold the root is not taken.
        let other = lookup.find_on(&class, Some("vdz")).unwrap();
        assert_eq!(other.parts["root-a"].devname, "nvme0n1p2");
        // The wait is done on the first disk that has all roles.
        let waited = wait_for_lookup(&class, lookup, Duration::ZERO, &mut |_| {}).unwrap();
        assert_eq!(waited.disks.len(), 2);
        assert_eq!(waited.parts["data"].devname, "nvme0n1p4");
    }

    #[test]
    fn roles_before_the_root_appears_come_from_any_disk() {
        let t = fixture(&[
            ("vdb", "vdb4", 4, Some("data")),
            ("vda", "vda1", 1, Some("esp")),
        ]);
        let names = ["root-a", "data", "esp"];
        let f = Lookup::Names(&names)
            .find_on(&t.path().join("class/block"), None)
            .unwrap();
        assert!(f.disks.is_empty());
        assert_eq!(f.parts.len(), 2, "{f:?}");
    }

    #[test]
    fn missing_dir_is_an_error() {
        assert!(scan(Path::new("/nonexistent/class/block")).is_err());
    }
}
