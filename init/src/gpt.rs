//! A small GPT reader/writer, just enough to grow the last partition (the
//! data partition) to the end of its disk on first boot (UEFI spec §5.3,
//! "GUID Partition Table Disk Layout"). Works on any `Read + Write + Seek`, so
//! it is tested on in-memory disks and image files checked by sfdisk/sgdisk.
//!
//! Power-cut safety: the new backup table is written first, into space no
//! table or partition uses yet, then the primary; until the primary is
//! rewritten the old, still intact tables describe the disk, and the next
//! boot simply grows again. Only after both does the old backup header (now
//! inside the grown partition, never part of its filesystem yet) get zeroed.
//!
//! The growth is also the first boot of this copy of the image: every copy
//! of one image carries the same GUIDs (the builder derives them from its
//! inputs, for reproducible images), so two copies on one node (a USB SSD and
//! the card it was cloned from) cannot be told apart by the ESP's GUID the
//! boot loader reports. The growth may give the disk and every partition new
//! random GUIDs in the same two writes, so each grown copy becomes unique.

use std::io::{Read, Seek, SeekFrom, Write};

#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("reading GPT at LBA {lba}: {source}")]
    Io { lba: u64, source: std::io::Error },
    #[error("no GPT signature at LBA {0}")]
    NoSignature(u64),
    #[error("GPT header at LBA {lba} is corrupt: {why}")]
    Corrupt { lba: u64, why: &'static str },
    #[error("no partition named {0:?}")]
    NotFound(String),
    #[error("partition {name:?} is not the last one (partition {other} lies after it)")]
    NotLast { name: String, other: usize },
    #[error(
        "partition {name:?} ends at LBA {end}, beyond the disk's last usable LBA {last_usable}"
    )]
    BeyondEnd {
        name: String,
        end: u64,
        last_usable: u64,
    },
    #[error("disk of {0} bytes is too small for a GPT")]
    TooSmall(u64),
    #[error("GPT at LBA 1 does not describe a sane layout: {0}")]
    Layout(String),
}

/// CRC-32 (IEEE 802.3, reflected), the checksum GPT headers and entry arrays carry.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = 0xFFFF_FFFFu32;
    for b in data {
        c = TABLE[((c ^ *b as u32) & 0xFF) as usize] ^ (c >> 8);
    }
    c ^ 0xFFFF_FFFF
}

fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

// Header field offsets.
const H_CRC: usize = 16;
const H_MY_LBA: usize = 24;
const H_ALT_LBA: usize = 32;
const H_FIRST_USABLE: usize = 40;
const H_LAST_USABLE: usize = 48;
const H_DISK_GUID: usize = 56;
const H_ENTRIES_LBA: usize = 72;
const H_NUM_ENTRIES: usize = 80;
const H_ENTRY_SIZE: usize = 84;
const H_ENTRIES_CRC: usize = 88;
// Entry field offsets.
const E_UNIQUE: usize = 16;
const E_FIRST_LBA: usize = 32;
const E_LAST_LBA: usize = 40;
const E_NAME: usize = 56;
const E_NAME_LEN: usize = 72;

/// A GPT as read from the disk: one header and the entry array.
#[derive(Debug, Clone)]
pub struct Gpt {
    pub sector: u64,
    header: Vec<u8>,
    entries: Vec<u8>,
}

/// One used partition entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Index in the entry array; the kernel's partition number is `index + 1`.
    pub index: usize,
    pub name: String,
    /// The unique partition GUID, as text (lower case): what
    /// `/dev/disk/by-partuuid` and systemd-boot's `LoaderDevicePartUUID` name.
    pub unique_guid: String,
    pub first_lba: u64,
    pub last_lba: u64,
}

/// A GUID as stored on disk (first three fields little-endian) as text,
/// lower case: `c12a7328-f81f-11d2-ba4b-00a0c93ec93b`.
pub fn guid_text(b: &[u8]) -> String {
    if b.len() < 16 {
        return String::new();
    }
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_le_bytes([b[4], b[5]]),
        u16::from_le_bytes([b[6], b[7]]),
        b[8],
        b[9],
        b[10],
        b[11],
        b[12],
        b[13],
        b[14],
        b[15]
    )
}

/// Where `lba` starts, refused when a (checksummed but hostile or damaged)
/// header names an LBA no disk has: the product would wrap.
fn byte_offset(sector: u64, lba: u64) -> Result<u64, GptError> {
    lba.checked_mul(sector).ok_or(GptError::Corrupt {
        lba: 1,
        why: "an LBA beyond any disk",
    })
}

fn read_at<D: Read + Seek>(
    d: &mut D,
    sector: u64,
    lba: u64,
    len: usize,
) -> Result<Vec<u8>, GptError> {
    let io = |source| GptError::Io { lba, source };
    d.seek(SeekFrom::Start(byte_offset(sector, lba)?))
        .map_err(io)?;
    let mut buf = vec![0u8; len];
    d.read_exact(&mut buf).map_err(io)?;
    Ok(buf)
}

fn write_at<D: Write + Seek>(
    d: &mut D,
    sector: u64,
    lba: u64,
    data: &[u8],
) -> Result<(), GptError> {
    let io = |source| GptError::Io { lba, source };
    d.seek(SeekFrom::Start(byte_offset(sector, lba)?))
        .map_err(io)?;
    d.write_all(data).map_err(io)?;
    d.flush().map_err(io)
}

impl Gpt {
    /// Read and verify the primary GPT (header at LBA 1 and its entries).
    pub fn read<D: Read + Seek>(d: &mut D, sector: u64) -> Result<Gpt, GptError> {
        let header = read_at(d, sector, 1, sector as usize)?;
        if &header[0..8] != b"EFI PART" {
            return Err(GptError::NoSignature(1));
        }
        let corrupt = |why| GptError::Corrupt { lba: 1, why };
        let hsize = le32(&header, 12) as usize;
        if hsize < 92 || hsize > sector as usize {
            return Err(corrupt("header size"));
        }
        let mut h = header[..hsize].to_vec();
        put32(&mut h, H_CRC, 0);
        if crc32(&h) != le32(&header, H_CRC) {
            return Err(corrupt("header CRC"));
        }
        if le64(&header, H_MY_LBA) != 1 {
            return Err(corrupt("the primary header does not say LBA 1"));
        }
        let n = le32(&header, H_NUM_ENTRIES) as usize;
        let esize = le32(&header, H_ENTRY_SIZE) as usize;
        if esize < 128 || n == 0 || n * esize > 1 << 20 {
            return Err(corrupt("entry array size"));
        }
        let entries = read_at(d, sector, le64(&header, H_ENTRIES_LBA), n * esize)?;
        if crc32(&entries) != le32(&header, H_ENTRIES_CRC) {
            return Err(corrupt("entry array CRC"));
        }
        Ok(Gpt {
            sector,
            header,
            entries,
        })
    }

    fn entry_size(&self) -> usize {
        le32(&self.header, H_ENTRY_SIZE) as usize
    }

    /// The disk GUID, as text (lower case).
    pub fn disk_guid(&self) -> String {
        guid_text(&self.header[H_DISK_GUID..H_DISK_GUID + 16])
    }

    pub fn alternate_lba(&self) -> u64 {
        le64(&self.header, H_ALT_LBA)
    }

    pub fn first_usable(&self) -> u64 {
        le64(&self.header, H_FIRST_USABLE)
    }

    pub fn last_usable(&self) -> u64 {
        le64(&self.header, H_LAST_USABLE)
    }

    /// Used entries (non-zero type GUID).
    pub fn partitions(&self) -> Vec<Entry> {
        let es = self.entry_size();
        self.entries
            .chunks_exact(es)
            .enumerate()
            .filter(|(_, e)| e[0..16].iter().any(|b| *b != 0))
            .map(|(index, e)| {
                let units: Vec<u16> = e[E_NAME..E_NAME + E_NAME_LEN]
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .take_while(|u| *u != 0)
                    .collect();
                Entry {
                    index,
                    name: String::from_utf16_lossy(&units),
                    unique_guid: guid_text(&e[E_UNIQUE..E_UNIQUE + 16]),
                    first_lba: le64(e, E_FIRST_LBA),
                    last_lba: le64(e, E_LAST_LBA),
                }
            })
            .collect()
    }

    fn entries_sectors(&self) -> u64 {
        (self.entries.len() as u64).div_ceil(self.sector)
    }

    /// Before anything is written: the layout the UEFI spec (§5.3.2) asks
    /// for, so that the writes land where no partition is. The primary entry
    /// array lies between the header and the first usable LBA; every used
    /// partition lies inside the usable range of the grown disk. The
    /// checksums only say the table is what was written, not that it is sane.
    fn check_layout(&self, parts: &[Entry], last_usable: u64) -> Result<(), GptError> {
        let bad = |why: String| Err(GptError::Layout(why));
        let entries_lba = le64(&self.header, H_ENTRIES_LBA);
        let first_usable = self.first_usable();
        match entries_lba.checked_add(self.entries_sectors()) {
            Some(end) if entries_lba >= 2 && end <= first_usable => {}
            _ => {
                return bad(format!(
                    "entry array at LBA {entries_lba} ({} sectors) overlaps the header or the usable area from LBA {first_usable}",
                    self.entries_sectors()
                ));
            }
        }
        if first_usable > last_usable {
            return bad(format!(
                "first usable LBA {first_usable} lies beyond the disk's last usable LBA {last_usable}"
            ));
        }
        for p in parts {
            if p.first_lba < first_usable || p.first_lba > p.last_lba || p.last_lba > last_usable {
                return bad(format!(
                    "partition {} ({:?}) spans LBA {}..={}, outside the usable LBAs {first_usable}..={last_usable}",
                    p.index + 1,
                    p.name,
                    p.first_lba,
                    p.last_lba
                ));
            }
        }
        Ok(())
    }

    /// Where tables and the last usable LBA sit on a disk of `total_lbas`.
    fn layout_for(&self, total_lbas: u64) -> (u64, u64, u64) {
        let backup_header = total_lbas - 1;
        let backup_entries = backup_header - self.entries_sectors();
        (backup_header, backup_entries, backup_entries - 1)
    }

    /// The header for `my_lba`, with checksums, as a full sector.
    fn header_sector(&self, my_lba: u64, alt_lba: u64, entries_lba: u64) -> Vec<u8> {
        let mut h = self.header.clone();
        put64(&mut h, H_MY_LBA, my_lba);
        put64(&mut h, H_ALT_LBA, alt_lba);
        put64(&mut h, H_ENTRIES_LBA, entries_lba);
        put32(&mut h, H_ENTRIES_CRC, crc32(&self.entries));
        put32(&mut h, H_CRC, 0);
        let hsize = le32(&h, 12) as usize;
        let c = crc32(&h[..hsize]);
        put32(&mut h, H_CRC, c);
        h
    }
}

/// Where new GUIDs come from: 16 random bytes each call (made a version-4
/// GUID, RFC 9562 §5.4, by [`random_guid`]).
pub type RandomBytes<'a> = &'a mut dyn FnMut() -> [u8; 16];

/// A version-4 (random) GUID in its on-disk byte order from 16 random
/// bytes: the version is the high nibble of the third field's (little-endian)
/// high byte, on disk byte 7; the variant (`10`) tops byte 8.
pub fn random_guid(mut b: [u8; 16]) -> [u8; 16] {
    b[7] = (b[7] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

/// What [`grow_last_partition`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrowOutcome {
    /// The partition already ends at the last usable LBA and the backup
    /// table is at the disk's end.
    AlreadyFull(Entry),
    /// Grown; with `renew`, `after` carries the partition's new GUID and
    /// `disk_guid` the disk's (else the old one, unchanged).
    Grown {
        before: Entry,
        after: Entry,
        disk_guid: String,
    },
}

/// Grow the partition named `name` to the disk's last usable LBA, moving the
/// backup table to the end of a disk of `disk_bytes`. Only the last partition
/// on the disk may be grown. With `renew`, the same writes give the disk and
/// every used partition new random GUIDs (module comment).
pub fn grow_last_partition<D: Read + Write + Seek>(
    d: &mut D,
    sector: u64,
    disk_bytes: u64,
    name: &str,
    renew: Option<RandomBytes<'_>>,
) -> Result<GrowOutcome, GptError> {
    let mut gpt = Gpt::read(d, sector)?;
    let total = disk_bytes / sector;
    if total < 2 * gpt.entries_sectors() + 4 {
        return Err(GptError::TooSmall(disk_bytes));
    }
    let (backup_header, backup_entries, last_usable) = gpt.layout_for(total);
    let parts = gpt.partitions();
    let before = parts
        .iter()
        .find(|p| p.name == name)
        .cloned()
        .ok_or_else(|| GptError::NotFound(name.to_string()))?;
    if let Some(other) = parts.iter().find(|p| p.first_lba > before.last_lba) {
        return Err(GptError::NotLast {
            name: name.to_string(),
            other: other.index + 1,
        });
    }
    if before.last_lba > last_usable {
        return Err(GptError::BeyondEnd {
            name: name.to_string(),
            end: before.last_lba,
            last_usable,
        });
    }
    gpt.check_layout(&parts, last_usable)?;
    if before.last_lba == last_usable
        && gpt.alternate_lba() == backup_header
        && gpt.last_usable() == last_usable
    {
        return Ok(GrowOutcome::AlreadyFull(before));
    }
    let old_alternate = gpt.alternate_lba();

    let es = gpt.entry_size();
    let off = before.index * es;
    put64(&mut gpt.entries[off..off + es], E_LAST_LBA, last_usable);
    put64(&mut gpt.header, H_LAST_USABLE, last_usable);
    if let Some(random) = renew {
        let g = random_guid(random());
        gpt.header[H_DISK_GUID..H_DISK_GUID + 16].copy_from_slice(&g);
        for p in &parts {
            let o = p.index * es + E_UNIQUE;
            let g = random_guid(random());
            gpt.entries[o..o + 16].copy_from_slice(&g);
        }
    }

    let primary_entries = le64(&gpt.header, H_ENTRIES_LBA);
    let backup = gpt.header_sector(backup_header, 1, backup_entries);
    let primary = gpt.header_sector(1, backup_header, primary_entries);
    write_at(d, sector, backup_entries, &gpt.entries)?;
    write_at(d, sector, backup_header, &backup)?;
    write_at(d, sector, primary_entries, &gpt.entries)?;
    write_at(d, sector, 1, &primary)?;
    // The old backup header is zeroed only where the grown partition now
    // lies (a header naming another place is not followed into a partition).
    if old_alternate > before.last_lba && old_alternate < backup_entries {
        write_at(d, sector, old_alternate, &vec![0u8; sector as usize])?;
    }
    let after = Entry {
        last_lba: last_usable,
        unique_guid: guid_text(&gpt.entries[off + E_UNIQUE..off + E_UNIQUE + 16]),
        ..before.clone()
    };
    Ok(GrowOutcome::Grown {
        before,
        after,
        disk_guid: gpt.disk_guid(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::process::Command;

    #[test]
    fn crc32_known_vector() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    /// An image laid out like the builder's (docs/boot-protocol.md "Disk"),
    /// made by sfdisk, an independent GPT implementation.
    fn sfdisk_image(path: &std::path::Path, mib: u64) -> bool {
        let f = std::fs::File::create(path).unwrap();
        f.set_len(mib << 20).unwrap();
        drop(f);
        let script = "label: gpt\nunit: sectors\n\
            start=2048, size=8192, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"esp\"\n\
            start=10240, size=8192, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"root-a\"\n\
            start=18432, size=8192, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"root-b\"\n\
            start=26624, size=4096, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"data\"\n";
        let mut child = match Command::new("sfdisk")
            .arg("--quiet")
            .arg(path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(_) => return false,
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        child.wait().unwrap().success()
    }

    fn sfdisk_dump(path: &std::path::Path) -> String {
        let out = Command::new("sfdisk").arg("-d").arg(path).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn unique_guids_read_as_sfdisk_wrote_them() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        if !sfdisk_image(&img, 16) {
            eprintln!("sfdisk not available; skipping");
            return;
        }
        // sfdisk gave each partition a random unique GUID: its dump (upper
        // case, `uuid=`) and ours (lower case) must agree, field order included.
        let dump = sfdisk_dump(&img);
        let g = Gpt::read(&mut std::fs::File::open(&img).unwrap(), 512).unwrap();
        let ours = g.partitions();
        assert_eq!(ours.len(), 4);
        for e in &ours {
            let line = dump
                .lines()
                .find(|l| l.contains(&format!("name=\"{}\"", e.name)))
                .unwrap();
            let uuid = line
                .split("uuid=")
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap();
            assert_eq!(e.unique_guid, uuid.trim().to_ascii_lowercase(), "{line}");
        }
        assert_eq!(
            guid_text(&[
                0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
                0xc9, 0x3b
            ]),
            "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
        );
        assert_eq!(guid_text(&[0; 4]), "");
    }

    #[test]
    fn grows_in_memory_then_on_file_checked_by_sfdisk_and_sgdisk() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        if !sfdisk_image(&img, 16) {
            eprintln!("sfdisk not available; skipping");
            return;
        }
        // The user wrote the 16 MiB image to a 48 MiB disk.
        let mut bytes = std::fs::read(&img).unwrap();
        bytes.resize(48 << 20, 0);
        let disk_bytes = bytes.len() as u64;
        let mut disk = Cursor::new(bytes);

        let before = Gpt::read(&mut disk, 512).unwrap();
        let names: Vec<_> = before.partitions().iter().map(|p| p.name.clone()).collect();
        assert_eq!(names, ["esp", "root-a", "root-b", "data"]);
        assert_eq!(before.alternate_lba(), (16 << 20) / 512 - 1);

        let out = grow_last_partition(&mut disk, 512, disk_bytes, "data", None).unwrap();
        let total = disk_bytes / 512;
        let GrowOutcome::Grown {
            before: b, after, ..
        } = out
        else {
            panic!("expected growth, got {out:?}");
        };
        assert_eq!(b.last_lba, 26624 + 4096 - 1);
        assert_eq!(after.first_lba, 26624);
        assert_eq!(after.last_lba, total - 34); // 32 entry sectors + header + last LBA
        assert_eq!(after.index, 3);

        // Re-read: CRCs valid, backup moved, second run is a no-op.
        let g = Gpt::read(&mut disk, 512).unwrap();
        assert_eq!(g.alternate_lba(), total - 1);
        assert_eq!(g.last_usable(), total - 34);
        assert!(matches!(
            grow_last_partition(&mut disk, 512, disk_bytes, "data", None).unwrap(),
            GrowOutcome::AlreadyFull(_)
        ));
        // The old backup header is gone.
        let old = (16u64 << 20) / 512 - 1;
        assert!(
            disk.get_ref()[(old * 512) as usize..(old * 512 + 8) as usize]
                .iter()
                .all(|b| *b == 0)
        );

        // Independent checks on the written image.
        std::fs::write(&img, disk.get_ref()).unwrap();
        let dump = sfdisk_dump(&img);
        assert!(
            dump.contains(&format!("last-lba: {}", total - 34)),
            "{dump}"
        );
        let data_line = dump.lines().find(|l| l.contains("name=\"data\"")).unwrap();
        let field = |k: &str| -> u64 {
            let rest = &data_line[data_line.find(k).unwrap() + k.len()..];
            rest.trim_start()
                .split(',')
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        assert_eq!(field("start="), 26624, "{data_line}");
        assert_eq!(field("size="), total - 34 - 26624 + 1, "{data_line}");
        if let Ok(v) = Command::new("sgdisk").arg("-v").arg(&img).output() {
            let text = String::from_utf8_lossy(&v.stdout);
            assert!(text.contains("No problems found"), "sgdisk -v: {text}");
        }
    }

    /// `(label-id, [(name, uuid)])` from `sfdisk -d`, upper case as it prints.
    fn sfdisk_guids(dump: &str) -> (String, Vec<(String, String)>) {
        let label = dump
            .lines()
            .find_map(|l| l.strip_prefix("label-id: "))
            .unwrap()
            .trim()
            .to_string();
        let parts = dump
            .lines()
            .filter(|l| l.contains("uuid="))
            .map(|l| {
                let get = |k: &str| {
                    l[l.find(k).unwrap() + k.len()..]
                        .split(',')
                        .next()
                        .unwrap()
                        .trim()
                        .trim_matches('"')
                        .to_string()
                };
                (get("name="), get("uuid="))
            })
            .collect();
        (label, parts)
    }

    #[test]
    fn growth_renews_disk_and_partition_guids_checked_by_sfdisk_and_sgdisk() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        if !sfdisk_image(&img, 16) {
            eprintln!("sfdisk not available; skipping");
            return;
        }
        let (label0, parts0) = sfdisk_guids(&sfdisk_dump(&img));
        let mut bytes = std::fs::read(&img).unwrap();
        bytes.resize(32 << 20, 0);
        let n = bytes.len() as u64;
        let mut disk = Cursor::new(bytes);
        // Deterministic "random" bytes: every byte of call k is k (0x01...),
        // so the version and variant bits are ours, not the source's.
        let mut calls = 0u8;
        let mut random = || {
            calls += 1;
            [calls.wrapping_mul(0x11) | 0x0f; 16]
        };
        let out = grow_last_partition(&mut disk, 512, n, "data", Some(&mut random)).unwrap();
        let GrowOutcome::Grown {
            before,
            after,
            disk_guid,
        } = out
        else {
            panic!("expected growth, got {out:?}");
        };
        assert_ne!(before.unique_guid, after.unique_guid);
        std::fs::write(&img, disk.get_ref()).unwrap();
        let (label1, parts1) = sfdisk_guids(&sfdisk_dump(&img));
        assert_eq!(label1.to_ascii_lowercase(), disk_guid);
        assert_ne!(label1, label0);
        assert_eq!(parts1.len(), 4);
        let mut seen = std::collections::HashSet::new();
        for ((name0, uuid0), (name1, uuid1)) in parts0.iter().zip(&parts1) {
            assert_eq!(name0, name1);
            assert_ne!(uuid0, uuid1, "{name1} kept its GUID");
            // Text form: version nibble 4 starts the third group, the
            // variant (8, 9, A or B) the fourth.
            let groups: Vec<&str> = uuid1.split('-').collect();
            assert!(groups[2].starts_with('4'), "{uuid1}");
            assert!("89AB".contains(&groups[3][..1]), "{uuid1}");
            assert!(seen.insert(uuid1.clone()), "{uuid1} twice");
        }
        let data = parts1.iter().find(|(n, _)| n == "data").unwrap();
        assert_eq!(data.1.to_ascii_lowercase(), after.unique_guid);
        assert!(seen.insert(label1.clone()));
        if let Ok(v) = Command::new("sgdisk").arg("-v").arg(&img).output() {
            let text = String::from_utf8_lossy(&v.stdout);
            assert!(text.contains("No problems found"), "sgdisk -v: {text}");
        }
        // Grown once: later boots keep the GUIDs.
        let mut disk = Cursor::new(std::fs::read(&img).unwrap());
        let mut never = || -> [u8; 16] { panic!("renewed again") };
        assert!(matches!(
            grow_last_partition(&mut disk, 512, n, "data", Some(&mut never)).unwrap(),
            GrowOutcome::AlreadyFull(_)
        ));
        assert_eq!(
            random_guid([0xff; 16]),
            [
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x4f, 0xbf, 0xff, 0xff, 0xff, 0xff, 0xff,
                0xff, 0xff
            ]
        );
    }

    #[test]
    fn grows_within_same_size_disk_and_rejects_non_last() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        if !sfdisk_image(&img, 16) {
            return;
        }
        let bytes = std::fs::read(&img).unwrap();
        let n = bytes.len() as u64;
        let mut disk = Cursor::new(bytes);
        assert!(matches!(
            grow_last_partition(&mut disk, 512, n, "root-a", None),
            Err(GptError::NotLast { other: 3, .. })
        ));
        assert!(matches!(
            grow_last_partition(&mut disk, 512, n, "nope", None),
            Err(GptError::NotFound(_))
        ));
        // Same-size disk: data grows into the free tail; backup stays put.
        let out = grow_last_partition(&mut disk, 512, n, "data", None).unwrap();
        assert!(matches!(out, GrowOutcome::Grown { .. }));
        std::fs::write(&img, disk.get_ref()).unwrap();
        assert!(sfdisk_dump(&img).contains("name=\"data\""));
    }

    #[test]
    fn rejects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        if !sfdisk_image(&img, 16) {
            return;
        }
        let mut bytes = std::fs::read(&img).unwrap();
        bytes[512 + 60] ^= 0xFF; // inside the disk GUID: header CRC breaks
        let n = bytes.len() as u64;
        assert!(matches!(
            grow_last_partition(&mut Cursor::new(bytes.clone()), 512, n, "data", None),
            Err(GptError::Corrupt {
                why: "header CRC",
                ..
            })
        ));
        bytes[512..520].copy_from_slice(b"NOTAGPT!");
        assert!(matches!(
            Gpt::read(&mut Cursor::new(bytes), 512),
            Err(GptError::NoSignature(1))
        ));
    }

    /// Edit the primary header (and entry array) of an image, then give both
    /// their right CRCs again: a table whose checksums say it is what was
    /// written, and whose fields are not sane.
    fn resealed(mut bytes: Vec<u8>, edit: impl FnOnce(&mut [u8], &mut [u8])) -> Vec<u8> {
        let (head, rest) = bytes.split_at_mut(1024);
        let (header, entries) = (&mut head[512..], &mut rest[..128 * 128]);
        edit(header, entries);
        let c = crc32(entries);
        put32(header, H_ENTRIES_CRC, c);
        put32(header, H_CRC, 0);
        let c = crc32(&header[..92]);
        put32(header, H_CRC, c);
        bytes
    }

    /// Checksums protect against damage, not against a table (on any disk
    /// put into a node) whose fields point into partitions or past any disk:
    /// such a table is refused before anything is written, with a message
    /// naming the field, and a header pointing its backup into another
    /// partition does not get that partition's sector zeroed.
    #[test]
    fn a_checksummed_but_insane_table_is_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        if !sfdisk_image(&img, 16) {
            eprintln!("sfdisk not available; skipping");
            return;
        }
        let mut image = std::fs::read(&img).unwrap();
        image.resize(32 << 20, 0);
        let n = image.len() as u64;
        let refused = |bytes: Vec<u8>| {
            let mut disk = Cursor::new(bytes.clone());
            let e = grow_last_partition(&mut disk, 512, n, "data", None).unwrap_err();
            assert!(disk.get_ref() == &bytes, "written before refusing: {e}");
            e.to_string()
        };

        // An entry array LBA whose byte offset overflows (it used to wrap).
        let e = refused(resealed(image.clone(), |h, _| {
            put64(h, H_ENTRIES_LBA, u64::MAX / 256)
        }));
        assert!(e.contains("an LBA beyond any disk"), "{e}");
        // A primary header that says it is somewhere else.
        let e = refused(resealed(image.clone(), |h, _| put64(h, H_MY_LBA, 5)));
        assert!(e.contains("does not say LBA 1"), "{e}");
        // The entry array inside the data partition: growing would write it there.
        let mut moved = image.clone();
        moved.copy_within(1024..1024 + 128 * 128, 26624 * 512);
        let e = refused(resealed(moved, |h, _| put64(h, H_ENTRIES_LBA, 26624)));
        assert!(
            e.contains("entry array at LBA 26624 (32 sectors) overlaps"),
            "{e}"
        );
        // A partition starting inside the tables.
        let e = refused(resealed(image.clone(), |_, t| {
            put64(&mut t[128..], E_FIRST_LBA, 1)
        }));
        assert!(
            e.contains("partition 2 (\"root-a\") spans LBA 1..=18431"),
            "{e}"
        );
        // First usable beyond the disk's end.
        let e = refused(resealed(image.clone(), |h, _| {
            put64(h, H_FIRST_USABLE, 1 << 40)
        }));
        assert!(
            e.contains("first usable LBA 1099511627776 lies beyond"),
            "{e}"
        );

        // A backup header said to lie inside root-a: growth goes on (the
        // primary is sane), and root-a's sector is left alone.
        let mut bytes = resealed(image.clone(), |h, _| put64(h, H_ALT_LBA, 10240));
        bytes[10240 * 512..10241 * 512].fill(0xAB);
        let mut disk = Cursor::new(bytes);
        let out = grow_last_partition(&mut disk, 512, n, "data", None).unwrap();
        assert!(matches!(out, GrowOutcome::Grown { .. }));
        assert!(
            disk.get_ref()[10240 * 512..10241 * 512]
                .iter()
                .all(|&b| b == 0xAB)
        );
        // The image's own old backup header, where data now reaches, is zeroed.
        let mut disk = Cursor::new(image.clone());
        grow_last_partition(&mut disk, 512, n, "data", None).unwrap();
        let old_backup = (16u64 << 20) / 512 - 1;
        let at = (old_backup * 512) as usize;
        assert_eq!(&image[at..at + 8], b"EFI PART");
        assert!(disk.get_ref()[at..at + 512].iter().all(|&b| b == 0));
    }
}
