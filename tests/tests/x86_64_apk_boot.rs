//! The x86_64 image whose root comes from Alpine packages boots to
//! `basalt: ready` (issue 3): tests/alpine/make-trees --with-kernel and
//! tests/alpine/make-repo build a local *signed* apk repository from the
//! Debian test assets (kernel and modules as `linux-virt`, busybox-static,
//! systemd-boot's EFI binary); `basalt build tests/images/x86_64-apk.toml`
//! makes the image from it (no overlays); QEMU (TCG, OVMF) boots it once.
//! The Kubernetes binary is the stand-in (`kubernetes.source`), not k3s.

use anyhow::{Context, Result, ensure};
use basalt_tests::assets::Assets;
use basalt_tests::console::Pattern;
use basalt_tests::qemu::{Vm, VmConfig};
use basalt_tests::{build, disk, repo_root, report, work_dir};
use std::process::Command;
use std::time::Duration;

const DEFINITION: &str = "tests/images/x86_64-apk.toml";
const HOSTNAME: &str = "basalt-apk-1";
const DISK_BYTES: u64 = 2 << 30;
const TO_KERNEL: Duration = Duration::from_secs(240);
const STEP: Duration = Duration::from_secs(120);

#[test]
fn x86_64_apk_image_boots_to_ready() -> Result<()> {
    let assets = Assets::locate("amd64").context("the apk boot test needs the test assets")?;
    let dir = work_dir("x86_64_apk_boot")?;
    build::ensure_binaries(&dir)?;

    let (trees, repo) = (dir.join("trees"), dir.join("repo"));
    let _ = std::fs::remove_dir_all(&trees);
    build::run_logged(
        "tests/alpine/make-trees",
        Command::new(repo_root().join("tests/alpine/make-trees"))
            .arg(&trees)
            .arg("--with-kernel")
            .env("BASALT_ASSETS", Assets::root()),
        &dir.join("make-trees.log"),
    )?;
    build::run_logged(
        "tests/alpine/make-repo",
        Command::new(repo_root().join("tests/alpine/make-repo"))
            .arg(&trees)
            .arg(&repo),
        &dir.join("make-repo.log"),
    )?;

    let out = dir.join("out");
    let _ = std::fs::remove_dir_all(&out);
    build::run_logged(
        &format!("basalt build {DEFINITION}"),
        Command::new(build::basalt_binary())
            .current_dir(repo_root())
            .arg("build")
            .arg(DEFINITION)
            .arg("--out")
            .arg(&out)
            .arg("--raw-only")
            .env("BASALT_TEST_REPO", &repo)
            .env("XDG_CACHE_HOME", dir.join("cache"))
            .env(
                "BASALT_INIT",
                build::device_binary("x86_64-unknown-linux-musl", "init"),
            )
            .env(
                "BASALT_STANDIN",
                build::device_binary("x86_64-unknown-linux-musl", "k8s-standin"),
            )
            .env("SOURCE_DATE_EPOCH", build::TEST_EPOCH),
        &dir.join("build.log"),
    )?;
    let img = out.join("basalt-x86_64-apk-test.img");

    let root = disk::squashfs_list(&img, "root-a")?;
    for needed in [
        "/lib/apk/db/installed",
        "/bin/busybox",
        "/usr/lib/systemd/boot/efi/systemd-bootx64.efi",
        "/usr/bin/k3s",
    ] {
        ensure!(
            root.iter().any(|p| p == needed),
            "root-a lacks {needed} (packages not installed?)"
        );
    }

    disk::write_on_esp(&img, "node.toml", &format!("hostname = \"{HOSTNAME}\"\n"))?;
    disk::set_size(&img, DISK_BYTES)?;
    let vars = dir.join("vars.fd");
    std::fs::copy(assets.ovmf_vars()?, &vars)?;

    let mut cfg = VmConfig::new("apk-boot", &dir, &img);
    cfg.vars = Some(vars);
    cfg.lifetime = Duration::from_secs(900);
    let mut vm = Vm::start(&cfg, &assets)?;
    vm.expect("basalt: stage1 start", TO_KERNEL)?;
    vm.expect("basalt: stage2 start", STEP)?;
    vm.expect(
        Pattern::regex(r"basalt: service (k3s|kubernetes) ready"),
        STEP,
    )?;
    let line = vm.expect(report::READY_PREFIX, STEP)?;
    let ready = report::parse_ready(&line)?;
    ensure!(ready.slot == "a", "booted slot {:?}", ready.slot);
    ensure!(ready.hostname == HOSTNAME, "hostname {:?}", ready.hostname);
    ensure!(
        ready.kubernetes.distribution == "k3s",
        "kubernetes {:?}",
        ready.kubernetes.distribution
    );
    vm.expect("basalt: shutdown complete", STEP)?;
    let st = vm.wait_exit(Duration::from_secs(60))?;
    ensure!(st.success(), "QEMU exited with {st} after poweroff");
    vm.console.no_init_errors()?;
    Ok(())
}
