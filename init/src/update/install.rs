//! `basaltctl update`: install a bundle into the inactive slot.
//!
//! Order (docs/updates.md): verify the signed head against the trusted keys
//! and check board, compatibility and version *before* reading a payload
//! byte; then mark the inactive slot `empty` and remove its loader entries
//! (from here on its old content is gone, and nothing can boot it); stream
//! each payload into place while hashing it; check the end of the stream;
//! only then write the counted trial entry and record `trial`. A failure in
//! between leaves the slot `empty` with the reason, and the booted slot's
//! entry untouched.

use std::io::{Read, Write};

use super::device::{Device, sync};
use super::entry::{self, LoaderEntry, Rank};
use super::state::{LastUpdate, SlotState, SlotsState};
use super::{UpdateError, boottar, version};
use crate::bundle::{self, BundleError, Head, Manifest, PayloadPart, PayloadReader};
use crate::image::ImageFacts;
use crate::slot::Slot;

/// Added to a trial entry's options unless they set `panic=`: a kernel panic
/// in the trial (a broken initramfs, a missing root) reboots after 10 s, and
/// systemd-boot, finding the trial entry out of tries, boots the primary.
pub const TRIAL_PANIC: &str = "panic=10";

/// Copy buffer for the root payload: the bound on the agent's memory use.
pub const COPY_BUFFER: usize = 1 << 20;

#[derive(Debug, Clone, Copy, Default)]
pub struct InstallOptions {
    pub allow_downgrade: bool,
}

/// What an install did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub slot: Slot,
    pub version: String,
    pub bytes: u64,
}

/// What the node is running, for the checks.
#[derive(Debug, Clone)]
struct Running {
    facts: ImageFacts,
    booted: Slot,
    state: SlotsState,
    /// A Raspberry Pi node (autoboot.txt, tryboot) rather than systemd-boot.
    pi: bool,
    /// Pi: the primary slot `autoboot.txt` names, and how the trial boots.
    pi_primary: Option<Slot>,
    pi_method: Option<crate::rpi::BootMethod>,
}

fn running(dev: &Device) -> Result<Running, UpdateError> {
    let facts = ImageFacts::load(&dev.image_facts).map_err(|e| UpdateError::Config {
        path: dev.image_facts.clone(),
        message: e.to_string(),
    })?;
    let booted = dev.booted_slot()?;
    let state = SlotsState::load_or_fresh(&dev.state_path, booted, &facts.os_version)?;
    let pi = dev.is_pi();
    let (pi_primary, pi_method) = if pi {
        (
            crate::rpi::read_autoboot(&dev.boot_dir)
                .ok()
                .map(|a| a.primary),
            dev.pi_method(),
        )
    } else {
        (None, None)
    };
    Ok(Running {
        facts,
        booted,
        state,
        pi,
        pi_primary,
        pi_method,
    })
}

fn check_manifest(run: &Running, m: &Manifest, opts: InstallOptions) -> Result<(), UpdateError> {
    let reject = |s: String| Err(UpdateError::Rejected(s));
    if m.board != run.facts.board {
        return reject(format!(
            "bundle is for board {}, this node is {}",
            m.board, run.facts.board
        ));
    }
    let current = &run.facts.os_version;
    if !version::compatible(current, &m.compatible_from) {
        return reject(format!(
            "bundle {} installs over {:?}, this node runs {current}",
            m.os_version, m.compatible_from
        ));
    }
    if !opts.allow_downgrade
        && version::compare(&m.os_version, current) != std::cmp::Ordering::Greater
    {
        return reject(format!(
            "bundle version {} is not newer than the running {current} (--allow-downgrade installs it anyway)",
            m.os_version
        ));
    }
    let want: &[PayloadPart] = if run.pi {
        &[
            PayloadPart::BootFatA,
            PayloadPart::BootFatB,
            PayloadPart::Root,
        ]
    } else {
        &[PayloadPart::Boot, PayloadPart::Root]
    };
    if m.payloads.len() != want.len()
        || want
            .iter()
            .any(|w| !m.payloads.iter().any(|p| p.part == *w))
    {
        let parts: Vec<PayloadPart> = m.payloads.iter().map(|p| p.part).collect();
        return reject(format!(
            "bundle payloads {parts:?} do not fit this node (it takes {want:?})"
        ));
    }
    if run.pi {
        // REFERENCE.md §1.4–1.6: the trial is the firmware's one-shot tryboot;
        // an update only goes into the slot autoboot.txt does not name.
        if run.pi_primary != Some(run.booted) {
            return reject(format!(
                "autoboot.txt names {:?} as primary, but slot {} is booted",
                run.pi_primary.map(Slot::name),
                run.booted.name()
            ));
        }
        if run.pi_method.is_none() {
            return reject(
                "this firmware publishes no tryboot_a_b capability and stage 1 ran no reboot-partition trial rules: no way to boot a trial".into(),
            );
        }
    }
    let target = run.booted.other();
    if run.state.slot(run.booted).state == SlotState::Trial {
        return reject(format!(
            "slot {} is on trial: wait for its health gate before another update",
            run.booted.name()
        ));
    }
    if run.state.primary() == Some(target) {
        return reject(format!(
            "the inactive slot {} is primary (after a rollback): reboot into it first",
            target.name()
        ));
    }
    Ok(())
}

/// Install the bundle read from `r`. Every error after the checks leaves
/// the target slot `empty` with the reason (see the module comment).
pub fn install(
    dev: &Device,
    r: &mut impl Read,
    opts: InstallOptions,
) -> Result<Installed, UpdateError> {
    let mut run = running(dev)?;
    let checked = Head::read(r)
        .map_err(UpdateError::from)
        .and_then(|head| Ok(head.verify(&dev.trusted_keys())?))
        .and_then(|m| check_manifest(&run, &m, opts).map(|()| m));
    let manifest = match checked {
        Ok(m) => m,
        Err(e) => {
            // Nothing was written but this record.
            run.state.last_update = LastUpdate {
                version: String::new(),
                result: "rejected".into(),
                reason: e.to_string(),
                slot: String::new(),
            };
            let _ = run.state.save(&dev.state_path);
            return Err(e);
        }
    };
    let target = run.booted.other();
    let (root_dev, root_len) = if run.pi {
        dev.numbered_partition(crate::rpi::root_partition(target))?
    } else {
        dev.root_device(target)?
    };
    if let Some(p) = manifest
        .payloads
        .iter()
        .find(|p| p.part == PayloadPart::Root)
        && p.size > root_len
    {
        return Err(UpdateError::Rejected(format!(
            "root payload of {} bytes does not fit {} ({root_len} bytes)",
            p.size,
            root_dev.display()
        )));
    }

    // Point of no return for the inactive slot: record it empty, remove its entries.
    let v = manifest.os_version.clone();
    *run.state.slot_mut(target) = super::state::SlotInfo {
        state: SlotState::Empty,
        version: String::new(),
        reason: format!("installing {v}"),
    };
    run.state.last_update = LastUpdate {
        version: v.clone(),
        result: "installing".into(),
        reason: String::new(),
        slot: target.name().into(),
    };
    run.state.save(&dev.state_path)?;
    dev.remove_entries(target, |_| true)?;
    if run.pi
        && let Ok(Some(m)) = crate::rpi::read_marker(&dev.boot_dir)
        && m.slot == target
    {
        // A marker left for the old content of the target (reboot-partition
        // boards): nothing may boot it as a trial any more.
        crate::rpi::remove_marker(&dev.boot_dir)
            .map_err(|e| UpdateError::Partition(e.to_string()))?;
    }
    sync();

    // State `trial` before the entry exists: a power cut in between leaves a
    // recorded trial without an entry, which the next boot records bad
    // (never an entry that boots a slot the state calls empty).
    let pi = run.pi;
    let written = if pi {
        write_slot_pi(dev, r, &manifest, target).map(|b| (b, None))
    } else {
        write_slot(dev, r, &manifest, target, &root_dev).map(|(b, e)| (b, Some(e)))
    }
    .and_then(|(bytes, entry)| {
        let s = run.state.slot_mut(target);
        s.state = SlotState::Trial;
        s.version = v.clone();
        s.reason = String::new();
        run.state.last_update.result = "installed".into();
        run.state.save(&dev.state_path)?;
        sync();
        if let Some(entry) = entry {
            dev.write_entry(&entry::trial_file_name(target), &entry)?;
            sync();
        }
        Ok(bytes)
    });
    match written {
        Ok(bytes) => Ok(Installed {
            slot: target,
            version: v,
            bytes,
        }),
        Err(e) => {
            let _ = dev.remove_entries(target, |_| true);
            run.state.slot_mut(target).state = SlotState::Empty;
            run.state.slot_mut(target).version = String::new();
            run.state.slot_mut(target).reason = format!("install of {v} failed: {e}");
            run.state.last_update.result = "failed".into();
            run.state.last_update.reason = e.to_string();
            let _ = run.state.save(&dev.state_path);
            sync();
            Err(e)
        }
    }
}

/// Stream the payloads into `target` and check the end; returns the bytes
/// written and the trial entry to write.
fn write_slot(
    dev: &Device,
    r: &mut impl Read,
    m: &Manifest,
    target: Slot,
    root_dev: &std::path::Path,
) -> Result<(u64, LoaderEntry), UpdateError> {
    let slot_dir = dev.boot_dir.join(target.name());
    std::fs::create_dir_all(&slot_dir).map_err(|source| UpdateError::Io {
        what: "creating the slot's boot directory",
        path: slot_dir.clone(),
        source,
    })?;
    let mut options = None;
    let mut bytes = 0;
    for p in &m.payloads {
        let mut pr = PayloadReader::new(r, p);
        match p.part {
            PayloadPart::Boot => {
                options = Some(boottar::unpack(&mut pr, &slot_dir).map_err(|e| match e {
                    boottar::BootTarError::Read(io) => UpdateError::Bundle(truncated(io)),
                    e => UpdateError::BootPayload(e),
                })?);
            }
            PayloadPart::Root => write_root(&mut pr, root_dev)?,
            // Refused by `check_manifest` (exactly boot + root): the
            // Raspberry Pi install path (tryboot) is not in this agent yet.
            PayloadPart::BootFatA | PayloadPart::BootFatB => {
                return Err(UpdateError::Rejected(
                    "Raspberry Pi boot FAT payloads are not installed by this agent yet".into(),
                ));
            }
        }
        pr.finish()?;
        bytes += p.size;
    }
    bundle::expect_end(r)?;
    let options = options.unwrap_or_default();
    let root = m.payloads.iter().find(|p| p.part == PayloadPart::Root);
    if let Some(hash) = root.and_then(|p| p.verity_root_hash.as_ref())
        && !options
            .split_whitespace()
            .any(|w| w == format!("{}={hash}", crate::slot::CMDLINE_VERITY))
    {
        return Err(UpdateError::Rejected(
            "the boot payload's options do not name the manifest's verity root hash".into(),
        ));
    }
    if options
        .split_whitespace()
        .any(|w| w.starts_with("basalt.slot="))
    {
        return Err(UpdateError::Rejected(
            "the boot payload's options name a slot".into(),
        ));
    }
    sync();
    // A trial kernel that panics must reboot (to the fallback) by itself.
    let options = if options.split_whitespace().any(|w| w.starts_with("panic=")) {
        options
    } else {
        format!("{options} {TRIAL_PANIC}")
    };
    let e = LoaderEntry {
        slot: target,
        os_version: m.os_version.clone(),
        options,
        rank: Rank::Trial,
    };
    Ok((bytes, e))
}

/// Raspberry Pi: the target's boot FAT and root, in `rpi::slot_write_order`'s
/// spirit: the boot partition's first sector is zeroed first (not a FAT: the
/// firmware cannot boot it), the FAT body and the root stream in bundle order,
/// and the first sector — held in memory — is written last, once every hash
/// matched. A boot FAT the firmware can read thus always sits over a complete
/// root. The other slot's boot FAT payload is only hashed.
fn write_slot_pi(
    dev: &Device,
    r: &mut impl Read,
    m: &Manifest,
    target: Slot,
) -> Result<u64, UpdateError> {
    use crate::rpi::{boot_partition, root_partition};
    use std::io::{Seek, SeekFrom};
    let (boot_dev, boot_len) = dev.numbered_partition(boot_partition(target))?;
    let (root_dev, _) = dev.numbered_partition(root_partition(target))?;
    let mine = match target {
        Slot::A => PayloadPart::BootFatA,
        Slot::B => PayloadPart::BootFatB,
    };
    if let Some(p) = m.payloads.iter().find(|p| p.part == mine)
        && (p.size > boot_len || p.size < SECTOR as u64)
    {
        return Err(UpdateError::Rejected(format!(
            "boot FAT payload of {} bytes does not fit {} ({boot_len} bytes)",
            p.size,
            boot_dev.display()
        )));
    }
    let io = |what: &'static str| {
        let path = boot_dev.clone();
        move |source| UpdateError::Io { what, path, source }
    };
    let mut boot = std::fs::OpenOptions::new()
        .write(true)
        .open(&boot_dev)
        .map_err(io("opening the inactive boot partition"))?;
    boot.write_all(&[0u8; SECTOR])
        .and_then(|()| boot.sync_all())
        .map_err(io("invalidating the inactive boot partition"))?;
    let mut first = [0u8; SECTOR];
    let mut bytes = 0;
    for p in &m.payloads {
        let mut pr = PayloadReader::new(r, p);
        match p.part {
            part if part == mine => {
                pr.read_exact(&mut first)
                    .map_err(|e| UpdateError::Bundle(truncated(e)))?;
                boot.seek(SeekFrom::Start(SECTOR as u64))
                    .map_err(io("seeking in the inactive boot partition"))?;
                copy_all(&mut pr, &mut boot, &boot_dev)?;
            }
            PayloadPart::BootFatA | PayloadPart::BootFatB => {}
            PayloadPart::Root => write_root(&mut pr, &root_dev)?,
            PayloadPart::Boot => {
                return Err(UpdateError::Rejected(
                    "a systemd-boot payload in a Raspberry Pi bundle".into(),
                ));
            }
        }
        pr.finish()?;
        bytes += p.size;
    }
    bundle::expect_end(r)?;
    boot.sync_all()
        .map_err(io("syncing the inactive boot partition"))?;
    boot.seek(SeekFrom::Start(0))
        .and_then(|_| boot.write_all(&first))
        .and_then(|()| boot.sync_all())
        .map_err(io("writing the inactive boot partition's first sector"))?;
    Ok(bytes)
}

const SECTOR: usize = 512;

fn copy_all(
    r: &mut impl Read,
    w: &mut std::fs::File,
    path: &std::path::Path,
) -> Result<(), UpdateError> {
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(UpdateError::Bundle(truncated(e))),
        };
        w.write_all(&buf[..n]).map_err(|source| UpdateError::Io {
            what: "writing the inactive boot partition",
            path: path.to_path_buf(),
            source,
        })?;
    }
}

fn truncated(e: std::io::Error) -> BundleError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        BundleError::Truncated("payloads")
    } else {
        BundleError::Io(e)
    }
}

/// Copy the root payload onto the partition, in `COPY_BUFFER` pieces.
fn write_root(r: &mut impl Read, dev_path: &std::path::Path) -> Result<(), UpdateError> {
    let io = |what: &'static str| {
        let path = dev_path.to_path_buf();
        move |source| UpdateError::Io { what, path, source }
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(dev_path)
        .map_err(io("opening the inactive root partition"))?;
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match r.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(UpdateError::Bundle(truncated(e))),
            }
        }
        if filled == 0 {
            break;
        }
        f.write_all(&buf[..filled])
            .map_err(io("writing the inactive root partition"))?;
    }
    f.sync_all()
        .map_err(io("syncing the inactive root partition"))?;
    Ok(())
}
