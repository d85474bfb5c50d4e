//! The schema decoder: value tree → `NodeConfig`, with every check that
//! needs a position. Used for all of `node.toml` and for the `basalt:` key
//! of cloud-init `user-data`; `cloudinit.rs` reuses the small readers here.
//!
//! It never stops at the first error: every problem found is collected, so
//! `basalt config check` can list them all in one run.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::Diagnostic;
use super::check::{self, MAX_ITEMS, MAX_STRING};
use super::schema::{
    Console, ConsoleLevel, Distribution, File, HealthGate, Interface, Kernel, Kubernetes, Logs,
    Network, NodeConfig, Role, Route, Secret, Ssh, Time, Token, Update, User, Wifi, WifiAuth,
};
use super::tree::{Entry, Kind, Pos, Value};

/// At most this many diagnostics are reported per file.
pub const MAX_DIAGNOSTICS: usize = 100;

/// Errors found while reading one file.
pub struct Ctx {
    pub file: PathBuf,
    pub diags: Vec<Diagnostic>,
}

impl Ctx {
    pub fn new(file: &Path) -> Ctx {
        Ctx {
            file: file.to_path_buf(),
            diags: Vec::new(),
        }
    }

    pub fn err(&mut self, pos: Pos, message: impl Into<String>) {
        // A runaway file must not turn into a runaway list of errors.
        if self.diags.len() > MAX_DIAGNOSTICS {
            return;
        }
        if self.diags.len() == MAX_DIAGNOSTICS {
            self.diags.push(Diagnostic {
                file: self.file.clone(),
                line: pos.line,
                column: pos.column,
                message: format!("more than {MAX_DIAGNOSTICS} errors in this file; stopping here"),
            });
            return;
        }
        self.diags.push(Diagnostic {
            file: self.file.clone(),
            line: pos.line,
            column: pos.column,
            message: message.into(),
        });
    }

    /// Report `r`'s error at `pos` under `what`, and pass the value on.
    pub fn check<T>(&mut self, pos: Pos, what: &str, r: Result<T, String>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(m) => {
                self.err(pos, format!("`{what}`: {m}"));
                None
            }
        }
    }
}

/// A mapping whose keys have been checked against the allowed ones.
#[derive(Clone, Copy)]
pub struct Table<'a> {
    pub entries: &'a [Entry],
    pub pos: Pos,
    pub path: &'a str,
}

impl<'a> Table<'a> {
    pub fn get(&self, key: &str) -> Option<&'a Entry> {
        self.entries.iter().find(|e| e.key == key)
    }

    /// The dotted name of a key in this table, for messages.
    pub fn name(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }
}

fn where_(path: &str) -> String {
    if path.is_empty() {
        "at the top level".to_owned()
    } else {
        format!("in `{path}`")
    }
}

/// Read `v` as a mapping, reporting (with a suggestion) every key not in `allowed`.
pub fn table<'a>(
    ctx: &mut Ctx,
    v: &'a Value,
    path: &'a str,
    allowed: &[&str],
) -> Option<Table<'a>> {
    let Kind::Map(entries) = &v.kind else {
        ctx.err(
            v.pos,
            format!("`{path}`: expected a table, found {}", v.kind.describe()),
        );
        return None;
    };
    for e in entries {
        if ctx.diags.len() > MAX_DIAGNOSTICS {
            break;
        }
        if !allowed.contains(&e.key.as_str()) {
            unknown_key(ctx, e, path, allowed);
        }
    }
    Some(Table {
        entries,
        pos: v.pos,
        path,
    })
}

pub fn unknown_key(ctx: &mut Ctx, e: &Entry, path: &str, allowed: &[&str]) {
    let key = check::shorten(&e.key);
    let msg = match check::suggest(&e.key, allowed) {
        Some(s) => format!("unknown key `{key}` {}; did you mean `{s}`?", where_(path)),
        None => format!("unknown key `{key}` {}", where_(path)),
    };
    ctx.err(e.key_pos, msg);
}

fn type_err(ctx: &mut Ctx, v: &Value, name: &str, want: &str) {
    ctx.err(
        v.pos,
        format!("`{name}`: expected {want}, found {}", v.kind.describe()),
    );
}

/// The entries of a mapping whose keys are names chosen by the user.
pub fn entries<'a>(ctx: &mut Ctx, v: &'a Value, name: &str) -> Option<&'a [Entry]> {
    if let Kind::Map(entries) = &v.kind {
        if entries.len() > MAX_ITEMS {
            ctx.err(
                v.pos,
                format!(
                    "`{name}`: {} entries; the limit is {MAX_ITEMS}",
                    entries.len()
                ),
            );
            return None;
        }
        Some(entries)
    } else {
        type_err(ctx, v, name, "a table");
        None
    }
}

/// A string of at most `max` characters.
pub fn string(ctx: &mut Ctx, v: &Value, name: &str, max: usize) -> Option<String> {
    let Kind::Str(s) = &v.kind else {
        type_err(ctx, v, name, "a string");
        return None;
    };
    let n = s.chars().count();
    if n > max {
        ctx.err(
            v.pos,
            format!("`{name}`: value is {n} characters long; the limit is {max}"),
        );
        return None;
    }
    Some(s.clone())
}

/// A one-line string checked by `f`.
pub fn checked(
    ctx: &mut Ctx,
    v: &Value,
    name: &str,
    f: impl FnOnce(&str) -> Result<(), String>,
) -> Option<String> {
    let s = string(ctx, v, name, MAX_STRING)?;
    let r = f(&s).and_then(|()| check::one_line(&s, "the value"));
    ctx.check(v.pos, name, r).map(|()| s)
}

pub fn boolean(ctx: &mut Ctx, v: &Value, name: &str) -> Option<bool> {
    match v.kind {
        Kind::Bool(b) => Some(b),
        _ => {
            type_err(ctx, v, name, "true or false");
            None
        }
    }
}

pub fn integer(ctx: &mut Ctx, v: &Value, name: &str, min: i128, max: i128) -> Option<i128> {
    let Kind::Int { value, .. } = v.kind else {
        type_err(ctx, v, name, "an integer");
        return None;
    };
    if value < min || value > max {
        // Numbers past i128 were clamped by the TOML reader: don't print the clamp.
        let shown = if value.unsigned_abs() > u128::from(u64::MAX) {
            "the number".to_owned()
        } else {
            value.to_string()
        };
        ctx.err(
            v.pos,
            format!("`{name}`: {shown} is out of range ({min} to {max})"),
        );
        return None;
    }
    Some(value)
}

/// A list, each item read by `item` (given the item and its display name).
pub fn list<T>(
    ctx: &mut Ctx,
    v: &Value,
    name: &str,
    mut item: impl FnMut(&mut Ctx, &Value, &str) -> Option<T>,
) -> Option<Vec<T>> {
    let Kind::Seq(items) = &v.kind else {
        type_err(ctx, v, name, "a list");
        return None;
    };
    if items.len() > MAX_ITEMS {
        ctx.err(
            v.pos,
            format!("`{name}`: {} items; the limit is {MAX_ITEMS}", items.len()),
        );
        return None;
    }
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, it) in items.iter().enumerate() {
        match item(ctx, it, &format!("{name}[{i}]")) {
            Some(x) => out.push(x),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// A list of one-line strings each checked by `f`.
pub fn string_list(
    ctx: &mut Ctx,
    v: &Value,
    name: &str,
    f: impl Fn(&str) -> Result<(), String>,
) -> Option<Vec<String>> {
    list(ctx, v, name, |ctx, it, n| checked(ctx, it, n, &f))
}

/// Top-level keys of the native schema.
pub const ROOT_KEYS: &[&str] = &[
    "hostname",
    "users",
    "ssh",
    "network",
    "time",
    "kernel",
    "files",
    "kubernetes",
    "update",
    "console",
    "logs",
];

/// Decode a whole native config (TOML root, or the `basalt:` mapping).
/// `allowed` narrows the top-level keys (cloud-init keeps some for itself).
pub fn node_config(ctx: &mut Ctx, v: &Value, path: &str, allowed: &[&str]) -> NodeConfig {
    let mut cfg = NodeConfig::default();
    let Some(t) = table(ctx, v, path, allowed) else {
        return cfg;
    };
    if let Some(e) = t.get("hostname") {
        cfg.hostname = checked(ctx, &e.value, &t.name("hostname"), check::hostname);
    }
    if let Some(e) = t.get("users") {
        let users = list(ctx, &e.value, &t.name("users"), user).unwrap_or_default();
        cfg.users = merge_users(ctx, users);
    }
    if let Some(e) = t.get("ssh") {
        cfg.ssh = ssh(ctx, &e.value, &t.name("ssh"));
    }
    if let Some(e) = t.get("network") {
        cfg.network = network(ctx, &e.value, &t.name("network"));
    }
    if let Some(e) = t.get("time") {
        cfg.time = time(ctx, &e.value, &t.name("time"));
    }
    if let Some(e) = t.get("kernel") {
        cfg.kernel = kernel(ctx, &e.value, &t.name("kernel"));
    }
    if let Some(e) = t.get("files") {
        let files = list(ctx, &e.value, &t.name("files"), file).unwrap_or_default();
        cfg.files = merge_files(ctx, files);
    }
    if let Some(e) = t.get("kubernetes") {
        cfg.kubernetes = kubernetes(ctx, &e.value, &t.name("kubernetes"));
    }
    if let Some(e) = t.get("update") {
        cfg.update = update(ctx, &e.value, &t.name("update"));
    }
    if let Some(e) = t.get("console") {
        cfg.console = console(ctx, &e.value, &t.name("console"));
    }
    if let Some(e) = t.get("logs") {
        cfg.logs = logs(ctx, &e.value, &t.name("logs"));
    }
    cfg
}

/// A user as read, with where it was named (for duplicate checks).
pub struct Located<T> {
    pub pos: Pos,
    pub item: T,
}

fn user(ctx: &mut Ctx, v: &Value, name: &str) -> Option<Located<User>> {
    let t = table(
        ctx,
        v,
        name,
        &["name", "ssh_authorized_keys", "groups", "password_hash"],
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
        Some(e) => string_list(ctx, &e.value, &t.name("groups"), check::account_name)?,
        None => Vec::new(),
    };
    let password_hash = match t.get("password_hash") {
        Some(e) => Some(Secret(checked(
            ctx,
            &e.value,
            &t.name("password_hash"),
            check::password_hash,
        )?)),
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

/// Refuse a user named twice; sort by name (the order has no meaning).
pub fn merge_users(ctx: &mut Ctx, users: Vec<Located<User>>) -> Vec<User> {
    let mut seen: BTreeMap<String, Pos> = BTreeMap::new();
    let mut out = Vec::new();
    for u in users {
        if let Some(first) = seen.get(&u.item.name) {
            ctx.err(
                u.pos,
                format!(
                    "user `{}` is already defined at line {}",
                    u.item.name, first.line
                ),
            );
            continue;
        }
        seen.insert(u.item.name.clone(), u.pos);
        out.push(u.item);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn ssh(ctx: &mut Ctx, v: &Value, name: &str) -> Ssh {
    let mut s = Ssh::default();
    let Some(t) = table(ctx, v, name, &["enabled", "port"]) else {
        return s;
    };
    if let Some(e) = t.get("enabled") {
        s.enabled = boolean(ctx, &e.value, &t.name("enabled")).unwrap_or(s.enabled);
    }
    if let Some(e) = t.get("port") {
        s.port = integer(ctx, &e.value, &t.name("port"), 1, 65535)
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(s.port);
    }
    s
}

fn network(ctx: &mut Ctx, v: &Value, name: &str) -> Network {
    let mut n = Network::default();
    let Some(t) = table(ctx, v, name, &["interfaces"]) else {
        return n;
    };
    if let Some(e) = t.get("interfaces") {
        let iname = t.name("interfaces");
        if let Some(ifs) = entries(ctx, &e.value, &iname) {
            for entry in ifs {
                if ctx
                    .check(entry.key_pos, &iname, check::interface_id(&entry.key))
                    .is_none()
                {
                    continue;
                }
                let path = format!("{iname}.{}", entry.key);
                if let Some(i) = interface(ctx, &entry.value, &path) {
                    n.interfaces.insert(entry.key.clone(), i);
                }
            }
        }
    }
    n
}

const INTERFACE_KEYS: &[&str] = &[
    "match",
    "dhcp4",
    "addresses",
    "gateway4",
    "gateway6",
    "routes",
    "dns",
    "dns_search",
    "wifi",
];

fn interface(ctx: &mut Ctx, v: &Value, name: &str) -> Option<Interface> {
    let t = table(ctx, v, name, INTERFACE_KEYS)?;
    let mut i = Interface::default();
    if let Some(e) = t.get("match") {
        let mname = t.name("match");
        if let Some(m) = table(ctx, &e.value, &mname, &["name", "mac"]) {
            if let Some(e) = m.get("name") {
                i.match_name = checked(ctx, &e.value, &m.name("name"), check::interface_glob);
            }
            if let Some(e) = m.get("mac") {
                i.match_mac = checked(ctx, &e.value, &m.name("mac"), |s| check::mac(s).map(drop))
                    .map(|s| s.to_ascii_lowercase());
            }
        }
    }
    let addresses = t.get("addresses").and_then(|e| {
        list(ctx, &e.value, &t.name("addresses"), |ctx, it, n| {
            let s = string(ctx, it, n, 64)?;
            ctx.check(it.pos, n, check::cidr(&s))
        })
    });
    i.addresses = addresses.unwrap_or_default();
    i.dhcp4 = match t.get("dhcp4") {
        Some(e) => boolean(ctx, &e.value, &t.name("dhcp4")).unwrap_or(false),
        None => i.addresses.is_empty(),
    };
    if let Some(e) = t.get("gateway4") {
        i.gateway4 = gateway(ctx, &e.value, &t.name("gateway4"), true).and_then(|ip| match ip {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        });
    }
    if let Some(e) = t.get("gateway6") {
        i.gateway6 = gateway(ctx, &e.value, &t.name("gateway6"), false).and_then(|ip| match ip {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        });
    }
    if let Some(e) = t.get("routes") {
        i.routes = list(ctx, &e.value, &t.name("routes"), route).unwrap_or_default();
    }
    if let Some(e) = t.get("dns") {
        i.dns = list(ctx, &e.value, &t.name("dns"), ip).unwrap_or_default();
    }
    if let Some(e) = t.get("dns_search") {
        i.dns_search =
            string_list(ctx, &e.value, &t.name("dns_search"), check::hostname).unwrap_or_default();
    }
    if let Some(e) = t.get("wifi") {
        i.wifi = wifi(ctx, &e.value, &t.name("wifi"));
    }
    Some(i)
}

pub fn ip(ctx: &mut Ctx, v: &Value, name: &str) -> Option<IpAddr> {
    let s = string(ctx, v, name, 64)?;
    ctx.check(v.pos, name, check::ip(&s))
}

pub fn gateway(ctx: &mut Ctx, v: &Value, name: &str, v4: bool) -> Option<IpAddr> {
    let a = ip(ctx, v, name)?;
    if a.is_ipv4() != v4 {
        let fam = if v4 { "IPv4" } else { "IPv6" };
        ctx.err(v.pos, format!("`{name}`: `{a}` is not an {fam} address"));
        return None;
    }
    Some(a)
}

pub fn route(ctx: &mut Ctx, v: &Value, name: &str) -> Option<Route> {
    let t = table(ctx, v, name, &["to", "via"])?;
    let (Some(to), Some(via)) = (t.get("to"), t.get("via")) else {
        ctx.err(
            t.pos,
            format!("`{name}`: a route needs both `to` and `via`"),
        );
        return None;
    };
    let via_ip = ip(ctx, &via.value, &t.name("via"))?;
    let to_s = string(ctx, &to.value, &t.name("to"), 64)?;
    let to_c = ctx.check(
        to.value.pos,
        &t.name("to"),
        check::route_to(&to_s, Some(via_ip)),
    )?;
    if to_c.addr.is_ipv4() != via_ip.is_ipv4() {
        ctx.err(
            via.value.pos,
            format!(
                "`{}`: `{via_ip}` is not in the same address family as `{to_c}`",
                t.name("via")
            ),
        );
        return None;
    }
    Some(Route {
        to: to_c,
        via: via_ip,
    })
}

fn wifi(ctx: &mut Ctx, v: &Value, name: &str) -> Option<Wifi> {
    let t = table(
        ctx,
        v,
        name,
        &["country", "ssid", "psk", "psk_hash", "hidden"],
    )?;
    let Some(s) = t.get("ssid") else {
        ctx.err(t.pos, format!("`{name}`: `ssid` is missing"));
        return None;
    };
    let ssid = checked(ctx, &s.value, &t.name("ssid"), check::ssid)?;
    let country = match t.get("country") {
        Some(e) => Some(checked(ctx, &e.value, &t.name("country"), check::country)?),
        None => None,
    };
    let auth = match (t.get("psk"), t.get("psk_hash")) {
        (Some(_), Some(h)) => {
            ctx.err(
                h.key_pos,
                format!("`{name}`: set `psk` or `psk_hash`, not both"),
            );
            return None;
        }
        (Some(p), None) => {
            WifiAuth::Psk(Secret(checked(ctx, &p.value, &t.name("psk"), check::psk)?))
        }
        (None, Some(h)) => WifiAuth::PskHash(Secret(checked(
            ctx,
            &h.value,
            &t.name("psk_hash"),
            check::psk_hash,
        )?)),
        (None, None) => WifiAuth::Open,
    };
    let hidden = match t.get("hidden") {
        Some(e) => boolean(ctx, &e.value, &t.name("hidden"))?,
        None => false,
    };
    Some(Wifi {
        country,
        ssid,
        auth,
        hidden,
    })
}

fn time(ctx: &mut Ctx, v: &Value, name: &str) -> Time {
    let mut tm = Time::default();
    let Some(t) = table(ctx, v, name, &["ntp_servers", "timezone"]) else {
        return tm;
    };
    if let Some(e) = t.get("ntp_servers") {
        tm.ntp_servers = string_list(ctx, &e.value, &t.name("ntp_servers"), check::host);
    }
    if let Some(e) = t.get("timezone") {
        tm.timezone = checked(ctx, &e.value, &t.name("timezone"), check::timezone);
    }
    tm
}

fn kernel(ctx: &mut Ctx, v: &Value, name: &str) -> Kernel {
    let mut k = Kernel::default();
    let Some(t) = table(ctx, v, name, &["modules", "sysctl"]) else {
        return k;
    };
    if let Some(e) = t.get("modules") {
        k.modules =
            string_list(ctx, &e.value, &t.name("modules"), check::module_name).unwrap_or_default();
    }
    if let Some(e) = t.get("sysctl") {
        k.sysctl = sysctls(ctx, &e.value, &t.name("sysctl"));
    }
    k
}

/// sysctl name → value; values may be written as strings or integers.
/// Nested tables are joined with `.`, so TOML's unquoted dotted keys
/// (`net.ipv4.ip_forward = 1`) mean what they look like.
pub fn sysctls(ctx: &mut Ctx, v: &Value, name: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut seen: BTreeMap<String, Pos> = BTreeMap::new();
    sysctls_into(ctx, v, name, "", &mut out, &mut seen);
    out
}

fn sysctls_into(
    ctx: &mut Ctx,
    v: &Value,
    name: &str,
    prefix: &str,
    out: &mut BTreeMap<String, String>,
    seen: &mut BTreeMap<String, Pos>,
) {
    let Some(entries) = entries(ctx, v, name) else {
        return;
    };
    for e in entries {
        let key = if prefix.is_empty() {
            e.key.clone()
        } else {
            format!("{prefix}.{}", e.key)
        };
        let key_name = format!("{name}.{key}");
        if let Kind::Map(_) = e.value.kind {
            sysctls_into(ctx, &e.value, name, &key, out, seen);
            continue;
        }
        if ctx
            .check(e.key_pos, name, check::sysctl_name(&key))
            .is_none()
        {
            continue;
        }
        if let Some(first) = seen.get(&key) {
            ctx.err(
                e.key_pos,
                format!("`{key_name}` is already set at line {}", first.line),
            );
            continue;
        }
        seen.insert(key.clone(), e.key_pos);
        let value = match &e.value.kind {
            Kind::Int { value, .. } => Some(value.to_string()),
            Kind::Str(_) => checked(ctx, &e.value, &key_name, |_| Ok(())),
            _ => {
                type_err(ctx, &e.value, &key_name, "a string or an integer");
                None
            }
        };
        if let Some(value) = value {
            out.insert(key, value);
        }
    }
}

const FILE_ROOTS: &[&str] = &["etc", "var"];

fn file(ctx: &mut Ctx, v: &Value, name: &str) -> Option<Located<File>> {
    let t = table(
        ctx,
        v,
        name,
        &["path", "content", "base64", "mode", "owner"],
    )?;
    let Some(p) = t.get("path") else {
        ctx.err(t.pos, format!("`{name}`: `path` is missing"));
        return None;
    };
    let path = file_path(ctx, &p.value, &t.name("path"))?;
    let content = match (t.get("content"), t.get("base64")) {
        (Some(_), Some(b)) => {
            ctx.err(
                b.key_pos,
                format!("`{name}`: set `content` or `base64`, not both"),
            );
            return None;
        }
        (Some(c), None) => {
            string(ctx, &c.value, &t.name("content"), check::MAX_FILE_BYTES)?.into_bytes()
        }
        (None, Some(b)) => base64_content(ctx, &b.value, &t.name("base64"))?,
        (None, None) => Vec::new(),
    };
    let mode = match t.get("mode") {
        Some(e) => mode(ctx, &e.value, &t.name("mode"))?,
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

pub fn file_path(ctx: &mut Ctx, v: &Value, name: &str) -> Option<String> {
    let s = string(ctx, v, name, MAX_STRING)?;
    ctx.check(v.pos, name, check::path_under(&s, FILE_ROOTS))
}

pub fn base64_content(ctx: &mut Ctx, v: &Value, name: &str) -> Option<Vec<u8>> {
    let s = string(ctx, v, name, check::MAX_FILE_BYTES * 4 / 3 + 4096)?;
    ctx.check(v.pos, name, check::base64(&s))
}

/// A file mode in octal: a TOML octal integer (`0o644`) or a string (`"0644"`).
pub fn mode(ctx: &mut Ctx, v: &Value, name: &str) -> Option<u32> {
    let parsed = match &v.kind {
        Kind::Int { value, radix: 8 } => u32::try_from(*value).ok(),
        Kind::Str(s)
            if (1..=5).contains(&s.len()) && s.bytes().all(|b| (b'0'..=b'7').contains(&b)) =>
        {
            u32::from_str_radix(s, 8).ok()
        }
        Kind::Str(_) | Kind::Int { .. } => None,
        _ => {
            type_err(ctx, v, name, "an octal mode such as \"0644\"");
            return None;
        }
    };
    match parsed {
        Some(m) if m <= 0o7777 => Some(m),
        _ => {
            ctx.err(
                v.pos,
                format!("`{name}`: a mode is written in octal, like \"0644\" (or 0o644 in TOML), at most 07777"),
            );
            None
        }
    }
}

/// `user` or `user:group` (names or numeric ids).
pub fn owner(ctx: &mut Ctx, v: &Value, name: &str) -> Option<(String, String)> {
    let s = string(ctx, v, name, 80)?;
    let (u, g) = s.split_once(':').unwrap_or((&s, &s));
    let ok = |x: &str| {
        x.bytes().all(|b| b.is_ascii_digit()) && !x.is_empty() || check::account_name(x).is_ok()
    };
    if ok(u) && ok(g) {
        Some((u.to_owned(), g.to_owned()))
    } else {
        ctx.err(
            v.pos,
            format!(
                "`{name}`: `{}` is not `user` or `user:group`",
                check::shorten(&s)
            ),
        );
        None
    }
}

/// Refuse two files with the same path; sort by path.
pub fn merge_files(ctx: &mut Ctx, files: Vec<Located<File>>) -> Vec<File> {
    let mut seen: BTreeMap<String, Pos> = BTreeMap::new();
    let mut out = Vec::new();
    for f in files {
        if let Some(first) = seen.get(&f.item.path) {
            ctx.err(
                f.pos,
                format!(
                    "`{}` is already written by the entry at line {}",
                    f.item.path, first.line
                ),
            );
            continue;
        }
        seen.insert(f.item.path.clone(), f.pos);
        out.push(f.item);
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

const K3S_COMPONENTS: &[&str] = &[
    "coredns",
    "servicelb",
    "traefik",
    "local-storage",
    "metrics-server",
    "runtimes",
    "helm-controller",
];
const K0S_COMPONENTS: &[&str] = &[
    "applier-manager",
    "autopilot",
    "control-api",
    "coredns",
    "csr-approver",
    "endpoint-reconciler",
    "helm",
    "konnectivity-server",
    "kube-controller-manager",
    "kube-proxy",
    "kube-scheduler",
    "metrics-server",
    "network-provider",
    "node-role",
    "system-rbac",
    "windows-node",
    "worker-config",
];
/// Flags Basalt writes itself from the keys above; setting them twice would conflict.
const RESERVED_ARGS: &[&str] = &[
    "--token",
    "--token-file",
    "--server",
    "--data-dir",
    "--config",
    "--node-label",
    "--node-taint",
    "--disable",
    "--disable-components",
    "--labels",
    "--taints",
    "--single",
    "--enable-worker",
];

fn kubernetes(ctx: &mut Ctx, v: &Value, name: &str) -> Option<Kubernetes> {
    let t = table(
        ctx,
        v,
        name,
        &[
            "distribution",
            "role",
            "server_url",
            "token",
            "token_file",
            "labels",
            "taints",
            "extra_args",
            "disable",
            "config",
        ],
    )?;
    let Some(d) = t.get("distribution") else {
        ctx.err(
            t.pos,
            format!("`{name}`: `distribution` is missing (k3s or k0s)"),
        );
        return None;
    };
    let dist = match string(ctx, &d.value, &t.name("distribution"), 64)?.as_str() {
        "k3s" => Distribution::K3s,
        "k0s" => Distribution::K0s,
        other => {
            ctx.err(
                d.value.pos,
                format!(
                    "`{}`: `{}` is not k3s or k0s",
                    t.name("distribution"),
                    check::shorten(other)
                ),
            );
            return None;
        }
    };
    let mut ok = true;
    let role = match t.get("role") {
        None => match dist {
            Distribution::K3s => Role::Server,
            Distribution::K0s => Role::ControllerWorker,
        },
        Some(e) => {
            let s = string(ctx, &e.value, &t.name("role"), 64)?;
            match (dist, s.as_str()) {
                (Distribution::K3s, "server") => Role::Server,
                (Distribution::K3s, "agent") => Role::Agent,
                (Distribution::K0s, "controller") => Role::Controller,
                (Distribution::K0s, "controller+worker") => Role::ControllerWorker,
                (Distribution::K0s, "worker") => Role::Worker,
                (_, other) => {
                    let roles = match dist {
                        Distribution::K3s => "server or agent",
                        Distribution::K0s => "controller, controller+worker or worker",
                    };
                    ctx.err(
                        e.value.pos,
                        format!(
                            "`{}`: `{}` is not a {} role (use {roles})",
                            t.name("role"),
                            check::shorten(other),
                            dist.as_str()
                        ),
                    );
                    return None;
                }
            }
        }
    };
    let server_url = t.get("server_url").and_then(|e| {
        let r = checked(ctx, &e.value, &t.name("server_url"), |s| {
            check::url(s, true)
        });
        ok &= r.is_some();
        r
    });
    let token = match (t.get("token"), t.get("token_file")) {
        (Some(_), Some(f)) => {
            ctx.err(
                f.key_pos,
                format!("`{name}`: set `token` or `token_file`, not both"),
            );
            ok = false;
            None
        }
        (Some(e), None) => {
            let r = checked(ctx, &e.value, &t.name("token"), check::token)
                .map(|s| Token::Value(Secret(s)));
            ok &= r.is_some();
            r
        }
        (None, Some(e)) => {
            let r = string(ctx, &e.value, &t.name("token_file"), MAX_STRING)
                .and_then(|s| {
                    ctx.check(
                        e.value.pos,
                        &t.name("token_file"),
                        check::path_under(&s, &["etc", "var", "boot"]),
                    )
                })
                .map(Token::File);
            ok &= r.is_some();
            r
        }
        (None, None) => None,
    };
    // Cross-key rules: what each role needs to join, and what it may not set.
    if role.joins() && token.is_none() && ok {
        ctx.err(
            t.pos,
            format!(
                "`{name}`: role `{}` needs `token` or `token_file` to join",
                role.as_str()
            ),
        );
        ok = false;
    }
    match dist {
        Distribution::K3s => {
            if role == Role::Agent && server_url.is_none() && ok {
                ctx.err(
                    t.pos,
                    format!(
                        "`{name}`: role `agent` needs `server_url` (the server's https://host:6443)"
                    ),
                );
                ok = false;
            }
        }
        Distribution::K0s => {
            if let Some(e) = t.get("server_url") {
                ctx.err(e.key_pos, format!("`{name}`: k0s join tokens carry the controller's address; remove `server_url`"));
                ok = false;
            }
        }
    }
    let labels = match t.get("labels") {
        Some(e) => string_map(
            ctx,
            &e.value,
            &t.name("labels"),
            check::label_key,
            check::label_value,
        )?,
        None => BTreeMap::new(),
    };
    let taints = match t.get("taints") {
        Some(e) => string_list(ctx, &e.value, &t.name("taints"), check::taint)?,
        None => Vec::new(),
    };
    let extra_args = match t.get("extra_args") {
        Some(e) => string_list(ctx, &e.value, &t.name("extra_args"), |s| {
            if !s.starts_with('-') {
                return Err(format!(
                    "`{}` is not a flag (flags start with `-`)",
                    check::shorten(s)
                ));
            }
            let flag = s.split('=').next().unwrap_or(s);
            if RESERVED_ARGS.contains(&flag) {
                return Err(format!(
                    "`{flag}` is set by Basalt from the other `kubernetes` keys"
                ));
            }
            Ok(())
        })?,
        None => Vec::new(),
    };
    let disable = match t.get("disable") {
        Some(e) => {
            if role.joins() {
                ctx.err(
                    e.key_pos,
                    format!(
                        "`{name}`: role `{}` runs no components to disable",
                        role.as_str()
                    ),
                );
                return None;
            }
            let known = match dist {
                Distribution::K3s => K3S_COMPONENTS,
                Distribution::K0s => K0S_COMPONENTS,
            };
            string_list(ctx, &e.value, &t.name("disable"), |s| {
                if known.contains(&s) {
                    return Ok(());
                }
                let hint = check::suggest(s, known)
                    .map(|k| format!("; did you mean `{k}`?"))
                    .unwrap_or_default();
                Err(format!(
                    "`{}` is not a {} component{hint}",
                    check::shorten(s),
                    dist.as_str()
                ))
            })?
        }
        None => Vec::new(),
    };
    let config = match t.get("config") {
        Some(e) => Some(string(
            ctx,
            &e.value,
            &t.name("config"),
            check::MAX_PASSTHROUGH,
        )?),
        None => None,
    };
    ok.then_some(Kubernetes {
        distribution: dist,
        role,
        server_url,
        token,
        labels,
        taints,
        extra_args,
        disable,
        config,
    })
}

/// A table of string → string, keys and values checked.
pub fn string_map(
    ctx: &mut Ctx,
    v: &Value,
    name: &str,
    key: impl Fn(&str) -> Result<(), String>,
    value: impl Fn(&str) -> Result<(), String>,
) -> Option<BTreeMap<String, String>> {
    let entries = entries(ctx, v, name)?;
    let mut out = BTreeMap::new();
    let mut ok = true;
    for e in entries {
        ok &= ctx.check(e.key_pos, name, key(&e.key)).is_some();
        match checked(ctx, &e.value, &format!("{name}.{}", e.key), &value) {
            Some(v) => {
                out.insert(e.key.clone(), v);
            }
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn update(ctx: &mut Ctx, v: &Value, name: &str) -> Update {
    let mut u = Update::default();
    let Some(t) = table(
        ctx,
        v,
        name,
        &["url", "channel", "public_keys", "health_gate"],
    ) else {
        return u;
    };
    if let Some(e) = t.get("url") {
        u.url = checked(ctx, &e.value, &t.name("url"), |s| check::url(s, false));
    }
    if let Some(e) = t.get("channel") {
        u.channel = checked(ctx, &e.value, &t.name("channel"), |s| {
            check::simple_name(s, "channel name")
        });
    }
    if let Some(e) = t.get("public_keys") {
        u.public_keys = string_list(ctx, &e.value, &t.name("public_keys"), check::minisign_key)
            .unwrap_or_default();
    }
    if let Some(e) = t.get("health_gate") {
        u.health_gate = health_gate(ctx, &e.value, &t.name("health_gate"));
    }
    u
}

const BUILTIN_CHECKS: &[&str] = &["kubernetes", "network", "time"];

fn health_gate(ctx: &mut Ctx, v: &Value, name: &str) -> HealthGate {
    let mut h = HealthGate::default();
    let Some(t) = table(ctx, v, name, &["timeout_seconds", "checks"]) else {
        return h;
    };
    if let Some(e) = t.get("timeout_seconds") {
        h.timeout_seconds = integer(ctx, &e.value, &t.name("timeout_seconds"), 10, 86_400)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(h.timeout_seconds);
    }
    if let Some(e) = t.get("checks") {
        h.checks = list(ctx, &e.value, &t.name("checks"), |ctx, it, n| {
            let s = string(ctx, it, n, MAX_STRING)?;
            if BUILTIN_CHECKS.contains(&s.as_str()) {
                return Some(s);
            }
            if s.starts_with('/') {
                return ctx.check(it.pos, n, check::path_under(&s, &["usr", "etc", "opt", "var"]));
            }
            let hint = check::suggest(&s, BUILTIN_CHECKS).map(|k| format!("; did you mean `{k}`?")).unwrap_or_default();
            ctx.err(it.pos, format!("`{n}`: `{}` is not a built-in check (kubernetes, network, time) or an absolute path{hint}", check::shorten(&s)));
            None
        })
        .unwrap_or_default();
    }
    h
}

fn console(ctx: &mut Ctx, v: &Value, name: &str) -> Console {
    let mut c = Console::default();
    let Some(t) = table(ctx, v, name, &["emergency_shell"]) else {
        return c;
    };
    if let Some(e) = t.get("emergency_shell") {
        c.emergency_shell = boolean(ctx, &e.value, &t.name("emergency_shell")).unwrap_or(false);
    }
    c
}

fn logs(ctx: &mut Ctx, v: &Value, name: &str) -> Logs {
    let mut l = Logs::default();
    let Some(t) = table(
        ctx,
        v,
        name,
        &["ring_kib", "console", "persistent", "persistent_max_kib"],
    ) else {
        return l;
    };
    let kib = |ctx: &mut Ctx, key: &str, r: std::ops::RangeInclusive<u32>| {
        let e = t.get(key)?;
        integer(
            ctx,
            &e.value,
            &t.name(key),
            i128::from(*r.start()),
            i128::from(*r.end()),
        )
        .and_then(|n| u32::try_from(n).ok())
    };
    l.ring_kib = kib(ctx, "ring_kib", crate::logs::RING_KIB);
    l.persistent_max_kib = kib(ctx, "persistent_max_kib", crate::logs::PERSISTENT_MAX_KIB);
    if let Some(e) = t.get("console") {
        let n = t.name("console");
        l.console = string(ctx, &e.value, &n, MAX_STRING).and_then(|s| {
            let level = ConsoleLevel::parse(&s);
            if level.is_none() {
                let hint = check::suggest(&s, &ConsoleLevel::NAMES)
                    .map(|k| format!("; did you mean `{k}`?"))
                    .unwrap_or_default();
                ctx.err(
                    e.value.pos,
                    format!(
                        "`{n}`: `{}` is not one of `all`, `init`, `none`{hint}",
                        check::shorten(&s)
                    ),
                );
            }
            level
        });
    }
    if let Some(e) = t.get("persistent") {
        l.persistent = boolean(ctx, &e.value, &t.name("persistent"));
    }
    l
}
