//! Stage 2: PID 1 in the real root. Its phases, in boot order, are the
//! `PHASES` list below (docs/boot-protocol.md "Stage 2"); then the
//! supervisor runs until a shutdown signal, and `shutdown` brings the
//! system down and calls `reboot(2)`.
//!
//! Every phase runs under `catch_unwind`: a failed or panicking phase is
//! reported as `basalt: error <phase> ...` and the boot goes on.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::console::{self, guarded};
use crate::image::ImageFacts;
use crate::mounts::{self, KernelMounts, Mounts};
use crate::report::{self, Json};
use crate::say;
use crate::service::{self, ServiceDef};
use crate::slot::{self, IMAGE_FACTS_PATH, MACHINE_ID_PATH, SERVICES_DIR};
use crate::stage1::Handoff;
use crate::supervisor::{Config, NodeInfo, ShutdownKind, Supervisor};
use crate::sys::{self, MsFlags, RebootHow, Signal};

#[derive(Debug, thiserror::Error)]
pub enum Stage2Error {
    #[error(transparent)]
    Mount(#[from] mounts::MountError),
    #[error("{what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("enabling cgroup controllers {controllers:?} in {path}")]
    Controllers {
        controllers: Vec<String>,
        path: PathBuf,
    },
    #[error("generating machine id: {0}")]
    Random(sys::Errno),
    #[error("setting hostname {name:?}: {errno}")]
    Hostname { name: String, errno: sys::Errno },
    #[error("bringing up interface {name}: {errno}")]
    Interface {
        name: &'static str,
        errno: sys::Errno,
    },
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
}

fn file_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Stage2Error + use<> {
    let path = path.to_path_buf();
    move |source| Stage2Error::File { what, path, source }
}

/// What the phases learn, for the later phases and the ready report.
#[derive(Debug, Default)]
pub struct Context {
    pub handoff: Handoff,
    pub machine_id: String,
    /// The machine id was made this boot and is not flushed yet
    /// (`make_durable` in the after-first-start hook).
    pub machine_id_made: bool,
    pub hostname: String,
    pub services: Vec<ServiceDef>,
    pub distribution: Option<service::Distribution>,
    /// `TZ` for services when the image has no zoneinfo (node config).
    pub tz: Option<String>,
    /// Node config `console.emergency_shell`.
    pub emergency_shell: bool,
    /// `/etc/basalt/image.toml`, read once by the first phase that needs it.
    pub facts: Option<ImageFacts>,
    pub stage2_end_ms: u64,
    /// The node config's child, from its start to `node_config`.
    pub node_config: Option<crate::apply::pid1::Started>,
    /// Stage 1's late modules and old root, for after the supervisor's first round.
    pub late_modules: crate::modules::OpenedModules,
    pub initramfs: Option<std::fs::File>,
    /// Duration of each phase, for `basaltctl boot-time`.
    pub phases_ms: Vec<(String, u64)>,
}

type Phase = fn(&mut Context) -> Result<(), Stage2Error>;

/// Stage 2's phases, in order. The ready report follows when every service
/// is ready (the supervisor's hook).
const PHASES: &[(&str, Phase)] = &[
    ("handoff", read_handoff),
    ("config-start", start_node_config),
    ("kernel-mounts", kernel_mounts),
    ("machine-id", machine_id),
    ("node-config", node_config),
    ("network", network),
    ("services", load_services),
    ("kubernetes", kubernetes),
];

/// Run stage 2. Never returns: ends in `reboot(2)`. `from_stage1`: when
/// stage 1 continues into stage 2 in the same process (the normal boot);
/// `None` when the kernel started init from the root (no initramfs): then
/// the handoff is read from `/run/basalt/stage1.toml` if there is one.
/// What stage 1 hands to stage 2 when it continues in the same process.
#[derive(Debug)]
pub struct FromStage1 {
    pub handoff: Handoff,
    /// The late modules stage 1 opened: loaded right after Kubernetes is started.
    pub late_modules: crate::modules::OpenedModules,
    /// The old root (the initramfs), open: its files are deleted right after
    /// Kubernetes is started (`stage1::delete_initramfs`).
    pub initramfs: Option<std::fs::File>,
}

pub fn run(from_stage1: Option<FromStage1>) -> ! {
    let started_ms = sys::boottime_ms();
    console::install_panic_hook();
    // The ring first (stage 1's, with its lines, when it continued here),
    // so that `stage2 start` is in it.
    crate::logs::init_from_image(Path::new(slot::IMAGE_FACTS_PATH));
    say!("stage2 start");
    // Block PID 1's signals now so one sent during the phases stays pending
    // for the supervisor's signalfd instead of being dropped (PID 1 has no
    // default actions).
    if let Err(e) = sys::Signals::open(crate::supervisor::SIGNALS) {
        console::error("signals", e);
    }
    let mut ctx = Context::default();
    let given = from_stage1.is_some();
    if let Some(f) = from_stage1 {
        ctx.handoff = f.handoff;
        ctx.late_modules = f.late_modules;
        ctx.initramfs = f.initramfs;
    }
    for (name, phase) in PHASES {
        if given && *name == "handoff" {
            continue;
        }
        let t0 = sys::boottime_ms();
        if let Some(Err(e)) = guarded(name, || phase(&mut ctx)) {
            console::error(name, e);
        }
        ctx.phases_ms
            .push((name.to_string(), sys::boottime_ms().saturating_sub(t0)));
    }
    // From stage 1's end to stage 2's first step: the handoff file, moving
    // the kernel filesystems, switch_root (the initramfs' files are deleted
    // later, after the first round of service starts).
    ctx.phases_ms.insert(
        0,
        (
            "switch_root".to_string(),
            started_ms.saturating_sub(ctx.handoff.stage1_end_ms),
        ),
    );
    ctx.stage2_end_ms = report::uptime_ms(Path::new("/proc"));
    if let Err(e) = sys::ctrl_alt_del_to_signal() {
        console::error("ctrl-alt-del", e);
    }
    let kind = match supervise(ctx) {
        Some(kind) => kind,
        None => {
            // No supervisor (signalfd failed): nothing can ask us to stop;
            // keep PID 1 alive and reaping.
            loop {
                while sys::reap_one().is_some() {}
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    shutdown(kind)
}

fn watchdog_wanted(cmdline_path: &Path) -> bool {
    let text = std::fs::read_to_string(cmdline_path).unwrap_or_default();
    crate::cmdline::parse(&text).watchdog.unwrap_or(true)
}

/// The shell `console.emergency_shell` offers (busybox's in Basalt images).
pub const EMERGENCY_SHELL: &str = "/bin/sh";

fn supervise(mut ctx: Context) -> Option<ShutdownKind> {
    let late = std::mem::take(&mut ctx.late_modules);
    let initramfs = ctx.initramfs.take();
    let booted = ctx.handoff.slot.clone();
    let id_made = ctx.machine_id_made;
    let version = ctx.facts.as_ref().map(|f| f.os_version.clone());
    // Held from before the services start until the bookkeeping is done.
    let update_lock = crate::update::lock_for_boot()
        .map_err(|e| console::error("update", e))
        .ok();
    let config = Config {
        services: ctx.services.clone(),
        control_socket: Some(PathBuf::from(slot::CONTROL_SOCKET)),
        base_env: vec![
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
            ("HOME".into(), "/root".into()),
        ]
        .into_iter()
        .chain(ctx.tz.clone().map(|tz| ("TZ".to_string(), tz)))
        .collect(),
        info: NodeInfo {
            slot: ctx.handoff.slot.clone(),
            hostname: ctx.hostname.clone(),
            machine_id: ctx.machine_id.clone(),
            verity: Some(ctx.handoff.verity_name.clone()).filter(|n| !n.is_empty()),
            boot: crate::boottime::BootTimes {
                // Read once efivarfs is mounted (the after-first-start hook).
                firmware_loader_us: None,
                stage1_start_ms: ctx.handoff.kernel_start_to_stage1_ms,
                stage1_end_ms: ctx.handoff.stage1_end_ms,
                stage1_steps: crate::boottime::STAGE1_ORDER
                    .iter()
                    .filter_map(|n| ctx.handoff.steps_ms.get(*n).map(|d| (n.to_string(), *d)))
                    .collect(),
                module_threads: ctx.handoff.module_threads,
                stage2_end_ms: ctx.stage2_end_ms,
                stage2_steps: ctx.phases_ms.clone(),
                stage1_cpu_us: (
                    ctx.handoff.cpu_start_user_us,
                    ctx.handoff.cpu_start_system_us,
                ),
            },
        },
        proc_dir: PathBuf::from("/proc"),
        // `basalt.watchdog=0` on the command line leaves the watchdog alone:
        // for emulators whose watchdog model resets at once when armed (QEMU's
        // raspi machines reset on the first write to the PM registers).
        watchdog: watchdog_wanted(Path::new("/proc/cmdline"))
            .then(|| PathBuf::from("/dev/watchdog")),
    };
    let mut sup = match Supervisor::new(config) {
        Ok(s) => s,
        Err(e) => {
            console::error("supervisor", e);
            return None;
        }
    };
    // The node's own partitions: their removal reboots the node
    // (crate::storage); watched from the after-first-start hook, off the path.
    let watched: Vec<_> = [
        (&ctx.handoff.root_device, "the slot's root"),
        (&ctx.handoff.data_device, "the data partition, /var"),
        (&ctx.handoff.boot_device, "the boot partition, /boot"),
    ]
    .into_iter()
    .filter_map(|(dev, role)| crate::storage::Watched::from_dev_path(dev, role))
    .collect();
    sup.set_emergency_shell(
        ctx.emergency_shell
            .then(|| PathBuf::from(EMERGENCY_SHELL))
            .filter(|p| p.exists()),
    );
    // What the path to Kubernetes did not need, once the services (Kubernetes
    // first) have been started: the update bookkeeping (a trial's health
    // gate), freeing the initramfs, stage 1's late modules, then efivarfs
    // and the firmware's times. The supervisor opens the watchdog right after.
    sup.after_first_start(Box::new(move |s: &mut Supervisor| {
        if id_made && let Err(e) = make_durable(Path::new(MACHINE_ID_PATH)) {
            console::error("machine-id", e);
        }
        match crate::storage::StorageWatch::open(watched, Path::new("/sys/class/block")) {
            Ok(Some(w)) => s.watch_storage(w),
            Ok(None) => {}
            Err(e) => console::error(
                "storage",
                format_args!("device events: {e}; a removed disk is not noticed"),
            ),
        }
        update_after_services(s, &booted, version.as_deref(), update_lock);
        if let Some(dir) = initramfs {
            let t0 = sys::boottime_ms();
            let bytes = crate::stage1::delete_initramfs(dir, Path::new("/proc"));
            say!(
                "initramfs files deleted: {} KiB in {} ms",
                bytes / 1024,
                sys::boottime_ms().saturating_sub(t0)
            );
        }
        if !late.is_empty() {
            let (t0, names) = (sys::boottime_ms(), late.names());
            let report = late.load();
            let ms = sys::boottime_ms().saturating_sub(t0);
            say!("{}", late_modules_line(&names, ms, &report));
        }
        let mounted = std::fs::read_to_string("/proc/self/mounts").is_ok_and(|t| {
            mounts::parse_mount_points(&t)
                .iter()
                .any(|p| p == Path::new(EFIVARS))
        });
        mount_efivarfs(&mut KernelMounts, mounted);
        s.set_firmware_times(crate::boottime::read_firmware(Path::new(EFIVARS)));
    }));
    // The last known time, for the next boot's clock (Pis have no RTC).
    sup.every(
        Duration::from_secs(15 * 60),
        Box::new(|| {
            if let Err(e) = crate::apply::clock::save_now() {
                console::error("clock", e);
            }
        }),
    );
    // Batched persistent log lines reach the file even when the node is
    // quiet. Only when logs are persistent (the node config is applied by
    // now, and it is read once per boot): otherwise the loop would wake
    // every few seconds for nothing on an idle node.
    if crate::logs::is_persistent() {
        sup.every(crate::logs::BATCH_AGE, Box::new(crate::logs::flush));
    }
    sup.on_all_ready(Box::new(move |s: &Supervisor| {
        // The boot's code (phases, service start-up, the node config
        // results) is not run again: drop it from PID 1's page tables, so
        // what stays mapped is what the supervision loop uses.
        if let Err(e) = sys::release_code_pages() {
            console::error("ready", format_args!("releasing code pages: {e}"));
        }
        let line = ready_report(&ctx, s, Path::new("/proc"));
        say!("ready {line}");
    }));
    Some(sup.run())
}

/// The `basalt: ready {json}` object (docs/boot-protocol.md "Console lines").
pub fn ready_report(ctx: &Context, sup: &Supervisor, proc_dir: &Path) -> Json {
    let k = service::KUBERNETES_SERVICE;
    let (exec_at, ready_at) = sup.milestones(k);
    Json::Obj(vec![
        ("slot", Json::str(&ctx.handoff.slot)),
        ("hostname", Json::str(&ctx.hostname)),
        ("machine_id", Json::str(&ctx.machine_id)),
        (
            "kubernetes",
            Json::Obj(vec![
                (
                    "distribution",
                    ctx.distribution.map_or(Json::Null, |d| Json::str(d.name())),
                ),
                ("pid", Json::opt_num(sup.pid_of(k).map(|p| p as u64))),
            ]),
        ),
        ("pid1_rss_kib", Json::Num(report::rss_kib(proc_dir))),
        ("data_grown", Json::Bool(ctx.handoff.data_grown)),
        ("verity", sup.verity_json()),
        (
            "timings_ms",
            Json::Obj(vec![
                (
                    "stage1_start",
                    Json::Num(ctx.handoff.kernel_start_to_stage1_ms),
                ),
                ("stage1", Json::Num(ctx.handoff.stage1_end_ms)),
                ("stage2", Json::Num(ctx.stage2_end_ms)),
                ("kubernetes_exec", Json::opt_num(exec_at)),
                ("kubernetes_ready", Json::opt_num(ready_at)),
            ]),
        ),
        (
            "init_cpu_ms",
            sup.cpu_until_exec(k).map_or(Json::Null, |(user, sys)| {
                let h = &ctx.handoff;
                Json::Obj(vec![
                    ("user", Json::Num(user / 1000)),
                    ("system", Json::Num(sys / 1000)),
                    (
                        "stage1_user",
                        Json::Num(h.cpu_end_user_us.saturating_sub(h.cpu_start_user_us) / 1000),
                    ),
                    (
                        "stage1_system",
                        Json::Num(h.cpu_end_system_us.saturating_sub(h.cpu_start_system_us) / 1000),
                    ),
                ])
            }),
        ),
    ])
}

// ------------------------------------------------------------------ phases

fn read_handoff(ctx: &mut Context) -> Result<(), Stage2Error> {
    let path = Path::new("/run/basalt/stage1.toml");
    let text = std::fs::read_to_string(path).map_err(file_err("reading stage 1 handoff", path))?;
    match crate::tomlfast::from_str::<Handoff>(&text) {
        Ok(h) => ctx.handoff = h,
        Err(e) => console::error("handoff", format_args!("{} ({e})", path.display())),
    }
    Ok(())
}

fn kernel_mounts(_ctx: &mut Context) -> Result<(), Stage2Error> {
    let m: &mut dyn Mounts = &mut KernelMounts;
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    // Stage 1 moved these here; a boot without our initramfs still needs them.
    let base: [(&str, &str, &str, MsFlags, Option<&str>); 4] = [
        ("proc", "/proc", "proc", nosuid, None),
        ("sysfs", "/sys", "sysfs", nosuid, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
    ];
    // The kernel's mount table, read once (a bind mount of a directory onto
    // itself has the same device as its parent, so stat cannot tell).
    let read_table = || std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut table = read_table();
    if table.is_empty() {
        // No /proc yet (booted without our initramfs): mount it to read the table.
        if let Err(e) = mounts::mount_fs(m, "proc", Path::new("/proc"), "proc", nosuid, None) {
            console::error("mount", e);
        }
        table = read_table();
    }
    let mounted = mounts::parse_mount_points(&table);
    let is_mount_point = |p: &Path| mounted.iter().any(|m| m == p);
    for (src, target, fs, flags, data) in base {
        if !is_mount_point(Path::new(target))
            && let Err(e) = mounts::mount_fs(m, src, Path::new(target), fs, flags, data)
        {
            console::error("mount", e);
        }
    }
    // efivarfs (systemd-boot's timing variables, for `basaltctl boot-time`)
    // is not needed before Kubernetes: it is mounted after the first round of
    // service starts, with the late modules (one of which it may be).
    let cg = Path::new("/sys/fs/cgroup");
    let rest: [(&str, &Path, &str, MsFlags, Option<&str>); 4] = [
        ("cgroup2", cg, "cgroup2", nosuid, Some("nsdelegate")),
        (
            "devpts",
            Path::new("/dev/pts"),
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("mode=0620,ptmxmode=0666"),
        ),
        (
            "shm",
            Path::new("/dev/shm"),
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            Path::new("/tmp"),
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
    ];
    for (src, target, fs, flags, data) in rest {
        if let Err(e) = mounts::mount_fs(m, src, target, fs, flags, data) {
            console::error("mount", e);
        }
    }
    enable_cgroup_controllers(cg, sys::getpid())
}

/// The summary of the late modules' load (`names` as listed); the ENODEV
/// ones were said one by one, and are counted here too.
pub fn late_modules_line(names: &[String], ms: u64, report: &crate::modules::LoadReport) -> String {
    let absent = if report.absent.is_empty() {
        String::new()
    } else {
        format!(" ({} not for this machine)", report.absent.len())
    };
    format!(
        "late modules {} loaded after the services started: {ms} ms, {} failed{absent}",
        names.join(" "),
        report.failed.len()
    )
}

/// Where efivarfs is mounted (read-only).
const EFIVARS: &str = "/sys/firmware/efi/efivars";

/// Mount efivarfs read-only at [`EFIVARS`] on an EFI system, when the kernel
/// has the filesystem (built in, or its module loaded) and it is not there yet.
fn mount_efivarfs(m: &mut dyn Mounts, mounted: bool) {
    let efivars = Path::new(EFIVARS);
    let known = std::fs::read_to_string("/proc/filesystems").is_ok_and(|t| {
        t.lines()
            .any(|l| l.split_whitespace().last() == Some("efivarfs"))
    });
    if mounted || !known || !efivars.is_dir() {
        return;
    }
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY;
    if let Err(e) = mounts::mount_fs(m, "efivarfs", efivars, "efivarfs", flags, None) {
        console::error("mount", e);
    }
}

/// Move `pid` into the leaf `<root>/init` and enable every available
/// controller for the root's children (k3s/k0s need cpu, memory, pids, ...).
/// The root cgroup may hold processes, but keeping PID 1 in a leaf lets the
/// Kubernetes side delegate the tree without moving us.
pub fn enable_cgroup_controllers(root: &Path, pid: u32) -> Result<(), Stage2Error> {
    let leaf = root.join("init");
    std::fs::create_dir_all(&leaf).map_err(file_err("creating cgroup", &leaf))?;
    let procs = leaf.join("cgroup.procs");
    std::fs::write(&procs, pid.to_string()).map_err(file_err("moving init into cgroup", &procs))?;
    let available_path = root.join("cgroup.controllers");
    let available =
        std::fs::read_to_string(&available_path).map_err(file_err("reading", &available_path))?;
    let control = root.join("cgroup.subtree_control");
    let mut failed = Vec::new();
    for c in available.split_whitespace() {
        // One write per controller: one that cannot be enabled must not stop the rest.
        let ok = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&control)
            .and_then(|mut f| f.write_all(format!("+{c}").as_bytes()))
            .is_ok();
        if !ok {
            failed.push(c.to_string());
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Stage2Error::Controllers {
            controllers: failed,
            path: control,
        })
    }
}

fn machine_id(ctx: &mut Context) -> Result<(), Stage2Error> {
    (ctx.machine_id, ctx.machine_id_made) = ensure_machine_id(
        Path::new(MACHINE_ID_PATH),
        Path::new("/etc/machine-id"),
        &mut |b| sys::getrandom(b),
    )?;
    Ok(())
}

fn valid_machine_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && s.bytes().any(|b| b != b'0')
}

/// The node's machine id: kept at `persist` (on `/var`), made on first boot
/// from `random` (128 bits, formatted like systemd's: v4 UUID bits, 32 hex),
/// and copied to `etc`; true when made now. The persistent copy is written
/// new-then-rename, so a power cut leaves either no id or a bad one (made
/// again: both are refused) or the complete one. A new one is not yet
/// flushed: [`make_durable`] follows right after the services started (a
/// power cut before it gives the node a new id on its next boot, before
/// Kubernetes could have registered the node with this one).
pub fn ensure_machine_id(
    persist: &Path,
    etc: &Path,
    random: &mut dyn FnMut(&mut [u8]) -> Result<(), sys::Errno>,
) -> Result<(String, bool), Stage2Error> {
    let existing = std::fs::read_to_string(persist)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| valid_machine_id(s));
    let (id, made) = match existing {
        Some(id) => (id, false),
        None => {
            let mut b = [0u8; 16];
            random(&mut b).map_err(Stage2Error::Random)?;
            b[6] = (b[6] & 0x0f) | 0x40;
            b[8] = (b[8] & 0x3f) | 0x80;
            let id: String = b.iter().map(|x| format!("{x:02x}")).collect();
            write_replace(persist, format!("{id}\n").as_bytes(), false)?;
            (id, true)
        }
    };
    std::fs::write(etc, format!("{id}\n")).map_err(file_err("writing", etc))?;
    Ok((id, made))
}

/// Flush `path` and its directory (after a [`write_replace`] without sync).
pub fn make_durable(path: &Path) -> Result<(), Stage2Error> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(file_err("syncing", path))?;
    if let Ok(d) = std::fs::File::open(path.parent().unwrap_or(Path::new("/"))) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Write `data` to `path` through a temp file renamed over it, so that a
/// power cut leaves the old or the new content; with `sync`, fsync before
/// the rename and the directory after (durable on return).
pub fn write_replace(path: &Path, data: &[u8], sync: bool) -> Result<(), Stage2Error> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(file_err("creating", dir))?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(file_err("creating", &tmp))?;
    f.write_all(data).map_err(file_err("writing", &tmp))?;
    if sync {
        f.sync_all().map_err(file_err("syncing", &tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(file_err("renaming into place", path))?;
    if sync && let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Hostnames as RFC 1123 allows (labels of letters, digits, '-').
pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 64
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The node config's child starts first, so that it runs while PID 1 does
/// the kernel mounts and the machine id (it needs neither: it writes /etc,
/// /var, /run and the kernel's settings); on a multi-core machine in
/// parallel, on one core at least through each other's I/O waits. Booted
/// without our initramfs nothing is mounted yet (no /proc, no /run): then
/// `node_config` starts it, after the kernel mounts.
fn start_node_config(ctx: &mut Context) -> Result<(), Stage2Error> {
    if Path::new("/proc/self").exists() {
        ctx.node_config = Some(crate::apply::pid1::start(Path::new(
            crate::apply::RESULT_FILE,
        )));
    }
    Ok(())
}

/// The node config, parsed and applied by a child process (`apply`): the
/// parser's memory must never be PID 1's. PID 1 only reads the results.
fn node_config(ctx: &mut Context) -> Result<(), Stage2Error> {
    let mut output = crate::apply::pid1::Output::default();
    let started = ctx
        .node_config
        .take()
        .unwrap_or_else(|| crate::apply::pid1::start(Path::new(crate::apply::RESULT_FILE)));
    let results = match started.finish(crate::apply::pid1::TIMEOUT, &mut output) {
        Ok(r) => r,
        Err(e) => {
            console::error("node-config", e);
            crate::apply::Results::default()
        }
    };
    // The child ran this same binary, so its parser's pages are now cached
    // next to PID 1's code: turn fault-around off (`sys::disable_fault_around`)
    // so PID 1's own faults map only the page they need. What PID 1 mapped
    // so far is dropped when the boot is ready (`sys::release_code_pages` in
    // `supervise`); dropping it here as well changed nothing in PID 1's RSS
    // (424 KiB at ready, 632 KiB 10 s later, either way) and cost ~5 ms.
    match sys::disable_fault_around() {
        // A kernel without debugfs: nothing to turn off, nothing wrong.
        Ok(()) | Err(sys::Errno::ENODEV | sys::Errno::ENOENT) => {}
        Err(e) => console::error("node-config", format_args!("turning fault-around off: {e}")),
    }
    // The child's lines (config errors) to the console and the log ring,
    // now that this maps nothing extra into PID 1.
    crate::apply::pid1::relay(&output);
    // The node config's `logs` over the image's: ring size, console mirror,
    // and /var/log/basalt.log only when opted in (docs/logs.md).
    crate::logs::apply_node_config(
        results.logs.as_ref(),
        Path::new(crate::logs::PERSISTENT_DIR),
    );
    ctx.tz = results.tz.clone();
    ctx.emergency_shell = results.emergency_shell;
    let name = match results.hostname {
        Some(h) if valid_hostname(&h) => h,
        _ => {
            let short: String = ctx.machine_id.chars().take(8).collect();
            let name = if short.is_empty() {
                "basalt".to_string()
            } else {
                format!("basalt-{short}")
            };
            sys::sethostname(&name).map_err(|errno| Stage2Error::Hostname {
                name: name.clone(),
                errno,
            })?;
            name
        }
    };
    let etc_hostname = Path::new("/etc/hostname");
    std::fs::write(etc_hostname, format!("{name}\n")).map_err(file_err("writing", etc_hostname))?;
    ctx.hostname = name;
    Ok(())
}

/// Loopback first: services and readiness checks talk to 127.0.0.1.
/// (Interfaces from the node config come with the node-config work.)
fn network(_ctx: &mut Context) -> Result<(), Stage2Error> {
    sys::interface_up("lo").map_err(|errno| Stage2Error::Interface { name: "lo", errno })
}

fn load_services(ctx: &mut Context) -> Result<(), Stage2Error> {
    let (mut defs, errors) = service::load_dir(Path::new(SERVICES_DIR));
    // Services the node config generated (apply), after the image's own.
    let (generated, more) = service::load_dir(Path::new(crate::apply::SERVICES_DIR));
    for e in errors.into_iter().chain(more) {
        console::error("service-file", e);
    }
    for g in generated {
        if defs.iter().any(|d| d.name == g.name) {
            console::error(
                "service-file",
                format_args!(
                    "{}/{}.toml: the image has a service of that name; kept the image's",
                    crate::apply::SERVICES_DIR,
                    g.name
                ),
            );
        } else {
            defs.push(g);
        }
    }
    ctx.services = defs;
    Ok(())
}

/// The image's facts, read on first use and kept in the context.
fn image_facts(ctx: &mut Context) -> Result<&ImageFacts, Stage2Error> {
    let facts = match ctx.facts.take() {
        Some(f) => f,
        None => ImageFacts::load(Path::new(IMAGE_FACTS_PATH))?,
    };
    Ok(ctx.facts.insert(facts))
}

fn kubernetes(ctx: &mut Context) -> Result<(), Stage2Error> {
    if let Some(k) = image_facts(ctx)?.kubernetes.clone() {
        ctx.services
            .retain(|s| s.name != service::KUBERNETES_SERVICE);
        // The node config's role, when it has a [kubernetes] section (apply).
        let path = Path::new(crate::apply::KUBERNETES_FILE);
        let from_config = std::fs::read_to_string(path).ok().and_then(|text| {
            ServiceDef::parse(service::KUBERNETES_SERVICE, &text, path)
                .map_err(|e| console::error("kubernetes", e))
                .ok()
        });
        // First in the list: among services with no `after` between them,
        // Kubernetes (the boot's critical path) is spawned before the rest.
        ctx.services.insert(
            0,
            from_config.unwrap_or_else(|| service::kubernetes_service(k.distribution, &k.binary)),
        );
        ctx.distribution = Some(k.distribution);
    }
    Ok(())
}

/// A/B update bookkeeping (docs/updates.md), from the after-first-start
/// hook: record a trial that fell back, finish an interrupted commit,
/// reconcile the loader entries, and on a trial boot add the health gate.
fn update_after_services(
    sup: &mut Supervisor,
    slot: &str,
    version: Option<&str>,
    held: Option<crate::update::UpdateLock>,
) {
    let Some(version) = version else {
        console::error("update", "no image facts (os_version): bookkeeping skipped");
        return;
    };
    match crate::update::after_services(slot, version, held) {
        Ok(Some(gate)) => sup.add_service(gate),
        Ok(None) => {}
        Err(e) => console::error("update", e),
    }
}

// ---------------------------------------------------------------- shutdown

/// Bring the system down after the supervisor stopped the services:
/// kill what is left, sync, unmount (or remount read-only), `reboot(2)`.
pub fn shutdown(kind: ShutdownKind) -> ! {
    guarded("shutdown", || {
        // The last known time, for the next boot's clock (no RTC on a Pi).
        if let Err(e) = crate::apply::clock::save_now() {
            console::error("clock", e);
        }
        // What k3s/k0s leave behind (k3s-killall.sh), before everything else goes.
        let c = crate::cleanup::kubernetes_leftovers(Path::new("/"), Path::new("/proc"));
        if c != crate::cleanup::Cleaned::default() {
            say!(
                "k8s-cleanup killed {} shim processes, unmounted {}, deleted links {:?}",
                c.killed.len(),
                c.unmounted.len(),
                c.links
            );
        }
        say!(
            "k8s-cleanup skipped iptables rules: no iptables on the image, they end with the kernel"
        );
        kill_everything();
        // Its open file would keep /var busy.
        crate::logs::close_persistent();
        sys::sync();
        unmount_all(&mut KernelMounts);
        sys::sync();
    });
    say!("shutdown complete");
    let how = match kind {
        ShutdownKind::Reboot => RebootHow::Restart,
        ShutdownKind::PowerOff => RebootHow::PowerOff,
        ShutdownKind::RebootTryboot => RebootHow::Restart2(crate::rpi::TRYBOOT_REBOOT_ARG.into()),
        ShutdownKind::RebootPartition(n) => RebootHow::Restart2(n.to_string()),
    };
    let e = sys::reboot(&how);
    console::error("reboot", e);
    loop {
        while sys::reap_one().is_some() {}
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// SIGTERM everything but PID 1, give it two seconds, then SIGKILL; reap all.
fn kill_everything() {
    let _ = sys::kill(-1, Signal::SIGTERM);
    reap_until_none(Duration::from_secs(2));
    let _ = sys::kill(-1, Signal::SIGKILL);
    reap_until_none(Duration::from_secs(2));
}

/// Reap until no process but us (and the kernel's threads) is left, at most `limit`.
fn reap_until_none(limit: Duration) {
    let end = Instant::now() + limit;
    // A stopped process acts on its SIGTERM only once continued.
    let _ = sys::kill(-1, Signal::SIGCONT);
    while Instant::now() < end {
        while sys::reap_one().is_some() {}
        if crate::cleanup::user_processes(Path::new("/proc")).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Unmount everything but the kernel's own filesystems, innermost first;
/// what cannot be unmounted (busy) is remounted read-only.
pub fn unmount_all(m: &mut dyn Mounts) {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for target in unmount_targets(&mounts::parse_mount_points(&text)) {
        if let Err(e) = mounts::unmount_or_remount_ro(m, &target) {
            console::error("unmount", e);
        }
    }
    if let Err(e) = m.mount(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None,
    ) {
        console::error("remount-ro", format_args!("/ ({e})"));
    }
}

/// Mount points to take down at shutdown, last mounted first, skipping `/`
/// and the API filesystems (`/proc`, `/sys`, `/dev` and below) the kernel
/// needs until the end.
pub fn unmount_targets(points: &[PathBuf]) -> Vec<PathBuf> {
    let keep = |p: &Path| {
        p == Path::new("/") || ["/proc", "/sys", "/dev"].iter().any(|k| p.starts_with(k))
    };
    let mut seen = BTreeMap::new();
    let mut out = Vec::new();
    for p in points.iter().rev() {
        if !keep(p) && seen.insert(p.clone(), ()).is_none() {
            out.push(p.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_late_modules_line_counts_the_absent_ones() {
        let names = vec!["watchdog".to_string(), "i6300esb".to_string()];
        let mut report = crate::modules::LoadReport::default();
        assert_eq!(
            late_modules_line(&names, 12, &report),
            "late modules watchdog i6300esb loaded after the services started: 12 ms, 0 failed"
        );
        report.absent.push("i6300esb.ko".into());
        report.failed.push("x.ko".into());
        assert_eq!(
            late_modules_line(&names, 12, &report),
            "late modules watchdog i6300esb loaded after the services started: 12 ms, 1 failed (1 not for this machine)"
        );
    }

    #[test]
    fn machine_id_made_once_and_kept() {
        let t = tempfile::tempdir().unwrap();
        let persist = t.path().join("var/lib/basalt/machine-id");
        let etc = t.path().join("machine-id");
        let mut calls = 0;
        let mut rng = |b: &mut [u8]| {
            calls += 1;
            b.iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = i as u8 * 17);
            Ok(())
        };
        let (id, made) = ensure_machine_id(&persist, &etc, &mut rng).unwrap();
        assert!(made);
        make_durable(&persist).unwrap();
        assert!(valid_machine_id(&id), "{id}");
        assert_eq!(&id[12..13], "4"); // v4
        assert_eq!(
            std::fs::read_to_string(&persist).unwrap(),
            format!("{id}\n")
        );
        assert_eq!(std::fs::read_to_string(&etc).unwrap(), format!("{id}\n"));
        std::fs::remove_file(&etc).unwrap();
        let again =
            ensure_machine_id(&persist, &etc, &mut |_| panic!("must not regenerate")).unwrap();
        assert_eq!(again, (id.clone(), false));
        assert_eq!(std::fs::read_to_string(&etc).unwrap(), format!("{id}\n"));
        assert_eq!(calls, 1);
        // A corrupt persisted id is replaced.
        std::fs::write(&persist, "garbage").unwrap();
        let (fresh, made) = ensure_machine_id(&persist, &etc, &mut |b: &mut [u8]| {
            b.fill(0xab);
            Ok(())
        })
        .unwrap();
        assert!(made);
        assert_ne!(fresh, id);
        // An empty one (a power cut before the flush) is replaced too.
        std::fs::write(&persist, "").unwrap();
        let (again, made) = ensure_machine_id(&persist, &etc, &mut |b: &mut [u8]| {
            b.fill(0xcd);
            Ok(())
        })
        .unwrap();
        assert!(made && again != fresh && valid_machine_id(&again));
        assert!(make_durable(&t.path().join("nope")).is_err());
    }

    #[test]
    fn hostnames() {
        for ok in ["a", "edge-01", "node.example", &"a".repeat(63)] {
            assert!(valid_hostname(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "a..b", "a_b", "a b", &"a".repeat(65)] {
            assert!(!valid_hostname(bad), "{bad}");
        }
    }

    #[test]
    fn cgroup_controllers_on_a_fixture_tree() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(
            t.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        std::fs::write(t.path().join("cgroup.subtree_control"), "").unwrap();
        enable_cgroup_controllers(t.path(), 1).unwrap();
        assert_eq!(
            std::fs::read_to_string(t.path().join("init/cgroup.procs")).unwrap(),
            "1"
        );
        // Each controller is written by itself (on a regular file, the last wins).
        assert_eq!(
            std::fs::read_to_string(t.path().join("cgroup.subtree_control")).unwrap(),
            "+pids"
        );
    }

    #[test]
    fn shutdown_unmounts_innermost_first_and_keeps_api_filesystems() {
        let points: Vec<PathBuf> = [
            "/",
            "/proc",
            "/sys",
            "/dev",
            "/var",
            "/etc",
            "/boot",
            "/run",
            "/sys/fs/cgroup",
            "/dev/pts",
            "/tmp",
            "/var/lib/x",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        let t = unmount_targets(&points);
        let t: Vec<_> = t.iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(t, ["/var/lib/x", "/tmp", "/run", "/boot", "/etc", "/var"]);
    }
}
