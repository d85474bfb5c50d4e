//! What install scripts would have done (REFERENCE.md §5.5). Basalt never runs
//! package scripts (they are target-architecture shell run as root); it replays
//! the effects it understands and reports every other script as a warning, so the
//! image definition's author sees exactly what was not done.
//!
//! On a fresh root only `.pre-install`, `.post-install` and `.trigger` would run;
//! upgrade and deinstall scripts never do, so they are not reported.
//!
//! Handled natively:
//! * `busybox` `.post-install`/`.trigger` (`/bin/busybox --install -s`): applet
//!   symlinks, see [`super::busybox`].
//!
//! Reported with a specific explanation (the effect is usually already present):
//! * `alpine-baselayout`: users and groups are the files `etc/passwd`, `etc/group`
//!   and `etc/shadow` that `alpine-baselayout`/`alpine-baselayout-data` ship;
//! * `ca-certificates` trigger (`update-ca-certificates`): `ca-certificates-bundle`
//!   ships the finished `etc/ssl/certs/ca-certificates.crt`;
//! * `mkinitfs` trigger and kernel scripts: Basalt's boot does not use mkinitfs'
//!   initramfs.

/// Script files that run on a fresh install.
pub const FRESH_INSTALL: &[&str] = &[".pre-install", ".post-install", ".trigger"];

/// Basalt's verdict on one script of one package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptNote {
    pub package: String,
    pub script: String,
    /// `true`: Basalt did what the script does. `false`: a warning.
    pub handled: bool,
    pub note: String,
}

impl std::fmt::Display for ScriptNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.handled { "handled" } else { "NOT RUN" };
        write!(
            f,
            "{} {}: {verdict}: {}",
            self.package, self.script, self.note
        )
    }
}

/// Review one script. `None`: the script would not run on a fresh install.
pub fn review(package: &str, script: &str) -> Option<ScriptNote> {
    if !FRESH_INSTALL.contains(&script) {
        return None;
    }
    let (handled, note) = match (package, script) {
        ("busybox", ".post-install" | ".trigger") => (
            true,
            "applet symlinks to /bin/busybox created natively (busybox --install -s)".to_string(),
        ),
        ("busybox", _) => (false, "its effect is not replicated".to_string()),
        ("alpine-baselayout" | "alpine-baselayout-data", _) => (
            false,
            "users and groups come from the etc/passwd, etc/group and etc/shadow files \
             the package ships; any other effect is not replicated"
                .to_string(),
        ),
        ("ca-certificates", ".trigger") => (
            false,
            "update-ca-certificates: add ca-certificates-bundle, which ships \
             etc/ssl/certs/ca-certificates.crt ready-made"
                .to_string(),
        ),
        ("mkinitfs", ".trigger") => (
            false,
            "Basalt's boot does not use mkinitfs' initramfs".to_string(),
        ),
        (p, _) if p.starts_with("linux-") => (
            false,
            "Basalt's builder installs the kernel itself".to_string(),
        ),
        _ => (false, "its effect is not replicated".to_string()),
    };
    Some(ScriptNote {
        package: package.to_string(),
        script: script.to_string(),
        handled,
        note,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        assert!(review("busybox", ".post-install").unwrap().handled);
        assert!(review("busybox", ".post-upgrade").is_none());
        assert!(review("foo", ".pre-deinstall").is_none());
        let w = review("chrony", ".pre-install").unwrap();
        assert!(!w.handled);
        assert!(w.to_string().starts_with("chrony .pre-install: NOT RUN"));
        assert!(
            review("ca-certificates", ".trigger")
                .unwrap()
                .note
                .contains("bundle")
        );
    }
}
