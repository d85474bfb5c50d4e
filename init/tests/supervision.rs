//! Supervision, readiness, reaping and shutdown with real processes, without
//! QEMU: the supervisor runs as PID 1 of its own user+PID+mount namespaces
//! (`unshare`), or as a plain child subreaper where unshare is unavailable.
//!
//! This file is its own test harness (`harness = false`): the same binary is
//! the driver (default), the supervisor under test (`BASALT_TEST_ROLE=supervisor`)
//! and a slow TCP server used as a service (`BASALT_TEST_ROLE=tcp-server`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use basalt_init::service::load_dir;
use basalt_init::supervisor::{Config, NodeInfo, Supervisor};

fn main() {
    match std::env::var("BASALT_TEST_ROLE").as_deref() {
        Ok("supervisor") => supervisor_role(),
        Ok("tcp-server") => tcp_server_role(),
        Ok("mute-server") => mute_server_role(),
        _ => driver(),
    }
}

// ---------------------------------------------------------------- roles

/// The supervisor under test: services from `$1`, control socket at `$2`.
/// Stops after the supervisor returns, with no reboot: that is the hook.
fn supervisor_role() {
    let args: Vec<String> = std::env::args().collect();
    basalt_init::console::install_panic_hook();
    basalt_init::logs::init(basalt_init::logs::Settings::default());
    if let Err(e) = basalt_init::sys::set_child_subreaper() {
        eprintln!("subreaper: {e}");
        std::process::exit(2);
    }
    let (services, errors) = load_dir(Path::new(&args[1]));
    for e in errors {
        basalt_init::console::error("service-file", e);
    }
    let config = Config {
        services,
        control_socket: Some(PathBuf::from(&args[2])),
        base_env: vec![("PATH".into(), std::env::var("PATH").unwrap_or_default())],
        info: NodeInfo {
            slot: "a".into(),
            hostname: "testhost".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            verity: None,
            boot: Default::default(),
        },
        proc_dir: PathBuf::from("/proc"),
        watchdog: None,
    };
    let mut sup = match Supervisor::new(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    sup.on_all_ready(Box::new(|s: &Supervisor| {
        basalt_init::say!("ready {}", s.status_json());
    }));
    // Stage 2 loads its late modules here: the services must have started.
    // `BASALT_TEST_HOOK_SLEEP_MS`: the hook keeps the loop busy that long, as
    // loading the late modules does, while the services run.
    let hook_sleep: u64 = std::env::var("BASALT_TEST_HOOK_SLEEP_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // `BASALT_TEST_HOOK_ADD`: a service the hook adds (as stage 2 adds the
    // update health gate on a trial boot), its definition in TOML.
    let hook_add = std::env::var("BASALT_TEST_HOOK_ADD").ok();
    sup.after_first_start(Box::new(move |s: &mut Supervisor| {
        basalt_init::say!("after-first-start {}", s.status_json());
        std::thread::sleep(Duration::from_millis(hook_sleep));
        if let Some(text) = hook_add {
            match basalt_init::service::ServiceDef::parse("added", &text, Path::new("env")) {
                Ok(def) => {
                    s.add_service(def.clone());
                    // A second one of the same name is refused.
                    s.add_service(def);
                }
                Err(e) => basalt_init::console::error("hook-add", e),
            }
        }
    }));
    // What stage 2 does after `basalt-node-config`: the results' [logs] over
    // the image's settings, persistent logging in `$BASALT_TEST_LOG_DIR`.
    let log_dir = std::env::var_os("BASALT_TEST_LOG_DIR").map(PathBuf::from);
    if let (Some(results), Some(dir)) = (std::env::var_os("BASALT_TEST_RESULTS"), &log_dir) {
        let text = std::fs::read_to_string(&results).unwrap_or_default();
        match toml::from_str::<basalt_init::apply::Results>(&text) {
            Ok(r) => basalt_init::logs::apply_node_config(r.logs.as_ref(), dir),
            Err(e) => basalt_init::console::error("results", e),
        }
        sup.every(
            basalt_init::logs::BATCH_AGE,
            Box::new(basalt_init::logs::flush),
        );
    }
    let kind = sup.run();
    basalt_init::say!("test supervisor returned {}", kind.name());
    basalt_init::logs::close_persistent();
    std::process::exit(0);
}

fn tcp_server_role() {
    let port: u16 = std::env::var("PORT").unwrap().parse().unwrap();
    let delay: u64 = std::env::var("DELAY_MS").unwrap().parse().unwrap();
    std::thread::sleep(Duration::from_millis(delay));
    let l = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    for s in l.incoming() {
        drop(s);
    }
}

/// Accepts connections and never answers (nor closes them): a peer that hangs.
fn mute_server_role() {
    let port: u16 = std::env::var("PORT").unwrap().parse().unwrap();
    let l = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let mut held = Vec::new();
    for s in l.incoming() {
        held.push(s);
    }
}

// ---------------------------------------------------------------- driver

type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

struct Run {
    child: Child,
    lines: Lines,
    dir: tempfile::TempDir,
    socket: PathBuf,
    t0: Instant,
}

fn unshare_works() -> bool {
    Command::new("unshare")
        .args([
            "--user",
            "--map-root-user",
            "--pid",
            "--fork",
            "--mount",
            "--mount-proc",
            "true",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Run {
    /// Start a supervisor over the given service files (name, toml; `@DIR@`
    /// is replaced by the run's temp dir).
    fn start(services: &[(&str, String)]) -> Run {
        Run::start_with(services, &[], &[])
    }

    /// [`Run::start`] with files written first (name, text; `@DIR@` replaced)
    /// and environment variables for the supervisor role (`@DIR@` replaced).
    fn start_with(
        services: &[(&str, String)],
        files: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> Run {
        let dir = tempfile::tempdir().unwrap();
        let at = |t: &str| t.replace("@DIR@", &dir.path().display().to_string());
        for (name, text) in files {
            std::fs::write(dir.path().join(name), at(text)).unwrap();
        }
        let sdir = dir.path().join("services");
        std::fs::create_dir_all(&sdir).unwrap();
        for (name, text) in services {
            let text = text.replace("@DIR@", &dir.path().display().to_string());
            std::fs::write(sdir.join(format!("{name}.toml")), text).unwrap();
        }
        let socket = dir.path().join("control.sock");
        let exe = std::env::current_exe().unwrap();
        let mut cmd = if unshare_works() {
            let mut c = Command::new("unshare");
            c.args([
                "--user",
                "--map-root-user",
                "--pid",
                "--fork",
                // A failed test drops its Run, which kills unshare: take the
                // supervisor (the namespace's PID 1) and its services with it.
                "--kill-child",
                "--mount",
                "--mount-proc",
            ])
            .arg(&exe);
            c
        } else {
            eprintln!("  (unshare unavailable: plain child subreaper)");
            Command::new(&exe)
        };
        cmd.arg(&sdir)
            .arg(&socket)
            .env("BASALT_TEST_ROLE", "supervisor")
            .envs(env.iter().map(|(k, v)| (k, at(v))))
            .stdout(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = cmd.spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let lines: Lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if std::env::var("BASALT_TEST_VERBOSE").is_ok() {
                    eprintln!("    | {line}");
                }
                l2.lock().unwrap().push((Instant::now(), line));
            }
        });
        Run {
            child,
            lines,
            dir,
            socket,
            t0: Instant::now(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Wait for the `n`th (1-based) line containing `needle`.
    fn wait_nth(&self, needle: &str, n: usize, timeout: Duration) -> Result<Instant, String> {
        let end = Instant::now() + timeout;
        loop {
            {
                let lines = self.lines.lock().unwrap();
                if let Some((t, _)) = lines.iter().filter(|(_, l)| l.contains(needle)).nth(n - 1) {
                    return Ok(*t);
                }
            }
            if Instant::now() > end {
                return Err(format!(
                    "no line #{n} containing {needle:?}; got:\n{}",
                    self.dump()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait(&self, needle: &str, timeout: Duration) -> Result<Instant, String> {
        self.wait_nth(needle, 1, timeout)
    }

    fn dump(&self) -> String {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|(t, l)| format!("  {:>6} ms {l}", t.duration_since(self.t0).as_millis()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn lines_with(&self, needle: &str) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, l)| l.contains(needle))
            .map(|(_, l)| l.clone())
            .collect()
    }

    fn control(&self, line: &str) -> Result<String, String> {
        let mut s = UnixStream::connect(&self.socket)
            .map_err(|e| format!("connect {}: {e}", self.socket.display()))?;
        s.write_all(format!("{line}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).map_err(|e| e.to_string())?;
        Ok(reply)
    }

    /// The supervisor's pid as seen from here (inside unshare, unshare's child).
    fn supervisor_pid(&self) -> u32 {
        let me = self.child.id();
        let kids = children_of(me);
        if self.lines.lock().unwrap().is_empty() && kids.is_empty() {
            return me;
        }
        // With unshare, the supervisor is unshare's only child.
        match kids.as_slice() {
            [only] if process_name(me).as_deref() == Some("unshare") => *only,
            _ => me,
        }
    }

    fn finish(mut self, timeout: Duration) -> Result<(), String> {
        self.wait_exit(timeout)
    }

    /// [`Run::finish`], keeping the run's directory to look at afterwards.
    fn finish_keeping_dir(mut self, timeout: Duration) -> Result<tempfile::TempDir, String> {
        self.wait_exit(timeout)?;
        let empty = tempfile::tempdir().map_err(|e| e.to_string())?;
        Ok(std::mem::replace(&mut self.dir, empty))
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<(), String> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return if status.success() {
                    Ok(())
                } else {
                    Err(format!("supervisor exited {status}:\n{}", self.dump()))
                };
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(format!("supervisor did not exit:\n{}", self.dump()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn process_name(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// (pid, ppid, state) of every process, from /proc/<pid>/stat.
fn process_table() -> Vec<(u32, u32, char)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // comm may contain spaces and parens: fields start after the last ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = f.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        out.push((pid, ppid, state));
    }
    out
}

fn children_of(pid: u32) -> Vec<u32> {
    process_table()
        .into_iter()
        .filter(|(_, pp, _)| *pp == pid)
        .map(|(p, _, _)| p)
        .collect()
}

/// All descendants of `root` with their states.
fn descendants(root: u32) -> Vec<(u32, char)> {
    let table = process_table();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (c, pp, st) in &table {
            if *pp == p {
                out.push((*c, *st));
                frontier.push(*c);
            }
        }
    }
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------- scenarios

/// A service that fails at once restarts after growing delays: 100, 200, 400, 400 ms.
fn crash_loop_backs_off() -> Result<(), String> {
    let run = Run::start(&[(
        "crasher",
        r#"exec = ["/bin/sh", "-c", "exit 3"]
[backoff]
initial_ms = 100
max_ms = 400
reset_after_secs = 60
"#
        .into(),
    )]);
    let mut starts = Vec::new();
    for n in 1..=5 {
        starts.push(run.wait_nth("service crasher started pid", n, Duration::from_secs(10))?);
    }
    let exits = run.lines_with("service crasher exited");
    let expected = [
        "restart in 100 ms",
        "restart in 200 ms",
        "restart in 400 ms",
        "restart in 400 ms",
    ];
    for (line, want) in exits.iter().zip(expected) {
        if !line.contains("exited code=3") || !line.contains(want) {
            return Err(format!(
                "expected 'exited code=3, {want}', got {line:?}\n{}",
                run.dump()
            ));
        }
    }
    let gaps: Vec<u128> = starts
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).as_millis())
        .collect();
    let floors = [95, 195, 395, 395];
    for (g, f) in gaps.iter().zip(floors) {
        if *g < f {
            return Err(format!(
                "restart gaps {gaps:?} shorter than backoff {floors:?}"
            ));
        }
    }
    if !(gaps[1] > gaps[0] && gaps[2] > gaps[1]) {
        return Err(format!("restart gaps {gaps:?} do not grow"));
    }
    let reply = run.control("poweroff")?;
    if reply.trim() != "ok poweroff" {
        return Err(format!("control reply {reply:?}"));
    }
    run.wait("shutdown poweroff", Duration::from_secs(5))?;
    run.finish(Duration::from_secs(10))
}

/// An HTTP readiness check against a peer that accepts and never answers
/// runs outside PID 1's loop: basaltctl keeps answering at once while the
/// checks (each up to 500 ms) go on, and the service is never called ready.
fn hung_probe_does_not_block_the_loop() -> Result<(), String> {
    let port = free_port();
    let exe = std::env::current_exe().unwrap().display().to_string();
    let run = Run::start(&[(
        "mute",
        format!(
            r#"exec = ["{exe}"]
env = {{ BASALT_TEST_ROLE = "mute-server", PORT = "{port}" }}
[ready]
http = "http://127.0.0.1:{port}/healthz"
interval_ms = 600
timeout_secs = 60
"#
        ),
    )]);
    run.wait("service mute started", Duration::from_secs(10))?;
    let ctl = run.path("basaltctl");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_init"), &ctl).unwrap();
    let mut worst = Duration::ZERO;
    for _ in 0..30 {
        let t = Instant::now();
        let out = Command::new(&ctl)
            .args(["status", "--json"])
            .env("BASALT_CONTROL_SOCKET", &run.socket)
            .output()
            .map_err(|e| e.to_string())?;
        worst = worst.max(t.elapsed());
        let json = String::from_utf8_lossy(&out.stdout);
        if !json.contains("\"name\":\"mute\",\"state\":\"starting\"") {
            return Err(format!("mute should still be starting: {json}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if worst > Duration::from_millis(250) {
        return Err(format!(
            "basaltctl status took {} ms while a readiness check hung: the loop blocked\n{}",
            worst.as_millis(),
            run.dump()
        ));
    }
    let pid = run.supervisor_pid();
    basalt_init::sys::kill(pid as i32, basalt_init::sys::Signal::SIGUSR2)
        .map_err(|e| e.to_string())?;
    run.wait("shutdown poweroff", Duration::from_secs(5))?;
    run.finish(Duration::from_secs(20))
}

/// Clients of the control socket that connect and send nothing, more than
/// it keeps open, and ones that ask for the logs and do not read the reply
/// yet, cost the loop no time: `status` is answered at once all along
/// (before, each silent client held the loop for its 1 s read timeout, in
/// turn); over the limit the oldest connections are closed, and said; the
/// silent ones left are closed after their deadline.
fn silent_control_clients_do_not_block_the_loop() -> Result<(), String> {
    let run = Run::start(&[(
        "chatty",
        r#"exec = ["/bin/sh", "-c", "i=0; while [ $i -lt 3000 ]; do echo line $i of a log that fills the reply; i=$((i+1)); done; exec sleep 1000"]"#.to_string(),
    )]);
    run.wait("service chatty started", Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_millis(300));
    let connect = || UnixStream::connect(&run.socket).map_err(|e| e.to_string());
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(connect()?);
    }
    // The newest are kept: the ones asking for the logs come last.
    for _ in 0..3 {
        let mut s = connect()?;
        s.write_all(b"logs\n").map_err(|e| e.to_string())?;
        held.push(s);
    }
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        let reply = run.control("status --json")?;
        worst = worst.max(t.elapsed());
        if !reply.contains("\"name\":\"chatty\"") {
            return Err(format!("status: {reply}"));
        }
    }
    if worst > Duration::from_millis(250) {
        return Err(format!(
            "status took {} ms with silent control clients: the loop blocked\n{}",
            worst.as_millis(),
            run.dump()
        ));
    }
    run.wait(
        "connections open at once, closing the oldest",
        Duration::from_secs(2),
    )?;
    // The silent ones are closed at their deadline: their reads end.
    std::thread::sleep(Duration::from_millis(1500));
    let asked: Vec<UnixStream> = held.split_off(40);
    for s in held.iter_mut() {
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .map_err(|e| format!("a silent client was not closed: {e}"))?;
    }
    // The logs were written to the ones that asked, as they read.
    let logs = {
        let mut s = asked.into_iter().next().ok_or("no client asked")?;
        let mut text = String::new();
        s.read_to_string(&mut text).map_err(|e| e.to_string())?;
        text
    };
    if !logs.contains("line 2999 of a log") {
        return Err(format!(
            "logs reply: {} bytes, no last line\n{}",
            logs.len(),
            run.dump()
        ));
    }
    drop(held);
    let pid = run.supervisor_pid();
    basalt_init::sys::kill(pid as i32, basalt_init::sys::Signal::SIGUSR2)
        .map_err(|e| e.to_string())?;
    run.wait("shutdown poweroff", Duration::from_secs(5))?;
    run.finish(Duration::from_secs(20))
}

/// TCP and exec readiness gate `after`; basaltctl reports status; SIGUSR2 powers off.
fn readiness_gates_dependents() -> Result<(), String> {
    let port = free_port();
    let exe = std::env::current_exe().unwrap().display().to_string();
    let run = Run::start(&[
        (
            "web",
            format!(
                r#"exec = ["{exe}"]
env = {{ BASALT_TEST_ROLE = "tcp-server", PORT = "{port}", DELAY_MS = "400" }}
[ready]
tcp = "127.0.0.1:{port}"
interval_ms = 50
timeout_secs = 20
"#
            ),
        ),
        (
            "flag",
            r#"exec = ["/bin/sh", "-c", "sleep 0.4; touch @DIR@/flag; exec sleep 1000"]
[ready]
exec = ["/bin/sh", "-c", "test -e @DIR@/flag"]
interval_ms = 50
"#
            .into(),
        ),
        (
            "late",
            r#"exec = ["/bin/sleep", "1000"]
after = ["web", "flag"]
"#
            .into(),
        ),
    ]);
    let t = Duration::from_secs(15);
    let web_started = run.wait("service web started", t)?;
    let web_ready = run.wait("service web ready", t)?;
    let flag_started = run.wait("service flag started", t)?;
    let flag_ready = run.wait("service flag ready", t)?;
    let late_started = run.wait("service late started", t)?;
    run.wait("basalt: ready {", t)?;
    let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_millis();
    if ms(web_started, web_ready) < 350 || ms(flag_started, flag_ready) < 350 {
        return Err(format!(
            "ready before the service could be:\n{}",
            run.dump()
        ));
    }
    if late_started < web_ready || late_started < flag_ready {
        return Err(format!(
            "late started before its dependencies were ready:\n{}",
            run.dump()
        ));
    }
    // basaltctl is the init binary called by that name.
    let ctl = run.path("basaltctl");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_init"), &ctl).unwrap();
    let out = Command::new(&ctl)
        .args(["status", "--json"])
        .env("BASALT_CONTROL_SOCKET", &run.socket)
        .output()
        .map_err(|e| e.to_string())?;
    let json = String::from_utf8_lossy(&out.stdout).to_string();
    for want in [
        "\"hostname\":\"testhost\"",
        "\"name\":\"late\",\"state\":\"ready\"",
        "\"name\":\"web\",\"state\":\"ready\"",
        "\"ready\":true",
    ] {
        if !json.contains(want) {
            return Err(format!("basaltctl status --json lacks {want}: {json}"));
        }
    }
    let out = Command::new(&ctl)
        .arg("status")
        .env("BASALT_CONTROL_SOCKET", &run.socket)
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !text.contains("hostname:   testhost")
        || !text
            .lines()
            .any(|l| l.starts_with("flag") && l.contains("ready"))
    {
        return Err(format!("basaltctl status:\n{text}"));
    }
    // SIGUSR2 from outside the namespace: an orderly poweroff.
    let pid = run.supervisor_pid();
    basalt_init::sys::kill(pid as i32, basalt_init::sys::Signal::SIGUSR2)
        .map_err(|e| e.to_string())?;
    run.wait("shutdown poweroff", Duration::from_secs(5))?;
    run.finish(Duration::from_secs(20))
}

/// Grandchildren whose parent exits are re-parented to the supervisor and reaped.
fn orphans_are_reaped() -> Result<(), String> {
    let run = Run::start(&[(
        "parent",
        r#"exec = ["/bin/sh", "-c", "sh -c '(sleep 0.2; touch @DIR@/o1) & (sleep 0.3; touch @DIR@/o2) & exit 0'; exec sleep 1000"]"#
            .into(),
    )]);
    run.wait("service parent started", Duration::from_secs(10))?;
    let end = Instant::now() + Duration::from_secs(10);
    while !(run.path("o1").exists() && run.path("o2").exists()) {
        if Instant::now() > end {
            return Err(format!("orphans never ran:\n{}", run.dump()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let procs = descendants(run.child.id());
    if !procs.iter().any(|(_, st)| *st != 'Z') {
        return Err(format!(
            "no live descendants found (process walk broken?): {procs:?}"
        ));
    }
    let zombies: Vec<_> = procs.iter().filter(|(_, st)| *st == 'Z').collect();
    if !zombies.is_empty() {
        return Err(format!("zombies left: {zombies:?}\n{}", run.dump()));
    }
    run.control("reboot")?;
    run.finish(Duration::from_secs(20))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    basalt_init::report::parse_rss_kib(&s)
}

/// 10 000 orphans from one service: all reaped, the supervisor's RSS does not grow.
fn orphan_storm() -> Result<(), String> {
    let run = Run::start(&[(
        "storm",
        r#"exec = ["/bin/sh", "-c", "sleep 0.5; i=0; while [ $i -lt 10000 ]; do ( : & ); i=$((i+1)); done; touch @DIR@/done; exec sleep 1000"]"#
            .into(),
    )]);
    run.wait("service storm started", Duration::from_secs(10))?;
    let sup = run.supervisor_pid();
    let before = rss_kib(sup).ok_or("no supervisor RSS")?;
    let end = Instant::now() + Duration::from_secs(120);
    while !run.path("done").exists() {
        if Instant::now() > end {
            return Err(format!("storm did not finish:\n{}", run.dump()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let zombies: Vec<_> = descendants(run.child.id())
        .into_iter()
        .filter(|(_, st)| *st == 'Z')
        .collect();
    if !zombies.is_empty() {
        return Err(format!("{} zombies left after the storm", zombies.len()));
    }
    let after = rss_kib(sup).ok_or("no supervisor RSS")?;
    println!("  orphan storm: supervisor RSS {before} KiB before, {after} KiB after 10000 orphans");
    if after > before + 64 {
        return Err(format!("supervisor RSS grew from {before} to {after} KiB"));
    }
    run.control("poweroff")?;
    run.finish(Duration::from_secs(20))
}

/// A crash-looping service backs off to its cap, then runs normally once fixed.
fn crash_loop_recovers_when_fixed() -> Result<(), String> {
    let run = Run::start(&[(
        "flaky",
        r#"exec = ["/bin/sh", "-c", "[ -e @DIR@/fixed ] || exit 4; touch @DIR@/running; exec sleep 1000"]
[backoff]
initial_ms = 100
max_ms = 200
reset_after_secs = 1
"#
        .into(),
    )]);
    run.wait_nth("service flaky started pid", 4, Duration::from_secs(10))?;
    let exits = run.lines_with("service flaky exited");
    if !exits
        .iter()
        .skip(1)
        .all(|l| l.contains("restart in 200 ms"))
        || exits.len() < 3
    {
        return Err(format!("no backoff cap of 200 ms: {exits:?}"));
    }
    std::fs::write(run.path("fixed"), "").map_err(|e| e.to_string())?;
    let end = Instant::now() + Duration::from_secs(10);
    while !run.path("running").exists() {
        if Instant::now() > end {
            return Err(format!("never recovered:\n{}", run.dump()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let n_exits = run.lines_with("service flaky exited").len();
    let status = run.control("status --json")?;
    if !status.contains("\"ready\"") || !status.contains("\"state\":\"ready\"") {
        return Err(format!("not running after the fix: {status}"));
    }
    std::thread::sleep(Duration::from_millis(500));
    if run.lines_with("service flaky exited").len() != n_exits {
        return Err(format!("still exiting after the fix:\n{}", run.dump()));
    }
    run.control("poweroff")?;
    run.finish(Duration::from_secs(10))
}

/// Service output goes through a pipe into the log ring (and on to the
/// console); `logs <service>` returns only that service's lines.
fn logs_are_kept_per_service() -> Result<(), String> {
    let run = Run::start(&[
        (
            "chatty",
            r#"exec = ["/bin/sh", "-c", "echo hello-out; echo hello-err >&2; printf 'no-newline'; sleep 0.2; echo ' end'; exec sleep 1000"]"#
                .into(),
        ),
        ("quiet", r#"exec = ["/bin/sleep", "1000"]"#.into()),
    ]);
    run.wait("hello-err", Duration::from_secs(10))?;
    run.wait("no-newline end", Duration::from_secs(10))?;
    let logs = run.control("logs chatty")?;
    for want in [
        " chatty: hello-out",
        " chatty: hello-err",
        " chatty: no-newline end",
    ] {
        if !logs.contains(want) {
            return Err(format!("{want:?} not in logs:\n{logs}"));
        }
    }
    if logs.contains("quiet") || logs.contains("init:") {
        return Err(format!("other sources in `logs chatty`:\n{logs}"));
    }
    let all = run.control("logs")?;
    if !all.contains(" init: service quiet started pid") {
        return Err(format!("init's own lines missing from `logs`:\n{all}"));
    }
    let last: u64 = all
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .ok_or("no sequence numbers")?;
    if !run.control(&format!("logs --since {last}"))?.is_empty() {
        return Err("`--since <last>` returned lines".into());
    }
    run.control("poweroff")?;
    run.finish(Duration::from_secs(10))
}

/// The node config's `[logs]` (as `basalt-node-config` leaves it in its
/// results) put in effect by the supervising process: console mirror down to
/// init's lines, `basalt.log` starting with the lines logged before it was
/// opened, rotated to `basalt.log.1` at `persistent_max_kib`, everything
/// written by shutdown.
fn persistent_logs_follow_the_node_config() -> Result<(), String> {
    let run = Run::start_with(
        &[(
            "chatty",
            r#"exec = ["/bin/sh", "-c", "i=0; while [ $i -lt 300 ]; do echo \"chatty line $i ................................\"; i=$((i+1)); done; echo chatty-done; exec sleep 1000"]"#
                .into(),
        )],
        &[(
            "node-config.toml",
            "status = \"applied\"\nerrors = 0\n[logs]\nconsole = \"init\"\npersistent = true\npersistent_max_kib = 16\n",
        )],
        &[
            ("BASALT_TEST_RESULTS", "@DIR@/node-config.toml"),
            ("BASALT_TEST_LOG_DIR", "@DIR@/var/log"),
        ],
    );
    run.wait("logs persistent at", Duration::from_secs(10))?;
    let end = Instant::now() + Duration::from_secs(10);
    while !run.control("logs chatty")?.contains("chatty-done") {
        if Instant::now() > end {
            return Err(format!("chatty-done not in the ring:\n{}", run.dump()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    run.control("poweroff")?;
    let console_lines = run.lines_with("chatty line");
    let dir = run.finish_keeping_dir(Duration::from_secs(10))?;
    let log = dir.path().join("var/log/basalt.log");
    let old = dir.path().join("var/log/basalt.log.1");
    if !console_lines.is_empty() {
        return Err(format!(
            "console = \"init\" but service lines reached the console: {:?}",
            &console_lines[..1]
        ));
    }
    let cur = std::fs::read_to_string(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let old = std::fs::read_to_string(&old).map_err(|e| format!("{}: {e}", old.display()))?;
    for (name, text) in [("basalt.log", &cur), ("basalt.log.1", &old)] {
        if text.len() > 16 * 1024 || !text.ends_with('\n') {
            return Err(format!("{name}: {} bytes, or a cut line", text.len()));
        }
    }
    // Before the file was opened: in it all the same (from the ring).
    if !old.contains(" init: service chatty started pid") {
        return Err(format!("early lines missing from basalt.log.1:\n{old}"));
    }
    for want in [
        " chatty: chatty-done",
        " init: test supervisor returned poweroff",
    ] {
        if !cur.contains(want) {
            return Err(format!("{want:?} not in basalt.log:\n{cur}"));
        }
    }
    let nums: Vec<u32> = old
        .lines()
        .chain(cur.lines())
        .filter_map(|l| {
            l.split("chatty line ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    if nums != (0..300).collect::<Vec<_>>() {
        return Err(format!("service lines not all there, in order: {nums:?}"));
    }
    Ok(())
}

/// Shutdown stops services in reverse dependency order; one ignoring SIGTERM
/// is SIGKILLed after its stop timeout.
fn shutdown_in_reverse_order() -> Result<(), String> {
    let run = Run::start(&[
        ("a", r#"exec = ["/bin/sleep", "1000"]"#.into()),
        (
            "b",
            "exec = [\"/bin/sleep\", \"1000\"]\nafter = [\"a\"]".into(),
        ),
        (
            "c",
            r#"exec = ["/bin/sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"]
after = ["b"]
stop_timeout_secs = 1
"#
            .into(),
        ),
    ]);
    run.wait("basalt: ready {", Duration::from_secs(10))?;
    let t_req = Instant::now();
    if run.control("reboot")?.trim() != "ok reboot" {
        return Err("bad reply to reboot".into());
    }
    run.wait("shutdown reboot", Duration::from_secs(5))?;
    let c = run.wait("service c stopped signal=SIGKILL", Duration::from_secs(10))?;
    let b = run.wait("service b stopped signal=SIGTERM", Duration::from_secs(10))?;
    let a = run.wait("service a stopped signal=SIGTERM", Duration::from_secs(10))?;
    run.wait("error stop-timeout c", Duration::from_secs(1))?;
    if !(c <= b && b <= a) {
        return Err(format!("not stopped in reverse order:\n{}", run.dump()));
    }
    let waited = c.duration_since(t_req).as_millis();
    if !(900..5000).contains(&waited) {
        return Err(format!(
            "c was killed after {waited} ms, expected its 1 s stop timeout"
        ));
    }
    run.wait("test supervisor returned reboot", Duration::from_secs(5))?;
    run.finish(Duration::from_secs(10))
}

/// A bad service file is reported; the good ones still run.
/// The hook for stage 2's late modules runs once, after the first round
/// started every service that could start (the Kubernetes service first).
fn after_first_start_sees_the_services_started() -> Result<(), String> {
    let run = Run::start(&[
        ("one", r#"exec = ["/bin/sleep", "1000"]"#.into()),
        ("two", r#"exec = ["/bin/sleep", "1000"]"#.into()),
    ]);
    run.wait("after-first-start", Duration::from_secs(10))?;
    run.wait("service two started", Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_millis(300));
    let hooks = run.lines_with("after-first-start");
    if hooks.len() != 1 {
        return Err(format!("hook ran {} times:\n{}", hooks.len(), run.dump()));
    }
    let json = hooks[0].split("after-first-start ").nth(1).unwrap_or("");
    for name in ["one", "two"] {
        let unit = json
            .split(&format!("{{\"name\":\"{name}\""))
            .nth(1)
            .and_then(|rest| rest.split('}').next())
            .unwrap_or("");
        let started = unit
            .split("\"pid\":")
            .nth(1)
            .is_some_and(|p| p.starts_with(|c: char| c.is_ascii_digit()));
        if !started {
            return Err(format!("{name} not started when the hook ran: {json}"));
        }
    }
    run.control("reboot")?;
    run.finish(Duration::from_secs(20))
}

/// A service added from the after-first-start hook (stage 2's update
/// health gate on a trial boot) starts at once, is supervised like the
/// others (restarted on failure, stopped at shutdown, in the status), and a
/// second one of the same name is refused.
fn a_service_added_after_the_first_round_runs() -> Result<(), String> {
    let run = Run::start_with(
        &[("one", r#"exec = ["/bin/sleep", "1000"]"#.into())],
        &[],
        &[(
            "BASALT_TEST_HOOK_ADD",
            r#"exec = ["/bin/sh", "-c", "echo added-runs; sleep 0.2; exit 1"]
restart = "on-failure"
backoff = { initial_ms = 100, max_ms = 100 }"#,
        )],
    );
    run.wait("after-first-start", Duration::from_secs(10))?;
    run.wait("service added started", Duration::from_secs(10))?;
    run.wait("added-runs", Duration::from_secs(10))?;
    run.wait(
        "added not added: a service of that name exists",
        Duration::from_secs(5),
    )?;
    // Restarted after its failure, like any service.
    let t = std::time::Instant::now();
    while run.lines_with("added-runs").len() < 2 {
        if t.elapsed() > Duration::from_secs(10) {
            return Err(format!("added service not restarted:\n{}", run.dump()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = run.control("status --json")?;
    if !status.contains("\"name\":\"added\"") {
        return Err(format!("added service not in the status: {status}"));
    }
    run.control("reboot")?;
    run.finish(Duration::from_secs(20))
}

/// What a service wrote before it exited reaches the log (and the console)
/// before its exit is reported, even when the loop was busy while it ran
/// (written and exited during the after-first-start hook).
fn output_before_exit_stays_in_order() -> Result<(), String> {
    let run = Run::start_with(
        &[(
            "quick",
            r#"exec = ["/bin/sh", "-c", "echo last-words-of-quick; exit 3"]
restart = "never""#
                .into(),
        )],
        &[],
        &[("BASALT_TEST_HOOK_SLEEP_MS", "500")],
    );
    let exited = run.wait("service quick exited", Duration::from_secs(10))?;
    let said = run.wait("last-words-of-quick", Duration::from_secs(5))?;
    if said > exited {
        return Err(format!(
            "the exit was reported before the output:\n{}",
            run.dump()
        ));
    }
    run.control("reboot")?;
    run.finish(Duration::from_secs(20))
}

fn bad_service_file_is_reported() -> Result<(), String> {
    let run = Run::start(&[
        ("good", r#"exec = ["/bin/sleep", "1000"]"#.into()),
        ("broken", "exec = 42".into()),
    ]);
    run.wait("basalt: error service-file", Duration::from_secs(10))?;
    run.wait("service good ready", Duration::from_secs(10))?;
    run.control("poweroff")?;
    run.finish(Duration::from_secs(10))
}

type Scenario = fn() -> Result<(), String>;

fn driver() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let tests: &[(&str, Scenario)] = &[
        ("crash_loop_backs_off", crash_loop_backs_off),
        ("readiness_gates_dependents", readiness_gates_dependents),
        (
            "hung_probe_does_not_block_the_loop",
            hung_probe_does_not_block_the_loop,
        ),
        (
            "silent_control_clients_do_not_block_the_loop",
            silent_control_clients_do_not_block_the_loop,
        ),
        ("orphans_are_reaped", orphans_are_reaped),
        ("orphan_storm", orphan_storm),
        ("logs_are_kept_per_service", logs_are_kept_per_service),
        (
            "persistent_logs_follow_the_node_config",
            persistent_logs_follow_the_node_config,
        ),
        (
            "crash_loop_recovers_when_fixed",
            crash_loop_recovers_when_fixed,
        ),
        ("shutdown_in_reverse_order", shutdown_in_reverse_order),
        ("bad_service_file_is_reported", bad_service_file_is_reported),
        (
            "after_first_start_sees_the_services_started",
            after_first_start_sees_the_services_started,
        ),
        (
            "output_before_exit_stays_in_order",
            output_before_exit_stays_in_order,
        ),
        (
            "a_service_added_after_the_first_round_runs",
            a_service_added_after_the_first_round_runs,
        ),
    ];
    let mut failed = 0;
    for (name, f) in tests {
        if let Some(flt) = &filter
            && !name.contains(flt.as_str())
        {
            continue;
        }
        let t = Instant::now();
        match f() {
            Ok(()) => println!("test {name} ... ok ({} ms)", t.elapsed().as_millis()),
            Err(e) => {
                failed += 1;
                println!("test {name} ... FAILED\n{e}");
            }
        }
    }
    if failed > 0 {
        println!("{failed} supervision test(s) failed");
        std::process::exit(1);
    }
}
