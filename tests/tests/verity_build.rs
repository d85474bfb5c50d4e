//! dm-verity in the builder (issue 8, docs/boot-protocol.md "dm-verity"):
//! the test image's root-a holds the squashfs, then at the next 4 KiB
//! boundary a veritysetup superblock and hash tree whose root hash and data
//! block count are on slot a's loader entry. Checked with independent tools:
//! `dd` extracts the partition, `veritysetup verify` checks the tree, and
//! one flipped bit in the squashfs makes it fail.

use anyhow::{Context, Result, ensure};
use basalt_tests::{build, disk, repo_root, work_dir};
use std::process::Command;

const DEFINITION: &str = "tests/images/x86_64.toml";
const BLOCK: u64 = 4096;

fn verify(part: &std::path::Path, root: &str, hash_offset: u64) -> Result<std::process::Output> {
    Command::new("veritysetup")
        .arg("verify")
        .arg(part)
        .arg(part)
        .arg(root)
        .arg(format!("--hash-offset={hash_offset}"))
        .output()
        .context("running veritysetup (cryptsetup-bin)")
}

#[test]
fn root_a_carries_a_verity_tree_named_on_the_loader_entry() -> Result<()> {
    let dir = work_dir("verity_build")?;
    build::ensure_binaries(&dir)?;
    let img = build::build_image(&repo_root().join(DEFINITION), &dir.join("out"))?;

    let entry = disk::read_from_esp(&img, "loader/entries/basalt-a.conf")?;
    let options = entry
        .lines()
        .find_map(|l| l.strip_prefix("options "))
        .with_context(|| format!("no options line in the loader entry:\n{entry}"))?;
    let value = |key: &str| {
        options
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .with_context(|| format!("{key} missing from the loader entry options {options:?}"))
    };
    let root = value("basalt.verity")?;
    ensure!(
        root.len() == 64 && root.bytes().all(|b| b.is_ascii_hexdigit()),
        "basalt.verity={root}"
    );
    let blocks: u64 = value("basalt.verity_data_blocks")?.parse()?;
    let hash_offset = blocks * BLOCK;

    // root-a, extracted with dd.
    let table = disk::partition_table(&img)?;
    let p = table.by_name("root-a").context("no root-a")?;
    let part = dir.join("root-a.part");
    let st = Command::new("dd")
        .arg(format!("if={}", img.display()))
        .arg(format!("of={}", part.display()))
        .arg("bs=512")
        .arg("conv=sparse")
        .arg(format!("skip={}", p.start))
        .arg(format!("count={}", p.size))
        .arg("status=none")
        .status()?;
    ensure!(st.success(), "dd failed: {st}");
    let bytes = std::fs::read(&part)?;

    // The squashfs ends before the hash area, which starts on a block boundary.
    ensure!(
        &bytes[0..4] == b"hsqs",
        "root-a does not start with a squashfs"
    );
    let sq_used = u64::from_le_bytes(bytes[40..48].try_into()?);
    ensure!(
        sq_used <= hash_offset && hash_offset - sq_used < BLOCK,
        "squashfs uses {sq_used} bytes, hash area at {hash_offset}: not the first 4 KiB boundary"
    );
    let sb = &bytes[hash_offset as usize..hash_offset as usize + 512];
    ensure!(
        &sb[0..8] == b"verity\0\0",
        "no verity superblock at {hash_offset}"
    );
    ensure!(
        u64::from_le_bytes(sb[72..80].try_into()?) == blocks,
        "superblock data_blocks differs from the cmdline"
    );

    let ok = verify(&part, &root, hash_offset)?;
    ensure!(
        ok.status.success(),
        "veritysetup verify failed: {}",
        String::from_utf8_lossy(&ok.stderr)
    );

    // A wrong root hash and a flipped bit are both refused.
    let mut wrong = root.clone().into_bytes();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    ensure!(
        !verify(&part, std::str::from_utf8(&wrong)?, hash_offset)?
            .status
            .success(),
        "veritysetup accepted a wrong root hash"
    );
    let at = (sq_used / 2) as usize;
    {
        // In place, so the extracted partition stays sparse.
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&part)?;
        f.write_all_at(&[bytes[at] ^ 0x10], at as u64)?;
    }
    drop(bytes);
    ensure!(
        !verify(&part, &root, hash_offset)?.status.success(),
        "veritysetup accepted root-a with byte {at} flipped"
    );
    Ok(())
}
