//! A/B update a → b, end to end under QEMU (x86_64, OVMF, systemd-boot):
//! slot a (0.1.0) streams a bundle of 0.2.0 built by `basalt bundle` from a
//! second disk into `basaltctl update -`, which writes slot b, a counted
//! trial entry, and reboots. systemd-boot boots the trial; stage 2 runs the
//! health gate (Kubernetes ready) and commits. The third boot comes from b
//! directly; `basaltctl status` shows both slots; /var and the node config
//! (hostname from node.toml) survive.

mod update_support;

use anyhow::{Result, ensure};
use update_support::{boot, bundle, line, setup, slot, status};

const NODE_TOML: &str = "hostname = \"update-node\"\n[update.health_gate]\ntimeout_seconds = 400\n";

#[test]
fn update_a_to_b_commits_and_boots_b() -> Result<()> {
    let s = setup("update_ab", NODE_TOML)?;
    let tar = bundle(&s, "v020", "0.2.0", false, None)?;
    let log = |n: &str| s.dir.join(format!("{n}.console.log")).display().to_string();

    // Boot 1: slot a installs 0.2.0 into b and reboots.
    let l1 = boot(&s, "boot1", Some(&tar))?;
    let st = status(&l1, &log("boot1"))?;
    ensure!(st["slot"] == "a", "boot 1 slot {}", st["slot"]);
    ensure!(
        slot(&st, "a").0 == "good" && slot(&st, "b").0 == "empty",
        "{st}"
    );
    let marker = line(&l1, "e2e-update: marker ", &log("boot1"))?.to_string();
    let upd = line(&l1, "installed 0.2.0 into slot b", &log("boot1"))?;
    // Bounded memory: the bundle is streamed, never held (issue 6: ≤ 32 MiB).
    let rss: u64 = upd
        .split("peak RSS ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX);
    ensure!(
        rss <= 32 * 1024,
        "basaltctl update peak RSS {rss} KiB: {upd}"
    );
    eprintln!("{upd}");
    line(&l1, "basalt: shutdown reboot", &log("boot1"))?;

    // Boot 2: the trial of b; the gate commits.
    let l2 = boot(&s, "boot2", None)?;
    ensure!(
        l2.iter()
            .any(|l| l.contains("Command line:") && l.contains("basalt.slot=b")),
        "boot 2 did not start slot b's kernel (log {})",
        log("boot2")
    );
    line(
        &l2,
        "basalt: update trial boot of slot b version 0.2.0",
        &log("boot2"),
    )?;
    line(&l2, "basalt: update committed slot b", &log("boot2"))?;
    let st = status(&l2, &log("boot2"))?;
    ensure!(st["slot"] == "b" && st["hostname"] == "update-node", "{st}");
    ensure!(
        st["slots"]["primary"] == "b" && st["slots"]["booted"] == "b",
        "{st}"
    );
    ensure!(
        slot(&st, "b").0 == "good" && slot(&st, "b").1 == "0.2.0",
        "{st}"
    );
    ensure!(
        slot(&st, "a").0 == "good" && slot(&st, "a").1 == "0.1.0",
        "{st}"
    );
    ensure!(st["last_update"]["result"] == "committed", "{st}");
    ensure!(
        line(&l2, "e2e-update: marker ", &log("boot2"))? == marker,
        "/var lost its marker"
    );

    // Boot 3: b is primary; no trial any more.
    let l3 = boot(&s, "boot3", None)?;
    ensure!(
        !l3.iter().any(|l| l.contains("update trial boot")),
        "boot 3 ran a trial again (log {})",
        log("boot3")
    );
    let st = status(&l3, &log("boot3"))?;
    ensure!(st["slot"] == "b" && st["hostname"] == "update-node", "{st}");
    ensure!(
        slot(&st, "b").0 == "good" && st["slots"]["primary"] == "b",
        "{st}"
    );
    ensure!(
        line(&l3, "e2e-update: marker ", &log("boot3"))? == marker,
        "/var lost its marker"
    );
    let text: Vec<&String> = l3
        .iter()
        .filter(|l| l.contains("e2e-update-text:"))
        .collect();
    ensure!(
        text.iter()
            .any(|l| l.contains(" b ") && l.contains("primary,booted")),
        "status text: {text:?}"
    );
    let errors: Vec<&String> = l2
        .iter()
        .chain(&l3)
        .filter(|l| l.contains("basalt: error"))
        .collect();
    ensure!(errors.is_empty(), "init reported errors: {errors:?}");

    // The ESP as the host sees it: b primary, a fallback, no counted entry.
    let entries = basalt_tests::disk::list_esp(&s.img, "loader/entries")?;
    ensure!(
        entries.iter().any(|e| e.contains("basalt-b.conf"))
            && entries.iter().any(|e| e.contains("basalt-a.conf"))
            && !entries.iter().any(|e| e.contains('+')),
        "entries {entries:?}"
    );
    let b = basalt_tests::disk::read_from_esp(&s.img, "loader/entries/basalt-b.conf")?;
    ensure!(b.contains("sort-key basalt-1-primary"), "{b}");
    let a = basalt_tests::disk::read_from_esp(&s.img, "loader/entries/basalt-a.conf")?;
    ensure!(a.contains("sort-key basalt-2-fallback"), "{a}");
    Ok(())
}
