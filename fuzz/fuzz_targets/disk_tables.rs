//! Partition tables of any disk stage 1 looks at (a USB stick plugged into a
//! node is input no one checked): the GPT and MBR readers and the first-boot
//! growth from arbitrary bytes. Must never panic (nor overflow: the fuzz
//! build checks arithmetic), and a growth that reports success must leave a
//! table the reader accepts, with the grown partition ending at the last
//! usable sector and every other partition where it was.
//!
//! Input: one flags byte (bit 0: 4096-byte sectors; bits 1-7: how many
//! sectors the "disk" is larger than the bytes given; bit 1 also: renew the
//! GUIDs while growing), then the disk. With
//! bit 7 set the GPT's two CRCs are made right first, so that the fields
//! behind them (sizes, LBAs, entries) are reached with any value.
#![no_main]

use std::io::Cursor;

use basalt_init::{gpt, mbr};
use libfuzzer_sys::fuzz_target;

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Recompute the entry array's CRC and then the header's, where the header's
/// own fields say they are (skipped when they point outside the input).
fn fix_gpt_crcs(disk: &mut [u8], sector: usize) {
    let h = sector;
    if disk.len() < h + 92 {
        return;
    }
    let n = le32(disk, h + 80) as usize;
    let esize = le32(disk, h + 84) as usize;
    let mut lba = [0u8; 8];
    lba.copy_from_slice(&disk[h + 72..h + 80]);
    let start = usize::try_from(u64::from_le_bytes(lba))
        .ok()
        .and_then(|l| l.checked_mul(sector));
    if let (Some(start), Some(len)) = (start, n.checked_mul(esize))
        && let Some(end) = start.checked_add(len)
        && end <= disk.len()
    {
        let c = gpt::crc32(&disk[start..end]);
        disk[h + 88..h + 92].copy_from_slice(&c.to_le_bytes());
    }
    let hsize = (le32(disk, h + 12) as usize).clamp(92, sector);
    if disk.len() >= h + hsize {
        disk[h + 16..h + 20].fill(0);
        let c = gpt::crc32(&disk[h..h + hsize]);
        disk[h + 16..h + 20].copy_from_slice(&c.to_le_bytes());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, disk)) = data.split_first() else {
        return;
    };
    let sector: u64 = if flags & 1 == 1 { 4096 } else { 512 };
    let extra = u64::from(flags >> 1) * sector;
    let mut disk = disk.to_vec();
    if flags & 0x80 != 0 {
        fix_gpt_crcs(&mut disk, sector as usize);
    }
    let disk = disk.as_slice();
    let mut grown = disk.to_vec();
    grown.resize(disk.len() + extra as usize, 0);
    let disk_bytes = grown.len() as u64;

    if let Ok(table) = gpt::Gpt::read(&mut Cursor::new(disk), sector) {
        let before = table.partitions();
        let _ = (table.disk_guid(), table.first_usable(), table.last_usable());
        if let Some(last) = before.iter().max_by_key(|p| p.last_lba) {
            let mut n = 0u8;
            let mut random = || {
                n = n.wrapping_add(1);
                [n; 16]
            };
            let mut d = Cursor::new(grown.clone());
            let renew: Option<gpt::RandomBytes<'_>> = if flags & 2 == 2 {
                Some(&mut random)
            } else {
                None
            };
            if let Ok(gpt::GrowOutcome::Grown { after, .. }) =
                gpt::grow_last_partition(&mut d, sector, disk_bytes, &last.name, renew)
            {
                let again = gpt::Gpt::read(&mut Cursor::new(d.get_ref().as_slice()), sector)
                    .expect("the grown table reads back");
                assert_eq!(
                    after.last_lba,
                    again.last_usable(),
                    "grown to the last usable sector"
                );
                let parts = again.partitions();
                assert_eq!(parts.len(), before.len());
                for (b, a) in before.iter().zip(&parts) {
                    assert_eq!((b.index, b.first_lba), (a.index, a.first_lba));
                    if b.index != after.index {
                        assert_eq!(b.last_lba, a.last_lba);
                    }
                }
            }
        }
    }

    if let Ok(logical) = mbr::logical_partitions(&mut Cursor::new(disk), sector)
        && let Some(&(_, last)) = logical.last()
    {
        let mut d = Cursor::new(grown);
        if let Ok(mbr::GrowOutcome::Grown { after, .. }) =
            mbr::grow_last_logical(&mut d, sector, disk_bytes, last.number)
        {
            let again = mbr::logical_partitions(&mut Cursor::new(d.get_ref().as_slice()), sector)
                .expect("the grown table reads back");
            assert_eq!(again.len(), logical.len());
            assert_eq!(again.last().map(|p| p.1), Some(after));
            assert!(after.start + after.len <= disk_bytes / sector);
        }
    }
});
