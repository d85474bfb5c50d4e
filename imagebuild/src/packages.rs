//! The image definition's `[packages]` and Kubernetes release binary → the
//! base root tree, which overlays then layer on (docs/image-definition.md).
//!
//! The apk work itself is `basalt_rootfs::apk`; this module adds what the
//! builder needs around it: the lockfile (`resolve_pinned`), a cache of
//! repository indexes by sha256 (so a locked warm build needs no network),
//! the board's arch, and build warnings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use basalt_rootfs::apk::install::{InstallReport, Setuid};
use basalt_rootfs::apk::repo::{self, HttpTransport, Transport};
use basalt_rootfs::apk::{
    Cache, Dependency, Index, InstallOptions, Installer, KeyRing, RepoRef, Repository, Resolution,
    resolve_pinned,
};
use basalt_rootfs::tree::{Entry, FileData, Tree, TreeError};

use crate::board::Board;
use crate::imagedef::{ImageDefinition, Packages};
use crate::kubernetes::{self, KubernetesError, sha256_hex};
use crate::lock::{self, ArchLock, BlobPin, IndexPin, KubernetesPin, Lock, LockError, PackagePin};
use crate::treecache;

/// Parallel package downloads.
const THREADS: usize = 4;
const INDEX_FILE: &str = "APKINDEX.tar.gz";

#[derive(Debug, thiserror::Error)]
pub enum PackagesError {
    #[error("image definition {file}: packages.keys: {err}")]
    Keys {
        file: String,
        err: basalt_rootfs::apk::keys::KeyError,
    },
    #[error("cannot read key file {path}: {err}")]
    KeyFile { path: PathBuf, err: std::io::Error },
    #[error(transparent)]
    Repo(#[from] repo::RepoError),
    #[error("resolving the packages for {arch}: {err}")]
    Resolve {
        arch: String,
        err: basalt_rootfs::apk::resolve::ResolveError,
    },
    #[error("installing packages: {0}")]
    Install(#[from] basalt_rootfs::apk::install::InstallError),
    #[error("packages.world: {0}")]
    World(String),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Kubernetes(#[from] KubernetesError),
    #[error("root tree: {what}: {err}")]
    Tree { what: String, err: TreeError },
    #[error(
        "{err}\n(the embedded default for board {board} is made of Alpine packages and k3s from the network; offline, `basalt build` with neither a definition nor --board builds the test-asset image `x86_64-test-assets`)"
    )]
    EmbeddedDefault {
        board: String,
        err: Box<PackagesError>,
    },
}

/// A [`Transport`] that keeps every fetched `APKINDEX.tar.gz` in the cache
/// under its sha256 and serves pinned ones from there without the network;
/// it counts what went to the network.
pub struct IndexCache<'a> {
    inner: &'a dyn Transport,
    dir: PathBuf,
    /// Index URL → sha256 to serve from the cache (from `basalt.lock`).
    pinned: BTreeMap<String, String>,
    /// Index URL → sha256 of what was used.
    pub used: Mutex<BTreeMap<String, String>>,
    pub network_requests: AtomicUsize,
}

impl<'a> IndexCache<'a> {
    pub fn new(inner: &'a dyn Transport, cache: &Cache, pinned: BTreeMap<String, String>) -> Self {
        IndexCache {
            inner,
            dir: cache.root.join("index"),
            pinned,
            used: Mutex::new(BTreeMap::new()),
            network_requests: AtomicUsize::new(0),
        }
    }

    fn record(&self, url: &str, sha: &str) {
        if let Ok(mut u) = self.used.lock() {
            u.insert(url.to_string(), sha.to_string());
        }
    }
}

impl Transport for IndexCache<'_> {
    fn get(&self, url: &str) -> Result<Vec<u8>, String> {
        let is_index = url.ends_with(INDEX_FILE);
        if is_index && let Some(sha) = self.pinned.get(url) {
            let p = self.dir.join(format!("{sha}.tar.gz"));
            if let Ok(b) = std::fs::read(&p)
                && sha256_hex(&b) == *sha
            {
                self.record(url, sha);
                return Ok(b);
            }
        }
        self.network_requests.fetch_add(1, Ordering::SeqCst);
        let b = self.inner.get(url)?;
        if is_index {
            let sha = sha256_hex(&b);
            let p = self.dir.join(format!("{sha}.tar.gz"));
            // The cache is an optimisation: failing to write it is not an error.
            if std::fs::create_dir_all(&self.dir).is_ok() {
                let tmp = p.with_extension(format!("tmp{}", std::process::id()));
                if std::fs::write(&tmp, &b).is_ok() {
                    let _ = std::fs::rename(&tmp, &p);
                }
            }
            self.record(url, &sha);
        }
        Ok(b)
    }
}

/// Alpine's built-in keys plus the definition's key files and directories.
pub fn keyring(p: &Packages, file: &str) -> Result<KeyRing, PackagesError> {
    let kerr = |err| PackagesError::Keys {
        file: file.to_string(),
        err,
    };
    let mut keys = KeyRing::alpine().map_err(kerr)?;
    for k in &p.keys {
        if k.is_dir() {
            keys.add_dir(k).map_err(kerr)?;
        } else {
            let pem = std::fs::read(k).map_err(|err| PackagesError::KeyFile {
                path: k.clone(),
                err,
            })?;
            let name = k
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            keys.add_pem(&name, &pem).map_err(kerr)?;
        }
    }
    Ok(keys)
}

pub fn world(p: &Packages) -> Result<Vec<Dependency>, PackagesError> {
    let mut w = Vec::new();
    for s in &p.world {
        w.extend(
            Dependency::parse_list(s).map_err(|e| PackagesError::World(format!("{s:?}: {e}")))?,
        );
    }
    Ok(w)
}

/// Fetched and verified indexes, and what the world resolved to.
pub struct Resolved {
    pub repos: Vec<Repository>,
    /// As written in the definition, parallel to `repos`.
    pub specs: Vec<String>,
    pub indexes: Vec<Index>,
    pub resolution: Resolution,
}

/// Fetch every repository's index for `arch` and resolve `world`, pinned to
/// `pins` (name → `Q1…`) when given.
pub fn resolve(
    p: &Packages,
    arch: &str,
    keys: &KeyRing,
    t: &dyn Transport,
    world: &[Dependency],
    pins: &BTreeMap<String, String>,
) -> Result<Resolved, PackagesError> {
    let repos: Vec<Repository> = p
        .repositories
        .iter()
        .map(|r| r.repository.clone())
        .collect();
    let mut indexes = Vec::new();
    for r in &repos {
        indexes.push(r.fetch_index(arch, keys, t)?);
    }
    let refs: Vec<RepoRef<'_>> = repos
        .iter()
        .zip(&indexes)
        .map(|(r, index)| RepoRef {
            tag: r.tag.as_deref(),
            index,
        })
        .collect();
    let resolution = resolve_pinned(&refs, world, pins).map_err(|err| PackagesError::Resolve {
        arch: arch.to_string(),
        err,
    })?;
    Ok(Resolved {
        specs: p.repositories.iter().map(|r| r.spec.clone()).collect(),
        repos,
        indexes,
        resolution,
    })
}

/// Fetch, verify and extract the resolved packages into `tree`.
#[allow(clippy::too_many_arguments)]
pub fn install(
    r: &Resolved,
    p: &Packages,
    arch: &str,
    keys: &KeyRing,
    cache: &Cache,
    t: &dyn Transport,
    world: &[Dependency],
    mtime: u64,
    tree: &mut Tree,
) -> Result<InstallReport, PackagesError> {
    let jobs: Vec<repo::FetchJob<'_>> = r
        .resolution
        .packages
        .iter()
        .map(|c| repo::FetchJob {
            repo: &r.repos[c.repo],
            info: &c.package,
        })
        .collect();
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let b = indicatif::ProgressBar::new(jobs.len() as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "fetching packages [{bar:30}] {pos}/{len} ({elapsed})",
        ) {
            b.set_style(style);
        }
        b
    });
    let progress = |done: usize, _total: usize| {
        if let Some(b) = &bar {
            b.set_position(done as u64);
        }
    };
    let files = repo::fetch_all(&jobs, arch, keys, cache, t, THREADS, &progress);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let files = files?;
    let setuid = if p.allow_setuid.iter().any(|s| s == "*") {
        Setuid::All
    } else if p.allow_setuid.is_empty() {
        Setuid::Refuse
    } else {
        Setuid::Paths(
            p.allow_setuid
                .iter()
                .map(|s| PathBuf::from(s.trim_start_matches('/')))
                .collect(),
        )
    };
    let mut installer = Installer::new(InstallOptions { setuid });
    for k in r.resolution.install_order() {
        let (c, path) = (&r.resolution.packages[k], &files[k]);
        let apk = repo::load_verified(path, &c.package, keys, r.repos[c.repo].trust)?;
        installer.install(tree, &c.package, &apk)?;
    }
    Ok(installer.finish(tree, world, arch, mtime)?)
}

/// What [`base_tree`] made, for the build report.
#[derive(Debug, Default)]
pub struct BaseTree {
    pub tree: Tree,
    /// Resolved packages, `name-version`, sorted.
    pub packages: Vec<String>,
    pub warnings: Vec<String>,
    /// Requests that went to the network (0 for a warm locked build).
    pub network_requests: usize,
    pub lock: Option<PathBuf>,
}

/// The base root tree of `def` on `board`: its packages (pinned by
/// `basalt.lock` when there is one) and the Kubernetes release binary. Empty
/// when the definition has neither. Warnings are returned, not printed.
pub fn base_tree(
    def: &ImageDefinition,
    board: &Board,
    epoch: u64,
) -> Result<BaseTree, PackagesError> {
    let http = HttpTransport::default();
    base_tree_with(def, board, epoch, &http, &Cache::default_location()?)
}

pub fn base_tree_with(
    def: &ImageDefinition,
    board: &Board,
    epoch: u64,
    http: &dyn Transport,
    cache: &Cache,
) -> Result<BaseTree, PackagesError> {
    let arch = board.alpine_arch.as_str();
    let needs_k8s = def.kubernetes.source.is_none() && def.kubernetes.version.is_some();
    let mut out = BaseTree::default();
    if def.packages.is_none() && !needs_k8s {
        return Ok(out);
    }
    let lock_path = lock::path_for(def);
    let lock = Lock::read(&lock_path)?;
    let arch_lock = match &lock {
        Some(l) => match l.arch.get(arch) {
            Some(a) => {
                a.check(def, &lock_path)?;
                Some(a)
            }
            None => {
                return Err(LockError::Stale {
                    path: lock_path,
                    definition: def.file.clone(),
                    what: format!("it has no entry for the {arch} architecture"),
                }
                .into());
            }
        },
        None => None,
    };
    out.lock = arch_lock.map(|_| lock_path.clone());

    let mut net = 0;
    if let Some(p) = &def.packages {
        let keys = keyring(p, &def.file)?;
        let world = world(p)?;
        let (pins, pinned_indexes) = match arch_lock {
            Some(a) => (a.pins(), index_urls(a, p, arch)),
            None => (BTreeMap::new(), BTreeMap::new()),
        };
        // Locked: the installed tree is a function of these, and may be cached.
        let tree_key = arch_lock.and_then(|a| {
            let mut a = a.clone();
            a.kubernetes = None;
            let text = toml::to_string(&a).ok()?;
            let names: Vec<&str> = keys.names().collect();
            Some(treecache::key(&[
                arch.as_bytes(),
                text.as_bytes(),
                &epoch.to_le_bytes(),
                p.allow_setuid.join("\n").as_bytes(),
                names.join("\n").as_bytes(),
            ]))
        });
        match tree_key
            .as_deref()
            .and_then(|k| treecache::load(&cache.root, k))
        {
            Some(c) => {
                out.tree = c.tree;
                out.packages = c.packages;
                out.warnings = c.warnings;
            }
            None => {
                let t = IndexCache::new(http, cache, pinned_indexes);
                let r = resolve(p, arch, &keys, &t, &world, &pins)?;
                if let Some(a) = arch_lock {
                    check_resolution(a, &r, def, &lock_path)?;
                }
                let report = install(&r, p, arch, &keys, cache, &t, &world, epoch, &mut out.tree)?;
                out.warnings.extend(report.warnings);
                out.packages = r.resolution.ids();
                out.packages.sort();
                net += t.network_requests.load(Ordering::SeqCst);
                if let Some(k) = &tree_key
                    && let Err(e) =
                        treecache::store(&cache.root, k, &out.tree, &out.packages, &out.warnings)
                {
                    out.warnings
                        .push(format!("could not cache the installed packages: {e}"));
                }
            }
        }
    }

    if needs_k8s && let Some(version) = &def.kubernetes.version {
        let url = kubernetes::release_url(def.kubernetes.distribution, version, arch)?;
        let pin = arch_lock.and_then(|a| a.kubernetes.as_ref());
        let counting = Counting::new(http);
        let what = format!("{} {version}", def.kubernetes.distribution.name());
        let (path, sha) = kubernetes::fetch(
            &what,
            &url,
            pin.map(|k| k.sha256.as_str()),
            cache,
            &counting,
        )?;
        if pin.is_none() {
            out.warnings.push(format!(
                "{what} is not pinned: downloaded {url} has sha256 {sha}; run `basalt lock {}` to pin it",
                def.file
            ));
        }
        add_file(&mut out.tree, &def.kubernetes.binary, path, 0o755, epoch)?;
        if let Some(air) = &def.kubernetes.airgap_images {
            let want = pin
                .and_then(|k| k.airgap_images.as_ref())
                .map(|a| a.sha256.as_str());
            let (path, _) = kubernetes::fetch("airgap images", air, want, cache, &counting)?;
            let name = air.rsplit('/').next().unwrap_or("airgap-images.tar");
            add_file(
                &mut out.tree,
                &format!("{AIRGAP_DIR}/{name}"),
                path,
                0o644,
                epoch,
            )?;
        }
        net += counting.count.load(Ordering::SeqCst);
    }
    out.network_requests = net;
    Ok(out)
}

/// Where airgap image tarballs go in the root.
pub const AIRGAP_DIR: &str = "/usr/lib/basalt/airgap-images";

fn add_file(
    tree: &mut Tree,
    path: &str,
    host: PathBuf,
    mode: u32,
    epoch: u64,
) -> Result<(), PackagesError> {
    let mut e = Entry::file(FileData::HostPath(host), mode);
    e.mtime = epoch;
    tree.insert(path.trim_start_matches('/'), e)
        .map_err(|err| PackagesError::Tree {
            what: path.to_string(),
            err,
        })
}

/// Index URL → pinned sha256, for the repositories of `p`.
fn index_urls(a: &ArchLock, p: &Packages, arch: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for pin in &a.indexes {
        if let Some(r) = p.repositories.iter().find(|r| r.spec == pin.repository) {
            m.insert(r.repository.location(arch, INDEX_FILE), pin.sha256.clone());
        }
    }
    m
}

/// With a lock, the resolution must be exactly the locked set.
fn check_resolution(
    a: &ArchLock,
    r: &Resolved,
    def: &ImageDefinition,
    lock_path: &Path,
) -> Result<(), LockError> {
    let got: BTreeMap<&str, &str> = r
        .resolution
        .packages
        .iter()
        .map(|c| (c.package.name.as_str(), c.package.version.as_str()))
        .collect();
    let want: BTreeMap<&str, &str> = a
        .packages
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_str()))
        .collect();
    if got != want {
        let extra: Vec<&str> = got
            .keys()
            .filter(|k| !want.contains_key(*k))
            .copied()
            .collect();
        let gone: Vec<&str> = want
            .keys()
            .filter(|k| !got.contains_key(*k))
            .copied()
            .collect();
        return Err(LockError::Stale {
            path: lock_path.to_path_buf(),
            definition: def.file.clone(),
            what: format!(
                "the repositories now resolve to a different set (not in the lock: {extra:?}; locked but not needed: {gone:?})"
            ),
        });
    }
    Ok(())
}

/// Counts requests that reach the inner transport.
struct Counting<'a> {
    inner: &'a dyn Transport,
    count: AtomicUsize,
}

impl<'a> Counting<'a> {
    fn new(inner: &'a dyn Transport) -> Self {
        Counting {
            inner,
            count: AtomicUsize::new(0),
        }
    }
}

impl Transport for Counting<'_> {
    fn get(&self, url: &str) -> Result<Vec<u8>, String> {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.inner.get(url)
    }
}

/// `basalt lock`: resolve `def` afresh for `board`'s arch and pin the result
/// (and the Kubernetes binary: downloaded and hashed unless `k8s_sha256` is
/// given) into `lock`, replacing that arch's entry.
pub fn make_lock(
    def: &ImageDefinition,
    board: &Board,
    k8s_sha256: Option<&str>,
    http: &dyn Transport,
    cache: &Cache,
    lock: &mut Lock,
) -> Result<ArchLock, PackagesError> {
    let arch = board.alpine_arch.as_str();
    let mut a = ArchLock::default();
    if let Some(p) = &def.packages {
        let keys = keyring(p, &def.file)?;
        let world = world(p)?;
        let t = IndexCache::new(http, cache, BTreeMap::new());
        let r = resolve(p, arch, &keys, &t, &world, &BTreeMap::new())?;
        a.world = p.world.clone();
        a.repositories = r.specs.clone();
        let used = t.used.lock().map(|u| u.clone()).unwrap_or_default();
        for (repo, spec) in r.repos.iter().zip(&r.specs) {
            if let Some(sha) = used.get(&repo.location(arch, INDEX_FILE)) {
                a.indexes.push(IndexPin {
                    repository: spec.clone(),
                    sha256: sha.clone(),
                });
            }
        }
        for c in &r.resolution.packages {
            a.packages.push(PackagePin {
                name: c.package.name.clone(),
                version: c.package.version.clone(),
                checksum: c
                    .package
                    .checksum
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                repository: r.specs[c.repo].clone(),
            });
        }
    }
    let k = &def.kubernetes;
    if k.source.is_none()
        && let Some(version) = &k.version
    {
        let url = kubernetes::release_url(k.distribution, version, arch)?;
        let what = format!("{} {version}", k.distribution.name());
        let sha = match k8s_sha256 {
            Some(s) => s.to_ascii_lowercase(),
            None => kubernetes::fetch(&what, &url, None, cache, http)?.1,
        };
        let airgap_images = match &k.airgap_images {
            None => None,
            Some(u) => Some(BlobPin {
                url: u.clone(),
                sha256: kubernetes::fetch("airgap images", u, None, cache, http)?.1,
            }),
        };
        a.kubernetes = Some(KubernetesPin {
            distribution: k.distribution.name().to_string(),
            version: version.clone(),
            url,
            sha256: sha,
            airgap_images,
        });
    }
    lock.arch.insert(arch.to_string(), a.clone());
    Ok(a)
}

/// Repositories given on the command line (`basalt packages …`).
pub fn cli_repos(specs: &[String], allow_untrusted: bool) -> Vec<Repository> {
    specs
        .iter()
        .map(|s| {
            let r = Repository::parse(s);
            if allow_untrusted {
                r.trusted_unsigned()
            } else {
                r
            }
        })
        .collect()
}

/// Alpine's keys plus a directory of extra keys.
pub fn cli_keys(dir: Option<&Path>) -> Result<KeyRing, PackagesError> {
    let kerr = |err| PackagesError::Keys {
        file: "--keys".into(),
        err,
    };
    let mut keys = KeyRing::alpine().map_err(kerr)?;
    if let Some(d) = dir {
        keys.add_dir(d).map_err(kerr)?;
    }
    Ok(keys)
}

/// Fetch the indexes of command-line repositories.
pub fn cli_indexes(
    repos: &[Repository],
    arch: &str,
    keys: &KeyRing,
) -> Result<Vec<Index>, PackagesError> {
    let http = HttpTransport::default();
    let mut v = Vec::new();
    for r in repos {
        v.push(r.fetch_index(arch, keys, &http)?);
    }
    Ok(v)
}

/// `basalt packages resolve`: `name-version` lines, sorted.
pub fn cli_resolve(
    repos: &[Repository],
    indexes: &[Index],
    arch: &str,
    packages: &[String],
) -> Result<Vec<String>, PackagesError> {
    let mut world = Vec::new();
    for s in packages {
        world.extend(
            Dependency::parse_list(s).map_err(|e| PackagesError::World(format!("{s:?}: {e}")))?,
        );
    }
    let refs: Vec<RepoRef<'_>> = repos
        .iter()
        .zip(indexes)
        .map(|(r, index)| RepoRef {
            tag: r.tag.as_deref(),
            index,
        })
        .collect();
    let res =
        resolve_pinned(&refs, &world, &BTreeMap::new()).map_err(|err| PackagesError::Resolve {
            arch: arch.to_string(),
            err,
        })?;
    let mut ids = res.ids();
    ids.sort();
    Ok(ids)
}

/// [`base_tree`] for `basalt build`: prints the warnings and the lock used to stderr.
pub fn base_tree_for_build(
    def: &ImageDefinition,
    board: &Board,
    epoch: u64,
) -> Result<Tree, PackagesError> {
    let b = base_tree(def, board, epoch).map_err(|err| {
        if def.file.starts_with("the embedded default") {
            PackagesError::EmbeddedDefault {
                board: board.name.clone(),
                err: Box::new(err),
            }
        } else {
            err
        }
    })?;
    if !b.packages.is_empty() {
        eprintln!(
            "basalt: {} packages for {}{}",
            b.packages.len(),
            board.alpine_arch,
            match &b.lock {
                Some(l) => format!(", pinned by {}", l.display()),
                None => ", not locked (run `basalt lock` for a reproducible build)".into(),
            }
        );
    }
    for w in &b.warnings {
        eprintln!("warning: {w}");
    }
    Ok(b.tree)
}
