//! `basalt flash`: write an image to an SD card, a disk or a file, fast and
//! safely, then verify what was written.
//!
//! The image is streamed (a local file or an http(s) URL, raw, `.zst` or
//! `.xz`), never stored. With a block map only mapped ranges are written;
//! without one, all-zero blocks are skipped when the target is known to read
//! as zero (a regular file this module just emptied). Writes are large and
//! aligned, `O_DIRECT` where the target takes it; the target is fsync'd, then
//! every written range is read back and checked against its sha256 (from the
//! bmap, or computed while writing). Whether a block device may be written at
//! all is `devices::check_target`'s decision, made before this module opens it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::bmap::Bmap;

const CHUNK: usize = 4 << 20;
const ALIGN: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    #[error("opening image {image}: {source}")]
    OpenImage { image: String, source: io::Error },
    #[error("fetching {url}: {message}")]
    Http { url: String, message: String },
    #[error("reading image {image} at byte {offset}: {source}")]
    ReadImage {
        image: String,
        offset: u64,
        source: io::Error,
    },
    #[error("image {image} ends at byte {at}, before the {need} bytes its block map describes")]
    ShortImage { image: String, at: u64, need: u64 },
    #[error(
        "image data at bytes {start}-{end} does not match its block map: the image or the bmap is corrupt"
    )]
    SourceChecksum { start: u64, end: u64 },
    #[error("opening target {target}: {source}")]
    OpenTarget { target: String, source: io::Error },
    #[error("writing target {target} at byte {offset}: {source}")]
    Write {
        target: String,
        offset: u64,
        source: io::Error,
    },
    #[error("flushing target {target}: {source}")]
    Sync { target: String, source: io::Error },
    #[error("verification failed: target {target} bytes {start}-{end} differ from the image")]
    Verify {
        target: String,
        start: u64,
        end: u64,
    },
    #[error("reading back target {target} at byte {offset}: {source}")]
    ReadBack {
        target: String,
        offset: u64,
        source: io::Error,
    },
    #[error("{0}")]
    Bmap(#[from] crate::bmap::BmapParseError),
}

/// An image stream that can skip forward: a raw local file seeks over the
/// unmapped ranges; compressed or remote streams have to read through them.
pub trait Stream: Read + Send {
    fn skip(&mut self, n: u64, scratch: &mut [u8]) -> io::Result<u64> {
        skip_by_reading(self, n, scratch)
    }
}

/// A raw local image: skipping is a seek (never past the end).
struct SeekableFile(File);

impl Read for SeekableFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Stream for SeekableFile {
    fn skip(&mut self, n: u64, _scratch: &mut [u8]) -> io::Result<u64> {
        let pos = self.0.stream_position()?;
        let len = self.0.metadata()?.len();
        let to = pos.saturating_add(n).min(len.max(pos));
        self.0.seek(SeekFrom::Start(to))?;
        Ok(to - pos)
    }
}

/// Any other reader: skipping reads and discards.
struct Reading<R>(R);

impl<R: Read> Read for Reading<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R: Read + Send> Stream for Reading<R> {}

/// Where the image comes from.
#[derive(Debug, Clone)]
pub enum ImageSource {
    Path(PathBuf),
    Url(String),
}

impl ImageSource {
    pub fn parse(s: &str) -> ImageSource {
        if s.starts_with("http://") || s.starts_with("https://") {
            ImageSource::Url(s.to_string())
        } else {
            ImageSource::Path(s.into())
        }
    }

    fn name(&self) -> String {
        match self {
            ImageSource::Path(p) => p.display().to_string(),
            ImageSource::Url(u) => u.clone(),
        }
    }

    /// The image's name without its compression suffix.
    fn stem(&self) -> String {
        let n = self.name();
        for suf in [".zst", ".xz"] {
            if let Some(s) = n.strip_suffix(suf) {
                return s.to_string();
            }
        }
        n
    }

    /// The `.bmap` beside the image, if there is one (`x.img.zst` → `x.bmap`).
    pub fn find_bmap(&self) -> Result<Option<Bmap>, FlashError> {
        let stem = self.stem();
        let base = stem.strip_suffix(".img").unwrap_or(&stem).to_string();
        let candidates = [format!("{base}.bmap"), format!("{stem}.bmap")];
        for c in candidates {
            let text = match self {
                ImageSource::Path(_) => match std::fs::read_to_string(&c) {
                    Ok(t) => t,
                    Err(_) => continue,
                },
                ImageSource::Url(_) => match http_get(&c) {
                    Ok(mut r) => {
                        let mut s = String::new();
                        if r.read_to_string(&mut s).is_err() {
                            continue;
                        }
                        s
                    }
                    Err(_) => continue,
                },
            };
            return Ok(Some(Bmap::parse(&text)?));
        }
        Ok(None)
    }

    /// Open the image stream, decompressing by suffix.
    pub fn open(&self) -> Result<Box<dyn Stream>, FlashError> {
        let name = self.name();
        let open_err = |source| FlashError::OpenImage {
            image: name.clone(),
            source,
        };
        let compressed = name.ends_with(".zst") || name.ends_with(".xz");
        let raw: Box<dyn Read + Send> = match self {
            ImageSource::Path(p) => {
                let f = File::open(p).map_err(open_err)?;
                if !compressed {
                    return Ok(Box::new(SeekableFile(f)));
                }
                Box::new(f)
            }
            ImageSource::Url(u) => http_get(u)?,
        };
        if name.ends_with(".zst") {
            Ok(Box::new(Reading(
                zstd::stream::read::Decoder::new(raw).map_err(open_err)?,
            )))
        } else if name.ends_with(".xz") {
            Ok(Box::new(Reading(liblzma::read::XzDecoder::new(raw))))
        } else {
            Ok(Box::new(Reading(raw)))
        }
    }

    /// The decompressed size when it can be known before reading: a raw
    /// file's length, or the content size in a zstd frame header.
    pub fn known_size(&self) -> Option<u64> {
        let ImageSource::Path(p) = self else {
            return None;
        };
        let name = self.name();
        if name.ends_with(".xz") {
            return None;
        }
        if name.ends_with(".zst") {
            let mut head = [0u8; 18];
            let n = File::open(p).and_then(|mut f| f.read(&mut head)).ok()?;
            return zstd::zstd_safe::get_frame_content_size(&head[..n])
                .ok()
                .flatten();
        }
        std::fs::metadata(p).ok().map(|m| m.len())
    }
}

fn http_get(url: &str) -> Result<Box<dyn Read + Send>, FlashError> {
    let resp = ureq::get(url).call().map_err(|e| FlashError::Http {
        url: url.to_string(),
        message: e.to_string(),
    })?;
    Ok(Box::new(resp.into_body().into_reader()))
}

/// One range written to the target, with the sha256 its bytes must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub start: u64,
    pub end: u64,
    pub sha256: [u8; 32],
}

/// What a flash did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub image_size: u64,
    pub bytes_written: u64,
    pub ranges: Vec<Written>,
    pub direct_io: bool,
    pub used_bmap: bool,
    pub verified: bool,
}

/// An opened target: a buffered handle and, when the target takes it, an `O_DIRECT` one.
pub struct Target {
    name: String,
    file: File,
    direct: Option<File>,
    /// The target reads as zero wherever nothing is written.
    pub reads_zero: bool,
}

impl Target {
    /// Open a block device or a regular file (created if missing; an existing
    /// regular file is emptied, so that it reads as zero).
    pub fn open(path: &Path) -> Result<Target, FlashError> {
        let name = path.display().to_string();
        let err = |source| FlashError::OpenTarget {
            target: name.clone(),
            source,
        };
        let is_block = std::fs::metadata(path)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        let (file, reads_zero) = if is_block {
            // O_EXCL on a block device fails if anything has it mounted or claimed.
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(nix::libc::O_EXCL)
                .open(path)
                .map_err(err)?;
            (f, false)
        } else {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .map_err(err)?;
            (f, true)
        };
        // O_DIRECT for block devices: an SD card is slow, and streaming
        // gigabytes through the page cache only evicts everything else. A
        // regular file goes through the page cache and one fsync at the end.
        let direct = is_block
            .then(|| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(nix::libc::O_DIRECT)
                    .open(path)
                    .ok()
            })
            .flatten();
        Ok(Target {
            name,
            file,
            direct,
            reads_zero,
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), FlashError> {
        let aligned = (offset as usize).is_multiple_of(ALIGN)
            && buf.len().is_multiple_of(ALIGN)
            && (buf.as_ptr() as usize).is_multiple_of(ALIGN);
        let f = match (&self.direct, aligned) {
            (Some(d), true) => d,
            _ => &self.file,
        };
        match f.write_all_at(buf, offset) {
            Ok(()) => Ok(()),
            // Some filesystems accept O_DIRECT at open and refuse it at write: fall back.
            Err(e)
                if e.raw_os_error() == Some(nix::libc::EINVAL) && !std::ptr::eq(f, &self.file) =>
            {
                self.file
                    .write_all_at(buf, offset)
                    .map_err(|source| FlashError::Write {
                        target: self.name.clone(),
                        offset,
                        source,
                    })
            }
            Err(source) => Err(FlashError::Write {
                target: self.name.clone(),
                offset,
                source,
            }),
        }
    }

    fn sync(&self) -> Result<(), FlashError> {
        let err = |source| FlashError::Sync {
            target: self.name.clone(),
            source,
        };
        if let Some(d) = &self.direct {
            d.sync_all().map_err(err)?;
        }
        self.file.sync_all().map_err(err)
    }
}

/// A buffer whose usable part starts at an `ALIGN` boundary (for `O_DIRECT`),
/// without unsafe allocation: over-allocate and start at the aligned offset.
struct AlignedBuf {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + ALIGN];
        let off = raw.as_ptr().align_offset(ALIGN);
        AlignedBuf { raw, off, len }
    }
    fn get(&mut self, n: usize) -> &mut [u8] {
        &mut self.raw[self.off..self.off + n.min(self.len)]
    }
}

/// Read exactly `buf.len()` bytes unless the stream ends; returns how many were read.
fn fill<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn skip_by_reading<R: Read + ?Sized>(r: &mut R, mut n: u64, scratch: &mut [u8]) -> io::Result<u64> {
    let mut skipped = 0;
    while n > 0 {
        let len = n.min(scratch.len() as u64) as usize;
        let k = fill(r, &mut scratch[..len])?;
        if k == 0 {
            break;
        }
        n -= k as u64;
        skipped += k as u64;
    }
    Ok(skipped)
}

/// Progress reporting: a bar on a terminal, a plain line every few seconds otherwise.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
    total: u64,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    pub fn new(total: u64, what: &str, quiet: bool) -> Progress {
        use std::io::IsTerminal;
        let bar = (!quiet && io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_message(what.to_string());
            b
        });
        Progress {
            bar,
            quiet,
            total,
            started: Instant::now(),
            last_line: Instant::now(),
        }
    }

    pub fn set(&mut self, done: u64) {
        if let Some(b) = &self.bar {
            b.set_position(done);
        } else if !self.quiet && self.last_line.elapsed() >= Duration::from_secs(5) {
            self.last_line = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            let rate = done as f64 / secs;
            let eta = if rate > 0.0 {
                (self.total.saturating_sub(done)) as f64 / rate
            } else {
                0.0
            };
            eprintln!(
                "basalt: {} / {} ({:.1} MiB/s, ETA {:.0} s)",
                crate::devices::human_size(done),
                crate::devices::human_size(self.total),
                rate / (1 << 20) as f64,
                eta
            );
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// The ranges to write: from the bmap, or the whole image (zeros skipped later).
fn plan(bmap: Option<&Bmap>, image_size: Option<u64>) -> Vec<(u64, u64, Option<String>)> {
    match bmap {
        Some(b) => b
            .ranges
            .iter()
            .map(|r| {
                let (s, e) = b.byte_range(r);
                (s, e, Some(r.sha256.clone()))
            })
            .collect(),
        None => vec![(0, image_size.unwrap_or(u64::MAX), None)],
    }
}

/// Stream the image into the target. Returns the written ranges with their hashes.
///
/// `check_source`: hash the image while writing and compare with the bmap
/// (bmaptool's check). Redundant when the target is read back afterwards:
/// the read-back compares the written bytes with the same checksums.
pub fn write(
    source: &ImageSource,
    image: &mut dyn Stream,
    target: &Target,
    bmap: Option<&Bmap>,
    progress: &mut Progress,
    check_source: bool,
) -> Result<Report, FlashError> {
    let image_name = source.name();
    let mut buf = AlignedBuf::new(CHUNK);
    let mut scratch = vec![0u8; 1 << 20];
    let mut pos: u64 = 0;
    let mut report = Report {
        used_bmap: bmap.is_some(),
        ..Default::default()
    };
    let skip_zeros = bmap.is_none() && target.reads_zero;
    let read_err = |offset, source| FlashError::ReadImage {
        image: image_name.clone(),
        offset,
        source,
    };

    for (start, end, expect) in plan(bmap, bmap.map(|b| b.image_size)) {
        let skipped = image
            .skip(start - pos, &mut scratch)
            .map_err(|e| read_err(pos, e))?;
        pos += skipped;
        if pos < start {
            return Err(FlashError::ShortImage {
                image: image_name.clone(),
                at: pos,
                need: start,
            });
        }
        let mut range_hash = Sha256::new();
        // Current run of written bytes (for ranges without a bmap checksum).
        let mut run: Option<(u64, Sha256)> = None;
        while pos < end {
            let want = (end - pos).min(CHUNK as u64) as usize;
            let chunk = buf.get(want);
            let n = fill(image, chunk).map_err(|e| read_err(pos, e))?;
            if n == 0 {
                if expect.is_some() {
                    return Err(FlashError::ShortImage {
                        image: image_name.clone(),
                        at: pos,
                        need: end,
                    });
                }
                break; // end of an image of unknown size
            }
            let data = &chunk[..n];
            if expect.is_some() {
                if check_source {
                    range_hash.update(data);
                }
                target.write_at(data, pos)?;
                report.bytes_written += n as u64;
            } else {
                // Walk blocks: write non-zero runs (or everything), hashing each run.
                let mut i = 0;
                while i < n {
                    let j = (i + ALIGN).min(n);
                    let block = &data[i..j];
                    let zero = skip_zeros && block.iter().all(|&b| b == 0);
                    if zero {
                        if let Some((s, h)) = run.take() {
                            report.ranges.push(Written {
                                start: s,
                                end: pos + i as u64,
                                sha256: h.finalize().into(),
                            });
                        }
                    } else {
                        let (_, h) = run.get_or_insert_with(|| (pos + i as u64, Sha256::new()));
                        h.update(block);
                    }
                    i = j;
                }
                // Write the non-zero runs of this chunk in as few calls as possible.
                write_nonzero(target, data, pos, skip_zeros, &mut report.bytes_written)?;
            }
            pos += n as u64;
            progress.set(pos);
        }
        if let Some((s, h)) = run.take() {
            report.ranges.push(Written {
                start: s,
                end: pos,
                sha256: h.finalize().into(),
            });
        }
        if let Some(expect) = expect {
            let got = crate::verity::hex(&range_hash.finalize());
            if check_source && got != expect {
                return Err(FlashError::SourceChecksum { start, end });
            }
            let mut sha = [0u8; 32];
            for (k, b) in sha.iter_mut().enumerate() {
                *b = u8::from_str_radix(&expect[2 * k..2 * k + 2], 16).unwrap_or(0);
            }
            report.ranges.push(Written {
                start,
                end,
                sha256: sha,
            });
        }
    }
    if let Some(b) = bmap {
        pos += image
            .skip(b.image_size.saturating_sub(pos), &mut scratch)
            .map_err(|e| read_err(pos, e))?;
        if pos < b.image_size {
            return Err(FlashError::ShortImage {
                image: image_name,
                at: pos,
                need: b.image_size,
            });
        }
    }
    report.image_size = pos;
    report.direct_io = target.direct.is_some();
    progress.finish();
    target.sync()?;
    Ok(report)
}

fn write_nonzero(
    target: &Target,
    data: &[u8],
    pos: u64,
    skip_zeros: bool,
    written: &mut u64,
) -> Result<(), FlashError> {
    if !skip_zeros {
        target.write_at(data, pos)?;
        *written += data.len() as u64;
        return Ok(());
    }
    let mut i = 0;
    while i < data.len() {
        let is_zero = |k: usize| data[k..(k + ALIGN).min(data.len())].iter().all(|&b| b == 0);
        if is_zero(i) {
            i += ALIGN;
            continue;
        }
        let s = i;
        while i < data.len() && !is_zero(i) {
            i += ALIGN;
        }
        let e = i.min(data.len());
        target.write_at(&data[s..e], pos + s as u64)?;
        *written += (e - s) as u64;
    }
    Ok(())
}

/// Read every written range back from the target (a block device bypassing
/// the page cache) and compare its sha256.
pub fn verify(target_path: &Path, report: &Report) -> Result<(), FlashError> {
    let name = target_path.display().to_string();
    let open = |flags| {
        OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(target_path)
    };
    // A block device is read back around the page cache (O_DIRECT), so the
    // card's own contents are checked; a regular file is read through it.
    let is_block = std::fs::metadata(target_path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    let flags = if is_block { nix::libc::O_DIRECT } else { 0 };
    let f = open(flags)
        .or_else(|_| open(0))
        .map_err(|source| FlashError::OpenTarget {
            target: name.clone(),
            source,
        })?;
    let plain = open(0).map_err(|source| FlashError::OpenTarget {
        target: name.clone(),
        source,
    })?;
    let mut buf = AlignedBuf::new(CHUNK);
    for w in &report.ranges {
        let mut h = Sha256::new();
        let mut off = w.start;
        while off < w.end {
            let n = ((w.end - off).min(CHUNK as u64)) as usize;
            let chunk = buf.get(n);
            let aligned = (off as usize).is_multiple_of(ALIGN) && n.is_multiple_of(ALIGN);
            let r = if aligned {
                f.read_exact_at(chunk, off)
            } else {
                plain.read_exact_at(chunk, off)
            };
            match r {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => plain
                    .read_exact_at(chunk, off)
                    .map_err(|source| FlashError::ReadBack {
                        target: name.clone(),
                        offset: off,
                        source,
                    })?,
                Err(source) => {
                    return Err(FlashError::ReadBack {
                        target: name.clone(),
                        offset: off,
                        source,
                    });
                }
            }
            h.update(&chunk[..n]);
            off += n as u64;
        }
        let got: [u8; 32] = h.finalize().into();
        if got != w.sha256 {
            return Err(FlashError::Verify {
                target: name,
                start: w.start,
                end: w.end,
            });
        }
    }
    Ok(())
}

/// Flash `source` to the target at `target_path` (already checked by the caller).
pub fn flash(
    source: &ImageSource,
    target_path: &Path,
    verify_after: bool,
    quiet: bool,
) -> Result<Report, FlashError> {
    let bmap = source.find_bmap()?;
    let size = bmap
        .as_ref()
        .map(|b| b.image_size)
        .or_else(|| source.known_size())
        .unwrap_or(0);
    let target = Target::open(target_path)?;
    if target.reads_zero && size > 0 {
        // A regular file target gets the image's size (sparse), like a disk would have.
        target
            .file
            .set_len(size)
            .map_err(|source| FlashError::Write {
                target: target.name.clone(),
                offset: size,
                source,
            })?;
    }
    let mut image = source.open()?;
    let mut progress = Progress::new(size, "flashing", quiet);
    let mut report = write(
        source,
        &mut *image,
        &target,
        bmap.as_ref(),
        &mut progress,
        !verify_after,
    )?;
    if target.reads_zero {
        target
            .file
            .set_len(report.image_size)
            .map_err(|source| FlashError::Write {
                target: target.name.clone(),
                offset: report.image_size,
                source,
            })?;
        target.sync()?;
    }
    drop(target);
    if verify_after {
        verify(target_path, &report)?;
        report.verified = true;
    }
    Ok(report)
}

/// Size of a regular file or block device (seek to the end).
pub fn target_size(path: &Path) -> io::Result<u64> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::End(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("basalt-flash-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A sparse 64 MiB image with data in a few places, plus its bmap.
    fn image(d: &Path) -> (PathBuf, Vec<u8>) {
        let p = d.join("t.img");
        let size = 64u64 << 20;
        let mut f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        let mut expect = vec![0u8; size as usize];
        for (off, len) in [
            (0u64, 1usize << 20),
            (10 << 20, 4096 * 3),
            ((64 << 20) - 8192, 8192),
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i as u64 * 31 + off) as u8 | 1).collect();
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(&data).unwrap();
            expect[off as usize..off as usize + len].copy_from_slice(&data);
        }
        drop(f);
        let bmap = crate::bmap::create(&p).unwrap();
        std::fs::write(d.join("t.bmap"), bmap.to_xml()).unwrap();
        (p, expect)
    }

    #[test]
    fn raw_with_bmap_writes_only_mapped_and_verifies() {
        let d = dir("raw");
        let (img, expect) = image(&d);
        let target = d.join("card");
        std::fs::write(&target, vec![0xAAu8; 1 << 20]).unwrap(); // old content is emptied
        let r = flash(&ImageSource::Path(img), &target, true, true).unwrap();
        assert!(r.used_bmap && r.verified);
        assert_eq!(r.bytes_written, (1 << 20) + 4096 * 3 + 8192);
        assert_eq!(std::fs::read(&target).unwrap(), expect);
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn zstd_without_bmap_skips_zeros() {
        let d = dir("zst");
        let (img, expect) = image(&d);
        std::fs::remove_file(d.join("t.bmap")).unwrap();
        let zst = d.join("t.img.zst");
        let st = std::process::Command::new("zstd")
            .args(["-q", "-T2", "--content-size"])
            .arg(&img)
            .arg("-o")
            .arg(&zst)
            .status()
            .expect("zstd tool");
        assert!(st.success());
        let src = ImageSource::Path(zst);
        assert_eq!(src.known_size(), Some(64 << 20));
        let target = d.join("card");
        let r = flash(&src, &target, true, true).unwrap();
        assert!(!r.used_bmap && r.verified);
        assert!(
            r.bytes_written < 2 << 20,
            "zeros were written: {}",
            r.bytes_written
        );
        assert_eq!(std::fs::read(&target).unwrap(), expect);
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn corrupt_image_against_bmap_is_refused() {
        let d = dir("corrupt");
        let (img, _) = image(&d);
        let f = OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&[0], 10 << 20).unwrap();
        drop(f);
        // With read-back verification the written bytes fail their checksum...
        let e = flash(&ImageSource::Path(img.clone()), &d.join("card"), true, true).unwrap_err();
        assert!(matches!(e, FlashError::Verify { .. }), "{e}");
        // ...without it, the image is checked against the bmap while writing.
        let e = flash(&ImageSource::Path(img), &d.join("card2"), false, true).unwrap_err();
        assert!(matches!(e, FlashError::SourceChecksum { .. }), "{e}");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn verify_catches_a_changed_target() {
        let d = dir("verify");
        let (img, _) = image(&d);
        let target = d.join("card");
        let r = flash(&ImageSource::Path(img), &target, false, true).unwrap();
        let f = OpenOptions::new().write(true).open(&target).unwrap();
        f.write_all_at(&[0xFF], 5).unwrap();
        drop(f);
        assert!(matches!(
            verify(&target, &r),
            Err(FlashError::Verify { start: 0, .. })
        ));
        std::fs::remove_dir_all(&d).ok();
    }
}
