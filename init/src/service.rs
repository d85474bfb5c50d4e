//! Services: the definitions in `/etc/basalt/services/*.toml` (schema in
//! docs/boot-protocol.md), the Kubernetes service built from the image facts,
//! start order from `after`, and the restart policy with exponential backoff.
//! Pure data and decisions; running processes is `supervisor`'s job.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("reading service file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing service file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("service file {path}: {why}")]
    Invalid { path: PathBuf, why: String },
}

/// When to start a service again after it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    #[default]
    Always,
    OnFailure,
    Never,
}

/// How the supervisor learns that a service is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Tcp(SocketAddr),
    /// Plain HTTP GET; a 2xx status means ready.
    Http {
        addr: SocketAddr,
        host: String,
        path: String,
    },
    Exec(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
}

/// Exponential backoff between restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// A run at least this long resets the delay to `initial`.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_millis(30_000),
            reset_after: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// Delay before the next start, given how many runs in a row failed
    /// (1 for the first failure): initial, doubling, capped at max.
    pub fn delay(&self, consecutive_failures: u32) -> Duration {
        let n = consecutive_failures.saturating_sub(1).min(32);
        let ms = (self.initial.as_millis() as u64).saturating_mul(1u64 << n);
        Duration::from_millis(ms).min(self.max)
    }

    /// Consecutive failure count after a run of `ran` ended.
    pub fn next_failures(&self, previous: u32, ran: Duration) -> u32 {
        if ran >= self.reset_after {
            1
        } else {
            previous.saturating_add(1)
        }
    }
}

/// One service, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDef {
    pub name: String,
    pub exec: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub after: Vec<String>,
    pub restart: Restart,
    pub stop_timeout: Duration,
    pub ready: Option<Readiness>,
    pub backoff: Backoff,
}

impl ServiceDef {
    /// Whether an exit with `success` is followed by another start.
    pub fn restarts_after(&self, success: bool) -> bool {
        match self.restart {
            Restart::Always => true,
            Restart::OnFailure => !success,
            Restart::Never => false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFile {
    exec: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    after: Vec<String>,
    #[serde(default)]
    restart: Restart,
    #[serde(default = "default_stop_timeout")]
    stop_timeout_secs: u64,
    ready: Option<ReadyFile>,
    backoff: Option<BackoffFile>,
}

fn default_stop_timeout() -> u64 {
    10
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadyFile {
    tcp: Option<String>,
    http: Option<String>,
    exec: Option<Vec<String>>,
    #[serde(default = "default_interval")]
    interval_ms: u64,
    #[serde(default = "default_ready_timeout")]
    timeout_secs: u64,
}

fn default_interval() -> u64 {
    500
}

fn default_ready_timeout() -> u64 {
    120
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackoffFile {
    #[serde(default = "default_initial")]
    initial_ms: u64,
    #[serde(default = "default_max")]
    max_ms: u64,
    #[serde(default = "default_reset")]
    reset_after_secs: u64,
}

fn default_initial() -> u64 {
    500
}
fn default_max() -> u64 {
    30_000
}
fn default_reset() -> u64 {
    60
}

/// Service names are file stems: short, and safe in console lines.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
        })
        && !name.starts_with('.')
}

fn parse_socket_addr(s: &str) -> Option<SocketAddr> {
    let s = s
        .strip_prefix("localhost:")
        .map(|p| format!("127.0.0.1:{p}"));
    s.as_deref().unwrap_or_default().parse().ok()
}

/// Parse `http://<ip or localhost>:<port>/<path>`; PID 1 resolves no names.
pub fn parse_http_url(url: &str) -> Option<(SocketAddr, String, String)> {
    let rest = url.strip_prefix("http://")?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let with_port = if hostport.contains(':') && !hostport.ends_with(']') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    let addr = with_port.parse().ok().or_else(|| {
        parse_socket_addr(&with_port).filter(|_| with_port.starts_with("localhost:"))
    })?;
    if path
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return None;
    }
    Some((addr, hostport.to_string(), path.to_string()))
}

impl ServiceDef {
    /// Parse one service file; `name` is the file stem.
    pub fn parse(name: &str, text: &str, path: &Path) -> Result<ServiceDef, ServiceError> {
        let invalid = |why: String| ServiceError::Invalid {
            path: path.to_path_buf(),
            why,
        };
        if !valid_name(name) {
            return Err(invalid(format!("bad service name {name:?}")));
        }
        let f: ServiceFile = crate::tomlfast::from_str(text).map_err(|e| ServiceError::Parse {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        if f.exec.is_empty() || f.exec[0].is_empty() {
            return Err(invalid("exec is empty".into()));
        }
        if !f.exec[0].starts_with('/') {
            return Err(invalid(format!(
                "exec[0] {:?} is not an absolute path",
                f.exec[0]
            )));
        }
        if f.exec
            .iter()
            .chain(f.env.values())
            .any(|a| a.contains('\0'))
        {
            return Err(invalid("NUL byte in exec or env".into()));
        }
        if f.env
            .keys()
            .any(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
        {
            return Err(invalid("bad env variable name".into()));
        }
        if let Some(bad) = f.after.iter().find(|a| !valid_name(a)) {
            return Err(invalid(format!("bad name in after: {bad:?}")));
        }
        if f.after.iter().any(|a| a == name) {
            return Err(invalid("service is after itself".into()));
        }
        let ready = match f.ready {
            None => None,
            Some(r) => {
                let probe = match (r.tcp, r.http, r.exec) {
                    (Some(t), None, None) => Probe::Tcp(
                        t.parse()
                            .ok()
                            .or_else(|| parse_socket_addr(&t))
                            .ok_or_else(|| invalid(format!("ready.tcp {t:?} is not ip:port")))?,
                    ),
                    (None, Some(u), None) => {
                        let (addr, host, path) = parse_http_url(&u).ok_or_else(|| {
                            invalid(format!("ready.http {u:?} is not http://ip:port/path"))
                        })?;
                        Probe::Http { addr, host, path }
                    }
                    (None, None, Some(e)) => {
                        if e.is_empty() || !e[0].starts_with('/') {
                            return Err(invalid(
                                "ready.exec needs an absolute program path".into(),
                            ));
                        }
                        Probe::Exec(e)
                    }
                    _ => return Err(invalid("ready needs exactly one of tcp, http, exec".into())),
                };
                if r.interval_ms < 10 {
                    return Err(invalid("ready.interval_ms must be at least 10".into()));
                }
                if r.timeout_secs == 0 {
                    return Err(invalid("ready.timeout_secs must be at least 1".into()));
                }
                Some(Readiness {
                    probe,
                    interval: Duration::from_millis(r.interval_ms),
                    timeout: Duration::from_secs(r.timeout_secs),
                })
            }
        };
        let backoff = match f.backoff {
            None => Backoff::default(),
            Some(b) => {
                if b.initial_ms == 0 || b.max_ms < b.initial_ms {
                    return Err(invalid("backoff needs 0 < initial_ms <= max_ms".into()));
                }
                Backoff {
                    initial: Duration::from_millis(b.initial_ms),
                    max: Duration::from_millis(b.max_ms),
                    reset_after: Duration::from_secs(b.reset_after_secs),
                }
            }
        };
        Ok(ServiceDef {
            name: name.to_string(),
            exec: f.exec,
            env: f.env,
            after: f.after,
            restart: f.restart,
            stop_timeout: Duration::from_secs(f.stop_timeout_secs),
            ready,
            backoff,
        })
    }
}

/// Load every `*.toml` in `dir`, sorted by name. Bad files are returned as
/// errors next to the good services; a missing directory means no services.
pub fn load_dir(dir: &Path) -> (Vec<ServiceDef>, Vec<ServiceError>) {
    let mut defs = Vec::new();
    let mut errors = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return (defs, errors);
    };
    let mut paths: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    for path in paths {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        match std::fs::read_to_string(&path) {
            Ok(text) => match ServiceDef::parse(&name, &text, &path) {
                Ok(d) => defs.push(d),
                Err(e) => errors.push(e),
            },
            Err(source) => errors.push(ServiceError::Read { path, source }),
        }
    }
    (defs, errors)
}

/// Start order: every service after the services in its `after`. Ties keep
/// the given order. Unknown names in `after` are reported and ignored;
/// services on a dependency cycle are reported and left out.
pub fn start_order(defs: &[ServiceDef]) -> (Vec<usize>, Vec<String>) {
    let index: BTreeMap<&str, usize> = defs
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), i))
        .collect();
    let mut problems = Vec::new();
    let mut deps: Vec<BTreeSet<usize>> = Vec::with_capacity(defs.len());
    for d in defs {
        let mut set = BTreeSet::new();
        for a in &d.after {
            match index.get(a.as_str()) {
                Some(&j) => {
                    set.insert(j);
                }
                None => problems.push(format!("service {} is after unknown service {a}", d.name)),
            }
        }
        deps.push(set);
    }
    let mut order = Vec::with_capacity(defs.len());
    let mut placed = vec![false; defs.len()];
    loop {
        let next = (0..defs.len()).find(|&i| !placed[i] && deps[i].iter().all(|&j| placed[j]));
        match next {
            Some(i) => {
                placed[i] = true;
                order.push(i);
            }
            None => break,
        }
    }
    for (i, d) in defs.iter().enumerate() {
        if !placed[i] {
            problems.push(format!(
                "service {} is on a dependency cycle, not started",
                d.name
            ));
        }
    }
    (order, problems)
}

/// Indices of the services `defs[i]` must wait for (unknown names dropped).
pub fn dependencies(defs: &[ServiceDef], i: usize) -> Vec<usize> {
    defs[i]
        .after
        .iter()
        .filter_map(|a| defs.iter().position(|d| &d.name == a))
        .collect()
}

/// The Kubernetes distribution the image carries (`image.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    K3s,
    K0s,
}

impl Distribution {
    pub fn name(self) -> &'static str {
        match self {
            Distribution::K3s => "k3s",
            Distribution::K0s => "k0s",
        }
    }
}

/// Name of the service that runs Kubernetes (console lines, basaltctl).
pub const KUBERNETES_SERVICE: &str = "kubernetes";

/// The Kubernetes service as docs/boot-protocol.md defines it: data on
/// `/var`, readiness through the distribution's own `kubectl get --raw=/readyz`.
pub fn kubernetes_service(dist: Distribution, binary: &str) -> ServiceDef {
    let exec = match dist {
        Distribution::K3s => vec![binary, "server", "--data-dir", "/var/lib/rancher/k3s"],
        Distribution::K0s => vec![
            binary,
            "controller",
            "--single",
            "--data-dir",
            "/var/lib/k0s",
        ],
    };
    ServiceDef {
        name: KUBERNETES_SERVICE.to_string(),
        exec: exec.into_iter().map(String::from).collect(),
        env: BTreeMap::new(),
        after: Vec::new(),
        restart: Restart::Always,
        stop_timeout: Duration::from_secs(30),
        ready: Some(Readiness {
            probe: Probe::Exec(
                [binary, "kubectl", "get", "--raw=/readyz"]
                    .into_iter()
                    .map(String::from)
                    .collect(),
            ),
            interval: Duration::from_millis(1000),
            // Generous: under TCG emulation k3s takes minutes to come up.
            timeout: Duration::from_secs(900),
        }),
        backoff: Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            reset_after: Duration::from_secs(300),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServiceDef, ServiceError> {
        ServiceDef::parse("svc", text, Path::new("/etc/basalt/services/svc.toml"))
    }

    #[test]
    fn full_example_from_the_contract() {
        let d = parse(
            r#"
exec = ["/usr/sbin/sshd", "-D"]
env = { KEY = "value" }
after = ["network"]
restart = "always"
stop_timeout_secs = 10
[ready]
tcp = "127.0.0.1:22"
interval_ms = 500
timeout_secs = 120
[backoff]
initial_ms = 500
max_ms = 30000
reset_after_secs = 60
"#,
        )
        .unwrap();
        assert_eq!(d.exec, ["/usr/sbin/sshd", "-D"]);
        assert_eq!(d.env["KEY"], "value");
        assert_eq!(d.after, ["network"]);
        assert_eq!(d.stop_timeout, Duration::from_secs(10));
        let r = d.ready.unwrap();
        assert_eq!(r.probe, Probe::Tcp("127.0.0.1:22".parse().unwrap()));
        assert_eq!(r.interval, Duration::from_millis(500));
        assert_eq!(d.backoff, Backoff::default());
    }

    #[test]
    fn minimal_and_probe_kinds() {
        let d = parse("exec = [\"/bin/true\"]").unwrap();
        assert_eq!(d.restart, Restart::Always);
        assert!(d.ready.is_none());
        let d = parse("exec = [\"/bin/x\"]\nrestart = \"on-failure\"\n[ready]\nhttp = \"http://127.0.0.1:8080/healthz\"").unwrap();
        assert_eq!(d.restart, Restart::OnFailure);
        match d.ready.unwrap().probe {
            Probe::Http { addr, path, .. } => {
                assert_eq!(addr.port(), 8080);
                assert_eq!(path, "/healthz");
            }
            p => panic!("{p:?}"),
        }
        let d = parse("exec = [\"/bin/x\"]\n[ready]\nexec = [\"/bin/true\"]\ninterval_ms = 50")
            .unwrap();
        assert_eq!(
            d.ready.unwrap().probe,
            Probe::Exec(vec!["/bin/true".into()])
        );
        let d = parse("exec = [\"/bin/x\"]\n[ready]\ntcp = \"localhost:6443\"").unwrap();
        assert_eq!(
            d.ready.unwrap().probe,
            Probe::Tcp("127.0.0.1:6443".parse().unwrap())
        );
    }

    #[test]
    fn bad_inputs_are_rejected_with_the_path() {
        let bad = [
            "",                                                                    // no exec
            "exec = []",                                                           // empty exec
            "exec = \"/bin/true\"",                                                // not a list
            "exec = [\"true\"]",                                                   // relative
            "exec = [\"/bin/x\"]\nrestart = \"sometimes\"",                        // bad enum
            "exec = [\"/bin/x\"]\nbogus = 1",                                      // unknown key
            "exec = [\"/bin/x\"]\nstop_timeout_secs = -1",                         // negative
            "exec = [\"/bin/x\"]\nafter = [\"svc\"]",                              // self
            "exec = [\"/bin/x\"]\nafter = [\"Bad Name\"]",                         // bad dep name
            "exec = [\"/bin/x\"]\n[ready]\ninterval_ms = 5",                       // no probe
            "exec = [\"/bin/x\"]\n[ready]\ntcp = \"a:1\"\nexec = [\"/bin/true\"]", // two probes
            "exec = [\"/bin/x\"]\n[ready]\ntcp = \"nohost\"",                      // bad addr
            "exec = [\"/bin/x\"]\n[ready]\nhttp = \"https://1.2.3.4/\"",           // TLS
            "exec = [\"/bin/x\"]\n[ready]\nhttp = \"http://example.com/\"",        // DNS
            "exec = [\"/bin/x\"]\n[ready]\ntcp = \"127.0.0.1:1\"\ninterval_ms = 1",
            "exec = [\"/bin/x\"]\n[backoff]\ninitial_ms = 0",
            "exec = [\"/bin/x\"]\n[backoff]\ninitial_ms = 100\nmax_ms = 10",
            "exec = [\"/bin/x\"]\nenv = { \"A=B\" = \"c\" }",
            "exec = [\"/bin/x\"", // syntax
        ];
        for text in bad {
            let err = parse(text).expect_err(text);
            assert!(
                err.to_string().contains("/etc/basalt/services/svc.toml"),
                "{err}"
            );
        }
        assert!(ServiceDef::parse("Bad", "exec = [\"/bin/x\"]", Path::new("x")).is_err());
    }

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            reset_after: Duration::from_secs(10),
        };
        let delays: Vec<u128> = (1..=6).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_millis(1000));
        assert_eq!(b.next_failures(4, Duration::from_secs(1)), 5);
        assert_eq!(b.next_failures(4, Duration::from_secs(10)), 1);
        assert_eq!(b.next_failures(0, Duration::ZERO), 1);
    }

    fn def(name: &str, after: &[&str]) -> ServiceDef {
        let mut d = parse("exec = [\"/bin/true\"]").unwrap();
        d.name = name.into();
        d.after = after.iter().map(|s| s.to_string()).collect();
        d
    }

    #[test]
    fn start_order_follows_after() {
        let defs = vec![
            def("web", &["db", "net"]),
            def("db", &["net"]),
            def("net", &[]),
            def("log", &[]),
        ];
        let (order, problems) = start_order(&defs);
        let names: Vec<_> = order.iter().map(|&i| defs[i].name.as_str()).collect();
        assert_eq!(names, ["net", "db", "web", "log"]);
        assert!(problems.is_empty());
    }

    #[test]
    fn cycles_and_unknown_deps_are_reported() {
        let defs = vec![
            def("a", &["b"]),
            def("b", &["a"]),
            def("c", &["ghost"]),
            def("d", &["a"]),
        ];
        let (order, problems) = start_order(&defs);
        let names: Vec<_> = order.iter().map(|&i| defs[i].name.as_str()).collect();
        assert_eq!(names, ["c"]);
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("unknown service ghost")));
    }

    #[test]
    fn loads_a_directory_skipping_bad_files() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("good.toml"), "exec = [\"/bin/true\"]").unwrap();
        std::fs::write(t.path().join("bad.toml"), "exec = 3").unwrap();
        std::fs::write(t.path().join("README"), "not a service").unwrap();
        let (defs, errors) = load_dir(t.path());
        assert_eq!(defs.len(), 1);
        assert_eq!(defs[0].name, "good");
        assert_eq!(errors.len(), 1);
        assert!(load_dir(Path::new("/nonexistent")).0.is_empty());
    }

    #[test]
    fn kubernetes_command_lines() {
        let k3s = kubernetes_service(Distribution::K3s, "/usr/bin/k3s");
        assert_eq!(
            k3s.exec,
            [
                "/usr/bin/k3s",
                "server",
                "--data-dir",
                "/var/lib/rancher/k3s"
            ]
        );
        let k0s = kubernetes_service(Distribution::K0s, "/usr/bin/k0s");
        assert_eq!(
            k0s.exec,
            [
                "/usr/bin/k0s",
                "controller",
                "--single",
                "--data-dir",
                "/var/lib/k0s"
            ]
        );
        assert_eq!(
            k0s.ready.unwrap().probe,
            Probe::Exec(vec![
                "/usr/bin/k0s".into(),
                "kubectl".into(),
                "get".into(),
                "--raw=/readyz".into()
            ])
        );
    }
}
