//! Builds tests/images/<board>.toml for the Raspberry Pi boards with the `basalt`
//! binary and checks the SD images with independent tools: sfdisk (MBR, 7
//! partitions, types), fsck.vfat (every FAT), mtools (firmware file set,
//! config.txt, cmdline.txt, autoboot.txt), sha256sum (reproducibility), and
//! init's model of the firmware's partition selection (`basalt_init::rpi::model`)
//! fed with the image's own autoboot.txt.
//!
//! Needs the arm test assets (`tests/assets/fetch arm64 armhf`; `BASALT_ASSETS`,
//! default `<repo>/.cache/assets`): skipped with a printed reason when missing.
//! Until the arm init is built, the arm busybox stands in for init and for the
//! Kubernetes binary (this test checks structure, not boot). busybox_links runs
//! the arm busybox under qemu-user (qemu-aarch64-static / qemu-arm-static).

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use basalt_init::rpi::model::{self, Content, Disk, Firmware, Flags};
use basalt_init::rpi::{Autoboot, Capabilities};
use basalt_init::slot::Slot;

fn assets(arch: &str) -> Option<PathBuf> {
    let a = std::env::var_os("BASALT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".cache/assets"));
    let ok = ["kernel", "raspi-firmware"]
        .iter()
        .all(|d| a.join(arch).join(d).is_dir())
        && a.join(arch).join("busybox/bin/busybox").is_file();
    if ok {
        Some(a)
    } else {
        println!(
            "SKIPPED: {arch} test assets not found in {} (run tests/assets/fetch arm64 armhf, or set BASALT_ASSETS)",
            a.display()
        );
        None
    }
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Build `tests/images/<board>.toml` into `<tmp>/<board>/<tag>`; the image path.
fn build(board: &str, arch: &str, assets: &Path, tag: &str) -> PathBuf {
    let busybox = assets.join(arch).join("busybox/bin/busybox");
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("build_rpi")
        .join(board)
        .join(tag);
    let _ = std::fs::remove_dir_all(&out);
    let def = repo().join(format!("tests/images/{board}.toml"));
    let placeholder = |var: &str| {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| busybox.clone())
    };
    run(Command::new(env!("CARGO_BIN_EXE_basalt"))
        .arg("build")
        .arg(&def)
        .arg("--out")
        .arg(&out)
        .env("BASALT_ASSETS", assets)
        .env("BASALT_STANDIN", placeholder("BASALT_STANDIN_ARM"))
        .env("BASALT_INIT", placeholder("BASALT_INIT_ARM"))
        .env_remove("SOURCE_DATE_EPOCH"));
    out.join(format!("basalt-{board}-test.img"))
}

/// One `sfdisk -d` row: (number, type byte, start sector, sectors).
fn partitions(img: &Path) -> Vec<(usize, u8, u64, u64)> {
    let dump = text(&run(Command::new("sfdisk").arg("-d").arg(img)));
    assert!(dump.contains("label: dos"), "{dump}");
    dump.lines()
        .filter(|l| l.contains(" : start="))
        .map(|line| {
            let (dev, rest) = line.split_once(" : ").unwrap();
            let field = |k: &str| {
                rest.split(',')
                    .map(str::trim)
                    .find_map(|f| f.strip_prefix(k))
                    .map(|v| v.trim().trim_start_matches('=').trim().to_string())
                    .unwrap_or_else(|| panic!("no {k} in {line}"))
            };
            let number = dev
                .trim()
                .rsplit(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap();
            (
                number,
                u8::from_str_radix(&field("type"), 16).unwrap(),
                field("start").parse().unwrap(),
                field("size").parse().unwrap(),
            )
        })
        .collect()
}

/// A partition copied out of the image with dd.
fn extract(img: &Path, start: u64, sectors: u64, to: &Path) {
    run(Command::new("dd")
        .arg(format!("if={}", img.display()))
        .arg(format!("of={}", to.display()))
        .arg("bs=512")
        .arg(format!("skip={start}"))
        .arg(format!("count={sectors}"))
        .arg("status=none"));
}

fn fsck_vfat(part: &Path) {
    let out = run(Command::new("fsck.vfat").arg("-n").arg(part));
    let t = text(&out);
    assert!(!t.contains("differences") && !t.contains("lost"), "{t}");
}

/// Names in a FAT's directory (mtools `mdir -b`: one path per line).
fn listing(part: &Path, dir: &str) -> Vec<String> {
    let out = run(Command::new("mdir")
        .arg("-b")
        .arg("-i")
        .arg(part)
        .arg(format!("::{dir}")));
    let mut names: Vec<String> = text(&out)
        .lines()
        .map(|l| {
            l.trim_start_matches("::")
                .trim_start_matches('/')
                .to_string()
        })
        .map(|l| {
            l.strip_prefix(&format!("{}/", dir.trim_matches('/')))
                .map(str::to_string)
                .unwrap_or(l)
        })
        .filter(|l| !l.is_empty())
        .collect();
    names.sort();
    names
}

fn mtype(part: &Path, file: &str) -> Vec<u8> {
    run(Command::new("mtype")
        .arg("-i")
        .arg(part)
        .arg(format!("::{file}")))
    .stdout
}

struct Want<'a> {
    board: &'a str,
    arch: &'a str,
    tryboot: bool,
    /// Files on slot a's boot FAT besides config.txt, cmdline.txt, initramfs.
    boot_files: &'a [&'a str],
    /// Files on p1 besides autoboot.txt.
    config_files: &'a [&'a str],
    kernel_lines: &'a [&'a str],
    console: &'a str,
}

fn check_board(w: &Want) {
    let Some(assets) = assets(w.arch) else { return };
    let img = build(w.board, w.arch, &assets, "one");
    let work = img.parent().unwrap();

    // Total size a power of two (QEMU's SD card model).
    let size = std::fs::metadata(&img).unwrap().len();
    assert!(size.is_power_of_two(), "{} is {size} bytes", img.display());

    // MBR: 7 partitions, types 0c 0c 0c 0f 83 83 83; 1 MiB aligned; within the disk.
    let parts = partitions(&img);
    let types: Vec<(usize, u8)> = parts.iter().map(|p| (p.0, p.1)).collect();
    assert_eq!(
        types,
        [
            (1, 0x0c),
            (2, 0x0c),
            (3, 0x0c),
            (4, 0x0f),
            (5, 0x83),
            (6, 0x83),
            (7, 0x83)
        ]
    );
    assert!(parts.iter().all(|p| p.2 % 2048 == 0));
    assert!(parts.iter().all(|p| (p.2 + p.3) * 512 <= size));
    run(Command::new("sfdisk").arg("-V").arg(&img));
    let range = |n: usize| parts.iter().find(|p| p.0 == n).map(|p| (p.2, p.3)).unwrap();

    // p1: the config FAT.
    let p1 = work.join("p1.fat");
    let (s, n) = range(1);
    extract(&img, s, n, &p1);
    fsck_vfat(&p1);
    let mut want_p1: Vec<String> = w.config_files.iter().map(|s| s.to_string()).collect();
    want_p1.push("autoboot.txt".into());
    want_p1.sort();
    assert_eq!(listing(&p1, "/"), want_p1, "p1 of {}", w.board);
    let autoboot = mtype(&p1, "/autoboot.txt");
    assert_eq!(
        String::from_utf8_lossy(&autoboot),
        "[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n"
    );
    assert_eq!(Autoboot::parse(&autoboot).unwrap().primary, Slot::A);

    // The firmware model, fed with this image's autoboot.txt and the state of a
    // fresh image (p2 bootable, p3 not), picks p2; with tryboot set on a tryboot
    // board it would pick p3, which is empty, and fall back (never boots b).
    let disk = Disk {
        p1: BTreeMap::from([("autoboot.txt".to_string(), autoboot.clone())]),
        boot: [Content::Good(1), Content::Invalid],
        root: [Content::Good(1), Content::Invalid],
    };
    let fw = Firmware {
        reads_autoboot: true,
        tryboot: w.tryboot,
        reboot_partition: true,
        partition_survives_watchdog: false,
        flag_survives_power_cut: false,
        capabilities: w.tryboot.then_some(Capabilities(
            Capabilities::TRYBOOT_A_B | Capabilities::TRYBOOT,
        )),
    };
    let sel = model::select(&fw, &disk, Flags::default()).expect("fresh image boots");
    assert_eq!((sel.partition, sel.config_file), (2, "config.txt"));
    // Firmware that ignores autoboot.txt boots the first bootable FAT: also p2.
    let old = Firmware {
        reads_autoboot: false,
        ..fw
    };
    assert_eq!(
        model::select(&old, &disk, Flags::default()).map(|s| s.partition),
        Some(2)
    );

    // p2: slot a's boot FAT.
    let p2 = work.join("p2.fat");
    let (s, n) = range(2);
    extract(&img, s, n, &p2);
    fsck_vfat(&p2);
    let mut want_p2: Vec<String> = w.boot_files.iter().map(|s| s.to_string()).collect();
    want_p2.extend(["config.txt", "cmdline.txt", "initramfs"].map(String::from));
    want_p2.sort();
    assert_eq!(listing(&p2, "/"), want_p2, "p2 of {}", w.board);
    let config = String::from_utf8(mtype(&p2, "/config.txt")).unwrap();
    let lines: Vec<&str> = config.lines().filter(|l| !l.starts_with('#')).collect();
    let want_head: Vec<&str> = std::iter::once("[all]")
        .chain(w.kernel_lines.iter().copied())
        .chain(["initramfs initramfs followkernel"])
        .collect();
    assert_eq!(&lines[..want_head.len()], want_head, "{config}");
    assert_eq!(lines.last(), Some(&"dtparam=watchdog=on"), "{config}");
    let cmdline = String::from_utf8(mtype(&p2, "/cmdline.txt")).unwrap();
    assert_eq!(cmdline.lines().count(), 1, "{cmdline:?}");
    assert!(cmdline.ends_with('\n'), "{cmdline:?}");
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    for want in [
        &format!("console={},115200", w.console) as &str,
        "cgroup_memory=1",
        "cgroup_enable=memory",
        "net.ifnames=0",
        "basalt.slot=a",
        "basalt.root=5",
    ] {
        assert!(words.contains(&want), "{want} not in {cmdline:?}");
    }
    // The kernel on p2 is the root tree's kernel, byte for byte.
    let kernel_src = std::fs::read_dir(assets.join(w.arch).join("kernel/boot"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vmlinuz-")
        })
        .unwrap();
    let kernel_name = w.kernel_lines[0].trim_start_matches("kernel=");
    assert_eq!(
        mtype(&p2, &format!("/{kernel_name}")),
        std::fs::read(&kernel_src).unwrap()
    );
    // The initramfs is a newc cpio that cpio lists, with init and stage 1 settings.
    let initramfs = work.join("initramfs.cpio");
    std::fs::write(&initramfs, mtype(&p2, "/initramfs")).unwrap();
    let listed = text(&run(Command::new("cpio")
        .arg("-it")
        .arg("-F")
        .arg(&initramfs)));
    assert!(listed.lines().any(|l| l == "init"), "{listed}");
    let settings = text(&run(Command::new("cpio")
        .args(["-i", "--to-stdout", "-F"])
        .arg(&initramfs)
        .arg("etc/basalt/initramfs.toml")));
    assert!(settings.contains("partition_table = \"mbr\""), "{settings}");
    let method = if w.tryboot {
        "tryboot"
    } else {
        "reboot-partition"
    };
    assert!(
        settings.contains(&format!("boot_method = \"{method}\"")),
        "{settings}"
    );

    // p3 (slot b's boot) is not a FAT in a fresh image: all zero at its start.
    let (s, _) = range(3);
    let p3 = work.join("p3.head");
    extract(&img, s, 8, &p3);
    assert!(std::fs::read(&p3).unwrap().iter().all(|b| *b == 0));

    // p5 root-a: squashfs; p7 data: ext4.
    let (s, _) = range(5);
    let head = work.join("p5.head");
    extract(&img, s, 1, &head);
    assert_eq!(&std::fs::read(&head).unwrap()[..4], b"hsqs");
    let (s, n) = range(7);
    let data = work.join("p7.ext4");
    extract(&img, s, n, &data);
    run(Command::new("e2fsck").args(["-f", "-n"]).arg(&data));

    for p in [&p1, &p2, &data, &initramfs] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn rpi4_image() {
    check_board(&Want {
        board: "rpi4",
        arch: "arm64",
        tryboot: true,
        boot_files: &[
            "kernel8.img",
            "start4.elf",
            "fixup4.dat",
            "bcm2711-rpi-4-b.dtb",
            "bcm2711-rpi-400.dtb",
            "bcm2711-rpi-cm4-io.dtb",
        ],
        config_files: &[],
        kernel_lines: &["kernel=kernel8.img"],
        console: "ttyAMA0",
    });
}

#[test]
fn rpi5_image() {
    check_board(&Want {
        board: "rpi5",
        arch: "arm64",
        tryboot: true,
        boot_files: &["kernel_2712.img"],
        config_files: &[],
        kernel_lines: &["kernel=kernel_2712.img"],
        console: "ttyAMA10",
    });
}

#[test]
fn rpi3_image() {
    check_board(&Want {
        board: "rpi3",
        arch: "arm64",
        tryboot: false,
        boot_files: &[
            "kernel8.img",
            "bootcode.bin",
            "start.elf",
            "fixup.dat",
            "bcm2837-rpi-3-b.dtb",
            "bcm2837-rpi-3-b-plus.dtb",
            "bcm2837-rpi-zero-2-w.dtb",
        ],
        config_files: &["bootcode.bin"],
        kernel_lines: &["kernel=kernel8.img"],
        console: "ttyAMA0",
    });
}

#[test]
fn rpi_armv7_image() {
    check_board(&Want {
        board: "rpi-armv7",
        arch: "armhf",
        tryboot: false,
        boot_files: &[
            "kernel7.img",
            "kernel7l.img",
            "bootcode.bin",
            "start.elf",
            "fixup.dat",
            "start4.elf",
            "fixup4.dat",
            "bcm2836-rpi-2-b.dtb",
            "bcm2837-rpi-3-b.dtb",
            "bcm2837-rpi-zero-2-w.dtb",
            "bcm2711-rpi-4-b.dtb",
        ],
        config_files: &["bootcode.bin"],
        kernel_lines: &[
            "kernel=kernel7.img",
            "[pi4]",
            "kernel=kernel7l.img",
            "[all]",
        ],
        console: "ttyAMA0",
    });
}

#[test]
fn rpi4_is_reproducible() {
    let Some(assets) = assets("arm64") else {
        return;
    };
    let a = build("rpi4", "arm64", &assets, "rep-a");
    let b = build("rpi4", "arm64", &assets, "rep-b");
    assert_eq!(sha256(&a), sha256(&b));
    for img in [a, b] {
        let _ = std::fs::remove_dir_all(img.parent().unwrap());
    }
}
