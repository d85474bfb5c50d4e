//! The JSON console lines tests read: init's boot report
//! (`basalt: ready {json}`, docs/boot-protocol.md) and the Kubernetes
//! stand-in's record (`k8s-standin: received {json}`, docs/standin.md).

use serde::Deserialize;
use thiserror::Error;

pub const READY_PREFIX: &str = "basalt: ready ";
pub const RECEIVED_PREFIX: &str = "k8s-standin: received ";

#[derive(Debug, Error)]
pub enum ReportError {
    #[error("no `{prefix}` in console line {line:?}")]
    NoPrefix { prefix: &'static str, line: String },
    #[error("bad JSON after `{prefix}` in {line:?}: {source}")]
    Json {
        prefix: &'static str,
        line: String,
        source: serde_json::Error,
    },
}

/// `basalt: ready {json}`: the boot report.
#[derive(Debug, Clone, Deserialize)]
pub struct Ready {
    pub slot: String,
    pub hostname: String,
    pub machine_id: String,
    pub kubernetes: Kubernetes,
    pub pid1_rss_kib: u64,
    pub data_grown: bool,
    pub timings_ms: Timings,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Kubernetes {
    pub distribution: String,
    pub pid: u32,
}

/// Instants (ms since kernel start) at the end of each phase.
#[derive(Debug, Clone, Deserialize)]
pub struct Timings {
    pub stage1: u64,
    pub stage2: u64,
    pub kubernetes_exec: u64,
    pub kubernetes_ready: u64,
}

/// The JSON text after `prefix` (anywhere in the line: the console may
/// prepend a kernel timestamp or a partial line from another writer).
fn json_after<'a>(line: &'a str, prefix: &'static str) -> Result<&'a str, ReportError> {
    line.find(prefix)
        .map(|i| &line[i + prefix.len()..])
        .ok_or_else(|| ReportError::NoPrefix {
            prefix,
            line: line.to_string(),
        })
}

/// Parses a `basalt: ready {json}` line.
pub fn parse_ready(line: &str) -> Result<Ready, ReportError> {
    let json = json_after(line, READY_PREFIX)?;
    serde_json::from_str(json).map_err(|source| ReportError::Json {
        prefix: READY_PREFIX,
        line: line.to_string(),
        source,
    })
}

/// Parses a `k8s-standin: received {json}` line (kept as a JSON value: it
/// holds whatever the stand-in was given).
pub fn parse_received(line: &str) -> Result<serde_json::Value, ReportError> {
    let json = json_after(line, RECEIVED_PREFIX)?;
    serde_json::from_str(json).map_err(|source| ReportError::Json {
        prefix: RECEIVED_PREFIX,
        line: line.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_ready_line() {
        let line = r#"[    9.1] basalt: ready {"slot":"a","hostname":"n1","machine_id":"0123456789abcdef0123456789abcdef","kubernetes":{"distribution":"k3s","pid":210},"pid1_rss_kib":900,"data_grown":true,"timings_ms":{"stage1":1800,"stage2":2100,"kubernetes_exec":2150,"kubernetes_ready":3400},"extra":1}"#;
        let r = parse_ready(line).unwrap();
        assert_eq!(r.slot, "a");
        assert_eq!(r.hostname, "n1");
        assert_eq!(r.kubernetes.distribution, "k3s");
        assert_eq!(r.kubernetes.pid, 210);
        assert!(r.data_grown);
        assert_eq!(r.timings_ms.kubernetes_ready, 3400);
    }

    #[test]
    fn rejects_incomplete_reports() {
        assert!(matches!(
            parse_ready("basalt: stage2 start"),
            Err(ReportError::NoPrefix { .. })
        ));
        assert!(matches!(
            parse_ready(r#"basalt: ready {"slot":"a"}"#),
            Err(ReportError::Json { .. })
        ));
        let v = parse_received(r#"k8s-standin: received {"role":"server"}"#).unwrap();
        assert_eq!(v["role"], "server");
    }
}
