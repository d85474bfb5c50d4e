//! The slot's root filesystem: a [`Tree`] written as squashfs (zstd) with
//! backhand. Deterministic: entries go in sorted path order, the superblock
//! time is SOURCE_DATE_EPOCH, uid/gid/mode/mtime come from the tree exactly.
//! backhand writes no xattrs and no hard links (the tree has neither).

use std::io::Cursor;

use backhand::compression::Compressor;
use backhand::{FilesystemCompressor, FilesystemWriter, NodeHeader};
use basalt_rootfs::tree::{EntryKind, FileData, Tree};

use crate::artifacts::{Artifacts, Key};

#[derive(Debug, thiserror::Error)]
pub enum SquashfsError {
    #[error("squashfs: adding {path}: {err}")]
    Add {
        path: String,
        err: backhand::BackhandError,
    },
    #[error("squashfs: {path}: mode {mode:#o} or mtime {mtime} does not fit squashfs fields")]
    Range { path: String, mode: u32, mtime: u64 },
    #[error("squashfs: writing the filesystem: {0}")]
    Write(#[source] backhand::BackhandError),
    #[error("squashfs: compressor: {0}")]
    Compressor(#[source] backhand::BackhandError),
}

/// [`write`], through the artifact cache: a tree already compressed by this
/// same `basalt` executable (same paths, modes, owners, times and content)
/// comes back from the cache instead of being compressed again.
pub fn write_cached(tree: &Tree, epoch: u32) -> Result<Vec<u8>, SquashfsError> {
    let Some(cache) = Artifacts::open("squashfs") else {
        return write(tree, epoch);
    };
    let Some(key) = tree_key(tree, epoch) else {
        return write(tree, epoch);
    };
    if let Some(bytes) = cache.get_bytes(&key) {
        return Ok(bytes);
    }
    let bytes = write(tree, epoch)?;
    cache.put_bytes(&key, &bytes);
    Ok(bytes)
}

/// Everything [`write`] reads from `tree`, hashed; `None` when a host file
/// cannot be read (then [`write`] reports the error itself).
fn tree_key(tree: &Tree, epoch: u32) -> Option<Key> {
    use sha2::{Digest, Sha256};
    let mut key = Key::new("squashfs");
    key.add(&epoch.to_le_bytes());
    for (path, e) in tree.iter() {
        key.add(path.as_os_str().as_encoded_bytes());
        key.add(&e.mode.to_le_bytes())
            .add(&e.uid.to_le_bytes())
            .add(&e.gid.to_le_bytes())
            .add(&e.mtime.to_le_bytes());
        match &e.kind {
            EntryKind::Dir => key.add(b"d"),
            EntryKind::Symlink(t) => key.add(b"l").add(t.as_os_str().as_encoded_bytes()),
            EntryKind::File(FileData::Bytes(b)) => key.add(b"f").add(&Sha256::digest(b.as_slice())),
            EntryKind::File(FileData::HostPath(p)) => {
                use std::io::Read;
                let mut h = Sha256::new();
                let mut f = std::fs::File::open(p).ok()?;
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = f.read(&mut buf).ok()?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                key.add(b"f").add(&h.finalize())
            }
        };
    }
    Some(key)
}

/// Write `tree` as a squashfs image in memory.
pub fn write(tree: &Tree, epoch: u32) -> Result<Vec<u8>, SquashfsError> {
    let mut fs = FilesystemWriter::default();
    fs.set_time(epoch);
    fs.set_root_mode(0o755);
    fs.set_root_uid(0);
    fs.set_root_gid(0);
    fs.set_compressor(
        FilesystemCompressor::new(Compressor::Zstd, None).map_err(SquashfsError::Compressor)?,
    );
    for (path, e) in tree.iter() {
        let shown = path.display().to_string();
        let (Ok(mode), Ok(mtime)) = (u16::try_from(e.mode & 0o7777), u32::try_from(e.mtime)) else {
            return Err(SquashfsError::Range {
                path: shown,
                mode: e.mode,
                mtime: e.mtime,
            });
        };
        let header = NodeHeader::new(mode, e.uid, e.gid, mtime);
        let r = match &e.kind {
            EntryKind::Dir => fs.push_dir(path, header),
            EntryKind::Symlink(t) => fs.push_symlink(t, path, header),
            EntryKind::File(FileData::HostPath(p)) => fs.push_file_from_path(p, path, header),
            EntryKind::File(FileData::Bytes(b)) => {
                fs.push_file(Cursor::new(b.as_ref().clone()), path, header)
            }
        };
        r.map_err(|err| SquashfsError::Add { path: shown, err })?;
    }
    let mut out = Cursor::new(Vec::new());
    fs.write(&mut out).map_err(SquashfsError::Write)?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_rootfs::tree::Entry;
    use std::sync::Arc;

    #[test]
    fn unsquashfs_sees_exact_metadata_and_output_is_reproducible() {
        let mut t = Tree::new();
        let mut e = Entry::file(FileData::Bytes(Arc::new(b"hello".to_vec())), 0o4750);
        e.uid = 1000;
        e.gid = 100;
        e.mtime = 1_700_000_000;
        t.insert("usr/bin/tool", e).unwrap();
        let mut l = Entry::symlink("/usr/bin/tool");
        l.mtime = 1_700_000_000;
        t.insert("bin/tool", l).unwrap();
        let mut d = Entry::dir(0o1777);
        d.mtime = 1_700_000_000;
        t.insert("tmp", d).unwrap();
        let a = write(&t, 1_700_000_000).unwrap();
        let b = write(&t, 1_700_000_000).unwrap();
        assert_eq!(a, b);

        let dir = std::env::temp_dir().join(format!("basalt-sqfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("r.sqfs");
        std::fs::write(&f, &a).unwrap();
        let out = std::process::Command::new("unsquashfs")
            .args(["-lln", "-UTC"])
            .arg(&f)
            .output()
            .expect("unsquashfs (squashfs-tools) is installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let list = String::from_utf8_lossy(&out.stdout);
        let line = |suffix: &str| {
            list.lines()
                .find(|l| l.ends_with(suffix))
                .unwrap_or_else(|| panic!("{suffix} missing in:\n{list}"))
                .to_string()
        };
        let tool = line("squashfs-root/usr/bin/tool");
        assert!(tool.starts_with("-rwsr-x---"), "{tool}");
        assert!(tool.contains("1000/100"), "{tool}");
        assert!(tool.contains("2023-11-14 22:13"), "{tool}");
        assert!(line("squashfs-root/tmp").starts_with("drwxrwxrwt"));
        assert!(line("bin/tool -> /usr/bin/tool").starts_with("lrwxrwxrwx"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
