//! dm-verity at boot (issue 8, docs/verity.md), under QEMU:
//! 1. the test image boots with its root on the verity mapping: the ready
//!    line reports `verity` {device basalt-root-a, corrupted false}, no errors;
//! 2. a copy with one byte of root-a's squashfs flipped (in the 4 KiB block
//!    holding the id table index, which every squashfs mount reads) never
//!    reaches stage 2: the kernel refuses the block and init prints
//!    `basalt: error verity … corruption detected`.

use anyhow::{Context, Result, ensure};
use basalt_tests::assets::Assets;
use basalt_tests::qemu::{Vm, VmConfig};
use basalt_tests::report;
use basalt_tests::{build, disk, repo_root, work_dir};
use std::time::Duration;

const DEFINITION: &str = "tests/images/x86_64.toml";
const TO_KERNEL: Duration = Duration::from_secs(240);
const STEP: Duration = Duration::from_secs(120);

#[test]
fn verity_root_boots_and_corruption_is_never_served() -> Result<()> {
    let assets = Assets::locate("amd64").context("the verity boot test needs the test assets")?;
    let dir = work_dir("verity_boot")?;
    build::ensure_binaries(&dir)?;
    let img = build::build_image(&repo_root().join(DEFINITION), &dir.join("out"))?;

    // 1. Intact image.
    let mut cfg = VmConfig::new("intact", &dir, &img);
    cfg.lifetime = Duration::from_secs(900);
    let mut vm = Vm::start(&cfg, &assets)?;
    vm.expect("basalt: stage1 start", TO_KERNEL)?;
    vm.expect("basalt: stage2 start", STEP)?;
    let line = vm.expect(report::READY_PREFIX, STEP)?;
    let json: serde_json::Value = serde_json::from_str(
        line.split_once(report::READY_PREFIX)
            .map(|(_, j)| j.trim())
            .unwrap_or_default(),
    )
    .with_context(|| format!("ready line {line:?}"))?;
    ensure!(
        json["verity"]["device"] == "basalt-root-a" && json["verity"]["corrupted"] == false,
        "ready line verity: {}",
        json["verity"]
    );
    // The test image has no service that powers it off: stop QEMU here.
    vm.console.drain(Duration::from_secs(3));
    vm.kill();
    vm.console.no_init_errors().context("on an intact image")?;
    drop(vm);

    // 2. One byte flipped in root-a's squashfs, on a copy.
    let bad = dir.join("corrupted.img");
    disk::copy_sparse(&img, &bad)?;
    let off = disk::partition_offset(&bad, "root-a")?;
    {
        // In place: the copy stays sparse (a whole-file rewrite is 1.2 GiB).
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&bad)?;
        let mut sb = [0u8; 56];
        f.read_exact_at(&mut sb, off)?;
        ensure!(&sb[..4] == b"hsqs", "root-a is not a squashfs");
        let id_table = u64::from_le_bytes(sb[48..56].try_into()?);
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, off + id_table)?;
        b[0] ^= 0x01;
        f.write_all_at(&b, off + id_table)?;
        f.sync_all()?;
    }

    let mut cfg = VmConfig::new("corrupted", &dir, &bad);
    cfg.lifetime = Duration::from_secs(600);
    let mut vm = Vm::start(&cfg, &assets)?;
    vm.expect("basalt: stage1 start", TO_KERNEL)?;
    let line = vm.expect("basalt: error verity", STEP)?;
    ensure!(
        line.contains("corruption detected on basalt-root-a"),
        "verity error line: {line}"
    );
    // Give it a moment: stage 2 must never start from a corrupted root.
    vm.console.drain(Duration::from_secs(10));
    ensure!(
        vm.console.seen("basalt: stage2 start").is_empty(),
        "stage 2 started from a corrupted root (log {})",
        vm.console.log_path().display()
    );
    let kernel = vm.console.seen("device-mapper: verity");
    eprintln!("kernel said: {kernel:?}");
    vm.kill();
    Ok(())
}
