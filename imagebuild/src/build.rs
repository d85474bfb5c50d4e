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

use crate::board::{Board, BoardError, PartitionTable};
use crate::disk::MIB;
use crate::imagedef::{ImageDefError, ImageDefinition};
use crate::{data, disk, esp, initramfs, mbr, modules, packages, root, rpiboot, squashfs, verity};

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
    /// Overrides the definition's `os_version` (e.g. a newer version for a bundle).
    pub os_version: Option<String>,
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
    Packages(#[from] packages::PackagesError),
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
    #[error(transparent)]
    Mbr(#[from] mbr::MbrError),
    #[error(transparent)]
    RpiBoot(#[from] rpiboot::RpiBootError),
    #[error(
        "image_size_mib = {mib} is smaller than the {needed_mib} MiB the board's partitions need"
    )]
    ImageSize { mib: u64, needed_mib: u64 },
    #[error("image_size_mib = {mib}: only Raspberry Pi (MBR) images take a fixed size so far")]
    ImageSizeGpt { mib: u64 },
    #[error("the MBR layout has no partition {number}")]
    MbrPartition { number: usize },
    #[error("{what} {path}: {err}")]
    Io {
        what: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error(
        "no init binary found (looked at {looked}). Build it with `scripts/build-init {board}` (for {target}), or pass --init PATH (or set BASALT_INIT)"
    )]
    NoInit {
        looked: String,
        target: String,
        board: String,
    },
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
        board: board.name.clone(),
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

/// What both disk writers get from the common part of the pipeline.
struct Payload<'a> {
    board: &'a Board,
    def: &'a ImageDefinition,
    epoch: u64,
    kernel: &'a [u8],
    initramfs: &'a [u8],
    /// root-a's content: the squashfs, then its dm-verity hash area.
    rootfs: &'a [u8],
    /// `basalt.verity=… basalt.verity_data_blocks=…` for the slot's command line.
    verity_args: String,
    node_config: Option<Vec<u8>>,
}

/// One slot's content, built by the common part of the pipeline: what
/// `basalt build` writes into slot a and `basalt bundle` ships.
pub struct SlotContent {
    pub def: ImageDefinition,
    pub board: Board,
    pub epoch: u64,
    /// The image's file name stem (`<name>.img`).
    pub name: String,
    pub kernel: Vec<u8>,
    pub initramfs: Vec<u8>,
    /// The squashfs zero-padded to the verity hash offset, then the hash area.
    pub rootfs: Vec<u8>,
    pub verity: verity::VerityTree,
    pub modules: Vec<PathBuf>,
    boot_extra: BootExtra,
}

impl std::fmt::Debug for SlotContent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotContent")
            .field("name", &self.name)
            .field("os_version", &self.def.os_version)
            .finish_non_exhaustive()
    }
}

impl SlotContent {
    /// The slot's kernel command line without `basalt.slot` (loader entry
    /// options, or `cmdline.txt` before the slot keys).
    pub fn cmdline(&self) -> String {
        cmdline(&self.board, &self.def, &self.verity.cmdline())
    }
}

impl SlotContent {
    /// Raspberry Pi boards: write `slot`'s boot FAT (what `basalt build` puts
    /// in p2 for slot a, with `config.txt`/`cmdline.txt` naming `slot`) as a
    /// raw image of the board's `boot_mib` at `path`. Update bundles carry one
    /// per target slot (`boot-fat-a`, `boot-fat-b`).
    pub fn pi_boot_fat(
        &self,
        slot: basalt_init::slot::Slot,
        path: &Path,
    ) -> Result<(), BuildError> {
        let (board, def) = (&self.board, &self.def);
        let (Some((pi, _)), BootExtra::Pi { boot, .. }) = (board.pi(), &self.boot_extra) else {
            return Err(rpiboot::RpiBootError::NotPi {
                board: board.name.clone(),
            }
            .into());
        };
        let config_txt = rpiboot::config_txt(pi, &def.rpi, &def.os_version, slot);
        let def_cmdline = format!("{} {}", def.cmdline, self.verity.cmdline());
        let cmdline_txt = rpiboot::cmdline_txt(&board.cmdline, &def_cmdline, slot);
        let mut files: Vec<(&str, &[u8])> = vec![
            (rpiboot::CONFIG_TXT, config_txt.as_bytes()),
            (rpiboot::CMDLINE_TXT, cmdline_txt.as_bytes()),
            (&pi.kernel_file, &self.kernel),
        ];
        if let Some(k) = &pi.kernel_file_pi4 {
            files.push((k, &self.kernel));
        }
        files.push((&pi.initramfs_file, &self.initramfs));
        files.extend(boot.iter().map(|(n, d)| (n.as_str(), d.as_slice())));
        let seed = seed(&[
            board.name.as_bytes(),
            def.os_version.as_bytes(),
            slot.name().as_bytes(),
            self.verity.root_hash_hex().as_bytes(),
        ]);
        let len = board.partitions.boot_mib * MIB;
        let io = |err| BuildError::Io {
            what: "writing a boot FAT image",
            path: path.to_path_buf(),
            err,
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io)?;
        f.set_len(len).map_err(io)?;
        esp::format_labelled(
            &f,
            0,
            len,
            rpiboot::boot_label(slot),
            volume_id(&seed, "boot-volume-id"),
            self.epoch,
        )?;
        esp::add_files(&f, 0, len, &files, self.epoch)?;
        f.sync_all().map_err(io)?;
        Ok(())
    }
}

/// Build one slot's content (no disk image): definitions, root tree,
/// initramfs, squashfs and verity tree.
pub fn slot_content(opts: &BuildOptions) -> Result<SlotContent, BuildError> {
    let mut p = Progress::new(opts.progress, 4);
    let s = prepare(opts, &mut p);
    p.finish();
    s
}

fn prepare(opts: &BuildOptions, p: &mut Progress) -> Result<SlotContent, BuildError> {
    p.step("reading definitions");
    let mut def = match &opts.definition {
        Some(path) => ImageDefinition::load(path)?,
        None => ImageDefinition::embedded_default(
            opts.board
                .as_deref()
                .unwrap_or(crate::imagedef::DEFAULT_WITHOUT_BOARD),
        )?,
    };
    if let Some(v) = &opts.os_version {
        def.os_version = v.clone();
    }
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

    p.step("installing packages, layering overlays");
    let mut tree = packages::base_tree_for_build(&def, &board, epoch)?;
    tree.merge(root::overlays(&def)?).map_err(|err| {
        BuildError::Packages(packages::PackagesError::Tree {
            what: "layering overlays on the packages".into(),
            err,
        })
    })?;
    let boot = root::boot_files(&tree, &board)?;
    let mods = modules::with_late(
        &tree,
        &board.root.modules_dir,
        &boot.kernel_path,
        def.initramfs_modules
            .as_ref()
            .unwrap_or(&board.initramfs.modules),
        &board.initramfs.late_modules,
    )?;
    for w in &mods.warnings {
        eprintln!("warning: {w}");
    }
    let kernel = read_data("reading the kernel", &boot.kernel)?;
    // Board-specific boot files are read before the builder empties /boot.
    let boot_extra = match board.partition_table {
        PartitionTable::Gpt => BootExtra::Gpt {
            bootloader: match &boot.bootloader {
                Some(b) => read_data("reading the bootloader", b)?,
                None => Vec::new(),
            },
        },
        PartitionTable::Mbr => {
            let found = rpiboot::collect(&tree, &board, &def.rpi)?;
            let read_all = |files: Vec<(String, FileData)>| {
                files
                    .into_iter()
                    .map(|(n, d)| Ok((n, read_data("reading a Raspberry Pi boot file", &d)?)))
                    .collect::<Result<Vec<_>, BuildError>>()
            };
            BootExtra::Pi {
                boot: read_all(found.boot)?,
                config: read_all(found.config)?,
            }
        }
    };
    root::add_basalt_files(&mut tree, &def, &board, &init, epoch)?;
    crate::bundle::add_update_keys(&mut tree, &def.update.public_keys, epoch)?;
    tree.clamp_mtime(epoch);

    p.step("writing the initramfs");
    let initramfs = initramfs::build(&board, &tree, &mods, &init, epoch32)?;

    p.step("writing the root filesystem (squashfs)");
    let squashfs = squashfs::write_cached(&tree, epoch32)?;
    // dm-verity: the hash tree follows the squashfs in the root partition; its
    // root hash goes on the slot's command line (docs/boot-protocol.md,
    // "dm-verity"). The salt names no slot: the same bytes fit either slot.
    let root_verity = verity::for_root(&squashfs);
    let rootfs = root_verity.partition_content(&squashfs);
    Ok(SlotContent {
        def,
        board,
        epoch,
        name,
        kernel,
        initramfs,
        rootfs,
        verity: root_verity,
        modules: mods.order.into_iter().chain(mods.late).collect(),
        boot_extra,
    })
}

/// Build an image. Returns what was written.
pub fn build(opts: &BuildOptions) -> Result<BuildReport, BuildError> {
    let mut p = Progress::new(opts.progress, 9);
    let slot = prepare(opts, &mut p)?;
    let (def, board, epoch, name) = (&slot.def, &slot.board, slot.epoch, &slot.name);
    let verity_args = slot.verity.cmdline();

    let node_config = match &opts.node_config {
        Some(path) => Some(std::fs::read(path).map_err(|err| BuildError::Io {
            what: "reading the node config",
            path: path.clone(),
            err,
        })?),
        None => None,
    };

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
    std::fs::create_dir_all(&work).map_err(|err| BuildError::Io {
        what: "creating a work directory",
        path: work.clone(),
        err,
    })?;
    let payload = Payload {
        board,
        def,
        epoch,
        kernel: &slot.kernel,
        initramfs: &slot.initramfs,
        rootfs: &slot.rootfs,
        verity_args,
        node_config,
    };
    let (f, size) = match &slot.boot_extra {
        BootExtra::Gpt { bootloader } => write_gpt(&payload, bootloader, &tmp, &work, &mut p)?,
        BootExtra::Pi { boot, config } => write_mbr(&payload, boot, config, &tmp, &work, &mut p)?,
    };

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
        size,
        root_bytes: payload.rootfs.len() as u64,
        initramfs_bytes: payload.initramfs.len() as u64,
        modules: slot.modules.clone(),
        steps: p.finish(),
    })
}

/// Boot files besides the kernel, per partition table.
enum BootExtra {
    Gpt {
        bootloader: Vec<u8>,
    },
    /// Named files for a slot boot FAT and for the config FAT p1.
    Pi {
        boot: Vec<(String, Vec<u8>)>,
        config: Vec<(String, Vec<u8>)>,
    },
}

/// The board's command line plus the image definition's additions.
fn cmdline(board: &Board, def: &ImageDefinition, verity_args: &str) -> String {
    [board.cmdline.trim(), def.cmdline.trim(), verity_args.trim()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every identifier on the disk derives from this: same inputs, same ids.
fn seed(parts: &[&[u8]]) -> Vec<u8> {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().to_vec()
}

fn volume_id(seed: &[u8], purpose: &str) -> u32 {
    let v = disk::derived_uuid(seed, purpose);
    u32::from_le_bytes([v[0], v[1], v[2], v[3]])
}

/// The data partition: ext4 made by mke2fs in `work`, copied into `part`.
fn write_data(
    f: &mut std::fs::File,
    part: &disk::Part,
    seed: &[u8],
    epoch: u64,
    work: &Path,
) -> Result<(), BuildError> {
    let ext4 = data::make(
        work,
        part.len,
        &disk::uuid_text(&disk::derived_uuid(seed, "data-fs")),
        &disk::uuid_text(&disk::derived_uuid(seed, "data-hash-seed")),
        epoch,
    )?;
    disk::copy_part(f, part, "data_mib", &ext4)?;
    Ok(())
}

/// x86_64: GPT, ESP with systemd-boot, root-a, root-b (empty), data.
fn write_gpt(
    pl: &Payload,
    bootloader: &[u8],
    tmp: &Path,
    work: &Path,
    p: &mut Progress,
) -> Result<(std::fs::File, u64), BuildError> {
    let (board, def, epoch) = (pl.board, pl.def, pl.epoch);
    if let Some(mib) = def.image_size_mib {
        return Err(BuildError::ImageSizeGpt { mib });
    }
    let entry = esp::loader_entry(&def.os_version, "a", &cmdline(board, def, &pl.verity_args));
    let seed = seed(&[
        board.name.as_bytes(),
        def.os_version.as_bytes(),
        &epoch.to_le_bytes(),
        pl.kernel,
        bootloader,
        pl.initramfs,
        pl.rootfs,
        entry.as_bytes(),
        pl.node_config.as_deref().unwrap_or_default(),
    ]);

    p.step("writing the partition table");
    let layout = disk::Layout::new(&board.partitions);
    let mut f = disk::create(tmp, &layout, &seed)?;

    p.step("writing the ESP");
    let e = layout.esp();
    esp::format(&f, e.start, e.len, volume_id(&seed, "esp-volume-id"), epoch)?;
    let loader_conf = esp::loader_conf();
    let boot_path = format!("EFI/BOOT/{}", board.efi_boot_file());
    let mut files: Vec<(&str, &[u8])> = vec![
        (&boot_path, bootloader),
        ("loader/loader.conf", loader_conf.as_bytes()),
        ("loader/entries/basalt-a.conf", entry.as_bytes()),
        ("a/vmlinuz", pl.kernel),
        ("a/initramfs", pl.initramfs),
    ];
    if let Some(nc) = &pl.node_config {
        files.push((basalt_init::slot::NODE_CONFIG_FILE, nc));
    }
    esp::add_files(&f, e.start, e.len, &files, epoch)?;

    p.step("writing the data partition (mke2fs)");
    write_data(&mut f, &layout.data(), &seed, epoch, work)?;

    p.step("writing root-a");
    disk::write_part(&mut f, &layout.root_a(), "root_mib", pl.rootfs)?;
    Ok((f, layout.total))
}

/// Raspberry Pi: MBR, p1 config FAT (`autoboot.txt`, node config, board extras),
/// p2 slot a boot FAT, p3 slot b boot (left unformatted: not bootable until an
/// update writes it), p4 extended → p5 root-a, p6 root-b (empty), p7 data.
fn write_mbr(
    pl: &Payload,
    boot_files: &[(String, Vec<u8>)],
    config_files: &[(String, Vec<u8>)],
    tmp: &Path,
    work: &Path,
    p: &mut Progress,
) -> Result<(std::fs::File, u64), BuildError> {
    use basalt_init::slot::Slot;
    let (board, def, epoch) = (pl.board, pl.def, pl.epoch);
    let Some((pi, _)) = board.pi() else {
        return Err(rpiboot::RpiBootError::NotPi {
            board: board.name.clone(),
        }
        .into());
    };
    let config_txt = rpiboot::config_txt(pi, &def.rpi, &def.os_version, Slot::A);
    let def_cmdline = format!("{} {}", def.cmdline, pl.verity_args);
    let cmdline_txt = rpiboot::cmdline_txt(&board.cmdline, &def_cmdline, Slot::A);
    let autoboot = rpiboot::autoboot_txt();

    let mut slot_files: Vec<(&str, &[u8])> = vec![
        (rpiboot::CONFIG_TXT, config_txt.as_bytes()),
        (rpiboot::CMDLINE_TXT, cmdline_txt.as_bytes()),
        (&pi.kernel_file, pl.kernel),
    ];
    if let Some(k) = &pi.kernel_file_pi4 {
        slot_files.push((k, pl.kernel));
    }
    slot_files.push((&pi.initramfs_file, pl.initramfs));
    slot_files.extend(boot_files.iter().map(|(n, d)| (n.as_str(), d.as_slice())));
    let mut p1_files: Vec<(&str, &[u8])> =
        vec![(basalt_init::rpi::AUTOBOOT_FILE, autoboot.as_bytes())];
    p1_files.extend(config_files.iter().map(|(n, d)| (n.as_str(), d.as_slice())));
    if let Some(nc) = &pl.node_config {
        p1_files.push((basalt_init::slot::NODE_CONFIG_FILE, nc));
    }

    let mut parts: Vec<&[u8]> = vec![board.name.as_bytes(), def.os_version.as_bytes(), pl.rootfs];
    let epoch_bytes = epoch.to_le_bytes();
    parts.push(&epoch_bytes);
    for (n, d) in slot_files.iter().chain(&p1_files) {
        parts.push(n.as_bytes());
        parts.push(d);
    }
    let seed = seed(&parts);

    p.step("writing the partition table");
    let pt = &board.partitions;
    let needed =
        MIB * (1 + pt.config_mib + 2 * pt.boot_mib + 2 * (1 + pt.root_mib) + 1 + pt.data_mib);
    let total = match def.image_size_mib {
        Some(mib) if mib * MIB < needed => {
            return Err(BuildError::ImageSize {
                mib,
                needed_mib: needed / MIB,
            });
        }
        Some(mib) => mib * MIB,
        None => needed,
    };
    let layout = mbr::raspberry_pi_layout(
        total,
        &seed,
        pt.config_mib * MIB,
        pt.boot_mib * MIB,
        pt.root_mib * MIB,
        pt.data_mib * MIB,
    )?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .and_then(|f| f.set_len(total).map(|()| f))
        .map_err(|err| BuildError::Io {
            what: "creating",
            path: tmp.to_path_buf(),
            err,
        })?;
    layout.write(&f)?;
    let part = |number: usize, name: &'static str| -> Result<disk::Part, BuildError> {
        let placed = layout
            .partition(number)
            .ok_or(BuildError::MbrPartition { number })?;
        Ok(disk::Part {
            name,
            type_guid: "",
            start: placed.start * mbr::SECTOR,
            len: placed.sectors * mbr::SECTOR,
        })
    };

    p.step("writing the config and boot partitions");
    let c = part(usize::from(basalt_init::rpi::CONFIG_PARTITION), "config")?;
    esp::format_labelled(
        &f,
        c.start,
        c.len,
        rpiboot::CONFIG_LABEL,
        volume_id(&seed, "config-volume-id"),
        epoch,
    )?;
    esp::add_files(&f, c.start, c.len, &p1_files, epoch)?;
    let b = part(
        usize::from(basalt_init::rpi::boot_partition(Slot::A)),
        "boot-a",
    )?;
    esp::format_labelled(
        &f,
        b.start,
        b.len,
        rpiboot::boot_label(Slot::A),
        volume_id(&seed, "boot-a-volume-id"),
        epoch,
    )?;
    esp::add_files(&f, b.start, b.len, &slot_files, epoch)?;

    p.step("writing the data partition (mke2fs)");
    let d = part(usize::from(basalt_init::rpi::DATA_PARTITION), "data")?;
    write_data(&mut f, &d, &seed, epoch, work)?;

    p.step("writing root-a");
    let r = part(
        usize::from(basalt_init::rpi::root_partition(Slot::A)),
        "root-a",
    )?;
    disk::write_part(&mut f, &r, "root_mib", pl.rootfs)?;
    Ok((f, total))
}
