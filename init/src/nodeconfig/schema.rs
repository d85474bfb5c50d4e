//! The node config as plain data: what both syntaxes decode into and what
//! stage 2 applies. Defaults here are the documented defaults
//! (docs/node-config.md); nothing in this file parses or touches the system.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub use crate::logs::ConsoleLevel;

/// Every per-device setting. `NodeConfig::default()` is an empty config.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeConfig {
    /// RFC 1123 host name (may be a dotted FQDN).
    pub hostname: Option<String>,
    pub users: Vec<User>,
    pub ssh: Ssh,
    pub network: Network,
    pub time: Time,
    pub kernel: Kernel,
    /// Files written under `/etc` or `/var`, sorted by path.
    pub files: Vec<File>,
    pub kubernetes: Option<Kubernetes>,
    pub update: Update,
    pub console: Console,
    pub logs: Logs,
}

/// A secret string: compared normally, never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub ssh_authorized_keys: Vec<String>,
    pub groups: Vec<String>,
    /// A crypt(3) hash (`$6$...`, `$y$...`); without it the account has no password login.
    pub password_hash: Option<Secret>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ssh {
    pub enabled: bool,
    pub port: u16,
}

impl Default for Ssh {
    fn default() -> Self {
        Ssh {
            enabled: true,
            port: 22,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Network {
    /// Interfaces by their config name. With none, every Ethernet interface uses DHCP.
    pub interfaces: BTreeMap<String, Interface>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Interface {
    /// Which kernel interfaces this applies to; with neither set, the one
    /// named like the config entry.
    pub match_name: Option<String>,
    pub match_mac: Option<String>,
    pub dhcp4: bool,
    pub addresses: Vec<Cidr>,
    pub gateway4: Option<Ipv4Addr>,
    pub gateway6: Option<Ipv6Addr>,
    pub routes: Vec<Route>,
    pub dns: Vec<IpAddr>,
    pub dns_search: Vec<String>,
    pub wifi: Option<Wifi>,
}

/// An address with its prefix length, e.g. `192.168.1.10/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub to: Cidr,
    pub via: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wifi {
    /// ISO 3166-1 alpha-2 regulatory domain, e.g. `GB`.
    pub country: Option<String>,
    pub ssid: String,
    pub auth: WifiAuth,
    pub hidden: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WifiAuth {
    Open,
    /// WPA2 passphrase, 8 to 63 printable ASCII characters.
    Psk(Secret),
    /// The 64-hex-digit PSK derived from passphrase and SSID (`wpa_passphrase`).
    PskHash(Secret),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Time {
    /// NTP servers; `None` uses Basalt's default pool, an empty list turns NTP off.
    pub ntp_servers: Option<Vec<String>>,
    /// IANA time zone name, e.g. `Europe/London`; UTC when unset.
    pub timezone: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Kernel {
    pub modules: Vec<String>,
    /// sysctl name (dotted, `net.ipv4.ip_forward`) to value.
    pub sysctl: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    /// Absolute, normalised, under `/etc/` or `/var/`.
    pub path: String,
    pub content: Vec<u8>,
    pub mode: u32,
    pub owner: String,
    pub group: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distribution {
    K3s,
    K0s,
}

impl Distribution {
    pub fn as_str(self) -> &'static str {
        match self {
            Distribution::K3s => "k3s",
            Distribution::K0s => "k0s",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// k3s server (control plane and workloads).
    Server,
    /// k3s agent joining `server_url`.
    Agent,
    /// k0s controller only.
    Controller,
    /// k0s controller that also runs workloads.
    ControllerWorker,
    /// k0s worker joining with a join token.
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Agent => "agent",
            Role::Controller => "controller",
            Role::ControllerWorker => "controller+worker",
            Role::Worker => "worker",
        }
    }

    /// Whether this role joins another node and so needs its token.
    pub fn joins(self) -> bool {
        matches!(self, Role::Agent | Role::Worker)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// The token itself (moved to `/var/lib/basalt/` on first use).
    Value(Secret),
    /// A file holding the token.
    File(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kubernetes {
    pub distribution: Distribution,
    pub role: Role,
    pub server_url: Option<String>,
    pub token: Option<Token>,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<String>,
    pub extra_args: Vec<String>,
    /// Components not to run (k3s `--disable`, k0s `--disable-components`).
    pub disable: Vec<String>,
    /// The distribution's own config file content, passed through after
    /// Basalt's keys (`/etc/rancher/k3s/config.yaml.d/`, k0s `--config`).
    pub config: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Update {
    pub url: Option<String>,
    pub channel: Option<String>,
    /// minisign public keys (base64, the second line of a `.pub` file).
    pub public_keys: Vec<String>,
    pub health_gate: HealthGate,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthGate {
    pub timeout_seconds: u32,
    /// Built-in checks (`kubernetes`, `network`, `time`) or absolute paths of
    /// programs in the root filesystem that must exit 0.
    pub checks: Vec<String>,
}

impl Default for HealthGate {
    fn default() -> Self {
        HealthGate {
            timeout_seconds: 600,
            checks: vec!["kubernetes".to_owned()],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Console {
    /// A root shell on the serial console when boot fails. Off by default.
    pub emergency_shell: bool,
}

/// `[logs]`: each key overrides the image's `[logs]` in
/// `/etc/basalt/image.toml` when set (docs/logs.md). Also the form in which
/// the `basalt-node-config` child hands them to PID 1 (`[logs]` of
/// `/run/basalt/node-config.toml`), hence `Deserialize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(default)]
pub struct Logs {
    /// RAM ring size in KiB (`crate::logs::RING_KIB`).
    pub ring_kib: Option<u32>,
    /// What is mirrored to the console.
    pub console: Option<ConsoleLevel>,
    /// Also append to `/var/log/basalt.log`.
    pub persistent: Option<bool>,
    /// Bound of `/var/log/basalt.log` in KiB before it is rotated
    /// (`crate::logs::PERSISTENT_MAX_KIB`).
    pub persistent_max_kib: Option<u32>,
}

impl Logs {
    /// `later`'s keys over these, key by key.
    pub fn overlay(self, later: Logs) -> Logs {
        Logs {
            ring_kib: later.ring_kib.or(self.ring_kib),
            console: later.console.or(self.console),
            persistent: later.persistent.or(self.persistent),
            persistent_max_kib: later.persistent_max_kib.or(self.persistent_max_kib),
        }
    }
}

impl NodeConfig {
    /// `later` laid over `self`: how the config on the FAT partition
    /// (later) combines with the image definition's default (self).
    ///
    /// Entries keyed by a name merge by that name, the later entry winning:
    /// users (by name), network interfaces (by config name), files (by
    /// path), sysctls (by name), `logs` keys (by key); kernel modules are the union. Every other
    /// section is taken from `later` when it differs from the default there,
    /// else kept from `self` — so a section is overridden by writing it,
    /// and setting a section back to exactly its defaults does not undo the
    /// image's value.
    pub fn overlay(mut self, later: NodeConfig) -> NodeConfig {
        fn pick<T: PartialEq + Default>(base: T, later: T) -> T {
            if later == T::default() { base } else { later }
        }
        if later.hostname.is_some() {
            self.hostname = later.hostname;
        }
        for u in later.users {
            match self.users.iter_mut().find(|x| x.name == u.name) {
                Some(x) => *x = u,
                None => self.users.push(u),
            }
        }
        self.users.sort_by(|a, b| a.name.cmp(&b.name));
        self.ssh = pick(self.ssh, later.ssh);
        self.network.interfaces.extend(later.network.interfaces);
        self.time = pick(self.time, later.time);
        for m in later.kernel.modules {
            if !self.kernel.modules.contains(&m) {
                self.kernel.modules.push(m);
            }
        }
        self.kernel.sysctl.extend(later.kernel.sysctl);
        for f in later.files {
            match self.files.iter_mut().find(|x| x.path == f.path) {
                Some(x) => *x = f,
                None => self.files.push(f),
            }
        }
        self.files.sort_by(|a, b| a.path.cmp(&b.path));
        if later.kubernetes.is_some() {
            self.kubernetes = later.kubernetes;
        }
        self.update = pick(self.update, later.update);
        self.console = pick(self.console, later.console);
        self.logs = self.logs.overlay(later.logs);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, key: &str) -> User {
        User {
            name: name.to_owned(),
            ssh_authorized_keys: vec![key.to_owned()],
            groups: Vec::new(),
            password_hash: None,
        }
    }

    #[test]
    fn overlay_merges_named_entries_and_overrides_written_sections() {
        let mut base = NodeConfig {
            hostname: Some("image".into()),
            ..NodeConfig::default()
        };
        base.users = vec![user("ops", "k1"), user("root", "k0")];
        base.ssh.port = 2222;
        base.kernel.modules = vec!["overlay".into()];
        base.kernel
            .sysctl
            .insert("vm.swappiness".into(), "10".into());
        base.console.emergency_shell = true;
        base.logs.persistent = Some(true);
        base.logs.ring_kib = Some(64);

        let mut later = NodeConfig {
            users: vec![user("ops", "k2")],
            ..NodeConfig::default()
        };
        later.kernel.modules = vec!["overlay".into(), "wireguard".into()];
        later
            .kernel
            .sysctl
            .insert("vm.swappiness".into(), "60".into());
        later.time.timezone = Some("UTC".into());
        later.logs.ring_kib = Some(128);

        let c = base.overlay(later);
        assert_eq!(c.hostname.as_deref(), Some("image"), "unset in later: kept");
        assert_eq!(c.users.len(), 2);
        assert_eq!(
            c.users[0].ssh_authorized_keys,
            ["k2"],
            "same name: later wins"
        );
        assert_eq!(c.users[1].name, "root");
        assert_eq!(c.ssh.port, 2222, "section left at defaults in later: kept");
        assert_eq!(c.kernel.modules, ["overlay", "wireguard"]);
        assert_eq!(c.kernel.sysctl["vm.swappiness"], "60");
        assert_eq!(c.time.timezone.as_deref(), Some("UTC"));
        assert!(c.console.emergency_shell);
        assert_eq!(
            (c.logs.persistent, c.logs.ring_kib),
            (Some(true), Some(128)),
            "logs merge key by key"
        );
    }
}
