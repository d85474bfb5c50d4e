//! The command the fleet rollout runs (deploy/system-upgrade-controller,
//! docs/fleet-updates.md): `basaltctl update --wait <http-url>`, end to end
//! under QEMU. The test serves the bundle over plain HTTP from the host
//! (QEMU user networking: the host is 10.0.2.2); the node fetches it with
//! busybox `wget`. First run: installs and reboots (the command never
//! returns: the reboot ends it). Second run, on the trial boot: waits for the
//! health gate and exits 0 once the slot committed. A third run on the
//! committed node exits 0 at once without installing again.

mod update_support;

use anyhow::{Context, Result, ensure};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use update_support::{boot_with, bundle_file, line, setup_with, slot, status};

/// Test-only: what a system-upgrade-controller Job runs, then status and poweroff.
/// The first run's output goes straight to the service's log (see
/// update_support's driver: a prefixing loop can be killed by the reboot
/// before it echoes).
const WAIT_DRIVER: &str = r#"# Test-only (tests/tests/update_wait.rs): the fleet Plan's command.
exec = ["/bin/sh", "-c", '''
i=0
until /usr/bin/basaltctl status --json | grep -q '"ready": *true' || [ "$i" -ge 900 ]; do i=$((i+1)); sleep 1; done
sleep 2
url=$(cat /boot/update-url)
/usr/bin/basaltctl update --wait "$url" 2>&1
echo "e2e-wait: exit done"
/usr/bin/basaltctl update --wait "$url"; echo "e2e-wait: exit $?"
echo "e2e-update: status $(/usr/bin/basaltctl status --json | tr -d '\n')"
/usr/bin/basaltctl poweroff
''']
after = ["e2e-net"]
restart = "never"
"#;

const NODE_TOML: &str = "hostname = \"wait-node\"\n[update.health_gate]\ntimeout_seconds = 300\n";

/// Serve `body` to every GET; count requests.
fn serve(body: Vec<u8>) -> Result<(u16, Arc<AtomicUsize>)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let body = Arc::new(body);
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let body = body.clone();
            h.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut r = BufReader::new(&s);
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let mut w = &s;
                let _ = write!(
                    w,
                    "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = w.write_all(&body);
            });
        }
    });
    Ok((port, hits))
}

#[test]
fn update_wait_over_http_installs_then_reports_the_commit() -> Result<()> {
    let s = setup_with(
        "update_wait",
        NODE_TOML,
        &[
            ("e2e-net.toml", basalt_tests::QEMU_USER_NET_SERVICE),
            ("wait-driver.toml", WAIT_DRIVER),
        ],
    )?;
    let file = bundle_file(&s, "v020", "0.2.0", false, None)?;
    let (port, hits) = serve(std::fs::read(&file)?)?;
    basalt_tests::disk::write_on_esp(
        &s.img,
        "update-url",
        &format!("http://10.0.2.2:{port}/basalt/x86_64/update.bundle\n"),
    )?;
    let nic = [
        "-netdev",
        "user,id=n0",
        "-device",
        "virtio-net-pci,netdev=n0",
    ];
    let log = |n: &str| s.dir.join(format!("{n}.console.log")).display().to_string();

    // Run 1: install, reboot; the command does not return.
    let l = boot_with(&s, "boot1", None, &nic)?;
    let got = line(&l, "installed 0.2.0 into slot b", &log("boot1"))?;
    ensure!(got.contains("Run this command again"), "{got}");
    line(&l, "basalt: shutdown reboot", &log("boot1"))?;
    ensure!(
        !l.iter().any(|x| x.contains("e2e-wait: exit")),
        "update --wait returned before the reboot (log {})",
        log("boot1")
    );
    ensure!(
        hits.load(Ordering::SeqCst) >= 1,
        "no HTTP request reached the host"
    );

    // Run 2, on the trial boot: waits for the gate, exits 0 after the commit.
    let l = boot_with(&s, "boot2", None, &nic)?;
    line(&l, "basalt: update committed slot b", &log("boot2"))?;
    line(&l, "0.2.0 committed in slot b", &log("boot2"))?;
    let again = line(&l, "e2e-wait: exit ", &log("boot2"))?;
    ensure!(
        l.iter()
            .any(|x| x == "e2e-wait: exit 0" || x.ends_with("e2e-wait: exit 0")),
        "second --wait did not exit 0: {again} (log {})",
        log("boot2")
    );
    let st = status(&l, &log("boot2")).context("status after --wait")?;
    ensure!(st["slot"] == "b" && slot(&st, "b").0 == "good", "{st}");
    ensure!(st["slots"]["primary"] == "b", "{st}");
    Ok(())
}
