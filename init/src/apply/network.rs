//! `[network]`: interfaces matched by name, glob or MAC (from
//! `/sys/class/net`), brought up; static addresses and routes through
//! rtnetlink; DHCP through a generated service running busybox `udhcpc` with
//! a lease script written to `/run/basalt/` (busybox's default script path
//! does not exist on Basalt); Wi-Fi through a generated `wpa_supplicant`
//! config and service when the image has `wpa_supplicant`;
//! `/etc/resolv.conf` from the static name servers.
//!
//! Without a `[network]` section every wired Ethernet interface uses DHCP.

use std::net::IpAddr;
use std::path::Path;

use super::services::{Generated, find_program};
use super::{ApplyError, Outcome, Root, System, write_atomic};
use crate::nodeconfig::{Interface, NodeConfig, Wifi, WifiAuth};
use crate::sys::Errno;

pub const UDHCPC_SCRIPT: &str = "/run/basalt/udhcpc.script";

/// A kernel network interface, from `/sys/class/net/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub mac: String,
    /// ARPHRD_ETHER (1), a device behind it, not wireless.
    pub wired_ethernet: bool,
}

pub fn links(sys_class_net: &Path) -> Vec<Link> {
    let mut out: Vec<Link> = std::fs::read_dir(sys_class_net)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let p = e.path();
            let read = |f: &str| {
                std::fs::read_to_string(p.join(f))
                    .map(|s| s.trim().to_lowercase())
                    .unwrap_or_default()
            };
            Link {
                name: e.file_name().to_string_lossy().into_owned(),
                mac: read("address"),
                wired_ethernet: read("type") == "1"
                    && p.join("device").exists()
                    && !p.join("wireless").exists()
                    && !p.join("phy80211").exists(),
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Shell-style glob: `*`, `?`, `[abc]`, `[a-z]`, `[!x]`.
pub fn glob(pattern: &str, name: &str) -> bool {
    fn m(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|i| m(&p[1..], &n[i..])),
            Some('?') => !n.is_empty() && m(&p[1..], &n[1..]),
            Some('[') => {
                let Some(close) = p.iter().skip(2).position(|&c| c == ']').map(|i| i + 2) else {
                    return n.first() == Some(&'[') && m(&p[1..], &n[1..]);
                };
                let Some(&c) = n.first() else { return false };
                let mut set = &p[1..close];
                let negate = matches!(set.first(), Some('!' | '^'));
                if negate {
                    set = &set[1..];
                }
                let mut hit = false;
                let mut i = 0;
                while i < set.len() {
                    if i + 2 < set.len() && set[i + 1] == '-' {
                        hit |= set[i] <= c && c <= set[i + 2];
                        i += 3;
                    } else {
                        hit |= set[i] == c;
                        i += 1;
                    }
                }
                hit != negate && m(&p[close + 1..], &n[1..])
            }
            Some(&c) => n.first() == Some(&c) && m(&p[1..], &n[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    m(&p, &n)
}

/// The links an interface entry applies to.
pub fn matching<'a>(key: &str, iface: &Interface, links: &'a [Link]) -> Vec<&'a Link> {
    links
        .iter()
        .filter(|l| {
            let by_name = match &iface.match_name {
                Some(g) => glob(g, &l.name),
                None => iface.match_mac.is_some() || l.name == key,
            };
            let by_mac = iface
                .match_mac
                .as_ref()
                .is_none_or(|m| m.eq_ignore_ascii_case(&l.mac));
            by_name && by_mac
        })
        .collect()
}

/// Service names are `[a-z0-9._-]`: interface names may hold more.
fn service_suffix(link: &str) -> String {
    link.chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '.' | '_' | '-') => c,
            _ => '-',
        })
        .collect()
}

/// The lease script for udhcpc (`-s`): applies address, default route and,
/// unless the config names static name servers, `/etc/resolv.conf`.
pub fn udhcpc_script(static_dns: bool) -> String {
    format!(
        r#"#!/bin/sh
# Generated at boot by basalt-node-config: applies a DHCP lease for busybox
# udhcpc (-s). $1 is deconfig, bound, renew, leasefail or nak.
[ -n "$interface" ] || exit 1
static_dns={static_dns}
case "$1" in
deconfig)
  ip -4 addr flush dev "$interface"
  ip link set dev "$interface" up
  ;;
bound|renew)
  if [ "$1" = bound ]; then ip -4 addr flush dev "$interface"; fi
  ip addr add "$ip/${{mask:-24}}" ${{broadcast:+broadcast "$broadcast"}} dev "$interface" 2>/dev/null
  if [ -n "$router" ]; then
    while ip route del default dev "$interface" 2>/dev/null; do :; done
    for r in $router; do ip route add default via "$r" dev "$interface" && break; done
  fi
  if [ "$static_dns" = 0 ] && [ -n "$dns" ]; then
    {{ [ -n "$domain" ] && echo "search $domain"; for d in $dns; do echo "nameserver $d"; done; }} > /etc/resolv.conf.udhcpc
    mv /etc/resolv.conf.udhcpc /etc/resolv.conf
  fi
  echo "basalt-udhcpc: $interface $1 $ip/${{mask:-24}} router ${{router:-none}} dns ${{dns:-none}}"
  ;;
esac
exit 0
"#,
        static_dns = u8::from(static_dns)
    )
}

/// A `wpa_supplicant` config for one network. The SSID is written in hex
/// (any bytes allowed); a passphrase is quoted (wpa_supplicant takes the
/// text up to the last `"`, and the parser allows printable ASCII only).
pub fn wpa_conf(w: &Wifi) -> String {
    let mut s = String::from(
        "# Generated at boot by basalt-node-config\nctrl_interface=/run/wpa_supplicant\nupdate_config=0\n",
    );
    if let Some(c) = &w.country {
        s.push_str(&format!("country={c}\n"));
    }
    let ssid: String = w.ssid.bytes().map(|b| format!("{b:02x}")).collect();
    s.push_str(&format!("network={{\n\tssid={ssid}\n"));
    match &w.auth {
        WifiAuth::Open => s.push_str("\tkey_mgmt=NONE\n"),
        WifiAuth::Psk(p) => s.push_str(&format!("\tkey_mgmt=WPA-PSK\n\tpsk=\"{}\"\n", p.0)),
        WifiAuth::PskHash(h) => s.push_str(&format!("\tkey_mgmt=WPA-PSK\n\tpsk={}\n", h.0)),
    }
    if w.hidden {
        s.push_str("\tscan_ssid=1\n");
    }
    s.push_str("}\n");
    s
}

pub fn resolv_conf(cfg: &NodeConfig) -> Option<String> {
    let mut dns: Vec<IpAddr> = Vec::new();
    let mut search: Vec<String> = Vec::new();
    for i in cfg.network.interfaces.values() {
        for d in &i.dns {
            if !dns.contains(d) {
                dns.push(*d);
            }
        }
        for s in &i.dns_search {
            if !search.contains(s) {
                search.push(s.clone());
            }
        }
    }
    if dns.is_empty() {
        return None;
    }
    let mut s = String::from("# Generated at boot by basalt-node-config\n");
    if !search.is_empty() {
        s.push_str(&format!("search {}\n", search.join(" ")));
    }
    for d in dns {
        s.push_str(&format!("nameserver {d}\n"));
    }
    Some(s)
}

fn ignore_exists(r: Result<(), Errno>) -> Result<(), Errno> {
    match r {
        Err(Errno::EEXIST) => Ok(()),
        r => r,
    }
}

pub fn step(
    root: &Root,
    cfg: &NodeConfig,
    sys: &mut dyn System,
    out: &mut Outcome,
) -> Result<(), ApplyError> {
    if let Err(errno) = sys.link_up("lo") {
        out.error("network", format_args!("bringing up lo: {errno}"));
    }
    let all = links(&root.at("/sys/class/net"));
    let static_dns = resolv_conf(cfg);
    let mut dhcp_links: Vec<(String, Option<String>)> = Vec::new();
    if cfg.network.interfaces.is_empty() {
        for l in all.iter().filter(|l| l.wired_ethernet) {
            if let Err(errno) = sys.link_up(&l.name) {
                out.error("network", format_args!("bringing up {}: {errno}", l.name));
            }
            dhcp_links.push((l.name.clone(), None));
        }
    }
    for (key, iface) in &cfg.network.interfaces {
        let found = matching(key, iface, &all);
        if found.is_empty() {
            out.warn(format!(
                "network: interface entry {key:?} matches no interface (have: {})",
                all.iter()
                    .map(|l| l.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        for l in found {
            let name = &l.name;
            if let Err(errno) = sys.link_up(name) {
                out.error("network", format_args!("bringing up {name}: {errno}"));
                continue;
            }
            for a in &iface.addresses {
                if let Err(errno) = ignore_exists(sys.add_address(name, a.addr, a.prefix)) {
                    out.error("network", format_args!("adding {a} to {name}: {errno}"));
                }
            }
            for r in &iface.routes {
                let dst = (r.to.prefix > 0).then_some((r.to.addr, r.to.prefix));
                if let Err(errno) = ignore_exists(sys.add_route(name, dst, Some(r.via))) {
                    out.error(
                        "network",
                        format_args!("adding route {} via {} on {name}: {errno}", r.to, r.via),
                    );
                }
            }
            let gateways = [
                iface.gateway4.map(IpAddr::V4),
                iface.gateway6.map(IpAddr::V6),
            ];
            for gw in gateways.into_iter().flatten() {
                if let Err(errno) = ignore_exists(sys.add_route(name, None, Some(gw))) {
                    out.error(
                        "network",
                        format_args!("adding default route via {gw} on {name}: {errno}"),
                    );
                }
            }
            let mut after = None;
            if let Some(w) = &iface.wifi {
                after = wifi(root, name, w, out)?;
            }
            if iface.dhcp4 {
                dhcp_links.push((name.clone(), after));
            }
        }
    }
    if !dhcp_links.is_empty() {
        dhcp(root, cfg, &dhcp_links, static_dns.is_some(), out)?;
    }
    if let Some(text) = static_dns {
        write_atomic(&root.at("/etc/resolv.conf"), text.as_bytes(), 0o644)?;
    }
    Ok(())
}

fn dhcp(
    root: &Root,
    cfg: &NodeConfig,
    links: &[(String, Option<String>)],
    static_dns: bool,
    out: &mut Outcome,
) -> Result<(), ApplyError> {
    let program: Vec<String> = match find_program(
        root,
        &[
            "/sbin/udhcpc",
            "/usr/sbin/udhcpc",
            "/bin/udhcpc",
            "/usr/bin/udhcpc",
        ],
    ) {
        Some(p) => vec![p],
        None => {
            match find_program(root, &["/bin/busybox", "/usr/bin/busybox"]) {
                Some(b) => vec![b, "udhcpc".into()],
                None => {
                    // The image's choice, not the config's fault: a warning.
                    out.warn(format!(
                            "network: DHCP wanted on {} but the image has no DHCP client (busybox udhcpc)",
                            links.iter().map(|l| l.0.as_str()).collect::<Vec<_>>().join(", ")
                        ));
                    return Ok(());
                }
            }
        }
    };
    let script = root.at(UDHCPC_SCRIPT);
    write_atomic(&script, udhcpc_script(static_dns).as_bytes(), 0o755)?;
    for (link, after) in links {
        let mut exec = program.clone();
        exec.extend(["-f", "-i", link.as_str(), "-s", UDHCPC_SCRIPT].map(String::from));
        if let Some(h) = &cfg.hostname {
            exec.extend(["-x".to_string(), format!("hostname:{h}")]);
        }
        let g = Generated {
            exec,
            after: after.iter().cloned().collect(),
            backoff: Some((2000, 60000, 300)),
            ..Generated::default()
        };
        out.services.push((
            format!("dhcp-{}", service_suffix(link)),
            g.render(&format!("DHCP client for {link}")),
        ));
    }
    Ok(())
}

/// Write the Wi-Fi config; returns the wpa_supplicant service's name when
/// the image has wpa_supplicant.
fn wifi(
    root: &Root,
    link: &str,
    w: &Wifi,
    out: &mut Outcome,
) -> Result<Option<String>, ApplyError> {
    let conf_path = format!("/run/basalt/wpa_supplicant-{link}.conf");
    let p = root.at(&conf_path);
    write_atomic(&p, wpa_conf(w).as_bytes(), 0o600)?;
    let Some(wpa) = find_program(root, &["/usr/sbin/wpa_supplicant", "/sbin/wpa_supplicant"])
    else {
        out.warn(format!(
            "network: Wi-Fi configured on {link} but the image has no wpa_supplicant; wrote {conf_path} only"
        ));
        return Ok(None);
    };
    let name = format!("wpa-{}", service_suffix(link));
    let g = Generated {
        backoff: Some((2000, 60000, 300)),
        ..Generated::new(&[&wpa, "-i", link, "-c", &conf_path, "-D", "nl80211,wext"])
    };
    out.services
        .push((name.clone(), g.render(&format!("Wi-Fi on {link}"))));
    Ok(Some(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::system::fake::Recorder;
    use crate::nodeconfig::{Cidr, Route, Secret};

    fn fake_link(root: &Root, name: &str, mac: &str, ty: &str, device: bool, wireless: bool) {
        let d = root.at("/sys/class/net").join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("address"), format!("{mac}\n")).unwrap();
        std::fs::write(d.join("type"), format!("{ty}\n")).unwrap();
        if device {
            std::fs::create_dir_all(d.join("device")).unwrap();
        }
        if wireless {
            std::fs::create_dir_all(d.join("wireless")).unwrap();
        }
    }

    fn fixture() -> (tempfile::TempDir, Root) {
        let t = tempfile::tempdir().unwrap();
        let root = Root(t.path().to_path_buf());
        fake_link(&root, "lo", "00:00:00:00:00:00", "772", false, false);
        fake_link(&root, "eth0", "52:54:00:12:34:56", "1", true, false);
        fake_link(&root, "enp1s0", "52:54:00:AA:BB:CC", "1", true, false);
        fake_link(&root, "wlan0", "dc:a6:32:01:02:03", "1", true, true);
        fake_link(&root, "dummy0", "aa:aa:aa:aa:aa:aa", "1", false, false);
        std::fs::create_dir_all(root.at("/bin")).unwrap();
        std::fs::write(root.at("/bin/busybox"), "").unwrap();
        std::fs::create_dir_all(root.at("/etc")).unwrap();
        (t, root)
    }

    #[test]
    fn globs() {
        for (p, n, want) in [
            ("eth*", "eth0", true),
            ("eth*", "wlan0", false),
            ("en?s[0-9]", "enp1s0", false),
            ("en?s[0-9]", "ens3", false),
            ("en??s[0-9]", "enp1s0", true),
            ("wlan[!1]", "wlan0", true),
            ("wlan[!0]", "wlan0", false),
            ("*", "x", true),
            ("a[", "a[", true),
        ] {
            assert_eq!(glob(p, n), want, "{p} {n}");
        }
    }

    #[test]
    fn no_network_section_means_dhcp_on_wired_ethernet() {
        let (_t, root) = fixture();
        let mut sys = Recorder::default();
        let mut out = Outcome::default();
        step(&root, &NodeConfig::default(), &mut sys, &mut out).unwrap();
        assert_eq!(sys.calls, ["up lo", "up enp1s0", "up eth0"]);
        let names: Vec<_> = out.services.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(names, ["dhcp-enp1s0", "dhcp-eth0"]);
        let d = crate::service::ServiceDef::parse("dhcp-eth0", &out.services[1].1, Path::new("x"))
            .unwrap();
        assert_eq!(
            d.exec,
            [
                "/bin/busybox",
                "udhcpc",
                "-f",
                "-i",
                "eth0",
                "-s",
                UDHCPC_SCRIPT
            ]
        );
        let script = std::fs::read_to_string(root.at(UDHCPC_SCRIPT)).unwrap();
        assert!(script.starts_with("#!/bin/sh\n") && script.contains("static_dns=0"));
        assert!(!root.at("/etc/resolv.conf").exists());
    }

    #[test]
    fn static_matched_by_glob_and_mac_with_routes_dns_and_wifi() {
        let (_t, root) = fixture();
        let mut cfg = NodeConfig {
            hostname: Some("edge-1".into()),
            ..NodeConfig::default()
        };
        let lan = Interface {
            match_name: Some("eth*".into()),
            addresses: vec![Cidr {
                addr: "192.168.1.10".parse().unwrap(),
                prefix: 24,
            }],
            gateway4: Some("192.168.1.1".parse().unwrap()),
            routes: vec![Route {
                to: Cidr {
                    addr: "10.20.0.0".parse().unwrap(),
                    prefix: 16,
                },
                via: "192.168.1.254".parse().unwrap(),
            }],
            dns: vec!["1.1.1.1".parse().unwrap(), "9.9.9.9".parse().unwrap()],
            dns_search: vec!["example.org".into()],
            ..Interface::default()
        };
        let by_mac = Interface {
            match_mac: Some("52:54:00:aa:bb:cc".into()),
            dhcp4: true,
            ..Interface::default()
        };
        let wifi = Interface {
            dhcp4: true,
            wifi: Some(Wifi {
                country: Some("GB".into()),
                ssid: "Cafe \"Net\"".into(),
                auth: WifiAuth::Psk(Secret("pass phrase\"1".into())),
                hidden: true,
            }),
            ..Interface::default()
        };
        let missing = Interface {
            match_name: Some("usb*".into()),
            ..Interface::default()
        };
        cfg.network.interfaces.insert("lan".into(), lan);
        cfg.network.interfaces.insert("uplink".into(), by_mac);
        cfg.network.interfaces.insert("wlan0".into(), wifi);
        cfg.network.interfaces.insert("usb".into(), missing);
        let mut sys = Recorder {
            fail: vec!["route eth0 10.20".into()],
            ..Recorder::default()
        };
        let mut out = Outcome::default();
        step(&root, &cfg, &mut sys, &mut out).unwrap();
        assert_eq!(
            sys.calls,
            [
                "up lo",
                "up eth0",
                "addr eth0 192.168.1.10/24",
                "route eth0 10.20.0.0/16 via 192.168.1.254",
                "route eth0 default via 192.168.1.1",
                "up enp1s0",
                "up wlan0",
            ]
        );
        assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
        assert_eq!(
            out.warnings.len(),
            2,
            "usb matches nothing, no wpa_supplicant: {:?}",
            out.warnings
        );
        let names: Vec<_> = out.services.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(names, ["dhcp-enp1s0", "dhcp-wlan0"]);
        assert!(out.services[0].1.contains("hostname:edge-1"));
        assert_eq!(
            std::fs::read_to_string(root.at("/etc/resolv.conf")).unwrap(),
            "# Generated at boot by basalt-node-config\nsearch example.org\nnameserver 1.1.1.1\nnameserver 9.9.9.9\n"
        );
        assert!(
            std::fs::read_to_string(root.at(UDHCPC_SCRIPT))
                .unwrap()
                .contains("static_dns=1")
        );
        let conf =
            std::fs::read_to_string(root.at("/run/basalt/wpa_supplicant-wlan0.conf")).unwrap();
        assert_eq!(
            conf,
            "# Generated at boot by basalt-node-config\nctrl_interface=/run/wpa_supplicant\nupdate_config=0\ncountry=GB\nnetwork={\n\tssid=4361666520224e657422\n\tkey_mgmt=WPA-PSK\n\tpsk=\"pass phrase\"1\"\n\tscan_ssid=1\n}\n"
        );

        // With wpa_supplicant in the image: its service, and DHCP after it.
        std::fs::create_dir_all(root.at("/usr/sbin")).unwrap();
        std::fs::write(root.at("/usr/sbin/wpa_supplicant"), "").unwrap();
        let mut out = Outcome::default();
        step(&root, &cfg, &mut Recorder::default(), &mut out).unwrap();
        let names: Vec<_> = out.services.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(names, ["wpa-wlan0", "dhcp-enp1s0", "dhcp-wlan0"]);
        let d = crate::service::ServiceDef::parse("dhcp-wlan0", &out.services[2].1, Path::new("x"))
            .unwrap();
        assert_eq!(d.after, ["wpa-wlan0"]);
    }

    #[test]
    fn wpa_open_and_hash() {
        let w = Wifi {
            country: None,
            ssid: "a".into(),
            auth: WifiAuth::Open,
            hidden: false,
        };
        assert!(wpa_conf(&w).contains("\tssid=61\n\tkey_mgmt=NONE\n}"));
        let h = "0".repeat(64);
        let w = Wifi {
            auth: WifiAuth::PskHash(Secret(h.clone())),
            ..w
        };
        assert!(wpa_conf(&w).contains(&format!("\tpsk={h}\n")));
    }
}
