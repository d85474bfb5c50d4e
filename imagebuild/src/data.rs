//! The data partition (`/var` on the device): a small ext4 made by e2fsprogs
//! on the host (no mature pure-Rust ext4 writer exists; CRATES.md). It is
//! grown to fill the disk by stage 1 on first boot.
//!
//! Reproducible: UUID and directory hash seed are derived from the image's
//! inputs, `E2FSPROGS_FAKE_TIME` pins every time mke2fs writes, and debugfs
//! then sets the pre-created directories' owner and times (mke2fs `-d` copies
//! them from the host's staging directory, ctime included).
//!
//! Independent of the build host's `/etc/mke2fs.conf` (`MKE2FS_CONFIG` points
//! at [`MKE2FS_CONF`]): distributions differ in the features they enable
//! (e2fsprogs 1.47 upstream adds `orphan_file`, older ones lack
//! `metadata_csum`) and in the inode size and density of a "small"
//! filesystem, which is what a 64 MiB partition is. The inode density is set
//! per block group ([`INODES_PER_GROUP`]), not by mke2fs's `inode_ratio`:
//! online growth keeps the groups' inode count, so a ratio applied to the
//! small build-time filesystem would be the grown one's scaled by how much
//! of a group the small one fills (with the "small" type's 4 KiB ratio, a
//! 32 GB card grew to 4 M inodes and 1 GiB of inode tables, which the kernel
//! then zeroes in the background on the card, `ext4lazyinit`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Filesystem label (boot-protocol.md).
pub const LABEL: &str = "basalt-data";
/// Directories created in the data partition, as `/var/...` on the device.
const DIRS: &[&str] = &["lib", "lib/basalt"];

/// Block size: 4 KiB, so a block group is 32768 blocks (128 MiB).
const BLOCK_SIZE: u64 = 4096;
const GROUP_BYTES: u64 = 8 * BLOCK_SIZE * BLOCK_SIZE;
/// Inodes in each 128 MiB block group: one per 16 KiB, mke2fs's own density
/// for a filesystem of a card's or disk's size (its `default` type), kept by
/// every group the first boot's growth adds. A 32 GB card gets ~2 M inodes
/// and 512 MiB of inode tables (256-byte inodes: nanosecond times, no 2038
/// limit, inline extended attributes).
pub const INODES_PER_GROUP: u64 = GROUP_BYTES / 16384;

/// The whole mke2fs configuration used (`MKE2FS_CONFIG`): the ext4 features
/// of e2fsprogs 1.46/1.47 as Debian ships them (every kernel Basalt boots,
/// 5.10 and later, mounts them), no periodic fsck. The size types mke2fs
/// looks up for a small filesystem are defined (and change nothing) so that
/// it does not warn about them.
pub const MKE2FS_CONF: &str = "\
[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384

[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
\tsmall = {
\t\tinode_size = 256
\t}
\tfloppy = {
\t\tinode_size = 256
\t}
";

/// The smallest data partition: a 4 MiB journal and one group's inode table.
pub const MIN_MIB: u64 = 16;

/// The journal's size in MiB (`-J size=`): a quarter of the partition as
/// written, from 4 to 64 MiB. The journal keeps its size when the first boot
/// grows the filesystem (it cannot be resized while mounted), so it is made
/// as large as the small partition allows: a 64 MiB partition gets 16 MiB
/// (mke2fs's own choice would be 4 MiB, which on the grown filesystem means
/// 1 MiB transactions and a checkpoint, writing metadata in place, every few
/// MiB of metadata changes); `partitions.data_mib` of 256 or more gets
/// 64 MiB, mke2fs's choice for a 2-16 GiB filesystem.
fn journal_mib(size: u64) -> u64 {
    (size >> 20).div_ceil(4).clamp(4, 64)
}

/// The inode count given to mke2fs (`-N`) for a `size`-byte filesystem:
/// [`INODES_PER_GROUP`] in each of its block groups, the last one partial.
fn inode_count(size: u64) -> u64 {
    size.div_ceil(GROUP_BYTES) * INODES_PER_GROUP
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("data partition: {what}: {err}")]
    Io { what: String, err: std::io::Error },
    #[error("data partition: cannot run {tool} ({err}); install e2fsprogs")]
    Missing {
        tool: &'static str,
        err: std::io::Error,
    },
    #[error("data partition: {tool} failed ({status}): {stderr}")]
    Failed {
        tool: &'static str,
        status: String,
        stderr: String,
    },
}

fn run(tool: &'static str, cmd: &mut Command) -> Result<(), DataError> {
    let out = cmd
        .output()
        .map_err(|err| DataError::Missing { tool, err })?;
    if !out.status.success() {
        return Err(DataError::Failed {
            tool,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Make the ext4 image `size` bytes long at `out` (a file in `work`).
pub fn make(
    work: &Path,
    size: u64,
    uuid: &str,
    hash_seed: &str,
    epoch: u64,
) -> Result<PathBuf, DataError> {
    // The result is a function of these inputs and of the e2fsprogs tools:
    // a warm rebuild takes it from the artifact cache.
    let cache = crate::artifacts::Artifacts::open("data-ext4");
    let mut key = crate::artifacts::Key::new("data-ext4");
    key.add(&size.to_le_bytes())
        .add(uuid.as_bytes())
        .add(hash_seed.as_bytes())
        .add(&epoch.to_le_bytes())
        .add(DIRS.join("\0").as_bytes())
        .add(MKE2FS_CONF.as_bytes())
        .add(&inode_count(size).to_le_bytes())
        .add(&journal_mib(size).to_le_bytes())
        .add_tool("mke2fs")
        .add_tool("debugfs");
    if let Some(hit) = cache.as_ref().and_then(|c| c.get(&key)) {
        return Ok(hit);
    }
    let img = make_uncached(work, size, uuid, hash_seed, epoch)?;
    Ok(cache.and_then(|c| c.put_file(&key, &img)).unwrap_or(img))
}

fn make_uncached(
    work: &Path,
    size: u64,
    uuid: &str,
    hash_seed: &str,
    epoch: u64,
) -> Result<PathBuf, DataError> {
    let io = |what: String| move |err| DataError::Io { what, err };
    let staging = work.join("data-staging");
    let _ = std::fs::remove_dir_all(&staging);
    for d in DIRS {
        let p = staging.join(d);
        std::fs::create_dir_all(&p).map_err(io(format!("creating {}", p.display())))?;
    }
    let img = work.join("data.ext4");
    let _ = std::fs::remove_file(&img);
    let f = std::fs::File::create(&img).map_err(io(format!("creating {}", img.display())))?;
    f.set_len(size)
        .map_err(io(format!("sizing {}", img.display())))?;
    drop(f);

    let conf = work.join("mke2fs.conf");
    std::fs::write(&conf, MKE2FS_CONF).map_err(io(format!("writing {}", conf.display())))?;

    let fake = epoch.to_string();
    run(
        "mke2fs",
        Command::new("mke2fs")
            .env("E2FSPROGS_FAKE_TIME", &fake)
            .env("MKE2FS_CONFIG", &conf)
            .args(["-q", "-F", "-t", "ext4", "-L", LABEL, "-U", uuid])
            .arg("-b")
            .arg(BLOCK_SIZE.to_string())
            .arg("-N")
            .arg(inode_count(size).to_string())
            .arg("-J")
            .arg(format!("size={}", journal_mib(size)))
            .arg("-E")
            .arg(format!("hash_seed={hash_seed},root_owner=0:0"))
            .arg("-d")
            .arg(&staging)
            .arg(&img),
    )?;

    let mut cmds = String::new();
    for d in std::iter::once(&"").chain(DIRS) {
        let p = format!("/{d}");
        for field in ["uid 0", "gid 0", "mode 040755"] {
            cmds.push_str(&format!("sif {p} {field}\n"));
        }
        for t in ["atime", "mtime", "ctime", "crtime"] {
            cmds.push_str(&format!("sif {p} {t} @{epoch}\n"));
        }
    }
    let cmdfile = work.join("data-debugfs.cmds");
    std::fs::write(&cmdfile, cmds).map_err(io(format!("writing {}", cmdfile.display())))?;
    run(
        "debugfs",
        Command::new("debugfs")
            .env("E2FSPROGS_FAKE_TIME", &fake)
            .arg("-w")
            .arg("-f")
            .arg(&cmdfile)
            .arg(&img),
    )?;
    let _ = std::fs::remove_dir_all(&staging);
    let _ = std::fs::remove_file(&cmdfile);
    let _ = std::fs::remove_file(&conf);
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `dumpe2fs -h`'s value for `key`.
    fn field(img: &Path, key: &str) -> String {
        let out = Command::new("dumpe2fs")
            .arg("-h")
            .arg(img)
            .output()
            .unwrap();
        assert!(out.status.success(), "dumpe2fs {}", img.display());
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {key} in dumpe2fs -h:\n{text}"))
    }

    fn num(img: &Path, key: &str) -> u64 {
        field(img, key).parse().unwrap()
    }

    /// `dumpe2fs`'s "Total journal size:" ("4096k", "16M") in KiB.
    fn journal_kib(img: &Path) -> u64 {
        let v = field(img, "Total journal size:");
        match v.split_at(v.len() - 1) {
            (n, "k") => n.parse().unwrap(),
            (n, "M") => n.parse::<u64>().unwrap() << 10,
            _ => panic!("journal size {v:?}"),
        }
    }

    #[test]
    fn journal_and_inodes_are_sized_for_the_grown_filesystem() {
        assert_eq!(inode_count(16 << 20), 8192);
        assert_eq!(inode_count(128 << 20), 8192);
        assert_eq!(inode_count((128 << 20) + 1), 16384);
        assert_eq!(journal_mib(16 << 20), 4);
        assert_eq!(journal_mib(64 << 20), 16);
        assert_eq!(journal_mib(200 << 20), 50);
        assert_eq!(journal_mib(4 << 30), 64);
    }

    /// What mke2fs makes, read back with dumpe2fs, then grown offline with
    /// resize2fs as the first boot grows it online: the features are the
    /// pinned ones whatever the host's mke2fs.conf says, and the grown
    /// filesystem has one 256-byte inode per 16 KiB and the journal made here.
    #[test]
    fn makes_the_pinned_ext4_and_it_grows_to_the_intended_density() {
        if Command::new("mke2fs").arg("-V").output().is_err() {
            eprintln!("skipped: no e2fsprogs on this host");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for mib in [MIN_MIB, 64, 200] {
            let work = dir.path().join(mib.to_string());
            std::fs::create_dir_all(&work).unwrap();
            let img = make_uncached(
                &work,
                mib << 20,
                "6b3b7a52-3f6e-4c2e-9b1d-2f7c1e0a9d11",
                "0c4f3d1a-8e2b-4f6a-9d3c-5b7e1a2c4d6f",
                1764288000,
            )
            .unwrap();
            assert_eq!(
                field(&img, "Filesystem features:"),
                "has_journal ext_attr resize_inode dir_index filetype extent 64bit \
                 flex_bg sparse_super large_file huge_file dir_nlink extra_isize metadata_csum"
            );
            assert_eq!(num(&img, "Inode size:"), 256);
            assert_eq!(num(&img, "Block size:"), BLOCK_SIZE);
            assert_eq!(num(&img, "Inodes per group:"), INODES_PER_GROUP);
            assert_eq!(field(&img, "Filesystem volume name:"), LABEL);
            let journal = journal_kib(&img);
            assert_eq!(journal, journal_mib(mib << 20) << 10, "{mib} MiB");
            assert!(!work.join("mke2fs.conf").exists());
            let fsck = Command::new("e2fsck")
                .arg("-fn")
                .arg(&img)
                .output()
                .unwrap();
            assert!(fsck.status.success(), "{mib} MiB: {fsck:?}");

            // Grown to 4 GiB (sparse), as the first boot does.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&img)
                .unwrap()
                .set_len(4 << 30)
                .unwrap();
            let grow = Command::new("resize2fs").arg(&img).output().unwrap();
            assert!(grow.status.success(), "{grow:?}");
            let inodes = num(&img, "Inode count:");
            let bytes = num(&img, "Block count:") * BLOCK_SIZE;
            assert_eq!(inodes, 32 * INODES_PER_GROUP, "{mib} MiB grown");
            assert_eq!(bytes / inodes, 16384, "{mib} MiB grown");
            assert_eq!(journal_kib(&img), journal);
        }
    }
}
