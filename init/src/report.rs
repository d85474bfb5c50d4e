//! Facts init reports about itself: `/proc/uptime` instants, its own RSS, and
//! the small JSON writer the ready line and `basaltctl status --json` use
//! (PID 1 carries no JSON library for three objects).

use std::path::Path;

/// Milliseconds since the kernel started, from a `/proc/uptime` text.
pub fn parse_uptime_ms(text: &str) -> Option<u64> {
    let first = text.split_whitespace().next()?;
    let (secs, frac) = first.split_once('.').unwrap_or((first, "0"));
    let secs: u64 = secs.parse().ok()?;
    let frac = format!("{frac:0<3}");
    let ms: u64 = frac.get(..3)?.parse().ok()?;
    Some(secs * 1000 + ms)
}

/// The `/proc/uptime` instant now, in ms since the kernel started. Read from
/// `CLOCK_BOOTTIME` (the same clock, at ms resolution); the file under
/// `proc_dir` is the fallback.
pub fn uptime_ms(proc_dir: &Path) -> u64 {
    match crate::sys::boottime_ms() {
        0 => std::fs::read_to_string(proc_dir.join("uptime"))
            .ok()
            .and_then(|t| parse_uptime_ms(&t))
            .unwrap_or(0),
        ms => ms,
    }
}

/// `VmRSS` in KiB from a `/proc/<pid>/status` text.
pub fn parse_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// This process's resident set in KiB: `Rss:` of `smaps_rollup` (exact),
/// else `VmRSS` of `status` (the kernel batches those counters per thread, so
/// for a small process it can be far off).
pub fn rss_kib(proc_dir: &Path) -> u64 {
    std::fs::read_to_string(proc_dir.join("self/smaps_rollup"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Rss:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .or_else(|| {
            std::fs::read_to_string(proc_dir.join("self/status"))
                .ok()
                .and_then(|t| parse_rss_kib(&t))
        })
        .unwrap_or(0)
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    push_quoted(&mut out, s);
    out
}

/// `s` quoted and escaped so that it reads back the same both as a JSON
/// string and as a TOML basic string (`tomlfast::Writer`): `\"`, `\\`,
/// `\n`, `\r`, `\t`, other control characters and DEL as `\u00XX`.
pub fn push_quoted(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u00");
                out.push(char::from(HEX[(c as usize) >> 4]));
                out.push(char::from(HEX[(c as usize) & 15]));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A JSON value built by hand.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(u64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(&'static str, Json)>),
}

impl Json {
    pub fn str(s: impl Into<String>) -> Json {
        Json::Str(s.into())
    }

    pub fn opt_num(n: Option<u64>) -> Json {
        n.map_or(Json::Null, Json::Num)
    }
}

impl std::fmt::Display for Json {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Json::Null => f.write_str("null"),
            Json::Bool(b) => write!(f, "{b}"),
            Json::Num(n) => write!(f, "{n}"),
            Json::Str(s) => f.write_str(&json_str(s)),
            Json::Arr(items) => {
                f.write_str("[")?;
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str("]")
            }
            Json::Obj(fields) => {
                f.write_str("{")?;
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{}:{v}", json_str(k))?;
                }
                f.write_str("}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime() {
        assert_eq!(parse_uptime_ms("12.34 56.78\n"), Some(12_340));
        assert_eq!(parse_uptime_ms("0.05 0.00"), Some(50));
        assert_eq!(parse_uptime_ms("7 1"), Some(7000));
        assert_eq!(parse_uptime_ms(""), None);
    }

    #[test]
    fn rss() {
        let s = "Name:\tinit\nVmPeak:\t  1000 kB\nVmRSS:\t     812 kB\n";
        assert_eq!(parse_rss_kib(s), Some(812));
        assert_eq!(parse_rss_kib("Name: x"), None);
    }

    #[test]
    fn json() {
        let v = Json::Obj(vec![
            ("a", Json::str("x\"y\\\n\u{1}")),
            (
                "b",
                Json::Arr(vec![Json::Num(1), Json::Null, Json::Bool(true)]),
            ),
            ("c", Json::Obj(vec![])),
        ]);
        assert_eq!(
            v.to_string(),
            r#"{"a":"x\"y\\\n\u0001","b":[1,null,true],"c":{}}"#
        );
    }
}
