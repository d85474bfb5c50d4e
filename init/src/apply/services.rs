//! Generated service files (the format of docs/boot-protocol.md "Service
//! files"), written to `/run/basalt/services/` for PID 1 to load.

use std::collections::BTreeMap;

/// A generated service; rendered with the toml serializer, so any argument
/// text is quoted correctly.
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
        let mut t = toml::Table::new();
        let list = |v: &[String]| toml::Value::Array(v.iter().map(|s| s.as_str().into()).collect());
        t.insert("exec".into(), list(&self.exec));
        if !self.env.is_empty() {
            let env: toml::Table = self
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().into()))
                .collect();
            t.insert("env".into(), env.into());
        }
        if !self.after.is_empty() {
            t.insert("after".into(), list(&self.after));
        }
        t.insert("restart".into(), self.restart.unwrap_or("always").into());
        if let Some(s) = self.stop_timeout_secs {
            t.insert("stop_timeout_secs".into(), (s as i64).into());
        }
        if let Some((probe, interval, timeout)) = &self.ready {
            let mut r = toml::Table::new();
            match probe {
                Ready::Tcp(a) => r.insert("tcp".into(), a.as_str().into()),
                Ready::Http(u) => r.insert("http".into(), u.as_str().into()),
                Ready::Exec(e) => r.insert("exec".into(), list(e)),
            };
            r.insert("interval_ms".into(), (*interval as i64).into());
            r.insert("timeout_secs".into(), (*timeout as i64).into());
            t.insert("ready".into(), r.into());
        }
        if let Some((initial, max, reset)) = self.backoff {
            let mut b = toml::Table::new();
            b.insert("initial_ms".into(), (initial as i64).into());
            b.insert("max_ms".into(), (max as i64).into());
            b.insert("reset_after_secs".into(), (reset as i64).into());
            t.insert("backoff".into(), b.into());
        }
        format!("# Generated at boot by basalt-node-config: {why}\n{t}")
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
