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
pub use resolve::{Candidate, RepoRef, Resolution, resolve};
