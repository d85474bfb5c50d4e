//! The installed-package database apk keeps on the target, so `apk info`, `apk
//! verify` and `apk add` work on a node (REFERENCE.md §5.5):
//! * `lib/apk/db/installed`: one index-style record per package (the `APKINDEX`
//!   letters) followed by its files: `F:dir` then `M:uid:gid:mode` for the
//!   directory, and per file `R:name`, `a:uid:gid:mode`, `Z:Q1<base64 sha1>`;
//! * `etc/apk/world`: the requested dependencies, one per line, sorted;
//! * `etc/apk/arch`: the architecture.
//!
//! Rendering only: the records come from [`super::install::Installer`].

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;

use base64::Engine;

use super::dep::Dependency;
use super::index::PackageInfo;

pub const INSTALLED: &str = "lib/apk/db/installed";
pub const WORLD: &str = "etc/apk/world";
pub const ARCH: &str = "etc/apk/arch";

/// One path a package owns.
#[derive(Debug, Clone)]
pub struct DbFile {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    /// SHA-1 of the content (regular files) or of the link target (symlinks).
    pub sha1: Option<[u8; 20]>,
}

/// One installed package and what it owns.
#[derive(Debug, Clone, Default)]
pub struct DbPackage {
    pub info: PackageInfo,
    pub dirs: BTreeMap<PathBuf, DbFile>,
    pub files: BTreeMap<PathBuf, DbFile>,
}

fn q1(sha: &[u8; 20]) -> String {
    format!(
        "Q1{}",
        base64::engine::general_purpose::STANDARD.encode(sha)
    )
}

/// Render `lib/apk/db/installed`.
pub fn render_installed(pkgs: &[DbPackage]) -> String {
    let mut out = String::new();
    for p in pkgs {
        p.info.write_record(&mut out);
        // Every directory holding a file, plus the ones the package lists itself.
        let mut dirs: BTreeMap<PathBuf, Option<&DbFile>> =
            p.dirs.iter().map(|(d, f)| (d.clone(), Some(f))).collect();
        for f in p.files.keys() {
            let parent = f.parent().map(PathBuf::from).unwrap_or_default();
            dirs.entry(parent).or_insert(None);
        }
        for (dir, meta) in &dirs {
            let _ = writeln!(out, "F:{}", dir.display());
            if let Some(m) = meta {
                let _ = writeln!(out, "M:{}:{}:{:o}", m.uid, m.gid, m.mode);
            }
            for (path, f) in p.files.range(dir.join("")..) {
                let parent = path.parent().map(PathBuf::from).unwrap_or_default();
                if parent != *dir {
                    if !path.starts_with(dir) {
                        break;
                    }
                    continue;
                }
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default();
                let _ = writeln!(out, "R:{name}");
                let _ = writeln!(out, "a:{}:{}:{:o}", f.uid, f.gid, f.mode);
                if let Some(s) = &f.sha1 {
                    let _ = writeln!(out, "Z:{}", q1(s));
                }
            }
        }
        out.push('\n');
    }
    out
}

/// Render `etc/apk/world`.
pub fn render_world(world: &[Dependency]) -> String {
    let mut lines: Vec<String> = world.iter().map(ToString::to_string).collect();
    lines.sort();
    lines.dedup();
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apk::index::parse_records;

    #[test]
    fn installed_round_trips_through_the_index_parser() {
        let mut p = DbPackage {
            info: PackageInfo {
                name: "busybox".into(),
                version: "1.35.0-r17".into(),
                arch: "x86_64".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let f = DbFile {
            uid: 0,
            gid: 0,
            mode: 0o755,
            sha1: Some([7; 20]),
        };
        p.dirs.insert("bin".into(), f.clone());
        p.files.insert("bin/busybox".into(), f.clone());
        p.files.insert("etc/securetty".into(), f);
        let text = render_installed(&[p]);
        assert!(
            text.contains("F:bin\nM:0:0:755\nR:busybox\na:0:0:755\nZ:Q1"),
            "{text}"
        );
        assert!(text.contains("F:etc\nR:securetty\n"), "{text}");
        let back = parse_records(&text, "installed").unwrap();
        assert_eq!(back[0].name, "busybox");
        let w = Dependency::parse_list("musl busybox busybox").unwrap();
        assert_eq!(render_world(&w), "busybox\nmusl\n");
    }
}
