//! MBR partition tables on the device (Raspberry Pi boards): growing the data
//! partition, the last logical partition in the extended partition, to the
//! end of the disk at first boot (docs/boot-protocol.md, "Disk (Raspberry Pi,
//! MBR)"). The builder writes these tables (imagebuild/src/mbr.rs); this
//! module only reads them and enlarges two size fields.
//!
//! Power-cut safety: two single-sector writes, each of which leaves a valid
//! table. The extended partition (in the MBR) is enlarged first: a larger
//! container with the same partitions inside is valid on its own. Then the
//! last logical partition's entry (in its EBR) is enlarged into the space the
//! container now has. A cut between the two leaves the data partition at its
//! old size, and the next boot finishes the job.

use std::io::{Read, Seek, SeekFrom, Write};

// ------------------------------------------------------------ on-disk format
// One place for the table format, used by the builder (imagebuild/src/mbr.rs,
// which writes tables) and by the device (this module, which reads and grows them).

/// FAT32 with LBA addressing (what Raspberry Pi OS images use).
pub const TYPE_FAT32_LBA: u8 = 0x0c;
/// Extended partition, LBA addressing.
pub const TYPE_EXTENDED_LBA: u8 = 0x0f;
/// Type of the link entry inside an EBR that points at the next EBR.
pub const TYPE_EBR_LINK: u8 = 0x05;
/// Linux filesystem (squashfs roots, ext4 data).
pub const TYPE_LINUX: u8 = 0x83;
/// Bytes 510..512 of an MBR or EBR sector.
pub const SIGNATURE: [u8; 2] = [0x55, 0xaa];
/// Offset of the four 16-byte partition entries in an MBR or EBR sector.
pub const ENTRIES_OFFSET: usize = 446;

/// Whether `t` is an extended (container) partition type.
pub fn is_extended(t: u8) -> bool {
    matches!(t, 0x05 | 0x0f | 0x85)
}

/// Entry `i` of a table sector: (type, start LBA as stored, sectors).
pub fn entry(sector: &[u8], i: usize) -> (u8, u64, u64) {
    let e = &sector[ENTRIES_OFFSET + 16 * i..ENTRIES_OFFSET + 16 * (i + 1)];
    let le = |o: usize| u64::from(u32::from_le_bytes([e[o], e[o + 1], e[o + 2], e[o + 3]]));
    (e[4], le(8), le(12))
}

/// Write entry `i`: `abs_start` gives the CHS fields, `rel_start` is what is
/// stored (relative to the EBR inside an extended partition). The caller has
/// checked both and `sectors` against u32.
pub fn put_entry(
    sector: &mut [u8],
    i: usize,
    kind: u8,
    abs_start: u64,
    rel_start: u64,
    sectors: u64,
) {
    let e = &mut sector[ENTRIES_OFFSET + 16 * i..ENTRIES_OFFSET + 16 * (i + 1)];
    e[0] = 0; // not "active": the Pi firmware does not look at the flag
    e[1..4].copy_from_slice(&chs(abs_start));
    e[4] = kind;
    e[5..8].copy_from_slice(&chs(abs_start + sectors.max(1) - 1));
    e[8..12].copy_from_slice(&(rel_start as u32).to_le_bytes());
    e[12..16].copy_from_slice(&(sectors as u32).to_le_bytes());
}

/// CHS address in the 255-head, 63-sector geometry; past cylinder 1023 the
/// conventional "use LBA" value `fe ff ff`.
pub fn chs(lba: u64) -> [u8; 3] {
    let (heads, spt) = (255u64, 63u64);
    let cylinder = lba / (heads * spt);
    if cylinder > 1023 {
        return [0xfe, 0xff, 0xff];
    }
    let head = (lba / spt) % heads;
    let sector = lba % spt + 1;
    [
        head as u8,
        (sector as u8) | (((cylinder >> 8) as u8) << 6),
        cylinder as u8,
    ]
}

fn set_len(sector: &mut [u8], i: usize, len: u64) {
    let o = ENTRIES_OFFSET + 16 * i + 12;
    sector[o..o + 4].copy_from_slice(&(len.min(u64::from(u32::MAX)) as u32).to_le_bytes());
}

#[derive(Debug, thiserror::Error)]
pub enum MbrError {
    #[error("reading or writing the disk: {0}")]
    Io(#[from] std::io::Error),
    #[error("no MBR signature (0x55AA) in sector 0")]
    NoSignature,
    #[error("the MBR has no extended partition")]
    NoExtended,
    #[error("the extended partition holds no logical partition")]
    NoLogical,
    #[error(
        "EBR chain is broken at sector {0} (no signature, a loop, or out of the extended partition)"
    )]
    BrokenChain(u64),
    #[error("the last logical partition (number {0}) is not the data partition (number {1})")]
    NotLast(u32, u32),
    #[error(
        "partition {other} starts at sector {start}, after the data partition (number {number}): growing it would overlap"
    )]
    NotLastOnDisk { number: u32, other: u32, start: u64 },
    #[error(
        "partition {number} ends at sector {end}, beyond the disk's end (sector {disk_sectors}): the disk is {} MiB smaller than the image (flashed to a smaller card?)",
        (end + 1 - disk_sectors) * sector_bytes / (1 << 20)
    )]
    BeyondEnd {
        number: u32,
        end: u64,
        disk_sectors: u64,
        sector_bytes: u64,
    },
}

/// A partition's place, in sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub number: u32,
    pub start: u64,
    pub len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrowOutcome {
    AlreadyFull(Extent),
    Grown { before: Extent, after: Extent },
}

/// Slack under which the partition counts as filling the disk (1 MiB in 512-byte sectors).
const SLACK_SECTORS: u64 = 2048;

fn read_sector<D: Read + Seek>(d: &mut D, lba: u64, ss: u64) -> Result<Vec<u8>, MbrError> {
    let mut buf = vec![0u8; ss as usize];
    d.seek(SeekFrom::Start(lba * ss))?;
    d.read_exact(&mut buf)?;
    Ok(buf)
}

/// The logical partitions (numbers 5, 6, ...) with the sector of the EBR that describes each.
pub fn logical_partitions<D: Read + Seek>(
    d: &mut D,
    ss: u64,
) -> Result<Vec<(u64, Extent)>, MbrError> {
    let mbr = read_sector(d, 0, ss)?;
    if mbr[510..512] != SIGNATURE {
        return Err(MbrError::NoSignature);
    }
    let (ext_start, ext_len) = (0..4)
        .map(|i| entry(&mbr, i))
        .find(|(t, _, _)| is_extended(*t))
        .map(|(_, s, l)| (s, l))
        .ok_or(MbrError::NoExtended)?;
    let mut out = Vec::new();
    let mut ebr_lba = ext_start;
    for number in 5u32..64 {
        if ebr_lba < ext_start
            || ebr_lba >= ext_start + ext_len
            || out.iter().any(|(l, _)| *l == ebr_lba)
        {
            return Err(MbrError::BrokenChain(ebr_lba));
        }
        let ebr = read_sector(d, ebr_lba, ss)?;
        if ebr[510..512] != SIGNATURE {
            return Err(MbrError::BrokenChain(ebr_lba));
        }
        let (t, rel, len) = entry(&ebr, 0);
        if t != 0 && len != 0 {
            out.push((
                ebr_lba,
                Extent {
                    number,
                    start: ebr_lba + rel,
                    len,
                },
            ));
        }
        let (nt, nrel, _) = entry(&ebr, 1);
        if nt == 0 || nrel == 0 {
            break;
        }
        ebr_lba = ext_start + nrel;
    }
    if out.is_empty() {
        return Err(MbrError::NoLogical);
    }
    Ok(out)
}

/// Grow logical partition `number` (which must be the last one) and the
/// extended partition around it to the end of a disk of `disk_bytes`.
pub fn grow_last_logical<D: Read + Write + Seek>(
    d: &mut D,
    ss: u64,
    disk_bytes: u64,
    number: u32,
) -> Result<GrowOutcome, MbrError> {
    let parts = logical_partitions(d, ss)?;
    let Some(&(ebr_lba, last)) = parts.last() else {
        return Err(MbrError::NoLogical);
    };
    if last.number != number {
        return Err(MbrError::NotLast(last.number, number));
    }
    // Last in the chain is not always last on the disk: a primary partition
    // or an earlier logical one may lie behind it (a table not the builder's).
    let mbr0 = read_sector(d, 0, ss)?;
    let primaries = (0..4u32).filter_map(|i| {
        let (t, start, len) = entry(&mbr0, i as usize);
        (t != 0 && len != 0 && !is_extended(t)).then_some((i + 1, start))
    });
    let logicals = parts.iter().map(|(_, e)| (e.number, e.start));
    if let Some((other, start)) = primaries
        .chain(logicals)
        .find(|&(n, start)| n != last.number && start > last.start)
    {
        return Err(MbrError::NotLastOnDisk {
            number,
            other,
            start,
        });
    }
    // A disk smaller than the image: the kernel cut the partition at the
    // disk's end and its filesystem would not mount; said, nothing written.
    let end = last.start + last.len;
    if end > disk_bytes / ss {
        return Err(MbrError::BeyondEnd {
            number,
            end: end - 1,
            disk_sectors: disk_bytes / ss,
            sector_bytes: ss,
        });
    }
    let disk_sectors = (disk_bytes / ss).min(u64::from(u32::MAX));
    if end + SLACK_SECTORS >= disk_sectors {
        return Ok(GrowOutcome::AlreadyFull(last));
    }
    // 1. The extended partition reaches the end of the disk.
    let mut mbr = read_sector(d, 0, ss)?;
    let ext_index = (0..4)
        .find(|&i| is_extended(entry(&mbr, i).0))
        .ok_or(MbrError::NoExtended)?;
    let ext_start = entry(&mbr, ext_index).1;
    set_len(&mut mbr, ext_index, disk_sectors - ext_start);
    d.seek(SeekFrom::Start(0))?;
    d.write_all(&mbr)?;
    d.flush()?;
    // 2. The data partition fills it.
    let mut ebr = read_sector(d, ebr_lba, ss)?;
    let after = Extent {
        len: disk_sectors - last.start,
        ..last
    };
    set_len(&mut ebr, 0, after.len);
    d.seek(SeekFrom::Start(ebr_lba * ss))?;
    d.write_all(&ebr)?;
    d.flush()?;
    Ok(GrowOutcome::Grown {
        before: last,
        after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// An MBR disk laid out like a Pi image, made by sfdisk (not our code).
    fn pi_disk(path: &std::path::Path, mib: u64) {
        std::fs::File::create(path)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let script = "label: dos\n\
            start=2048, size=16384, type=c\n\
            start=18432, size=16384, type=c\n\
            start=34816, size=16384, type=c\n\
            start=51200, type=f\n\
            start=53248, size=20480, type=83\n\
            start=75776, size=20480, type=83\n\
            start=98304, size=16384, type=83\n";
        sfdisk(path, script);
    }

    /// `script` applied to the disk file at `path` by sfdisk.
    fn sfdisk(path: &std::path::Path, script: &str) {
        let mut c = Command::new("sfdisk")
            .arg("-q")
            .arg(path)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sfdisk");
        c.stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(c.wait().unwrap().success());
    }

    #[test]
    fn grows_data_and_extended_to_the_disk_end_checked_by_sfdisk() {
        let dir = std::env::temp_dir().join(format!("basalt-mbr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("sd.img");
        pi_disk(&img, 64);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(256 << 20)
            .unwrap();
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let parts = logical_partitions(&mut f, 512).unwrap();
        assert_eq!(
            parts.iter().map(|p| p.1.number).collect::<Vec<_>>(),
            [5, 6, 7]
        );
        assert!(matches!(
            grow_last_logical(&mut f, 512, 256 << 20, 6),
            Err(MbrError::NotLast(7, 6))
        ));
        let out = grow_last_logical(&mut f, 512, 256 << 20, 7).unwrap();
        let GrowOutcome::Grown { after, .. } = out else {
            panic!("{out:?}")
        };
        assert_eq!(after.start + after.len, (256 << 20) / 512);
        // Idempotent: a second boot finds it full.
        assert!(matches!(
            grow_last_logical(&mut f, 512, 256 << 20, 7).unwrap(),
            GrowOutcome::AlreadyFull(_)
        ));
        drop(f);
        let dump = String::from_utf8(
            Command::new("sfdisk")
                .arg("-d")
                .arg(&img)
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        let p7 = dump.lines().find(|l| l.contains("img7 :")).unwrap();
        assert!(
            p7.contains("start=       98304")
                && p7.contains(&format!("size={:>12}", 524288 - 98304)),
            "{dump}"
        );
        let p4 = dump.lines().find(|l| l.contains("img4 :")).unwrap();
        assert!(
            p4.contains(&format!("size={:>12}", 524288 - 51200)),
            "{dump}"
        );
        let v = Command::new("sfdisk").arg("-V").arg(&img).output().unwrap();
        assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut c = std::io::Cursor::new(vec![0u8; 4096]);
        assert!(matches!(
            logical_partitions(&mut c, 512),
            Err(MbrError::NoSignature)
        ));
        let mut v = vec![0u8; 8192];
        v[510] = 0x55;
        v[511] = 0xAA;
        v[446 + 4] = 0x0f;
        v[446 + 8] = 2; // extended at sector 2, whose EBR has no signature
        v[446 + 12] = 10;
        assert!(matches!(
            logical_partitions(&mut std::io::Cursor::new(v), 512),
            Err(MbrError::BrokenChain(2))
        ));
    }

    /// An image flashed to a card smaller than itself: the data partition
    /// runs past the disk's end. An error naming the shortfall (was taken
    /// for "already full"), nothing written.
    #[test]
    fn a_disk_smaller_than_the_image_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("sd.img");
        pi_disk(&img, 64);
        let before = std::fs::read(&img).unwrap();
        // The image's data partition ends at sector 114687 (56 MiB); the
        // card has 48 MiB.
        let mut disk = std::io::Cursor::new(before.clone());
        let e = grow_last_logical(&mut disk, 512, 48 << 20, 7).unwrap_err();
        assert!(
            matches!(
                e,
                MbrError::BeyondEnd {
                    number: 7,
                    end: 114687,
                    disk_sectors: 98304,
                    sector_bytes: 512
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "partition 7 ends at sector 114687, beyond the disk's end (sector 98304): the disk is 8 MiB smaller than the image (flashed to a smaller card?)"
        );
        assert!(disk.get_ref() == &before);
        // Exactly the image's size still counts as full.
        let end = (98304 + 16384) * 512;
        assert!(matches!(
            grow_last_logical(&mut disk, 512, end, 7).unwrap(),
            GrowOutcome::AlreadyFull(_)
        ));
    }

    /// The last logical partition in the chain is grown only when nothing
    /// lies behind it on the disk: here a primary partition follows the
    /// extended one (a table sfdisk made, not the builder), and growing would
    /// have put the data partition over it. Refused, the disk unchanged.
    #[test]
    fn a_partition_behind_the_data_partition_is_not_overlapped() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("sd.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let script = "label: dos\n\
            start=2048, size=20480, type=f\n\
            start=4096, size=4096, type=83\n\
            start=10240, size=4096, type=83\n\
            start=30720, size=8192, type=c\n";
        sfdisk(&img, script);
        let before = std::fs::read(&img).unwrap();
        let mut disk = std::io::Cursor::new(before.clone());
        let parts = logical_partitions(&mut disk, 512).unwrap();
        assert_eq!(parts.iter().map(|p| p.1.number).collect::<Vec<_>>(), [5, 6]);
        let e = grow_last_logical(&mut disk, 512, 64 << 20, 6).unwrap_err();
        assert!(
            matches!(
                e,
                MbrError::NotLastOnDisk {
                    number: 6,
                    other: 2,
                    start: 30720
                }
            ),
            "{e}"
        );
        assert!(disk.get_ref() == &before);
    }
}
