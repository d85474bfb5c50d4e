//! Helpers shared by the builder's integration tests (`mod common;`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository's top directory.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Run `cmd` and return its output, whatever its exit status.
pub fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// Run `cmd`; fail the test, quoting its output, unless it exits 0.
pub fn run(cmd: &mut Command) -> Output {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// sha256 of a file, by `sha256sum` (an independent tool).
pub fn sha256(p: &Path) -> String {
    String::from_utf8_lossy(&run(Command::new("sha256sum").arg(p)).stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}
