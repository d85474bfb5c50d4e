//! `[[files]]` (written under `/etc` and `/var` only, new-then-rename, with
//! their mode and owner) and `[kernel] sysctl` (written to `/proc/sys`).
//! The parser already refused paths outside `/etc` and `/var` and `..`;
//! this checks again, because a file is written as root.

use std::path::PathBuf;

use super::{ApplyError, Outcome, Root, System, io_err, write_atomic};
use crate::nodeconfig::NodeConfig;

fn allowed(path: &str) -> bool {
    (path.starts_with("/etc/") || path.starts_with("/var/"))
        && !path.split('/').any(|c| c == ".." || c == ".")
}

pub fn step(
    root: &Root,
    cfg: &NodeConfig,
    sys: &mut dyn System,
    out: &mut Outcome,
) -> Result<(), ApplyError> {
    for f in &cfg.files {
        if !allowed(&f.path) {
            out.error(
                "files",
                format_args!("{}: only files under /etc and /var are written", f.path),
            );
            continue;
        }
        let r = super::users::resolve_owner(root, &f.owner, &f.group).and_then(|(uid, gid)| {
            let p = root.at(&f.path);
            write_atomic(&p, &f.content, f.mode)?;
            sys.chown(&p, uid, gid)
                .map_err(io_err("changing owner of", &p))?;
            // chown clears set-id bits: set the mode once more.
            super::set_mode(&p, f.mode)
        });
        if let Err(e) = r {
            out.error("files", e);
        }
    }
    Ok(())
}

/// `/proc/sys/<name with dots as slashes>`. A name written with `/` keeps
/// its dots (`net/ipv4/conf/eth0.10/forwarding`).
pub fn sysctl_path(root: &Root, name: &str) -> PathBuf {
    let rel = if name.contains('/') {
        name.to_string()
    } else {
        name.replace('.', "/")
    };
    root.at("/proc/sys").join(rel.trim_start_matches('/'))
}

pub fn sysctl_step(
    root: &Root,
    cfg: &NodeConfig,
    _sys: &mut dyn System,
    out: &mut Outcome,
) -> Result<(), ApplyError> {
    for (name, value) in &cfg.kernel.sysctl {
        let p = sysctl_path(root, name);
        if name.split(['.', '/']).any(|c| c == "..") {
            out.error("sysctl", format_args!("{name}: bad name"));
            continue;
        }
        // /proc/sys files exist or the setting does not: never create one.
        let r = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&p)
            .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{value}\n").as_bytes()));
        if let Err(e) = r {
            out.error(
                "sysctl",
                format_args!("{name} = {value:?} ({}): {e}", p.display()),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::system::fake::Recorder;
    use crate::nodeconfig::File;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_files_with_mode_and_owner_and_refuses_escapes() {
        let t = tempfile::tempdir().unwrap();
        let root = Root(t.path().to_path_buf());
        std::fs::create_dir_all(root.at("/etc")).unwrap();
        std::fs::write(
            root.at("/etc/passwd"),
            "root:x:0:0::/:/bin/sh\napp:x:1005:1006::/:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.at("/etc/group"), "root:x:0:\napp:x:1006:\n").unwrap();
        let file = |path: &str, owner: &str, group: &str, mode: u32| File {
            path: path.into(),
            content: b"hello\n".to_vec(),
            mode,
            owner: owner.into(),
            group: group.into(),
        };
        let cfg = NodeConfig {
            files: vec![
                file("/etc/app/app.conf", "app", "app", 0o640),
                file("/var/lib/app/state", "root", "root", 0o600),
                file("/usr/bin/evil", "root", "root", 0o755),
                file("/etc/../usr/x", "root", "root", 0o644),
                file("/etc/owned", "ghost", "root", 0o644),
            ],
            ..NodeConfig::default()
        };
        let mut sys = Recorder::default();
        let mut out = Outcome::default();
        step(&root, &cfg, &mut sys, &mut out).unwrap();
        let p = root.at("/etc/app/app.conf");
        assert_eq!(std::fs::read(&p).unwrap(), b"hello\n");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
            0o640
        );
        assert!(
            sys.calls
                .contains(&format!("chown {} 1005:1006", p.display()))
        );
        assert!(root.at("/var/lib/app/state").exists());
        assert!(!root.at("/usr/bin/evil").exists());
        assert!(!root.at("/usr/x").exists());
        assert!(
            !root.at("/etc/owned").exists(),
            "unknown owner: not written"
        );
        assert_eq!(out.errors.len(), 3, "{:?}", out.errors);
    }

    #[test]
    fn sysctls_go_to_proc_sys_and_missing_ones_are_errors() {
        let t = tempfile::tempdir().unwrap();
        let root = Root(t.path().to_path_buf());
        let fwd = root.at("/proc/sys/net/ipv4/ip_forward");
        std::fs::create_dir_all(fwd.parent().unwrap()).unwrap();
        std::fs::write(&fwd, "0\n").unwrap();
        let vlan = root.at("/proc/sys/net/ipv4/conf/eth0.10/forwarding");
        std::fs::create_dir_all(vlan.parent().unwrap()).unwrap();
        std::fs::write(&vlan, "0\n").unwrap();
        let mut cfg = NodeConfig::default();
        cfg.kernel
            .sysctl
            .insert("net.ipv4.ip_forward".into(), "1".into());
        cfg.kernel
            .sysctl
            .insert("net/ipv4/conf/eth0.10/forwarding".into(), "1".into());
        cfg.kernel
            .sysctl
            .insert("vm.nonexistent".into(), "5".into());
        let mut out = Outcome::default();
        sysctl_step(&root, &cfg, &mut Recorder::default(), &mut out).unwrap();
        assert_eq!(std::fs::read_to_string(&fwd).unwrap(), "1\n");
        assert_eq!(std::fs::read_to_string(&vlan).unwrap(), "1\n");
        assert!(!root.at("/proc/sys/vm/nonexistent").exists());
        assert_eq!(out.errors.len(), 1);
        assert!(out.errors[0].contains("vm.nonexistent"), "{:?}", out.errors);
    }
}
