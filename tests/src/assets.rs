//! The test assets: Debian packages unpacked by `tests/assets/fetch` into
//! `$BASALT_ASSETS/<arch>/<role>/` (default `<repo>/.cache/assets`). This
//! module only finds them; a missing asset is an error that says how to fetch it.

use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum AssetsError {
    #[error(
        "test asset {role} ({arch}) is missing: {path} does not exist. Run `tests/assets/fetch {arch}` \
         (assets dir {root}; set BASALT_ASSETS to use another)"
    )]
    Missing {
        role: String,
        arch: String,
        path: PathBuf,
        root: PathBuf,
    },
}

/// Roles fetched for every arch; each directory carries a `.stamp`.
pub const ROLES: [&str; 4] = ["kernel", "busybox", "systemd-boot", "ovmf"];

/// The assets directory of one architecture (`amd64`, `arm64`, `armhf`).
#[derive(Debug, Clone)]
pub struct Assets {
    pub root: PathBuf,
    pub arch: String,
}

impl Assets {
    /// `BASALT_ASSETS`, else `<repo>/.cache/assets`.
    pub fn root() -> PathBuf {
        std::env::var_os("BASALT_ASSETS")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::repo_root().join(".cache/assets"))
    }

    /// Finds the assets for `arch`, checking that each role was fetched.
    pub fn locate(arch: &str) -> Result<Assets, AssetsError> {
        let a = Assets {
            root: Self::root(),
            arch: arch.to_string(),
        };
        for role in ROLES {
            if arch != "amd64" && (role == "ovmf" || role == "systemd-boot") {
                continue;
            }
            a.require(role, ".stamp")?;
        }
        Ok(a)
    }

    /// `<root>/<arch>/<role>`.
    pub fn dir(&self, role: &str) -> PathBuf {
        self.root.join(&self.arch).join(role)
    }

    /// A file inside a role's directory, which must exist.
    pub fn require(&self, role: &str, rel: &str) -> Result<PathBuf, AssetsError> {
        let path = self.dir(role).join(rel);
        if path.exists() {
            Ok(path)
        } else {
            Err(self.missing(role, path))
        }
    }

    fn missing(&self, role: &str, path: PathBuf) -> AssetsError {
        AssetsError::Missing {
            role: role.to_string(),
            arch: self.arch.clone(),
            path,
            root: self.root.clone(),
        }
    }

    /// OVMF firmware code (read-only pflash).
    pub fn ovmf_code(&self) -> Result<PathBuf, AssetsError> {
        self.require("ovmf", "usr/share/OVMF/OVMF_CODE_4M.fd")
    }

    /// OVMF variable store template; copy it per VM (see `qemu::Vm`).
    pub fn ovmf_vars(&self) -> Result<PathBuf, AssetsError> {
        self.require("ovmf", "usr/share/OVMF/OVMF_VARS_4M.fd")
    }

    /// The kernel image from the kernel package (`boot/vmlinuz-*`).
    pub fn kernel_image(&self) -> Result<PathBuf, AssetsError> {
        let boot = self.dir("kernel").join("boot");
        first_matching(&boot, "vmlinuz-")
            .ok_or_else(|| self.missing("kernel", boot.join("vmlinuz-*")))
    }
}

fn first_matching(dir: &Path, prefix: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    found.sort();
    found.pop()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_assets_say_how_to_fetch() {
        let a = Assets {
            root: PathBuf::from("/nonexistent/assets"),
            arch: "amd64".into(),
        };
        let e = a.ovmf_code().unwrap_err().to_string();
        assert!(e.contains("tests/assets/fetch amd64"), "{e}");
        assert!(
            e.contains("/nonexistent/assets/amd64/ovmf/usr/share/OVMF/OVMF_CODE_4M.fd"),
            "{e}"
        );
    }
}
