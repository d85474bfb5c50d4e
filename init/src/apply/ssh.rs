//! `[ssh]`: a generated `ssh` service running dropbear (the SSH server
//! Basalt images ship, chosen for size) when the image has
//! `/usr/sbin/dropbear`; otherwise a warning, since the keys installed for
//! the users then have nobody to check them. Key logins only (`-s`).
//! Host keys live on `/var` (`/etc/dropbear` is linked there) so the node
//! keeps its identity across boots; dropbear makes them on first use (`-R`).

use super::services::{Generated, Ready};
use super::{ApplyError, Outcome, Root, System, io_err};
use crate::nodeconfig::NodeConfig;

pub const DROPBEAR: &str = "/usr/sbin/dropbear";
pub const HOST_KEYS: &str = "/var/lib/basalt/dropbear";

pub fn step(
    root: &Root,
    cfg: &NodeConfig,
    _sys: &mut dyn System,
    out: &mut Outcome,
) -> Result<(), ApplyError> {
    if !cfg.ssh.enabled {
        return Ok(());
    }
    if !root.at(DROPBEAR).exists() {
        if cfg.users.iter().any(|u| !u.ssh_authorized_keys.is_empty()) {
            out.warn(format!(
                "ssh: the image has no SSH server ({DROPBEAR}); the users' keys are installed but nothing listens on port {}",
                cfg.ssh.port
            ));
        }
        return Ok(());
    }
    let keys = root.at(HOST_KEYS);
    std::fs::create_dir_all(&keys).map_err(io_err("creating", &keys))?;
    super::set_mode(&keys, 0o700)?;
    let link = root.at("/etc/dropbear");
    if std::fs::read_link(&link).ok().as_deref() != Some(std::path::Path::new(HOST_KEYS)) {
        let _ = std::fs::remove_dir_all(&link);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(HOST_KEYS, &link).map_err(io_err("linking", &link))?;
    }
    let port = cfg.ssh.port.to_string();
    let g = Generated {
        ready: Some((Ready::Tcp(format!("127.0.0.1:{port}")), 500, 60)),
        ..Generated::new(&[DROPBEAR, "-F", "-E", "-R", "-s", "-p", &port])
    };
    out.services.push((
        "ssh".into(),
        g.render("SSH server (dropbear), key logins only"),
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::system::fake::Recorder;
    use crate::nodeconfig::User;

    #[test]
    fn dropbear_service_only_when_present() {
        let t = tempfile::tempdir().unwrap();
        let root = Root(t.path().to_path_buf());
        std::fs::create_dir_all(root.at("/etc")).unwrap();
        let mut cfg = NodeConfig::default();
        cfg.users.push(User {
            name: "ops".into(),
            ssh_authorized_keys: vec!["ssh-ed25519 AAAA".into()],
            groups: vec![],
            password_hash: None,
        });
        cfg.ssh.port = 2222;
        let mut out = Outcome::default();
        step(&root, &cfg, &mut Recorder::default(), &mut out).unwrap();
        assert!(out.services.is_empty());
        assert_eq!(out.warnings.len(), 1);
        assert!(out.warnings[0].contains("no SSH server"));

        std::fs::create_dir_all(root.at("/usr/sbin")).unwrap();
        std::fs::write(root.at(DROPBEAR), "").unwrap();
        let mut out = Outcome::default();
        step(&root, &cfg, &mut Recorder::default(), &mut out).unwrap();
        let d =
            crate::service::ServiceDef::parse("ssh", &out.services[0].1, std::path::Path::new("x"))
                .unwrap();
        assert_eq!(d.exec, [DROPBEAR, "-F", "-E", "-R", "-s", "-p", "2222"]);
        assert_eq!(
            std::fs::read_link(root.at("/etc/dropbear")).unwrap(),
            std::path::Path::new(HOST_KEYS)
        );
        cfg.ssh.enabled = false;
        let mut out = Outcome::default();
        step(&root, &cfg, &mut Recorder::default(), &mut out).unwrap();
        assert!(out.services.is_empty() && out.warnings.is_empty());
    }
}
