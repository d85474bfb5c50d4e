//! `basalt.lock`: what an image definition resolved to, so that `basalt build`
//! makes the same image byte for byte later (docs/image-definition.md, "Lockfile").
//!
//! Per board arch (apk arch name): the package list and repositories it was
//! made for, each package's exact version, identity checksum (`Q1…`) and
//! repository, the sha256 of each fetched repository index (so a warm build
//! needs no network), and the Kubernetes binary's URL and sha256.
//! Written by `basalt lock`; read by `basalt build` when present.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::imagedef::ImageDefinition;

/// File name of the lockfile, beside the image definition.
pub const LOCK_FILE: &str = "basalt.lock";
/// Format version written in the file.
pub const LOCK_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot read {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("cannot write {path}: {err}")]
    Write { path: PathBuf, err: std::io::Error },
    #[error("{path} is not a basalt lockfile: {err}")]
    Parse {
        path: PathBuf,
        err: Box<toml::de::Error>,
    },
    #[error("{path}: lockfile version {found} is not {LOCK_VERSION}; run `basalt lock` again")]
    Version { path: PathBuf, found: u32 },
    #[error("serialising the lockfile: {0}")]
    Serialise(#[from] toml::ser::Error),
    #[error(
        "{path} no longer matches the image definition {definition}: {what}. Run `basalt lock {definition}` to update it"
    )]
    Stale {
        path: PathBuf,
        definition: String,
        what: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    pub version: u32,
    /// Keyed by apk arch (`x86_64`, `aarch64`, `armv7`, `armhf`).
    #[serde(default)]
    pub arch: BTreeMap<String, ArchLock>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchLock {
    /// `packages.world` it was resolved for, as written.
    #[serde(default)]
    pub world: Vec<String>,
    /// `packages.repositories` it was resolved against, as written.
    #[serde(default)]
    pub repositories: Vec<String>,
    #[serde(default, rename = "index")]
    pub indexes: Vec<IndexPin>,
    #[serde(default, rename = "package")]
    pub packages: Vec<PackagePin>,
    pub kubernetes: Option<KubernetesPin>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexPin {
    pub repository: String,
    /// sha256 of the `APKINDEX.tar.gz` bytes resolved against (kept in the cache).
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackagePin {
    pub name: String,
    pub version: String,
    /// Identity checksum `Q1…` (SHA-1 of the control member).
    pub checksum: String,
    /// The repository (as written in the definition) it comes from.
    pub repository: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesPin {
    pub distribution: String,
    pub version: String,
    pub url: String,
    pub sha256: String,
    pub airgap_images: Option<BlobPin>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobPin {
    pub url: String,
    pub sha256: String,
}

/// Where the lockfile of `def` lives: beside it (the embedded defaults: the
/// current directory).
pub fn path_for(def: &ImageDefinition) -> PathBuf {
    def.base_dir.join(LOCK_FILE)
}

impl Lock {
    pub fn new() -> Lock {
        Lock {
            version: LOCK_VERSION,
            arch: BTreeMap::new(),
        }
    }

    /// Read `path`; `None` when there is no such file.
    pub fn read(path: &Path) -> Result<Option<Lock>, LockError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => {
                return Err(LockError::Read {
                    path: path.to_path_buf(),
                    err,
                });
            }
        };
        Self::parse(&text, path).map(Some)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Lock, LockError> {
        let lock: Lock = toml::from_str(text).map_err(|err| LockError::Parse {
            path: path.to_path_buf(),
            err: Box::new(err),
        })?;
        if lock.version != LOCK_VERSION {
            return Err(LockError::Version {
                path: path.to_path_buf(),
                found: lock.version,
            });
        }
        Ok(lock)
    }

    pub fn to_text(&self) -> Result<String, LockError> {
        let body = toml::to_string(self)?;
        Ok(format!(
            "# basalt.lock: written by `basalt lock`, read by `basalt build`. Do not edit.\n{body}"
        ))
    }

    /// Write-new-then-rename.
    pub fn write(&self, path: &Path) -> Result<(), LockError> {
        let text = self.to_text()?;
        let tmp = path.with_extension(format!("lock.tmp{}", std::process::id()));
        let werr = |err| LockError::Write {
            path: path.to_path_buf(),
            err,
        };
        std::fs::write(&tmp, text).map_err(werr)?;
        std::fs::rename(&tmp, path).map_err(werr)
    }
}

impl ArchLock {
    /// Identity checksums by package name, for `resolve_pinned`.
    pub fn pins(&self) -> BTreeMap<String, String> {
        self.packages
            .iter()
            .map(|p| (p.name.clone(), p.checksum.clone()))
            .collect()
    }

    /// Is this the lock of `def`'s packages and Kubernetes binary? Any
    /// difference is [`LockError::Stale`] naming it.
    pub fn check(&self, def: &ImageDefinition, path: &Path) -> Result<(), LockError> {
        let stale = |what: String| LockError::Stale {
            path: path.to_path_buf(),
            definition: def.file.clone(),
            what,
        };
        let (world, repos) = match &def.packages {
            Some(p) => (
                p.world.clone(),
                p.repositories.iter().map(|r| r.spec.clone()).collect(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        let sorted = |v: &[String]| {
            let mut v = v.to_vec();
            v.sort();
            v
        };
        if sorted(&world) != sorted(&self.world) {
            return Err(stale(format!(
                "the lock was made for world {:?}, the definition now lists {:?}",
                self.world, world
            )));
        }
        if repos != self.repositories {
            return Err(stale(format!(
                "the lock was made for repositories {:?}, the definition now lists {:?}",
                self.repositories, repos
            )));
        }
        let k = &def.kubernetes;
        match (&self.kubernetes, &k.version) {
            (Some(pin), Some(v)) if k.source.is_none() => {
                if pin.distribution != k.distribution.name() || pin.version != *v {
                    return Err(stale(format!(
                        "the lock pins {} {}, the definition asks for {} {v}",
                        pin.distribution,
                        pin.version,
                        k.distribution.name()
                    )));
                }
                if pin.airgap_images.as_ref().map(|a| &a.url) != k.airgap_images.as_ref() {
                    return Err(stale("kubernetes.airgap_images changed".into()));
                }
            }
            (None, Some(v)) if k.source.is_none() => {
                return Err(stale(format!(
                    "the lock pins no Kubernetes binary, the definition asks for {} {v}",
                    k.distribution.name()
                )));
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(world: &str, version: &str) -> ImageDefinition {
        let text = format!(
            r#"
board = "x86_64"
os_version = "0.1.0"
[kubernetes]
distribution = "k3s"
version = "{version}"
[packages]
repositories = ["https://dl-cdn.alpinelinux.org/alpine/v3.20/main", "@local repo"]
world = [{world}]
"#
        );
        ImageDefinition::parse(&text, "img.toml", Path::new("/base"), &|_| None).unwrap()
    }

    fn lock() -> Lock {
        let mut l = Lock::new();
        l.arch.insert(
            "x86_64".into(),
            ArchLock {
                world: vec!["busybox".into(), "linux-virt".into()],
                repositories: vec![
                    "https://dl-cdn.alpinelinux.org/alpine/v3.20/main".into(),
                    "@local repo".into(),
                ],
                indexes: vec![IndexPin {
                    repository: "https://dl-cdn.alpinelinux.org/alpine/v3.20/main".into(),
                    sha256: "ab".repeat(32),
                }],
                packages: vec![
                    PackagePin {
                        name: "busybox".into(),
                        version: "1.36.1-r29".into(),
                        checksum: "Q1p78yvTLG094tHE1+dToJGbmYzQE=".into(),
                        repository: "https://dl-cdn.alpinelinux.org/alpine/v3.20/main".into(),
                    },
                    PackagePin {
                        name: "linux-virt".into(),
                        version: "6.6.58-r0".into(),
                        checksum: "Q1AAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
                        repository: "@local repo".into(),
                    },
                ],
                kubernetes: Some(KubernetesPin {
                    distribution: "k3s".into(),
                    version: "v1.31.4+k3s1".into(),
                    url: "https://github.com/k3s-io/k3s/releases/download/v1.31.4+k3s1/k3s".into(),
                    sha256: "cd".repeat(32),
                    airgap_images: None,
                }),
            },
        );
        l
    }

    #[test]
    fn round_trip() {
        let l = lock();
        let text = l.to_text().unwrap();
        assert!(text.contains("[[arch.x86_64.package]]"), "{text}");
        assert!(text.contains("name = \"busybox\""), "{text}");
        let back = Lock::parse(&text, Path::new("basalt.lock")).unwrap();
        assert_eq!(back, l);
        assert_eq!(
            back.arch["x86_64"].pins()["busybox"],
            "Q1p78yvTLG094tHE1+dToJGbmYzQE="
        );
        // Same input, same text: the lockfile itself is reproducible.
        assert_eq!(back.to_text().unwrap(), text);
    }

    #[test]
    fn write_and_read_file() {
        let dir = std::env::temp_dir().join(format!("basalt-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(LOCK_FILE);
        assert_eq!(Lock::read(&p).unwrap(), None);
        lock().write(&p).unwrap();
        assert_eq!(Lock::read(&p).unwrap(), Some(lock()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn matches_its_definition_in_any_order() {
        let l = lock();
        let d = def(r#""linux-virt", "busybox""#, "v1.31.4+k3s1");
        l.arch["x86_64"]
            .check(&d, Path::new("/base/basalt.lock"))
            .unwrap();
    }

    #[test]
    fn changed_world_is_stale_and_says_run_basalt_lock() {
        let l = lock();
        let d = def(r#""busybox", "linux-virt", "iptables""#, "v1.31.4+k3s1");
        let e = l.arch["x86_64"]
            .check(&d, Path::new("/base/basalt.lock"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/base/basalt.lock") && e.contains("iptables"),
            "{e}"
        );
        assert!(e.contains("Run `basalt lock img.toml`"), "{e}");
    }

    #[test]
    fn changed_kubernetes_version_is_stale() {
        let l = lock();
        let d = def(r#""busybox", "linux-virt""#, "v1.32.0+k3s1");
        let e = l.arch["x86_64"]
            .check(&d, Path::new("basalt.lock"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("v1.32.0+k3s1") && e.contains("basalt lock"),
            "{e}"
        );
    }

    #[test]
    fn wrong_version_and_garbage_are_refused() {
        let e = Lock::parse("version = 2\n", Path::new("x.lock"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.lock") && e.contains('2'), "{e}");
        let e = Lock::parse("version = 1\nextra = 3\n", Path::new("x.lock"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.lock"), "{e}");
    }
}
