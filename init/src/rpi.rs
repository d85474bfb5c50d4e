//! Raspberry Pi firmware A/B: which slot the firmware booted, `autoboot.txt`
//! (the primary slot), the one-shot trial (`reboot "0 tryboot"` or `reboot N`),
//! commit, and the stage 1 rules for boards whose firmware has no working tryboot.
//!
//! Formats and firmware rules: ../shared/REFERENCE.md §1.4–§1.6. Partition numbers are
//! the MBR layout of DESIGN.md: p1 config FAT (`autoboot.txt`, node config, trial
//! marker), p2/p3 slot a/b boot FAT, p5/p6 slot a/b root, p7 data.
//!
//! This module owns pure logic and plain file writes on the mounted config partition.
//! It never issues a syscall with `unsafe`: `reboot(2)` with a string argument and the
//! watchdog ioctls belong to init's sys module and reach this code through the
//! [`RebootWithArg`] and [`Watchdog`] traits.
//!
//! [`model`] is an executable model of the firmware's documented selection rules; the
//! tests cut power between every two disk writes of an update and a commit and check
//! that the model always boots a good slot.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::slot::Slot;

/// Where the firmware publishes what it did (§1.4); the Pi 4/5 EEPROM bootloader fills it.
pub const BOOTLOADER_DT_DIR: &str = "/proc/device-tree/chosen/bootloader";
/// MBR partition number of the config FAT (`autoboot.txt`, node config).
pub const CONFIG_PARTITION: u8 = 1;
/// MBR partition number of the data partition (inside the extended partition).
pub const DATA_PARTITION: u8 = 7;
/// The file on the config partition that names the primary slot.
pub const AUTOBOOT_FILE: &str = "autoboot.txt";
/// Temporary name for a new `autoboot.txt`. An 8.3 name, so vfat stores it as a single
/// short directory entry (no long-name entries), like `autoboot.txt` itself.
pub const AUTOBOOT_TMP_FILE: &str = "autoboot.new";
/// The firmware reads at most this many bytes of `autoboot.txt` (§1.4).
pub const AUTOBOOT_MAX_BYTES: usize = 512;
/// Trial marker on the config partition (boards without working tryboot, see [`Stage1Plan`]).
pub const TRIAL_MARKER_FILE: &str = "trial.txt";
/// Temporary name for a new trial marker (8.3, as above).
pub const TRIAL_MARKER_TMP_FILE: &str = "trial.new";
/// The `reboot(2)` argument that asks the firmware for a one-shot tryboot (§1.5).
pub const TRYBOOT_REBOOT_ARG: &str = "0 tryboot";
/// Watchdog timeout stage 1 arms for a trial boot. `bcm2835_wdt` can count at most
/// about 15 s (a 20-bit counter of 16 µs ticks), so this is near its maximum.
pub const TRIAL_WATCHDOG_SECS: u32 = 15;

/// MBR partition number of a slot's boot FAT (p2 for a, p3 for b).
pub fn boot_partition(slot: Slot) -> u8 {
    match slot {
        Slot::A => 2,
        Slot::B => 3,
    }
}

/// MBR partition number of a slot's root filesystem (p5 for a, p6 for b).
pub fn root_partition(slot: Slot) -> u8 {
    match slot {
        Slot::A => 5,
        Slot::B => 6,
    }
}

/// The slot whose boot FAT is partition `n`, if any.
pub fn slot_of_boot_partition(n: u32) -> Option<Slot> {
    match n {
        2 => Some(Slot::A),
        3 => Some(Slot::B),
        _ => None,
    }
}

#[derive(Debug, Error)]
pub enum RpiError {
    #[error("reading device-tree property {path}: {source}")]
    ReadDeviceTree { path: PathBuf, source: io::Error },
    #[error("device-tree property {path} is {len} bytes, expected a 4-byte big-endian u32")]
    DeviceTreeLength { path: PathBuf, len: usize },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("autoboot.txt is {len} bytes; the firmware reads at most {AUTOBOOT_MAX_BYTES}")]
    AutobootTooLong { len: usize },
    #[error("autoboot.txt line {line}: {what}")]
    AutobootSyntax { line: usize, what: String },
    #[error("autoboot.txt is not Basalt's A/B form: {what}")]
    AutobootNotAb { what: String },
    #[error("trial marker {TRIAL_MARKER_FILE} line {line}: {what}")]
    MarkerSyntax { line: usize, what: String },
    #[error("commit of slot {booted}: autoboot.txt already names slot {booted} as primary")]
    AlreadyPrimary { booted: &'static str },
    #[error(
        "update refused: slot {booted} is running but autoboot.txt names slot {primary} as primary"
    )]
    NotPrimary {
        booted: &'static str,
        primary: &'static str,
    },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("renaming {from} to {to}: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
    #[error("syncing directory {path}: {source}")]
    SyncDir { path: PathBuf, source: io::Error },
    #[error("removing {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("reboot(2) with argument {arg:?}: {source}")]
    Reboot { arg: String, source: io::Error },
    #[error("arming the watchdog for {secs} s: {source}")]
    Watchdog { secs: u32, source: io::Error },
}

// ---------------------------------------------------------------------------------------
// What the firmware tells us: /proc/device-tree/chosen/bootloader

/// `/chosen/bootloader/capabilities` (§1.4). Only the BCM2711/BCM2712 EEPROM bootloader
/// publishes it; Pi 3 and older have no such property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities(pub u32);

impl Capabilities {
    pub const VLI_USB_BOOT: u32 = 1 << 0;
    pub const NETWORK_BOOT: u32 = 1 << 1;
    pub const TRYBOOT_A_B: u32 = 1 << 2;
    pub const TRYBOOT: u32 = 1 << 3;
    pub const BCM2711_USB_BOOT: u32 = 1 << 4;
    pub const RAMDISK: u32 = 1 << 5;
    pub const NVME_BOOT: u32 = 1 << 6;
    pub const SECURE_BOOT: u32 = 1 << 7;

    pub fn has(self, bit: u32) -> bool {
        self.0 & bit == bit
    }

    /// Both `tryboot` and `tryboot_a_b` (bits 3 and 2): what firmware A/B needs.
    pub fn tryboot_a_b(self) -> bool {
        self.has(Self::TRYBOOT) && self.has(Self::TRYBOOT_A_B)
    }
}

/// The three properties the bootloader leaves under `/chosen/bootloader`. `None` means
/// the property is missing (older firmware, Pi 3, not a Pi): "unknown", not zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BootloaderInfo {
    pub partition: Option<u32>,
    pub tryboot: Option<u32>,
    pub capabilities: Option<Capabilities>,
}

impl BootloaderInfo {
    /// Reads `partition`, `tryboot` and `capabilities` under `dir` (normally
    /// [`BOOTLOADER_DT_DIR`]). Each is a 4-byte big-endian u32 (RAUC reads them the same
    /// way, §1.4); a missing file is "unknown", a file of another length is an error.
    pub fn read(dir: &Path) -> Result<BootloaderInfo, RpiError> {
        Ok(BootloaderInfo {
            partition: read_dt_u32(&dir.join("partition"))?,
            tryboot: read_dt_u32(&dir.join("tryboot"))?,
            capabilities: read_dt_u32(&dir.join("capabilities"))?.map(Capabilities),
        })
    }

    /// The slot whose boot partition the firmware booted, if it said.
    pub fn booted_slot(&self) -> Option<Slot> {
        self.partition.and_then(slot_of_boot_partition)
    }

    /// Whether this boot is the one-shot tryboot, if the firmware said.
    pub fn is_tryboot(&self) -> Option<bool> {
        self.tryboot.map(|v| v != 0)
    }
}

pub(crate) fn read_dt_u32(path: &Path) -> Result<Option<u32>, RpiError> {
    match fs::read(path) {
        Ok(bytes) => match <[u8; 4]>::try_from(bytes.as_slice()) {
            Ok(word) => Ok(Some(u32::from_be_bytes(word))),
            Err(_) => Err(RpiError::DeviceTreeLength {
                path: path.to_path_buf(),
                len: bytes.len(),
            }),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RpiError::ReadDeviceTree {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Shows a property as the firmware gave it, or `unknown`.
pub struct DtShow(pub Option<u32>);

impl fmt::Display for DtShow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{v}"),
            None => f.write_str("unknown"),
        }
    }
}

impl fmt::Display for BootloaderInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "partition={} tryboot={} capabilities=",
            DtShow(self.partition),
            DtShow(self.tryboot)
        )?;
        match self.capabilities {
            Some(c) => write!(f, "{:#x}", c.0),
            None => f.write_str("unknown"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// autoboot.txt

/// What the firmware takes from `autoboot.txt` for one value of the tryboot flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AutobootEval {
    /// `boot_partition=`; `None` when no active line set it (the firmware then uses 0,
    /// "the first bootable FAT partition").
    pub boot_partition: Option<u8>,
    pub tryboot_a_b: bool,
}

/// Evaluates `autoboot.txt` the way the firmware documents it (§1.4): lines before any
/// filter and under `[all]` always apply, `[none]` never, `[tryboot]` only when the
/// one-shot tryboot flag is set; a later line overrides an earlier one. Only those three
/// filters exist in `autoboot.txt`; anything else is an error here.
pub fn evaluate_autoboot(text: &[u8], tryboot: bool) -> Result<AutobootEval, RpiError> {
    if text.len() > AUTOBOOT_MAX_BYTES {
        return Err(RpiError::AutobootTooLong { len: text.len() });
    }
    let text = std::str::from_utf8(text).map_err(|_| RpiError::AutobootSyntax {
        line: 0,
        what: "not UTF-8 text".into(),
    })?;
    let mut eval = AutobootEval::default();
    let mut active = true;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let syntax = |what: String| RpiError::AutobootSyntax {
            line: line_no,
            what,
        };
        if let Some(filter) = line.strip_prefix('[') {
            active = match filter.strip_suffix(']') {
                Some("all") => true,
                Some("none") => false,
                Some("tryboot") => tryboot,
                _ => return Err(syntax(format!("unknown filter {line}"))),
            };
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| syntax(format!("expected key=value, found {line:?}")))?;
        let value = value.trim();
        match key.trim() {
            "boot_partition" => {
                let n: u8 = value
                    .parse()
                    .ok()
                    .filter(|n| *n <= 63)
                    .ok_or_else(|| syntax(format!("bad boot_partition {value:?}")))?;
                if active {
                    eval.boot_partition = Some(n);
                }
            }
            "tryboot_a_b" => {
                let on = match value {
                    "0" => false,
                    "1" => true,
                    _ => return Err(syntax(format!("bad tryboot_a_b {value:?}"))),
                };
                if active {
                    eval.tryboot_a_b = on;
                }
            }
            other => return Err(syntax(format!("unknown key {other:?}"))),
        }
    }
    Ok(eval)
}

/// Basalt's `autoboot.txt`: the primary slot boots by default, the other slot on a
/// one-shot tryboot. Boards without working tryboot use the same file; there only the
/// `[all]` part matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Autoboot {
    pub primary: Slot,
}

impl Autoboot {
    /// The canonical file (exactly RAUC's, §1.4).
    pub fn render(&self) -> String {
        format!(
            "[all]\ntryboot_a_b=1\nboot_partition={}\n[tryboot]\nboot_partition={}\n",
            boot_partition(self.primary),
            boot_partition(self.primary.other())
        )
    }

    /// Parses any `autoboot.txt` that evaluates like Basalt's A/B form: `tryboot_a_b=1`,
    /// the primary slot's boot partition without tryboot, the other slot's with it.
    pub fn parse(text: &[u8]) -> Result<Autoboot, RpiError> {
        let normal = evaluate_autoboot(text, false)?;
        let trial = evaluate_autoboot(text, true)?;
        let not_ab = |what: String| RpiError::AutobootNotAb { what };
        let primary = normal
            .boot_partition
            .and_then(|n| slot_of_boot_partition(n.into()))
            .ok_or_else(|| {
                not_ab(format!(
                    "boot_partition is {:?}, not a slot's boot partition",
                    normal.boot_partition
                ))
            })?;
        if !trial.tryboot_a_b {
            return Err(not_ab("tryboot_a_b=1 is not set".into()));
        }
        let expected = boot_partition(primary.other());
        if trial.boot_partition != Some(expected) {
            return Err(not_ab(format!(
                "[tryboot] boot_partition is {:?}, expected {expected}",
                trial.boot_partition
            )));
        }
        Ok(Autoboot { primary })
    }

    /// The file after a commit of the other slot: the two partition numbers swapped.
    pub fn swapped(self) -> Autoboot {
        Autoboot {
            primary: self.primary.other(),
        }
    }
}

/// Reads and parses `autoboot.txt` from the mounted config partition `dir`.
pub fn read_autoboot(dir: &Path) -> Result<Autoboot, RpiError> {
    let path = dir.join(AUTOBOOT_FILE);
    let text = fs::read(&path).map_err(|source| RpiError::Read { path, source })?;
    Autoboot::parse(&text)
}

/// Replaces `dir/name` with `bytes` so that a power cut leaves the old or the new file:
/// write `dir/tmp_name`, fsync it, rename it over `name`, fsync `dir`.
///
/// Why this holds on FAT, as far as it goes: Linux vfat implements a rename over an
/// existing file by pointing the *target's* directory entry at the new file's first
/// cluster and size (`vfat_rename` attaches the source inode at the target's `i_pos`),
/// then deleting the source entry. With 8.3 names and a file smaller than a cluster,
/// the whole switch is one 32-byte directory entry inside one 512-byte sector. The
/// fsync of the file before the rename puts its data and FAT chain on disk first, so
/// the entry can never point at unwritten clusters; the fsync of the directory after
/// it makes the switch durable before we report success (or reboot).
///
/// What FAT does not guarantee: there is no journal, so the source-entry deletion and
/// the freeing of the old clusters are separate writes that a cut can separate from
/// the switch (leaving a stray `autoboot.new` or lost clusters for fsck — harmless to
/// the firmware, which reads only `autoboot.txt`), and the atomicity of a single
/// sector write is the SD card's promise, not the filesystem's: a card that tears a
/// sector on power loss can corrupt the directory sector. [`model`] checks the
/// sequence under the first assumption only.
pub fn replace_file_atomically(
    dir: &Path,
    name: &str,
    tmp_name: &str,
    bytes: &[u8],
) -> Result<(), RpiError> {
    let tmp = dir.join(tmp_name);
    let target = dir.join(name);
    let write_err = |source| RpiError::Write {
        path: tmp.clone(),
        source,
    };
    let mut file = fs::File::create(&tmp).map_err(write_err)?;
    file.write_all(bytes).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    drop(file);
    fs::rename(&tmp, &target).map_err(|source| RpiError::Rename {
        from: tmp.clone(),
        to: target.clone(),
        source,
    })?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), RpiError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| RpiError::SyncDir {
            path: dir.to_path_buf(),
            source,
        })
}

/// Writes `autoboot.txt` naming `autoboot.primary`, atomically (see
/// [`replace_file_atomically`]).
pub fn write_autoboot(dir: &Path, autoboot: Autoboot) -> Result<(), RpiError> {
    replace_file_atomically(
        dir,
        AUTOBOOT_FILE,
        AUTOBOOT_TMP_FILE,
        autoboot.render().as_bytes(),
    )
}

/// Commit: makes the booted (trial) slot primary by rewriting `autoboot.txt` with the
/// two partition numbers swapped. Refuses when the booted slot is already primary, so a
/// repeated commit never flips the device back. Returns the file now on disk.
pub fn commit(dir: &Path, booted: Slot) -> Result<Autoboot, RpiError> {
    let current = read_autoboot(dir)?;
    if current.primary == booted {
        return Err(RpiError::AlreadyPrimary {
            booted: booted.name(),
        });
    }
    let new = current.swapped();
    write_autoboot(dir, new)?;
    Ok(new)
}

// ---------------------------------------------------------------------------------------
// Update: the order in which the inactive slot is written

/// One step of writing a slot during an update, in [`slot_write_order`]'s order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotWrite {
    /// Zero the first sector (the FAT boot sector) of the slot's boot partition: from
    /// now on the firmware does not see a FAT there, so it is not bootable.
    InvalidateBoot { partition: u8 },
    /// Stream the root filesystem (and its verity tree) into the root partition; fsync.
    Root { partition: u8 },
    /// Stream the boot FAT image except its first sector; fsync.
    BootBody { partition: u8 },
    /// Write the boot FAT's first sector last; fsync. Only now is the slot bootable.
    BootFirstSector { partition: u8 },
}

/// How the update agent writes `target`: a boot partition the firmware can boot always
/// sits over a complete root, whatever instant the power is cut (the model's
/// power-cut tests check this, and show that skipping the first step breaks it on
/// firmware that boots the first bootable partition).
pub fn slot_write_order(target: Slot) -> [SlotWrite; 4] {
    let (boot, root) = (boot_partition(target), root_partition(target));
    [
        SlotWrite::InvalidateBoot { partition: boot },
        SlotWrite::Root { partition: root },
        SlotWrite::BootBody { partition: boot },
        SlotWrite::BootFirstSector { partition: boot },
    ]
}

/// The slot an update may overwrite: the other one, and only while the booted slot is
/// the primary that `autoboot.txt` names (never during a trial, never on a slot the
/// firmware picked without `autoboot.txt`).
pub fn update_target(config_dir: &Path, booted: Slot) -> Result<Slot, RpiError> {
    let autoboot = read_autoboot(config_dir)?;
    if autoboot.primary != booted {
        return Err(RpiError::NotPrimary {
            booted: booted.name(),
            primary: autoboot.primary.name(),
        });
    }
    Ok(booted.other())
}

// ---------------------------------------------------------------------------------------
// Trial: what to ask the firmware for

/// `reboot(2)` with `LINUX_REBOOT_CMD_RESTART2` and a string argument. Implemented by
/// init's sys module; faked in tests.
pub trait RebootWithArg {
    fn reboot_with_arg(&self, arg: &str) -> io::Result<()>;
}

/// The hardware watchdog (`bcm2835_wdt` via `/dev/watchdog`). Implemented by init's
/// sys module; faked in tests. Once armed it must be pinged or the SoC resets.
pub trait Watchdog {
    /// Arms it asking for `timeout_secs`; returns the timeout in effect
    /// (the driver may round it or keep its own).
    fn arm(&self, timeout_secs: u32) -> io::Result<u32>;
}

/// How a board's firmware is asked to boot the trial slot once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootMethod {
    /// Pi 4/400/CM4/5: `autoboot.txt` `[tryboot]` + `reboot "0 tryboot"` (one-shot flag).
    Tryboot,
    /// Pi 3/Zero 2 W/32-bit Pis: `reboot N` names the partition for one boot; a trial
    /// marker on p1 and the watchdog armed by stage 1 bring a failed trial back.
    RebootPartition,
}

impl BootMethod {
    /// The board file's `boot_method` value.
    pub fn name(self) -> &'static str {
        match self {
            BootMethod::Tryboot => "tryboot",
            BootMethod::RebootPartition => "reboot-partition",
        }
    }

    pub fn parse(s: &str) -> Option<BootMethod> {
        match s {
            "tryboot" => Some(BootMethod::Tryboot),
            "reboot-partition" => Some(BootMethod::RebootPartition),
            _ => None,
        }
    }
}

/// The reboot a trial of `target` needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrialReboot {
    /// `reboot "0 tryboot"`.
    Tryboot,
    /// Write the trial marker for `target`, then `reboot "<partition>"`.
    Partition { partition: u8, marker: TrialMarker },
}

impl TrialReboot {
    pub fn arg(&self) -> String {
        match self {
            TrialReboot::Tryboot => TRYBOOT_REBOOT_ARG.to_string(),
            TrialReboot::Partition { partition, .. } => partition.to_string(),
        }
    }
}

/// The method this boot uses. When the bootloader publishes its capabilities they
/// decide: both tryboot bits → tryboot, otherwise `reboot N` (an EEPROM older than
/// 2022-10-18, §1.6, on a tryboot board; or a 32-bit image on a Pi 4 with a current
/// EEPROM, which gets tryboot although its board says `reboot N`). Without the property
/// (Pi 3 and older never publish it) the board's method stands. Stage 1 and the update
/// agent both ask this, so they agree on whether a trial marker is in play.
pub fn effective_method(board: BootMethod, capabilities: Option<Capabilities>) -> BootMethod {
    match capabilities {
        Some(caps) if caps.tryboot_a_b() => BootMethod::Tryboot,
        Some(_) => BootMethod::RebootPartition,
        None => board,
    }
}

/// Chooses the trial reboot for `target` (see [`effective_method`]).
pub fn plan_trial(method: BootMethod, info: &BootloaderInfo, target: Slot) -> TrialReboot {
    match effective_method(method, info.capabilities) {
        BootMethod::Tryboot => TrialReboot::Tryboot,
        BootMethod::RebootPartition => TrialReboot::Partition {
            partition: boot_partition(target),
            marker: TrialMarker {
                kind: MarkerKind::Trial,
                slot: target,
                attempts: 0,
            },
        },
    }
}

/// Carries out a planned trial reboot: the marker first (atomically, on the config
/// partition `config_dir`), then `reboot(2)`. Returns only if the reboot failed.
pub fn start_trial(
    config_dir: &Path,
    trial: &TrialReboot,
    reboot: &dyn RebootWithArg,
) -> Result<(), RpiError> {
    if let TrialReboot::Partition { marker, .. } = trial {
        write_marker(config_dir, marker)?;
    }
    let arg = trial.arg();
    reboot
        .reboot_with_arg(&arg)
        .map_err(|source| RpiError::Reboot { arg, source })
}

/// Whether the running boot is a trial of a tryboot board (§1.4 update flow): the
/// firmware says tryboot=1 and the partition it booted is the `[tryboot]` partition.
pub fn is_tryboot_trial(info: &BootloaderInfo, autoboot: Autoboot) -> bool {
    info.is_tryboot() == Some(true)
        && info.partition == Some(boot_partition(autoboot.primary.other()).into())
}

// ---------------------------------------------------------------------------------------
// Boards without working tryboot: the trial marker and stage 1's decision

/// Why a marker exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkerKind {
    /// The update agent asked for one trial boot of `slot` with `reboot N`.
    Trial,
    /// Stage 1 of a non-primary slot asked for `reboot N` into the primary `slot`
    /// (the firmware had ignored `autoboot.txt`).
    Redirect,
}

/// `trial.txt` on the config partition: a `reboot N` into `slot` was requested and
/// `attempts` boots of it have started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrialMarker {
    pub kind: MarkerKind,
    pub slot: Slot,
    pub attempts: u32,
}

impl TrialMarker {
    pub fn render(&self) -> String {
        let kind = match self.kind {
            MarkerKind::Trial => "trial",
            MarkerKind::Redirect => "redirect",
        };
        format!(
            "kind={kind}\nslot={}\nattempts={}\n",
            self.slot.name(),
            self.attempts
        )
    }

    pub fn parse(text: &str) -> Result<TrialMarker, RpiError> {
        let (mut kind, mut slot, mut attempts) = (None, None, None);
        for (i, line) in text.lines().enumerate() {
            let bad = |what: String| RpiError::MarkerSyntax { line: i + 1, what };
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| bad(format!("expected key=value, found {line:?}")))?;
            match k {
                "kind" => {
                    kind = Some(match v {
                        "trial" => MarkerKind::Trial,
                        "redirect" => MarkerKind::Redirect,
                        _ => return Err(bad(format!("bad kind {v:?}"))),
                    })
                }
                "slot" => {
                    slot = Some(Slot::parse(v).ok_or_else(|| bad(format!("bad slot {v:?}")))?)
                }
                "attempts" => {
                    attempts = Some(v.parse().map_err(|_| bad(format!("bad attempts {v:?}")))?)
                }
                _ => return Err(bad(format!("unknown key {k:?}"))),
            }
        }
        let missing = |key: &str| RpiError::MarkerSyntax {
            line: 0,
            what: format!("missing {key}"),
        };
        Ok(TrialMarker {
            kind: kind.ok_or_else(|| missing("kind"))?,
            slot: slot.ok_or_else(|| missing("slot"))?,
            attempts: attempts.ok_or_else(|| missing("attempts"))?,
        })
    }
}

/// Reads the trial marker; `None` if there is none.
pub fn read_marker(dir: &Path) -> Result<Option<TrialMarker>, RpiError> {
    let path = dir.join(TRIAL_MARKER_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => TrialMarker::parse(&text).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RpiError::Read { path, source }),
    }
}

/// Writes the trial marker atomically (see [`replace_file_atomically`]).
pub fn write_marker(dir: &Path, marker: &TrialMarker) -> Result<(), RpiError> {
    replace_file_atomically(
        dir,
        TRIAL_MARKER_FILE,
        TRIAL_MARKER_TMP_FILE,
        marker.render().as_bytes(),
    )
}

/// Removes the trial marker (one directory-entry write) and syncs the directory.
pub fn remove_marker(dir: &Path) -> Result<(), RpiError> {
    let path = dir.join(TRIAL_MARKER_FILE);
    match fs::remove_file(&path) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RpiError::Remove { path, source }),
    }
}

/// What stage 1 does with the trial marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkerChange {
    Keep,
    Write(TrialMarker),
    Remove,
}

/// What stage 1 reports about a trial that came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage1Report {
    None,
    /// A trial of `slot` did not commit; the primary booted instead.
    TrialRolledBack {
        slot: Slot,
        attempts: u32,
    },
    /// A commit happened but its marker survived (power cut between the two writes).
    StaleMarker,
    /// `autoboot.txt` names another slot and a `reboot N` into it did not take: the
    /// firmware ignores both. The booted slot is complete (its boot FAT is written last)
    /// but is not the primary.
    RedirectIgnored {
        primary: Slot,
    },
    /// `autoboot.txt` could not be read; the booted slot continues.
    PrimaryUnknown,
}

/// Stage 1's decision on a `reboot N` board, made before it mounts anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage1Plan {
    /// Boot this slot. `watchdog_secs` is set for a trial: arm the watchdog now, stage 2
    /// pings it and the health gate commits.
    Continue {
        marker: MarkerChange,
        watchdog_secs: Option<u32>,
        report: Stage1Report,
    },
    /// Change the marker, then `reboot N` into `partition` without booting further.
    Reboot { marker: MarkerChange, partition: u8 },
}

/// Stage 1's rules on a board without working tryboot. `booted` is the slot from the
/// kernel command line, `primary` the slot `autoboot.txt` names (`None` if unreadable),
/// `marker` the trial marker on p1.
///
/// - A marker for the primary slot is stale (a commit or redirect finished): remove it.
/// - First boot of a trial (marker for this slot, 0 attempts): record the attempt
///   *before* anything can hang, arm the watchdog, boot.
/// - The trial slot boots again with its attempt used (the watchdog or a panic reset
///   kept the `reboot N` partition, or the firmware ignored `autoboot.txt`): `reboot`
///   into the primary.
/// - The primary boots with a marker for the other slot: the trial came back; report
///   and remove the marker.
/// - A non-primary slot boots with no marker: the firmware ignored `autoboot.txt`;
///   redirect once with `reboot N`, and if that lands here again, boot and report.
pub fn stage1_plan(booted: Slot, primary: Option<Slot>, marker: Option<TrialMarker>) -> Stage1Plan {
    let Some(primary) = primary else {
        return Stage1Plan::Continue {
            marker: MarkerChange::Keep,
            watchdog_secs: None,
            report: Stage1Report::PrimaryUnknown,
        };
    };
    let cont = |marker, report| Stage1Plan::Continue {
        marker,
        watchdog_secs: None,
        report,
    };
    match marker {
        // Trial markers for the primary are stale (commit done); redirect markers for
        // the primary are done once the primary boots.
        Some(m) if m.slot == primary && booted == primary => match m.kind {
            MarkerKind::Trial => cont(MarkerChange::Remove, Stage1Report::StaleMarker),
            MarkerKind::Redirect => cont(MarkerChange::Remove, Stage1Report::None),
        },
        Some(m) if m.slot == primary => match m.kind {
            // A redirect into the primary that landed here again: boot, report, and
            // drop the marker so the next boot tries once more.
            MarkerKind::Redirect if m.attempts >= 1 => cont(
                MarkerChange::Remove,
                Stage1Report::RedirectIgnored { primary },
            ),
            _ => redirect(primary),
        },
        // From here the marker names the non-primary slot. A redirect there is stale
        // (the primary changed since): drop it and apply the rules without a marker.
        Some(m) if m.kind == MarkerKind::Redirect => {
            if booted == primary {
                cont(MarkerChange::Remove, Stage1Report::StaleMarker)
            } else {
                redirect(primary)
            }
        }
        // A trial of the non-primary slot.
        Some(m) if booted == m.slot && m.attempts == 0 && m.kind == MarkerKind::Trial => {
            Stage1Plan::Continue {
                marker: MarkerChange::Write(TrialMarker { attempts: 1, ..m }),
                watchdog_secs: Some(TRIAL_WATCHDOG_SECS),
                report: Stage1Report::None,
            }
        }
        Some(m) if booted == m.slot => Stage1Plan::Reboot {
            marker: MarkerChange::Keep,
            partition: boot_partition(primary),
        },
        Some(m) => cont(
            MarkerChange::Remove,
            Stage1Report::TrialRolledBack {
                slot: m.slot,
                attempts: m.attempts,
            },
        ),
        None if booted == primary => cont(MarkerChange::Keep, Stage1Report::None),
        None => redirect(primary),
    }
}

fn redirect(primary: Slot) -> Stage1Plan {
    Stage1Plan::Reboot {
        marker: MarkerChange::Write(TrialMarker {
            kind: MarkerKind::Redirect,
            slot: primary,
            attempts: 1,
        }),
        partition: boot_partition(primary),
    }
}

/// Carries out a [`Stage1Plan`] against the mounted config partition `config_dir`.
/// Returns `Ok(())` when stage 1 should go on booting; a `Reboot` plan returns only if
/// `reboot(2)` failed.
pub fn apply_stage1_plan(
    config_dir: &Path,
    plan: &Stage1Plan,
    watchdog: &dyn Watchdog,
    reboot: &dyn RebootWithArg,
) -> Result<(), RpiError> {
    let change_marker = |m: &MarkerChange| match m {
        MarkerChange::Keep => Ok(()),
        MarkerChange::Write(marker) => write_marker(config_dir, marker),
        MarkerChange::Remove => remove_marker(config_dir),
    };
    match plan {
        Stage1Plan::Continue {
            marker,
            watchdog_secs,
            ..
        } => {
            // The attempt is on disk before the watchdog starts counting.
            change_marker(marker)?;
            if let Some(secs) = *watchdog_secs {
                watchdog
                    .arm(secs)
                    .map_err(|source| RpiError::Watchdog { secs, source })?;
            }
            Ok(())
        }
        Stage1Plan::Reboot { marker, partition } => {
            change_marker(marker)?;
            let arg = partition.to_string();
            reboot
                .reboot_with_arg(&arg)
                .map_err(|source| RpiError::Reboot { arg, source })
        }
    }
}

/// Commit on a `reboot N` board: `autoboot.txt` first, then the marker. A cut between
/// the two leaves a trial marker naming the new primary, which stage 1 treats as stale.
pub fn commit_reboot_partition(dir: &Path, booted: Slot) -> Result<Autoboot, RpiError> {
    let new = commit(dir, booted)?;
    remove_marker(dir)?;
    Ok(new)
}

// ---------------------------------------------------------------------------------------

/// An executable model of the firmware's documented partition selection (§1.1, §1.4,
/// §1.5, §1.6) and of a device running Basalt's update, trial, stage 1 and commit on
/// it, one indivisible disk write at a time. Tests give the device a write budget: when
/// it runs out the power is cut, and the device must then boot a good slot on its own.
pub mod model {
    use std::collections::BTreeMap;

    use super::*;

    /// Firmware behaviours that differ between models and EEPROM/firmware versions.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Firmware {
        /// Reads `autoboot.txt` on p1 (Pi 4/5 EEPROM since 2022-10-18; unknown on Pi 3).
        pub reads_autoboot: bool,
        /// Acts on the one-shot tryboot flag (Pi 4/5; inert on Zero 2 W per §1.6).
        pub tryboot: bool,
        /// Honours the partition number of `reboot N` (seen working on Zero 2 W, §1.6).
        pub reboot_partition: bool,
        /// After a watchdog timeout reset (not a kernel restart, which rewrites it), the
        /// `reboot N` partition of the previous boot is still in PM_RSTS. UNVERIFIED.
        pub partition_survives_watchdog: bool,
        /// The tryboot flag survives a power cut (Pi 4B rev 1.0/1.1 keep it in EEPROM).
        pub flag_survives_power_cut: bool,
        /// Bootloader publishes `/chosen/bootloader/capabilities` with both tryboot bits.
        pub capabilities: Option<Capabilities>,
    }

    /// Content of a slot partition as firmware and kernel find it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Content {
        /// Being written, or its first sector zeroed: not a FAT (boot), not mountable (root).
        Invalid,
        /// A complete, verified image of this OS version.
        Good(u32),
    }

    /// Persistent state: p1's directory and the slot partitions.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Disk {
        pub p1: BTreeMap<String, Vec<u8>>,
        /// Boot FATs p2 (slot a) and p3 (slot b).
        pub boot: [Content; 2],
        /// Roots p5 (slot a) and p6 (slot b).
        pub root: [Content; 2],
    }

    impl Disk {
        /// A fresh image: slot a primary with `version`, slot b empty.
        pub fn fresh(version: u32) -> Disk {
            let mut p1 = BTreeMap::new();
            p1.insert(
                AUTOBOOT_FILE.to_string(),
                Autoboot { primary: Slot::A }.render().into_bytes(),
            );
            Disk {
                p1,
                boot: [Content::Good(version), Content::Invalid],
                root: [Content::Good(version), Content::Invalid],
            }
        }

        fn bootable(&self, partition: u8) -> bool {
            // p1 holds no start*.elf; p4 is the extended partition.
            match slot_of_boot_partition(partition.into()) {
                Some(slot) => self.boot[idx(slot)] != Content::Invalid,
                None => false,
            }
        }

        pub fn primary(&self) -> Option<Slot> {
            self.p1
                .get(AUTOBOOT_FILE)
                .and_then(|t| Autoboot::parse(t).ok())
                .map(|a| a.primary)
        }

        fn marker(&self) -> Option<TrialMarker> {
            self.p1
                .get(TRIAL_MARKER_FILE)
                .and_then(|t| std::str::from_utf8(t).ok())
                .and_then(|t| TrialMarker::parse(t).ok())
        }
    }

    fn idx(slot: Slot) -> usize {
        match slot {
            Slot::A => 0,
            Slot::B => 1,
        }
    }

    /// State kept outside the disk: survives a reset, not (in general) a power cut.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct Flags {
        pub tryboot: bool,
        /// PM_RSTS partition bits from `reboot N` (0 = default).
        pub reboot_partition: u8,
    }

    /// What the firmware decided.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Selection {
        pub partition: u8,
        pub tryboot: bool,
        /// `config.txt`, or `tryboot.txt` when tryboot is on without `tryboot_a_b=1`.
        pub config_file: &'static str,
    }

    /// The firmware's choice of boot partition:
    /// 1. a `reboot N` partition, where honoured, wins over `autoboot.txt` (§1.4);
    /// 2. else `autoboot.txt` on p1 (evaluated with the tryboot flag), where read; an
    ///    unreadable file counts as absent (UNVERIFIED);
    /// 3. partition 0 means the first bootable FAT partition (§1.1);
    /// 4. a chosen partition that is not bootable fails over to partition 1 (§1.6);
    ///    if that is not bootable either, the SD card does not boot (`None`).
    pub fn select(fw: &Firmware, disk: &Disk, flags: Flags) -> Option<Selection> {
        let tryboot = flags.tryboot && fw.tryboot;
        let eval = if fw.reads_autoboot {
            disk.p1
                .get(AUTOBOOT_FILE)
                .and_then(|t| evaluate_autoboot(t, tryboot).ok())
                .unwrap_or_default()
        } else {
            AutobootEval::default()
        };
        // Whether `tryboot_a_b` still applies when `reboot N` also names a partition is
        // UNVERIFIED; Basalt never asks for both at once.
        let tryboot_a_b = eval.tryboot_a_b;
        let wanted = if fw.reboot_partition && flags.reboot_partition != 0 {
            flags.reboot_partition
        } else {
            eval.boot_partition.unwrap_or(0)
        };
        let partition = if wanted == 0 {
            (1..=4).find(|p| disk.bootable(*p))?
        } else if disk.bootable(wanted) {
            wanted
        } else if disk.bootable(CONFIG_PARTITION) {
            CONFIG_PARTITION
        } else {
            return None;
        };
        Some(Selection {
            partition,
            tryboot,
            config_file: if tryboot && !tryboot_a_b {
                "tryboot.txt"
            } else {
                "config.txt"
            },
        })
    }

    /// One indivisible write to the disk or to firmware flags.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Write {
        /// A new empty file on p1 (one directory entry).
        Create(String),
        /// File data and size on p1 (our writes fsync data before anything depends on it).
        Fill(String, Vec<u8>),
        /// The first half of vfat's rename over an existing file: the target's directory
        /// entry now points at the new data.
        Point(String, Vec<u8>),
        /// A directory entry deleted (the second half of a rename, or an unlink).
        Unlink(String),
        Boot(Slot, Content),
        Root(Slot, Content),
        SetTryboot,
        SetRebootPartition(u8),
    }

    /// How a slot's OS behaves when it boots.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Behaviour {
        Healthy,
        /// Kernel panic before stage 1; `panic=10` makes the kernel restart (partition 0).
        PanicsEarly,
        /// Hangs before stage 1 arms the watchdog: only a power cycle helps.
        HangsEarly,
        /// Hangs in stage 2 with the watchdog armed (trial) or not (primary).
        HangsLater,
        /// Comes up but fails the health gate: stage 2 reboots without committing.
        FailsHealthGate,
    }

    /// How a boot ended.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum BootEnd {
        /// Up and running this slot and version (after a commit if it was a trial).
        Running(Slot, u32),
        /// Rebooted (kernel restart or watchdog); boot again.
        Rebooted,
        /// Hung with no watchdog armed: needs a power cycle.
        Stuck,
        /// The firmware found nothing to boot, or a boot partition whose root is broken,
        /// or it would load `tryboot.txt`: a device that needs a human.
        Broken(&'static str),
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct PowerCut;

    /// A device: disk, flags, firmware, the board's boot method, a write budget.
    #[derive(Debug, Clone)]
    pub struct Device {
        pub fw: Firmware,
        pub method: BootMethod,
        pub disk: Disk,
        pub flags: Flags,
        /// vfat rename halves: `false` = target entry first (what `vfat_rename` does in
        /// memory), `true` = the source deletion reaches the disk first.
        pub unlink_first: bool,
        /// Writes left before the power is cut; `None` = never.
        pub budget: Option<usize>,
        pub writes: usize,
        /// Test switch: skip zeroing the boot FAT before writing the root (an unsafe
        /// order the power-cut tests must catch).
        pub skip_invalidate: bool,
        /// Per-version behaviour of the OS (default Healthy).
        pub behaviour: BTreeMap<u32, Behaviour>,
        /// What the firmware picked at each boot (for test messages).
        pub boots: Vec<u8>,
        pub reports: Vec<Stage1Report>,
    }

    impl Device {
        pub fn new(fw: Firmware, method: BootMethod, version: u32) -> Device {
            Device {
                fw,
                method,
                disk: Disk::fresh(version),
                flags: Flags::default(),
                unlink_first: false,
                skip_invalidate: false,
                budget: None,
                writes: 0,
                behaviour: BTreeMap::new(),
                boots: Vec::new(),
                reports: Vec::new(),
            }
        }

        pub fn write(&mut self, w: Write) -> Result<(), PowerCut> {
            if let Some(b) = self.budget.as_mut() {
                if *b == 0 {
                    return Err(PowerCut);
                }
                *b -= 1;
            }
            self.writes += 1;
            let p1 = &mut self.disk.p1;
            match w {
                Write::Create(name) => {
                    p1.insert(name, Vec::new());
                }
                Write::Fill(name, data) | Write::Point(name, data) => {
                    p1.insert(name, data);
                }
                Write::Unlink(name) => {
                    p1.remove(&name);
                }
                Write::Boot(slot, c) => self.disk.boot[idx(slot)] = c,
                Write::Root(slot, c) => self.disk.root[idx(slot)] = c,
                Write::SetTryboot => self.flags.tryboot = true,
                Write::SetRebootPartition(p) => self.flags.reboot_partition = p,
            }
            Ok(())
        }

        /// [`replace_file_atomically`] as disk writes.
        fn replace(&mut self, name: &str, tmp: &str, data: Vec<u8>) -> Result<(), PowerCut> {
            self.write(Write::Create(tmp.into()))?;
            self.write(Write::Fill(tmp.into(), data.clone()))?;
            if self.unlink_first {
                self.write(Write::Unlink(tmp.into()))?;
                self.write(Write::Point(name.into(), data))
            } else {
                self.write(Write::Point(name.into(), data))?;
                self.write(Write::Unlink(tmp.into()))
            }
        }

        fn change_marker(&mut self, change: MarkerChange) -> Result<(), PowerCut> {
            match change {
                MarkerChange::Keep => Ok(()),
                MarkerChange::Write(m) => {
                    self.replace(TRIAL_MARKER_FILE, TRIAL_MARKER_TMP_FILE, m.render().into())
                }
                MarkerChange::Remove => {
                    if self.disk.p1.contains_key(TRIAL_MARKER_FILE) {
                        self.write(Write::Unlink(TRIAL_MARKER_FILE.into()))
                    } else {
                        Ok(())
                    }
                }
            }
        }

        /// [`commit`] (+ marker removal on `reboot N` boards) as disk writes.
        fn commit(&mut self, booted: Slot) -> Result<(), PowerCut> {
            if self.disk.primary() != Some(booted) {
                let new = Autoboot { primary: booted };
                self.replace(AUTOBOOT_FILE, AUTOBOOT_TMP_FILE, new.render().into())?;
            }
            if effective_method(self.method, self.fw.capabilities) == BootMethod::RebootPartition {
                self.change_marker(MarkerChange::Remove)?;
            }
            Ok(())
        }

        /// A power cut: the budget ends, the `reboot N` partition and (usually) the
        /// tryboot flag are lost.
        pub fn power_cycle(&mut self) {
            self.budget = None;
            self.flags.reboot_partition = 0;
            if !self.fw.flag_survives_power_cut {
                self.flags.tryboot = false;
            }
        }

        /// The update agent on the running system: write the inactive slot so that its
        /// boot FAT becomes bootable only with the last write, then start the trial.
        pub fn update(&mut self, version: u32) -> Result<(), PowerCut> {
            let primary = self.disk.primary().unwrap_or(Slot::A);
            let target = primary.other();
            for step in slot_write_order(target) {
                match step {
                    SlotWrite::InvalidateBoot { .. } if self.skip_invalidate => {}
                    SlotWrite::InvalidateBoot { .. } => {
                        self.write(Write::Boot(target, Content::Invalid))?
                    }
                    SlotWrite::Root { .. } => {
                        self.write(Write::Root(target, Content::Invalid))?;
                        self.write(Write::Root(target, Content::Good(version)))?;
                    }
                    // The body leaves the boot FAT as unbootable as before.
                    SlotWrite::BootBody { .. } => {}
                    SlotWrite::BootFirstSector { .. } => {
                        self.write(Write::Boot(target, Content::Good(version)))?
                    }
                }
            }
            let info = BootloaderInfo {
                partition: Some(boot_partition(primary).into()),
                tryboot: Some(0),
                capabilities: self.fw.capabilities,
            };
            match plan_trial(self.method, &info, target) {
                TrialReboot::Tryboot => {
                    self.write(Write::SetTryboot)?;
                    self.flags.reboot_partition = 0;
                }
                TrialReboot::Partition { partition, marker } => {
                    self.change_marker(MarkerChange::Write(marker))?;
                    self.write(Write::SetRebootPartition(partition))?;
                }
            }
            Ok(())
        }

        /// One boot: firmware, stage 1, the OS's behaviour, the health gate and commit.
        pub fn boot(&mut self) -> Result<BootEnd, PowerCut> {
            let Some(sel) = select(&self.fw, &self.disk, self.flags) else {
                return Ok(BootEnd::Broken("no bootable partition"));
            };
            self.boots.push(sel.partition);
            // The firmware clears the one-shot flag before starting the OS (§1.5); the
            // PM_RSTS partition is remembered for a watchdog reset.
            let chosen_partition = self.flags.reboot_partition;
            self.flags.tryboot = false;
            if sel.config_file != "config.txt" {
                return Ok(BootEnd::Broken("firmware loads tryboot.txt"));
            }
            let Some(slot) = slot_of_boot_partition(sel.partition.into()) else {
                return Ok(BootEnd::Broken("booted a partition that is no slot"));
            };
            let Content::Good(version) = self.disk.root[idx(slot)] else {
                return Ok(BootEnd::Broken("boot FAT bootable but root incomplete"));
            };
            let behaviour = self
                .behaviour
                .get(&version)
                .copied()
                .unwrap_or(Behaviour::Healthy);
            // Every kernel restart rewrites PM_RSTS (partition 0 without an argument).
            let restart = |dev: &mut Device| {
                dev.flags.reboot_partition = 0;
                Ok(BootEnd::Rebooted)
            };
            match behaviour {
                Behaviour::PanicsEarly => return restart(self),
                Behaviour::HangsEarly => return Ok(BootEnd::Stuck),
                _ => {}
            }
            // Stage 1.
            let trial = match effective_method(self.method, self.fw.capabilities) {
                BootMethod::Tryboot => {
                    let info = BootloaderInfo {
                        partition: Some(sel.partition.into()),
                        tryboot: Some(sel.tryboot.into()),
                        capabilities: self.fw.capabilities,
                    };
                    match self.disk.primary() {
                        Some(primary) => is_tryboot_trial(&info, Autoboot { primary }),
                        None => false,
                    }
                }
                BootMethod::RebootPartition => {
                    match stage1_plan(slot, self.disk.primary(), self.disk.marker()) {
                        Stage1Plan::Reboot { marker, partition } => {
                            self.change_marker(marker)?;
                            self.flags.reboot_partition = partition;
                            return Ok(BootEnd::Rebooted);
                        }
                        Stage1Plan::Continue {
                            marker,
                            watchdog_secs,
                            report,
                        } => {
                            self.change_marker(marker)?;
                            self.reports.push(report);
                            watchdog_secs.is_some()
                        }
                    }
                }
            };
            // A trial arms the watchdog in stage 1, on both methods.
            match behaviour {
                Behaviour::HangsLater if trial => {
                    if !self.fw.partition_survives_watchdog {
                        self.flags.reboot_partition = 0;
                    } else {
                        self.flags.reboot_partition = chosen_partition;
                    }
                    Ok(BootEnd::Rebooted)
                }
                Behaviour::HangsLater => Ok(BootEnd::Stuck),
                Behaviour::FailsHealthGate if trial => restart(self),
                _ => {
                    if trial {
                        self.commit(slot)?;
                    }
                    Ok(BootEnd::Running(slot, version))
                }
            }
        }

        /// Boots until the device runs something, at most `max` boots.
        pub fn run(&mut self, max: usize) -> Result<BootEnd, PowerCut> {
            for _ in 0..max {
                match self.boot()? {
                    BootEnd::Rebooted => continue,
                    end => return Ok(end),
                }
            }
            Ok(BootEnd::Broken("boot loop"))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::model::*;
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "basalt-rpi-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[derive(Default)]
    struct FakeReboot {
        args: RefCell<Vec<String>>,
        fail: bool,
    }
    impl RebootWithArg for FakeReboot {
        fn reboot_with_arg(&self, arg: &str) -> io::Result<()> {
            self.args.borrow_mut().push(arg.to_string());
            if self.fail {
                Err(io::Error::from_raw_os_error(1))
            } else {
                Ok(())
            }
        }
    }
    #[derive(Default)]
    struct FakeWatchdog(RefCell<Vec<u32>>);
    impl Watchdog for FakeWatchdog {
        fn arm(&self, secs: u32) -> io::Result<u32> {
            self.0.borrow_mut().push(secs);
            Ok(secs)
        }
    }

    #[test]
    fn device_tree_properties() {
        let dir = temp_dir("dt");
        fs::write(dir.join("partition"), [0, 0, 0, 3]).unwrap();
        fs::write(dir.join("tryboot"), [0, 0, 0, 1]).unwrap();
        let info = BootloaderInfo::read(&dir).unwrap();
        assert_eq!(info.partition, Some(3));
        assert_eq!(info.booted_slot(), Some(Slot::B));
        assert_eq!(info.is_tryboot(), Some(true));
        assert_eq!(info.capabilities, None);
        assert_eq!(
            info.to_string(),
            "partition=3 tryboot=1 capabilities=unknown"
        );

        fs::write(dir.join("capabilities"), [0, 0, 0, 0x6c]).unwrap();
        let caps = BootloaderInfo::read(&dir).unwrap().capabilities.unwrap();
        assert!(caps.tryboot_a_b() && caps.has(Capabilities::NVME_BOOT));
        assert!(!caps.has(Capabilities::SECURE_BOOT));
        fs::write(dir.join("capabilities"), [0, 0, 0, 0x08]).unwrap();
        let caps = BootloaderInfo::read(&dir).unwrap().capabilities.unwrap();
        assert!(!caps.tryboot_a_b(), "bit 3 alone is not A/B");

        fs::write(dir.join("partition"), [0, 3]).unwrap();
        let err = BootloaderInfo::read(&dir).unwrap_err();
        assert!(
            matches!(err, RpiError::DeviceTreeLength { len: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("partition"), "{err}");

        let empty = temp_dir("dt-empty");
        let info = BootloaderInfo::read(&empty).unwrap();
        assert_eq!(info, BootloaderInfo::default());
        assert_eq!(
            info.to_string(),
            "partition=unknown tryboot=unknown capabilities=unknown"
        );
    }

    #[test]
    fn canonical_autoboot() {
        let a = Autoboot { primary: Slot::A };
        assert_eq!(
            a.render(),
            "[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n"
        );
        assert_eq!(
            a.swapped().render(),
            "[all]\ntryboot_a_b=1\nboot_partition=3\n[tryboot]\nboot_partition=2\n"
        );
        for slot in [Slot::A, Slot::B] {
            let text = Autoboot { primary: slot }.render();
            assert!(text.len() <= AUTOBOOT_MAX_BYTES);
            assert_eq!(Autoboot::parse(text.as_bytes()).unwrap().primary, slot);
        }
    }

    #[test]
    fn autoboot_evaluation() {
        let canon = Autoboot { primary: Slot::A }.render();
        // (text, tryboot flag) → (boot_partition, tryboot_a_b)
        let table: &[(&str, bool, Option<u8>, bool)] = &[
            (&canon, false, Some(2), true),
            (&canon, true, Some(3), true),
            ("boot_partition=4\n", false, Some(4), false),
            ("[none]\nboot_partition=4\n", false, None, false),
            ("[tryboot]\nboot_partition=3\n", false, None, false),
            (
                "[tryboot]\nboot_partition=3\n[all]\nboot_partition=2\n",
                true,
                Some(2),
                false,
            ),
            (
                "# comment\n\n[all]\n tryboot_a_b = 1 \nboot_partition=0\n",
                false,
                Some(0),
                true,
            ),
            ("", true, None, false),
        ];
        for (text, tryboot, part, ab) in table {
            let eval = evaluate_autoboot(text.as_bytes(), *tryboot).unwrap();
            assert_eq!(
                (eval.boot_partition, eval.tryboot_a_b),
                (*part, *ab),
                "{text:?} tryboot={tryboot}"
            );
        }
        let bad: &[(&[u8], &str)] = &[
            (b"[pi4]\nboot_partition=2\n", "unknown filter"),
            (b"boot_partition=64\n", "bad boot_partition"),
            (b"boot_partition=two\n", "bad boot_partition"),
            (b"tryboot_a_b=yes\n", "bad tryboot_a_b"),
            (b"kernel=foo\n", "unknown key"),
            (b"boot_partition\n", "expected key=value"),
            (&[0xff, 0xfe], "UTF-8"),
        ];
        for (text, what) in bad {
            let err = evaluate_autoboot(text, false).unwrap_err().to_string();
            assert!(err.contains(what), "{text:?}: {err}");
        }
        let long = format!("{}\n{}", "#".repeat(600), canon);
        assert!(matches!(
            evaluate_autoboot(long.as_bytes(), false),
            Err(RpiError::AutobootTooLong { len }) if len == long.len()
        ));
        let not_ab: &[(&str, &str)] = &[
            (
                "boot_partition=2\n[tryboot]\nboot_partition=3\n",
                "tryboot_a_b",
            ),
            (
                "tryboot_a_b=1\nboot_partition=2\n",
                "[tryboot] boot_partition is Some(2)",
            ),
            (
                "tryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=2\n",
                "expected 3",
            ),
            ("tryboot_a_b=1\nboot_partition=1\n", "not a slot's"),
        ];
        for (text, what) in not_ab {
            let err = Autoboot::parse(text.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(what), "{text:?}: {err}");
        }
    }

    #[test]
    fn commit_swaps_atomically_and_only_once() {
        let dir = temp_dir("commit");
        write_autoboot(&dir, Autoboot { primary: Slot::A }).unwrap();
        assert_eq!(read_autoboot(&dir).unwrap().primary, Slot::A);
        let new = commit(&dir, Slot::B).unwrap();
        assert_eq!(new.primary, Slot::B);
        assert_eq!(
            fs::read_to_string(dir.join(AUTOBOOT_FILE)).unwrap(),
            "[all]\ntryboot_a_b=1\nboot_partition=3\n[tryboot]\nboot_partition=2\n"
        );
        assert!(!dir.join(AUTOBOOT_TMP_FILE).exists());
        let err = commit(&dir, Slot::B).unwrap_err();
        assert!(
            matches!(err, RpiError::AlreadyPrimary { booted: "b" }),
            "{err}"
        );
        assert_eq!(read_autoboot(&dir).unwrap().primary, Slot::B);

        let missing = temp_dir("commit-missing");
        let err = commit(&missing, Slot::B).unwrap_err().to_string();
        assert!(err.contains("autoboot.txt"), "{err}");
    }

    #[test]
    fn update_target_and_write_order() {
        let dir = temp_dir("update");
        write_autoboot(&dir, Autoboot { primary: Slot::A }).unwrap();
        assert_eq!(update_target(&dir, Slot::A).unwrap(), Slot::B);
        let err = update_target(&dir, Slot::B).unwrap_err().to_string();
        assert!(
            err.contains("slot b is running") && err.contains("names slot a"),
            "{err}"
        );
        assert_eq!(
            slot_write_order(Slot::B),
            [
                SlotWrite::InvalidateBoot { partition: 3 },
                SlotWrite::Root { partition: 6 },
                SlotWrite::BootBody { partition: 3 },
                SlotWrite::BootFirstSector { partition: 3 },
            ]
        );
    }

    #[test]
    fn boot_method_names_match_the_board_files() {
        for m in [BootMethod::Tryboot, BootMethod::RebootPartition] {
            assert_eq!(BootMethod::parse(m.name()), Some(m));
        }
        assert_eq!(BootMethod::parse("systemd-boot"), None);
        let boards = Path::new(env!("CARGO_MANIFEST_DIR")).join("../boards");
        for (board, want) in [
            ("rpi4", BootMethod::Tryboot),
            ("rpi5", BootMethod::Tryboot),
            ("rpi3", BootMethod::RebootPartition),
            ("rpi-armv7", BootMethod::RebootPartition),
        ] {
            let text = fs::read_to_string(boards.join(format!("{board}.toml"))).unwrap();
            let table: toml::Table = toml::from_str(&text).unwrap();
            let method = table["boot_method"].as_str().unwrap();
            assert_eq!(BootMethod::parse(method), Some(want), "{board}");
            assert_eq!(table["partition_table"].as_str(), Some("mbr"), "{board}");
        }
    }

    #[test]
    fn trial_reboots() {
        let none = BootloaderInfo::default();
        let caps = |c| BootloaderInfo {
            capabilities: Some(Capabilities(c)),
            ..BootloaderInfo::default()
        };
        let marker_b = TrialMarker {
            kind: MarkerKind::Trial,
            slot: Slot::B,
            attempts: 0,
        };
        let partition_b = TrialReboot::Partition {
            partition: 3,
            marker: marker_b,
        };
        let table = [
            (BootMethod::Tryboot, none, TrialReboot::Tryboot),
            (BootMethod::Tryboot, caps(0x0c), TrialReboot::Tryboot),
            (BootMethod::Tryboot, caps(0x08), partition_b.clone()),
            (BootMethod::Tryboot, caps(0x00), partition_b.clone()),
            (BootMethod::RebootPartition, none, partition_b.clone()),
            (
                BootMethod::RebootPartition,
                caps(0xff),
                TrialReboot::Tryboot,
            ),
            (BootMethod::RebootPartition, caps(0x03), partition_b.clone()),
        ];
        for (method, info, want) in table {
            assert_eq!(
                plan_trial(method, &info, Slot::B),
                want,
                "{method:?} {info}"
            );
        }
        assert_eq!(TrialReboot::Tryboot.arg(), "0 tryboot");
        assert_eq!(partition_b.arg(), "3");

        let dir = temp_dir("trial");
        let reboot = FakeReboot::default();
        start_trial(&dir, &TrialReboot::Tryboot, &reboot).unwrap();
        assert!(!dir.join(TRIAL_MARKER_FILE).exists());
        start_trial(&dir, &partition_b, &reboot).unwrap();
        assert_eq!(*reboot.args.borrow(), ["0 tryboot", "3"]);
        assert_eq!(read_marker(&dir).unwrap(), Some(marker_b));

        let failing = FakeReboot {
            fail: true,
            ..FakeReboot::default()
        };
        let err = start_trial(&dir, &TrialReboot::Tryboot, &failing).unwrap_err();
        assert!(err.to_string().contains("\"0 tryboot\""), "{err}");
    }

    #[test]
    fn tryboot_trial_detection() {
        let a = Autoboot { primary: Slot::A };
        let info = |p, t| BootloaderInfo {
            partition: p,
            tryboot: t,
            capabilities: None,
        };
        let table = [
            (info(Some(3), Some(1)), a, true),
            (info(Some(3), Some(0)), a, false),
            (info(Some(2), Some(1)), a, false),
            (info(Some(2), Some(1)), a.swapped(), true),
            (info(None, Some(1)), a, false),
            (info(Some(3), None), a, false),
        ];
        for (info, autoboot, want) in table {
            assert_eq!(
                is_tryboot_trial(&info, autoboot),
                want,
                "{info} {autoboot:?}"
            );
        }
    }

    #[test]
    fn trial_marker_format() {
        let m = TrialMarker {
            kind: MarkerKind::Redirect,
            slot: Slot::A,
            attempts: 2,
        };
        assert_eq!(m.render(), "kind=redirect\nslot=a\nattempts=2\n");
        assert_eq!(TrialMarker::parse(&m.render()).unwrap(), m);
        for (text, what) in [
            ("kind=trial\nslot=c\nattempts=0\n", "bad slot"),
            ("kind=trial\nslot=a\n", "missing attempts"),
            ("kind=later\nslot=a\nattempts=0\n", "bad kind"),
            ("kind=trial\nslot=a\nattempts=-1\n", "bad attempts"),
            (
                "kind=trial\nslot=a\nattempts=0\ncolour=red\n",
                "unknown key",
            ),
        ] {
            let err = TrialMarker::parse(text).unwrap_err().to_string();
            assert!(err.contains(what), "{text:?}: {err}");
        }
        let dir = temp_dir("marker");
        assert_eq!(read_marker(&dir).unwrap(), None);
        write_marker(&dir, &m).unwrap();
        assert_eq!(read_marker(&dir).unwrap(), Some(m));
        remove_marker(&dir).unwrap();
        remove_marker(&dir).unwrap();
        assert_eq!(read_marker(&dir).unwrap(), None);
    }

    #[test]
    fn stage1_rules() {
        use MarkerKind::{Redirect, Trial};
        use Slot::{A, B};
        let m = |kind, slot, attempts| TrialMarker {
            kind,
            slot,
            attempts,
        };
        let cont = |marker, report| Stage1Plan::Continue {
            marker,
            watchdog_secs: None,
            report,
        };
        let reboot = |marker, partition| Stage1Plan::Reboot { marker, partition };
        // (booted, primary, marker) → plan
        let table = [
            (
                A,
                Some(A),
                None,
                cont(MarkerChange::Keep, Stage1Report::None),
            ),
            (
                B,
                Some(A),
                Some(m(Trial, B, 0)),
                Stage1Plan::Continue {
                    marker: MarkerChange::Write(m(Trial, B, 1)),
                    watchdog_secs: Some(TRIAL_WATCHDOG_SECS),
                    report: Stage1Report::None,
                },
            ),
            (
                B,
                Some(A),
                Some(m(Trial, B, 1)),
                reboot(MarkerChange::Keep, 2),
            ),
            (
                B,
                Some(A),
                Some(m(Trial, B, 7)),
                reboot(MarkerChange::Keep, 2),
            ),
            (
                A,
                Some(A),
                Some(m(Trial, B, 1)),
                cont(
                    MarkerChange::Remove,
                    Stage1Report::TrialRolledBack {
                        slot: B,
                        attempts: 1,
                    },
                ),
            ),
            (
                A,
                Some(A),
                Some(m(Trial, B, 0)),
                cont(
                    MarkerChange::Remove,
                    Stage1Report::TrialRolledBack {
                        slot: B,
                        attempts: 0,
                    },
                ),
            ),
            // Commit written, marker removal lost.
            (
                B,
                Some(B),
                Some(m(Trial, B, 1)),
                cont(MarkerChange::Remove, Stage1Report::StaleMarker),
            ),
            // Firmware ignored autoboot.txt: redirect once, then give up.
            (
                A,
                Some(B),
                None,
                reboot(MarkerChange::Write(m(Redirect, B, 1)), 3),
            ),
            (
                B,
                Some(B),
                Some(m(Redirect, B, 1)),
                cont(MarkerChange::Remove, Stage1Report::None),
            ),
            (
                A,
                Some(B),
                Some(m(Redirect, B, 1)),
                cont(
                    MarkerChange::Remove,
                    Stage1Report::RedirectIgnored { primary: B },
                ),
            ),
            // A stale trial marker for the primary while the other slot booted.
            (
                A,
                Some(B),
                Some(m(Trial, B, 1)),
                reboot(MarkerChange::Write(m(Redirect, B, 1)), 3),
            ),
            (
                B,
                None,
                Some(m(Trial, B, 0)),
                cont(MarkerChange::Keep, Stage1Report::PrimaryUnknown),
            ),
            // A redirect marker naming the non-primary slot is stale.
            (
                A,
                Some(A),
                Some(m(Redirect, B, 1)),
                cont(MarkerChange::Remove, Stage1Report::StaleMarker),
            ),
            (
                B,
                Some(A),
                Some(m(Redirect, B, 1)),
                reboot(MarkerChange::Write(m(Redirect, A, 1)), 2),
            ),
        ];
        for (booted, primary, marker, want) in table {
            assert_eq!(
                stage1_plan(booted, primary, marker),
                want,
                "booted {booted:?} primary {primary:?} marker {marker:?}"
            );
        }
    }

    #[test]
    fn stage1_plan_applied() {
        let dir = temp_dir("stage1");
        let (wd, rb) = (FakeWatchdog::default(), FakeReboot::default());
        let trial = TrialMarker {
            kind: MarkerKind::Trial,
            slot: Slot::B,
            attempts: 0,
        };
        write_marker(&dir, &trial).unwrap();
        let plan = stage1_plan(Slot::B, Some(Slot::A), read_marker(&dir).unwrap());
        apply_stage1_plan(&dir, &plan, &wd, &rb).unwrap();
        assert_eq!(read_marker(&dir).unwrap().map(|m| m.attempts), Some(1));
        assert_eq!(*wd.0.borrow(), [TRIAL_WATCHDOG_SECS]);
        assert!(rb.args.borrow().is_empty());
        // The same slot boots again: back to the primary, marker kept for it to report.
        let plan = stage1_plan(Slot::B, Some(Slot::A), read_marker(&dir).unwrap());
        apply_stage1_plan(&dir, &plan, &wd, &rb).unwrap();
        assert_eq!(*rb.args.borrow(), ["2"]);
        let plan = stage1_plan(Slot::A, Some(Slot::A), read_marker(&dir).unwrap());
        apply_stage1_plan(&dir, &plan, &wd, &rb).unwrap();
        assert_eq!(read_marker(&dir).unwrap(), None);
        // Commit on a reboot-N board removes the marker after autoboot.txt.
        write_autoboot(&dir, Autoboot { primary: Slot::A }).unwrap();
        write_marker(
            &dir,
            &TrialMarker {
                attempts: 1,
                ..trial
            },
        )
        .unwrap();
        assert_eq!(
            commit_reboot_partition(&dir, Slot::B).unwrap().primary,
            Slot::B
        );
        assert_eq!(read_marker(&dir).unwrap(), None);
    }

    // ------------------------------------------------------------------ the model

    const PI4_CAPS: Option<Capabilities> = Some(Capabilities(0x0c | 0x10 | 0x02));

    fn pi4() -> Firmware {
        Firmware {
            reads_autoboot: true,
            tryboot: true,
            reboot_partition: true,
            partition_survives_watchdog: false,
            flag_survives_power_cut: false,
            capabilities: PI4_CAPS,
        }
    }

    /// Firmware variants each method must survive, with a name for messages.
    fn variants() -> Vec<(&'static str, BootMethod, Firmware)> {
        let pi3 = Firmware {
            reads_autoboot: true,
            tryboot: false,
            reboot_partition: true,
            partition_survives_watchdog: false,
            flag_survives_power_cut: false,
            capabilities: None,
        };
        vec![
            ("pi4", BootMethod::Tryboot, pi4()),
            (
                "pi4 rev1.1 (flag in EEPROM)",
                BootMethod::Tryboot,
                Firmware {
                    flag_survives_power_cut: true,
                    ..pi4()
                },
            ),
            (
                "pi4 old EEPROM (no tryboot bits)",
                BootMethod::Tryboot,
                Firmware {
                    tryboot: false,
                    capabilities: Some(Capabilities(0x03)),
                    ..pi4()
                },
            ),
            ("pi3 reads autoboot", BootMethod::RebootPartition, pi3),
            (
                "pi3 reads autoboot, PM_RSTS kept",
                BootMethod::RebootPartition,
                Firmware {
                    partition_survives_watchdog: true,
                    ..pi3
                },
            ),
            (
                "pi3 ignores autoboot",
                BootMethod::RebootPartition,
                Firmware {
                    reads_autoboot: false,
                    ..pi3
                },
            ),
            (
                "pi3 ignores autoboot, PM_RSTS kept",
                BootMethod::RebootPartition,
                Firmware {
                    reads_autoboot: false,
                    partition_survives_watchdog: true,
                    ..pi3
                },
            ),
            (
                "32-bit reboot-N image on a pi4 with a current EEPROM",
                BootMethod::RebootPartition,
                pi4(),
            ),
            (
                "zero 2 w with inert tryboot flag",
                BootMethod::RebootPartition,
                Firmware {
                    tryboot: false,
                    flag_survives_power_cut: true,
                    ..pi3
                },
            ),
        ]
    }

    #[test]
    fn firmware_selection_rules() {
        let fw = pi4();
        let ab = |primary| Autoboot { primary }.render().into_bytes();
        let disk = |autoboot: Option<Vec<u8>>, boot: [Content; 2]| {
            let mut d = Disk::fresh(1);
            d.boot = boot;
            match autoboot {
                Some(t) => d.p1.insert(AUTOBOOT_FILE.into(), t),
                None => d.p1.remove(AUTOBOOT_FILE),
            };
            d
        };
        let good = [Content::Good(1), Content::Good(2)];
        let flags = |tryboot, reboot_partition| Flags {
            tryboot,
            reboot_partition,
        };
        let no_ab = Some(b"boot_partition=2\n[tryboot]\nboot_partition=3\n".to_vec());
        // (firmware, disk, flags) → (partition, config file)
        let table = [
            (
                fw,
                disk(Some(ab(Slot::A)), good),
                flags(false, 0),
                Some((2, "config.txt")),
            ),
            (
                fw,
                disk(Some(ab(Slot::A)), good),
                flags(true, 0),
                Some((3, "config.txt")),
            ),
            (
                fw,
                disk(Some(ab(Slot::B)), good),
                flags(true, 0),
                Some((2, "config.txt")),
            ),
            (
                fw,
                disk(Some(ab(Slot::A)), good),
                flags(false, 3),
                Some((3, "config.txt")),
            ),
            // reboot N wins over [tryboot].
            (
                fw,
                disk(Some(ab(Slot::A)), good),
                flags(true, 2),
                Some((2, "config.txt")),
            ),
            // Missing or unreadable autoboot.txt: partition 0, the first bootable FAT.
            (
                fw,
                disk(None, good),
                flags(false, 0),
                Some((2, "config.txt")),
            ),
            (
                fw,
                disk(Some(b"boot_partition=\n".to_vec()), good),
                flags(false, 0),
                Some((2, "config.txt")),
            ),
            (
                fw,
                disk(None, [Content::Invalid, Content::Good(2)]),
                flags(false, 0),
                Some((3, "config.txt")),
            ),
            // Not bootable: failover to partition 1, which holds no firmware.
            (
                fw,
                disk(Some(ab(Slot::B)), [Content::Good(1), Content::Invalid]),
                flags(false, 0),
                None,
            ),
            // tryboot without tryboot_a_b: the firmware would read tryboot.txt.
            (
                fw,
                disk(no_ab, good),
                flags(true, 0),
                Some((3, "tryboot.txt")),
            ),
            // Firmware that ignores tryboot and reboot N.
            (
                Firmware {
                    tryboot: false,
                    reboot_partition: false,
                    ..fw
                },
                disk(Some(ab(Slot::A)), good),
                flags(true, 3),
                Some((2, "config.txt")),
            ),
            // Firmware that ignores autoboot.txt.
            (
                Firmware {
                    reads_autoboot: false,
                    ..fw
                },
                disk(Some(ab(Slot::B)), good),
                flags(false, 0),
                Some((2, "config.txt")),
            ),
        ];
        for (i, (fw, disk, flags, want)) in table.into_iter().enumerate() {
            let got = select(&fw, &disk, flags).map(|s| (s.partition, s.config_file));
            assert_eq!(got, want, "row {i}: {flags:?} {disk:?}");
        }
    }

    /// Two updates in a row (slot b gets v2, then slot a gets v3), each with its trial
    /// and commit.
    fn two_updates(dev: &mut Device) -> Result<Vec<BootEnd>, PowerCut> {
        let mut ends = Vec::new();
        for version in [2, 3] {
            dev.update(version)?;
            ends.push(dev.run(8)?);
        }
        Ok(ends)
    }

    #[test]
    fn updates_without_power_cuts_commit() {
        for (name, method, fw) in variants() {
            let mut dev = Device::new(fw, method, 1);
            let ends = two_updates(&mut dev).unwrap();
            assert_eq!(
                ends,
                [BootEnd::Running(Slot::B, 2), BootEnd::Running(Slot::A, 3)],
                "{name}: boots {:?}",
                dev.boots
            );
            assert_eq!(dev.disk.primary(), Some(Slot::A), "{name}");
            assert!(!dev.disk.p1.contains_key(TRIAL_MARKER_FILE), "{name}");
            // A cold boot afterwards lands on the primary (possibly via one redirect).
            dev.power_cycle();
            assert_eq!(dev.run(4).unwrap(), BootEnd::Running(Slot::A, 3), "{name}");
        }
    }

    /// Cut the power before every single write of two updates (including mid-rename in
    /// both orders of vfat's two directory-entry writes, and with the tryboot flag kept
    /// or lost): the device must come back up on its own, on a complete slot.
    #[test]
    fn power_cut_between_any_two_writes_boots_a_good_slot() {
        let mut cuts = 0;
        for (name, method, fw) in variants() {
            for unlink_first in [false, true] {
                let mut whole = Device::new(fw, method, 1);
                whole.unlink_first = unlink_first;
                two_updates(&mut whole).unwrap();
                for budget in 0..whole.writes {
                    let mut dev = Device::new(fw, method, 1);
                    dev.unlink_first = unlink_first;
                    dev.budget = Some(budget);
                    assert_eq!(
                        two_updates(&mut dev),
                        Err(PowerCut),
                        "{name} budget {budget}"
                    );
                    dev.power_cycle();
                    let end = dev.run(8).unwrap();
                    let BootEnd::Running(slot, version) = end else {
                        panic!(
                            "{name} unlink_first={unlink_first}: cut after {budget} writes: {end:?}, boots {:?}",
                            dev.boots
                        );
                    };
                    assert_eq!(dev.disk.boot[slot_index(slot)], Content::Good(version));
                    assert_eq!(dev.disk.root[slot_index(slot)], Content::Good(version));
                    assert!((1..=3).contains(&version));
                    // And the device can still be updated afterwards.
                    dev.update(9).unwrap();
                    assert!(
                        matches!(dev.run(8).unwrap(), BootEnd::Running(_, 9)),
                        "{name}: update after a cut at {budget}, boots {:?}",
                        dev.boots
                    );
                    cuts += 1;
                }
            }
        }
        assert!(cuts > 200, "only {cuts} cut points");
    }

    fn slot_index(slot: Slot) -> usize {
        match slot {
            Slot::A => 0,
            Slot::B => 1,
        }
    }

    /// The power-cut test can fail: writing the root before zeroing the boot FAT's
    /// first sector leaves a bootable boot FAT over a half-written root.
    #[test]
    fn power_cut_test_catches_an_unsafe_write_order() {
        let fw = Firmware {
            reads_autoboot: false,
            ..variants()[5].2
        };
        let mut found = false;
        for budget in 0..40 {
            let mut dev = Device::new(fw, BootMethod::RebootPartition, 1);
            dev.skip_invalidate = true;
            dev.budget = Some(budget);
            if two_updates(&mut dev).is_ok() {
                break;
            }
            dev.power_cycle();
            if matches!(dev.run(8).unwrap(), BootEnd::Broken(_)) {
                found = true;
            }
        }
        assert!(
            found,
            "the model did not notice a torn root under a bootable boot FAT"
        );
    }

    /// A trial slot that fails in any way comes back to the previous primary with no
    /// human action, except a hang before stage 1 arms the watchdog, which needs a
    /// power cycle (and nothing else).
    #[test]
    fn failed_trials_roll_back() {
        use Behaviour::*;
        for (name, method, fw) in variants() {
            for behaviour in [PanicsEarly, HangsLater, FailsHealthGate, HangsEarly] {
                let mut dev = Device::new(fw, method, 1);
                dev.behaviour.insert(2, behaviour);
                dev.update(2).unwrap();
                let mut end = dev.run(8).unwrap();
                if behaviour == HangsEarly {
                    assert_eq!(end, BootEnd::Stuck, "{name}");
                    dev.power_cycle();
                    end = dev.run(8).unwrap();
                }
                assert_eq!(
                    end,
                    BootEnd::Running(Slot::A, 1),
                    "{name} {behaviour:?}: boots {:?}",
                    dev.boots
                );
                assert_eq!(dev.disk.primary(), Some(Slot::A), "{name} {behaviour:?}");
                // The next boots stay on the primary and the marker is gone.
                dev.power_cycle();
                assert_eq!(dev.run(8).unwrap(), BootEnd::Running(Slot::A, 1), "{name}");
                assert!(
                    !dev.disk.p1.contains_key(TRIAL_MARKER_FILE),
                    "{name} {behaviour:?}"
                );
            }
        }
    }

    /// With neither tryboot nor `reboot N`, no trial can happen: the update is refused by
    /// the firmware, and the device stays on its primary, reporting why.
    #[test]
    fn firmware_without_any_one_shot_keeps_the_primary() {
        let fw = Firmware {
            tryboot: false,
            reboot_partition: false,
            capabilities: None,
            ..pi4()
        };
        let mut dev = Device::new(fw, BootMethod::RebootPartition, 1);
        dev.update(2).unwrap();
        assert_eq!(dev.run(8).unwrap(), BootEnd::Running(Slot::A, 1));
        assert_eq!(
            dev.reports.last(),
            Some(&Stage1Report::TrialRolledBack {
                slot: Slot::B,
                attempts: 0
            })
        );
    }
}
