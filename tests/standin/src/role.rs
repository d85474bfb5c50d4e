//! What each command does: resolve its settings the way k3s/k0s would (flag,
//! then config file, then environment, then default), write the files the
//! real program writes, record what was received, then serve or join.

use crate::cli::{Command, Distribution, Invocation};
use crate::http::{self, Request, Url};
use crate::json::Json;
use crate::token;
use crate::yaml::{self, Value};
use crate::{BANNER, HELP};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

const DEFAULT_PORT: u16 = 6443;
const DEFAULT_KUBELET_PORT: u16 = 10248;
const DEFAULT_DELAY_MS: u64 = 1000;
const K3S_DEFAULT_CONFIG: &str = "/etc/rancher/k3s/config.yaml";
const K3S_DEFAULT_KUBECONFIG: &str = "/etc/rancher/k3s/k3s.yaml";
const K3S_DEFAULT_DATA_DIR: &str = "/var/lib/rancher/k3s";
const K0S_DEFAULT_CONFIG: &str = "/etc/k0s/k0s.yaml";
const K0S_DEFAULT_DATA_DIR: &str = "/var/lib/k0s";
/// File under the data dir recording what the stand-in was given.
pub const RECEIVED_FILE: &str = "standin-received.json";
/// File under a k0s controller's data dir holding the join secret.
const K0S_SECRET_FILE: &str = "standin-join-secret";
/// The stand-in's join-check endpoint (real k3s uses /cacerts + TLS bootstrap).
pub const JOIN_PATH: &str = "/v1-standin/join";

#[derive(Debug, Error)]
pub enum RoleError {
    #[error("reading config file {path}: {source}")]
    ConfigRead {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    ConfigParse {
        path: String,
        source: yaml::YamlError,
    },
    #[error("reading token file {path}: {source}")]
    TokenFile {
        path: String,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("generating a token: {0}")]
    Random(std::io::Error),
    #[error("{0}")]
    Usage(String),
    #[error("environment {name}={value:?} is not a valid {what}")]
    Env {
        name: &'static str,
        value: String,
        what: &'static str,
    },
    #[error("listening on 0.0.0.0:{port}: {source}")]
    Listen { port: u16, source: std::io::Error },
    #[error("serving on 0.0.0.0:{port}: {source}")]
    Serve { port: u16, source: std::io::Error },
    #[error(transparent)]
    Http(#[from] http::HttpError),
}

/// Runs one invocation; returns the exit status.
pub fn run(inv: &Invocation, argv: &[String]) -> i32 {
    let result = match inv.command {
        Command::Help => {
            print!("{HELP}");
            Ok(0)
        }
        Command::Version => {
            println!(
                "{} version v0.0.0+standin (k8s-standin: {BANNER})",
                inv.distribution.name()
            );
            Ok(0)
        }
        Command::Kubectl => kubectl(inv),
        Command::TokenCreate => token_create(inv),
        Command::Server => {
            install_signal_handlers();
            println!("k8s-standin: {BANNER}");
            server(inv, argv)
        }
        Command::Agent => {
            install_signal_handlers();
            println!("k8s-standin: {BANNER}");
            agent(inv, argv)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            println!(
                "k8s-standin: error {} {}: {e}",
                inv.distribution.name(),
                inv.command_word
            );
            1
        }
    }
}

/// SIGTERM/SIGINT end the stand-in with status 0, as a clean stop.
fn install_signal_handlers() {
    extern "C" fn on_signal(_: libc::c_int) {
        const MSG: &[u8] = b"k8s-standin: stopping\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe; MSG is a static buffer.
        unsafe {
            libc::write(1, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(0);
        }
    }
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: installing a handler that only calls async-signal-safe functions.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

fn env_u64(name: &'static str, default: u64) -> Result<u64, RoleError> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map_err(|_| RoleError::Env {
            name,
            value: v,
            what: "number",
        }),
        Err(_) => Ok(default),
    }
}

fn env_port(name: &'static str, default: u16) -> Result<u16, RoleError> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map_err(|_| RoleError::Env {
            name,
            value: v,
            what: "port",
        }),
        Err(_) => Ok(default),
    }
}

/// The config file as read: its path, raw content and (k3s) parsed values.
struct ConfigFile {
    path: String,
    content: String,
    values: Vec<(String, Value)>,
}

/// Settings resolved from flags, config file and environment.
struct Settings {
    config: Option<ConfigFile>,
    env: Vec<(String, String)>,
}

impl Settings {
    fn load(inv: &Invocation) -> Result<Settings, RoleError> {
        let prefix = match inv.distribution {
            Distribution::K3s => "K3S_",
            Distribution::K0s => "K0S_",
        };
        let mut env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with(prefix))
            .collect();
        env.sort();
        let explicit = inv.flag("config").map(str::to_string).or_else(|| {
            (inv.distribution == Distribution::K3s)
                .then(|| std::env::var("K3S_CONFIG_FILE").ok())
                .flatten()
        });
        let default = match inv.distribution {
            Distribution::K3s => K3S_DEFAULT_CONFIG,
            Distribution::K0s => K0S_DEFAULT_CONFIG,
        };
        let path = explicit.clone().unwrap_or_else(|| default.to_string());
        let config = match std::fs::read_to_string(&path) {
            Ok(content) => {
                // k0s's config is a nested ClusterConfig: recorded, not interpreted.
                let values = match inv.distribution {
                    Distribution::K3s => {
                        yaml::parse(&content).map_err(|source| RoleError::ConfigParse {
                            path: path.clone(),
                            source,
                        })?
                    }
                    Distribution::K0s => Vec::new(),
                };
                Some(ConfigFile {
                    path,
                    content,
                    values,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => None,
            Err(source) => return Err(RoleError::ConfigRead { path, source }),
        };
        Ok(Settings { config, env })
    }

    fn env(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Flag, else config file value (k3s: YAML keys are flag names).
    fn lookup(&self, inv: &Invocation, name: &str) -> Option<String> {
        inv.flag(name).map(str::to_string).or_else(|| {
            self.config.as_ref().and_then(|c| {
                c.values
                    .iter()
                    .find(|(k, _)| k == name)
                    .and_then(|(_, v)| v.items().last().cloned())
            })
        })
    }

    fn data_dir(&self, inv: &Invocation) -> PathBuf {
        let default = match inv.distribution {
            Distribution::K3s => K3S_DEFAULT_DATA_DIR,
            Distribution::K0s => K0S_DEFAULT_DATA_DIR,
        };
        PathBuf::from(
            self.lookup(inv, "data-dir")
                .or_else(|| self.env("K3S_DATA_DIR").map(str::to_string))
                .unwrap_or_else(|| default.to_string()),
        )
    }

    /// The join token given, if any: `--token`, `K3S_TOKEN`, `--token-file`,
    /// `K3S_TOKEN_FILE`, or (k0s) the positional join token.
    fn token(&self, inv: &Invocation) -> Result<Option<String>, RoleError> {
        if let Some(t) = self
            .lookup(inv, "token")
            .or_else(|| self.env("K3S_TOKEN").map(str::to_string))
        {
            return Ok(Some(t));
        }
        let file = self
            .lookup(inv, "token-file")
            .or_else(|| self.env("K3S_TOKEN_FILE").map(str::to_string));
        if let Some(path) = file {
            let t = std::fs::read_to_string(&path)
                .map_err(|source| RoleError::TokenFile { path, source })?;
            return Ok(Some(t.trim().to_string()));
        }
        Ok(inv.args.first().cloned())
    }
}

/// Builds the received record (also what goes to the console).
fn record(
    inv: &Invocation,
    argv: &[String],
    settings: &Settings,
    data_dir: &Path,
    extra: Vec<(String, Json)>,
) -> Json {
    let flags = Json::Obj(
        inv.flags
            .iter()
            .map(|(k, v)| (k.clone(), Json::strs(v.iter().cloned())))
            .collect(),
    );
    let env = Json::Obj(
        settings
            .env
            .iter()
            .map(|(k, v)| (k.clone(), Json::str(v.clone())))
            .collect(),
    );
    let config = match &settings.config {
        None => Json::Null,
        Some(c) => Json::Obj(vec![
            ("path".into(), Json::str(c.path.clone())),
            ("content".into(), Json::str(c.content.clone())),
            (
                "values".into(),
                Json::Obj(
                    c.values
                        .iter()
                        .map(|(k, v)| {
                            let j = match v {
                                Value::Scalar(s) => Json::str(s.clone()),
                                Value::List(l) => Json::strs(l.iter().cloned()),
                            };
                            (k.clone(), j)
                        })
                        .collect(),
                ),
            ),
        ]),
    };
    let mut fields = vec![
        ("standin".into(), Json::Bool(true)),
        ("distribution".into(), Json::str(inv.distribution.name())),
        ("role".into(), Json::str(inv.role())),
        ("argv".into(), Json::strs(argv.iter().cloned())),
        ("flags".into(), flags),
        ("args".into(), Json::strs(inv.args.iter().cloned())),
        ("env".into(), env),
        ("config".into(), config),
        (
            "data_dir".into(),
            Json::str(data_dir.to_string_lossy().into_owned()),
        ),
    ];
    fields.extend(extra);
    Json::Obj(fields)
}

fn write_file(path: &Path, content: &str, mode: u32) -> Result<(), RoleError> {
    let err = |source| RoleError::Write {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // Write-new-then-rename: readers never see half a file.
    let tmp = path.with_extension("standin-tmp");
    std::fs::write(&tmp, content).map_err(err)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

fn kubeconfig(server: &str, token: &str, who: &str) -> String {
    format!(
        "# Written by k8s-standin, a STAND-IN for {who} used in tests. Plain HTTP: real {who} serves HTTPS.\n\
         apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    server: {server}\n  name: default\n\
         contexts:\n- context:\n    cluster: default\n    user: default\n  name: default\n\
         current-context: default\npreferences: {{}}\nusers:\n- name: default\n  user:\n    token: {token}\n"
    )
}

/// `k3s server` / `k0s controller`.
fn server(inv: &Invocation, argv: &[String]) -> Result<i32, RoleError> {
    let settings = Settings::load(inv)?;
    let data_dir = settings.data_dir(inv);
    let port = env_port("K8S_STANDIN_PORT", DEFAULT_PORT)?;
    let delay = env_u64("K8S_STANDIN_DELAY_MS", DEFAULT_DELAY_MS)?;
    let local = format!("http://127.0.0.1:{port}");
    let mut written = Vec::new();
    let secret = match inv.distribution {
        Distribution::K3s => {
            // Like k3s, a server given no token keeps the one it made before.
            let kept = std::fs::read_to_string(data_dir.join("server/token"))
                .ok()
                .and_then(|t| t.trim().split_once("::server:").map(|(_, s)| s.to_string()))
                .filter(|s| !s.is_empty());
            let secret = match (settings.token(inv)?, kept) {
                (Some(t), _) | (None, Some(t)) => t,
                (None, None) => token::random_secret().map_err(RoleError::Random)?,
            };
            let node_token = format!("{}\n", token::k3s_node_token(&secret));
            for name in ["server/node-token", "server/token"] {
                let p = data_dir.join(name);
                write_file(&p, &node_token, 0o600)?;
                written.push(p);
            }
            let kc = settings
                .lookup(inv, "write-kubeconfig")
                .or_else(|| settings.env("K3S_KUBECONFIG_OUTPUT").map(str::to_string))
                .unwrap_or_else(|| K3S_DEFAULT_KUBECONFIG.to_string());
            let mode_text = settings
                .lookup(inv, "write-kubeconfig-mode")
                .or_else(|| settings.env("K3S_KUBECONFIG_MODE").map(str::to_string))
                .unwrap_or_else(|| "0600".to_string());
            let mode = u32::from_str_radix(&mode_text, 8).map_err(|_| {
                RoleError::Usage(format!(
                    "--write-kubeconfig-mode {mode_text:?} is not octal"
                ))
            })?;
            let kc = PathBuf::from(kc);
            write_file(&kc, &kubeconfig(&local, &secret, "k3s"), mode)?;
            written.push(kc);
            secret
        }
        Distribution::K0s => {
            let secret_path = data_dir.join(K0S_SECRET_FILE);
            let secret = match std::fs::read_to_string(&secret_path) {
                Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
                _ => {
                    let s = token::random_secret().map_err(RoleError::Random)?;
                    write_file(&secret_path, &format!("{s}\n"), 0o600)?;
                    s
                }
            };
            written.push(secret_path);
            let admin = data_dir.join("pki/admin.conf");
            write_file(&admin, &kubeconfig(&local, &secret, "k0s"), 0o600)?;
            written.push(admin);
            secret
        }
    };
    let received_path = data_dir.join(RECEIVED_FILE);
    written.push(received_path.clone());
    let rec = record(
        inv,
        argv,
        &settings,
        &data_dir,
        vec![
            (
                "token".into(),
                Json::opt_str(settings.token(inv).ok().flatten()),
            ),
            ("port".into(), Json::Num(i64::from(port))),
            (
                "files".into(),
                Json::strs(written.iter().map(|p| p.display().to_string())),
            ),
        ],
    );
    write_file(&received_path, &format!("{rec}\n"), 0o600)?;
    println!("k8s-standin: received {rec}");
    std::thread::sleep(Duration::from_millis(delay));
    let listener = TcpListener::bind(("0.0.0.0", port))
        .map_err(|source| RoleError::Listen { port, source })?;
    println!(
        "k8s-standin: serving HTTPS (the stand-in's test certificate) and plain HTTP on 0.0.0.0:{port} (/readyz, /livez, /version, {JOIN_PATH})"
    );
    let distribution = inv.distribution;
    let source = http::serve(listener, move |req: &Request| {
        api(distribution, &secret, req)
    });
    Err(RoleError::Serve { port, source })
}

/// The server's endpoints.
fn api(distribution: Distribution, secret: &str, req: &Request) -> (u16, String, &'static str) {
    if req.method != "GET" && req.method != "HEAD" {
        return (405, "method not allowed\n".into(), "text/plain");
    }
    let path = req.path.split('?').next().unwrap_or("");
    match path {
        "/readyz" | "/livez" | "/healthz" => (200, "ok".into(), "text/plain"),
        "/version" => (
            200,
            format!(
                "{{\"major\":\"1\",\"minor\":\"31\",\"gitVersion\":\"v1.31.0+{}-standin\",\"platform\":\"linux/{}\",\"standin\":true}}",
                distribution.name(),
                std::env::consts::ARCH
            ),
            "application/json",
        ),
        JOIN_PATH => match &req.bearer {
            Some(t) if token::k3s_token_matches(t, secret) => (200, "ok".into(), "text/plain"),
            _ => (401, "token rejected\n".into(), "text/plain"),
        },
        _ => (404, "not found\n".into(), "text/plain"),
    }
}

/// `k3s agent` / `k0s worker`.
fn agent(inv: &Invocation, argv: &[String]) -> Result<i32, RoleError> {
    let settings = Settings::load(inv)?;
    let data_dir = settings.data_dir(inv);
    let given = settings.token(inv)?;
    let (server_url, secret) = match inv.distribution {
        Distribution::K3s => {
            let url = settings
                .lookup(inv, "server")
                .or_else(|| settings.env("K3S_URL").map(str::to_string))
                .ok_or_else(|| RoleError::Usage("--server (or K3S_URL) is required".into()))?;
            let t = given.clone().ok_or_else(|| {
                RoleError::Usage("--token or --token-file (or K3S_TOKEN) is required".into())
            })?;
            (url, t)
        }
        Distribution::K0s => {
            let t = given.clone().ok_or_else(|| {
                RoleError::Usage("a join token or --token-file is required".into())
            })?;
            token::parse_k0s_join_token(&t).ok_or_else(|| {
                RoleError::Usage("the join token names no server and token".into())
            })?
        }
    };
    let base = Url::parse(&server_url)?;
    let received_path = data_dir.join(RECEIVED_FILE);
    let rec = record(
        inv,
        argv,
        &settings,
        &data_dir,
        vec![
            ("token".into(), Json::opt_str(given)),
            ("server_url".into(), Json::str(server_url.clone())),
            (
                "files".into(),
                Json::strs([received_path.display().to_string()]),
            ),
        ],
    );
    write_file(&received_path, &format!("{rec}\n"), 0o600)?;
    println!("k8s-standin: received {rec}");
    let mut last_error = String::new();
    let joined = loop {
        let msg = match http::get(&base, JOIN_PATH, Some(&secret), Duration::from_secs(5)) {
            Ok(r) if r.status == 200 => break r,
            Ok(r) => format!("server answered {} to the join token check", r.status),
            Err(e) => e.to_string(),
        };
        if msg != last_error {
            println!("k8s-standin: error join {server_url}: {msg} (retrying)");
            last_error = msg;
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    match &joined.server_cert {
        Some(h) => println!(
            "k8s-standin: joined {server_url} over TLS, server certificate sha256 {h} ({})",
            if crate::tls::pinned_hash(&secret).is_some() {
                "pinned by the join token"
            } else {
                "not pinned: the join token names no certificate"
            }
        ),
        None => println!("k8s-standin: joined {server_url}"),
    }
    let port = env_port("K8S_STANDIN_KUBELET_PORT", DEFAULT_KUBELET_PORT)?;
    let listener = TcpListener::bind(("0.0.0.0", port))
        .map_err(|source| RoleError::Listen { port, source })?;
    println!("k8s-standin: serving plain HTTP on 0.0.0.0:{port} (/healthz)");
    let source = http::serve(listener, |req: &Request| match req.path.as_str() {
        "/healthz" => (200, "ok".into(), "text/plain"),
        _ => (404, "not found\n".into(), "text/plain"),
    });
    Err(RoleError::Serve { port, source })
}

/// `k3s|k0s kubectl get --raw=/path`: the one kubectl call Basalt makes.
fn kubectl(inv: &Invocation) -> Result<i32, RoleError> {
    let raw = match (inv.args.first().map(String::as_str), inv.flag("raw")) {
        (Some("get"), Some(raw)) => raw,
        _ => {
            return Err(RoleError::Usage(
                "the stand-in's kubectl only does `get --raw=/path`".into(),
            ));
        }
    };
    let server = match inv.flag("server") {
        Some(s) => s.to_string(),
        None => {
            let path = inv
                .flag("kubeconfig")
                .map(str::to_string)
                .or_else(|| std::env::var("KUBECONFIG").ok())
                .unwrap_or_else(|| match inv.distribution {
                    Distribution::K3s => K3S_DEFAULT_KUBECONFIG.to_string(),
                    Distribution::K0s => {
                        let dir = inv.flag("data-dir").unwrap_or(K0S_DEFAULT_DATA_DIR);
                        format!("{dir}/pki/admin.conf")
                    }
                });
            let text = std::fs::read_to_string(&path).map_err(|source| RoleError::ConfigRead {
                path: path.clone(),
                source,
            })?;
            text.lines()
                .filter_map(|l| l.trim().strip_prefix("server:"))
                .map(|s| s.trim().to_string())
                .next()
                .ok_or_else(|| RoleError::Usage(format!("kubeconfig {path} names no server")))?
        }
    };
    let base = Url::parse(&server)?;
    let resp = http::get(&base, raw, None, Duration::from_secs(5))?;
    if resp.status == 200 {
        println!("{}", resp.body);
        Ok(0)
    } else {
        eprintln!(
            "Error from server ({}): {}",
            resp.status,
            resp.body.trim_end()
        );
        Ok(1)
    }
}

/// The address put into k0s join tokens: K8S_STANDIN_ADDRESS, else the
/// source address of the default route, else loopback.
fn own_address() -> String {
    if let Ok(a) = std::env::var("K8S_STANDIN_ADDRESS") {
        return a;
    }
    // Connecting a UDP socket sends nothing; it only picks the route's source address.
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect("192.0.2.1:9")?;
            s.local_addr()
        })
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| "127.0.0.1".to_string())
}

/// `k0s token create [--role R]`: prints a join token for this controller.
fn token_create(inv: &Invocation) -> Result<i32, RoleError> {
    let data_dir = PathBuf::from(inv.flag("data-dir").unwrap_or(K0S_DEFAULT_DATA_DIR));
    let path = data_dir.join(K0S_SECRET_FILE);
    let secret = std::fs::read_to_string(&path).map_err(|source| RoleError::TokenFile {
        path: path.display().to_string(),
        source,
    })?;
    let port = env_port("K8S_STANDIN_PORT", DEFAULT_PORT)?;
    let role = inv.flag("role").unwrap_or("worker");
    let url = format!("https://{}:{port}", own_address());
    println!("{}", token::k0s_join_token(&url, secret.trim(), role));
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(path: &str, bearer: Option<&str>) -> Request {
        Request {
            method: "GET".into(),
            path: path.into(),
            bearer: bearer.map(String::from),
        }
    }

    #[test]
    fn api_answers() {
        let d = Distribution::K3s;
        assert_eq!(api(d, "s", &req("/readyz", None)).0, 200);
        assert_eq!(api(d, "s", &req("/livez?verbose", None)).0, 200);
        assert_eq!(api(d, "s", &req("/nope", None)).0, 404);
        assert_eq!(api(d, "s", &req(JOIN_PATH, None)).0, 401);
        assert_eq!(api(d, "s", &req(JOIN_PATH, Some("x"))).0, 401);
        assert_eq!(api(d, "s", &req(JOIN_PATH, Some("s"))).0, 200);
        let v = api(d, "s", &req("/version", None)).1;
        let v: serde_json::Value = serde_json::from_str(&v).unwrap();
        assert_eq!(v["standin"], true);
    }
}
