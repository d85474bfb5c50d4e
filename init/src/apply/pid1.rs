//! PID 1's side of the node config: start the init binary again as
//! `basalt-node-config` (a fresh process, so the parser's memory is never
//! PID 1's), relay its output (console lines, config errors) to the console
//! and the log ring, wait for it with a timeout, and read what it left in
//! `/run/basalt/node-config.toml`. Nothing here parses the node config.

use std::os::unix::fs::OpenOptionsExt;
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

/// The most of the child's output kept for relaying (a config with 100
/// errors writes about 10 KiB).
pub const MAX_OUTPUT: usize = 64 * 1024;

/// What the child wrote (stdout and stderr, into a file next to the results
/// on `/run`), kept for [`relay`] until PID 1 has turned fault-around off and
/// dropped its code pages: handling it while the child runs would map
/// neighbouring pages of the binary into PID 1 for good. A file, not a pipe:
/// PID 1's wait loop stays a sleep, and the child never blocks on it.
#[derive(Debug, Default)]
pub struct Output {
    bytes: Vec<u8>,
    dropped: usize,
}

impl Output {
    /// The first [`MAX_OUTPUT`] bytes of `path`, which is then removed.
    fn take(path: &Path) -> Output {
        use std::io::Read;
        let mut out = Output::default();
        if let Ok(f) = std::fs::File::open(path) {
            let len = f.metadata().map_or(0, |m| m.len());
            let _ = f.take(MAX_OUTPUT as u64).read_to_end(&mut out.bytes);
            out.dropped = usize::try_from(len)
                .unwrap_or(usize::MAX)
                .saturating_sub(out.bytes.len());
        }
        let _ = std::fs::remove_file(path);
        out
    }

    /// The lines, a last one without newline included.
    pub fn lines(&self) -> Vec<String> {
        let mut pending = Vec::new();
        let mut lines = crate::logs::split_lines(&mut pending, &self.bytes);
        if !pending.is_empty() {
            lines.push(String::from_utf8_lossy(&pending).into_owned());
        }
        lines
    }
}

/// The child's output to the console and the log ring: its `basalt: <msg>`
/// lines are init's own (the same binary), anything else is recorded under
/// the child's name.
pub fn relay(output: &Output) {
    for line in output.lines() {
        match line.strip_prefix("basalt: ") {
            Some(body) => crate::say!("{body}"),
            None => {
                if crate::logs::record(CHILD_NAME, &line) {
                    crate::console::raw_line(&line);
                }
            }
        }
    }
    if output.dropped > 0 {
        crate::console::error(
            "node-config",
            format_args!(
                "{CHILD_NAME} wrote {} more bytes than the {MAX_OUTPUT} kept",
                output.dropped
            ),
        );
    }
}

/// Run the child (`program`, normally `/proc/self/exe`) and read its results.
/// `Err` only when there are no results at all; a child that exited non-zero
/// after writing results (it used the last good config) is `Ok` with the
/// status in the results. What it writes is kept in `output` (for [`relay`]);
/// when the file for it cannot be made, it writes to PID 1's console directly.
pub fn run(
    program: &Path,
    results: &Path,
    timeout: Duration,
    output: &mut Output,
) -> Result<Results, Pid1Error> {
    start(program, results).finish(timeout, output)
}

/// The child, started by [`start`]: stage 2 starts it first and goes on
/// with its own phases while it runs, then [`Started::finish`]es it.
#[derive(Debug)]
pub struct Started {
    program: String,
    child: Result<std::process::Child, std::io::Error>,
    results: std::path::PathBuf,
    /// Where its output goes, when that file could be made.
    out_path: Option<std::path::PathBuf>,
    at: Instant,
}

/// Start the child; see [`run`].
pub fn start(program: &Path, results: &Path) -> Started {
    let _ = std::fs::remove_file(results);
    let mut cmd = Command::new(program);
    cmd.arg0(CHILD_NAME)
        .stdin(Stdio::null())
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    let out_path = results.with_extension("out");
    let out_file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&out_path);
    let captured = match out_file.and_then(|f| Ok((f.try_clone()?, f))) {
        Ok((a, b)) => {
            // One open file for both: lines stay in the order written.
            cmd.stdout(Stdio::from(a)).stderr(Stdio::from(b));
            true
        }
        Err(_) => false,
    };
    crate::sys::unblock_signals_in_child(&mut cmd);
    let child = cmd.spawn();
    Started {
        program: program.display().to_string(),
        child,
        results: results.to_path_buf(),
        out_path: captured.then_some(out_path),
        at: Instant::now(),
    }
}

impl Started {
    /// Wait for the child, at most `timeout` from its start (then it is
    /// killed), and read its results; see [`run`].
    pub fn finish(self, timeout: Duration, output: &mut Output) -> Result<Results, Pid1Error> {
        let collect = |output: &mut Output| {
            if let Some(p) = &self.out_path {
                *output = Output::take(p);
            }
        };
        let mut child = match self.child {
            Ok(c) => c,
            Err(source) => {
                collect(output);
                return Err(Pid1Error::Spawn {
                    program: self.program,
                    source,
                });
            }
        };
        let end = self.at + timeout;
        // Woken the moment the child exits (a pidfd), not on a polling tick:
        // the boot waits on this. Kernels before 5.3: poll every 20 ms.
        let exited = crate::sys::pidfd_open(child.id());
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() >= end => {
                    let _ = child.kill();
                    let _ = child.wait();
                    collect(output);
                    return Err(Pid1Error::Timeout(timeout));
                }
                Ok(None) => match &exited {
                    Ok(fd) => {
                        use std::os::fd::AsFd;
                        let left = end.saturating_duration_since(Instant::now()).as_millis();
                        let ms = u32::try_from(left).unwrap_or(u32::MAX).max(1);
                        if crate::sys::poll_readable(&[fd.as_fd()], Some(ms)).is_err() {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                },
                Err(e) => {
                    collect(output);
                    return Err(Pid1Error::Wait(e));
                }
            }
        };
        collect(output);
        let read = std::fs::read_to_string(&self.results)
            .map_err(|e| e.to_string())
            .and_then(|t| {
                crate::tomlfast::from_str::<Results>(&t).map_err(|e| e.message().to_string())
            });
        match read {
            Ok(r) => Ok(r),
            Err(_) if !status.success() => Err(Pid1Error::Failed(status)),
            Err(why) => Err(Pid1Error::Results {
                path: self.results.display().to_string(),
                why,
            }),
        }
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
        let r = run(
            &script,
            &results,
            Duration::from_secs(10),
            &mut Output::default(),
        )
        .unwrap();
        assert_eq!(r.status, "applied");
        assert_eq!(r.hostname.as_deref(), Some("edge-1"));

        // Its output, stdout and stderr, line by line (a last line without
        // newline included).
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho 'basalt: error config x:1:1: bad'\necho oops >&2\nprintf 'status = \"failed\"\\nerrors = 1\\n' > {}\nprintf tail\n",
                results.display()
            ),
        )
        .unwrap();
        let mut out = Output::default();
        let r = run(&script, &results, Duration::from_secs(10), &mut out).unwrap();
        assert_eq!(r.status, "failed");
        assert_eq!(
            out.lines(),
            ["basalt: error config x:1:1: bad", "oops", "tail"]
        );
        assert_eq!(out.dropped, 0);
        // More than is kept: the first MAX_OUTPUT bytes, the rest counted;
        // the file is gone afterwards.
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\ni=0; while [ $i -lt 3000 ]; do echo \"filler $i ................................\"; i=$((i+1)); done\nprintf 'status = \"applied\"\\n' > {}\n",
                results.display()
            ),
        )
        .unwrap();
        let mut out = Output::default();
        let r = run(&script, &results, Duration::from_secs(10), &mut out).unwrap();
        assert_eq!(r.status, "applied");
        let lines = out.lines();
        assert_eq!(lines[1], format!("filler 1 {}", ".".repeat(32)));
        assert_eq!(out.bytes.len(), MAX_OUTPUT);
        assert!(out.dropped > 60_000, "{}", out.dropped);
        assert!(!results.with_extension("out").exists());

        std::fs::write(&script, "#!/bin/sh\nexit 3\n").unwrap();
        assert!(matches!(
            run(
                &script,
                &results,
                Duration::from_secs(10),
                &mut Output::default()
            ),
            Err(Pid1Error::Failed(_))
        ));
        std::fs::write(&script, "#!/bin/sh\nsleep 5\n").unwrap();
        let t0 = Instant::now();
        assert!(matches!(
            run(
                &script,
                &results,
                Duration::from_millis(300),
                &mut Output::default()
            ),
            Err(Pid1Error::Timeout(_))
        ));
        assert!(t0.elapsed() < Duration::from_secs(4));
    }
}
