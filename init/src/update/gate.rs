//! After an install: the trial boot's health gate, commit, rollback, and
//! the check every boot makes of what the last boot left behind.
//!
//! The gate runs in a helper process (`basaltctl gate`, a service stage 2
//! adds on a trial boot), never in PID 1: it waits on programs and sockets.
//!
//! Commit write order (each step leaves a bootable ESP, see docs/updates.md):
//! 1. slots.toml: trial slot `good`, primary — the intent, on ext4 (atomic rename);
//! 2. `basalt-<new>.conf`, uncounted, rank primary (new file, then rename);
//! 3. remove the counted `basalt-<new>+0-1.conf`;
//! 4. `basalt-<old>.conf` rewritten with rank fallback.
//!
//! A power cut after 1 boots either slot (both good); the next stage 2 sees
//! the intent and finishes 2–4 (`reconcile`).
//!
//! Raspberry Pi: step 2 is `autoboot.txt` naming the slot; on
//! `reboot-partition` boards the trial marker on p1 is removed after it
//! (`rpi::commit_reboot_partition`). A failed gate records the slot bad and
//! reboots plainly: the firmware boots the primary from `autoboot.txt` and
//! stage 1 finds the marker of a returned trial and removes it.

use std::time::Duration;

use super::UpdateError;
use super::device::{Device, HealthGate, sync};
use super::entry::{self, LoaderEntry, Rank};
use super::state::{SlotState, SlotsState};
use crate::slot::Slot;

/// What a boot found, for stage 2's console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootCheck {
    /// This boot is the trial of `slot`: run the gate.
    Trial {
        slot: Slot,
        version: String,
    },
    /// The last trial never reached a verdict; recorded bad.
    TrialFailed {
        slot: Slot,
        reason: String,
    },
    Normal,
}

/// Reason recorded when a trial boot did not come up to its gate's verdict.
pub const DID_NOT_COME_UP: &str =
    "trial boot did not come up (no health gate verdict before the next boot)";
/// `last_update.result` once the trial reboot was asked for (Raspberry Pi:
/// the firmware's one-shot tryboot; a later boot of the other slot means the trial failed).
pub const TRIAL_STARTED: &str = "trial-started";
/// Reason recorded for an install cut short (power cut, crash, kill).
pub const INTERRUPTED: &str = "install interrupted (power cut or crash) before it finished";

/// Stage 2, every boot: compare slots.toml with the booted slot and the
/// loader entries; record a trial that fell back as bad; finish a commit or
/// rollback a power cut interrupted.
pub fn boot_check(
    dev: &Device,
    booted: Slot,
    running_version: &str,
) -> Result<BootCheck, UpdateError> {
    let existing = match SlotsState::load(&dev.state_path) {
        Ok(s) => s,
        // A state file that does not parse is kept aside for a person to
        // read; the node goes on from what it knows (the booted slot is good).
        Err(super::state::StateError::Parse { path, message }) => {
            let aside = path.with_extension("toml.corrupt");
            let _ = std::fs::rename(&path, &aside);
            crate::console::error(
                "update",
                format_args!(
                    "{} ({message}): moved to {}",
                    path.display(),
                    aside.display()
                ),
            );
            None
        }
        Err(e) => return Err(e.into()),
    };
    let mut st = existing
        .clone()
        .unwrap_or_else(|| SlotsState::fresh(booted, running_version));
    let mut result = BootCheck::Normal;
    if let Some(t) = st.trial() {
        if t == booted {
            result = BootCheck::Trial {
                slot: t,
                version: st.slot(t).version.clone(),
            };
        } else {
            // Booted the other slot while a trial was pending: the trial
            // entry ran out of tries (a panic, a hang and the watchdog, a
            // power cut before the verdict) or vanished. On a Pi the
            // firmware's tryboot is one-shot: once the trial reboot was
            // asked for, any boot of the other slot means it failed.
            let counted = dev.entries_of(t);
            let failed = if dev.is_pi() {
                st.last_update.result == TRIAL_STARTED
            } else {
                counted.iter().all(|f| f.exhausted())
            };
            if failed {
                // No entry at all: the install was cut between recording the
                // trial and writing its entry; the slot never booted.
                let reason = if counted.is_empty() && !dev.is_pi() {
                    INTERRUPTED
                } else {
                    DID_NOT_COME_UP
                };
                st.slot_mut(t).state = SlotState::Bad;
                st.slot_mut(t).reason = reason.into();
                st.last_update.result = "rolled-back".into();
                st.last_update.reason = reason.into();
                st.save(&dev.state_path)?;
                dev.remove_entries(t, |_| true)?;
                sync();
                result = BootCheck::TrialFailed {
                    slot: t,
                    reason: reason.into(),
                };
            }
        }
    }
    // An install that was running when the node went down: nothing runs
    // at boot, so "installing" is stale. The slot is already recorded empty.
    if st.last_update.result == "installing" {
        st.last_update.result = "failed".into();
        st.last_update.reason = INTERRUPTED.into();
        let slot = Slot::parse(&st.last_update.slot);
        if let Some(s) = slot
            && st.slot(s).state == SlotState::Empty
        {
            st.slot_mut(s).reason = INTERRUPTED.into();
        }
        st.save(&dev.state_path)?;
    }
    if st.trial().is_none() {
        reconcile(dev, &st)?;
    }
    if existing.is_none() {
        st.save(&dev.state_path)?;
    }
    Ok(result)
}

/// Make the entries match the state: primary uncounted with rank primary,
/// the other slot's uncounted entry with rank fallback if it is good, no
/// entries for a slot that is not good, no counted entries. Only files that
/// differ are written.
pub fn reconcile(dev: &Device, st: &SlotsState) -> Result<(), UpdateError> {
    let Some(primary) = st.primary() else {
        return Ok(());
    };
    if dev.is_pi() {
        // autoboot.txt names the primary (written new-then-rename, rpi.rs).
        let on_disk = crate::rpi::read_autoboot(&dev.boot_dir)
            .ok()
            .map(|a| a.primary);
        if on_disk != Some(primary) && st.slot(primary).state == SlotState::Good {
            crate::rpi::write_autoboot(&dev.boot_dir, crate::rpi::Autoboot { primary })
                .map_err(|e| UpdateError::Partition(e.to_string()))?;
            sync();
        }
        return Ok(());
    }
    // Primary first: from its counted entry if the commit stopped before step 2.
    let mut changed = 0;
    if dev.entries_of(primary).iter().all(|f| f.counter.is_some())
        && let Some(e) = dev.read_entry(primary)
    {
        dev.write_entry(
            &entry::file_name(primary),
            &LoaderEntry {
                rank: Rank::Primary,
                ..e
            },
        )?;
        changed += 1;
    }
    if dev.read_entry(primary).is_some() {
        changed += usize::from(dev.set_rank(primary, Rank::Primary)?);
        changed += dev.remove_entries(primary, |f| f.counter.is_some())?;
    }
    let other = primary.other();
    match st.slot(other).state {
        SlotState::Good => {
            if dev.read_entry(other).is_some() {
                changed += usize::from(dev.set_rank(other, Rank::Fallback)?);
                changed += dev.remove_entries(other, |f| f.counter.is_some())?;
            }
        }
        SlotState::Trial => {}
        SlotState::Bad | SlotState::Empty => changed += dev.remove_entries(other, |_| true)?,
    }
    // Every boot comes here: a `sync` of every filesystem only when an entry
    // changed (a full sync costs tens of ms of the boot on an SD card).
    if changed > 0 {
        sync();
    }
    Ok(())
}

/// The gate passed on the trial of `slot`: commit (order in the module comment).
pub fn commit(dev: &Device, slot: Slot) -> Result<(), UpdateError> {
    let mut st = SlotsState::load(&dev.state_path)?.unwrap_or_default();
    let old = st.primary();
    st.slot_mut(slot).state = SlotState::Good;
    st.slot_mut(slot).reason = String::new();
    st.primary = slot.name().to_string();
    st.last_update.result = "committed".into();
    st.last_update.reason = String::new();
    st.save(&dev.state_path)?;
    sync();
    if dev.is_pi() && dev.pi_method() == Some(crate::rpi::BootMethod::RebootPartition) {
        // autoboot.txt names the slot, then the trial marker goes (a cut
        // between the two leaves a marker for the primary: stale, stage 1
        // removes it).
        // A commit cut after autoboot.txt (stage 1 then dropped the stale
        // marker) runs again with autoboot.txt already naming the slot.
        let named = crate::rpi::read_autoboot(&dev.boot_dir)
            .ok()
            .map(|a| a.primary);
        if named == Some(slot) {
            crate::rpi::remove_marker(&dev.boot_dir)
        } else {
            crate::rpi::commit_reboot_partition(&dev.boot_dir, slot).map(|_| ())
        }
        .map_err(|e| UpdateError::Partition(e.to_string()))?;
        sync();
    }
    reconcile(dev, &st)?;
    if let Some(o) = old
        && o != slot
        && st.slot(o).state != SlotState::Good
    {
        dev.remove_entries(o, |_| true)?;
    }
    Ok(())
}

/// The gate failed on the trial of `slot`: record it bad and remove its
/// entries, so the next boot (which the caller asks for) takes the primary.
pub fn fail(dev: &Device, slot: Slot, reason: &str) -> Result<(), UpdateError> {
    let mut st = SlotsState::load(&dev.state_path)?.unwrap_or_default();
    st.slot_mut(slot).state = SlotState::Bad;
    st.slot_mut(slot).reason = reason.to_string();
    st.last_update.result = "rolled-back".into();
    st.last_update.reason = reason.to_string();
    st.save(&dev.state_path)?;
    dev.remove_entries(slot, |_| true)?;
    sync();
    Ok(())
}

/// `basaltctl rollback`: make the other slot primary, if it is good.
pub fn rollback(dev: &Device) -> Result<Slot, UpdateError> {
    let booted = dev.booted_slot()?;
    let mut st = SlotsState::load(&dev.state_path)?.ok_or_else(|| {
        UpdateError::Rejected("no slot state yet: nothing to roll back to".into())
    })?;
    let current = st.primary().unwrap_or(booted);
    let other = current.other();
    if st.slot(other).state != SlotState::Good {
        return Err(UpdateError::Rejected(format!(
            "slot {} is {} ({}): only a good slot can become primary",
            other.name(),
            st.slot(other).state.name(),
            st.slot(other).reason
        )));
    }
    if !dev.is_pi() && dev.read_entry(other).is_none() {
        return Err(UpdateError::Rejected(format!(
            "slot {} has no loader entry",
            other.name()
        )));
    }
    st.primary = other.name().to_string();
    st.save(&dev.state_path)?;
    sync();
    reconcile(dev, &st)?;
    Ok(other)
}

/// One check of the gate: `Ok` passed, `Err(detail)` not (yet).
pub type CheckResult = Result<(), String>;

/// Run the named checks once.
pub fn run_checks(gate: &HealthGate, dev: &Device) -> Vec<(String, CheckResult)> {
    gate.checks
        .iter()
        .map(|c| (c.clone(), run_check(c, dev)))
        .collect()
}

fn run_check(name: &str, dev: &Device) -> CheckResult {
    match name {
        "kubernetes" => kubernetes_ready(dev),
        "network" => default_route(std::path::Path::new("/proc/net/route")),
        "time" => clock_after(std::path::Path::new("/etc/os-release")),
        path if path.starts_with('/') => program(path),
        other => Err(format!("unknown check {other:?}")),
    }
}

/// The Kubernetes service is ready by PID 1's own readiness check (the
/// distribution's `kubectl get --raw=/readyz`), asked over the control socket.
fn kubernetes_ready(dev: &Device) -> CheckResult {
    let reply =
        crate::control::call(&dev.control_socket, "status --json").map_err(|e| e.to_string())?;
    let flat: String = reply.chars().filter(|c| !c.is_whitespace()).collect();
    let k = format!("\"name\":\"{}\"", crate::service::KUBERNETES_SERVICE);
    let Some(at) = flat.find(&k) else {
        // An image built without Kubernetes has nothing to wait for.
        let facts = crate::image::ImageFacts::load(&dev.image_facts).map_err(|e| e.to_string())?;
        return match facts.kubernetes {
            None => Ok(()),
            Some(_) => Err("no kubernetes service".into()),
        };
    };
    let rest = &flat[at..];
    let obj = &rest[..rest.find('}').unwrap_or(rest.len())];
    if obj.contains("\"state\":\"ready\"") {
        Ok(())
    } else {
        Err(format!("kubernetes not ready ({obj})"))
    }
}

/// A default route exists (`/proc/net/route` destination 00000000).
pub fn default_route(route: &std::path::Path) -> CheckResult {
    let text = std::fs::read_to_string(route).map_err(|e| format!("{}: {e}", route.display()))?;
    if text
        .lines()
        .skip(1)
        .any(|l| l.split_whitespace().nth(1) == Some("00000000"))
    {
        Ok(())
    } else {
        Err("no default route".into())
    }
}

/// The clock is past the image's build time (the builder sets every mtime
/// to SOURCE_DATE_EPOCH): a Pi without RTC that never got NTP fails this.
fn clock_after(reference: &std::path::Path) -> CheckResult {
    let built = std::fs::metadata(reference)
        .and_then(|m| m.modified())
        .map_err(|e| format!("{}: {e}", reference.display()))?;
    if std::time::SystemTime::now() > built {
        Ok(())
    } else {
        Err("clock is before the image's build time (not synchronised)".into())
    }
}

fn program(path: &str) -> CheckResult {
    let mut child = std::process::Command::new(path)
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("{path}: {e}"))?;
    let end = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => return Err(format!("{path} exited {st}")),
            Ok(None) if std::time::Instant::now() > end => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{path} ran longer than 60 s"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => return Err(format!("{path}: {e}")),
        }
    }
}

/// The gate loop: checks every `interval` until all pass (commit) or the
/// deadline passes (fail with the failing checks as the reason). `uptime`
/// gives seconds since boot: the timeout counts from the kernel's start, so
/// a restarted gate keeps its deadline. Returns whether the slot committed.
pub fn run_gate(
    dev: &Device,
    slot: Slot,
    gate: &HealthGate,
    uptime: &dyn Fn() -> u64,
    interval: Duration,
    say: &dyn Fn(&str),
) -> Result<bool, UpdateError> {
    let mut last_shown = String::new();
    loop {
        let results = run_checks(gate, dev);
        let failing: Vec<String> = results
            .iter()
            .filter_map(|(n, r)| r.as_ref().err().map(|d| format!("{n}: {d}")))
            .collect();
        if failing.is_empty() {
            commit(dev, slot)?;
            return Ok(true);
        }
        let now = uptime();
        if now >= gate.timeout_seconds {
            let reason = format!(
                "health gate not passed within {} s of boot: {}",
                gate.timeout_seconds,
                failing.join("; ")
            );
            fail(dev, slot, &reason)?;
            say(&format!(
                "update rolled back slot {}: {reason}",
                slot.name()
            ));
            return Ok(false);
        }
        let shown = failing.join("; ");
        if shown != last_shown {
            say(&format!("update health gate waiting: {shown}"));
            last_shown = shown;
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route_from_proc_format() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("route");
        std::fs::write(&p, "Iface\tDestination\tGateway\nlo\t0000007F\t00000000\n").unwrap();
        assert!(default_route(&p).is_err());
        std::fs::write(
            &p,
            "Iface\tDestination\tGateway\neth0\t00000000\t0202000A\n",
        )
        .unwrap();
        assert!(default_route(&p).is_ok());
    }
}
