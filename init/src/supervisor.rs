//! The supervisor: PID 1's single-threaded event loop. It starts services in
//! dependency order, runs their readiness checks, restarts them with backoff,
//! reaps every child of the system in one place (`waitpid(-1)`) and routes
//! each exit to the service or check it belongs to, serves `basaltctl` on the
//! control socket, and on a shutdown signal stops services in reverse order.
//!
//! It never calls `reboot(2)` and never kills processes it does not own:
//! [`Supervisor::run`] returns the requested [`ShutdownKind`] and the caller
//! (stage 2, or a test) decides what happens next.
//!
//! The loop is `poll(2)` on a signalfd and the control socket, with the
//! timeout set to the next timer (restart, readiness check, stop deadline).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::console::{self, guarded};
use crate::report::Json;
use crate::say;
use crate::service::{Probe, ServiceDef, dependencies, start_order};
use crate::sys::{self, ExitStatus, Signal, Signals};

/// What the system does once services are stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownKind {
    Reboot,
    PowerOff,
    /// Raspberry Pi: reboot with the firmware's one-shot `tryboot` flag (an update's trial).
    RebootTryboot,
    /// Raspberry Pi without tryboot: `reboot(2)` with the partition number as its
    /// argument, so the firmware boots that boot FAT once (an update's trial).
    RebootPartition(u8),
}

impl ShutdownKind {
    pub fn name(self) -> &'static str {
        match self {
            ShutdownKind::Reboot => "reboot",
            ShutdownKind::PowerOff => "poweroff",
            ShutdownKind::RebootTryboot => "reboot tryboot",
            ShutdownKind::RebootPartition(_) => "reboot partition",
        }
    }
}

/// Facts about the node shown by `basaltctl status`.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    pub slot: String,
    pub hostname: String,
    pub machine_id: String,
    /// The root's dm-verity mapping (`basalt-root-a`); `None` when the root is not verified.
    pub verity: Option<String>,
    /// This boot's timings up to the supervisor (`basaltctl boot-time`).
    pub boot: crate::boottime::BootTimes,
}

/// Everything the supervisor needs; no global paths inside.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub services: Vec<ServiceDef>,
    /// Where to serve `basaltctl`; `None` serves nothing.
    pub control_socket: Option<PathBuf>,
    /// The environment every service starts with (its own `env` on top).
    pub base_env: Vec<(String, String)>,
    pub info: NodeInfo,
    /// `/proc`, for uptime in status replies.
    pub proc_dir: PathBuf,
    /// A watchdog device to arm and pet from the loop, when it exists.
    pub watchdog: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the services in `after` to be ready.
    Waiting,
    Running,
    /// Exited; starts again at `restart_at`.
    Backoff,
    /// Exited and its restart policy says no.
    Exited,
    /// Stopped at shutdown.
    Stopped,
    /// On a dependency cycle: never started.
    Blocked,
}

#[derive(Debug, Clone, Copy)]
struct Stop {
    deadline: Instant,
    killed_at: Option<Instant>,
}

/// One service at run time.
#[derive(Debug)]
struct Unit {
    def: ServiceDef,
    deps: Vec<usize>,
    state: State,
    pid: Option<i32>,
    started_at: Instant,
    restart_at: Instant,
    failures: u32,
    restarts: u32,
    ready: bool,
    /// Uptime ms of the first start (when it was issued, before fork and
    /// exec) and first readiness (boot report).
    first_exec: Option<u64>,
    /// PID 1's own CPU time (user µs, system µs) when this service's first
    /// start was issued.
    first_exec_cpu_us: Option<(u64, u64)>,
    first_ready: Option<u64>,
    next_check: Instant,
    check_pid: Option<i32>,
    stop: Option<Stop>,
    last_exit: Option<ExitStatus>,
    /// The service's stdout/stderr pipe, kept for PID 1's whole life (the
    /// write end is handed to every run; a restart never breaks a writer).
    log_pipe: Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)>,
    log_pending: Vec<u8>,
}

impl Unit {
    /// A service not started yet: `Waiting`, or `Blocked` when it has no
    /// place in the start order (`startable` false).
    fn new(def: &ServiceDef, deps: Vec<usize>, startable: bool, now: Instant) -> Unit {
        Unit {
            def: def.clone(),
            deps,
            state: if startable {
                State::Waiting
            } else {
                State::Blocked
            },
            pid: None,
            started_at: now,
            restart_at: now,
            failures: 0,
            restarts: 0,
            ready: false,
            first_exec: None,
            first_exec_cpu_us: None,
            first_ready: None,
            next_check: now,
            check_pid: None,
            stop: None,
            last_exit: None,
            log_pipe: match sys::log_pipe() {
                Ok(p) => Some(p),
                Err(e) => {
                    console::error("log-pipe", format_args!("{} ({e})", def.name));
                    None
                }
            },
            log_pending: Vec::new(),
        }
    }
}

#[derive(Debug)]
struct Shutdown {
    kind: ShutdownKind,
    queue: VecDeque<usize>,
    current: Option<usize>,
    done: bool,
}

/// Called once, when every service has been ready.
pub type ReadyHook = Box<dyn FnOnce(&Supervisor)>;

/// See [`Supervisor::after_first_start`].
pub type StartHook = Box<dyn FnOnce(&mut Supervisor)>;

/// The signals PID 1 acts on: children exiting, reboot, poweroff.
pub const SIGNALS: &[Signal] = &[
    Signal::SIGCHLD,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGUSR2,
];

/// How long a SIGKILLed process may take to disappear before it is given up on.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Longest sleep of the loop when no timer is due (a safety net, not a tick).
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// How often the loop asks device-mapper about the root's verity status.
const VERITY_CHECK: Duration = Duration::from_secs(1);
/// Cap on a TCP/HTTP probe: probes run inline, so they must be short.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// A task the loop runs every period (`Supervisor::every`).
pub type PeriodicTask = Box<dyn FnMut()>;

pub struct Supervisor {
    units: Vec<Unit>,
    order: Vec<usize>,
    signals: Signals,
    control: Option<UnixListener>,
    control_path: Option<PathBuf>,
    /// Control connections being read or answered (crate::controlconn).
    clients: Vec<crate::controlconn::Conn>,
    /// A burst of connections over the limit was said.
    clients_full_said: bool,
    base_env: Vec<(String, String)>,
    info: NodeInfo,
    proc_dir: PathBuf,
    all_ready_at: Option<Instant>,
    /// `CLOCK_BOOTTIME` ms when every service was first ready.
    all_ready_ms: Option<u64>,
    /// Last verity status check, and whether a corruption was reported.
    verity_checked: Option<Instant>,
    verity_corrupted: bool,
    watchdog: Option<sys::watchdog::Watchdog>,
    last_pet: Instant,
    /// Set by `basaltctl debug stop-watchdog`: the loop runs on but stops petting.
    watchdog_stopped: bool,
    /// `console.emergency_shell`: the shell to offer on the console when the
    /// boot fails, and the pid of the one running.
    emergency_shell: Option<PathBuf>,
    shell_pid: Option<i32>,
    on_ready: Option<ReadyHook>,
    /// Run once right after the loop's first round started the services
    /// (`after_first_start`), before the watchdog is opened.
    after_start: Option<StartHook>,
    /// The watchdog device to open after the first start (`Config::watchdog`).
    watchdog_path: Option<PathBuf>,
    started: bool,
    shutdown: Option<Shutdown>,
    /// Tasks run every period from the loop (`every`): (period, last run, task).
    periodic: Vec<(Duration, Instant, PeriodicTask)>,
    /// The node's own partitions, watched for their removal (`watch_storage`).
    storage: Option<crate::storage::StorageWatch>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("units", &self.units.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("opening signalfd: {0}")]
    Signals(sys::Errno),
}

impl Supervisor {
    /// Block the signals PID 1 handles and prepare the services. Must run
    /// before any child is started (children inherit nothing of it: std
    /// resets their signal mask).
    pub fn new(config: Config) -> Result<Supervisor, SupervisorError> {
        let signals = Signals::open(&[
            Signal::SIGCHLD,
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGUSR2,
        ])
        .map_err(SupervisorError::Signals)?;
        let (order, problems) = start_order(&config.services);
        for p in &problems {
            console::error("service-order", p);
        }
        let now = Instant::now();
        let units: Vec<Unit> = config
            .services
            .iter()
            .enumerate()
            .map(|(i, def)| {
                Unit::new(
                    def,
                    dependencies(&config.services, i),
                    order.contains(&i),
                    now,
                )
            })
            .collect();
        let control = config.control_socket.as_deref().and_then(open_control);
        Ok(Supervisor {
            units,
            order,
            signals,
            control,
            control_path: config.control_socket,
            clients: Vec::new(),
            clients_full_said: false,
            base_env: config.base_env,
            info: config.info,
            proc_dir: config.proc_dir,
            all_ready_at: None,
            all_ready_ms: None,
            verity_checked: None,
            verity_corrupted: false,
            watchdog: None,
            watchdog_path: config.watchdog,
            started: false,
            after_start: None,
            last_pet: now,
            watchdog_stopped: false,
            emergency_shell: None,
            shell_pid: None,
            on_ready: None,
            shutdown: None,
            periodic: Vec::new(),
            storage: None,
        })
    }

    /// Offer `shell` (e.g. `/bin/sh`) as a root shell on `/dev/console` when
    /// the boot fails: a service not ready within its timeout, or one that
    /// exited and will not be restarted (node config `console.emergency_shell`).
    pub fn set_emergency_shell(&mut self, shell: Option<PathBuf>) {
        self.emergency_shell = shell;
    }

    fn offer_emergency_shell(&mut self, why: &str) {
        let Some(shell) = self.emergency_shell.clone() else {
            return;
        };
        if self.shutdown.is_some() || self.shell_pid.is_some() {
            return;
        }
        let console = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/console")
        {
            Ok(f) => f,
            Err(e) => {
                console::error("emergency-shell", format_args!("/dev/console ({e})"));
                return;
            }
        };
        let (Ok(out), Ok(err)) = (console.try_clone(), console.try_clone()) else {
            return;
        };
        let mut cmd = Command::new(&shell);
        cmd.env_clear()
            .envs(self.base_env.iter().map(|(k, v)| (k, v)))
            .env("TERM", "linux")
            .stdin(Stdio::from(console))
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        sys::console_session(&mut cmd);
        match cmd.spawn() {
            Ok(child) => {
                let pid = child.id() as i32;
                drop(child);
                self.shell_pid = Some(pid);
                say!(
                    "emergency shell on /dev/console ({why}; console.emergency_shell = true) pid {pid}"
                );
            }
            Err(e) => console::error("emergency-shell", format_args!("{} ({e})", shell.display())),
        }
    }

    pub fn on_all_ready(&mut self, hook: ReadyHook) {
        self.on_ready = Some(hook);
    }

    /// Run `hook` once, right after the loop's first round has started the
    /// services (Kubernetes first), and before the watchdog device is opened:
    /// work the path to Kubernetes does not need (stage 2's late modules).
    pub fn after_first_start(&mut self, hook: StartHook) {
        self.after_start = Some(hook);
    }

    /// Add a service while the loop runs (from the after-first-start hook:
    /// the update phase's health gate, known only once the boot's update
    /// bookkeeping ran). Started at once when what it is `after` is ready,
    /// else when that is. Refused, with an error line, during a shutdown or
    /// when a service of that name exists.
    pub fn add_service(&mut self, def: ServiceDef) {
        if self.shutdown.is_some() || self.unit(&def.name).is_some() {
            console::error(
                "service",
                format_args!(
                    "{} not added: {}",
                    def.name,
                    if self.shutdown.is_some() {
                        "shutting down"
                    } else {
                        "a service of that name exists"
                    }
                ),
            );
            return;
        }
        let mut defs: Vec<ServiceDef> = self.units.iter().map(|u| u.def.clone()).collect();
        defs.push(def);
        let (order, problems) = start_order(&defs);
        let i = defs.len() - 1;
        // The others' problems were reported when the supervisor was made.
        for p in problems
            .iter()
            .filter(|p| p.contains(defs[i].name.as_str()))
        {
            console::error("service-order", p);
        }
        let now = Instant::now();
        self.units.push(Unit::new(
            &defs[i],
            dependencies(&defs, i),
            order.contains(&i),
            now,
        ));
        for (k, u) in self.units.iter_mut().enumerate() {
            u.deps = dependencies(&defs, k);
        }
        self.order = order;
        if self.units[i].state == State::Waiting
            && self.units[i]
                .deps
                .iter()
                .all(|&d| self.units[d].first_ready.is_some())
        {
            self.start(i, now);
        }
    }

    /// Firmware and loader durations (EFI variables), once they can be read.
    pub fn set_firmware_times(&mut self, us: Option<(u64, u64)>) {
        self.info.boot.firmware_loader_us = us;
    }

    /// Run `task` from the loop about every `period` (the loop wakes for it),
    /// e.g. saving the clock.
    pub fn every(&mut self, period: Duration, task: PeriodicTask) {
        self.periodic.push((period, Instant::now(), task));
    }

    fn run_periodic(&mut self, now: Instant) {
        for (period, last, task) in &mut self.periodic {
            if now.duration_since(*last) >= *period {
                *last = now;
                task();
            }
        }
    }

    /// Pid of the named service's current run.
    pub fn pid_of(&self, name: &str) -> Option<i32> {
        self.unit(name).and_then(|u| u.pid)
    }

    /// Uptime ms at which the named service was first started and first ready.
    pub fn milestones(&self, name: &str) -> (Option<u64>, Option<u64>) {
        self.unit(name)
            .map_or((None, None), |u| (u.first_exec, u.first_ready))
    }

    /// PID 1's CPU time, (user µs, system µs), from its start (stage 1 and
    /// stage 2 are one process) to the named service's first exec.
    pub fn cpu_until_exec(&self, name: &str) -> Option<(u64, u64)> {
        let (u0, s0) = self.info.boot.stage1_cpu_us;
        self.unit(name)
            .and_then(|u| u.first_exec_cpu_us)
            .map(|(u, s)| (u.saturating_sub(u0), s.saturating_sub(s0)))
    }

    fn unit(&self, name: &str) -> Option<&Unit> {
        self.units.iter().find(|u| u.def.name == name)
    }

    /// Run until a shutdown was requested and every service has stopped.
    pub fn run(&mut self) -> ShutdownKind {
        loop {
            guarded("supervisor timers", || self.tick(Instant::now()));
            if !self.started {
                self.started = true;
                if let Some(hook) = self.after_start.take() {
                    guarded("after start", || hook(self));
                }
                self.watchdog = open_watchdog(self.watchdog_path.as_deref());
                self.last_pet = Instant::now();
            }
            guarded("verity status", || self.check_verity(Instant::now(), false));
            guarded("watchdog", || self.pet_watchdog(Instant::now()));
            guarded("periodic", || self.run_periodic(Instant::now()));
            if let Some(sd) = &self.shutdown
                && sd.done
            {
                return sd.kind;
            }
            let wait = self.next_wake(Instant::now());
            let (readable, control_at, storage_at, logs_at) = {
                let mut fds = vec![(self.signals.as_fd(), false)];
                let control_at = self.control.as_ref().map(|l| {
                    fds.push((l.as_fd(), false));
                    fds.len() - 1
                });
                let storage_at = self.storage.as_ref().map(|w| {
                    fds.push((w.as_fd(), false));
                    fds.len() - 1
                });
                let logs_at = fds.len();
                for u in &self.units {
                    if let Some((r, _)) = &u.log_pipe {
                        fds.push((r.as_fd(), false));
                    }
                }
                // Last: the connections only wake the loop; each is advanced
                // below whatever poll said.
                let logs_end = fds.len();
                for c in &self.clients {
                    fds.push((c.fd(), c.writing()));
                }
                let r = match sys::poll_ready(&fds, Some(wait.as_millis() as u32)) {
                    Ok(r) => r,
                    Err(e) => {
                        console::error("poll", e);
                        std::thread::sleep(Duration::from_millis(100));
                        Vec::new()
                    }
                };
                (r, control_at, storage_at, logs_at..logs_end)
            };
            let is_readable =
                |at: Option<usize>| at.and_then(|i| readable.get(i).copied()).unwrap_or(false);
            guarded("supervisor signals", || self.handle_signals());
            guarded("supervisor reaping", || self.reap_all());
            if is_readable(storage_at) {
                guarded("storage watch", || self.check_storage());
            }
            if is_readable(control_at) {
                guarded("control socket", || self.serve_control());
            }
            if !self.clients.is_empty() {
                guarded("control requests", || self.serve_clients(Instant::now()));
            }
            if readable.get(logs_at).is_some_and(|r| r.iter().any(|r| *r)) {
                guarded("service logs", || self.drain_logs());
            }
        }
    }

    /// Watch the node's own partitions (crate::storage): when one is removed,
    /// say so and reboot in order.
    pub fn watch_storage(&mut self, watch: crate::storage::StorageWatch) {
        self.storage = Some(watch);
    }

    fn check_storage(&mut self) {
        let Some(w) = &mut self.storage else { return };
        let lost = match w.take_lost() {
            Ok(l) => l,
            Err(e) => {
                // A socket that keeps failing would wake the loop for nothing.
                console::error(
                    "storage",
                    format_args!("device events: {e}; no longer watched"),
                );
                self.storage = None;
                return;
            }
        };
        if lost.is_empty() {
            return;
        }
        for l in &lost {
            console::error(
                "storage",
                format_args!(
                    "/dev/{} ({}) was removed: the node cannot run without it",
                    l.name, l.role
                ),
            );
        }
        if self.shutdown.is_none() {
            console::error(
                "storage",
                "rebooting: a fresh boot finds the disk again, if it is back",
            );
            self.request_shutdown(ShutdownKind::Reboot);
        }
    }

    /// Begin an orderly shutdown (also what SIGTERM/SIGINT/SIGUSR2 do).
    pub fn request_shutdown(&mut self, kind: ShutdownKind) {
        if self.shutdown.is_some() {
            return;
        }
        say!("shutdown {}", kind.name());
        for u in &mut self.units {
            if let Some(pid) = u.check_pid.take() {
                let _ = sys::kill(pid, Signal::SIGKILL);
            }
            if matches!(u.state, State::Waiting | State::Backoff) {
                u.state = State::Stopped;
            }
        }
        let queue = self.order.iter().rev().copied().collect();
        self.shutdown = Some(Shutdown {
            kind,
            queue,
            current: None,
            done: false,
        });
    }

    fn handle_signals(&mut self) {
        while let Some(sig) = self.signals.next() {
            match sig {
                Signal::SIGTERM | Signal::SIGINT => self.request_shutdown(ShutdownKind::Reboot),
                Signal::SIGUSR2 => self.request_shutdown(ShutdownKind::PowerOff),
                _ => {}
            }
        }
    }

    /// Reap every exited child and route its status. Children that belong to
    /// no service or check are orphans re-parented to us: reaping is all.
    fn reap_all(&mut self) {
        while let Some(r) = sys::reap_one() {
            let now = Instant::now();
            if let Some(i) = self.units.iter().position(|u| u.pid == Some(r.pid)) {
                // What it wrote before it exited is in its pipe now: record it
                // (and put it on the console) before its exit is acted on
                // (a failure, an emergency shell on the console).
                self.drain_unit(i);
                self.on_exit(i, r.status, now);
            } else if let Some(i) = self.units.iter().position(|u| u.check_pid == Some(r.pid)) {
                self.on_check_exit(i, r.status);
            } else if self.shell_pid == Some(r.pid) {
                self.shell_pid = None;
                say!("emergency shell exited");
            }
        }
    }

    fn tick(&mut self, now: Instant) {
        if self.shutdown.is_some() {
            self.advance_shutdown(now);
            return;
        }
        for k in 0..self.order.len() {
            let i = self.order[k];
            match self.units[i].state {
                State::Waiting => {
                    let deps_ready = self.units[i]
                        .deps
                        .iter()
                        .all(|&d| self.units[d].first_ready.is_some());
                    if deps_ready {
                        self.start(i, now);
                    }
                }
                State::Backoff if now >= self.units[i].restart_at => self.start(i, now),
                State::Running => {
                    if self.units[i].stop.is_some() {
                        self.escalate_stop(i, now);
                    } else if !self.units[i].ready {
                        self.check_readiness(i, now);
                    }
                }
                _ => {}
            }
        }
        if self.all_ready_at.is_none()
            && self
                .units
                .iter()
                .all(|u| u.state == State::Blocked || u.first_ready.is_some())
        {
            self.all_ready_at = Some(now);
            self.all_ready_ms = Some(sys::boottime_ms());
            if let Some(hook) = self.on_ready.take() {
                hook(self);
            }
        }
    }

    fn next_wake(&self, now: Instant) -> Duration {
        let mut next = now + MAX_SLEEP;
        for (period, last, _) in &self.periodic {
            next = next.min(*last + *period);
        }
        for c in &self.clients {
            next = next.min(c.deadline());
        }
        if let Some(w) = &self.watchdog
            && !self.watchdog_stopped
        {
            next = next.min(self.last_pet + pet_interval(w.timeout_secs));
        }
        for u in &self.units {
            match u.state {
                State::Backoff if self.shutdown.is_none() => next = next.min(u.restart_at),
                State::Running => {
                    if let Some(stop) = u.stop {
                        next = next.min(stop.killed_at.map_or(stop.deadline, |k| k + KILL_GRACE));
                    } else if !u.ready
                        && self.shutdown.is_none()
                        && let Some(r) = &u.def.ready
                    {
                        next = next.min(u.started_at + r.timeout);
                        if u.check_pid.is_none() {
                            next = next.min(u.next_check);
                        }
                    }
                }
                _ => {}
            }
        }
        next.saturating_duration_since(now)
    }

    fn start(&mut self, i: usize, now: Instant) {
        let u = &mut self.units[i];
        let mut cmd = Command::new(&u.def.exec[0]);
        cmd.args(&u.def.exec[1..])
            .env_clear()
            .envs(self.base_env.iter().map(|(k, v)| (k, v)))
            .envs(&u.def.env)
            .stdin(Stdio::null());
        // Output into the log ring through the unit's pipe (console when there is none).
        if let Some((_, w)) = &u.log_pipe
            && let (Ok(a), Ok(b)) = (w.try_clone(), w.try_clone())
        {
            cmd.stdout(Stdio::from(a)).stderr(Stdio::from(b));
        }
        cmd
            // Own process group: stopping a service signals everything it started.
            .process_group(0);
        sys::unblock_signals_in_child(&mut cmd);
        // The instant the start is issued (before fork and exec), as a
        // script's `exec` line would be timed: the boot report's
        // "Kubernetes exec".
        let (issued_ms, issued_cpu) = (sys::boottime_ms(), sys::own_cpu_us());
        match cmd.spawn() {
            Ok(child) => {
                let pid = child.id() as i32;
                // Dropping `child` does not wait: the exit is reaped in `reap_all`.
                drop(child);
                u.pid = Some(pid);
                u.state = State::Running;
                u.started_at = now;
                u.ready = false;
                u.next_check = now;
                u.first_exec.get_or_insert(issued_ms);
                u.first_exec_cpu_us.get_or_insert(issued_cpu);
                say!("service {} started pid {pid}", u.def.name);
                if u.def.ready.is_none() {
                    self.mark_ready(i);
                }
            }
            Err(e) => {
                console::error(
                    "service-start",
                    format_args!("{} ({}: {e})", u.def.name, u.def.exec[0]),
                );
                self.after_run(i, None, now);
            }
        }
    }

    fn mark_ready(&mut self, i: usize) {
        let u = &mut self.units[i];
        u.ready = true;
        u.first_ready.get_or_insert_with(sys::boottime_ms);
        say!("service {} ready", u.def.name);
    }

    fn on_exit(&mut self, i: usize, status: ExitStatus, now: Instant) {
        let u = &mut self.units[i];
        u.pid = None;
        u.ready = false;
        u.last_exit = Some(status);
        if let Some(pid) = u.check_pid.take() {
            let _ = sys::kill(pid, Signal::SIGKILL);
        }
        if let Some(sd) = &mut self.shutdown {
            u.state = State::Stopped;
            u.stop = None;
            say!("service {} stopped {status}", u.def.name);
            if sd.current == Some(i) {
                sd.current = None;
            }
            return;
        }
        self.after_run(i, Some(status), now);
    }

    /// Decide what follows a run that ended with `status` (`None`: it never started).
    fn after_run(&mut self, i: usize, status: Option<ExitStatus>, now: Instant) {
        let u = &mut self.units[i];
        let was_stopped = u.stop.take().is_some();
        let success = status.is_some_and(|s| s.success()) && !was_stopped;
        let ran = now.saturating_duration_since(u.started_at);
        let shown = status.map_or_else(|| "not-started".to_string(), |s| s.to_string());
        if u.def.restarts_after(success) {
            u.failures = if success {
                0
            } else {
                u.def.backoff.next_failures(u.failures, ran)
            };
            let delay = u.def.backoff.delay(u.failures.max(1));
            u.restart_at = now + delay;
            u.restarts += 1;
            u.state = State::Backoff;
            say!(
                "service {} exited {shown}, restart in {} ms",
                u.def.name,
                delay.as_millis()
            );
        } else {
            u.state = State::Exited;
            say!("service {} exited {shown}, not restarted", u.def.name);
            if !success && !was_stopped {
                let why = format!("service {} failed", u.def.name);
                self.offer_emergency_shell(&why);
            }
        }
    }

    fn check_readiness(&mut self, i: usize, now: Instant) {
        let Some(ready) = self.units[i].def.ready.clone() else {
            return;
        };
        let u = &mut self.units[i];
        if now >= u.started_at + ready.timeout {
            console::error(
                "service-not-ready",
                format_args!(
                    "{} after {} s, stopping it",
                    u.def.name,
                    ready.timeout.as_secs()
                ),
            );
            if let Some(pid) = u.check_pid.take() {
                let _ = sys::kill(pid, Signal::SIGKILL);
            }
            let why = format!("service {} not ready", u.def.name);
            self.begin_stop(i, now);
            self.offer_emergency_shell(&why);
            return;
        }
        if u.check_pid.is_some() || now < u.next_check {
            return;
        }
        u.next_check = now + ready.interval;
        let timeout = PROBE_TIMEOUT.min(ready.interval);
        // Network probes run in a forked child (sys::fork_probe): the loop
        // never waits on a peer. Every probe's verdict comes back as the
        // child's exit status, through on_check_exit.
        let forked = match &ready.probe {
            Probe::Tcp(addr) => {
                let addr = *addr;
                Some(sys::fork_probe(move || {
                    TcpStream::connect_timeout(&addr, timeout).is_ok()
                }))
            }
            Probe::Http { addr, host, path } => {
                let (addr, host, path) = (*addr, host.clone(), path.clone());
                Some(sys::fork_probe(move || {
                    http_ok(&addr, &host, &path, timeout)
                }))
            }
            Probe::Exec(_) => None,
        };
        if let Some(r) = forked {
            match r {
                Ok(pid) => u.check_pid = Some(pid),
                Err(e) => console::error("ready-check", format_args!("{} (fork: {e})", u.def.name)),
            }
            return;
        }
        let ok = match &ready.probe {
            Probe::Tcp(_) | Probe::Http { .. } => false,
            Probe::Exec(argv) => {
                let mut cmd = Command::new(&argv[0]);
                cmd.args(&argv[1..])
                    .env_clear()
                    .envs(self.base_env.iter().map(|(k, v)| (k, v)))
                    .envs(&u.def.env)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                sys::unblock_signals_in_child(&mut cmd);
                let spawned = cmd.spawn();
                match spawned {
                    Ok(child) => u.check_pid = Some(child.id() as i32),
                    Err(e) => console::error(
                        "ready-check",
                        format_args!("{} ({}: {e})", u.def.name, argv[0]),
                    ),
                }
                false
            }
        };
        if ok {
            self.mark_ready(i);
        }
    }

    fn on_check_exit(&mut self, i: usize, status: ExitStatus) {
        let u = &mut self.units[i];
        u.check_pid = None;
        if status.success() && u.state == State::Running && !u.ready && u.stop.is_none() {
            self.mark_ready(i);
        }
    }

    /// SIGTERM the service's process group; SIGKILL follows after its stop timeout.
    fn begin_stop(&mut self, i: usize, now: Instant) {
        let u = &mut self.units[i];
        if let Some(pid) = u.pid {
            signal_group(pid, Signal::SIGTERM);
            u.stop = Some(Stop {
                deadline: now + u.def.stop_timeout,
                killed_at: None,
            });
        }
    }

    fn escalate_stop(&mut self, i: usize, now: Instant) {
        let u = &mut self.units[i];
        let (Some(pid), Some(stop)) = (u.pid, u.stop.as_mut()) else {
            return;
        };
        match stop.killed_at {
            None if now >= stop.deadline => {
                console::error(
                    "stop-timeout",
                    format_args!(
                        "{} after {} s, sending SIGKILL",
                        u.def.name,
                        u.def.stop_timeout.as_secs()
                    ),
                );
                signal_group(pid, Signal::SIGKILL);
                stop.killed_at = Some(now);
            }
            Some(killed) if now >= killed + KILL_GRACE => {
                // Stuck in the kernel: stop waiting for it, or shutdown never ends.
                console::error("unkillable", format_args!("{} pid {pid}", u.def.name));
                u.pid = None;
                u.stop = None;
                u.state = State::Stopped;
                if let Some(sd) = &mut self.shutdown
                    && sd.current == Some(i)
                {
                    sd.current = None;
                }
            }
            _ => {}
        }
    }

    fn advance_shutdown(&mut self, now: Instant) {
        loop {
            let Some(sd) = &mut self.shutdown else { return };
            if let Some(i) = sd.current {
                self.escalate_stop(i, now);
                return;
            }
            match sd.queue.pop_front() {
                Some(i) if self.units[i].state == State::Running && self.units[i].pid.is_some() => {
                    sd.current = Some(i);
                    self.begin_stop(i, now);
                    return;
                }
                Some(_) => continue,
                None => {
                    sd.done = true;
                    return;
                }
            }
        }
    }

    fn serve_control(&mut self) {
        loop {
            let Some(listener) = &self.control else {
                return;
            };
            match listener.accept() {
                Ok((stream, _)) => {
                    // Full: the oldest goes (a flood of silent clients must
                    // not lock basaltctl out).
                    if self.clients.len() >= crate::controlconn::MAX_CONNECTIONS {
                        if !self.clients_full_said {
                            console::error(
                                "control-socket",
                                format_args!(
                                    "{} connections open at once, closing the oldest",
                                    self.clients.len()
                                ),
                            );
                            self.clients_full_said = true;
                        }
                        self.clients.remove(0);
                    }
                    match crate::controlconn::Conn::new(stream, Instant::now()) {
                        Ok(c) => self.clients.push(c),
                        Err(e) => console::error(
                            "control-accept",
                            format_args!("{} ({e})", self.path_shown()),
                        ),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    console::error(
                        "control-accept",
                        format_args!("{} ({e})", self.path_shown()),
                    );
                    return;
                }
            }
        }
    }

    /// Read, answer and write the open control connections as far as their
    /// sockets allow (crate::controlconn); finished ones are dropped.
    fn serve_clients(&mut self, now: Instant) {
        use crate::controlconn::Step;
        let mut clients = std::mem::take(&mut self.clients);
        clients.retain_mut(|c| match c.advance(now) {
            Step::Pending => true,
            Step::Done => false,
            Step::Request(line) => {
                let (reply, then) = self.answer(&line);
                let open = c.reply(reply, now) == Step::Pending;
                if let Some(kind) = then {
                    self.request_shutdown(kind);
                }
                open
            }
        });
        self.clients = clients;
        if self.clients.len() < crate::controlconn::MAX_CONNECTIONS / 2 {
            self.clients_full_said = false;
        }
    }

    fn path_shown(&self) -> String {
        self.control_path
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    /// The reply to one request line, and the shutdown it asks for.
    fn answer(&mut self, line: &str) -> (String, Option<ShutdownKind>) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["status"] => {
                self.check_verity(Instant::now(), true);
                (self.status_text(), None)
            }
            ["status", "--json"] => {
                self.check_verity(Instant::now(), true);
                (format!("{}\n", self.status_json()), None)
            }
            ["reboot"] => ("ok reboot\n".to_string(), Some(ShutdownKind::Reboot)),
            ["reboot", "tryboot"] => (
                "ok reboot tryboot\n".to_string(),
                Some(ShutdownKind::RebootTryboot),
            ),
            ["reboot", "partition", n] => match n.parse::<u8>() {
                Ok(p) if crate::rpi::slot_of_boot_partition(p.into()).is_some() => (
                    format!("ok reboot partition {p}\n"),
                    Some(ShutdownKind::RebootPartition(p)),
                ),
                _ => (
                    format!("error reboot partition {n:?}: not a slot's boot partition\n"),
                    None,
                ),
            },
            ["poweroff"] => ("ok poweroff\n".to_string(), Some(ShutdownKind::PowerOff)),
            ["logs"] => (crate::logs::reply(None, 0), None),
            ["logs", "--since", n] => (crate::logs::reply(None, n.parse().unwrap_or(0)), None),
            ["logs", name] => (crate::logs::reply(Some(name), 0), None),
            ["logs", name, "--since", n] => {
                (crate::logs::reply(Some(name), n.parse().unwrap_or(0)), None)
            }
            ["boot-time"] => (self.boot_time_text(), None),
            // Test hook for the watchdog: the loop keeps running but stops petting.
            ["debug", "stop-watchdog"] => {
                self.watchdog_stopped = true;
                let reply = match &self.watchdog {
                    Some(w) => format!(
                        "ok watchdog no longer petted, reset in {} s\n",
                        w.timeout_secs
                    ),
                    None => "error no watchdog\n".to_string(),
                };
                (reply, None)
            }
            _ => (format!("error unknown command {:?}\n", line.trim()), None),
        }
    }

    fn state_name(&self, u: &Unit) -> &'static str {
        match u.state {
            State::Waiting => "waiting",
            State::Running if u.stop.is_some() => "stopping",
            State::Running if u.ready => "ready",
            State::Running => "starting",
            State::Backoff => "backoff",
            State::Exited => "exited",
            State::Stopped => "stopped",
            State::Blocked => "blocked",
        }
    }

    fn boot_time_text(&self) -> String {
        let k = crate::service::KUBERNETES_SERVICE;
        let (exec, ready) = self.milestones(k);
        let mut text = crate::boottime::render(&self.info.boot, exec, ready, self.all_ready_ms);
        if let (Some(at), Some(cpu)) = (exec, self.cpu_until_exec(k)) {
            text.push_str(&crate::boottime::render_cpu(
                at.saturating_sub(self.info.boot.stage1_start_ms),
                cpu,
            ));
        }
        text
    }

    /// Read whatever the services wrote, into the ring (and the console).
    fn drain_logs(&mut self) {
        for i in 0..self.units.len() {
            self.drain_unit(i);
        }
    }

    /// Read what unit `i` wrote so far into the log ring (and the console).
    fn drain_unit(&mut self, i: usize) {
        let mut buf = [0u8; 4096];
        let u = &mut self.units[i];
        let Some((r, _)) = &u.log_pipe else {
            return;
        };
        // Bounded: a chatty service cannot starve the loop.
        for _ in 0..16 {
            let n = match sys::read_nonblocking(r, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            for line in crate::logs::split_lines(&mut u.log_pending, &buf[..n]) {
                if crate::logs::record(&u.def.name, &line) {
                    console::raw_line(&line);
                }
            }
        }
    }

    fn pet_watchdog(&mut self, now: Instant) {
        if self.watchdog_stopped {
            return;
        }
        if let Some(w) = &mut self.watchdog
            && now.duration_since(self.last_pet) >= pet_interval(w.timeout_secs) / 2
        {
            if let Err(e) = w.pet() {
                console::error("watchdog", e);
            }
            self.last_pet = now;
        }
    }

    /// Ask device-mapper whether the root's verity target has seen a
    /// corrupted block (at most once a second unless `now_please`); report
    /// the first detection on the console.
    fn check_verity(&mut self, now: Instant, now_please: bool) {
        let Some(name) = self.info.verity.clone() else {
            return;
        };
        if self.verity_corrupted
            || (!now_please
                && self
                    .verity_checked
                    .is_some_and(|t| now.duration_since(t) < VERITY_CHECK))
        {
            return;
        }
        self.verity_checked = Some(now);
        let mut dm = crate::verity::KernelDeviceMapper::default();
        match crate::verity::DeviceMapper::verity_status(&mut dm, &name) {
            Ok(st) if crate::verity::corrupted(&st) => {
                self.verity_corrupted = true;
                console::error(
                    "verity",
                    format_args!(
                        "corruption detected on {name} (status {st}): reads of corrupted blocks fail with EIO"
                    ),
                );
            }
            Ok(_) => {}
            Err(e) => console::error("verity", e),
        }
    }

    /// `verity` in status and ready reports: `null` without verity, else
    /// `{"device": <mapping>, "corrupted": bool}`.
    pub fn verity_json(&self) -> Json {
        match &self.info.verity {
            None => Json::Null,
            Some(name) => Json::Obj(vec![
                ("device", Json::str(name)),
                ("corrupted", Json::Bool(self.verity_corrupted)),
            ]),
        }
    }

    /// The `basaltctl status --json` reply.
    pub fn status_json(&self) -> Json {
        let services = self
            .units
            .iter()
            .map(|u| {
                Json::Obj(vec![
                    ("name", Json::str(&u.def.name)),
                    ("state", Json::str(self.state_name(u))),
                    ("pid", Json::opt_num(u.pid.map(|p| p as u64))),
                    ("restarts", Json::Num(u.restarts as u64)),
                    (
                        "last_exit",
                        u.last_exit.map_or(Json::Null, |s| Json::str(s.to_string())),
                    ),
                ])
            })
            .collect();
        Json::Obj(vec![
            ("slot", Json::str(&self.info.slot)),
            ("hostname", Json::str(&self.info.hostname)),
            ("machine_id", Json::str(&self.info.machine_id)),
            (
                "uptime_ms",
                Json::Num(crate::report::uptime_ms(&self.proc_dir)),
            ),
            ("ready", Json::Bool(self.all_ready_at.is_some())),
            ("verity", self.verity_json()),
            ("services", Json::Arr(services)),
        ])
    }

    fn status_text(&self) -> String {
        use std::fmt::Write as _;
        let up = crate::report::uptime_ms(&self.proc_dir);
        let mut s = String::new();
        let _ = writeln!(s, "slot:       {}", self.info.slot);
        let _ = writeln!(s, "hostname:   {}", self.info.hostname);
        let _ = writeln!(s, "machine-id: {}", self.info.machine_id);
        let _ = writeln!(s, "uptime:     {}.{:03} s", up / 1000, up % 1000);
        let _ = writeln!(
            s,
            "ready:      {}",
            if self.all_ready_at.is_some() {
                "yes"
            } else {
                "no"
            }
        );
        let _ = writeln!(
            s,
            "verity:     {}",
            match &self.info.verity {
                None => "off".to_string(),
                Some(n) if self.verity_corrupted => format!("{n} CORRUPTION DETECTED"),
                Some(n) => format!("{n} ok"),
            }
        );
        let _ = writeln!(
            s,
            "{:<20} {:<9} {:>7} {:>8}",
            "SERVICE", "STATE", "PID", "RESTARTS"
        );
        for u in &self.units {
            let pid = u.pid.map_or("-".to_string(), |p| p.to_string());
            let _ = writeln!(
                s,
                "{:<20} {:<9} {:>7} {:>8}",
                u.def.name,
                self.state_name(u),
                pid,
                u.restarts
            );
        }
        s
    }
}

/// Pet at least this often: a third of the timeout (the loop may pet earlier).
fn pet_interval(timeout_secs: u32) -> Duration {
    Duration::from_millis(u64::from(timeout_secs.max(1)) * 1000 / 3)
}

/// Seconds the watchdog waits for a pet before resetting the machine.
pub const WATCHDOG_TIMEOUT_SECS: u32 = 10;

fn open_watchdog(path: Option<&Path>) -> Option<sys::watchdog::Watchdog> {
    let path = path?;
    if !path.exists() {
        return None;
    }
    match sys::watchdog::Watchdog::open(path, WATCHDOG_TIMEOUT_SECS) {
        Ok(w) => {
            crate::say!(
                "watchdog {} armed, timeout {} s",
                path.display(),
                w.timeout_secs
            );
            Some(w)
        }
        Err(e) => {
            console::error("watchdog", format_args!("{} ({e})", path.display()));
            None
        }
    }
}

/// Signal a service's process group, or the process alone if it left the group.
fn signal_group(pid: i32, sig: Signal) {
    if sys::kill(-pid, sig).is_err() {
        let _ = sys::kill(pid, sig);
    }
}

fn open_control(path: &Path) -> Option<UnixListener> {
    if let Some(dir) = path.parent()
        && let Err(e) = std::fs::create_dir_all(dir)
    {
        console::error("control-socket", format_args!("{} ({e})", dir.display()));
        return None;
    }
    // A socket left by a previous PID 1 (e.g. stage 2 after a crash) blocks bind.
    let _ = std::fs::remove_file(path);
    match UnixListener::bind(path) {
        Ok(l) => {
            if let Err(e) = l.set_nonblocking(true) {
                console::error("control-socket", format_args!("{} ({e})", path.display()));
            }
            Some(l)
        }
        Err(e) => {
            console::error("control-socket", format_args!("{} ({e})", path.display()));
            None
        }
    }
}

/// One plain-HTTP GET; ready on a 2xx status line.
fn http_ok(addr: &std::net::SocketAddr, host: &str, path: &str, timeout: Duration) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(addr, timeout) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut line = String::new();
    if BufReader::new(s.take(256)).read_line(&mut line).is_err() {
        return false;
    }
    parse_status_code(&line).is_some_and(|c| (200..300).contains(&c))
}

fn parse_status_code(status_line: &str) -> Option<u16> {
    let mut it = status_line.split_whitespace();
    let proto = it.next()?;
    if !proto.starts_with("HTTP/") {
        return None;
    }
    it.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serve one canned response per connection, recording the request line.
    fn canned_server(
        response: &'static str,
    ) -> (std::net::SocketAddr, std::sync::mpsc::Receiver<String>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let mut line = String::new();
                let mut r = BufReader::new(&s);
                let _ = r.read_line(&mut line);
                let _ = tx.send(line);
                let _ = (&s).write_all(response.as_bytes());
            }
        });
        (addr, rx)
    }

    #[test]
    fn http_probe_wants_2xx() {
        let t = Duration::from_millis(500);
        let (ok, rx) = canned_server("HTTP/1.1 204 No Content\r\n\r\n");
        assert!(http_ok(&ok, "127.0.0.1", "/healthz", t));
        assert_eq!(rx.recv().unwrap(), "GET /healthz HTTP/1.0\r\n");
        let (bad, _rx) = canned_server("HTTP/1.1 503 Service Unavailable\r\n\r\n");
        assert!(!http_ok(&bad, "127.0.0.1", "/", t));
        let (junk, _rx) = canned_server("SSH-2.0-x\r\n");
        assert!(!http_ok(&junk, "127.0.0.1", "/", t));
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(!http_ok(&closed, "127.0.0.1", "/", t));
    }

    #[test]
    fn http_status_lines() {
        assert_eq!(parse_status_code("HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            parse_status_code("HTTP/1.0 503 Service Unavailable"),
            Some(503)
        );
        assert_eq!(parse_status_code("SSH-2.0-OpenSSH"), None);
        assert_eq!(parse_status_code(""), None);
    }
}
