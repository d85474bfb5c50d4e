//! `console.emergency_shell` (issue 5, docs/node-config.md): when the boot
//! has failed — here a service that exits with an error and is not restarted —
//! PID 1 offers a root shell on the serial console. The test types into it
//! (QEMU's stdin is the serial line): a command's output proves a working
//! shell with the console as its terminal, and `basaltctl poweroff` from it
//! ends the VM in order.

use anyhow::{Context, Result, ensure};
use basalt_tests::assets::Assets;
use basalt_tests::qemu::{Vm, VmConfig};
use basalt_tests::{build, repo_root, work_dir};
use std::time::Duration;

const DEFINITION: &str = "tests/tests/images/emergency.toml";
const TO_KERNEL: Duration = Duration::from_secs(240);
const STEP: Duration = Duration::from_secs(120);

#[test]
fn a_failed_boot_offers_a_shell_on_the_console() -> Result<()> {
    let assets =
        Assets::locate("amd64").context("the emergency shell test needs the test assets")?;
    let dir = work_dir("emergency_shell")?;
    build::ensure_binaries(&dir)?;
    let img = build::build_image(&repo_root().join(DEFINITION), &dir.join("out"))?;

    let mut cfg = VmConfig::new("emergency", &dir, &img);
    cfg.lifetime = Duration::from_secs(600);
    let mut vm = Vm::start(&cfg, &assets)?;
    vm.expect("basalt: stage1 start", TO_KERNEL)?;
    vm.expect_anywhere("fails-for-good: exiting 3", STEP)?;
    let offered = vm.expect("basalt: emergency shell on /dev/console", STEP)?;
    ensure!(
        offered.contains("service fails-for-good failed"),
        "the offer does not say why: {offered}"
    );
    // Busybox sh reads the console: arithmetic only a shell does.
    vm.type_line("echo shell-says-$((6*7)); tty")?;
    vm.expect_anywhere("shell-says-42", STEP)?;
    vm.expect_anywhere("/dev/console", STEP)?;
    vm.type_line("basaltctl poweroff")?;
    vm.expect("basalt: shutdown complete", STEP)?;
    let st = vm.wait_exit(Duration::from_secs(60))?;
    ensure!(st.success(), "QEMU exited {st}");
    Ok(())
}
