//! Overlays: a directory or a tarball on the build host, turned into a [`Tree`]
//! that is layered onto the image's root.
//!
//! An overlay never writes to the host: tarballs are walked entry by entry and
//! their bytes held in memory (never `unpack()`ed), directories are referenced
//! by path and read when the image is written. Every path is normalised through
//! [`crate::tree::normalise`], so nothing escapes the root; device nodes, FIFOs
//! and sockets are refused (the device's `/dev` is devtmpfs).
//!
//! Ownership: a directory overlay's files belong to whoever ran the build on the
//! host, which means nothing on the device, so they become root-owned (0:0)
//! unless `owner` says otherwise. A tarball keeps the uid/gid recorded in it
//! unless `owner` overrides them.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::tree::{Entry, EntryKind, FileData, Tree, TreeError, normalise};

/// One overlay, as the image definition describes it (paths already resolved).
#[derive(Debug, Clone, Default)]
pub struct OverlaySpec {
    /// A directory, or a `.tar`, `.tar.gz`/`.tgz` or `.tar.zst` file.
    pub source: PathBuf,
    /// Directory inside the root where the overlay's top lands (`/` when empty).
    pub dest: PathBuf,
    /// `(uid, gid)` forced on every entry.
    pub owner: Option<(u32, u32)>,
    /// Permission bits forced on single paths (relative to the overlay's top).
    pub modes: BTreeMap<PathBuf, u32>,
    /// Glob patterns (`*`, `?`; relative to the overlay's top) left out, with
    /// everything below a matching directory.
    pub exclude: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("overlay {source_path}: cannot read {path}: {err}")]
    Io {
        source_path: PathBuf,
        path: PathBuf,
        #[source]
        err: io::Error,
    },
    #[error(
        "overlay {source_path}: {path:?} is a device node, FIFO or socket; overlays may hold only files, directories and symlinks"
    )]
    SpecialFile { source_path: PathBuf, path: String },
    #[error(
        "overlay {source_path}: hard link {path:?} points to {target:?}, which is not an earlier regular file in the archive"
    )]
    BadHardLink {
        source_path: PathBuf,
        path: String,
        target: String,
    },
    #[error("overlay {source_path}: entry {path:?}: {err}")]
    Tree {
        source_path: PathBuf,
        path: String,
        #[source]
        err: TreeError,
    },
    #[error("overlay {source_path}: `modes` names {path:?}, which the overlay does not contain")]
    ModeTargetMissing { source_path: PathBuf, path: PathBuf },
    #[error("overlay {source_path}: not a directory nor a .tar, .tar.gz, .tgz or .tar.zst file")]
    UnknownKind { source_path: PathBuf },
}

/// Load an overlay into a fresh tree (entries already placed under `dest`).
pub fn load(spec: &OverlaySpec) -> Result<Tree, OverlayError> {
    let io_err = |path: &Path, err| OverlayError::Io {
        source_path: spec.source.clone(),
        path: path.to_path_buf(),
        err,
    };
    let meta = fs::metadata(&spec.source).map_err(|e| io_err(&spec.source, e))?;
    let mut entries = if meta.is_dir() {
        load_dir(spec)?
    } else {
        let name = spec.source.to_string_lossy();
        let file = fs::File::open(&spec.source).map_err(|e| io_err(&spec.source, e))?;
        let reader: Box<dyn Read> = if name.ends_with(".tar") {
            Box::new(file)
        } else if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
            Box::new(flate2::read::GzDecoder::new(file))
        } else if name.ends_with(".tar.zst") {
            Box::new(zstd::Decoder::new(file).map_err(|e| io_err(&spec.source, e))?)
        } else {
            return Err(OverlayError::UnknownKind {
                source_path: spec.source.clone(),
            });
        };
        load_tar(spec, reader)?
    };

    for (path, mode) in &spec.modes {
        let rel = normalise(path).map_err(|err| OverlayError::Tree {
            source_path: spec.source.clone(),
            path: path.display().to_string(),
            err,
        })?;
        let Some(e) = entries.get_mut(&rel) else {
            return Err(OverlayError::ModeTargetMissing {
                source_path: spec.source.clone(),
                path: path.clone(),
            });
        };
        e.mode = mode & 0o7777;
    }

    let mut tree = Tree::new();
    for (rel, mut entry) in entries {
        if let Some((uid, gid)) = spec.owner {
            entry.uid = uid;
            entry.gid = gid;
        }
        let full = spec.dest.join(&rel);
        tree.insert(&full, entry)
            .map_err(|err| OverlayError::Tree {
                source_path: spec.source.clone(),
                path: full.display().to_string(),
                err,
            })?;
    }
    Ok(tree)
}

fn excluded(spec: &OverlaySpec, rel: &Path) -> bool {
    let s = rel.to_string_lossy();
    spec.exclude.iter().any(|p| {
        let p = p.trim_start_matches('/').trim_end_matches('/');
        glob_match(p, &s)
            || rel
                .ancestors()
                .skip(1)
                .any(|a| !a.as_os_str().is_empty() && glob_match(p, &a.to_string_lossy()))
    })
}

/// Match `text` against a glob `pattern`: `*` matches any run of characters
/// other than `/`, `?` one such character; everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    fn rec(p: &[u8], t: &[u8]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some(b'*') => {
                // Try every split that does not cross a `/`.
                let mut i = 0;
                loop {
                    if rec(&p[1..], &t[i..]) {
                        return true;
                    }
                    if i == t.len() || t[i] == b'/' {
                        return false;
                    }
                    i += 1;
                }
            }
            Some(b'?') => !t.is_empty() && t[0] != b'/' && rec(&p[1..], &t[1..]),
            Some(c) => t.first() == Some(c) && rec(&p[1..], &t[1..]),
        }
    }
    rec(pattern.as_bytes(), text.as_bytes())
}

fn load_dir(spec: &OverlaySpec) -> Result<BTreeMap<PathBuf, Entry>, OverlayError> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = spec.source.join(&rel);
        let rd = fs::read_dir(&dir).map_err(|err| OverlayError::Io {
            source_path: spec.source.clone(),
            path: dir.clone(),
            err,
        })?;
        for item in rd {
            let item = item.map_err(|err| OverlayError::Io {
                source_path: spec.source.clone(),
                path: dir.clone(),
                err,
            })?;
            let child_rel = rel.join(item.file_name());
            if excluded(spec, &child_rel) {
                continue;
            }
            let host = item.path();
            let meta = fs::symlink_metadata(&host).map_err(|err| OverlayError::Io {
                source_path: spec.source.clone(),
                path: host.clone(),
                err,
            })?;
            let ft = meta.file_type();
            let kind = if ft.is_dir() {
                stack.push(child_rel.clone());
                EntryKind::Dir
            } else if ft.is_file() {
                EntryKind::File(FileData::HostPath(host.clone()))
            } else if ft.is_symlink() {
                let target = fs::read_link(&host).map_err(|err| OverlayError::Io {
                    source_path: spec.source.clone(),
                    path: host.clone(),
                    err,
                })?;
                EntryKind::Symlink(target)
            } else {
                debug_assert!(
                    ft.is_block_device() || ft.is_char_device() || ft.is_fifo() || ft.is_socket()
                );
                return Err(OverlayError::SpecialFile {
                    source_path: spec.source.clone(),
                    path: child_rel.display().to_string(),
                });
            };
            let mode = if ft.is_symlink() {
                0o777
            } else {
                meta.mode() & 0o7777
            };
            out.insert(
                child_rel,
                Entry {
                    kind,
                    mode,
                    uid: 0,
                    gid: 0,
                    mtime: u64::try_from(meta.mtime()).unwrap_or(0),
                },
            );
        }
    }
    Ok(out)
}

fn load_tar(
    spec: &OverlaySpec,
    reader: Box<dyn Read>,
) -> Result<BTreeMap<PathBuf, Entry>, OverlayError> {
    let src = || spec.source.clone();
    let io_err = |path: &str, err| OverlayError::Io {
        source_path: src(),
        path: PathBuf::from(path),
        err,
    };
    let mut out: BTreeMap<PathBuf, Entry> = BTreeMap::new();
    let mut archive = tar::Archive::new(reader);
    let entries = archive.entries().map_err(|e| io_err("(archive)", e))?;
    for item in entries {
        let mut item = item.map_err(|e| io_err("(archive entry)", e))?;
        let raw_path = item
            .path()
            .map_err(|e| io_err("(entry path)", e))?
            .into_owned();
        let shown = raw_path.display().to_string();
        let tree_err = |err| OverlayError::Tree {
            source_path: src(),
            path: shown.clone(),
            err,
        };
        // `./` alone (the archive's top directory) names the root: skip it.
        if raw_path
            .components()
            .all(|c| matches!(c, std::path::Component::CurDir))
        {
            continue;
        }
        let rel = normalise(&raw_path).map_err(tree_err)?;
        if excluded(spec, &rel) {
            continue;
        }
        let header = item.header();
        let mode = header.mode().map_err(|e| io_err(&shown, e))? & 0o7777;
        let uid = header.uid().map_err(|e| io_err(&shown, e))?;
        let gid = header.gid().map_err(|e| io_err(&shown, e))?;
        let mtime = header.mtime().map_err(|e| io_err(&shown, e))?;
        let kind = match header.entry_type() {
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut data = Vec::new();
                item.read_to_end(&mut data).map_err(|e| io_err(&shown, e))?;
                EntryKind::File(FileData::Bytes(Arc::new(data)))
            }
            tar::EntryType::Symlink => {
                let target = item
                    .link_name()
                    .map_err(|e| io_err(&shown, e))?
                    .ok_or_else(|| io_err(&shown, io::Error::other("symlink without a target")))?;
                EntryKind::Symlink(target.into_owned())
            }
            tar::EntryType::Link => {
                // A hard link becomes a copy: squashfs as written here has no hard links.
                let target = item
                    .link_name()
                    .map_err(|e| io_err(&shown, e))?
                    .ok_or_else(|| {
                        io_err(&shown, io::Error::other("hard link without a target"))
                    })?;
                let bad = || OverlayError::BadHardLink {
                    source_path: src(),
                    path: shown.clone(),
                    target: target.display().to_string(),
                };
                let trel = normalise(&target).map_err(|_| bad())?;
                match out.get(&trel).map(|e| &e.kind) {
                    Some(EntryKind::File(d)) => EntryKind::File(d.clone()),
                    _ => return Err(bad()),
                }
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => continue,
            _ => {
                return Err(OverlayError::SpecialFile {
                    source_path: src(),
                    path: shown,
                });
            }
        };
        let mode = if matches!(kind, EntryKind::Symlink(_)) {
            0o777
        } else {
            mode
        };
        out.insert(
            rel,
            Entry {
                kind,
                mode,
                uid: u32::try_from(uid).unwrap_or(u32::MAX),
                gid: u32::try_from(gid).unwrap_or(u32::MAX),
                mtime,
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("basalt-overlay-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn tar_with(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, ty, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*ty);
            h.set_mode(0o640);
            h.set_uid(1000);
            h.set_gid(100);
            h.set_mtime(1234);
            h.set_size(data.len() as u64);
            // set_path refuses `..`; write the raw name to test our own check.
            let name = h.as_old_mut().name.as_mut();
            name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn glob() {
        assert!(glob_match("boot/vmlinuz-*", "boot/vmlinuz-6.1.0"));
        assert!(!glob_match("boot/vmlinuz-*", "boot/x/vmlinuz-6.1.0"));
        assert!(!glob_match("*", "a/b"));
        assert!(glob_match("a/?/c", "a/b/c"));
        assert!(glob_match(".stamp", ".stamp"));
    }

    #[test]
    fn tarball_entries_keep_owner_and_mode() {
        let d = tmpdir("tar");
        let p = d.join("o.tar");
        fs::write(
            &p,
            tar_with(&[
                ("./", tar::EntryType::Directory, b"", None),
                ("./etc/motd", tar::EntryType::Regular, b"hi", None),
                ("./etc/motd2", tar::EntryType::Link, b"", Some("etc/motd")),
                (
                    "./bin/sh",
                    tar::EntryType::Symlink,
                    b"",
                    Some("/bin/busybox"),
                ),
            ]),
        )
        .unwrap();
        let t = load(&OverlaySpec {
            source: p,
            dest: PathBuf::from("/opt"),
            ..Default::default()
        })
        .unwrap();
        let e = t.get("opt/etc/motd").unwrap();
        assert_eq!((e.uid, e.gid, e.mode, e.mtime), (1000, 100, 0o640, 1234));
        match &t.get("opt/etc/motd2").unwrap().kind {
            EntryKind::File(d) => assert_eq!(d.read().unwrap(), b"hi"),
            k => panic!("{k:?}"),
        }
        assert!(matches!(
            t.get("opt/bin/sh").unwrap().kind,
            EntryKind::Symlink(_)
        ));
    }

    #[test]
    fn tarball_escape_and_device_refused() {
        let d = tmpdir("bad");
        let p = d.join("esc.tar");
        fs::write(
            &p,
            tar_with(&[("../x", tar::EntryType::Regular, b"x", None)]),
        )
        .unwrap();
        let e = load(&OverlaySpec {
            source: p,
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(e, OverlayError::Tree { .. }), "{e}");
        assert!(e.to_string().contains("../x"), "{e}");

        let p = d.join("dev.tar");
        fs::write(
            &p,
            tar_with(&[("dev/sda", tar::EntryType::Block, b"", None)]),
        )
        .unwrap();
        let e = load(&OverlaySpec {
            source: p,
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(e, OverlayError::SpecialFile { .. }), "{e}");
    }

    #[test]
    fn directory_overlay_is_root_owned_with_excludes_and_modes() {
        let d = tmpdir("dir");
        fs::create_dir_all(d.join("usr/share/doc/x")).unwrap();
        fs::write(d.join("usr/share/doc/x/README"), b"r").unwrap();
        fs::create_dir_all(d.join("bin")).unwrap();
        fs::write(d.join("bin/tool"), b"t").unwrap();
        fs::write(d.join(".stamp"), b"s").unwrap();
        std::os::unix::fs::symlink("tool", d.join("bin/alias")).unwrap();
        let mut modes = BTreeMap::new();
        modes.insert(PathBuf::from("bin/tool"), 0o4755);
        let t = load(&OverlaySpec {
            source: d.clone(),
            exclude: vec![".stamp".into(), "usr/share/doc".into()],
            modes,
            ..Default::default()
        })
        .unwrap();
        assert!(t.get(".stamp").is_none());
        assert!(t.get("usr/share/doc/x/README").is_none());
        assert!(t.get("usr/share").is_some());
        let tool = t.get("bin/tool").unwrap();
        assert_eq!((tool.uid, tool.gid, tool.mode), (0, 0, 0o4755));
        match &t.get("bin/alias").unwrap().kind {
            EntryKind::Symlink(p) => assert_eq!(p, Path::new("tool")),
            k => panic!("{k:?}"),
        }
    }

    #[test]
    fn mode_for_missing_path_is_an_error() {
        let d = tmpdir("missing");
        let mut modes = BTreeMap::new();
        modes.insert(PathBuf::from("nope"), 0o755);
        let e = load(&OverlaySpec {
            source: d,
            modes,
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
