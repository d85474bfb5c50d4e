//! k3s-killall-style cleanup at shutdown (`basalt_init::cleanup`), in user,
//! PID, mount and network namespaces: fake containerd shims (a copy of
//! /bin/sh named `containerd-shim-runc-v2` under the k3s data dir, with
//! children), tmpfs mounts under /run/k3s, /var/lib/kubelet/pods and
//! /run/netns/cni-*, and cni0 (with an enslaved veth) and flannel.1 links.
//! Everything of Kubernetes goes; a decoy process, mount and link stay.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

const ROLE: &str = "BASALT_CLEANUP_INNER";

fn sh(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .is_ok_and(|s| s.success())
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

fn inner() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    let shim_dir = root.join("var/lib/rancher/k3s/data/abc/bin");
    std::fs::create_dir_all(&shim_dir).unwrap();
    let shim = shim_dir.join("containerd-shim-runc-v2");
    std::fs::copy("/bin/sh", &shim).unwrap();
    let mut shim_proc = Command::new(&shim)
        .args(["-c", "sleep 1000 & sleep 1000 & wait"])
        .spawn()
        .unwrap();
    let mut decoy = Command::new("sleep").arg("1000").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let kids: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .nth(1)?
                        .parse::<u32>()
                        .ok()
                })
                == Some(shim_proc.id())
        })
        .collect();
    assert_eq!(kids.len(), 2, "the fake shim should have two children");

    let mnt = |p: &str| {
        let d = root.join(p);
        std::fs::create_dir_all(&d).unwrap();
        assert!(
            sh(&format!("mount -t tmpfs tmpfs '{}'", d.display())),
            "mount {p}"
        );
        d
    };
    mnt("run/k3s/containerd");
    mnt("run/k3s/containerd/io.containerd.runtime.v2.task/k8s.io/x");
    mnt("var/lib/kubelet/pods/p1/volumes/v");
    mnt("var/lib/kubelet/plugins/csi");
    mnt("run/netns/cni-1234");
    let keep = mnt("run/netns/other");
    std::fs::create_dir_all(root.join("sys")).unwrap();
    assert!(sh(&format!(
        "mount -t sysfs sysfs '{}'",
        root.join("sys").display()
    )));
    assert!(sh(
        "ip link add cni0 type bridge && ip link add veth0 type veth peer name veth1 \
                && ip link set veth0 master cni0 && ip link add keep0 type bridge"
    ));
    let vxlan = sh("ip link add flannel.1 type vxlan id 1 dstport 8472");

    let done = basalt_init::cleanup::kubernetes_leftovers(root, Path::new("/proc"));
    eprintln!("cleaned: {done:?}");

    std::thread::sleep(Duration::from_millis(200));
    assert!(!alive(shim_proc.id()), "shim still alive");
    for k in &kids {
        assert!(!alive(*k), "shim child {k} still alive");
    }
    assert!(alive(decoy.id()), "the decoy was killed");
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for gone in [
        "run/k3s",
        "var/lib/kubelet/pods",
        "var/lib/kubelet/plugins",
        "run/netns/cni-",
    ] {
        let p = root.join(gone).display().to_string();
        assert!(!info.contains(&p), "{gone} still mounted:\n{info}");
    }
    assert!(
        info.contains(&keep.display().to_string()),
        "run/netns/other was unmounted"
    );
    let links = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["-br", "link"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    for gone in ["cni0", "veth0", "veth1"] {
        assert!(!links.contains(gone), "{gone} still there:\n{links}");
    }
    if vxlan {
        assert!(
            !links.contains("flannel.1"),
            "flannel.1 still there:\n{links}"
        );
    }
    assert!(links.contains("keep0"), "keep0 deleted:\n{links}");
    assert_eq!(done.killed.len(), 3, "{done:?}");
    assert_eq!(done.unmounted.len(), 5, "{done:?}");
    let _ = decoy.kill();
    let _ = decoy.wait();
    let _ = shim_proc.wait();
    println!("INNER OK");
}

#[test]
fn kubernetes_leftovers_are_cleaned_in_namespaces() {
    if std::env::var_os(ROLE).is_some() {
        inner();
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .args([
            "--user",
            "--map-root-user",
            "--pid",
            "--fork",
            "--mount",
            "--mount-proc",
            "--net",
        ])
        .arg(&exe)
        .args([
            "--exact",
            "kubernetes_leftovers_are_cleaned_in_namespaces",
            "--nocapture",
        ])
        .env(ROLE, "1")
        .output()
        .expect("unshare (util-linux) is required for this test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("INNER OK"), "{text}");
}
