//! The node's disk coming and going (issue 8: stage 1's device wait, PID 1
//! surviving bad devices), with the x86_64 test image built with the SCSI
//! disk stack in its initramfs (`tests/tests/images/scsi*.toml`), its kernel
//! and initramfs given to the firmware directly, and its disk plugged into
//! the VM's virtio-scsi host only once stage 1 says it is waiting.
//!
//! - A disk that appears after stage 1 started looking for it, as a USB disk
//!   does, or a controller that scans its bus late: stage 1 must wait on the
//!   kernel's device events and go on when the partitions appear: the
//!   console says so, the node boots to Kubernetes, and the data partition
//!   on the late disk was grown and is clean.
//! - The same disk pulled out under Kubernetes (a USB SSD dropping off the
//!   bus): PID 1, running from RAM, must notice the removal of its root,
//!   data and boot partitions, name them, and reboot the node in order in
//!   bounded time — never hang on the dead disk, never die.

use anyhow::{Context, Result, ensure};
use basalt_tests::assets::Assets;
use basalt_tests::console::Pattern;
use basalt_tests::qemu::{DiskBus, Vm, VmConfig};
use basalt_tests::report::{self, Ready};
use basalt_tests::{build, disk, repo_root, work_dir};
use std::path::PathBuf;
use std::time::Duration;

const TO_KERNEL: Duration = Duration::from_secs(240);
const STEP: Duration = Duration::from_secs(120);

/// Builds `definition`, boots it with its disk unplugged, plugs the disk in
/// when stage 1 waits for it (with `after_a_round`, only once its first
/// 10 s round of waiting ended: a slow disk is said as a warning, not an
/// error) and returns the VM at its ready report.
fn boot_with_late_disk(
    name: &str,
    definition: &str,
    after_a_round: bool,
) -> Result<(Vm, Ready, PathBuf)> {
    let assets = Assets::locate("amd64").context("the late disk tests need the test assets")?;
    let dir = work_dir(name)?;
    build::ensure_binaries(&dir)?;
    let img = build::build_image(&repo_root().join(definition), &dir.join("out"))?;
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

    let mut cfg = VmConfig::new(name, &dir, &img);
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
    if after_a_round {
        vm.expect(
            Pattern::regex(
                r#"basalt: warning wait-devices: partitions \["root-a", "data", "esp"\] did not appear in /sys/class/block within \d+ ms; still waiting"#,
            ),
            STEP,
        )?;
    }
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
        ready.slot == "a" && ready.data_grown,
        "ready report: {line}"
    );
    Ok((vm, ready, img))
}

#[test]
fn a_disk_that_comes_late_is_waited_for() -> Result<()> {
    let (mut vm, ready, img) =
        boot_with_late_disk("late_disk_boot", "tests/tests/images/scsi.toml", true)?;
    ensure!(
        ready.hostname == "basalt-scsi",
        "hostname {}",
        ready.hostname
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

#[test]
fn a_disk_pulled_under_kubernetes_reboots_the_node() -> Result<()> {
    let (mut vm, ready, _img) =
        boot_with_late_disk("disk_pulled", "tests/tests/images/scsi-pull.toml", false)?;
    ensure!(
        ready.hostname == "basalt-scsi-pull",
        "hostname {}",
        ready.hostname
    );
    // Up and supervising: the after-start work (and the watch) is done once
    // the late modules are in.
    vm.expect_anywhere(Pattern::regex(r"basalt: late modules .* loaded"), STEP)?;
    vm.expect_anywhere("basalt: service kubernetes ready", STEP)?;
    vm.console.no_init_errors()?;

    vm.detach_scsi_disk()?;
    // The first of the node's partitions the kernel takes away, named with
    // what it held; the rest are said too while the loop still runs.
    let partition = r"basalt: error storage /dev/sda[124] \((the slot's root|the data partition, /var|the boot partition, /boot)\) was removed: the node cannot run without it";
    vm.expect(Pattern::regex(partition), STEP)?;
    vm.expect("basalt: shutdown reboot", STEP)?;
    vm.expect("basalt: shutdown complete", STEP)?;
    // Bounded: the services' stop timeouts, two seconds of SIGTERM and
    // SIGKILL each, unmounts that fail at once on the dead disk.
    let st = vm.wait_exit(Duration::from_secs(90))?;
    ensure!(st.success(), "QEMU exited {st} (not the guest's reboot)");
    let said = |p: &str| !vm.console.seen(p).is_empty();
    ensure!(
        !said("panicked") && !said("Kernel panic") && !said("Attempted to kill init"),
        "PID 1 did not survive the pulled disk:\n{}",
        vm.console.tail()
    );
    // Each partition once, and one reboot, however many events the dead disk causes.
    let storage = vm.console.seen("basalt: error storage");
    let re = regex_lite::Regex::new(partition)?;
    let parts: Vec<_> = storage.iter().filter(|l| re.is_match(l)).collect();
    let distinct: std::collections::BTreeSet<_> = parts.iter().collect();
    ensure!(
        distinct.len() == parts.len() && storage.len() == parts.len() + 1,
        "storage lines:\n{}",
        storage.join("\n")
    );
    Ok(())
}
