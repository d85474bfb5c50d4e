//! Applying the node config on the device, at every boot (stage 2's
//! `node-config` phase; docs/node-config.md "What the device does").
//!
//! PID 1 must stay small (its RSS is reported in the ready line), and the
//! parser costs about a megabyte, so the work runs in a child: PID 1 forks
//! `basalt-node-config` ([`pid1::start`]), which parses the
//! image's default and the FAT partition's config, applies what it can
//! directly (hostname, users, files, sysctls, modules, addresses, clock,
//! Kubernetes config) and leaves what PID 1 must act on in small files under
//! `/run/basalt/` ([`RESULT_FILE`], [`SERVICES_DIR`], [`KUBERNETES_FILE`],
//! [`UPDATE_FILE`]), then exits. The `logs` settings are PID 1's own (its
//! ring and `/var/log/basalt.log`): they travel in [`RESULT_FILE`]'s `[logs]`.
//!
//! Everything here works on a [`Root`] (the real `/` on the device, a temp
//! directory in tests) and reaches the kernel only through [`System`].
//! It never panics on any input and never stops at the first failed step:
//! each step's error is reported and the next step runs.

pub mod clock;
pub mod files;
pub mod kmod;
pub mod kubernetes;
pub mod network;
pub mod pid1;
pub mod services;
pub mod ssh;
pub mod system;
pub mod update;
pub mod users;

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::nodeconfig::{self, Diagnostic, NodeConfig};
pub use system::{KernelSystem, System};

/// What the child leaves for PID 1: hostname, status, timezone, `[logs]`.
pub const RESULT_FILE: &str = "/run/basalt/node-config.toml";
/// Generated service files; PID 1 loads them after `/etc/basalt/services`.
pub const SERVICES_DIR: &str = "/run/basalt/services";
/// The `kubernetes` service as the node config wants it (service file format).
pub const KUBERNETES_FILE: &str = "/run/basalt/kubernetes.toml";
/// The `[update]` section, for the update agent.
pub const UPDATE_FILE: &str = "/run/basalt/update.toml";
/// The image definition's default node config.
pub const IMAGE_CONFIG: &str = "/etc/basalt/node.toml";
/// Copies of the last config from the FAT partition that applied cleanly.
pub const LAST_GOOD_DIR: &str = "/var/lib/basalt/node-config";
/// The apply child's name (its `comm`), and argv[0] under which the init
/// binary runs it by hand.
pub const CHILD_NAME: &str = "basalt-node-config";

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {target}: {errno}")]
    Kernel {
        what: &'static str,
        target: String,
        errno: crate::sys::Errno,
    },
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn io_err(
    what: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> ApplyError + use<> {
    let path = path.to_path_buf();
    move |source| ApplyError::Io { what, path, source }
}

/// The root filesystem the config is applied to.
#[derive(Debug, Clone)]
pub struct Root(pub PathBuf);

impl Root {
    /// `abs` (an absolute path on the device) inside this root.
    pub fn at(&self, abs: &str) -> PathBuf {
        self.0.join(abs.trim_start_matches('/'))
    }
}

/// Where the node config came from this boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Only the image's default (nothing on the FAT partition).
    Image,
    /// The FAT partition's config, applied cleanly.
    Applied,
    /// The FAT partition's config failed; the last good one was used.
    LastGood,
    /// The FAT partition's config failed and there was no last good one.
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Image => "image",
            Status::Applied => "applied",
            Status::LastGood => "last-good",
            Status::Failed => "failed",
        }
    }
}

/// What applying produced, besides its direct effects.
#[derive(Debug, Default)]
pub struct Outcome {
    pub hostname: Option<String>,
    /// Generated services: (name, service file text).
    pub services: Vec<(String, String)>,
    /// The `kubernetes` service file text.
    pub kubernetes: Option<String>,
    /// `TZ` for services when `/etc/localtime` could not be made.
    pub tz: Option<String>,
    /// `console.emergency_shell`: PID 1 offers a shell on the console when the
    /// boot fails.
    pub emergency_shell: bool,
    /// The node config's `logs`, for PID 1 to put in effect.
    pub logs: nodeconfig::Logs,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

impl Outcome {
    pub fn error(&mut self, what: &str, e: impl std::fmt::Display) {
        crate::console::error(what, &e);
        self.errors.push(format!("{what} {e}"));
    }

    pub fn warn(&mut self, msg: String) {
        crate::say!("warning {msg}");
        self.warnings.push(msg);
    }
}

type Step = fn(&Root, &NodeConfig, &mut dyn System, &mut Outcome) -> Result<(), ApplyError>;

/// The apply steps, in order. The clock comes first: nothing after it may
/// check a TLS certificate against a clock from 1970. Modules come before
/// the network (interface drivers), users before files (owners).
pub const STEPS: &[(&str, Step)] = &[
    ("clock", clock::restore_step),
    ("hostname", hostname_step),
    ("users", users::step),
    ("files", files::step),
    ("sysctl", files::sysctl_step),
    ("modules", kmod::step),
    ("network", network::step),
    ("time", clock::time_step),
    ("ssh", ssh::step),
    ("kubernetes", kubernetes::step),
    ("update", update::step),
    ("console", console_step),
    ("logs", logs_step),
];

fn console_step(
    _root: &Root,
    cfg: &NodeConfig,
    _sys: &mut dyn System,
    out: &mut Outcome,
) -> Result<(), ApplyError> {
    out.emergency_shell = cfg.console.emergency_shell;
    Ok(())
}

/// PID 1 resizes its ring and opens `/var/log/basalt.log` itself, from
/// the results ([`Results::logs`]).
fn logs_step(
    _root: &Root,
    cfg: &NodeConfig,
    _sys: &mut dyn System,
    out: &mut Outcome,
) -> Result<(), ApplyError> {
    out.logs = cfg.logs;
    Ok(())
}

/// Apply `cfg` to `root`: every step, errors reported and collected.
pub fn apply(root: &Root, cfg: &NodeConfig, sys: &mut dyn System) -> Outcome {
    let mut out = Outcome::default();
    for (name, step) in STEPS {
        let r = crate::console::guarded(name, || step(root, cfg, sys, &mut out));
        match r {
            Some(Ok(())) => {}
            Some(Err(e)) => out.error(name, e),
            None => out.errors.push(format!("{name} panicked")),
        }
    }
    out
}

fn hostname_step(
    _root: &Root,
    cfg: &NodeConfig,
    sys: &mut dyn System,
    out: &mut Outcome,
) -> Result<(), ApplyError> {
    // Without a configured name, PID 1 picks `basalt-<machine id>`.
    let Some(name) = &cfg.hostname else {
        return Ok(());
    };
    sys.set_hostname(name).map_err(|errno| ApplyError::Kernel {
        what: "setting hostname",
        target: name.clone(),
        errno,
    })?;
    out.hostname = Some(name.clone());
    Ok(())
}

/// A config on the FAT partition (or in the last-good directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `<dir>/node.toml`
    Toml(PathBuf),
    /// cloud-init files in `<dir>`.
    CloudInit(PathBuf),
}

impl Source {
    /// The config in `dir`, if any (both syntaxes at once is the parser's error).
    pub fn find(dir: &Path) -> Option<Source> {
        if dir.join(nodeconfig_file()).exists() {
            return Some(Source::Toml(dir.join(nodeconfig_file())));
        }
        nodeconfig::CLOUD_INIT_FILES
            .iter()
            .any(|n| dir.join(n).exists())
            .then(|| Source::CloudInit(dir.to_path_buf()))
    }

    pub fn load(&self) -> Result<NodeConfig, Vec<Diagnostic>> {
        match self {
            // The directory form also refuses node.toml next to cloud-init files.
            Source::Toml(p) => nodeconfig::load_dir_or_file(p.parent().unwrap_or(p)),
            Source::CloudInit(d) => nodeconfig::load_dir_or_file(d),
        }
    }

    /// The files this source is made of (those that exist).
    pub fn files(&self) -> Vec<PathBuf> {
        match self {
            Source::Toml(p) => vec![p.clone()],
            Source::CloudInit(d) => nodeconfig::CLOUD_INIT_FILES
                .iter()
                .map(|n| d.join(n))
                .filter(|p| p.exists())
                .collect(),
        }
    }
}

fn nodeconfig_file() -> &'static str {
    crate::slot::NODE_CONFIG_FILE
}

/// Copy `src`'s files into `dir` (replacing what was there), each
/// new-then-rename: a power cut leaves a complete old or new copy of each file.
pub fn save_last_good(src: &Source, dir: &Path) -> Result<(), ApplyError> {
    std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    let keep: Vec<_> = src.files();
    let names: Vec<_> = keep.iter().filter_map(|p| p.file_name()).collect();
    for f in &keep {
        let Some(name) = f.file_name() else { continue };
        let data = std::fs::read(f).map_err(io_err("reading", f))?;
        write_atomic(&dir.join(name), &data, 0o600)?;
    }
    // Drop files of the other syntax so the directory holds one config.
    for n in std::iter::once(nodeconfig_file()).chain(nodeconfig::CLOUD_INIT_FILES) {
        if !names.iter().any(|x| *x == n) {
            let _ = std::fs::remove_file(dir.join(n));
        }
    }
    Ok(())
}

/// Write `data` to `path` so that a power cut leaves the old or the new
/// content: temp file, fsync, rename, fsync the directory. A file that
/// already has this content and mode is left alone: the node config is
/// applied at every boot, and an fsync on the data partition costs boot
/// time and SD card wear for nothing.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), ApplyError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.is_file()
        && meta.mode() & 0o7777 == mode
        && meta.len() == data.len() as u64
        && std::fs::read(path).is_ok_and(|old| old == data)
    {
        return Ok(());
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".basalt-tmp");
    let tmp = dir.join(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("creating", &tmp))?;
    f.write_all(data).map_err(io_err("writing", &tmp))?;
    // The umask may have narrowed the mode.
    set_mode(&tmp, mode)?;
    f.sync_all().map_err(io_err("syncing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("renaming into place", path))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

pub(crate) fn set_mode(path: &Path, mode: u32) -> Result<(), ApplyError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("setting mode of", path))
}

/// The whole child run against `root`: load, choose, apply, save, publish.
/// Returns the status; every problem has been printed.
pub fn run(root: &Root, sys: &mut dyn System) -> Status {
    let image = load_image_default(root);
    let boot_dir = root.at(crate::slot::BOOT_MOUNT);
    let last_good_dir = root.at(LAST_GOOD_DIR);
    let last_good = || {
        let src = Source::find(&last_good_dir)?;
        match src.load() {
            Ok(c) => Some(c),
            Err(diags) => {
                for d in diags {
                    crate::console::error("config", format_args!("last good config {d}"));
                }
                None
            }
        }
    };

    let (status, outcome) = match Source::find(&boot_dir) {
        None => (Status::Image, apply(root, &image, sys)),
        Some(src) => match src.load() {
            Ok(cfg) => {
                let cfg = kubernetes::secure_token(root, &src, cfg, sys);
                let cfg = image.clone().overlay(cfg);
                let out = apply(root, &cfg, sys);
                if out.errors.is_empty() {
                    if let Err(e) = save_last_good(&src, &last_good_dir) {
                        crate::console::error("config", format_args!("saving last good: {e}"));
                    }
                    (Status::Applied, out)
                } else if let Some(good) = last_good()
                    .map(|g| image.clone().overlay(g))
                    .filter(|g| *g != cfg)
                {
                    crate::console::error(
                        "config",
                        format_args!(
                            "{} did not apply cleanly ({} errors); using the last good config from {LAST_GOOD_DIR}",
                            boot_dir.display(),
                            out.errors.len()
                        ),
                    );
                    clear_outputs(root);
                    (
                        Status::LastGood,
                        apply(root, &image.clone().overlay(good), sys),
                    )
                } else {
                    (Status::Failed, out)
                }
            }
            Err(diags) => {
                for d in &diags {
                    crate::console::error("config", d);
                }
                match last_good() {
                    Some(good) => {
                        crate::console::error(
                            "config",
                            format_args!("using the last good config from {LAST_GOOD_DIR} instead"),
                        );
                        (Status::LastGood, apply(root, &image.overlay(good), sys))
                    }
                    None => {
                        crate::console::error(
                            "config",
                            "no last good config: using the image's default",
                        );
                        (Status::Failed, apply(root, &image, sys))
                    }
                }
            }
        },
    };
    if let Err(e) = publish(root, status, &outcome) {
        crate::console::error("config", e);
    }
    status
}

fn load_image_default(root: &Root) -> NodeConfig {
    let path = root.at(IMAGE_CONFIG);
    if !path.exists() {
        return NodeConfig::default();
    }
    match nodeconfig::load_dir_or_file(&path) {
        Ok(c) => c,
        Err(diags) => {
            for d in diags {
                crate::console::error("config", d);
            }
            NodeConfig::default()
        }
    }
}

/// Remove what an earlier apply of this boot generated.
fn clear_outputs(root: &Root) {
    let _ = std::fs::remove_dir_all(root.at(SERVICES_DIR));
    let _ = std::fs::remove_file(root.at(KUBERNETES_FILE));
    let _ = std::fs::remove_file(root.at(UPDATE_FILE));
}

/// The child's results for PID 1 (docs/boot-protocol.md "Stage 2").
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Results {
    pub status: String,
    pub hostname: Option<String>,
    pub tz: Option<String>,
    #[serde(default)]
    pub emergency_shell: bool,
    #[serde(default)]
    pub errors: u32,
    /// The node config's `logs` keys that are set (docs/logs.md).
    #[serde(default)]
    pub logs: Option<nodeconfig::Logs>,
}

fn publish(root: &Root, status: Status, out: &Outcome) -> Result<(), ApplyError> {
    let dir = root.at(SERVICES_DIR);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    for (name, text) in &out.services {
        let p = dir.join(format!("{name}.toml"));
        std::fs::write(&p, text).map_err(io_err("writing", &p))?;
    }
    let k = root.at(KUBERNETES_FILE);
    match &out.kubernetes {
        Some(text) => std::fs::write(&k, text).map_err(io_err("writing", &k))?,
        None => {
            let _ = std::fs::remove_file(&k);
        }
    }
    let mut w = crate::tomlfast::Writer::default();
    w.str("status", status.as_str());
    if let Some(h) = &out.hostname {
        w.str("hostname", h);
    }
    if let Some(tz) = &out.tz {
        w.str("tz", tz);
    }
    if out.emergency_shell {
        w.bool("emergency_shell", true);
    }
    w.int(
        "errors",
        i64::try_from(out.errors.len()).unwrap_or(i64::MAX),
    );
    if out.logs != nodeconfig::Logs::default() {
        let l = out.logs;
        w.table("logs");
        if let Some(k) = l.ring_kib {
            w.int("ring_kib", i64::from(k));
        }
        if let Some(c) = l.console {
            w.str("console", c.as_str());
        }
        if let Some(p) = l.persistent {
            w.bool("persistent", p);
        }
        if let Some(k) = l.persistent_max_kib {
            w.int("persistent_max_kib", i64::from(k));
        }
    }
    let p = root.at(RESULT_FILE);
    std::fs::write(&p, w.finish()).map_err(io_err("writing", &p))?;
    Ok(())
}

/// Entry of the `basalt-node-config` child: apply to `/`, exit 0 when the
/// FAT partition's config (or the image default) applied cleanly.
pub fn child_main() -> i32 {
    let mut sys = KernelSystem;
    match run(&Root(PathBuf::from("/")), &mut sys) {
        Status::Image | Status::Applied => 0,
        Status::LastGood | Status::Failed => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::system::fake::Recorder;
    use super::*;

    fn device() -> (tempfile::TempDir, Root) {
        let t = tempfile::tempdir().unwrap();
        let root = Root(t.path().to_path_buf());
        for d in [
            "/etc/basalt",
            "/boot",
            "/run/basalt",
            "/var",
            "/proc/sys/net/ipv4",
        ] {
            std::fs::create_dir_all(root.at(d)).unwrap();
        }
        std::fs::write(
            root.at(crate::slot::IMAGE_FACTS_PATH),
            "os_version = \"0.1.0\"\nboard = \"x86_64\"\n[kubernetes]\ndistribution = \"k3s\"\nbinary = \"/usr/bin/k3s\"\n",
        )
        .unwrap();
        std::fs::write(root.at(IMAGE_CONFIG), "hostname = \"image-default\"\n").unwrap();
        std::fs::write(root.at("/etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        std::fs::write(root.at("/etc/group"), "root:x:0:\n").unwrap();
        std::fs::write(root.at("/proc/sys/net/ipv4/ip_forward"), "0\n").unwrap();
        (t, root)
    }

    /// The child's results, as PID 1 reads them: through its small TOML
    /// reader (no fallback), the same as the `toml` crate reads them.
    fn results(root: &Root) -> Results {
        let text = std::fs::read_to_string(root.at(RESULT_FILE)).unwrap();
        assert!(crate::tomlfast::parse(&text).is_some(), "{text}");
        let r: Results = crate::tomlfast::from_str(&text).unwrap();
        assert_eq!(r, toml::from_str::<Results>(&text).unwrap());
        r
    }

    const GOOD: &str = r#"hostname = "edge-1"
[[users]]
name = "ops"
ssh_authorized_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ops@laptop"]
[kernel.sysctl]
"net.ipv4.ip_forward" = 1
[[files]]
path = "/etc/motd"
content = "hello\n"
[kubernetes]
distribution = "k3s"
role = "server"
labels = { "zone" = "north" }
[update]
channel = "stable"
"#;

    #[test]
    fn write_atomic_leaves_an_identical_file_alone() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("var/lib/basalt/clock");
        write_atomic(&p, b"1\n", 0o644).unwrap();
        let ino = std::fs::metadata(&p).unwrap().ino();
        // Same content and mode: not rewritten (same inode, no rename).
        write_atomic(&p, b"1\n", 0o644).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().ino(), ino);
        // Another mode, or other content: replaced.
        write_atomic(&p, b"1\n", 0o600).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_ne!(m.ino(), ino);
        assert_eq!(m.mode() & 0o7777, 0o600);
        write_atomic(&p, b"2\n", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"2\n");
    }

    #[test]
    fn applies_then_keeps_the_last_good_config_when_the_next_is_broken() {
        let (_t, root) = device();
        // No config on the FAT partition: the image's default.
        assert_eq!(run(&root, &mut Recorder::default()), Status::Image);
        let r = results(&root);
        assert_eq!(
            (r.status.as_str(), r.hostname.as_deref()),
            ("image", Some("image-default"))
        );
        assert!(!root.at(KUBERNETES_FILE).exists());
        assert!(root.at(UPDATE_FILE).exists());
        assert_eq!(r.logs, None, "no [logs] anywhere: PID 1 keeps the image's");

        // A good config: applied and kept as the last good one.
        std::fs::write(root.at("/boot/node.toml"), GOOD).unwrap();
        let mut sys = Recorder::default();
        assert_eq!(run(&root, &mut sys), Status::Applied);
        assert!(sys.calls.contains(&"hostname edge-1".to_string()));
        let r = results(&root);
        assert_eq!(
            (r.status.as_str(), r.hostname.as_deref(), r.errors),
            ("applied", Some("edge-1"), 0)
        );
        assert_eq!(
            std::fs::read_to_string(root.at("/etc/motd")).unwrap(),
            "hello\n"
        );
        assert_eq!(
            std::fs::read_to_string(root.at("/proc/sys/net/ipv4/ip_forward")).unwrap(),
            "1\n"
        );
        assert_eq!(
            std::fs::read_to_string(root.at(LAST_GOOD_DIR).join("node.toml")).unwrap(),
            GOOD
        );
        let k = std::fs::read_to_string(root.at(KUBERNETES_FILE)).unwrap();
        assert!(crate::tomlfast::parse(&k).is_some(), "{k}");
        let def = crate::service::ServiceDef::parse("kubernetes", &k, Path::new("k")).unwrap();
        assert_eq!(def.exec[1], "server");
        assert!(
            std::fs::read_to_string(root.at(kubernetes::K3S_CONFIG))
                .unwrap()
                .contains("\"zone=north\"")
        );
        assert!(
            std::fs::read_to_string(root.at(UPDATE_FILE))
                .unwrap()
                .contains("channel = \"stable\"")
        );

        // The next boot, a broken config (fresh /etc, as after a reboot): the last good one.
        std::fs::remove_file(root.at("/etc/motd")).unwrap();
        std::fs::write(
            root.at("/boot/node.toml"),
            "hostname = \"edge-2\"\nhostnme = \"x\"\n",
        )
        .unwrap();
        let mut sys = Recorder::default();
        assert_eq!(run(&root, &mut sys), Status::LastGood);
        let r = results(&root);
        assert_eq!(
            (r.status.as_str(), r.hostname.as_deref()),
            ("last-good", Some("edge-1"))
        );
        assert_eq!(
            std::fs::read_to_string(root.at("/etc/motd")).unwrap(),
            "hello\n"
        );
        assert_eq!(
            std::fs::read_to_string(root.at(LAST_GOOD_DIR).join("node.toml")).unwrap(),
            GOOD,
            "a broken config never replaces the last good one"
        );

        // A config that parses but fails to apply (a module that does not
        // exist): the last good one is applied instead.
        std::fs::write(
            root.at("/boot/node.toml"),
            "hostname = \"edge-3\"\n[kernel]\nmodules = [\"no_such_module\"]\n",
        )
        .unwrap();
        assert_eq!(run(&root, &mut Recorder::default()), Status::LastGood);
        assert_eq!(results(&root).hostname.as_deref(), Some("edge-1"));

        // cloud-init files replace node.toml; the last good copy follows.
        std::fs::remove_file(root.at("/boot/node.toml")).unwrap();
        std::fs::write(
            root.at("/boot/meta-data"),
            "instance-id: i-1\nlocal-hostname: edge-ci\n",
        )
        .unwrap();
        assert_eq!(run(&root, &mut Recorder::default()), Status::Applied);
        assert_eq!(results(&root).hostname.as_deref(), Some("edge-ci"));
        assert!(root.at(LAST_GOOD_DIR).join("meta-data").exists());
        assert!(!root.at(LAST_GOOD_DIR).join("node.toml").exists());
    }

    #[test]
    fn logs_reach_pid1_through_the_results_file() {
        let (_t, root) = device();
        std::fs::write(
            root.at(IMAGE_CONFIG),
            "[logs]\nring_kib = 64\nconsole = \"init\"\n",
        )
        .unwrap();
        std::fs::write(
            root.at("/boot/node.toml"),
            "[logs]\npersistent = true\npersistent_max_kib = 256\nconsole = \"none\"\n",
        )
        .unwrap();
        assert_eq!(run(&root, &mut Recorder::default()), Status::Applied);
        let logs = results(&root).logs.expect("[logs] in the results");
        assert_eq!(
            logs,
            nodeconfig::Logs {
                ring_kib: Some(64),
                console: Some(crate::logs::ConsoleLevel::None),
                persistent: Some(true),
                persistent_max_kib: Some(256),
            },
            "the card's keys over the image definition's default, key by key"
        );
        // What PID 1 then puts in effect over /etc/basalt/image.toml's [logs].
        let (image, _) = crate::logs::Settings::from_image_toml("[logs]\nring_kib = 16\n");
        let s = image.overlay(&logs);
        assert_eq!(
            (s.ring_kib, s.console, s.persistent, s.persistent_max_kib),
            (64, crate::logs::ConsoleLevel::None, true, 256)
        );
    }

    #[test]
    fn broken_config_without_last_good_uses_the_image_default() {
        let (_t, root) = device();
        std::fs::write(root.at("/boot/node.toml"), "[[users]]\nname = 5\n").unwrap();
        assert_eq!(run(&root, &mut Recorder::default()), Status::Failed);
        assert_eq!(results(&root).hostname.as_deref(), Some("image-default"));
    }

    /// The QEMU test's two configs (tests/tests/nodeconfig/) are one node.
    #[test]
    fn e2e_fixtures_are_the_same_node() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/tests/nodeconfig");
        let a = nodeconfig::load_dir_or_file(&dir.join("toml/node.toml")).unwrap();
        let b = nodeconfig::load_dir_or_file(&dir.join("cloud-init")).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.files.len(), 2);
    }
}
