//! The node as the update agent sees it: every path it reads or writes,
//! gathered in one value so tests point it at a temporary directory (a fake
//! ESP, root partitions as plain files, a state file).

use std::path::PathBuf;

use serde::Deserialize;

use super::UpdateError;
use super::entry::{self, EntryFile, LoaderEntry, Rank};
use super::state::write_atomic;
use crate::slot::Slot;

/// Where a node keeps things (the real paths are `Device::system()`).
#[derive(Debug, Clone)]
pub struct Device {
    /// The ESP, mounted read-write by stage 1.
    pub boot_dir: PathBuf,
    pub state_path: PathBuf,
    pub lock_path: PathBuf,
    pub image_facts: PathBuf,
    /// Image keys: `*.pub` minisign public key files written by the builder.
    pub key_dir: PathBuf,
    /// Node config's update settings, published by stage 2.
    pub update_config: PathBuf,
    /// Stage 1's handoff (the booted slot).
    pub handoff: PathBuf,
    pub class_block: PathBuf,
    pub dev_dir: PathBuf,
    /// Tests: the root partitions as files, instead of looking them up in sysfs.
    pub root_devices: Option<[PathBuf; 2]>,
    pub control_socket: PathBuf,
    /// Node config files (image default, then the boot partition's): read
    /// for `[update]` when stage 2 published no `update_config`.
    pub node_configs: Vec<PathBuf>,
    /// Raspberry Pi: the firmware's `/chosen/bootloader` properties.
    pub bootloader_dt: PathBuf,
    /// Tests: MBR partitions by number, instead of the booted disk's.
    pub numbered: Option<std::collections::BTreeMap<u8, PathBuf>>,
}

/// Image key directory in the root filesystem (written by `basalt build`).
pub const KEY_DIR: &str = "/etc/basalt/update-keys";
/// Slot state on the data partition.
pub const STATE_PATH: &str = "/var/lib/basalt/slots.toml";
/// One update at a time: `flock` on this file.
pub const LOCK_PATH: &str = "/run/basalt/update.lock";
/// `[update]` of the node config, as stage 2 publishes it.
pub const UPDATE_CONFIG: &str = "/run/basalt/update.toml";

impl Device {
    pub fn system() -> Device {
        Device {
            boot_dir: PathBuf::from(crate::slot::BOOT_MOUNT),
            state_path: PathBuf::from(STATE_PATH),
            lock_path: PathBuf::from(LOCK_PATH),
            image_facts: PathBuf::from(crate::slot::IMAGE_FACTS_PATH),
            key_dir: PathBuf::from(KEY_DIR),
            update_config: PathBuf::from(UPDATE_CONFIG),
            handoff: PathBuf::from("/run/basalt/stage1.toml"),
            class_block: PathBuf::from("/sys/class/block"),
            dev_dir: PathBuf::from("/dev"),
            root_devices: None,
            control_socket: crate::control::socket_path(),
            node_configs: vec![
                PathBuf::from("/etc/basalt").join(crate::slot::NODE_CONFIG_FILE),
                PathBuf::from(crate::slot::BOOT_MOUNT).join(crate::slot::NODE_CONFIG_FILE),
            ],
            bootloader_dt: PathBuf::from(crate::rpi::BOOTLOADER_DT_DIR),
            numbered: None,
        }
    }

    pub fn entries_dir(&self) -> PathBuf {
        self.boot_dir.join(entry::ENTRIES_DIR)
    }

    /// The slot stage 1 booted.
    pub fn booted_slot(&self) -> Result<Slot, UpdateError> {
        let text = std::fs::read_to_string(&self.handoff).map_err(|source| UpdateError::Io {
            what: "reading the stage 1 handoff",
            path: self.handoff.clone(),
            source,
        })?;
        let h: crate::stage1::Handoff =
            crate::tomlfast::from_str(&text).map_err(|e| UpdateError::Config {
                path: self.handoff.clone(),
                message: e.message().to_string(),
            })?;
        Slot::parse(&h.slot).ok_or_else(|| UpdateError::Config {
            path: self.handoff.clone(),
            message: format!("booted slot {:?} is neither a nor b", h.slot),
        })
    }

    /// Stage 1's handoff as a table (unknown keys kept), `None` if unreadable.
    fn handoff_table(&self) -> Option<toml::Table> {
        std::fs::read_to_string(&self.handoff)
            .ok()
            .and_then(|t| t.parse::<toml::Table>().ok())
    }

    /// `reboot-partition` boards: stage 1 says this boot is a trial's one attempt.
    pub fn handoff_trial(&self) -> bool {
        self.handoff_table()
            .and_then(|t| t.get("trial").and_then(|v| v.as_bool()))
            .unwrap_or(false)
    }

    /// Raspberry Pi: how this node's trial boot is started. The firmware's
    /// capabilities decide when it publishes both tryboot bits
    /// (`rpi::effective_method`); otherwise the board's method is known from
    /// stage 1, which ran the `reboot-partition` rules (a `boot_method` key
    /// in the handoff, or its `trial` step). `None`: neither, no trial possible.
    pub fn pi_method(&self) -> Option<crate::rpi::BootMethod> {
        use crate::rpi::BootMethod;
        let caps = crate::rpi::BootloaderInfo::read(&self.bootloader_dt)
            .ok()
            .and_then(|i| i.capabilities);
        if caps.is_some_and(|c| c.tryboot_a_b()) {
            return Some(BootMethod::Tryboot);
        }
        let h = self.handoff_table()?;
        let named = h
            .get("boot_method")
            .and_then(|v| v.as_str())
            .filter(|m| !m.is_empty())
            .and_then(BootMethod::parse);
        let ran_rules = h
            .get("steps_ms")
            .and_then(|s| s.as_table())
            .is_some_and(|s| s.contains_key("trial"));
        match named {
            Some(m) => Some(crate::rpi::effective_method(m, caps)),
            None if ran_rules => Some(BootMethod::RebootPartition),
            None => None,
        }
    }

    /// The root partition of `slot` and its size in bytes.
    pub fn root_device(&self, slot: Slot) -> Result<(PathBuf, u64), UpdateError> {
        if let Some(files) = &self.root_devices {
            let p = files[usize::from(slot == Slot::B)].clone();
            let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            return Ok((p, len));
        }
        let name = slot.root_partition_name();
        let parts = crate::blockdev::scan(&self.class_block)
            .map_err(|e| UpdateError::Partition(format!("{name}: {e}")))?;
        // On the disk of the booted root (stage 1 chose it among several
        // disks with the same names); without a handoff, the first by name.
        let booted = self.booted_root_disk(&parts);
        let p = parts
            .iter()
            .find(|p| p.name == name && booted.as_ref().is_none_or(|d| p.disk == *d))
            .ok_or_else(|| match &booted {
                Some(d) => UpdateError::Partition(format!("no partition named {name} on {d}")),
                None => UpdateError::Partition(format!("no partition named {name}")),
            })?;
        Ok((p.dev_path(&self.dev_dir), p.size_512 * 512))
    }

    /// The disk holding the root stage 1 mounted (its handoff's `root_device`).
    fn booted_root_disk(&self, parts: &[crate::blockdev::Partition]) -> Option<String> {
        let text = std::fs::read_to_string(&self.handoff).ok()?;
        let h: crate::stage1::Handoff = crate::tomlfast::from_str(&text).ok()?;
        parts
            .iter()
            .find(|p| p.dev_path(&self.dev_dir).display().to_string() == h.root_device)
            .map(|p| p.disk.clone())
    }

    /// Raspberry Pi (MBR) node: its config partition, mounted at `boot_dir`,
    /// holds `autoboot.txt` (docs/boot-protocol.md). x86_64 nodes have loader entries.
    pub fn is_pi(&self) -> bool {
        self.boot_dir.join(crate::rpi::AUTOBOOT_FILE).is_file()
    }

    /// MBR partition `n` of the disk that holds the booted root, and its size.
    pub fn numbered_partition(&self, n: u8) -> Result<(PathBuf, u64), UpdateError> {
        if let Some(map) = &self.numbered {
            let p = map
                .get(&n)
                .cloned()
                .ok_or_else(|| UpdateError::Partition(format!("no partition {n}")))?;
            let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            return Ok((p, len));
        }
        let text = std::fs::read_to_string(&self.handoff).unwrap_or_default();
        let h: crate::stage1::Handoff = crate::tomlfast::from_str(&text).unwrap_or_default();
        let parts = crate::blockdev::scan(&self.class_block)
            .map_err(|e| UpdateError::Partition(e.to_string()))?;
        let root = parts
            .iter()
            .find(|p| p.dev_path(&self.dev_dir).display().to_string() == h.root_device)
            .ok_or_else(|| {
                UpdateError::Partition(format!("booted root {:?} not found", h.root_device))
            })?;
        let p = parts
            .iter()
            .find(|p| p.disk == root.disk && p.number == u32::from(n))
            .ok_or_else(|| UpdateError::Partition(format!("no partition {n} on {}", root.disk)))?;
        Ok((p.dev_path(&self.dev_dir), p.size_512 * 512))
    }

    /// Trusted signing keys: the image's key files, then the node config's.
    pub fn trusted_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.key_dir) {
            let mut files: Vec<PathBuf> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "pub"))
                .collect();
            files.sort();
            for f in files {
                if let Ok(t) = std::fs::read_to_string(&f) {
                    keys.push(t);
                }
            }
        }
        keys.extend(self.config().public_keys);
        keys
    }

    /// The node config's update settings: what stage 2 published in
    /// `update_config`, else the `[update]` tables of the node config files
    /// (later files win, key by key), else defaults.
    pub fn config(&self) -> UpdateConfig {
        if let Some(c) = std::fs::read_to_string(&self.update_config)
            .ok()
            .and_then(|t| toml::from_str(&t).ok())
        {
            return c;
        }
        let mut c = UpdateConfig::default();
        for f in &self.node_configs {
            let Some(u) = std::fs::read_to_string(f)
                .ok()
                .and_then(|t| t.parse::<toml::Table>().ok())
                .and_then(|t| t.get("update").cloned())
            else {
                continue;
            };
            if let Some(keys) = u.get("public_keys").and_then(|k| k.as_array()) {
                c.public_keys = keys
                    .iter()
                    .filter_map(|k| k.as_str().map(String::from))
                    .collect();
            }
            if let Some(g) = u.get("health_gate") {
                if let Some(t) = g.get("timeout_seconds").and_then(|t| t.as_integer()) {
                    c.health_gate.timeout_seconds = t.clamp(10, 86_400) as u64;
                }
                if let Some(checks) = g.get("checks").and_then(|k| k.as_array()) {
                    c.health_gate.checks = checks
                        .iter()
                        .filter_map(|k| k.as_str().map(String::from))
                        .collect();
                }
            }
        }
        c
    }

    fn entry_path(&self, name: &str) -> PathBuf {
        self.entries_dir().join(name)
    }

    /// Entry files of `slot` on the ESP.
    pub fn entries_of(&self, slot: Slot) -> Vec<EntryFile> {
        entry::list(&self.entries_dir())
            .into_iter()
            .filter(|e| e.slot == slot)
            .collect()
    }

    /// The loader entry of `slot` (counted or not), parsed; the uncounted one first.
    pub fn read_entry(&self, slot: Slot) -> Option<LoaderEntry> {
        let mut files = self.entries_of(slot);
        files.sort_by_key(|f| f.counter.is_some());
        files.iter().find_map(|f| {
            std::fs::read_to_string(self.entry_path(&f.name))
                .ok()
                .and_then(|t| LoaderEntry::parse(&t))
        })
    }

    /// Write an entry under `name`: a temporary name systemd-boot ignores
    /// (not `.conf`), fsync, then rename (one FAT directory update).
    pub fn write_entry(&self, name: &str, e: &LoaderEntry) -> Result<(), UpdateError> {
        let path = self.entry_path(name);
        write_atomic(&path, e.render().as_bytes()).map_err(UpdateError::State)
    }

    /// Remove `slot`'s entry files matching `which`; how many there were.
    pub fn remove_entries(
        &self,
        slot: Slot,
        which: impl Fn(&EntryFile) -> bool,
    ) -> Result<usize, UpdateError> {
        let mut removed = 0;
        for f in self.entries_of(slot).into_iter().filter(|f| which(f)) {
            let p = self.entry_path(&f.name);
            std::fs::remove_file(&p).map_err(|source| UpdateError::Io {
                what: "removing loader entry",
                path: p,
                source,
            })?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Make `slot`'s uncounted entry carry `rank` (rewritten only when it
    /// differs); whether it was rewritten.
    pub fn set_rank(&self, slot: Slot, rank: Rank) -> Result<bool, UpdateError> {
        let Some(mut e) = self.read_entry(slot) else {
            return Err(UpdateError::Partition(format!(
                "no loader entry for slot {} to make {}",
                slot.name(),
                rank.sort_key()
            )));
        };
        let name = entry::file_name(slot);
        let current = std::fs::read_to_string(self.entry_path(&name)).ok();
        e.rank = rank;
        if current.as_deref() == Some(e.render().as_str()) {
            return Ok(false);
        }
        self.write_entry(&name, &e)?;
        Ok(true)
    }
}

/// `/run/basalt/update.toml`: the node config's `[update]` keys stage 2 publishes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct UpdateConfig {
    pub public_keys: Vec<String>,
    pub health_gate: HealthGate,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct HealthGate {
    pub timeout_seconds: u64,
    pub checks: Vec<String>,
}

impl Default for HealthGate {
    fn default() -> Self {
        HealthGate {
            timeout_seconds: 600,
            checks: vec!["kubernetes".to_string()],
        }
    }
}

/// Flush everything (FAT has no journal: the order of our writes is what
/// keeps the ESP consistent, and sync(2) makes that order reach the disk).
pub fn sync() {
    crate::sys::sync();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sysfs as the kernel lays it out: class/block/<part> links to
    /// devices/<disk>/<part>, whose uevent has the GPT name.
    fn sysfs(t: &std::path::Path, parts: &[(&str, u32, &str)]) {
        let class = t.join("class/block");
        std::fs::create_dir_all(&class).unwrap();
        for (disk, n, name) in parts {
            let dev = if disk.ends_with(|c: char| c.is_ascii_digit()) {
                format!("{disk}p{n}")
            } else {
                format!("{disk}{n}")
            };
            let d = t.join("devices").join(disk).join(&dev);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("uevent"),
                format!("DEVNAME={dev}\nDEVTYPE=partition\nPARTN={n}\nPARTNAME={name}\n"),
            )
            .unwrap();
            std::fs::write(d.join("size"), "2048\n").unwrap();
            std::os::unix::fs::symlink(format!("../../devices/{disk}/{dev}"), class.join(&dev))
                .unwrap();
        }
    }

    #[test]
    fn the_other_slot_is_on_the_booted_disk() {
        // Two disks with the same names; nvme0n1 sorts first, the node
        // booted from sda (stage 1 chose it: docs/boot-protocol.md, Stage 1).
        let t = tempfile::tempdir().unwrap();
        let mut parts = Vec::new();
        for disk in ["nvme0n1", "sda"] {
            parts.extend([(disk, 1, "esp"), (disk, 2, "root-a"), (disk, 3, "root-b")]);
        }
        sysfs(t.path(), &parts);
        let mut dev = Device::system();
        dev.class_block = t.path().join("class/block");
        dev.dev_dir = PathBuf::from("/dev");
        dev.handoff = t.path().join("stage1.toml");
        // No handoff: the first by kernel name, as before.
        let (p, len) = dev.root_device(Slot::B).unwrap();
        assert_eq!((p, len), (PathBuf::from("/dev/nvme0n1p3"), 2048 * 512));
        std::fs::write(&dev.handoff, "slot = \"a\"\nroot_device = \"/dev/sda2\"\n").unwrap();
        assert_eq!(
            dev.root_device(Slot::B).unwrap().0,
            PathBuf::from("/dev/sda3")
        );
        assert_eq!(
            dev.root_device(Slot::A).unwrap().0,
            PathBuf::from("/dev/sda2")
        );
        // The booted disk without the other slot's partition: an error naming it.
        std::fs::remove_file(t.path().join("class/block/sda3")).unwrap();
        let e = dev.root_device(Slot::B).unwrap_err().to_string();
        assert!(e.contains("no partition named root-b on sda"), "{e}");
    }
}
