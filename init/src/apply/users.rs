//! Accounts of the node config in the tmpfs `/etc` (`passwd`, `shadow`,
//! `group`; made fresh from the image at every boot, so this runs every boot)
//! and their SSH keys under `/var/home/<name>/.ssh/authorized_keys` (mode
//! 0600, owned by the user). Homes are on `/var` because the root filesystem
//! is read-only; `root` listed in the config gets `/var/home/root` too.
//!
//! Without a `password_hash` the shadow entry is `*`: no password can match,
//! but the account is not "locked" (`!`), which SSH servers would refuse even
//! for key logins.

use std::path::Path;

use super::{ApplyError, Outcome, Root, System, io_err, set_mode, write_atomic};
use crate::nodeconfig::{NodeConfig, User};

/// First uid/gid given to accounts the config adds.
pub const FIRST_ID: u32 = 1000;
pub const HOME_BASE: &str = "/var/home";

/// One line of /etc/passwd or /etc/group, split on `:`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry(Vec<String>);

impl Entry {
    fn name(&self) -> &str {
        self.0.first().map(String::as_str).unwrap_or("")
    }
    fn id(&self) -> Option<u32> {
        self.0.get(2).and_then(|s| s.parse().ok())
    }
}

fn read_db(path: &Path) -> Vec<Entry> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| Entry(l.split(':').map(String::from).collect()))
        .collect()
}

fn render(db: &[Entry]) -> String {
    db.iter().map(|e| e.0.join(":") + "\n").collect()
}

fn free_id(taken: &[u32], want: Option<u32>) -> u32 {
    if let Some(w) = want.filter(|w| !taken.contains(w)) {
        return w;
    }
    (FIRST_ID..)
        .find(|i| !taken.contains(i))
        .unwrap_or(FIRST_ID)
}

/// Numeric uid and gid of `user` (a name or number) and `group` in `root`'s
/// `/etc/passwd` and `/etc/group`.
pub fn resolve_owner(root: &Root, user: &str, group: &str) -> Result<(u32, u32), ApplyError> {
    let lookup = |file: &str, name: &str| -> Result<u32, ApplyError> {
        if let Ok(n) = name.parse::<u32>() {
            return Ok(n);
        }
        read_db(&root.at(file))
            .iter()
            .find(|e| e.name() == name)
            .and_then(Entry::id)
            // root is 0 even on an image without /etc/passwd (busybox only).
            .or((name == "root").then_some(0))
            .ok_or_else(|| ApplyError::Invalid(format!("no {name:?} in {file}")))
    };
    Ok((lookup("/etc/passwd", user)?, lookup("/etc/group", group)?))
}

pub fn step(
    root: &Root,
    cfg: &NodeConfig,
    sys: &mut dyn System,
    out: &mut Outcome,
) -> Result<(), ApplyError> {
    if cfg.users.is_empty() {
        return Ok(());
    }
    let passwd_path = root.at("/etc/passwd");
    let group_path = root.at("/etc/group");
    let shadow_path = root.at("/etc/shadow");
    let mut passwd = read_db(&passwd_path);
    let mut group = read_db(&group_path);
    let mut shadow = read_db(&shadow_path);
    // An image without account files (busybox only) still has root.
    if !passwd.iter().any(|e| e.name() == "root") {
        passwd.insert(
            0,
            Entry(
                ["root", "x", "0", "0", "root", "/root", "/bin/sh"]
                    .map(String::from)
                    .to_vec(),
            ),
        );
    }
    if !group.iter().any(|e| e.name() == "root") {
        group.insert(0, Entry(["root", "x", "0", ""].map(String::from).to_vec()));
    }
    if !shadow.iter().any(|e| e.name() == "root") {
        shadow.insert(
            0,
            Entry(
                ["root", "*", "0", "0", "99999", "7", "", "", ""]
                    .map(String::from)
                    .to_vec(),
            ),
        );
    }
    let mut homes = Vec::new();
    for u in &cfg.users {
        let home = format!("{HOME_BASE}/{}", u.name);
        let (uid, gid) = add_account(root, u, &home, &mut passwd, &mut group);
        let hash = u.password_hash.as_ref().map_or("*", |h| h.0.as_str());
        let line = Entry(
            [&u.name, hash, "0", "0", "99999", "7", "", "", ""]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        );
        match shadow.iter_mut().find(|e| e.name() == u.name) {
            Some(e) => *e = line,
            None => shadow.push(line),
        }
        homes.push((u, home, uid, gid));
    }
    write_atomic(&passwd_path, render(&passwd).as_bytes(), 0o644)?;
    write_atomic(&group_path, render(&group).as_bytes(), 0o644)?;
    write_atomic(&shadow_path, render(&shadow).as_bytes(), 0o600)?;
    for (u, home, uid, gid) in homes {
        if let Err(e) = install_keys(root, u, &home, uid, gid, sys) {
            out.error("users", e);
        }
    }
    Ok(())
}

/// Add or update `u` in passwd and group; returns (uid, gid).
fn add_account(
    root: &Root,
    u: &User,
    home: &str,
    passwd: &mut Vec<Entry>,
    group: &mut Vec<Entry>,
) -> (u32, u32) {
    let uids: Vec<u32> = passwd
        .iter()
        .filter(|e| e.name() != u.name)
        .filter_map(Entry::id)
        .collect();
    let existing = passwd.iter().position(|e| e.name() == u.name);
    let (uid, gid) = match existing.map(|i| &passwd[i]) {
        Some(e) => (
            e.id().unwrap_or(0),
            e.0.get(3).and_then(|g| g.parse().ok()).unwrap_or(0),
        ),
        None => {
            // Keep the id a home made at an earlier boot belongs to.
            use std::os::unix::fs::MetadataExt;
            let previous = std::fs::metadata(root.at(home)).ok().map(|m| m.uid());
            let uid = free_id(&uids, previous.filter(|&p| p >= FIRST_ID));
            let gid = match group.iter().find(|g| g.name() == u.name) {
                Some(g) => g.id().unwrap_or(uid),
                None => {
                    let gids: Vec<u32> = group.iter().filter_map(Entry::id).collect();
                    let gid = free_id(&gids, Some(uid));
                    group.push(Entry(vec![
                        u.name.clone(),
                        "x".into(),
                        gid.to_string(),
                        String::new(),
                    ]));
                    gid
                }
            };
            (uid, gid)
        }
    };
    let line = Entry(vec![
        u.name.clone(),
        "x".into(),
        uid.to_string(),
        gid.to_string(),
        u.name.clone(),
        home.to_string(),
        "/bin/sh".into(),
    ]);
    match existing {
        Some(i) => passwd[i] = line,
        None => passwd.push(line),
    }
    for g in &u.groups {
        let gids: Vec<u32> = group.iter().filter_map(Entry::id).collect();
        let entry = match group.iter_mut().position(|e| e.name() == g) {
            Some(i) => &mut group[i],
            None => {
                let gid = free_id(&gids, None);
                group.push(Entry(vec![
                    g.clone(),
                    "x".into(),
                    gid.to_string(),
                    String::new(),
                ]));
                let last = group.len() - 1;
                &mut group[last]
            }
        };
        entry.0.resize(4, String::new());
        let mut members: Vec<String> = entry.0[3]
            .split(',')
            .filter(|m| !m.is_empty())
            .map(String::from)
            .collect();
        if !members.contains(&u.name) {
            members.push(u.name.clone());
        }
        entry.0[3] = members.join(",");
    }
    (uid, gid)
}

fn install_keys(
    root: &Root,
    u: &User,
    home: &str,
    uid: u32,
    gid: u32,
    sys: &mut dyn System,
) -> Result<(), ApplyError> {
    let home = root.at(home);
    let ssh = home.join(".ssh");
    std::fs::create_dir_all(&ssh).map_err(io_err("creating", &ssh))?;
    set_mode(&home, 0o755)?;
    set_mode(&ssh, 0o700)?;
    let keys = ssh.join("authorized_keys");
    let text: String = u
        .ssh_authorized_keys
        .iter()
        .map(|k| format!("{k}\n"))
        .collect();
    write_atomic(&keys, text.as_bytes(), 0o600)?;
    for p in [&home, &ssh, &keys] {
        sys.chown(p, uid, gid)
            .map_err(io_err("changing owner of", p))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::system::fake::Recorder;
    use crate::nodeconfig::Secret;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn user(name: &str, keys: &[&str], groups: &[&str], hash: Option<&str>) -> User {
        User {
            name: name.into(),
            ssh_authorized_keys: keys.iter().map(|s| s.to_string()).collect(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
            password_hash: hash.map(|h| Secret(h.into())),
        }
    }

    #[test]
    fn adds_accounts_keys_and_groups() {
        let t = tempfile::tempdir().unwrap();
        let root = Root(t.path().to_path_buf());
        std::fs::create_dir_all(root.at("/etc")).unwrap();
        std::fs::write(
            root.at("/etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1::/:/bin/false\n",
        )
        .unwrap();
        std::fs::write(root.at("/etc/group"), "root:x:0:\nwheel:x:10:root\n").unwrap();
        let cfg = NodeConfig {
            users: vec![
                user(
                    "ops",
                    &["ssh-ed25519 AAAA ops@x"],
                    &["wheel", "docker"],
                    None,
                ),
                user("root", &["ssh-ed25519 BBBB"], &[], Some("$6$s$h")),
            ],
            ..NodeConfig::default()
        };
        let mut sys = Recorder::default();
        let mut out = Outcome::default();
        step(&root, &cfg, &mut sys, &mut out).unwrap();
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        let passwd = std::fs::read_to_string(root.at("/etc/passwd")).unwrap();
        assert_eq!(
            passwd,
            "root:x:0:0:root:/var/home/root:/bin/sh\ndaemon:x:1:1::/:/bin/false\nops:x:1000:1000:ops:/var/home/ops:/bin/sh\n"
        );
        let group = std::fs::read_to_string(root.at("/etc/group")).unwrap();
        assert_eq!(
            group,
            "root:x:0:\nwheel:x:10:root,ops\nops:x:1000:\ndocker:x:1001:ops\n"
        );
        let shadow = std::fs::read_to_string(root.at("/etc/shadow")).unwrap();
        assert_eq!(shadow, "root:$6$s$h:0:0:99999:7:::\nops:*:0:0:99999:7:::\n");
        let meta = std::fs::metadata(root.at("/etc/shadow")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let keys = root.at("/var/home/ops/.ssh/authorized_keys");
        assert_eq!(
            std::fs::read_to_string(&keys).unwrap(),
            "ssh-ed25519 AAAA ops@x\n"
        );
        let m = std::fs::metadata(&keys).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert!(
            sys.calls
                .contains(&format!("chown {} 1000:1000", keys.display()))
        );
        let ssh = std::fs::metadata(root.at("/var/home/ops/.ssh")).unwrap();
        assert_eq!(ssh.permissions().mode() & 0o777, 0o700);
        if std::fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false)
        {
            assert_eq!((m.uid(), m.gid()), (1000, 1000));
        }

        // Applied again (the next boot's fresh /etc): same ids, no duplicates.
        std::fs::write(
            root.at("/etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1::/:/bin/false\n",
        )
        .unwrap();
        std::fs::write(root.at("/etc/group"), "root:x:0:\nwheel:x:10:root\n").unwrap();
        std::fs::remove_file(root.at("/etc/shadow")).unwrap();
        step(&root, &cfg, &mut sys, &mut out).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.at("/etc/passwd")).unwrap(),
            passwd
        );
        assert_eq!(resolve_owner(&root, "ops", "docker").unwrap(), (1000, 1001));
        assert_eq!(resolve_owner(&root, "7", "8").unwrap(), (7, 8));
        assert!(resolve_owner(&root, "nobody", "root").is_err());
    }

    #[test]
    fn an_image_without_account_files_gets_root_too() {
        let t = tempfile::tempdir().unwrap();
        let root = Root(t.path().to_path_buf());
        assert_eq!(resolve_owner(&root, "root", "root").unwrap(), (0, 0));
        let cfg = NodeConfig {
            users: vec![user("ops", &["ssh-ed25519 AAAA"], &["wheel"], None)],
            ..NodeConfig::default()
        };
        step(
            &root,
            &cfg,
            &mut Recorder::default(),
            &mut Outcome::default(),
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(root.at("/etc/passwd")).unwrap(),
            "root:x:0:0:root:/root:/bin/sh\nops:x:1000:1000:ops:/var/home/ops:/bin/sh\n"
        );
        assert_eq!(
            std::fs::read_to_string(root.at("/etc/group")).unwrap(),
            "root:x:0:\nops:x:1000:\nwheel:x:1001:ops\n"
        );
    }
}
