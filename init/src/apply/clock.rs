//! `[time]` and the clock. Raspberry Pis have no battery-backed clock and
//! boot in 1970, where every TLS certificate is "not yet valid". So before
//! anything else the clock is set forward to the last time the node knew
//! (`/var/lib/basalt/clock`, saved by PID 1 periodically and at shutdown),
//! or at least to the image's build time (the mtime of
//! `/etc/basalt/image.toml`, `SOURCE_DATE_EPOCH`); never backward. NTP (busybox
//! `ntpd` as a generated service) corrects it once the network is up.
//! The time zone becomes `/etc/localtime` when the image carries zoneinfo,
//! else `TZ` in the services' environment.

use std::path::Path;

use super::services::{Generated, find_program};
use super::{ApplyError, Outcome, Root, System, write_atomic};
use crate::nodeconfig::NodeConfig;

/// The last known time, in seconds since the epoch (text).
pub const CLOCK_FILE: &str = "/var/lib/basalt/clock";
/// NTP servers when the config names none (`ntp_servers` unset).
pub const DEFAULT_NTP: &[&str] = &["0.pool.ntp.org", "1.pool.ntp.org", "2.pool.ntp.org"];

/// Record `now` as the last known time (new-then-rename: a power cut keeps
/// the old value or the new one).
pub fn save(clock_file: &Path, now: i64) -> Result<(), ApplyError> {
    write_atomic(clock_file, format!("{now}\n").as_bytes(), 0o644)
}

/// Save the realtime clock to [`CLOCK_FILE`] (PID 1: periodically and at shutdown).
pub fn save_now() -> Result<(), ApplyError> {
    save(Path::new(CLOCK_FILE), System::now(&super::KernelSystem))
}

/// The time to set the clock to at boot, if it is later than `now`.
pub fn restore_target(root: &Root, now: i64) -> Option<i64> {
    let saved = std::fs::read_to_string(root.at(CLOCK_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok());
    let built = std::fs::metadata(root.at(crate::slot::IMAGE_FACTS_PATH))
        .ok()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs() as i64);
    saved.into_iter().chain(built).max().filter(|&t| t > now)
}

pub fn restore_step(
    root: &Root,
    _cfg: &NodeConfig,
    sys: &mut dyn System,
    _out: &mut Outcome,
) -> Result<(), ApplyError> {
    let now = sys.now();
    if let Some(t) = restore_target(root, now) {
        sys.set_clock(t).map_err(|errno| ApplyError::Kernel {
            what: "setting the clock to the last known time",
            target: t.to_string(),
            errno,
        })?;
        crate::say!("clock restored from {now} to the last known time {t}");
    }
    Ok(())
}

pub fn time_step(
    root: &Root,
    cfg: &NodeConfig,
    _sys: &mut dyn System,
    out: &mut Outcome,
) -> Result<(), ApplyError> {
    if let Some(tz) = &cfg.time.timezone {
        let zone = format!("/usr/share/zoneinfo/{tz}");
        let localtime = root.at("/etc/localtime");
        if !tz.contains("..") && root.at(&zone).is_file() {
            let _ = std::fs::remove_file(&localtime);
            std::os::unix::fs::symlink(&zone, &localtime)
                .map_err(super::io_err("linking", &localtime))?;
        } else {
            // No zoneinfo in the image: programs that honour TZ get the name.
            out.tz = Some(tz.clone());
        }
        write_atomic(
            &root.at("/etc/timezone"),
            format!("{tz}\n").as_bytes(),
            0o644,
        )?;
    }
    let servers: Vec<String> = match &cfg.time.ntp_servers {
        Some(s) => s.clone(),
        None => DEFAULT_NTP.iter().map(|s| s.to_string()).collect(),
    };
    if servers.is_empty() {
        return Ok(());
    }
    // Only a real ntpd or a busybox link to one: not every busybox build
    // has the applet (Debian's does not).
    let Some(ntpd) = find_program(
        root,
        &["/usr/sbin/ntpd", "/sbin/ntpd", "/usr/bin/ntpd", "/bin/ntpd"],
    ) else {
        out.warn(format!(
            "time: no ntpd in the image (busybox ntpd); the clock is not synchronised with {}",
            servers.join(", ")
        ));
        return Ok(());
    };
    let mut exec = vec![ntpd];
    exec.push("-n".into());
    for s in &servers {
        exec.extend(["-p".to_string(), s.clone()]);
    }
    let g = Generated {
        exec,
        backoff: Some((5000, 300_000, 600)),
        ..Generated::default()
    };
    out.services.push(("ntpd".into(), g.render("NTP client")));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::system::fake::Recorder;

    #[test]
    fn restores_forward_only_from_saved_time_or_build_time() {
        let t = tempfile::tempdir().unwrap();
        let root = Root(t.path().to_path_buf());
        let facts = root.at(crate::slot::IMAGE_FACTS_PATH);
        std::fs::create_dir_all(facts.parent().unwrap()).unwrap();
        std::fs::write(&facts, "").unwrap();
        let f = std::fs::File::options().write(true).open(&facts).unwrap();
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_764_288_000))
            .unwrap();
        let mut out = Outcome::default();
        let cfg = NodeConfig::default();

        // First boot in 1970: the build time.
        let mut sys = Recorder {
            clock: 5,
            ..Recorder::default()
        };
        restore_step(&root, &cfg, &mut sys, &mut out).unwrap();
        assert_eq!(sys.calls, ["clock 1764288000"]);

        // Saved later than that: the saved time.
        save(&root.at(CLOCK_FILE), 1_800_000_000).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.at(CLOCK_FILE)).unwrap(),
            "1800000000\n"
        );
        let mut sys = Recorder {
            clock: 5,
            ..Recorder::default()
        };
        restore_step(&root, &cfg, &mut sys, &mut out).unwrap();
        assert_eq!(sys.calls, ["clock 1800000000"]);

        // A clock already later (an RTC, NTP before a reboot): untouched.
        let mut sys = Recorder {
            clock: 1_900_000_000,
            ..Recorder::default()
        };
        restore_step(&root, &cfg, &mut sys, &mut out).unwrap();
        assert!(sys.calls.is_empty());
    }

    #[test]
    fn timezone_and_ntp_service() {
        let t = tempfile::tempdir().unwrap();
        let root = Root(t.path().to_path_buf());
        std::fs::create_dir_all(root.at("/etc")).unwrap();
        std::fs::create_dir_all(root.at("/usr/share/zoneinfo/Europe")).unwrap();
        std::fs::write(root.at("/usr/share/zoneinfo/Europe/London"), "TZif").unwrap();
        let mut cfg = NodeConfig::default();
        cfg.time.ntp_servers = Some(vec!["10.0.0.1".into()]);
        let mut out = Outcome::default();
        time_step(&root, &cfg, &mut Recorder::default(), &mut out).unwrap();
        assert!(out.services.is_empty(), "no ntpd in the image");
        assert!(out.warnings[0].contains("no ntpd"), "{:?}", out.warnings);
        std::fs::create_dir_all(root.at("/usr/sbin")).unwrap();
        std::fs::write(root.at("/usr/sbin/ntpd"), "").unwrap();
        cfg.time.timezone = Some("Europe/London".into());
        cfg.time.ntp_servers = Some(vec!["10.0.0.1".into(), "time.example".into()]);
        let mut out = Outcome::default();
        time_step(&root, &cfg, &mut Recorder::default(), &mut out).unwrap();
        assert_eq!(
            std::fs::read_link(root.at("/etc/localtime")).unwrap(),
            Path::new("/usr/share/zoneinfo/Europe/London")
        );
        assert_eq!(out.tz, None);
        let d =
            crate::service::ServiceDef::parse("ntpd", &out.services[0].1, Path::new("x")).unwrap();
        assert_eq!(
            d.exec,
            [
                "/usr/sbin/ntpd",
                "-n",
                "-p",
                "10.0.0.1",
                "-p",
                "time.example"
            ]
        );

        // No zoneinfo: TZ; NTP off with an empty list; default pool when unset.
        cfg.time.timezone = Some("America/New_York".into());
        cfg.time.ntp_servers = Some(vec![]);
        let mut out = Outcome::default();
        time_step(&root, &cfg, &mut Recorder::default(), &mut out).unwrap();
        assert_eq!(out.tz.as_deref(), Some("America/New_York"));
        assert!(out.services.is_empty());
        cfg.time.ntp_servers = None;
        let mut out = Outcome::default();
        time_step(&root, &cfg, &mut Recorder::default(), &mut out).unwrap();
        assert!(out.services[0].1.contains("0.pool.ntp.org"));
    }
}
