//! Install benchmark for `basaltctl update` (issue 6), run by
//! `benches/update.sh` (ignored by `cargo test`): in one x86_64 VM under QEMU
//! TCG, the same bundle bytes are first copied raw from the second disk into
//! the inactive root partition with `tar -xO | dd … conv=fsync` (the baseline:
//! what streaming the bytes costs with no verification at all), then
//! installed by `basaltctl update --no-reboot -` (signature, hashes, verity
//! check of the streamed payloads, slot state, trial entry). Printed: both
//! throughputs, their ratio, and the agent's peak RSS (target ≤ 32 MiB).

mod update_support;

use anyhow::{Context, Result, ensure};
use update_support::{boot, bundle, line, setup_with};

const NODE_TOML: &str = "hostname = \"update-bench\"\n";

/// Test-only service: baseline copy, then the agent's install, then poweroff.
const BENCH_DRIVER: &str = r#"# Test-only service for tests/tests/update_bench.rs (not for real images).
exec = ["/bin/sh", "-c", '''
i=0
until /usr/bin/basaltctl status --json | grep -q '"ready": *true' || [ "$i" -ge 900 ]; do i=$((i+1)); sleep 1; done
ms() { read -r up _ < /proc/uptime; echo "${up%.*}${up#*.}0"; }
bytes=$(tar -tvf /dev/vdb update.bundle | awk '{print $3}')
rootb=$(for u in /sys/class/block/*/uevent; do grep -q '^PARTNAME=root-b$' "$u" && sed -n 's/^DEVNAME=//p' "$u"; done)
t0=$(ms)
tar -xOf /dev/vdb update.bundle | dd of=/dev/$rootb bs=1048576 conv=fsync 2>/dev/null
t1=$(ms)
echo "e2e-bench: baseline $bytes bytes in $((t1 - t0)) ms"
tar -xOf /dev/vdb update.bundle | /usr/bin/basaltctl update --no-reboot - 2>&1 | while read -r l; do echo "e2e-bench: update: $l"; done
/usr/bin/basaltctl poweroff
''']
restart = "never"
"#;

#[test]
#[ignore = "benchmark (one QEMU boot, ~3 min): benches/update.sh"]
fn update_install_throughput_and_peak_rss() -> Result<()> {
    let s = setup_with(
        "update_bench",
        NODE_TOML,
        &[("update-bench.toml", BENCH_DRIVER)],
    )?;
    let tar = bundle(&s, "v020", "0.2.0", false, None)?;
    let log = s.dir.join("bench.console.log").display().to_string();
    let lines = boot(&s, "bench", Some(&tar))?;
    let base = line(&lines, "e2e-bench: baseline ", &log)?;
    let upd = line(&lines, "e2e-bench: update: installed", &log)?;
    let num = |text: &str, before: &str| -> Option<f64> {
        let head = text.split(before).next()?;
        head.split_whitespace()
            .last()?
            .trim_start_matches('(')
            .parse()
            .ok()
    };
    let bytes = num(base, " bytes in").context("baseline bytes")?;
    let ms = num(base, " ms").context("baseline ms")?;
    let base_mibs = bytes / 1048576.0 / (ms / 1000.0);
    let agent_mibs = num(upd, " MiB/s").context("agent MiB/s")?;
    let rss_kib = num(upd, " KiB)").context("agent peak RSS")?;
    println!("bench: bundle {:.1} MiB", bytes / 1048576.0);
    println!("bench: baseline (tar | dd conv=fsync) {base_mibs:.1} MiB/s");
    println!(
        "bench: basaltctl update {agent_mibs:.1} MiB/s, peak RSS {rss_kib:.0} KiB (target <= 32768 KiB)"
    );
    println!(
        "bench: ratio update/baseline throughput = {:.2}",
        agent_mibs / base_mibs
    );
    ensure!(rss_kib <= 32.0 * 1024.0, "peak RSS {rss_kib} KiB: {upd}");
    Ok(())
}
