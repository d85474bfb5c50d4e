//! A disk that appears after stage 1 started looking for it (issue 8's device
//! wait), as a USB disk does, or a controller that scans its bus late: the
//! x86_64 test image with the SCSI disk stack in its initramfs
//! (`tests/tests/images/scsi.toml`), its kernel and initramfs given to the
//! firmware directly, and its disk plugged into the VM's virtio-scsi host
//! only once stage 1 says it is waiting. Stage 1 must wait on the kernel's
//! device events and go on when the partitions appear: the console says so,
//! the node boots to Kubernetes, and the data partition on the late disk was
//! grown and is clean.

use anyhow::{Context, Result, ensure};
use basalt_tests::assets::Assets;
use basalt_tests::console::Pattern;
use basalt_tests::qemu::{DiskBus, Vm, VmConfig};
use basalt_tests::report;
use basalt_tests::{build, disk, repo_root, work_dir};
use std::time::Duration;

const DEFINITION: &str = "tests/tests/images/scsi.toml";
const TO_KERNEL: Duration = Duration::from_secs(240);
const STEP: Duration = Duration::from_secs(120);

#[test]
fn a_disk_that_comes_late_is_waited_for() -> Result<()> {
    let assets = Assets::locate("amd64").context("the late disk test needs the test assets")?;
    let dir = work_dir("late_disk_boot")?;
    build::ensure_binaries(&dir)?;
    let img = build::build_image(&repo_root().join(DEFINITION), &dir.join("out"))?;
    disk::set_size(&img, 4 << 30)?;

    // Slot a's kernel, initramfs and options, as systemd-boot would start them.
    let entry = disk::read_from_esp(&img, "loader/entries/basalt-a.conf")?;
    let field = |key: &str| {
        entry
            .lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
            .with_context(|| format!("no {key:?} in slot a's loader entry:\n{entry}"))
    };
    let (kernel, initramfs) = (dir.join("vmlinuz"), dir.join("initramfs"));
    disk::copy_from_esp(&img, field("linux ")?.trim_start_matches('/'), &kernel)?;
    disk::copy_from_esp(&img, field("initrd ")?.trim_start_matches('/'), &initramfs)?;
    let options = field("options ")?;
    ensure!(options.contains("basalt.verity="), "options: {options}");

    let mut cfg = VmConfig::new("scsi", &dir, &img);
    cfg.disk_bus = DiskBus::ScsiHotplug;
    cfg.extra_args = vec![
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        initramfs.display().to_string(),
        "-append".into(),
        options,
    ];
    let mut vm = Vm::start(&cfg, &assets)?;
    vm.expect("basalt: stage1 start", TO_KERNEL)?;
    vm.expect(
        "basalt: waiting for partitions: root-a, data, esp not there yet",
        STEP,
    )?;
    vm.attach_scsi_disk()?;
    vm.expect(Pattern::regex(r"sda: sda1 sda2 sda3 sda4"), STEP)?;
    vm.expect(
        Pattern::regex(r"basalt: partitions appeared after \d+ ms of waiting"),
        STEP,
    )?;
    vm.expect("basalt: stage2 start", STEP)?;
    let line = vm.expect(report::READY_PREFIX, STEP)?;
    let ready = report::parse_ready(&line)?;
    ensure!(
        ready.slot == "a" && ready.hostname == "basalt-scsi" && ready.data_grown,
        "ready report: {line}"
    );
    vm.expect("basalt: shutdown poweroff", STEP)?;
    vm.expect("basalt: shutdown complete", STEP)?;
    let st = vm.wait_exit(Duration::from_secs(60))?;
    ensure!(st.success(), "QEMU exited {st}");
    vm.console.no_init_errors()?;

    // The data filesystem on the late disk, grown at this boot, is clean.
    disk::fsck_ext4(&img, "data")?;
    Ok(())
}
