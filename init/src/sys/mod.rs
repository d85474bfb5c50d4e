//! The only place in init that talks to the kernel directly: mounts, modules,
//! reboot, block-device ioctls, signals and child reaping. Every `unsafe`
//! block of the crate lives under this module and says why it is sound.
//!
//! Logic above this module talks to the small traits in `mounts`, `modules`
//! and `blockdev`, so it can be tested with fakes; this module must never
//! grow policy (what to mount, when to retry).

pub mod block;
pub mod dm;
pub mod netlink;
pub mod watchdog;

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;

pub use nix::errno::Errno;
pub use nix::mount::{MntFlags, MsFlags};
pub use nix::sys::signal::Signal;
pub use nix::sys::wait::WaitStatus;
pub use nix::unistd::Pid;

use nix::sys::signal::SigSet;
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::WaitPidFlag;

/// `mount(2)`.
pub fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), Errno> {
    nix::mount::mount(source, target, fstype, flags, data)
}

/// `umount2(2)`.
pub fn umount(target: &Path, flags: MntFlags) -> Result<(), Errno> {
    nix::mount::umount2(target, flags)
}

/// `finit_module(2)` with no parameters. `compressed` asks the kernel to
/// decompress the file itself (`MODULE_INIT_COMPRESSED_FILE`, Linux 6.4+,
/// for `.ko.gz`/`.ko.xz`/`.ko.zst` as Alpine ships them).
pub fn finit_module(file: &File, compressed: bool) -> Result<(), Errno> {
    // MODULE_INIT_COMPRESSED_FILE from linux/module.h; nix has no name for it.
    const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;
    let flags = if compressed {
        nix::kmod::ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE)
    } else {
        nix::kmod::ModuleInitFlags::empty()
    };
    nix::kmod::finit_module(file.as_fd(), c"", flags)
}

/// How to leave the running system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebootHow {
    Restart,
    PowerOff,
    Halt,
    /// `LINUX_REBOOT_CMD_RESTART2` with an argument the platform's reboot
    /// handler reads (Raspberry Pi: `"0 tryboot"`, REFERENCE.md §1.5).
    Restart2(String),
}

/// `reboot(2)`. Returns only on failure.
pub fn reboot(how: &RebootHow) -> Errno {
    use nix::sys::reboot::RebootMode;
    let mode = match how {
        RebootHow::Restart => RebootMode::RB_AUTOBOOT,
        RebootHow::PowerOff => RebootMode::RB_POWER_OFF,
        RebootHow::Halt => RebootMode::RB_HALT_SYSTEM,
        RebootHow::Restart2(arg) => return reboot_restart2(arg),
    };
    match nix::sys::reboot::reboot(mode) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn reboot_restart2(arg: &str) -> Errno {
    let Ok(arg) = CString::new(arg) else {
        return Errno::EINVAL;
    };
    // SAFETY: the raw reboot syscall with RESTART2 reads a NUL-terminated
    // string from the fourth argument; `arg` is a valid CString that outlives
    // the call. The magic numbers are the kernel's ABI (reboot(2)).
    let res = unsafe {
        libc::syscall(
            libc::SYS_reboot,
            libc::LINUX_REBOOT_MAGIC1,
            libc::LINUX_REBOOT_MAGIC2,
            libc::LINUX_REBOOT_CMD_RESTART2,
            arg.as_ptr(),
        )
    };
    if res == 0 {
        Errno::UnknownErrno
    } else {
        Errno::last()
    }
}

/// Ask the kernel to send SIGINT to PID 1 on ctrl-alt-del instead of rebooting at once.
pub fn ctrl_alt_del_to_signal() -> Result<(), Errno> {
    nix::sys::reboot::set_cad_enabled(false)
}

/// Set `IFF_UP` on a network interface (`SIOCGIFFLAGS` then `SIOCSIFFLAGS`).
/// Used for `lo`: nothing answers on 127.0.0.1 until it is up.
pub fn interface_up(name: &str) -> Result<(), Errno> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(Errno::EINVAL);
    }
    // SAFETY: socket(2) with constant arguments; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: `fd` is a fresh, valid descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads `req.ifr_name` and writes `ifru_flags` of a
    // correctly sized, initialised ifreq that lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the union member written by SIOCGIFFLAGS is `ifru_flags`.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above; SIOCSIFFLAGS only reads the ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// `sync(2)`.
pub fn sync() {
    nix::unistd::sync();
}

/// `chroot(2)`.
pub fn chroot(path: &Path) -> Result<(), Errno> {
    nix::unistd::chroot(path)
}

/// `sethostname(2)`.
pub fn sethostname(name: &str) -> Result<(), Errno> {
    nix::unistd::sethostname(name)
}

/// Point stdin, stdout and stderr at `console` (stage 1 starts with whatever
/// the kernel opened, possibly nothing).
pub fn reopen_stdio(console: &File) -> Result<(), Errno> {
    nix::unistd::dup2_stdin(console)?;
    nix::unistd::dup2_stdout(console)?;
    nix::unistd::dup2_stderr(console)
}

/// Fill `buf` from the kernel's random pool (`getrandom(2)`, blocking until seeded).
pub fn getrandom(buf: &mut [u8]) -> Result<(), Errno> {
    getrandom_with(buf, 0)
}

/// Fill `buf` with random bytes without waiting for the pool to be seeded
/// (`GRND_INSECURE`, Linux 5.6; on older kernels the blocking call, which
/// waits at most until the pool is seeded). For what must be unique, not
/// secret: GUIDs written in stage 1, before anything has fed the pool.
pub fn getrandom_insecure(buf: &mut [u8]) -> Result<(), Errno> {
    const GRND_INSECURE: libc::c_uint = 0x0004;
    match getrandom_with(buf, GRND_INSECURE) {
        Err(Errno::EINVAL) => getrandom_with(buf, 0),
        r => r,
    }
}

fn getrandom_with(buf: &mut [u8], flags: libc::c_uint) -> Result<(), Errno> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe the writable, initialised
        // slice `rest`, which the kernel fills with at most `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), flags) };
        if n < 0 {
            let e = Errno::last();
            if e == Errno::EINTR {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

/// The CPUs this process may run on (`sched_getaffinity(2)`); 1 when unknown.
pub fn cpu_count() -> usize {
    let mut set = std::mem::MaybeUninit::<libc::cpu_set_t>::zeroed();
    // SAFETY: the set is zeroed and its size is passed; the kernel writes
    // at most that many bytes.
    let ok = unsafe {
        libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set.as_mut_ptr())
    } == 0;
    if !ok {
        return 1;
    }
    // SAFETY: initialised (zeroed, then filled by the kernel); CPU_COUNT
    // only reads the set.
    let n = unsafe { libc::CPU_COUNT(&set.assume_init()) };
    (n as usize).max(1)
}

/// This process's pid.
pub fn getpid() -> u32 {
    std::process::id()
}

/// Become the reaper of orphaned descendants (what PID 1 is by nature; used
/// when the supervisor runs as an ordinary process, e.g. in tests).
pub fn set_child_subreaper() -> Result<(), Errno> {
    nix::sys::prctl::set_child_subreaper(true)
}

/// `kill(2)`; `pid` may be negative (a process group) or -1 (everything we may signal).
pub fn kill(pid: i32, sig: Signal) -> Result<(), Errno> {
    nix::sys::signal::kill(Pid::from_raw(pid), sig)
}

/// One reaped child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    pub pid: i32,
    pub status: ExitStatus,
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "code={c}"),
            ExitStatus::Signal(s) => match Signal::try_from(*s) {
                Ok(sig) => write!(f, "signal={}", sig.as_str()),
                Err(_) => write!(f, "signal={s}"),
            },
        }
    }
}

/// `waitpid(-1, WNOHANG)`: one exited child, or `None` when no child has
/// exited (or there are no children at all).
pub fn reap_one() -> Option<Reaped> {
    loop {
        match nix::sys::wait::waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => {
                return Some(Reaped {
                    pid: pid.as_raw(),
                    status: ExitStatus::Code(code),
                });
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                return Some(Reaped {
                    pid: pid.as_raw(),
                    status: ExitStatus::Signal(sig as i32),
                });
            }
            Ok(WaitStatus::StillAlive) => return None,
            // Stopped/continued children are not exits; keep draining.
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            Err(_) => return None,
        }
    }
}

/// Signals PID 1 acts on, delivered through a signalfd so the event loop
/// sees them as readable input instead of asynchronous handlers.
pub struct Signals {
    fd: SignalFd,
}

impl std::fmt::Debug for Signals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signals")
    }
}

impl Signals {
    /// Block `signals` for this thread and open a non-blocking signalfd for them.
    /// Children get an empty mask back: std's `Command` resets it before exec.
    pub fn open(signals: &[Signal]) -> Result<Signals, Errno> {
        let mut set = SigSet::empty();
        for s in signals {
            set.add(*s);
        }
        set.thread_block()?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(Signals { fd })
    }

    /// The next pending signal, if any.
    pub fn next(&self) -> Option<Signal> {
        loop {
            match self.fd.read_signal() {
                Ok(Some(info)) => match Signal::try_from(info.ssi_signo as i32) {
                    Ok(s) => return Some(s),
                    Err(_) => continue,
                },
                Ok(None) => return None,
                Err(Errno::EINTR) => continue,
                Err(_) => return None,
            }
        }
    }

    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// `poll(2)` on `fds` (each polled for input); returns which are readable.
/// `timeout_ms` of `None` waits forever.
pub fn poll_readable(
    fds: &[std::os::fd::BorrowedFd<'_>],
    timeout_ms: Option<u32>,
) -> Result<Vec<bool>, Errno> {
    let fds: Vec<_> = fds.iter().map(|fd| (*fd, false)).collect();
    poll_ready(&fds, timeout_ms)
}

/// `poll(2)` on `fds`, each for input or, with `true`, for room to write;
/// returns which are ready (or hung up, or in error).
pub fn poll_ready(
    fds: &[(std::os::fd::BorrowedFd<'_>, bool)],
    timeout_ms: Option<u32>,
) -> Result<Vec<bool>, Errno> {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|(fd, write)| {
            PollFd::new(
                *fd,
                if *write {
                    PollFlags::POLLOUT
                } else {
                    PollFlags::POLLIN
                },
            )
        })
        .collect();
    let timeout = match timeout_ms {
        None => PollTimeout::NONE,
        Some(ms) => {
            PollTimeout::try_from(ms.min(i32::MAX as u32) as i32).unwrap_or(PollTimeout::MAX)
        }
    };
    match nix::poll::poll(&mut pfds, timeout) {
        Ok(_) => {}
        Err(Errno::EINTR) => {}
        Err(e) => return Err(e),
    }
    Ok(pfds
        .iter()
        .map(|p| {
            p.revents().is_some_and(|r| {
                r.intersects(
                    PollFlags::POLLIN
                        | PollFlags::POLLOUT
                        | PollFlags::POLLHUP
                        | PollFlags::POLLERR,
                )
            })
        })
        .collect())
}

/// `pidfd_open(2)`: a descriptor that becomes readable when process `pid`
/// (a child of ours) exits (Linux 5.3+).
pub fn pidfd_open(pid: u32) -> Result<std::os::fd::OwnedFd, Errno> {
    use std::os::fd::FromRawFd;
    let pid = libc::pid_t::try_from(pid).map_err(|_| Errno::EINVAL)?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Filesystem block size and total blocks of the filesystem mounted at `path`.
pub fn statfs_blocks(path: &Path) -> Result<(u64, u64), Errno> {
    let st = nix::sys::statfs::statfs(path)?;
    Ok((st.block_size() as u64, st.blocks()))
}

/// Whether `path` is on the initramfs (ramfs or tmpfs): the only kind of
/// root stage 1 may delete files from before `switch_root`.
pub fn is_ramfs(path: &Path) -> bool {
    // RAMFS_MAGIC from linux/magic.h (not exported by libc).
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    // The casts are no-ops on 64-bit targets but not on 32-bit ARM, where
    // the statfs type field is narrower.
    #[allow(clippy::unnecessary_cast)]
    nix::sys::statfs::statfs(path).is_ok_and(|s| {
        let t = s.filesystem_type().0 as i64;
        t == RAMFS_MAGIC || t == libc::TMPFS_MAGIC as i64
    })
}

/// Run `probe` in a forked child that exits 0 when it returns true, 1 when it
/// returns false (or panics); the caller reaps it like any child. PID 1 uses
/// this for network readiness checks, so a slow or silent peer blocks a child,
/// never the supervision loop. PID 1 is single-threaded, so the child may
/// allocate and make any call.
pub fn fork_probe(probe: impl FnOnce() -> bool) -> Result<i32, Errno> {
    // SAFETY: fork in a single-threaded process; the child runs `probe` and
    // leaves with _exit (no atexit handlers, no unwinding into the parent's
    // frames), the parent only records the pid.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(child.as_raw()),
        nix::unistd::ForkResult::Child => {
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(probe)).unwrap_or(false);
            // SAFETY: _exit ends the child at once; nothing else runs.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
    }
}

/// Make `cmd`'s child a session leader whose controlling terminal is its
/// stdin (the console), with an empty signal mask: an interactive shell on
/// `/dev/console` that gets ^C, and job control.
pub fn console_session(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: runs in the forked child before exec: setsid, ioctl(TIOCSCTTY),
    // sigemptyset and sigprocmask are async-signal-safe; nothing is allocated.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Steal the console from any other session (arg 1): PID 1 owns it.
            if libc::ioctl(0, libc::TIOCSCTTY, 1) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(set.as_mut_ptr());
            if libc::pthread_sigmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The kernel's device events (a `NETLINK_KOBJECT_UEVENT` socket): a wait
/// for a device wakes when the kernel announces one instead of on a
/// polling tick. Only the wake-up is used: the waiter looks at sysfs again.
#[derive(Debug)]
pub struct Uevents {
    fd: std::os::fd::OwnedFd,
}

impl Uevents {
    /// Listen to the kernel's uevent broadcast (group 1).
    pub fn open() -> Result<Uevents, Errno> {
        use std::os::fd::FromRawFd;
        // SAFETY: socket(2) with constant arguments; a new descriptor or -1.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_KOBJECT_UEVENT,
            )
        };
        if fd < 0 {
            return Err(Errno::last());
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = 1;
        use std::os::fd::AsRawFd;
        // SAFETY: bind reads `addr` of the size given.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(Errno::last());
        }
        Ok(Uevents { fd })
    }

    /// Wait until the kernel sends an event, at most `timeout`; read (and
    /// drop) every event queued. Whether one came.
    pub fn wait(&self, timeout: std::time::Duration) -> bool {
        use std::os::fd::{AsFd, AsRawFd};
        let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let ready = poll_readable(&[self.fd.as_fd()], Some(ms))
            .is_ok_and(|r| r.first().copied().unwrap_or(false));
        if ready {
            let mut buf = [0u8; 2048];
            // SAFETY: recv writes at most buf.len() bytes into buf; the
            // socket is non-blocking, so this ends at EAGAIN.
            while unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            } >= 0
            {}
        }
        ready
    }

    /// The socket, for a caller's own `poll` set.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// Hand every queued event's bytes to `each`, without blocking. `Err`
    /// is the socket's error: `ENOBUFS` means the kernel dropped events
    /// (the queue overflowed), so a caller that needs them all must look at
    /// sysfs instead.
    pub fn drain(&self, mut each: impl FnMut(&[u8])) -> Result<(), Errno> {
        use std::os::fd::AsRawFd;
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: recv writes at most buf.len() bytes into buf.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            match usize::try_from(n) {
                Ok(n) => each(buf.get(..n).unwrap_or_default()),
                Err(_) => match Errno::last() {
                    Errno::EAGAIN => return Ok(()),
                    Errno::EINTR => {}
                    e => return Err(e),
                },
            }
        }
    }
}

/// Run `f` in a forked copy of this process and return the copy's pid, for
/// work whose memory must never be this process's (PID 1's node config
/// child). No exec: the copy runs the code already loaded (and, under
/// QEMU TCG, already translated) at the same addresses, and starts in
/// microseconds. It starts the way an exec'd child of ours would: an empty
/// signal mask, stdin on `/dev/null`, stdout and stderr on `out` (inherited
/// when `None`), every other file descriptor closed (ours are all
/// close-on-exec). It exits with `f`'s code — 101 when `f` panics — by
/// `_exit`, so it never returns into the caller's stack and runs none of
/// the caller's exit handlers. Call it only while this process has a single
/// thread: the copy has only the calling one, and a lock another thread held
/// would stay locked in it.
pub fn fork_run(out: Option<&File>, f: impl FnOnce() -> i32) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    let out = out.map(AsRawFd::as_raw_fd);
    // Rust's stdout lock may be held by another thread at the fork (only in
    // tests: PID 1 forks with one thread); the copy must not wait for it.
    let flush = std::fs::read_dir("/proc/self/task").map_or(true, |d| d.count() == 1);
    // SAFETY: fork(2) itself is safe to call; the child side below touches
    // only its own copy of this (single-threaded) process and ends in _exit.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            let code = forked_child(out, f, flush);
            // SAFETY: _exit ends the copy; nothing of the caller's runs.
            unsafe { libc::_exit(code) }
        }
        pid => Ok(pid.unsigned_abs()),
    }
}

fn forked_child(out: Option<std::os::fd::RawFd>, f: impl FnOnce() -> i32, flush: bool) -> i32 {
    // SAFETY: plain system calls on this process's own descriptors and
    // signal mask; no Rust object owns descriptors 0-2 or those closed here
    // in a way that is used again (the copy runs only `f` after this).
    unsafe {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(set.as_mut_ptr());
        libc::pthread_sigmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut());
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null >= 0 {
            libc::dup2(null, 0);
        }
        if let Some(fd) = out {
            libc::dup2(fd, 1);
            libc::dup2(fd, 2);
        }
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            // Kernels before 5.9.
            for fd in 3..1024 {
                libc::close(fd);
            }
        }
    }
    let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
    if flush {
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    code
}

/// Only `PATH` in the environment, as for an exec'd child given only that.
/// For [`fork_run`]'s copy, which has a single thread: nothing reads the
/// environment while it changes.
pub fn clear_env_in_forked_child(path: &str) {
    let names: Vec<std::ffi::OsString> = std::env::vars_os().map(|(k, _)| k).collect();
    // SAFETY: single-threaded (see above).
    unsafe {
        for k in names {
            std::env::remove_var(k);
        }
        std::env::set_var("PATH", path);
    }
}

/// SIGKILL a child of ours and wait for it, at most `grace`: a child stuck
/// in the kernel (a dead disk) cannot be reaped, and PID 1 must not wait
/// for it forever; the supervisor reaps it later like any orphan. Whether
/// it was reaped.
pub fn kill_and_wait(pid: u32, grace: std::time::Duration) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: signals our own child.
    unsafe {
        libc::kill(raw, libc::SIGKILL);
    }
    let end = std::time::Instant::now() + grace;
    loop {
        match try_wait(pid) {
            Ok(Some(_)) => return true,
            Ok(None) if std::time::Instant::now() < end => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            _ => return false,
        }
    }
}

/// The calling thread's name (`/proc/<pid>/comm`, what `ps` and `top`
/// show; the kernel keeps the first 15 bytes).
pub fn set_thread_name(name: &str) {
    let Ok(c) = CString::new(name) else { return };
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of which the kernel
    // copies at most 16 bytes.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c.as_ptr());
    }
}

/// `waitpid(pid, WNOHANG)` for one child: its status once it has exited.
pub fn try_wait(pid: u32) -> std::io::Result<Option<std::process::ExitStatus>> {
    use std::os::unix::process::ExitStatusExt;
    let pid = i32::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into the local.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            0 => return Ok(None),
            -1 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            _ if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) => {
                return Ok(Some(std::process::ExitStatus::from_raw(status)));
            }
            // Stopped or continued: not an exit.
            _ => return Ok(None),
        }
    }
}

/// Make `cmd`'s child start with an empty signal mask. PID 1 blocks the
/// signals it reads through its signalfd, and std's `Command` passes the
/// mask on to children (it no longer resets it), so without this a service
/// could not be stopped with SIGTERM.
pub fn unblock_signals_in_child(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: sigemptyset and pthread_sigmask
    // (sigprocmask) are; the closure captures nothing and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(set.as_mut_ptr());
            if libc::pthread_sigmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Milliseconds since the kernel started (`CLOCK_BOOTTIME`, the clock behind
/// `/proc/uptime`, at millisecond instead of centisecond resolution).
/// This process's CPU time so far, (user µs, system µs) (`getrusage`): PID 1
/// keeps its usage across stage 1's exec of stage 2. The kernel splits the
/// precise total between user and system by tick sampling, so the split is an
/// estimate at a few ms resolution.
pub fn own_cpu_us() -> (u64, u64) {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF).map_or((0, 0), |u| {
        let us = |t: nix::sys::time::TimeVal| {
            (t.tv_sec().max(0) as u64) * 1_000_000 + t.tv_usec().max(0) as u64
        };
        (us(u.user_time()), us(u.system_time()))
    })
}

pub fn boottime_ms() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_BOOTTIME).map_or(0, |t| {
        (t.tv_sec() as u64).saturating_mul(1000) + (t.tv_nsec() as u64) / 1_000_000
    })
}

/// A pipe for a service's output: `(read end, write end)`, both close-on-exec
/// (the child gets a dup without the flag); the read end is non-blocking.
pub fn log_pipe() -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd), Errno> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    fcntl(&r, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    Ok((r, w))
}

/// `read(2)` on a non-blocking fd: `Ok(0)` also when nothing is there (EAGAIN).
pub fn read_nonblocking(fd: &std::os::fd::OwnedFd, buf: &mut [u8]) -> Result<usize, Errno> {
    match nix::unistd::read(fd, buf) {
        Ok(n) => Ok(n),
        Err(Errno::EAGAIN) => Ok(0),
        Err(e) => Err(e),
    }
}

/// Address ranges of `exe`'s code (`r-xp` mappings) in `/proc/self/maps` text.
pub fn code_ranges(maps: &str, exe: &str) -> Vec<(usize, usize)> {
    // A deleted binary (stage 2 runs the initramfs' /init, which switch_root
    // removed) reads `/init (deleted)` in both the link and the maps line.
    let exe = exe.trim_end_matches(" (deleted)");
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let path = f.nth(3)?;
            if perms != "r-xp" || path != exe {
                return None;
            }
            let (s, e) = range.split_once('-')?;
            Some((
                usize::from_str_radix(s, 16).ok()?,
                usize::from_str_radix(e, 16).ok()?,
            ))
        })
        .collect()
}

/// Drop this program's code pages from its page tables (`MADV_DONTNEED` on
/// its `r-xp` mappings), then the binary's unmapped pages from the page cache
/// (`POSIX_FADV_DONTNEED`); the code it runs afterwards faults back in.
/// Stage 2 calls it after the node config child (the same binary) ran: the
/// child pulled most of the binary into the page cache, and the kernel's
/// fault-around would otherwise map PID 1 up to 64 KiB of cached neighbours
/// for every page it touches (its RSS grew by ~700 KiB that way).
/// Returns the bytes released.
pub fn release_code_pages() -> Result<usize, Errno> {
    let exe = std::fs::read_link("/proc/self/exe").map_err(|_| Errno::ENOENT)?;
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|_| Errno::EIO)?;
    let mut total = 0;
    for (start, end) in code_ranges(&maps, &exe.to_string_lossy()) {
        // SAFETY: the range is a private, never-written (r-x) file mapping of
        // our own binary: MADV_DONTNEED only removes its page table entries,
        // the next access reads the same bytes back from the file. No Rust
        // object lives in it and no mapping is removed.
        let r =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(Errno::last());
        }
        total += end - start;
    }
    // Through the magic link: the binary may be deleted (stage 2 runs from the
    // initramfs' /init, removed by switch_root), its path then unopenable.
    let f = File::open("/proc/self/exe").map_err(|_| Errno::ENOENT)?;
    nix::fcntl::posix_fadvise(
        &f,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )?;
    Ok(total)
}

/// Turn the kernel's fault-around off (`fault_around_bytes` = one page, in
/// debugfs, mounted for the write and unmounted again). With it on, every
/// page fault on a file mapping also maps up to 64 KiB of neighbouring pages
/// that happen to be in the page cache; PID 1's code is scattered over a
/// binary that also holds the node config parser, so fault-around made its
/// RSS ~600 KiB larger than the code it runs. Android's low-memory devices
/// set the same.
pub fn disable_fault_around() -> Result<(), Errno> {
    let dir = Path::new("/sys/kernel/debug");
    let knob = dir.join("fault_around_bytes");
    let mounted_here = if knob.exists() {
        false
    } else {
        mount(
            Some("debugfs"),
            dir,
            Some("debugfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        )?;
        true
    };
    let r = std::fs::write(&knob, "4096\n")
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)));
    if mounted_here {
        let _ = umount(dir, MntFlags::empty());
    }
    r
}

#[cfg(test)]
mod code_tests {
    use super::*;

    /// A device event wakes the wait (the kernel's own: a synthetic
    /// `change` of /dev/null's device, as `udevadm trigger` makes), and the
    /// queue is drained by it.
    #[test]
    fn uevents_wake_the_wait() {
        let u = Uevents::open().expect("uevent socket");
        let t0 = std::time::Instant::now();
        if let Err(e) = std::fs::write("/sys/devices/virtual/mem/null/uevent", "change") {
            // Not root, or a read-only /sys: no way to make an event here.
            eprintln!("skipped: cannot trigger a uevent ({e})");
            return;
        }
        assert!(u.wait(std::time::Duration::from_secs(5)), "no event");
        assert!(t0.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn code_ranges_of_the_binary_only() {
        let maps = "\
55d0c0000000-55d0c0010000 r--p 00000000 fd:00 123 /usr/lib/basalt/init
55d0c0010000-55d0c0170000 r-xp 00010000 fd:00 123 /usr/lib/basalt/init
55d0c0170000-55d0c01a0000 r--p 00170000 fd:00 123 /usr/lib/basalt/init
55d0c01a0000-55d0c01a4000 rw-p 001a0000 fd:00 123 /usr/lib/basalt/init
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
7ffd00100000-7ffd00102000 r-xp 00000000 00:00 0 [vdso]
";
        assert_eq!(
            code_ranges(maps, "/usr/lib/basalt/init"),
            [(0x55d0c0010000, 0x55d0c0170000)]
        );
        // In this test process: releasing the code pages and running on works.
        assert!(release_code_pages().unwrap() > 0);
        assert_eq!(code_ranges("", "/x"), []);
        // Stage 2 from the initramfs' deleted /init.
        let deleted = "00400000-00500000 r-xp 00001000 00:01 7 /init (deleted)\n";
        assert_eq!(
            code_ranges(deleted, "/init (deleted)"),
            [(0x400000, 0x500000)]
        );
    }
}
