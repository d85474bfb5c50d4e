//! A local signed Alpine repository built by `tests/alpine/make-repo` (openssl,
//! gzip, tar, Python's tarfile — not Basalt's code), then read back through the
//! library: good packages resolve and extract with their modes, links and apk
//! database; each hostile package is refused with its package and file named.
//!
//! Set BASALT_ASSETS (tests/assets/fetch) to package the real busybox-static.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use basalt_rootfs::apk::install::{InstallOptions, Installer, Setuid};
use basalt_rootfs::apk::repo::{self, HttpTransport, RepoError};
use basalt_rootfs::apk::{
    ApkError, Cache, Dependency, Index, KeyRing, RepoRef, Repository, Trust, WorldSource,
    install_world, resolve,
};
use basalt_rootfs::tree::{EntryKind, Tree};

struct Repo {
    root: PathBuf,
}

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/alpine")
}

/// The repository is built once per test run (the scripts take a while) into
/// cargo's scratch directory for integration tests.
fn build_repo() -> &'static Repo {
    static REPO: OnceLock<Repo> = OnceLock::new();
    REPO.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("alpine-repo");
        let _ = std::fs::remove_dir_all(&dir);
        let trees = dir.join("trees");
        let root = dir.join("repo");
        let run = |cmd: &mut Command| {
            let out = cmd.output().unwrap();
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(Command::new(scripts().join("make-trees")).arg(&trees));
        run(Command::new(scripts().join("make-repo"))
            .arg(&trees)
            .arg(&root));
        Repo { root }
    })
}

fn keys(repo: &Repo) -> KeyRing {
    let mut k = KeyRing::alpine().unwrap();
    k.add_dir(&repo.root.join("keys")).unwrap();
    k
}

fn index(repo: &Repo, keys: &KeyRing) -> (Repository, Index) {
    let r = Repository::parse(repo.root.to_str().unwrap());
    let idx = r
        .fetch_index("x86_64", keys, &HttpTransport::default())
        .unwrap();
    (r, idx)
}

fn world(s: &str) -> Vec<Dependency> {
    Dependency::parse_list(s).unwrap()
}

/// Fetch, verify and install `names` one by one into a fresh tree.
fn install(repo: &Repo, names: &[&str], options: InstallOptions) -> Result<Tree, String> {
    let keys = keys(repo);
    let (r, idx) = index(repo, &keys);
    let cache = Cache::new(repo.root.join("cache"));
    let mut tree = Tree::new();
    let mut inst = Installer::new(options);
    for n in names {
        let info = idx.packages.iter().find(|p| p.name == *n).unwrap();
        let path = r
            .fetch_package("x86_64", info, &keys, &cache, &HttpTransport::default())
            .map_err(|e| e.to_string())?;
        let apk = repo::load_verified(&path, info, &keys, r.trust).map_err(|e| e.to_string())?;
        inst.install(&mut tree, info, &apk)
            .map_err(|e| e.to_string())?;
    }
    inst.finish(&mut tree, &world(&names.join(" ")), "x86_64", 1)
        .map_err(|e| e.to_string())?;
    Ok(tree)
}

/// Install one package; return the report's warnings.
fn install_report(repo: &Repo, name: &str) -> Vec<String> {
    let keys = keys(repo);
    let (r, idx) = index(repo, &keys);
    let info = idx.packages.iter().find(|p| p.name == name).unwrap();
    let cache = Cache::new(repo.root.join("cache"));
    let path = r
        .fetch_package("x86_64", info, &keys, &cache, &HttpTransport::default())
        .unwrap();
    let apk = repo::load_verified(&path, info, &keys, r.trust).unwrap();
    let mut tree = Tree::new();
    let mut inst = Installer::new(InstallOptions::default());
    inst.install(&mut tree, info, &apk).unwrap();
    inst.finish(&mut tree, &world(name), "x86_64", 0)
        .unwrap()
        .warnings
}

#[test]
fn good_world_resolves_and_extracts() {
    let repo = build_repo();
    let keys = keys(repo);
    let repos = [Repository::parse(repo.root.to_str().unwrap())];
    let cache = Cache::new(repo.root.join("cache"));
    let w = world("alpine-baselayout busybox ca-certificates-bundle good-app");
    let mut tree = Tree::new();
    let got = install_world(
        &WorldSource {
            repos: &repos,
            arch: "x86_64",
            keys: &keys,
            cache: &cache,
            transport: &HttpTransport::default(),
            options: InstallOptions::default(),
            threads: 4,
            progress: &|_, _| {},
            mtime: 1_700_000_000,
        },
        &w,
        &mut tree,
    )
    .unwrap();
    assert_eq!(
        got.resolution.ids(),
        [
            "alpine-baselayout-3.2.0-r23",
            "busybox-1.35.0-r17",
            "ca-certificates-bundle-20220614-r0",
            "good-app-1.0-r0",
            // install_if: good-app=1.0-r0 and good-lib are both installed
            "good-app-extras-1.0-r0",
            "good-lib-1.2-r0",
            "musl-1.2.3-r0",
            // virtual `virt-shell`: shell-b has the higher provider_priority
            "shell-b-1.0-r0",
        ]
    );

    let file = |p: &str| match &tree.get(p).unwrap_or_else(|| panic!("{p} missing")).kind {
        EntryKind::File(d) => d.read().unwrap(),
        k => panic!("{p} is {k:?}"),
    };
    assert_eq!(file("etc/good.conf"), b"from good-app");
    assert_eq!(file("usr/share/good-app/extras"), b"extras");
    assert!(
        String::from_utf8(file("etc/passwd"))
            .unwrap()
            .starts_with("root:x:0:0")
    );
    let tmp = tree.get("tmp").unwrap();
    assert!(tmp.is_dir());
    assert_eq!(tmp.mode, 0o1777);
    assert_eq!(tree.get("root").unwrap().mode, 0o700);
    let app = tree.get("usr/bin/good-app").unwrap();
    assert_eq!(
        (app.mode, app.uid, app.gid, app.mtime),
        (0o755, 0, 0, 1_700_000_000)
    );
    match &tree.get("var/run").unwrap().kind {
        EntryKind::Symlink(t) => assert_eq!(t, Path::new("/run")),
        k => panic!("var/run is {k:?}"),
    }
    // busybox applets, found in the binary without running it.
    let (links, _) = got.report.busybox_links.unwrap();
    assert!(links >= 4, "{links} applet links");
    match &tree.get("bin/ls").unwrap().kind {
        EntryKind::Symlink(t) => assert_eq!(t, Path::new("/bin/busybox")),
        k => panic!("bin/ls is {k:?}"),
    }
    if std::env::var_os("BASALT_ASSETS").is_some() {
        assert!(links > 200, "real busybox: {links} applet links");
        assert!(tree.get("sbin/modprobe").is_some());
    }
    // Scripts: busybox's is replayed, alpine-baselayout's reported.
    assert!(
        got.report
            .handled
            .iter()
            .any(|h| h.starts_with("busybox .post-install"))
    );
    assert!(
        got.report
            .warnings
            .iter()
            .any(|w| w.starts_with("alpine-baselayout .pre-install: NOT RUN")),
        "{:?}",
        got.report.warnings
    );
    // apk's database, parsed back with the index parser.
    let installed = String::from_utf8(file("lib/apk/db/installed")).unwrap();
    let recs = basalt_rootfs::apk::index::parse_records(&installed, "installed").unwrap();
    assert_eq!(recs.len(), 8);
    assert!(
        installed.contains("F:usr/bin\nM:0:0:755\nR:good-app\na:0:0:755\nZ:Q1"),
        "{installed}"
    );
    assert_eq!(
        String::from_utf8(file("etc/apk/world")).unwrap(),
        "alpine-baselayout\nbusybox\nca-certificates-bundle\ngood-app\n"
    );
}

#[test]
fn replaces_allows_and_conflict_refuses() {
    let repo = build_repo();
    let t = install(
        repo,
        &["good-app", "good-override"],
        InstallOptions::default(),
    )
    .unwrap();
    match &t.get("etc/good.conf").unwrap().kind {
        EntryKind::File(d) => assert_eq!(d.read().unwrap(), b"from good-override"),
        k => panic!("{k:?}"),
    }
    let e = install(repo, &["good-app", "good-clash"], InstallOptions::default()).unwrap_err();
    assert!(
        e.contains("package good-clash-1.0-r0")
            && e.contains("etc/good.conf")
            && e.contains("good-app"),
        "{e}"
    );
}

#[test]
fn hostile_packages_are_refused_naming_package_and_file() {
    let repo = build_repo();
    let apk = |n: &str| format!("x86_64/hostile-{n}-1.0-r0.apk");
    let cases: &[(&str, &[&str])] = &[
        (
            "badsig",
            &["hostile-badsig-1.0-r0", &apk("badsig"), "does not match"],
        ),
        (
            "unsigned",
            &["hostile-unsigned-1.0-r0", &apk("unsigned"), "not signed"],
        ),
        (
            "tampered",
            &["hostile-tampered-1.0-r0", &apk("tampered"), "datahash"],
        ),
        (
            "badsum",
            &[
                "hostile-badsum-1.0-r0",
                "usr/share/hostile-badsum/payload",
                "PAX checksum",
            ],
        ),
        (
            "nosum",
            &[
                "hostile-nosum-1.0-r0",
                "usr/share/hostile-nosum/payload",
                "no APK-TOOLS.checksum.SHA1",
            ],
        ),
        (
            "traversal",
            &[
                "hostile-traversal-1.0-r0",
                "../../etc/escaped",
                "escapes the root",
            ],
        ),
        (
            "symlink",
            &[
                "hostile-symlink-1.0-r0",
                "usr/lib/hostile-link/shadow",
                "through symlink",
            ],
        ),
        (
            "device",
            &[
                "hostile-device-1.0-r0",
                "dev/hostile-mem",
                "character device",
            ],
        ),
        (
            "setuid",
            &[
                "hostile-setuid-1.0-r0",
                "usr/share/hostile-setuid/payload",
                "setuid",
            ],
        ),
    ];
    for (name, want) in cases {
        let err = install(
            repo,
            &[&format!("hostile-{name}")],
            InstallOptions::default(),
        )
        .expect_err(name);
        for w in *want {
            assert!(err.contains(w), "hostile-{name}: {err:?} lacks {w:?}");
        }
    }
    // setuid passes when the image definition allows that path.
    let allow = InstallOptions {
        setuid: Setuid::Paths(["usr/share/hostile-setuid/payload".into()].into()),
    };
    let t = install(repo, &["hostile-setuid"], allow).unwrap();
    assert_eq!(
        t.get("usr/share/hostile-setuid/payload").unwrap().mode & 0o4000,
        0o4000
    );
    // An extended attribute cannot be kept: installed, and reported.
    let report = install_report(repo, "cap-ping");
    assert!(
        report.iter().any(
            |w| w.contains("cap-ping-1.0-r0 bin/cap-ping") && w.contains("security.capability")
        ),
        "{report:?}"
    );
    // Nothing was written outside the temp dir by the traversal package.
    assert!(!repo.root.join("../etc/escaped").exists());
}

#[test]
fn unsatisfiable_dependency_names_the_chain() {
    let repo = build_repo();
    let keys = keys(repo);
    let (_, idx) = index(repo, &keys);
    let err = resolve(
        &[RepoRef {
            tag: None,
            index: &idx,
        }],
        &world("busybox hostile-unsat"),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "world needs hostile-unsat, hostile-unsat-1.0-r0 needs does-not-exist>=2 \
         which no repository provides"
    );
}

#[test]
fn index_trust() {
    let repo = build_repo();
    let path = repo.root.join("x86_64/APKINDEX.tar.gz");
    let bytes = std::fs::read(&path).unwrap();
    // Without the repository's key: refused, naming the key.
    let e =
        Index::from_tar_gz(&bytes, &KeyRing::alpine().unwrap(), Trust::Signed, "idx").unwrap_err();
    assert!(e.to_string().contains("basalt-test.rsa.pub"), "{e}");
    // Unsigned copy (second gzip member only): refused unless trusted-unsigned.
    let members = basalt_rootfs::apk::archive::split_members(&bytes, "idx").unwrap();
    let unsigned = members[1].raw.to_vec();
    assert!(Index::from_tar_gz(&unsigned, &keys(repo), Trust::Signed, "idx").is_err());
    let idx =
        Index::from_tar_gz(&unsigned, &KeyRing::empty(), Trust::TrustedUnsigned, "idx").unwrap();
    // Every package tree make-trees wrote (22, plus systemd-boot when the test
    // assets are there) is in the index.
    let trees = std::fs::read_dir(repo.root.parent().unwrap().join("trees"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().join("PKGINFO").is_file())
        .count();
    assert!(trees >= 22, "{trees} package trees");
    assert_eq!(idx.packages.len(), trees);
    // A package from a signed repository whose index has no key: through the
    // whole pipeline the error names the step.
    let repos = [Repository::parse(repo.root.to_str().unwrap())];
    let mut tree = Tree::new();
    let e = install_world(
        &WorldSource {
            repos: &repos,
            arch: "x86_64",
            keys: &KeyRing::alpine().unwrap(),
            cache: &Cache::new(repo.root.join("cache")),
            transport: &HttpTransport::default(),
            options: InstallOptions::default(),
            threads: 1,
            progress: &|_, _| {},
            mtime: 0,
        },
        &world("musl"),
        &mut tree,
    )
    .unwrap_err();
    assert!(matches!(e, ApkError::Repo(RepoError::Index(_))), "{e}");
}

/// Serves the local repository's files as if they were at a URL, counting requests.
struct Mirror {
    root: PathBuf,
    requests: std::sync::Mutex<Vec<String>>,
}

impl repo::Transport for Mirror {
    fn get(&self, url: &str) -> Result<Vec<u8>, String> {
        self.requests.lock().unwrap().push(url.to_string());
        let rel = url
            .strip_prefix("https://mirror.invalid/alpine/")
            .ok_or("unknown host")?;
        std::fs::read(self.root.join(rel)).map_err(|e| e.to_string())
    }
}

#[test]
fn url_repository_fetches_in_parallel_into_the_content_addressed_cache() {
    let repo = build_repo();
    let keys = keys(repo);
    let mirror = Mirror {
        root: repo.root.clone(),
        requests: Default::default(),
    };
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let r = Repository::parse("https://mirror.invalid/alpine");
    let idx = r.fetch_index("x86_64", &keys, &mirror).unwrap();
    let names = ["musl", "good-app", "good-lib", "shell-b", "busybox"];
    let infos: Vec<_> = names
        .iter()
        .map(|n| idx.packages.iter().find(|p| p.name == *n).unwrap())
        .collect();
    let jobs: Vec<_> = infos
        .iter()
        .map(|info| repo::FetchJob { repo: &r, info })
        .collect();
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let progress = |done: usize, total: usize| {
        assert!(done <= total);
        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    };
    let paths = repo::fetch_all(&jobs, "x86_64", &keys, &cache, &mirror, 3, &progress).unwrap();
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), names.len());
    for (p, info) in paths.iter().zip(&infos) {
        // Named by the identity checksum, i.e. the SHA-1 of the control member.
        let hex = info.checksum.as_ref().unwrap().hex();
        assert_eq!(p, &cache.package_path(&hex));
        assert_eq!(
            std::fs::read(p).unwrap(),
            std::fs::read(repo.root.join("x86_64").join(info.file_name())).unwrap()
        );
    }
    let before = mirror.requests.lock().unwrap().len();
    // Warm: no network at all.
    repo::fetch_all(&jobs, "x86_64", &keys, &cache, &mirror, 3, &|_, _| {}).unwrap();
    assert_eq!(mirror.requests.lock().unwrap().len(), before);
    // A damaged cache entry is detected and fetched again.
    let bad = &paths[1];
    let mut bytes = std::fs::read(bad).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(bad, &bytes).unwrap();
    repo::fetch_all(&jobs, "x86_64", &keys, &cache, &mirror, 1, &|_, _| {}).unwrap();
    assert_eq!(mirror.requests.lock().unwrap().len(), before + 1);
    assert!(repo::load_verified(bad, infos[1], &keys, Trust::Signed).is_ok());
    // A mirror serving a tampered package: refused, nothing cached under its name.
    let evil = idx
        .packages
        .iter()
        .find(|p| p.name == "hostile-tampered")
        .unwrap();
    let e = r
        .fetch_package("x86_64", evil, &keys, &cache, &mirror)
        .unwrap_err();
    assert!(e.to_string().contains("hostile-tampered-1.0-r0.apk"), "{e}");
    assert!(
        !cache
            .package_path(&evil.checksum.as_ref().unwrap().hex())
            .exists()
    );
}

/// Flipped bytes anywhere in a package: always refused when the repository is
/// signed; never a panic even when checks are off (trusted-unsigned, no index
/// checksum), so the tar walker sees the damage.
#[test]
fn damaged_packages_are_refused_and_never_panic() {
    let repo = build_repo();
    let keys = keys(repo);
    let (_, idx) = index(repo, &keys);
    let info = idx.packages.iter().find(|p| p.name == "good-app").unwrap();
    let good = std::fs::read(repo.root.join("x86_64").join(info.file_name())).unwrap();
    let mut unchecked = info.clone();
    unchecked.checksum = None;
    let members = basalt_rootfs::apk::archive::split_members(&good, "good-app").unwrap();
    let (sig_len, sig_data) = (members[0].raw.len(), members[0].data.clone());
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..400 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let at = (seed >> 33) as usize % good.len();
        let bit = 1u8 << ((seed >> 29) & 7);
        let mut bad = good.clone();
        bad[at] ^= bit;
        let signed = basalt_rootfs::apk::ApkFile::parse(&bad, "good-app")
            .and_then(|apk| apk.verify(info, &keys, Trust::Signed));
        // The signature member is not itself signed: a flip in its gzip header
        // (mtime, OS byte) leaves the signature intact and may pass. Everything
        // after it is covered.
        if at >= sig_len {
            assert!(signed.is_err(), "flip of bit {bit} at {at} accepted");
        } else if signed.is_ok() {
            let m = basalt_rootfs::apk::archive::split_members(&bad, "x").unwrap();
            assert_eq!(
                m[0].data, sig_data,
                "changed signature accepted (flip at {at})"
            );
        }
        if let Ok(apk) = basalt_rootfs::apk::ApkFile::parse(&bad, "good-app")
            && apk
                .verify(&unchecked, &keys, Trust::TrustedUnsigned)
                .is_ok()
        {
            let mut tree = Tree::new();
            let _ = Installer::new(InstallOptions::default()).install(&mut tree, info, &apk);
        }
    }
    // Damage inside the decompressed data tar (past every hash): the walker
    // reports errors, never panics, and never accepts a changed file content.
    let apk = basalt_rootfs::apk::ApkFile::parse(&good, "good-app").unwrap();
    let (mut refused, mut accepted) = (0, 0);
    for _ in 0..400 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut bad = apk.clone();
        let at = (seed >> 33) as usize % bad.data_tar.len();
        bad.data_tar[at] ^= 1u8 << ((seed >> 29) & 7);
        let mut tree = Tree::new();
        match Installer::new(InstallOptions::default()).install(&mut tree, info, &bad) {
            Err(_) => refused += 1,
            Ok(()) => {
                accepted += 1;
                if let Some(e) = tree.get("usr/bin/good-app")
                    && let EntryKind::File(d) = &e.kind
                {
                    assert_eq!(d.read().unwrap(), b"#!/bin/sh\necho good\n");
                }
            }
        }
    }
    assert!(
        refused > 0 && accepted > 0,
        "refused {refused}, accepted {accepted}"
    );
}

/// A minimal HTTP/1.1 file server on localhost, one thread, `Connection: close`.
fn serve(root: PathBuf) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            let _ = reader.read_line(&mut request);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
            let file = root.join(path.trim_start_matches('/'));
            let (status, body) = match std::fs::read(&file) {
                Ok(b) if !path.contains("..") => ("200 OK", b),
                _ => ("404 Not Found", Vec::new()),
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(&body);
        }
    });
    format!("http://{addr}")
}

#[test]
fn http_repository_through_ureq() {
    let repo = build_repo();
    let keys = keys(repo);
    let base = serve(repo.root.clone());
    let r = Repository::parse(&format!("{base}/"));
    let http = HttpTransport::default();
    let idx = r.fetch_index("x86_64", &keys, &http).unwrap();
    let info = idx.packages.iter().find(|p| p.name == "good-app").unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let path = r
        .fetch_package("x86_64", info, &keys, &cache, &http)
        .unwrap();
    assert!(path.starts_with(cache_dir.path()));
    repo::load_verified(&path, info, &keys, Trust::Signed).unwrap();
    let e = r.fetch_index("aarch64", &keys, &http).unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("{base}/aarch64/APKINDEX.tar.gz")),
        "{e}"
    );
}

/// `.SIGN.RSA256.`: the index member re-signed with SHA-256 by openssl; a
/// SHA-1 signature under the RSA256 name must not pass.
#[test]
fn rsa256_index_signature() {
    let repo = build_repo();
    let keys = keys(repo);
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(repo.root.join("x86_64/APKINDEX.tar.gz")).unwrap();
    let members = basalt_rootfs::apk::archive::split_members(&bytes, "idx").unwrap();
    let member = dir.path().join("index.tar.gz");
    std::fs::write(&member, members[1].raw).unwrap();
    let make = |digest: &str| -> Vec<u8> {
        let script = format!(
            "set -e; cd {d}; openssl dgst -{digest} -sign {key} -out sig index.tar.gz; \
             python3 {py} segment sig.tar .SIGN.RSA256.basalt-test.rsa.pub=sig; \
             gzip -9 -n -c sig.tar > sig.tar.gz; cat sig.tar.gz index.tar.gz > out.tar.gz",
            d = dir.path().display(),
            key = repo.root.join("keys/basalt-test.rsa").display(),
            py = scripts().join("apk-tar.py").display(),
        );
        let st = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::read(dir.path().join("out.tar.gz")).unwrap()
    };
    let good = make("sha256");
    let idx = Index::from_tar_gz(&good, &keys, Trust::Signed, "rsa256").unwrap();
    assert_eq!(idx.signed_by.as_deref(), Some("basalt-test.rsa.pub"));
    let wrong = make("sha1");
    let e = Index::from_tar_gz(&wrong, &keys, Trust::Signed, "rsa256").unwrap_err();
    assert!(e.to_string().contains("RSA/SHA-256"), "{e}");
}
