//! Signing keys and signature checks for indexes and packages (REFERENCE.md §5.1, §5.3).
//!
//! A signature entry is named `.SIGN.<ALG>.<key file name>`; the key is picked by that
//! file name, exactly as `apk` looks it up in `/etc/apk/keys`. Alpine's own keys are
//! compiled in (copied from `alpine-keys` 2.4 into `rootfs/keys/`); an image definition
//! may add key directories. This module never decides whether an unsigned input is
//! acceptable: callers do, from the repository's [`crate::apk::Trust`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rsa::PublicKey;
use rsa::pkcs1v15::{Signature, VerifyingKey};
use rsa::pkcs8::DecodePublicKey;
use rsa::signature::Verifier;

/// Alpine's keys (alpine-keys 2.4), embedded at build time and picked by file name.
const ALPINE_KEYS: &[(&str, &[u8])] = &[
    (
        "alpine-devel@lists.alpinelinux.org-4a6a0840.rsa.pub",
        include_bytes!("../../keys/alpine-devel@lists.alpinelinux.org-4a6a0840.rsa.pub"),
    ),
    (
        "alpine-devel@lists.alpinelinux.org-524d27bb.rsa.pub",
        include_bytes!("../../keys/alpine-devel@lists.alpinelinux.org-524d27bb.rsa.pub"),
    ),
    (
        "alpine-devel@lists.alpinelinux.org-5261cecb.rsa.pub",
        include_bytes!("../../keys/alpine-devel@lists.alpinelinux.org-5261cecb.rsa.pub"),
    ),
    (
        "alpine-devel@lists.alpinelinux.org-58199dcc.rsa.pub",
        include_bytes!("../../keys/alpine-devel@lists.alpinelinux.org-58199dcc.rsa.pub"),
    ),
    (
        "alpine-devel@lists.alpinelinux.org-6165ee59.rsa.pub",
        include_bytes!("../../keys/alpine-devel@lists.alpinelinux.org-6165ee59.rsa.pub"),
    ),
    (
        "alpine-devel@lists.alpinelinux.org-616a9724.rsa.pub",
        include_bytes!("../../keys/alpine-devel@lists.alpinelinux.org-616a9724.rsa.pub"),
    ),
    (
        "alpine-devel@lists.alpinelinux.org-616adfeb.rsa.pub",
        include_bytes!("../../keys/alpine-devel@lists.alpinelinux.org-616adfeb.rsa.pub"),
    ),
    (
        "alpine-devel@lists.alpinelinux.org-616ae350.rsa.pub",
        include_bytes!("../../keys/alpine-devel@lists.alpinelinux.org-616ae350.rsa.pub"),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("signing key {name:?} is not valid PEM SubjectPublicKeyInfo RSA: {reason}")]
    BadKey { name: String, reason: String },
    #[error("cannot read key directory {dir}: {source}")]
    ReadDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read key file {path}: {source}")]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("signature entry {entry:?}: unknown algorithm (expected .SIGN.RSA. or .SIGN.RSA256.)")]
    UnknownAlgorithm { entry: String },
    #[error("signed by key {key:?}, which is not among the trusted keys")]
    UnknownKey { key: String },
    #[error("signature by key {key:?} ({alg}) does not match the signed bytes")]
    Mismatch { key: String, alg: &'static str },
}

/// Signature algorithms apk v2 uses (REFERENCE.md §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigAlg {
    /// `.SIGN.RSA.`: PKCS#1 v1.5 over SHA-1.
    RsaSha1,
    /// `.SIGN.RSA256.`: PKCS#1 v1.5 over SHA-256.
    RsaSha256,
}

impl SigAlg {
    pub fn label(self) -> &'static str {
        match self {
            SigAlg::RsaSha1 => "RSA/SHA-1",
            SigAlg::RsaSha256 => "RSA/SHA-256",
        }
    }
}

/// One `.SIGN.*` entry from a signature tar segment.
#[derive(Debug, Clone)]
pub struct SignatureEntry {
    pub alg: SigAlg,
    /// File name of the public key, e.g. `alpine-devel@lists.alpinelinux.org-6165ee59.rsa.pub`.
    pub key_name: String,
    pub signature: Vec<u8>,
}

impl SignatureEntry {
    /// Parse an entry name. `Ok(None)` for names that are not signatures at all;
    /// an error for `.SIGN.` names with an algorithm Basalt does not verify
    /// (DSA, RSA512), so they are reported rather than silently skipped.
    pub fn from_entry(name: &str, signature: Vec<u8>) -> Result<Option<SignatureEntry>, KeyError> {
        let Some(rest) = name.strip_prefix(".SIGN.") else {
            return Ok(None);
        };
        let (alg, key) = if let Some(k) = rest.strip_prefix("RSA256.") {
            (SigAlg::RsaSha256, k)
        } else if let Some(k) = rest.strip_prefix("RSA.") {
            (SigAlg::RsaSha1, k)
        } else {
            return Err(KeyError::UnknownAlgorithm {
                entry: name.to_string(),
            });
        };
        Ok(Some(SignatureEntry {
            alg,
            key_name: key.to_string(),
            signature,
        }))
    }
}

/// The keys a build trusts, by file name.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    keys: BTreeMap<String, PublicKey>,
}

impl KeyRing {
    /// No keys at all (tests, or a build that trusts only its own keys).
    pub fn empty() -> KeyRing {
        KeyRing::default()
    }

    /// Alpine's keys shipped with Basalt.
    pub fn alpine() -> Result<KeyRing, KeyError> {
        let mut ring = KeyRing::empty();
        for (name, pem) in ALPINE_KEYS {
            ring.add_pem(name, pem)?;
        }
        Ok(ring)
    }

    /// Add one PEM (`-----BEGIN PUBLIC KEY-----`) key under its file name.
    pub fn add_pem(&mut self, name: &str, pem: &[u8]) -> Result<(), KeyError> {
        let text = std::str::from_utf8(pem).map_err(|e| KeyError::BadKey {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        let key = PublicKey::from_public_key_pem(text.trim()).map_err(|e| KeyError::BadKey {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        self.keys.insert(name.to_string(), key);
        Ok(())
    }

    /// Add every `*.pub` file of a directory (the image definition's extra keys).
    pub fn add_dir(&mut self, dir: &Path) -> Result<(), KeyError> {
        let rd = std::fs::read_dir(dir).map_err(|source| KeyError::ReadDir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let mut paths = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|source| KeyError::ReadDir {
                dir: dir.to_path_buf(),
                source,
            })?;
            paths.push(ent.path());
        }
        paths.sort();
        for path in paths {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if !name.ends_with(".pub") {
                continue;
            }
            let name = name.to_string();
            let pem = std::fs::read(&path).map_err(|source| KeyError::ReadKey {
                path: path.clone(),
                source,
            })?;
            self.add_pem(&name, &pem)?;
        }
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.keys.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Check `sig` over `signed` with the key it names.
    pub fn verify(&self, sig: &SignatureEntry, signed: &[u8]) -> Result<(), KeyError> {
        let key = self
            .keys
            .get(&sig.key_name)
            .ok_or_else(|| KeyError::UnknownKey {
                key: sig.key_name.clone(),
            })?;
        let mismatch = || KeyError::Mismatch {
            key: sig.key_name.clone(),
            alg: sig.alg.label(),
        };
        let signature = Signature::try_from(sig.signature.as_slice()).map_err(|_| mismatch())?;
        let ok = match sig.alg {
            SigAlg::RsaSha1 => VerifyingKey::<sha1::Sha1>::new(key.clone())
                .verify(signed, &signature)
                .is_ok(),
            SigAlg::RsaSha256 => VerifyingKey::<sha2::Sha256>::new(key.clone())
                .verify(signed, &signature)
                .is_ok(),
        };
        if ok { Ok(()) } else { Err(mismatch()) }
    }

    /// Accept if at least one signature verifies with a known key. Signatures by
    /// unknown keys are skipped (apk does the same: an index may carry several);
    /// a signature by a known key that does not verify is an error.
    pub fn verify_any(&self, sigs: &[SignatureEntry], signed: &[u8]) -> Result<String, KeyError> {
        let mut first_err = None;
        for sig in sigs {
            match self.verify(sig, signed) {
                Ok(()) => return Ok(sig.key_name.clone()),
                Err(e) => {
                    if first_err.is_none() || matches!(e, KeyError::Mismatch { .. }) {
                        first_err = Some(e);
                    }
                }
            }
        }
        Err(first_err.unwrap_or(KeyError::UnknownKey {
            key: "(no signature)".to_string(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_shipped_keys_parse() {
        let ring = KeyRing::alpine().unwrap();
        assert_eq!(ring.names().count(), 8);
        assert!(ring.contains("alpine-devel@lists.alpinelinux.org-6165ee59.rsa.pub"));
    }

    #[test]
    fn signature_entry_names() {
        let s = SignatureEntry::from_entry(".SIGN.RSA.k.rsa.pub", vec![1])
            .unwrap()
            .unwrap();
        assert_eq!(s.alg, SigAlg::RsaSha1);
        assert_eq!(s.key_name, "k.rsa.pub");
        let s = SignatureEntry::from_entry(".SIGN.RSA256.k.rsa.pub", vec![1])
            .unwrap()
            .unwrap();
        assert_eq!(s.alg, SigAlg::RsaSha256);
        assert!(SignatureEntry::from_entry(".SIGN.DSA.k", vec![]).is_err());
        assert!(
            SignatureEntry::from_entry(".PKGINFO", vec![])
                .unwrap()
                .is_none()
        );
    }
}
