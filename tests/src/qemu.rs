//! One QEMU virtual machine per value, as `../shared/QEMU.md` measured it:
//! `qemu-system-x86_64 -accel tcg -M q35 -cpu max -smp 1 -m 1024 -nodefaults
//! -display none -no-reboot`, OVMF in pflash (code read-only, a writable copy
//! of the variable store per VM unless the test keeps one across boots), the
//! image as a virtio disk, the serial console on QEMU's stdout (read by
//! `console::Console`), QEMU's own messages in a second log, and a monitor
//! socket for `system_powerdown`/`quit`. Dropping a `Vm` kills QEMU.

use crate::assets::{Assets, AssetsError};
use crate::console::{Console, ConsoleError, Pattern};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum QemuError {
    #[error(transparent)]
    Assets(#[from] AssetsError),
    #[error(transparent)]
    Console(#[from] ConsoleError),
    #[error("copying OVMF variables {from} to {to}: {source}")]
    Vars {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("starting {program}: {source} (is qemu-system-x86 installed?)")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("waiting for QEMU: {0}")]
    Wait(std::io::Error),
    #[error(
        "QEMU did not exit within {timeout:?} (console log: {log})\n--- last lines ---\n{tail}"
    )]
    ExitTimeout {
        timeout: Duration,
        log: PathBuf,
        tail: String,
    },
    #[error("QEMU monitor {path}: {source}")]
    Monitor {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How to start a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Short name: logs are `<dir>/<name>.console.log` and `<name>.qemu.log`.
    pub name: String,
    /// Directory for logs, the variable store and the monitor socket.
    pub dir: PathBuf,
    pub disk: PathBuf,
    /// OVMF variable store to use as is (kept across boots); `None`: a fresh
    /// copy of the template in `dir` for this VM.
    pub vars: Option<PathBuf>,
    pub memory_mib: u32,
    pub smp: u32,
    /// QEMU's `-cpu` model (TCG): `max` unless a test wants an older CPU.
    pub cpu: String,
    /// Adds `-device i6300esb` (a watchdog the guest can arm).
    pub watchdog: bool,
    /// How the disk is attached.
    pub disk_bus: DiskBus,
    /// `bootindex=` of the disk's device (not for [`DiskBus::VirtioBlk`] or
    /// [`DiskBus::ScsiHotplug`]): the firmware tries it in that order among
    /// the devices of `extra_args` that have one too.
    pub boot_index: Option<u32>,
    pub extra_args: Vec<String>,
    /// Hard limit on the VM's whole life: past it, QEMU is killed.
    pub lifetime: Duration,
}

impl VmConfig {
    pub fn new(name: &str, dir: &Path, disk: &Path) -> VmConfig {
        VmConfig {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            disk: disk.to_path_buf(),
            vars: None,
            memory_mib: 1024,
            smp: 1,
            cpu: "max".into(),
            watchdog: false,
            disk_bus: DiskBus::VirtioBlk,
            boot_index: None,
            extra_args: Vec::new(),
            lifetime: Duration::from_secs(600),
        }
    }
}

/// The disk's attachment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBus {
    /// `virtio-blk-pci`: the disk is there when its driver has loaded.
    VirtioBlk,
    /// A `virtio-scsi-pci` host with no disk on it: the disk file is opened
    /// (drive `disk0`) and [`Vm::attach_scsi_disk`] plugs it in, when the
    /// test says. The firmware has no disk to boot from: give the kernel
    /// with `-kernel`, `-initrd`, `-append` in `extra_args`.
    ScsiHotplug,
    /// SATA: a disk on q35's built-in AHCI controller (ICH9), port 0.
    Ahci,
    /// An NVMe controller with the disk as its namespace 1.
    Nvme,
    /// A USB mass-storage disk (Bulk-Only Transport) on an xHCI controller.
    Usb,
}

/// The `device_add` that plugs [`DiskBus::ScsiHotplug`]'s disk in.
const SCSI_HOTPLUG: &str = "device_add scsi-hd,drive=disk0,bus=scsi0.0,id=scsidisk0";
/// The `device_del` that pulls it out again.
const SCSI_UNPLUG: &str = "device_del scsidisk0";

/// The disk file as drive `disk0`, for a `-device` to take.
fn drive0(disk: &Path) -> String {
    format!("if=none,id=disk0,format=raw,file={}", disk.display())
}

/// The QEMU program, `QEMU_SYSTEM_X86_64` overriding.
pub fn qemu_program() -> String {
    std::env::var("QEMU_SYSTEM_X86_64").unwrap_or_else(|_| "qemu-system-x86_64".to_string())
}

/// A running VM. Dropping it kills QEMU.
pub struct Vm {
    child: Child,
    pub console: Console,
    monitor: PathBuf,
    deadline: Instant,
    exit: Option<ExitStatus>,
    qemu_log: PathBuf,
}

impl Vm {
    /// The QEMU command line for `cfg` with firmware from `assets`.
    pub fn command(
        cfg: &VmConfig,
        assets: &Assets,
        vars: &Path,
        monitor: &Path,
    ) -> Result<Command, QemuError> {
        let code = assets.ovmf_code()?;
        let mut cmd = Command::new(qemu_program());
        cmd.args(["-accel", "tcg", "-M", "q35", "-cpu", &cfg.cpu])
            .args([
                "-smp",
                &cfg.smp.to_string(),
                "-m",
                &cfg.memory_mib.to_string(),
            ])
            .args(["-nodefaults", "-display", "none", "-no-reboot"])
            .args(["-serial", "stdio"])
            .arg("-monitor")
            .arg(format!("unix:{},server,nowait", monitor.display()))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                code.display()
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars.display()
            ));
        let boot = cfg
            .boot_index
            .map(|i| format!(",bootindex={i}"))
            .unwrap_or_default();
        match cfg.disk_bus {
            DiskBus::VirtioBlk => cmd
                .arg("-drive")
                .arg(format!("if=virtio,format=raw,file={}", cfg.disk.display())),
            DiskBus::ScsiHotplug => cmd
                .args(["-device", "virtio-scsi-pci,id=scsi0"])
                .arg("-drive")
                .arg(drive0(&cfg.disk)),
            DiskBus::Ahci => cmd
                .arg("-drive")
                .arg(drive0(&cfg.disk))
                .arg("-device")
                .arg(format!("ide-hd,drive=disk0,bus=ide.0{boot}")),
            DiskBus::Nvme => cmd
                .arg("-drive")
                .arg(drive0(&cfg.disk))
                .arg("-device")
                .arg(format!("nvme,serial=basalt0,drive=disk0{boot}")),
            DiskBus::Usb => cmd
                .arg("-drive")
                .arg(drive0(&cfg.disk))
                .args(["-device", "qemu-xhci,id=xhci"])
                .arg("-device")
                .arg(format!("usb-storage,bus=xhci.0,drive=disk0{boot}")),
        };
        if cfg.watchdog {
            cmd.args(["-device", "i6300esb"]);
        }
        cmd.args(&cfg.extra_args);
        Ok(cmd)
    }

    /// Starts QEMU; the console is being read from the first byte.
    pub fn start(cfg: &VmConfig, assets: &Assets) -> Result<Vm, QemuError> {
        let vars = match &cfg.vars {
            Some(v) => v.clone(),
            None => {
                let from = assets.ovmf_vars()?;
                let to = cfg.dir.join(format!("{}.vars.fd", cfg.name));
                std::fs::copy(&from, &to).map_err(|source| QemuError::Vars {
                    from: from.clone(),
                    to: to.clone(),
                    source,
                })?;
                to
            }
        };
        let monitor = cfg.dir.join(format!("{}.monitor", cfg.name));
        let _ = std::fs::remove_file(&monitor);
        let qemu_log = cfg.dir.join(format!("{}.qemu.log", cfg.name));
        let qemu_err = std::fs::File::create(&qemu_log).map_err(|source| QemuError::Spawn {
            program: format!("(log {})", qemu_log.display()),
            source,
        })?;
        let mut cmd = Self::command(cfg, assets, &vars, &monitor)?;
        let _ = writeln!(&qemu_err, "{cmd:?}");
        // stdin is the serial console's input (`Vm::type_line`).
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(qemu_err));
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no
        // memory; it makes the kernel kill QEMU if the test process dies
        // without running destructors (e.g. SIGKILL from a CI timeout).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| QemuError::Spawn {
            program: qemu_program(),
            source,
        })?;
        let stdout = child.stdout.take();
        let console_log = cfg.dir.join(format!("{}.console.log", cfg.name));
        let console = match stdout {
            Some(out) => Console::spawn(out, &console_log),
            None => Console::spawn(std::io::empty(), &console_log),
        };
        let console = match console {
            Ok(c) => c,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e.into());
            }
        };
        Ok(Vm {
            child,
            console,
            monitor,
            deadline: Instant::now() + cfg.lifetime,
            exit: None,
            qemu_log,
        })
    }

    /// Type `line` and a newline on the serial console (QEMU's stdin).
    pub fn type_line(&mut self, line: &str) -> Result<(), QemuError> {
        use std::io::Write as _;
        let stdin = self.child.stdin.as_mut().ok_or_else(|| QemuError::Spawn {
            program: "qemu (console input)".into(),
            source: std::io::Error::other("stdin is not a pipe"),
        })?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|source| QemuError::Spawn {
                program: "qemu (console input)".into(),
                source,
            })
    }

    /// Time left before the VM's hard lifetime ends.
    fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Waits for a console line matching `pattern` (bounded also by the VM's lifetime).
    pub fn expect(
        &mut self,
        pattern: impl Into<Pattern>,
        timeout: Duration,
    ) -> Result<String, QemuError> {
        let t = timeout.min(self.left());
        self.console
            .expect(pattern, t)
            .map_err(|e| self.with_qemu_log(e))
    }

    /// `Console::expect_anywhere`, bounded by the VM's lifetime.
    pub fn expect_anywhere(
        &mut self,
        pattern: impl Into<Pattern>,
        timeout: Duration,
    ) -> Result<String, QemuError> {
        let t = timeout.min(self.left());
        self.console
            .expect_anywhere(pattern, t)
            .map_err(|e| self.with_qemu_log(e))
    }

    /// Appends QEMU's own messages to a console error: QEMU failing to start
    /// shows up only there.
    fn with_qemu_log(&self, e: ConsoleError) -> QemuError {
        let qemu = std::fs::read_to_string(&self.qemu_log).unwrap_or_default();
        match e {
            ConsoleError::Closed { pattern, log, tail } => {
                QemuError::Console(ConsoleError::Closed {
                    pattern,
                    log,
                    tail: format!("{tail}\n--- QEMU ({}) ---\n{qemu}", self.qemu_log.display()),
                })
            }
            other => QemuError::Console(other),
        }
    }

    /// Sends one command to the QEMU monitor (e.g. `system_powerdown`, `quit`).
    pub fn monitor(&self, command: &str) -> Result<String, QemuError> {
        let err = |source| QemuError::Monitor {
            path: self.monitor.clone(),
            source,
        };
        let mut s = UnixStream::connect(&self.monitor).map_err(err)?;
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .map_err(err)?;
        writeln!(s, "{command}").map_err(err)?;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // The monitor never closes the connection: read until it goes quiet.
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    break;
                }
                Err(e) => return Err(err(e)),
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Plugs the disk of a [`DiskBus::ScsiHotplug`] VM into its SCSI host
    /// (the guest sees a new disk, as when a USB disk is plugged in).
    pub fn attach_scsi_disk(&self) -> Result<(), QemuError> {
        self.monitor_ok(SCSI_HOTPLUG)
    }

    /// Pulls the plugged disk out of the SCSI host (the guest's disk goes,
    /// as when a USB disk drops off the bus).
    pub fn detach_scsi_disk(&self) -> Result<(), QemuError> {
        self.monitor_ok(SCSI_UNPLUG)
    }

    /// A monitor command that answers nothing but its echo on success.
    fn monitor_ok(&self, command: &str) -> Result<(), QemuError> {
        let out = self.monitor(command)?;
        match out.lines().map(str::trim).find(|l| l.starts_with("Error")) {
            Some(complaint) => Err(QemuError::Monitor {
                path: self.monitor.clone(),
                source: std::io::Error::other(format!("{command}: {complaint}")),
            }),
            None => Ok(()),
        }
    }

    /// Waits for QEMU to exit by itself (the guest powered off or rebooted
    /// under `-no-reboot`); kills it after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, QemuError> {
        if let Some(st) = self.exit {
            return Ok(st);
        }
        let deadline = Instant::now() + timeout.min(self.left());
        loop {
            if let Some(st) = self.child.try_wait().map_err(QemuError::Wait)? {
                self.exit = Some(st);
                // Collect the last console lines QEMU wrote before exiting.
                self.console.drain(Duration::from_millis(500));
                return Ok(st);
            }
            if Instant::now() >= deadline {
                self.kill();
                self.console.drain(Duration::from_millis(200));
                return Err(QemuError::ExitTimeout {
                    timeout,
                    log: self.console.log_path().to_path_buf(),
                    tail: self.console.tail(),
                });
            }
            self.console.drain(Duration::from_millis(100));
        }
    }

    /// Kills QEMU now (idempotent).
    pub fn kill(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            if let Ok(st) = self.child.wait() {
                self.exit = Some(st);
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}
