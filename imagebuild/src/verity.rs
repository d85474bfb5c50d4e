//! dm-verity hash trees, written by the builder after each root squashfs.
//!
//! Format (REFERENCE.md §4): hash type 1, sha256, 4096-byte data and hash
//! blocks, salt prepended to every hashed block, digests padded to 32 bytes
//! (already a power of two), levels stored top first. A veritysetup superblock
//! sits at `hash_offset`; the tree starts at the next hash block after it, so
//! `veritysetup verify <part> <part> <root> --hash-offset=<hash_offset>`
//! accepts the partition. The root hash is never stored on disk: it goes on
//! the slot's kernel command line and into the bundle manifest.
//!
//! This module never reads the device: it hashes bytes it is given.

use sha2::{Digest, Sha256};

/// Data and hash block size.
pub const BLOCK: usize = 4096;
const DIGEST: usize = 32;
const HASHES_PER_BLOCK: usize = BLOCK / DIGEST;
const SALT_LEN: usize = 32;

/// A built hash area and the facts the kernel table and manifest need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityTree {
    /// Superblock (padded to one block) followed by the hash levels, top first.
    pub hash_area: Vec<u8>,
    /// Number of `BLOCK`-sized data blocks covered.
    pub data_blocks: u64,
    /// Byte offset in the partition where `hash_area` starts.
    pub hash_offset: u64,
    pub salt: [u8; SALT_LEN],
    pub root_hash: [u8; DIGEST],
}

impl VerityTree {
    pub fn root_hash_hex(&self) -> String {
        hex(&self.root_hash)
    }

    pub fn salt_hex(&self) -> String {
        hex(&self.salt)
    }

    /// The dm table parameters after `verity` (REFERENCE.md §4.3), with
    /// `dev` standing for the partition that holds both data and hash area.
    pub fn table_params(&self, dev: &str) -> String {
        format!(
            "1 {dev} {dev} {BLOCK} {BLOCK} {} {} sha256 {} {}",
            self.data_blocks,
            self.hash_offset / BLOCK as u64 + 1,
            self.root_hash_hex(),
            self.salt_hex()
        )
    }
}

impl VerityTree {
    /// The slot's kernel command line keys (docs/boot-protocol.md, "dm-verity").
    pub fn cmdline(&self) -> String {
        format!(
            "{}={} {}={}",
            basalt_init::slot::CMDLINE_VERITY,
            self.root_hash_hex(),
            basalt_init::slot::CMDLINE_VERITY_DATA_BLOCKS,
            self.data_blocks
        )
    }

    /// The root partition's content: `data` zero-padded to `hash_offset`,
    /// then the hash area.
    pub fn partition_content(&self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.hash_offset as usize + self.hash_area.len());
        out.extend_from_slice(data);
        out.resize(self.hash_offset as usize, 0);
        out.extend_from_slice(&self.hash_area);
        out
    }
}

/// Label mixed into every root's salt. It names no slot: the same root
/// payload (squashfs + tree) is valid in `root-a` and `root-b`, so one update
/// bundle installs into either slot (docs/boot-protocol.md, "dm-verity").
pub const ROOT_SALT_LABEL: &str = "root";

/// Build the tree for a slot's root filesystem with a salt and superblock
/// UUID derived from the data alone (same inputs, same bytes; slot-independent).
pub fn for_root(data: &[u8]) -> VerityTree {
    let salt = derive_salt(ROOT_SALT_LABEL, data);
    let mut h = Sha256::new();
    h.update(b"basalt verity uuid\0");
    h.update(salt);
    let d: [u8; 32] = h.finalize().into();
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&d[..16]);
    // RFC 4122 version 4 / variant bits, as veritysetup prints UUIDs.
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    build(data, salt, uuid)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Derive a salt that differs between builds with different inputs and is
/// identical for identical inputs: sha256 over a label and the data itself.
pub fn derive_salt(label: &str, data: &[u8]) -> [u8; SALT_LEN] {
    let mut h = Sha256::new();
    h.update(b"basalt verity salt\0");
    h.update(label.as_bytes());
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

fn salted(salt: &[u8], block: &[u8]) -> [u8; DIGEST] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// Hash `data` (zero-padded to a whole block) and build the hash area that
/// starts at the first `BLOCK` boundary at or after `data.len()`.
pub fn build(data: &[u8], salt: [u8; SALT_LEN], uuid: [u8; 16]) -> VerityTree {
    let data_blocks = data.len().div_ceil(BLOCK).max(1);
    let hash_offset = (data_blocks * BLOCK) as u64;

    // Level 0: one digest per data block.
    let mut level: Vec<u8> = Vec::with_capacity(data_blocks.div_ceil(HASHES_PER_BLOCK) * BLOCK);
    for i in 0..data_blocks {
        let start = (i * BLOCK).min(data.len());
        let end = (start + BLOCK).min(data.len());
        if end - start == BLOCK {
            level.extend_from_slice(&salted(&salt, &data[start..end]));
        } else {
            // The last, partial block is hashed zero-padded (the partition reads as such).
            let mut padded = [0u8; BLOCK];
            padded[..end - start].copy_from_slice(&data[start..end]);
            level.extend_from_slice(&salted(&salt, &padded));
        }
    }
    pad_to_block(&mut level);

    // Higher levels until one block remains; stored top first.
    let mut levels = vec![level];
    while levels.last().map(|l| l.len() > BLOCK).unwrap_or(false) {
        let below = levels.last().map(Vec::as_slice).unwrap_or(&[]);
        let mut up = Vec::with_capacity(below.len() / HASHES_PER_BLOCK + BLOCK);
        for block in below.chunks(BLOCK) {
            up.extend_from_slice(&salted(&salt, block));
        }
        pad_to_block(&mut up);
        levels.push(up);
    }
    let top = levels.last().map(Vec::as_slice).unwrap_or(&[]);
    let root_hash = salted(&salt, top);

    let mut hash_area = superblock(data_blocks as u64, &salt, uuid);
    for l in levels.iter().rev() {
        hash_area.extend_from_slice(l);
    }
    VerityTree {
        hash_area,
        data_blocks: data_blocks as u64,
        hash_offset,
        salt,
        root_hash,
    }
}

fn pad_to_block(v: &mut Vec<u8>) {
    let len = v.len().div_ceil(BLOCK).max(1) * BLOCK;
    v.resize(len, 0);
}

/// veritysetup superblock (REFERENCE.md §4.1), padded to one hash block.
fn superblock(data_blocks: u64, salt: &[u8; SALT_LEN], uuid: [u8; 16]) -> Vec<u8> {
    let mut sb = vec![0u8; BLOCK];
    sb[0..8].copy_from_slice(b"verity\0\0");
    sb[8..12].copy_from_slice(&1u32.to_le_bytes());
    sb[12..16].copy_from_slice(&1u32.to_le_bytes());
    sb[16..32].copy_from_slice(&uuid);
    sb[32..38].copy_from_slice(b"sha256");
    sb[64..68].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    sb[68..72].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    sb[72..80].copy_from_slice(&data_blocks.to_le_bytes());
    sb[80..82].copy_from_slice(&(SALT_LEN as u16).to_le_bytes());
    sb[88..88 + SALT_LEN].copy_from_slice(salt);
    sb
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn levels_and_sizes() {
        // 1 block: one level-0 block, superblock + 1 hash block.
        let t = build(&sample(10), [1; 32], [0; 16]);
        assert_eq!(t.data_blocks, 1);
        assert_eq!(t.hash_offset, 4096);
        assert_eq!(t.hash_area.len(), 2 * BLOCK);
        // 129 blocks: level 0 has 2 blocks, level 1 has 1.
        let t = build(&sample(129 * BLOCK), [1; 32], [0; 16]);
        assert_eq!(t.hash_area.len(), (1 + 1 + 2) * BLOCK);
        // The root is the salted hash of the top block, stored right after the superblock.
        assert_eq!(t.root_hash, salted(&t.salt, &t.hash_area[BLOCK..2 * BLOCK]));
    }

    #[test]
    fn root_tree_is_slot_independent_and_reproducible() {
        let data = sample(3 * BLOCK + 5);
        let t = for_root(&data);
        assert_eq!(t, for_root(&data));
        assert_eq!(t.salt, derive_salt("root", &data));
        assert_ne!(t.salt, derive_salt("root-a", &data));
    }

    #[test]
    fn salt_is_reproducible_and_input_dependent() {
        assert_eq!(derive_salt("root-a", b"x"), derive_salt("root-a", b"x"));
        assert_ne!(derive_salt("root-a", b"x"), derive_salt("root-a", b"y"));
    }

    /// The standard tool accepts our tree, and rejects it after one flipped data bit.
    #[test]
    fn veritysetup_verifies() {
        if Command::new("veritysetup")
            .arg("--version")
            .output()
            .is_err()
        {
            panic!("veritysetup (cryptsetup-bin) is required for this test");
        }
        let dir = std::env::temp_dir().join(format!("basalt-verity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let part = dir.join("part");
        for len in [5000usize, 300 * BLOCK + 17, 128 * 128 * BLOCK + BLOCK] {
            let data = sample(len);
            let t = build(&data, derive_salt("t", &data), [7; 16]);
            let mut img = data.clone();
            img.resize(t.hash_offset as usize, 0);
            img.extend_from_slice(&t.hash_area);
            std::fs::write(&part, &img).unwrap();
            let verify = |root: &str| {
                Command::new("veritysetup")
                    .arg("verify")
                    .arg(&part)
                    .arg(&part)
                    .arg(root)
                    .arg(format!("--hash-offset={}", t.hash_offset))
                    .output()
                    .unwrap()
            };
            let ok = verify(&t.root_hash_hex());
            assert!(
                ok.status.success(),
                "len {len}: {}",
                String::from_utf8_lossy(&ok.stderr)
            );
            img[len / 2] ^= 1;
            std::fs::write(&part, &img).unwrap();
            assert!(
                !verify(&t.root_hash_hex()).status.success(),
                "len {len}: corruption accepted"
            );
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
