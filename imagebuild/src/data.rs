//! The data partition (`/var` on the device): a small ext4 made by e2fsprogs
//! on the host (no mature pure-Rust ext4 writer exists; CRATES.md). It is
//! grown to fill the disk by stage 1 on first boot.
//!
//! Reproducible: UUID and directory hash seed are derived from the image's
//! inputs, `E2FSPROGS_FAKE_TIME` pins every time mke2fs writes, and debugfs
//! then sets the pre-created directories' owner and times (mke2fs `-d` copies
//! them from the host's staging directory, ctime included).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Filesystem label (boot-protocol.md).
pub const LABEL: &str = "basalt-data";
/// Directories created in the data partition, as `/var/...` on the device.
const DIRS: &[&str] = &["lib", "lib/basalt"];

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

    let fake = epoch.to_string();
    run(
        "mke2fs",
        Command::new("mke2fs")
            .env("E2FSPROGS_FAKE_TIME", &fake)
            .args([
                "-q", "-F", "-t", "ext4", "-b", "4096", "-L", LABEL, "-U", uuid,
            ])
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
    Ok(img)
}
