//! `basalt build`: board + image definition → `<out>/<name>.img`.
//!
//! The pipeline, in order: load definitions → root tree from overlays → boot
//! files and modules found in it → builder's own root files → initramfs →
//! squashfs → identifiers from a hash of all of that → partition table →
//! ESP → data partition → root-a. Output is written to a temporary file and
//! renamed into place, so a failed build never leaves a half image under the
//! final name. Same inputs and SOURCE_DATE_EPOCH give the same bytes.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use basalt_rootfs::tree::FileData;
use sha2::{Digest, Sha256};

use crate::board::{Board, BoardError};
use crate::imagedef::{ImageDefError, ImageDefinition};
use crate::{data, disk, esp, initramfs, modules, root, squashfs, verity};

/// SOURCE_DATE_EPOCH when neither the environment nor the image definition
/// gives one: 2025-01-01T00:00:00Z.
pub const DEFAULT_EPOCH: u64 = 1_735_689_600;

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Image definition file; `None` builds the board's embedded default.
    pub definition: Option<PathBuf>,
    /// Board for the embedded default (`x86_64` when `None`).
    pub board: Option<String>,
    pub out: PathBuf,
    /// `--init`; else `$BASALT_INIT`; else next to the running executable.
    pub init: Option<PathBuf>,
    /// SOURCE_DATE_EPOCH from the environment (wins over the definition's).
    pub source_date_epoch: Option<u64>,
    /// A node config put on the ESP as `node.toml`.
    pub node_config: Option<PathBuf>,
    /// Show a progress bar (the caller checks that stderr is a terminal).
    pub progress: bool,
}

#[derive(Debug)]
pub struct BuildReport {
    pub image: PathBuf,
    pub size: u64,
    pub root_bytes: u64,
    pub initramfs_bytes: u64,
    pub modules: Vec<PathBuf>,
    pub steps: Vec<(&'static str, Duration)>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    ImageDef(#[from] ImageDefError),
    #[error(transparent)]
    Board(#[from] BoardError),
    #[error(transparent)]
    Root(#[from] root::RootError),
    #[error(transparent)]
    Modules(#[from] modules::ModulesError),
    #[error(transparent)]
    Initramfs(#[from] initramfs::InitramfsError),
    #[error(transparent)]
    Squashfs(#[from] squashfs::SquashfsError),
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
    #[error(transparent)]
    Esp(#[from] esp::EspError),
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error("{what} {path}: {err}")]
    Io {
        what: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error(
        "no init binary found (looked at {looked}). Build it with `cargo build --release -p basalt-init --target {target}`, or pass --init PATH (or set BASALT_INIT)"
    )]
    NoInit { looked: String, target: String },
    #[error("SOURCE_DATE_EPOCH {0} is beyond 2106 (squashfs and cpio hold 32-bit times)")]
    Epoch(u64),
}

/// Find the init binary: explicit path, `$BASALT_INIT`, or
/// `<cargo target dir>/<rust target>/release/init` next to this executable.
pub fn find_init(explicit: Option<&Path>, board: &Board) -> Result<PathBuf, BuildError> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("BASALT_INIT").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let mut looked = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // <target>/{debug,release}/basalt or <target>/debug/deps/<test binary>
        for up in exe.ancestors().skip(1).take(3) {
            let cand = up.join(&board.rust_target).join("release").join("init");
            if cand.is_file() {
                return Ok(cand);
            }
            looked.push(cand.display().to_string());
        }
    }
    Err(BuildError::NoInit {
        looked: looked.join(", "),
        target: board.rust_target.clone(),
    })
}

struct Progress {
    bar: Option<indicatif::ProgressBar>,
    start: Instant,
    steps: Vec<(&'static str, Duration)>,
    current: Option<&'static str>,
}

impl Progress {
    fn new(show: bool, total: u64) -> Progress {
        let bar = (show && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(total);
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("{spinner} [{pos}/{len}] {msg} ({elapsed})")
            {
                b.set_style(style);
            }
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        Progress {
            bar,
            start: Instant::now(),
            steps: Vec::new(),
            current: None,
        }
    }

    fn step(&mut self, name: &'static str) {
        self.end_step();
        self.current = Some(name);
        self.start = Instant::now();
        if let Some(b) = &self.bar {
            b.set_message(name);
        }
    }

    fn end_step(&mut self) {
        if let Some(c) = self.current.take() {
            self.steps.push((c, self.start.elapsed()));
            if let Some(b) = &self.bar {
                b.inc(1);
            }
        }
    }

    fn finish(mut self) -> Vec<(&'static str, Duration)> {
        self.end_step();
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        self.steps
    }
}

/// Removes a failed build's temporary files (the partial image, the work
/// directory) unless the build got to the end.
struct Cleanup {
    paths: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = std::fs::remove_dir_all(p);
            let _ = std::fs::remove_file(p);
        }
    }
}

fn read_data(what: &'static str, d: &FileData) -> Result<Vec<u8>, BuildError> {
    d.read().map_err(|err| BuildError::Io {
        what,
        path: match d {
            FileData::HostPath(p) => p.clone(),
            FileData::Bytes(_) => PathBuf::from("(in memory)"),
        },
        err,
    })
}

/// Build an image. Returns what was written.
pub fn build(opts: &BuildOptions) -> Result<BuildReport, BuildError> {
    let mut p = Progress::new(opts.progress, 9);

    p.step("reading definitions");
    let def = match &opts.definition {
        Some(path) => ImageDefinition::load(path)?,
        None => ImageDefinition::embedded_default(opts.board.as_deref().unwrap_or("x86_64"))?,
    };
    let board = Board::load(&def.board, &def.base_dir)?;
    let epoch = opts
        .source_date_epoch
        .or(def.source_date_epoch)
        .unwrap_or(DEFAULT_EPOCH);
    let epoch32 = u32::try_from(epoch).map_err(|_| BuildError::Epoch(epoch))?;
    let init = find_init(opts.init.as_deref(), &board)?;
    let name = def
        .name
        .clone()
        .unwrap_or_else(|| format!("basalt-{}-{}", board.name, def.os_version));

    p.step("layering overlays");
    let mut tree = root::overlays(&def)?;
    let boot = root::boot_files(&tree, &board)?;
    let mods = modules::resolve(
        &tree,
        &board.root.modules_dir,
        &boot.kernel_path,
        &board.initramfs.modules,
    )?;
    let kernel = read_data("reading the kernel", &boot.kernel)?;
    let bootloader = read_data("reading the bootloader", &boot.bootloader)?;
    root::add_basalt_files(&mut tree, &def, &board, &init, epoch)?;
    tree.clamp_mtime(epoch);

    p.step("writing the initramfs");
    let initramfs = initramfs::build(&board, &tree, &mods, &init, epoch32)?;

    p.step("writing the root filesystem (squashfs)");
    let rootfs = squashfs::write(&tree, epoch32)?;
    // dm-verity: the hash tree follows the squashfs in root-a; its root hash goes on the cmdline.
    let root_verity = verity::for_root("root-a", &rootfs);
    let verity_args = root_verity.cmdline();

    let cmdline = [board.cmdline.trim(), def.cmdline.trim(), &verity_args]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    let entry = esp::loader_entry(&def.os_version, "a", &cmdline);
    let node_config = match &opts.node_config {
        Some(path) => Some(std::fs::read(path).map_err(|err| BuildError::Io {
            what: "reading the node config",
            path: path.clone(),
            err,
        })?),
        None => None,
    };

    // Every identifier on the disk derives from this: same inputs, same ids.
    let mut h = Sha256::new();
    for part in [
        board.name.as_bytes(),
        def.os_version.as_bytes(),
        &epoch.to_le_bytes(),
        &kernel,
        &bootloader,
        &initramfs,
        &rootfs,
        entry.as_bytes(),
        node_config.as_deref().unwrap_or_default(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    let seed = h.finalize();

    p.step("writing the partition table");
    std::fs::create_dir_all(&opts.out).map_err(|err| BuildError::Io {
        what: "creating the output directory",
        path: opts.out.clone(),
        err,
    })?;
    let image = opts.out.join(format!("{name}.img"));
    let tmp = opts.out.join(format!(".{name}.img.partial"));
    let work = opts.out.join(format!(".{name}.work"));
    let mut cleanup = Cleanup {
        paths: vec![tmp.clone(), work.clone()],
    };
    let layout = disk::Layout::new(&board.partitions);
    let mut f = disk::create(&tmp, &layout, &seed)?;

    p.step("writing the ESP");
    let e = layout.esp();
    let vol = disk::derived_uuid(&seed, "esp-volume-id");
    esp::format(
        &f,
        e.start,
        e.len,
        u32::from_le_bytes([vol[0], vol[1], vol[2], vol[3]]),
        epoch,
    )?;
    let loader_conf = esp::loader_conf();
    let boot_path = format!("EFI/BOOT/{}", board.efi_boot_file());
    let mut files: Vec<(&str, &[u8])> = vec![
        (&boot_path, &bootloader),
        ("loader/loader.conf", loader_conf.as_bytes()),
        ("loader/entries/basalt-a.conf", entry.as_bytes()),
        ("a/vmlinuz", &kernel),
        ("a/initramfs", &initramfs),
    ];
    if let Some(nc) = &node_config {
        files.push((basalt_init::slot::NODE_CONFIG_FILE, nc));
    }
    esp::add_files(&f, e.start, e.len, &files, epoch)?;

    p.step("writing the data partition (mke2fs)");
    std::fs::create_dir_all(&work).map_err(|err| BuildError::Io {
        what: "creating a work directory",
        path: work.clone(),
        err,
    })?;
    let d = layout.data();
    let ext4 = data::make(
        &work,
        d.len,
        &disk::uuid_text(&disk::derived_uuid(&seed, "data-fs")),
        &disk::uuid_text(&disk::derived_uuid(&seed, "data-hash-seed")),
        epoch,
    )?;
    disk::copy_part(&mut f, &d, "data_mib", &ext4)?;

    p.step("writing root-a");
    let root_a = root_verity.partition_content(&rootfs);
    disk::write_part(&mut f, &layout.root_a(), "root_mib", &root_a)?;

    p.step("finishing");
    f.sync_all().map_err(|err| BuildError::Io {
        what: "syncing",
        path: tmp.clone(),
        err,
    })?;
    drop(f);
    std::fs::rename(&tmp, &image).map_err(|err| BuildError::Io {
        what: "renaming into place",
        path: image.clone(),
        err,
    })?;
    cleanup.paths.retain(|p| *p != tmp);
    drop(cleanup);
    Ok(BuildReport {
        image,
        size: layout.total,
        root_bytes: rootfs.len() as u64,
        initramfs_bytes: initramfs.len() as u64,
        modules: mods.order,
        steps: p.finish(),
    })
}
