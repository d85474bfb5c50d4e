//! Stage 1: PID 1 in the initramfs. `run` reads top to bottom in the order
//! of docs/boot-protocol.md "Stage 1": kernel filesystems, modules, find the
//! slot's partitions, mount the root, grow and mount the data partition,
//! seed `/etc`, mount `/boot` and `/run`, hand off, `switch_root`, exec
//! stage 2. It never exits: on a fatal error it reports and stays alive
//! (PID 1 exiting panics the kernel) — except on a trial boot
//! (`basalt.trial=1`), where it gives up within bounded time and reboots so
//! that systemd-boot falls back to the primary (docs/updates.md).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::blockdev::{self, BlockDevices, KernelBlockDevices, Partition};
use crate::cmdline;
use crate::console::{self, guarded};
use crate::gpt::{self, GrowOutcome};
use crate::modules::{self, InitramfsSettings, KernelModules, ModuleLoader};
use crate::mounts::{self, KernelMounts, Mounts};
use crate::report;
use crate::say;
use crate::slot::{DATA_PARTITION_NAME, ESP_PARTITION_NAME, INITRAMFS_MARKER, Slot};
use crate::sys::{self, MntFlags, MsFlags};
use crate::verity::{self, DeviceMapper, KernelDeviceMapper};

/// `/run/basalt/stage1.toml`: what stage 1 tells stage 2.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Handoff {
    pub slot: String,
    pub kernel_start_to_stage1_ms: u64,
    pub stage1_end_ms: u64,
    pub data_grown: bool,
    pub root_device: String,
    pub data_device: String,
    pub boot_device: String,
    /// The slot's dm-verity root hash (empty: the root was mounted without verity).
    pub verity_root_hash: String,
    /// The mapped device's name (`basalt-root-a`), for status queries.
    pub verity_name: String,
    /// `reboot-partition` boards: this boot is the one attempt of a trial of
    /// this slot (stage 1 recorded it in the marker and armed the watchdog);
    /// stage 2's health gate commits with `rpi::commit_reboot_partition`.
    #[serde(default)]
    pub trial: bool,
    /// The board's `boot_method` from `initramfs.toml` (`systemd-boot`,
    /// `tryboot`, `reboot-partition`; empty when unreadable): stage 2 has no
    /// other way to know it (the update agent picks its trial method by it).
    #[serde(default)]
    pub boot_method: String,
    /// PID 1's CPU time when stage 1 started (µs): the kernel's own work in
    /// the init task before it ran init, for the boot report's split.
    #[serde(default)]
    pub cpu_start_user_us: u64,
    #[serde(default)]
    pub cpu_start_system_us: u64,
    /// The same at the end of stage 1.
    #[serde(default)]
    pub cpu_end_user_us: u64,
    #[serde(default)]
    pub cpu_end_system_us: u64,
    /// Threads stage 1 loaded the modules on (1: in list order; 0: unknown).
    #[serde(default)]
    pub module_threads: usize,
    pub steps_ms: BTreeMap<String, u64>,
    /// The late modules stage 1 left for PID 1 (in memory only: stage 1
    /// opens them before switch_root and hands the files over).
    #[serde(skip)]
    pub late_modules: Vec<PathBuf>,
}

impl Handoff {
    /// The file's text, written without the `toml` crate's serializer
    /// (`tomlfast::Writer`: less code for QEMU to translate on the boot path).
    pub fn to_toml(&self) -> String {
        let mut w = crate::tomlfast::Writer::default();
        w.str("slot", &self.slot)
            .uint("kernel_start_to_stage1_ms", self.kernel_start_to_stage1_ms)
            .uint("stage1_end_ms", self.stage1_end_ms)
            .bool("data_grown", self.data_grown)
            .str("root_device", &self.root_device)
            .str("data_device", &self.data_device)
            .str("boot_device", &self.boot_device)
            .str("verity_root_hash", &self.verity_root_hash)
            .str("verity_name", &self.verity_name)
            .bool("trial", self.trial)
            .str("boot_method", &self.boot_method)
            .uint("cpu_start_user_us", self.cpu_start_user_us)
            .uint("cpu_start_system_us", self.cpu_start_system_us)
            .uint("cpu_end_user_us", self.cpu_end_user_us)
            .uint("cpu_end_system_us", self.cpu_end_system_us)
            .uint("module_threads", self.module_threads as u64)
            .table("steps_ms");
        for (step, ms) in &self.steps_ms {
            w.uint(step, *ms);
        }
        w.finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Stage1Error {
    #[error(transparent)]
    Block(#[from] blockdev::BlockError),
    #[error("growing the data partition on {disk}: {source}")]
    Mbr {
        disk: PathBuf,
        source: crate::mbr::MbrError,
    },
    #[error("growing the data partition on {disk}: {source}")]
    Gpt {
        disk: PathBuf,
        source: gpt::GptError,
    },
    #[error("syncing {disk}: {source}")]
    Sync {
        disk: PathBuf,
        source: std::io::Error,
    },
    #[error("copying {from} to {to}: {source}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
}

const WAIT_DEVICES: Duration = Duration::from_secs(10);
const WAIT_POLL: Duration = Duration::from_millis(20);
/// How long a disk holding the slot's partitions that the firmware did not
/// start waits for the one it did (a USB disk spinning up) before it is
/// used, with a warning.
const WAIT_BOOT_DISK: Duration = Duration::from_secs(30);
/// With the kernel's device events, the longest wait between two looks
/// (a safety net: every new partition comes with an event).
const WAIT_EVENTS_CAP: Duration = Duration::from_millis(200);

/// The watchdog a trial boot (`basalt.trial=1`, or a Pi 4/5's tryboot) arms
/// right after the modules (softdog on x86_64; a Pi's bcm2835_wdt keeps its
/// 15 s maximum): a hang anywhere between here and stage 2's supervision
/// loop, which reopens and pets it, resets the machine. Generous: stage 1
/// and stage 2 up to the loop take about 1 s under QEMU TCG.
pub const TRIAL_WATCHDOG_SECS: u32 = 60;

/// How long a trial boot's stage 1 keeps trying before it gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrialLimits {
    /// Waiting for the slot's root partition to appear.
    pub devices: Duration,
    /// Tries at the verity mapping and at mounting the root.
    pub attempts: u32,
    /// Pause between those tries.
    pub pause: Duration,
}

pub const TRIAL_LIMITS: TrialLimits = TrialLimits {
    devices: Duration::from_secs(30),
    attempts: 3,
    pause: Duration::from_secs(2),
};

/// A trial boot's stage 1 gave up: the caller reports it and reboots.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("trial of slot {slot}: {why}")]
pub struct TrialFailed {
    pub slot: &'static str,
    pub why: String,
}

/// How long stage 1 keeps trying something it cannot go on without.
#[derive(Debug, Clone, Copy)]
enum Persist {
    /// A primary boot: forever (reporting), there is nothing to fall back to.
    Forever,
    /// A trial boot: within these limits, then give up.
    Trial(TrialLimits),
}

/// Where stage 1 works and what it works through. On a device `root` is `/`
/// and the seams are the kernel's; tests point `root` at a fixture tree
/// (`proc/cmdline`, `sys/class/block`, `newroot/etc`, ...) and pass fakes.
pub struct Env<'a> {
    pub root: PathBuf,
    pub mounts: &'a mut dyn Mounts,
    pub modules: &'a dyn ModuleLoader,
    /// Modules loading at once (the CPUs this process may run on; 1 in tests).
    pub module_workers: usize,
    pub block: &'a mut dyn BlockDevices,
    pub dm: &'a mut dyn DeviceMapper,
    /// Reopen stdio on `<root>/dev/console` (not in tests).
    pub reopen_console: bool,
    /// `reboot-partition` boards: the watchdog a trial arms and the
    /// `reboot N` that returns to the primary.
    pub watchdog: &'a dyn crate::rpi::Watchdog,
    pub reboot: &'a dyn crate::rpi::RebootWithArg,
    /// Trial boots (`basalt.trial=1`): when stage 1 gives up.
    pub trial_limits: TrialLimits,
}

/// `/dev/watchdog`, opened with the trial's timeout and closed without the
/// magic `V`: it keeps counting until stage 2 opens it again and pets it.
pub struct KernelWatchdog(pub PathBuf);

impl crate::rpi::Watchdog for KernelWatchdog {
    fn arm(&self, timeout_secs: u32) -> std::io::Result<u32> {
        crate::sys::watchdog::Watchdog::open(&self.0, timeout_secs)
            .map(|w| w.timeout_secs)
            .map_err(std::io::Error::from)
    }
}

/// `sync`, then `reboot(2)` with `LINUX_REBOOT_CMD_RESTART2` and the argument.
pub struct KernelReboot;

impl crate::rpi::RebootWithArg for KernelReboot {
    fn reboot_with_arg(&self, arg: &str) -> std::io::Result<()> {
        nix::unistd::sync();
        Err(std::io::Error::from(crate::sys::reboot(
            &crate::sys::RebootHow::Restart2(arg.to_string()),
        )))
    }
}

impl Env<'_> {
    fn path(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }
}

/// Per-step timer for the handoff's `steps_ms`.
struct Steps {
    at: Instant,
    ms: BTreeMap<String, u64>,
}

impl Steps {
    fn done(&mut self, name: &str) {
        let now = Instant::now();
        self.ms.insert(
            name.to_string(),
            now.duration_since(self.at).as_millis() as u64,
        );
        self.at = now;
    }
}

/// Run stage 1. Never returns.
pub fn run() -> ! {
    console::install_panic_hook();
    // The log ring from the first line: stage 2 continues in this process
    // and keeps it (the image's `[logs]` apply then), so `basaltctl logs`
    // and a persistent log start with stage 1's lines.
    crate::logs::init(crate::logs::Settings::default());
    say!("stage1 start");
    let mut env = Env {
        root: PathBuf::from("/"),
        mounts: &mut KernelMounts,
        modules: &KernelModules,
        module_workers: crate::sys::cpu_count(),
        block: &mut KernelBlockDevices,
        dm: &mut KernelDeviceMapper::default(),
        reopen_console: true,
        watchdog: &KernelWatchdog(PathBuf::from("/dev/watchdog")),
        reboot: &KernelReboot,
        trial_limits: TRIAL_LIMITS,
    };
    let handoff = match prepare_root(&mut env) {
        Ok(h) => h,
        Err(failed) => give_up_trial(&failed),
    };
    write_handoff(&env.path("/newroot/run/basalt/stage1.toml"), &handoff);

    // 8. Into the real root.
    for api in ["/dev", "/proc", "/sys"] {
        let (from, to) = (env.path(api), env.path("/newroot").join(&api[1..]));
        if let Err(e) = mounts::move_mount(env.mounts, &from, &to) {
            console::error("move-mount", e);
        }
    }
    // Stage 2 is this same program (the builder puts one init binary in both
    // the initramfs and the root): it continues here, in this process, with
    // the handoff in hand. No exec: exec'ing the binary again cost the exec
    // itself, relocating and faulting the binary in again, and (ASLR puts it
    // elsewhere) translating all of its shared code again under emulation;
    // measured under QEMU TCG in docs/performance.md. The initramfs copy of
    // the binary stays mapped after its file is deleted (by PID 1, once
    // Kubernetes has started): `/proc/1/exe` then reads `/init (deleted)`.
    let late_modules = crate::modules::OpenedModules::open(&handoff.late_modules);
    let initramfs = switch_root(env.mounts, Path::new("/newroot"));
    crate::stage2::run(Some(crate::stage2::FromStage1 {
        handoff,
        late_modules,
        initramfs,
    }))
}

/// A trial boot cannot reach its root: say so, `sync`, `reboot(2)`. The
/// trial's counted loader entry has no tries left (systemd-boot counted this
/// boot before starting it) — on a Pi 4/5 the firmware's tryboot flag was
/// one-shot — so the firmware boots the primary, whose stage 2 records the
/// slot bad (docs/updates.md). Stays alive if the reboot fails;
/// the trial's watchdog then resets the machine.
fn give_up_trial(failed: &TrialFailed) -> ! {
    console::error(
        "trial",
        format_args!("{failed}: rebooting to fall back to the primary slot"),
    );
    sys::sync();
    let e = sys::reboot(&sys::RebootHow::Restart);
    stay_alive("reboot", format_args!("reboot(2) ({e})"))
}

/// Steps 1 to 7 of docs/boot-protocol.md "Stage 1": everything up to the
/// handoff, leaving the real root assembled at `<root>/newroot`. Only a trial
/// boot (`basalt.trial=1`, or a tryboot board's firmware tryboot) returns an
/// error: its root did not appear or could not be mounted within
/// `env.trial_limits`.
pub fn prepare_root(env: &mut Env<'_>) -> Result<Handoff, TrialFailed> {
    let mut steps = Steps {
        at: Instant::now(),
        ms: BTreeMap::new(),
    };
    let mut handoff = Handoff::default();
    (handoff.cpu_start_user_us, handoff.cpu_start_system_us) = sys::own_cpu_us();

    // 1. Kernel filesystems, then the console as stdio.
    mount_kernel_filesystems(env);
    handoff.kernel_start_to_stage1_ms = report::uptime_ms(&env.path("/proc"));
    if env.reopen_console {
        reopen_console(&env.path("/dev/console"));
    }
    steps.done("mounts");

    // 2. Modules, in the order the builder resolved.
    let settings = match InitramfsSettings::load(&env.path(INITRAMFS_MARKER)) {
        Ok(settings) => {
            let paths = settings.module_paths(&env.root);
            let deps = settings.dependencies(&settings.modules);
            let report =
                modules::load_all(env.modules, &paths, deps.as_deref(), env.module_workers);
            handoff.module_threads = report.threads;
            if !report.failed.is_empty() {
                console::error(
                    "modules",
                    format_args!("{} of {} failed", report.failed.len(), paths.len()),
                );
            }
            Some(settings)
        }
        Err(e) => {
            console::error("initramfs-settings", e);
            None
        }
    };
    steps.done("modules");
    handoff.boot_method = settings
        .as_ref()
        .and_then(|s| s.boot_method.clone())
        .unwrap_or_default();

    // 2b. Which slot booted, and whether as a trial: a trial arms the
    // watchdog now (its driver is loaded), before anything that could hang.
    let args = boot_args(&env.path("/proc/cmdline"));
    let slot = args.slot.unwrap_or(Slot::A);
    handoff.slot = slot.name().to_string();
    let boot_method = settings.as_ref().and_then(|s| s.boot_method.as_deref());
    let reboot_partition = boot_method == Some("reboot-partition");
    let trial = trial_reason(&args, boot_method, &env.path(crate::rpi::BOOTLOADER_DT_DIR));
    // 2c. The late modules (the board's `late_modules`: a watchdog driver,
    // efivarfs) are not needed on the path to Kubernetes: PID 1 loads them
    // right after it started Kubernetes (opened below, before switch_root).
    // A trial needs its watchdog now, and `reboot-partition` boards learn
    // only later whether this boot is a trial: then they load here.
    let late = settings
        .as_ref()
        .map(|s| s.late_module_paths(&env.root))
        .unwrap_or_default();
    // efivarfs, should stage 1 need to ask which disk the node booted from.
    let late_for_efivarfs: Vec<PathBuf> = late
        .iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("efivarfs.ko"))
        })
        .cloned()
        .collect();
    if trial.is_some() || reboot_partition {
        let deps = settings
            .as_ref()
            .and_then(|s| s.dependencies(&s.late_modules));
        let report = modules::load_all(env.modules, &late, deps.as_deref(), env.module_workers);
        if !report.failed.is_empty() {
            console::error(
                "modules",
                format_args!(
                    "{} of {} late modules failed",
                    report.failed.len(),
                    late.len()
                ),
            );
        }
    } else {
        handoff.late_modules = late;
    }
    // `reboot-partition` boards keep their own trial rules (3b).
    let persist = if let (Some(why), false) = (trial, reboot_partition) {
        say!("trial of slot {} ({why})", slot.name());
        arm_trial_watchdog(env.watchdog, args.watchdog != Some(false));
        steps.done("trial");
        Persist::Trial(env.trial_limits)
    } else {
        Persist::Forever
    };
    let give_up = |why: String| TrialFailed {
        slot: slot.name(),
        why,
    };

    // 3. The slot's partitions.
    // Unreadable settings: GPT, no trial rules (the x86_64 defaults).
    let mbr = settings
        .as_ref()
        .is_some_and(|s| s.partition_table == "mbr");
    let mbr_root = mbr.then(|| mbr_root_partition(&args, slot));
    let class_block = env.path("/sys/class/block");
    let mut look = BootDiskLook::new(&late_for_efivarfs);
    let parts = {
        let mut boot_disk = |disks: &[String], last: bool| look.decide(env, disks, last);
        wait_for_partitions(&class_block, slot, mbr_root, persist, &mut boot_disk)
    };
    look.finish(env);
    let parts = parts.map_err(give_up)?;
    steps.done("wait_devices");

    // 3b. Boards without tryboot: the trial rules, before anything that could hang.
    if reboot_partition {
        let watchdog = args.watchdog != Some(false);
        handoff.trial = reboot_partition_trial(env, parts.get(ESP_PARTITION_NAME), slot, watchdog);
        steps.done("trial");
    }

    // 4. The slot's root, read-only, through dm-verity when the command line names a root hash.
    let dev = env.path("/dev");
    let newroot = env.path("/newroot");
    if let Some(root) = parts.get(slot.root_partition_name()) {
        handoff.root_device = root.dev_path(&dev).display().to_string();
        let source = match (&args.verity, args.verity_data_blocks) {
            (Some(hash), Some(blocks)) => {
                let name = verity::mapping_name(slot.root_partition_name());
                let mapped =
                    verity_or_stay(env.dm, &name, &root.dev_path(&dev), hash, blocks, persist)
                        .map_err(give_up)?;
                handoff.verity_root_hash = hash.clone();
                handoff.verity_name = name;
                steps.done("verity");
                mapped.display().to_string()
            }
            _ => {
                console::error(
                    "verity",
                    format_args!(
                        "no basalt.verity/basalt.verity_data_blocks on the command line: {} mounted unverified",
                        handoff.root_device
                    ),
                );
                handoff.root_device.clone()
            }
        };
        if !handoff.verity_name.is_empty() {
            // A mount that fails on a corrupted block must say so, never fall back.
            let m = mounts::mount_fs(
                env.mounts,
                &source,
                &newroot,
                "squashfs",
                MsFlags::MS_RDONLY,
                None,
            );
            if let Err(e) = m {
                report_verity(env.dm, &handoff.verity_name);
                console::error("mount-root", e);
                // The first try is spent: a trial gets the rest of its tries.
                let persist = match persist {
                    Persist::Trial(l) => Persist::Trial(TrialLimits {
                        attempts: l.attempts.saturating_sub(1),
                        ..l
                    }),
                    p => p,
                };
                mount_or_stay(
                    env.mounts,
                    &source,
                    &newroot,
                    "squashfs",
                    MsFlags::MS_RDONLY,
                    persist,
                )
                .map_err(give_up)?;
            }
        } else {
            mount_or_stay(
                env.mounts,
                &source,
                &newroot,
                "squashfs",
                MsFlags::MS_RDONLY,
                persist,
            )
            .map_err(give_up)?;
        }
    }
    steps.done("mount_root");

    // 5. The data partition: grow on first boot, mount at /var, grow ext4.
    if let Some(data) = parts.get(DATA_PARTITION_NAME) {
        handoff.data_device = data.dev_path(&dev).display().to_string();
        let block = &mut *env.block;
        let grown = guarded("grow-data", || grow_data_partition(block, data, &dev, mbr));
        let size_bytes = match grown {
            Some(Ok(Some(bytes))) => {
                handoff.data_grown = true;
                bytes
            }
            Some(Err(e)) => {
                console::error("grow-data", e);
                data.size_512 * 512
            }
            Some(Ok(None)) | None => data.size_512 * 512,
        };
        steps.done("grow_data");
        let var = newroot.join("var");
        match mounts::mount_fs(
            env.mounts,
            &handoff.data_device,
            &var,
            "ext4",
            MsFlags::MS_NOATIME,
            None,
        ) {
            // Every boot: a no-op when the filesystem already fills the
            // partition, and it finishes a growth a power cut interrupted.
            Ok(()) => {
                if let Err(e) = env.block.grow_ext4(&var, size_bytes) {
                    console::error("grow-ext4", e);
                }
            }
            Err(e) => console::error("mount-data", e),
        }
        steps.done("mount_data");
    }

    // 6. /etc: a tmpfs seeded from the image's /etc.
    if let Err(e) = seed_etc(env) {
        console::error("seed-etc", e);
    }
    steps.done("etc");

    // 7. /boot (the ESP) and /run; the caller writes the handoff into /run.
    if let Some(esp) = parts.get(ESP_PARTITION_NAME) {
        handoff.boot_device = esp.dev_path(&dev).display().to_string();
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        let boot = newroot.join("boot");
        if let Err(e) = mounts::mount_fs(
            env.mounts,
            &handoff.boot_device,
            &boot,
            "vfat",
            flags,
            Some("umask=0077"),
        ) {
            console::error("mount-boot", e);
        }
    }
    let run_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if let Err(e) = mounts::mount_fs(
        env.mounts,
        "tmpfs",
        &newroot.join("run"),
        "tmpfs",
        run_flags,
        Some("mode=0755"),
    ) {
        console::error("mount-run", e);
    }
    steps.done("boot_run");
    handoff.steps_ms = steps.ms;
    handoff.stage1_end_ms = report::uptime_ms(&env.path("/proc"));
    (handoff.cpu_end_user_us, handoff.cpu_end_system_us) = sys::own_cpu_us();
    Ok(handoff)
}

/// Why this boot is a trial that stage 1 watches (watchdog, limits), if it
/// is: `basalt.trial=1` on the command line (systemd-boot's counted trial
/// entry), or, on a tryboot board (Pi 4/5), the firmware's word (`dt`, its
/// `/chosen/bootloader`) that it booted its one-shot tryboot, which Basalt
/// asks for only to start a trial (the slot's `cmdline.txt` is the same for
/// a trial and a committed slot). `reboot-partition` boards decide later,
/// from their marker (3b).
fn trial_reason(
    args: &cmdline::BootArgs,
    boot_method: Option<&str>,
    dt: &Path,
) -> Option<&'static str> {
    if args.trial {
        Some("basalt.trial=1")
    } else if boot_method == Some("tryboot") && tryboot_flag(dt) {
        Some("the firmware's tryboot")
    } else {
        None
    }
}

/// Whether the firmware's `/chosen/bootloader/tryboot` under `dir` says this
/// boot is its one-shot tryboot; unreadable is "no", reported.
fn tryboot_flag(dir: &Path) -> bool {
    match crate::rpi::BootloaderInfo::read(dir) {
        Ok(info) => info.is_tryboot() == Some(true),
        Err(e) => {
            console::error("trial", format_args!("{e}: not taken for a tryboot trial"));
            false
        }
    }
}

/// A trial boot's watchdog: armed with [`TRIAL_WATCHDOG_SECS`] and closed
/// without the magic `V`, so it keeps counting until stage 2 reopens and
/// pets it. `basalt.watchdog=0` leaves it alone (reported: a hang then stays).
fn arm_trial_watchdog(watchdog: &dyn crate::rpi::Watchdog, wanted: bool) {
    if !wanted {
        console::error(
            "trial",
            "basalt.watchdog=0: the trial runs without the watchdog; a hang is not recovered",
        );
        return;
    }
    match watchdog.arm(TRIAL_WATCHDOG_SECS) {
        Ok(secs) => say!("trial watchdog armed: {secs} s until stage 2 takes it over"),
        Err(e) => console::error(
            "trial",
            format_args!("arming /dev/watchdog: {e}; a hang is not recovered"),
        ),
    }
}

fn reopen_console(path: &Path) {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(c) => {
            if let Err(e) = sys::reopen_stdio(&c) {
                console::error("console", format_args!("{} ({e})", path.display()));
            }
        }
        Err(e) => console::error("console", format_args!("{} ({e})", path.display())),
    }
}

fn mount_kernel_filesystems(env: &mut Env<'_>) {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let list: [(&str, &str, &str, MsFlags, Option<&str>); 3] = [
        ("proc", "/proc", "proc", nosuid, None),
        ("sysfs", "/sys", "sysfs", nosuid, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
    ];
    for (src, target, fs, flags, data) in list {
        let target = env.path(target);
        if let Err(e) = mounts::mount_fs(env.mounts, src, &target, fs, flags, data) {
            console::error("mount", e);
        }
    }
}

/// Set up the verity mapping for the root partition `part`, retrying every few
/// seconds on failure (forever on a primary boot): an unverified root is never
/// mounted instead. A trial gives up after its tries (the error says why).
fn verity_or_stay(
    dm: &mut dyn DeviceMapper,
    name: &str,
    part: &Path,
    root_hash: &str,
    data_blocks: u64,
    persist: Persist,
) -> Result<PathBuf, String> {
    let mut tries = 0u32;
    loop {
        let made = verity::read_superblock(part, data_blocks).and_then(|sb| {
            let (sectors, params) = verity::table(
                &part.display().to_string(),
                root_hash,
                data_blocks,
                &sb.salt,
            );
            dm.create_verity(name, sectors, &params)
        });
        match made {
            Ok(node) => return Ok(node),
            Err(e) => {
                console::error("verity", &e);
                tries += 1;
                match persist {
                    Persist::Forever => std::thread::sleep(Duration::from_secs(5)),
                    Persist::Trial(l) if tries >= l.attempts => {
                        return Err(format!(
                            "no verity mapping {name} for {} after {tries} tries ({e})",
                            part.display()
                        ));
                    }
                    Persist::Trial(l) => std::thread::sleep(l.pause),
                }
            }
        }
    }
}

/// Print `basalt: error verity corruption ...` when the mapping's status says
/// a corrupted block was read.
pub fn report_verity(dm: &mut dyn DeviceMapper, name: &str) -> bool {
    match dm.verity_status(name) {
        Ok(st) if verity::corrupted(&st) => {
            console::error(
                "verity",
                format_args!(
                    "corruption detected on {name} (status {st}): reads of corrupted blocks fail with EIO"
                ),
            );
            true
        }
        Ok(_) => false,
        Err(e) => {
            console::error("verity", e);
            false
        }
    }
}

/// The `basalt.*` keys of the kernel command line, problems reported.
pub fn boot_args(cmdline_path: &Path) -> cmdline::BootArgs {
    let text = match std::fs::read_to_string(cmdline_path) {
        Ok(t) => t,
        Err(e) => {
            console::error("cmdline", format_args!("{} ({e})", cmdline_path.display()));
            String::new()
        }
    };
    let args = cmdline::parse(&text);
    for p in &args.problems {
        console::error("cmdline", p);
    }
    if args.slot.is_none() {
        console::error("cmdline", "no basalt.slot, using slot a");
    }
    args
}

/// Wait for root, data and ESP (config FAT) partitions, keyed by their GPT
/// names. MBR boards (docs/boot-protocol.md, "Disk (Raspberry Pi, MBR)") have
/// no names: the same roles are found by number on one disk. Without the
/// root there is nothing to boot: keep looking (and saying so) forever on a
/// primary boot, up to `devices` on a trial (then the error says what is
/// missing); the others may be missing.
///
/// `boot_disk` says which of the disks (sorted by kernel name) holding the
/// root the node booted from, and every role is taken from it; `None`: the
/// firmware started none of them, wait for more (up to WAIT_BOOT_DISK; its
/// second argument says the wait is over).
fn wait_for_partitions(
    class_block: &Path,
    slot: Slot,
    mbr_root: Option<u32>,
    persist: Persist,
    boot_disk: &mut dyn FnMut(&[String], bool) -> Option<String>,
) -> Result<BTreeMap<String, Partition>, String> {
    let root_name = slot.root_partition_name();
    let names = [root_name, DATA_PARTITION_NAME, ESP_PARTITION_NAME];
    let numbered;
    let lookup = match mbr_root {
        None => blockdev::Lookup::Names(&names),
        Some(root) => {
            numbered = [
                (root_name, root),
                (DATA_PARTITION_NAME, u32::from(crate::rpi::DATA_PARTITION)),
                (ESP_PARTITION_NAME, u32::from(crate::rpi::CONFIG_PARTITION)),
            ];
            blockdev::Lookup::Numbered(&numbered)
        }
    };
    // When the first look does not find them all: woken by the kernel's
    // device events from then on (the socket is opened, then a look again
    // at once, so no event is missed), every WAIT_EVENTS_CAP at the latest;
    // polled every WAIT_POLL without them. A boot whose partitions are there
    // at the first look (the usual case) opens nothing.
    let mut events: Option<Option<crate::sys::Uevents>> = None;
    let mut pause = |left: Duration| match &events {
        None => {
            let found = lookup.find(class_block).unwrap_or_default();
            let missing: Vec<&str> = lookup
                .roles()
                .into_iter()
                .filter(|r| !found.contains_key(*r))
                .collect();
            if !missing.is_empty() {
                say!(
                    "waiting for partitions: {} not there yet",
                    missing.join(", ")
                );
            }
            events = Some(crate::sys::Uevents::open().map_err(|e| {
                say!("warning wait-devices: no uevent socket ({e}), looking every {WAIT_POLL:?}");
            }).ok());
        }
        Some(Some(u)) => {
            u.wait(left.min(WAIT_EVENTS_CAP));
        }
        Some(None) => std::thread::sleep(left.min(WAIT_POLL)),
    };
    let start = Instant::now();
    // Since when the disks found are not the firmware's.
    let mut not_booted_from: Option<Instant> = None;
    loop {
        let wait = match persist {
            Persist::Forever => WAIT_DEVICES,
            Persist::Trial(l) => WAIT_DEVICES.min(l.devices.saturating_sub(start.elapsed())),
        };
        match blockdev::wait_for_lookup(class_block, lookup, wait, &mut pause) {
            Ok(found) => {
                let waited = not_booted_from.map(|t| t.elapsed());
                let last = waited.is_some_and(|w| w >= WAIT_BOOT_DISK)
                    || matches!(persist, Persist::Trial(l) if start.elapsed() >= l.devices);
                let Some(disk) = boot_disk(&found.disks, last) else {
                    let since = *not_booted_from.get_or_insert_with(Instant::now);
                    pause(WAIT_BOOT_DISK.saturating_sub(since.elapsed()));
                    continue;
                };
                // Only when the first look missed: disks that appear after
                // their driver loaded (SCSI and USB scan asynchronously).
                if events.is_some() {
                    say!(
                        "partitions appeared after {} ms of waiting",
                        start.elapsed().as_millis()
                    );
                }
                if found.disks.len() < 2 {
                    return Ok(found.parts);
                }
                let on = lookup.find_on(class_block, Some(&disk)).unwrap_or_default();
                let roles = lookup.roles();
                if let Some(r) = roles.iter().find(|r| !on.parts.contains_key(**r)) {
                    say!("warning storage: {disk} has no {r} partition");
                }
                return Ok(on.parts);
            }
            Err(e) => {
                let found = lookup.find(class_block).unwrap_or_default();
                if found.contains_key(root_name) {
                    // Going on without the others: that is an error.
                    console::error("wait-devices", &e);
                    return Ok(found);
                }
                // Still waiting for the root: a slow disk (a USB hard disk
                // spinning up, an SD card under load), not yet an error;
                // said every WAIT_DEVICES, the trial's limit is below.
                say!("warning wait-devices: {e}; still waiting");
                if let Persist::Trial(l) = persist
                    && start.elapsed() >= l.devices
                {
                    return Err(format!(
                        "partition {root_name} did not appear within {} s",
                        l.devices.as_secs()
                    ));
                }
            }
        }
    }
}

/// Which of the disks holding the slot's root the node booted from
/// ([`crate::bootdisk`]). On UEFI efivarfs is mounted for the looks (its
/// module loaded from the late modules when the kernel lacks it) and
/// unmounted by `finish`; without EFI, the Raspberry Pi bootloader's
/// `boot-mode`. Asked on every boot, one disk too: an internal disk with
/// another Basalt install can appear before the USB disk the firmware
/// started.
struct BootDiskLook<'m> {
    efivarfs_module: &'m [PathBuf],
    /// `None` until the first look on UEFI; then whether efivarfs mounted.
    efivarfs: Option<Result<(), String>>,
    waiting_said: bool,
    /// The disks' unreadable GPTs warned about: the looks repeat every
    /// <= 200 ms while stage 1 waits, the warning only once.
    warned: std::collections::BTreeSet<String>,
}

impl<'m> BootDiskLook<'m> {
    fn new(efivarfs_module: &'m [PathBuf]) -> Self {
        BootDiskLook {
            efivarfs_module,
            efivarfs: None,
            waiting_said: false,
            warned: std::collections::BTreeSet::new(),
        }
    }

    /// Say `warning storage: <what>` unless this look's predecessors did.
    fn warn_once(warned: &mut std::collections::BTreeSet<String>, what: String) -> bool {
        let new = !warned.contains(&what);
        if new {
            say!("warning storage: {what}");
            warned.insert(what);
        }
        new
    }

    /// `None`: wait for another disk (said once).
    fn decide(&mut self, env: &mut Env<'_>, disks: &[String], last: bool) -> Option<String> {
        use crate::bootdisk::Decision;
        let efivars = env.path("/sys/firmware/efi/efivars");
        let hint = if !efivars.is_dir() {
            crate::bootdisk::pi_boot_mode_hint(&env.path(crate::rpi::BOOTLOADER_DT_DIR), disks)
        } else {
            let module = self.efivarfs_module;
            let mounted = self.efivarfs.get_or_insert_with(|| {
                let flags = MsFlags::MS_NOSUID
                    | MsFlags::MS_NODEV
                    | MsFlags::MS_NOEXEC
                    | MsFlags::MS_RDONLY;
                let mount = |env: &mut Env<'_>| {
                    mounts::mount_fs(env.mounts, "efivarfs", &efivars, "efivarfs", flags, None)
                };
                let mut mounted = mount(env);
                if mounted.is_err() && !module.is_empty() {
                    let report = modules::load_in_order(env.modules, module);
                    if report.failed.is_empty() {
                        mounted = mount(env);
                    }
                }
                mounted.map_err(|e| format!("efivarfs: {e}"))
            });
            match mounted {
                Ok(()) => crate::bootdisk::loader_hint(
                    &efivars,
                    &env.path("/dev"),
                    &env.path("/sys/class/block"),
                    disks,
                    &mut |w| {
                        Self::warn_once(&mut self.warned, w);
                    },
                ),
                Err(e) => Err(e.clone()),
            }
        };
        match crate::bootdisk::decide(disks, hint, last) {
            Decision::Wait(why) => {
                if !self.waiting_said {
                    say!(
                        "storage: waiting for the disk the firmware started (up to {} s): {why}",
                        WAIT_BOOT_DISK.as_secs()
                    );
                    self.waiting_said = true;
                }
                None
            }
            Decision::Use { disk, said } => {
                match said {
                    Some((line, true)) => say!("warning storage: {line}"),
                    Some((line, false)) => say!("storage: {line}"),
                    // The usual boot, unless it waited for this disk.
                    None if self.waiting_said => {
                        say!("storage: using {disk}, the disk the firmware started (it appeared)")
                    }
                    None => {}
                }
                Some(disk)
            }
        }
    }

    /// Unmount efivarfs if a look mounted it (stage 2 mounts it again).
    fn finish(self, env: &mut Env<'_>) {
        if let Some(Ok(())) = self.efivarfs {
            let efivars = env.path("/sys/firmware/efi/efivars");
            if let Err(e) = env.mounts.umount(&efivars, MntFlags::MNT_DETACH) {
                console::error("umount", format_args!("{}: {e}", efivars.display()));
            }
        }
    }
}

/// Where stage 1 mounts the config FAT (p1) for the trial rules.
pub const TRIAL_CONFIG_MOUNT: &str = "/run/basalt-config";

/// `reboot-partition` boards (docs/raspberry-pi.md, "Updates on Pi 2, 3 and
/// Zero 2 W"): mount p1, read `autoboot.txt` and the trial marker, decide with
/// [`crate::rpi::stage1_plan`] and carry it out — record the attempt and arm
/// the watchdog for a trial, or `reboot N` into the primary. Returns whether
/// this boot is a trial. Every failure is reported and the boot goes on: a
/// slot that boots is better than a node that stops here.
fn reboot_partition_trial(
    env: &mut Env<'_>,
    config: Option<&Partition>,
    slot: Slot,
    watchdog_wanted: bool,
) -> bool {
    use crate::rpi::{self, Stage1Plan, Stage1Report};
    let Some(config) = config else {
        console::error(
            "trial",
            "no config partition (p1): the trial marker is not checked",
        );
        return false;
    };
    let dir = env.path(TRIAL_CONFIG_MOUNT);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        console::error("trial", format_args!("{}: {e}", dir.display()));
        return false;
    }
    let dev = config.dev_path(&env.path("/dev")).display().to_string();
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if let Err(e) = mounts::mount_fs(env.mounts, &dev, &dir, "vfat", flags, None) {
        console::error("trial", format_args!("mounting {dev}: {e}"));
        return false;
    }
    let primary = match rpi::read_autoboot(&dir) {
        Ok(a) => Some(a.primary),
        Err(e) => {
            console::error("trial", e);
            None
        }
    };
    let marker = rpi::read_marker(&dir).unwrap_or_else(|e| {
        console::error("trial", e);
        None
    });
    let mut plan = rpi::stage1_plan(slot, primary, marker);
    let mut trial = false;
    match &mut plan {
        Stage1Plan::Continue {
            watchdog_secs,
            report,
            ..
        } => {
            if watchdog_secs.is_some() {
                trial = true;
                say!("trial of slot {} (its one attempt)", slot.name());
                if !watchdog_wanted {
                    console::error(
                        "trial",
                        "basalt.watchdog=0: the trial runs without the watchdog; a hang is not recovered",
                    );
                    *watchdog_secs = None;
                }
            }
            match report {
                Stage1Report::None => {}
                Stage1Report::TrialRolledBack { slot: s, attempts } => console::error(
                    "trial",
                    format_args!(
                        "trial of slot {} rolled back after {attempts} attempt(s)",
                        s.name()
                    ),
                ),
                Stage1Report::StaleMarker => say!("trial marker was stale (commit done): removed"),
                Stage1Report::RedirectIgnored { primary } => console::error(
                    "trial",
                    format_args!(
                        "the firmware ignores autoboot.txt and reboot N: booting slot {} although slot {} is primary",
                        slot.name(),
                        primary.name()
                    ),
                ),
                Stage1Report::PrimaryUnknown => {
                    console::error("trial", "autoboot.txt unreadable: booting this slot")
                }
            }
        }
        Stage1Plan::Reboot { partition, .. } => {
            say!("trial: rebooting into partition {partition}");
        }
    }
    if let Err(e) = rpi::apply_stage1_plan(&dir, &plan, env.watchdog, env.reboot) {
        console::error("trial", e);
    }
    if let Err(e) = env.mounts.umount(&dir, nix::mount::MntFlags::empty()) {
        console::error("trial", format_args!("unmounting {}: {e}", dir.display()));
    }
    trial
}

/// MBR boards: the root partition number, from `basalt.root` or the slot.
pub fn mbr_root_partition(args: &cmdline::BootArgs, slot: Slot) -> u32 {
    let from_slot = u32::from(crate::rpi::root_partition(slot));
    match args.root_partition {
        Some(n) if n != from_slot => {
            console::error(
                "cmdline",
                format_args!(
                    "basalt.root={n} disagrees with slot {} (partition {from_slot}); using {n}",
                    slot.name()
                ),
            );
            n
        }
        Some(n) => n,
        None => from_slot,
    }
}

/// Mount or retry every few seconds: used for the root, without which stage 1
/// cannot go on. Forever on a primary boot; a trial gives up after its tries
/// (none left: no try at all).
fn mount_or_stay(
    m: &mut dyn Mounts,
    dev: &str,
    target: &Path,
    fs: &str,
    flags: MsFlags,
    persist: Persist,
) -> Result<(), String> {
    let mut tries = 0u32;
    let mut last = String::from("no tries left");
    loop {
        if let Persist::Trial(l) = persist
            && tries >= l.attempts
        {
            return Err(format!(
                "the root {dev} could not be mounted at {} ({last})",
                target.display()
            ));
        }
        match mounts::mount_fs(m, dev, target, fs, flags, None) {
            Ok(()) => return Ok(()),
            Err(e) => {
                last = e.to_string();
                console::error("mount-root", e);
                tries += 1;
                match persist {
                    Persist::Forever => std::thread::sleep(Duration::from_secs(5)),
                    Persist::Trial(l) if tries < l.attempts => std::thread::sleep(l.pause),
                    Persist::Trial(_) => {}
                }
            }
        }
    }
}

/// Grow the data partition to the end of its disk if it does not reach it:
/// rewrite the GPT (backup moved to the end), then tell the kernel. Returns
/// the new size in bytes when it grew.
pub fn grow_data_partition(
    bd: &mut dyn BlockDevices,
    data: &Partition,
    dev: &Path,
    mbr: bool,
) -> Result<Option<u64>, Stage1Error> {
    let disk_path = data.disk_path(dev);
    let mut disk = bd.open_disk(&disk_path)?;
    let size = bd.size_bytes(&disk, &disk_path)?;
    let sector = bd.sector_size(&disk, &disk_path)? as u64;
    if mbr {
        let outcome = crate::mbr::grow_last_logical(&mut disk, sector, size, data.number).map_err(
            |source| Stage1Error::Mbr {
                disk: disk_path.clone(),
                source,
            },
        )?;
        return match outcome {
            crate::mbr::GrowOutcome::AlreadyFull(_) => Ok(None),
            crate::mbr::GrowOutcome::Grown { after, .. } => {
                disk.sync_all().map_err(|source| Stage1Error::Sync {
                    disk: disk_path.clone(),
                    source,
                })?;
                let (start, length) = (after.start * sector, after.len * sector);
                bd.resize_partition(&disk, &disk_path, after.number, start, length)?;
                Ok(Some(length))
            }
        };
    }
    // The first growth is this copy's first boot: new GUIDs make it unique
    // among copies of the image (gpt.rs; docs/boot-protocol.md, Stage 1).
    let mut random = || bd.random_bytes();
    let outcome = gpt::grow_last_partition(
        &mut disk,
        sector,
        size,
        DATA_PARTITION_NAME,
        Some(&mut random),
    )
    .map_err(|source| Stage1Error::Gpt {
        disk: disk_path.clone(),
        source,
    })?;
    match outcome {
        GrowOutcome::AlreadyFull(_) => Ok(None),
        GrowOutcome::Grown {
            before,
            after,
            disk_guid,
        } => {
            disk.sync_all().map_err(|source| Stage1Error::Sync {
                disk: disk_path.clone(),
                source,
            })?;
            say!(
                "storage: {}: new GUIDs for this copy of the image (first boot): disk {disk_guid}, data {} (was {})",
                data.disk,
                after.unique_guid,
                before.unique_guid
            );
            let start = after.first_lba * sector;
            let length = (after.last_lba - after.first_lba + 1) * sector;
            bd.resize_partition(&disk, &disk_path, after.index as u32 + 1, start, length)?;
            Ok(Some(length))
        }
    }
}

/// A tmpfs at `/newetc` (in the initramfs), filled from the image's `/etc`,
/// then moved over `/newroot/etc`.
fn seed_etc(env: &mut Env<'_>) -> Result<(), Box<dyn std::error::Error>> {
    let newetc = env.path("/newetc");
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mounts::mount_fs(
        env.mounts,
        "tmpfs",
        &newetc,
        "tmpfs",
        flags,
        Some("mode=0755"),
    )?;
    let etc = env.path("/newroot/etc");
    copy_tree(&etc, &newetc)?;
    mounts::move_mount(env.mounts, &newetc, &etc)?;
    Ok(())
}

/// Copy a directory tree with modes, owners and symlinks (what `/etc` needs;
/// device nodes and sockets there are skipped and reported).
pub fn copy_tree(from: &Path, to: &Path) -> Result<(), Stage1Error> {
    use std::os::unix::fs::{PermissionsExt, lchown, symlink};
    let err = |f: &Path, t: &Path| {
        let (f, t) = (f.to_path_buf(), t.to_path_buf());
        move |source| Stage1Error::Copy {
            from: f,
            to: t,
            source,
        }
    };
    let rd = std::fs::read_dir(from).map_err(err(from, to))?;
    for entry in rd {
        let entry = entry.map_err(err(from, to))?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&src).map_err(err(&src, &dst))?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = std::fs::read_link(&src).map_err(err(&src, &dst))?;
            symlink(&target, &dst).map_err(err(&src, &dst))?;
        } else if ft.is_dir() {
            std::fs::create_dir_all(&dst).map_err(err(&src, &dst))?;
            copy_tree(&src, &dst)?;
        } else if ft.is_file() {
            std::fs::copy(&src, &dst).map_err(err(&src, &dst))?;
        } else {
            console::error(
                "seed-etc",
                format_args!(
                    "{} (not a file, directory or symlink; skipped)",
                    src.display()
                ),
            );
            continue;
        }
        // Owner first: chown clears set-id bits, so the mode goes last.
        if let Err(e) = lchown(&dst, Some(meta.uid()), Some(meta.gid())) {
            // Unprivileged (tests): keeping our own uid is the best we can do.
            if e.kind() != std::io::ErrorKind::PermissionDenied {
                return Err(err(&src, &dst)(e));
            }
        }
        if !ft.is_symlink() {
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(err(&src, &dst))?;
        }
    }
    Ok(())
}

fn write_handoff(path: &Path, handoff: &Handoff) {
    let text = handoff.to_toml();
    if let Some(dir) = path.parent()
        && let Err(e) = std::fs::create_dir_all(dir)
    {
        console::error("handoff", format_args!("{} ({e})", dir.display()));
        return;
    }
    if let Err(e) = std::fs::write(path, text) {
        console::error("handoff", format_args!("{} ({e})", path.display()));
    }
}

/// `switch_root`: make `newroot` the root and chroot into it. The
/// initramfs' files are not deleted here: when the old root is a
/// ramfs/tmpfs, it is returned open, and PID 1 frees it once Kubernetes has
/// been started ([`delete_initramfs`]): deleting ~6 MB of files was 13–17 ms
/// of the boot's path under QEMU TCG (docs/performance.md).
fn switch_root(m: &mut dyn Mounts, newroot: &Path) -> Option<std::fs::File> {
    let old_root = if sys::is_ramfs(Path::new("/")) {
        std::fs::File::open("/")
            .map_err(|e| console::error("switch-root", format_args!("opening / ({e})")))
            .ok()
    } else {
        console::error(
            "switch-root",
            "/ is not an initramfs; not deleting its files",
        );
        None
    };
    if let Err(e) = std::env::set_current_dir(newroot) {
        stay_alive(
            "switch-root",
            format_args!("chdir {} ({e})", newroot.display()),
        );
    }
    if let Err(e) = m.mount(Some("."), Path::new("/"), None, MsFlags::MS_MOVE, None) {
        stay_alive("switch-root", format_args!("mount --move . / ({e})"));
    }
    if let Err(e) = sys::chroot(Path::new(".")) {
        stay_alive("switch-root", format_args!("chroot . ({e})"));
    }
    if let Err(e) = std::env::set_current_dir("/") {
        console::error("switch-root", format_args!("chdir / ({e})"));
    }
    old_root
}

/// Free the initramfs' memory: delete every file of the old root (open as
/// `old_root`, outside the chroot now, reached through `<proc>/self/fd/<n>`),
/// never crossing into other mounts. Returns the bytes of file data deleted.
pub fn delete_initramfs(old_root: std::fs::File, proc_dir: &Path) -> u64 {
    use std::os::fd::AsRawFd;
    let dir = proc_dir.join(format!("self/fd/{}", old_root.as_raw_fd()));
    let Ok(meta) = std::fs::metadata(&dir) else {
        return 0;
    };
    delete_same_device(&dir, meta.dev())
}

/// Remove everything under `dir` that lives on device `dev`; returns the
/// bytes of file data removed.
pub fn delete_same_device(dir: &Path, dev: u64) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut bytes = 0;
    for entry in rd.flatten() {
        let p = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.dev() != dev {
            continue; // a mount point (e.g. /newroot): not ours to delete
        }
        if meta.is_dir() {
            bytes += delete_same_device(&p, dev);
            let _ = std::fs::remove_dir(&p);
        } else if std::fs::remove_file(&p).is_ok() {
            bytes += meta.len();
        }
    }
    bytes
}

/// Report and keep PID 1 alive forever (reaping, so nothing piles up).
fn stay_alive(what: &str, location: std::fmt::Arguments<'_>) -> ! {
    console::error(what, location);
    loop {
        while sys::reap_one().is_some() {}
        std::thread::sleep(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    /// A fake block layer over an image file; records what the kernel is told.
    struct FileDisk {
        path: PathBuf,
        resized: Vec<(u32, u64, u64)>,
        ext4: Vec<(PathBuf, u64)>,
        randoms: u8,
    }

    impl BlockDevices for FileDisk {
        fn open_disk(&mut self, _disk: &Path) -> Result<File, blockdev::BlockError> {
            Ok(std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.path)
                .unwrap())
        }
        fn size_bytes(&mut self, disk: &File, _: &Path) -> Result<u64, blockdev::BlockError> {
            Ok(disk.metadata().unwrap().len())
        }
        fn sector_size(&mut self, _: &File, _: &Path) -> Result<u32, blockdev::BlockError> {
            Ok(512)
        }
        fn resize_partition(
            &mut self,
            _: &File,
            _: &Path,
            n: u32,
            s: u64,
            l: u64,
        ) -> Result<(), blockdev::BlockError> {
            self.resized.push((n, s, l));
            Ok(())
        }
        fn grow_ext4(&mut self, at: &Path, size: u64) -> Result<u64, blockdev::BlockError> {
            self.ext4.push((at.to_path_buf(), size));
            Ok(size / 4096)
        }
        fn random_bytes(&mut self) -> [u8; 16] {
            self.randoms += 1;
            [self.randoms; 16]
        }
    }

    /// A GPT image made by sfdisk (independent of our writer), then
    /// enlarged as if written to a bigger disk. False when sfdisk is missing.
    fn make_image(img: &Path, script: &str, mib: u64, disk_mib: u64) -> bool {
        let f = File::create(img).unwrap();
        f.set_len(mib << 20).unwrap();
        drop(f);
        let mut c = match std::process::Command::new("sfdisk")
            .arg("--quiet")
            .arg(img)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(_) => return false,
        };
        std::io::Write::write_all(&mut c.stdin.take().unwrap(), script.as_bytes()).unwrap();
        assert!(c.wait().unwrap().success());
        std::fs::OpenOptions::new()
            .write(true)
            .open(img)
            .unwrap()
            .set_len(disk_mib << 20)
            .unwrap();
        true
    }

    #[test]
    fn grows_data_once_and_tells_the_kernel() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("disk.img");
        if !make_image(
            &img,
            "label: gpt\nstart=2048, size=4096, name=\"esp\"\nstart=6144, size=4096, name=\"data\"\n",
            16,
            32,
        ) {
            return;
        }
        let data = Partition {
            name: "data".into(),
            devname: "vda2".into(),
            number: 2,
            disk: "vda".into(),
            start_512: 6144,
            size_512: 4096,
        };
        let mut bd = FileDisk {
            path: img.clone(),
            resized: vec![],
            ext4: vec![],
            randoms: 0,
        };
        let dump = || {
            let o = std::process::Command::new("sfdisk")
                .arg("-d")
                .arg(&img)
                .output()
                .unwrap();
            String::from_utf8(o.stdout).unwrap()
        };
        let before = dump();
        let grown = grow_data_partition(&mut bd, &data, Path::new("/dev"), false).unwrap();
        let total = (32u64 << 20) / 512;
        let expect_len = (total - 34 - 6144 + 1) * 512;
        assert_eq!(grown, Some(expect_len));
        assert_eq!(bd.resized, vec![(2, 6144 * 512, expect_len)]);
        // The disk and both partitions got new GUIDs from the block layer's
        // random bytes (1, 2, 3: disk, esp, data), version 4.
        assert_eq!(bd.randoms, 3);
        let after = dump();
        assert!(
            after.contains("label-id: 01010101-0101-4101-8101-010101010101"),
            "{before}\n{after}"
        );
        assert!(
            after.contains("uuid=02020202-0202-4202-8202-020202020202, name=\"esp\""),
            "{after}"
        );
        assert!(
            after.contains("uuid=03030303-0303-4303-8303-030303030303, name=\"data\""),
            "{after}"
        );
        assert_eq!(
            grow_data_partition(&mut bd, &data, Path::new("/dev"), false).unwrap(),
            None
        );
        assert_eq!(bd.randoms, 3);
        assert_eq!(dump(), after);
        assert_eq!(bd.resized.len(), 1);
    }

    struct Recorder(std::sync::Mutex<Vec<String>>);

    impl ModuleLoader for Recorder {
        fn load(&self, path: &Path) -> Result<(), modules::LoadError> {
            self.0
                .lock()
                .unwrap()
                .push(path.file_name().unwrap().to_string_lossy().into_owned());
            Ok(())
        }
    }

    /// An initramfs-like root: settings, cmdline, sysfs partitions named as
    /// the builder names them, and the image's /etc under newroot.
    fn fixture_root(root: &Path) {
        let w = |p: &str, text: &str| {
            let p = root.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        w(
            "etc/basalt/initramfs.toml",
            "board = \"x86_64\"\nkernel_version = \"6.1.0\"\nmodules = [\"kernel/a/virtio_blk.ko\", \"kernel/fs/squashfs.ko\"]\nlate_modules = [\"kernel/w/softdog.ko\"]\n",
        );
        w("proc/cmdline", "console=ttyS0,115200 basalt.slot=b\n");
        w("newroot/etc/basalt/image.toml", "os_version = \"0.1.0\"\n");
        w("newroot/etc/os-release", "ID=basalt\n");
        let parts = [
            (1, "esp", 2048, 8192),
            (2, "root-a", 10240, 8192),
            (3, "root-b", 18432, 8192),
            (4, "data", 26624, 4096),
        ];
        for (n, name, start, size) in parts {
            let dir = format!("sys/devices/vda/vda{n}");
            w(
                &format!("{dir}/uevent"),
                &format!("DEVNAME=vda{n}\nDEVTYPE=partition\nPARTN={n}\nPARTNAME={name}\n"),
            );
            w(&format!("{dir}/start"), &format!("{start}\n"));
            w(&format!("{dir}/size"), &format!("{size}\n"));
            std::fs::create_dir_all(root.join("sys/class/block")).unwrap();
            let link = root.join(format!("sys/class/block/vda{n}"));
            std::os::unix::fs::symlink(format!("../../devices/vda/vda{n}"), link).unwrap();
        }
    }

    /// Seams for `reboot-partition` trials that record what stage 1 asked for.
    #[derive(Default)]
    struct NoWatchdog;
    impl crate::rpi::Watchdog for NoWatchdog {
        fn arm(&self, _: u32) -> std::io::Result<u32> {
            panic!("unexpected watchdog arm")
        }
    }
    struct NoReboot;
    impl crate::rpi::RebootWithArg for NoReboot {
        fn reboot_with_arg(&self, arg: &str) -> std::io::Result<()> {
            panic!("unexpected reboot {arg}")
        }
    }
    #[derive(Default)]
    struct SeenWatchdog(std::cell::RefCell<Vec<u32>>);
    impl crate::rpi::Watchdog for SeenWatchdog {
        fn arm(&self, secs: u32) -> std::io::Result<u32> {
            self.0.borrow_mut().push(secs);
            Ok(secs)
        }
    }
    #[derive(Default)]
    struct SeenReboot(std::cell::RefCell<Vec<String>>);
    impl crate::rpi::RebootWithArg for SeenReboot {
        fn reboot_with_arg(&self, arg: &str) -> std::io::Result<()> {
            self.0.borrow_mut().push(arg.to_string());
            // The real one does not return; a failed reboot lets the boot go on.
            Err(std::io::Error::other("test reboot"))
        }
    }

    /// Stage 1 on a `reboot-partition` board runs the trial rules against p1:
    /// a first trial boot records its attempt and arms the watchdog; the same
    /// slot booting again reboots into the primary; the primary booting with
    /// the marker reports the rollback and removes the marker.
    #[test]
    fn reboot_partition_trial_follows_the_marker() {
        use crate::rpi::{self, MarkerKind, TrialMarker};
        let t = tempfile::tempdir().unwrap();
        let root = t.path().to_path_buf();
        let cfg = root.join(TRIAL_CONFIG_MOUNT.trim_start_matches('/'));
        std::fs::create_dir_all(&cfg).unwrap();
        rpi::write_autoboot(&cfg, rpi::Autoboot { primary: Slot::A }).unwrap();
        let trial = TrialMarker {
            kind: MarkerKind::Trial,
            slot: Slot::B,
            attempts: 0,
        };
        rpi::write_marker(&cfg, &trial).unwrap();
        let p1 = blockdev::Partition {
            name: String::new(),
            devname: "mmcblk0p1".into(),
            number: 1,
            disk: "mmcblk0".into(),
            start_512: 2048,
            size_512: 8192,
        };
        let run = |slot: Slot, wd: &SeenWatchdog, rb: &SeenReboot| {
            let mut mounts = crate::mounts::fake::FakeMounts::default();
            let loader = Recorder(Default::default());
            let mut disk = FileDisk {
                path: root.join("none"),
                resized: vec![],
                ext4: vec![],
                randoms: 0,
            };
            let mut env = Env {
                root: root.clone(),
                mounts: &mut mounts,
                modules: &loader,
                module_workers: 1,
                block: &mut disk,
                dm: &mut NoDm,
                reopen_console: false,
                watchdog: wd,
                reboot: rb,
                trial_limits: TRIAL_LIMITS,
            };
            let trial = reboot_partition_trial(&mut env, Some(&p1), slot, true);
            let calls = mounts.calls.join("\n");
            assert!(
                calls.contains("/dev/mmcblk0p1 ") && calls.contains(" vfat "),
                "{calls}"
            );
            assert!(calls.contains("umount"), "{calls}");
            trial
        };

        // First boot of the trial of b: attempt recorded before the watchdog.
        let (wd, rb) = (SeenWatchdog::default(), SeenReboot::default());
        assert!(run(Slot::B, &wd, &rb));
        assert_eq!(*wd.0.borrow(), [rpi::TRIAL_WATCHDOG_SECS]);
        assert!(rb.0.borrow().is_empty());
        let m = rpi::read_marker(&cfg).unwrap().unwrap();
        assert_eq!(m.attempts, 1);

        // b boots again (watchdog reset kept the partition): back to a's p2.
        let (wd, rb) = (SeenWatchdog::default(), SeenReboot::default());
        assert!(!run(Slot::B, &wd, &rb));
        assert_eq!(*rb.0.borrow(), ["2"]);
        assert!(wd.0.borrow().is_empty());

        // The primary boots: the rollback is reported, the marker removed.
        let (wd, rb) = (SeenWatchdog::default(), SeenReboot::default());
        assert!(!run(Slot::A, &wd, &rb));
        assert!(rb.0.borrow().is_empty());
        assert_eq!(rpi::read_marker(&cfg).unwrap(), None);
    }

    /// Device-mapper that must not be used (the fixture has no verity keys).
    struct NoDm;
    impl DeviceMapper for NoDm {
        fn create_verity(
            &mut self,
            name: &str,
            _: u64,
            _: &str,
        ) -> Result<PathBuf, verity::VerityError> {
            panic!("unexpected verity mapping {name}")
        }
        fn verity_status(&mut self, name: &str) -> Result<String, verity::VerityError> {
            panic!("unexpected verity status {name}")
        }
    }

    #[test]
    fn prepare_root_follows_the_boot_protocol() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("initramfs");
        fixture_root(&root);
        let img = t.path().join("disk.img");
        if !make_image(
            &img,
            "label: gpt\nstart=2048, size=8192, name=\"esp\"\nstart=10240, size=8192, name=\"root-a\"\nstart=18432, size=8192, name=\"root-b\"\nstart=26624, size=4096, name=\"data\"\n",
            16,
            64,
        ) {
            return;
        }
        let mut mounts = crate::mounts::fake::FakeMounts::default();
        let loader = Recorder(Default::default());
        let mut disk = FileDisk {
            path: img,
            resized: vec![],
            ext4: vec![],
            randoms: 0,
        };
        let handoff = {
            let mut env = Env {
                root: root.clone(),
                mounts: &mut mounts,
                modules: &loader,
                module_workers: 1,
                block: &mut disk,
                dm: &mut NoDm,
                reopen_console: false,
                watchdog: &NoWatchdog,
                reboot: &NoReboot,
                trial_limits: TRIAL_LIMITS,
            };
            prepare_root(&mut env).unwrap()
        };
        // The late module is left for PID 1: not loaded, handed over.
        assert_eq!(*loader.0.lock().unwrap(), ["virtio_blk.ko", "squashfs.ko"]);
        assert_eq!(
            handoff.late_modules,
            [root.join("lib/modules/6.1.0/kernel/w/softdog.ko")]
        );
        let r = root.display().to_string();
        let kinds: Vec<String> = mounts
            .calls
            .iter()
            .map(|c| {
                c.replace(&r, "")
                    .split(" MsFlags")
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "mount proc /proc proc",
                "mount sysfs /sys sysfs",
                "mount devtmpfs /dev devtmpfs",
                "mount /dev/vda3 /newroot squashfs",
                "mount /dev/vda4 /newroot/var ext4",
                "mount tmpfs /newetc tmpfs",
                "mount /newetc /newroot/etc -",
                "mount /dev/vda1 /newroot/boot vfat",
                "mount tmpfs /newroot/run tmpfs",
            ]
        );
        assert!(mounts.calls[3].contains("MS_RDONLY"));
        assert!(mounts.calls[6].contains("MS_MOVE"));
        assert_eq!(handoff.slot, "b");
        assert!(handoff.root_device.ends_with("/dev/vda3"));
        assert!(handoff.data_device.ends_with("/dev/vda4"));
        assert!(handoff.boot_device.ends_with("/dev/vda1"));
        assert!(handoff.data_grown);
        for step in [
            "mounts",
            "modules",
            "wait_devices",
            "mount_root",
            "grow_data",
            "mount_data",
            "etc",
            "boot_run",
        ] {
            assert!(handoff.steps_ms.contains_key(step), "{step}");
        }
        let total = (64u64 << 20) / 512;
        let len = (total - 34 - 26624 + 1) * 512;
        assert_eq!(disk.resized, vec![(4, 26624 * 512, len)]);
        assert_eq!(disk.ext4, vec![(root.join("newroot/var"), len)]);
        assert_eq!(
            std::fs::read_to_string(root.join("newetc/os-release")).unwrap(),
            "ID=basalt\n"
        );

        // Second boot: nothing to grow, ext4 still asked to fill the partition.
        let mut mounts = crate::mounts::fake::FakeMounts::default();
        std::fs::remove_dir_all(root.join("newetc")).unwrap();
        let handoff = prepare_root(&mut Env {
            root: root.clone(),
            mounts: &mut mounts,
            modules: &loader,
            module_workers: 1,
            block: &mut disk,
            dm: &mut NoDm,
            reopen_console: false,
            watchdog: &NoWatchdog,
            reboot: &NoReboot,
            trial_limits: TRIAL_LIMITS,
        })
        .unwrap();
        assert!(!handoff.data_grown);
        assert_eq!(disk.resized.len(), 1);
        assert_eq!(disk.ext4.len(), 2);
    }

    /// Mounts that fail for the root (`*/newroot`), as a squashfs on a
    /// corrupted verity block does (EIO); the others succeed.
    #[derive(Default)]
    struct RootMountFails(Vec<String>);
    impl Mounts for RootMountFails {
        fn mount(
            &mut self,
            source: Option<&str>,
            target: &Path,
            _: Option<&str>,
            _: MsFlags,
            _: Option<&str>,
        ) -> Result<(), nix::errno::Errno> {
            self.0
                .push(format!("{} {}", source.unwrap_or("-"), target.display()));
            if target.ends_with("newroot") {
                Err(nix::errno::Errno::EIO)
            } else {
                Ok(())
            }
        }
        fn umount(&mut self, _: &Path, _: nix::mount::MntFlags) -> Result<(), nix::errno::Errno> {
            Ok(())
        }
    }

    const FAST: TrialLimits = TrialLimits {
        devices: Duration::from_millis(300),
        attempts: 3,
        pause: Duration::from_millis(1),
    };

    /// `prepare_root` on the fixture with `cmdline`, root mounts failing.
    fn trial_boot(
        root: &Path,
        cmdline: &str,
        watchdog: &dyn crate::rpi::Watchdog,
    ) -> (Result<Handoff, TrialFailed>, Vec<String>, Vec<String>) {
        std::fs::write(root.join("proc/cmdline"), cmdline).unwrap();
        let mut mounts = RootMountFails::default();
        let loader = Recorder(Default::default());
        let mut disk = FileDisk {
            path: root.join("none"),
            resized: vec![],
            ext4: vec![],
            randoms: 0,
        };
        let r = prepare_root(&mut Env {
            root: root.to_path_buf(),
            mounts: &mut mounts,
            modules: &loader,
            module_workers: 1,
            block: &mut disk,
            dm: &mut NoDm,
            reopen_console: false,
            watchdog,
            reboot: &NoReboot,
            trial_limits: FAST,
        });
        (r, mounts.0, loader.0.into_inner().unwrap())
    }

    /// A trial boot (`basalt.trial=1`) arms the watchdog after the modules and
    /// gives up, instead of retrying forever, when its root does not mount,
    /// when the verity mapping cannot be made, or when the root partition
    /// never appears; `basalt.watchdog=0` leaves the watchdog alone.
    #[test]
    fn a_trial_gives_up_when_its_root_cannot_be_mounted() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("initramfs");
        fixture_root(&root);

        // The root mount fails: tried `attempts` times, nothing after it mounted.
        let wd = SeenWatchdog::default();
        let (r, calls, loaded) = trial_boot(
            &root,
            "console=ttyS0 panic=10 basalt.trial=1 basalt.slot=b\n",
            &wd,
        );
        let failed = r.unwrap_err();
        assert_eq!(failed.slot, "b");
        assert!(
            failed.why.contains("/dev/vda3") && failed.why.contains("could not be mounted"),
            "{failed}"
        );
        assert_eq!(*wd.0.borrow(), [TRIAL_WATCHDOG_SECS]);
        // A trial loads the late modules (its watchdog driver) at once.
        assert_eq!(loaded, ["virtio_blk.ko", "squashfs.ko", "softdog.ko"]);
        let root_mounts = calls.iter().filter(|c| c.ends_with("/newroot")).count();
        assert_eq!(root_mounts, FAST.attempts as usize, "{calls:?}");
        assert!(calls.last().unwrap().ends_with("/newroot"), "{calls:?}");

        // basalt.watchdog=0: no watchdog (NoWatchdog panics if armed), same verdict.
        let (r, _, _) = trial_boot(
            &root,
            "basalt.trial=1 basalt.watchdog=0 basalt.slot=b\n",
            &NoWatchdog,
        );
        assert!(r.unwrap_err().why.contains("could not be mounted"));

        // Verity keys but no readable superblock (the fixture has no /dev/vda3).
        let wd = SeenWatchdog::default();
        let hash = "ab".repeat(32);
        let (r, calls, _) = trial_boot(
            &root,
            &format!(
                "basalt.verity={hash} basalt.verity_data_blocks=8 basalt.trial=1 basalt.slot=b\n"
            ),
            &wd,
        );
        let failed = r.unwrap_err();
        assert!(
            failed.why.contains("no verity mapping basalt-root-b")
                && failed.why.contains("after 3 tries"),
            "{failed}"
        );
        assert!(!calls.iter().any(|c| c.ends_with("/newroot")), "{calls:?}");

        // root-b never appears: given up after `devices`.
        std::fs::remove_file(root.join("sys/class/block/vda3")).unwrap();
        let wd = SeenWatchdog::default();
        let t0 = Instant::now();
        let (r, calls, _) = trial_boot(&root, "basalt.trial=1 basalt.slot=b\n", &wd);
        let failed = r.unwrap_err();
        assert!(failed.why.contains("root-b did not appear"), "{failed}");
        assert!(t0.elapsed() >= FAST.devices, "{:?}", t0.elapsed());
        assert!(t0.elapsed() < WAIT_DEVICES, "{:?}", t0.elapsed());
        assert_eq!(*wd.0.borrow(), [TRIAL_WATCHDOG_SECS]);
        assert!(!calls.iter().any(|c| c.ends_with("/newroot")), "{calls:?}");
    }

    /// A Pi 4/5 (`boot_method = "tryboot"`) whose firmware booted its
    /// one-shot tryboot is a trial without `basalt.trial=1`: its watchdog
    /// driver loaded and the watchdog armed at once, and it gives up (to
    /// reboot into the primary) instead of retrying forever. The same board
    /// booted normally, or another board with the flag, is not a trial.
    #[test]
    fn a_tryboot_boot_is_a_trial() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("initramfs");
        fixture_root(&root);
        let settings = root.join("etc/basalt/initramfs.toml");
        let mut text = std::fs::read_to_string(&settings).unwrap();
        text.push_str("boot_method = \"tryboot\"\n");
        std::fs::write(&settings, text).unwrap();
        let dt = root.join(crate::rpi::BOOTLOADER_DT_DIR.trim_start_matches('/'));
        std::fs::create_dir_all(&dt).unwrap();
        std::fs::write(dt.join("tryboot"), 1u32.to_be_bytes()).unwrap();
        std::fs::write(dt.join("partition"), 3u32.to_be_bytes()).unwrap();

        // What decides it.
        let args = |line: &str| crate::cmdline::parse(line);
        let plain = args("basalt.slot=b");
        assert_eq!(
            trial_reason(&plain, Some("tryboot"), &dt),
            Some("the firmware's tryboot")
        );
        assert_eq!(trial_reason(&plain, Some("reboot-partition"), &dt), None);
        assert_eq!(trial_reason(&plain, Some("systemd-boot"), &dt), None);
        assert_eq!(trial_reason(&plain, None, &dt), None);
        assert_eq!(
            trial_reason(&args("basalt.trial=1"), Some("systemd-boot"), &dt),
            Some("basalt.trial=1")
        );
        std::fs::write(dt.join("tryboot"), 0u32.to_be_bytes()).unwrap();
        assert_eq!(trial_reason(&plain, Some("tryboot"), &dt), None);
        // Unreadable (a property of the wrong length) or absent (no Pi
        // firmware, QEMU): not a trial.
        std::fs::write(dt.join("tryboot"), [1u8]).unwrap();
        assert_eq!(trial_reason(&plain, Some("tryboot"), &dt), None);
        std::fs::remove_file(dt.join("tryboot")).unwrap();
        assert_eq!(trial_reason(&plain, Some("tryboot"), &dt), None);

        // The whole stage 1, on a thread: a boot not taken for a trial
        // would retry its root forever.
        std::fs::write(dt.join("tryboot"), 1u32.to_be_bytes()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let r2 = root.clone();
        std::thread::spawn(move || {
            let wd = SeenWatchdog::default();
            let out = trial_boot(&r2, "console=ttyAMA0,115200 basalt.slot=b\n", &wd);
            let _ = tx.send((out, wd.0.into_inner()));
        });
        let ((r, calls, loaded), armed) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the tryboot boot was not taken for a trial: stage 1 kept retrying its root");
        let failed = r.unwrap_err();
        assert!(failed.why.contains("could not be mounted"), "{failed}");
        assert_eq!(armed, [TRIAL_WATCHDOG_SECS]);
        assert_eq!(loaded, ["virtio_blk.ko", "squashfs.ko", "softdog.ko"]);
        let root_mounts = calls.iter().filter(|c| c.ends_with("/newroot")).count();
        assert_eq!(root_mounts, FAST.attempts as usize, "{calls:?}");
    }

    #[test]
    fn copies_etc_with_links_and_modes() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let from = t.path().join("etc");
        std::fs::create_dir_all(from.join("basalt/services")).unwrap();
        std::fs::write(
            from.join("basalt/services/a.toml"),
            "exec = [\"/bin/true\"]",
        )
        .unwrap();
        std::fs::write(from.join("shadow"), "root:*:").unwrap();
        std::fs::set_permissions(from.join("shadow"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        std::os::unix::fs::symlink("/proc/self/mounts", from.join("mtab")).unwrap();
        let to = t.path().join("newetc");
        std::fs::create_dir(&to).unwrap();
        copy_tree(&from, &to).unwrap();
        assert_eq!(
            std::fs::read_to_string(to.join("basalt/services/a.toml")).unwrap(),
            "exec = [\"/bin/true\"]"
        );
        assert_eq!(
            std::fs::metadata(to.join("shadow"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::read_link(to.join("mtab")).unwrap(),
            PathBuf::from("/proc/self/mounts")
        );
    }

    #[test]
    fn handoff_round_trips_as_toml() {
        let h = Handoff {
            slot: "a".into(),
            kernel_start_to_stage1_ms: 1234,
            stage1_end_ms: 1800,
            data_grown: true,
            root_device: "/dev/vda2".into(),
            data_device: "/dev/vda4".into(),
            boot_device: "/dev/vda1".into(),
            verity_root_hash: "ab".repeat(32),
            verity_name: "basalt-root-a".into(),
            trial: true,
            boot_method: "reboot-partition".into(),
            cpu_start_user_us: 10,
            cpu_start_system_us: 2000,
            cpu_end_user_us: 30,
            cpu_end_system_us: 4000,
            module_threads: 2,
            steps_ms: [("modules".to_string(), 120)].into_iter().collect(),
            late_modules: Vec::new(),
        };
        let text = h.to_toml();
        assert!(text.contains("slot = \"a\""), "{text}");
        assert!(text.contains("[steps_ms]"), "{text}");
        // Read back by the `toml` crate and by the subset reader alike.
        assert_eq!(toml::from_str::<Handoff>(&text).unwrap(), h);
        assert!(crate::tomlfast::parse(&text).is_some(), "{text}");
        assert_eq!(crate::tomlfast::from_str::<Handoff>(&text).unwrap(), h);
        // (Every field of `h` differs from its default: one that to_toml
        // forgot would read back as the default and fail the comparison.)
        // The contract's example parses.
        let example = "slot = \"a\"\nkernel_start_to_stage1_ms = 1234\nstage1_end_ms = 1800\ndata_grown = true\nroot_device = \"/dev/vda2\"\ndata_device = \"/dev/vda4\"\nboot_device = \"/dev/vda1\"\n[steps_ms]\nmodules = 120\nwait_devices = 30\n";
        assert_eq!(
            toml::from_str::<Handoff>(example).unwrap().steps_ms["wait_devices"],
            30
        );
    }

    #[test]
    fn slot_from_cmdline_file() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("cmdline");
        std::fs::write(&p, "console=ttyS0 basalt.slot=b basalt.root=6\n").unwrap();
        let args = boot_args(&p);
        assert_eq!(args.slot, Some(Slot::B));
        assert_eq!(mbr_root_partition(&args, Slot::B), 6);
        std::fs::write(&p, "console=ttyS0\n").unwrap();
        let args = boot_args(&p);
        assert_eq!(args.slot, None);
        assert_eq!(mbr_root_partition(&args, Slot::A), 5);
    }

    #[test]
    fn an_unreadable_gpt_is_warned_about_once_per_boot() {
        let mut warned = std::collections::BTreeSet::new();
        let sda = "/dev/sda: GPT header CRC mismatch".to_string();
        let sdb = "/dev/sdb: Input/output error (os error 5)".to_string();
        assert!(BootDiskLook::warn_once(&mut warned, sda.clone()));
        assert!(BootDiskLook::warn_once(&mut warned, sdb.clone()));
        for _ in 0..150 {
            assert!(!BootDiskLook::warn_once(&mut warned, sda.clone()));
            assert!(!BootDiskLook::warn_once(&mut warned, sdb.clone()));
        }
        assert_eq!(warned.len(), 2);
    }

    #[test]
    fn deletes_only_on_the_same_device() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a/b")).unwrap();
        std::fs::write(t.path().join("a/b/f"), "x").unwrap();
        let dev = std::fs::metadata(t.path()).unwrap().dev();
        assert_eq!(delete_same_device(t.path(), dev + 1), 0);
        assert!(t.path().join("a/b/f").exists());
        assert_eq!(delete_same_device(t.path(), dev), 1);
        assert!(!t.path().join("a").exists());
    }

    /// PID 1 frees the initramfs after the chroot through the directory
    /// stage 1 kept open (`/proc/self/fd/<n>`): its contents go, the
    /// directory itself stays.
    #[test]
    fn deletes_the_old_root_through_its_open_descriptor() {
        let t = tempfile::tempdir().unwrap();
        let old = t.path().join("old");
        std::fs::create_dir_all(old.join("lib/modules")).unwrap();
        std::fs::write(old.join("init"), vec![0u8; 5000]).unwrap();
        std::fs::write(old.join("lib/modules/m.ko"), vec![0u8; 3000]).unwrap();
        let dir = std::fs::File::open(&old).unwrap();
        assert_eq!(delete_initramfs(dir, Path::new("/proc")), 8000);
        assert!(old.is_dir());
        assert_eq!(std::fs::read_dir(&old).unwrap().count(), 0);
    }
}
