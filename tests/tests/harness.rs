//! The QEMU harness itself, on firmware alone: OVMF with a blank disk falls
//! through to its UEFI shell. Checks that a VM starts with the assets' OVMF,
//! that its serial console is read and logged, that `expect` times out
//! instead of hanging, that the monitor works, and that QEMU's exit is seen.

use anyhow::{Context, Result, ensure};
use basalt_tests::assets::Assets;
use basalt_tests::console::{ConsoleError, Pattern};
use basalt_tests::qemu::{QemuError, Vm, VmConfig};
use basalt_tests::{disk, work_dir};
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
