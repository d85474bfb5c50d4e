//! x86_64 machines' own disks: SATA, NVMe and USB. The virtio disk of every
//! other test is what a VM has; a NUC, a mini PC or an old laptop boots from
//! an AHCI SATA disk, an NVMe SSD or a USB stick, and the node must come up
//! from each with the initramfs module list the product default ships
//! (`imagebuild/defaults/x86_64.toml`; `tests/tests/images/metal.toml` has the
//! same list, which imagebuild's tests check).
//!
//! Each test builds the image on Debian's generic amd64 kernel (the cloud
//! kernel of the other tests has no AHCI, xHCI or USB storage drivers), puts
//! the disk file on one bus of a q35 VM and boots it the whole way: OVMF
//! finds the ESP on that disk, systemd-boot starts slot a, stage 1 loads the
//! bus's drivers, finds the partitions on it (root under dm-verity, the data
//! partition grown to the disk), and the Kubernetes stand-in becomes ready.
//! The kernel's own lines say which disk the data filesystem was mounted
//! from; afterwards e2fsck finds the data filesystem clean.
//!
//! And a machine with two Basalt disks (an install stick left in, an old
//! disk of another node): the firmware starts the SATA disk, an NVMe disk
//! holding another Basalt image sorts first by kernel name. Stage 1 must
//! take every partition from the disk systemd-boot was started from
//! (`LoaderDevicePartUUID`), and leave the other disk untouched. And two
//! copies of one image (the card and the USB SSD it was cloned to): the same
//! GUIDs on both, so the first boot cannot tell them apart; the disk it
//! grows gets new GUIDs, and from the next boot on the firmware's disk is
//! found again.

use anyhow::{Context, Result, ensure};
use basalt_tests::assets::Assets;
use basalt_tests::console::Pattern;
use basalt_tests::qemu::{DiskBus, Vm, VmConfig};
use basalt_tests::report;
use basalt_tests::{build, disk, repo_root, work_dir};
use std::time::Duration;

const DEFINITION: &str = "tests/tests/images/metal.toml";
/// Firmware (reading the kernel and initramfs through its own disk driver),
/// systemd-boot and the kernel under TCG on a loaded 2-core host.
const TO_KERNEL: Duration = Duration::from_secs(300);
const STEP: Duration = Duration::from_secs(120);

/// Boots the metal test image from a disk on `bus`; `disk_seen` is the
/// kernel's line for the disk's partitions, `data` the data partition's
/// device name.
/// `cpu`: QEMU's model; the SATA test takes a 2008 one (`Nehalem`, no
/// PCLMULQDQ), on which the list's `crct10dif-pclmul` refuses to load
/// (`ENODEV`): said as not for this machine, not as an error.
fn boot_from(name: &str, bus: DiskBus, cpu: &str, disk_seen: &str, data: &str) -> Result<()> {
    let assets = Assets::locate("amd64").context("the metal disk tests need the test assets")?;
    let dir = work_dir(name)?;
    build::ensure_binaries(&dir)?;
    let img = build::build_image(&repo_root().join(DEFINITION), &dir.join("out"))?;
    // Every soft dependency of the list is met on the generic kernel
    // (crc_t10dif's `pre: crct10dif` by the modules named after it, Debian
    // shipping no modules.alias): the build warns of none left out.
    let log = dir.join("out.build.log");
    let log = std::fs::read_to_string(&log).with_context(|| format!("{}", log.display()))?;
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("warning: initramfs"))
        .collect();
    ensure!(warned.is_empty(), "basalt build warned: {warned:#?}");
    disk::set_size(&img, 4 << 30)?;

    let mut cfg = VmConfig::new(name, &dir, &img);
    cfg.disk_bus = bus;
    cfg.cpu = cpu.into();
    cfg.lifetime = Duration::from_secs(900);
    let mut vm = Vm::start(&cfg, &assets)?;
    vm.expect("basalt: stage1 start", TO_KERNEL)?;
    vm.expect_anywhere(Pattern::regex(disk_seen), STEP)?;
    vm.expect("basalt: stage2 start", STEP)?;
    let pclmul_absent = vm.console.seen(Pattern::regex(
        r"crct10dif-pclmul\.ko\S*: not for this machine \(ENODEV",
    ));
    ensure!(
        pclmul_absent.is_empty() == (cpu == "max"),
        "-cpu {cpu}: crct10dif-pclmul said absent {pclmul_absent:?}"
    );
    let line = vm.expect(report::READY_PREFIX, STEP)?;
    let ready = report::parse_ready(&line)?;
    ensure!(
        ready.slot == "a" && ready.data_grown && ready.hostname == "basalt-metal",
        "ready report: {line}"
    );
    // The data partition was mounted (and grown) from this disk.
    let mounted = vm
        .console
        .seen(format!("EXT4-fs ({data}): mounted filesystem").as_str());
    ensure!(
        !mounted.is_empty(),
        "no 'EXT4-fs ({data}): mounted filesystem' on the console:\n{}",
        vm.console.tail()
    );
    powers_off_cleanly(&mut vm)?;
    disk::fsck_ext4(&img, "data")?;
    Ok(())
}

#[test]
fn boots_from_a_sata_disk() -> Result<()> {
    boot_from(
        "metal_sata",
        DiskBus::Ahci,
        "Nehalem",
        r"ata\d+\.00: ATA-\d+: QEMU HARDDISK",
        "sda4",
    )
}

#[test]
fn boots_from_an_nvme_disk() -> Result<()> {
    boot_from(
        "metal_nvme",
        DiskBus::Nvme,
        "max",
        r"nvme0n1: p1 p2 p3 p4",
        "nvme0n1p4",
    )
}

#[test]
fn boots_from_a_usb_disk() -> Result<()> {
    boot_from(
        "metal_usb",
        DiskBus::Usb,
        "max",
        r"usb-storage \S+: USB Mass Storage device detected",
        "sda4",
    )
}

/// The node's own poweroff (the test services end the boot): said, complete,
/// QEMU exits 0, and no init error on the console.
fn powers_off_cleanly(vm: &mut Vm) -> Result<()> {
    vm.expect("basalt: shutdown poweroff", STEP)?;
    vm.expect("basalt: shutdown complete", STEP)?;
    let st = vm.wait_exit(Duration::from_secs(60))?;
    ensure!(st.success(), "QEMU exited {st}");
    vm.console.no_init_errors()?;
    Ok(())
}

/// `sha256sum` of a file.
fn sha256(path: &std::path::Path) -> Result<String> {
    let out = std::process::Command::new("sha256sum").arg(path).output()?;
    ensure!(out.status.success(), "sha256sum {}", path.display());
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// A q35 VM whose firmware starts `sata` (AHCI, bootindex 0) with `nvme` on
/// an NVMe controller (bootindex 1): nvme0n1 sorts before sda.
fn sata_then_nvme(
    name: &str,
    dir: &std::path::Path,
    sata: &std::path::Path,
    nvme: &std::path::Path,
) -> VmConfig {
    let mut cfg = VmConfig::new(name, dir, sata);
    cfg.disk_bus = DiskBus::Ahci;
    cfg.boot_index = Some(0);
    cfg.extra_args = vec![
        "-drive".into(),
        format!("if=none,id=second,format=raw,file={}", nvme.display()),
        "-device".into(),
        "nvme,serial=second0,drive=second,bootindex=1".into(),
    ];
    cfg.lifetime = Duration::from_secs(900);
    cfg
}

#[test]
fn boots_from_the_disk_the_firmware_started_with_another_basalt_disk_in() -> Result<()> {
    let name = "metal_two_disks";
    let w = with_other(name)?;
    // The other disk on NVMe: nvme0n1 sorts before sda.
    let cfg = sata_then_nvme(name, &w.dir, &w.img, &w.other);
    let mut vm = Vm::start(&cfg, &w.assets)?;
    vm.expect("basalt: stage1 start", TO_KERNEL)?;
    let chose = vm.expect(
        "basalt: storage: the slot's partitions are on nvme0n1, sda: using sda",
        STEP,
    )?;
    ensure!(
        chose.contains("the one matching the ESP systemd-boot started from ("),
        "{chose}"
    );
    vm.expect("basalt: stage2 start", STEP)?;
    boots_on_sda_leaving_the_other(&mut vm, &w)
}

/// The metal image grown to 4 GiB and another Basalt disk: the x86_64 test
/// image (another build, so other GUIDs, the same partition names), with
/// its sha256.
struct WithOther {
    assets: Assets,
    dir: std::path::PathBuf,
    img: std::path::PathBuf,
    other: std::path::PathBuf,
    other_before: String,
}

fn with_other(name: &str) -> Result<WithOther> {
    let assets = Assets::locate("amd64").context("the metal disk tests need the test assets")?;
    let dir = work_dir(name)?;
    build::ensure_binaries(&dir)?;
    let img = build::build_image(&repo_root().join(DEFINITION), &dir.join("out"))?;
    disk::set_size(&img, 4 << 30)?;
    let other = build::build_image(
        &repo_root().join("tests/images/x86_64.toml"),
        &dir.join("other"),
    )?;
    let other_before = sha256(&other)?;
    Ok(WithOther {
        assets,
        dir,
        img,
        other,
        other_before,
    })
}

/// The rest of a boot from sda with the other disk on NVMe: ready on slot
/// a, grown, `/var` mounted from sda4 only, a clean poweroff, the data
/// filesystem clean (e2fsck), the other disk byte for byte unchanged.
fn boots_on_sda_leaving_the_other(vm: &mut Vm, w: &WithOther) -> Result<()> {
    let line = vm.expect(report::READY_PREFIX, STEP)?;
    let ready = report::parse_ready(&line)?;
    ensure!(
        ready.slot == "a" && ready.data_grown && ready.hostname == "basalt-metal",
        "ready report: {line}"
    );
    ensure!(
        !vm.console
            .seen("EXT4-fs (sda4): mounted filesystem")
            .is_empty()
            && vm.console.seen("EXT4-fs (nvme0n1").is_empty(),
        "the data filesystem must be mounted from sda4 only:\n{}",
        vm.console.tail()
    );
    powers_off_cleanly(vm)?;
    disk::fsck_ext4(&w.img, "data")?;
    ensure!(
        sha256(&w.other)? == w.other_before,
        "the other disk {} was written to",
        w.other.display()
    );
    Ok(())
}

/// The firmware starts a USB disk while an NVMe disk holds another Basalt
/// install (another build: other GUIDs, the same partition names).
/// usb-storage attaches a disk a second after it is detected (its
/// `delay_use`), so at stage 1's first looks the NVMe disk is the only one
/// with the slot's partitions: not the firmware's (`LoaderDevicePartUUID`
/// names another ESP), so stage 1 waits until the USB disk appears and boots
/// from it. Before, it booted the NVMe install. That disk is never written.
#[test]
fn waits_for_the_usb_disk_the_firmware_started_past_an_internal_basalt_disk() -> Result<()> {
    let name = "metal_late_usb";
    let w = with_other(name)?;
    let esp = guids(&w.img)?[1].clone();
    let mut cfg = VmConfig::new(name, &w.dir, &w.img);
    cfg.disk_bus = DiskBus::Usb;
    cfg.boot_index = Some(0);
    cfg.extra_args = vec![
        "-drive".into(),
        format!("if=none,id=second,format=raw,file={}", w.other.display()),
        "-device".into(),
        "nvme,serial=second0,drive=second,bootindex=1".into(),
    ];
    cfg.lifetime = Duration::from_secs(900);
    let mut vm = Vm::start(&cfg, &w.assets)?;
    vm.expect("basalt: stage1 start", TO_KERNEL)?;
    vm.expect(
        format!(
            "basalt: storage: waiting for the disk the firmware started (up to 30 s): nvme0n1 holds the slot's partitions, but not the ESP systemd-boot started from ({esp})"
        )
        .as_str(),
        STEP,
    )?;
    vm.expect(
        format!(
            "basalt: storage: the slot's partitions are on nvme0n1, sda: using sda, the one matching the ESP systemd-boot started from ({esp})"
        )
        .as_str(),
        STEP,
    )?;
    boots_on_sda_leaving_the_other(&mut vm, &w)
}

/// The disk GUID and every partition's unique GUID, as `sfdisk -J` reads them.
fn guids(img: &std::path::Path) -> Result<Vec<String>> {
    let t = disk::partition_table(img)?;
    let mut all = vec![t.id.clone().unwrap_or_default()];
    all.extend(
        t.partitions
            .iter()
            .map(|p| p.uuid.clone().unwrap_or_default()),
    );
    ensure!(
        all.len() == 5 && all.iter().all(|g| g.len() == 36),
        "{}: GUIDs {all:?}",
        img.display()
    );
    Ok(all.into_iter().map(|g| g.to_ascii_lowercase()).collect())
}

/// The name the kernel gave the SCSI disk at `hctl` (host:channel:id:lun),
/// from its `sd 1:0:0:0: [sdb] ...` lines on the console.
fn kernel_disk_name(console: &[String], hctl: &str) -> Result<String> {
    let prefix = format!("sd {hctl}: [");
    console
        .iter()
        .find_map(|l| {
            let rest = &l[l.find(&prefix)? + prefix.len()..];
            Some(rest[..rest.find(']')?].to_string())
        })
        .with_context(|| format!("no kernel line names the disk at SCSI {hctl}"))
}

/// The test image built and grown to 4 GiB, a sparse copy of it, the
/// image's GUIDs (`guids`) and the copy's sha256.
struct TwoCopies {
    assets: Assets,
    dir: std::path::PathBuf,
    img: std::path::PathBuf,
    copy: std::path::PathBuf,
    built: Vec<String>,
    copy_before: String,
}

fn two_copies(name: &str) -> Result<TwoCopies> {
    let assets = Assets::locate("amd64").context("the metal disk tests need the test assets")?;
    let dir = work_dir(name)?;
    build::ensure_binaries(&dir)?;
    let img = build::build_image(&repo_root().join(DEFINITION), &dir.join("out"))?;
    disk::set_size(&img, 4 << 30)?;
    let copy = dir.join("copy.img");
    disk::copy_sparse(&img, &copy)?;
    let built = guids(&img)?;
    ensure!(guids(&copy)? == built, "the copy differs");
    let copy_before = sha256(&copy)?;
    Ok(TwoCopies {
        assets,
        dir,
        img,
        copy,
        built,
        copy_before,
    })
}

/// Two copies of one image on one SATA controller: the firmware started
/// the one on port 1, its copy is on port 0. The boot entry's `Sata(0x1,..)`
/// and libata's `port_no` tell them apart on the first boot; the copy is
/// never written. The kernel names the two disks in the order their ports
/// finish probing (AHCI probes ports in parallel), so which of sda and sdb
/// is the image differs from run to run: the test reads it from the
/// kernel's `sd 1:0:0:0: [sdX]` lines (SCSI host 1 is port 1).
#[test]
fn two_copies_on_one_sata_controller_are_told_apart_by_port() -> Result<()> {
    let name = "metal_two_ports";
    let c = two_copies(name)?;
    let (img, copy, built) = (&c.img, &c.copy, &c.built);

    let mut cfg = VmConfig::new(name, &c.dir, copy);
    cfg.disk_bus = DiskBus::Ahci;
    cfg.extra_args = vec![
        "-drive".into(),
        format!("if=none,id=second,format=raw,file={}", img.display()),
        "-device".into(),
        "ide-hd,drive=second,bus=ide.1,bootindex=0".into(),
    ];
    cfg.lifetime = Duration::from_secs(600);
    let mut vm = Vm::start(&cfg, &c.assets)?;
    vm.expect("basalt: stage1 start", TO_KERNEL)?;
    let chose = vm.expect(
        "basalt: storage: the slot's partitions are on sda, sdb: using ",
        STEP,
    )?;
    let renewed = vm.expect(
        Pattern::regex(
            r"basalt: storage: sd[ab]: new GUIDs for this copy of the image \(first boot\)",
        ),
        STEP,
    )?;
    let line = vm.expect(report::READY_PREFIX, STEP)?;
    let ready = report::parse_ready(&line)?;
    ensure!(ready.slot == "a" && ready.data_grown, "{line}");
    powers_off_cleanly(&mut vm)?;
    // Read after the whole boot: the kernel's lines and init's may reach the
    // console in either order.
    let on_port_1 = kernel_disk_name(vm.console.history(), "1:0:0:0")?;
    ensure!(
        chose.contains(&format!(
            ": using {on_port_1}, the one matching the ESP systemd-boot started from ({}) and the firmware's boot entry Boot",
            built[1]
        )) && chose.ends_with("(PciRoot(0x0)/Pci(0x1F,0x2)/Sata(0x1,0xFFFF,0x0))"),
        "not {on_port_1} (port 1) by the boot entry: {chose}"
    );
    ensure!(
        renewed.contains(&format!("basalt: storage: {on_port_1}: ")),
        "renewed another disk than {on_port_1} (port 1): {renewed}"
    );
    ensure!(
        guids(img)?.iter().all(|g| !built.contains(g)),
        "the firmware's disk kept a GUID of the image"
    );
    disk::fsck_ext4(img, "data")?;
    ensure!(sha256(copy)? == c.copy_before, "the copy was written to");
    Ok(())
}

/// Two copies of one image (the same GUIDs: LoaderDevicePartUUID matches
/// both) are told apart on the first boot by the firmware's boot entry
/// (`BootCurrent`'s device path, the SATA controller's PCI device); that
/// boot's growth renews the firmware's disk's GUIDs, so from the second boot
/// the ESP's GUID alone decides. The other copy is never written.
#[test]
fn two_copies_of_one_image_are_told_apart_from_the_first_boot() -> Result<()> {
    let name = "metal_two_copies";
    let c = two_copies(name)?;
    let (img, copy, built) = (&c.img, &c.copy, &c.built);

    // The firmware starts the SATA disk (sda); its copy is on NVMe, first by
    // kernel name.
    let mut cfg = sata_then_nvme(name, &c.dir, img, copy);
    let vars = c.dir.join(format!("{name}.vars.fd"));
    let mut esp_guid = built[1].clone();
    for boot in 1..=2 {
        let mut vm = Vm::start(&cfg, &c.assets)?;
        vm.expect("basalt: stage1 start", TO_KERNEL)?;
        let chose = vm.expect(
            "basalt: storage: the slot's partitions are on nvme0n1, sda: using sda, the one matching the ESP systemd-boot started from (",
            STEP,
        )?;
        ensure!(
            chose.contains(&format!("({esp_guid})")),
            "boot {boot}: not the ESP's GUID {esp_guid}: {chose}"
        );
        // The first boot needs the firmware's entry (both disks match the
        // ESP's GUID); the second does not look at it.
        let by_entry = chose.contains(
            " and the firmware's boot entry Boot0001 (PciRoot(0x0)/Pci(0x1F,0x2)/Sata(0x0,0xFFFF,0x0))",
        );
        ensure!(by_entry == (boot == 1), "boot {boot}: {chose}");
        let renewed = if boot == 1 {
            Some(vm.expect(
                "basalt: storage: sda: new GUIDs for this copy of the image (first boot)",
                STEP,
            )?)
        } else {
            None
        };
        let line = vm.expect(report::READY_PREFIX, STEP)?;
        let ready = report::parse_ready(&line)?;
        ensure!(
            ready.slot == "a" && ready.data_grown == (boot == 1),
            "boot {boot}: {line}"
        );
        powers_off_cleanly(&mut vm).with_context(|| format!("boot {boot}"))?;
        ensure!(
            boot == 1 || !vm.console.history().iter().any(|l| l.contains("new GUIDs")),
            "boot {boot} renewed GUIDs again"
        );
        if let Some(renewed) = renewed {
            ensure!(
                renewed.contains(&format!("(was {})", built[4])),
                "{renewed}"
            );
        }
        esp_guid = guids(img)?[1].clone();
        // The next boot keeps the firmware's variables (its boot order).
        cfg.vars = Some(vars.clone());
    }
    // The firmware's disk has its own GUIDs, none the image's, all version 4,
    // distinct; its table is sound (sgdisk -v), its data filesystem clean;
    // the copy is byte for byte as it was.
    let a = guids(img)?;
    for g in &a {
        ensure!(!built.contains(g), "a GUID of the image is left: {a:?}");
        ensure!(g.as_bytes()[14] == b'4', "not version 4: {g}");
    }
    let mut all = a.clone();
    all.sort();
    all.dedup();
    ensure!(all.len() == 5, "GUIDs repeat: {a:?}");
    let v = std::process::Command::new("sgdisk")
        .arg("-v")
        .arg(img)
        .output()?;
    let text = String::from_utf8_lossy(&v.stdout);
    ensure!(text.contains("No problems found"), "sgdisk -v: {text}");
    disk::fsck_ext4(img, "data")?;
    ensure!(sha256(copy)? == c.copy_before, "the copy was written to");
    Ok(())
}
