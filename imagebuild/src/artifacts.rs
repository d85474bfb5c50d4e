//! Cache of build steps whose output is a pure function of their inputs
//! (the root squashfs, the data partition's ext4): a warm rebuild reuses the
//! bytes instead of compressing or running mke2fs again.
//!
//! Layout: `<cache>/artifacts/<kind>/<key>`, where `<key>` is the sha256 of
//! everything that decides the output *and* of the tools that make it: the
//! running `basalt` executable (path, size, mtime: any rebuild of basalt, and
//! so any change of backhand or of this code, misses) and, for steps that run
//! a host tool, that tool's identity. A cached artifact is therefore exactly
//! what the same program would write again; the build-cache benchmark checks
//! that cold and warm builds give the same image.
//!
//! Entries are written to a temporary name and renamed, so a crash never
//! leaves a truncated artifact under its key; each kind keeps its [`KEEP`]
//! most recently used entries. Any failure of the cache itself is ignored:
//! the build then does the work (the cache only ever saves time).
//! `BASALT_NO_ARTIFACT_CACHE=1` turns it off.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

/// Entries kept per kind (the newest by modification time).
pub const KEEP: usize = 4;

/// A cache directory for one kind of artifact.
pub struct Artifacts {
    dir: PathBuf,
}

/// Builds a cache key from the step's inputs.
pub struct Key(Sha256);

impl Key {
    /// A key for `kind`, seeded with the running executable's identity.
    pub fn new(kind: &str) -> Key {
        let mut h = Sha256::new();
        h.update(b"basalt artifact v1\0");
        h.update(kind.as_bytes());
        h.update([0]);
        h.update(exe_identity().as_bytes());
        Key(h)
    }

    /// Add one input (length-prefixed, so inputs cannot run into each other).
    pub fn add(&mut self, part: &[u8]) -> &mut Key {
        self.0.update((part.len() as u64).to_le_bytes());
        self.0.update(part);
        self
    }

    /// Add a host tool's identity (its resolved path, size and mtime), or
    /// a marker that it was not found.
    pub fn add_tool(&mut self, name: &str) -> &mut Key {
        let id = find_in_path(name)
            .map(|p| file_identity(&p))
            .unwrap_or_else(|| format!("{name}: not found"));
        self.add(id.as_bytes())
    }

    pub fn hex(&self) -> String {
        self.0
            .clone()
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl Artifacts {
    /// The cache for `kind` under basalt's cache directory, or `None` when
    /// there is none or it is turned off.
    pub fn open(kind: &str) -> Option<Artifacts> {
        if std::env::var_os("BASALT_NO_ARTIFACT_CACHE").is_some_and(|v| !v.is_empty() && v != "0") {
            return None;
        }
        let cache = basalt_rootfs::apk::repo::Cache::default_location().ok()?;
        Some(Artifacts::at(&cache.root, kind))
    }

    pub fn at(cache_root: &Path, kind: &str) -> Artifacts {
        Artifacts {
            dir: cache_root.join("artifacts").join(kind),
        }
    }

    /// The cached artifact for `key`, if present (its mtime is refreshed so
    /// pruning keeps what is used).
    pub fn get(&self, key: &Key) -> Option<PathBuf> {
        let path = self.dir.join(key.hex());
        let f = std::fs::File::options().write(true).open(&path).ok()?;
        let _ = f.set_modified(SystemTime::now());
        Some(path)
    }

    /// The cached bytes for `key`, if present.
    pub fn get_bytes(&self, key: &Key) -> Option<Vec<u8>> {
        std::fs::read(self.get(key)?).ok()
    }

    /// Store `data` under `key`; errors are ignored.
    pub fn put_bytes(&self, key: &Key, data: &[u8]) {
        self.put_with(key, |tmp| std::fs::write(tmp, data));
    }

    /// Store a copy of the file `src` under `key` (holes kept where the
    /// filesystem supports it); returns the cached path.
    pub fn put_file(&self, key: &Key, src: &Path) -> Option<PathBuf> {
        self.put_with(key, |tmp| copy_sparse(src, tmp))
    }

    fn put_with(
        &self,
        key: &Key,
        write: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Option<PathBuf> {
        std::fs::create_dir_all(&self.dir).ok()?;
        let hex = key.hex();
        let tmp = self
            .dir
            .join(format!(".{hex}.{}.partial", std::process::id()));
        let path = self.dir.join(&hex);
        if write(&tmp)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .is_err()
        {
            let _ = std::fs::remove_file(&tmp);
            return None;
        }
        self.prune();
        Some(path)
    }

    /// Keep the [`KEEP`] most recently used entries.
    fn prune(&self) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut entries: Vec<(SystemTime, PathBuf)> = rd
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.0));
        for (_, p) in entries.into_iter().skip(KEEP) {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Copy `src` to `dst`, leaving all-zero 64 KiB blocks as holes.
fn copy_sparse(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    const BLOCK: usize = 64 * 1024;
    let mut r = std::fs::File::open(src)?;
    let len = r.metadata()?.len();
    let mut w = std::fs::File::create(dst)?;
    let mut buf = vec![0u8; BLOCK];
    loop {
        let mut n = 0;
        while n < BLOCK {
            let k = r.read(&mut buf[n..])?;
            if k == 0 {
                break;
            }
            n += k;
        }
        if n == 0 {
            break;
        }
        if buf[..n].iter().all(|&b| b == 0) {
            w.seek(SeekFrom::Current(n as i64))?;
        } else {
            w.write_all(&buf[..n])?;
        }
    }
    w.set_len(len)?;
    w.sync_all()
}

fn file_identity(p: &Path) -> String {
    match std::fs::metadata(p) {
        Ok(m) => {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            format!("{} {} {}", p.display(), m.len(), mtime)
        }
        Err(e) => format!("{}: {e}", p.display()),
    }
}

fn exe_identity() -> String {
    match std::env::current_exe() {
        Ok(p) => file_identity(&p),
        // Without a way to tell which program this is, never share entries.
        Err(_) => format!("unknown exe, pid {}", std::process::id()),
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .and_then(|p| std::fs::canonicalize(p).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_by_input_and_boundaries() {
        let mut a = Key::new("k");
        a.add(b"ab").add(b"c");
        let mut b = Key::new("k");
        b.add(b"a").add(b"bc");
        let mut c = Key::new("other");
        c.add(b"ab").add(b"c");
        assert_ne!(a.hex(), b.hex());
        assert_ne!(a.hex(), c.hex());
        let mut a2 = Key::new("k");
        a2.add(b"ab").add(b"c");
        assert_eq!(a.hex(), a2.hex());
    }

    #[test]
    fn put_get_and_prune() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Artifacts::at(dir.path(), "t");
        let mut first = Key::new("t");
        first.add(b"0");
        assert!(cache.get(&first).is_none());
        cache.put_bytes(&first, b"zero");
        assert_eq!(cache.get_bytes(&first).as_deref(), Some(&b"zero"[..]));
        for i in 1..=KEEP {
            // Distinct mtimes so the order is defined.
            std::thread::sleep(std::time::Duration::from_millis(20));
            let mut k = Key::new("t");
            k.add(i.to_string().as_bytes());
            cache.put_bytes(&k, b"x");
        }
        assert!(cache.get(&first).is_none(), "oldest entry pruned");
        let n = std::fs::read_dir(dir.path().join("artifacts/t"))
            .unwrap()
            .count();
        assert_eq!(n, KEEP);
    }

    #[test]
    fn sparse_copy_keeps_content_and_length() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let mut data = vec![0u8; 300 * 1024];
        data[70_000] = 7;
        data[299_999] = 9;
        std::fs::write(&src, &data).unwrap();
        let cache = Artifacts::at(dir.path(), "s");
        let mut k = Key::new("s");
        k.add(b"x");
        let p = cache.put_file(&k, &src).unwrap();
        assert_eq!(std::fs::read(p).unwrap(), data);
    }
}
