//! The EFI system partition: a FAT32 filesystem written in place inside the
//! image file (hadris-fat; fatfs 0.3.6 writes invalid `.`/`..` entries), and
//! the files systemd-boot needs (docs/boot-protocol.md, "ESP content").
//!
//! Deterministic: the volume id is given, every timestamp is
//! SOURCE_DATE_EPOCH (UTC), files are added in a fixed order. `add_files`
//! also works on an existing image's ESP (for `basalt config inject`).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};

use hadris_fat::sync::format::{FatFormatOptions, FatTypeSelection, FatVolumeFormatter};
use hadris_fat::sync::{FatVolume, FatVolumeWriteExt};
use hadris_fat::time::{FatDateTime, StaticTimeProvider};

/// Volume label of the ESP (boot-protocol.md).
pub const LABEL: &str = "BASALT";

#[derive(Debug, thiserror::Error)]
pub enum EspError {
    #[error("ESP: {what}: {err:?}")]
    Fat {
        what: String,
        err: hadris_fat::Error,
    },
    #[error("ESP: {what}: {err}")]
    Io { what: String, err: io::Error },
    #[error("ESP of {mib} MiB is too small for FAT32 (needs 65525 clusters)")]
    TooSmall { mib: u64 },
}

/// A byte range of a file seen as a whole device.
#[derive(Debug)]
pub struct Region<'a> {
    file: &'a File,
    start: u64,
    len: u64,
    pos: u64,
}

impl<'a> Region<'a> {
    pub fn new(file: &'a File, start: u64, len: u64) -> Self {
        Region {
            file,
            start,
            len,
            pos: 0,
        }
    }
}

impl Read for Region<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.len.saturating_sub(self.pos) as usize);
        let mut f = self.file;
        f.seek(SeekFrom::Start(self.start + self.pos))?;
        let n = f.read(&mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for Region<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.pos + buf.len() as u64 > self.len {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the partition",
            ));
        }
        let mut f = self.file;
        f.seek(SeekFrom::Start(self.start + self.pos))?;
        let n = f.write(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        let mut f = self.file;
        f.flush()
    }
}

impl Seek for Region<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos =
            new.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before start"))?;
        Ok(self.pos)
    }
}

/// Seconds since the epoch → (year, month, day, hour, minute, second), UTC.
pub fn civil(epoch: u64) -> (u16, u8, u8, u8, u8, u8) {
    let days = (epoch / 86400) as i64;
    let secs = epoch % 86400;
    // Howard Hinnant's days_from_civil inverse.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y.clamp(1980, 2107) as u16,
        m as u8,
        d as u8,
        (secs / 3600) as u8,
        ((secs / 60) % 60) as u8,
        (secs % 60) as u8,
    )
}

fn fat_time(epoch: u64) -> FatDateTime {
    let (y, mo, d, h, mi, s) = civil(epoch);
    FatDateTime::new(y, mo, d, h, mi, s)
}

fn fat_err(what: impl Into<String>) -> impl FnOnce(hadris_fat::Error) -> EspError {
    let what = what.into();
    move |err| EspError::Fat { what, err }
}

/// Sectors per cluster: the largest of 8..1 that still gives FAT32 its
/// minimum of 65525 clusters (with some headroom for the FATs).
fn sectors_per_cluster(len: u64) -> Option<u8> {
    [8u8, 4, 2, 1]
        .into_iter()
        .find(|&spc| len / (512 * u64::from(spc)) >= 66_000)
}

/// Format `len` bytes at `start` of `file` as FAT32 labelled [`LABEL`].
pub fn format(
    file: &File,
    start: u64,
    len: u64,
    volume_id: u32,
    epoch: u64,
) -> Result<(), EspError> {
    format_labelled(file, start, len, LABEL, volume_id, epoch)
}

/// Format `len` bytes at `start` of `file` as FAT32 labelled `label` (at most 11
/// characters, upper case; also used for the Raspberry Pi boot FATs).
pub fn format_labelled(
    file: &File,
    start: u64,
    len: u64,
    label: &str,
    volume_id: u32,
    epoch: u64,
) -> Result<(), EspError> {
    let spc = sectors_per_cluster(len).ok_or(EspError::TooSmall {
        mib: len / (1024 * 1024),
    })?;
    let options = FatFormatOptions::new(len)
        .volume_label(label)
        .fat_type(FatTypeSelection::Fat32)
        .sectors_per_cluster(spc)
        // Like `mkfs.vfat --offset`: the partition's first sector on the disk.
        .hidden_sectors(u32::try_from(start / 512).unwrap_or(0))
        .volume_id(volume_id);
    let params = FatVolumeFormatter::calculate_params(&options).map_err(fat_err("layout"))?;
    let region = Region::new(file, start, len);
    drop(FatVolumeFormatter::format(region, options).map_err(fat_err("format"))?);

    // hadris-fat stamps the root's volume-label entry with the wall clock:
    // rewrite its times (offsets 14..18 creation, 18 access, 22..26 write).
    let label_entry = start + u64::from(params.data_start_sector) * 512;
    let (date, time, _) = fat_time(epoch).to_raw();
    let mut f = file;
    let mut buf = [0u8; 32];
    let io = |what: &str| {
        let what = what.to_string();
        move |err| EspError::Io { what, err }
    };
    f.seek(SeekFrom::Start(label_entry))
        .map_err(io("reading the label entry"))?;
    f.read_exact(&mut buf)
        .map_err(io("reading the label entry"))?;
    if &buf[..11] == format!("{label:<11}").as_bytes() && buf[11] == 0x08 {
        buf[13] = 0;
        buf[14..16].copy_from_slice(&time.to_le_bytes());
        buf[16..18].copy_from_slice(&date.to_le_bytes());
        buf[18..20].copy_from_slice(&date.to_le_bytes());
        buf[22..24].copy_from_slice(&time.to_le_bytes());
        buf[24..26].copy_from_slice(&date.to_le_bytes());
        f.seek(SeekFrom::Start(label_entry))
            .map_err(io("writing the label entry"))?;
        f.write_all(&buf).map_err(io("writing the label entry"))?;
    }
    Ok(())
}

/// Add (or replace) files on the FAT at `start..start+len` of `file`.
/// Paths use `/`; missing directories are created. Times are `epoch`.
pub fn add_files(
    file: &File,
    start: u64,
    len: u64,
    files: &[(&str, &[u8])],
    epoch: u64,
) -> Result<(), EspError> {
    // hadris-fat wants a 'static clock; one small leak per call in a host tool.
    let clock: &'static StaticTimeProvider =
        Box::leak(Box::new(StaticTimeProvider(fat_time(epoch))));
    let fs = FatVolume::builder(Region::new(file, start, len))
        .time_provider(clock)
        .open()
        .map_err(fat_err("open"))?;
    for (path, data) in files {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let Some((name, dirs)) = parts.split_last() else {
            continue;
        };
        let mut dir = fs.root_dir();
        let mut at = String::new();
        for d in dirs {
            at.push('/');
            at.push_str(d);
            dir = match dir.find(d).map_err(fat_err(format!("looking up {at}")))? {
                Some(_) => fs
                    .open_dir_path(&at)
                    .map_err(fat_err(format!("opening {at}")))?,
                None => fs
                    .create_dir(&dir, d)
                    .map_err(fat_err(format!("creating {at}")))?,
            };
        }
        if let Some(old) = dir
            .find(name)
            .map_err(fat_err(format!("looking up {path}")))?
        {
            fs.delete(&old)
                .map_err(fat_err(format!("replacing {path}")))?;
        }
        let entry = fs
            .create_file(&dir, name)
            .map_err(fat_err(format!("creating {path}")))?;
        let mut w = fs
            .write_file(&entry)
            .map_err(fat_err(format!("opening {path}")))?;
        let mut rest: &[u8] = data;
        while !rest.is_empty() {
            let n = w.write(rest).map_err(fat_err(format!("writing {path}")))?;
            rest = &rest[n..];
        }
        w.finish().map_err(fat_err(format!("writing {path}")))?;
    }
    fs.sync().map_err(fat_err("sync"))?;
    Ok(())
}

/// `loader/loader.conf`: no `default` pattern (QEMU.md: it defeats boot counting).
pub fn loader_conf() -> String {
    "timeout 0\neditor no\n".to_string()
}

/// `loader/entries/basalt-<slot>.conf`.
pub fn loader_entry(os_version: &str, slot: &str, cmdline: &str) -> String {
    // One format, init's: the update agent rewrites these entries.
    use basalt_init::update::entry::{LoaderEntry, Rank};
    let Some(slot) = basalt_init::slot::Slot::parse(slot) else {
        return String::new();
    };
    LoaderEntry {
        slot,
        os_version: os_version.to_string(),
        options: cmdline.to_string(),
        rank: Rank::Primary,
    }
    .render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1980, 1, 1, 0, 0, 0));
        assert_eq!(civil(1_700_000_000), (2023, 11, 14, 22, 13, 20));
        assert_eq!(civil(951_782_400), (2000, 2, 29, 0, 0, 0));
    }

    #[test]
    fn fsck_and_mtools_accept_our_fat() {
        let dir = std::env::temp_dir().join(format!("basalt-esp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("esp.img");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&img)
            .unwrap();
        // The FAT sits 1 MiB into the file, as in a disk image.
        let (start, len) = (1 << 20, 64 << 20);
        f.set_len(start + len + (1 << 20)).unwrap();
        format(&f, start, len, 0x1234_5678, 1_700_000_000).unwrap();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        add_files(
            &f,
            start,
            len,
            &[
                ("EFI/BOOT/BOOTX64.EFI", &big),
                ("loader/entries/basalt-a.conf", b"title x\n"),
                ("node.toml", b"hostname = \"a\"\n"),
            ],
            1_700_000_000,
        )
        .unwrap();
        // Adding to an existing FAT later (config inject) replaces files.
        add_files(
            &f,
            start,
            len,
            &[("node.toml", b"hostname = \"b\"\n")],
            1_700_000_000,
        )
        .unwrap();
        drop(f);

        let part = dir.join("part.img");
        let st = Command::new("dd")
            .arg(format!("if={}", img.display()))
            .arg(format!("of={}", part.display()))
            .args(["bs=1M", "skip=1", "count=64", "status=none"])
            .status()
            .unwrap();
        assert!(st.success());
        let out = Command::new("fsck.vfat")
            .arg("-n")
            .arg(&part)
            .output()
            .expect("dosfstools");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "fsck.vfat -n: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains("differences"), "{text}");

        let ls = Command::new("mdir")
            .args(["-i"])
            .arg(format!("{}@@1M", img.display()))
            .arg("::/EFI/BOOT")
            .output()
            .expect("mtools");
        let ls_text = String::from_utf8_lossy(&ls.stdout);
        assert!(ls.status.success(), "{ls_text}");
        assert!(
            ls_text.contains("BOOTX64") && ls_text.contains("300000"),
            "{ls_text}"
        );
        assert!(ls_text.contains("2023-11-14"), "{ls_text}");
        let cat = |p: &str| {
            Command::new("mtype")
                .args(["-i"])
                .arg(format!("{}@@1M", img.display()))
                .arg(format!("::{p}"))
                .output()
                .unwrap()
                .stdout
        };
        assert_eq!(cat("/node.toml"), b"hostname = \"b\"\n");
        assert_eq!(cat("/EFI/BOOT/BOOTX64.EFI"), big);
        let label = Command::new("mlabel")
            .args(["-s", "-i"])
            .arg(format!("{}@@1M", img.display()))
            .arg("::")
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&label.stdout).contains("BASALT"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn loader_files_follow_the_contract() {
        assert!(!loader_conf().contains("default"));
        let e = loader_entry("0.1.0", "a", "console=ttyS0,115200");
        assert_eq!(
            e,
            "title Basalt 0.1.0 (slot a)\nsort-key basalt-1-primary\nversion 0.1.0\nlinux /a/vmlinuz\ninitrd /a/initramfs\noptions console=ttyS0,115200 basalt.slot=a\n"
        );
    }
}
