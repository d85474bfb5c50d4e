//! The image's root tree: overlays layered in order, then what the builder
//! itself adds (docs/boot-protocol.md, "Root filesystem"): the init binary
//! and its links, image facts, node config, services, os-release, the
//! Kubernetes binary and empty mount points.
//!
//! Ownership is recorded in the tree, never applied on the host.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use basalt_init::slot;
use basalt_rootfs::overlay::{self, OverlayError, glob_match};
use basalt_rootfs::tree::{Entry, EntryKind, FileData, Tree, TreeError};
use serde::Serialize;

use crate::board::Board;
use crate::imagedef::{ImageDefinition, NodeConfigSource};

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    #[error("root tree: {what}: {err}")]
    Tree { what: String, err: TreeError },
    #[error("cannot read {what} {path}: {err}")]
    Read {
        what: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("overlay {source_path}: busybox_links: {why}")]
    BusyboxLinks { source_path: PathBuf, why: String },
    #[error(
        "board key root.{key} = {pattern:?} matches {count} files in the root tree (need exactly one){hint}"
    )]
    BootFile {
        key: &'static str,
        pattern: String,
        count: usize,
        hint: String,
    },
    #[error(
        "the Kubernetes binary {binary} is not in the root tree: set kubernetes.source in the image definition or add it with an overlay"
    )]
    NoKubernetes { binary: String },
    #[error("the image's default node config is invalid:\n{diagnostics}")]
    NodeConfig { diagnostics: String },
    #[error("serialising {what}: {err}")]
    Toml {
        what: &'static str,
        err: toml::ser::Error,
    },
}

fn bytes(b: impl Into<Vec<u8>>, mode: u32, mtime: u64) -> Entry {
    let mut e = Entry::file(FileData::Bytes(Arc::new(b.into())), mode);
    e.mtime = mtime;
    e
}

fn ins(tree: &mut Tree, path: &str, e: Entry) -> Result<(), RootError> {
    tree.insert(path, e).map_err(|err| RootError::Tree {
        what: path.to_string(),
        err,
    })
}

/// Layer the image definition's overlays, in order (later wins).
pub fn overlays(def: &ImageDefinition) -> Result<Tree, RootError> {
    let mut tree = Tree::new();
    for o in &def.overlays {
        let t = overlay::load(&o.spec)?;
        tree.merge(t).map_err(|err| RootError::Tree {
            what: format!("merging overlay {}", o.spec.source.display()),
            err,
        })?;
        if let Some(bb) = &o.busybox_links {
            busybox_links(&mut tree, &o.spec.source, &o.spec.dest, bb)?;
        }
    }
    Ok(tree)
}

/// The ELF machine of the host's executables.
fn host_machine() -> Option<u16> {
    match std::env::consts::ARCH {
        "x86_64" => Some(0x3e),
        "aarch64" => Some(0xb7),
        "arm" => Some(0x28),
        _ => None,
    }
}

/// The qemu-user emulator for an ELF machine (Debian qemu-user-static names first).
fn qemu_user(machine: u16) -> Option<(&'static str, &'static str)> {
    match machine {
        0x3e => Some(("qemu-x86_64-static", "qemu-x86_64")),
        0xb7 => Some(("qemu-aarch64-static", "qemu-aarch64")),
        0x28 => Some(("qemu-arm-static", "qemu-arm")),
        _ => None,
    }
}

/// How to run `bin` on this host: directly, or under qemu-user when it is an
/// executable for another architecture (a Raspberry Pi busybox on an x86_64 host).
fn runner(bin: &Path) -> Result<std::process::Command, String> {
    let mut head = [0u8; 20];
    let n = std::fs::File::open(bin)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .map_err(|e| format!("cannot read {}: {e}", bin.display()))?;
    let machine = (n == 20 && &head[..4] == b"\x7fELF").then(|| {
        if head[5] == 2 {
            u16::from_be_bytes([head[18], head[19]])
        } else {
            u16::from_le_bytes([head[18], head[19]])
        }
    });
    match machine {
        Some(m) if Some(m) != host_machine() => {
            let (a, b) = qemu_user(m).ok_or(format!(
                "{} is for ELF machine {m:#x}, which this host cannot run",
                bin.display()
            ))?;
            let found = [a, b].into_iter().find(|q| {
                std::env::var_os("PATH")
                    .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(q).is_file()))
            });
            let q = found.ok_or(format!(
                "{} is for another architecture: install qemu-user-static ({a}) to list its applets",
                bin.display()
            ))?;
            let mut c = std::process::Command::new(q);
            c.arg(bin);
            Ok(c)
        }
        _ => Ok(std::process::Command::new(bin)),
    }
}

/// Symlinks for busybox applets, listed by running the overlay's busybox on
/// the host (`--list-full`), under qemu-user (`qemu-aarch64-static`,
/// `qemu-arm-static`) when it is built for another architecture. Existing
/// paths are left alone.
fn busybox_links(tree: &mut Tree, source: &Path, dest: &Path, bb: &str) -> Result<(), RootError> {
    let err = |why: String| RootError::BusyboxLinks {
        source_path: source.to_path_buf(),
        why,
    };
    if !source.is_dir() {
        return Err(err(
            "needs a directory overlay (the binary is run on the host)".into(),
        ));
    }
    let host_bin = source.join(bb);
    let out = runner(&host_bin)
        .map_err(&err)?
        .arg("--list-full")
        .output()
        .map_err(|e| {
            err(format!(
                "cannot run {} on this host ({e})",
                host_bin.display()
            ))
        })?;
    if !out.status.success() {
        return Err(err(format!(
            "{} --list-full failed: {}",
            host_bin.display(),
            out.status
        )));
    }
    let target = Path::new("/").join(dest).join(bb);
    let mtime = tree.get(dest.join(bb)).map(|e| e.mtime).unwrap_or_default();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let line = line.trim();
        // `linuxrc` is an initrd relic at the root; the rest are bin/, sbin/, usr/...
        if line.is_empty() || !line.contains('/') {
            continue;
        }
        let path = dest.join(line);
        if tree.get(&path).is_some() {
            continue;
        }
        let mut e = Entry::symlink(target.clone());
        e.mtime = mtime;
        tree.insert(&path, e)
            .map_err(|e| err(format!("{line}: {e}")))?;
    }
    Ok(())
}

/// Boot files found in the root tree through the board's `root` paths.
#[derive(Debug)]
pub struct BootFiles {
    pub kernel_path: PathBuf,
    pub kernel: FileData,
    /// GPT boards: the EFI boot loader.
    pub bootloader: Option<FileData>,
}

fn find_one(
    tree: &Tree,
    key: &'static str,
    pattern: &str,
) -> Result<(PathBuf, FileData), RootError> {
    let pat = pattern.trim_start_matches('/');
    let found: Vec<(PathBuf, FileData)> = tree
        .iter()
        .filter(|(p, _)| glob_match(pat, &p.to_string_lossy()))
        .filter_map(|(p, e)| match &e.kind {
            EntryKind::File(d) => Some((p.to_path_buf(), d.clone())),
            _ => None,
        })
        .collect();
    match found.len() {
        1 => Ok(found.into_iter().next().expect("len is 1")),
        n => Err(RootError::BootFile {
            key,
            pattern: pattern.into(),
            count: n,
            hint: if n == 0 {
                " — is the overlay holding it listed in the image definition?".into()
            } else {
                format!(
                    ": {}",
                    found
                        .iter()
                        .map(|(p, _)| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        }),
    }
}

pub fn boot_files(tree: &Tree, board: &Board) -> Result<BootFiles, RootError> {
    let (kernel_path, kernel) = find_one(tree, "kernel", &board.root.kernel)?;
    let bootloader = match &board.root.bootloader {
        Some(pattern) => Some(find_one(tree, "bootloader", pattern)?.1),
        None => None,
    };
    Ok(BootFiles {
        kernel_path,
        kernel,
        bootloader,
    })
}

#[derive(Serialize)]
struct ImageFacts<'a> {
    os_version: &'a str,
    board: &'a str,
    kubernetes: KubernetesFacts<'a>,
}

#[derive(Serialize)]
struct KubernetesFacts<'a> {
    distribution: &'a str,
    binary: &'a str,
}

/// Text of `/etc/basalt/image.toml`.
pub fn image_facts(def: &ImageDefinition, board: &Board) -> Result<String, RootError> {
    let facts = ImageFacts {
        os_version: &def.os_version,
        board: &board.name,
        kubernetes: KubernetesFacts {
            distribution: def.kubernetes.distribution.name(),
            binary: &def.kubernetes.binary,
        },
    };
    toml::to_string(&facts).map_err(|err| RootError::Toml {
        what: "image.toml",
        err,
    })
}

/// Read the node config the image definition names (file or inline), checked
/// with the device's own parser (`basalt_init::nodeconfig`).
pub fn node_config_text(def: &ImageDefinition) -> Result<Option<String>, RootError> {
    let (origin, text) = match &def.node_config {
        None => return Ok(None),
        Some(NodeConfigSource::Inline(t)) => (
            def.base_dir.join("[node_config] of the image definition"),
            t.clone(),
        ),
        Some(NodeConfigSource::File(p)) => (
            p.clone(),
            std::fs::read_to_string(p).map_err(|err| RootError::Read {
                what: "node config",
                path: p.clone(),
                err,
            })?,
        ),
    };
    basalt_init::nodeconfig::load_toml(&origin, &text).map_err(|diags| RootError::NodeConfig {
        diagnostics: diags
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    })?;
    Ok(Some(text))
}

/// Add the builder's own files. `/boot` is emptied: the ESP is mounted there.
pub fn add_basalt_files(
    tree: &mut Tree,
    def: &ImageDefinition,
    board: &Board,
    init: &Path,
    epoch: u64,
) -> Result<(), RootError> {
    let rel = |p: &str| p.trim_start_matches('/').to_string();

    if let Some(src) = &def.kubernetes.source {
        std::fs::metadata(src).map_err(|err| RootError::Read {
            what: "the Kubernetes binary (kubernetes.source)",
            path: src.clone(),
            err,
        })?;
        let mut e = Entry::file(FileData::HostPath(src.clone()), 0o755);
        e.mtime = epoch;
        ins(tree, &rel(&def.kubernetes.binary), e)?;
    }
    if !matches!(
        tree.get(&def.kubernetes.binary).map(|e| &e.kind),
        Some(EntryKind::File(_))
    ) {
        return Err(RootError::NoKubernetes {
            binary: def.kubernetes.binary.clone(),
        });
    }

    for (path, target) in &def.symlinks {
        let mut e = Entry::symlink(target);
        e.mtime = epoch;
        ins(tree, path, e)?;
    }

    std::fs::metadata(init).map_err(|err| RootError::Read {
        what: "the init binary",
        path: init.to_path_buf(),
        err,
    })?;
    let mut e = Entry::file(FileData::HostPath(init.to_path_buf()), 0o755);
    e.mtime = epoch;
    ins(tree, &rel(slot::ROOT_INIT_PATH), e)?;
    for link in ["sbin/init", "usr/bin/basaltctl"] {
        let mut e = Entry::symlink(slot::ROOT_INIT_PATH);
        e.mtime = epoch;
        // A busybox overlay may have put its own sbin/init here: ours wins.
        tree.remove(link);
        ins(tree, link, e)?;
    }

    ins(
        tree,
        &rel(slot::IMAGE_FACTS_PATH),
        bytes(image_facts(def, board)?, 0o644, epoch),
    )?;
    if let Some(text) = node_config_text(def)? {
        ins(tree, "etc/basalt/node.toml", bytes(text, 0o644, epoch))?;
    }
    let mut d = Entry::dir(0o755);
    d.mtime = epoch;
    ins(tree, &rel(slot::SERVICES_DIR), d)?;
    for (name, src) in &def.services {
        let data = std::fs::read(src).map_err(|err| RootError::Read {
            what: "service file",
            path: src.clone(),
            err,
        })?;
        ins(
            tree,
            &format!("{}/{name}", rel(slot::SERVICES_DIR)),
            bytes(data, 0o644, epoch),
        )?;
    }
    let os_release = format!(
        "NAME=Basalt\nID=basalt\nVERSION_ID={v}\nVERSION=\"{v}\"\nPRETTY_NAME=\"Basalt {v}\"\nVARIANT_ID={b}\nHOME_URL=\"https://example.invalid/basalt\"\n",
        v = def.os_version,
        b = board.name
    );
    ins(tree, "etc/os-release", bytes(os_release, 0o644, epoch))?;

    tree.remove("boot");
    for (m, mode) in [
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("run", 0o755),
        ("var", 0o755),
        ("tmp", 0o1777),
        ("boot", 0o755),
    ] {
        if tree.get(m).is_some_and(|e| !e.is_dir()) {
            tree.remove(m);
        }
        let mut d = Entry::dir(mode);
        d.mtime = epoch;
        ins(tree, m, d)?;
    }
    Ok(())
}
