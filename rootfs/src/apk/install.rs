//! Extract verified packages into a [`Tree`] (REFERENCE.md §5.1, §5.5).
//!
//! The data tar is walked entry by entry (never `unpack()`): nothing is written
//! to the host, ownership and modes are recorded in the tree, not applied.
//! Refused, naming the package and the path:
//! * absolute paths and `..` components;
//! * entries below a path that is a symlink (the tree would follow it on the device);
//! * device nodes and FIFOs (the device's devtmpfs provides devices);
//! * setuid/setgid files, unless [`InstallOptions::setuid`] allows them;
//! * regular files without, or not matching, their PAX `APK-TOOLS.checksum.SHA1`;
//! * a file another package already installed, unless one `replaces` the other.
//!
//! [`Installer::finish`] then replays the scripts Basalt understands (busybox
//! applets), writes apk's database, and returns the warnings for the rest.

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use sha1::{Digest, Sha1};

use super::busybox::{self, Method};
use super::db::{self, DbFile, DbPackage};
use super::dep::Dependency;
use super::index::PackageInfo;
use super::package::ApkFile;
use super::scripts;
use crate::tree::{Entry, EntryKind, FileData, Tree, TreeError};

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("package {package}: data tar is corrupt: {source}")]
    Tar {
        package: String,
        source: std::io::Error,
    },
    #[error("package {package}: {path:?}: absolute path in package data")]
    Absolute { package: String, path: String },
    #[error("package {package}: {path:?}: `..` in path escapes the root")]
    Traversal { package: String, path: String },
    #[error(
        "package {package}: {path:?}: would be written through symlink {link:?}, escaping its directory"
    )]
    ThroughSymlink {
        package: String,
        path: String,
        link: String,
    },
    #[error("package {package}: {path:?}: device nodes and FIFOs are refused ({kind})")]
    Device {
        package: String,
        path: String,
        kind: &'static str,
    },
    #[error(
        "package {package}: {path:?}: setuid/setgid file (mode {mode:o}) not allowed by the image definition"
    )]
    Setuid {
        package: String,
        path: String,
        mode: u32,
    },
    #[error(
        "package {package}: {path:?}: no APK-TOOLS.checksum.SHA1 PAX record for a regular file"
    )]
    NoChecksum { package: String, path: String },
    #[error(
        "package {package}: {path:?}: content sha1 {actual} differs from its PAX checksum {expected}"
    )]
    FileChecksum {
        package: String,
        path: String,
        expected: String,
        actual: String,
    },
    #[error(
        "package {package}: {path:?}: already installed by {owner}, and neither package replaces the other"
    )]
    FileConflict {
        package: String,
        path: String,
        owner: String,
    },
    #[error(
        "package {package}: {path:?}: hard link to {target:?}, which the package did not install before it"
    )]
    BadHardLink {
        package: String,
        path: String,
        target: String,
    },
    #[error("package {package}: {path:?}: unsupported tar entry type {kind:?}")]
    Unsupported {
        package: String,
        path: String,
        kind: u8,
    },
    #[error("package {package}: {path:?}: {source}")]
    Tree {
        package: String,
        path: String,
        source: TreeError,
    },
    #[error("writing {path}: {source}")]
    Db { path: String, source: TreeError },
}

/// Which setuid/setgid files the image definition allows.
#[derive(Debug, Clone, Default)]
pub enum Setuid {
    #[default]
    Refuse,
    /// Only these paths (relative to the root, e.g. `bin/bbsuid`).
    Paths(BTreeSet<PathBuf>),
    All,
}

#[derive(Debug, Clone, Default)]
pub struct InstallOptions {
    pub setuid: Setuid,
}

/// What [`Installer::finish`] reports.
#[derive(Debug, Clone, Default)]
pub struct InstallReport {
    /// Human-readable warnings: scripts not run, applets placed by guess.
    pub warnings: Vec<String>,
    /// Scripts Basalt replayed natively.
    pub handled: Vec<String>,
    /// Number of busybox applet links created, and how their list was found.
    pub busybox_links: Option<(usize, Method)>,
}

/// Accumulates packages into one root tree.
#[derive(Debug, Default)]
pub struct Installer {
    options: InstallOptions,
    /// Non-directory path → owning package name.
    owners: HashMap<PathBuf, String>,
    packages: Vec<DbPackage>,
    replaces: HashMap<String, Vec<Dependency>>,
    notes: Vec<scripts::ScriptNote>,
    xattr_warnings: Vec<String>,
}

/// The PAX records Basalt reads: the file checksum, and the names of extended
/// attributes (`SCHILY.xattr.*`, e.g. `security.capability`), which the tree
/// cannot hold and which are therefore reported.
fn pax_records(
    ent: &mut tar::Entry<'_, &[u8]>,
) -> Result<(Option<String>, Vec<String>), std::io::Error> {
    let Some(exts) = ent.pax_extensions()? else {
        return Ok((None, Vec::new()));
    };
    let mut sha1 = None;
    let mut xattrs = Vec::new();
    for e in exts {
        let e = e?;
        let key = e.key_bytes();
        if key == b"APK-TOOLS.checksum.SHA1" {
            sha1 = Some(String::from_utf8_lossy(e.value_bytes()).trim().to_string());
        } else if let Some(x) = key.strip_prefix(b"SCHILY.xattr.") {
            xattrs.push(String::from_utf8_lossy(x).into_owned());
        }
    }
    Ok((sha1, xattrs))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Installer {
    pub fn new(options: InstallOptions) -> Installer {
        Installer {
            options,
            ..Default::default()
        }
    }

    /// Check a path from the package: relative, no `..`; returns it normalised.
    fn check_path(package: &str, raw: &Path) -> Result<Option<PathBuf>, InstallError> {
        let shown = raw.display().to_string();
        let mut out = PathBuf::new();
        for c in raw.components() {
            match c {
                Component::RootDir | Component::Prefix(_) => {
                    return Err(InstallError::Absolute {
                        package: package.to_string(),
                        path: shown,
                    });
                }
                Component::ParentDir => {
                    return Err(InstallError::Traversal {
                        package: package.to_string(),
                        path: shown,
                    });
                }
                Component::CurDir => {}
                Component::Normal(n) => out.push(n),
            }
        }
        Ok(if out.as_os_str().is_empty() {
            None
        } else {
            Some(out)
        })
    }

    fn check_parents(tree: &Tree, package: &str, path: &Path) -> Result<(), InstallError> {
        let mut prefix = PathBuf::new();
        let comps: Vec<_> = path.components().collect();
        for c in &comps[..comps.len().saturating_sub(1)] {
            prefix.push(c);
            if let Some(Entry {
                kind: EntryKind::Symlink(_),
                ..
            }) = tree.get(&prefix)
            {
                return Err(InstallError::ThroughSymlink {
                    package: package.to_string(),
                    path: path.display().to_string(),
                    link: prefix.display().to_string(),
                });
            }
        }
        Ok(())
    }

    /// Decide whether `package` may write non-directory `path`; `Ok(false)` = keep
    /// the existing owner's copy.
    fn claim(&mut self, package: &str, label: &str, path: &Path) -> Result<bool, InstallError> {
        let Some(owner) = self.owners.get(path).cloned() else {
            self.owners.insert(path.to_path_buf(), package.to_string());
            return Ok(true);
        };
        if owner == package {
            return Ok(true);
        }
        let replaces = |a: &str, b: &str| {
            self.replaces
                .get(a)
                .is_some_and(|r| r.iter().any(|d| d.name == b))
        };
        if replaces(package, &owner) {
            if let Some(p) = self.packages.iter_mut().find(|p| p.info.name == owner) {
                p.files.remove(path);
            }
            self.owners.insert(path.to_path_buf(), package.to_string());
            Ok(true)
        } else if replaces(&owner, package) {
            Ok(false)
        } else {
            Err(InstallError::FileConflict {
                package: label.to_string(),
                path: path.display().to_string(),
                owner,
            })
        }
    }

    /// Extract one verified package into `tree`.
    pub fn install(
        &mut self,
        tree: &mut Tree,
        info: &PackageInfo,
        apk: &ApkFile,
    ) -> Result<(), InstallError> {
        let package = info.name.as_str();
        let label = info.id();
        self.replaces
            .insert(package.to_string(), info.replaces.clone());
        let mut db = DbPackage {
            info: info.clone(),
            ..Default::default()
        };
        // Contents of regular files installed so far, for hard links.
        let mut contents: HashMap<PathBuf, FileData> = HashMap::new();
        let terr = |source| InstallError::Tar {
            package: label.clone(),
            source,
        };
        let mut ar = tar::Archive::new(apk.data_tar.as_slice());
        for ent in ar.entries().map_err(terr)? {
            let mut ent = ent.map_err(terr)?;
            let et = ent.header().entry_type();
            if matches!(et, tar::EntryType::XGlobalHeader | tar::EntryType::XHeader) {
                continue;
            }
            let raw = ent.path().map_err(terr)?.into_owned();
            let Some(path) = Self::check_path(&label, &raw)? else {
                continue; // "./", the root itself
            };
            let shown = path.display().to_string();
            let h = ent.header();
            let mode = h.mode().map_err(terr)? & 0o7777;
            let uid = h.uid().map_err(terr)? as u32;
            let gid = h.gid().map_err(terr)? as u32;
            let mtime = h.mtime().map_err(terr)?;
            Self::check_parents(tree, &label, &path)?;
            let (pax_sum, xattrs) = pax_records(&mut ent).map_err(terr)?;
            for x in xattrs {
                self.xattr_warnings.push(format!(
                    "{label} {shown}: extended attribute {x} not kept (the root tree has no xattrs)"
                ));
            }
            let meta = |sha1| DbFile {
                uid,
                gid,
                mode,
                sha1,
            };
            let tree_err = |source| InstallError::Tree {
                package: label.clone(),
                path: shown.clone(),
                source,
            };
            let kind = match et {
                tar::EntryType::Directory => {
                    db.dirs.insert(path.clone(), meta(None));
                    if tree.get(&path).is_some_and(Entry::is_dir) {
                        // Shared directory: first package's ownership and mode stand.
                        continue;
                    }
                    EntryKind::Dir
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    if mode & 0o6000 != 0 {
                        let allowed = match &self.options.setuid {
                            Setuid::Refuse => false,
                            Setuid::All => true,
                            Setuid::Paths(p) => p.contains(&path),
                        };
                        if !allowed {
                            return Err(InstallError::Setuid {
                                package: label.clone(),
                                path: shown,
                                mode,
                            });
                        }
                    }
                    let want = pax_sum.clone().ok_or_else(|| InstallError::NoChecksum {
                        package: label.clone(),
                        path: shown.clone(),
                    })?;
                    let mut data = Vec::new();
                    ent.read_to_end(&mut data).map_err(terr)?;
                    let sum: [u8; 20] = Sha1::digest(&data).into();
                    if !hex(&sum).eq_ignore_ascii_case(&want) {
                        return Err(InstallError::FileChecksum {
                            package: label.clone(),
                            path: shown,
                            expected: want,
                            actual: hex(&sum),
                        });
                    }
                    if !self.claim(package, &label, &path)? {
                        continue;
                    }
                    db.files.insert(path.clone(), meta(Some(sum)));
                    let fd = FileData::Bytes(Arc::new(data));
                    contents.insert(path.clone(), fd.clone());
                    EntryKind::File(fd)
                }
                tar::EntryType::Symlink => {
                    let target = ent
                        .link_name()
                        .map_err(terr)?
                        .map(|c| c.into_owned())
                        .unwrap_or_default();
                    if let Some(want) = pax_sum.clone() {
                        let sum: [u8; 20] =
                            Sha1::digest(target.as_os_str().as_encoded_bytes()).into();
                        if !hex(&sum).eq_ignore_ascii_case(&want) {
                            return Err(InstallError::FileChecksum {
                                package: label.clone(),
                                path: shown,
                                expected: want,
                                actual: hex(&sum),
                            });
                        }
                    }
                    if !self.claim(package, &label, &path)? {
                        continue;
                    }
                    let sum: [u8; 20] = Sha1::digest(target.as_os_str().as_encoded_bytes()).into();
                    db.files.insert(path.clone(), meta(Some(sum)));
                    EntryKind::Symlink(target)
                }
                tar::EntryType::Link => {
                    let target = ent
                        .link_name()
                        .map_err(terr)?
                        .map(|c| c.into_owned())
                        .unwrap_or_default();
                    let tnorm = Self::check_path(&label, &target)?.unwrap_or_default();
                    let Some(fd) = contents.get(&tnorm).cloned() else {
                        return Err(InstallError::BadHardLink {
                            package: label.clone(),
                            path: shown,
                            target: target.display().to_string(),
                        });
                    };
                    if !self.claim(package, &label, &path)? {
                        continue;
                    }
                    let sha = db.files.get(&tnorm).and_then(|f| f.sha1);
                    db.files.insert(path.clone(), meta(sha));
                    EntryKind::File(fd)
                }
                tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                    return Err(InstallError::Device {
                        package: label.clone(),
                        path: shown,
                        kind: match et {
                            tar::EntryType::Char => "character device",
                            tar::EntryType::Block => "block device",
                            _ => "fifo",
                        },
                    });
                }
                other => {
                    return Err(InstallError::Unsupported {
                        package: label.clone(),
                        path: shown,
                        kind: other.as_byte(),
                    });
                }
            };
            tree.insert(
                &path,
                Entry {
                    kind,
                    mode,
                    uid,
                    gid,
                    mtime,
                },
            )
            .map_err(tree_err)?;
        }
        for script in apk.scripts.keys() {
            if let Some(n) = scripts::review(package, script) {
                self.notes.push(n);
            }
        }
        self.packages.push(db);
        Ok(())
    }

    /// Replay busybox's applet install, write apk's database, `world` and `arch`.
    /// `mtime` stamps the files Basalt writes (use the build's SOURCE_DATE_EPOCH).
    pub fn finish(
        self,
        tree: &mut Tree,
        world: &[Dependency],
        arch: &str,
        mtime: u64,
    ) -> Result<InstallReport, InstallError> {
        let mut report = InstallReport {
            warnings: self.xattr_warnings.clone(),
            ..Default::default()
        };
        for n in &self.notes {
            if n.handled {
                report.handled.push(n.to_string());
            } else {
                report.warnings.push(n.to_string());
            }
        }
        if self.packages.iter().any(|p| p.info.name == "busybox") {
            let bin = match tree.get("bin/busybox").map(|e| &e.kind) {
                Some(EntryKind::File(fd)) => fd.read().ok(),
                _ => None,
            };
            match bin.map(|b| busybox::applets(&b, "bin/busybox")) {
                Some(Ok(applets)) => {
                    let mut n = 0;
                    for g in &applets.guessed {
                        report.warnings.push(format!(
                            "busybox applet {g}: directory unknown, linked in /usr/bin"
                        ));
                    }
                    for (name, dir) in &applets.links {
                        let p = Path::new(dir).join(name);
                        // `--install -s` leaves existing files alone.
                        if tree.get(&p).is_some()
                            || Self::check_parents(tree, "busybox", &p).is_err()
                        {
                            continue;
                        }
                        let mut e = Entry::symlink("/bin/busybox");
                        e.mtime = mtime;
                        tree.insert(&p, e).map_err(|source| InstallError::Tree {
                            package: "busybox".to_string(),
                            path: p.display().to_string(),
                            source,
                        })?;
                        n += 1;
                    }
                    report.busybox_links = Some((n, applets.method));
                }
                Some(Err(e)) => report
                    .warnings
                    .push(format!("busybox applet links not created: {e}")),
                None => report
                    .warnings
                    .push("busybox applet links not created: bin/busybox is not a file".into()),
            }
        }
        let mut pkgs = self.packages;
        pkgs.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        let files = [
            (db::INSTALLED, db::render_installed(&pkgs)),
            (db::WORLD, db::render_world(world)),
            (db::ARCH, format!("{arch}\n")),
        ];
        for (path, text) in files {
            let mut e = Entry::file(FileData::Bytes(Arc::new(text.into_bytes())), 0o644);
            e.mtime = mtime;
            tree.insert(path, e).map_err(|source| InstallError::Db {
                path: path.to_string(),
                source,
            })?;
        }
        Ok(report)
    }
}
