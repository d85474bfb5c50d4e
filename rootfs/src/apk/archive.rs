//! Gzip members and tar segments, the two layers every apk v2 file is made of
//! (REFERENCE.md §5.1, §5.3).
//!
//! Signatures cover the *compressed* bytes of a gzip member, so members are split
//! at their exact byte boundaries and kept both raw and decompressed. Tar segments
//! (no end-of-archive blocks) are read with the `tar` crate's entry iterator only:
//! nothing here writes to the host file system.

use std::io::Read;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{what}: gzip member {member} (at byte {offset}) is corrupt: {source}")]
    Gzip {
        what: String,
        member: usize,
        offset: usize,
        source: std::io::Error,
    },
    #[error("{what}: {limit} bytes or more after decompression; refusing")]
    TooLarge { what: String, limit: u64 },
    #[error("{what}: tar stream is corrupt: {source}")]
    Tar {
        what: String,
        source: std::io::Error,
    },
}

/// One gzip member: the compressed bytes exactly as stored, and what they decompress to.
#[derive(Debug, Clone)]
pub struct Member<'a> {
    pub raw: &'a [u8],
    pub data: Vec<u8>,
}

/// Decompressed size limit per member: an index or a package that inflates past this
/// is refused rather than exhausting memory (the largest Alpine kernel package
/// inflates to a few hundred MiB).
pub const MAX_MEMBER: u64 = 4 << 30;

/// Split concatenated gzip members. `what` names the file for error messages.
pub fn split_members<'a>(bytes: &'a [u8], what: &str) -> Result<Vec<Member<'a>>, ArchiveError> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let offset = bytes.len() - rest.len();
        let mut cursor: &[u8] = rest;
        let mut data = Vec::new();
        {
            // `bufread::GzDecoder` consumes exactly one member (header, deflate
            // stream, 8-byte trailer) from a `&[u8]`, so what remains in `cursor`
            // is the next member.
            let dec = flate2::bufread::GzDecoder::new(&mut cursor);
            let n = dec
                .take(MAX_MEMBER)
                .read_to_end(&mut data)
                .map_err(|source| ArchiveError::Gzip {
                    what: what.to_string(),
                    member: out.len(),
                    offset,
                    source,
                })?;
            if n as u64 >= MAX_MEMBER {
                return Err(ArchiveError::TooLarge {
                    what: what.to_string(),
                    limit: MAX_MEMBER,
                });
            }
        }
        let used = rest.len() - cursor.len();
        if used == 0 {
            return Err(ArchiveError::Gzip {
                what: what.to_string(),
                member: out.len(),
                offset,
                source: std::io::Error::other("no progress decoding gzip member"),
            });
        }
        out.push(Member {
            raw: &rest[..used],
            data,
        });
        rest = cursor;
    }
    Ok(out)
}

/// A tar entry read into memory (used for small control/signature/index members).
#[derive(Debug, Clone)]
pub struct SmallEntry {
    pub name: String,
    pub data: Vec<u8>,
}

/// Read all regular-file entries of a tar stream or segment into memory.
pub fn read_small_entries(tar_bytes: &[u8], what: &str) -> Result<Vec<SmallEntry>, ArchiveError> {
    let terr = |source| ArchiveError::Tar {
        what: what.to_string(),
        source,
    };
    let mut ar = tar::Archive::new(tar_bytes);
    let mut out = Vec::new();
    for ent in ar.entries().map_err(terr)? {
        let mut ent = ent.map_err(terr)?;
        if !ent.header().entry_type().is_file() {
            continue;
        }
        let name = String::from_utf8_lossy(&ent.path_bytes()).into_owned();
        let mut data = Vec::new();
        ent.read_to_end(&mut data).map_err(terr)?;
        out.push(SmallEntry { name, data });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;
    use std::io::Write;

    fn gz(b: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn splits_at_exact_boundaries() {
        let a = gz(b"first");
        let b = gz(b"second member");
        let mut all = a.clone();
        all.extend_from_slice(&b);
        let m = split_members(&all, "test").unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].raw, &a[..]);
        assert_eq!(m[1].raw, &b[..]);
        assert_eq!(m[1].data, b"second member");
    }

    #[test]
    fn garbage_after_members_is_an_error() {
        let mut all = gz(b"x");
        all.extend_from_slice(b"not gzip");
        assert!(split_members(&all, "test").is_err());
    }
}
