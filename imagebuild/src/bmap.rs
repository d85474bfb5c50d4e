//! Block maps (`.bmap`, version 2.0, sha256) for images, as bmaptool reads them
//! (REFERENCE.md §6).
//!
//! Mapped blocks are the blocks the image file really stores (found with
//! `SEEK_DATA`/`SEEK_HOLE`): the builder writes every byte that matters,
//! zeros included, and leaves holes only where content does not matter, so a
//! flasher may skip unmapped blocks. This module never writes the image.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::path::Path;

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};
use sha2::{Digest, Sha256};

pub const BLOCK_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BmapError {
    #[error("cannot read image {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot find the data ranges of {path}: {source}")]
    Seek { path: String, source: Errno },
}

/// An inclusive range of mapped blocks with the sha256 of its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub first: u64,
    pub last: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bmap {
    pub image_size: u64,
    pub block_size: u64,
    pub ranges: Vec<Range>,
}

impl Bmap {
    pub fn blocks_count(&self) -> u64 {
        self.image_size.div_ceil(self.block_size)
    }

    /// Byte range `[start, end)` of a block range, clipped at the image size.
    pub fn byte_range(&self, r: &Range) -> (u64, u64) {
        (
            r.first * self.block_size,
            ((r.last + 1) * self.block_size).min(self.image_size),
        )
    }

    /// Parse a bmap file (bmaptool's format 1.4/2.x with sha256), checking
    /// its own checksum and that its ranges are ordered and inside the image.
    pub fn parse(raw: &str) -> Result<Bmap, BmapParseError> {
        let err = |m: String| BmapParseError(m);
        // bmaptool's files carry comments that mention the element names.
        let stripped = strip_comments(raw);
        let xml = stripped.as_str();
        let version = between(xml, "<bmap version=\"", "\"")
            .ok_or_else(|| err("no <bmap version>".into()))?;
        let major: u32 = version
            .split('.')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if !(major == 2 || version == "1.4") {
            return Err(err(format!(
                "bmap version {version} is not supported (1.4 or 2.x)"
            )));
        }
        let num = |tag: &str| -> Result<u64, BmapParseError> {
            between(xml, &format!("<{tag}>"), &format!("</{tag}>"))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| err(format!("missing or bad <{tag}>")))
        };
        let image_size = num("ImageSize")?;
        let block_size = num("BlockSize")?;
        if block_size == 0 || block_size % 512 != 0 {
            return Err(err(format!(
                "block size {block_size} is not a multiple of 512"
            )));
        }
        if num("BlocksCount")? != image_size.div_ceil(block_size) {
            return Err(err(
                "BlocksCount does not match ImageSize / BlockSize".into()
            ));
        }
        let ctype = between(xml, "<ChecksumType>", "</ChecksumType>").map(str::trim);
        if ctype != Some("sha256") {
            return Err(err(format!(
                "checksum type {ctype:?} is not supported (sha256)"
            )));
        }
        let stored = between(xml, "<BmapFileChecksum>", "</BmapFileChecksum>")
            .map(str::trim)
            .ok_or_else(|| err("no <BmapFileChecksum>".into()))?;
        let zeroed = raw.replacen(stored, &"0".repeat(stored.len()), 1);
        if crate::verity::hex(&Sha256::digest(zeroed.as_bytes())) != stored {
            return Err(err(
                "the bmap file's own checksum does not match: it is corrupt".into(),
            ));
        }
        let mut ranges: Vec<Range> = Vec::new();
        let mut rest = xml;
        while let Some(i) = rest.find("<Range") {
            rest = &rest[i..];
            let end = rest
                .find("</Range>")
                .ok_or_else(|| err("unterminated <Range>".into()))?;
            let item = &rest[..end];
            rest = &rest[end..];
            let sha256 = between(item, "chksum=\"", "\"")
                .filter(|s| s.len() == 64)
                .ok_or_else(|| err("a <Range> has no sha256 chksum".into()))?
                .to_string();
            let body = item.rsplit('>').next().unwrap_or("").trim();
            let (a, b) = body.split_once('-').unwrap_or((body, body));
            let (Ok(first), Ok(last)) = (a.trim().parse::<u64>(), b.trim().parse::<u64>()) else {
                return Err(err(format!("bad range {body:?}")));
            };
            if last < first || last >= image_size.div_ceil(block_size) {
                return Err(err(format!("range {body} is outside the image")));
            }
            if let Some(prev) = ranges.last()
                && first <= prev.last
            {
                return Err(err(format!("range {body} overlaps or is out of order")));
            }
            ranges.push(Range {
                first,
                last,
                sha256,
            });
        }
        Ok(Bmap {
            image_size,
            block_size,
            ranges,
        })
    }

    pub fn mapped_blocks(&self) -> u64 {
        self.ranges.iter().map(|r| r.last - r.first + 1).sum()
    }

    /// The XML text, with `BmapFileChecksum` computed as bmaptool checks it:
    /// sha256 of the file with the checksum's text replaced by 64 `0`s.
    pub fn to_xml(&self) -> String {
        let zeros = "0".repeat(64);
        let with = |sum: &str| {
            let mut s = String::new();
            s.push_str("<?xml version=\"1.0\" ?>\n");
            s.push_str("<!-- Block map of a Basalt image, written by basalt. -->\n");
            s.push_str("<bmap version=\"2.0\">\n");
            s.push_str(&format!(
                "    <ImageSize> {} </ImageSize>\n",
                self.image_size
            ));
            s.push_str(&format!(
                "    <BlockSize> {} </BlockSize>\n",
                self.block_size
            ));
            s.push_str(&format!(
                "    <BlocksCount> {} </BlocksCount>\n",
                self.blocks_count()
            ));
            s.push_str(&format!(
                "    <MappedBlocksCount> {} </MappedBlocksCount>\n",
                self.mapped_blocks()
            ));
            s.push_str("    <ChecksumType> sha256 </ChecksumType>\n");
            s.push_str(&format!(
                "    <BmapFileChecksum> {sum} </BmapFileChecksum>\n"
            ));
            s.push_str("    <BlockMap>\n");
            for r in &self.ranges {
                if r.first == r.last {
                    s.push_str(&format!(
                        "        <Range chksum=\"{}\"> {} </Range>\n",
                        r.sha256, r.first
                    ));
                } else {
                    s.push_str(&format!(
                        "        <Range chksum=\"{}\"> {}-{} </Range>\n",
                        r.sha256, r.first, r.last
                    ));
                }
            }
            s.push_str("    </BlockMap>\n");
            s.push_str("</bmap>\n");
            s
        };
        let sum = crate::verity::hex(&Sha256::digest(with(&zeros).as_bytes()));
        with(&sum)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("bad bmap: {0}")]
pub struct BmapParseError(pub String);

fn strip_comments(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("<!--") {
        out.push_str(&rest[..i]);
        match rest[i..].find("-->") {
            Some(j) => rest = &rest[i + j + 3..],
            None => return out,
        }
    }
    out.push_str(rest);
    out
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let i = s.find(start)? + start.len();
    let j = s[i..].find(end)? + i;
    Some(&s[i..j])
}

/// Byte ranges `[start, end)` of `file` that hold data (not holes).
pub fn data_ranges(file: &File, size: u64) -> Result<Vec<(u64, u64)>, Errno> {
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        let start = match lseek(file.as_fd(), pos as i64, Whence::SeekData) {
            Ok(s) => s as u64,
            Err(Errno::ENXIO) => break, // no data after pos
            Err(e) => return Err(e),
        };
        let end = match lseek(file.as_fd(), start as i64, Whence::SeekHole) {
            Ok(e) => (e as u64).min(size),
            Err(e) => return Err(e),
        };
        if end > start {
            out.push((start, end));
        }
        pos = end;
    }
    Ok(out)
}

/// Build the block map of the image at `path`.
pub fn create(path: &Path) -> Result<Bmap, BmapError> {
    let io = |source| BmapError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let image_size = file.metadata().map_err(io)?.len();
    let data = data_ranges(&file, image_size).map_err(|source| BmapError::Seek {
        path: path.display().to_string(),
        source,
    })?;

    // Block ranges, merging neighbours that touch after rounding out to blocks.
    let mut blocks: Vec<(u64, u64)> = Vec::new();
    for (s, e) in data {
        let (first, last) = (s / BLOCK_SIZE, (e - 1) / BLOCK_SIZE);
        match blocks.last_mut() {
            Some((_, l)) if first <= *l + 1 => *l = (*l).max(last),
            _ => blocks.push((first, last)),
        }
    }

    let mut ranges = Vec::with_capacity(blocks.len());
    let mut buf = vec![0u8; 1 << 20];
    for (first, last) in blocks {
        let start = first * BLOCK_SIZE;
        let end = ((last + 1) * BLOCK_SIZE).min(image_size);
        file.seek(SeekFrom::Start(start)).map_err(io)?;
        let mut h = Sha256::new();
        let mut left = end - start;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            file.read_exact(&mut buf[..n]).map_err(io)?;
            h.update(&buf[..n]);
            left -= n as u64;
        }
        ranges.push(Range {
            first,
            last,
            sha256: crate::verity::hex(&h.finalize()),
        });
    }
    Ok(Bmap {
        image_size,
        block_size: BLOCK_SIZE,
        ranges,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::Command;

    fn tmpdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("basalt-bmap-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A sparse file with data at a few places, including a partial last block.
    fn sparse_image(path: &Path) -> Vec<u8> {
        let size = 8 * 1024 * 1024 + 1000;
        let mut f = File::create(path).unwrap();
        f.set_len(size).unwrap();
        let mut expect = vec![0u8; size as usize];
        for (off, len, byte) in [
            (0u64, 512usize, 1u8),
            (1 << 20, 3 * 4096 + 5, 2),
            (size - 700, 700, 3),
        ] {
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(&vec![byte; len]).unwrap();
            expect[off as usize..off as usize + len].fill(byte);
        }
        expect
    }

    #[test]
    fn parse_round_trip_and_corruption() {
        let d = tmpdir("parse");
        let img = d.join("a.img");
        sparse_image(&img);
        let b = create(&img).unwrap();
        let xml = b.to_xml();
        assert_eq!(Bmap::parse(&xml).unwrap(), b);
        assert!(Bmap::parse(&xml.replacen("<ImageSize> ", "<ImageSize> 1", 1)).is_err());
        assert!(Bmap::parse(&xml.replace("sha256 </Ch", "md5 </Ch")).is_err());
        assert!(Bmap::parse("").is_err());
        // bmaptool's own output (comments naming the elements) parses, same ranges.
        let theirs = d.join("theirs.bmap");
        let st = std::process::Command::new("bmaptool")
            .args(["create", "-o"])
            .arg(&theirs)
            .arg(&img)
            .output()
            .expect("bmaptool");
        assert!(st.status.success());
        let t = Bmap::parse(&std::fs::read_to_string(&theirs).unwrap()).unwrap();
        assert_eq!(t.ranges, b.ranges);
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn maps_only_data() {
        let d = tmpdir("map");
        let img = d.join("a.img");
        sparse_image(&img);
        let b = create(&img).unwrap();
        assert_eq!(b.ranges.len(), 3, "{:?}", b.ranges);
        assert_eq!((b.ranges[0].first, b.ranges[0].last), (0, 0));
        assert_eq!((b.ranges[1].first, b.ranges[1].last), (256, 259));
        assert_eq!(b.ranges[2].last, b.blocks_count() - 1);
        std::fs::remove_dir_all(&d).ok();
    }

    /// bmaptool (the standard tool) accepts our map and reproduces the image.
    #[test]
    fn bmaptool_copies_our_map() {
        let d = tmpdir("copy");
        let img = d.join("a.img");
        let expect = sparse_image(&img);
        let map = d.join("a.bmap");
        std::fs::write(&map, create(&img).unwrap().to_xml()).unwrap();
        let out = d.join("out.img");
        let st = Command::new("bmaptool")
            .arg("copy")
            .arg("--bmap")
            .arg(&map)
            .arg(&img)
            .arg(&out)
            .output()
            .expect("bmaptool (bmap-tools) is required for this test");
        assert!(
            st.status.success(),
            "bmaptool: {}",
            String::from_utf8_lossy(&st.stderr)
        );
        assert_eq!(std::fs::read(&out).unwrap(), expect);

        // A corrupted checksum is refused by bmaptool's own verification.
        let xml = create(&img).unwrap().to_xml();
        let first_sum = xml.split("chksum=\"").nth(1).unwrap()[..64].to_string();
        let flipped = if first_sum.starts_with('0') { "1" } else { "0" };
        let tampered = xml.replacen(&first_sum, &format!("{flipped}{}", &first_sum[1..]), 1);
        std::fs::write(&map, tampered).unwrap();
        let st = Command::new("bmaptool")
            .arg("copy")
            .arg("--bmap")
            .arg(&map)
            .arg(&img)
            .arg(&out)
            .output()
            .unwrap();
        assert!(!st.status.success(), "bmaptool accepted a tampered map");
        std::fs::remove_dir_all(&d).ok();
    }
}
