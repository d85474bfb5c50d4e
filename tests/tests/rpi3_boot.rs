//! Raspberry Pi end to end (issue 4), 64-bit and 32-bit: `basalt build
//! tests/images/<board>.toml` with init and the Kubernetes stand-in built for
//! the board's architecture, then QEMU with the kernel, DTB, initramfs and
//! command line read out of the image's slot-a boot partition (p2) with mtools:
//! the image's own files are what boots.
//! - `rpi3` (aarch64-unknown-linux-musl, stable toolchain) under
//!   `qemu-system-aarch64 -M raspi3b`; then `basalt run --arch aarch64` boots the
//!   untouched image the same way.
//! - `rpi-armv7` (32-bit ARMv7 hard-float: armv7-unknown-linux-musleabihf built
//!   by `scripts/build-init armv7`, nightly `-Zbuild-std`) under
//!   `qemu-system-arm -M raspi2b`.
//!
//! QEMU does not emulate the Pi firmware (config.txt, autoboot.txt, tryboot):
//! that side is checked by the firmware model in init/src/rpi.rs and the
//! structural tests in imagebuild/tests/build_rpi.rs.
//!
//! Asserted from the serial console: stage 1 → stage 2 → stand-in received and
//! ready → `basalt: ready` on slot a with the image's hostname, the data
//! partition grown (MBR: extended p4 and logical p7), no `basalt: error` →
//! clean poweroff; then on the disk file, with sfdisk, that p7 reaches the end
//! of the SD card.

use anyhow::{Context, Result, ensure};
use basalt_tests::console::Console;
use basalt_tests::{build, disk, repo_root, report, work_dir};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const TARGET: &str = "aarch64-unknown-linux-musl";
const ARMV7_TARGET: &str = "armv7-unknown-linux-musleabihf";
const STEP: Duration = Duration::from_secs(180);

struct Qemu(Child);
impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// init and the stand-in for armv7 (static musl through nightly -Zbuild-std),
/// by the script users run (docs/raspberry-pi.md).
fn build_armv7_binaries(log_dir: &Path) -> Result<(PathBuf, PathBuf)> {
    build::run_logged(
        "scripts/build-init armv7 (init, k8s-standin for armv7 musl)",
        Command::new(repo_root().join("scripts/build-init"))
            .current_dir(repo_root())
            .env("BASALT_BUILD_STANDIN", "1")
            .env("BASALT_ARMV7", "musl")
            .args(["armv7", "--check"]),
        &log_dir.join("build-init-armv7.log"),
    )?;
    Ok((
        build::device_binary(ARMV7_TARGET, "init"),
        build::device_binary(ARMV7_TARGET, "k8s-standin"),
    ))
}

/// init and the stand-in for aarch64 (static musl, linked by rust-lld).
fn build_device_binaries(log_dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    build::run_logged(
        "cargo build (init, k8s-standin for aarch64 musl)",
        Command::new(cargo)
            .current_dir(repo_root())
            .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER", "rust-lld")
            .args([
                "build",
                "--release",
                "--target",
                TARGET,
                "-p",
                "basalt-init",
                "-p",
                "k8s-standin",
            ]),
        &log_dir.join("cargo-aarch64.log"),
    )?;
    Ok((
        build::device_binary(TARGET, "init"),
        build::device_binary(TARGET, "k8s-standin"),
    ))
}

fn mcopy_out(img: &Path, offset: u64, name: &str, to: &Path) -> Result<()> {
    let st = Command::new("mcopy")
        .args(["-n", "-o", "-i"])
        .arg(format!("{}@@{offset}", img.display()))
        .arg(format!("::{name}"))
        .arg(to)
        .status()
        .context("mcopy (mtools)")?;
    ensure!(
        st.success(),
        "mcopy ::{name} out of the slot-a boot partition failed"
    );
    Ok(())
}

/// One board's QEMU boot.
struct Pi {
    /// `tests/images/<def>.toml` (its `name` is `basalt-<def>-test`).
    def: &'static str,
    /// Extra environment for `basalt build`.
    env: Vec<(&'static str, PathBuf)>,
    qemu: &'static str,
    machine: &'static str,
    kernel: &'static str,
    dtb: &'static str,
}

/// Build `tests/images/<board>.toml` with `init`/`standin`, boot it to ready and
/// poweroff, check the grown card. Returns the work dir and the built image.
fn boot_pi(pi: &Pi, dir: &Path, init: &Path, standin: &Path) -> Result<PathBuf> {
    let out = dir.join("out");
    let log = dir.join("build.log");
    let def = format!("tests/images/{}.toml", pi.def);
    build::run_logged(
        &format!("basalt build {def}"),
        Command::new(build::basalt_binary())
            .current_dir(repo_root())
            .args(["build", &def, "--raw-only", "--out"])
            .arg(&out)
            .env("BASALT_ASSETS", basalt_tests::assets::Assets::root())
            .env("BASALT_INIT", init)
            .env("BASALT_STANDIN", standin)
            .env("XDG_CACHE_HOME", dir.join("cache"))
            .envs(pi.env.iter().map(|(k, v)| (*k, v.as_os_str()))),
        &log,
    )?;
    let img = out.join(format!("basalt-{}-test.img", pi.def));
    let table = disk::partition_table(&img)?;
    let p2 = table.partitions.get(1).context("no partition 2")?;
    let off = table.offset(p2);
    for f in [pi.kernel, "initramfs", pi.dtb, "cmdline.txt"] {
        mcopy_out(&img, off, f, &dir.join(f))?;
    }
    let cmdline = std::fs::read_to_string(dir.join("cmdline.txt"))?;
    ensure!(
        !cmdline.trim_end().contains('\n'),
        "cmdline.txt is not one line: {cmdline:?}"
    );
    ensure!(
        cmdline.contains("basalt.slot=a") && cmdline.contains("basalt.root=5"),
        "{cmdline}"
    );

    let sd = dir.join("sd.img");
    disk::copy_sparse(&img, &sd)?;
    let mut child = Qemu(
        Command::new(pi.qemu)
            .args([
                "-accel",
                "tcg",
                "-M",
                pi.machine,
                "-m",
                "1G",
                "-display",
                "none",
                "-nodefaults",
            ])
            .args(["-serial", "stdio", "-no-reboot"])
            .arg("-kernel")
            .arg(dir.join(pi.kernel))
            .arg("-dtb")
            .arg(dir.join(pi.dtb))
            .arg("-initrd")
            .arg(dir.join("initramfs"))
            .arg("-append")
            .arg(cmdline.trim())
            .arg("-drive")
            .arg(format!("file={},if=sd,format=raw", sd.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} (Debian package qemu-system-arm)", pi.qemu))?,
    );
    let stdout = child.0.stdout.take().context("no console")?;
    let mut console = Console::spawn(stdout, &dir.join("console.log"))?;
    console.expect("basalt: stage1 start", STEP)?;
    console.expect("basalt: stage2 start", STEP)?;
    console.expect_anywhere(report::RECEIVED_PREFIX, STEP)?;
    let line = console.expect(report::READY_PREFIX, STEP)?;
    let ready = report::parse_ready(&line)?;
    ensure!(ready.slot == "a", "booted slot {}", ready.slot);
    ensure!(
        ready.hostname == format!("basalt-{}-test", pi.def),
        "hostname {}",
        ready.hostname
    );
    ensure!(ready.kubernetes.distribution == "k3s", "{line}");
    ensure!(
        ready.data_grown,
        "the data partition was not grown on first boot: {line}"
    );
    ensure!(
        ready.pid1_rss_kib <= 4096,
        "PID 1 RSS {} KiB",
        ready.pid1_rss_kib
    );
    console.expect("basalt: shutdown poweroff", STEP)?;
    console.expect("basalt: shutdown complete", STEP)?;
    console.no_init_errors()?;
    let status = loop {
        if let Some(st) = child.0.try_wait()? {
            break st;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(status.success(), "QEMU exited with {status}");

    // sfdisk (not our code): p7 and the extended p4 now end at the card's end.
    let table = disk::partition_table(&sd)?;
    let sectors = std::fs::metadata(&sd)?.len() / 512;
    let p7 = table.partitions.get(6).context("no partition 7")?;
    let end = p7.start + p7.size;
    ensure!(
        end == sectors,
        "p7 ends at sector {end}, the card has {sectors}"
    );
    Ok(img)
}

#[test]
fn rpi3_image_boots_to_ready_under_qemu_raspi3b() -> Result<()> {
    let dir = work_dir("rpi3_boot")?;
    build::ensure_binaries(&dir)?; // basalt itself
    let (init, standin) = build_device_binaries(&dir)?;
    let pi = Pi {
        def: "rpi3",
        env: Vec::new(),
        qemu: "qemu-system-aarch64",
        machine: "raspi3b",
        kernel: "kernel8.img",
        dtb: "bcm2837-rpi-3-b.dtb",
    };
    let img = boot_pi(&pi, &dir, &init, &standin)?;

    // `basalt run --arch aarch64` (issue 7) boots the same, untouched image the
    // same way (its own p2 files, raspi3b), to ready and its own poweroff.
    let before = std::fs::read(&img)?;
    let port = || -> Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let tmp = dir.join("run-tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let mut run = Qemu(
        Command::new(build::basalt_binary())
            .env("TMPDIR", &tmp)
            .args(["run", "--arch", "aarch64"])
            .arg(&img)
            .args([
                "--api-port",
                &port()?.to_string(),
                "--ssh-port",
                &port()?.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting basalt run --arch aarch64")?,
    );
    let stdout = run.0.stdout.take().context("no console")?;
    let mut console = Console::spawn(stdout, &dir.join("basalt-run-console.log"))?;
    let line = console.expect(report::READY_PREFIX, STEP)?;
    ensure!(report::parse_ready(&line)?.slot == "a", "{line}");
    console.expect("basalt: shutdown complete", STEP)?;
    let status = loop {
        if let Some(st) = run.0.try_wait()? {
            break st;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(status.success(), "basalt run exited with {status}");
    ensure!(
        std::fs::read(&img)? == before,
        "basalt run (snapshot) changed the image"
    );
    // Kernel, DTB and initramfs went to QEMU as open, unlinked files.
    let kept: Vec<_> = std::fs::read_dir(&tmp)?
        .flatten()
        .map(|e| e.path())
        .collect();
    ensure!(kept.is_empty(), "basalt run left files behind: {kept:?}");
    Ok(())
}

/// 32-bit ARMv7 (issue 4): Basalt's own init, cross-built with the script users
/// run, boots the rpi-armv7 image to ready under QEMU's Raspberry Pi 2B.
#[test]
fn rpi_armv7_image_boots_to_ready_under_qemu_raspi2b() -> Result<()> {
    let dir = work_dir("rpi_armv7_boot")?;
    build::ensure_binaries(&dir)?; // basalt itself
    let (init, standin) = build_armv7_binaries(&dir)?;
    let pi = Pi {
        def: "rpi-armv7",
        env: Vec::new(),
        qemu: "qemu-system-arm",
        machine: "raspi2b",
        kernel: "kernel7.img",
        dtb: "bcm2836-rpi-2-b.dtb",
    };
    boot_pi(&pi, &dir, &init, &standin)?;
    Ok(())
}

/// The rpi3 image with kernel and firmware from Alpine-style packages
/// (`linux-rpi`, `raspberrypi-bootloader`) in a local signed aarch64 repository
/// made with independent tools (tests/alpine/make-trees, make-repo), boots to
/// ready: the board's own package paths (boot/vmlinuz-rpi, DTBs and firmware
/// in boot/) work end to end.
#[test]
fn rpi3_image_from_alpine_packages_boots_to_ready() -> Result<()> {
    let dir = work_dir("rpi3_apk_boot")?;
    build::ensure_binaries(&dir)?;
    let (init, standin) = build_device_binaries(&dir)?;
    let (trees, repo) = (dir.join("trees"), dir.join("repo"));
    build::run_logged(
        "tests/alpine/make-trees (aarch64, with kernel)",
        Command::new(repo_root().join("tests/alpine/make-trees"))
            .arg(&trees)
            .arg("--with-kernel")
            .env("ALPINE_ARCH", "aarch64")
            .env("BASALT_ASSETS", basalt_tests::assets::Assets::root()),
        &dir.join("make-trees.log"),
    )?;
    for pkg in ["linux-rpi", "raspberrypi-bootloader"] {
        ensure!(
            trees.join(pkg).is_dir(),
            "make-trees made no {pkg} (arm64 test assets missing?)"
        );
    }
    build::run_logged(
        "tests/alpine/make-repo (aarch64)",
        Command::new(repo_root().join("tests/alpine/make-repo"))
            .arg(&trees)
            .arg(&repo)
            .arg("aarch64"),
        &dir.join("make-repo.log"),
    )?;
    let pi = Pi {
        def: "rpi3-apk",
        env: vec![("BASALT_TEST_REPO", repo)],
        qemu: "qemu-system-aarch64",
        machine: "raspi3b",
        kernel: "kernel8.img",
        dtb: "bcm2837-rpi-3-b.dtb",
    };
    let img = boot_pi(&pi, &dir, &init, &standin)?;
    // The slot's kernel is linux-rpi's boot/vmlinuz-rpi, byte for byte.
    let table = disk::partition_table(&img)?;
    let p2 = table.partitions.get(1).context("no partition 2")?;
    mcopy_out(&img, table.offset(p2), "start.elf", &dir.join("start.elf"))?;
    ensure!(
        std::fs::read(dir.join("kernel8.img"))?
            == std::fs::read(trees.join("linux-rpi/root/boot/vmlinuz-rpi"))?,
        "kernel8.img is not linux-rpi's boot/vmlinuz-rpi"
    );
    ensure!(
        std::fs::read(dir.join("start.elf"))?
            == std::fs::read(trees.join("raspberrypi-bootloader/root/boot/start.elf"))?,
        "start.elf is not raspberrypi-bootloader's"
    );
    Ok(())
}
