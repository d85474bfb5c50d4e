//! DHCP by default (docs/node-config.md "What the device does", network):
//! a node config without a `network` section, only `kernel.modules =
//! ["virtio_net"]` for the NIC's driver, on QEMU's user network (which has a
//! DHCP server: 10.0.2.15/24, router 10.0.2.2, DNS 10.0.2.3). The generated
//! `dhcp-eth0` service runs busybox udhcpc with the lease script stage 2
//! wrote to /run/basalt/, which prints what it applied.

use anyhow::{Context, Result, ensure};
use basalt_tests::assets::Assets;
use basalt_tests::qemu::{Vm, VmConfig};
use basalt_tests::report;
use basalt_tests::{build, repo_root, work_dir};
use std::process::Command;
use std::time::Duration;

#[test]
fn without_a_network_section_wired_ethernet_gets_dhcp() -> Result<()> {
    let assets = Assets::locate("amd64").context("the DHCP test needs the test assets")?;
    let dir = work_dir("nodeconfig_dhcp")?;
    build::ensure_binaries(&dir)?;
    let img = build::build_image(
        &repo_root().join("tests/tests/images/nodeconfig-join-k3s.toml"),
        &dir.join("out"),
    )?;
    let cfg = dir.join("node.toml");
    std::fs::write(
        &cfg,
        "hostname = \"dhcp-node\"\n[kernel]\nmodules = [\"virtio_net\"]\n[time]\nntp_servers = []\n",
    )?;
    let out = Command::new(build::basalt_binary())
        .args(["config", "inject"])
        .arg(&img)
        .arg(&cfg)
        .output()?;
    ensure!(out.status.success(), "inject: {out:?}");

    let mut vm_cfg = VmConfig::new("dhcp", &dir, &img);
    vm_cfg.extra_args = [
        "-netdev",
        "user,id=n0",
        "-device",
        "virtio-net-pci,netdev=n0",
    ]
    .map(String::from)
    .to_vec();
    let mut vm = Vm::start(&vm_cfg, &assets)?;
    vm.expect("basalt: stage2 start", Duration::from_secs(300))?;
    let step = Duration::from_secs(180);
    vm.expect_anywhere("basalt: service dhcp-eth0 started", step)?;
    let lease = vm.expect_anywhere("basalt-udhcpc: eth0 bound", step)?;
    ensure!(
        lease.contains("eth0 bound 10.0.2.15/24 router 10.0.2.2 dns 10.0.2.3"),
        "lease line: {lease}"
    );
    let ready = report::parse_ready(&vm.expect_anywhere(report::READY_PREFIX, step)?)?;
    ensure!(
        ready.hostname == "dhcp-node",
        "hostname {:?}",
        ready.hostname
    );
    vm.console.no_init_errors()?;
    vm.kill();
    Ok(())
}
