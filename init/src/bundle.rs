//! Update bundles: the one file format that `basalt bundle` writes and the
//! device's update agent reads. Defined once, here.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! magic            8 bytes  "BASALTB\x01"
//! manifest_len     u32      ≤ MAX_MANIFEST
//! manifest         TOML text (Manifest)
//! comment_len      u32      ≤ MAX_COMMENT
//! trusted_comment  UTF-8, no newline
//! signature        2 + 8 + 64 + 64 bytes: "ED", key id, Ed25519(BLAKE2b-512(manifest)),
//!                  global signature over (signature ‖ trusted_comment)
//! payloads         each payload's bytes, in manifest order, sizes from the manifest
//! ```
//!
//! Every byte is covered: the magic and lengths are checked exactly, the
//! manifest and trusted comment by the minisign signature, the signature
//! bytes by verification itself, every payload by its sha256 in the signed
//! manifest, and the end of the file must follow the last payload exactly.
//! The signature is minisign's (REFERENCE.md §7): the manifest and a
//! `.minisig` rebuilt from these bytes verify with `minisign -V`.
//!
//! This module parses untrusted input: it never panics, and it reads nothing
//! of the payloads before the manifest's signature has been verified.

use std::io::Read;

use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 8] = b"BASALTB\x01";
pub const FORMAT_VERSION: u32 = 1;
pub const MAX_MANIFEST: u32 = 64 * 1024;
pub const MAX_COMMENT: u32 = 1024;
/// The untrusted comment line of a rebuilt `.minisig` (not stored: fixed).
pub const UNTRUSTED_COMMENT: &str = "basalt bundle manifest signature";
const SIG_LEN: usize = 2 + 8 + 64 + 64;

/// What a bundle holds and how to check it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Bundle format version (`FORMAT_VERSION`).
    pub format: u32,
    /// OS version this bundle installs.
    pub os_version: String,
    /// Board name; a device refuses a bundle for another board.
    pub board: String,
    /// OS versions this bundle may be installed over (exact versions, or `*`).
    #[serde(default)]
    pub compatible_from: Vec<String>,
    #[serde(rename = "payload", default)]
    pub payloads: Vec<Payload>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// Which part of the slot this fills.
    pub part: PayloadPart,
    pub size: u64,
    /// sha256 of the payload bytes, 64 lowercase hex digits.
    pub sha256: String,
    /// For the root: the dm-verity root hash (64 hex), when the root carries a tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity_root_hash: Option<String>,
    /// For the root: byte offset of the verity hash area in the payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity_hash_offset: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PayloadPart {
    /// The slot's boot files as an uncompressed tar (kernel, initramfs, boot config).
    Boot,
    /// The slot's root filesystem image (squashfs + verity tree), written raw.
    Root,
    /// Raspberry Pi: slot a's boot FAT image (its `cmdline.txt` names slot a), written raw to p2.
    BootFatA,
    /// Raspberry Pi: slot b's boot FAT image, written raw to p3.
    BootFatB,
}

impl Manifest {
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Parse and check the manifest's own consistency (not its signature).
    pub fn parse(text: &str) -> Result<Manifest, BundleError> {
        let m: Manifest =
            toml::from_str(text).map_err(|e| BundleError::Manifest(e.message().to_string()))?;
        if m.format != FORMAT_VERSION {
            return Err(BundleError::Manifest(format!(
                "format {} is not supported (this device reads format {FORMAT_VERSION})",
                m.format
            )));
        }
        if m.payloads.is_empty() {
            return Err(BundleError::Manifest("no payload".into()));
        }
        for (i, p) in m.payloads.iter().enumerate() {
            if !is_hex64(&p.sha256) {
                return Err(BundleError::Manifest(format!(
                    "payload {i}: sha256 is not 64 hex digits"
                )));
            }
            if let Some(h) = &p.verity_root_hash
                && !is_hex64(h)
            {
                return Err(BundleError::Manifest(format!(
                    "payload {i}: verity_root_hash is not 64 hex digits"
                )));
            }
            if m.payloads[..i].iter().any(|q| q.part == p.part) {
                return Err(BundleError::Manifest(format!(
                    "payload {i}: part {:?} twice",
                    p.part
                )));
            }
        }
        Ok(m)
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("not a Basalt bundle (bad magic)")]
    Magic,
    #[error("bundle is truncated in its {0}")]
    Truncated(&'static str),
    #[error("bundle {what} length {len} exceeds the limit {max}")]
    TooLong {
        what: &'static str,
        len: u32,
        max: u32,
    },
    #[error("bundle manifest is invalid: {0}")]
    Manifest(String),
    #[error("bundle signature is invalid: {0}")]
    Signature(String),
    #[error("bundle is signed by key {key_id}, which this node does not trust")]
    UnknownKey { key_id: String },
    #[error("payload {part:?}: sha256 mismatch (manifest {expected}, bundle {actual})")]
    PayloadHash {
        part: PayloadPart,
        expected: String,
        actual: String,
    },
    #[error("bundle has trailing bytes after its last payload")]
    Trailing,
    #[error("reading the bundle: {0}")]
    Io(#[from] std::io::Error),
}

/// The signed head of a bundle: everything before the payloads.
#[derive(Debug, Clone)]
pub struct Head {
    pub manifest_text: String,
    pub trusted_comment: String,
    /// "ED" ‖ key id ‖ signature ‖ global signature.
    pub signature: [u8; SIG_LEN],
}

impl Head {
    /// Key id as minisign displays it (`%016X` of the LE u64).
    pub fn key_id(&self) -> String {
        key_id_hex(&self.signature[2..10])
    }

    /// The `.minisig` text for `manifest_text`, as the minisign tool reads it.
    pub fn minisig(&self) -> String {
        format!(
            "untrusted comment: {UNTRUSTED_COMMENT}\n{}\ntrusted comment: {}\n{}\n",
            base64(&self.signature[..74]),
            self.trusted_comment,
            base64(&self.signature[74..])
        )
    }

    /// Serialise the head (magic through signature).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.manifest_text.len() as u32).to_le_bytes());
        out.extend_from_slice(self.manifest_text.as_bytes());
        out.extend_from_slice(&(self.trusted_comment.len() as u32).to_le_bytes());
        out.extend_from_slice(self.trusted_comment.as_bytes());
        out.extend_from_slice(&self.signature);
        out
    }

    /// Read the head from the start of a bundle stream. Reads nothing past the signature.
    pub fn read(r: &mut impl Read) -> Result<Head, BundleError> {
        let mut magic = [0u8; 8];
        read_exact(r, &mut magic, "magic")?;
        if &magic != MAGIC {
            return Err(BundleError::Magic);
        }
        let manifest = read_chunk(r, "manifest", MAX_MANIFEST)?;
        let comment = read_chunk(r, "trusted comment", MAX_COMMENT)?;
        let mut signature = [0u8; SIG_LEN];
        read_exact(r, &mut signature, "signature")?;
        let manifest_text =
            String::from_utf8(manifest).map_err(|_| BundleError::Manifest("not UTF-8".into()))?;
        let trusted_comment = String::from_utf8(comment)
            .map_err(|_| BundleError::Signature("trusted comment is not UTF-8".into()))?;
        if trusted_comment.contains(['\n', '\r']) {
            return Err(BundleError::Signature(
                "trusted comment holds a line break".into(),
            ));
        }
        if &signature[..2] != b"ED" {
            return Err(BundleError::Signature(
                "algorithm is not ED (prehashed Ed25519)".into(),
            ));
        }
        Ok(Head {
            manifest_text,
            trusted_comment,
            signature,
        })
    }

    /// Verify the signature against any of `trusted` (minisign public key
    /// files' text), then parse the manifest.
    pub fn verify(&self, trusted: &[String]) -> Result<Manifest, BundleError> {
        let sig = minisign_verify::Signature::decode(&self.minisig())
            .map_err(|e| BundleError::Signature(e.to_string()))?;
        for key_text in trusted {
            if pk_key_id(key_text).as_deref() != Some(self.key_id().as_str()) {
                continue;
            }
            let pk = minisign_verify::PublicKey::decode(key_text.trim())
                .or_else(|_| minisign_verify::PublicKey::from_base64(key_text.trim()))
                .map_err(|e| BundleError::Signature(format!("trusted key: {e}")))?;
            pk.verify(self.manifest_text.as_bytes(), &sig, false)
                .map_err(|e| BundleError::Signature(e.to_string()))?;
            return Manifest::parse(&self.manifest_text);
        }
        Err(BundleError::UnknownKey {
            key_id: self.key_id(),
        })
    }
}

/// Key id of a minisign public key given as the file's text or its base64 line.
pub fn pk_key_id(key_text: &str) -> Option<String> {
    let line = key_text
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))?;
    let raw = unbase64(line)?;
    (raw.len() == 42 && &raw[..2] == b"Ed").then(|| key_id_hex(&raw[2..10]))
}

fn key_id_hex(bytes: &[u8]) -> String {
    bytes.iter().rev().map(|b| format!("{b:02X}")).collect()
}

fn read_exact(r: &mut impl Read, buf: &mut [u8], what: &'static str) -> Result<(), BundleError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => BundleError::Truncated(what),
        _ => BundleError::Io(e),
    })
}

fn read_chunk(r: &mut impl Read, what: &'static str, max: u32) -> Result<Vec<u8>, BundleError> {
    let mut len = [0u8; 4];
    read_exact(r, &mut len, what)?;
    let len = u32::from_le_bytes(len);
    if len > max {
        return Err(BundleError::TooLong { what, len, max });
    }
    let mut buf = vec![0u8; len as usize];
    read_exact(r, &mut buf, what)?;
    Ok(buf)
}

/// Stream one payload from `r` into `sink` while hashing it, in bounded memory.
/// The sink sees the bytes before the hash is known: the caller writes into
/// the inactive slot and only marks it installed once every payload matched.
pub fn copy_payload(
    r: &mut impl Read,
    payload: &Payload,
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<(), BundleError> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = payload.size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        read_exact(r, &mut buf[..n], "payloads")?;
        h.update(&buf[..n]);
        sink(&buf[..n])?;
        left -= n as u64;
    }
    let actual: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if actual != payload.sha256 {
        return Err(BundleError::PayloadHash {
            part: payload.part,
            expected: payload.sha256.clone(),
            actual,
        });
    }
    Ok(())
}

/// One payload read out of the bundle stream, hashed as it is read, never
/// past its declared size. The consumer (the boot archive unpacker, the root
/// partition writer) reads what it wants; [`PayloadReader::finish`] reads
/// what it left and checks the payload's sha256. Nothing a consumer wrote
/// may be used before `finish` returned `Ok`.
pub struct PayloadReader<'a, R: Read> {
    inner: &'a mut R,
    payload: &'a Payload,
    left: u64,
    hasher: sha2::Sha256,
}

impl<R: Read> std::fmt::Debug for PayloadReader<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayloadReader")
            .field("part", &self.payload.part)
            .field("left", &self.left)
            .finish_non_exhaustive()
    }
}

impl<'a, R: Read> PayloadReader<'a, R> {
    pub fn new(inner: &'a mut R, payload: &'a Payload) -> Self {
        use sha2::Digest;
        PayloadReader {
            inner,
            payload,
            left: payload.size,
            hasher: sha2::Sha256::new(),
        }
    }

    /// Bytes of the payload not read yet.
    pub fn remaining(&self) -> u64 {
        self.left
    }

    /// Read the rest of the payload and check its hash.
    pub fn finish(mut self) -> Result<(), BundleError> {
        use sha2::Digest;
        let mut buf = vec![0u8; 64 * 1024];
        while self.left > 0 {
            let n = self.left.min(buf.len() as u64) as usize;
            read_exact(&mut self, &mut buf[..n], "payloads")?;
        }
        let actual: String = self
            .hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if actual != self.payload.sha256 {
            return Err(BundleError::PayloadHash {
                part: self.payload.part,
                expected: self.payload.sha256.clone(),
                actual,
            });
        }
        Ok(())
    }
}

impl<R: Read> Read for PayloadReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use sha2::Digest;
        let want = (buf.len() as u64).min(self.left) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "bundle ends inside a payload",
            ));
        }
        self.hasher.update(&buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

/// After the last payload the stream must end.
pub fn expect_end(r: &mut impl Read) -> Result<(), BundleError> {
    let mut one = [0u8; 1];
    match r.read(&mut one)? {
        0 => Ok(()),
        _ => Err(BundleError::Trailing),
    }
}

/// Verify a whole bundle stream without installing it: head, signature, every
/// payload hash, the exact end. Returns the manifest.
pub fn verify_stream(r: &mut impl Read, trusted: &[String]) -> Result<Manifest, BundleError> {
    let head = Head::read(r)?;
    let manifest = head.verify(trusted)?;
    for p in &manifest.payloads {
        copy_payload(r, p, |_| Ok(()))?;
    }
    expect_end(r)?;
    Ok(manifest)
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn base64(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn unbase64(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = B64.iter().position(|&x| x == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip() {
        for n in 0..20usize {
            let data: Vec<u8> = (0..n as u8).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(unbase64(&base64(&data)).unwrap(), data);
        }
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(b"fo"), "Zm8=");
    }

    #[test]
    fn manifest_checks() {
        let ok = "format = 1\nos_version = \"1\"\nboard = \"x86_64\"\n[[payload]]\npart = \"root\"\nsize = 1\nsha256 = \"".to_string()
            + &"a".repeat(64)
            + "\"\n";
        assert!(Manifest::parse(&ok).is_ok());
        assert!(Manifest::parse(&ok.replace("format = 1", "format = 2")).is_err());
        assert!(Manifest::parse(&ok.replace(&"a".repeat(64), "abc")).is_err());
        assert!(Manifest::parse(&(ok.clone() + "surprise = 1\n")).is_err());
    }

    #[test]
    fn head_rejects_garbage() {
        assert!(matches!(
            Head::read(&mut &b"NOTABUND"[..]),
            Err(BundleError::Magic)
        ));
        assert!(matches!(
            Head::read(&mut &MAGIC[..4]),
            Err(BundleError::Truncated(_))
        ));
        let mut long = MAGIC.to_vec();
        long.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Head::read(&mut &long[..]),
            Err(BundleError::TooLong { .. })
        ));
    }
}
