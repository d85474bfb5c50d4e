//! The QEMU harness itself, on firmware alone: OVMF with a blank disk falls
//! through to its UEFI shell. Checks that a VM starts with the assets' OVMF,
//! that its serial console is read and logged, that `expect` times out
//! instead of hanging, that the monitor works, and that QEMU's exit is seen.

use anyhow::{Context, Result, ensure};
use basalt_tests::assets::Assets;
use basalt_tests::console::{ConsoleError, Pattern};
use basalt_tests::qemu::{QemuError, Vm, VmConfig};
use basalt_tests::{disk, work_dir};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn firmware_boots_and_quits_through_the_monitor() -> Result<()> {
    let assets = Assets::locate("amd64").context("the QEMU tests need the test assets")?;
    let dir = work_dir("harness_firmware")?;
    let img = dir.join("blank.img");
    disk::set_size(&img, 16 << 20)?;
    let mut cfg = VmConfig::new("blank", &dir, &img);
    cfg.lifetime = Duration::from_secs(300);
    let mut vm = Vm::start(&cfg, &assets)?;

    // OVMF finds nothing to boot on the blank disk and starts its shell.
    vm.expect("BdsDxe:", Duration::from_secs(180))?;
    let shell = vm.expect(
        Pattern::regex(r"UEFI Interactive Shell v\d+\.\d+"),
        Duration::from_secs(120),
    )?;
    ensure!(
        !shell.contains('\u{1b}'),
        "escape sequences left in {shell:?}"
    );

    // A line that never comes: a timeout error, promptly, quoting the console.
    let start = Instant::now();
    match vm.expect("basalt: ready", Duration::from_secs(2)) {
        Err(QemuError::Console(ConsoleError::Timeout { tail, .. })) => {
            ensure!(tail.contains("BdsDxe"), "tail lacks earlier lines: {tail}")
        }
        other => anyhow::bail!("expected a timeout, got {other:?}"),
    }
    ensure!(start.elapsed() < Duration::from_secs(10), "timeout overran");

    let status = vm.monitor("info status")?;
    ensure!(status.contains("running"), "monitor said {status:?}");
    vm.monitor("quit")?;
    let st = vm.wait_exit(Duration::from_secs(30))?;
    ensure!(st.success(), "QEMU exited with {st}");

    let log = std::fs::read_to_string(vm.console.log_path())?;
    ensure!(
        log.contains("BdsDxe"),
        "console log {:?} misses lines",
        vm.console.log_path()
    );
    // The fresh variable store copy is per VM.
    ensure!(
        dir.join("blank.vars.fd").exists(),
        "no per-VM OVMF variables"
    );
    Ok(())
}

#[test]
fn a_vm_is_killed_when_dropped() -> Result<()> {
    let assets = Assets::locate("amd64").context("the QEMU tests need the test assets")?;
    let dir = work_dir("harness_drop")?;
    let img = dir.join("blank.img");
    disk::set_size(&img, 16 << 20)?;
    let vm = Vm::start(&VmConfig::new("drop", &dir, &img), &assets)?;
    let pid = vm.pid();
    ensure!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(vm);
    // Reaped by the drop: the pid is gone (or reused by something that is not QEMU).
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    ensure!(!comm.starts_with("qemu"), "QEMU {pid} survived its Vm");
    Ok(())
}

/// The boot chain the images use, assembled here with standard tools from
/// the assets alone (no basalt, no init): a GPT disk whose ESP holds
/// systemd-boot, one loader entry, the Debian kernel and a busybox initramfs
/// that prints its command line and powers off. Checks that OVMF boots
/// systemd-boot from the disk, that the entry's options reach the kernel,
/// and that a guest poweroff ends QEMU with status 0.
#[test]
fn systemd_boot_starts_a_kernel_that_powers_off() -> Result<()> {
    let assets = Assets::locate("amd64").context("the QEMU tests need the test assets")?;
    let dir = work_dir("harness_systemd_boot")?;

    // Initramfs: busybox and a shell /init, as a newc cpio.
    let root = dir.join("initramfs");
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::create_dir_all(root.join("proc"))?;
    std::fs::copy(
        assets.require("busybox", "bin/busybox")?,
        root.join("bin/busybox"),
    )?;
    std::os::unix::fs::symlink("busybox", root.join("bin/sh"))?;
    let init = root.join("init");
    std::fs::write(
        &init,
        "#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n\
         echo \"harness: cmdline $(/bin/busybox cat /proc/cmdline)\"\n/bin/busybox poweroff -f\n",
    )?;
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let initramfs = dir.join("initramfs.cpio");
    let st = Command::new("sh")
        .arg("-c")
        .arg("find . -print0 | cpio --quiet --null -o -H newc -R 0:0 > \"$1\"")
        .arg("sh")
        .arg(&initramfs)
        .current_dir(&root)
        .status()?;
    ensure!(st.success(), "cpio failed: {st}");

    // Disk: GPT with one ESP, FAT made in place.
    let img = dir.join("disk.img");
    disk::set_size(&img, 96 << 20)?;
    let mut sf = Command::new("sfdisk")
        .arg("-q")
        .arg(&img)
        .stdin(Stdio::piped())
        .spawn()?;
    sf.stdin
        .take()
        .context("sfdisk stdin")?
        .write_all(b"label: gpt\nsize=80M, type=U, name=esp\n")?;
    ensure!(sf.wait()?.success(), "sfdisk failed");
    let table = disk::partition_table(&img)?;
    let esp = table.by_name("esp").context("no esp")?;
    let out = Command::new("mkfs.vfat")
        .args([
            "-F",
            "32",
            "-S",
            "512",
            "-s",
            "1",
            "--offset",
            &esp.start.to_string(),
        ])
        .arg(&img)
        .arg((esp.size / 2).to_string())
        .output()?;
    ensure!(out.status.success(), "mkfs.vfat: {out:?}");
    disk::mkdirs_on_esp(&img, "EFI/BOOT")?;
    disk::mkdirs_on_esp(&img, "loader/entries")?;
    disk::mkdirs_on_esp(&img, "a")?;
    disk::put_on_esp(
        &img,
        &assets.require(
            "systemd-boot",
            "usr/lib/systemd/boot/efi/systemd-bootx64.efi",
        )?,
        "EFI/BOOT/BOOTX64.EFI",
    )?;
    disk::write_on_esp(&img, "loader/loader.conf", "timeout 0\neditor no\n")?;
    disk::write_on_esp(
        &img,
        "loader/entries/basalt-a.conf",
        "title Harness (slot a)\nsort-key basalt\nversion 0\nlinux /a/vmlinuz\ninitrd /a/initramfs\n\
         options console=ttyS0,115200 basalt.slot=a panic=-1\n",
    )?;
    disk::put_on_esp(&img, &assets.kernel_image()?, "a/vmlinuz")?;
    disk::put_on_esp(&img, &initramfs, "a/initramfs")?;
    let fsck = Command::new("sh")
        .arg("-c")
        .arg("dd if=\"$1\" of=\"$2\" bs=512 skip=\"$3\" count=\"$4\" status=none && fsck.vfat -n \"$2\"")
        .arg("sh")
        .arg(&img)
        .arg(dir.join("esp.fat"))
        .arg(esp.start.to_string())
        .arg(esp.size.to_string())
        .output()?;
    ensure!(fsck.status.success(), "fsck.vfat: {fsck:?}");

    let mut vm = Vm::start(&VmConfig::new("sdboot", &dir, &img), &assets)?;
    let line = vm.expect("harness: cmdline", Duration::from_secs(240))?;
    ensure!(
        line.contains("basalt.slot=a") && line.contains("console=ttyS0"),
        "the loader entry's options did not reach the kernel: {line}"
    );
    let kernel_said = vm.console.seen("Command line:");
    ensure!(
        kernel_said.iter().any(|l| l.contains("basalt.slot=a")),
        "the kernel did not print its command line on the serial console"
    );
    let st = vm.wait_exit(Duration::from_secs(60))?;
    ensure!(
        st.success(),
        "QEMU exited with {st} after the guest powered off"
    );
    Ok(())
}
