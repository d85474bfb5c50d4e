//! Builds tests/images/x86_64.toml with the `basalt` binary and checks the
//! image with independent tools: sfdisk, fsck.vfat, mtools, unsquashfs,
//! cpio, e2fsck, sha256sum.
//!
//! Needs the test assets (tests/assets/fetch; `BASALT_ASSETS`, default
//! `<repo>/.cache/assets`): skipped with a printed reason when missing.
//! The init binary and the Kubernetes stand-in default to the real ones when
//! built, else to the assets' static busybox (this test checks structure,
//! not boot; the QEMU test boots the real thing).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

fn assets() -> Option<PathBuf> {
    let a = std::env::var_os("BASALT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".cache/assets"));
    if a.join("amd64/kernel").is_dir()
        && a.join("amd64/busybox/bin/busybox").is_file()
        && a.join("amd64/systemd-boot").is_dir()
    {
        Some(a)
    } else {
        println!(
            "SKIPPED: test assets not found in {} (run tests/assets/fetch, or set BASALT_ASSETS)",
            a.display()
        );
        None
    }
}

/// A real binary if built, else busybox (any static binary will do here).
fn binary(var: &str, built: &str, fallback: &Path) -> PathBuf {
    if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        return PathBuf::from(v);
    }
    let p = repo()
        .join("target/x86_64-unknown-linux-musl/release")
        .join(built);
    if p.is_file() {
        p
    } else {
        println!(
            "note: {} not built; using {} in its place",
            p.display(),
            fallback.display()
        );
        fallback.to_path_buf()
    }
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

struct Env {
    assets: PathBuf,
    init: PathBuf,
    standin: PathBuf,
}

fn basalt(env: &Env, args: &[&str], epoch: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_basalt"));
    c.args(args)
        .env("BASALT_ASSETS", &env.assets)
        .env("BASALT_STANDIN", &env.standin)
        .env("BASALT_INIT", &env.init)
        .env("SOURCE_DATE_EPOCH", epoch);
    c
}

const MIB: u64 = 1024 * 1024;

#[test]
fn build_test_image_and_check_with_standard_tools() {
    let Some(assets) = assets() else { return };
    let busybox = assets.join("amd64/busybox/bin/busybox");
    let env = Env {
        init: binary("BASALT_INIT", "init", &busybox),
        standin: binary("BASALT_STANDIN", "k8s-standin", &busybox),
        assets,
    };
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("build_x86_64");
    let _ = std::fs::remove_dir_all(&tmp);
    let def = repo().join("tests/images/x86_64.toml");
    let def = def.to_str().unwrap();

    let (o1, o2, o3) = (tmp.join("one"), tmp.join("two"), tmp.join("three"));
    let o2warm = tmp.join("two-warm");
    let cache = tmp.join("cache");
    // Build one without the artifact cache; two with an empty cache (filled),
    // then again from it (squashfs and ext4 taken from the cache): all the same.
    let t = Instant::now();
    run(basalt(
        &env,
        &["build", def, "--out", o1.to_str().unwrap()],
        "1700000000",
    )
    .env("BASALT_NO_ARTIFACT_CACHE", "1"));
    println!("build time: {:.2} s", t.elapsed().as_secs_f64());
    for out in [&o2, &o2warm] {
        run(basalt(
            &env,
            &["build", def, "--out", out.to_str().unwrap()],
            "1700000000",
        )
        .env("XDG_CACHE_HOME", &cache));
    }
    let cached = std::fs::read_dir(cache.join("basalt/artifacts/squashfs"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(cached, 1, "the squashfs went into the artifact cache");
    run(&mut basalt(
        &env,
        &["build", def, "--out", o3.to_str().unwrap()],
        "1700000001",
    ));
    let img = o1.join("basalt-x86_64-test.img");

    // Reproducible: same SOURCE_DATE_EPOCH → same bytes; another → different.
    let h1 = sha256(&img);
    assert_eq!(h1, sha256(&o2.join("basalt-x86_64-test.img")));
    assert_eq!(
        h1,
        sha256(&o2warm.join("basalt-x86_64-test.img")),
        "a build from the artifact cache differs from one without it"
    );
    assert_ne!(h1, sha256(&o3.join("basalt-x86_64-test.img")));

    // Sparse: far fewer blocks allocated than the apparent size.
    let meta = std::fs::metadata(&img).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < meta.len() / 4, "image is not sparse");

    // Partition table.
    let dump = text(&run(Command::new("sfdisk").arg("-d").arg(&img)));
    assert!(dump.contains("label: gpt"), "{dump}");
    let parts: Vec<&str> = dump.lines().filter(|l| l.contains(" : start=")).collect();
    assert_eq!(parts.len(), 4, "{dump}");
    for (line, (name, ty)) in parts.iter().zip([
        ("esp", "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
        ("root-a", "0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
        ("root-b", "0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
        ("data", "0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
    ]) {
        assert!(line.contains(&format!("name=\"{name}\"")), "{line}");
        assert!(line.contains(&format!("type={ty}")), "{line}");
    }
    run(Command::new("sfdisk").arg("-V").arg(&img));
    let sectors = |line: &str, key: &str| -> u64 {
        let v = line.split(&format!("{key}=")).nth(1).unwrap();
        v.split(',').next().unwrap().trim().parse().unwrap()
    };
    let range = |i: usize| {
        (
            sectors(parts[i], "start") * 512,
            sectors(parts[i], "size") * 512,
        )
    };

    // ESP: FAT32 accepted by fsck, files per the contract.
    let (esp_start, esp_len) = range(0);
    let esp = tmp.join("esp.img");
    extract(&img, esp_start, esp_len, &esp);
    let fsck = text(&run(Command::new("fsck.vfat").arg("-n").arg(&esp)));
    assert!(!fsck.contains("differences"), "{fsck}");
    let mt = |p: &str| {
        run(Command::new("mtype")
            .arg("-i")
            .arg(&esp)
            .arg(format!("::{p}")))
        .stdout
    };
    let entry = String::from_utf8(mt("/loader/entries/basalt-a.conf")).unwrap();
    assert!(entry.contains("linux /a/vmlinuz\n"), "{entry}");
    // Board cmdline, then dm-verity's root hash and data block count, then the slot.
    assert!(
        entry.contains("options console=ttyS0,115200 basalt.verity=")
            && entry.contains(" basalt.verity_data_blocks=")
            && entry.contains(" basalt.slot=a\n"),
        "{entry}"
    );
    let conf = String::from_utf8(mt("/loader/loader.conf")).unwrap();
    assert!(
        conf.contains("timeout 0") && !conf.contains("default"),
        "{conf}"
    );
    let efi = mt("/EFI/BOOT/BOOTX64.EFI");
    assert_eq!(&efi[..2], b"MZ");
    let kernel = mt("/a/vmlinuz");
    assert_eq!(&kernel[0x202..0x206], b"HdrS", "a/vmlinuz is not a bzImage");

    // Initramfs: newc cpio with init, console and the board's modules.
    let ird = tmp.join("initramfs");
    std::fs::write(&ird, mt("/a/initramfs")).unwrap();
    let list = text(&run(Command::new("cpio")
        .args(["-itv", "--quiet", "-F"])
        .arg(&ird)));
    for want in [
        " init",
        " dev/console",
        " etc/basalt/initramfs.toml",
        "/virtio_blk.ko",
        "/vfat.ko",
    ] {
        assert!(
            list.lines().any(|l| l.ends_with(want)),
            "{want} missing:\n{list}"
        );
    }
    let settings = run(Command::new("cpio")
        .args(["-i", "--quiet", "--to-stdout", "-F"])
        .arg(&ird)
        .arg("etc/basalt/initramfs.toml"))
    .stdout;
    let settings = String::from_utf8(settings).unwrap();
    let modules_line = settings
        .lines()
        .find(|l| l.starts_with("modules = "))
        .unwrap();
    let at = |m: &str| {
        modules_line
            .find(m)
            .unwrap_or_else(|| panic!("{m} not in {modules_line}"))
    };
    assert!(at("/fat.ko") < at("/vfat.ko"));
    assert!(at("/virtio_ring.ko") < at("/virtio_pci.ko"));
    // What each module needs first (stage 1 loads the others concurrently),
    // read with Python's TOML parser: listed, and always listed earlier.
    let check = r#"
import sys, tomllib
s = tomllib.loads(sys.stdin.read())
order = s["modules"] + s["late_modules"]
deps = s["module_deps"]
assert set(deps["kernel/drivers/block/virtio_blk.ko"]) == {
    "kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko"}, deps
assert deps["kernel/fs/fat/vfat.ko"] == ["kernel/fs/fat/fat.ko"], deps
assert "kernel/fs/squashfs/squashfs.ko" not in deps
for m, ds in deps.items():
    for d in ds:
        assert order.index(d) < order.index(m), (m, d)
print(len(deps))
"#;
    let mut py = Command::new("python3")
        .args(["-c", check])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    py.stdin
        .take()
        .unwrap()
        .write_all(settings.as_bytes())
        .unwrap();
    let out = py.wait_with_output().unwrap();
    assert!(out.status.success(), "module_deps:\n{settings}");

    // root-a: squashfs, listed by unsquashfs, with the builder's files.
    let (root_start, _) = range(1);
    let ls = text(&run(Command::new("unsquashfs")
        .arg("-o")
        .arg(root_start.to_string())
        .arg("-lln")
        .arg(&img)));
    for want in [
        "squashfs-root/usr/lib/basalt/init",
        "squashfs-root/sbin/init -> /usr/lib/basalt/init",
        "squashfs-root/usr/bin/basaltctl -> /usr/lib/basalt/init",
        "squashfs-root/etc/basalt/image.toml",
        "squashfs-root/etc/basalt/node.toml",
        "squashfs-root/etc/os-release",
        "squashfs-root/usr/bin/k3s",
        "squashfs-root/bin/sh -> /bin/busybox",
        "squashfs-root/boot",
    ] {
        assert!(
            ls.lines().any(|l| l.ends_with(want)),
            "{want} missing in root-a"
        );
    }
    assert!(
        !ls.contains("vmlinuz"),
        "the kernel belongs on the ESP, not in /boot of root-a"
    );
    // What PID 1 reads on its way to Kubernetes goes through init's small
    // TOML reader (tomlfast), not the fallback to the full parser.
    let cat = |path: &str| {
        text(&run(Command::new("unsquashfs")
            .arg("-o")
            .arg(root_start.to_string())
            .arg("-cat")
            .arg(&img)
            .arg(path)))
    };
    let mut boot_path = vec![
        ("etc/basalt/initramfs.toml".to_string(), settings.clone()),
        (
            "etc/basalt/image.toml".to_string(),
            cat("etc/basalt/image.toml"),
        ),
    ];
    for l in ls
        .lines()
        .filter(|l| l.contains("squashfs-root/etc/basalt/services/"))
    {
        let p = l.rsplit("squashfs-root/").next().unwrap().to_string();
        boot_path.push((p.clone(), cat(&p)));
    }
    assert!(boot_path.len() >= 4, "{boot_path:?}");
    for (path, t) in &boot_path {
        assert!(
            basalt_init::tomlfast::parse(t).is_some(),
            "{path} is outside tomlfast's subset:\n{t}"
        );
    }
    assert!(ls.lines().all(|l| !l.contains("/.stamp")));

    // data: ext4 that e2fsck accepts, labelled per the contract.
    let (data_start, data_len) = range(3);
    let data = tmp.join("data.img");
    extract(&img, data_start, data_len, &data);
    run(Command::new("e2fsck").arg("-fn").arg(&data));
    let label = text(&run(Command::new("e2label").arg(&data)));
    assert_eq!(label.trim(), "basalt-data");

    // Written with its block map onto a card that held something else: the
    // data partition reads back exactly as built (none of the filesystem is
    // left to the card's old bytes: mke2fs's journal and inode tables are
    // zeros, holes in its file), root-a's squashfs and hash tree too (all
    // read through dm-verity), and the ESP, whose free clusters may keep old
    // bytes, is a clean FAT with the same files.
    let (root_start, _) = range(1);
    let root_len = verity_end(&entry);
    if let Some(card) = flashed_over_old_bytes(
        &img,
        &tmp,
        &[
            (esp_start, esp_len),
            (root_start, root_len),
            (data_start, data_len),
        ],
    ) {
        for (start, len) in [(root_start, root_len), (data_start, data_len)] {
            run(Command::new("cmp")
                .arg(format!("--bytes={len}"))
                .arg(format!("--ignore-initial={start}:{start}"))
                .arg(&img)
                .arg(&card));
        }
        let card_esp = tmp.join("card-esp.img");
        extract(&card, esp_start, esp_len, &card_esp);
        run(Command::new("fsck.vfat").arg("-n").arg(&card_esp));
        let list = |esp: &Path| {
            text(&run(Command::new("mdir")
                .env("MTOOLS_SKIP_CHECK", "1")
                .args(["-/", "-b", "-i"])
                .arg(esp)
                .arg("::/")))
        };
        assert_eq!(list(&card_esp), list(&esp));
        let _ = std::fs::remove_file(&card);
    }

    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn embedded_default_builds_without_a_definition() {
    let Some(assets) = assets() else { return };
    let busybox = assets.join("amd64/busybox/bin/busybox");
    let env = Env {
        init: binary("BASALT_INIT", "init", &busybox),
        standin: binary("BASALT_STANDIN", "k8s-standin", &busybox),
        assets,
    };
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("build_default");
    let _ = std::fs::remove_dir_all(&out);
    run(&mut basalt(
        &env,
        &["build", "--out", out.to_str().unwrap()],
        "1700000000",
    ));
    let img = out.join("basalt-x86_64-0.1.0.img");
    let dump = text(&run(Command::new("sfdisk").arg("-d").arg(&img)));
    assert_eq!(dump.lines().filter(|l| l.contains(" : start=")).count(), 4);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn unset_variable_is_reported_with_its_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_basalt"))
        .arg("build")
        .arg(repo().join("tests/images/x86_64.toml"))
        .args(["--out", "/nonexistent", "--init", "/bin/true"])
        .env_remove("BASALT_STANDIN")
        .env("BASALT_ASSETS", "/nonexistent")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kubernetes.source"), "{err}");
    assert!(err.contains("BASALT_STANDIN is not set"), "{err}");
}

/// Copies `len` bytes at `start` of `img` (a partition: MiB-aligned) to `to` with dd.
fn extract(img: &Path, start: u64, len: u64, to: &Path) {
    run(Command::new("dd")
        .arg(format!("if={}", img.display()))
        .arg(format!("of={}", to.display()))
        .arg("bs=1M")
        .arg(format!("skip={}", start / MIB))
        .arg(format!("count={}", len / MIB))
        .arg("status=none"));
}

/// Where root-a's content ends: the squashfs's `basalt.verity_data_blocks`
/// (from the loader entry), then the verity superblock and the hash tree
/// (format 1: 4096-byte blocks, 128 sha256 hashes to a block, levels until
/// one block).
fn verity_end(entry: &str) -> u64 {
    let blocks: u64 = entry
        .split_whitespace()
        .find_map(|w| w.strip_prefix("basalt.verity_data_blocks="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no verity_data_blocks in {entry}"));
    let (mut level, mut tree) = (blocks, 0);
    while level > 1 {
        level = level.div_ceil(128);
        tree += level;
    }
    (blocks + 1 + tree) * 4096
}

/// `bmaptool copy` of `img` (its `.bmap`) onto a loop device over a file
/// whose bytes in `ranges` are 0xA5 — a block device, as a card is (bmaptool
/// empties a regular file first). Returns that file. Needs root for
/// `losetup`: `None`, saying so, without it.
fn flashed_over_old_bytes(img: &Path, tmp: &Path, ranges: &[(u64, u64)]) -> Option<PathBuf> {
    use std::io::{Seek, SeekFrom, Write};
    let card = tmp.join("card.img");
    {
        let mut f = std::fs::File::create(&card).unwrap();
        f.set_len(std::fs::metadata(img).unwrap().len()).unwrap();
        let old = vec![0xA5u8; MIB as usize];
        for &(start, len) in ranges {
            f.seek(SeekFrom::Start(start)).unwrap();
            let mut left = len;
            while left > 0 {
                let n = left.min(MIB);
                f.write_all(&old[..n as usize]).unwrap();
                left -= n;
            }
        }
    }
    let lo = output(
        Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&card),
    );
    if !lo.status.success() {
        eprintln!(
            "skipped the flash-over-old-bytes check: losetup failed (needs root): {}",
            String::from_utf8_lossy(&lo.stderr).trim()
        );
        return None;
    }
    let dev = text(&lo).trim().to_string();
    let copy = output(
        Command::new("bmaptool")
            .args(["copy", "--bmap"])
            .arg(img.with_extension("bmap"))
            .arg(img)
            .arg(&dev),
    );
    run(Command::new("losetup").args(["-d", &dev]));
    assert!(
        copy.status.success(),
        "bmaptool copy: {}",
        String::from_utf8_lossy(&copy.stderr)
    );
    Some(card)
}
