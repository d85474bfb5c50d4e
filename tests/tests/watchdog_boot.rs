//! The watchdog (issue 8): stage 2 arms `/dev/watchdog` (softdog on the
//! x86_64 board) and pets it from the supervision loop. When the loop stops
//! petting (`basaltctl debug stop-watchdog`, from a test service once the
//! boot is ready) the machine resets within the timeout: with `-no-reboot`
//! QEMU exits, and init never printed an orderly `basalt: shutdown`.
//!
//! This VM has two CPUs (the others one): stage 1 then loads the board's
//! modules on two threads, each after the ones it depends on
//! (docs/boot-protocol.md, stage 1 step 2), which the boot report shows;
//! a module loaded before one it needs would fail (`Unknown symbol`) and
//! say `basalt: error module`.

use anyhow::{Context, Result, ensure};
use basalt_tests::assets::Assets;
use basalt_tests::qemu::{Vm, VmConfig};
use basalt_tests::report;
use basalt_tests::{build, repo_root, work_dir};
use std::time::{Duration, Instant};

const DEFINITION: &str = "tests/tests/images/watchdog.toml";
const TO_KERNEL: Duration = Duration::from_secs(240);
const STEP: Duration = Duration::from_secs(120);

#[test]
fn a_stalled_supervisor_is_reset_by_the_watchdog() -> Result<()> {
    let assets = Assets::locate("amd64").context("the watchdog test needs the test assets")?;
    let dir = work_dir("watchdog_boot")?;
    build::ensure_binaries(&dir)?;
    let img = build::build_image(&repo_root().join(DEFINITION), &dir.join("out"))?;

    let mut cfg = VmConfig::new("watchdog", &dir, &img);
    cfg.smp = 2;
    cfg.lifetime = Duration::from_secs(900);
    let mut vm = Vm::start(&cfg, &assets)?;
    vm.expect("basalt: stage1 start", TO_KERNEL)?;
    let armed = vm.expect("basalt: watchdog /dev/watchdog armed", STEP)?;
    eprintln!("{armed}");
    vm.expect(report::READY_PREFIX, STEP)?;
    let stopped = vm.expect_anywhere("wd: ok watchdog no longer petted", STEP)?;
    let t = Instant::now();
    eprintln!("{stopped}");
    let st = vm.wait_exit(Duration::from_secs(90))?;
    let took = t.elapsed();
    eprintln!(
        "QEMU exited {st} {} ms after petting stopped",
        took.as_millis()
    );
    ensure!(
        vm.console.seen("basalt: shutdown").is_empty(),
        "init shut down in order: not a watchdog reset (log {})",
        vm.console.log_path().display()
    );
    ensure!(
        took >= Duration::from_secs(5),
        "reset after {} ms, before the 10 s timeout could have run out",
        took.as_millis()
    );
    eprintln!("kernel: {:?}", vm.console.seen("softdog"));
    for l in vm.console.seen("wd-") {
        eprintln!("{l}");
    }
    ensure!(
        !vm.console.seen("wd-boot: Startup finished in").is_empty(),
        "no boot-time report"
    );
    let modules = vm.console.seen("wd-boot:   modules");
    ensure!(
        modules.len() == 1 && modules[0].trim_end().ends_with("(2 threads)"),
        "stage 1 did not load the modules on two threads: {modules:?} (log {})",
        vm.console.log_path().display()
    );
    vm.console.no_init_errors()?;
    Ok(())
}
