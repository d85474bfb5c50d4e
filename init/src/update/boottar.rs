//! The x86_64 boot payload of a bundle: an uncompressed ustar archive of
//! exactly the files in `FILES` (the slot's kernel, its initramfs and the
//! loader entry options without `basalt.slot`). The builder writes it with
//! `write`; the device unpacks it from the unverified stream with `Reader`,
//! which only ever creates these names in the directory it is given — its
//! hash is checked once the payload ends, before anything points at it.

use std::io::{Read, Write};
use std::path::Path;

/// Member names, in archive order.
pub const KERNEL: &str = "vmlinuz";
pub const INITRAMFS: &str = "initramfs";
pub const OPTIONS: &str = "options";
pub const FILES: &[&str] = &[KERNEL, INITRAMFS, OPTIONS];
/// The options member is a command line: small.
pub const MAX_OPTIONS: u64 = 4096;

const BLOCK: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum BootTarError {
    #[error("boot payload: {0}")]
    Format(String),
    #[error("boot payload: writing {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("boot payload: reading: {0}")]
    Read(#[from] std::io::Error),
}

fn octal(field: &mut [u8], value: u64) {
    let n = field.len() - 1;
    let s = format!("{value:0n$o}");
    field[..n].copy_from_slice(s.as_bytes());
    field[n] = 0;
}

fn header(name: &str, size: u64, mtime: u64) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h[100..108], 0o644);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], mtime);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

/// Write the archive: `kernel`, `initramfs`, `options` (deterministic: root
/// owned, mode 0644, mtime `mtime`).
pub fn write(
    out: &mut impl Write,
    kernel: &[u8],
    initramfs: &[u8],
    options: &str,
    mtime: u64,
) -> std::io::Result<()> {
    let opts = format!("{}\n", options.trim());
    for (name, data) in [
        (KERNEL, kernel),
        (INITRAMFS, initramfs),
        (OPTIONS, opts.as_bytes()),
    ] {
        out.write_all(&header(name, data.len() as u64, mtime))?;
        out.write_all(data)?;
        let pad = (BLOCK - data.len() % BLOCK) % BLOCK;
        out.write_all(&vec![0u8; pad])?;
    }
    out.write_all(&[0u8; 2 * BLOCK])
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(field).ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c == ' ');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// Unpack the archive from `r` into `dir` (which must exist). Returns the
/// options line. Refuses any member other than `FILES`, in that order.
pub fn unpack(r: &mut impl Read, dir: &Path) -> Result<String, BootTarError> {
    let bad = |m: &str| BootTarError::Format(m.to_string());
    let mut options = String::new();
    let mut buf = vec![0u8; 1 << 20];
    for want in FILES {
        let mut h = [0u8; BLOCK];
        r.read_exact(&mut h)?;
        let stored = parse_octal(&h[148..156]).ok_or_else(|| bad("bad header checksum field"))?;
        let mut sum_h = h;
        sum_h[148..156].fill(b' ');
        let sum: u64 = sum_h.iter().map(|&b| u64::from(b)).sum();
        if sum != stored {
            return Err(bad("header checksum mismatch"));
        }
        let name_end = h[..100].iter().position(|&b| b == 0).unwrap_or(100);
        let name = std::str::from_utf8(&h[..name_end]).map_err(|_| bad("member name"))?;
        if name != *want || h[156] != b'0' || h[345] != 0 {
            return Err(BootTarError::Format(format!(
                "member {name:?} where {want:?} was expected"
            )));
        }
        let size = parse_octal(&h[124..136]).ok_or_else(|| bad("bad size field"))?;
        if *want == OPTIONS && size > MAX_OPTIONS {
            return Err(bad("options member too large"));
        }
        let path = dir.join(want);
        let mut f = std::fs::File::create(&path).map_err(|source| BootTarError::Write {
            path: path.clone(),
            source,
        })?;
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            r.read_exact(&mut buf[..n])?;
            if *want == OPTIONS {
                options.push_str(
                    std::str::from_utf8(&buf[..n]).map_err(|_| bad("options are not UTF-8"))?,
                );
            }
            f.write_all(&buf[..n])
                .map_err(|source| BootTarError::Write {
                    path: path.clone(),
                    source,
                })?;
            left -= n as u64;
        }
        f.sync_all().map_err(|source| BootTarError::Write {
            path: path.clone(),
            source,
        })?;
        let pad = ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize;
        r.read_exact(&mut buf[..pad])?;
    }
    let mut end = [0u8; 2 * BLOCK];
    r.read_exact(&mut end)?;
    if end.iter().any(|&b| b != 0) {
        return Err(bad("unexpected member after options"));
    }
    let line = options.trim();
    if line.contains('\n') || line.is_empty() {
        return Err(bad("options must be one non-empty line"));
    }
    Ok(line.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Untrusted input: random damage to a valid archive is refused or
    /// unpacked, never a panic, never a file outside the three names.
    #[test]
    fn random_damage_never_panics() {
        let t = tempfile::tempdir().unwrap();
        let mut a = Vec::new();
        write(&mut a, &[1u8; 3000], &[2u8; 700], "console=ttyS0", 0).unwrap();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..1000 {
            let mut b = a.clone();
            for _ in 0..1 + (x % 4) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x % b.len() as u64) as usize;
                b[i] = (x >> 32) as u8;
            }
            x ^= x << 13;
            let cut = b.len() - (x % 64) as usize * usize::from(x.is_multiple_of(3));
            let _ = unpack(&mut &b[..cut], t.path());
        }
        let mut names: Vec<String> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert!(
            names.iter().all(|n| FILES.contains(&n.as_str())),
            "{names:?}"
        );
    }

    #[test]
    fn round_trip_and_host_tar_reads_it() {
        let t = tempfile::tempdir().unwrap();
        let mut a = Vec::new();
        let kernel: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        write(
            &mut a,
            &kernel,
            b"cpio",
            "console=ttyS0 basalt.verity=ab",
            1_700_000_000,
        )
        .unwrap();
        assert_eq!(a.len() % BLOCK, 0);
        let opts = unpack(&mut &a[..], t.path()).unwrap();
        assert_eq!(opts, "console=ttyS0 basalt.verity=ab");
        assert_eq!(std::fs::read(t.path().join(KERNEL)).unwrap(), kernel);
        std::fs::write(t.path().join("a.tar"), &a).unwrap();
        let out = std::process::Command::new("tar")
            .arg("-tvf")
            .arg(t.path().join("a.tar"))
            .output()
            .unwrap();
        assert!(out.status.success());
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(
            list.contains("vmlinuz") && list.contains("initramfs") && list.contains("options"),
            "{list}"
        );
        // Wrong member order, a flipped header byte, a truncated archive: refused.
        let mut b = a.clone();
        b[0] = b'x';
        assert!(unpack(&mut &b[..], t.path()).is_err());
        assert!(unpack(&mut &a[..a.len() - 100], t.path()).is_err());
        let mut c = a.clone();
        let n = c.len();
        c[n - 10] = 1;
        assert!(unpack(&mut &c[..], t.path()).is_err());
    }
}
