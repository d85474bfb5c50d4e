//! `basaltctl update | rollback | gate`, and the slot part of `basaltctl
//! status`: the update agent's command line. Runs in the `basaltctl`
//! process, never in PID 1.

use std::io::{BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::UpdateError;
use super::device::Device;
use super::install::{self, InstallOptions};
use super::state::{SlotState, SlotsState};
use crate::report::{Json, json_str};
use crate::slot::Slot;

pub const USAGE: &str = "usage: basaltctl update [--no-reboot] [--allow-downgrade] [--wait] <https-url|file|->\n       basaltctl rollback";

/// `Some(exit code)` when `words` is an update command.
pub fn dispatch(words: &[&str]) -> Option<i32> {
    let code = match words.first() {
        Some(&"update") => update_cmd(&words[1..]),
        Some(&"rollback") if words.len() == 1 => rollback_cmd(),
        Some(&"gate") if words.len() == 1 => gate_cmd(),
        _ => return None,
    };
    Some(code)
}

#[derive(Debug, Default, PartialEq, Eq)]
struct UpdateArgs {
    source: String,
    no_reboot: bool,
    allow_downgrade: bool,
    wait: bool,
}

fn parse_update(args: &[&str]) -> Option<UpdateArgs> {
    let mut a = UpdateArgs::default();
    let mut source = None;
    for w in args {
        match *w {
            "--no-reboot" => a.no_reboot = true,
            "--allow-downgrade" => a.allow_downgrade = true,
            "--wait" => a.wait = true,
            s if source.is_none() && (s == "-" || !s.starts_with('-')) => source = Some(s),
            _ => return None,
        }
    }
    a.source = source?.to_string();
    Some(a)
}

/// The bundle stream: stdin, a file, or the stdout of `curl`/`wget`.
struct Source {
    reader: Box<dyn Read>,
    child: Option<Child>,
    url: String,
}

impl Source {
    fn open(spec: &str) -> Result<Source, UpdateError> {
        if spec == "-" {
            return Ok(Source {
                reader: Box::new(std::io::stdin()),
                child: None,
                url: spec.into(),
            });
        }
        if spec.starts_with("https://") || spec.starts_with("http://") {
            let curl = ["/usr/bin/curl", "/bin/curl"]
                .into_iter()
                .find(|p| std::path::Path::new(p).exists());
            let mut cmd = match curl {
                Some(c) => {
                    let mut c = Command::new(c);
                    c.args(["-fsSL", spec]);
                    c
                }
                None => {
                    let mut c = Command::new("wget");
                    c.args(["-q", "-O", "-", spec]);
                    c
                }
            };
            let mut child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| UpdateError::Fetch {
                    url: spec.into(),
                    message: format!("starting curl/wget: {e}"),
                })?;
            let Some(out) = child.stdout.take() else {
                return Err(UpdateError::Fetch {
                    url: spec.into(),
                    message: "no pipe from the downloader".into(),
                });
            };
            return Ok(Source {
                reader: Box::new(out),
                child: Some(child),
                url: spec.into(),
            });
        }
        let f = std::fs::File::open(spec).map_err(|source| UpdateError::Io {
            what: "opening the bundle",
            path: spec.into(),
            source,
        })?;
        Ok(Source {
            reader: Box::new(f),
            child: None,
            url: spec.into(),
        })
    }

    /// Reap the downloader after the stream was read to its verified end.
    /// Its exit status is only reported: every byte was already checked
    /// against the signed manifest, and the stream ended where it must.
    fn finish(&mut self) -> Result<(), UpdateError> {
        if let Some(mut c) = self.child.take()
            && let Ok(st) = c.wait()
            && !st.success()
        {
            eprintln!(
                "basaltctl: note: the downloader for {} exited {st} after a complete, verified bundle",
                self.url
            );
        }
        Ok(())
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How long `basaltctl update`/`rollback` wait while PID 1 holds the update
/// lock for the boot's bookkeeping (from just before the services start
/// until its after-first-start hook is done: milliseconds, more on a loaded
/// machine). Another update holding it is refused at once.
const BOOT_HOLD_WAIT: Duration = Duration::from_secs(10);

/// Hold the update lock for the life of the value. A service that runs
/// `basaltctl update` the moment it starts may find PID 1 still holding it
/// (`lock_for_boot`): that wait is short, so it waits.
pub(crate) fn lock(dev: &Device) -> Result<nix::fcntl::Flock<std::fs::File>, UpdateError> {
    lock_waiting_for(&dev.lock_path, 1, BOOT_HOLD_WAIT)
}

/// Take the update lock; while the process `boot_holder` holds it, wait
/// up to `wait` for it to be released.
pub(crate) fn lock_waiting_for(
    lock_path: &std::path::Path,
    boot_holder: u32,
    wait: Duration,
) -> Result<nix::fcntl::Flock<std::fs::File>, UpdateError> {
    if let Some(d) = lock_path.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path)
        .map_err(|source| UpdateError::Io {
            what: "opening the update lock",
            path: lock_path.to_path_buf(),
            source,
        })?;
    let until = std::time::Instant::now() + wait;
    loop {
        match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(held) => return Ok(held),
            Err((back, _)) => f = back,
        }
        // Past the wait (PID 1 never waits), whoever holds it: refused.
        let by_boot = || {
            std::fs::read_to_string("/proc/locks")
                .ok()
                .zip(f.metadata().ok())
                .is_some_and(|(text, meta)| {
                    use std::os::unix::fs::MetadataExt;
                    flock_holders(&text, meta.dev(), meta.ino()).contains(&boot_holder)
                })
        };
        if std::time::Instant::now() >= until || !by_boot() {
            return Err(UpdateError::Locked(lock_path.to_path_buf()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The processes holding a `flock` on the file (`dev`, `ino`), from the
/// text of `/proc/locks` (`1: FLOCK  ADVISORY  WRITE 1 00:19:4567 0 EOF`;
/// waiters, the `->` lines, hold nothing).
fn flock_holders(text: &str, dev: u64, ino: u64) -> Vec<u32> {
    let file = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(1) != Some(&"FLOCK") || f.get(5) != Some(&file.as_str()) {
                return None;
            }
            f.get(4)?.parse().ok()
        })
        .collect()
}

fn update_cmd(args: &[&str]) -> i32 {
    let Some(a) = parse_update(args) else {
        eprintln!("{USAGE}");
        return 2;
    };
    let dev = Device::system();
    match run_update(&dev, &a) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("basaltctl: update failed: {e}");
            1
        }
    }
}

fn run_update(dev: &Device, a: &UpdateArgs) -> Result<i32, UpdateError> {
    let _lock = lock(dev)?;
    let mut src = Source::open(&a.source)?;
    let opts = InstallOptions {
        allow_downgrade: a.allow_downgrade,
    };
    if a.wait {
        return wait_flow(dev, &mut src, a, opts);
    }
    let t0 = std::time::Instant::now();
    let mut r = BufReader::with_capacity(64 * 1024, &mut src.reader);
    let done = install::install(dev, &mut r, opts)?;
    drop(r);
    src.finish()?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "installed {} into slot {} ({} MiB in {secs:.1} s, {:.1} MiB/s, peak RSS {} KiB); trial boot {}",
        done.version,
        done.slot.name(),
        done.bytes >> 20,
        (done.bytes as f64 / 1048576.0) / secs.max(0.001),
        peak_rss_kib(),
        if a.no_reboot {
            "on the next reboot"
        } else {
            "now"
        }
    );
    if !a.no_reboot {
        start_trial(dev)?;
    } else if dev.is_pi() {
        match dev.pi_method() {
            Some(crate::rpi::BootMethod::RebootPartition) => println!(
                "start the trial with: basaltctl reboot partition {}",
                crate::rpi::boot_partition(done.slot)
            ),
            _ => println!("start the trial with: basaltctl reboot tryboot"),
        }
    }
    Ok(0)
}

/// Reboot into the trial: systemd-boot picks the counted entry by itself;
/// a Pi needs the firmware's one-shot tryboot flag, or on boards without
/// tryboot the trial marker on p1 and `reboot "<N>"`; the state notes that
/// the trial was started (a later boot of the other slot then means it failed).
pub fn start_trial(dev: &Device) -> Result<(), UpdateError> {
    if !dev.is_pi() {
        return request_reboot(dev);
    }
    let line = prepare_trial(dev)?;
    crate::control::call(&dev.control_socket, &line).map_err(|e| UpdateError::Io {
        what: "asking init to reboot into the trial",
        path: dev.control_socket.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(())
}

/// Raspberry Pi: everything before the trial's reboot; returns the control
/// request that reboots (`reboot tryboot` or `reboot partition <N>`).
/// `reboot-partition` boards: the state says the trial started, then the
/// marker `kind=trial slot=<target> attempts=0` is written on p1 (atomically,
/// `rpi::write_marker`), which stage 1 of the target's boot turns into its
/// one attempt.
pub fn prepare_trial(dev: &Device) -> Result<String, UpdateError> {
    use crate::rpi::{BootMethod, MarkerKind, TrialMarker};
    match dev.pi_method() {
        Some(BootMethod::RebootPartition) => {
            let st = SlotsState::load(&dev.state_path)?.unwrap_or_default();
            let Some(target) = st.trial() else {
                return Err(UpdateError::Rejected(
                    "no slot is on trial: nothing to reboot into".into(),
                ));
            };
            mark_trial_started(dev)?;
            let marker = TrialMarker {
                kind: MarkerKind::Trial,
                slot: target,
                attempts: 0,
            };
            crate::rpi::write_marker(&dev.boot_dir, &marker)
                .map_err(|e| UpdateError::Partition(e.to_string()))?;
            super::device::sync();
            Ok(format!(
                "reboot partition {}",
                crate::rpi::boot_partition(target)
            ))
        }
        _ => {
            mark_trial_started(dev)?;
            Ok("reboot tryboot".into())
        }
    }
}

/// `basaltctl reboot partition <n>` by hand: when `n` is the boot partition
/// of the slot on trial, prepare the trial (marker, state) first; any other
/// partition is a plain one-time boot and changes nothing here.
pub fn prepare_partition_trial(dev: &Device, n: u8) -> Result<(), UpdateError> {
    let trial = SlotsState::load(&dev.state_path)?.and_then(|s| s.trial());
    if trial.map(crate::rpi::boot_partition) == Some(n)
        && dev.pi_method() == Some(crate::rpi::BootMethod::RebootPartition)
    {
        prepare_trial(dev)?;
    }
    Ok(())
}

/// Record that the pending trial's reboot was asked for (no-op without a trial).
pub fn mark_trial_started(dev: &Device) -> Result<(), UpdateError> {
    let Some(mut st) = SlotsState::load(&dev.state_path)? else {
        return Ok(());
    };
    if st.trial().is_some() {
        st.last_update.result = super::gate::TRIAL_STARTED.into();
        st.save(&dev.state_path)?;
        super::device::sync();
    }
    Ok(())
}

/// `--wait`: the verdict of a trial comes after a reboot, which ends this
/// process. So: if this bundle's version is already booted, wait for its
/// gate and report; if it was rolled back, report that; otherwise install,
/// reboot and block until the shutdown ends us — the caller (a Job) runs
/// the same command again after the reboot and gets the verdict.
fn wait_flow(
    dev: &Device,
    src: &mut Source,
    a: &UpdateArgs,
    opts: InstallOptions,
) -> Result<i32, UpdateError> {
    let booted = dev.booted_slot()?;
    let mut r = BufReader::with_capacity(64 * 1024, &mut src.reader);
    let head = crate::bundle::Head::read(&mut r)?;
    let manifest = head.verify(&dev.trusted_keys())?;
    let v = manifest.os_version.clone();
    let running = crate::image::ImageFacts::load(&dev.image_facts)
        .map(|f| f.os_version)
        .unwrap_or_default();
    let st = SlotsState::load_or_fresh(&dev.state_path, booted, &running)?;
    if st.slot(booted).version == v {
        return Ok(wait_verdict(dev, booted, &v));
    }
    let other = booted.other();
    if st.slot(other).version == v && st.slot(other).state == SlotState::Trial {
        println!(
            "{v} is installed in slot {} and waits for its trial boot",
            other.name()
        );
        start_trial(dev)?;
        block_until_shutdown();
    }
    if st.last_update.version == v && st.last_update.result == "rolled-back" {
        println!("update to {v} was rolled back: {}", st.last_update.reason);
        return Ok(1);
    }
    drop(r);
    // Start again from the beginning: the head was consumed above. A file or
    // URL can be opened again; stdin cannot.
    if a.source == "-" {
        return Err(UpdateError::Rejected(
            "--wait needs a file or URL (it reads the head first, then the bundle again)".into(),
        ));
    }
    drop(std::mem::replace(src, Source::open(&a.source)?));
    let mut r = BufReader::with_capacity(64 * 1024, &mut src.reader);
    let done = install::install(dev, &mut r, opts)?;
    drop(r);
    src.finish()?;
    println!(
        "installed {} into slot {}; rebooting into its trial. Run this command again after the reboot for the verdict.",
        done.version,
        done.slot.name()
    );
    if a.no_reboot {
        return Ok(0);
    }
    start_trial(dev)?;
    block_until_shutdown();
}

/// This process's peak resident set (`VmHWM`), for the install report.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn block_until_shutdown() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Wait until the booted slot's trial has a verdict: 0 committed, 1 not.
fn wait_verdict(dev: &Device, booted: Slot, v: &str) -> i32 {
    loop {
        let st = SlotsState::load(&dev.state_path)
            .ok()
            .flatten()
            .unwrap_or_default();
        match st.slot(booted).state {
            SlotState::Good => {
                println!("{v} committed in slot {}", booted.name());
                return 0;
            }
            SlotState::Trial => std::thread::sleep(Duration::from_secs(2)),
            s => {
                println!(
                    "{v} in slot {} is {}: {}",
                    booted.name(),
                    s.name(),
                    st.slot(booted).reason
                );
                return 1;
            }
        }
    }
}

fn request_reboot(dev: &Device) -> Result<(), UpdateError> {
    crate::control::call(&dev.control_socket, "reboot").map_err(|e| UpdateError::Io {
        what: "asking init to reboot",
        path: dev.control_socket.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(())
}

fn rollback_cmd() -> i32 {
    let dev = Device::system();
    let r = lock(&dev).and_then(|_l| super::gate::rollback(&dev));
    match r {
        Ok(slot) => {
            println!(
                "slot {} is primary from the next boot (basaltctl reboot to switch now)",
                slot.name()
            );
            0
        }
        Err(e) => {
            eprintln!("basaltctl: rollback refused: {e}");
            1
        }
    }
}

/// The health gate service's body (`basaltctl gate`, trial boots only).
fn gate_cmd() -> i32 {
    let dev = Device::system();
    let booted = match dev.booted_slot() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("basaltctl: gate: {e}");
            return 1;
        }
    };
    let trial = SlotsState::load(&dev.state_path)
        .ok()
        .flatten()
        .and_then(|s| s.trial());
    if trial != Some(booted) {
        println!(
            "no trial pending on slot {}: nothing to gate",
            booted.name()
        );
        return 0;
    }
    let cfg = dev.config();
    let uptime = || crate::report::uptime_ms(std::path::Path::new("/proc")) / 1000;
    let say = |s: &str| crate::say!("{s}");
    match super::gate::run_gate(
        &dev,
        booted,
        &cfg.health_gate,
        &uptime,
        Duration::from_secs(2),
        &say,
    ) {
        Ok(true) => {
            crate::say!("update committed slot {}", booted.name());
            0
        }
        Ok(false) => {
            if let Err(e) = request_reboot(&dev) {
                crate::console::error("update-gate", e);
                return 1;
            }
            0
        }
        Err(e) => {
            crate::console::error("update-gate", e);
            1
        }
    }
}

fn slot_json(st: &SlotsState, s: Slot) -> Json {
    let i = st.slot(s);
    Json::Obj(vec![
        ("state", Json::str(i.state.name())),
        ("version", Json::str(&i.version)),
        ("reason", Json::str(&i.reason)),
    ])
}

/// The slot state for `basaltctl status`: from slots.toml, else what a fresh node knows.
pub fn current_state(dev: &Device) -> Option<(Slot, SlotsState)> {
    let booted = dev.booted_slot().ok()?;
    let version = crate::image::ImageFacts::load(&dev.image_facts)
        .map(|f| f.os_version)
        .unwrap_or_default();
    let st = SlotsState::load_or_fresh(&dev.state_path, booted, &version).ok()?;
    Some((booted, st))
}

/// `status --json`: PID 1's object plus `slots` and `last_update`.
pub fn augment_json(reply: &str, booted: Slot, st: &SlotsState) -> String {
    let body = reply.trim_end();
    let Some(open) = body.strip_suffix('}') else {
        return reply.to_string();
    };
    let slots = Json::Obj(vec![
        ("booted", Json::str(booted.name())),
        ("primary", Json::str(&st.primary)),
        ("a", slot_json(st, Slot::A)),
        ("b", slot_json(st, Slot::B)),
    ]);
    let lu = &st.last_update;
    let last = Json::Obj(vec![
        ("version", Json::str(&lu.version)),
        ("result", Json::str(&lu.result)),
        ("reason", Json::str(&lu.reason)),
        ("slot", Json::str(&lu.slot)),
    ]);
    let sep = if open.trim_end().ends_with('{') {
        ""
    } else {
        ","
    };
    format!(
        "{open}{sep}{}:{slots},{}:{last}}}\n",
        json_str("slots"),
        json_str("last_update")
    )
}

/// `status`: the slot lines after PID 1's text.
pub fn augment_text(booted: Slot, st: &SlotsState) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<6} {:<7} {:<8} {:<16} REASON",
        "SLOT", "STATE", "", "VERSION"
    );
    for slot in [Slot::A, Slot::B] {
        let i = st.slot(slot);
        let mut marks = Vec::new();
        if st.primary() == Some(slot) {
            marks.push("primary");
        }
        if slot == booted {
            marks.push("booted");
        }
        let _ = writeln!(
            s,
            "{:<6} {:<7} {:<8} {:<16} {}",
            slot.name(),
            i.state.name(),
            marks.join(","),
            if i.version.is_empty() {
                "-"
            } else {
                &i.version
            },
            i.reason
        );
    }
    let lu = &st.last_update;
    if !lu.result.is_empty() {
        let _ = writeln!(
            s,
            "last update: {} {}{}",
            if lu.version.is_empty() {
                "-"
            } else {
                &lu.version
            },
            lu.result,
            if lu.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", lu.reason)
            }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_locks_holders() {
        let text = "1: POSIX  ADVISORY  WRITE 77 00:19:4567 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 1 00:19:4567 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 300 00:19:4567 0 EOF\n\
                    3: FLOCK  ADVISORY  WRITE 5 fd:01:4567 0 EOF\n\
                    4: FLOCK  ADVISORY  WRITE 6 00:19:45678 0 EOF\n";
        let dev = libc::makedev(0, 0x19);
        assert_eq!(flock_holders(text, dev, 4567), [1]);
        assert_eq!(flock_holders(text, libc::makedev(0xfd, 1), 4567), [5]);
        assert!(flock_holders(text, dev, 1).is_empty());
    }

    /// The lock as the update agent takes it, with real `flock`s and the
    /// real `/proc/locks`: a holder that is the boot's (PID 1 on a node,
    /// this test process here) is waited for; any other is refused at once.
    #[test]
    fn the_boot_holder_is_waited_for_and_no_one_else() {
        let tmp = tempfile::tempdir().unwrap();
        let mut dev = Device::system();
        dev.lock_path = tmp.path().join("run/update.lock");
        let me = std::process::id();
        let held = lock_waiting_for(&dev.lock_path, me, Duration::ZERO).unwrap();
        // Held by us, and we are not the boot holder: refused at once.
        let t = std::time::Instant::now();
        assert!(matches!(
            lock_waiting_for(&dev.lock_path, me.wrapping_add(1), Duration::from_secs(5)),
            Err(UpdateError::Locked(_))
        ));
        assert!(t.elapsed() < Duration::from_secs(2));
        // Held by the boot holder: waited for until it lets go.
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        let t = std::time::Instant::now();
        let again = lock_waiting_for(&dev.lock_path, me, Duration::from_secs(10)).unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );
        release.join().unwrap();
        // ... but not forever.
        let t = std::time::Instant::now();
        assert!(matches!(
            lock_waiting_for(&dev.lock_path, me, Duration::from_millis(200)),
            Err(UpdateError::Locked(_))
        ));
        assert!(t.elapsed() >= Duration::from_millis(200));
        drop(again);
    }

    #[test]
    fn update_arguments() {
        let a = parse_update(&["--no-reboot", "/var/b.bundle"]).unwrap();
        assert!(a.no_reboot && !a.wait && a.source == "/var/b.bundle");
        assert_eq!(parse_update(&["-"]).unwrap().source, "-");
        assert!(parse_update(&[]).is_none());
        assert!(parse_update(&["a", "b"]).is_none());
        assert!(parse_update(&["--bogus", "a"]).is_none());
        let a = parse_update(&["--wait", "--allow-downgrade", "https://x/b"]).unwrap();
        assert!(a.wait && a.allow_downgrade);
    }

    #[test]
    fn status_json_is_extended() {
        let mut st = SlotsState::fresh(Slot::A, "0.1.0");
        st.b.state = SlotState::Bad;
        st.b.reason = "gate \"timed out\"".into();
        let out = augment_json("{\"slot\": \"a\", \"ready\": true}\n", Slot::A, &st);
        assert!(
            out.starts_with("{\"slot\": \"a\", \"ready\": true,\"slots\":"),
            "{out}"
        );
        assert!(out.contains("\"b\":{\"state\":\"bad\""), "{out}");
        assert!(out.contains("\\\"timed out\\\""), "{out}");
        assert!(out.ends_with("}\n"));
        let text = augment_text(Slot::A, &st);
        assert!(text.contains("primary,booted"), "{text}");
    }
}
