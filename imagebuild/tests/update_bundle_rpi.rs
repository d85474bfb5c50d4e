//! `basalt bundle` for a Raspberry Pi board (rpi4): payloads `boot-fat-a`,
//! `boot-fat-b` (the slot boot FAT for either target slot) and `root`. The
//! FAT payloads are checked with `fsck.vfat` and mtools; their
//! `cmdline.txt` names their slot and the manifest's verity root hash; the
//! root payload is byte for byte what `basalt build` writes into root-a from
//! the same definition, and boot-fat-a's `cmdline.txt` what it writes in p2.
//! (Installing such a bundle on a Pi — tryboot — is not in the agent yet.)

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

use basalt_init::bundle::{Head, PayloadPart, verify_stream};

fn mtype(fat: &Path, offset: u64, name: &str) -> String {
    let spec = format!("{}@@{offset}", fat.display());
    String::from_utf8_lossy(
        &run(Command::new("mtype")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-i", &spec])
            .arg(format!("::{name}")))
        .stdout,
    )
    .into_owned()
}

#[test]
fn rpi4_bundle_carries_boot_fats_for_both_slots() {
    let assets = std::env::var_os("BASALT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".cache/assets"));
    let busybox = assets.join("arm64/busybox/bin/busybox");
    if !busybox.is_file() || !assets.join("arm64/kernel").is_dir() {
        println!(
            "SKIPPED: arm64 test assets not found in {}",
            assets.display()
        );
        return;
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("update_bundle_rpi");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let basalt = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_basalt"));
        c.args(args)
            .env("BASALT_ASSETS", &assets)
            .env("BASALT_STANDIN", &busybox)
            .env("BASALT_INIT", &busybox)
            .env("SOURCE_DATE_EPOCH", "1767225600");
        c
    };
    let def = repo().join("tests/images/rpi4.toml");
    let def = def.to_str().unwrap();
    let d = dir.to_str().unwrap();
    run(&mut basalt(&["keygen", &format!("{d}/k")]));
    let bundle = dir.join("rpi4.bundle");
    run(&mut basalt(&[
        "bundle",
        def,
        "--key",
        &format!("{d}/k.key"),
        "--out",
        bundle.to_str().unwrap(),
    ]));
    run(&mut basalt(&[
        "build",
        def,
        "--out",
        &format!("{d}/img"),
        "--raw-only",
    ]));

    let bytes = std::fs::read(&bundle).unwrap();
    let pubkey = std::fs::read_to_string(dir.join("k.pub")).unwrap();
    let m = verify_stream(&mut &bytes[..], &[pubkey]).unwrap();
    let parts: Vec<PayloadPart> = m.payloads.iter().map(|p| p.part).collect();
    assert_eq!(
        parts,
        [
            PayloadPart::BootFatA,
            PayloadPart::BootFatB,
            PayloadPart::Root
        ]
    );
    let head_len = Head::read(&mut &bytes[..]).unwrap().to_bytes().len();
    let mut at = head_len;
    let mut payload = |i: usize| {
        let len = m.payloads[i].size as usize;
        let p = bytes[at..at + len].to_vec();
        at += len;
        p
    };
    let (fat_a, fat_b, root) = (payload(0), payload(1), payload(2));
    let hash = m.payloads[2].verity_root_hash.clone().unwrap();
    for (slot, fat, root_part) in [("a", &fat_a, "5"), ("b", &fat_b, "6")] {
        let f = dir.join(format!("boot-fat-{slot}.img"));
        std::fs::write(&f, fat).unwrap();
        run(Command::new("fsck.vfat").arg("-n").arg(&f));
        let cmdline = mtype(&f, 0, "cmdline.txt");
        assert!(
            cmdline.contains(&format!("basalt.slot={slot}")),
            "{cmdline}"
        );
        assert!(
            cmdline.contains(&format!("basalt.root={root_part}")),
            "{cmdline}"
        );
        assert!(
            cmdline.contains(&format!("basalt.verity={hash}")),
            "{cmdline}"
        );
        assert!(mtype(&f, 0, "config.txt").contains(&format!("slot {slot}")));
    }

    // Same pipeline as `basalt build`: root-a (p5) and p2's cmdline.txt match.
    let img = dir.join("img/basalt-rpi4-test.img");
    let dump = String::from_utf8_lossy(&run(Command::new("sfdisk").arg("-d").arg(&img)).stdout)
        .into_owned();
    let start = |n: &str| -> u64 {
        let line = dump
            .lines()
            .filter(|l| l.contains(" : start="))
            .find(|l| l.split(" : ").next().unwrap_or("").trim().ends_with(n))
            .unwrap();
        let s = line
            .split("start=")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .trim();
        s.parse::<u64>().unwrap() * 512
    };
    let image = std::fs::read(&img).unwrap();
    let p5 = start("5") as usize;
    assert!(
        image[p5..p5 + root.len()] == root[..],
        "root payload differs from the image's root-a"
    );
    assert_eq!(
        mtype(&img, start("2"), "cmdline.txt"),
        mtype(&dir.join("boot-fat-a.img"), 0, "cmdline.txt")
    );
}
