//! `basalt flash` and `basalt config inject` end to end, through the CLI,
//! checked with tools nobody here wrote: mtools (`mtype`), `fsck.vfat`,
//! `sfdisk`, `bmaptool`, `zstd`, `cmp`.
//!
//! The image is a small GPT disk made with the builder's own disk and ESP
//! code plus data at known places, with its `.img.zst` and `.bmap` written by
//! `basalt`'s outputs module, exactly as `basalt build` leaves them.

use std::io::{Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use basalt_imagebuild::board::Partitions;
use basalt_imagebuild::disk::{Layout, create};

fn basalt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_basalt"))
}

struct Dir(PathBuf);
impl Dir {
    fn new(name: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("basalt-flashcli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A GPT image (ESP formatted, random-looking data in root-a) plus its outputs.
fn make_image(dir: &Path) -> (PathBuf, Layout) {
    let img = dir.join("node.img");
    let layout = Layout::new(&Partitions {
        esp_mib: 40,
        config_mib: 0,
        boot_mib: 0,
        root_mib: 16,
        data_mib: 8,
    });
    let f = create(&img, &layout, b"flash-cli-test").unwrap();
    basalt_imagebuild::esp::format(&f, layout.esp().start, layout.esp().len, 0xB45A17, 0).unwrap();
    basalt_imagebuild::esp::add_files(
        &f,
        layout.esp().start,
        layout.esp().len,
        &[("loader/loader.conf", b"timeout 0\n")],
        0,
    )
    .unwrap();
    let mut f = f;
    f.seek(SeekFrom::Start(layout.root_a().start + 4096))
        .unwrap();
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    basalt_imagebuild::outputs::write_all(&img, false, 2).unwrap();
    (img, layout)
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("running a command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every range the bmap maps is byte-identical in `target` and `img`
/// (the ESP excepted when a config was injected: that is checked by mtools).
fn assert_mapped_equal(img: &Path, target: &Path, skip: Option<(u64, u64)>) {
    let xml = std::fs::read_to_string(img.with_extension("bmap")).unwrap();
    let bmap = basalt_imagebuild::bmap::Bmap::parse(&xml).unwrap();
    let a = std::fs::read(img).unwrap();
    let b = std::fs::read(target).unwrap();
    assert_eq!(a.len(), b.len(), "target size differs from the image");
    for r in &bmap.ranges {
        let (s, e) = bmap.byte_range(r);
        if let Some((ks, ke)) = skip
            && s >= ks
            && e <= ke
        {
            continue;
        }
        assert!(
            a[s as usize..e as usize] == b[s as usize..e as usize],
            "bytes {s}..{e} differ"
        );
    }
}

fn check_fat(target: &Path, layout: &Layout, expect_node_toml: &str) {
    let at = format!("{}@@{}", target.display(), layout.esp().start);
    let got = run_ok(Command::new("mtype").args(["-i", &at, "::/node.toml"]));
    assert_eq!(got, expect_node_toml);
    let esp = target.with_extension("esp");
    let all = std::fs::read(target).unwrap();
    let (s, l) = (layout.esp().start as usize, layout.esp().len as usize);
    std::fs::write(&esp, &all[s..s + l]).unwrap();
    run_ok(Command::new("fsck.vfat").arg("-n").arg(&esp));
}

#[test]
fn flash_img_and_zst_with_config_then_bmaptool_agrees() {
    let d = Dir::new("local");
    let (img, layout) = make_image(&d.0);
    let cfg = d.0.join("node.toml");
    std::fs::write(&cfg, "hostname = \"old\"\n").unwrap();
    let esp_range = (layout.esp().start, layout.esp().start + layout.esp().len);

    // Raw .img with the .bmap beside it.
    let t1 = d.0.join("card1.img");
    let out = run_ok(
        basalt()
            .arg("flash")
            .arg(&img)
            .arg(&t1)
            .arg("--config")
            .arg(&cfg)
            .arg("--hostname")
            .arg("edge-1"),
    );
    assert!(out.contains("(bmap)") && out.contains("verified"), "{out}");
    assert_mapped_equal(&img, &t1, Some(esp_range));
    check_fat(&t1, &layout, "hostname = \"edge-1\"\n");
    let table = run_ok(Command::new("sfdisk").arg("-d").arg(&t1));
    assert!(
        table.contains("name=\"esp\"") && table.contains("name=\"data\""),
        "{table}"
    );

    // .img.zst (bmap found beside it by stripping the suffixes).
    let t2 = d.0.join("card2.img");
    let zst = d.0.join("node.img.zst");
    run_ok(
        basalt()
            .arg("flash")
            .arg(&zst)
            .arg(&t2)
            .arg("--config")
            .arg(&cfg),
    );
    assert_mapped_equal(&img, &t2, Some(esp_range));
    check_fat(&t2, &layout, "hostname = \"old\"\n");

    // .img.zst with no bmap: zero blocks skipped, result still equal everywhere.
    let lone = Dir::new("lone");
    std::fs::copy(&zst, lone.0.join("node.img.zst")).unwrap();
    let t3 = lone.0.join("card3.img");
    let out = run_ok(
        basalt()
            .arg("flash")
            .arg(lone.0.join("node.img.zst"))
            .arg(&t3),
    );
    assert!(out.contains("zero blocks skipped"), "{out}");
    run_ok(Command::new("cmp").arg(&img).arg(&t3));

    // bmaptool consumes our image and bmap and produces the same bytes.
    let t4 = d.0.join("card4.img");
    run_ok(
        Command::new("bmaptool")
            .arg("copy")
            .arg("--bmap")
            .arg(img.with_extension("bmap"))
            .arg(&img)
            .arg(&t4),
    );
    assert_mapped_equal(&img, &t4, None);
}

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn flash_from_http_url_streams_and_verifies() {
    let d = Dir::new("http");
    let (img, layout) = make_image(&d.0);
    let port = free_port();
    let server = Server(
        Command::new("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
            ])
            .current_dir(&d.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 for a local http server"),
    );
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "http server did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let cfg = d.0.join("node.toml");
    std::fs::write(&cfg, "hostname = \"from-http\"\n").unwrap();
    let t = d.0.join("card.img");
    let url = format!("http://127.0.0.1:{port}/node.img.zst");
    let out = run_ok(
        basalt()
            .arg("flash")
            .arg(&url)
            .arg(&t)
            .arg("--config")
            .arg(&cfg),
    );
    assert!(
        out.contains("(bmap)"),
        "the .bmap beside the URL was not used: {out}"
    );
    assert_mapped_equal(
        &img,
        &t,
        Some((layout.esp().start, layout.esp().start + layout.esp().len)),
    );
    check_fat(&t, &layout, "hostname = \"from-http\"\n");
    // Nothing was stored besides the target.
    let names: Vec<_> = std::fs::read_dir(&d.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.to_string_lossy().contains("partial")),
        "{names:?}"
    );
    drop(server);

    // A URL that does not answer is a clear error, and the target is untouched.
    let t2 = d.0.join("untouched.img");
    let out = basalt()
        .arg("flash")
        .arg(format!("http://127.0.0.1:{}/x.img", free_port()))
        .arg(&t2)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("127.0.0.1"), "{err}");
}

#[test]
fn bad_config_is_refused_before_anything_is_written() {
    let d = Dir::new("badcfg");
    let (img, _) = make_image(&d.0);
    let t = d.0.join("card.img");
    std::fs::write(&t, b"precious").unwrap();
    let out = basalt()
        .arg("flash")
        .arg(&img)
        .arg(&t)
        .arg("--hostname")
        .arg("bad_name!")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad_name!"));
    assert_eq!(
        std::fs::read(&t).unwrap(),
        b"precious",
        "the target was changed"
    );
}

#[test]
fn config_inject_into_an_image() {
    let d = Dir::new("inject");
    let (img, layout) = make_image(&d.0);
    let ci = d.0.join("cloud");
    std::fs::create_dir_all(&ci).unwrap();
    std::fs::write(ci.join("meta-data"), "instance-id: n1\nlocal-hostname: a\n").unwrap();
    std::fs::write(ci.join("user-data"), "#cloud-config\nhostname: a\n").unwrap();
    run_ok(
        basalt()
            .args(["config", "inject"])
            .arg(&img)
            .arg(&ci)
            .arg("--hostname")
            .arg("b"),
    );
    let at = format!("{}@@{}", img.display(), layout.esp().start);
    let md = run_ok(Command::new("mtype").args(["-i", &at, "::/meta-data"]));
    assert_eq!(md, "instance-id: n1\nlocal-hostname: b\n");
    let ud = run_ok(Command::new("mtype").args(["-i", &at, "::/user-data"]));
    assert_eq!(ud, "#cloud-config\nhostname: a\n");
}

#[test]
fn config_check_reports_file_line_column() {
    let d = Dir::new("check");
    let good = d.0.join("good.toml");
    std::fs::write(&good, "hostname = \"n1\"\n").unwrap();
    run_ok(basalt().args(["config", "check"]).arg(&good));
    let bad = d.0.join("bad.toml");
    std::fs::write(
        &bad,
        "hostname = \"n1\"\n\n[kubernetes]\ndistributon = \"k3s\"\n",
    )
    .unwrap();
    let out = basalt()
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:4:1:", bad.display())), "{err}");
    assert!(err.contains("distribution"), "no suggestion: {err}");
    // The same parser guards injection: nothing is written.
    let (img, _) = make_image(&d.0);
    let before = std::fs::read(&img).unwrap();
    let out = basalt()
        .args(["config", "inject"])
        .arg(&img)
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a refused config changed the image"
    );
    // `config schema` prints the documented schema.
    let schema = run_ok(basalt().args(["config", "schema"]));
    assert!(schema.contains("hostname") && schema.contains("kubernetes"));
}
