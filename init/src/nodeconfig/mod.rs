//! Node config: the per-device settings (hostname, users and SSH keys,
//! network, clock, kernel, files, Kubernetes role, updates, console, logs) that a
//! person drops on the FAT partition, in one of two syntaxes:
//! `node.toml`, or cloud-init NoCloud files (`meta-data`, `user-data`,
//! `network-config`). Both decode into the one [`NodeConfig`].
//!
//! This module owns parsing and checking only. The builder (`basalt config
//! check`) and the device (stage 2) call the same functions, so they cannot
//! drift. It never touches the system, never panics on any input, and never
//! ignores a key it does not understand: every problem is a [`Diagnostic`]
//! with file, line and column.
//!
//! Key by key, the schema is documented in `docs/node-config.md`
//! ([`schema_doc`]).

mod check;
mod cloudinit;
mod decode;
mod schema;
mod toml;
mod tree;
mod yaml;

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

pub use cloudinit::Sources as CloudInitSources;
pub use schema::*;

/// The largest config file read, in bytes (a 1 MiB file in base64 fits).
pub const MAX_FILE_BYTES: u64 = 2 * 1024 * 1024;

/// The most separators (`,` `=` newline) a `node.toml` may hold: a bound on
/// the number of values, checked before parsing because the parser's own
/// memory grows with them (~150 bytes each).
pub const MAX_TOML_SEPARATORS: usize = 200_000;

/// The cloud-init NoCloud file names, in the order they are read.
pub const CLOUD_INIT_FILES: [&str; 3] = ["meta-data", "user-data", "network-config"];

/// One problem in a node config, at a 1-based line and column (columns count
/// characters). Problems with a whole file are reported at 1:1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: u32,
    pub column: u32,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

impl std::error::Error for Diagnostic {}

impl Diagnostic {
    fn whole_file(file: &Path, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: file.to_path_buf(),
            line: 1,
            column: 1,
            message: message.into(),
        }
    }
}

/// The documented schema (docs/node-config.md), printed by `basalt config schema`.
pub fn schema_doc() -> &'static str {
    include_str!("../../../docs/node-config.md")
}

/// Parse and check a `node.toml`. `path` is only used to name the file in
/// diagnostics.
pub fn load_toml(path: &Path, text: &str) -> Result<NodeConfig, Vec<Diagnostic>> {
    let text = strip_bom(text);
    check_separators(path, text)?;
    // The TOML tools write goes through init's small reader (less code for
    // the node config's child to run on the path to Kubernetes); the config
    // it gives is taken only when it has no problem at all. Anything else is
    // read by the toml crate, and its diagnostics are the answer.
    if let Some(root) = toml::parse_subset(text) {
        let mut ctx = decode::Ctx::new(path);
        let cfg = decode::node_config(&mut ctx, &root, "", decode::ROOT_KEYS);
        if ctx.diags.is_empty() {
            return Ok(cfg);
        }
    }
    decode_full(path, text)
}

/// `load_toml` through the toml crate only (tests compare the two).
#[doc(hidden)]
pub fn load_toml_full(path: &Path, text: &str) -> Result<NodeConfig, Vec<Diagnostic>> {
    let text = strip_bom(text);
    check_separators(path, text)?;
    decode_full(path, text)
}

/// A refusal when the text has more `,`, `=` and newlines than any node
/// config (before either parser sees it).
fn check_separators(path: &Path, text: &str) -> Result<(), Vec<Diagnostic>> {
    let separators = text
        .bytes()
        .filter(|b| matches!(b, b',' | b'=' | b'\n'))
        .count();
    if separators > MAX_TOML_SEPARATORS {
        return Err(vec![Diagnostic::whole_file(
            path,
            format!(
                "{separators} values or lines; a node config has far fewer (the limit is {MAX_TOML_SEPARATORS})"
            ),
        )]);
    }
    Ok(())
}

/// Parse with the toml crate (positions on every value) and decode.
fn decode_full(path: &Path, text: &str) -> Result<NodeConfig, Vec<Diagnostic>> {
    let root = toml::parse(text).map_err(|(pos, message)| {
        vec![Diagnostic {
            file: path.to_path_buf(),
            line: pos.line,
            column: pos.column,
            message,
        }]
    })?;
    let mut ctx = decode::Ctx::new(path);
    let cfg = decode::node_config(&mut ctx, &root, "", decode::ROOT_KEYS);
    finish(cfg, ctx.diags)
}

/// Parse and check cloud-init NoCloud files already in memory; `dir` names
/// the directory they came from in diagnostics.
pub fn parse_cloud_init(
    dir: &Path,
    sources: &CloudInitSources<'_>,
) -> Result<NodeConfig, Vec<Diagnostic>> {
    if sources.meta_data.is_none()
        && sources.user_data.is_none()
        && sources.network_config.is_none()
    {
        return Err(vec![Diagnostic::whole_file(
            dir,
            "no cloud-init files (meta-data, user-data, network-config) found",
        )]);
    }
    match cloudinit::decode(dir, sources) {
        Ok(cfg) => Ok(cfg),
        Err(diags) => finish(NodeConfig::default(), diags),
    }
}

/// Read and check the cloud-init NoCloud files in `dir` (each optional, at
/// least one present).
pub fn load_cloud_init(dir: &Path) -> Result<NodeConfig, Vec<Diagnostic>> {
    let mut texts: [Option<String>; 3] = [None, None, None];
    let mut diags = Vec::new();
    for (slot, name) in texts.iter_mut().zip(CLOUD_INIT_FILES) {
        let path = dir.join(name);
        match read_text(&path) {
            Ok(Some(t)) => *slot = Some(t),
            Ok(None) => {}
            Err(d) => diags.push(d),
        }
    }
    if !diags.is_empty() {
        return Err(diags);
    }
    let [meta, user, network] = &texts;
    parse_cloud_init(
        dir,
        &CloudInitSources {
            meta_data: meta.as_deref(),
            user_data: user.as_deref(),
            network_config: network.as_deref(),
        },
    )
}

/// Load a node config from a `node.toml` file, a cloud-init file (its
/// directory is read), or a directory holding either `node.toml` or
/// cloud-init files (not both).
pub fn load_dir_or_file(path: &Path) -> Result<NodeConfig, Vec<Diagnostic>> {
    if path.is_dir() {
        let toml_path = path.join("node.toml");
        let has_toml = toml_path.exists();
        let cloud: Vec<&str> = CLOUD_INIT_FILES
            .iter()
            .copied()
            .filter(|n| path.join(n).exists())
            .collect();
        return match (has_toml, cloud.is_empty()) {
            (true, false) => Err(vec![Diagnostic::whole_file(
                &toml_path,
                format!(
                    "both node.toml and cloud-init files ({}) are present; keep one syntax",
                    cloud.join(", ")
                ),
            )]),
            (true, true) => load_toml_file(&toml_path),
            (false, false) => load_cloud_init(path),
            (false, true) => {
                // Windows hides known extensions: "node.toml" saved by
                // Notepad is really "node.toml.txt".
                let hidden_txt = ["node.toml", "user-data", "meta-data", "network-config"]
                    .iter()
                    .map(|n| format!("{n}.txt"))
                    .find(|n| path.join(n).exists());
                let message = match hidden_txt {
                    Some(n) => format!(
                        "found `{n}` but no node config: rename it to `{}` (Windows hides the .txt extension)",
                        n.trim_end_matches(".txt")
                    ),
                    None => "no node config here (node.toml, or cloud-init meta-data/user-data/network-config)".to_owned(),
                };
                Err(vec![Diagnostic::whole_file(path, message)])
            }
        };
    }
    let is_cloud = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| CLOUD_INIT_FILES.contains(&n));
    if is_cloud {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        return load_cloud_init(dir);
    }
    load_toml_file(path)
}

fn load_toml_file(path: &Path) -> Result<NodeConfig, Vec<Diagnostic>> {
    match read_text(path) {
        Ok(Some(text)) => load_toml(path, &text),
        Ok(None) => Err(vec![Diagnostic::whole_file(
            path,
            "cannot read: no such file",
        )]),
        Err(d) => Err(vec![d]),
    }
}

/// Read a config file as UTF-8; `None` when it does not exist.
fn read_text(path: &Path) -> Result<Option<String>, Diagnostic> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Diagnostic::whole_file(path, format!("cannot read: {e}"))),
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Diagnostic::whole_file(path, format!("cannot read: {e}")))?;
    text_of(path, bytes).map(Some)
}

/// Bytes to text, refusing what is too big or not UTF-8 (with where).
pub fn text_of(path: &Path, bytes: Vec<u8>) -> Result<String, Diagnostic> {
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(Diagnostic::whole_file(
            path,
            format!("file is larger than {MAX_FILE_BYTES} bytes; a node config is small"),
        ));
    }
    if bytes.starts_with(&[0xff, 0xfe]) || bytes.starts_with(&[0xfe, 0xff]) {
        return Err(Diagnostic::whole_file(
            path,
            "file is UTF-16; save it as UTF-8",
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        let good = e.utf8_error().valid_up_to();
        let prefix = String::from_utf8_lossy(&e.as_bytes()[..good]).into_owned();
        let pos = tree::Pos::of_offset(&prefix, good);
        Diagnostic {
            file: path.to_path_buf(),
            line: pos.line,
            column: pos.column,
            message: "file is not UTF-8 text".to_owned(),
        }
    })
}

/// Drop a UTF-8 byte order mark: editors hide it, so columns do not count it.
pub(crate) fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

fn finish(cfg: NodeConfig, mut diags: Vec<Diagnostic>) -> Result<NodeConfig, Vec<Diagnostic>> {
    if diags.is_empty() {
        return Ok(cfg);
    }
    diags.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
    diags.dedup();
    Err(diags)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config in the subset is decoded from init's small reader's tree,
    /// and gives what the toml crate's does; one outside it (or with a
    /// problem) gets the toml crate's answer.
    #[test]
    fn subset_configs_decode_the_same() {
        let p = Path::new("node.toml");
        let subset = r#"# written by a provisioning tool
hostname = "edge-7"
[kubernetes]
distribution = "k3s"
role = "agent"
server_url = "https://10.0.0.1:6443"
token = "K10abc::server:xyz"
labels = { "zone" = "north", rack = "r2" }
[kernel.sysctl]
"net.ipv4.ip_forward" = 1
[logs]
ring_kib = 256
persistent = true
[update]
channel = "stable"
"#;
        assert!(toml::parse_subset(subset).is_some());
        let fast = load_toml(p, subset);
        assert!(fast.is_ok(), "{fast:?}");
        assert_eq!(fast, load_toml_full(p, subset));
        assert_eq!(fast.unwrap().hostname.as_deref(), Some("edge-7"));

        let outside = subset.replace(
            "labels = { \"zone\" = \"north\", rack = \"r2\" }",
            "labels.zone = \"north\"\nlabels.rack = \"r2\"",
        );
        assert!(toml::parse_subset(&outside).is_none());
        assert_eq!(load_toml(p, &outside), load_toml_full(p, &outside));

        // Users and files: arrays of tables, modes in octal, on the fast
        // path too (the tree decodes without a problem), with the base kept:
        // a decimal mode is a problem, reported as the toml crate reads it.
        let users = format!(
            "{subset}[[users]]\nname = \"ops\"\nssh_authorized_keys = [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ops@laptop\"]\n[[files]]\npath = \"/etc/motd\"\ncontent = \"hi\\n\"\nmode = 0o640\n[[files]]\npath = \"/etc/issue\"\ncontent = \"x\"\n"
        );
        let root = toml::parse_subset(&users).expect("in the subset");
        let mut ctx = decode::Ctx::new(p);
        let cfg = decode::node_config(&mut ctx, &root, "", decode::ROOT_KEYS);
        assert!(ctx.diags.is_empty(), "{:?}", ctx.diags);
        assert_eq!(Ok(cfg.clone()), load_toml_full(p, &users));
        assert_eq!(cfg.files.len(), 2);
        let motd = cfg.files.iter().find(|f| f.path == "/etc/motd");
        assert_eq!(motd.map(|f| f.mode), Some(0o640));
        assert_eq!(cfg.users[0].name, "ops");
        for mode in ["420", "0x1a0", "0b110100000", "0o17777"] {
            let bad = users.replace("mode = 0o640", &format!("mode = {mode}"));
            let d = load_toml(p, &bad).unwrap_err();
            assert_eq!(Err(d.clone()), load_toml_full(p, &bad), "{mode}");
            assert!(
                d.iter().any(|d| d.message.contains("octal")),
                "{mode}: {d:?}"
            );
        }

        // In the subset but wrong: the diagnostics (with their positions)
        // are the toml crate's.
        let wrong = subset.replace("ring_kib = 256", "ring_kib = \"big\"");
        assert!(toml::parse_subset(&wrong).is_some());
        let d = load_toml(p, &wrong).unwrap_err();
        assert_eq!(Err(d.clone()), load_toml_full(p, &wrong));
        assert!(d.iter().any(|d| (d.line, d.column) == (12, 12)), "{d:?}");
    }
}
