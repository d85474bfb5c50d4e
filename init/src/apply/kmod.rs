//! `[kernel] modules`: each module and its dependencies loaded with
//! `finit_module(2)` from the root's `/lib/modules/<uname -r>/`, like
//! `modprobe`. Dependencies come from `modules.dep` when the image has one;
//! Debian's kernel packages do not (depmod runs at install time), so
//! otherwise from the module's own `depends=` in its `.modinfo` strings.
//! Modules built into the kernel (`modules.builtin`) need nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{ApplyError, Outcome, Root, System};
use crate::modules::LoadError;
use crate::nodeconfig::NodeConfig;
use crate::sys::Errno;

/// Module name as the kernel knows it: basename without `.ko[.*]`, `-` as `_`.
pub fn canonical(name_or_path: &str) -> String {
    let base = name_or_path.rsplit('/').next().unwrap_or(name_or_path);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

/// Where modules are, and how they depend on each other.
pub struct Index {
    dir: PathBuf,
    /// canonical name → (path relative to `dir`, dependency paths from modules.dep)
    files: BTreeMap<String, (String, Option<Vec<String>>)>,
    builtin: Vec<String>,
}

impl Index {
    pub fn load(dir: &Path) -> Index {
        let mut files = BTreeMap::new();
        if let Ok(dep) = std::fs::read_to_string(dir.join("modules.dep")) {
            for line in dep.lines() {
                let Some((m, deps)) = line.split_once(':') else {
                    continue;
                };
                let deps = deps.split_whitespace().map(String::from).collect();
                files.insert(canonical(m), (m.trim().to_string(), Some(deps)));
            }
        } else {
            let mut stack = vec![dir.to_path_buf()];
            while let Some(d) = stack.pop() {
                let Ok(rd) = std::fs::read_dir(&d) else {
                    continue;
                };
                for e in rd.flatten() {
                    let p = e.path();
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(p);
                    } else if let Some(rel) = p
                        .strip_prefix(dir)
                        .ok()
                        .and_then(|r| r.to_str())
                        .filter(|r| r.contains(".ko"))
                    {
                        files.insert(canonical(rel), (rel.to_string(), None));
                    }
                }
            }
        }
        let builtin = std::fs::read_to_string(dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .map(canonical)
            .collect();
        Index {
            dir: dir.to_path_buf(),
            files,
            builtin,
        }
    }

    /// Paths to load for `name`, dependencies first. `None` when unknown.
    pub fn plan(&self, name: &str) -> Result<Vec<PathBuf>, String> {
        let name = canonical(name);
        if self.builtin.contains(&name) {
            return Ok(Vec::new());
        }
        let mut order = Vec::new();
        self.visit(&name, &mut order, 0)?;
        Ok(order.into_iter().map(|r| self.dir.join(r)).collect())
    }

    fn visit(&self, name: &str, order: &mut Vec<String>, depth: usize) -> Result<(), String> {
        if depth > 32 {
            return Err(format!("dependency chain of {name} too deep (a cycle?)"));
        }
        if self.builtin.iter().any(|b| b == name) {
            return Ok(());
        }
        let Some((rel, deps)) = self.files.get(name) else {
            return Err(format!("{name}: not found under {}", self.dir.display()));
        };
        if order.contains(rel) {
            return Ok(());
        }
        let deps: Vec<String> = match deps {
            // modules.dep lists the dependencies of the dependencies too,
            // the ones to load last first (modprobe loads them in reverse).
            Some(d) => {
                for p in d.iter().rev() {
                    if !order.contains(p) {
                        order.push(p.clone());
                    }
                }
                Vec::new()
            }
            None => modinfo_depends(&self.dir.join(rel)),
        };
        for d in deps {
            self.visit(&canonical(&d), order, depth + 1)?;
        }
        order.push(rel.clone());
        Ok(())
    }
}

/// `depends=a,b` from an uncompressed module's `.modinfo` strings.
fn modinfo_depends(path: &Path) -> Vec<String> {
    let Ok(data) = std::fs::read(path) else {
        return Vec::new();
    };
    let key = b"\0depends=";
    let Some(at) = data.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &data[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

pub fn step(
    root: &Root,
    cfg: &NodeConfig,
    sys: &mut dyn System,
    out: &mut Outcome,
) -> Result<(), ApplyError> {
    if cfg.kernel.modules.is_empty() {
        return Ok(());
    }
    let index = Index::load(&root.at("/lib/modules").join(sys.kernel_release()));
    for m in &cfg.kernel.modules {
        let plan = match index.plan(m) {
            Ok(p) => p,
            Err(e) => {
                out.error("module", e);
                continue;
            }
        };
        for p in plan {
            match sys.load_module(&p) {
                Ok(()) | Err(LoadError::Kernel(_, Errno::EEXIST)) => {}
                Err(e) => {
                    out.error("module", e);
                    break;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::system::fake::Recorder;

    fn ko(dir: &Path, rel: &str, depends: &str) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let mut data = b"\x7fELF....\0license=GPL\0".to_vec();
        data.extend_from_slice(format!("depends={depends}\0vermagic=6.1\0").as_bytes());
        std::fs::write(p, data).unwrap();
    }

    #[test]
    fn loads_dependencies_first_from_modinfo() {
        let t = tempfile::tempdir().unwrap();
        let root = Root(t.path().to_path_buf());
        let dir = root.at("/lib/modules/6.1.0-test");
        ko(&dir, "kernel/net/bridge/br_netfilter.ko", "bridge");
        ko(&dir, "kernel/net/bridge/bridge.ko", "stp,llc");
        ko(&dir, "kernel/net/802/stp.ko", "llc");
        ko(&dir, "kernel/net/llc/llc.ko", "");
        ko(&dir, "kernel/drivers/net/dummy.ko", "");
        std::fs::write(dir.join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").unwrap();
        let mut cfg = NodeConfig::default();
        cfg.kernel.modules = vec![
            "br_netfilter".into(),
            "ext4".into(),
            "dummy".into(),
            "nope".into(),
        ];
        let mut sys = Recorder {
            release: "6.1.0-test".into(),
            fail: vec!["module dummy.ko".into()],
            ..Recorder::default()
        };
        let mut out = Outcome::default();
        step(&root, &cfg, &mut sys, &mut out).unwrap();
        assert_eq!(
            sys.calls,
            [
                "module llc.ko",
                "module stp.ko",
                "module bridge.ko",
                "module br_netfilter.ko",
                "module dummy.ko"
            ]
        );
        assert_eq!(out.errors.len(), 2, "{:?}", out.errors);
        assert!(out.errors[1].contains("nope"));
    }

    #[test]
    fn modules_dep_when_present() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path();
        std::fs::write(
            dir.join("modules.dep"),
            "kernel/a/br_netfilter.ko.xz: kernel/a/bridge.ko.xz kernel/b/stp.ko.xz kernel/c/llc.ko.xz\nkernel/a/bridge.ko.xz: kernel/b/stp.ko.xz kernel/c/llc.ko.xz\nkernel/x/wire-guard.ko:\n",
        )
        .unwrap();
        let idx = Index::load(dir);
        let plan: Vec<String> = idx
            .plan("br_netfilter")
            .unwrap()
            .iter()
            .map(|p| p.strip_prefix(dir).unwrap().display().to_string())
            .collect();
        assert_eq!(
            plan,
            [
                "kernel/c/llc.ko.xz",
                "kernel/b/stp.ko.xz",
                "kernel/a/bridge.ko.xz",
                "kernel/a/br_netfilter.ko.xz"
            ]
        );
        assert_eq!(idx.plan("wire_guard").unwrap().len(), 1);
        assert!(idx.plan("missing").is_err());
    }
}
