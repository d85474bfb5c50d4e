//! Value checks shared by both syntaxes: pure functions from a string to a
//! checked value or a message saying what is wrong. Positions are added by
//! the caller, which knows where the value came from.

use std::net::IpAddr;

use super::schema::Cidr;

/// Longest ordinary string value (names, URLs, keys).
pub const MAX_STRING: usize = 4096;
/// Longest file content, after base64 decoding.
pub const MAX_FILE_BYTES: usize = 1024 * 1024;
/// Longest passthrough Kubernetes config.
pub const MAX_PASSTHROUGH: usize = 64 * 1024;
/// Most items in any one list or table.
pub const MAX_ITEMS: usize = 1024;

pub fn hostname(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 253 {
        return Err(format!(
            "host name must be 1 to 253 characters long, this one is {}",
            s.chars().count()
        ));
    }
    for label in s.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!(
                "`{}`: each dot-separated label of a host name must be 1 to 63 characters long",
                shorten(s)
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!(
                "`{}` is not a valid host name (RFC 1123: letters, digits, `-` and `.` only)",
                shorten(s)
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "`{}` is not a valid host name (a label may not start or end with `-`)",
                shorten(s)
            ));
        }
    }
    Ok(())
}

pub fn ip(s: &str) -> Result<IpAddr, String> {
    s.parse::<IpAddr>()
        .map_err(|_| format!("`{}` is not an IP address", shorten(s)))
}

pub fn cidr(s: &str) -> Result<Cidr, String> {
    let Some((addr, prefix)) = s.split_once('/') else {
        return Err(format!(
            "`{}` is not an address with a prefix length (like 192.168.1.10/24)",
            shorten(s)
        ));
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("`{}`: `{}` is not an IP address", shorten(s), shorten(addr)))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = match prefix.parse::<u8>() {
        Ok(p) if p <= max && !prefix.starts_with('+') => p,
        _ => {
            return Err(format!(
                "`{}`: prefix length must be a number from 0 to {max}",
                shorten(s)
            ));
        }
    };
    Ok(Cidr { addr, prefix })
}

/// A destination for a route: a CIDR, or `default` for the given family.
pub fn route_to(s: &str, via: Option<IpAddr>) -> Result<Cidr, String> {
    if s == "default" {
        let addr = match via {
            Some(IpAddr::V6(_)) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        };
        return Ok(Cidr { addr, prefix: 0 });
    }
    cidr(s)
}

/// Normalise an absolute path (`//` and `.` removed) and refuse `..`.
/// `roots` are the allowed first components; the path must lie strictly
/// below one of them.
pub fn path_under(s: &str, roots: &[&str]) -> Result<String, String> {
    if s.len() > MAX_STRING {
        return Err(format!(
            "path is {} bytes long; the limit is {MAX_STRING}",
            s.len()
        ));
    }
    if s.contains('\0') {
        return Err("path contains a NUL byte".to_owned());
    }
    if !s.starts_with('/') {
        return Err(format!("`{}` is not an absolute path", shorten(s)));
    }
    let mut parts = Vec::new();
    for part in s.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(format!("`{}`: `..` is not allowed in paths", shorten(s)));
            }
            p if p.len() > 255 => {
                return Err(format!(
                    "`{}`: a path component is longer than 255 bytes",
                    shorten(s)
                ));
            }
            p => parts.push(p),
        }
    }
    let under = roots.iter().any(|r| parts.first() == Some(r)) && parts.len() >= 2;
    if !under {
        let list: Vec<String> = roots.iter().map(|r| format!("/{r}/")).collect();
        return Err(format!(
            "`{}` is outside {}",
            shorten(s),
            list.join(" and ")
        ));
    }
    Ok(format!("/{}", parts.join("/")))
}

/// An account or group name (the portable subset of useradd's rules).
pub fn account_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a valid user or group name (lowercase letters, digits, `_`, `-`; at most 32; not starting with a digit or `-`)",
            shorten(s)
        ))
    }
}

const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

pub fn ssh_key(s: &str) -> Result<(), String> {
    if s.len() > 16 * 1024 {
        return Err(format!(
            "SSH key is {} bytes long; the limit is 16384",
            s.len()
        ));
    }
    if s.contains(['\n', '\r', '\0']) {
        return Err("an SSH key must be one line".to_owned());
    }
    let mut words = s.split_ascii_whitespace();
    let kind = words.next().unwrap_or("");
    if !SSH_KEY_TYPES.contains(&kind) {
        return Err(format!(
            "`{}` is not an SSH public key (it must start with a key type such as ssh-ed25519; options before the type are not supported)",
            shorten(s)
        ));
    }
    match words.next() {
        Some(body) if base64(body).is_ok() => Ok(()),
        _ => Err(format!(
            "`{}`: the key data after `{kind}` is not base64",
            shorten(s)
        )),
    }
}

pub fn password_hash(s: &str) -> Result<(), String> {
    let ok = s.len() <= 512
        && s.starts_with('$')
        && s.matches('$').count() >= 3
        && !s.contains([':', '\n', '\r', '\0', ' ']);
    if ok {
        Ok(())
    } else {
        Err("this is not a crypt(3) password hash (like `$6$salt$hash` or `$y$...`); Basalt never takes plain-text passwords (make one with `mkpasswd`)".to_owned())
    }
}

pub fn module_name(s: &str) -> Result<(), String> {
    if !s.is_empty()
        && s.len() <= 55
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a kernel module name (letters, digits, `_`, `-`; at most 55)",
            shorten(s)
        ))
    }
}

pub fn sysctl_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && s.split(['.', '/']).all(|p| {
            !p.is_empty()
                && p != ".."
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'*')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a sysctl name (like `net.ipv4.ip_forward`)",
            shorten(s)
        ))
    }
}

pub fn one_line(s: &str, what: &str) -> Result<(), String> {
    if s.contains(['\n', '\r', '\0']) {
        Err(format!("{what} must be one line"))
    } else {
        Ok(())
    }
}

pub fn timezone(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.split('/').all(|p| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_+-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a time zone name (like `Europe/London` or `UTC`)",
            shorten(s)
        ))
    }
}

/// A host name or an IP address (NTP servers, URLs).
pub fn host(s: &str) -> Result<(), String> {
    if ip(s).is_ok() {
        return Ok(());
    }
    hostname(s)
}

pub fn mac(s: &str) -> Result<String, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!(
            "`{}` is not a MAC address (like dc:a6:32:01:02:03)",
            shorten(s)
        ))
    }
}

/// A name glob for interfaces: at most 15 characters, no `/`, `:` or whitespace.
pub fn interface_glob(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not an interface name or glob (at most 15 visible characters, no `/` or `:`)",
            shorten(s)
        ))
    }
}

/// The name of an interface entry (the netplan ID).
pub fn interface_id(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not an interface entry name (letters, digits, `_`, `.`, `-`; at most 15)",
            shorten(s)
        ))
    }
}

pub fn country(s: &str) -> Result<(), String> {
    if s.len() == 2 && (s.bytes().all(|b| b.is_ascii_uppercase()) || s == "00") {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a two-letter country code (ISO 3166-1, upper case, like GB)",
            shorten(s)
        ))
    }
}

pub fn ssid(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 32 || s.contains('\0') {
        Err(format!("an SSID is 1 to 32 bytes, this one is {}", s.len()))
    } else {
        Ok(())
    }
}

pub fn psk(s: &str) -> Result<(), String> {
    if (8..=63).contains(&s.len()) && s.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        Ok(())
    } else {
        Err("a Wi-Fi passphrase is 8 to 63 printable ASCII characters".to_owned())
    }
}

pub fn is_psk_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

pub fn psk_hash(s: &str) -> Result<(), String> {
    if is_psk_hash(s) {
        Ok(())
    } else {
        Err("a Wi-Fi PSK hash is 64 hexadecimal digits (from `wpa_passphrase`)".to_owned())
    }
}

/// An http(s) URL; `https_only` for anything that carries a secret.
pub fn url(s: &str, https_only: bool) -> Result<(), String> {
    let rest = if let Some(r) = s.strip_prefix("https://") {
        r
    } else if let (false, Some(r)) = (https_only, s.strip_prefix("http://")) {
        r
    } else {
        let want = if https_only {
            "https://"
        } else {
            "http:// or https://"
        };
        return Err(format!(
            "`{}` is not a URL starting with {want}",
            shorten(s)
        ));
    };
    if s.len() > 2048 || s.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(format!(
            "`{}` is not a valid URL (spaces, control or non-ASCII characters, or over 2048 bytes)",
            shorten(s)
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host_part, port) = if let Some(v6) = host_port.strip_prefix('[') {
        match v6.split_once(']') {
            Some((h, p)) => (h, p.strip_prefix(':')),
            None => return Err(format!("`{}`: unclosed `[` in the host", shorten(s))),
        }
    } else {
        match host_port.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        }
    };
    if let Some(p) = port
        && !matches!(p.parse::<u16>(), Ok(n) if n > 0)
    {
        return Err(format!("`{}`: port must be 1 to 65535", shorten(s)));
    }
    host(host_part).map_err(|_| {
        format!(
            "`{}`: `{}` is not a host name or address",
            shorten(s),
            shorten(host_part)
        )
    })
}

pub fn token(s: &str) -> Result<(), String> {
    if !s.is_empty() && s.len() <= MAX_STRING && s.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err("a join token is 1 to 4096 printable ASCII characters without spaces".to_owned())
    }
}

/// A Kubernetes label key: optional DNS prefix and `/`, then a name.
pub fn label_key(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(p) = prefix
        && (p.len() > 253 || hostname(p).is_err() || p.bytes().any(|b| b.is_ascii_uppercase()))
    {
        return Err(format!(
            "`{}`: the prefix of a label key must be a lowercase DNS name of at most 253 characters",
            shorten(s)
        ));
    }
    if name.is_empty() || label_value(name).is_err() {
        return Err(format!(
            "`{}` is not a label key (a name of at most 63 letters, digits, `-`, `_`, `.`, starting and ending alphanumeric)",
            shorten(s)
        ));
    }
    Ok(())
}

pub fn label_value(s: &str) -> Result<(), String> {
    let ok = s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && (s.is_empty()
            || (s.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
                && s.as_bytes().last().is_some_and(u8::is_ascii_alphanumeric)));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a label value (at most 63 letters, digits, `-`, `_`, `.`, starting and ending alphanumeric)",
            shorten(s)
        ))
    }
}

pub fn taint(s: &str) -> Result<(), String> {
    let Some((kv, effect)) = s.rsplit_once(':') else {
        return Err(format!(
            "`{}` is not a taint (`key=value:Effect` or `key:Effect`)",
            shorten(s)
        ));
    };
    if !["NoSchedule", "PreferNoSchedule", "NoExecute"].contains(&effect) {
        return Err(format!(
            "`{}`: taint effect must be NoSchedule, PreferNoSchedule or NoExecute",
            shorten(s)
        ));
    }
    let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
    label_key(key)?;
    label_value(value)
}

pub fn base64(s: &str) -> Result<Vec<u8>, String> {
    fn val(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let clean: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let body = clean
        .strip_suffix(b"==")
        .or_else(|| clean.strip_suffix(b"="))
        .unwrap_or(&clean);
    let padded = body.len() != clean.len();
    if (padded && !clean.len().is_multiple_of(4)) || body.len() % 4 == 1 {
        return Err("not base64: wrong length or padding".to_owned());
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for (i, &c) in body.iter().enumerate() {
        let Some(v) = val(c) else {
            return Err(format!("not base64: unexpected character at offset {i}"));
        };
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
        }
    }
    if bits >= 6 {
        return Err("not base64: truncated".to_owned());
    }
    Ok(out)
}

/// A minisign public key: base64 of `Ed` + 8-byte key id + 32-byte key.
pub fn minisign_key(s: &str) -> Result<(), String> {
    match base64(s) {
        Ok(b) if b.len() == 42 && b.starts_with(b"Ed") => Ok(()),
        _ => Err(format!(
            "`{}` is not a minisign public key (the base64 line starting `RW` from the .pub file)",
            shorten(s)
        )),
    }
}

pub fn simple_name(s: &str, what: &str) -> Result<(), String> {
    if !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a valid {what} (letters, digits, `.`, `_`, `-`; at most 64)",
            shorten(s)
        ))
    }
}

/// A value cut to fit in a message.
pub fn shorten(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        s.escape_debug().to_string()
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{}…", head.escape_debug())
    }
}

/// Levenshtein distance, for "did you mean" suggestions.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest of `candidates` to `word`, if close enough to be a typo.
pub fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    if word.len() > 64 {
        return None;
    }
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .iter()
        .map(|c| (edit_distance(&word.to_ascii_lowercase(), c), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalise_and_refuse_escapes() {
        let roots = &["etc", "var"];
        assert_eq!(
            path_under("/etc//foo/./bar", roots).as_deref(),
            Ok("/etc/foo/bar")
        );
        assert!(path_under("/etc/../root/x", roots).is_err());
        assert!(path_under("/etc", roots).is_err());
        assert!(path_under("/etcetera/x", roots).is_err());
        assert!(path_under("etc/x", roots).is_err());
        assert!(path_under("/usr/bin/x", roots).is_err());
    }

    #[test]
    fn base64_round_trips_known_vectors() {
        assert_eq!(base64("aGVsbG8=").as_deref(), Ok(&b"hello"[..]));
        assert_eq!(base64("aGVs\nbG8h").as_deref(), Ok(&b"hello!"[..]));
        assert_eq!(base64("").as_deref(), Ok(&b""[..]));
        assert!(base64("a").is_err());
        assert!(base64("aGV*").is_err());
    }

    #[test]
    fn cidrs() {
        assert!(cidr("10.0.0.1/8").is_ok());
        assert!(cidr("fd00::1/64").is_ok());
        assert!(cidr("10.0.0.1/33").is_err());
        assert!(cidr("10.0.0.1").is_err());
        assert!(cidr("10.0.0.256/8").is_err());
        assert!(cidr("fd00::1/129").is_err());
    }

    #[test]
    fn hostnames() {
        assert!(hostname("node-1.example.org").is_ok());
        assert!(hostname("-node").is_err());
        assert!(hostname("no_de").is_err());
        assert!(hostname(&"a".repeat(64)).is_err());
        assert!(hostname("a..b").is_err());
    }

    #[test]
    fn suggestions() {
        assert_eq!(suggest("hostnme", &["hostname", "users"]), Some("hostname"));
        assert_eq!(suggest("zzz", &["hostname", "users"]), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
