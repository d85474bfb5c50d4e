//! Power cuts during an update, under QEMU: QEMU is killed (no shutdown, no
//! flush of anything the guest did not write) at seeded random instants
//! (a) while slot a runs `basaltctl update` from a second disk, and
//! (b) during the trial boot of b (firmware, stage 1, stage 2, gate, commit).
//! After each cut the node must boot by itself to `basalt: ready` on a slot
//! recorded good, with the /var marker of its first boot intact.
//!
//! `BASALT_POWERCUTS` (default 4; the bar is ≥ 20) and
//! `BASALT_POWERCUT_SEED` (default 1) choose the run; the report lists every
//! cut and the count of failures, which must be zero.

mod update_support;

use anyhow::{Context, Result, ensure};
use basalt_tests::qemu::{Vm, VmConfig};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use update_support::{Setup, boot, bundle, line, setup, status};

const NODE_TOML: &str = "hostname = \"cut-node\"\n[update.health_gate]\ntimeout_seconds = 300\n";

/// xorshift64*: reproducible from the seed, no dependency.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Copy a disk image keeping it sparse, and its firmware variables.
fn snapshot(from: &Path, vars_from: &Path, to: &Path) -> Result<PathBuf> {
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()?;
    ensure!(st.success(), "cp {} {}", from.display(), to.display());
    let vars = to.with_extension("vars.fd");
    std::fs::copy(vars_from, &vars)?;
    Ok(vars)
}

#[derive(Debug)]
struct Cut {
    n: usize,
    phase: &'static str,
    at_ms: u64,
    outcome: Result<String, String>,
}

fn recover(s: &Setup, img: &Path, vars: &Path, name: &str, marker: &str) -> Result<String> {
    let node = Setup {
        dir: s.dir.clone(),
        img: img.to_path_buf(),
        vars: vars.to_path_buf(),
        key: s.key.clone(),
        def: s.def.clone(),
        assets: basalt_tests::assets::Assets::locate("amd64")?,
    };
    let l = boot(&node, name, None)?;
    let log = s
        .dir
        .join(format!("{name}.console.log"))
        .display()
        .to_string();
    line(&l, "basalt: ready {", &log)?;
    let st = status(&l, &log)?;
    let booted = st["slot"].as_str().unwrap_or_default().to_string();
    let state = st["slots"][&booted]["state"].as_str().unwrap_or_default();
    ensure!(state == "good", "booted slot {booted} is {state}: {st}");
    let m = line(&l, "e2e-update: marker ", &log)?;
    ensure!(
        m.ends_with(marker),
        "/var marker changed: {m} (expected {marker})"
    );
    Ok(format!(
        "slot {booted} good, b {} {}, last update {}",
        st["slots"]["b"]["state"].as_str().unwrap_or_default(),
        st["slots"]["b"]["version"].as_str().unwrap_or_default(),
        st["last_update"]["result"].as_str().unwrap_or_default()
    ))
}

#[test]
fn power_cuts_during_update_and_trial_leave_a_bootable_node() -> Result<()> {
    let cuts = env_u64("BASALT_POWERCUTS", 4) as usize;
    let seed = env_u64("BASALT_POWERCUT_SEED", 1);
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let s = setup("update_powercut", NODE_TOML)?;
    let tar = bundle(&s, "v020", "0.2.0", false, None)?;
    let log = |n: &str| s.dir.join(format!("{n}.console.log")).display().to_string();

    // A first boot makes the /var marker every later boot must find.
    let l = boot(&s, "prepare", None)?;
    let marker = line(&l, "e2e-update: marker ", &log("prepare"))?
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    let base = s.dir.join("base.img");
    let base_vars = snapshot(&s.img, &s.vars, &base)?;
    // The state a trial boot starts from: slot a installed 0.2.0 into b and rebooted.
    let l = boot(&s, "install", Some(&tar))?;
    line(&l, "basalt: shutdown reboot", &log("install"))?;
    let installed = s.dir.join("installed.img");
    let installed_vars = snapshot(&s.img, &s.vars, &installed)?;

    let mut report = Vec::new();
    for n in 0..cuts {
        let phase = if n % 2 == 0 { "update" } else { "trial" };
        let img = s.dir.join(format!("cut{n}.img"));
        let (from, from_vars) = match phase {
            "update" => (&base, &base_vars),
            _ => (&installed, &installed_vars),
        };
        let vars = snapshot(from, from_vars, &img)?;
        let mut cfg = VmConfig::new(&format!("cut{n}"), &s.dir, &img);
        cfg.vars = Some(vars.clone());
        let at_ms = match phase {
            "update" => {
                cfg.extra_args.push("-drive".into());
                cfg.extra_args.push(format!(
                    "if=virtio,format=raw,readonly=on,file={}",
                    tar.display()
                ));
                rng.below(6000)
            }
            _ => rng.below(22_000),
        };
        let mut vm = Vm::start(&cfg, &s.assets)?;
        if phase == "update" {
            // The driver prints the marker right before it starts the update.
            vm.expect("e2e-update: marker ", Duration::from_secs(240))
                .with_context(|| format!("cut {n}: the update never started"))?;
        }
        std::thread::sleep(Duration::from_millis(at_ms));
        vm.kill();
        drop(vm);
        let outcome = recover(&s, &img, &vars, &format!("cut{n}-recover"), &marker)
            .map_err(|e| format!("{e:#}"));
        eprintln!("cut {n:>2} {phase:<6} +{at_ms:>5} ms: {outcome:?}");
        report.push(Cut {
            n,
            phase,
            at_ms,
            outcome,
        });
        let _ = std::fs::remove_file(&img);
        let _ = std::fs::remove_file(&vars);
    }
    let failures: Vec<&Cut> = report.iter().filter(|c| c.outcome.is_err()).collect();
    eprintln!(
        "power cuts: seed {seed}, {} cuts ({} during update, {} during the trial boot), {} failures",
        report.len(),
        report.iter().filter(|c| c.phase == "update").count(),
        report.iter().filter(|c| c.phase == "trial").count(),
        failures.len()
    );
    let shown: Vec<String> = failures
        .iter()
        .map(|c| format!("cut {} ({} +{} ms): {:?}", c.n, c.phase, c.at_ms, c.outcome))
        .collect();
    ensure!(failures.is_empty(), "failed cuts:\n{}", shown.join("\n"));
    Ok(())
}
