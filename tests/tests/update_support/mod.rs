//! Shared by the A/B update end-to-end tests (tests/tests/update_*.rs): an
//! x86_64 test image whose slots trust a signing key made for the test, a
//! test-only service that drives `basaltctl update` from a second virtio
//! disk, bundles built by `basalt bundle`, and boots that run until QEMU
//! exits (the guest powers off, or reboots under `-no-reboot`).

#![allow(dead_code)]

use anyhow::{Context, Result, ensure};
use basalt_tests::assets::Assets;
use basalt_tests::qemu::{Vm, VmConfig};
use basalt_tests::{build, disk, repo_root};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Test-only service (not for real images). After the boot is ready and no
/// slot is on trial any more (the gate's verdict) and the gate service has
/// exited (it says its verdict after finishing the commit: the state file
/// says "committed" before the loader entries are reconciled), it prints the node's
/// status and a marker kept under /var; then, if a second disk holds a tar
/// with `update.bundle`, it streams that into `basaltctl update -` (which
/// reboots into the trial); else it powers the VM off. `basaltctl`'s output
/// goes straight to the service's log: it is written before the reboot is
/// asked for, so PID 1 has it; a prefixing `while read` loop in between was
/// SIGTERMed by the shutdown, sometimes before it echoed the line.
const DRIVER: &str = r#"# Test-only service for tests/tests/update_*.rs (not for real images).
exec = ["/bin/sh", "-c", '''
i=0
until /usr/bin/basaltctl status --json | grep -q '"ready": *true' || [ "$i" -ge 900 ]; do i=$((i+1)); sleep 1; done
i=0
while /usr/bin/basaltctl status --json | grep -q '"state":"trial"' && [ "$i" -lt 900 ]; do i=$((i+1)); sleep 1; done
i=0
while /usr/bin/basaltctl status --json | tr -d ' \n' | grep -Eq '"name":"update-health-gate","state":"(starting|ready)"' && [ "$i" -lt 900 ]; do i=$((i+1)); sleep 1; done
m=/var/lib/basalt-e2e/marker
[ -f "$m" ] || { mkdir -p /var/lib/basalt-e2e && cat /proc/sys/kernel/random/uuid > "$m" && sync; }
echo "e2e-update: marker $(cat "$m")"
echo "e2e-update: status $(/usr/bin/basaltctl status --json | tr -d '\n')"
/usr/bin/basaltctl status | sed 's/^/e2e-update-text: /'
if [ -e /dev/vdb ]; then
  echo "e2e-update: updating from /dev/vdb"
  tar -xOf /dev/vdb update.bundle | /usr/bin/basaltctl update - 2>&1
  sleep 60
fi
/usr/bin/basaltctl poweroff
''']
restart = "never"
"#;

/// Test-only Kubernetes binary for a slot that never gets ready: it runs, and
/// its `kubectl get --raw=/readyz` (init's readiness check) always fails.
const NEVER_READY: &str = "#!/bin/sh\n# Test-only: a Kubernetes stand-in that never becomes ready.\nif [ \"$1\" = kubectl ]; then exit 1; fi\necho \"never-ready: running, never ready\"\nexec sleep 1000000\n";

/// A test-only "init" that cannot run (its interpreter does not exist in the
/// initramfs): the kernel panics with "No working init found".
pub fn broken_init(s: &Setup) -> Result<PathBuf> {
    let p = s.dir.join("broken-init");
    std::fs::write(&p, "#!/nonexistent/interpreter\n")?;
    Ok(p)
}

pub struct Setup {
    pub dir: PathBuf,
    pub img: PathBuf,
    pub vars: PathBuf,
    pub key: PathBuf,
    pub def: PathBuf,
    pub assets: Assets,
}

fn basalt(dir: &Path) -> Command {
    let mut c = Command::new(build::basalt_binary());
    c.current_dir(dir)
        .env("BASALT_ASSETS", Assets::root())
        .env(
            "BASALT_INIT",
            build::device_binary(build::X86_64_MUSL, "init"),
        )
        .env(
            "BASALT_STANDIN",
            build::device_binary(build::X86_64_MUSL, "k8s-standin"),
        )
        .env("SOURCE_DATE_EPOCH", build::TEST_EPOCH);
    c
}

/// The test image definition with the driver service and `[update]`
/// trusting `release.pub`; `never_ready` swaps the Kubernetes binary.
fn definition(dir: &Path, name: &str, never_ready: bool) -> Result<PathBuf> {
    let services = std::fs::read_to_string(dir.join("services.list")).unwrap_or_default();
    let text = std::fs::read_to_string(repo_root().join("tests/images/x86_64.toml"))?;
    let mut out = String::new();
    for l in text.lines() {
        if l.starts_with("services") {
            out.push_str(&format!("services = [{services}]\n"));
        } else if l.starts_with("name =") {
            out.push_str(&format!("name = \"{name}\"\n"));
        } else if never_ready && l.starts_with("source = \"${BASALT_STANDIN}\"") {
            out.push_str("source = \"never-ready.sh\"\n");
        } else {
            out.push_str(l);
            out.push('\n');
        }
    }
    out.push_str("\n[update]\npublic_keys = [\"release.pub\"]\n");
    let def = dir.join(format!("{name}.toml"));
    std::fs::write(&def, out)?;
    Ok(def)
}

/// Build the slot a image (0.1.0) with the update driver service, with
/// `node_toml` on the ESP.
pub fn setup(name: &str, node_toml: &str) -> Result<Setup> {
    setup_with(name, node_toml, &[("update-driver.toml", DRIVER)])
}

/// Same, with other test-only services (file name, content).
pub fn setup_with(name: &str, node_toml: &str, services: &[(&str, &str)]) -> Result<Setup> {
    let dir = basalt_tests::work_dir(name)?;
    build::ensure_binaries(&dir)?;
    let assets = Assets::locate("amd64")?;
    let mut list = Vec::new();
    for (file, text) in services {
        std::fs::write(dir.join(file), text)?;
        list.push(format!("\"{file}\""));
    }
    std::fs::write(dir.join("services.list"), list.join(", "))?;
    std::fs::write(dir.join("never-ready.sh"), NEVER_READY)?;
    build::run_logged(
        "basalt keygen",
        basalt(&dir).arg("keygen").arg(dir.join("release")),
        &dir.join("keygen.log"),
    )?;
    let def = definition(&dir, "basalt-update-test", false)?;
    let img = build::build_image(&def, &dir.join("out")).context("building the image")?;
    disk::write_on_esp(&img, "node.toml", node_toml)?;
    let vars = dir.join("vars.fd");
    std::fs::copy(assets.ovmf_vars()?, &vars)?;
    Ok(Setup {
        key: dir.join("release.key"),
        dir,
        img,
        vars,
        def,
        assets,
    })
}

/// `basalt bundle` of the test definition at `version`, packed as
/// `<name>.tar` holding `update.bundle` (the driver's second disk).
pub fn bundle(
    s: &Setup,
    name: &str,
    version: &str,
    never_ready: bool,
    init: Option<&Path>,
) -> Result<PathBuf> {
    let file = bundle_file(s, name, version, never_ready, init)?;
    let stage = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let tar = s.dir.join(format!("{name}.tar"));
    let st = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&stage)
        .arg("update.bundle")
        .status()?;
    ensure!(st.success(), "tar -cf {} failed", tar.display());
    std::fs::remove_file(&file)?;
    Ok(tar)
}

/// `basalt bundle` into `<dir>/<name>/update.bundle`, checked by `basalt bundle verify`.
pub fn bundle_file(
    s: &Setup,
    name: &str,
    version: &str,
    never_ready: bool,
    init: Option<&Path>,
) -> Result<PathBuf> {
    let def = if never_ready {
        definition(&s.dir, "basalt-update-never-ready", true)?
    } else {
        s.def.clone()
    };
    let stage = s.dir.join(name);
    std::fs::create_dir_all(&stage)?;
    let file = stage.join("update.bundle");
    let t0 = Instant::now();
    let mut cmd = basalt(&s.dir);
    if let Some(i) = init {
        cmd.env("BASALT_INIT", i);
    }
    build::run_logged(
        &format!("basalt bundle {version}"),
        cmd.arg("bundle")
            .arg(&def)
            .arg("--key")
            .arg(&s.key)
            .arg("--out")
            .arg(&file)
            .args(["--os-version", version]),
        &s.dir.join(format!("{name}.bundle.log")),
    )?;
    eprintln!(
        "bundle {version}: {} MiB in {:.1} s",
        std::fs::metadata(&file)?.len() >> 20,
        t0.elapsed().as_secs_f64()
    );
    // The builder's own check, with the image's public key.
    build::run_logged(
        "basalt bundle verify",
        basalt(&s.dir)
            .args(["bundle", "verify"])
            .arg(&file)
            .arg("--pubkey")
            .arg(s.dir.join("release.pub")),
        &s.dir.join(format!("{name}.verify.log")),
    )?;
    Ok(file)
}

/// One boot until QEMU exits; returns the console lines.
pub fn boot(s: &Setup, name: &str, bundle_tar: Option<&Path>) -> Result<Vec<String>> {
    boot_with(s, name, bundle_tar, &[])
}

/// Same, with more QEMU arguments (e.g. a NIC).
pub fn boot_with(
    s: &Setup,
    name: &str,
    bundle_tar: Option<&Path>,
    extra: &[&str],
) -> Result<Vec<String>> {
    let mut cfg = VmConfig::new(name, &s.dir, &s.img);
    cfg.extra_args.extend(extra.iter().map(|a| a.to_string()));
    cfg.vars = Some(s.vars.clone());
    cfg.lifetime = Duration::from_secs(900);
    if let Some(t) = bundle_tar {
        cfg.extra_args.push("-drive".into());
        cfg.extra_args.push(format!(
            "if=virtio,format=raw,readonly=on,file={}",
            t.display()
        ));
    }
    let t0 = Instant::now();
    let mut vm = Vm::start(&cfg, &s.assets)?;
    let st = vm.wait_exit(Duration::from_secs(900))?;
    eprintln!(
        "boot {name}: {:.0} s, QEMU {st}",
        t0.elapsed().as_secs_f64()
    );
    Ok(vm.console.history().to_vec())
}

/// The first line containing `needle`, or an error quoting the log.
pub fn line<'a>(lines: &'a [String], needle: &str, log: &str) -> Result<&'a str> {
    lines
        .iter()
        .find(|l| l.contains(needle))
        .map(String::as_str)
        .with_context(|| format!("no console line with {needle:?} (log {log})"))
}

/// The JSON of the driver's `e2e-update: status` line.
pub fn status(lines: &[String], log: &str) -> Result<serde_json::Value> {
    let l = line(lines, "e2e-update: status ", log)?;
    let json = &l[l.find("e2e-update: status ").unwrap_or(0) + "e2e-update: status ".len()..];
    serde_json::from_str(json).with_context(|| format!("status JSON {json:?}"))
}

/// `slots.<slot>.state` and `.version` of a status.
pub fn slot(st: &serde_json::Value, slot: &str) -> (String, String, String) {
    let s = &st["slots"][slot];
    (
        s["state"].as_str().unwrap_or_default().to_string(),
        s["version"].as_str().unwrap_or_default().to_string(),
        s["reason"].as_str().unwrap_or_default().to_string(),
    )
}
