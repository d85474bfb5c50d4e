//! Block devices on the build host: which disks exist, which are removable,
//! and whether one may be written by `basalt flash`.
//!
//! Everything is read from `/sys/block`, the mount table and `/proc/swaps`,
//! whose paths are parameters (`HostPaths`) so the refusal logic is tested on
//! fixture trees. This module never writes anything.

use std::fs;
use std::path::{Path, PathBuf};

// The device reads the mount table with the same unescaping (one copy).
use basalt_init::mounts::unescape_octal;

/// Where the kernel's views of devices and mounts are read from.
#[derive(Debug, Clone)]
pub struct HostPaths {
    pub sys_block: PathBuf,
    pub mountinfo: PathBuf,
    pub swaps: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths {
            sys_block: "/sys/block".into(),
            mountinfo: "/proc/self/mountinfo".into(),
            swaps: "/proc/swaps".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub name: String,
    pub dev: String,
    pub size_bytes: u64,
    /// Where it is mounted, if anywhere.
    pub mountpoints: Vec<String>,
    pub swap: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub name: String,
    /// `major:minor`.
    pub dev: String,
    pub model: String,
    pub size_bytes: u64,
    pub removable: bool,
    pub partitions: Vec<Partition>,
    /// Mount points of the whole disk (no partition table).
    pub mountpoints: Vec<String>,
    pub swap: bool,
}

impl Disk {
    pub fn path(&self) -> PathBuf {
        Path::new("/dev").join(&self.name)
    }

    pub fn all_mountpoints(&self) -> Vec<String> {
        let mut v = self.mountpoints.clone();
        for p in &self.partitions {
            v.extend(p.mountpoints.iter().cloned());
        }
        v
    }

    /// Holds the running system: `/` (or `/usr`, `/boot`) is mounted from it, or swap.
    pub fn is_system_disk(&self) -> bool {
        self.swap
            || self.partitions.iter().any(|p| p.swap)
            || self
                .all_mountpoints()
                .iter()
                .any(|m| m == "/" || m == "/usr" || m == "/boot")
    }

    /// One line per disk for `basalt devices` and confirmation prompts.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{}  {}  {}{}",
            self.path().display(),
            human_size(self.size_bytes),
            if self.model.is_empty() {
                "(no model)"
            } else {
                &self.model
            },
            if self.removable { "  removable" } else { "" }
        );
        for p in &self.partitions {
            s.push_str(&format!("\n  {}  {}", p.name, human_size(p.size_bytes)));
            for m in &p.mountpoints {
                s.push_str(&format!("  mounted on {m}"));
            }
            if p.swap {
                s.push_str("  swap");
            }
        }
        s
    }
}

pub fn human_size(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

/// `major:minor` → mount points, from a mountinfo file (field 3 is `major:minor`,
/// field 5 the mount point, octal escapes decoded).
fn mounts_by_dev(mountinfo: &Path) -> Vec<(String, String)> {
    let Ok(text) = fs::read_to_string(mountinfo) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Some((f.get(2)?.to_string(), unescape_octal(f.get(4)?)))
        })
        .collect()
}

/// Device names (`sda2`, `zram0`) in use as swap.
fn swap_names(swaps: &Path) -> Vec<String> {
    let Ok(text) = fs::read_to_string(swaps) else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|p| {
            Path::new(p)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .collect()
}

/// Every disk under `sys_block` (loop, ram and device-mapper devices excluded).
pub fn list_disks(paths: &HostPaths) -> Vec<Disk> {
    let mounts = mounts_by_dev(&paths.mountinfo);
    let swaps = swap_names(&paths.swaps);
    let mp = |dev: &str| -> Vec<String> {
        mounts
            .iter()
            .filter(|(d, _)| d == dev)
            .map(|(_, m)| m.clone())
            .collect()
    };
    let Ok(rd) = fs::read_dir(&paths.sys_block) else {
        return Vec::new();
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut disks = Vec::new();
    for name in names {
        if ["loop", "ram", "dm-", "zram", "sr"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            continue;
        }
        let dir = paths.sys_block.join(&name);
        let dev = read_trim(&dir.join("dev")).unwrap_or_default();
        let sectors: u64 = read_trim(&dir.join("size"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let model = [dir.join("device/vendor"), dir.join("device/model")]
            .iter()
            .filter_map(|p| read_trim(p))
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let removable = read_trim(&dir.join("removable")).as_deref() == Some("1");
        let mut partitions = Vec::new();
        if let Ok(rd) = fs::read_dir(&dir) {
            let mut parts: Vec<_> = rd
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("partition").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            parts.sort();
            for p in parts {
                let pd = dir.join(&p);
                let pdev = read_trim(&pd.join("dev")).unwrap_or_default();
                let psz: u64 = read_trim(&pd.join("size"))
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                partitions.push(Partition {
                    mountpoints: mp(&pdev),
                    swap: swaps.contains(&p),
                    name: p,
                    dev: pdev,
                    size_bytes: psz * 512,
                });
            }
        }
        disks.push(Disk {
            mountpoints: mp(&dev),
            swap: swaps.contains(&name),
            name,
            dev,
            model,
            size_bytes: sectors * 512,
            removable,
            partitions,
        });
    }
    disks
}

/// Why a target may not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "{disk} holds the running system (root, /usr, /boot or swap): refusing even with --force"
    )]
    SystemDisk { disk: String },
    #[error("{disk} is mounted ({mounts}): unmount it first")]
    Mounted { disk: String, mounts: String },
    #[error("{disk} is not removable: pass --force if you are sure")]
    NotRemovable { disk: String },
    #[error("{disk} holds {have} bytes, the image needs {need}")]
    TooSmall { disk: String, have: u64, need: u64 },
    #[error("{target} is a partition of {disk}: give the whole disk")]
    Partition { target: String, disk: String },
    #[error("{target} is not a disk this machine knows (not under /sys/block)")]
    Unknown { target: String },
}

/// Check that the disk named `name` (as in `/dev/<name>`) may receive an image of `image_size` bytes.
pub fn check_target(
    paths: &HostPaths,
    name: &str,
    image_size: u64,
    force: bool,
) -> Result<Disk, Refusal> {
    let disks = list_disks(paths);
    let Some(disk) = disks.iter().find(|d| d.name == name) else {
        if let Some(d) = disks
            .iter()
            .find(|d| d.partitions.iter().any(|p| p.name == name))
        {
            return Err(Refusal::Partition {
                target: name.into(),
                disk: d.name.clone(),
            });
        }
        return Err(Refusal::Unknown {
            target: name.into(),
        });
    };
    let label = disk.path().display().to_string();
    if disk.is_system_disk() {
        return Err(Refusal::SystemDisk { disk: label });
    }
    let mounts = disk.all_mountpoints();
    if !mounts.is_empty() {
        return Err(Refusal::Mounted {
            disk: label,
            mounts: mounts.join(", "),
        });
    }
    if !disk.removable && !force {
        return Err(Refusal::NotRemovable { disk: label });
    }
    if disk.size_bytes < image_size {
        return Err(Refusal::TooSmall {
            disk: label,
            have: disk.size_bytes,
            need: image_size,
        });
    }
    Ok(disk.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixture machine: sda (system, not removable: sda1 on /, sda2 swap),
    /// sdb (removable 32 GiB card, sdb1 mounted on /media/card), sdc (removable,
    /// 8 GiB, not mounted), nvme0n1 (not removable, not mounted), loop0.
    fn fixture() -> (tempdir::Dir, HostPaths) {
        let d = tempdir::Dir::new("devices");
        let sb = d.0.join("sys/block");
        let disk = |name: &str, dev: &str, sectors: u64, removable: bool, model: &str| {
            let p = sb.join(name);
            fs::create_dir_all(p.join("device")).unwrap();
            fs::write(p.join("dev"), format!("{dev}\n")).unwrap();
            fs::write(p.join("size"), format!("{sectors}\n")).unwrap();
            fs::write(p.join("removable"), if removable { "1\n" } else { "0\n" }).unwrap();
            fs::write(p.join("device/model"), format!("{model}\n")).unwrap();
        };
        let part = |disk: &str, name: &str, dev: &str, sectors: u64| {
            let p = sb.join(disk).join(name);
            fs::create_dir_all(&p).unwrap();
            fs::write(p.join("partition"), "1\n").unwrap();
            fs::write(p.join("dev"), format!("{dev}\n")).unwrap();
            fs::write(p.join("size"), format!("{sectors}\n")).unwrap();
        };
        disk("sda", "8:0", 500 << 21, false, "Samsung SSD");
        part("sda", "sda1", "8:1", 400 << 21);
        part("sda", "sda2", "8:2", 8 << 21);
        disk("sdb", "8:16", 32 << 21, true, "SD Card Reader");
        part("sdb", "sdb1", "8:17", 32 << 21);
        disk("sdc", "8:32", 8 << 21, true, "USB Stick");
        disk("nvme0n1", "259:0", 1000 << 21, false, "NVMe");
        disk("loop0", "7:0", 100, false, "");
        let mountinfo = d.0.join("mountinfo");
        fs::write(
            &mountinfo,
            "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
             40 22 8:17 / /media/my\\040card rw shared:2 - vfat /dev/sdb1 rw\n",
        )
        .unwrap();
        let swaps = d.0.join("swaps");
        fs::write(
            &swaps,
            "Filename Type Size Used Priority\n/dev/sda2 partition 8388604 0 -2\n",
        )
        .unwrap();
        let paths = HostPaths {
            sys_block: sb,
            mountinfo,
            swaps,
        };
        (d, paths)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new(name: &str) -> Dir {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p =
                    std::env::temp_dir().join(format!("basalt-{name}-{}-{n}", std::process::id()));
                let _ = std::fs::remove_dir_all(&p);
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn lists_disks_with_partitions_and_mounts() {
        let (_d, p) = fixture();
        let disks = list_disks(&p);
        let names: Vec<_> = disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["nvme0n1", "sda", "sdb", "sdc"]);
        let sdb = &disks[2];
        assert_eq!(sdb.partitions[0].mountpoints, ["/media/my card"]);
        assert_eq!(sdb.size_bytes, 32 << 30);
        assert!(disks[1].is_system_disk());
        assert!(disks[1].describe().contains("mounted on /"));
    }

    #[test]
    fn refusals() {
        let (_d, p) = fixture();
        let gib = 1u64 << 30;
        assert!(matches!(
            check_target(&p, "sda", gib, true),
            Err(Refusal::SystemDisk { .. })
        ));
        assert!(matches!(
            check_target(&p, "sdb", gib, false),
            Err(Refusal::Mounted { .. })
        ));
        assert!(matches!(
            check_target(&p, "nvme0n1", gib, false),
            Err(Refusal::NotRemovable { .. })
        ));
        assert!(
            check_target(&p, "nvme0n1", gib, true).is_ok(),
            "--force allows a non-removable disk"
        );
        assert!(matches!(
            check_target(&p, "sdc", 16 * gib, false),
            Err(Refusal::TooSmall { .. })
        ));
        assert!(matches!(
            check_target(&p, "sdb1", gib, false),
            Err(Refusal::Partition { .. })
        ));
        assert!(matches!(
            check_target(&p, "sdz", gib, false),
            Err(Refusal::Unknown { .. })
        ));
        assert!(matches!(
            check_target(&p, "loop0", 1, true),
            Err(Refusal::Unknown { .. })
        ));
        let ok = check_target(&p, "sdc", 2 * gib, false).unwrap();
        assert_eq!(ok.model, "USB Stick");
    }

    #[test]
    fn swap_only_disk_is_system() {
        let (d, mut p) = fixture();
        p.mountinfo = d.0.join("none");
        assert!(matches!(
            check_target(&p, "sda", 1, true),
            Err(Refusal::SystemDisk { .. })
        ));
    }
}
