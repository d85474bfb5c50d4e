//! Cache of installed package trees, for locked builds only: when
//! `basalt.lock` pins every package, the tree they install is a function of
//! the lock entry, the build epoch, the setuid allow-list, the trusted key
//! names and this basalt version. A warm build loads that tree instead of
//! verifying and extracting every package again.
//!
//! Layout: `<cache>/tree/<key>.toml` (the entries, with ownership and modes,
//! and the install warnings) and `<cache>/tree/blobs/<sha256>` (file
//! contents, checked against their sha256 when loaded). Anything missing or
//! damaged makes [`load`] return `None`: the build then installs afresh.

use std::path::{Path, PathBuf};

use basalt_rootfs::tree::{Entry, EntryKind, FileData, Tree};
use serde::{Deserialize, Serialize};

use crate::kubernetes::sha256_hex;

const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: u32,
    #[serde(default)]
    warnings: Vec<String>,
    #[serde(default)]
    packages: Vec<String>,
    #[serde(default, rename = "entry")]
    entries: Vec<Item>,
}

#[derive(Serialize, Deserialize)]
struct Item {
    path: String,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
    /// Files: sha256 of the content.
    sha256: Option<String>,
    /// Symlinks: the target.
    target: Option<String>,
}

/// A cached tree: the tree, the resolved `name-version`s and the warnings.
pub struct Cached {
    pub tree: Tree,
    pub packages: Vec<String>,
    pub warnings: Vec<String>,
}

/// The cache key: sha256 over every input that decides the installed tree.
pub fn key(parts: &[&[u8]]) -> String {
    let mut all = Vec::new();
    for p in [
        &FORMAT.to_le_bytes()[..],
        env!("CARGO_PKG_VERSION").as_bytes(),
    ]
    .into_iter()
    .chain(parts.iter().copied())
    {
        all.extend_from_slice(&(p.len() as u64).to_le_bytes());
        all.extend_from_slice(p);
    }
    sha256_hex(&all)
}

fn dir(cache_root: &Path) -> PathBuf {
    cache_root.join("tree")
}

/// The tree stored under `key`, or `None` if absent or damaged.
pub fn load(cache_root: &Path, key: &str) -> Option<Cached> {
    let d = dir(cache_root);
    let text = std::fs::read_to_string(d.join(format!("{key}.toml"))).ok()?;
    let m: Manifest = toml::from_str(&text).ok()?;
    if m.format != FORMAT {
        return None;
    }
    let mut tree = Tree::new();
    for it in m.entries {
        let kind = match (&it.sha256, &it.target) {
            (Some(sha), None) => {
                let p = d.join("blobs").join(sha);
                let bytes = std::fs::read(&p).ok()?;
                if sha256_hex(&bytes) != *sha {
                    return None;
                }
                EntryKind::File(FileData::HostPath(p))
            }
            (None, Some(t)) => EntryKind::Symlink(PathBuf::from(t)),
            (None, None) => EntryKind::Dir,
            (Some(_), Some(_)) => return None,
        };
        let e = Entry {
            kind,
            mode: it.mode,
            uid: it.uid,
            gid: it.gid,
            mtime: it.mtime,
        };
        tree.insert(&it.path, e).ok()?;
    }
    Some(Cached {
        tree,
        packages: m.packages,
        warnings: m.warnings,
    })
}

/// Store `tree` under `key`. Best effort: an error only means no warm start.
pub fn store(
    cache_root: &Path,
    key: &str,
    tree: &Tree,
    packages: &[String],
    warnings: &[String],
) -> std::io::Result<()> {
    let d = dir(cache_root);
    let blobs = d.join("blobs");
    std::fs::create_dir_all(&blobs)?;
    let mut entries = Vec::new();
    for (path, e) in tree.iter() {
        let path = path
            .to_str()
            .ok_or_else(|| std::io::Error::other(format!("{} is not UTF-8", path.display())))?
            .to_string();
        let (sha256, target) = match &e.kind {
            EntryKind::Dir => (None, None),
            EntryKind::Symlink(t) => (
                None,
                Some(
                    t.to_str()
                        .ok_or_else(|| std::io::Error::other("symlink target is not UTF-8"))?
                        .to_string(),
                ),
            ),
            EntryKind::File(data) => {
                let bytes = data.read()?;
                let sha = sha256_hex(&bytes);
                let p = blobs.join(&sha);
                if !p.exists() {
                    let tmp = p.with_extension(format!("tmp{}", std::process::id()));
                    std::fs::write(&tmp, &bytes)?;
                    std::fs::rename(&tmp, &p)?;
                }
                (Some(sha), None)
            }
        };
        entries.push(Item {
            path,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            sha256,
            target,
        });
    }
    let m = Manifest {
        format: FORMAT,
        warnings: warnings.to_vec(),
        packages: packages.to_vec(),
        entries,
    };
    let text = toml::to_string(&m).map_err(std::io::Error::other)?;
    let p = d.join(format!("{key}.toml"));
    let tmp = p.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn round_trip_keeps_ownership_modes_and_content() {
        let root = std::env::temp_dir().join(format!("basalt-treecache-{}", std::process::id()));
        let mut t = Tree::new();
        let mut d = Entry::dir(0o1777);
        d.mtime = 5;
        t.insert("tmp", d).unwrap();
        let mut f = Entry::file(FileData::Bytes(Arc::new(b"hello".to_vec())), 0o4755);
        f.uid = 10;
        f.gid = 20;
        t.insert("tmp/x", f).unwrap();
        t.insert("bin", Entry::dir(0o755)).unwrap();
        t.insert("bin/sh", Entry::symlink("/bin/busybox")).unwrap();
        let k = key(&[b"a", b"b"]);
        assert_ne!(k, key(&[b"ab"]));
        store(&root, &k, &t, &["busybox-1".into()], &["w".into()]).unwrap();
        let c = load(&root, &k).unwrap();
        assert_eq!(c.packages, ["busybox-1"]);
        assert_eq!(c.warnings, ["w"]);
        let x = c.tree.get("tmp/x").unwrap();
        assert_eq!((x.mode, x.uid, x.gid), (0o4755, 10, 20));
        match &x.kind {
            EntryKind::File(d) => assert_eq!(d.read().unwrap(), b"hello"),
            k => panic!("{k:?}"),
        }
        assert_eq!(c.tree.get("tmp").unwrap().mtime, 5);
        assert!(matches!(
            &c.tree.get("bin/sh").unwrap().kind,
            EntryKind::Symlink(p) if p == Path::new("/bin/busybox")
        ));
        // A damaged blob: no warm start.
        std::fs::write(
            dir(&root).join("blobs").join(sha256_hex(b"hello")),
            b"HELLO",
        )
        .unwrap();
        assert!(load(&root, &k).is_none());
        assert!(load(&root, "nope").is_none());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
