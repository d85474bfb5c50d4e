//! MBR partition tables with an extended partition (EBR chain), for the Raspberry Pi
//! layout of DESIGN.md: p1 config FAT, p2/p3 slot boot FATs, p4 extended → p5/p6 slot
//! roots, p7 data. The firmware addresses boot partitions by MBR number 1–4
//! (../shared/REFERENCE.md §1.1), so both slot boot FATs must be primary entries.
//!
//! This module computes a layout (1 MiB aligned, like sfdisk) and writes the MBR and
//! the EBRs into an image file. It never writes partition contents and never touches a
//! sector outside the table sectors it owns.

use std::fs::File;
use std::os::unix::fs::FileExt;

use sha2::{Digest, Sha256};
use thiserror::Error;

pub const SECTOR: u64 = 512;
/// Partitions (and EBRs) start on 1 MiB boundaries.
pub const ALIGN_SECTORS: u64 = 2048;

// The entry format and partition types: one definition shared with the
// device, which reads and grows these tables (init/src/mbr.rs).
#[cfg(test)]
use basalt_init::mbr::chs;
use basalt_init::mbr::{SIGNATURE, TYPE_EBR_LINK, put_entry};
pub use basalt_init::mbr::{TYPE_EXTENDED_LBA, TYPE_FAT32_LBA, TYPE_LINUX};

#[derive(Debug, Error)]
pub enum MbrError {
    #[error(
        "{count} primary partitions with logical ones: at most 3 fit beside the extended partition"
    )]
    TooManyPrimaries { count: usize },
    #[error("partition {number} has size 0")]
    Empty { number: usize },
    #[error("the layout needs {needed} sectors, the disk has {disk}")]
    DiskTooSmall { needed: u64, disk: u64 },
    #[error("partition {number} ends at sector {end}, beyond the 2 TiB an MBR can address")]
    TooLarge { number: usize, end: u64 },
    #[error("writing the {what} at sector {lba}: {source}")]
    Write {
        what: &'static str,
        lba: u64,
        source: std::io::Error,
    },
}

/// A partition to place: its type byte and size in bytes (rounded up to whole MiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionSpec {
    pub kind: u8,
    pub size_bytes: u64,
}

/// A placed partition. `number` is what Linux calls it (1–4 primary, 5+ logical).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub number: usize,
    pub kind: u8,
    pub start: u64,
    pub sectors: u64,
    /// For logical partitions: the sector of the EBR that describes it.
    pub ebr: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MbrLayout {
    pub disk_sectors: u64,
    pub signature: u32,
    /// Primary entries in order, including the extended partition when there is one.
    pub primaries: Vec<Placed>,
    pub logicals: Vec<Placed>,
}

/// A disk signature derived from `seed` (the image's inputs), so images are
/// reproducible. Never 0, which tools read as "no signature".
pub fn disk_signature(seed: &[u8]) -> u32 {
    let digest = Sha256::digest(seed);
    let sig = u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]);
    if sig == 0 { 1 } else { sig }
}

fn sectors_of(bytes: u64) -> u64 {
    bytes.div_ceil(SECTOR).next_multiple_of(ALIGN_SECTORS)
}

impl MbrLayout {
    /// Places `primaries` then, if `logicals` is not empty, an extended partition
    /// holding them. Each logical partition starts 1 MiB after its EBR.
    pub fn plan(
        disk_bytes: u64,
        signature: u32,
        primaries: &[PartitionSpec],
        logicals: &[PartitionSpec],
    ) -> Result<MbrLayout, MbrError> {
        let max_primaries = if logicals.is_empty() { 4 } else { 3 };
        if primaries.len() > max_primaries {
            return Err(MbrError::TooManyPrimaries {
                count: primaries.len(),
            });
        }
        let disk_sectors = disk_bytes / SECTOR;
        let mut next = ALIGN_SECTORS;
        let mut placed = Vec::new();
        for (i, p) in primaries.iter().enumerate() {
            let sectors = sectors_of(p.size_bytes);
            if sectors == 0 {
                return Err(MbrError::Empty { number: i + 1 });
            }
            placed.push(Placed {
                number: i + 1,
                kind: p.kind,
                start: next,
                sectors,
                ebr: None,
            });
            next += sectors;
        }
        let mut logical = Vec::new();
        if !logicals.is_empty() {
            let extended_start = next;
            for (i, p) in logicals.iter().enumerate() {
                let sectors = sectors_of(p.size_bytes);
                if sectors == 0 {
                    return Err(MbrError::Empty { number: i + 5 });
                }
                logical.push(Placed {
                    number: i + 5,
                    kind: p.kind,
                    start: next + ALIGN_SECTORS,
                    sectors,
                    ebr: Some(next),
                });
                next += ALIGN_SECTORS + sectors;
            }
            placed.push(Placed {
                number: placed.len() + 1,
                kind: TYPE_EXTENDED_LBA,
                start: extended_start,
                sectors: next - extended_start,
                ebr: None,
            });
        }
        if next > disk_sectors {
            return Err(MbrError::DiskTooSmall {
                needed: next,
                disk: disk_sectors,
            });
        }
        if let Some(p) = placed
            .iter()
            .chain(&logical)
            .find(|p| p.start + p.sectors > u32::MAX.into())
        {
            return Err(MbrError::TooLarge {
                number: p.number,
                end: p.start + p.sectors,
            });
        }
        Ok(MbrLayout {
            disk_sectors,
            signature,
            primaries: placed,
            logicals: logical,
        })
    }

    /// Every partition Linux will see, in number order (the extended one included).
    pub fn partitions(&self) -> impl Iterator<Item = &Placed> {
        self.primaries.iter().chain(&self.logicals)
    }

    pub fn partition(&self, number: usize) -> Option<&Placed> {
        self.partitions().find(|p| p.number == number)
    }

    /// The MBR sector.
    pub fn mbr_sector(&self) -> [u8; 512] {
        let mut s = [0u8; 512];
        s[440..444].copy_from_slice(&self.signature.to_le_bytes());
        for (i, p) in self.primaries.iter().enumerate() {
            put_entry(&mut s, i, p.kind, p.start, p.start, p.sectors);
        }
        s[510..512].copy_from_slice(&SIGNATURE);
        s
    }

    /// The EBR sectors, with their LBAs. An EBR's first entry is its logical partition
    /// (start relative to the EBR); its second links the next EBR (start relative to the
    /// extended partition, size covering that EBR and its partition).
    pub fn ebr_sectors(&self) -> Vec<(u64, [u8; 512])> {
        let extended_start = self.logicals.first().and_then(|p| p.ebr).unwrap_or(0);
        let mut out = Vec::new();
        for (i, p) in self.logicals.iter().enumerate() {
            let ebr = p.ebr.unwrap_or(p.start - ALIGN_SECTORS);
            let mut s = [0u8; 512];
            put_entry(&mut s, 0, p.kind, p.start, p.start - ebr, p.sectors);
            if let Some(next) = self.logicals.get(i + 1) {
                let next_ebr = next.ebr.unwrap_or(next.start - ALIGN_SECTORS);
                let span = next.start + next.sectors - next_ebr;
                put_entry(
                    &mut s,
                    1,
                    TYPE_EBR_LINK,
                    next_ebr,
                    next_ebr - extended_start,
                    span,
                );
            }
            s[510..512].copy_from_slice(&SIGNATURE);
            out.push((ebr, s));
        }
        out
    }

    /// Writes the MBR and the EBRs into `file` (which must already be the disk's size).
    pub fn write(&self, file: &File) -> Result<(), MbrError> {
        file.write_all_at(&self.mbr_sector(), 0)
            .map_err(|source| MbrError::Write {
                what: "MBR",
                lba: 0,
                source,
            })?;
        for (lba, sector) in self.ebr_sectors() {
            file.write_all_at(&sector, lba * SECTOR)
                .map_err(|source| MbrError::Write {
                    what: "EBR",
                    lba,
                    source,
                })?;
        }
        Ok(())
    }
}

/// The Raspberry Pi layout of DESIGN.md, sizes in bytes.
pub fn raspberry_pi_layout(
    disk_bytes: u64,
    seed: &[u8],
    config_bytes: u64,
    boot_bytes: u64,
    root_bytes: u64,
    data_bytes: u64,
) -> Result<MbrLayout, MbrError> {
    let fat = |size_bytes| PartitionSpec {
        kind: TYPE_FAT32_LBA,
        size_bytes,
    };
    let linux = |size_bytes| PartitionSpec {
        kind: TYPE_LINUX,
        size_bytes,
    };
    MbrLayout::plan(
        disk_bytes,
        disk_signature(seed),
        &[fat(config_bytes), fat(boot_bytes), fat(boot_bytes)],
        &[linux(root_bytes), linux(root_bytes), linux(data_bytes)],
    )
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn tool(name: &str) -> Command {
        let sbin = format!("/usr/sbin/{name}");
        Command::new(if std::path::Path::new(&sbin).exists() {
            sbin
        } else {
            name.to_string()
        })
    }

    fn pi_image(tag: &str) -> (std::path::PathBuf, MbrLayout) {
        let path =
            std::env::temp_dir().join(format!("basalt-mbr-{tag}-{}.img", std::process::id()));
        let layout = raspberry_pi_layout(
            512 * MIB,
            b"test image",
            32 * MIB,
            64 * MIB,
            48 * MIB,
            16 * MIB,
        )
        .unwrap();
        let file = File::create(&path).unwrap();
        file.set_len(512 * MIB).unwrap();
        layout.write(&file).unwrap();
        (path, layout)
    }

    #[test]
    fn layout_numbers_starts_and_types() {
        let (path, layout) = pi_image("layout");
        let want: [(usize, u8, u64, u64); 7] = [
            (1, 0x0c, 2048, 32 * 2048),
            (2, 0x0c, 33 * 2048, 64 * 2048),
            (3, 0x0c, 97 * 2048, 64 * 2048),
            (4, 0x0f, 161 * 2048, (1 + 48 + 1 + 48 + 1 + 16) * 2048),
            (5, 0x83, 162 * 2048, 48 * 2048),
            (6, 0x83, 211 * 2048, 48 * 2048),
            (7, 0x83, 260 * 2048, 16 * 2048),
        ];
        let got: Vec<_> = layout
            .partitions()
            .map(|p| (p.number, p.kind, p.start, p.sectors))
            .collect();
        assert_eq!(got, want);

        // sfdisk reads the same table back.
        let out = tool("sfdisk").arg("-d").arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dump = String::from_utf8(out.stdout).unwrap();
        assert!(dump.contains("label: dos"), "{dump}");
        assert!(
            dump.contains(&format!("label-id: {:#010x}", layout.signature)),
            "{dump}"
        );
        let mut rows = Vec::new();
        for line in dump.lines().filter(|l| l.contains(" : start=")) {
            let (dev, rest) = line.split_once(" : ").unwrap();
            let field = |k: &str| {
                rest.split(',')
                    .map(str::trim)
                    .find_map(|f| f.strip_prefix(k))
                    .map(|v| v.trim().trim_start_matches('=').trim().to_string())
                    .unwrap()
            };
            let number: usize = dev
                .trim()
                .rsplit(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let kind = u8::from_str_radix(&field("type"), 16).unwrap();
            rows.push((
                number,
                kind,
                field("start").parse().unwrap(),
                field("size").parse().unwrap(),
            ));
        }
        assert_eq!(rows, want, "{dump}");

        let out = tool("sfdisk").arg("-V").arg(&path).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "sfdisk -V: {text}");
        assert!(!text.to_lowercase().contains("warn"), "sfdisk -V: {text}");

        let out = tool("fdisk").arg("-l").arg(&path).output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let listed = text
            .lines()
            .filter(|l| l.starts_with(path.to_str().unwrap()))
            .count();
        assert_eq!(listed, 7, "{text}");
        // fdisk names type 0x0f "W95 Ext'd (LBA)".
        assert!(text.contains("Ext'd"), "{text}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn reproducible_and_seeded() {
        let (a, layout) = pi_image("rep-a");
        let (b, _) = pi_image("rep-b");
        // Compare every sector the table owns (reading 2 × 512 MiB would be slow), and
        // check the writer left all other sectors of the first 1 MiB alone.
        let (fa, fb) = (File::open(&a).unwrap(), File::open(&b).unwrap());
        let sector = |f: &File, lba: u64| {
            let mut s = [0u8; 512];
            f.read_exact_at(&mut s, lba * SECTOR).unwrap();
            s
        };
        let mut lbas = vec![0];
        lbas.extend(layout.ebr_sectors().iter().map(|(lba, _)| *lba));
        assert_eq!(lbas.len(), 4);
        for lba in lbas {
            assert_eq!(sector(&fa, lba), sector(&fb, lba), "sector {lba}");
            assert_eq!(&sector(&fa, lba)[510..], [0x55, 0xaa]);
        }
        assert!((1..2048).all(|lba| sector(&fa, lba) == [0u8; 512]));
        assert_ne!(disk_signature(b"one"), disk_signature(b"two"));
        assert_eq!(disk_signature(b"one"), disk_signature(b"one"));
        std::fs::remove_file(a).unwrap();
        std::fs::remove_file(b).unwrap();
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let p = |size_bytes| PartitionSpec {
            kind: TYPE_LINUX,
            size_bytes,
        };
        assert!(matches!(
            MbrLayout::plan(64 * MIB, 1, &[p(MIB); 4], &[p(MIB)]),
            Err(MbrError::TooManyPrimaries { count: 4 })
        ));
        assert!(matches!(
            MbrLayout::plan(64 * MIB, 1, &[p(MIB), p(0)], &[]),
            Err(MbrError::Empty { number: 2 })
        ));
        assert!(matches!(
            MbrLayout::plan(8 * MIB, 1, &[p(4 * MIB)], &[p(4 * MIB)]),
            Err(MbrError::DiskTooSmall { .. })
        ));
        assert!(matches!(
            MbrLayout::plan(4 << 40, 1, &[p(3 << 40)], &[]),
            Err(MbrError::TooLarge { number: 1, .. })
        ));
        // Four primaries and no extended partition is fine.
        let four = MbrLayout::plan(64 * MIB, 1, &[p(MIB); 4], &[]).unwrap();
        assert_eq!(four.partitions().count(), 4);
        assert!(four.ebr_sectors().is_empty());
    }

    #[test]
    fn chs_geometry() {
        assert_eq!(chs(0), [0, 1, 0]);
        assert_eq!(chs(2048), [32, 33, 0]);
        assert_eq!(chs(16065), [0, 1, 1]);
        assert_eq!(chs(1024 * 16065), [0xfe, 0xff, 0xff]);
    }
}
