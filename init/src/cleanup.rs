//! What a Kubernetes distribution leaves behind when its process stops,
//! cleaned up at shutdown before the filesystems are unmounted — the steps of
//! `k3s-killall.sh` (REFERENCE.md §8.1) that need no external tools:
//!
//! 1. (the supervisor already stopped the `kubernetes` service)
//! 2. SIGKILL every process tree rooted at a containerd shim started from the
//!    distribution's data directory (`<data dir>/…/containerd-shim*`);
//! 3. unmount, innermost first, everything under `/run/k3s`,
//!    `/var/lib/kubelet/pods`, `/var/lib/kubelet/plugins`, `/run/netns/cni-*`;
//! 4. the `cni-*` network namespaces are those mounts;
//! 5. delete the links enslaved to `cni0`, then `cni0`, `flannel.1`,
//!    `flannel-v6.1`, `kube-ipvs0`, `flannel-wg`, `flannel-wg-v6` (rtnetlink);
//! 6. `/var/lib/cni` is left: it is on the data partition and k3s rewrites it;
//! 7. iptables rules are **skipped** (no iptables binary on the image, and the
//!    rules die with the kernel at reboot): said once on the console.
//!
//! Paths are joined to `root` so tests can run it on a temporary tree.

use std::path::{Path, PathBuf};

use crate::console;
use crate::sys::{self, MntFlags, Signal};

/// Data directories whose containerd shims are killed (k3s, k0s).
pub const DATA_DIRS: &[&str] = &["/var/lib/rancher/k3s", "/var/lib/k0s"];
/// Mount trees to unmount (prefixes; `/run/netns/cni-` matches by name prefix).
pub const MOUNT_PREFIXES: &[&str] = &[
    "/run/k3s",
    "/var/lib/kubelet/pods",
    "/var/lib/kubelet/plugins",
    "/run/netns/cni-",
];
/// Links k3s-killall deletes (after the ones enslaved to `cni0`).
pub const LINKS: &[&str] = &[
    "cni0",
    "flannel.1",
    "flannel-v6.1",
    "kube-ipvs0",
    "flannel-wg",
    "flannel-wg-v6",
];

/// What a cleanup did (for the console and tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cleaned {
    pub killed: Vec<i32>,
    pub unmounted: Vec<PathBuf>,
    pub links: Vec<String>,
}

/// Is `argv0` a containerd shim under one of `data_dirs` (already joined to root)?
pub fn is_shim(argv0: &str, data_dirs: &[PathBuf]) -> bool {
    let p = Path::new(argv0);
    let named = p
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("containerd-shim"));
    named && data_dirs.iter().any(|d| p.starts_with(d))
}

/// (pid, ppid, argv0) of every process in `proc_dir`.
fn processes(proc_dir: &Path) -> Vec<(i32, i32, String)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(proc_dir) else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`: comm may hold spaces and parens.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let argv0 = std::fs::read(e.path().join("cmdline"))
            .ok()
            .map(|c| {
                let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
                String::from_utf8_lossy(&c[..end]).into_owned()
            })
            .unwrap_or_default();
        out.push((pid, ppid, argv0));
    }
    out
}

/// The kernel's flag for its own threads in `/proc/<pid>/stat` (`PF_KTHREAD`).
const PF_KTHREAD: u64 = 0x0020_0000;

/// Pids in `proc_dir` of the processes left besides PID 1 and the kernel's
/// own threads (zombies included: they are gone only once reaped). What
/// shutdown waits for: `kill(-1, 0)` cannot tell, it counts the kernel's
/// threads too and so never says "none left".
pub fn user_processes(proc_dir: &Path) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir(proc_dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid <= 1 {
            continue;
        }
        // Gone between the listing and the read: not left.
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid pgrp session tty_nr tpgid flags ...`
        let flags = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(6))
            .and_then(|s| s.parse::<u64>().ok());
        // Unreadable flags: counted as left (waiting is the safe side).
        if flags.is_none_or(|f| f & PF_KTHREAD == 0) {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}

/// Shim pids and all their descendants.
pub fn shim_trees(proc_dir: &Path, data_dirs: &[PathBuf]) -> Vec<i32> {
    let procs = processes(proc_dir);
    let mut set: Vec<i32> = procs
        .iter()
        .filter(|(_, _, a)| is_shim(a, data_dirs))
        .map(|(p, _, _)| *p)
        .collect();
    loop {
        let more: Vec<i32> = procs
            .iter()
            .filter(|(p, pp, _)| set.contains(pp) && !set.contains(p))
            .map(|(p, _, _)| *p)
            .collect();
        if more.is_empty() {
            break;
        }
        set.extend(more);
    }
    set
}

/// Mount points from `mountinfo` text under one of `prefixes`, innermost
/// (reverse-sorted) first. Octal escapes (`\040`) are decoded.
pub fn mounts_under(mountinfo: &str, prefixes: &[PathBuf]) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|m| PathBuf::from(crate::mounts::unescape_octal(m)))
        .filter(|m| {
            let s = m.to_string_lossy();
            prefixes.iter().any(|p| {
                let ps = p.to_string_lossy();
                if ps.ends_with('-') {
                    s.starts_with(ps.as_ref())
                } else {
                    m.starts_with(p)
                }
            })
        })
        .collect();
    v.sort();
    v.dedup();
    v.reverse();
    v
}

/// Links enslaved to `bridge` (`/sys/class/net/<bridge>/brif/*`).
fn bridge_ports(sys_net: &Path, bridge: &str) -> Vec<String> {
    std::fs::read_dir(sys_net.join(bridge).join("brif"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Run the cleanup with paths under `root` (`/` on a device).
pub fn kubernetes_leftovers(root: &Path, proc_dir: &Path) -> Cleaned {
    let join = |p: &str| root.join(p.trim_start_matches('/'));
    let mut done = Cleaned::default();

    // 2. Shim trees, SIGKILL (they ignore the orderly stop by design).
    let dirs: Vec<PathBuf> = DATA_DIRS.iter().map(|d| join(d)).collect();
    for pid in shim_trees(proc_dir, &dirs) {
        if sys::kill(pid, Signal::SIGKILL).is_ok() {
            done.killed.push(pid);
        }
    }
    if !done.killed.is_empty() {
        // Give the kernel a moment to tear them down; PID 1 reaps them later.
        std::thread::sleep(std::time::Duration::from_millis(100));
        while sys::reap_one().is_some() {}
    }

    // 3./4. Mounts, innermost first; a busy one is detached.
    let prefixes: Vec<PathBuf> = MOUNT_PREFIXES
        .iter()
        .map(|p| {
            // keep the trailing '-' of a name prefix after joining
            let j = join(p);
            if p.ends_with('-') && !j.to_string_lossy().ends_with('-') {
                PathBuf::from(format!("{}-", j.display()))
            } else {
                j
            }
        })
        .collect();
    let info = std::fs::read_to_string(proc_dir.join("self/mountinfo")).unwrap_or_default();
    for m in mounts_under(&info, &prefixes) {
        let r =
            sys::umount(&m, MntFlags::MNT_FORCE).or_else(|_| sys::umount(&m, MntFlags::MNT_DETACH));
        match r {
            Ok(()) => done.unmounted.push(m),
            Err(e) => console::error("k8s-cleanup", format_args!("umount {} ({e})", m.display())),
        }
    }

    // 5. Links.
    let sys_net = join("/sys/class/net");
    let mut links = bridge_ports(&sys_net, "cni0");
    links.extend(LINKS.iter().map(|s| s.to_string()));
    for l in links {
        match sys::netlink::delete_link(&l) {
            Ok(()) => done.links.push(l),
            Err(sys::Errno::ENODEV) => {}
            Err(e) => console::error("k8s-cleanup", format_args!("delete link {l} ({e})")),
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_processes_leave_out_pid_1_and_kernel_threads() {
        let t = tempfile::tempdir().unwrap();
        let proc = |pid: &str, stat: &str| {
            std::fs::create_dir(t.path().join(pid)).unwrap();
            std::fs::write(t.path().join(pid).join("stat"), stat).unwrap();
        };
        // Lines as Linux 6.1 writes them (flags: the ninth field).
        proc(
            "1",
            "1 (init) S 0 1 1 0 -1 4194560 900 0 0 0 5 9 0 0 20 0 1 0 1 2621440 120 18446744073709551615",
        );
        proc(
            "2",
            "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 1 0 0 18446744073709551615",
        );
        proc(
            "17",
            "17 (kworker/0:1-events) I 2 0 0 0 -1 69238880 0 0 0 0 0 0 0 0 20 0 1 0 2 0 0",
        );
        proc(
            "88",
            "88 (k3s server) S 1 88 88 0 -1 4194560 50 0 0 0 1 1 0 0 20 0 3 0 300 1000 20",
        );
        proc(
            "90",
            "90 (a (weird) name) Z 88 88 88 0 -1 4227140 0 0 0 0 0 0 0 0 20 0 1 0 301 0 0",
        );
        proc("91", "91 (truncated");
        std::fs::create_dir(t.path().join("self")).unwrap();
        std::fs::write(t.path().join("uptime"), "1.0 1.0").unwrap();
        assert_eq!(user_processes(t.path()), [88, 90, 91]);
        for p in ["88", "90", "91"] {
            std::fs::remove_dir_all(t.path().join(p)).unwrap();
        }
        assert_eq!(user_processes(t.path()), Vec::<i32>::new());
        assert_eq!(user_processes(&t.path().join("absent")), Vec::<i32>::new());
    }

    #[test]
    fn user_processes_of_this_machine_include_this_test() {
        let me = i32::try_from(std::process::id()).unwrap();
        let left = user_processes(Path::new("/proc"));
        assert!(left.contains(&me), "{left:?}");
        // The kernel's thread daemon, where this runs on a Linux host with a
        // visible pid 2 (not in a pid namespace of its own).
        if std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd") {
            assert!(!left.contains(&2), "{left:?}");
        }
    }

    #[test]
    fn shim_names() {
        let dirs = [PathBuf::from("/var/lib/rancher/k3s")];
        assert!(is_shim(
            "/var/lib/rancher/k3s/data/abc/bin/containerd-shim-runc-v2",
            &dirs
        ));
        assert!(!is_shim("/usr/bin/containerd-shim-runc-v2", &dirs));
        assert!(!is_shim("/var/lib/rancher/k3s/data/abc/bin/k3s", &dirs));
    }

    #[test]
    fn mount_selection_innermost_first() {
        let info = "\
22 1 0:1 / / rw - ext4 x rw
30 22 0:2 / /run/k3s/containerd rw - tmpfs t rw
31 30 0:3 / /run/k3s/containerd/io.containerd/x rw - overlay o rw
32 22 0:4 / /var/lib/kubelet/pods/p1/volumes/v rw - tmpfs t rw
33 22 0:5 / /run/netns/cni-1234 rw - nsfs n rw
34 22 0:6 / /run/netns/other rw - nsfs n rw
35 22 0:7 / /var/lib/kubelet/podsx rw - tmpfs t rw
";
        let p: Vec<PathBuf> = MOUNT_PREFIXES.iter().map(PathBuf::from).collect();
        let got = mounts_under(info, &p);
        assert_eq!(
            got,
            vec![
                PathBuf::from("/var/lib/kubelet/pods/p1/volumes/v"),
                PathBuf::from("/run/netns/cni-1234"),
                PathBuf::from("/run/k3s/containerd/io.containerd/x"),
                PathBuf::from("/run/k3s/containerd"),
            ]
        );
    }
}
