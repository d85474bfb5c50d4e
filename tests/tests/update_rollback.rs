//! Automatic rollback, end to end under QEMU (x86_64, OVMF, systemd-boot):
//! 1. slot a installs a 0.2.0 whose Kubernetes never gets ready (a test-only
//!    binary); the trial boot's health gate times out, records b bad with the
//!    reason and reboots; systemd-boot falls back to a;
//! 2. from a, a good 0.3.0 installs into the same slot b (no stale trial
//!    state) and commits;
//! 3. from b, a 0.4.0 whose initramfs cannot start init installs into a; its
//!    kernel panics, reboots (`panic=10` on trial entries), the counted entry
//!    is out of tries, b boots and records a bad: "trial boot did not come up".

mod update_support;

use anyhow::{Result, ensure};
use update_support::{boot, broken_init, bundle, line, setup, slot, status};

const NODE_TOML: &str =
    "hostname = \"rollback-node\"\n[update.health_gate]\ntimeout_seconds = 60\n";

#[test]
fn failed_trials_roll_back_and_a_later_update_works() -> Result<()> {
    let s = setup("update_rollback", NODE_TOML)?;
    let never_ready = bundle(&s, "v020-never-ready", "0.2.0", true, None)?;
    let good = bundle(&s, "v030", "0.3.0", false, None)?;
    let panics = bundle(&s, "v040-panic", "0.4.0", false, Some(&broken_init(&s)?))?;
    let log = |n: &str| s.dir.join(format!("{n}.console.log")).display().to_string();

    // Boot 1 (a): install the never-ready 0.2.0 into b.
    let l = boot(&s, "boot1", Some(&never_ready))?;
    line(&l, "installed 0.2.0 into slot b", &log("boot1"))?;
    let marker = line(&l, "e2e-update: marker ", &log("boot1"))?.to_string();

    // Boot 2 (b, trial): the gate times out and reboots.
    let l = boot(&s, "boot2", None)?;
    line(
        &l,
        "basalt: update trial boot of slot b version 0.2.0",
        &log("boot2"),
    )?;
    let rb = line(&l, "basalt: update rolled back slot b", &log("boot2"))?;
    ensure!(
        rb.contains("within 60 s") && rb.contains("kubernetes"),
        "{rb}"
    );
    line(&l, "basalt: shutdown reboot", &log("boot2"))?;

    // Boot 3 (a): b is bad with the reason; 0.3.0 installs into b.
    let l = boot(&s, "boot3", Some(&good))?;
    ensure!(
        l.iter()
            .any(|x| x.contains("Command line:") && x.contains("basalt.slot=a")),
        "boot 3 did not fall back to slot a (log {})",
        log("boot3")
    );
    let st = status(&l, &log("boot3"))?;
    ensure!(st["slot"] == "a" && st["slots"]["primary"] == "a", "{st}");
    let (state, version, reason) = slot(&st, "b");
    ensure!(state == "bad" && version == "0.2.0", "{st}");
    ensure!(
        reason.contains("health gate") && reason.contains("kubernetes"),
        "{reason}"
    );
    ensure!(st["last_update"]["result"] == "rolled-back", "{st}");
    ensure!(
        line(&l, "e2e-update: marker ", &log("boot3"))? == marker,
        "/var lost its marker"
    );
    line(&l, "installed 0.3.0 into slot b", &log("boot3"))?;

    // Boot 4 (b, trial of 0.3.0): commits; then 0.4.0 (panics) installs into a.
    let l = boot(&s, "boot4", Some(&panics))?;
    line(&l, "basalt: update committed slot b", &log("boot4"))?;
    let st = status(&l, &log("boot4"))?;
    ensure!(
        slot(&st, "b").0 == "good" && slot(&st, "b").1 == "0.3.0",
        "{st}"
    );
    ensure!(slot(&st, "b").2.is_empty(), "stale reason on b: {st}");
    ensure!(st["slots"]["primary"] == "b", "{st}");
    line(&l, "installed 0.4.0 into slot a", &log("boot4"))?;

    // Boot 5 (a, trial of 0.4.0): the kernel panics and reboots.
    let l = boot(&s, "boot5", None)?;
    line(&l, "Kernel panic", &log("boot5"))?;
    ensure!(
        !l.iter().any(|x| x.contains("basalt: stage2 start")),
        "the broken trial reached stage 2 (log {})",
        log("boot5")
    );

    // Boot 6: systemd-boot falls back to b; a is recorded bad.
    let l = boot(&s, "boot6", None)?;
    line(
        &l,
        "basalt: update rolled back slot a: trial boot did not come up",
        &log("boot6"),
    )?;
    let st = status(&l, &log("boot6"))?;
    ensure!(st["slot"] == "b" && st["slots"]["primary"] == "b", "{st}");
    ensure!(
        slot(&st, "a").0 == "bad" && slot(&st, "a").1 == "0.4.0",
        "{st}"
    );
    ensure!(slot(&st, "b").0 == "good", "{st}");
    ensure!(
        line(&l, "e2e-update: marker ", &log("boot6"))? == marker,
        "/var lost its marker"
    );
    let entries = basalt_tests::disk::list_esp(&s.img, "loader/entries")?;
    ensure!(
        entries.iter().any(|e| e.contains("basalt-b.conf"))
            && !entries.iter().any(|e| e.contains("basalt-a")),
        "entries {entries:?}"
    );
    Ok(())
}
