//! Building what the e2e tests boot: the binaries (`basalt` for the host;
//! `init` and the Kubernetes stand-in static for the device) and images
//! (`basalt build <image.toml> --out <dir>`).
//!
//! `BASALT` names a prebuilt `basalt`; otherwise the tests build the
//! workspace's binaries with cargo first (a no-op when `tests/run` already did).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use thiserror::Error;

/// The device target of the x86_64 board.
pub const X86_64_MUSL: &str = "x86_64-unknown-linux-musl";

#[derive(Debug, Error)]
pub enum BuildError {
    #[error("running {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} failed ({status}); output in {log}\n--- last lines ---\n{tail}")]
    Failed {
        what: String,
        status: std::process::ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error("{binary} does not exist after building it")]
    Missing { binary: PathBuf },
    #[error("basalt build wrote no .img file into {dir} (found: {found:?})")]
    NoImage { dir: PathBuf, found: Vec<String> },
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The cargo target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join("target"))
}

/// `BASALT`, else `target/debug/basalt` (the dev profile optimises
/// dependencies, which do the heavy work: compression, hashing).
pub fn basalt_binary() -> PathBuf {
    std::env::var_os("BASALT")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("debug/basalt"))
}

/// A static device binary built for `target` in release mode.
pub fn device_binary(target: &str, name: &str) -> PathBuf {
    target_dir().join(target).join("release").join(name)
}

static BUILT: Mutex<bool> = Mutex::new(false);

/// Runs `cmd`, logging its output to `log`; an error quotes the log's tail.
pub fn run_logged(what: &str, cmd: &mut Command, log: &Path) -> Result<(), BuildError> {
    // An anyhow error's backtrace (RUST_BACKTRACE=1 in some CI environments)
    // would push the error itself out of the tail kept below.
    let out = cmd
        .env("RUST_LIB_BACKTRACE", "0")
        .output()
        .map_err(|source| BuildError::Spawn {
            what: what.to_string(),
            source,
        })?;
    let mut text = out.stdout.clone();
    text.extend_from_slice(&out.stderr);
    std::fs::write(log, &text).map_err(|source| BuildError::Io {
        path: log.to_path_buf(),
        source,
    })?;
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    // From basalt's own `Error:` line when there is one, else the last lines.
    let start = lines
        .iter()
        .rposition(|l| l.starts_with("Error:"))
        .unwrap_or(lines.len().saturating_sub(30));
    let tail = lines[start..lines.len().min(start + 30)].join("\n");
    Err(BuildError::Failed {
        what: what.to_string(),
        status: out.status,
        log: log.to_path_buf(),
        tail,
    })
}

/// Builds `basalt` (unless `BASALT` is set) and the x86_64 device binaries,
/// once per test process. `log_dir` receives the cargo logs.
pub fn ensure_binaries(log_dir: &Path) -> Result<(), BuildError> {
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if *built {
        return Ok(());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let root = crate::repo_root();
    run_logged(
        "cargo build (init, k8s-standin for musl)",
        Command::new(&cargo).current_dir(&root).args([
            "build",
            "--release",
            "--target",
            X86_64_MUSL,
            "-p",
            "basalt-init",
            "-p",
            "k8s-standin",
        ]),
        &log_dir.join("cargo-device.log"),
    )?;
    if std::env::var_os("BASALT").is_none() {
        run_logged(
            "cargo build (basalt)",
            Command::new(&cargo).current_dir(&root).args([
                "build",
                "-p",
                "basalt-imagebuild",
                "--bin",
                "basalt",
            ]),
            &log_dir.join("cargo-basalt.log"),
        )?;
    }
    for binary in [
        basalt_binary(),
        device_binary(X86_64_MUSL, "init"),
        device_binary(X86_64_MUSL, "k8s-standin"),
    ] {
        if !binary.exists() {
            return Err(BuildError::Missing { binary });
        }
    }
    *built = true;
    Ok(())
}

/// A fixed `SOURCE_DATE_EPOCH` for test images (2026-01-01).
pub const TEST_EPOCH: &str = "1767225600";

/// `basalt build <definition> --out <out>` from the repository root, with the
/// test assets (`BASALT_ASSETS`), the x86_64 init (`BASALT_INIT`) and the
/// Kubernetes stand-in (`BASALT_STANDIN`, which test image definitions name as
/// their Kubernetes binary); returns the `.img` it wrote. Output is logged to
/// `<out>.build.log`.
pub fn build_image(definition: &Path, out: &Path) -> Result<PathBuf, BuildError> {
    let log = out.with_extension("build.log");
    run_logged(
        &format!("basalt build {}", definition.display()),
        Command::new(basalt_binary())
            .current_dir(crate::repo_root())
            .arg("build")
            .arg(definition)
            .arg("--out")
            .arg(out)
            .env("BASALT_ASSETS", crate::assets::Assets::root())
            .env("BASALT_INIT", device_binary(X86_64_MUSL, "init"))
            .env("BASALT_STANDIN", device_binary(X86_64_MUSL, "k8s-standin"))
            .env("SOURCE_DATE_EPOCH", TEST_EPOCH),
        &log,
    )?;
    let mut found = Vec::new();
    let mut images = Vec::new();
    if let Ok(entries) = std::fs::read_dir(out) {
        for e in entries.flatten() {
            let p = e.path();
            found.push(p.display().to_string());
            if p.extension().is_some_and(|x| x == "img") {
                images.push(p);
            }
        }
    }
    images.sort();
    match images.len() {
        1 => Ok(images.remove(0)),
        _ => Err(BuildError::NoImage {
            dir: out.to_path_buf(),
            found,
        }),
    }
}
