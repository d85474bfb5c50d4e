//! The slot's initramfs: the init binary, the board's modules and stage 1's
//! settings, laid out exactly as docs/boot-protocol.md ("Initramfs") says.
//! Uncompressed newc cpio, every entry root-owned with mtime SOURCE_DATE_EPOCH.

use std::path::{Path, PathBuf};

use basalt_init::modules::InitramfsSettings;
use basalt_rootfs::tree::{EntryKind, Tree};

use crate::board::Board;
use crate::cpio::{CpioWriter, Meta};
use crate::modules::Resolved;

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("cannot read {what} {path}: {err}")]
    Read {
        what: &'static str,
        path: String,
        err: std::io::Error,
    },
    #[error("module {path} is not a regular file in the root tree")]
    NotAFile { path: String },
    #[error("writing the initramfs: {0}")]
    Write(#[from] std::io::Error),
    #[error("serialising initramfs.toml: {0}")]
    Toml(#[from] toml::ser::Error),
    #[error(transparent)]
    Module(#[from] crate::modules::ModulesError),
}

/// Build the initramfs bytes.
pub fn build(
    board: &Board,
    tree: &Tree,
    modules: &Resolved,
    init: &Path,
    epoch: u32,
) -> Result<Vec<u8>, InitramfsError> {
    let init_bytes = std::fs::read(init).map_err(|err| InitramfsError::Read {
        what: "the init binary",
        path: init.display().to_string(),
        err,
    })?;
    let in_initramfs = |p: &PathBuf| crate::modules::initramfs_path(p).display().to_string();
    // Stage 1 settings, `etc/basalt/initramfs.toml`: init's own type.
    let settings = InitramfsSettings {
        board: board.name.clone(),
        partition_table: board.partition_table.name().to_string(),
        boot_method: Some(board.boot_method.name().to_string()),
        console: Some(board.console.clone()),
        kernel_version: modules.kernel_version.clone(),
        modules: modules.order.iter().map(in_initramfs).collect(),
        late_modules: modules.late.iter().map(in_initramfs).collect(),
        module_deps: Some(
            modules
                .deps
                .iter()
                .map(|(m, d)| (in_initramfs(m), d.iter().map(in_initramfs).collect()))
                .collect(),
        ),
    };
    let settings_text = format!(
        "# Stage 1 settings, written by basalt (docs/boot-protocol.md).\n{}",
        toml::to_string(&settings)?
    );

    let meta = Meta {
        uid: 0,
        gid: 0,
        mtime: epoch,
    };
    let mod_base = Path::new("lib/modules").join(&modules.kernel_version);
    let src_base = Path::new(&board.root.modules_dir).join(&modules.kernel_version);

    // Every directory the archive needs, sorted: parents precede children.
    let mut dirs: std::collections::BTreeSet<PathBuf> = ["dev", "proc", "sys", "newroot", "run"]
        .iter()
        .map(PathBuf::from)
        .collect();
    let mut add_parents = |p: &Path| {
        for a in p.ancestors().skip(1) {
            if !a.as_os_str().is_empty() {
                dirs.insert(a.to_path_buf());
            }
        }
    };
    add_parents(Path::new("etc/basalt/initramfs.toml"));
    for m in modules.order.iter().chain(&modules.late) {
        add_parents(&mod_base.join(crate::modules::initramfs_path(m)));
    }

    enum Item<'a> {
        Dir,
        Console,
        Bytes(&'a [u8], u32),
        Module(&'a Path),
    }
    let mut items: std::collections::BTreeMap<PathBuf, Item> =
        dirs.iter().map(|d| (d.clone(), Item::Dir)).collect();
    items.insert("dev/console".into(), Item::Console);
    items.insert("init".into(), Item::Bytes(&init_bytes, 0o755));
    items.insert(
        "etc/basalt/initramfs.toml".into(),
        Item::Bytes(settings_text.as_bytes(), 0o644),
    );
    for m in modules.order.iter().chain(&modules.late) {
        items.insert(
            mod_base.join(crate::modules::initramfs_path(m)),
            Item::Module(m),
        );
    }

    let mut w = CpioWriter::new(Vec::new());
    for (path, item) in &items {
        let name = path.to_string_lossy();
        match item {
            Item::Dir => w.dir(&name, 0o755, meta)?,
            Item::Console => w.char_dev(&name, 0o600, meta, 5, 1)?,
            Item::Bytes(b, mode) => w.file(&name, *mode, meta, b)?,
            Item::Module(rel) => {
                let src = src_base.join(rel);
                let shown = src.display().to_string();
                let data = match tree.get(&src).map(|e| &e.kind) {
                    Some(EntryKind::File(d)) => d.read().map_err(|err| InitramfsError::Read {
                        what: "module",
                        path: shown,
                        err,
                    })?,
                    _ => return Err(InitramfsError::NotAFile { path: shown }),
                };
                let data = crate::modules::decompress(&src, data)?;
                w.file(&name, 0o644, meta, &data)?;
            }
        }
    }
    Ok(w.finish()?)
}
