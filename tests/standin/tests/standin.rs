//! The stand-in as a process: files it writes, what it records, its readiness
//! endpoint seen through its own kubectl subcommand, agents joining, SIGTERM.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_k8s-standin");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running stand-in whose stdout lines arrive on a channel; killed on drop.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    fn start(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines }
    }

    /// The first line containing `needle`, within `timeout`.
    fn expect(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(l) => seen.push(l),
                Err(_) => panic!("no line with {needle:?} within {timeout:?}; saw {seen:#?}"),
            }
        }
    }

    fn sigterm_and_wait(&mut self) -> std::process::ExitStatus {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "stand-in ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kubectl(dist: &str, extra: &[&str], env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg(dist).arg("kubectl").arg("get").args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn received_json(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("standin-received.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn wait_ready(dist: &str, kc: &[&str], env: &[(&str, String)]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut args = vec!["--raw=/readyz"];
        args.extend_from_slice(kc);
        if kubectl(dist, &args, env).status.success() {
            return;
        }
        assert!(Instant::now() < deadline, "server never became ready");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn k3s_server_writes_files_records_and_serves_readyz() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let kc = tmp.path().join("etc/k3s.yaml");
    let config = tmp.path().join("config.yaml");
    std::fs::write(
        &config,
        "node-label:\n  - \"from=config\"\ndisable: [traefik]\nwrite-kubeconfig-mode: \"0644\"\n",
    )
    .unwrap();
    let port = free_port();
    let mut cmd = Command::new(BIN);
    cmd.arg0("/usr/bin/k3s")
        .args(["server", "--data-dir"])
        .arg(&data)
        .arg("--config")
        .arg(&config)
        .args(["--token", "sekrit", "--node-label", "a=b", "--node-taint"])
        .args([
            "dedicated=x:NoSchedule",
            "--disable=servicelb",
            "--flannel-backend",
            "none",
        ])
        .arg("--write-kubeconfig")
        .arg(&kc)
        .env("K8S_STANDIN_PORT", port.to_string())
        .env("K8S_STANDIN_DELAY_MS", "1500")
        .env("K3S_NODE_NAME", "node-1")
        .env_remove("K3S_TOKEN");
    let mut run = Running::start(cmd);
    let banner = run.expect("k8s-standin:", Duration::from_secs(5));
    assert!(banner.contains("STAND-IN for k3s"), "{banner}");
    let line = run.expect("k8s-standin: received ", Duration::from_secs(5));
    let console: serde_json::Value =
        serde_json::from_str(line.split_once("received ").unwrap().1).unwrap();

    // During the start-up delay the server is not ready: kubectl fails.
    let kcs = kc.to_str().unwrap().to_string();
    let early = kubectl("k3s", &["--raw=/readyz", "--kubeconfig", &kcs], &[]);
    assert!(!early.status.success(), "ready before the start-up delay");

    // Files k3s writes.
    let node_token = std::fs::read_to_string(data.join("server/node-token")).unwrap();
    assert!(
        node_token.trim().ends_with("::server:sekrit"),
        "{node_token}"
    );
    assert_eq!(mode(&data.join("server/node-token")), 0o600);
    let kubeconfig = std::fs::read_to_string(&kc).unwrap();
    assert!(kubeconfig.contains(&format!("server: http://127.0.0.1:{port}")));
    assert_eq!(
        mode(&kc),
        0o644,
        "--write-kubeconfig-mode from the config file"
    );

    // The record: file and console line agree, and hold everything given.
    let rec = received_json(&data);
    assert_eq!(rec, console);
    assert_eq!(rec["standin"], true);
    assert_eq!(rec["distribution"], "k3s");
    assert_eq!(rec["role"], "server");
    assert_eq!(rec["argv"][0], "/usr/bin/k3s");
    assert_eq!(rec["flags"]["node-label"], serde_json::json!(["a=b"]));
    assert_eq!(
        rec["flags"]["node-taint"],
        serde_json::json!(["dedicated=x:NoSchedule"])
    );
    assert_eq!(rec["flags"]["disable"], serde_json::json!(["servicelb"]));
    assert_eq!(rec["flags"]["flannel-backend"], serde_json::json!(["none"]));
    assert_eq!(rec["env"]["K3S_NODE_NAME"], "node-1");
    assert_eq!(rec["token"], "sekrit");
    assert_eq!(rec["data_dir"], data.to_str().unwrap());
    assert_eq!(rec["config"]["path"], config.to_str().unwrap());
    assert_eq!(
        rec["config"]["values"]["node-label"],
        serde_json::json!(["from=config"])
    );
    assert_eq!(
        rec["config"]["values"]["disable"],
        serde_json::json!(["traefik"])
    );
    assert!(
        rec["config"]["content"]
            .as_str()
            .unwrap()
            .starts_with("node-label:")
    );

    // Ready: both spellings of --raw, through the kubeconfig and through KUBECONFIG.
    run.expect("k8s-standin: serving", Duration::from_secs(10));
    wait_ready("k3s", &["--kubeconfig", &kcs], &[]);
    let ok = kubectl("k3s", &["--raw", "/readyz"], &[("KUBECONFIG", kcs.clone())]);
    assert!(ok.status.success());
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "ok");
    let livez = kubectl("k3s", &["--raw=/livez", "--kubeconfig", &kcs], &[]);
    assert!(livez.status.success());
    let missing = kubectl("k3s", &["--raw=/nope", "--kubeconfig", &kcs], &[]);
    assert_eq!(missing.status.code(), Some(1));
    let version = kubectl("k3s", &["--raw=/version", "--kubeconfig", &kcs], &[]);
    let v: serde_json::Value = serde_json::from_slice(&version.stdout).unwrap();
    assert_eq!(v["standin"], true);

    // SIGTERM: clean exit 0; afterwards kubectl fails.
    let st = run.sigterm_and_wait();
    assert_eq!(st.code(), Some(0), "signal: {:?}", st.signal());
    let down = kubectl("k3s", &["--raw=/readyz", "--kubeconfig", &kcs], &[]);
    assert!(!down.status.success());
}

#[test]
fn kubectl_without_a_server_fails() {
    let tmp = tempfile::tempdir().unwrap();
    // No kubeconfig at all.
    let kc = tmp.path().join("absent.yaml");
    let out = kubectl(
        "k3s",
        &["--raw=/readyz", "--kubeconfig", kc.to_str().unwrap()],
        &[],
    );
    assert!(!out.status.success());
    // A kubeconfig naming a port nobody listens on.
    let port = free_port();
    std::fs::write(
        &kc,
        format!("clusters:\n- cluster:\n    server: https://127.0.0.1:{port}\n"),
    )
    .unwrap();
    let out = kubectl(
        "k0s",
        &["--raw=/readyz", "--kubeconfig", kc.to_str().unwrap()],
        &[],
    );
    assert!(!out.status.success());
    // Something other than `get --raw` is refused.
    let out = Command::new(BIN)
        .args(["k3s", "kubectl", "get", "nodes"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn k0s_controller_and_worker_join() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("k0s");
    let port = free_port();
    let kubelet_port = free_port();
    let mut cmd = Command::new(BIN);
    cmd.arg0("k0s")
        .args(["controller", "--single", "--data-dir"])
        .arg(&data)
        .env("K8S_STANDIN_PORT", port.to_string())
        .env("K8S_STANDIN_DELAY_MS", "0");
    let mut controller = Running::start(cmd);
    controller.expect("k8s-standin: serving", Duration::from_secs(10));
    let admin = data.join("pki/admin.conf");
    assert_eq!(mode(&admin), 0o600);
    let rec = received_json(&data);
    assert_eq!(rec["distribution"], "k0s");
    assert_eq!(rec["role"], "controller");
    assert_eq!(rec["flags"]["single"], serde_json::json!(["true"]));
    // k0s kubectl finds admin.conf through --data-dir.
    let out = Command::new(BIN)
        .args(["k0s", "kubectl", "get", "--raw=/readyz", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");

    // A worker with a token from `k0s token create` joins.
    let tok = Command::new(BIN)
        .args(["k0s", "token", "create", "--role=worker", "--data-dir"])
        .arg(&data)
        .env("K8S_STANDIN_PORT", port.to_string())
        .env("K8S_STANDIN_ADDRESS", "127.0.0.1")
        .output()
        .unwrap();
    assert!(tok.status.success(), "{tok:?}");
    let token_file = tmp.path().join("join-token");
    std::fs::write(&token_file, &tok.stdout).unwrap();
    let wdata = tmp.path().join("worker");
    let mut cmd = Command::new(BIN);
    cmd.args(["k0s", "worker", "--data-dir"])
        .arg(&wdata)
        .arg("--token-file")
        .arg(&token_file)
        .env("K8S_STANDIN_KUBELET_PORT", kubelet_port.to_string());
    let worker = Running::start(cmd);
    worker.expect(
        &format!("k8s-standin: joined https://127.0.0.1:{port}"),
        Duration::from_secs(10),
    );
    worker.expect("serving plain HTTP", Duration::from_secs(5));
    let wrec = received_json(&wdata);
    assert_eq!(wrec["role"], "worker");
    assert_eq!(wrec["server_url"], format!("https://127.0.0.1:{port}"));
    drop(worker);
    let st = controller.sigterm_and_wait();
    assert_eq!(st.code(), Some(0));
}

#[test]
fn k3s_agent_token_is_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cmd = Command::new(BIN);
    cmd.args(["k3s", "server", "--token", "right", "--data-dir"])
        .arg(tmp.path().join("server"))
        .arg("--write-kubeconfig")
        .arg(tmp.path().join("k3s.yaml"))
        .env("K8S_STANDIN_PORT", port.to_string())
        .env("K8S_STANDIN_DELAY_MS", "0");
    let server = Running::start(cmd);
    server.expect("k8s-standin: serving", Duration::from_secs(10));
    let url = format!("https://127.0.0.1:{port}");

    // A second server on the same data dir without --token keeps the token.
    let port2 = free_port();
    let mut cmd = Command::new(BIN);
    cmd.args(["k3s", "server", "--data-dir"])
        .arg(tmp.path().join("server"))
        .arg("--write-kubeconfig")
        .arg(tmp.path().join("k3s-2.yaml"))
        .env("K8S_STANDIN_PORT", port2.to_string())
        .env("K8S_STANDIN_DELAY_MS", "0")
        .env_remove("K3S_TOKEN");
    let again = Running::start(cmd);
    again.expect("k8s-standin: serving", Duration::from_secs(10));
    let kept = std::fs::read_to_string(tmp.path().join("server/server/node-token")).unwrap();
    assert!(kept.trim().ends_with("::server:right"), "{kept}");
    drop(again);

    // Wrong token: the agent reports the rejection and keeps retrying.
    let mut cmd = Command::new(BIN);
    cmd.args([
        "k3s",
        "agent",
        "--server",
        &url,
        "--token",
        "wrong",
        "--data-dir",
    ])
    .arg(tmp.path().join("bad"))
    .env("K8S_STANDIN_KUBELET_PORT", free_port().to_string());
    let bad = Running::start(cmd);
    bad.expect("answered 401", Duration::from_secs(10));

    // Right token through --token-file (the full node-token form).
    let node_token = tmp.path().join("server/server/node-token");
    let mut cmd = Command::new(BIN);
    cmd.arg0("k3s")
        .args(["agent", "--server", &url, "--token-file"])
        .arg(&node_token)
        .arg("--data-dir")
        .arg(tmp.path().join("good"))
        .env("K8S_STANDIN_KUBELET_PORT", free_port().to_string());
    let good = Running::start(cmd);
    good.expect("k8s-standin: joined", Duration::from_secs(10));
    let rec = received_json(&tmp.path().join("good"));
    assert_eq!(rec["role"], "agent");
    assert_eq!(rec["flags"]["token-file"][0], node_token.to_str().unwrap());
    assert!(rec["token"].as_str().unwrap().ends_with("::server:right"));

    // Missing --server: an error, exit status 1.
    let out = Command::new(BIN)
        .args(["k3s", "agent", "--token", "x", "--data-dir"])
        .arg(tmp.path().join("none"))
        .env_remove("K3S_URL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--server"));
}

#[test]
fn bad_config_file_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.yaml");
    std::fs::write(&config, "node-label:\n  nested: map\n").unwrap();
    let out = Command::new(BIN)
        .args(["k3s", "server", "--data-dir"])
        .arg(tmp.path())
        .arg("-c")
        .arg(&config)
        .env("K8S_STANDIN_PORT", free_port().to_string())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("config file {}: line 2", config.display())),
        "{stdout}"
    );
    // An explicitly named config file that does not exist is an error too.
    let out = Command::new(BIN)
        .args(["k3s", "server", "--data-dir"])
        .arg(tmp.path())
        .args(["--config", "/nonexistent/config.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn help_says_it_is_a_stand_in() {
    for args in [
        &["--help"][..],
        &["k3s", "--help"],
        &["k0s", "controller", "--help"],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("STAND-IN"),
            "{args:?}"
        );
    }
    let out = Command::new(BIN).args(["kubeadm"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
