//! `basalt run`: boot an image in QEMU to try it locally, with the serial
//! console attached and host ports forwarded to the node's Kubernetes API
//! (6443) and SSH (22).
//!
//! The image file is never modified: QEMU boots a copy-on-write overlay
//! (`-snapshot`) unless `--persist` is given. Firmware is searched in the
//! places Debian's packages put it and in the test asset cache.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{binary} is not installed: `basalt run` needs QEMU (Debian package {package})")]
    NoQemu {
        binary: String,
        package: &'static str,
    },
    #[error(
        "no UEFI firmware found (looked for {looked}): install Debian's `ovmf` package or set BASALT_OVMF_CODE"
    )]
    NoFirmware { looked: String },
    #[error("image {0} does not exist")]
    NoImage(PathBuf),
    #[error("architecture {0:?} is not supported by `basalt run` yet (x86_64)")]
    Arch(String),
}

/// How to boot.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub image: PathBuf,
    pub arch: String,
    pub memory_mib: u32,
    /// `auto`, `kvm` or `tcg`.
    pub accel: String,
    pub cpus: u32,
    /// Host port forwarded to the node's 6443.
    pub api_port: u16,
    /// Host port forwarded to the node's 22.
    pub ssh_port: u16,
    /// Write to the image instead of a throw-away overlay.
    pub persist: bool,
    /// Where to keep the writable UEFI variable store (a copy of OVMF_VARS).
    pub vars: Option<PathBuf>,
    pub extra: Vec<String>,
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file())
}

/// OVMF code and vars templates: `$BASALT_OVMF_CODE`/`$BASALT_OVMF_VARS`, Debian's
/// paths, then the test asset cache.
pub fn find_ovmf(assets: Option<&Path>) -> Result<(PathBuf, PathBuf), RunError> {
    if let (Some(c), Some(v)) = (
        std::env::var_os("BASALT_OVMF_CODE"),
        std::env::var_os("BASALT_OVMF_VARS"),
    ) {
        return Ok((c.into(), v.into()));
    }
    let mut dirs = vec![PathBuf::from("/usr/share/OVMF")];
    if let Some(a) = assets {
        dirs.push(a.join("amd64/ovmf/usr/share/OVMF"));
    }
    for d in &dirs {
        let (c, v) = (d.join("OVMF_CODE_4M.fd"), d.join("OVMF_VARS_4M.fd"));
        if c.is_file() && v.is_file() {
            return Ok((c, v));
        }
    }
    Err(RunError::NoFirmware {
        looked: dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The QEMU command line for `opts` (not started).
pub fn command(opts: &RunOptions, assets: Option<&Path>) -> Result<Command, RunError> {
    if !opts.image.is_file() {
        return Err(RunError::NoImage(opts.image.clone()));
    }
    match opts.arch.as_str() {
        "x86_64" | "amd64" => {}
        other => return Err(RunError::Arch(other.to_string())),
    }
    let qemu = "qemu-system-x86_64";
    let bin = which(qemu).ok_or(RunError::NoQemu {
        binary: qemu.into(),
        package: "qemu-system-x86",
    })?;
    let (code, vars_template) = find_ovmf(assets)?;
    let vars = opts.vars.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("basalt-run-vars-{}.fd", std::process::id()))
    });
    if !vars.exists() {
        let _ = std::fs::copy(&vars_template, &vars);
    }
    let mut c = Command::new(bin);
    // `auto`: KVM when /dev/kvm can be opened, else software emulation (TCG).
    let kvm = match opts.accel.as_str() {
        "kvm" => true,
        "tcg" => false,
        _ => std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok(),
    };
    if kvm {
        c.args(["-accel", "kvm", "-M", "q35", "-cpu", "host"]);
    } else {
        c.args(["-accel", "tcg", "-M", "q35", "-cpu", "max"]);
    }
    c.args(["-nodefaults", "-display", "none"]);
    c.args([
        "-smp",
        &opts.cpus.to_string(),
        "-m",
        &opts.memory_mib.to_string(),
    ]);
    c.args(["-serial", "mon:stdio"]);
    c.arg("-drive").arg(format!(
        "if=pflash,format=raw,unit=0,readonly=on,file={}",
        code.display()
    ));
    c.arg("-drive").arg(format!(
        "if=pflash,format=raw,unit=1,file={}",
        vars.display()
    ));
    c.arg("-drive").arg(format!(
        "if=virtio,format=raw,file={}",
        opts.image.display()
    ));
    if !opts.persist {
        c.arg("-snapshot");
    }
    c.args(["-device", "virtio-net-pci,netdev=n0"]);
    c.arg("-netdev").arg(format!(
        "user,id=n0,hostfwd=tcp:127.0.0.1:{}-:6443,hostfwd=tcp:127.0.0.1:{}-:22",
        opts.api_port, opts.ssh_port
    ));
    c.args(["-device", "i6300esb"]);
    c.args(&opts.extra);
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_image_and_arch_are_clear_errors() {
        let mut o = RunOptions {
            image: "/nonexistent.img".into(),
            arch: "x86_64".into(),
            memory_mib: 1024,
            accel: "tcg".into(),
            cpus: 1,
            api_port: 6443,
            ssh_port: 2222,
            persist: false,
            vars: None,
            extra: vec![],
        };
        assert!(matches!(command(&o, None), Err(RunError::NoImage(_))));
        o.image = std::env::current_exe().unwrap();
        o.arch = "sparc".into();
        assert!(matches!(command(&o, None), Err(RunError::Arch(_))));
    }
}
