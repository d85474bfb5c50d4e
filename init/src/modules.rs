//! Kernel modules for stage 1: the initramfs settings file names them in load
//! order (the builder resolved `depends=`/`softdep=`) and, for each, the
//! modules of the list it needs first (`module_deps`). On one CPU init loads
//! them in exactly that order; on more, up to [`MAX_WORKERS`] at a time, each
//! only after the ones it needs. Never guesses dependencies: without
//! `module_deps` it loads in order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use serde::{Deserialize, Serialize};

use crate::sys::Errno;

#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    #[error("reading initramfs settings {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing initramfs settings {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
}

/// `/etc/basalt/initramfs.toml` (docs/boot-protocol.md, "Initramfs"): read
/// by stage 1, written by the builder from this same type.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InitramfsSettings {
    pub board: String,
    #[serde(default = "default_partition_table")]
    pub partition_table: String,
    /// `systemd-boot`, `tryboot` or `reboot-partition` (docs/boot-protocol.md).
    #[serde(default)]
    pub boot_method: Option<String>,
    #[serde(default)]
    pub console: Option<String>,
    pub kernel_version: String,
    /// Relative to `lib/modules/<kernel_version>/`, in load order.
    #[serde(default)]
    pub modules: Vec<String>,
    /// Modules the path to Kubernetes does not need (the board's
    /// `late_modules`: a watchdog driver, efivarfs), same form, loaded after
    /// `modules`: by PID 1 right after it starts Kubernetes, or by stage 1 at
    /// once on a trial boot (whose watchdog it arms).
    #[serde(default)]
    pub late_modules: Vec<String>,
    /// For a module of `modules` or `late_modules` (same form), the modules
    /// of those lists it must follow: its `depends=` and `softdep=pre:`.
    /// Absent (an older builder): everything loads in list order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_deps: Option<BTreeMap<String, Vec<String>>>,
}

fn default_partition_table() -> String {
    "gpt".to_string()
}

impl InitramfsSettings {
    pub fn parse(text: &str, path: &Path) -> Result<Self, ModulesError> {
        crate::tomlfast::from_str(text).map_err(|e| ModulesError::Parse {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    pub fn load(path: &Path) -> Result<Self, ModulesError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModulesError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Absolute paths of the modules, in load order, under `root`.
    pub fn module_paths(&self, root: &Path) -> Vec<PathBuf> {
        let dir = root.join("lib/modules").join(&self.kernel_version);
        self.modules.iter().map(|m| dir.join(m)).collect()
    }

    /// Absolute paths of the late modules, in load order, under `root`.
    pub fn late_module_paths(&self, root: &Path) -> Vec<PathBuf> {
        let dir = root.join("lib/modules").join(&self.kernel_version);
        self.late_modules.iter().map(|m| dir.join(m)).collect()
    }

    /// For each module of `list` (`modules` or `late_modules`), the
    /// positions in `list` of the modules it must follow (dependencies
    /// outside `list` are loaded already); `None` without `module_deps`.
    /// [`load_all`] loads in order when one points at a later module.
    pub fn dependencies(&self, list: &[String]) -> Option<Vec<Vec<usize>>> {
        let deps = self.module_deps.as_ref()?;
        let at = |d: &String| list.iter().position(|x| x == d);
        let of = |m: &String| deps.get(m).map(Vec::as_slice).unwrap_or_default();
        Some(
            list.iter()
                .map(|m| of(m).iter().filter_map(at).collect())
                .collect(),
        )
    }
}

/// Loads one module file into the kernel; shared by the loading threads.
pub trait ModuleLoader: Sync {
    fn load(&self, path: &Path) -> Result<(), LoadError>;
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("opening {0}: {1}")]
    Open(PathBuf, std::io::Error),
    #[error("finit_module {0}: {1}")]
    Kernel(PathBuf, Errno),
    #[error("{0}: not tried (its dependencies never finished)")]
    NotTried(PathBuf),
}

/// A module file the kernel must decompress (`MODULE_INIT_COMPRESSED_FILE`).
fn is_compressed(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e == "gz" || e == "xz" || e == "zst")
}

/// `finit_module(2)` on the running kernel.
#[derive(Debug, Default)]
pub struct KernelModules;

impl ModuleLoader for KernelModules {
    fn load(&self, path: &Path) -> Result<(), LoadError> {
        let f = std::fs::File::open(path).map_err(|e| LoadError::Open(path.to_path_buf(), e))?;
        crate::sys::finit_module(&f, is_compressed(path))
            .map_err(|e| LoadError::Kernel(path.to_path_buf(), e))
    }
}

/// Late modules opened by stage 1 before `switch_root` deletes the
/// initramfs: an open file keeps its contents, so PID 1 loads them from the
/// descriptors after it started Kubernetes, and closes them.
#[derive(Debug, Default)]
pub struct OpenedModules(Vec<(PathBuf, std::fs::File)>);

impl OpenedModules {
    /// Open each of `paths`; one that cannot be opened is reported and left out.
    pub fn open(paths: &[PathBuf]) -> OpenedModules {
        let mut opened = Vec::new();
        for p in paths {
            match std::fs::File::open(p) {
                Ok(f) => opened.push((p.clone(), f)),
                Err(e) => crate::console::error("module", LoadError::Open(p.clone(), e)),
            }
        }
        OpenedModules(opened)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Module names (file names without `.ko…`), in load order.
    pub fn names(&self) -> Vec<String> {
        self.0
            .iter()
            .filter_map(|(p, _)| p.file_name())
            .map(|n| {
                let n = n.to_string_lossy();
                n.split(".ko").next().unwrap_or(&n).to_string()
            })
            .collect()
    }

    /// `finit_module(2)` each, in order; the files are closed afterwards.
    pub fn load(self) -> LoadReport {
        let mut report = LoadReport::default();
        for (p, f) in self.0 {
            let result = crate::sys::finit_module(&f, is_compressed(&p))
                .map_err(|e| LoadError::Kernel(p.clone(), e));
            report.record(&p, result);
        }
        report
    }
}

/// What loading the list did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub loaded: usize,
    /// Already in the kernel (`EEXIST`, e.g. built in or loaded before): success.
    pub already: usize,
    /// The module refused to load with `ENODEV`: what it drives is absent
    /// (a CPU-feature module such as `crct10dif-pclmul` on a CPU without
    /// PCLMULQDQ, a watchdog driver without its chip). Said, not an error:
    /// an image's list serves many machines.
    pub absent: Vec<String>,
    pub failed: Vec<String>,
    /// Threads the modules loaded on (1: in list order).
    pub threads: usize,
}

impl LoadReport {
    fn record(&mut self, path: &Path, result: Result<(), LoadError>) {
        match result {
            Ok(()) => self.loaded += 1,
            Err(LoadError::Kernel(_, Errno::EEXIST)) => self.already += 1,
            Err(LoadError::Kernel(_, Errno::ENODEV)) => {
                crate::say!(
                    "module {}: not for this machine (ENODEV: the CPU feature or device it needs is absent)",
                    path.display()
                );
                self.absent.push(path.display().to_string());
            }
            Err(e) => {
                crate::console::error("module", &e);
                self.failed.push(path.display().to_string());
            }
        }
    }
}

/// At most this many modules load at once: the kernel verifies, relocates
/// and initialises each on the loading thread, so more threads than CPUs
/// only add switches.
pub const MAX_WORKERS: usize = 4;

/// Load every module in order. A failure is reported and the rest still load:
/// a missing optional driver must not stop the boot.
pub fn load_in_order(loader: &dyn ModuleLoader, paths: &[PathBuf]) -> LoadReport {
    let mut report = LoadReport {
        threads: 1,
        ..LoadReport::default()
    };
    for p in paths {
        report.record(p, loader.load(p));
    }
    report
}

/// Load every module of `paths`, each once the ones `deps` says it must
/// follow (positions in `paths`, all earlier) are done, on up to `workers`
/// threads (this one included; [`MAX_WORKERS`] at most). With one worker or
/// no `deps`: [`load_in_order`]. A module whose dependency failed is still
/// tried, as in order (the kernel names the missing symbol); failures are
/// reported in list order once all are done. A thread that cannot be started
/// leaves its share to the others.
pub fn load_all(
    loader: &dyn ModuleLoader,
    paths: &[PathBuf],
    deps: Option<&[Vec<usize>]>,
    workers: usize,
) -> LoadReport {
    let workers = workers.clamp(1, MAX_WORKERS).min(paths.len());
    let ordered = |d: &&[Vec<usize>]| {
        d.len() == paths.len()
            && d.iter()
                .enumerate()
                .all(|(i, before)| before.iter().all(|&j| j < i))
    };
    let Some(deps) = deps.filter(|d| workers > 1 && ordered(d)) else {
        return load_in_order(loader, paths);
    };
    // Per module: taken by a thread, and its result once loaded (done).
    struct Board {
        taken: Vec<bool>,
        results: Vec<Option<Result<(), LoadError>>>,
    }
    let board = Mutex::new(Board {
        taken: vec![false; paths.len()],
        results: (0..paths.len()).map(|_| None).collect(),
    });
    let changed = Condvar::new();
    let mut threads = 1;
    let lock = || board.lock().unwrap_or_else(|e| e.into_inner());
    let work = || {
        let mut b = lock();
        loop {
            let ready = (0..paths.len())
                .find(|&i| !b.taken[i] && deps[i].iter().all(|&d| b.results[d].is_some()));
            let Some(i) = ready else {
                if b.taken.iter().all(|t| *t) {
                    return;
                }
                b = changed.wait(b).unwrap_or_else(|e| e.into_inner());
                continue;
            };
            b.taken[i] = true;
            drop(b);
            let result = loader.load(&paths[i]);
            b = lock();
            b.results[i] = Some(result);
            changed.notify_all();
        }
    };
    std::thread::scope(|s| {
        for _ in 1..workers {
            // Small stacks: a worker only makes the system call.
            let spawned = std::thread::Builder::new()
                .stack_size(64 << 10)
                .spawn_scoped(s, work);
            threads += usize::from(spawned.is_ok());
        }
        work();
    });
    let mut report = LoadReport {
        threads,
        ..LoadReport::default()
    };
    let results = board
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .results;
    for (p, r) in paths.iter().zip(results) {
        report.record(p, r.unwrap_or(Err(LoadError::NotTried(p.clone()))));
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder {
        order: Mutex<Vec<String>>,
        fail: Vec<(&'static str, Errno)>,
    }

    impl ModuleLoader for Recorder {
        fn load(&self, path: &Path) -> Result<(), LoadError> {
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            self.order.lock().unwrap().push(name.clone());
            match self.fail.iter().find(|(n, _)| *n == name) {
                Some((_, e)) => Err(LoadError::Kernel(path.to_path_buf(), *e)),
                None => Ok(()),
            }
        }
    }

    /// Records when each load starts and ends; the modules in `meet` each
    /// wait (up to 5 s) until all of them have started, so they finish
    /// promptly only when loaded at the same time.
    struct Overlap {
        events: Mutex<Vec<(String, bool)>>,
        started: Mutex<Vec<String>>,
        cv: Condvar,
        meet: Vec<&'static str>,
        met: Mutex<Vec<String>>,
    }

    impl ModuleLoader for Overlap {
        fn load(&self, path: &Path) -> Result<(), LoadError> {
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            self.events.lock().unwrap().push((name.clone(), true));
            if self.meet.contains(&name.as_str()) {
                let mut st = self.started.lock().unwrap();
                st.push(name.clone());
                self.cv.notify_all();
                let (st, timeout) = self
                    .cv
                    .wait_timeout_while(st, std::time::Duration::from_secs(5), |st| {
                        self.meet.iter().any(|m| !st.iter().any(|s| s == m))
                    })
                    .unwrap();
                drop(st);
                if !timeout.timed_out() {
                    self.met.lock().unwrap().push(name.clone());
                }
            }
            self.events.lock().unwrap().push((name, false));
            Ok(())
        }
    }

    /// The x86_64 board's shape: a virtio chain, file systems, device-mapper.
    const PARALLEL: &str = r#"
board = "x86_64"
kernel_version = "k"
modules = ["kernel/virtio_ring.ko", "kernel/virtio.ko", "kernel/virtio_pci.ko", "kernel/virtio_blk.ko", "kernel/squashfs.ko", "kernel/fat.ko", "kernel/vfat.ko", "kernel/dm-mod.ko", "kernel/dm-verity.ko"]
late_modules = ["kernel/watchdog.ko", "kernel/softdog.ko"]
[module_deps]
"kernel/virtio.ko" = ["kernel/virtio_ring.ko"]
"kernel/virtio_pci.ko" = ["kernel/virtio.ko", "kernel/virtio_ring.ko"]
"kernel/virtio_blk.ko" = ["kernel/virtio.ko", "kernel/virtio_ring.ko"]
"kernel/vfat.ko" = ["kernel/fat.ko"]
"kernel/dm-verity.ko" = ["kernel/dm-mod.ko"]
"kernel/softdog.ko" = ["kernel/watchdog.ko"]
"#;

    #[test]
    fn dependencies_are_positions_earlier_in_the_list() {
        let s = InitramfsSettings::parse(PARALLEL, Path::new("t")).unwrap();
        let deps = s.dependencies(&s.modules).unwrap();
        assert_eq!(deps[0], Vec::<usize>::new());
        assert_eq!(deps[2], [1, 0]);
        assert_eq!(deps[6], [5]);
        assert_eq!(deps[8], [7]);
        assert_eq!(s.dependencies(&s.late_modules).unwrap(), [vec![], vec![0]]);
        // A module listed before one it needs: its position points later,
        // and load_all then loads in order (tested below).
        let mut bad = s.clone();
        bad.modules.swap(5, 6);
        assert_eq!(bad.dependencies(&bad.modules).unwrap()[5], [6]);
        // An older builder's settings: no `module_deps`, in order.
        let old = InitramfsSettings::parse(SETTINGS, Path::new("t")).unwrap();
        assert_eq!(old.dependencies(&old.modules), None);
        // The builder writes this same type back: the same settings.
        let again = toml::to_string(&s).unwrap();
        assert_eq!(InitramfsSettings::parse(&again, Path::new("t")).unwrap(), s);
        assert!(!toml::to_string(&old).unwrap().contains("module_deps"));
    }

    #[test]
    fn independent_modules_load_at_once_and_each_after_what_it_needs() {
        let s = InitramfsSettings::parse(PARALLEL, Path::new("t")).unwrap();
        let paths = s.module_paths(Path::new("/"));
        let deps = s.dependencies(&s.modules).unwrap();
        let loader = Overlap {
            events: Mutex::new(vec![]),
            started: Mutex::new(vec![]),
            cv: Condvar::new(),
            // Two chains' heads: both ready from the start.
            meet: vec!["virtio_ring.ko", "squashfs.ko"],
            met: Mutex::new(vec![]),
        };
        let report = load_all(&loader, &paths, Some(&deps), 2);
        assert_eq!((report.loaded, report.threads), (9, 2));
        assert!(report.failed.is_empty());
        let mut met = loader.met.into_inner().unwrap();
        met.sort();
        assert_eq!(met, ["squashfs.ko", "virtio_ring.ko"], "not loaded at once");
        let events = loader.events.into_inner().unwrap();
        let at = |name: &str, start: bool| {
            events
                .iter()
                .position(|(n, s)| n == name && *s == start)
                .unwrap()
        };
        for (i, before) in deps.iter().enumerate() {
            let m = paths[i].file_name().unwrap().to_str().unwrap();
            for &j in before {
                let d = paths[j].file_name().unwrap().to_str().unwrap();
                assert!(at(d, false) < at(m, true), "{m} started before {d} ended");
            }
        }
        assert_eq!(events.len(), 18);
    }

    #[test]
    fn one_worker_or_no_dependencies_load_in_order_and_report_in_order() {
        let s = InitramfsSettings::parse(PARALLEL, Path::new("t")).unwrap();
        let paths = s.module_paths(Path::new("/"));
        let deps = s.dependencies(&s.modules).unwrap();
        for (deps, workers) in [(Some(&deps[..]), 1), (None, 4)] {
            let r = Recorder {
                order: Mutex::new(vec![]),
                fail: vec![
                    ("fat.ko", Errno::ENOEXEC),
                    ("virtio.ko", Errno::EEXIST),
                    ("squashfs.ko", Errno::ENODEV),
                ],
            };
            let report = load_all(&r, &paths, deps, workers);
            let order = r.order.into_inner().unwrap();
            let want: Vec<String> = paths
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
            assert_eq!(order, want);
            assert_eq!((report.loaded, report.already, report.threads), (6, 1, 1));
            // ENODEV: absent hardware, said but not a failure.
            assert_eq!(report.absent, ["/lib/modules/k/kernel/squashfs.ko"]);
            assert_eq!(report.failed, ["/lib/modules/k/kernel/fat.ko"]);
        }
        // Concurrently: every module tried once, even after a failed
        // dependency (vfat after fat), failures in list order.
        let r = Recorder {
            order: Mutex::new(vec![]),
            fail: vec![
                ("fat.ko", Errno::ENOEXEC),
                ("virtio_ring.ko", Errno::ENOENT),
            ],
        };
        let report = load_all(&r, &paths, Some(&deps), 3);
        let mut order = r.order.into_inner().unwrap();
        order.sort();
        order.dedup();
        assert_eq!(order.len(), 9);
        assert_eq!(report.loaded, 7);
        assert_eq!(report.failed.len(), 2);
        assert!(report.failed[0].ends_with("virtio_ring.ko"));
        assert!(report.failed[1].ends_with("fat.ko"));
        // Positions that do not point back: in order, never stuck.
        let forward = vec![vec![1], vec![]];
        let r = Recorder {
            order: Mutex::new(vec![]),
            fail: vec![],
        };
        let report = load_all(&r, &paths[..2], Some(&forward), 2);
        assert_eq!(report.loaded, 2);
        assert_eq!(
            r.order.into_inner().unwrap(),
            ["virtio_ring.ko", "virtio.ko"]
        );
    }

    const SETTINGS: &str = r#"
board = "x86_64"
partition_table = "gpt"
console = "ttyS0"
kernel_version = "6.1.0-56-cloud-amd64"
modules = ["kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/block/virtio_blk.ko", "kernel/fs/squashfs/squashfs.ko"]
"#;

    #[test]
    fn loads_in_listed_order_and_eexist_is_success() {
        let s = InitramfsSettings::parse(SETTINGS, Path::new("t")).unwrap();
        let paths = s.module_paths(Path::new("/"));
        assert_eq!(
            paths[0],
            PathBuf::from("/lib/modules/6.1.0-56-cloud-amd64/kernel/drivers/virtio/virtio.ko")
        );
        let r = Recorder {
            order: Mutex::new(vec![]),
            fail: vec![
                ("virtio_ring.ko", Errno::EEXIST),
                ("virtio_blk.ko", Errno::ENOEXEC),
            ],
        };
        let report = load_in_order(&r, &paths);
        assert_eq!(
            *r.order.lock().unwrap(),
            [
                "virtio.ko",
                "virtio_ring.ko",
                "virtio_blk.ko",
                "squashfs.ko"
            ]
        );
        assert_eq!(report.loaded, 2);
        assert_eq!(report.already, 1);
        assert_eq!(report.failed.len(), 1);
        assert!(report.failed[0].ends_with("virtio_blk.ko"));
    }

    #[test]
    fn rejects_bad_settings() {
        assert!(InitramfsSettings::parse("board = 1", Path::new("t")).is_err());
        assert!(
            InitramfsSettings::parse(
                "board = \"x\"\nkernel_version=\"k\"\nbogus = 1",
                Path::new("t")
            )
            .is_err()
        );
        let s = InitramfsSettings::parse("board = \"x\"\nkernel_version = \"k\"", Path::new("t"))
            .unwrap();
        assert!(s.modules.is_empty());
        assert_eq!(s.partition_table, "gpt");
    }
}
