//! `k8s-standin`: a STAND-IN for k3s and k0s, used only in Basalt's tests.
//!
//! It runs no Kubernetes. It accepts the command lines Basalt gives k3s/k0s,
//! reads their config file, writes the files they write (join token,
//! kubeconfig), records everything it was given (`standin-received.json` and
//! one `k8s-standin: received {json}` console line) and answers the readiness
//! endpoint on port 6443 — so tests can check what init and the node config
//! handed to Kubernetes, and that readiness gating works. See docs/standin.md.
//! It must never be shipped to users as if it were Kubernetes.

pub mod cli;
pub mod http;
pub mod json;
pub mod role;
#[cfg(target_arch = "x86_64")]
pub mod tls;
#[cfg(not(target_arch = "x86_64"))]
#[path = "tls_none.rs"]
pub mod tls;
pub mod token;
pub mod yaml;

/// The line every long-running role prints first, so a console log never
/// leaves doubt about what ran.
pub const BANNER: &str =
    "STAND-IN for k3s/k0s used in Basalt's tests (not Kubernetes; see docs/standin.md)";

pub const HELP: &str = "\
k8s-standin: STAND-IN for k3s/k0s used in Basalt's tests. It runs no Kubernetes.

It answers as k3s or k0s: by the name it is called by (argv[0] = k3s or k0s,
e.g. a copy or link at /usr/bin/k3s) or by its first argument.

  k3s server [--data-dir D] [-c|--config F] [--token T] [--token-file F]
             [--write-kubeconfig F] [--write-kubeconfig-mode M]
             [--node-label L]... [--node-taint T]... [--disable C]... [--any-other-flag V]
  k3s agent --server URL (--token T | --token-file F)
  k0s controller [--single | --enable-worker] [--data-dir D] [-c F] [JOIN-TOKEN | --token-file F]
  k0s worker (JOIN-TOKEN | --token-file F)
  k0s token create [--role worker|controller] [--data-dir D]
  k3s|k0s kubectl get --raw=/readyz      (also --raw /readyz, --kubeconfig F)
  k3s|k0s --version

Servers (k3s server, k0s controller) read the config file (k3s: YAML keys = flag
names, default /etc/rancher/k3s/config.yaml), write k3s's <data-dir>/server/node-token
and kubeconfig (default /etc/rancher/k3s/k3s.yaml) or k0s's <data-dir>/pki/admin.conf,
record argv, K3S_*/K0S_* environment and the config file in <data-dir>/standin-received.json,
print `k8s-standin: received {json}`, wait K8S_STANDIN_DELAY_MS (default 1000) to mimic
start-up, then serve HTTPS with the stand-in's fixed TEST certificate, and plain HTTP
to connections that do not start with a TLS handshake, on 0.0.0.0:6443:
/readyz, /livez, /healthz -> 200 ok; /version; /v1-standin/join (token check for agents).

Agents (k3s agent, k0s worker) record the same way, then ask the server to check their
token (GET /v1-standin/join; over TLS for https:// URLs, pinning the certificate a full
K10<sha256>:: token names) until it accepts, print `k8s-standin: joined <url> ...`, and
serve /healthz on 0.0.0.0:10248 (the kubelet's health port).

kubectl get --raw=/readyz prints the body and exits 0 iff the server answers 200.

Test-only environment: K8S_STANDIN_PORT (instead of 6443), K8S_STANDIN_KUBELET_PORT
(instead of 10248), K8S_STANDIN_DELAY_MS, K8S_STANDIN_ADDRESS (address in k0s join tokens).
SIGTERM or SIGINT: exit 0.
";

/// Runs the stand-in with `argv` (argv[0] included); returns the exit status.
pub fn run(argv: Vec<String>) -> i32 {
    match cli::parse(&argv) {
        Ok(inv) => role::run(&inv, &argv),
        Err(e) => {
            eprintln!("k8s-standin: error {e}");
            2
        }
    }
}
