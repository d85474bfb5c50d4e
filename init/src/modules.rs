//! Kernel modules for stage 1: the initramfs settings file names them in load
//! order (the builder resolved `depends=`/`softdep=`), init loads them in
//! exactly that order. Never reorders, never guesses dependencies.

use std::path::{Path, PathBuf};

use serde::Deserialize;

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

/// `/etc/basalt/initramfs.toml` (docs/boot-protocol.md, "Initramfs").
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
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
}

fn default_partition_table() -> String {
    "gpt".to_string()
}

impl InitramfsSettings {
    pub fn parse(text: &str, path: &Path) -> Result<Self, ModulesError> {
        toml::from_str(text).map_err(|e| ModulesError::Parse {
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
}

/// Loads one module file into the kernel.
pub trait ModuleLoader {
    fn load(&mut self, path: &Path) -> Result<(), LoadError>;
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("opening {0}: {1}")]
    Open(PathBuf, std::io::Error),
    #[error("finit_module {0}: {1}")]
    Kernel(PathBuf, Errno),
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
    fn load(&mut self, path: &Path) -> Result<(), LoadError> {
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
            match crate::sys::finit_module(&f, is_compressed(&p)) {
                Ok(()) => report.loaded += 1,
                Err(Errno::EEXIST) => report.already += 1,
                Err(e) => {
                    crate::console::error("module", LoadError::Kernel(p.clone(), e));
                    report.failed.push(p.display().to_string());
                }
            }
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
    pub failed: Vec<String>,
}

/// Load every module in order. A failure is reported and the rest still load:
/// a missing optional driver must not stop the boot.
pub fn load_in_order(loader: &mut dyn ModuleLoader, paths: &[PathBuf]) -> LoadReport {
    let mut report = LoadReport::default();
    for p in paths {
        match loader.load(p) {
            Ok(()) => report.loaded += 1,
            Err(LoadError::Kernel(_, Errno::EEXIST)) => report.already += 1,
            Err(e) => {
                crate::console::error("module", &e);
                report.failed.push(p.display().to_string());
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder {
        order: Vec<String>,
        fail: Vec<(&'static str, Errno)>,
    }

    impl ModuleLoader for Recorder {
        fn load(&mut self, path: &Path) -> Result<(), LoadError> {
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            self.order.push(name.clone());
            match self.fail.iter().find(|(n, _)| *n == name) {
                Some((_, e)) => Err(LoadError::Kernel(path.to_path_buf(), *e)),
                None => Ok(()),
            }
        }
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
        let mut r = Recorder {
            order: vec![],
            fail: vec![
                ("virtio_ring.ko", Errno::EEXIST),
                ("virtio_blk.ko", Errno::ENOEXEC),
            ],
        };
        let report = load_in_order(&mut r, &paths);
        assert_eq!(
            r.order,
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
