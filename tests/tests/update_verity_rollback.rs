//! A trial slot whose root is corrupted falls back by itself (issue 8: "a
//! trial slot fails its health gate (rolls back)"), end to end under QEMU
//! (x86_64, OVMF, systemd-boot):
//! 1. slot a installs 0.2.0 into b with `basaltctl update --no-reboot` and
//!    powers off; the trial entry `basalt-b+1.conf` carries `basalt.trial=1`;
//! 2. the host flips one byte of root-b's squashfs on the disk image (in the
//!    4 KiB block holding the id table index, which every mount reads);
//! 3. the trial boot: dm-verity refuses the block, the root mount fails,
//!    stage 1 says `basalt: error verity … corruption detected on
//!    basalt-root-b` and `basalt: error trial …`, and reboots by itself
//!    (QEMU runs with `-no-reboot`, so it exits) — stage 2 never starts;
//! 4. systemd-boot falls back to a (the counted entry has no tries left);
//!    its stage 2 records b bad with a reason and removes b's entries.

mod update_support;

use anyhow::{Context, Result, ensure};
use basalt_tests::disk;
use std::io::{Read, Seek, SeekFrom, Write};
use update_support::{boot, bundle, line, setup_with, slot, status};

const NODE_TOML: &str =
    "hostname = \"verity-trial-node\"\n[update.health_gate]\ntimeout_seconds = 120\n";

/// Test-only service (not for real images): like update_support's driver,
/// but the update is installed with `--no-reboot` and the VM powers off, so
/// the host can corrupt the trial slot before its first boot.
const DRIVER: &str = r#"# Test-only service for tests/tests/update_verity_rollback.rs (not for real images).
exec = ["/bin/sh", "-c", '''
i=0
until /usr/bin/basaltctl status --json | grep -q '"ready": *true' || [ "$i" -ge 900 ]; do i=$((i+1)); sleep 1; done
m=/var/lib/basalt-e2e/marker
[ -f "$m" ] || { mkdir -p /var/lib/basalt-e2e && cat /proc/sys/kernel/random/uuid > "$m" && sync; }
echo "e2e-update: marker $(cat "$m")"
echo "e2e-update: status $(/usr/bin/basaltctl status --json | tr -d '\n')"
if [ -e /dev/vdb ]; then
  tar -xOf /dev/vdb update.bundle | /usr/bin/basaltctl update --no-reboot - 2>&1 | while read -r l; do echo "e2e-update: update: $l"; done
fi
/usr/bin/basaltctl poweroff
''']
restart = "never"
"#;

/// Flip one byte of the squashfs at the start of partition `name`: in the
/// block holding the id table index (superblock bytes 48..56), as
/// tests/tests/verity_boot.rs does for root-a.
fn corrupt_squashfs(img: &std::path::Path, name: &str) -> Result<u64> {
    let off = disk::partition_offset(img, name)?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)?;
    let mut sb = [0u8; 96];
    f.seek(SeekFrom::Start(off))?;
    f.read_exact(&mut sb)?;
    ensure!(&sb[..4] == b"hsqs", "{name} is not a squashfs");
    let id_table = u64::from_le_bytes(sb[48..56].try_into()?);
    let at = off + id_table;
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at))?;
    f.read_exact(&mut b)?;
    b[0] ^= 0x01;
    f.seek(SeekFrom::Start(at))?;
    f.write_all(&b)?;
    f.sync_all()?;
    Ok(at)
}

#[test]
fn a_corrupted_trial_slot_falls_back_by_itself() -> Result<()> {
    let s = setup_with(
        "update_verity_rollback",
        NODE_TOML,
        &[("update-driver.toml", DRIVER)],
    )?;
    let tar = bundle(&s, "v020", "0.2.0", false, None)?;
    let log = |n: &str| s.dir.join(format!("{n}.console.log")).display().to_string();

    // Boot 1 (a): install 0.2.0 into b, no reboot.
    let l = boot(&s, "boot1", Some(&tar))?;
    let upd = line(&l, "e2e-update: update: ", &log("boot1"))?;
    ensure!(upd.contains("installed 0.2.0 into slot b"), "{upd}");
    let marker = line(&l, "e2e-update: marker ", &log("boot1"))?.to_string();
    ensure!(
        !l.iter().any(|x| x.contains("basalt: shutdown reboot")),
        "--no-reboot rebooted (log {})",
        log("boot1")
    );
    // The trial entry as the host sees it (mtools): counted, first, trial key.
    let entries = disk::list_esp(&s.img, "loader/entries")?;
    ensure!(
        entries.iter().any(|e| e.contains("basalt-b+1.conf")),
        "entries {entries:?}"
    );
    let trial = disk::read_from_esp(&s.img, "loader/entries/basalt-b+1.conf")?;
    ensure!(
        trial.contains("sort-key basalt-0-trial")
            && trial.contains(" basalt.trial=1 ")
            && trial.contains("basalt.slot=b"),
        "{trial}"
    );
    let primary = disk::read_from_esp(&s.img, "loader/entries/basalt-a.conf")?;
    ensure!(!primary.contains("basalt.trial"), "{primary}");

    // 2. Corrupt root-b on the disk image.
    let at = corrupt_squashfs(&s.img, "root-b").context("corrupting root-b")?;
    eprintln!("flipped one bit of root-b at byte {at} of the image");

    // Boot 2 (b, trial): verity refuses the block; stage 1 gives up and reboots.
    let l = boot(&s, "boot2", None)?;
    ensure!(
        l.iter().any(|x| x.contains("Command line:")
            && x.contains("basalt.slot=b")
            && x.contains("basalt.trial=1")),
        "boot 2 did not start slot b's trial (log {})",
        log("boot2")
    );
    line(&l, "basalt: trial watchdog armed", &log("boot2"))?;
    let v = line(&l, "basalt: error verity", &log("boot2"))?;
    ensure!(v.contains("corruption detected on basalt-root-b"), "{v}");
    let gave_up = line(&l, "basalt: error trial trial of slot b", &log("boot2"))?;
    ensure!(gave_up.contains("could not be mounted"), "{gave_up}");
    ensure!(
        !l.iter().any(|x| x.contains("basalt: stage2 start")),
        "stage 2 started from a corrupted root (log {})",
        log("boot2")
    );
    eprintln!("{gave_up}");

    // Boot 3: systemd-boot falls back to a by itself; b is recorded bad.
    let l = boot(&s, "boot3", None)?;
    ensure!(
        l.iter()
            .any(|x| x.contains("Command line:") && x.contains("basalt.slot=a")),
        "boot 3 did not fall back to slot a (log {})",
        log("boot3")
    );
    ensure!(
        !l.iter()
            .any(|x| x.contains("Command line:") && x.contains("basalt.trial")),
        "the fallback boot is a trial (log {})",
        log("boot3")
    );
    let rb = line(&l, "basalt: update rolled back slot b", &log("boot3"))?;
    eprintln!("{rb}");
    line(&l, "basalt: ready ", &log("boot3"))?;
    let st = status(&l, &log("boot3"))?;
    ensure!(st["slot"] == "a" && st["slots"]["primary"] == "a", "{st}");
    ensure!(st["ready"] == true, "{st}");
    let (state, version, reason) = slot(&st, "b");
    ensure!(state == "bad" && version == "0.2.0", "{st}");
    ensure!(!reason.is_empty(), "b is bad without a reason: {st}");
    ensure!(slot(&st, "a").0 == "good", "{st}");
    ensure!(st["last_update"]["result"] == "rolled-back", "{st}");
    ensure!(
        line(&l, "e2e-update: marker ", &log("boot3"))? == marker,
        "/var lost its marker"
    );
    let entries = disk::list_esp(&s.img, "loader/entries")?;
    ensure!(
        entries.iter().any(|e| e.contains("basalt-a.conf"))
            && !entries.iter().any(|e| e.contains("basalt-b")),
        "entries {entries:?}"
    );
    Ok(())
}
