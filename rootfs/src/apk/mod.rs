//! Alpine APK v2 repositories and packages (REFERENCE.md §5): what `basalt`
//! needs to build a root filesystem from signed Alpine repositories without
//! running `apk` or any target-architecture code.
//!
//! The pipeline, in the order the builder calls it:
//! 1. [`repo::Repository::fetch_index`]: fetch `APKINDEX.tar.gz`, verify its
//!    signature against the [`keys::KeyRing`], parse it ([`index`]).
//! 2. [`resolve::resolve`]: turn the image definition's package list (the
//!    "world") into a closed set of packages.
//! 3. [`repo::Repository::fetch_package`] / [`repo::fetch_all`]: download into
//!    the content-addressed [`repo::Cache`], verify each `.apk` ([`package`]).
//! 4. [`install::Installer`]: extract into a [`crate::tree::Tree`] with
//!    ownership recorded, replay the install scripts Basalt understands
//!    ([`busybox`], [`scripts`]) and write `lib/apk/db/installed` and
//!    `etc/apk/world` ([`db`]).
//!
//! Nothing here ever trusts an archive: no `unpack()`, no host chown, no
//! path from a package used on the host file system.
//!
//! [`install_world`] runs the whole pipeline; the builder calls it like this:
//!
//! ```no_run
//! use basalt_rootfs::apk::{self, Cache, Dependency, InstallOptions, KeyRing, Repository};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut keys = KeyRing::alpine()?; // Alpine's keys, built in
//! keys.add_dir(std::path::Path::new("keys"))?; // keys the image definition adds
//! let repos = [
//!     Repository::parse("https://dl-cdn.alpinelinux.org/alpine/v3.17/main"),
//!     Repository::parse("@local /srv/my-repo").trusted_unsigned(),
//! ];
//! let world = Dependency::parse_list("alpine-baselayout busybox linux-virt iptables")?;
//! let mut tree = basalt_rootfs::tree::Tree::new();
//! let done = apk::install_world(
//!     &apk::WorldSource {
//!         repos: &repos,
//!         arch: "x86_64",
//!         keys: &keys,
//!         cache: &Cache::default_location()?,
//!         transport: &apk::repo::HttpTransport::default(),
//!         options: InstallOptions::default(),
//!         threads: 4,
//!         progress: &|done, total| eprintln!("{done}/{total}"),
//!         mtime: 1_700_000_000,
//!     },
//!     &world,
//!     &mut tree,
//! )?;
//! for w in &done.report.warnings {
//!     eprintln!("warning: {w}");
//! }
//! # Ok(())
//! # }
//! ```

pub mod archive;
pub mod busybox;
pub mod db;
pub mod dep;
pub mod index;
pub mod install;
pub mod keys;
pub mod package;
pub mod repo;
pub mod resolve;
pub mod scripts;
pub mod version;

pub use dep::Dependency;
pub use index::{Index, PackageInfo, Trust};
pub use install::{InstallOptions, Installer};
pub use keys::KeyRing;
pub use package::ApkFile;
pub use repo::{Cache, Repository};
pub use resolve::{Candidate, RepoRef, Resolution, resolve, resolve_pinned};

use std::path::PathBuf;

use crate::tree::Tree;

/// Any failure of [`install_world`], naming the step.
#[derive(Debug, thiserror::Error)]
pub enum ApkError {
    #[error("loading signing keys: {0}")]
    Keys(#[from] keys::KeyError),
    #[error("repository index: {0}")]
    Repo(#[from] repo::RepoError),
    #[error("resolving packages: {0}")]
    Resolve(#[from] resolve::ResolveError),
    #[error("installing packages: {0}")]
    Install(#[from] install::InstallError),
}

/// Everything [`install_world`] needs besides the package list.
pub struct WorldSource<'a> {
    pub repos: &'a [Repository],
    /// apk architecture name: `x86_64`, `aarch64`, `armv7`, `armhf`.
    pub arch: &'a str,
    pub keys: &'a KeyRing,
    pub cache: &'a Cache,
    pub transport: &'a dyn repo::Transport,
    pub options: InstallOptions,
    /// Parallel downloads.
    pub threads: usize,
    /// Called with (packages done, total) while fetching.
    pub progress: &'a (dyn Fn(usize, usize) + Sync),
    /// Time stamped on files Basalt writes itself (SOURCE_DATE_EPOCH).
    pub mtime: u64,
}

/// What the builder gets back: the resolved set, the verified files it was
/// installed from (in the same order), and the warnings to show.
#[derive(Debug)]
pub struct InstalledWorld {
    pub resolution: Resolution,
    pub files: Vec<PathBuf>,
    pub report: install::InstallReport,
}

/// The whole pipeline: fetch and verify indexes, resolve `world`, fetch and
/// verify packages, extract them into `tree`, replay scripts, write apk's database.
pub fn install_world(
    src: &WorldSource<'_>,
    world: &[Dependency],
    tree: &mut Tree,
) -> Result<InstalledWorld, ApkError> {
    let mut indexes = Vec::with_capacity(src.repos.len());
    for r in src.repos {
        indexes.push(r.fetch_index(src.arch, src.keys, src.transport)?);
    }
    let refs: Vec<RepoRef<'_>> = src
        .repos
        .iter()
        .zip(&indexes)
        .map(|(r, index)| RepoRef {
            tag: r.tag.as_deref(),
            index,
        })
        .collect();
    let resolution = resolve(&refs, world)?;
    let jobs: Vec<repo::FetchJob<'_>> = resolution
        .packages
        .iter()
        .map(|c| repo::FetchJob {
            repo: &src.repos[c.repo],
            info: &c.package,
        })
        .collect();
    let files = repo::fetch_all(
        &jobs,
        src.arch,
        src.keys,
        src.cache,
        src.transport,
        src.threads,
        src.progress,
    )?;
    let mut installer = Installer::new(src.options.clone());
    for k in resolution.install_order() {
        let (c, path) = (&resolution.packages[k], &files[k]);
        let trust = src.repos[c.repo].trust;
        let apk = repo::load_verified(path, &c.package, src.keys, trust)?;
        installer.install(tree, &c.package, &apk)?;
    }
    let report = installer.finish(tree, world, src.arch, src.mtime)?;
    Ok(InstalledWorld {
        resolution,
        files,
        report,
    })
}
