//! The node config applied on the device (issue 5; docs/node-config.md
//! "What the device does"), end to end under QEMU (TCG, OVMF):
//!
//! 1. `basalt build tests/tests/images/nodeconfig.toml` (the x86_64 test image
//!    with the `nodeconfig-probe` service, which prints the node's state as
//!    `nc: <key> <value>` lines, and `poweroff-when-ready`);
//! 2. two copies of the image: `basalt config inject` puts
//!    `tests/tests/nodeconfig/toml/node.toml` on one ESP and the equivalent
//!    cloud-init files (`tests/tests/nodeconfig/cloud-init/`) on the other;
//! 3. both boot once and must reach the same observable state: hostname,
//!    account and authorized keys (mode, owner), written files, sysctls, the
//!    module and static address it brings, resolv.conf, the update file, the
//!    k3s config and what the Kubernetes stand-in received (arguments and
//!    config file content) — and the values the configs ask for;
//! 4. the join token left the FAT partition (checked on the disk file with
//!    mtools): the config there now names `/var/lib/basalt/k8s-token`;
//! 5. PID 1 saved the clock at shutdown (`/var/lib/basalt/clock`, read with
//!    debugfs from the disk file);
//! 6. a broken `node.toml` on the first disk's second boot: a clear
//!    `basalt: error config /boot/node.toml:<line>:<col>: ...` on the
//!    console, and the node comes up with its first boot's state;
//! 7. `[logs] persistent = true` (docs/logs.md): `/var/log/basalt.log` on the
//!    data partition (debugfs) holds the boot from `stage1 start` (lines
//!    logged before it was opened, stage 1's included: stage 2 continues in
//!    its process and keeps its ring) to the shutdown, service output included,
//!    and the second boot (last good config) appends to it.

use anyhow::{Context, Result, ensure};
use basalt_tests::assets::Assets;
use basalt_tests::qemu::{Vm, VmConfig};
use basalt_tests::report::{self, Ready};
use basalt_tests::{build, disk, repo_root, work_dir};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const DEFINITION: &str = "tests/tests/images/nodeconfig.toml";
const FIXTURES: &str = "tests/tests/nodeconfig";
const TO_KERNEL: Duration = Duration::from_secs(300);
const STEP: Duration = Duration::from_secs(180);
/// PID 1's resident memory with the node config applied (by its child).
const PID1_RSS_LIMIT_KIB: u64 = 1024;

/// What one boot showed on the console.
struct Boot {
    ready: Ready,
    received: serde_json::Value,
    /// The probe's `nc: <key> <value>` lines.
    state: BTreeMap<String, String>,
    errors: Vec<String>,
    warnings: Vec<String>,
    log: String,
}

fn boot(name: &str, dir: &Path, img: &Path, assets: &Assets) -> Result<Boot> {
    let mut cfg = VmConfig::new(name, dir, img);
    cfg.lifetime = Duration::from_secs(1200);
    let mut vm = Vm::start(&cfg, assets)?;
    vm.expect("basalt: stage1 start", TO_KERNEL)?;
    vm.expect("basalt: stage2 start", STEP)?;
    let line = vm.expect_anywhere(report::RECEIVED_PREFIX, STEP)?;
    let received = report::parse_received(&line)?;
    let line = vm.expect_anywhere(report::READY_PREFIX, STEP)?;
    let ready = report::parse_ready(&line)?;
    vm.expect_anywhere("nc: end", STEP)?;
    vm.expect("basalt: shutdown complete", STEP)?;
    let st = vm.wait_exit(Duration::from_secs(60))?;
    let log = vm.console.log_path().display().to_string();
    ensure!(st.success(), "QEMU exited with {st} (log {log})");
    let mut state = BTreeMap::new();
    for l in vm.console.seen("nc: ") {
        let Some(rest) = l.split_once("nc: ").map(|x| x.1) else {
            continue;
        };
        let (k, v) = rest.split_once(' ').unwrap_or((rest, ""));
        state.insert(k.to_string(), v.to_string());
    }
    Ok(Boot {
        ready,
        received,
        state,
        errors: vm.console.seen("basalt: error"),
        warnings: vm.console.seen("basalt: warning"),
        log,
    })
}

fn basalt(args: &[&str]) -> Result<String> {
    let out = Command::new(build::basalt_binary())
        .current_dir(repo_root())
        .args(args)
        .output()
        .with_context(|| format!("running basalt {args:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "basalt {args:?} failed:\n{text}");
    Ok(text)
}

/// The state both configs ask for (tests/tests/nodeconfig/).
fn check_expected(b: &Boot) -> Result<()> {
    let s = &b.state;
    let want: &[(&str, &str)] = &[
        ("hostname", "nc-e2e"),
        ("passwd", "ops:x:1000:1000:ops:/var/home/ops:/bin/sh"),
        ("shadow", "ops:*:0:0:99999:7:::"),
        ("keys-stat", "600 ops:ops"),
        ("ssh-dir-stat", "700 ops:ops"),
        (
            "keys",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH39+wjtvg8YEKEwXDlvWLYLIKWtP55/ac/fl0II1zua ops@e2e|",
        ),
        ("file-stat", "640 ops:wheel"),
        ("file", "hello from the node config|second line|"),
        ("file2-stat", "600 root:root"),
        // md5sum of the bytes 00..09 ff, given as base64 in the configs.
        ("file2-md5", "caaeb0af29046cfb2e30cdd8496b223a  -"),
        ("token-md5", "a2d9c54884b3c9e87d2b5c4ff10f963a  -"),
        ("sysctl-ip_forward", "1"),
        ("sysctl-swappiness", "13"),
        ("module-dummy", "1"),
        ("addr", "10.99.0.2/24"),
        ("resolv", "search e2e.test|nameserver 10.99.0.53|"),
        ("tz", "Europe/Berlin"),
        ("token-stat", "600 root"),
        ("k3s-config-stat", "600 root"),
    ];
    for (k, v) in want {
        ensure!(
            s.get(*k).map(String::as_str) == Some(*v),
            "{k}: got {:?}, want {v:?} (log {})",
            s.get(*k),
            b.log
        );
    }
    ensure!(
        s.get("group-wheel").is_some_and(|g| g.ends_with("ops")),
        "wheel group {:?}",
        s.get("group-wheel")
    );
    ensure!(
        s.get("route")
            .is_some_and(|r| r.contains("default via 10.99.0.1 dev dummy0")),
        "default route {:?}",
        s.get("route")
    );
    let k3s = s.get("k3s-config").map(String::as_str).unwrap_or("");
    for part in [
        "token-file: \"/var/lib/basalt/k8s-token\"|",
        "node-label:|  - \"basalt.dev/e2e=yes\"|",
        "node-taint:|  - \"e2e=true:NoSchedule\"|",
        "disable:|  - \"traefik\"|",
        "cluster-cidr: 10.42.0.0/16|",
    ] {
        ensure!(k3s.contains(part), "k3s config lacks {part:?}: {k3s:?}");
    }
    let upd = s.get("update").map(String::as_str).unwrap_or("");
    for part in [
        "public_keys = [\"RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3\"]",
        "channel = \"edge\"",
        "timeout_seconds = 300",
        "checks = [\"kubernetes\"]",
    ] {
        ensure!(upd.contains(part), "update.toml lacks {part:?}: {upd:?}");
    }

    // The stand-in was started the way the config's role says.
    let rec = &b.received;
    ensure!(
        rec["standin"] == true && rec["role"] == "server",
        "record: {rec}"
    );
    ensure!(
        rec["flags"]["config"] == serde_json::json!(["/etc/rancher/k3s/config.yaml"])
            && rec["flags"]["node-name"] == serde_json::json!(["nc-e2e"])
            && rec["flags"]["data-dir"] == serde_json::json!(["/var/lib/rancher/k3s"]),
        "flags: {}",
        rec["flags"]
    );
    let content = rec["config"]["content"].as_str().unwrap_or("");
    ensure!(
        content.contains("token-file: \"/var/lib/basalt/k8s-token\"")
            && content.contains("cluster-cidr: 10.42.0.0/16"),
        "config the stand-in read: {content:?}"
    );
    ensure!(
        rec["config"]["values"]["node-label"] == serde_json::json!(["basalt.dev/e2e=yes"]),
        "config values: {}",
        rec["config"]["values"]
    );

    let r = &b.ready;
    ensure!(r.hostname == "nc-e2e", "ready hostname {:?}", r.hostname);
    ensure!(
        r.pid1_rss_kib > 0 && r.pid1_rss_kib < PID1_RSS_LIMIT_KIB,
        "pid1_rss_kib {} (limit {PID1_RSS_LIMIT_KIB})",
        r.pid1_rss_kib
    );
    Ok(())
}

/// What the stand-in received that must not depend on the syntax.
fn received_core(rec: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "argv": rec["argv"],
        "flags": rec["flags"],
        "config": rec["config"],
        "token": rec["token"],
        "role": rec["role"],
    })
}

#[test]
fn node_toml_and_cloud_init_reach_the_same_state_and_a_broken_config_keeps_the_last_good()
-> Result<()> {
    let assets =
        Assets::locate("amd64").context("the node config boot test needs the test assets")?;
    let dir = work_dir("nodeconfig_boot")?;
    build::ensure_binaries(&dir)?;
    let fixtures = repo_root().join(FIXTURES);
    let toml = fixtures.join("toml/node.toml");
    let cloud = fixtures.join("cloud-init");
    // The host checks both with the device's parser first.
    basalt(&["config", "check", &toml.display().to_string()])?;
    basalt(&["config", "check", &cloud.display().to_string()])?;

    let built = build::build_image(&repo_root().join(DEFINITION), &dir.join("out"))?;
    let a = dir.join("toml.img");
    let b = dir.join("cloud-init.img");
    disk::copy_sparse(&built, &a)?;
    disk::copy_sparse(&built, &b)?;
    basalt(&[
        "config",
        "inject",
        &a.display().to_string(),
        &toml.display().to_string(),
    ])?;
    basalt(&[
        "config",
        "inject",
        &b.display().to_string(),
        &cloud.display().to_string(),
    ])?;

    let first = boot("toml-1", &dir, &a, &assets)?;
    ensure!(
        first.errors.is_empty(),
        "errors on the first boot (log {}):\n{}",
        first.log,
        first.errors.join("\n")
    );
    ensure!(
        first
            .warnings
            .iter()
            .any(|w| w.contains("ssh: the image has no SSH server")),
        "no warning about the missing SSH server: {:?}",
        first.warnings
    );
    check_expected(&first)?;
    ensure!(
        first.state.get("status").map(String::as_str) == Some("status = \"applied\""),
        "status {:?}",
        first.state.get("status")
    );

    let ci = boot("cloud-init-1", &dir, &b, &assets)?;
    ensure!(
        ci.errors.is_empty(),
        "errors on the cloud-init boot (log {}):\n{}",
        ci.log,
        ci.errors.join("\n")
    );
    check_expected(&ci)?;
    // `diag-*` lines are diagnostics (PID 1's memory map), not node state.
    let keys: std::collections::BTreeSet<&String> = first
        .state
        .keys()
        .chain(ci.state.keys())
        .filter(|k| !k.starts_with("diag-"))
        .collect();
    let differing: Vec<String> = keys
        .into_iter()
        .filter(|k| *k != "last-good" && first.state.get(*k) != ci.state.get(*k))
        .map(|k| {
            format!(
                "{k}: node.toml {:?}, cloud-init {:?}",
                first.state.get(k),
                ci.state.get(k)
            )
        })
        .collect();
    ensure!(
        differing.is_empty(),
        "the two syntaxes gave different node states:\n{}",
        differing.join("\n")
    );
    ensure!(
        received_core(&first.received) == received_core(&ci.received),
        "the stand-in received different things:\nnode.toml:  {}\ncloud-init: {}",
        received_core(&first.received),
        received_core(&ci.received)
    );
    ensure!(
        first.state.get("last-good").map(String::as_str) == Some("node.toml ")
            && ci.state.get("last-good").map(String::as_str)
                == Some("meta-data network-config user-data "),
        "last good copies: {:?} / {:?}",
        first.state.get("last-good"),
        ci.state.get("last-good")
    );

    // The token left the FAT partitions; the configs there name its new home.
    let fat_toml = disk::read_from_esp(&a, "node.toml")?;
    ensure!(
        !fat_toml.contains("e2e-cluster-secret-1234")
            && fat_toml.contains("token_file = \"/var/lib/basalt/k8s-token\""),
        "node.toml on the ESP after the first boot:\n{fat_toml}"
    );
    let fat_ud = disk::read_from_esp(&b, "user-data")?;
    ensure!(
        !fat_ud.contains("e2e-cluster-secret-1234")
            && fat_ud.contains("token_file: /var/lib/basalt/k8s-token"),
        "user-data on the ESP after the first boot:\n{fat_ud}"
    );
    let token = disk::read_from_ext4(&a, "data", "/lib/basalt/k8s-token")?;
    ensure!(
        String::from_utf8_lossy(&token) == "e2e-cluster-secret-1234\n",
        "stored token {:?}",
        String::from_utf8_lossy(&token)
    );

    // PID 1 saved the last known time at shutdown (for the next boot's clock).
    let clock = disk::read_from_ext4(&a, "data", "/lib/basalt/clock")?;
    let saved: u64 = String::from_utf8_lossy(&clock)
        .trim()
        .parse()
        .with_context(|| format!("clock file {:?}", String::from_utf8_lossy(&clock)))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    ensure!(
        saved <= now && now - saved < 3600,
        "saved clock {saved} is not the time of the first boot's shutdown (now {now})"
    );

    // [logs] persistent = true: the whole boot, early lines included, on /var.
    let log = basalt_log(&a)?;
    ensure!(
        log.matches(" init: stage1 start\n").count() == 1
            && log.matches(" init: stage2 start\n").count() == 1
            && log.contains(" init: logs persistent at /var/log/basalt.log\n")
            && log.contains(" init: ready {")
            && log.contains(" nodeconfig-probe: nc: end")
            && log.contains(" init: shutdown poweroff\n"),
        "/var/log/basalt.log after the first boot:\n{log}"
    );
    let stage1 = log.find(" init: stage1 start").unwrap_or(usize::MAX);
    let stage2 = log.find(" init: stage2 start").unwrap_or(usize::MAX);
    let opened = log.find(" init: logs persistent at").unwrap_or(0);
    ensure!(
        stage1 < stage2 && stage2 < opened,
        "early lines are not first:\n{log}"
    );

    // Second boot of the first disk with a broken node.toml: the last good config.
    // `basalt config inject` refuses it, so it goes on with mtools, as an
    // edit by hand on a laptop would.
    disk::write_on_esp(
        &a,
        "node.toml",
        "hostname = \"nc-broken\"\nhostnme = \"typo\"\n[kernel.sysctl]\n\"vm.swappiness\" = 99\n",
    )?;
    let second = boot("toml-2-broken", &dir, &a, &assets)?;
    ensure!(
        second.errors.iter().any(|e| e.contains(
            "basalt: error config /boot/node.toml:2:1: unknown key `hostnme` at the top level; did you mean `hostname`?"
        )),
        "no clear config error on the console (log {}):\n{}",
        second.log,
        second.errors.join("\n")
    );
    ensure!(
        second
            .errors
            .iter()
            .any(|e| e.contains("using the last good config")),
        "no word about the last good config: {:?}",
        second.errors
    );
    check_expected(&second)?;
    let changed: Vec<String> = first
        .state
        .keys()
        .filter(|k| {
            *k != "status" && !k.starts_with("diag-") && first.state.get(*k) != second.state.get(*k)
        })
        .map(|k| {
            format!(
                "{k}: {:?} then {:?}",
                first.state.get(k),
                second.state.get(k)
            )
        })
        .collect();
    ensure!(
        changed.is_empty(),
        "the broken config changed the node:\n{}",
        changed.join("\n")
    );
    ensure!(
        second.state.get("status").map(String::as_str) == Some("status = \"last-good\""),
        "status {:?}",
        second.state.get("status")
    );
    // The last good config keeps persistent logging: the file grew by a boot.
    let log = basalt_log(&a)?;
    ensure!(
        log.matches(" init: stage2 start\n").count() == 2
            && log.matches(" init: stage1 start\n").count() == 2
            && log.contains("unknown key `hostnme`"),
        "/var/log/basalt.log after the second boot:\n{log}"
    );
    Ok(())
}

/// `/var/log/basalt.log` from the data partition of the disk file.
fn basalt_log(img: &Path) -> Result<String> {
    let bytes = disk::read_from_ext4(img, "data", "/log/basalt.log")?;
    ensure!(!bytes.is_empty(), "/var/log/basalt.log is empty or missing");
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
