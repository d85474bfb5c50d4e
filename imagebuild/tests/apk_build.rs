//! `basalt build tests/images/x86_64-apk.toml`: the root comes from a local
//! *signed* apk repository made by tests/alpine/make-trees --with-kernel and
//! tests/alpine/make-repo (openssl, gzip, tar, Python — not Basalt's code) from
//! the Debian test assets. Checked with independent tools (sfdisk, unsquashfs,
//! sha256sum): the packages' files and `/lib/apk/db/installed` are in root-a;
//! `basalt lock` pins the set and two locked builds are identical; a changed
//! package list is refused until `basalt lock` runs again.
//!
//! Needs the test assets (`BASALT_ASSETS`, default `<repo>/.cache/assets`):
//! skipped with a printed reason when missing.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

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
        fallback.to_path_buf()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Byte offset of root-a, from sfdisk's dump.
fn root_a_offset(img: &Path) -> u64 {
    let dump = text(&run(Command::new("sfdisk").arg("-d").arg(img)).stdout);
    let line = dump
        .lines()
        .find(|l| l.contains("name=\"root-a\""))
        .unwrap_or_else(|| panic!("no root-a in {dump}"));
    let start: u64 = line
        .split("start=")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("bad sfdisk line {line}"));
    start * 512
}

#[test]
fn apk_root_from_a_local_signed_repository_is_locked_and_reproducible() {
    let Some(assets) = assets() else { return };
    let busybox = assets.join("amd64/busybox/bin/busybox");
    let init = binary("BASALT_INIT", "init", &busybox);
    let standin = binary("BASALT_STANDIN", "k8s-standin", &busybox);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("apk_build");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("def")).unwrap();
    let (trees, repo_dir) = (dir.join("trees"), dir.join("repo"));
    run(Command::new(repo().join("tests/alpine/make-trees"))
        .arg(&trees)
        .arg("--with-kernel")
        .env("BASALT_ASSETS", &assets));
    run(Command::new(repo().join("tests/alpine/make-repo"))
        .arg(&trees)
        .arg(&repo_dir));
    let def = dir.join("def/x86_64-apk.toml");
    std::fs::copy(repo().join("tests/images/x86_64-apk.toml"), &def).unwrap();

    let basalt = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_basalt"));
        c.args(args)
            .env("BASALT_TEST_REPO", &repo_dir)
            .env("BASALT_STANDIN", &standin)
            .env("BASALT_INIT", &init)
            .env("BASALT_SOURCE_DIR", repo())
            .env("XDG_CACHE_HOME", dir.join("cache"))
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .env("RUST_BACKTRACE", "0");
        c
    };
    let out = dir.join("out");
    let build_args = [
        "build",
        def.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--raw-only",
    ];
    let img = out.join("basalt-x86_64-apk-test.img");

    // Unlocked: resolves afresh, says so, prints the script warnings.
    let first = run(&mut basalt(&build_args));
    let err = text(&first.stderr);
    assert!(err.contains("not locked"), "{err}");
    assert!(
        err.contains("warning: alpine-baselayout .pre-install: NOT RUN"),
        "{err}"
    );

    let off = root_a_offset(&img);
    let list = text(
        &run(Command::new("unsquashfs")
            .arg("-o")
            .arg(off.to_string())
            .arg("-lc")
            .arg(&img))
        .stdout,
    );
    for needed in [
        "squashfs-root/lib/apk/db/installed",
        "squashfs-root/etc/apk/world",
        "squashfs-root/bin/busybox",
        "squashfs-root/bin/sh",
        "squashfs-root/etc/passwd",
        "squashfs-root/etc/ssl/certs/ca-certificates.crt",
        "squashfs-root/usr/lib/systemd/boot/efi/systemd-bootx64.efi",
        "squashfs-root/usr/lib/basalt/init",
        "squashfs-root/usr/bin/k3s",
    ] {
        assert!(list.lines().any(|l| l == needed), "root-a lacks {needed}");
    }
    assert!(
        list.lines()
            .any(|l| l.starts_with("squashfs-root/lib/modules/") && l.ends_with(".ko")),
        "no kernel modules from linux-virt in root-a"
    );
    let x = dir.join("x");
    run(Command::new("unsquashfs")
        .arg("-o")
        .arg(off.to_string())
        .arg("-d")
        .arg(&x)
        .arg(&img)
        .arg("lib/apk/db/installed")
        .arg("etc/apk/world"));
    let installed = std::fs::read_to_string(x.join("lib/apk/db/installed")).unwrap();
    for p in [
        "alpine-baselayout",
        "busybox",
        "ca-certificates-bundle",
        "linux-virt",
        "musl",
        "systemd-boot",
    ] {
        assert!(
            installed.lines().any(|l| l == format!("P:{p}")),
            "{p} not in lib/apk/db/installed"
        );
    }
    assert!(
        installed.contains("R:busybox"),
        "busybox's files not recorded"
    );
    let world = std::fs::read_to_string(x.join("etc/apk/world")).unwrap();
    assert!(world.contains("linux-virt"), "world: {world}");

    // basalt packages resolve: the closed set, sorted, one name-version a line;
    // the test key must be given (the index is signed by it).
    let keys = repo_dir.join("keys");
    let r = run(&mut basalt(&[
        "packages",
        "resolve",
        "--repo",
        repo_dir.to_str().unwrap(),
        "--arch",
        "x86_64",
        "--keys",
        keys.to_str().unwrap(),
        "good-app",
        "busybox",
    ]));
    assert_eq!(
        text(&r.stdout),
        "busybox-1.35.0-r17\ngood-app-1.0-r0\ngood-app-extras-1.0-r0\ngood-lib-1.2-r0\nmusl-1.2.3-r0\nshell-b-1.0-r0\n"
    );
    let o = output(&mut basalt(&[
        "packages",
        "resolve",
        "--repo",
        repo_dir.to_str().unwrap(),
        "--arch",
        "x86_64",
        "busybox",
    ]));
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("basalt-test.rsa.pub"),
        "{}",
        text(&o.stderr)
    );

    // basalt lock pins the six packages by checksum.
    run(&mut basalt(&["lock", def.to_str().unwrap()]));
    let lock = std::fs::read_to_string(dir.join("def/basalt.lock")).unwrap();
    assert_eq!(lock.matches("[[arch.x86_64.package]]").count(), 6, "{lock}");
    assert!(lock.contains("checksum = \"Q1"), "{lock}");

    // Two locked builds: the same bytes.
    let b = run(&mut basalt(&build_args));
    assert!(text(&b.stderr).contains("pinned by"), "{}", text(&b.stderr));
    let h1 = sha256(&img);
    run(&mut basalt(&build_args));
    assert_eq!(h1, sha256(&img), "two locked builds differ");

    // A package list the lock was not made for: refused, says what to run.
    let changed = std::fs::read_to_string(&def)
        .unwrap()
        .replace("\"systemd-boot\"]", "\"systemd-boot\", \"good-lib\"]");
    std::fs::write(&def, changed).unwrap();
    let o = output(&mut basalt(&build_args));
    let err = text(&o.stderr);
    assert!(!o.status.success(), "a stale lock was used");
    assert!(
        err.contains("basalt.lock") && err.contains("good-lib") && err.contains("basalt lock"),
        "{err}"
    );

    let _ = std::fs::remove_dir_all(&dir);
}
