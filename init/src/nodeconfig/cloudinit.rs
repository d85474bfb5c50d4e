//! cloud-init NoCloud files (`meta-data`, `user-data`, `network-config`)
//! into the same `NodeConfig` as `node.toml`.
//!
//! Only the keys that map onto Basalt's schema are read; any other key is an
//! error naming it and the file, never silently ignored. Settings that
//! cloud-init has no key for go under `basalt:` in `user-data`, in the
//! native schema's shape; settings cloud-init *does* have a key for must use
//! that key, so each setting has exactly one place.

use std::collections::BTreeMap;
use std::path::Path;

use super::check;
use super::decode::{
    self, Ctx, Located, base64_content, boolean, checked, entries, file_path, gateway, ip, list,
    merge_files, merge_users, mode, owner, string, string_list, table,
};
use super::schema::{File, Interface, NodeConfig, Secret, User, Wifi, WifiAuth};
use super::tree::{Entry, Kind, Pos, Value};
use super::{Diagnostic, strip_bom, yaml};

/// The three NoCloud files, as text (any may be absent).
#[derive(Debug, Clone, Copy, Default)]
pub struct Sources<'a> {
    pub meta_data: Option<&'a str>,
    pub user_data: Option<&'a str>,
    pub network_config: Option<&'a str>,
}

/// Keys of the native schema allowed under `basalt:`.
const BASALT_KEYS: &[&str] = &["ssh", "kernel", "kubernetes", "update", "console", "logs"];

/// Native keys that cloud-init spells its own way, and that way.
const NATIVE_ELSEWHERE: &[(&str, &str)] = &[
    (
        "hostname",
        "user-data's own `hostname` (or meta-data's `local-hostname`)",
    ),
    ("users", "user-data's own `users`"),
    ("files", "user-data's `write_files`"),
    ("time", "user-data's `ntp` and `timezone`"),
    ("network", "the `network-config` file"),
];

pub fn decode(dir: &Path, src: &Sources<'_>) -> Result<NodeConfig, Vec<Diagnostic>> {
    let mut cfg = NodeConfig::default();
    let mut diags = Vec::new();
    let mut local_hostname = None;

    if let Some(text) = src.meta_data {
        let mut ctx = Ctx::new(&dir.join("meta-data"));
        if let Some(root) = parse_yaml(&mut ctx, text) {
            local_hostname = meta_data(&mut ctx, &root);
        }
        diags.append(&mut ctx.diags);
    }
    if let Some(text) = src.user_data {
        let mut ctx = Ctx::new(&dir.join("user-data"));
        if header_ok(&mut ctx, text)
            && let Some(root) = parse_yaml(&mut ctx, text)
        {
            user_data(&mut ctx, &root, &mut cfg);
        }
        diags.append(&mut ctx.diags);
    }
    if cfg.hostname.is_none() {
        cfg.hostname = local_hostname;
    }
    if let Some(text) = src.network_config {
        let mut ctx = Ctx::new(&dir.join("network-config"));
        if let Some(root) = parse_yaml(&mut ctx, text) {
            network_config(&mut ctx, &root, &mut cfg);
        }
        diags.append(&mut ctx.diags);
    }
    if diags.is_empty() {
        Ok(cfg)
    } else {
        Err(diags)
    }
}

fn parse_yaml(ctx: &mut Ctx, text: &str) -> Option<Value> {
    match yaml::parse(strip_bom(text)) {
        Ok(v) if matches!(v.kind, Kind::Null) => None,
        Ok(v) => Some(v),
        Err((pos, msg)) => {
            ctx.err(pos, msg);
            None
        }
    }
}

/// `user-data` must be `#cloud-config`: Basalt runs no scripts and fetches nothing.
fn header_ok(ctx: &mut Ctx, text: &str) -> bool {
    let first = strip_bom(text).lines().next().unwrap_or("").trim_end();
    if first == "#cloud-config" {
        return true;
    }
    let what = if first.is_empty() && strip_bom(text).trim().is_empty() {
        "user-data is empty".to_owned()
    } else if first.starts_with("#!") {
        "user-data is a script; Basalt runs no scripts".to_owned()
    } else if first.starts_with("#include") || first.starts_with("Content-Type") {
        "user-data includes or MIME parts are not supported".to_owned()
    } else if first.starts_with("#cloud-config") || first.starts_with("# cloud-config") {
        format!("`{}` is not exactly `#cloud-config`", check::shorten(first))
    } else {
        "user-data does not begin with `#cloud-config`".to_owned()
    };
    ctx.err(
        Pos::START,
        format!("{what}; it must begin with the line `#cloud-config`"),
    );
    false
}

fn meta_data(ctx: &mut Ctx, root: &Value) -> Option<String> {
    let t = table(ctx, root, "", &["instance-id", "local-hostname"])?;
    if let Some(e) = t.get("instance-id") {
        // cloud-init uses it to run once per instance; Basalt applies the
        // config at every boot, so it is checked but has no effect.
        // Often written as a bare number.
        if !matches!(e.value.kind, Kind::Int { .. }) {
            checked(ctx, &e.value, "instance-id", |s| {
                if s.is_empty() {
                    Err("must not be empty".to_owned())
                } else {
                    Ok(())
                }
            });
        }
    }
    let e = t.get("local-hostname")?;
    checked(ctx, &e.value, "local-hostname", check::hostname)
}

const USER_DATA_KEYS: &[&str] = &[
    "hostname",
    "fqdn",
    "users",
    "ssh_authorized_keys",
    "write_files",
    "ntp",
    "timezone",
    "basalt",
];

fn user_data(ctx: &mut Ctx, root: &Value, cfg: &mut NodeConfig) {
    let Some(t) = table(ctx, root, "", USER_DATA_KEYS) else {
        return;
    };
    match (t.get("hostname"), t.get("fqdn")) {
        (Some(_), Some(f)) => ctx.err(f.key_pos, "set `hostname` or `fqdn`, not both"),
        (Some(e), None) | (None, Some(e)) => {
            cfg.hostname = checked(ctx, &e.value, &e.key, check::hostname);
        }
        (None, None) => {}
    }
    let mut users: Vec<Located<User>> = match t.get("users") {
        Some(e) => list(ctx, &e.value, "users", cloud_user).unwrap_or_default(),
        None => Vec::new(),
    };
    if let Some(e) = t.get("ssh_authorized_keys")
        && let Some(keys) = string_list(ctx, &e.value, "ssh_authorized_keys", check::ssh_key)
    {
        // cloud-init gives these to its default user; Basalt's is root.
        match users.iter_mut().find(|u| u.item.name == "root") {
            Some(root_user) => root_user.item.ssh_authorized_keys.extend(keys),
            None => users.push(Located {
                pos: e.key_pos,
                item: User {
                    name: "root".to_owned(),
                    ssh_authorized_keys: keys,
                    groups: Vec::new(),
                    password_hash: None,
                },
            }),
        }
    }
    cfg.users = merge_users(ctx, users);
    if let Some(e) = t.get("write_files") {
        let files = list(ctx, &e.value, "write_files", write_file).unwrap_or_default();
        cfg.files = merge_files(ctx, files);
    }
    if let Some(e) = t.get("ntp") {
        cfg.time.ntp_servers = ntp(ctx, &e.value);
    }
    if let Some(e) = t.get("timezone") {
        cfg.time.timezone = checked(ctx, &e.value, "timezone", check::timezone);
    }
    if let Some(e) = t.get("basalt") {
        basalt(ctx, &e.value, cfg);
    }
}

fn cloud_user(ctx: &mut Ctx, v: &Value, name: &str) -> Option<Located<User>> {
    if let Kind::Str(s) = &v.kind {
        ctx.err(
            v.pos,
            format!("`{name}`: `{}`: cloud-init's default user does not exist on Basalt; write the user out with `name:`", check::shorten(s)),
        );
        return None;
    }
    let t = table(
        ctx,
        v,
        name,
        &[
            "name",
            "ssh_authorized_keys",
            "groups",
            "passwd",
            "hashed_passwd",
            "lock_passwd",
        ],
    )?;
    let Some(n) = t.get("name") else {
        ctx.err(t.pos, format!("`{name}`: `name` is missing"));
        return None;
    };
    let user_name = checked(ctx, &n.value, &t.name("name"), check::account_name)?;
    let keys = match t.get("ssh_authorized_keys") {
        Some(e) => string_list(
            ctx,
            &e.value,
            &t.name("ssh_authorized_keys"),
            check::ssh_key,
        )?,
        None => Vec::new(),
    };
    let groups = match t.get("groups") {
        // cloud-init takes a comma-separated string or a list.
        Some(e) => match &e.value.kind {
            Kind::Str(s) => {
                let mut out = Vec::new();
                for g in s.split(',').map(str::trim).filter(|g| !g.is_empty()) {
                    out.push(ctx.check(
                        e.value.pos,
                        &t.name("groups"),
                        check::account_name(g).map(|()| g.to_owned()),
                    )?);
                }
                out
            }
            _ => string_list(ctx, &e.value, &t.name("groups"), check::account_name)?,
        },
        None => Vec::new(),
    };
    let hash_entry = match (t.get("passwd"), t.get("hashed_passwd")) {
        (Some(_), Some(h)) => {
            ctx.err(
                h.key_pos,
                format!("`{name}`: set `passwd` or `hashed_passwd`, not both"),
            );
            return None;
        }
        (a, b) => a.or(b),
    };
    let unlocked = match t.get("lock_passwd") {
        Some(e) => !boolean(ctx, &e.value, &t.name("lock_passwd"))?,
        None => false,
    };
    let password_hash = match hash_entry {
        Some(e) => {
            let h = checked(ctx, &e.value, &t.name(&e.key), check::password_hash)?;
            if !unlocked {
                // cloud-init would lock this password (lock_passwd defaults to
                // true): say so rather than drop the hash quietly.
                ctx.err(e.key_pos, format!("`{name}`: cloud-init locks this password unless `lock_passwd: false` is set; add it, or remove `{}`", e.key));
                return None;
            }
            Some(Secret(h))
        }
        None => None,
    };
    Some(Located {
        pos: n.value.pos,
        item: User {
            name: user_name,
            ssh_authorized_keys: keys,
            groups,
            password_hash,
        },
    })
}

fn write_file(ctx: &mut Ctx, v: &Value, name: &str) -> Option<Located<File>> {
    let t = table(
        ctx,
        v,
        name,
        &["path", "content", "encoding", "permissions", "owner"],
    )?;
    let Some(p) = t.get("path") else {
        ctx.err(t.pos, format!("`{name}`: `path` is missing"));
        return None;
    };
    let path = file_path(ctx, &p.value, &t.name("path"))?;
    let encoding = match t.get("encoding") {
        Some(e) => string(ctx, &e.value, &t.name("encoding"), 64).map(|s| (s, e.value.pos))?,
        None => ("text/plain".to_owned(), t.pos),
    };
    let content = match (t.get("content"), encoding.0.as_str()) {
        (None, _) => Vec::new(),
        (Some(c), "text/plain") => {
            string(ctx, &c.value, &t.name("content"), check::MAX_FILE_BYTES)?.into_bytes()
        }
        (Some(c), "b64" | "base64") => base64_content(ctx, &c.value, &t.name("content"))?,
        (Some(_), other) => {
            let msg = if other.contains("gz") {
                format!(
                    "`{}`: compressed content (`{}`) is not supported; use b64 or plain text",
                    t.name("encoding"),
                    check::shorten(other)
                )
            } else {
                format!(
                    "`{}`: `{}` is not b64, base64 or text/plain",
                    t.name("encoding"),
                    check::shorten(other)
                )
            };
            ctx.err(encoding.1, msg);
            return None;
        }
    };
    let mode = match t.get("permissions") {
        Some(e) => mode(ctx, &e.value, &t.name("permissions"))?,
        None => 0o644,
    };
    let (owner, group) = match t.get("owner") {
        Some(e) => owner(ctx, &e.value, &t.name("owner"))?,
        None => ("root".to_owned(), "root".to_owned()),
    };
    Some(Located {
        pos: p.value.pos,
        item: File {
            path,
            content,
            mode,
            owner,
            group,
        },
    })
}

fn ntp(ctx: &mut Ctx, v: &Value) -> Option<Vec<String>> {
    let t = table(ctx, v, "ntp", &["enabled", "servers", "pools"])?;
    if let Some(e) = t.get("enabled")
        && !boolean(ctx, &e.value, "ntp.enabled")?
    {
        return Some(Vec::new());
    }
    let mut servers = Vec::new();
    let mut any = false;
    for key in ["servers", "pools"] {
        if let Some(e) = t.get(key) {
            any = true;
            servers.extend(string_list(ctx, &e.value, &t.name(key), check::host)?);
        }
    }
    any.then_some(servers)
}

/// The `basalt:` key: the native schema's remaining sections.
fn basalt(ctx: &mut Ctx, v: &Value, cfg: &mut NodeConfig) {
    let Kind::Map(all) = &v.kind else {
        ctx.err(
            v.pos,
            format!("`basalt`: expected a table, found {}", v.kind.describe()),
        );
        return;
    };
    let mut kept: Vec<Entry> = Vec::new();
    for e in all {
        match NATIVE_ELSEWHERE.iter().find(|(k, _)| *k == e.key) {
            Some((k, there)) => ctx.err(e.key_pos, format!("`basalt.{k}`: in cloud-init files this is set with {there}, not under `basalt:`")),
            None => kept.push(e.clone()),
        }
    }
    let filtered = Value {
        kind: Kind::Map(kept),
        pos: v.pos,
    };
    let b = decode::node_config(ctx, &filtered, "basalt", BASALT_KEYS);
    cfg.ssh = b.ssh;
    cfg.kernel = b.kernel;
    cfg.kubernetes = b.kubernetes;
    cfg.update = b.update;
    cfg.console = b.console;
    cfg.logs = b.logs;
}

fn network_config(ctx: &mut Ctx, root: &Value, cfg: &mut NodeConfig) {
    // Both the bare form and the one wrapped in `network:` are in use.
    let root = match &root.kind {
        Kind::Map(es) if es.len() == 1 && es[0].key == "network" => &es[0].value,
        _ => root,
    };
    let Some(t) = table(ctx, root, "", &["version", "ethernets", "wifis"]) else {
        return;
    };
    match t.get("version") {
        Some(e) if matches!(e.value.kind, Kind::Int { value: 2, .. }) => {}
        Some(e) => {
            ctx.err(
                e.value.pos,
                "`version`: Basalt reads network-config version 2 (netplan style) only",
            );
            return;
        }
        None => {
            ctx.err(t.pos, "`version: 2` is missing");
            return;
        }
    }
    let mut seen: BTreeMap<String, Pos> = BTreeMap::new();
    for (section, is_wifi) in [("ethernets", false), ("wifis", true)] {
        let Some(e) = t.get(section) else { continue };
        let Some(ifs) = entries(ctx, &e.value, section) else {
            continue;
        };
        for entry in ifs {
            if ctx
                .check(entry.key_pos, section, check::interface_id(&entry.key))
                .is_none()
            {
                continue;
            }
            if let Some(first) = seen.get(&entry.key) {
                ctx.err(
                    entry.key_pos,
                    format!(
                        "interface `{}` is already defined at line {}",
                        entry.key, first.line
                    ),
                );
                continue;
            }
            seen.insert(entry.key.clone(), entry.key_pos);
            let path = format!("{section}.{}", entry.key);
            if let Some(i) = netplan_interface(ctx, &entry.value, &path, is_wifi) {
                cfg.network.interfaces.insert(entry.key.clone(), i);
            }
        }
    }
}

fn netplan_interface(ctx: &mut Ctx, v: &Value, name: &str, is_wifi: bool) -> Option<Interface> {
    const ETHERNET: &[&str] = &[
        "match",
        "dhcp4",
        "addresses",
        "gateway4",
        "gateway6",
        "routes",
        "nameservers",
    ];
    const WIFI: &[&str] = &[
        "match",
        "dhcp4",
        "addresses",
        "gateway4",
        "gateway6",
        "routes",
        "nameservers",
        "access-points",
        "regulatory-domain",
    ];
    let t = table(ctx, v, name, if is_wifi { WIFI } else { ETHERNET })?;
    let mut i = Interface::default();
    if let Some(e) = t.get("match") {
        let mname = t.name("match");
        if let Some(m) = table(ctx, &e.value, &mname, &["name", "macaddress"]) {
            if let Some(e) = m.get("name") {
                i.match_name = checked(ctx, &e.value, &m.name("name"), check::interface_glob);
            }
            if let Some(e) = m.get("macaddress") {
                i.match_mac = checked(ctx, &e.value, &m.name("macaddress"), |s| {
                    check::mac(s).map(drop)
                })
                .map(|s| s.to_ascii_lowercase());
            }
        }
    }
    if let Some(e) = t.get("addresses") {
        i.addresses = list(ctx, &e.value, &t.name("addresses"), |ctx, it, n| {
            let s = string(ctx, it, n, 64)?;
            ctx.check(it.pos, n, check::cidr(&s))
        })
        .unwrap_or_default();
    }
    // Basalt's rule, not netplan's: no static address means DHCP.
    i.dhcp4 = match t.get("dhcp4") {
        Some(e) => boolean(ctx, &e.value, &t.name("dhcp4")).unwrap_or(false),
        None => i.addresses.is_empty(),
    };
    if let Some(e) = t.get("gateway4") {
        i.gateway4 = gateway(ctx, &e.value, &t.name("gateway4"), true).and_then(|a| match a {
            std::net::IpAddr::V4(a) => Some(a),
            std::net::IpAddr::V6(_) => None,
        });
    }
    if let Some(e) = t.get("gateway6") {
        i.gateway6 = gateway(ctx, &e.value, &t.name("gateway6"), false).and_then(|a| match a {
            std::net::IpAddr::V6(a) => Some(a),
            std::net::IpAddr::V4(_) => None,
        });
    }
    if let Some(e) = t.get("routes") {
        i.routes = list(ctx, &e.value, &t.name("routes"), decode::route).unwrap_or_default();
    }
    if let Some(e) = t.get("nameservers") {
        let nname = t.name("nameservers");
        if let Some(ns) = table(ctx, &e.value, &nname, &["addresses", "search"]) {
            if let Some(e) = ns.get("addresses") {
                i.dns = list(ctx, &e.value, &ns.name("addresses"), ip).unwrap_or_default();
            }
            if let Some(e) = ns.get("search") {
                i.dns_search = string_list(ctx, &e.value, &ns.name("search"), check::hostname)
                    .unwrap_or_default();
            }
        }
    }
    if is_wifi {
        i.wifi = netplan_wifi(ctx, &t, name);
    }
    Some(i)
}

fn netplan_wifi(ctx: &mut Ctx, t: &decode::Table<'_>, name: &str) -> Option<Wifi> {
    let Some(aps) = t.get("access-points") else {
        ctx.err(t.pos, format!("`{name}`: `access-points` is missing"));
        return None;
    };
    let apname = t.name("access-points");
    let aps = entries(ctx, &aps.value, &apname)?;
    let [ap] = aps else {
        ctx.err(
            t.get("access-points").map_or(t.pos, |e| e.value.pos),
            format!(
                "`{apname}`: Basalt supports exactly one access point per interface, found {}",
                aps.len()
            ),
        );
        return None;
    };
    let ssid = ctx.check(
        ap.key_pos,
        &apname,
        check::ssid(&ap.key).map(|()| ap.key.clone()),
    )?;
    let country = match t.get("regulatory-domain") {
        Some(e) => Some(checked(
            ctx,
            &e.value,
            &t.name("regulatory-domain"),
            check::country,
        )?),
        None => None,
    };
    let mut auth = WifiAuth::Open;
    let mut hidden = false;
    let this = format!("{apname}.{}", ap.key);
    // An access point with no settings (`ssid: {}` or `ssid:`) is an open network.
    if !matches!(ap.value.kind, Kind::Null) {
        let a = table(ctx, &ap.value, &this, &["password", "hidden"])?;
        if let Some(e) = a.get("password") {
            let p = string(ctx, &e.value, &a.name("password"), 64)?;
            // netplan takes either the passphrase or the 64-hex-digit PSK here.
            auth = if check::is_psk_hash(&p) {
                WifiAuth::PskHash(Secret(p))
            } else {
                WifiAuth::Psk(Secret(ctx.check(
                    e.value.pos,
                    &a.name("password"),
                    check::psk(&p).map(|()| p),
                )?))
            };
        }
        if let Some(e) = a.get("hidden") {
            hidden = boolean(ctx, &e.value, &a.name("hidden"))?;
        }
    }
    Some(Wifi {
        country,
        ssid,
        auth,
        hidden,
    })
}
