//! Helpers for Basalt's end-to-end tests: find the test assets, build images
//! with `basalt build`, edit them as plain files (node config on the ESP, disk
//! growth), boot them under QEMU (TCG, OVMF) and read the serial console.
//!
//! Everything here has a hard timeout and kills QEMU when dropped: a test may
//! fail, but it must never hang. Each test works in its own directory under
//! `target/e2e/<test>/` that is kept afterwards, console logs included, so a
//! failure can be read after the fact.

pub mod assets;
pub mod build;
pub mod console;
pub mod disk;
pub mod qemu;
pub mod report;

use std::path::{Path, PathBuf};

/// The repository's top directory (the workspace root).
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// A fresh, empty work directory for one test: `target/e2e/<name>/`
/// (`CARGO_TARGET_DIR` respected). Left in place afterwards for post-mortems.
pub fn work_dir(name: &str) -> std::io::Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let dir = target.join("e2e").join(name);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
