//! Command lines the stand-in accepts, in the shapes k3s and k0s accept them:
//! which distribution (argv[0]'s basename or the first argument), which
//! command, and every `--flag` it was given (recorded, even those it ignores).

use std::collections::BTreeMap;
use thiserror::Error;

/// The Kubernetes distribution being imitated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

    fn from_name(s: &str) -> Option<Distribution> {
        match s {
            "k3s" => Some(Distribution::K3s),
            "k0s" => Some(Distribution::K0s),
            _ => None,
        }
    }

    /// Flags that take no value (so `--single <token>` keeps the token positional).
    fn is_boolean_flag(self, name: &str) -> bool {
        let list: &[&str] = match self {
            Distribution::K3s => &[
                "cluster-init",
                "cluster-reset",
                "disable-agent",
                "disable-apiserver",
                "disable-cloud-controller",
                "disable-controller-manager",
                "disable-etcd",
                "disable-helm-controller",
                "disable-kube-proxy",
                "disable-network-policy",
                "disable-scheduler",
                "debug",
                "docker",
                "embedded-registry",
                "flannel-ipv6-masq",
                "prefer-bundled-bin",
                "protect-kernel-defaults",
                "rootless",
                "secrets-encryption",
                "selinux",
                "help",
                "version",
            ],
            Distribution::K0s => &[
                "single",
                "enable-worker",
                "no-taints",
                "enable-cloud-provider",
                "enable-dynamic-config",
                "enable-metrics-scraper",
                "enable-k0s-cloud-provider",
                "debug",
                "verbose",
                "help",
                "version",
            ],
        };
        list.contains(&name)
    }

    /// Long names of the short options the stand-in understands.
    fn long_name(self, short: char) -> Option<&'static str> {
        match (self, short) {
            (_, 'c') => Some("config"),
            (_, 'h') => Some("help"),
            (Distribution::K3s, 'd') => Some("data-dir"),
            (Distribution::K3s, 't') => Some("token"),
            (Distribution::K3s, 'o') => Some("write-kubeconfig"),
            (Distribution::K3s, 's') => Some("server"),
            (Distribution::K3s, 'v') => Some("v"),
            (Distribution::K0s, 'd') => Some("debug"),
            (Distribution::K0s, 'v') => Some("verbose"),
            _ => None,
        }
    }
}

/// What the stand-in was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `k3s server`, `k0s controller`: serve the API endpoints.
    Server,
    /// `k3s agent`, `k0s worker`: join a server with a token.
    Agent,
    /// `k3s|k0s kubectl ...`
    Kubectl,
    /// `k0s token create`
    TokenCreate,
    /// `--version`, `k0s version`
    Version,
    Help,
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub distribution: Distribution,
    /// The subcommand word as given (`server`, `controller`, ...).
    pub command_word: String,
    pub command: Command,
    /// Every `--flag` by long name, values in the order given (`"true"` for booleans).
    pub flags: BTreeMap<String, Vec<String>>,
    /// Positional arguments after the command.
    pub args: Vec<String>,
}

impl Invocation {
    /// The last value given for a flag.
    pub fn flag(&self, name: &str) -> Option<&str> {
        self.flags
            .get(name)
            .and_then(|v| v.last())
            .map(String::as_str)
    }

    pub fn has(&self, name: &str) -> bool {
        self.flags.contains_key(name)
    }

    /// The role name recorded in the received JSON.
    pub fn role(&self) -> &'static str {
        match (self.distribution, &self.command) {
            (Distribution::K3s, Command::Server) => "server",
            (Distribution::K3s, Command::Agent) => "agent",
            (Distribution::K0s, Command::Server) => "controller",
            (Distribution::K0s, Command::Agent) => "worker",
            (_, Command::Kubectl) => "kubectl",
            (_, Command::TokenCreate) => "token-create",
            (_, Command::Version) => "version",
            (_, Command::Help) => "help",
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CliError {
    #[error(
        "cannot tell which distribution to imitate: call me as k3s or k0s (argv[0] or first argument), got {0:?}"
    )]
    NoDistribution(String),
    #[error("{distribution}: missing command (try --help)")]
    NoCommand { distribution: &'static str },
    #[error("{distribution}: command `{word}` is not imitated by the stand-in (try --help)")]
    UnknownCommand {
        distribution: &'static str,
        word: String,
    },
    #[error("{distribution}: unknown short option -{short}")]
    UnknownShort {
        distribution: &'static str,
        short: char,
    },
}

/// Parses argv (argv[0] included).
pub fn parse(argv: &[String]) -> Result<Invocation, CliError> {
    let argv0 = argv.first().map(String::as_str).unwrap_or("");
    let base = argv0.rsplit('/').next().unwrap_or(argv0);
    let (distribution, rest) = match Distribution::from_name(base) {
        Some(d) => (d, argv.get(1..).unwrap_or(&[])),
        None => match argv.get(1).and_then(|a| Distribution::from_name(a)) {
            Some(d) => (d, argv.get(2..).unwrap_or(&[])),
            None => {
                if argv
                    .get(1)
                    .is_some_and(|a| a == "--help" || a == "-h" || a == "help")
                    || argv.len() == 1
                {
                    return Ok(Invocation {
                        distribution: Distribution::K3s,
                        command_word: "help".into(),
                        command: Command::Help,
                        flags: BTreeMap::new(),
                        args: Vec::new(),
                    });
                }
                return Err(CliError::NoDistribution(argv.join(" ")));
            }
        },
    };
    let dname = distribution.name();
    let Some(word) = rest.first() else {
        return Err(CliError::NoCommand {
            distribution: dname,
        });
    };
    let mut rest = &rest[1..];
    let command = match (distribution, word.as_str()) {
        (_, "--help" | "-h" | "help") => Command::Help,
        (_, "--version" | "-v" | "version") => Command::Version,
        (_, "kubectl") => Command::Kubectl,
        (Distribution::K3s, "server") | (Distribution::K0s, "controller") => Command::Server,
        (Distribution::K3s, "agent") | (Distribution::K0s, "worker") => Command::Agent,
        (Distribution::K0s, "token") if rest.first().is_some_and(|w| w == "create") => {
            rest = &rest[1..];
            Command::TokenCreate
        }
        _ => {
            return Err(CliError::UnknownCommand {
                distribution: dname,
                word: word.clone(),
            });
        }
    };
    let mut flags: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut args = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        let a = &rest[i];
        i += 1;
        let name = if let Some(long) = a.strip_prefix("--") {
            if long.is_empty() {
                // `--`: everything after is positional.
                args.extend(rest[i..].iter().cloned());
                break;
            }
            long.to_string()
        } else if let Some(short) = a.strip_prefix('-').filter(|s| !s.is_empty()) {
            let (c, tail) = short.split_at(short.chars().next().map_or(0, char::len_utf8));
            let c = c.chars().next().unwrap_or('-');
            let long = distribution.long_name(c).ok_or(CliError::UnknownShort {
                distribution: dname,
                short: c,
            })?;
            if tail.is_empty() {
                long.to_string()
            } else {
                format!("{long}={}", tail.trim_start_matches('='))
            }
        } else {
            args.push(a.clone());
            continue;
        };
        let (name, value) = match name.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None if command == Command::Kubectl => {
                // kubectl: a flag followed by a non-flag word takes it as its value.
                match rest.get(i).filter(|v| !v.starts_with('-')) {
                    Some(v) if name != "help" => {
                        i += 1;
                        (name, v.clone())
                    }
                    _ => (name, "true".to_string()),
                }
            }
            None if distribution.is_boolean_flag(&name) => (name, "true".to_string()),
            None => match rest.get(i) {
                Some(v) if !v.starts_with('-') || v.len() == 1 => {
                    i += 1;
                    (name, v.clone())
                }
                _ => (name, "true".to_string()),
            },
        };
        flags.entry(name).or_default().push(value);
    }
    if flags.contains_key("help") {
        return Ok(Invocation {
            distribution,
            command_word: word.clone(),
            command: Command::Help,
            flags,
            args,
        });
    }
    Ok(Invocation {
        distribution,
        command_word: word.clone(),
        command,
        flags,
        args,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    #[test]
    fn k3s_server_by_argv0() {
        let inv = parse(&argv(
            "/usr/bin/k3s server --data-dir /var/lib/rancher/k3s -c /etc/c.yaml --token=abc \
             --node-label a=b --node-label c=d --disable traefik --cluster-init --flannel-backend none",
        ))
        .unwrap();
        assert_eq!(inv.distribution, Distribution::K3s);
        assert_eq!(inv.command, Command::Server);
        assert_eq!(inv.role(), "server");
        assert_eq!(inv.flag("data-dir"), Some("/var/lib/rancher/k3s"));
        assert_eq!(inv.flag("config"), Some("/etc/c.yaml"));
        assert_eq!(inv.flag("token"), Some("abc"));
        assert_eq!(inv.flags["node-label"], vec!["a=b", "c=d"]);
        assert_eq!(inv.flag("cluster-init"), Some("true"));
        assert_eq!(inv.flag("flannel-backend"), Some("none"));
        assert!(inv.args.is_empty());
    }

    #[test]
    fn k3s_agent_by_first_argument() {
        let inv = parse(&argv(
            "k8s-standin k3s agent --server https://10.0.0.1:6443 -t tok --token-file /x",
        ))
        .unwrap();
        assert_eq!(inv.command, Command::Agent);
        assert_eq!(inv.flag("server"), Some("https://10.0.0.1:6443"));
        assert_eq!(inv.flag("token"), Some("tok"));
        assert_eq!(inv.flag("token-file"), Some("/x"));
    }

    #[test]
    fn k0s_controller_single_and_join_token() {
        let inv = parse(&argv("k0s controller --single --data-dir /var/lib/k0s")).unwrap();
        assert_eq!(inv.distribution, Distribution::K0s);
        assert_eq!(inv.role(), "controller");
        assert!(inv.has("single"));
        let inv = parse(&argv("k0s controller --enable-worker TOKENDATA")).unwrap();
        assert!(inv.has("enable-worker"));
        assert_eq!(inv.args, vec!["TOKENDATA"]);
        let inv = parse(&argv("k0s worker --token-file /etc/k0s/join")).unwrap();
        assert_eq!(inv.role(), "worker");
        assert_eq!(inv.flag("token-file"), Some("/etc/k0s/join"));
        let inv = parse(&argv("k0s token create --role=worker")).unwrap();
        assert_eq!(inv.command, Command::TokenCreate);
        assert_eq!(inv.flag("role"), Some("worker"));
    }

    #[test]
    fn kubectl_raw_both_spellings() {
        for line in [
            "k3s kubectl get --raw=/readyz",
            "k3s kubectl get --raw /readyz",
            "k8s-standin k0s kubectl get --raw /readyz",
        ] {
            let inv = parse(&argv(line)).unwrap();
            assert_eq!(inv.command, Command::Kubectl, "{line}");
            assert_eq!(inv.flag("raw"), Some("/readyz"), "{line}");
            assert_eq!(inv.args, vec!["get"], "{line}");
        }
    }

    #[test]
    fn errors_and_help() {
        assert!(matches!(
            parse(&argv("k8s-standin kubeadm init")),
            Err(CliError::NoDistribution(_))
        ));
        assert!(matches!(
            parse(&argv("k3s etcd-snapshot")),
            Err(CliError::UnknownCommand { .. })
        ));
        assert!(matches!(
            parse(&argv("k3s")),
            Err(CliError::NoCommand { .. })
        ));
        assert_eq!(
            parse(&argv("k8s-standin --help")).unwrap().command,
            Command::Help
        );
        assert_eq!(
            parse(&argv("k3s server --help")).unwrap().command,
            Command::Help
        );
        assert_eq!(
            parse(&argv("k3s --version")).unwrap().command,
            Command::Version
        );
    }
}
