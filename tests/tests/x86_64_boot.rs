//! The x86_64 vertical slice, end to end (issue 2, docs/boot-protocol.md):
//! `basalt build tests/images/x86_64.toml`, a `node.toml` on the ESP, the
//! disk file grown (sparse) to 100 GiB, then two boots under QEMU (TCG, OVMF) of the
//! same disk with the same firmware variables, read from the serial console
//! and checked afterwards on the disk file with independent tools (sfdisk,
//! dumpe2fs, debugfs, e2fsck, unsquashfs, mtools).
//!
//! The test image definition (tests/images/x86_64.toml) must provide:
//! - Kubernetes k3s whose binary `/usr/bin/k3s` is the static `k8s-standin`
//!   (`source = "${BASALT_STANDIN}"`, docs/standin.md);
//! - the two test-only services in `tests/tests/services/`:
//!   `services = ["../tests/services/e2e-probe.toml", "../tests/services/poweroff-when-ready.toml"]`.
//!   `e2e-probe` keeps a marker file under `/var` and prints it and the size of
//!   `/var`; `poweroff-when-ready` runs `basaltctl poweroff` once
//!   `basaltctl status --json` says `"ready":true`, so QEMU ends by itself.

use anyhow::{Context, Result, bail, ensure};
use basalt_tests::assets::Assets;
use basalt_tests::console::Pattern;
use basalt_tests::qemu::{Vm, VmConfig};
use basalt_tests::report::{self, Ready};
use basalt_tests::{build, disk, repo_root, work_dir};
use std::path::Path;
use std::time::Duration;

const DEFINITION: &str = "tests/images/x86_64.toml";
const HOSTNAME: &str = "basalt-e2e-1";
/// A sparse disk file past 64 GiB: the data filesystem's reserved group
/// descriptor blocks (made for a 64 MiB filesystem) cover growth to 64 GiB,
/// beyond it the kernel converts the filesystem to `meta_bg` while growing it
/// online, the path a card or disk of 128 GB and more takes.
const DISK_BYTES: u64 = 100 << 30;
const SECTOR: u64 = 512;
/// Firmware, systemd-boot and the kernel under TCG on a loaded 2-core host.
const TO_KERNEL: Duration = Duration::from_secs(240);
const STEP: Duration = Duration::from_secs(120);
const TO_POWEROFF: Duration = Duration::from_secs(120);
const PID1_RSS_LIMIT_KIB: u64 = 4096;
/// An online ext4 resize may leave out a last, too-small block group (128 MiB with 4 KiB blocks).
const EXT4_SLACK: u64 = 128 << 20;

/// What one boot showed on the console.
struct Boot {
    ready: Ready,
    received: serde_json::Value,
    marker: String,
    marker_found: bool,
    var_kib: u64,
}

fn boot(name: &str, dir: &Path, img: &Path, vars: &Path, assets: &Assets) -> Result<Boot> {
    let mut cfg = VmConfig::new(name, dir, img);
    cfg.vars = Some(vars.to_path_buf());
    cfg.lifetime = Duration::from_secs(900);
    let mut vm = Vm::start(&cfg, assets)?;

    vm.expect("basalt: stage1 start", TO_KERNEL)?;
    // systemd-boot loaded the slot a entry: its options reached the kernel
    // (the kernel prints its command line unless `quiet`; the ready report's
    // slot, which stage 1 reads from /proc/cmdline, is checked either way).
    for cmdline in vm.console.seen("Command line:") {
        ensure!(
            cmdline.contains("basalt.slot=a") && cmdline.contains("console=ttyS0"),
            "kernel command line is not slot a's loader entry: {cmdline}"
        );
    }
    vm.expect("basalt: stage2 start", STEP)?;

    let line = vm.expect(report::RECEIVED_PREFIX, STEP)?;
    let received = report::parse_received(&line)?;
    // The Kubernetes service is named after the distribution or "kubernetes".
    vm.expect(
        Pattern::regex(r"basalt: service (k3s|kubernetes) ready"),
        STEP,
    )?;
    let line = vm.expect(report::READY_PREFIX, STEP)?;
    let ready = report::parse_ready(&line)?;
    // Off the path to Kubernetes, after the first round of service starts:
    // the initramfs' files are deleted (its init binary, ~2 MiB, stays mapped
    // as PID 1's code) and the late modules loaded.
    let line = vm.expect_anywhere(
        Pattern::regex(r"basalt: initramfs files deleted: \d+ KiB"),
        STEP,
    )?;
    let freed_kib: u64 = line
        .split("deleted: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("bad initramfs line {line:?}"))?;
    ensure!(
        freed_kib > 1024,
        "only {freed_kib} KiB of initramfs files deleted: {line}"
    );
    vm.expect_anywhere(
        Pattern::regex(r"basalt: late modules watchdog softdog loaded after the services started: \d+ ms, 0 failed"),
        STEP,
    )?;

    // The probe service runs alongside Kubernetes: its lines may come before the ready line.
    let line = vm.expect_anywhere(Pattern::regex(r"e2e: marker (written|found) \S+"), STEP)?;
    let marker_found = line.contains("marker found");
    let marker = line
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_string();
    let line = vm.expect_anywhere(Pattern::regex(r"e2e: var_kib \d+"), STEP)?;
    let var_kib = line
        .split_whitespace()
        .last()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("bad var_kib line {line:?}"))?;

    vm.expect("basalt: shutdown poweroff", TO_POWEROFF)?;
    vm.expect("basalt: shutdown complete", STEP)?;
    let st = vm.wait_exit(Duration::from_secs(60))?;
    ensure!(
        st.success(),
        "QEMU exited with {st} after poweroff (log {})",
        vm.console.log_path().display()
    );

    vm.console.no_init_errors()?;
    Ok(Boot {
        ready,
        received,
        marker,
        marker_found,
        var_kib,
    })
}

/// Checks common to every boot of the test image.
fn check_ready(b: &Boot) -> Result<()> {
    let r = &b.ready;
    ensure!(r.slot == "a", "booted slot {:?}, expected a", r.slot);
    ensure!(
        r.hostname == HOSTNAME,
        "hostname {:?}, expected {HOSTNAME:?} from node.toml",
        r.hostname
    );
    ensure!(
        r.machine_id.len() == 32 && r.machine_id.chars().all(|c| c.is_ascii_hexdigit()),
        "machine_id {:?} is not 32 hex digits",
        r.machine_id
    );
    ensure!(
        r.kubernetes.distribution == "k3s",
        "kubernetes {:?}",
        r.kubernetes.distribution
    );
    ensure!(r.kubernetes.pid > 1, "kubernetes pid {}", r.kubernetes.pid);
    ensure!(
        r.pid1_rss_kib > 0 && r.pid1_rss_kib <= PID1_RSS_LIMIT_KIB,
        "pid1_rss_kib {} (limit {PID1_RSS_LIMIT_KIB})",
        r.pid1_rss_kib
    );
    let t = &r.timings_ms;
    ensure!(
        0 < t.stage1
            && t.stage1 <= t.stage2
            && t.stage2 <= t.kubernetes_exec
            && t.kubernetes_exec <= t.kubernetes_ready,
        "phase instants out of order: {t:?}"
    );

    // The stand-in was started the way boot-protocol.md says k3s is.
    let rec = &b.received;
    ensure!(rec["standin"] == true, "not the stand-in's record: {rec}");
    ensure!(
        rec["distribution"] == "k3s" && rec["role"] == "server",
        "record: {rec}"
    );
    ensure!(rec["argv"][1] == "server", "argv: {}", rec["argv"]);
    ensure!(
        rec["flags"]["data-dir"] == serde_json::json!(["/var/lib/rancher/k3s"]),
        "data dir flags: {}",
        rec["flags"]
    );
    ensure!(b.var_kib > 0, "no /var size");
    Ok(())
}

#[test]
fn x86_64_image_boots_twice_and_keeps_its_data() -> Result<()> {
    let assets = Assets::locate("amd64").context("the x86_64 boot test needs the test assets")?;
    let dir = work_dir("x86_64_boot")?;
    build::ensure_binaries(&dir)?;
    let img = build::build_image(&repo_root().join(DEFINITION), &dir.join("out"))?;

    // The image as built: four GPT partitions with their names, and the
    // services this test relies on in root-a.
    let table = disk::partition_table(&img)?;
    ensure!(table.label == "gpt", "partition table {:?}", table.label);
    let names: Vec<_> = table
        .partitions
        .iter()
        .filter_map(|p| p.name.clone())
        .collect();
    ensure!(
        names == ["esp", "root-a", "root-b", "data"],
        "partitions {names:?}"
    );
    let built_bytes = std::fs::metadata(&img)?.len();
    ensure!(
        built_bytes < DISK_BYTES,
        "image is {built_bytes} bytes, not smaller than the {DISK_BYTES}-byte disk"
    );
    let root = disk::squashfs_list(&img, "root-a")?;
    for needed in [
        "/usr/lib/basalt/init",
        "/usr/bin/k3s",
        "/etc/basalt/image.toml",
    ] {
        ensure!(
            root.iter().any(|p| p == needed),
            "root-a lacks {needed} (see this test's module docs for what {DEFINITION} must hold)"
        );
    }
    for svc in ["poweroff-when-ready", "e2e-probe"] {
        ensure!(
            root.iter()
                .any(|p| p == &format!("/etc/basalt/services/{svc}.toml")),
            "root-a has no service {svc}: {DEFINITION} must list \
             \"../tests/services/{svc}.toml\" in `services` (see this test's module docs)"
        );
    }
    let loader = disk::list_esp(&img, "loader/entries")?;
    ensure!(
        loader.iter().any(|l| l.ends_with("basalt-a.conf")),
        "ESP loader entries: {loader:?}"
    );

    disk::write_on_esp(&img, "node.toml", &format!("hostname = \"{HOSTNAME}\"\n"))?;
    disk::set_size(&img, DISK_BYTES)?;
    // One variable store for both boots, like a machine's NVRAM.
    let vars = dir.join("vars.fd");
    std::fs::copy(assets.ovmf_vars()?, &vars)?;

    // First boot: grows /var, makes the machine id, writes the marker.
    let first = boot("boot1", &dir, &img, &vars, &assets)?;
    check_ready(&first)?;
    ensure!(
        first.ready.data_grown,
        "first boot did not report data_grown"
    );
    ensure!(
        !first.marker_found,
        "a marker existed before the first boot"
    );

    // On the disk file, with sfdisk and e2fsprogs: the data partition now
    // ends at the disk's last usable LBA, its ext4 fills it and is clean,
    // and the machine id and marker are stored there.
    let table = disk::partition_table(&img)?;
    let data = table
        .by_name("data")
        .context("data partition gone after first boot")?;
    let last_usable = DISK_BYTES / SECTOR - 34;
    ensure!(
        table.lastlba == last_usable,
        "GPT last usable LBA {} after growth, expected {last_usable} (backup header not moved?)",
        table.lastlba
    );
    ensure!(
        data.start + data.size - 1 == last_usable,
        "data partition ends at {}, disk's last usable LBA is {last_usable}",
        data.start + data.size - 1
    );
    let part_bytes = data.size * SECTOR;
    let fs = disk::ext4_facts(&img, "data")?;
    ensure!(
        fs.bytes() <= part_bytes && fs.bytes() + EXT4_SLACK >= part_bytes,
        "ext4 is {} bytes in a {part_bytes}-byte partition",
        fs.bytes()
    );
    ensure!(
        fs.features.split(' ').any(|f| f == "meta_bg"),
        "grown past 64 GiB without meta_bg: {}",
        fs.features
    );
    // The grown filesystem keeps the inode density the builder chose for it
    // (one 256-byte inode per 16 KiB, imagebuild/src/data.rs), not the one
    // mke2fs picks for a 64 MiB filesystem (which doubled it).
    // Every 128 MiB block group has 8192 inodes, the last one too.
    let groups = fs.bytes().div_ceil(128 << 20);
    ensure!(
        fs.inode_size == 256 && fs.inode_count == groups * 8192,
        "grown data filesystem: {} inodes of {} bytes in {} bytes ({groups} groups; \
         want 8192 inodes of 256 bytes per 128 MiB group)",
        fs.inode_count,
        fs.inode_size,
        fs.bytes()
    );
    disk::fsck_ext4(&img, "data")?;
    let mid = disk::read_from_ext4(&img, "data", "/lib/basalt/machine-id")?;
    ensure!(
        String::from_utf8_lossy(&mid).trim() == first.ready.machine_id,
        "machine-id on disk {:?} differs from the ready report's {:?}",
        String::from_utf8_lossy(&mid),
        first.ready.machine_id
    );
    let marker = disk::read_from_ext4(&img, "data", "/lib/basalt-e2e/marker")?;
    ensure!(
        String::from_utf8_lossy(&marker).trim() == first.marker,
        "marker on disk {:?}, console said {:?}",
        String::from_utf8_lossy(&marker),
        first.marker
    );
    // What the guest saw as /var is the grown filesystem.
    ensure!(
        first.var_kib * 1024 * 10 >= fs.bytes() * 9,
        "guest saw /var as {} KiB, the filesystem is {} bytes",
        first.var_kib,
        fs.bytes()
    );

    // Second boot of the same disk: nothing to grow, same identity, data kept.
    let second = boot("boot2", &dir, &img, &vars, &assets)?;
    check_ready(&second)?;
    ensure!(!second.ready.data_grown, "second boot grew /var again");
    ensure!(
        second.ready.machine_id == first.ready.machine_id,
        "machine id changed: {} then {}",
        first.ready.machine_id,
        second.ready.machine_id
    );
    if !second.marker_found || second.marker != first.marker {
        bail!(
            "marker from the first boot not intact: first {:?}, second found={} {:?}",
            first.marker,
            second.marker_found,
            second.marker
        );
    }
    ensure!(
        second.var_kib == first.var_kib,
        "/var size changed between boots: {} KiB then {} KiB",
        first.var_kib,
        second.var_kib
    );
    let fs2 = disk::ext4_facts(&img, "data")?;
    ensure!(
        fs2 == fs,
        "data filesystem changed size on the second boot: {fs:?} then {fs2:?}"
    );
    disk::fsck_ext4(&img, "data")?;
    Ok(())
}
