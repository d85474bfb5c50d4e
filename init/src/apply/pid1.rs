//! PID 1's side of the node config: start the init binary again as
//! `basalt-node-config` (a fresh process, so the parser's memory is never
//! PID 1's), wait for it with a timeout, and read what it left in
//! `/run/basalt/node-config.toml`. Nothing here parses the node config.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{CHILD_NAME, Results};

/// Long enough for module loading and a slow SD card, short enough that a
/// hung child cannot hold the boot.
pub const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Pid1Error {
    #[error("starting {program} as {CHILD_NAME}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{CHILD_NAME} did not finish within {0:?}; killed")]
    Timeout(Duration),
    #[error("waiting for {CHILD_NAME}: {0}")]
    Wait(std::io::Error),
    #[error("{CHILD_NAME} exited with {0}")]
    Failed(std::process::ExitStatus),
    #[error("reading {path}: {why}")]
    Results { path: String, why: String },
}

/// Run the child (`program`, normally `/proc/self/exe`) and read its results.
/// `Err` only when there are no results at all; a child that exited non-zero
/// after writing results (it used the last good config) is `Ok` with the
/// status in the results.
pub fn run(program: &Path, results: &Path, timeout: Duration) -> Result<Results, Pid1Error> {
    let _ = std::fs::remove_file(results);
    let mut cmd = Command::new(program);
    cmd.arg0(CHILD_NAME)
        .stdin(Stdio::null())
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    crate::sys::unblock_signals_in_child(&mut cmd);
    let mut child = cmd.spawn().map_err(|source| Pid1Error::Spawn {
        program: program.display().to_string(),
        source,
    })?;
    let end = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() >= end => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Pid1Error::Timeout(timeout));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(Pid1Error::Wait(e)),
        }
    };
    let read = std::fs::read_to_string(results)
        .map_err(|e| e.to_string())
        .and_then(|t| toml::from_str::<Results>(&t).map_err(|e| e.message().to_string()));
    match read {
        Ok(r) => Ok(r),
        Err(_) if !status.success() => Err(Pid1Error::Failed(status)),
        Err(why) => Err(Pid1Error::Results {
            path: results.display().to_string(),
            why,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_results_and_reports_failures() {
        let t = tempfile::tempdir().unwrap();
        let results = t.path().join("node-config.toml");
        let script = t.path().join("child.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nprintf 'status = \"applied\"\\nhostname = \"edge-1\"\\nerrors = 0\\n' > {}\n",
                results.display()
            ),
        )
        .unwrap();
        crate::apply::set_mode(&script, 0o755).unwrap();
        let r = run(&script, &results, Duration::from_secs(10)).unwrap();
        assert_eq!(r.status, "applied");
        assert_eq!(r.hostname.as_deref(), Some("edge-1"));

        std::fs::write(&script, "#!/bin/sh\nexit 3\n").unwrap();
        assert!(matches!(
            run(&script, &results, Duration::from_secs(10)),
            Err(Pid1Error::Failed(_))
        ));
        std::fs::write(&script, "#!/bin/sh\nsleep 5\n").unwrap();
        let t0 = Instant::now();
        assert!(matches!(
            run(&script, &results, Duration::from_millis(300)),
            Err(Pid1Error::Timeout(_))
        ));
        assert!(t0.elapsed() < Duration::from_secs(4));
    }
}
