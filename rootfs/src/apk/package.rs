//! One `.apk` file (REFERENCE.md §5.1): three gzip members — signature, control,
//! data — forming one tar stream.
//!
//! [`ApkFile::verify`] checks, in this order: the identity checksum from the index
//! (`C:Q1…` = SHA-1 of the control member as stored), the signature (over the
//! control member, plus the data member when `.PKGINFO` has no `datahash`), the
//! `datahash` (SHA-256 of the data member as stored), and that `.PKGINFO` names the
//! package the index promised. Per-file PAX checksums are checked while the data
//! is walked ([`super::install`]). Nothing here touches the host file system.

use std::collections::BTreeMap;

use sha1::{Digest, Sha1};
use sha2::Sha256;

use super::archive::{self, ArchiveError};
use super::index::{Checksum, PackageInfo, Trust};
use super::keys::{KeyError, KeyRing, SignatureEntry};

#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("package {package}: {source}")]
    Archive {
        package: String,
        source: ArchiveError,
    },
    #[error(
        "package {package}: expected 2 or 3 gzip members (signature, control, data), found {found}"
    )]
    Members { package: String, found: usize },
    #[error("package {package}: control member has no .PKGINFO")]
    NoPkginfo { package: String },
    #[error("package {package}: .PKGINFO line {line}: {reason}")]
    Pkginfo {
        package: String,
        line: usize,
        reason: String,
    },
    #[error(
        "package {package}: control member checksum {actual} differs from the index's {expected}"
    )]
    Checksum {
        package: String,
        expected: String,
        actual: String,
    },
    #[error("package {package}: the index has no SHA-1 (Q1) identity checksum for it")]
    NoChecksum { package: String },
    #[error("package {package}: not signed and its repository is not marked trusted-unsigned")]
    Unsigned { package: String },
    #[error("package {package}: signature: {source}")]
    Signature { package: String, source: KeyError },
    #[error(
        "package {package}: data member sha256 {actual} differs from .PKGINFO datahash {expected}"
    )]
    DataHash {
        package: String,
        expected: String,
        actual: String,
    },
    #[error("package {package}: .PKGINFO says {field} = {actual:?}, the index says {expected:?}")]
    Mismatch {
        package: String,
        field: &'static str,
        expected: String,
        actual: String,
    },
}

/// `.PKGINFO`, as `key = value` pairs in file order (keys repeat: `depend`, `provides`…).
#[derive(Debug, Clone, Default)]
pub struct PkgInfo {
    pub fields: Vec<(String, String)>,
}

impl PkgInfo {
    pub fn parse(text: &str, package: &str) -> Result<PkgInfo, PackageError> {
        let mut fields = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // `key = value`; values may be empty (`pkgdesc = `) or contain `=`.
            let Some((k, v)) = line.split_once('=') else {
                return Err(PackageError::Pkginfo {
                    package: package.to_string(),
                    line: i + 1,
                    reason: format!("expected `key = value`, got {line:?}"),
                });
            };
            let v = v.strip_prefix(' ').unwrap_or(v);
            fields.push((k.trim().to_string(), v.to_string()));
        }
        Ok(PkgInfo { fields })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn all<'s>(&'s self, key: &'s str) -> impl Iterator<Item = &'s str> + 's {
        self.fields
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A parsed (not yet verified) package file.
#[derive(Debug, Clone)]
pub struct ApkFile {
    /// `name-version`, for messages.
    pub label: String,
    pub signatures: Vec<SignatureEntry>,
    pub pkginfo: PkgInfo,
    /// Install scripts from the control member, by file name (`.post-install`…).
    pub scripts: BTreeMap<String, Vec<u8>>,
    control_raw: Vec<u8>,
    data_raw: Vec<u8>,
    /// The decompressed data tar.
    pub data_tar: Vec<u8>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl ApkFile {
    /// Split and parse `bytes`. `label` names the package in every error.
    pub fn parse(bytes: &[u8], label: &str) -> Result<ApkFile, PackageError> {
        let members =
            archive::split_members(bytes, label).map_err(|source| PackageError::Archive {
                package: label.to_string(),
                source,
            })?;
        let aerr = |source| PackageError::Archive {
            package: label.to_string(),
            source,
        };
        // An unsigned package has only control and data.
        let (sig_member, control, data) = match members.len() {
            3 => (Some(&members[0]), &members[1], &members[2]),
            2 => (None, &members[0], &members[1]),
            found => {
                return Err(PackageError::Members {
                    package: label.to_string(),
                    found,
                });
            }
        };
        let mut signatures = Vec::new();
        if let Some(m) = sig_member {
            for e in archive::read_small_entries(&m.data, label).map_err(aerr)? {
                if let Some(s) = SignatureEntry::from_entry(&e.name, e.data).map_err(|source| {
                    PackageError::Signature {
                        package: label.to_string(),
                        source,
                    }
                })? {
                    signatures.push(s);
                }
            }
        }
        let mut pkginfo = None;
        let mut scripts = BTreeMap::new();
        for e in archive::read_small_entries(&control.data, label).map_err(aerr)? {
            if e.name == ".PKGINFO" {
                pkginfo = Some(PkgInfo::parse(&String::from_utf8_lossy(&e.data), label)?);
            } else if e.name.starts_with('.') {
                scripts.insert(e.name, e.data);
            }
        }
        let pkginfo = pkginfo.ok_or_else(|| PackageError::NoPkginfo {
            package: label.to_string(),
        })?;
        Ok(ApkFile {
            label: label.to_string(),
            signatures,
            pkginfo,
            scripts,
            control_raw: control.raw.to_vec(),
            data_raw: data.raw.to_vec(),
            data_tar: data.data.clone(),
        })
    }

    /// SHA-1 of the control member as stored: the package's identity (`C:Q1…`).
    pub fn identity(&self) -> Checksum {
        Checksum::Sha1(Sha1::digest(&self.control_raw).into())
    }

    /// Verify against the index record `expected`, the trusted keys and the
    /// repository's trust.
    pub fn verify(
        &self,
        expected: &PackageInfo,
        keys: &KeyRing,
        trust: Trust,
    ) -> Result<(), PackageError> {
        let package = || self.label.clone();
        let want = expected.checksum.as_ref().and_then(Checksum::sha1);
        match want {
            Some(w) => {
                let got = self.identity();
                if got.sha1() != Some(w) {
                    return Err(PackageError::Checksum {
                        package: package(),
                        expected: expected
                            .checksum
                            .as_ref()
                            .map(ToString::to_string)
                            .unwrap_or_default(),
                        actual: got.to_string(),
                    });
                }
            }
            None if trust == Trust::Signed => {
                return Err(PackageError::NoChecksum { package: package() });
            }
            None => {}
        }
        let datahash = self.pkginfo.get("datahash");
        if trust == Trust::Signed || !self.signatures.is_empty() {
            if self.signatures.is_empty() {
                return Err(PackageError::Unsigned { package: package() });
            }
            let mut signed = self.control_raw.clone();
            if datahash.is_none() {
                signed.extend_from_slice(&self.data_raw);
            }
            if let Err(source) = keys.verify_any(&self.signatures, &signed)
                && trust == Trust::Signed
            {
                return Err(PackageError::Signature {
                    package: package(),
                    source,
                });
            }
        }
        if let Some(want) = datahash {
            let got = hex(&Sha256::digest(&self.data_raw));
            if !got.eq_ignore_ascii_case(want.trim()) {
                return Err(PackageError::DataHash {
                    package: package(),
                    expected: want.to_string(),
                    actual: got,
                });
            }
        }
        for (field, idx) in [("pkgname", &expected.name), ("pkgver", &expected.version)] {
            let actual = self.pkginfo.get(field).unwrap_or_default();
            if actual != idx {
                return Err(PackageError::Mismatch {
                    package: package(),
                    field,
                    expected: idx.clone(),
                    actual: actual.to_string(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkginfo_lines() {
        let p = PkgInfo::parse(
            "# Generated by abuild 3.9.0\npkgname = a\npkgdesc = \ndepend = so:libc.musl-x86_64.so.1\n\
             depend = b=1.0\ndatahash = ab12\n",
            "a",
        )
        .unwrap();
        assert_eq!(p.get("pkgname"), Some("a"));
        assert_eq!(p.get("pkgdesc"), Some(""));
        assert_eq!(
            p.all("depend").collect::<Vec<_>>(),
            ["so:libc.musl-x86_64.so.1", "b=1.0"]
        );
        assert!(PkgInfo::parse("garbage line\n", "a").is_err());
    }
}
