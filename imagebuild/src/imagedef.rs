//! Image definitions: what goes on a board (schema: docs/image-definition.md).
//!
//! Host paths in a definition are relative to the definition's directory and
//! may use `${VAR}` / `${VAR:-default}` environment expansion; an unset
//! variable without a default is an error naming the key. Loading resolves
//! every path, so later steps never see a relative or unexpanded path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default image definitions shipped with basalt, per board: (board, text).
/// `x86_64` and the Raspberry Pi boards are made of Alpine packages and real
/// k3s (need the network, or a warm cache and a lock); each `<board>-test-assets`
/// of the Debian test assets and the Kubernetes stand-in (offline).
/// `x86_64-test-assets` is what `basalt build` builds with neither a definition
/// nor `--board`.
pub const EMBEDDED_DEFAULTS: &[(&str, &str)] = &[
    ("x86_64", include_str!("../defaults/x86_64.toml")),
    (
        "x86_64-test-assets",
        include_str!("../defaults/x86_64-test-assets.toml"),
    ),
    ("rpi4", include_str!("../defaults/rpi4.toml")),
    ("rpi5", include_str!("../defaults/rpi5.toml")),
    ("rpi3", include_str!("../defaults/rpi3.toml")),
    ("rpi-armv7", include_str!("../defaults/rpi-armv7.toml")),
    (
        "rpi4-test-assets",
        include_str!("../defaults/rpi4-test-assets.toml"),
    ),
    (
        "rpi5-test-assets",
        include_str!("../defaults/rpi5-test-assets.toml"),
    ),
    (
        "rpi3-test-assets",
        include_str!("../defaults/rpi3-test-assets.toml"),
    ),
    (
        "rpi-armv7-test-assets",
        include_str!("../defaults/rpi-armv7-test-assets.toml"),
    ),
];

/// What `basalt build` builds with neither a definition nor `--board`.
pub const DEFAULT_WITHOUT_BOARD: &str = "x86_64-test-assets";

/// The basalt source checkout this binary was built from: the fallback for
/// `${BASALT_SOURCE_DIR}` in the embedded default definitions.
pub fn source_dir() -> PathBuf {
    match std::env::var_os("BASALT_SOURCE_DIR") {
        Some(v) => PathBuf::from(v),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
    }
}

/// The Kubernetes distribution: the device's own type (it reads the
/// `kubernetes.distribution` the builder writes into `image.toml`).
pub use basalt_init::service::Distribution;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefinition {
    name: Option<String>,
    board: String,
    os_version: String,
    source_date_epoch: Option<u64>,
    #[serde(default)]
    cmdline: String,
    kubernetes: RawKubernetes,
    #[serde(default)]
    overlays: Vec<RawOverlay>,
    #[serde(default)]
    services: Vec<String>,
    node_config: Option<RawNodeConfig>,
    #[serde(default)]
    symlinks: BTreeMap<String, String>,
    packages: Option<RawPackages>,
    image_size_mib: Option<u64>,
    initramfs_modules: Option<Vec<String>>,
    rpi: Option<RaspberryPi>,
    update: Option<RawUpdate>,
}

/// `[update]`: who may sign bundles for this image, and what bundles built
/// from this definition may be installed over (docs/updates.md).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpdate {
    #[serde(default)]
    public_keys: Vec<String>,
    #[serde(default)]
    compatible_from: Vec<String>,
}

/// `[update]` of an image definition.
#[derive(Debug, Clone, Default)]
pub struct Update {
    /// minisign `.pub` files installed as `/etc/basalt/update-keys/<name>.pub`.
    pub public_keys: Vec<PathBuf>,
    /// OS versions a bundle of this image installs over (`*`, `0.1.*`, exact); empty: `*`.
    pub compatible_from: Vec<String>,
}

/// `[rpi]`: additions to (and overrides of) a Raspberry Pi board's boot partition.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaspberryPi {
    /// Lines appended to `config.txt` (e.g. `dtoverlay=...`, `dtparam=...`).
    #[serde(default)]
    pub config: Vec<String>,
    /// Replaces the board's `boot.dtbs`.
    pub dtbs: Option<Vec<String>>,
    /// Replaces the board's `boot.overlays`.
    pub overlays: Option<Vec<String>>,
    /// Replaces the board's `root.dtbs_dir`.
    pub dtbs_dir: Option<String>,
    /// Replaces the board's `root.firmware_dir`.
    pub firmware_dir: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKubernetes {
    distribution: Distribution,
    binary: Option<String>,
    source: Option<String>,
    version: Option<String>,
    airgap_images: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPackages {
    #[serde(default)]
    repositories: Vec<RawRepo>,
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default)]
    world: Vec<String>,
    #[serde(default)]
    allow_setuid: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawRepo {
    Spec(String),
    Table(RawRepoTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepoTable {
    url: String,
    #[serde(default)]
    trust_unsigned: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOverlay {
    source: String,
    dest: Option<String>,
    owner: Option<String>,
    #[serde(default)]
    modes: BTreeMap<String, u32>,
    #[serde(default)]
    exclude: Vec<String>,
    busybox_links: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawNodeConfig {
    File(String),
    Inline(toml::Table),
}

/// A loaded image definition, every host path absolute and expanded.
#[derive(Debug, Clone)]
pub struct ImageDefinition {
    /// Where it came from (for messages).
    pub file: String,
    pub name: Option<String>,
    /// Board name or path (resolved against the definition's directory).
    pub board: String,
    pub base_dir: PathBuf,
    pub os_version: String,
    pub source_date_epoch: Option<u64>,
    pub cmdline: String,
    pub kubernetes: Kubernetes,
    pub overlays: Vec<Overlay>,
    /// Service files: (file name in /etc/basalt/services, host path).
    pub services: Vec<(String, PathBuf)>,
    pub node_config: Option<NodeConfigSource>,
    /// Extra symlinks: path in root → target.
    pub symlinks: BTreeMap<String, String>,
    /// Alpine packages making the base root tree (overlays layer on top).
    pub packages: Option<Packages>,
    /// Total image size; `None` is just what the partitions need.
    pub image_size_mib: Option<u64>,
    /// Replaces the board's `initramfs.modules` (a kernel built differently).
    pub initramfs_modules: Option<Vec<String>>,
    /// Raspberry Pi boot partition additions (`[rpi]`).
    pub rpi: RaspberryPi,
    /// Update signing keys and compatibility (`[update]`).
    pub update: Update,
}

#[derive(Debug, Clone)]
pub struct Kubernetes {
    pub distribution: Distribution,
    /// Absolute path of the binary in the root.
    pub binary: String,
    /// Host file installed at `binary`: the local override, wins over `version`.
    pub source: Option<PathBuf>,
    /// Release (`v1.31.4+k3s1`): the official binary for the board's arch is
    /// downloaded, checked against the sha256 in `basalt.lock` and cached.
    pub version: Option<String>,
    /// URL of an airgap images tarball to put in the root (pinned in the lock).
    pub airgap_images: Option<String>,
}

/// `[packages]`: the Alpine repositories and the package list ("world").
#[derive(Debug, Clone)]
pub struct Packages {
    pub repositories: Vec<PackageRepo>,
    /// Key files or directories added to Alpine's built-in keys.
    pub keys: Vec<PathBuf>,
    /// Package list as written (`name`, `name>=1.2`, `name@tag`), in order.
    pub world: Vec<String>,
    /// Root paths (`bin/bbsuid`) whose setuid/setgid bit is allowed; `*` allows all.
    pub allow_setuid: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct PackageRepo {
    /// As written in the definition (unexpanded): how `basalt.lock` names it.
    pub spec: String,
    pub repository: basalt_rootfs::apk::Repository,
}

#[derive(Debug, Clone)]
pub struct Overlay {
    pub spec: basalt_rootfs::overlay::OverlaySpec,
    /// Path (inside the overlay) of a busybox binary to make applet symlinks for.
    pub busybox_links: Option<String>,
}

#[derive(Debug, Clone)]
pub enum NodeConfigSource {
    File(PathBuf),
    Inline(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ImageDefError {
    #[error("cannot read image definition {file}: {err}")]
    Read { file: PathBuf, err: std::io::Error },
    #[error("image definition {file}: {err}")]
    Parse {
        file: String,
        err: Box<toml::de::Error>,
    },
    #[error("image definition {file}: key `{key}`: {why}")]
    Invalid {
        file: String,
        key: String,
        why: String,
    },
    #[error(
        "no default image definition for board {board:?}; write one (docs/image-definition.md)"
    )]
    NoDefault { board: String },
}

/// Expand `${VAR}` and `${VAR:-default}` (the default may itself hold `${..}`).
/// `$` not followed by `{` is kept as is. Returns the name of the first unset
/// variable without a default as the error.
pub fn expand_env(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        // Find the matching `}` allowing nesting in the default.
        let mut depth = 1;
        let mut end = None;
        let bytes = after.as_bytes();
        let mut j = 0;
        while j < bytes.len() {
            if bytes[j] == b'$' && bytes.get(j + 1) == Some(&b'{') {
                depth += 1;
                j += 2;
                continue;
            }
            if bytes[j] == b'}' {
                depth -= 1;
                if depth == 0 {
                    end = Some(j);
                    break;
                }
            }
            j += 1;
        }
        let Some(end) = end else {
            return Err(format!("unterminated `${{` in {s:?}"));
        };
        let inner = &after[..end];
        let (name, default) = match inner.find(":-") {
            Some(k) => (&inner[..k], Some(&inner[k + 2..])),
            None => (inner, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("`${{{inner}}}` is not a variable reference"));
        }
        match (lookup(name).filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(&expand_env(d, lookup)?),
            (None, None) => {
                return Err(format!(
                    "environment variable {name} is not set (used as ${{{name}}})"
                ));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn env_lookup(name: &str) -> Option<String> {
    if name == "BASALT_SOURCE_DIR" {
        return Some(source_dir().display().to_string());
    }
    std::env::var(name).ok()
}

impl ImageDefinition {
    /// Load from a file; relative paths resolve against its directory.
    pub fn load(path: &Path) -> Result<ImageDefinition, ImageDefError> {
        let text = std::fs::read_to_string(path).map_err(|err| ImageDefError::Read {
            file: path.to_path_buf(),
            err,
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = std::path::absolute(&base).unwrap_or(base);
        Self::parse(&text, &path.display().to_string(), &base, &env_lookup)
    }

    /// The default definition shipped for `board`.
    pub fn embedded_default(board: &str) -> Result<ImageDefinition, ImageDefError> {
        let Some((b, text)) = EMBEDDED_DEFAULTS.iter().find(|(b, _)| *b == board) else {
            return Err(ImageDefError::NoDefault {
                board: board.to_string(),
            });
        };
        let base = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        Self::parse(
            text,
            &format!("the embedded default for board {b}"),
            &base,
            &env_lookup,
        )
    }

    pub fn parse(
        text: &str,
        file: &str,
        base: &Path,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ImageDefinition, ImageDefError> {
        let raw: RawDefinition = toml::from_str(text).map_err(|err| ImageDefError::Parse {
            file: file.to_string(),
            err: Box::new(err),
        })?;
        let bad = |key: &str, why: String| ImageDefError::Invalid {
            file: file.to_string(),
            key: key.to_string(),
            why,
        };
        let path = |key: &str, s: &str| -> Result<PathBuf, ImageDefError> {
            let e = expand_env(s, lookup).map_err(|why| bad(key, why))?;
            if e.is_empty() {
                return Err(bad(key, "is empty".into()));
            }
            Ok(base.join(e))
        };

        if raw.os_version.is_empty()
            || !raw
                .os_version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-+~".contains(c))
        {
            return Err(bad(
                "os_version",
                format!(
                    "{:?} must be non-empty and use only letters, digits and . _ - + ~",
                    raw.os_version
                ),
            ));
        }
        if let Some(n) = &raw.name
            && (n.is_empty()
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c)))
        {
            return Err(bad(
                "name",
                format!("{n:?} must be a plain file name (letters, digits, . _ - +)"),
            ));
        }
        let board = expand_env(&raw.board, lookup).map_err(|why| bad("board", why))?;
        let board = if board.ends_with(".toml") || board.contains('/') {
            base.join(board).display().to_string()
        } else {
            board
        };

        let k = &raw.kubernetes;
        let binary = k
            .binary
            .clone()
            .unwrap_or_else(|| format!("/usr/bin/{}", k.distribution.name()));
        if !binary.starts_with('/') || binary.split('/').any(|c| c == "..") {
            return Err(bad(
                "kubernetes.binary",
                format!("{binary:?} must be an absolute path in the root"),
            ));
        }
        if let Some(v) = &k.version
            && (v.is_empty()
                || !v
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c)))
        {
            return Err(bad(
                "kubernetes.version",
                format!("{v:?} is not a release name like \"v1.31.4+k3s1\""),
            ));
        }
        if let Some(u) = &k.airgap_images
            && !(u.starts_with("https://") || u.starts_with("http://"))
        {
            return Err(bad(
                "kubernetes.airgap_images",
                format!("{u:?} must be an http(s) URL"),
            ));
        }
        let kubernetes = Kubernetes {
            distribution: k.distribution,
            binary,
            source: k
                .source
                .as_deref()
                .map(|s| path("kubernetes.source", s))
                .transpose()?,
            version: k.version.clone(),
            airgap_images: k.airgap_images.clone(),
        };

        let packages = match &raw.packages {
            None => None,
            Some(p) => Some(parse_packages(p, base, lookup, &bad)?),
        };

        let mut overlays = Vec::new();
        for (i, o) in raw.overlays.iter().enumerate() {
            let key = |k: &str| format!("overlays[{i}].{k}");
            let owner = match &o.owner {
                None => None,
                Some(s) => {
                    let parsed = s
                        .split_once(':')
                        .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)));
                    Some(parsed.ok_or_else(|| {
                        bad(&key("owner"), format!("{s:?} is not \"uid:gid\" (numbers)"))
                    })?)
                }
            };
            let mut modes = BTreeMap::new();
            for (p, m) in &o.modes {
                if *m > 0o7777 {
                    return Err(bad(
                        &key("modes"),
                        format!("{p:?}: mode {m:#o} has bits beyond 0o7777 (write 0o755)"),
                    ));
                }
                modes.insert(PathBuf::from(p), *m);
            }
            overlays.push(Overlay {
                spec: basalt_rootfs::overlay::OverlaySpec {
                    source: path(&key("source"), &o.source)?,
                    dest: PathBuf::from(o.dest.clone().unwrap_or_else(|| "/".into())),
                    owner,
                    modes,
                    exclude: o.exclude.clone(),
                },
                busybox_links: o.busybox_links.clone(),
            });
        }

        let mut services = Vec::new();
        for (i, s) in raw.services.iter().enumerate() {
            let key = format!("services[{i}]");
            let p = path(&key, s)?;
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".toml"))
                .ok_or_else(|| bad(&key, format!("{s:?} must name a .toml file")))?;
            if services.iter().any(|(n, _)| *n == name) {
                return Err(bad(&key, format!("a second service file named {name}")));
            }
            services.push((name, p));
        }

        let node_config = match raw.node_config {
            None => None,
            Some(RawNodeConfig::File(f)) => Some(NodeConfigSource::File(path("node_config", &f)?)),
            Some(RawNodeConfig::Inline(t)) => Some(NodeConfigSource::Inline(
                toml::to_string(&t).map_err(|e| bad("node_config", e.to_string()))?,
            )),
        };

        for (p, t) in &raw.symlinks {
            if p.split('/').any(|c| c == "..") || t.is_empty() {
                return Err(bad(
                    "symlinks",
                    format!(
                        "{p:?} -> {t:?}: path must stay in the root and the target be non-empty"
                    ),
                ));
            }
        }

        if raw.image_size_mib == Some(0) {
            return Err(bad("image_size_mib", "must be at least 1".into()));
        }
        let rpi = raw.rpi.unwrap_or_default();
        if let Some(l) = rpi.config.iter().find(|l| l.contains('\n')) {
            return Err(bad("rpi.config", format!("{l:?}: one line per entry")));
        }
        if raw.cmdline.contains('\n') {
            return Err(bad("cmdline", "must be a single line".into()));
        }

        let mut update = Update::default();
        if let Some(u) = &raw.update {
            for (i, k) in u.public_keys.iter().enumerate() {
                update
                    .public_keys
                    .push(path(&format!("update.public_keys[{i}]"), k)?);
            }
            for v in &u.compatible_from {
                if v.is_empty()
                    || !v
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-+~*".contains(c))
                {
                    return Err(bad(
                        "update.compatible_from",
                        format!("{v:?} is not a version or a pattern like \"0.1.*\""),
                    ));
                }
            }
            update.compatible_from = u.compatible_from.clone();
        }
        Ok(ImageDefinition {
            file: file.to_string(),
            name: raw.name,
            board,
            base_dir: base.to_path_buf(),
            os_version: raw.os_version,
            source_date_epoch: raw.source_date_epoch,
            cmdline: raw.cmdline,
            kubernetes,
            overlays,
            services,
            node_config,
            symlinks: raw.symlinks,
            packages,
            image_size_mib: raw.image_size_mib,
            initramfs_modules: raw.initramfs_modules,
            rpi,
            update,
        })
    }
}

fn parse_packages(
    p: &RawPackages,
    base: &Path,
    lookup: &dyn Fn(&str) -> Option<String>,
    bad: &dyn Fn(&str, String) -> ImageDefError,
) -> Result<Packages, ImageDefError> {
    use basalt_rootfs::apk::Repository;
    let mut repositories = Vec::new();
    for (i, r) in p.repositories.iter().enumerate() {
        let key = format!("packages.repositories[{i}]");
        let (spec, trust_unsigned) = match r {
            RawRepo::Spec(s) => (s.clone(), false),
            RawRepo::Table(t) => (t.url.clone(), t.trust_unsigned),
        };
        let expanded = expand_env(&spec, lookup).map_err(|why| bad(&key, why))?;
        let (tag, loc) = match expanded
            .trim()
            .strip_prefix('@')
            .and_then(|r| r.split_once(char::is_whitespace))
        {
            Some((t, l)) => (Some(t), l.trim()),
            None => (None, expanded.trim()),
        };
        if loc.is_empty() {
            return Err(bad(&key, format!("{spec:?} names no repository")));
        }
        let loc = if loc.starts_with("http://") || loc.starts_with("https://") {
            loc.to_string()
        } else if loc.contains("://") {
            return Err(bad(
                &key,
                format!("{spec:?}: only http(s) URLs and local directories are repositories"),
            ));
        } else {
            base.join(loc).display().to_string()
        };
        let text = match tag {
            Some(t) => format!("@{t} {loc}"),
            None => loc,
        };
        let mut repository = Repository::parse(&text);
        if trust_unsigned {
            repository = repository.trusted_unsigned();
        }
        repositories.push(PackageRepo { spec, repository });
    }
    if repositories.is_empty() {
        return Err(bad(
            "packages.repositories",
            "needs at least one repository".into(),
        ));
    }
    let mut keys = Vec::new();
    for (i, k) in p.keys.iter().enumerate() {
        let key = format!("packages.keys[{i}]");
        let e = expand_env(k, lookup).map_err(|why| bad(&key, why))?;
        keys.push(base.join(e));
    }
    if p.world.is_empty() {
        return Err(bad("packages.world", "lists no packages".into()));
    }
    for (i, w) in p.world.iter().enumerate() {
        basalt_rootfs::apk::Dependency::parse_list(w)
            .map_err(|e| bad(&format!("packages.world[{i}]"), format!("{w:?}: {e}")))?;
    }
    for (i, s) in p.allow_setuid.iter().enumerate() {
        if s != "*" && (s.is_empty() || s.split('/').any(|c| c == "..")) {
            return Err(bad(
                &format!("packages.allow_setuid[{i}]"),
                format!("{s:?} must be a path in the root (or \"*\")"),
            ));
        }
    }
    Ok(Packages {
        repositories,
        keys,
        world: p.world.clone(),
        allow_setuid: p.allow_setuid.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let v: Vec<(String, String)> = vars
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        move |n: &str| v.iter().find(|(k, _)| k == n).map(|(_, x)| x.clone())
    }

    const MIN: &str = r#"
board = "x86_64"
os_version = "0.1.0"
[kubernetes]
distribution = "k3s"
"#;

    #[test]
    fn expand() {
        let e = env(&[("A", "/x"), ("E", "")]);
        assert_eq!(expand_env("${A}/b", &e).unwrap(), "/x/b");
        assert_eq!(expand_env("${B:-/d}/b", &e).unwrap(), "/d/b");
        assert_eq!(expand_env("${B:-${A}/c}", &e).unwrap(), "/x/c");
        assert_eq!(expand_env("${E:-def}", &e).unwrap(), "def");
        assert_eq!(expand_env("$A", &e).unwrap(), "$A");
        let err = expand_env("${NOPE}/x", &e).unwrap_err();
        assert!(err.contains("NOPE"), "{err}");
        assert!(expand_env("${A", &e).is_err());
    }

    #[test]
    fn minimal_definition_defaults() {
        let d = ImageDefinition::parse(MIN, "m.toml", Path::new("/base"), &env(&[])).unwrap();
        assert_eq!(d.kubernetes.binary, "/usr/bin/k3s");
        assert!(d.overlays.is_empty() && d.node_config.is_none());
    }

    #[test]
    fn full_definition() {
        let text = r#"
name = "edge"
board = "x86_64"
os_version = "1.2.3"
source_date_epoch = 1700000000
cmdline = "quiet"
services = ["svc/sshd.toml"]
[kubernetes]
distribution = "k0s"
binary = "/usr/local/bin/k0s"
source = "${BIN}/k0s"
[[overlays]]
source = "${ASSETS}/kernel"
exclude = [".stamp"]
[[overlays]]
source = "files.tar.zst"
dest = "/opt"
owner = "1000:1000"
modes = { "bin/x" = 0o755 }
[node_config]
hostname = "n1"
[symlinks]
"bin/sh" = "/bin/busybox"
"#;
        let d = ImageDefinition::parse(
            text,
            "f.toml",
            Path::new("/base"),
            &env(&[("BIN", "/b"), ("ASSETS", "rel")]),
        )
        .unwrap();
        assert_eq!(d.kubernetes.distribution, Distribution::K0s);
        assert_eq!(d.kubernetes.source.as_deref(), Some(Path::new("/b/k0s")));
        assert_eq!(d.overlays[0].spec.source, Path::new("/base/rel/kernel"));
        assert_eq!(d.overlays[1].spec.owner, Some((1000, 1000)));
        assert_eq!(d.overlays[1].spec.modes[Path::new("bin/x")], 0o755);
        assert_eq!(d.services[0].0, "sshd.toml");
        match d.node_config {
            Some(NodeConfigSource::Inline(t)) => assert!(t.contains("hostname = \"n1\"")),
            other => panic!("{other:?}"),
        }
    }

    fn err(text: &str) -> String {
        ImageDefinition::parse(text, "defs/bad.toml", Path::new("/b"), &env(&[]))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = err(&format!(
            "{MIN}\n[[overlays]]\nsource = \"${{BASALT_ASSETS}}/k\"\n"
        ));
        assert!(
            e.contains("defs/bad.toml") && e.contains("overlays[0].source"),
            "{e}"
        );
        assert!(e.contains("BASALT_ASSETS is not set"), "{e}");

        let e = err(&MIN.replace("os_version", "os_versoin"));
        assert!(
            e.contains("defs/bad.toml") && e.contains("os_versoin"),
            "{e}"
        );

        let e = err(&MIN.replace("k3s", "k8s"));
        assert!(e.contains("k8s"), "{e}");

        let e = err(&format!(
            "{MIN}\n[[overlays]]\nsource = \"x\"\nowner = \"root\"\n"
        ));
        assert!(e.contains("overlays[0].owner"), "{e}");

        let e = err(&format!("{MIN}binary = \"usr/bin/k3s\"\n"));
        assert!(e.contains("kubernetes.binary"), "{e}");

        let e = err(&MIN.replace("0.1.0", "0.1 beta"));
        assert!(e.contains("os_version"), "{e}");

        let e = err(&format!("services = [\"a.conf\"]\n{MIN}"));
        assert!(e.contains("services[0]"), "{e}");
    }

    #[test]
    fn embedded_alpine_default_names_packages_and_a_k3s_release() {
        let (_, text) = EMBEDDED_DEFAULTS[0];
        let d = ImageDefinition::parse(text, "default", Path::new("/"), &|_| None).unwrap();
        let p = d.packages.unwrap();
        assert!(p.world.iter().any(|w| w == "linux-virt"));
        assert!(p.world.iter().any(|w| w == "busybox"));
        assert_eq!(d.kubernetes.version.as_deref(), Some("v1.31.4+k3s1"));
        assert!(d.kubernetes.source.is_none() && d.overlays.is_empty());
    }

    /// The x86_64 default's initramfs list is the one booted from SATA, NVMe
    /// and USB disks by tests/tests/metal_disk_boot.rs (its image definition,
    /// on Debian's generic kernel), and extends the board's own list.
    #[test]
    fn x86_64_default_initramfs_is_the_tested_metal_list() {
        let parse = |text: &str, name: &str| {
            ImageDefinition::parse(text, name, Path::new("/"), &|n| {
                (n == "BASALT_SOURCE_DIR").then(|| "/src".to_string())
            })
            .unwrap()
        };
        let (_, text) = EMBEDDED_DEFAULTS[0];
        let shipped = parse(text, "default").initramfs_modules.unwrap();
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/tests/images/metal.toml");
        let tested = std::fs::read_to_string(&path).unwrap();
        let tested = ImageDefinition::parse(&tested, "metal.toml", Path::new("/"), &|_| {
            Some("/x".to_string())
        })
        .unwrap();
        assert_eq!(Some(&shipped), tested.initramfs_modules.as_ref());
        let board = crate::board::Board::embedded("x86_64").unwrap();
        assert!(shipped.starts_with(&board.initramfs.modules), "{shipped:?}");
        for m in ["ahci", "nvme", "sd_mod", "xhci-pci", "usb-storage", "uas"] {
            assert!(shipped.iter().any(|s| s == m), "{m}");
        }
    }

    #[test]
    fn packages_section_errors_name_the_key() {
        let e = err(&format!("{MIN}[packages]\nworld = [\"busybox\"]\n"));
        assert!(e.contains("packages.repositories"), "{e}");
        let e = err(&format!(
            "{MIN}[packages]\nrepositories = [\"ftp://x/main\"]\nworld = [\"busybox\"]\n"
        ));
        assert!(e.contains("packages.repositories[0]"), "{e}");
        let e = err(&format!(
            "{MIN}[packages]\nrepositories = [\"r\"]\nworld = [\"busybox\"]\nallow_setuid = [\"../x\"]\n"
        ));
        assert!(e.contains("packages.allow_setuid[0]"), "{e}");
        let d = ImageDefinition::parse(
            &format!(
                "{MIN}[packages]\nrepositories = [\"@edge https://m/alpine/edge/main/\", {{ url = \"repo\", trust_unsigned = true }}]\nworld = [\"busybox\", \"x@edge\"]\n"
            ),
            "p.toml",
            Path::new("/base"),
            &env(&[]),
        )
        .unwrap();
        let p = d.packages.unwrap();
        let r0 = &p.repositories[0].repository;
        assert_eq!(r0.tag.as_deref(), Some("edge"));
        assert_eq!(
            r0.source,
            basalt_rootfs::apk::repo::Source::Url("https://m/alpine/edge/main".into())
        );
        let r1 = &p.repositories[1].repository;
        assert_eq!(
            r1.source,
            basalt_rootfs::apk::repo::Source::Dir("/base/repo".into())
        );
        assert_eq!(r1.trust, basalt_rootfs::apk::Trust::TrustedUnsigned);
        assert_eq!(p.repositories[1].spec, "repo");
    }

    #[test]
    fn embedded_default_parses_with_fallbacks() {
        let (_, text) = EMBEDDED_DEFAULTS[1];
        let d = ImageDefinition::parse(text, "default", Path::new("/"), &|n| {
            (n == "BASALT_SOURCE_DIR").then(|| "/src".to_string())
        })
        .unwrap();
        assert!(
            d.overlays[0]
                .spec
                .source
                .starts_with("/src/.cache/assets/amd64")
        );
    }

    #[test]
    fn every_embedded_default_names_an_embedded_board() {
        for (board, text) in EMBEDDED_DEFAULTS {
            let d = ImageDefinition::parse(text, board, Path::new("/"), &|n| {
                (n == "BASALT_SOURCE_DIR").then(|| "/src".to_string())
            })
            .unwrap();
            // `x86_64-test-assets` is a second default for board x86_64.
            let b = board.trim_end_matches("-test-assets");
            assert_eq!(d.board, b);
            crate::board::Board::embedded(b).unwrap();
        }
        let rpi3 = EMBEDDED_DEFAULTS
            .iter()
            .find(|(b, _)| *b == "rpi3-test-assets")
            .unwrap();
        let d = ImageDefinition::parse(rpi3.1, "rpi3", Path::new("/"), &|n| {
            (n == "BASALT_SOURCE_DIR").then(|| "/src".to_string())
        })
        .unwrap();
        assert_eq!(
            d.rpi.firmware_dir.as_deref(),
            Some("usr/lib/raspi-firmware")
        );
        assert_eq!(d.rpi.overlays.as_deref(), Some(&[][..]));
    }

    /// The Alpine defaults (`--board <name>`): Alpine packages, the board's own
    /// kernel and firmware packages in the world, real k3s with a release URL
    /// for the board's architecture; no test assets, no stand-in.
    #[test]
    fn alpine_defaults_install_the_boards_packages_and_real_k3s() {
        for (name, text) in EMBEDDED_DEFAULTS {
            if name.ends_with("-test-assets") {
                continue;
            }
            let d = ImageDefinition::parse(text, name, Path::new("/"), &|_| None).unwrap();
            let board = crate::board::Board::embedded(&d.board).unwrap();
            let p = d
                .packages
                .as_ref()
                .expect("an Alpine default has [packages]");
            assert!(
                p.repositories
                    .iter()
                    .all(|r| r.spec.starts_with("https://dl-cdn.alpinelinux.org/alpine/")),
                "{name}"
            );
            if let Some(bp) = &board.packages {
                for want in [&bp.kernel, &bp.firmware] {
                    assert!(p.world.contains(want), "{name}: world lacks {want}");
                }
            }
            assert!(
                d.overlays.is_empty(),
                "{name}: overlays in an Alpine default"
            );
            assert!(
                d.kubernetes.source.is_none(),
                "{name}: a local Kubernetes binary"
            );
            let v = d.kubernetes.version.as_deref().expect("a k3s version");
            let url =
                crate::kubernetes::release_url(d.kubernetes.distribution, v, &board.alpine_arch)
                    .unwrap();
            assert!(
                url.starts_with("https://github.com/k3s-io/k3s/releases/download/"),
                "{url}"
            );
        }
    }

    /// The Alpine defaults' package lists resolve to closed sets against real,
    /// Alpine-signed indexes (the fixtures: v3.16 x86_64, v3.17 aarch64; the
    /// defaults name v3.20, which cannot be reached from here): the names exist,
    /// with every dependency, for x86_64 and for the 64-bit Pi boards.
    #[test]
    fn alpine_defaults_resolve_against_real_indexes() {
        use basalt_rootfs::apk::{Index, KeyRing, RepoRef, Trust, resolve};
        let fixture = |name: &str| {
            let p = crate::imagedef::source_dir()
                .join("rootfs/tests/fixtures/alpine")
                .join(name);
            let bytes = std::fs::read(&p).unwrap();
            Index::from_tar_gz(&bytes, &KeyRing::alpine().unwrap(), Trust::Signed, name).unwrap()
        };
        // systemd-boot entered Alpine's main repository after v3.16 (v3.19):
        // the x86_64 check leaves it out; everything else must be there.
        for (name, index, newer) in [
            (
                "x86_64",
                "v3.16-main-x86_64-APKINDEX.tar.gz",
                &["systemd-boot"][..],
            ),
            ("rpi4", "v3.17-main-aarch64-APKINDEX.tar.gz", &[]),
            ("rpi3", "v3.17-main-aarch64-APKINDEX.tar.gz", &[]),
            ("rpi5", "v3.17-main-aarch64-APKINDEX.tar.gz", &[]),
        ] {
            let (_, text) = EMBEDDED_DEFAULTS.iter().find(|(b, _)| *b == name).unwrap();
            let mut d = ImageDefinition::parse(text, name, Path::new("/"), &|_| None).unwrap();
            if let Some(p) = d.packages.as_mut() {
                p.world.retain(|w| !newer.contains(&w.as_str()));
            }
            let world = crate::packages::world(d.packages.as_ref().unwrap()).unwrap();
            let i = fixture(index);
            let r = resolve(
                &[RepoRef {
                    tag: None,
                    index: &i,
                }],
                &world,
            )
            .unwrap_or_else(|e| panic!("{name} against {index}: {e}"));
            for w in &d.packages.as_ref().unwrap().world {
                assert!(r.get(w).is_some(), "{name}: {w} not installed");
            }
        }
    }

    #[test]
    fn rpi_table_and_image_size() {
        let text = "board = \"rpi4\"\nos_version = \"1\"\nimage_size_mib = 2048\n[kubernetes]\ndistribution = \"k3s\"\n[rpi]\nconfig = [\"dtoverlay=x\"]\n";
        let d = ImageDefinition::parse(text, "t", Path::new("/"), &|_| None).unwrap();
        assert_eq!(d.image_size_mib, Some(2048));
        assert_eq!(d.rpi.config, ["dtoverlay=x"]);
        assert!(d.rpi.dtbs.is_none());
        let bad = text.replace("[rpi]", "[rpi]\ndtb = []");
        let e = ImageDefinition::parse(&bad, "t", Path::new("/"), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("dtb"), "{e}");
        let zero = text.replace("2048", "0");
        let e = ImageDefinition::parse(&zero, "t", Path::new("/"), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("image_size_mib"), "{e}");
    }
}
