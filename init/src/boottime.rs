//! `basaltctl boot-time`: the boot's phases, like `systemd-analyze`.
//! Firmware and loader times come from systemd-boot's EFI variables
//! (`LoaderTimeInitUSec`, `LoaderTimeExecUSec`: µs since the CPU's reset
//! counter started, as UTF-16 decimal) when efivarfs is mounted; the kernel
//! and stage 1 from the stage 1 handoff; stage 2 from its own phase timer;
//! Kubernetes exec/ready and "ready" from the supervisor. All instants other
//! than the firmware ones are ms since the kernel started (`CLOCK_BOOTTIME`).

use std::fmt::Write as _;
use std::path::Path;

/// systemd-boot's vendor GUID for its variables.
pub const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";

/// Stage 1 steps in the order they run (the handoff stores them by name).
pub const STAGE1_ORDER: &[&str] = &[
    "mounts",
    "modules",
    "wait_devices",
    "verity",
    "mount_root",
    "grow_data",
    "mount_data",
    "etc",
    "boot_run",
];

/// Everything known about this boot's timing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootTimes {
    /// (firmware µs until the loader started, loader µs until it exec'd the kernel).
    pub firmware_loader_us: Option<(u64, u64)>,
    pub stage1_start_ms: u64,
    pub stage1_end_ms: u64,
    pub stage1_steps: Vec<(String, u64)>,
    /// Threads stage 1's `modules` step loaded on (shown when more than one).
    pub module_threads: usize,
    pub stage2_end_ms: u64,
    pub stage2_steps: Vec<(String, u64)>,
    /// PID 1's CPU time (user µs, system µs) when stage 1 started: what the
    /// kernel spent in the init task before it ran init, subtracted from
    /// init's own figures.
    pub stage1_cpu_us: (u64, u64),
}

/// An EFI variable as efivarfs shows it: 4 attribute bytes, then the value;
/// systemd-boot's times are NUL-terminated UTF-16LE decimal strings.
pub fn parse_loader_usec(raw: &[u8]) -> Option<u64> {
    let v = raw.get(4..)?;
    let units: Vec<u16> = v
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16(&units).ok()?.trim().parse().ok()
}

/// Firmware and loader durations from the variables under `efivars`.
pub fn read_firmware(efivars: &Path) -> Option<(u64, u64)> {
    let read = |name: &str| {
        std::fs::read(efivars.join(format!("{name}-{LOADER_GUID}")))
            .ok()
            .and_then(|r| parse_loader_usec(&r))
    };
    let init = read("LoaderTimeInitUSec")?;
    let exec = read("LoaderTimeExecUSec")?;
    Some((init, exec.saturating_sub(init)))
}

fn ms(v: u64) -> String {
    format!("{}.{:03}s", v / 1000, v % 1000)
}

/// The split of PID 1's time from its start to the Kubernetes exec
/// (`wall_ms`): its own code (user CPU), inside the kernel calls it makes
/// (system CPU: module loading, mounts, device-mapper, page faults), and the
/// rest, waiting (for devices, disk reads, sleeps). CPU time is summed
/// over PID 1's threads (stage 1 loads modules on several): when it exceeds
/// the wall time, there is no "waiting" to tell, and the line says so.
pub fn render_cpu(wall_ms: u64, (user_us, sys_us): (u64, u64)) -> String {
    let (user, sys) = (user_us / 1000, sys_us / 1000);
    let rest = match wall_ms.checked_sub(user + sys) {
        Some(waiting) => format!("{} waiting", ms(waiting)),
        None => "CPU time summed over threads, above the wall time".to_string(),
    };
    format!(
        "init until kubernetes exec {}: {} own code (user CPU), {} in kernel calls (system CPU), {rest}\n",
        ms(wall_ms),
        ms(user),
        ms(sys),
    )
}

/// The report. `k8s_exec`/`k8s_ready`/`ready` are instants (ms since kernel start).
pub fn render(
    t: &BootTimes,
    k8s_exec: Option<u64>,
    k8s_ready: Option<u64>,
    ready: Option<u64>,
) -> String {
    let mut s = String::new();
    let mut total = Vec::new();
    match t.firmware_loader_us {
        Some((fw, ld)) => {
            let _ = writeln!(s, "firmware          {}", ms(fw / 1000));
            let _ = writeln!(s, "loader            {}", ms(ld / 1000));
            total.push(format!("{} (firmware)", ms(fw / 1000)));
            total.push(format!("{} (loader)", ms(ld / 1000)));
        }
        None => {
            let _ = writeln!(
                s,
                "firmware          unknown (no systemd-boot EFI variables)"
            );
        }
    }
    let _ = writeln!(s, "kernel            {}", ms(t.stage1_start_ms));
    total.push(format!("{} (kernel)", ms(t.stage1_start_ms)));
    let s1 = t.stage1_end_ms.saturating_sub(t.stage1_start_ms);
    let _ = writeln!(s, "stage 1           {}", ms(s1));
    for (name, d) in &t.stage1_steps {
        let _ = write!(s, "  {name:<15} {}", ms(*d));
        if name == "modules" && t.module_threads > 1 {
            let _ = write!(s, " ({} threads)", t.module_threads);
        }
        s.push('\n');
    }
    total.push(format!("{} (stage 1)", ms(s1)));
    let s2 = t.stage2_end_ms.saturating_sub(t.stage1_end_ms);
    let _ = writeln!(s, "stage 2           {}", ms(s2));
    for (name, d) in &t.stage2_steps {
        let _ = writeln!(s, "  {name:<15} {}", ms(*d));
    }
    total.push(format!("{} (stage 2)", ms(s2)));
    match k8s_exec {
        Some(e) => {
            let _ = writeln!(s, "kubernetes exec   at {}", ms(e));
        }
        None => {
            let _ = writeln!(s, "kubernetes exec   not yet");
        }
    }
    match (k8s_exec, k8s_ready) {
        (Some(e), Some(r)) => {
            let _ = writeln!(
                s,
                "kubernetes ready  at {} (+{} after exec)",
                ms(r),
                ms(r.saturating_sub(e))
            );
            total.push(format!(
                "{} (kubernetes)",
                ms(r.saturating_sub(t.stage2_end_ms))
            ));
        }
        _ => {
            let _ = writeln!(s, "kubernetes ready  not yet");
        }
    }
    match ready {
        Some(r) => {
            let _ = writeln!(s, "ready             at {} since the kernel started", ms(r));
        }
        None => {
            let _ = writeln!(s, "ready             not yet");
        }
    }
    let _ = writeln!(s, "Startup finished in {}", total.join(" + "));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn efi_variable_value() {
        let mut raw = vec![7, 0, 0, 0];
        for u in "1234567".encode_utf16().chain([0]) {
            raw.extend_from_slice(&u.to_le_bytes());
        }
        assert_eq!(parse_loader_usec(&raw), Some(1_234_567));
        assert_eq!(parse_loader_usec(&[7, 0, 0]), None);
    }

    #[test]
    fn firmware_from_files() {
        let d = tempfile::tempdir().unwrap();
        let put = |name: &str, v: &str| {
            let mut raw = vec![6, 0, 0, 0];
            for u in v.encode_utf16().chain([0]) {
                raw.extend_from_slice(&u.to_le_bytes());
            }
            std::fs::write(d.path().join(format!("{name}-{LOADER_GUID}")), raw).unwrap();
        };
        assert_eq!(read_firmware(d.path()), None);
        put("LoaderTimeInitUSec", "2000000");
        put("LoaderTimeExecUSec", "2500000");
        assert_eq!(read_firmware(d.path()), Some((2_000_000, 500_000)));
    }

    #[test]
    fn report_has_every_phase() {
        let t = BootTimes {
            firmware_loader_us: Some((2_000_000, 500_000)),
            stage1_start_ms: 1200,
            stage1_end_ms: 1800,
            stage1_steps: vec![("modules".into(), 300)],
            module_threads: 2,
            stage2_end_ms: 2000,
            stage2_steps: vec![("machine-id".into(), 5)],
            stage1_cpu_us: (0, 0),
        };
        let r = render(&t, Some(2050), Some(3050), Some(3100));
        for want in [
            "firmware          2.000s",
            "loader            0.500s",
            "kernel            1.200s",
            "stage 1           0.600s",
            "  modules         0.300s (2 threads)\n",
            "stage 2           0.200s",
            "kubernetes exec   at 2.050s",
            "(+1.000s after exec)",
            "Startup finished in 2.000s (firmware) + 0.500s (loader) + 1.200s (kernel)",
        ] {
            assert!(r.contains(want), "{want:?} not in\n{r}");
        }
        assert!(
            render(&BootTimes::default(), None, None, None).contains("firmware          unknown")
        );
    }

    #[test]
    fn cpu_split_waiting_is_the_rest() {
        assert_eq!(
            render_cpu(600, (12_345, 200_000)),
            "init until kubernetes exec 0.600s: 0.012s own code (user CPU), 0.200s in kernel calls (system CPU), 0.388s waiting\n"
        );
        assert!(render_cpu(9, (9_000, 0)).ends_with("0.000s waiting\n"));
        // CPU above the wall time (threads): no negative or zero "waiting".
        assert!(
            render_cpu(400, (100_000, 350_000))
                .ends_with("0.350s in kernel calls (system CPU), CPU time summed over threads, above the wall time\n")
        );
    }
}
