//! `[update]`, published for the update agent at `/run/basalt/update.toml`:
//! ```toml
//! public_keys = ["RW..."]
//! url = "https://..."        # optional
//! channel = "stable"         # optional
//! [health_gate]
//! timeout_seconds = 600
//! checks = ["kubernetes"]
//! ```
//! Written at every boot, also with the defaults, so the agent reads one file.

use super::{ApplyError, Outcome, Root, System, UPDATE_FILE, write_atomic};
use crate::nodeconfig::{NodeConfig, Update};

pub fn render(u: &Update) -> String {
    let mut w = crate::tomlfast::Writer::default();
    w.strs("public_keys", &u.public_keys);
    if let Some(url) = &u.url {
        w.str("url", url);
    }
    if let Some(c) = &u.channel {
        w.str("channel", c);
    }
    w.table("health_gate")
        .int("timeout_seconds", i64::from(u.health_gate.timeout_seconds))
        .strs("checks", &u.health_gate.checks);
    format!(
        "# Generated at boot by basalt-node-config from the node config's [update]\n{}",
        w.finish()
    )
}

pub fn step(
    root: &Root,
    cfg: &NodeConfig,
    _sys: &mut dyn System,
    _out: &mut Outcome,
) -> Result<(), ApplyError> {
    write_atomic(&root.at(UPDATE_FILE), render(&cfg.update).as_bytes(), 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_file_reads_back() {
        let mut u = Update {
            url: Some("https://updates.example/basalt".into()),
            channel: Some("stable".into()),
            public_keys: vec!["RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3".into()],
            ..Update::default()
        };
        u.health_gate.timeout_seconds = 300;
        u.health_gate.checks = vec!["kubernetes".into(), "/usr/bin/check".into()];
        let v: toml::Table = render(&u).parse().unwrap();
        assert_eq!(
            v["public_keys"][0].as_str(),
            Some(u.public_keys[0].as_str())
        );
        assert_eq!(v["url"].as_str(), Some("https://updates.example/basalt"));
        assert_eq!(v["channel"].as_str(), Some("stable"));
        assert_eq!(v["health_gate"]["timeout_seconds"].as_integer(), Some(300));
        assert_eq!(
            v["health_gate"]["checks"][1].as_str(),
            Some("/usr/bin/check")
        );
        let d: toml::Table = render(&Update::default()).parse().unwrap();
        assert!(d.get("url").is_none());
        assert_eq!(d["health_gate"]["timeout_seconds"].as_integer(), Some(600));
    }
}
