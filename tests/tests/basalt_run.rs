//! `basalt run` (issue 7): boots the x86_64 test image in QEMU with the serial
//! console on its stdout, reaches `basalt: ready`, and forwards a host port to
//! the node's 6443: the Kubernetes stand-in's `/readyz` answers through it.
//!
//! The image is the e2e test image without its test-only services (so it does
//! not power itself off): a copy of tests/images/x86_64.toml whose only extra
//! service is `e2e-net`, a test-only shell service that loads virtio_net and
//! gives eth0 QEMU user networking's fixed guest address (10.0.2.15), because
//! interfaces from the node config are not applied by init yet.

use anyhow::{Context, Result, bail, ensure};
use basalt_tests::{build, repo_root, work_dir};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn http_get(port: u16, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok(reply)
}

#[test]
fn basalt_run_boots_the_test_image_and_forwards_the_api_port() -> Result<()> {
    let dir = work_dir("basalt_run")?;
    let def_text = std::fs::read_to_string(repo_root().join("tests/images/x86_64.toml"))?;
    let def_text: String = def_text
        .lines()
        .map(|l| match l.starts_with("services") {
            true => "services = [\"e2e-net.toml\"]\n".to_string(),
            false => format!("{l}\n"),
        })
        .collect::<String>()
        .replace(
            "name = \"basalt-x86_64-test\"",
            "name = \"basalt-run-test\"",
        );
    std::fs::write(
        dir.join("e2e-net.toml"),
        basalt_tests::QEMU_USER_NET_SERVICE,
    )?;
    let def = dir.join("x86_64-run.toml");
    std::fs::write(&def, def_text)?;
    build::ensure_binaries(&dir)?;
    let img = build::build_image(&def, &dir.join("out")).context("building the image")?;

    let (api, ssh) = (free_port()?, free_port()?);
    // basalt run's temp directory, to see that it leaves nothing there.
    let tmp = dir.join("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let mut child = Killed(
        Command::new(build::basalt_binary())
            .arg("run")
            .arg(&img)
            .args(["--cpus", "1", "--memory", "1024", "--accel", "tcg"])
            .args([
                "--api-port",
                &api.to_string(),
                "--ssh-port",
                &ssh.to_string(),
            ])
            .env("BASALT_ASSETS", basalt_tests::assets::Assets::root())
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting basalt run")?,
    );
    let stdout = child.0.stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(|l| l.ok()) {
            if tx
                .send(String::from_utf8_lossy(&line).into_owned())
                .is_err()
            {
                break;
            }
        }
    });
    let log = dir.join("console.log");
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(420);
    let ready = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains("basalt: ready {") {
                    break line;
                }
            }
            Err(_) => {
                std::fs::write(&log, &seen)?;
                let mut err = String::new();
                if let Some(mut e) = child.0.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                bail!(
                    "no `basalt: ready` from basalt run (console in {}): {err}",
                    log.display()
                );
            }
        }
    };
    std::fs::write(&log, &seen)?;
    ensure!(ready.contains("\"slot\":\"a\""), "{ready}");

    // The host port reaches the node's 6443, where the stand-in answers /readyz.
    let reply = http_get(api, "/readyz").context("GET /readyz through the forwarded port")?;
    ensure!(
        reply.starts_with("HTTP/1.") && reply.contains(" 200 "),
        "{reply}"
    );
    ensure!(reply.trim_end().ends_with("ok"), "{reply}");

    // Killing `basalt run` ends the VM: QEMU replaced it, no VM outlives it
    // (a QEMU child was left running before).
    drop(child);
    let img_arg = img.display().to_string();
    let left: Vec<String> = std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("qemu-system") && c.contains(&img_arg))
        .collect();
    ensure!(
        left.is_empty(),
        "QEMU still running after basalt run was killed: {left:?}"
    );
    // The UEFI variable store's copy was QEMU's open file only: gone with it.
    let kept: Vec<_> = std::fs::read_dir(&tmp)?
        .flatten()
        .map(|e| e.path())
        .collect();
    ensure!(kept.is_empty(), "basalt run left files behind: {kept:?}");

    // `-snapshot` by default: the image file is unchanged by the boot.
    let again = build::build_image(&def, &dir.join("out2"))?;
    ensure!(
        std::fs::read(&img)? == std::fs::read(&again)?,
        "basalt run changed the image file"
    );
    Ok(())
}
