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
    #[error(
        "architecture {0:?} is not supported by `basalt run` (x86_64, aarch64 = Raspberry Pi 3 model)"
    )]
    Arch(String),
    #[error("reading the Raspberry Pi boot files out of {image}: {why}")]
    PiBoot { image: PathBuf, why: String },
    #[error("copying {what} for QEMU into {dir}: {source}")]
    Scratch {
        what: String,
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// A file only QEMU's process will hold: created in the temp directory,
/// unlinked at once, its descriptor left open across the exec (QEMU
/// replaces `basalt run`, so nothing would be left to delete it after), and
/// named `/dev/fd/<n>` on QEMU's command line. Filled by `fill(path)`.
fn scratch_file(
    what: &str,
    fill: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<String, RunError> {
    use std::os::fd::IntoRawFd;
    let dir = std::env::temp_dir();
    let err = |source| RunError::Scratch {
        what: what.to_string(),
        dir: dir.clone(),
        source,
    };
    let path = dir.join(format!("basalt-run-{}-{what}", std::process::id()));
    let opened = fill(&path).and_then(|()| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
    });
    let _ = std::fs::remove_file(&path);
    let file = opened.map_err(err)?;
    nix::fcntl::fcntl(
        &file,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .map_err(|e| err(e.into()))?;
    // Open until QEMU exits: the descriptor is QEMU's from the exec on.
    Ok(format!("/dev/fd/{}", file.into_raw_fd()))
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
        "aarch64" | "arm64" | "rpi3" => return pi_command(opts),
        other => return Err(RunError::Arch(other.to_string())),
    }
    let qemu = "qemu-system-x86_64";
    let bin = which(qemu).ok_or(RunError::NoQemu {
        binary: qemu.into(),
        package: "qemu-system-x86",
    })?;
    let (code, vars_template) = find_ovmf(assets)?;
    // The UEFI variable store: the given file (kept, created from the
    // template), or a throw-away copy of the template.
    let vars = match &opts.vars {
        Some(v) => {
            if !v.exists() {
                let _ = std::fs::copy(&vars_template, v);
            }
            v.display().to_string()
        }
        None => scratch_file("OVMF_VARS.fd", |p| {
            std::fs::copy(&vars_template, p).map(drop)
        })?,
    };
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
    c.arg("-drive")
        .arg(format!("if=pflash,format=raw,unit=1,file={vars}"));
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

/// A Raspberry Pi SD image under QEMU's `raspi3b` model. QEMU does not run
/// the Pi firmware: like the firmware, this reads slot a's boot partition (p2)
/// and hands its kernel, DTB, initramfs and `cmdline.txt` to QEMU (read with
/// mtools' `mcopy`). The card is attached as the SD card (its size must be a
/// power of two, as the real model's is); the network is a USB NIC.
fn pi_command(opts: &RunOptions) -> Result<Command, RunError> {
    let bin = which("qemu-system-aarch64").ok_or(RunError::NoQemu {
        binary: "qemu-system-aarch64".into(),
        package: "qemu-system-arm",
    })?;
    let err = |why: String| RunError::PiBoot {
        image: opts.image.clone(),
        why,
    };
    let mut f = std::fs::File::open(&opts.image).map_err(|e| err(e.to_string()))?;
    let mut mbr = [0u8; 512];
    std::io::Read::read_exact(&mut f, &mut mbr).map_err(|e| err(e.to_string()))?;
    let e = &mbr[446 + 16..446 + 32]; // partition 2: slot a's boot FAT
    let start = u64::from(u32::from_le_bytes([e[8], e[9], e[10], e[11]])) * 512;
    if mbr[510..512] != [0x55, 0xAA] || start == 0 {
        return Err(err(
            "no MBR partition 2 (is this a Raspberry Pi image?)".into()
        ));
    }
    let at = format!("{}@@{start}", opts.image.display());
    let mcopy = |name: &str, to: &Path| -> std::io::Result<()> {
        let out = Command::new("mcopy")
            .args(["-n", "-o", "-i", &at, &format!("::{name}")])
            .arg(to)
            .output()
            .map_err(|e| std::io::Error::other(format!("mcopy (Debian package mtools): {e}")))?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    };
    // Handed to QEMU as open files (`scratch_file`): nothing is left behind.
    let get = |name: &str| {
        scratch_file(name, |p| mcopy(name, p)).map_err(|e| match e {
            RunError::Scratch { source, .. } => err(source.to_string()),
            e => e,
        })
    };
    let kernel = get("kernel8.img")?;
    let initramfs = get("initramfs")?;
    let dtb = get("bcm2837-rpi-3-b.dtb")?;
    let cmdline = {
        let tmp =
            std::env::temp_dir().join(format!("basalt-run-{}-cmdline.txt", std::process::id()));
        let read = mcopy("cmdline.txt", &tmp).and_then(|()| std::fs::read_to_string(&tmp));
        let _ = std::fs::remove_file(&tmp);
        read.map_err(|e| err(e.to_string()))?
    };
    let mut c = Command::new(bin);
    c.args([
        "-accel",
        "tcg",
        "-M",
        "raspi3b",
        "-m",
        "1G",
        "-display",
        "none",
        "-nodefaults",
    ]);
    c.args(["-serial", "mon:stdio"]);
    c.arg("-kernel")
        .arg(kernel)
        .arg("-dtb")
        .arg(dtb)
        .arg("-initrd")
        .arg(initramfs);
    c.arg("-append").arg(cmdline.trim());
    c.arg("-drive")
        .arg(format!("file={},if=sd,format=raw", opts.image.display()));
    if !opts.persist {
        c.arg("-snapshot");
    }
    c.args(["-device", "usb-net,netdev=n0"]);
    c.arg("-netdev").arg(format!(
        "user,id=n0,hostfwd=tcp:127.0.0.1:{}-:6443,hostfwd=tcp:127.0.0.1:{}-:22",
        opts.api_port, opts.ssh_port
    ));
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
