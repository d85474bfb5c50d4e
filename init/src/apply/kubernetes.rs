//! `[kubernetes]`: the distribution's config file and the `kubernetes`
//! service's command line and readiness, per role; and the join token's
//! move off the FAT partition.
//!
//! - k3s: `/etc/rancher/k3s/config.yaml` (`server`, `token-file`,
//!   `node-label`, `node-taint`, `disable`, then the `config` passthrough),
//!   `k3s server|agent --data-dir /var/lib/rancher/k3s --config <that file>`.
//! - k0s: `/etc/k0s/k0s.yaml` (the passthrough), `k0s controller
//!   [--enable-worker] | worker` with `--token-file`, `--labels`, `--taints`,
//!   `--disable-components`.
//! - readiness: servers and controllers answer `<binary> kubectl get
//!   --raw=/readyz`; agents and workers are ready when the kubelet's health
//!   port answers (`http://127.0.0.1:10248/healthz`).
//!
//! The service goes to `/run/basalt/kubernetes.toml`; without a
//! `[kubernetes]` section none is written and PID 1 builds the image's
//! default (docs/boot-protocol.md).
//!
//! Secrets: a token written in the config on the FAT partition (or in a
//! `token_file` there) is moved to `/var/lib/basalt/k8s-token` (0600) the
//! first time it is seen; the FAT copy is rewritten (new-then-rename) with
//! `token_file` pointing there and a comment saying so.

use std::path::Path;

use super::services::{Generated, Ready};
use super::{ApplyError, Outcome, Root, Source, System, io_err, write_atomic};
use crate::image::ImageFacts;
use crate::nodeconfig::{self, Distribution, Kubernetes, NodeConfig, Role, Token};

pub const TOKEN_FILE: &str = "/var/lib/basalt/k8s-token";
pub const K3S_CONFIG: &str = "/etc/rancher/k3s/config.yaml";
pub const K3S_DATA: &str = "/var/lib/rancher/k3s";
pub const K0S_CONFIG: &str = "/etc/k0s/k0s.yaml";
pub const K0S_DATA: &str = "/var/lib/k0s";
/// What is left in a token file on the FAT partition once the token moved.
pub const MOVED_NOTE: &str = "# basalt: this join token was moved to /var/lib/basalt/k8s-token (mode 0600) at first boot; write a new token here to replace it\n";
const MOVED_COMMENT: &str =
    "# the join token was moved to /var/lib/basalt/k8s-token by basalt at first boot";

fn yaml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The k3s config file Basalt generates.
pub fn k3s_config(k: &Kubernetes, token_file: Option<&str>) -> String {
    let mut s = String::from(
        "# Generated at boot by basalt-node-config from the node config's [kubernetes]\n",
    );
    if let Some(u) = &k.server_url {
        s.push_str(&format!("server: {}\n", yaml_str(u)));
    }
    if let Some(t) = token_file {
        s.push_str(&format!("token-file: {}\n", yaml_str(t)));
    }
    let list = |s: &mut String, key: &str, items: &mut dyn Iterator<Item = String>| {
        let items: Vec<String> = items.collect();
        if !items.is_empty() {
            s.push_str(&format!("{key}:\n"));
            for i in items {
                s.push_str(&format!("  - {}\n", yaml_str(&i)));
            }
        }
    };
    list(
        &mut s,
        "node-label",
        &mut k.labels.iter().map(|(a, b)| format!("{a}={b}")),
    );
    list(&mut s, "node-taint", &mut k.taints.iter().cloned());
    list(&mut s, "disable", &mut k.disable.iter().cloned());
    if let Some(c) = &k.config {
        s.push_str("# kubernetes.config from the node config, passed through:\n");
        s.push_str(c);
        if !c.ends_with('\n') {
            s.push('\n');
        }
    }
    s
}

/// The `kubernetes` service for `k` with the image's `binary`.
pub fn launch(binary: &str, k: &Kubernetes, token_file: Option<&str>) -> Generated {
    let mut exec: Vec<String> = vec![binary.to_string()];
    let push = |exec: &mut Vec<String>, a: &[&str]| exec.extend(a.iter().map(|s| s.to_string()));
    match k.distribution {
        Distribution::K3s => {
            let role = if k.role == Role::Agent {
                "agent"
            } else {
                "server"
            };
            push(
                &mut exec,
                &[role, "--data-dir", K3S_DATA, "--config", K3S_CONFIG],
            );
        }
        Distribution::K0s => {
            match k.role {
                Role::Worker => push(&mut exec, &["worker"]),
                Role::ControllerWorker => push(&mut exec, &["controller", "--enable-worker"]),
                _ => push(&mut exec, &["controller"]),
            }
            push(&mut exec, &["--data-dir", K0S_DATA]);
            if k.role != Role::Worker {
                if k.config.is_some() {
                    push(&mut exec, &["--config", K0S_CONFIG]);
                }
                if !k.disable.is_empty() {
                    push(&mut exec, &["--disable-components", &k.disable.join(",")]);
                }
            }
            if let Some(t) = token_file {
                push(&mut exec, &["--token-file", t]);
            }
            if k.role != Role::Controller {
                if !k.labels.is_empty() {
                    let l: Vec<String> = k.labels.iter().map(|(a, b)| format!("{a}={b}")).collect();
                    push(&mut exec, &["--labels", &l.join(",")]);
                }
                if !k.taints.is_empty() {
                    push(&mut exec, &["--taints", &k.taints.join(",")]);
                }
            }
        }
    }
    exec.extend(k.extra_args.iter().cloned());
    let probe = if k.role.joins() {
        Ready::Http("http://127.0.0.1:10248/healthz".into())
    } else {
        Ready::Exec(
            [binary, "kubectl", "get", "--raw=/readyz"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        )
    };
    Generated {
        exec,
        stop_timeout_secs: Some(30),
        // Generous: under TCG emulation k3s takes minutes to come up.
        ready: Some((probe, 1000, 900)),
        backoff: Some((1000, 60_000, 300)),
        ..Generated::default()
    }
}

pub fn step(
    root: &Root,
    cfg: &NodeConfig,
    _sys: &mut dyn System,
    _out: &mut Outcome,
) -> Result<(), ApplyError> {
    let Some(k) = &cfg.kubernetes else {
        return Ok(());
    };
    let facts = ImageFacts::load(&root.at(crate::slot::IMAGE_FACTS_PATH))
        .map_err(|e| ApplyError::Invalid(e.to_string()))?;
    let Some(image) = facts.kubernetes else {
        return Err(ApplyError::Invalid(format!(
            "the config sets up {} but the image carries no Kubernetes",
            k.distribution.as_str()
        )));
    };
    if image.distribution.name() != k.distribution.as_str() {
        return Err(ApplyError::Invalid(format!(
            "kubernetes.distribution is {} but the image carries {}",
            k.distribution.as_str(),
            image.distribution.name()
        )));
    }
    let token_file = match &k.token {
        None => None,
        Some(Token::File(p)) => Some(p.clone()),
        // Not moved by `secure_token` (the image's default config holds it).
        Some(Token::Value(v)) => {
            write_atomic(&root.at(TOKEN_FILE), format!("{}\n", v.0).as_bytes(), 0o600)?;
            Some(TOKEN_FILE.to_string())
        }
    };
    match k.distribution {
        Distribution::K3s => {
            let text = k3s_config(k, token_file.as_deref());
            write_atomic(&root.at(K3S_CONFIG), text.as_bytes(), 0o600)?;
        }
        Distribution::K0s => {
            if let Some(c) = &k.config {
                write_atomic(&root.at(K0S_CONFIG), c.as_bytes(), 0o600)?;
            }
        }
    }
    let g = launch(&image.binary, k, token_file.as_deref());
    _out.kubernetes = Some(g.render(&format!("{} {}", k.distribution.as_str(), k.role.as_str())));
    Ok(())
}

/// Move a join token off the FAT partition (see the module docs). Returns
/// the config with the token replaced by [`TOKEN_FILE`] when it moved or had
/// moved before; problems are reported and leave the config as it was.
pub fn secure_token(
    root: &Root,
    src: &Source,
    mut cfg: NodeConfig,
    _sys: &mut dyn System,
) -> NodeConfig {
    let Some(k) = cfg.kubernetes.as_mut() else {
        return cfg;
    };
    let stored = root.at(TOKEN_FILE);
    match k.token.clone() {
        Some(Token::Value(secret)) => {
            let r = write_atomic(&stored, format!("{}\n", secret.0).as_bytes(), 0o600)
                .and_then(|()| remove_inline(src, &secret.0));
            match r {
                Ok(file) => crate::say!(
                    "config join token moved from {} to {TOKEN_FILE}",
                    file.display()
                ),
                Err(e) => {
                    crate::console::error("config", format_args!("moving the join token: {e}"));
                    return cfg;
                }
            }
            k.token = Some(Token::File(TOKEN_FILE.into()));
        }
        Some(Token::File(p)) if p.starts_with("/boot/") => {
            let fat = root.at(&p);
            let text = match std::fs::read_to_string(&fat) {
                Ok(t) => t,
                Err(e) => {
                    crate::console::error("config", format_args!("reading token_file {p}: {e}"));
                    return cfg;
                }
            };
            if !text.starts_with("# basalt:") {
                let token = text.trim();
                let r = write_atomic(&stored, format!("{token}\n").as_bytes(), 0o600)
                    .and_then(|()| replace_on_fat(&fat, MOVED_NOTE));
                if let Err(e) = r {
                    crate::console::error("config", format_args!("moving the join token: {e}"));
                    return cfg;
                }
                crate::say!("config join token moved from {p} to {TOKEN_FILE}");
            }
            k.token = Some(Token::File(TOKEN_FILE.into()));
        }
        _ => {}
    }
    cfg
}

/// Replace the token line in `line` (`token = "..."` or `token: ...`, also
/// a dotted `kubernetes.token`) by `token_file` pointing at [`TOKEN_FILE`].
fn replace_line(line: &str, secret: &str, yaml: bool) -> Option<String> {
    let (body, eol) = match line.strip_suffix("\r\n") {
        Some(b) => (b, "\r\n"),
        None => match line.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (line, ""),
        },
    };
    let sep = if yaml { ':' } else { '=' };
    let (key, value) = body.split_once(sep)?;
    let k = key.trim_end();
    if !(k.trim_start() == "token" || k.ends_with(".token")) || !value.contains(secret) {
        return None;
    }
    let prefix = &k[..k.len() - "token".len()];
    Some(if yaml {
        format!("{prefix}token_file: {TOKEN_FILE}  {MOVED_COMMENT}{eol}")
    } else {
        format!("{prefix}token_file = \"{TOKEN_FILE}\"  {MOVED_COMMENT}{eol}")
    })
}

fn rewrite_text(text: &str, secret: &str, yaml: bool) -> Option<String> {
    let mut hit = false;
    let out: String = text
        .split_inclusive('\n')
        .map(|l| match replace_line(l, secret, yaml) {
            Some(r) => {
                hit = true;
                r
            }
            None => l.to_string(),
        })
        .collect();
    hit.then_some(out)
}

/// Take the inline token out of the config file on the FAT partition,
/// checking with the parser that the rewritten file means the same config
/// with `token_file` instead. Returns the file rewritten.
fn remove_inline(src: &Source, secret: &str) -> Result<std::path::PathBuf, ApplyError> {
    let (file, yaml) = match src {
        Source::Toml(p) => (p.clone(), false),
        Source::CloudInit(d) => (d.join("user-data"), true),
    };
    let text = std::fs::read_to_string(&file).map_err(io_err("reading", &file))?;
    let new = rewrite_text(&text, secret, yaml).ok_or_else(|| {
        ApplyError::Invalid(format!(
            "the token's line in {} is not `token = \"...\"` on one line; move it to a token_file by hand",
            file.display()
        ))
    })?;
    let check = match src {
        Source::Toml(p) => nodeconfig::load_toml(p, &new),
        Source::CloudInit(d) => {
            let read = |n: &str| std::fs::read_to_string(d.join(n)).ok();
            let (meta, net) = (read("meta-data"), read("network-config"));
            nodeconfig::parse_cloud_init(
                d,
                &nodeconfig::CloudInitSources {
                    meta_data: meta.as_deref(),
                    user_data: Some(&new),
                    network_config: net.as_deref(),
                },
            )
        }
    };
    let moved = check.ok().and_then(|c| c.kubernetes).and_then(|k| k.token);
    if moved != Some(Token::File(TOKEN_FILE.into())) {
        return Err(ApplyError::Invalid(format!(
            "rewriting {} without the token did not give the same config; left as it is",
            file.display()
        )));
    }
    replace_on_fat(&file, &new)?;
    Ok(file)
}

/// New-then-rename on the FAT partition (no modes there): the directory
/// entry update is the commit point, so a power cut leaves the old or the
/// new file (plus perhaps a stray temp file).
fn replace_on_fat(path: &Path, text: &str) -> Result<(), ApplyError> {
    use std::io::Write;
    let tmp = path.with_extension("basalt-tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io_err("creating", &tmp))?;
    f.write_all(text.as_bytes())
        .map_err(io_err("writing", &tmp))?;
    f.sync_all().map_err(io_err("syncing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("renaming into place", path))?;
    if let Some(d) = path.parent().and_then(|d| std::fs::File::open(d).ok()) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::system::fake::Recorder;
    use crate::nodeconfig::Secret;
    use std::os::unix::fs::PermissionsExt;

    fn k3s(role: Role) -> Kubernetes {
        Kubernetes {
            distribution: Distribution::K3s,
            role,
            server_url: None,
            token: None,
            labels: Default::default(),
            taints: vec![],
            extra_args: vec![],
            disable: vec![],
            config: None,
        }
    }

    fn image_root(dist: &str) -> (tempfile::TempDir, Root) {
        let t = tempfile::tempdir().unwrap();
        let root = Root(t.path().to_path_buf());
        std::fs::create_dir_all(root.at("/etc/basalt")).unwrap();
        std::fs::write(
            root.at(crate::slot::IMAGE_FACTS_PATH),
            format!("os_version = \"0.1.0\"\nboard = \"x86_64\"\n[kubernetes]\ndistribution = \"{dist}\"\nbinary = \"/usr/bin/{dist}\"\n"),
        )
        .unwrap();
        (t, root)
    }

    #[test]
    fn k3s_agent_config_and_launch() {
        let (_t, root) = image_root("k3s");
        let mut k = k3s(Role::Agent);
        k.server_url = Some("https://10.0.0.1:6443".into());
        k.token = Some(Token::File(TOKEN_FILE.into()));
        k.labels
            .insert("topology.kubernetes.io/zone".into(), "north".into());
        k.taints = vec!["dedicated=edge:NoSchedule".into()];
        k.extra_args = vec!["--node-ip=10.0.0.2".into()];
        k.config = Some("kubelet-arg:\n  - \"max-pods=50\"".into());
        let cfg = NodeConfig {
            kubernetes: Some(k),
            ..NodeConfig::default()
        };
        let mut out = Outcome::default();
        step(&root, &cfg, &mut Recorder::default(), &mut out).unwrap();
        let conf = std::fs::read_to_string(root.at(K3S_CONFIG)).unwrap();
        assert_eq!(
            conf,
            "# Generated at boot by basalt-node-config from the node config's [kubernetes]\n\
             server: \"https://10.0.0.1:6443\"\n\
             token-file: \"/var/lib/basalt/k8s-token\"\n\
             node-label:\n  - \"topology.kubernetes.io/zone=north\"\n\
             node-taint:\n  - \"dedicated=edge:NoSchedule\"\n\
             # kubernetes.config from the node config, passed through:\n\
             kubelet-arg:\n  - \"max-pods=50\"\n"
        );
        let mode = std::fs::metadata(root.at(K3S_CONFIG))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let d = crate::service::ServiceDef::parse(
            "kubernetes",
            out.kubernetes.as_ref().unwrap(),
            Path::new("k"),
        )
        .unwrap();
        assert_eq!(
            d.exec,
            [
                "/usr/bin/k3s",
                "agent",
                "--data-dir",
                K3S_DATA,
                "--config",
                K3S_CONFIG,
                "--node-ip=10.0.0.2"
            ]
        );
        assert!(matches!(
            d.ready.unwrap().probe,
            crate::service::Probe::Http { .. }
        ));
    }

    #[test]
    fn k3s_server_readiness_and_distribution_mismatch() {
        let (_t, root) = image_root("k3s");
        let mut k = k3s(Role::Server);
        k.disable = vec!["traefik".into(), "servicelb".into()];
        let cfg = NodeConfig {
            kubernetes: Some(k),
            ..NodeConfig::default()
        };
        let mut out = Outcome::default();
        step(&root, &cfg, &mut Recorder::default(), &mut out).unwrap();
        let d = crate::service::ServiceDef::parse(
            "kubernetes",
            out.kubernetes.as_ref().unwrap(),
            Path::new("k"),
        )
        .unwrap();
        assert_eq!(d.exec[1], "server");
        assert_eq!(
            d.ready.unwrap().probe,
            crate::service::Probe::Exec(vec![
                "/usr/bin/k3s".into(),
                "kubectl".into(),
                "get".into(),
                "--raw=/readyz".into()
            ])
        );
        assert!(
            std::fs::read_to_string(root.at(K3S_CONFIG))
                .unwrap()
                .contains("disable:\n  - \"traefik\"\n  - \"servicelb\"\n")
        );
        let (_t2, k0s_root) = image_root("k0s");
        assert!(
            step(
                &k0s_root,
                &cfg,
                &mut Recorder::default(),
                &mut Outcome::default()
            )
            .is_err()
        );
    }

    #[test]
    fn k0s_roles() {
        let (_t, root) = image_root("k0s");
        let mut k = k3s(Role::Worker);
        k.distribution = Distribution::K0s;
        k.token = Some(Token::File("/var/lib/basalt/k8s-token".into()));
        k.labels.insert("a".into(), "b".into());
        let cfg = NodeConfig {
            kubernetes: Some(k.clone()),
            ..NodeConfig::default()
        };
        let mut out = Outcome::default();
        step(&root, &cfg, &mut Recorder::default(), &mut out).unwrap();
        let d = crate::service::ServiceDef::parse(
            "kubernetes",
            out.kubernetes.as_ref().unwrap(),
            Path::new("k"),
        )
        .unwrap();
        assert_eq!(
            d.exec,
            [
                "/usr/bin/k0s",
                "worker",
                "--data-dir",
                K0S_DATA,
                "--token-file",
                TOKEN_FILE,
                "--labels",
                "a=b"
            ]
        );
        k.role = Role::ControllerWorker;
        k.token = None;
        k.config = Some("apiVersion: k0s.k0sproject.io/v1beta1\n".into());
        k.disable = vec!["metrics-server".into()];
        let g = launch("/usr/bin/k0s", &k, None);
        assert_eq!(
            g.exec,
            [
                "/usr/bin/k0s",
                "controller",
                "--enable-worker",
                "--data-dir",
                K0S_DATA,
                "--config",
                K0S_CONFIG,
                "--disable-components",
                "metrics-server",
                "--labels",
                "a=b"
            ]
        );
        k.role = Role::Controller;
        assert_eq!(
            launch("/usr/bin/k0s", &k, None).exec[..3],
            ["/usr/bin/k0s", "controller", "--data-dir"]
        );
    }

    #[test]
    fn inline_token_moves_off_the_fat_partition() {
        let (_t, root) = image_root("k3s");
        let boot = root.at("/boot");
        std::fs::create_dir_all(&boot).unwrap();
        let toml = boot.join("node.toml");
        let text = "hostname = \"a1\"\r\n[kubernetes]\r\ndistribution = \"k3s\"\r\nrole = \"agent\"\r\nserver_url = \"https://10.0.0.1:6443\"\r\ntoken = \"K10abc::server:s3cret\"\r\n";
        std::fs::write(&toml, text).unwrap();
        let src = Source::Toml(toml.clone());
        let cfg = src.load().unwrap();
        let cfg = secure_token(&root, &src, cfg, &mut Recorder::default());
        assert_eq!(
            cfg.kubernetes.as_ref().unwrap().token,
            Some(Token::File(TOKEN_FILE.into()))
        );
        let stored = root.at(TOKEN_FILE);
        assert_eq!(
            std::fs::read_to_string(&stored).unwrap(),
            "K10abc::server:s3cret\n"
        );
        assert_eq!(
            std::fs::metadata(&stored).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let fat = std::fs::read_to_string(&toml).unwrap();
        assert!(!fat.contains("s3cret"), "{fat}");
        assert!(
            fat.contains("token_file = \"/var/lib/basalt/k8s-token\"  # the join token was moved"),
            "{fat}"
        );
        assert!(fat.ends_with("\r\n") && fat.starts_with("hostname = \"a1\"\r\n"));
        // The next boot: same config, nothing to move.
        let again = secure_token(&root, &src, src.load().unwrap(), &mut Recorder::default());
        assert_eq!(again, cfg);

        // cloud-init: the token under `basalt:` in user-data.
        std::fs::remove_file(&toml).unwrap();
        std::fs::write(
            boot.join("meta-data"),
            "instance-id: i-1\nlocal-hostname: a1\n",
        )
        .unwrap();
        std::fs::write(
            boot.join("user-data"),
            "#cloud-config\nbasalt:\n  kubernetes:\n    distribution: k3s\n    role: agent\n    server_url: https://10.0.0.1:6443\n    token: K10abc::server:other\n",
        )
        .unwrap();
        let src = Source::find(&boot).unwrap();
        let cfg = secure_token(&root, &src, src.load().unwrap(), &mut Recorder::default());
        assert_eq!(
            cfg.kubernetes.unwrap().token,
            Some(Token::File(TOKEN_FILE.into()))
        );
        let ud = std::fs::read_to_string(boot.join("user-data")).unwrap();
        assert!(
            ud.contains("    token_file: /var/lib/basalt/k8s-token  # the join token"),
            "{ud}"
        );
        assert!(!ud.contains("other"));
        assert_eq!(
            std::fs::read_to_string(&stored).unwrap(),
            "K10abc::server:other\n"
        );
    }

    #[test]
    fn token_file_on_fat_moves_and_leaves_a_note() {
        let (_t, root) = image_root("k3s");
        let boot = root.at("/boot");
        std::fs::create_dir_all(&boot).unwrap();
        std::fs::write(boot.join("k3s-token"), "K10xyz::server:abc\n").unwrap();
        let mut k = k3s(Role::Agent);
        k.token = Some(Token::File("/boot/k3s-token".into()));
        let cfg = NodeConfig {
            kubernetes: Some(k),
            ..NodeConfig::default()
        };
        let src = Source::Toml(boot.join("node.toml"));
        let c = secure_token(&root, &src, cfg.clone(), &mut Recorder::default());
        assert_eq!(
            c.kubernetes.unwrap().token,
            Some(Token::File(TOKEN_FILE.into()))
        );
        assert_eq!(
            std::fs::read_to_string(root.at(TOKEN_FILE)).unwrap(),
            "K10xyz::server:abc\n"
        );
        assert_eq!(
            std::fs::read_to_string(boot.join("k3s-token")).unwrap(),
            MOVED_NOTE
        );
        // Next boot: the note stays, the stored token is used.
        let c = secure_token(&root, &src, cfg, &mut Recorder::default());
        assert_eq!(
            c.kubernetes.unwrap().token,
            Some(Token::File(TOKEN_FILE.into()))
        );
        assert_eq!(
            std::fs::read_to_string(root.at(TOKEN_FILE)).unwrap(),
            "K10xyz::server:abc\n"
        );
        let _ = Secret(String::new());
    }
}
