//! The files `basalt build` leaves beside the raw image: `.img.zst`
//! (multi-threaded zstd with the content size in the frame header), `.bmap`,
//! optionally `.qcow2` (through `qemu-img`), and `SHA256SUMS`.
//!
//! Every output is written to a temporary name and renamed into place, so an
//! interrupted build never leaves a truncated file under the final name.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Bmap(#[from] crate::bmap::BmapError),
    #[error("qemu-img is not installed: --format qcow2 needs it (Debian package qemu-utils)")]
    NoQemuImg,
    #[error("qemu-img convert failed for {path}: {stderr}")]
    QemuImg { path: PathBuf, stderr: String },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> OutputError {
    let path = path.to_path_buf();
    move |source| OutputError::Io { what, path, source }
}

fn with_suffix(img: &Path, suffix: &str) -> PathBuf {
    let name = img
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".img").unwrap_or(&name);
    img.with_file_name(format!("{stem}{suffix}"))
}

fn tmp_of(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

/// `<name>.img.zst`, multi-threaded, content size and checksum in the frame.
pub fn write_zst(img: &Path, threads: u32) -> Result<PathBuf, OutputError> {
    let out = with_suffix(img, ".img.zst");
    let tmp = tmp_of(&out);
    let mut src = File::open(img).map_err(io("reading image", img))?;
    let size = src.metadata().map_err(io("reading image", img))?.len();
    let f = File::create(&tmp).map_err(io("writing", &tmp))?;
    let mut enc =
        zstd::stream::write::Encoder::new(BufWriter::new(f), 3).map_err(io("compressing", &tmp))?;
    let e = io("compressing", &tmp);
    (|| {
        enc.multithread(threads.max(1))?;
        enc.include_contentsize(true)?;
        enc.include_checksum(true)?;
        enc.set_pledged_src_size(Some(size))?;
        let mut buf = vec![0u8; 4 << 20];
        loop {
            let n = src.read(&mut buf)?;
            if n == 0 {
                break;
            }
            enc.write_all(&buf[..n])?;
        }
        enc.finish()?.flush()
    })()
    .map_err(e)?;
    std::fs::rename(&tmp, &out).map_err(io("writing", &out))?;
    Ok(out)
}

/// `<name>.bmap`.
pub fn write_bmap(img: &Path) -> Result<PathBuf, OutputError> {
    let out = with_suffix(img, ".bmap");
    let tmp = tmp_of(&out);
    let xml = crate::bmap::create(img)?.to_xml();
    std::fs::write(&tmp, xml).map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, &out).map_err(io("writing", &out))?;
    Ok(out)
}

/// `<name>.qcow2` through `qemu-img convert`.
pub fn write_qcow2(img: &Path) -> Result<PathBuf, OutputError> {
    let out = with_suffix(img, ".qcow2");
    let tmp = tmp_of(&out);
    let r = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(img)
        .arg(&tmp)
        .output();
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(OutputError::NoQemuImg),
        Err(e) => Err(io("running qemu-img for", img)(e)),
        Ok(o) if !o.status.success() => Err(OutputError::QemuImg {
            path: img.into(),
            stderr: String::from_utf8_lossy(&o.stderr).trim().to_string(),
        }),
        Ok(_) => {
            std::fs::rename(&tmp, &out).map_err(io("writing", &out))?;
            Ok(out)
        }
    }
}

pub fn sha256_file(path: &Path) -> Result<String, OutputError> {
    let mut f = File::open(path).map_err(io("hashing", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io("hashing", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(crate::verity::hex(&h.finalize()))
}

/// `SHA256SUMS` in the directory of the outputs, in `sha256sum -c` format.
pub fn write_sums(files: &[PathBuf]) -> Result<PathBuf, OutputError> {
    let dir = files
        .first()
        .and_then(|f| f.parent())
        .unwrap_or(Path::new("."));
    let out = dir.join("SHA256SUMS");
    let mut text = String::new();
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        text.push_str(&format!("{}  {}\n", sha256_file(f)?, name));
    }
    let tmp = tmp_of(&out);
    std::fs::write(&tmp, text).map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, &out).map_err(io("writing", &out))?;
    Ok(out)
}

/// Write every output for `img`; returns the files (the image first).
pub fn write_all(img: &Path, qcow2: bool, threads: u32) -> Result<Vec<PathBuf>, OutputError> {
    let mut files = vec![
        img.to_path_buf(),
        write_zst(img, threads)?,
        write_bmap(img)?,
    ];
    if qcow2 {
        files.push(write_qcow2(img)?);
    }
    write_sums(&files)?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom};

    #[test]
    fn outputs_checked_by_standard_tools() {
        let d = std::env::temp_dir().join(format!("basalt-outputs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let img = d.join("x.img");
        let mut f = File::create(&img).unwrap();
        f.set_len(32 << 20).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&vec![0x5a; 100_000]).unwrap();
        drop(f);
        let files = write_all(&img, true, 2).unwrap();
        assert_eq!(files.len(), 4);
        // zstd: content size in the header, decompresses to the image.
        let zst = d.join("x.img.zst");
        let o = Command::new("zstd").arg("-lv").arg(&zst).output().unwrap();
        let listing = String::from_utf8_lossy(&o.stdout);
        assert!(
            listing.contains("33554432"),
            "no content size in frame: {listing}"
        );
        let o = Command::new("zstd")
            .args(["-dc"])
            .arg(&zst)
            .output()
            .unwrap();
        assert_eq!(o.stdout, std::fs::read(&img).unwrap());
        // qemu-img reads the qcow2 as the same disk.
        let st = Command::new("qemu-img")
            .arg("compare")
            .arg(&img)
            .arg(d.join("x.qcow2"))
            .status()
            .unwrap();
        assert!(st.success());
        // sha256sum -c accepts SHA256SUMS.
        let st = Command::new("sha256sum")
            .args(["-c", "--quiet", "SHA256SUMS"])
            .current_dir(&d)
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::remove_dir_all(&d).ok();
    }
}
