//! Busybox applet links without running busybox (REFERENCE.md §5.5).
//!
//! Alpine's busybox post-install is `/bin/busybox --install -s`: a symlink to
//! `/bin/busybox` for every applet, at the applet's install directory. Running
//! the target binary (qemu-user) is avoided; instead the list is read out of the
//! binary itself:
//!
//! 1. **Names**: busybox keeps all applet names in one sorted, NUL-separated
//!    string table (`applet_names[]`, generated at build time), which always starts
//!    with the applets `[` and `[[`. It is found by scanning for `"[\0[[\0"` and read
//!    up to the empty string that ends it; the names must be sorted and printable.
//! 2. **Directories**: with `FEATURE_INSTALLER` busybox also has
//!    `applet_install_loc[]`, one nibble per applet (0 `/`, 1 `/bin`, 2 `/sbin`,
//!    3 `/usr/bin`, 4 `/usr/sbin`), placed near the names. Every window of
//!    `ceil(n/2)` bytes whose nibbles are all ≤ 4 is decoded, and accepted only if
//!    it puts a set of anchor applets whose directories never change (`ls`→`/bin`,
//!    `modprobe`→`/sbin`, `wget`→`/usr/bin`, `chroot`→`/usr/sbin`, …) where they
//!    belong; the accepted window nearest the names wins.
//! 3. **Fallback**: when no window qualifies, each name's directory comes from
//!    `busybox-applet-dirs.txt` (directories are fixed in busybox's source, not by
//!    its configuration); unknown names go to `/usr/bin` and are reported.
//!
//! Both paths are architecture-independent (the tables are bytes, not code).

#[derive(Debug, thiserror::Error)]
pub enum BusyboxError {
    #[error("{what}: no applet name table (\"[\\0[[\\0\") found in the busybox binary")]
    NoNames { what: String },
    #[error("{what}: applet name table is malformed near byte {offset}")]
    BadNames { what: String, offset: usize },
}

/// How the directories were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Decoded from the binary's `applet_install_loc` table.
    BinaryTable,
    /// From the shipped per-applet directory list.
    ShippedList,
}

#[derive(Debug, Clone)]
pub struct Applets {
    /// (name, directory relative to the root, `""` for `/`).
    pub links: Vec<(String, &'static str)>,
    pub method: Method,
    /// Names the fallback list did not know (placed in `usr/bin`).
    pub guessed: Vec<String>,
}

const DIRS: [&str; 5] = ["", "bin", "sbin", "usr/bin", "usr/sbin"];
const ANCHORS: &[(&str, usize)] = &[
    ("ls", 1),
    ("cat", 1),
    ("mount", 1),
    ("sh", 1),
    ("modprobe", 2),
    ("ifconfig", 2),
    ("halt", 2),
    ("wget", 3),
    ("env", 3),
    ("[", 3),
    ("chroot", 4),
    ("crond", 4),
];
const SHIPPED: &str = include_str!("busybox-applet-dirs.txt");

fn names_table(bin: &[u8], what: &str) -> Result<(usize, Vec<String>), BusyboxError> {
    let start = find(bin, b"[\0[[\0").ok_or_else(|| BusyboxError::NoNames {
        what: what.to_string(),
    })?;
    let mut names: Vec<String> = Vec::new();
    let mut i = start;
    loop {
        let end = bin[i..]
            .iter()
            .position(|&b| b == 0)
            .map(|p| p + i)
            .ok_or_else(|| BusyboxError::BadNames {
                what: what.to_string(),
                offset: i,
            })?;
        if end == i {
            break;
        }
        let s = &bin[i..end];
        if s.len() > 64 || !s.iter().all(|b| b.is_ascii_graphic()) {
            return Err(BusyboxError::BadNames {
                what: what.to_string(),
                offset: i,
            });
        }
        let name = String::from_utf8_lossy(s).into_owned();
        if names.last().is_some_and(|l| *l >= name) {
            return Err(BusyboxError::BadNames {
                what: what.to_string(),
                offset: i,
            });
        }
        names.push(name);
        i = end + 1;
    }
    Ok((start, names))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn decode(window: &[u8], n: usize) -> Vec<usize> {
    (0..n)
        .map(|i| {
            let b = window[i / 2];
            usize::from(if i % 2 == 1 { b >> 4 } else { b & 0x0f })
        })
        .collect()
}

fn location_table(bin: &[u8], names_at: usize, names: &[String]) -> Option<Vec<usize>> {
    let n = names.len();
    let len = n.div_ceil(2);
    let anchors: Vec<(usize, usize)> = ANCHORS
        .iter()
        .filter_map(|(a, d)| names.iter().position(|x| x == a).map(|i| (i, *d)))
        .collect();
    if anchors.len() < 4 || bin.len() < len {
        return None;
    }
    let ok = |b: u8| (b & 0x0f) <= 4 && (b >> 4) <= 4;
    let mut best: Option<(usize, Vec<usize>)> = None;
    let mut run_start = 0;
    for i in 0..=bin.len() {
        if i < bin.len() && ok(bin[i]) {
            continue;
        }
        // [run_start, i) is a run of plausible bytes.
        if i - run_start >= len {
            for s in run_start..=i - len {
                let w = &bin[s..s + len];
                let nib = |i: usize| {
                    usize::from(if i % 2 == 1 {
                        w[i / 2] >> 4
                    } else {
                        w[i / 2] & 0x0f
                    })
                };
                if anchors.iter().all(|&(a, d)| nib(a) == d) {
                    let locs = decode(w, n);
                    let dist = s.abs_diff(names_at);
                    if best.as_ref().is_none_or(|(bd, _)| dist < *bd) {
                        best = Some((dist, locs));
                    }
                }
            }
        }
        run_start = i + 1;
    }
    best.map(|(_, l)| l)
}

/// Derive the applet links of a busybox binary (any architecture).
pub fn applets(bin: &[u8], what: &str) -> Result<Applets, BusyboxError> {
    let (at, names) = names_table(bin, what)?;
    if let Some(locs) = location_table(bin, at, &names) {
        return Ok(Applets {
            links: names
                .into_iter()
                .zip(locs)
                .map(|(n, l)| (n, DIRS[l]))
                .collect(),
            method: Method::BinaryTable,
            guessed: Vec::new(),
        });
    }
    let mut links = Vec::new();
    let mut guessed = Vec::new();
    for n in names {
        let dir = SHIPPED
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once(' '))
            .find(|(name, _)| *name == n)
            .map(|(_, d)| match d {
                "bin" => DIRS[1],
                "sbin" => DIRS[2],
                "usr/bin" => DIRS[3],
                "usr/sbin" => DIRS[4],
                _ => DIRS[0],
            });
        match dir {
            Some(d) => links.push((n, d)),
            None => {
                guessed.push(n.clone());
                links.push((n, DIRS[3]));
            }
        }
    }
    Ok(Applets {
        links,
        method: Method::ShippedList,
        guessed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic(with_table: bool) -> Vec<u8> {
        let names = [
            "[", "[[", "cat", "chroot", "crond", "env", "frob", "ls", "modprobe", "wget",
        ];
        let dirs = [3usize, 3, 1, 4, 4, 3, 2, 1, 2, 3];
        let mut bin = b"\x7fELF junk \x09\x09 more junk".to_vec();
        if with_table {
            let mut t = vec![0u8; names.len().div_ceil(2)];
            for (i, d) in dirs.iter().enumerate() {
                t[i / 2] |= (*d as u8) << (4 * (i % 2));
            }
            bin.push(0xff);
            bin.extend_from_slice(&t);
            bin.push(0xff);
        }
        for n in names {
            bin.extend_from_slice(n.as_bytes());
            bin.push(0);
        }
        bin.push(0);
        bin.extend_from_slice(b"\xff\xfftrailing");
        bin
    }

    #[test]
    fn reads_names_and_locations() {
        let a = applets(&synthetic(true), "t").unwrap();
        assert_eq!(a.method, Method::BinaryTable);
        assert!(a.links.contains(&("frob".to_string(), "sbin")));
        assert!(a.links.contains(&("chroot".to_string(), "usr/sbin")));
        assert_eq!(a.links.len(), 10);
    }

    #[test]
    fn falls_back_to_shipped_list() {
        let a = applets(&synthetic(false), "t").unwrap();
        assert_eq!(a.method, Method::ShippedList);
        assert!(a.links.contains(&("modprobe".to_string(), "sbin")));
        assert_eq!(a.guessed, ["frob"]);
    }

    #[test]
    fn no_table_is_an_error() {
        assert!(applets(b"nothing here", "t").is_err());
    }

    /// `BASALT_ASSETS`, else the repository's `.cache/assets` (tests/assets/fetch).
    fn assets_root() -> String {
        std::env::var("BASALT_ASSETS").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../.cache/assets").to_string()
        })
    }

    /// The Debian busybox-static test asset, checked against its own
    /// `--list-full` as recorded in the shipped list (same binary).
    #[test]
    fn real_busybox_binary_when_available() {
        let root = assets_root();
        if !std::path::Path::new(&root).join("amd64").is_dir() {
            eprintln!("{root}: no test assets: skipping the real busybox check");
            return;
        }
        let p = std::path::Path::new(&root).join("amd64/busybox/bin/busybox");
        let bin = std::fs::read(&p).unwrap();
        let a = applets(&bin, "busybox").unwrap();
        assert_eq!(a.method, Method::BinaryTable);
        let shipped: Vec<(String, String)> = SHIPPED
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once(' '))
            .map(|(n, d)| {
                (
                    n.to_string(),
                    if d == "." {
                        String::new()
                    } else {
                        d.to_string()
                    },
                )
            })
            .collect();
        let got: Vec<(String, String)> = a
            .links
            .iter()
            .map(|(n, d)| (n.clone(), d.to_string()))
            .collect();
        assert_eq!(got, shipped);
    }

    /// The applet table read from the arm64, armhf and amd64 busybox-static
    /// assets matches what each binary itself says (`--list-full`), run under
    /// qemu-user for the foreign architectures: an independent check that the
    /// byte-level method holds on every architecture Basalt builds for.
    #[test]
    fn every_architecture_matches_its_own_list_full() {
        let root = assets_root();
        if !std::path::Path::new(&root).join("amd64").is_dir() {
            eprintln!("{root}: no test assets: skipping the real busybox check");
            return;
        }
        for (arch, runner) in [
            ("amd64", None),
            ("arm64", Some("qemu-aarch64-static")),
            ("armhf", Some("qemu-arm-static")),
        ] {
            let p = std::path::Path::new(&root)
                .join(arch)
                .join("busybox/bin/busybox");
            if !p.exists() {
                eprintln!("{}: missing, skipping {arch}", p.display());
                continue;
            }
            let mut cmd = match runner {
                Some(r) => {
                    let mut c = std::process::Command::new(r);
                    c.arg(&p);
                    c
                }
                None => std::process::Command::new(&p),
            };
            let out = match cmd.arg("--list-full").output() {
                Ok(o) if o.status.success() => o.stdout,
                Ok(o) => panic!("{arch}: busybox --list-full failed: {}", o.status),
                Err(e) => {
                    // tests/run installs qemu-user-static; without it only the
                    // native architecture can be checked.
                    assert!(runner.is_some(), "{arch}: {e}");
                    eprintln!("{arch}: {e}: skipping (no qemu-user)");
                    continue;
                }
            };
            let mut want: Vec<(String, String)> = String::from_utf8_lossy(&out)
                .lines()
                .map(|l| match l.rsplit_once('/') {
                    Some((d, n)) => (n.to_string(), d.to_string()),
                    None => (l.to_string(), String::new()),
                })
                .collect();
            want.sort();
            let a = applets(&std::fs::read(&p).unwrap(), arch).unwrap();
            assert_eq!(a.method, Method::BinaryTable, "{arch}");
            let mut got: Vec<(String, String)> = a
                .links
                .iter()
                .map(|(n, d)| (n.clone(), d.to_string()))
                .collect();
            got.sort();
            assert!(
                want.len() > 200,
                "{arch}: only {} applets listed",
                want.len()
            );
            assert_eq!(got, want, "{arch}");
        }
    }
}
