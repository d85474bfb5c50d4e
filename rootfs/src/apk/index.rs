//! `APKINDEX.tar.gz` (REFERENCE.md §5.3): verify its signature, parse its records.
//!
//! Member 1 is a signature tar segment (`.SIGN.RSA.<key>` / `.SIGN.RSA256.<key>`),
//! member 2 a tar with `DESCRIPTION` and `APKINDEX`; the signature covers the raw
//! compressed bytes of member 2. An index without a valid signature by a trusted
//! key is refused unless the repository is [`Trust::TrustedUnsigned`].

use base64::Engine;

use super::archive::{self, ArchiveError};
use super::dep::{DepError, Dependency, Provide};
use super::keys::{KeyError, KeyRing, SignatureEntry};

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("{what}: {source}")]
    Key { what: String, source: KeyError },
    #[error(
        "{what}: not signed (no .SIGN.* entry) and the repository is not marked trusted-unsigned"
    )]
    Unsigned { what: String },
    #[error(
        "{what}: expected a signature member and an index member, found {found} gzip member(s)"
    )]
    Members { what: String, found: usize },
    #[error("{what}: no APKINDEX entry in the index member")]
    NoApkindex { what: String },
    #[error("{what}: APKINDEX is not UTF-8")]
    NotUtf8 { what: String },
    #[error("{what}: line {line}: {reason}")]
    Record {
        what: String,
        line: usize,
        reason: String,
    },
    #[error("{what}: line {line}: {source}")]
    Dep {
        what: String,
        line: usize,
        source: DepError,
    },
}

/// Whether a repository's index must be signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Trust {
    /// The index (and packages) must carry a valid signature by a trusted key.
    #[default]
    Signed,
    /// The image definition explicitly trusts this repository without signatures.
    TrustedUnsigned,
}

/// A package's identity checksum (`C:`), the SHA-1 of its control gzip member.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Checksum {
    Sha1([u8; 20]),
    /// Legacy plain-hex MD5 identities; parsed so old indexes load, never trusted
    /// as a content address.
    Md5([u8; 16]),
}

impl Checksum {
    pub fn parse(s: &str) -> Option<Checksum> {
        if let Some(b64) = s.strip_prefix("Q1") {
            let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
            return Some(Checksum::Sha1(bytes.try_into().ok()?));
        }
        if s.len() == 32 {
            let mut out = [0u8; 16];
            for (i, o) in out.iter_mut().enumerate() {
                *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
            }
            return Some(Checksum::Md5(out));
        }
        None
    }

    pub fn sha1(&self) -> Option<&[u8; 20]> {
        match self {
            Checksum::Sha1(b) => Some(b),
            Checksum::Md5(_) => None,
        }
    }

    /// Hex, for cache file names.
    pub fn hex(&self) -> String {
        let b: &[u8] = match self {
            Checksum::Sha1(b) => b,
            Checksum::Md5(b) => b,
        };
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}

impl std::fmt::Display for Checksum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Checksum::Sha1(b) => write!(
                f,
                "Q1{}",
                base64::engine::general_purpose::STANDARD.encode(b)
            ),
            Checksum::Md5(_) => f.write_str(&self.hex()),
        }
    }
}

/// One package record (index letters in REFERENCE.md §5.2).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PackageInfo {
    /// `P`
    pub name: String,
    /// `V`
    pub version: String,
    /// `A`
    pub arch: String,
    /// `S`: size of the .apk file.
    pub size: u64,
    /// `I`: installed size.
    pub installed_size: u64,
    /// `T`
    pub description: String,
    /// `U`
    pub url: String,
    /// `L`
    pub license: String,
    /// `o`
    pub origin: String,
    /// `m`
    pub maintainer: String,
    /// `t`
    pub build_time: u64,
    /// `c`
    pub commit: String,
    /// `C`
    pub checksum: Option<Checksum>,
    /// `k`
    pub provider_priority: Option<u32>,
    /// `D`
    pub depends: Vec<Dependency>,
    /// `p`
    pub provides: Vec<Provide>,
    /// `i`
    pub install_if: Vec<Dependency>,
    /// `r`
    pub replaces: Vec<Dependency>,
    /// `q`
    pub replaces_priority: Option<u32>,
}

impl PackageInfo {
    /// `name-version`, the .apk file stem.
    pub fn file_name(&self) -> String {
        format!("{}-{}.apk", self.name, self.version)
    }

    pub fn id(&self) -> String {
        format!("{}-{}", self.name, self.version)
    }

    /// Write the record in apk's writer order (used for `lib/apk/db/installed`).
    pub fn write_record(&self, out: &mut String) {
        use std::fmt::Write;
        let mut line = |k: char, v: &str| {
            if !v.is_empty() {
                let _ = writeln!(out, "{k}:{v}");
            }
        };
        line(
            'C',
            &self
                .checksum
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        );
        line('P', &self.name);
        line('V', &self.version);
        line('A', &self.arch);
        line('S', &self.size.to_string());
        line('I', &self.installed_size.to_string());
        line('T', &self.description);
        line('U', &self.url);
        line('L', &self.license);
        line('o', &self.origin);
        line('m', &self.maintainer);
        line('t', &self.build_time.to_string());
        line('c', &self.commit);
        line(
            'k',
            &self
                .provider_priority
                .map(|k| k.to_string())
                .unwrap_or_default(),
        );
        let join = |v: Vec<String>| v.join(" ");
        line(
            'D',
            &join(self.depends.iter().map(ToString::to_string).collect()),
        );
        line(
            'p',
            &join(self.provides.iter().map(ToString::to_string).collect()),
        );
        line(
            'i',
            &join(self.install_if.iter().map(ToString::to_string).collect()),
        );
        line(
            'r',
            &join(self.replaces.iter().map(ToString::to_string).collect()),
        );
        line(
            'q',
            &self
                .replaces_priority
                .map(|k| k.to_string())
                .unwrap_or_default(),
        );
    }
}

/// A verified, parsed index.
#[derive(Debug, Clone, Default)]
pub struct Index {
    pub description: String,
    pub packages: Vec<PackageInfo>,
    /// Key file name that verified the index; `None` for a trusted-unsigned repository.
    pub signed_by: Option<String>,
}

impl Index {
    /// Verify and parse `APKINDEX.tar.gz` bytes. `what` names the source in errors.
    pub fn from_tar_gz(
        bytes: &[u8],
        keys: &KeyRing,
        trust: Trust,
        what: &str,
    ) -> Result<Index, IndexError> {
        let members = archive::split_members(bytes, what)?;
        let first = members.first().ok_or(IndexError::Members {
            what: what.to_string(),
            found: 0,
        })?;
        let first_entries = archive::read_small_entries(&first.data, what)?;
        let mut sigs = Vec::new();
        for e in &first_entries {
            if let Some(s) =
                SignatureEntry::from_entry(&e.name, e.data.clone()).map_err(|source| {
                    IndexError::Key {
                        what: what.to_string(),
                        source,
                    }
                })?
            {
                sigs.push(s);
            }
        }
        let (signed_by, body) = if sigs.is_empty() {
            if trust != Trust::TrustedUnsigned {
                return Err(IndexError::Unsigned {
                    what: what.to_string(),
                });
            }
            (
                None,
                members
                    .iter()
                    .flat_map(|m| m.data.iter().copied())
                    .collect::<Vec<u8>>(),
            )
        } else {
            if members.len() < 2 {
                return Err(IndexError::Members {
                    what: what.to_string(),
                    found: members.len(),
                });
            }
            let signed: Vec<u8> = members[1..]
                .iter()
                .flat_map(|m| m.raw.iter().copied())
                .collect();
            let signed_by = match keys.verify_any(&sigs, &signed) {
                Ok(k) => Some(k),
                // A trusted-unsigned repository may still carry a signature we cannot check.
                Err(_) if trust == Trust::TrustedUnsigned => None,
                Err(source) => {
                    return Err(IndexError::Key {
                        what: what.to_string(),
                        source,
                    });
                }
            };
            (
                signed_by,
                members[1..]
                    .iter()
                    .flat_map(|m| m.data.iter().copied())
                    .collect(),
            )
        };
        let entries = archive::read_small_entries(&body, what)?;
        let mut description = String::new();
        let mut apkindex = None;
        for e in entries {
            match e.name.as_str() {
                "DESCRIPTION" => description = String::from_utf8_lossy(&e.data).trim().to_string(),
                "APKINDEX" => apkindex = Some(e.data),
                _ => {}
            }
        }
        let text = apkindex.ok_or_else(|| IndexError::NoApkindex {
            what: what.to_string(),
        })?;
        let text = String::from_utf8(text).map_err(|_| IndexError::NotUtf8 {
            what: what.to_string(),
        })?;
        Ok(Index {
            description,
            packages: parse_records(&text, what)?,
            signed_by,
        })
    }
}

impl Index {
    /// The newest package called `name` (what `basalt packages info` shows).
    pub fn newest(&self, name: &str) -> Option<&PackageInfo> {
        self.packages
            .iter()
            .filter(|p| p.name == name)
            .max_by(|a, b| super::version::compare(&a.version, &b.version))
    }

    /// Packages whose name or description contains `needle` (case-insensitive),
    /// sorted by name then version (what `basalt packages search` shows).
    pub fn search(&self, needle: &str) -> Vec<&PackageInfo> {
        let n = needle.to_lowercase();
        let mut v: Vec<&PackageInfo> = self
            .packages
            .iter()
            .filter(|p| {
                p.name.to_lowercase().contains(&n) || p.description.to_lowercase().contains(&n)
            })
            .collect();
        v.sort_by(|a, b| {
            a.name
                .cmp(&b.name)
                .then(super::version::compare(&a.version, &b.version))
        });
        v
    }
}

/// Parse APKINDEX text (also the format of `lib/apk/db/installed`, whose extra
/// file lines are ignored here).
pub fn parse_records(text: &str, what: &str) -> Result<Vec<PackageInfo>, IndexError> {
    let mut out = Vec::new();
    let mut cur = PackageInfo::default();
    let mut started = false;
    let mut start_line = 0;
    let finish = |cur: &mut PackageInfo, line: usize, out: &mut Vec<PackageInfo>| {
        let p = std::mem::take(cur);
        if p.name.is_empty() || p.version.is_empty() {
            return Err(IndexError::Record {
                what: what.to_string(),
                line,
                reason: "record without P: or V:".to_string(),
            });
        }
        out.push(p);
        Ok(())
    };
    for (i, raw) in text.lines().enumerate() {
        let lineno = i + 1;
        if raw.is_empty() {
            if started {
                finish(&mut cur, start_line, &mut out)?;
                started = false;
            }
            continue;
        }
        if !started {
            started = true;
            start_line = lineno;
        }
        let Some((k, v)) = raw.split_once(':') else {
            return Err(IndexError::Record {
                what: what.to_string(),
                line: lineno,
                reason: format!("expected X:value, got {raw:?}"),
            });
        };
        let num = |v: &str| -> Result<u64, IndexError> {
            v.parse().map_err(|_| IndexError::Record {
                what: what.to_string(),
                line: lineno,
                reason: format!("{k}: {v:?} is not a number"),
            })
        };
        let dep = |source| IndexError::Dep {
            what: what.to_string(),
            line: lineno,
            source,
        };
        match k {
            "P" => cur.name = v.to_string(),
            "V" => cur.version = v.to_string(),
            "A" => cur.arch = v.to_string(),
            "S" => cur.size = num(v)?,
            "I" => cur.installed_size = num(v)?,
            "T" => cur.description = v.to_string(),
            "U" => cur.url = v.to_string(),
            "L" => cur.license = v.to_string(),
            "o" => cur.origin = v.to_string(),
            "m" => cur.maintainer = v.to_string(),
            "t" => cur.build_time = num(v)?,
            "c" => cur.commit = v.to_string(),
            "C" => {
                cur.checksum = Some(Checksum::parse(v).ok_or_else(|| IndexError::Record {
                    what: what.to_string(),
                    line: lineno,
                    reason: format!("C: {v:?} is not a Q1 or MD5 checksum"),
                })?)
            }
            "k" => cur.provider_priority = Some(num(v)? as u32),
            "q" => cur.replaces_priority = Some(num(v)? as u32),
            "D" => cur.depends = Dependency::parse_list(v).map_err(dep)?,
            "p" => cur.provides = Provide::parse_list(v).map_err(dep)?,
            "i" => cur.install_if = Dependency::parse_list(v).map_err(dep)?,
            "r" => cur.replaces = Dependency::parse_list(v).map_err(dep)?,
            // Installed-database and unknown letters: not part of package identity.
            _ => {}
        }
    }
    if started {
        finish(&mut cur, start_line, &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Option<Vec<u8>> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/alpine")
            .join(name);
        std::fs::read(p).ok()
    }

    fn both() -> Vec<(&'static str, Vec<u8>)> {
        [
            "v3.16-main-x86_64-APKINDEX.tar.gz",
            "v3.17-main-aarch64-APKINDEX.tar.gz",
        ]
        .into_iter()
        .map(|n| (n, fixture(n).expect("fixture index present")))
        .collect()
    }

    #[test]
    fn real_indexes_verify_with_real_keys() {
        let keys = KeyRing::alpine().unwrap();
        let want = [
            ("v3.16-main-x86_64-APKINDEX.tar.gz", "6165ee59", 4929),
            ("v3.17-main-aarch64-APKINDEX.tar.gz", "616ae350", 5004),
        ];
        for ((name, bytes), (_, key, count)) in both().into_iter().zip(want) {
            let idx = Index::from_tar_gz(&bytes, &keys, Trust::Signed, name).unwrap();
            assert!(idx.signed_by.as_deref().unwrap().contains(key), "{name}");
            assert_eq!(idx.packages.len(), count, "{name}");
            let bb = idx.packages.iter().find(|p| p.name == "busybox").unwrap();
            assert!(bb.checksum.as_ref().unwrap().sha1().is_some());
            assert!(bb.provides.iter().any(|p| p.name == "cmd:busybox"));
        }
    }

    #[test]
    fn flipped_byte_in_signed_member_is_rejected() {
        let keys = KeyRing::alpine().unwrap();
        let (name, bytes) = both().remove(0);
        let members = archive::split_members(&bytes, name).unwrap();
        let start = members[0].raw.len();
        let len = members[1].raw.len();
        // Flip bytes spread over the whole signed member: header, deflate data, trailer.
        let step = (len / 97).max(1);
        let mut checked = 0;
        for off in (start..start + len).step_by(step).chain([start + len - 1]) {
            let mut t = bytes.clone();
            t[off] ^= 0x01;
            let r = Index::from_tar_gz(&t, &keys, Trust::Signed, name);
            assert!(r.is_err(), "flip at {off} accepted");
            checked += 1;
        }
        assert!(checked > 90);
    }

    #[test]
    fn wrong_key_is_rejected() {
        let (name, bytes) = both().remove(0);
        // The x86_64 index is signed by 6165ee59; give the verifier a different key
        // under that file name.
        let mut keys = KeyRing::empty();
        let other = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("keys/alpine-devel@lists.alpinelinux.org-616ae350.rsa.pub"),
        )
        .unwrap();
        keys.add_pem(
            "alpine-devel@lists.alpinelinux.org-6165ee59.rsa.pub",
            &other,
        )
        .unwrap();
        let err = Index::from_tar_gz(&bytes, &keys, Trust::Signed, name).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        // And with no matching key name at all.
        let err = Index::from_tar_gz(&bytes, &KeyRing::empty(), Trust::Signed, name).unwrap_err();
        assert!(
            err.to_string().contains("not among the trusted keys"),
            "{err}"
        );
        // Trusted-unsigned accepts it without a verifying key.
        let idx =
            Index::from_tar_gz(&bytes, &KeyRing::empty(), Trust::TrustedUnsigned, name).unwrap();
        assert!(idx.signed_by.is_none());
    }

    #[test]
    fn unsigned_index_refused_unless_trusted() {
        let (name, bytes) = both().remove(0);
        let members = archive::split_members(&bytes, name).unwrap();
        let unsigned = members[1].raw.to_vec();
        let keys = KeyRing::alpine().unwrap();
        let err = Index::from_tar_gz(&unsigned, &keys, Trust::Signed, name).unwrap_err();
        assert!(matches!(err, IndexError::Unsigned { .. }), "{err}");
        let idx = Index::from_tar_gz(&unsigned, &keys, Trust::TrustedUnsigned, name).unwrap();
        assert_eq!(idx.packages.len(), 4929);
    }

    #[test]
    fn search_and_newest() {
        let keys = KeyRing::alpine().unwrap();
        let (name, bytes) = both().remove(0);
        let idx = Index::from_tar_gz(&bytes, &keys, Trust::Signed, name).unwrap();
        assert_eq!(idx.newest("musl").unwrap().version, "1.2.3-r2");
        assert!(idx.newest("no-such").is_none());
        let hits = idx.search("conntrack");
        assert!(hits.iter().any(|p| p.name == "conntrack-tools"));
        assert!(hits.windows(2).all(|w| w[0].name <= w[1].name));
    }

    /// Damaged index text (the signature aside): errors, never panics.
    #[test]
    fn mangled_records_never_panic() {
        let (name, bytes) = both().remove(0);
        let members = archive::split_members(&bytes, name).unwrap();
        let entries = archive::read_small_entries(&members[1].data, name).unwrap();
        let text = entries
            .iter()
            .find(|e| e.name == "APKINDEX")
            .unwrap()
            .data
            .clone();
        let text = &text[..200_000];
        let mut seed: u64 = 42;
        for _ in 0..300 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let mut t = text.to_vec();
            let at = (seed >> 33) as usize % t.len();
            let pool = b"\n:=<>!@~ \x00Q";
            t[at] = pool[(seed >> 20) as usize % pool.len()];
            let _ = parse_records(&String::from_utf8_lossy(&t), "mangled");
        }
    }

    #[test]
    fn record_letters() {
        let text = "C:Q1urwXkgPPIcs5UMkvCSYuNQIDTDo=\nP:a\nV:1.0-r0\nA:x86_64\nS:10\nI:20\n\
T:desc\nU:u\nL:MIT\no:a-src\nm:me\nt:1659366884\nc:abc\nk:100\nD:b>=1 !c so:libx.so.1\n\
p:cmd:a=1.0-r0 virt\ni:b d=2\nr:old\nq:5\n\nP:b\nV:2\n";
        let r = parse_records(text, "t").unwrap();
        assert_eq!(r.len(), 2);
        let a = &r[0];
        assert_eq!(a.size, 10);
        assert_eq!(a.installed_size, 20);
        assert_eq!(a.provider_priority, Some(100));
        assert_eq!(a.replaces_priority, Some(5));
        assert_eq!(a.depends.len(), 3);
        assert!(a.depends[1].conflict);
        assert_eq!(a.provides[1].version, None);
        assert_eq!(a.install_if.len(), 2);
        assert_eq!(a.replaces[0].name, "old");
        let mut s = String::new();
        a.write_record(&mut s);
        assert_eq!(parse_records(&s, "t").unwrap()[0], *a);
        assert!(parse_records("P:x\n", "t").is_err());
        assert!(parse_records("P:x\nV:1\nS:abc\n", "t").is_err());
    }
}
