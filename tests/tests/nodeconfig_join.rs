//! Two nodes joining through their node configs (issue 5, "Kubernetes
//! roles"), under QEMU (TCG, OVMF): two copies of one image on a QEMU socket
//! network (`-netdev socket`, virtio-net; the driver is loaded by the node
//! config's `kernel.modules`, the addresses are static, interfaces matched
//! by MAC). The server/controller boots first; the agent/worker is given the
//! server's address and the join token in its node config, and the
//! Kubernetes STAND-IN on it asks the server's stand-in to check the token
//! (`/v1-standin/join` on port 6443, docs/standin.md) until accepted, then
//! answers the kubelet health port that init's readiness check for the
//! agent role polls — so `basalt: ready` on the agent means it joined.
//!
//! - k3s: `role = "server"` with a token, `role = "agent"` with
//!   `server_url` and the same token;
//! - k0s: `role = "controller"` (its join secret written by the config's
//!   `files`), `role = "worker"` with a k0s join token naming the controller.
//!
//! The join check goes over TLS on 6443 (the stand-in's test certificate);
//! the k3s agent is given the server's full node-token, whose `K10<sha256>`
//! pins that certificate, as a real k3s agent pins its server's CA.

use anyhow::{Context, Result, ensure};
use basalt_tests::assets::Assets;
use basalt_tests::qemu::{Vm, VmConfig};
use basalt_tests::report;
use basalt_tests::{build, disk, repo_root, work_dir};
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

const TO_KERNEL: Duration = Duration::from_secs(300);
const STEP: Duration = Duration::from_secs(180);
const SERVER_MAC: &str = "52:54:00:77:00:01";
const AGENT_MAC: &str = "52:54:00:77:00:02";
/// Two VMs at a time at most: the tests of this file take turns.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn network(mac: &str, addr: &str) -> String {
    format!(
        "[kernel]\nmodules = [\"virtio_net\"]\n\
         [network.interfaces.lan]\nmatch = {{ mac = \"{mac}\" }}\naddresses = [\"{addr}\"]\n\
         [time]\nntp_servers = []\n"
    )
}

fn basalt(args: &[&str]) -> Result<()> {
    let out = Command::new(build::basalt_binary())
        .current_dir(repo_root())
        .args(args)
        .output()
        .with_context(|| format!("running basalt {args:?}"))?;
    ensure!(
        out.status.success(),
        "basalt {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// sha256 of the stand-in's TLS certificate (tests/standin/tls/cert.der), by sha256sum.
fn standin_cert_sha256() -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(repo_root().join("tests/standin/tls/cert.der"))
        .output()
        .context("running sha256sum")?;
    let text = String::from_utf8(out.stdout)?;
    let hash = text.split_whitespace().next().unwrap_or("").to_string();
    ensure!(hash.len() == 64, "sha256sum said {text:?}");
    Ok(hash)
}

fn work_dir_log(dist: &str, vm: &str) -> std::path::PathBuf {
    build::target_dir()
        .join("e2e")
        .join(format!("nodeconfig_join_{dist}"))
        .join(format!("{vm}.console.log"))
}

/// A free TCP port on the host for the socket network.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn vm(name: &str, dir: &Path, img: &Path, netdev: String, mac: &str) -> VmConfig {
    let mut cfg = VmConfig::new(name, dir, img);
    cfg.lifetime = Duration::from_secs(900);
    cfg.extra_args = vec![
        "-netdev".into(),
        netdev,
        "-device".into(),
        format!("virtio-net-pci,netdev=n0,mac={mac}"),
    ];
    cfg
}

/// Boot the server and then the agent; returns what the agent's stand-in received.
fn join(
    dist: &str,
    server_config: &str,
    agent_config: &str,
    server_name: &str,
) -> Result<serde_json::Value> {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let assets = Assets::locate("amd64").context("the join test needs the test assets")?;
    let dir = work_dir(&format!("nodeconfig_join_{dist}"))?;
    build::ensure_binaries(&dir)?;
    let definition = repo_root().join(format!("tests/tests/images/nodeconfig-join-{dist}.toml"));
    let built = build::build_image(&definition, &dir.join("out"))?;
    let (server_img, agent_img) = (dir.join("server.img"), dir.join("agent.img"));
    disk::copy_sparse(&built, &server_img)?;
    disk::copy_sparse(&built, &agent_img)?;
    for (img, text, file) in [
        (&server_img, server_config, "server.toml"),
        (&agent_img, agent_config, "agent.toml"),
    ] {
        let p = dir.join(file);
        std::fs::write(&p, text)?;
        basalt(&["config", "check", &p.display().to_string()])?;
        basalt(&[
            "config",
            "inject",
            &img.display().to_string(),
            &p.display().to_string(),
        ])?;
    }

    let port = free_port()?;
    let mut server = Vm::start(
        &vm(
            "server",
            &dir,
            &server_img,
            format!("socket,id=n0,listen=127.0.0.1:{port}"),
            SERVER_MAC,
        ),
        &assets,
    )?;
    server.expect("basalt: stage2 start", TO_KERNEL)?;
    let line = server.expect_anywhere(report::READY_PREFIX, STEP)?;
    let ready = report::parse_ready(&line)?;
    ensure!(
        ready.hostname == server_name,
        "server hostname {:?}",
        ready.hostname
    );

    let mut agent = Vm::start(
        &vm(
            "agent",
            &dir,
            &agent_img,
            format!("socket,id=n0,connect=127.0.0.1:{port}"),
            AGENT_MAC,
        ),
        &assets,
    )?;
    agent.expect("basalt: stage2 start", TO_KERNEL)?;
    let line = agent.expect_anywhere(report::RECEIVED_PREFIX, STEP)?;
    let received = report::parse_received(&line)?;
    let joined = agent.expect_anywhere("k8s-standin: joined https://10.77.0.1:6443", STEP)?;
    ensure!(
        joined.contains(" over TLS, server certificate sha256 "),
        "the agent did not join over TLS: {joined}"
    );
    agent.expect_anywhere(report::READY_PREFIX, STEP)?;
    for (name, v) in [("server", &server), ("agent", &agent)] {
        v.console
            .no_init_errors()
            .with_context(|| format!("on the {name}"))?;
    }
    server.kill();
    agent.kill();
    Ok(received)
}

#[test]
fn k3s_agent_joins_a_k3s_server_with_the_token_from_its_node_config() -> Result<()> {
    let token = "k3s-join-secret-5678";
    let server = format!(
        "hostname = \"k3s-server\"\n{}[kubernetes]\ndistribution = \"k3s\"\nrole = \"server\"\ntoken = \"{token}\"\n",
        network(SERVER_MAC, "10.77.0.1/24")
    );
    // The agent gets the server's full node-token, as a user copies it from
    // the server: `K10<sha256 of the server's certificate>::server:<secret>`.
    let node_token = format!("K10{}::server:{token}", standin_cert_sha256()?);
    let agent = format!(
        "hostname = \"k3s-agent\"\n{}[kubernetes]\ndistribution = \"k3s\"\nrole = \"agent\"\nserver_url = \"https://10.77.0.1:6443\"\ntoken = \"{node_token}\"\n",
        network(AGENT_MAC, "10.77.0.2/24")
    );
    let rec = join("k3s", &server, &agent, "k3s-server")?;
    let log = std::fs::read_to_string(work_dir_log("k3s", "agent"))?;
    ensure!(
        log.contains("(pinned by the join token)"),
        "the agent's full node-token did not pin the server's certificate"
    );
    ensure!(
        rec["role"] == "agent" && rec["argv"][1] == "agent",
        "agent record: {rec}"
    );
    ensure!(
        rec["server_url"] == "https://10.77.0.1:6443" && rec["token"] == node_token.as_str(),
        "agent record: {rec}"
    );
    let content = rec["config"]["content"].as_str().unwrap_or("");
    ensure!(
        content.contains("server: \"https://10.77.0.1:6443\"")
            && content.contains("token-file: \"/var/lib/basalt/k8s-token\""),
        "agent's k3s config: {content:?}"
    );
    Ok(())
}

#[test]
fn k0s_worker_joins_a_k0s_controller_with_a_join_token_from_its_node_config() -> Result<()> {
    let secret = "k0s-join-secret-9";
    // The stand-in's k0s join token: base64 of a kubeconfig naming the
    // controller and its secret (docs/standin.md), which the controller's
    // node config writes as the stand-in's join secret.
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    server: https://10.77.0.1:6443\n  name: k0s\nusers:\n- name: worker\n  user:\n    token: {secret}\n"
    );
    let out = Command::new("base64")
        .arg("-w0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .map(|mut i| i.write_all(kubeconfig.as_bytes()));
            c.wait_with_output()
        })
        .context("running base64")?;
    let join_token = String::from_utf8(out.stdout)?;
    ensure!(!join_token.is_empty(), "base64 gave nothing");
    let controller = format!(
        "hostname = \"k0s-controller\"\n{}[[files]]\npath = \"/var/lib/k0s/standin-join-secret\"\ncontent = \"{secret}\\n\"\nmode = \"0600\"\n[kubernetes]\ndistribution = \"k0s\"\nrole = \"controller\"\n",
        network(SERVER_MAC, "10.77.0.1/24")
    );
    let worker = format!(
        "hostname = \"k0s-worker\"\n{}[kubernetes]\ndistribution = \"k0s\"\nrole = \"worker\"\ntoken = \"{join_token}\"\n",
        network(AGENT_MAC, "10.77.0.2/24")
    );
    let rec = join("k0s", &controller, &worker, "k0s-controller")?;
    ensure!(
        rec["role"] == "worker" && rec["argv"][1] == "worker",
        "worker record: {rec}"
    );
    ensure!(
        rec["flags"]["token-file"] == serde_json::json!(["/var/lib/basalt/k8s-token"]),
        "worker flags: {}",
        rec["flags"]
    );
    Ok(())
}
