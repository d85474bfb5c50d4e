//! QEMU boots of the Raspberry Pi SD images built by `basalt build`: `rpi3` under
//! `qemu-system-aarch64 -M raspi3b`, `rpi-armv7` under `qemu-system-arm -M raspi2b`.
//! Kernel, DTB, initramfs and command line are read out of the image's slot a boot
//! partition (p2) with mtools; QEMU does not run the Pi firmware (QEMU.md), so
//! `config.txt` and `autoboot.txt` are not exercised here (build_rpi.rs checks them
//! against init's firmware model).
//!
//! PID 1 is a STAND-IN (tests/rpi-probe/probe.rs, built here with plain rustc),
//! not Basalt's init: it loads the modules the builder put in the initramfs, waits
//! for the SD card's 7 partitions, mounts p1/p2 (vfat), p5 (squashfs) and p7
//! (ext4) read-only and powers off. What this proves: the image's kernel + DTB +
//! initramfs start, the board's module list brings up the SD card and the
//! filesystems, the kernel reads the builder's MBR/EBR chain as p1..p7, and
//! `bcm2835_wdt` makes poweroff end QEMU. Not proved: anything of init.
//!
//! Runs QEMU (30–60 s each under TCG), so it is ignored by default:
//! `cargo test -p basalt-imagebuild --test qemu_rpi -- --ignored`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

struct Case {
    board: &'static str,
    arch: &'static str,
    /// rustc arguments that make a static binary for the board.
    rustc: &'static [&'static str],
    qemu: &'static str,
    machine: &'static str,
    kernel: &'static str,
    dtb: &'static str,
    modules: usize,
}

fn boot(c: &Case) {
    let assets = std::env::var_os("BASALT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".cache/assets"));
    let busybox = assets.join(c.arch).join("busybox/bin/busybox");
    if !busybox.is_file() {
        println!("SKIPPED: no {} test assets in {}", c.arch, assets.display());
        return;
    }
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("qemu_rpi")
        .join(c.board);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();

    let probe = work.join("probe");
    run(
        Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
            .args(["--edition", "2024", "-O", "-C", "panic=abort"])
            .args(c.rustc)
            .arg(repo().join("imagebuild/tests/rpi-probe/probe.rs"))
            .arg("-o")
            .arg(&probe),
    );

    run(Command::new(env!("CARGO_BIN_EXE_basalt"))
        .arg("build")
        .arg(repo().join(format!("tests/images/{}.toml", c.board)))
        .arg("--out")
        .arg(&work)
        .env("BASALT_ASSETS", &assets)
        .env("BASALT_STANDIN", &busybox)
        .env("BASALT_INIT", &probe)
        .env_remove("SOURCE_DATE_EPOCH"));
    let img = work.join(format!("basalt-{}-test.img", c.board));

    // p2's offset from the partition table, then its files with mtools.
    let dump = String::from_utf8(run(Command::new("sfdisk").arg("-d").arg(&img)).stdout).unwrap();
    let p2 = dump
        .lines()
        .find(|l| l.contains("img2 : "))
        .and_then(|l| l.split("start=").nth(1))
        .and_then(|s| s.split(',').next())
        .map(|s| s.trim().parse::<u64>().unwrap())
        .unwrap();
    let fat = format!("{}@@{}", img.display(), p2 * 512);
    for f in [c.kernel, c.dtb, "initramfs", "cmdline.txt"] {
        run(Command::new("mcopy")
            .args(["-n", "-i", &fat])
            .arg(format!("::/{f}"))
            .arg(work.join(f)));
    }
    let cmdline = std::fs::read_to_string(work.join("cmdline.txt")).unwrap();

    let child = Command::new(c.qemu)
        .args(["-accel", "tcg", "-M", c.machine, "-m", "1G"])
        .args(["-display", "none", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(work.join(c.kernel))
        .arg("-dtb")
        .arg(work.join(c.dtb))
        .arg("-initrd")
        .arg(work.join("initramfs"))
        .arg("-append")
        .arg(cmdline.trim())
        .arg("-drive")
        .arg(format!("file={},if=sd,format=raw", img.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", c.qemu));
    // A watchdog for the test: kill QEMU if it has not powered off in 5 minutes.
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let guard = std::thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(300)).is_err() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    });
    let out = child.wait_with_output().unwrap();
    let _ = tx.send(());
    let _ = guard.join();
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    std::fs::write(work.join("console.log"), &console).unwrap();
    let has = |s: &str| console.lines().any(|l| l.contains(s));
    let want = [
        format!("probe: modules loaded {0}/{0}", c.modules),
        "probe: block mmcblk0 mmcblk0p1 mmcblk0p2 mmcblk0p3 mmcblk0p4 mmcblk0p5 mmcblk0p6 mmcblk0p7".into(),
        "probe: part mmcblk0p5 partn=5".into(),
        "probe: autoboot.txt \"[all]\\ntryboot_a_b=1\\nboot_partition=2\\n[tryboot]\\nboot_partition=3\\n\"".into(),
        "probe: mounted /dev/mmcblk0p2 vfat: cmdline.txt".into(),
        "probe: mounted /dev/mmcblk0p5 squashfs: usr/lib/basalt/init".into(),
        "probe: mounted /dev/mmcblk0p7 ext4: lost+found".into(),
        format!("probe: cmdline {}", cmdline.trim()),
        "probe: poweroff".into(),
    ];
    for w in &want {
        assert!(
            has(w),
            "{}: no line {w:?} in the console:\n{console}",
            c.board
        );
    }
    assert!(
        out.status.success(),
        "{} exited {} (killed by the test's timeout?)",
        c.qemu,
        out.status
    );
}

#[test]
#[ignore = "boots QEMU (about a minute); run with --ignored"]
fn rpi3_boots_under_raspi3b() {
    boot(&Case {
        board: "rpi3",
        arch: "arm64",
        rustc: &[
            "--target",
            "aarch64-unknown-linux-musl",
            "-C",
            "linker=rust-lld",
        ],
        qemu: "qemu-system-aarch64",
        machine: "raspi3b",
        kernel: "kernel8.img",
        dtb: "bcm2837-rpi-3-b.dtb",
        modules: 17,
    });
}

#[test]
#[ignore = "boots QEMU (about a minute); run with --ignored"]
fn rpi_armv7_boots_under_raspi2b() {
    boot(&Case {
        board: "rpi-armv7",
        arch: "armhf",
        // No prebuilt std for armv7 musl here (docs/raspberry-pi.md): static glibc.
        rustc: &[
            "--target",
            "armv7-unknown-linux-gnueabihf",
            "-C",
            "target-feature=+crt-static",
            "-C",
            "linker=arm-linux-gnueabihf-gcc",
        ],
        qemu: "qemu-system-arm",
        machine: "raspi2b",
        kernel: "kernel7.img",
        dtb: "bcm2836-rpi-2-b.dtb",
        modules: 19,
    });
}
