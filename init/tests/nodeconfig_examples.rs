//! The full examples: both syntaxes decode to the same `NodeConfig`, and the
//! values are the ones written (checked field by field, not just "parses").

use std::net::IpAddr;
use std::path::Path;

use basalt_init::nodeconfig::{
    self, Distribution, NodeConfig, Role, Secret, Token, WifiAuth, load_cloud_init,
    load_dir_or_file, load_toml,
};

fn corpus(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/nodeconfig-corpus")
        .join(rel)
}

fn show(r: Result<NodeConfig, Vec<nodeconfig::Diagnostic>>) -> NodeConfig {
    match r {
        Ok(c) => c,
        Err(d) => panic!(
            "{}",
            d.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

fn toml_example() -> NodeConfig {
    let path = corpus("valid/node.toml");
    let text = std::fs::read_to_string(&path).expect("read example");
    show(load_toml(&path, &text))
}

#[test]
fn both_syntaxes_give_the_same_node_config() {
    let from_toml = toml_example();
    let from_cloud = show(load_cloud_init(&corpus("valid/cloud-init")));
    assert_eq!(from_toml, from_cloud);
    assert_ne!(from_toml, NodeConfig::default());
}

#[test]
fn load_dir_or_file_picks_the_syntax() {
    assert_eq!(
        show(load_dir_or_file(&corpus("valid/node.toml"))),
        toml_example()
    );
    assert_eq!(
        show(load_dir_or_file(&corpus("valid/cloud-init"))),
        toml_example()
    );
    assert_eq!(
        show(load_dir_or_file(&corpus("valid/cloud-init/user-data"))),
        toml_example()
    );
    assert_eq!(show(load_dir_or_file(&corpus("valid"))), toml_example());
    let err = load_dir_or_file(&corpus("")).expect_err("the corpus root holds no node.toml");
    assert!(err[0].message.contains("no node config here"), "{}", err[0]);
}

#[test]
fn example_values_are_the_written_ones() {
    let c = toml_example();
    assert_eq!(c.hostname.as_deref(), Some("edge-01.example.org"));
    let names: Vec<&str> = c.users.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["ops", "root"]);
    assert_eq!(c.users[0].groups, ["wheel", "video"]);
    assert!(
        c.users[0]
            .password_hash
            .as_ref()
            .is_some_and(|h| h.0.starts_with("$6$basaltsalt$"))
    );
    assert_eq!(c.users[1].password_hash, None);
    assert_eq!(c.ssh.port, 2222);

    let lan = &c.network.interfaces["lan"];
    assert_eq!(lan.match_name.as_deref(), Some("eth*"));
    assert!(!lan.dhcp4, "static addresses turn the DHCP default off");
    assert_eq!(lan.addresses[0].to_string(), "192.168.1.10/24");
    assert_eq!(lan.addresses[1].to_string(), "fd00:1::10/64");
    assert_eq!(
        lan.gateway4.map(|g| g.to_string()).as_deref(),
        Some("192.168.1.1")
    );
    assert_eq!(lan.routes[0].to.to_string(), "10.20.0.0/16");
    assert_eq!(lan.dns[1], "1.1.1.1".parse::<IpAddr>().expect("ip"));
    assert_eq!(
        c.network.interfaces["uplink"].match_mac.as_deref(),
        Some("dc:a6:32:01:02:03")
    );
    let wifi = c.network.interfaces["wlan0"].wifi.as_ref().expect("wifi");
    assert_eq!(
        (wifi.country.as_deref(), wifi.ssid.as_str(), wifi.hidden),
        (Some("GB"), "farm-network", true)
    );
    assert_eq!(
        wifi.auth,
        WifiAuth::Psk(Secret("correct horse battery".into()))
    );

    assert_eq!(
        c.time.ntp_servers.as_deref(),
        Some(&["ntp.example.org".to_owned(), "192.168.1.1".to_owned()][..])
    );
    assert_eq!(c.kernel.sysctl["net.ipv4.ip_forward"], "1");
    assert_eq!(c.kernel.sysctl["vm.swappiness"], "10");

    let paths: Vec<&str> = c.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/etc/motd",
            "/etc/sysctl.d/90-somaxconn.conf",
            "/var/lib/app/settings.json"
        ]
    );
    assert_eq!(c.files[0].content, b"Welcome to edge-01.\n");
    assert_eq!(
        (c.files[0].mode, c.files[0].owner.as_str()),
        (0o644, "root")
    );
    assert_eq!(c.files[1].content, b"net.core.somaxconn = 1024");
    assert_eq!(c.files[1].mode, 0o600);
    assert_eq!(
        (
            c.files[2].mode,
            c.files[2].owner.as_str(),
            c.files[2].group.as_str()
        ),
        (0o640, "1000", "1000")
    );

    let k = c.kubernetes.as_ref().expect("kubernetes");
    assert_eq!((k.distribution, k.role), (Distribution::K3s, Role::Agent));
    assert_eq!(
        k.token,
        Some(Token::Value(Secret(
            "K10abc::server:0123456789abcdef".into()
        )))
    );
    assert_eq!(k.labels["topology.kubernetes.io/zone"], "north");
    assert_eq!(
        k.config.as_deref(),
        Some("kubelet-arg:\n  - \"eviction-hard=memory.available<100Mi\"\n")
    );
    assert_eq!(c.update.health_gate.timeout_seconds, 900);
    assert!(c.console.emergency_shell);
    assert_eq!(
        c.logs,
        nodeconfig::Logs {
            ring_kib: Some(64),
            console: Some(nodeconfig::ConsoleLevel::Init),
            persistent: Some(true),
            persistent_max_kib: Some(2048),
        }
    );
}

/// `[logs]` alone, in both syntaxes: the same keys, the unset ones `None`
/// (they stay the image's), and the bounds of each range accepted.
#[test]
fn logs_in_both_syntaxes() {
    let toml = "[logs]\nring_kib = 4\nconsole = \"none\"\npersistent_max_kib = 1048576\n";
    let user_data = "#cloud-config\nbasalt:\n  logs:\n    ring_kib: 4\n    console: none\n    persistent_max_kib: 1048576\n";
    let a = show(load_toml(Path::new("node.toml"), toml));
    let b = show(nodeconfig::parse_cloud_init(
        Path::new(""),
        &nodeconfig::CloudInitSources {
            user_data: Some(user_data),
            ..Default::default()
        },
    ));
    assert_eq!(a, b);
    assert_eq!(
        a.logs,
        nodeconfig::Logs {
            ring_kib: Some(4),
            console: Some(nodeconfig::ConsoleLevel::None),
            persistent: None,
            persistent_max_kib: Some(1024 * 1024),
        }
    );
    let top = show(load_toml(
        Path::new("node.toml"),
        "[logs]\nring_kib = 16384\npersistent = false\n",
    ));
    assert_eq!(top.logs.ring_kib, Some(16384));
    assert_eq!(top.logs.persistent, Some(false));
    assert_eq!(top.logs.console, None);
}

#[test]
fn secrets_are_not_printed_by_debug() {
    let text = format!("{:?}", toml_example());
    assert!(!text.contains("K10abc"), "token leaked into Debug output");
    assert!(
        !text.contains("correct horse"),
        "Wi-Fi passphrase leaked into Debug output"
    );
}

#[test]
fn empty_config_has_the_documented_defaults() {
    let c = show(load_toml(Path::new("node.toml"), ""));
    assert_eq!(c, NodeConfig::default());
    assert!(c.ssh.enabled && c.ssh.port == 22);
    assert!(!c.console.emergency_shell);
    assert_eq!(c.update.health_gate.checks, ["kubernetes"]);
}

#[test]
fn schema_doc_carries_the_examples_verbatim() {
    let doc = nodeconfig::schema_doc();
    for rel in [
        "valid/node.toml",
        "valid/cloud-init/meta-data",
        "valid/cloud-init/user-data",
        "valid/cloud-init/network-config",
    ] {
        let text = std::fs::read_to_string(corpus(rel)).expect("read example");
        assert!(
            doc.contains(&text),
            "docs/node-config.md does not contain {rel} verbatim"
        );
    }
}

/// A second pair, covering what the full example does not: k0s worker with a
/// token file, Wi-Fi by PSK hash and open, NTP off, IPv6 gateway, a default
/// route, `network:`-wrapped network-config, unquoted dotted sysctl keys.
#[test]
fn second_pair_is_equal_too() {
    let hash = "a".repeat(64);
    let toml = format!(
        r#"
[[users]]
name = "root"
ssh_authorized_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH39+wjtvg8YEKEwXDlvWLYLIKWtP55/ac/fl0II1zua k"]

[network.interfaces.wl]
match = {{ name = "wlan*" }}
addresses = ["fd00::2/64"]
gateway6 = "fd00::1"
routes = [{{ to = "default", via = "fd00::fe" }}]
wifi = {{ ssid = "barn", psk_hash = "{hash}", country = "DE" }}

[network.interfaces.guest]
wifi = {{ ssid = "open-net" }}

[time]
ntp_servers = []

[kernel.sysctl]
net.ipv4.ip_forward = 1

[kubernetes]
distribution = "k0s"
role = "worker"
token_file = "/boot/k0s-join.token"
"#
    );
    let user_data = r#"#cloud-config
ssh_authorized_keys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH39+wjtvg8YEKEwXDlvWLYLIKWtP55/ac/fl0II1zua k"]
ntp:
  enabled: false
basalt:
  kernel:
    sysctl:
      net.ipv4.ip_forward: 1
  kubernetes: {distribution: k0s, role: worker, token_file: /boot/k0s-join.token}
"#;
    let network = format!(
        r#"network:
  version: 2
  wifis:
    wl:
      match: {{name: "wlan*"}}
      addresses: ["fd00::2/64"]
      gateway6: "fd00::1"
      routes: [{{to: default, via: "fd00::fe"}}]
      regulatory-domain: DE
      access-points:
        barn: {{password: "{hash}"}}
    guest:
      access-points:
        open-net:
"#
    );
    let a = show(load_toml(Path::new("node.toml"), &toml));
    let src = nodeconfig::CloudInitSources {
        meta_data: None,
        user_data: Some(user_data),
        network_config: Some(&network),
    };
    let b = show(nodeconfig::parse_cloud_init(Path::new(""), &src));
    assert_eq!(a, b);
    let wl = &a.network.interfaces["wl"];
    assert!(!wl.dhcp4);
    assert_eq!(wl.routes[0].to.to_string(), "::/0");
    assert!(matches!(
        &wl.wifi.as_ref().expect("wifi").auth,
        WifiAuth::PskHash(_)
    ));
    assert_eq!(
        a.network.interfaces["guest"].wifi.as_ref().map(|w| &w.auth),
        Some(&WifiAuth::Open)
    );
    assert!(a.network.interfaces["guest"].dhcp4);
    assert_eq!(a.time.ntp_servers, Some(Vec::new()));
    assert_eq!(a.kernel.sysctl["net.ipv4.ip_forward"], "1");
    let k = a.kubernetes.expect("kubernetes");
    assert_eq!(
        (k.role, k.token),
        (
            Role::Worker,
            Some(Token::File("/boot/k0s-join.token".into()))
        )
    );
}

#[test]
fn a_windows_txt_extension_is_named() {
    let dir = std::env::temp_dir().join(format!("basalt-nodeconfig-txt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("node.toml.txt"), "hostname = \"a\"\n").expect("write");
    let err = load_dir_or_file(&dir).expect_err("node.toml.txt is not node.toml");
    std::fs::remove_dir_all(&dir).expect("clean up");
    assert!(
        err[0].message.contains("rename it to `node.toml`"),
        "{}",
        err[0]
    );
    assert_eq!((err[0].line, err[0].column), (1, 1));
}

#[test]
fn both_syntaxes_in_one_directory_is_an_error() {
    let dir = std::env::temp_dir().join(format!("basalt-nodeconfig-both-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("node.toml"), "").expect("write");
    std::fs::write(dir.join("user-data"), "#cloud-config\n").expect("write");
    let err = load_dir_or_file(&dir).expect_err("two syntaxes");
    std::fs::remove_dir_all(&dir).expect("clean up");
    assert!(err[0].message.contains("keep one syntax"), "{}", err[0]);
    assert!(err[0].file.ends_with("node.toml"));
}
