//! Disk images as plain files, edited and inspected with independent tools:
//! `sfdisk -J` for the partition table, mtools (`-i disk.img@@<offset>`) for
//! the ESP, e2fsprogs (`file?offset=N`) for the data partition, `truncate` to
//! grow the file. No loop devices, no mounting, no root.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("running {tool} on {image}: {source} (is it installed?)")]
    Spawn {
        tool: &'static str,
        image: PathBuf,
        source: std::io::Error,
    },
    #[error("{tool} failed on {image}: {status}\n{stderr}")]
    Failed {
        tool: &'static str,
        image: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("sfdisk -J output for {image} is not what was expected: {source}")]
    Json {
        image: PathBuf,
        source: serde_json::Error,
    },
    #[error("{image} has no partition named {name:?}")]
    NoPartition { image: PathBuf, name: String },
    #[error("{tool} output for {image} lacks {what}")]
    Parse {
        tool: &'static str,
        image: PathBuf,
        what: &'static str,
    },
}

/// The output of `sfdisk -J`.
#[derive(Debug, Clone, Deserialize)]
pub struct PartitionTable {
    pub label: String,
    /// The disk GUID (GPT) or disk identifier (MBR), sfdisk's `label-id`.
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub firstlba: u64,
    #[serde(default)]
    pub lastlba: u64,
    #[serde(default = "default_sector")]
    pub sectorsize: u64,
    #[serde(default)]
    pub partitions: Vec<Partition>,
}

fn default_sector() -> u64 {
    512
}

#[derive(Debug, Clone, Deserialize)]
pub struct Partition {
    pub node: String,
    pub start: u64,
    pub size: u64,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub uuid: Option<String>,
}

#[derive(Deserialize)]
struct SfdiskJson {
    partitiontable: PartitionTable,
}

impl PartitionTable {
    pub fn by_name(&self, name: &str) -> Option<&Partition> {
        self.partitions
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
    }

    /// Byte offset of a partition.
    pub fn offset(&self, p: &Partition) -> u64 {
        p.start * self.sectorsize
    }
}

fn run(tool: &'static str, image: &Path, cmd: &mut Command) -> Result<Vec<u8>, DiskError> {
    let out = cmd
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .map_err(|source| DiskError::Spawn {
            tool,
            image: image.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(DiskError::Failed {
            tool,
            image: image.to_path_buf(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(out.stdout)
}

/// The partition table as `sfdisk -J` reads it.
pub fn partition_table(image: &Path) -> Result<PartitionTable, DiskError> {
    let out = run("sfdisk", image, Command::new("sfdisk").arg("-J").arg(image))?;
    let parsed: SfdiskJson = serde_json::from_slice(&out).map_err(|source| DiskError::Json {
        image: image.to_path_buf(),
        source,
    })?;
    Ok(parsed.partitiontable)
}

/// The byte offset of the partition named `name`.
pub fn partition_offset(image: &Path, name: &str) -> Result<u64, DiskError> {
    let table = partition_table(image)?;
    let p = table.by_name(name).ok_or_else(|| DiskError::NoPartition {
        image: image.to_path_buf(),
        name: name.to_string(),
    })?;
    Ok(table.offset(p))
}

fn esp_spec(image: &Path) -> Result<String, DiskError> {
    let offset = partition_offset(image, "esp")?;
    Ok(format!("{}@@{offset}", image.display()))
}

/// Copies `local` onto the ESP as `dest` (e.g. `node.toml`), replacing it.
pub fn put_on_esp(image: &Path, local: &Path, dest: &str) -> Result<(), DiskError> {
    let spec = esp_spec(image)?;
    run(
        "mcopy",
        image,
        Command::new("mcopy")
            .args(["-o", "-i", &spec])
            .arg(local)
            .arg(format!("::/{dest}")),
    )?;
    Ok(())
}

/// Creates directories on the ESP, parents first (`mmd`); existing ones are kept.
pub fn mkdirs_on_esp(image: &Path, dir: &str) -> Result<(), DiskError> {
    let spec = esp_spec(image)?;
    let mut path = String::new();
    for part in dir.split('/').filter(|p| !p.is_empty()) {
        path.push('/');
        path.push_str(part);
        let exists = Command::new("mdir")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-b", "-i", &spec])
            .arg(format!("::{path}"))
            .output()
            .is_ok_and(|o| o.status.success());
        if !exists {
            run(
                "mmd",
                image,
                Command::new("mmd")
                    .args(["-i", &spec])
                    .arg(format!("::{path}")),
            )?;
        }
    }
    Ok(())
}

/// Writes `content` to the ESP as `dest`.
pub fn write_on_esp(image: &Path, dest: &str, content: &str) -> Result<(), DiskError> {
    let tmp = image.with_extension(format!("esp-{}", dest.replace('/', "_")));
    std::fs::write(&tmp, content).map_err(|source| DiskError::Spawn {
        tool: "write",
        image: tmp.clone(),
        source,
    })?;
    let r = put_on_esp(image, &tmp, dest);
    let _ = std::fs::remove_file(&tmp);
    r
}

/// Reads a file from the ESP.
pub fn read_from_esp(image: &Path, path: &str) -> Result<String, DiskError> {
    let spec = esp_spec(image)?;
    let out = run(
        "mcopy",
        image,
        Command::new("mcopy")
            .args(["-n", "-i", &spec])
            .arg(format!("::/{path}"))
            .arg("-"),
    )?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Copies a file from the ESP to `local`, bytes as they are.
pub fn copy_from_esp(image: &Path, path: &str, local: &Path) -> Result<(), DiskError> {
    let spec = esp_spec(image)?;
    run(
        "mcopy",
        image,
        Command::new("mcopy")
            .args(["-o", "-n", "-i", &spec])
            .arg(format!("::/{path}"))
            .arg(local),
    )?;
    Ok(())
}

/// Lists a directory of the ESP (`mdir -b`: one path per line).
pub fn list_esp(image: &Path, dir: &str) -> Result<Vec<String>, DiskError> {
    let spec = esp_spec(image)?;
    let out = run(
        "mdir",
        image,
        Command::new("mdir")
            .args(["-b", "-i", &spec])
            .arg(format!("::/{dir}")),
    )?;
    Ok(String::from_utf8_lossy(&out)
        .lines()
        .map(str::to_string)
        .collect())
}

/// Grows (or shrinks) the image file to `bytes` (`truncate -s`; sparse).
pub fn set_size(image: &Path, bytes: u64) -> Result<(), DiskError> {
    run(
        "truncate",
        image,
        Command::new("truncate")
            .args(["-s", &bytes.to_string()])
            .arg(image),
    )?;
    Ok(())
}

/// Copies a disk image keeping it sparse (`cp --sparse=always`): a plain
/// copy writes every zero of a 2 GiB SD card image, and a suite of such
/// copies fills a CI disk.
pub fn copy_sparse(from: &Path, to: &Path) -> Result<(), DiskError> {
    run(
        "cp",
        from,
        Command::new("cp")
            .arg("--sparse=always")
            .arg("--")
            .arg(from)
            .arg(to),
    )?;
    Ok(())
}

/// Facts from the superblock of the ext4 at `offset` (`dumpe2fs -h`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext4Facts {
    pub block_count: u64,
    pub block_size: u64,
    pub inode_count: u64,
    pub inode_size: u64,
    pub volume_name: String,
    /// "Filesystem features:", space-separated.
    pub features: String,
}

impl Ext4Facts {
    pub fn bytes(&self) -> u64 {
        self.block_count * self.block_size
    }
}

fn e2fs_spec(image: &Path, offset: u64) -> String {
    format!("{}?offset={offset}", image.display())
}

/// Reads the ext4 superblock of the partition named `name`.
pub fn ext4_facts(image: &Path, name: &str) -> Result<Ext4Facts, DiskError> {
    let offset = partition_offset(image, name)?;
    let out = run(
        "dumpe2fs",
        image,
        Command::new("dumpe2fs")
            .arg("-h")
            .arg(e2fs_spec(image, offset)),
    )?;
    let text = String::from_utf8_lossy(&out);
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
    };
    let num = |key: &str, what| {
        field(key)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or(DiskError::Parse {
                tool: "dumpe2fs",
                image: image.to_path_buf(),
                what,
            })
    };
    Ok(Ext4Facts {
        block_count: num("Block count:", "Block count")?,
        block_size: num("Block size:", "Block size")?,
        inode_count: num("Inode count:", "Inode count")?,
        inode_size: num("Inode size:", "Inode size")?,
        volume_name: field("Filesystem volume name:").unwrap_or_default(),
        features: field("Filesystem features:").unwrap_or_default(),
    })
}

/// Reads a file from the ext4 partition named `name` (`debugfs -R cat`); the
/// path is relative to that filesystem's root (`/var/x` on the device is `/x`).
pub fn read_from_ext4(image: &Path, name: &str, path: &str) -> Result<Vec<u8>, DiskError> {
    let offset = partition_offset(image, name)?;
    run(
        "debugfs",
        image,
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat {path}"))
            .arg(e2fs_spec(image, offset)),
    )
}

/// Checks the ext4 of partition `name` read-only (`e2fsck -fn`).
pub fn fsck_ext4(image: &Path, name: &str) -> Result<(), DiskError> {
    let offset = partition_offset(image, name)?;
    run(
        "e2fsck",
        image,
        Command::new("e2fsck")
            .arg("-fn")
            .arg(e2fs_spec(image, offset)),
    )?;
    Ok(())
}

/// Lists the squashfs in partition `name` (`unsquashfs -o <offset> -lc`):
/// one absolute path per file or empty directory.
pub fn squashfs_list(image: &Path, name: &str) -> Result<Vec<String>, DiskError> {
    let offset = partition_offset(image, name)?;
    let out = run(
        "unsquashfs",
        image,
        Command::new("unsquashfs")
            .args(["-o", &offset.to_string(), "-lc", "-d", ""])
            .arg(image),
    )?;
    Ok(String::from_utf8_lossy(&out)
        .lines()
        .filter(|l| l.starts_with('/'))
        .map(str::to_string)
        .collect())
}

/// Reads one file from the squashfs in partition `name` (`unsquashfs -cat`).
pub fn squashfs_cat(image: &Path, name: &str, path: &str) -> Result<Vec<u8>, DiskError> {
    let offset = partition_offset(image, name)?;
    run(
        "unsquashfs",
        image,
        Command::new("unsquashfs")
            .args(["-o", &offset.to_string(), "-cat"])
            .arg(image)
            .arg(path),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn ok(cmd: &mut Command) {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{cmd:?}: {out:?}");
    }

    /// Builds a small GPT disk with sfdisk, mkfs.vfat, mksquashfs, dd and
    /// mkfs.ext4 (as a shell pipeline would) and checks the helpers against it.
    #[test]
    fn helpers_work_on_a_plain_file() {
        let dir = std::env::temp_dir().join(format!("basalt-disk-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("d.img");
        set_size(&img, 64 << 20).unwrap();
        let mut sf = Command::new("sfdisk")
            .arg("-q")
            .arg(&img)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        sf.stdin
            .take()
            .unwrap()
            .write_all(
                b"label: gpt\nsize=16M, type=U, name=esp\nsize=8M, type=L, name=root-a\ntype=L, name=data\n",
            )
            .unwrap();
        assert!(sf.wait().unwrap().success());
        let table = partition_table(&img).unwrap();
        assert_eq!(table.label, "gpt");
        let esp = table.by_name("esp").unwrap();
        assert_eq!(table.offset(esp), 1 << 20);

        ok(Command::new("mkfs.vfat")
            .args(["--offset", &esp.start.to_string()])
            .arg(&img)
            .arg((esp.size / 2).to_string()));
        write_on_esp(&img, "node.toml", "hostname = \"n1\"\n").unwrap();
        mkdirs_on_esp(&img, "loader/entries").unwrap();
        mkdirs_on_esp(&img, "loader/entries").unwrap();
        write_on_esp(&img, "loader/entries/a.conf", "title a\n").unwrap();
        assert_eq!(
            list_esp(&img, "loader/entries").unwrap().len(),
            1,
            "{:?}",
            list_esp(&img, "loader/entries")
        );
        assert_eq!(
            read_from_esp(&img, "node.toml").unwrap(),
            "hostname = \"n1\"\n"
        );
        assert!(
            list_esp(&img, "")
                .unwrap()
                .iter()
                .any(|l| l.to_lowercase().contains("node.toml"))
        );

        let tree = dir.join("tree");
        std::fs::create_dir_all(tree.join("etc/basalt")).unwrap();
        std::fs::write(tree.join("etc/basalt/image.toml"), "board = \"x86_64\"\n").unwrap();
        let sq = dir.join("root.sqfs");
        ok(Command::new("mksquashfs").arg(&tree).arg(&sq).args([
            "-quiet",
            "-no-progress",
            "-all-root",
        ]));
        let root_off = partition_offset(&img, "root-a").unwrap();
        ok(Command::new("dd")
            .arg(format!("if={}", sq.display()))
            .arg(format!("of={}", img.display()))
            .args(["conv=notrunc", "oflag=seek_bytes"])
            .arg(format!("seek={root_off}")));
        assert!(
            squashfs_list(&img, "root-a")
                .unwrap()
                .contains(&"/etc/basalt/image.toml".to_string())
        );
        assert_eq!(
            squashfs_cat(&img, "root-a", "etc/basalt/image.toml").unwrap(),
            b"board = \"x86_64\"\n"
        );

        let data_off = partition_offset(&img, "data").unwrap();
        ok(Command::new("mkfs.ext4")
            .args([
                "-q",
                "-L",
                "basalt-data",
                "-E",
                &format!("offset={data_off}"),
            ])
            .arg(&img)
            .arg("8M"));
        let facts = ext4_facts(&img, "data").unwrap();
        assert_eq!(facts.bytes(), 8 << 20);
        assert_eq!(facts.volume_name, "basalt-data");
        fsck_ext4(&img, "data").unwrap();
        assert!(
            read_from_ext4(&img, "data", "/nonexistent")
                .unwrap()
                .is_empty()
        );
        assert!(matches!(
            partition_offset(&img, "root-b"),
            Err(DiskError::NoPartition { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
