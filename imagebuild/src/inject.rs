//! `basalt config inject`: put a node config on the FAT partition the
//! firmware reads (the ESP on x86_64, partition 1 on a Raspberry Pi) of an
//! image file or a flashed device, without root and without mounting.
//!
//! The config is checked with the device's own parser before anything is
//! written; a config that would not parse on the node is never injected.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};

use basalt_init::slot::{ESP_PARTITION_NAME, NODE_CONFIG_FILE};

/// The files cloud-init NoCloud reads, in the order they are copied.
pub const CLOUD_INIT_FILES: [&str; 3] = ["meta-data", "user-data", "network-config"];

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no partition table (neither GPT nor MBR)")]
    NoTable { path: PathBuf },
    #[error("{path}: no config partition (GPT partition named `esp`, or MBR partition 1)")]
    NoConfigPartition { path: PathBuf },
    #[error("{path}: a cloud-init directory needs at least `user-data` or `meta-data`")]
    EmptyCloudInit { path: PathBuf },
    #[error("node config is invalid:\n{0}")]
    Invalid(String),
    #[error(
        "--hostname {0:?} is not a valid hostname (RFC 1123: letters, digits, '-', at most 63 per label)"
    )]
    Hostname(String),
    #[error("{0}")]
    Esp(#[from] crate::esp::EspError),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InjectError {
    let path = path.to_path_buf();
    move |source| InjectError::Io { what, path, source }
}

/// Byte range of the config FAT partition in a disk image or device.
pub fn config_partition(file: &mut File, path: &Path) -> Result<(u64, u64), InjectError> {
    let mut mbr = [0u8; 512];
    file.read_exact(&mut mbr)
        .map_err(io("reading the partition table of", path))?;
    if mbr[510..512] != [0x55, 0xAA] {
        return Err(InjectError::NoTable { path: path.into() });
    }
    // A protective MBR (type 0xEE) means GPT.
    if mbr[446 + 4] == 0xEE {
        let gpt =
            gptman::GPT::find_from(file).map_err(|_| InjectError::NoTable { path: path.into() })?;
        let ss = gpt.sector_size;
        for (_, p) in gpt.iter() {
            if p.is_used() && p.partition_name.as_str() == ESP_PARTITION_NAME {
                return Ok((
                    p.starting_lba * ss,
                    (p.ending_lba - p.starting_lba + 1) * ss,
                ));
            }
        }
        return Err(InjectError::NoConfigPartition { path: path.into() });
    }
    let e = &mbr[446..462];
    let start = u64::from(u32::from_le_bytes([e[8], e[9], e[10], e[11]]));
    let len = u64::from(u32::from_le_bytes([e[12], e[13], e[14], e[15]]));
    if start == 0 || len == 0 || ![0x0b, 0x0c, 0x0e, 0x06, 0x04, 0x01].contains(&e[4]) {
        return Err(InjectError::NoConfigPartition { path: path.into() });
    }
    Ok((start * 512, len * 512))
}

/// RFC 1123 host name check (labels of letters, digits and '-', ≤ 63, total ≤ 253).
pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The files to write: `(name on the FAT, content)`.
pub fn config_files(
    config: Option<&Path>,
    hostname: Option<&str>,
) -> Result<Vec<(String, Vec<u8>)>, InjectError> {
    if let Some(h) = hostname
        && !valid_hostname(h)
    {
        return Err(InjectError::Hostname(h.into()));
    }
    let mut files = Vec::new();
    match config {
        Some(p) if p.is_dir() => {
            for name in CLOUD_INIT_FILES {
                let f = p.join(name);
                if f.exists() {
                    files.push((
                        name.to_string(),
                        std::fs::read(&f).map_err(io("reading", &f))?,
                    ));
                }
            }
            if files.is_empty() {
                return Err(InjectError::EmptyCloudInit { path: p.into() });
            }
            if let Some(h) = hostname {
                set_meta_data_hostname(&mut files, h);
            }
        }
        Some(p) => {
            let mut text = std::fs::read_to_string(p).map_err(io("reading", p))?;
            if let Some(h) = hostname {
                text = set_toml_hostname(&text, h);
            }
            files.push((NODE_CONFIG_FILE.to_string(), text.into_bytes()));
        }
        None => {
            if let Some(h) = hostname {
                files.push((
                    NODE_CONFIG_FILE.to_string(),
                    format!("hostname = \"{h}\"\n").into_bytes(),
                ));
            }
        }
    }
    validate(&files, config.unwrap_or(Path::new(NODE_CONFIG_FILE)))?;
    Ok(files)
}

/// Replace (or add) the top-level `hostname` key, keeping the rest of the text as written.
fn set_toml_hostname(text: &str, h: &str) -> String {
    let mut out = String::new();
    let mut done = false;
    let mut in_table = false;
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with('[') {
            if !done {
                out.push_str(&format!("hostname = \"{h}\"\n"));
                done = true;
            }
            in_table = true;
        }
        if !in_table && (t.starts_with("hostname ") || t.starts_with("hostname=")) {
            if !done {
                out.push_str(&format!("hostname = \"{h}\"\n"));
                done = true;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if !done {
        out = format!("hostname = \"{h}\"\n{out}");
    }
    out
}

fn set_meta_data_hostname(files: &mut Vec<(String, Vec<u8>)>, h: &str) {
    let line = format!("local-hostname: {h}\n");
    match files.iter_mut().find(|(n, _)| n == "meta-data") {
        Some((_, data)) => {
            let text = String::from_utf8_lossy(data);
            let mut out: String = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("local-hostname:"))
                .map(|l| format!("{l}\n"))
                .collect();
            out.push_str(&line);
            *data = out.into_bytes();
        }
        None => files.insert(0, ("meta-data".into(), line.into_bytes())),
    }
}

/// Check the files that would land on the FAT with the device's own parser
/// (`basalt_init::nodeconfig`): what the node would refuse is refused here.
pub fn validate(files: &[(String, Vec<u8>)], origin: &Path) -> Result<(), InjectError> {
    use basalt_init::nodeconfig;
    let text = |name: &str| -> Result<Option<String>, InjectError> {
        match files.iter().find(|(n, _)| n == name) {
            None => Ok(None),
            Some((_, bytes)) => nodeconfig::text_of(&origin.join(name), bytes.clone())
                .map(Some)
                .map_err(|d| InjectError::Invalid(d.to_string())),
        }
    };
    let render = |diags: Vec<nodeconfig::Diagnostic>| {
        InjectError::Invalid(
            diags
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("\n"),
        )
    };
    if let Some(t) = text(NODE_CONFIG_FILE)? {
        let path = if origin.is_dir() {
            origin.join(NODE_CONFIG_FILE)
        } else {
            origin.to_path_buf()
        };
        nodeconfig::load_toml(&path, &t).map_err(render)?;
    }
    let (meta, user, network) = (
        text("meta-data")?,
        text("user-data")?,
        text("network-config")?,
    );
    if meta.is_some() || user.is_some() || network.is_some() {
        nodeconfig::parse_cloud_init(
            origin,
            &nodeconfig::CloudInitSources {
                meta_data: meta.as_deref(),
                user_data: user.as_deref(),
                network_config: network.as_deref(),
            },
        )
        .map_err(render)?;
    }
    Ok(())
}

/// Write `files` into the config partition of the image or device at `target`.
pub fn inject(target: &Path, files: &[(String, Vec<u8>)], epoch: u64) -> Result<(), InjectError> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(target)
        .map_err(io("opening", target))?;
    let (start, len) = config_partition(&mut f, target)?;
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    crate::esp::add_files(&f, start, len, &refs, epoch)?;
    f.sync_all().map_err(io("flushing", target))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GPT image with an ESP made by the builder; the injected files are
    /// read back with mtools and the FAT checked with fsck.vfat.
    #[test]
    fn inject_into_gpt_image_checked_by_mtools() {
        use crate::board::Partitions;
        use crate::disk::{Layout, create};
        use std::process::Command;
        let d = std::env::temp_dir().join(format!("basalt-inject-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let img = d.join("x.img");
        let layout = Layout::new(&Partitions {
            esp_mib: 40,
            config_mib: 0,
            boot_mib: 0,
            root_mib: 1,
            data_mib: 1,
        });
        let f = create(&img, &layout, b"seed").unwrap();
        crate::esp::format(&f, layout.esp().start, layout.esp().len, 0x1234, 0).unwrap();
        drop(f);
        let cfg = d.join("node.toml");
        std::fs::write(&cfg, "hostname = \"a\"\n[kubernetes]\nrole = \"server\"\n").unwrap();
        let files = config_files(Some(&cfg), Some("edge-7")).unwrap();
        inject(&img, &files, 1_700_000_000).unwrap();
        // Inject twice: the second replaces the first.
        inject(&img, &files, 1_700_000_000).unwrap();
        let at = format!("{}@@{}", img.display(), layout.esp().start);
        let out = Command::new("mtype")
            .args(["-i", &at, "::/node.toml"])
            .output()
            .expect("mtools");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hostname = \"edge-7\"\n[kubernetes]\nrole = \"server\"\n"
        );
        let esp = d.join("esp.fat");
        let data = std::fs::read(&img).unwrap();
        let (s, l) = (layout.esp().start as usize, layout.esp().len as usize);
        std::fs::write(&esp, &data[s..s + l]).unwrap();
        let st = Command::new("fsck.vfat")
            .arg("-n")
            .arg(&esp)
            .output()
            .expect("dosfstools");
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stdout)
        );
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn hostname_rules() {
        assert!(valid_hostname("node-1.example"));
        for bad in ["", "-a", "a-", "a_b", &"x".repeat(64), "a..b"] {
            assert!(!valid_hostname(bad), "{bad:?}");
        }
    }

    #[test]
    fn toml_hostname_replaced_top_level_only() {
        let t = "# c\nhostname = \"old\"\n[kubernetes]\nhostname = \"not-this\"\n";
        let out = set_toml_hostname(t, "new");
        assert_eq!(
            out,
            "# c\nhostname = \"new\"\n[kubernetes]\nhostname = \"not-this\"\n"
        );
        assert_eq!(
            set_toml_hostname("[a]\nx = 1\n", "n"),
            "hostname = \"n\"\n[a]\nx = 1\n"
        );
        assert_eq!(set_toml_hostname("", "n"), "hostname = \"n\"\n");
    }

    #[test]
    fn meta_data_hostname() {
        let mut f = vec![(
            "meta-data".to_string(),
            b"instance-id: i1\nlocal-hostname: a\n".to_vec(),
        )];
        set_meta_data_hostname(&mut f, "b");
        assert_eq!(f[0].1, b"instance-id: i1\nlocal-hostname: b\n");
    }
}
