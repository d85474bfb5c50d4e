//! The root filesystem tree: every path the image's root will hold, with the
//! ownership, mode and time it must have on the device.
//!
//! Sources (overlays, Alpine packages, the builder's own files) insert into one
//! `Tree`; writers (squashfs, cpio) read it in sorted path order. Ownership is
//! recorded here and never applied on the host: the builder runs unprivileged.
//! A `Tree` never holds a path that escapes the root: paths are normalised and
//! checked on insert.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// Where a regular file's bytes come from.
#[derive(Clone)]
pub enum FileData {
    /// Bytes held in memory.
    Bytes(Arc<Vec<u8>>),
    /// A file on the build host, read when the image is written.
    HostPath(PathBuf),
}

impl fmt::Debug for FileData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileData::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            FileData::HostPath(p) => write!(f, "HostPath({})", p.display()),
        }
    }
}

impl FileData {
    /// Read the whole content.
    pub fn read(&self) -> std::io::Result<Vec<u8>> {
        match self {
            FileData::Bytes(b) => Ok(b.as_ref().clone()),
            FileData::HostPath(p) => std::fs::read(p),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> std::io::Result<u64> {
        match self {
            FileData::Bytes(b) => Ok(b.len() as u64),
            FileData::HostPath(p) => Ok(std::fs::metadata(p)?.len()),
        }
    }

    pub fn is_empty(&self) -> std::io::Result<bool> {
        Ok(self.len()? == 0)
    }
}

#[derive(Debug, Clone)]
pub enum EntryKind {
    Dir,
    File(FileData),
    /// Symlink target, stored verbatim (may be absolute: it is resolved on the device).
    Symlink(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub kind: EntryKind,
    /// Permission bits including setuid/setgid/sticky (`0o7777` mask), no file type bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
}

impl Entry {
    pub fn dir(mode: u32) -> Entry {
        Entry {
            kind: EntryKind::Dir,
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
        }
    }

    pub fn file(data: FileData, mode: u32) -> Entry {
        Entry {
            kind: EntryKind::File(data),
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
        }
    }

    pub fn symlink(target: impl Into<PathBuf>) -> Entry {
        Entry {
            kind: EntryKind::Symlink(target.into()),
            mode: 0o777,
            uid: 0,
            gid: 0,
            mtime: 0,
        }
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.kind, EntryKind::Dir)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("path {path:?} escapes the root (absolute after normalising, or through `..`)")]
    Escapes { path: String },
    #[error("path {path:?} is empty or names the root itself")]
    Empty { path: String },
    #[error("cannot put {path:?} under {parent:?}, which is not a directory")]
    ParentNotDir { path: String, parent: String },
    #[error("cannot replace directory {path:?} with a non-directory")]
    ReplaceDir { path: String },
}

/// Normalise a path inside the root: strip a leading `/` and `.` components,
/// refuse `..`. Returns the relative path (`usr/bin/x`).
pub fn normalise(path: &Path) -> Result<PathBuf, TreeError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(TreeError::Escapes {
                    path: path.display().to_string(),
                });
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(TreeError::Empty {
            path: path.display().to_string(),
        });
    }
    Ok(out)
}

/// A root filesystem tree. The root directory itself is implicit (mode 0755, root-owned).
#[derive(Debug, Clone, Default)]
pub struct Tree {
    entries: BTreeMap<PathBuf, Entry>,
}

impl Tree {
    pub fn new() -> Tree {
        Tree::default()
    }

    /// Insert or replace `path`. Missing parent directories are created
    /// (0755, root, mtime of the entry). A later insert of the same path wins,
    /// which is how overlays layer; a directory is only ever replaced by a
    /// directory (its mode/owner are updated, its children kept).
    pub fn insert(&mut self, path: impl AsRef<Path>, entry: Entry) -> Result<(), TreeError> {
        let rel = normalise(path.as_ref())?;
        let mut parent = PathBuf::new();
        let comps: Vec<_> = rel.components().collect();
        for c in &comps[..comps.len() - 1] {
            parent.push(c);
            match self.entries.get(&parent) {
                Some(e) if e.is_dir() => {}
                Some(_) => {
                    return Err(TreeError::ParentNotDir {
                        path: rel.display().to_string(),
                        parent: parent.display().to_string(),
                    });
                }
                None => {
                    let mut d = Entry::dir(0o755);
                    d.mtime = entry.mtime;
                    self.entries.insert(parent.clone(), d);
                }
            }
        }
        if let Some(existing) = self.entries.get(&rel)
            && existing.is_dir()
            && !entry.is_dir()
        {
            return Err(TreeError::ReplaceDir {
                path: rel.display().to_string(),
            });
        }
        self.entries.insert(rel, entry);
        Ok(())
    }

    pub fn get(&self, path: impl AsRef<Path>) -> Option<&Entry> {
        let rel = normalise(path.as_ref()).ok()?;
        self.entries.get(&rel)
    }

    pub fn get_mut(&mut self, path: impl AsRef<Path>) -> Option<&mut Entry> {
        let rel = normalise(path.as_ref()).ok()?;
        self.entries.get_mut(&rel)
    }

    /// Remove a path and everything below it. Returns whether anything was removed.
    pub fn remove(&mut self, path: impl AsRef<Path>) -> bool {
        let Ok(rel) = normalise(path.as_ref()) else {
            return false;
        };
        let below: Vec<PathBuf> = self
            .entries
            .keys()
            .filter(|k| k.starts_with(&rel))
            .cloned()
            .collect();
        for k in &below {
            self.entries.remove(k);
        }
        !below.is_empty()
    }

    /// Layer `other` on top of `self`: its entries win.
    pub fn merge(&mut self, other: Tree) -> Result<(), TreeError> {
        for (p, e) in other.entries {
            self.insert(p, e)?;
        }
        Ok(())
    }

    /// All entries in sorted path order (parents before children).
    pub fn iter(&self) -> impl Iterator<Item = (&Path, &Entry)> {
        self.entries.iter().map(|(p, e)| (p.as_path(), e))
    }

    /// Set every entry's mtime to `mtime` (reproducible builds: SOURCE_DATE_EPOCH).
    pub fn clamp_mtime(&mut self, mtime: u64) {
        for e in self.entries.values_mut() {
            if e.mtime > mtime {
                e.mtime = mtime;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_refuses_escape() {
        assert!(normalise(Path::new("../etc/passwd")).is_err());
        assert!(normalise(Path::new("usr/../../x")).is_err());
        assert_eq!(
            normalise(Path::new("/usr/./bin")).unwrap(),
            PathBuf::from("usr/bin")
        );
        assert!(normalise(Path::new("/")).is_err());
    }

    #[test]
    fn insert_creates_parents_and_later_wins() {
        let mut t = Tree::new();
        t.insert(
            "/etc/hostname",
            Entry::file(FileData::Bytes(Arc::new(b"a".to_vec())), 0o644),
        )
        .unwrap();
        assert!(t.get("etc").unwrap().is_dir());
        t.insert(
            "etc/hostname",
            Entry::file(FileData::Bytes(Arc::new(b"b".to_vec())), 0o600),
        )
        .unwrap();
        let e = t.get("/etc/hostname").unwrap();
        assert_eq!(e.mode, 0o600);
        match &e.kind {
            EntryKind::File(d) => assert_eq!(d.read().unwrap(), b"b"),
            _ => panic!("not a file"),
        }
    }

    #[test]
    fn directory_not_replaced_by_file() {
        let mut t = Tree::new();
        t.insert("a/b", Entry::dir(0o755)).unwrap();
        assert!(t.insert("a", Entry::symlink("x")).is_err());
        assert!(t.insert("a/b/c/d", Entry::dir(0o700)).is_ok());
        t.insert("f", Entry::symlink("x")).unwrap();
        assert!(t.insert("f/g", Entry::dir(0o755)).is_err());
    }

    #[test]
    fn remove_removes_subtree() {
        let mut t = Tree::new();
        t.insert("a/b/c", Entry::dir(0o755)).unwrap();
        t.insert("ab", Entry::dir(0o755)).unwrap();
        assert!(t.remove("a"));
        assert!(t.get("ab").is_some());
        assert!(t.get("a/b").is_none());
    }
}
