//! Generated service files (the format of docs/boot-protocol.md "Service
//! files"), written to `/run/basalt/services/` for PID 1 to load.

use std::collections::BTreeMap;

/// A generated service; rendered with `tomlfast::Writer` (basic strings,
/// escaped), so any argument text is quoted correctly and PID 1 reads it
/// with its small TOML reader.
#[derive(Debug, Clone, Default)]
pub struct Generated {
    pub exec: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub after: Vec<String>,
    /// `always` unless set.
    pub restart: Option<&'static str>,
    pub stop_timeout_secs: Option<u64>,
    /// (`tcp` | `http` | `exec`, value), interval ms, timeout s.
    pub ready: Option<(Ready, u64, u64)>,
    pub backoff: Option<(u64, u64, u64)>,
}

#[derive(Debug, Clone)]
pub enum Ready {
    Tcp(String),
    Http(String),
    Exec(Vec<String>),
}

impl Generated {
    pub fn new(exec: &[&str]) -> Generated {
        Generated {
            exec: exec.iter().map(|s| s.to_string()).collect(),
            ..Generated::default()
        }
    }

    pub fn render(&self, why: &str) -> String {
        let mut w = crate::tomlfast::Writer::default();
        w.strs("exec", &self.exec);
        if !self.after.is_empty() {
            w.strs("after", &self.after);
        }
        w.str("restart", self.restart.unwrap_or("always"));
        if let Some(s) = self.stop_timeout_secs {
            w.uint("stop_timeout_secs", s);
        }
        if !self.env.is_empty() {
            w.table("env");
            for (k, v) in &self.env {
                w.str(k, v);
            }
        }
        if let Some((probe, interval, timeout)) = &self.ready {
            w.table("ready");
            match probe {
                Ready::Tcp(a) => w.str("tcp", a),
                Ready::Http(u) => w.str("http", u),
                Ready::Exec(e) => w.strs("exec", e),
            };
            w.uint("interval_ms", *interval)
                .uint("timeout_secs", *timeout);
        }
        if let Some((initial, max, reset)) = self.backoff {
            w.table("backoff")
                .uint("initial_ms", initial)
                .uint("max_ms", max)
                .uint("reset_after_secs", reset);
        }
        format!(
            "# Generated at boot by basalt-node-config: {}\n{}",
            why.replace(['\n', '\r'], " "),
            w.finish()
        )
    }
}

/// The first of `candidates` that exists under `root` (a program path).
pub fn find_program(root: &super::Root, candidates: &[&str]) -> Option<String> {
    candidates
        .iter()
        .find(|c| root.at(c).exists())
        .map(|c| c.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{Probe, ServiceDef};
    use std::path::Path;

    #[test]
    fn rendered_files_parse_as_services() {
        let mut g = Generated::new(&["/bin/sh", "-c", "echo \"quoted\" 'x'\n"]);
        g.env.insert("TZ".into(), "Europe/London".into());
        g.after = vec!["network".into()];
        g.ready = Some((Ready::Tcp("127.0.0.1:22".into()), 500, 30));
        g.backoff = Some((1000, 60000, 300));
        let text = g.render("test");
        assert!(text.starts_with("# Generated at boot"));
        // PID 1 reads it with its small TOML reader, not the fallback.
        assert!(crate::tomlfast::parse(&text).is_some(), "{text}");
        let d = ServiceDef::parse("x", &text, Path::new("x.toml")).unwrap();
        assert_eq!(d.exec[2], "echo \"quoted\" 'x'\n");
        assert_eq!(d.env["TZ"], "Europe/London");
        assert_eq!(d.after, ["network"]);
        assert_eq!(
            d.ready.unwrap().probe,
            Probe::Tcp("127.0.0.1:22".parse().unwrap())
        );
        let g = Generated {
            restart: Some("never"),
            ready: Some((Ready::Exec(vec!["/bin/true".into()]), 100, 5)),
            ..Generated::new(&["/bin/x"])
        };
        assert!(crate::tomlfast::parse(&g.render("t")).is_some());
        let d = ServiceDef::parse("y", &g.render("t"), Path::new("y.toml")).unwrap();
        assert_eq!(d.restart, crate::service::Restart::Never);
    }
}
