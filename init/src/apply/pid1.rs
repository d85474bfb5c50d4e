//! PID 1's side of the node config: fork a `basalt-node-config` child (its
//! own process, so the parser's memory is never PID 1's), relay its output
//! (console lines, config errors) to the console and the log ring, wait for
//! it with a timeout, and read what it left in
//! `/run/basalt/node-config.toml`. Nothing here parses the node config.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{CHILD_NAME, Results};

/// Long enough for module loading and a slow SD card, short enough that a
/// hung child cannot hold the boot.
pub const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Pid1Error {
    #[error("starting {CHILD_NAME} (fork): {0}")]
    Spawn(std::io::Error),
    #[error("{CHILD_NAME} did not finish within {0:?}; killed")]
    Timeout(Duration),
    #[error("waiting for {CHILD_NAME}: {0}")]
    Wait(std::io::Error),
    #[error("{CHILD_NAME} exited with {0}")]
    Failed(std::process::ExitStatus),
    #[error("reading {path}: {why}")]
    Results { path: String, why: String },
}

/// How long a child killed at its timeout gets to die (one stuck in the
/// kernel may never; the boot goes on).
const KILL_GRACE: Duration = Duration::from_secs(2);

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

/// Run the child (a fork of PID 1 running [`super::child_main`]) and read
/// its results; see [`run_with`].
pub fn run(results: &Path, timeout: Duration, output: &mut Output) -> Result<Results, Pid1Error> {
    start(results).finish(timeout, output)
}

/// Run `child` in a forked copy of this process and read its results.
/// `Err` only when there are no results at all; a child that exited non-zero
/// after writing results (it used the last good config) is `Ok` with the
/// status in the results. What it writes is kept in `output` (for [`relay`]);
/// when the file for it cannot be made, it writes to PID 1's console directly.
pub fn run_with(
    child: impl FnOnce() -> i32,
    results: &Path,
    timeout: Duration,
    output: &mut Output,
) -> Result<Results, Pid1Error> {
    start_with(child, results).finish(timeout, output)
}

/// The child, started by [`start`]: stage 2 starts it first and goes on
/// with its own phases while it runs, then [`Started::finish`]es it.
#[derive(Debug)]
pub struct Started {
    pid: Result<u32, std::io::Error>,
    results: std::path::PathBuf,
    /// Where its output goes, when that file could be made.
    out_path: Option<std::path::PathBuf>,
    at: Instant,
}

/// Start the node config's child: PID 1 forked (no exec: the code is loaded
/// and, under QEMU, translated already; docs/performance.md), which becomes
/// what a fresh `basalt-node-config` process would be — no log ring
/// of PID 1's, a clean environment, its own name — and runs
/// [`super::child_main`]. Its memory (the parser's) is its own, gone when it
/// exits. Called while PID 1 has one thread (stage 2, before the supervisor).
pub fn start(results: &Path) -> Started {
    start_with(
        || {
            become_child();
            super::child_main()
        },
        results,
    )
}

/// What an exec of the binary as `basalt-node-config` gave the child: no
/// log ring (its lines go to its output, which PID 1 records), only `PATH`
/// in the environment, and its name in `ps` and `/proc/<pid>/comm`.
fn become_child() {
    crate::logs::forget();
    crate::sys::clear_env_in_forked_child("/usr/sbin:/usr/bin:/sbin:/bin");
    crate::sys::set_thread_name(CHILD_NAME);
}

/// Start `child` in a forked copy; see [`run_with`].
pub fn start_with(child: impl FnOnce() -> i32, results: &Path) -> Started {
    let _ = std::fs::remove_file(results);
    let out_path = results.with_extension("out");
    let out_file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&out_path);
    // One open file for stdout and stderr: lines stay in the order written.
    let pid = crate::sys::fork_run(out_file.as_ref().ok(), child);
    Started {
        pid,
        results: results.to_path_buf(),
        out_path: out_file.is_ok().then_some(out_path),
        at: Instant::now(),
    }
}

impl Started {
    /// Wait for the child, at most `timeout` from its start (then it is
    /// killed), and read its results; see [`run_with`].
    pub fn finish(self, timeout: Duration, output: &mut Output) -> Result<Results, Pid1Error> {
        let collect = |output: &mut Output| {
            if let Some(p) = &self.out_path {
                *output = Output::take(p);
            }
        };
        let pid = match self.pid {
            Ok(p) => p,
            Err(e) => {
                collect(output);
                return Err(Pid1Error::Spawn(e));
            }
        };
        let end = self.at + timeout;
        // Woken the moment the child exits (a pidfd), not on a polling tick:
        // the boot waits on this. Kernels before 5.3: poll every 20 ms.
        let exited = crate::sys::pidfd_open(pid);
        let status = loop {
            match crate::sys::try_wait(pid) {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() >= end => {
                    if !crate::sys::kill_and_wait(pid, KILL_GRACE) {
                        crate::console::error(
                            "node-config",
                            format_args!(
                                "{CHILD_NAME} pid {pid} did not die of SIGKILL within {KILL_GRACE:?}; going on without it"
                            ),
                        );
                    }
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

    /// Write to descriptor 1 without Rust's stdout lock (another test
    /// thread may have held it when the child was forked).
    fn write1(text: &str) {
        use std::os::fd::AsFd;
        let _ = nix::unistd::write(std::io::stdout().as_fd(), text.as_bytes());
    }

    fn write2(text: &str) {
        use std::os::fd::AsFd;
        let _ = nix::unistd::write(std::io::stderr().as_fd(), text.as_bytes());
    }

    #[test]
    fn reads_results_and_reports_failures() {
        let t = tempfile::tempdir().unwrap();
        let results = t.path().join("node-config.toml");
        let ten = Duration::from_secs(10);
        let res = results.clone();
        let r = run_with(
            move || {
                std::fs::write(
                    &res,
                    "status = \"applied\"\nhostname = \"edge-1\"\nerrors = 0\n",
                )
                .map_or(9, |()| 0)
            },
            &results,
            ten,
            &mut Output::default(),
        )
        .unwrap();
        assert_eq!(r.status, "applied");
        assert_eq!(r.hostname.as_deref(), Some("edge-1"));

        // Its output, stdout and stderr, line by line (a last line without
        // newline included).
        let res = results.clone();
        let mut out = Output::default();
        let r = run_with(
            move || {
                write1("basalt: error config x:1:1: bad\n");
                write2("oops\n");
                let _ = std::fs::write(&res, "status = \"failed\"\nerrors = 1\n");
                write1("tail");
                1
            },
            &results,
            ten,
            &mut out,
        )
        .unwrap();
        assert_eq!(r.status, "failed");
        assert_eq!(
            out.lines(),
            ["basalt: error config x:1:1: bad", "oops", "tail"]
        );
        assert_eq!(out.dropped, 0);
        // More than is kept: the first MAX_OUTPUT bytes, the rest counted;
        // the file is gone afterwards.
        let res = results.clone();
        let mut out = Output::default();
        let r = run_with(
            move || {
                for i in 0..3000 {
                    write1(&format!("filler {i} {}\n", ".".repeat(32)));
                }
                let _ = std::fs::write(&res, "status = \"applied\"\n");
                0
            },
            &results,
            ten,
            &mut out,
        )
        .unwrap();
        assert_eq!(r.status, "applied");
        let lines = out.lines();
        assert_eq!(lines[1], format!("filler 1 {}", ".".repeat(32)));
        assert_eq!(out.bytes.len(), MAX_OUTPUT);
        assert!(out.dropped > 60_000, "{}", out.dropped);
        assert!(!results.with_extension("out").exists());

        // No results: its exit status; a panic is caught in the child (101)
        // and never unwinds into the caller's stack.
        let st = run_with(|| 3, &results, ten, &mut Output::default());
        assert!(
            matches!(&st, Err(Pid1Error::Failed(s)) if s.code() == Some(3)),
            "{st:?}"
        );
        let st = run_with(
            || panic!("in the child"),
            &results,
            ten,
            &mut Output::default(),
        );
        assert!(
            matches!(&st, Err(Pid1Error::Failed(s)) if s.code() == Some(101)),
            "{st:?}"
        );
        // Exit 0 without results: says which file.
        let st = run_with(|| 0, &results, ten, &mut Output::default());
        assert!(matches!(&st, Err(Pid1Error::Results { .. })), "{st:?}");

        // Hung: killed at the timeout, and reaped.
        let t0 = Instant::now();
        let started = start_with(
            || {
                std::thread::sleep(Duration::from_secs(5));
                0
            },
            &results,
        );
        let pid = *started.pid.as_ref().unwrap();
        assert!(matches!(
            started.finish(Duration::from_millis(300), &mut Output::default()),
            Err(Pid1Error::Timeout(_))
        ));
        assert!(t0.elapsed() < Duration::from_secs(4));
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the killed child was not reaped"
        );
    }

    /// The child starts like an exec'd one: nothing of the parent's open
    /// files but its output, stdin on /dev/null, an empty signal mask, and
    /// (with `start`'s preparation) only PATH and its own name.
    #[test]
    fn the_forked_child_starts_clean() {
        let t = tempfile::tempdir().unwrap();
        let results = t.path().join("node-config.toml");
        // Open, inheritable in a fork: must not reach the child.
        let kept = std::fs::File::open(t.path()).unwrap();
        use std::os::fd::AsRawFd;
        let kept_fd = kept.as_raw_fd();
        // Blocked here (as PID 1 blocks what its signalfd reads): not in the child.
        let mut usr2 = nix::sys::signal::SigSet::empty();
        usr2.add(nix::sys::signal::Signal::SIGUSR2);
        usr2.thread_block().unwrap();
        let res = results.clone();
        let mut out = Output::default();
        run_with(
            move || {
                crate::sys::clear_env_in_forked_child("/bin");
                crate::sys::set_thread_name(CHILD_NAME);
                let fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
                    .map(|d| {
                        d.flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                let stdin = std::fs::read_link("/proc/self/fd/0").unwrap_or_default();
                let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
                let blocked = status
                    .lines()
                    .find_map(|l| l.strip_prefix("SigBlk:"))
                    .unwrap_or("")
                    .trim()
                    .to_string();
                let comm = std::fs::read_to_string("/proc/self/comm").unwrap_or_default();
                let env: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
                write1(&format!(
                    "fds {}\nstdin {}\nblocked {blocked}\ncomm {}\nenv {}\n",
                    fds.len(),
                    stdin.display(),
                    comm.trim(),
                    env.join(" ")
                ));
                let _ = std::fs::write(&res, "status = \"applied\"\n");
                0
            },
            &results,
            Duration::from_secs(10),
            &mut out,
        )
        .unwrap();
        usr2.thread_unblock().unwrap();
        // 0, 1, 2 and read_dir's own descriptor.
        let lines = out.lines();
        assert_eq!(
            lines[0], "fds 4",
            "{lines:?} (parent had fd {kept_fd} open)"
        );
        assert_eq!(lines[1], "stdin /dev/null");
        assert_eq!(lines[2], "blocked 0000000000000000");
        assert_eq!(lines[3], "comm basalt-node-con");
        assert_eq!(lines[4], "env PATH=/bin");
        drop(kept);
    }
}
