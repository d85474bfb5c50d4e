//! Writing and signing update bundles (format: `basalt_init::bundle`).
//!
//! Keys are minisign's (Ed25519): `basalt keygen <prefix>` writes
//! `<prefix>.key` (unencrypted secret key, keep it offline) and `<prefix>.pub`.
//! The manifest is signed prehashed ("ED"), so `minisign -V` verifies it.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use basalt_init::bundle::{self, Head, Manifest, Payload, PayloadPart};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum BundleWriteError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("signing the manifest: {0}")]
    Sign(String),
    #[error("{0} already exists: refusing to overwrite a key")]
    Exists(PathBuf),
    #[error(transparent)]
    Build(#[from] Box<crate::build::BuildError>),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BundleWriteError {
    let path = path.to_path_buf();
    move |source| BundleWriteError::Io { what, path, source }
}

/// `basalt keygen <prefix>`: write `<prefix>.key` and `<prefix>.pub`.
pub fn keygen(prefix: &Path) -> Result<(PathBuf, PathBuf), BundleWriteError> {
    let key = prefix.with_extension("key");
    let pubkey = prefix.with_extension("pub");
    for p in [&key, &pubkey] {
        if p.exists() {
            return Err(BundleWriteError::Exists(p.clone()));
        }
    }
    let kp = minisign::KeyPair::generate_unencrypted_keypair()
        .map_err(|e| BundleWriteError::Sign(e.to_string()))?;
    let sk_box = kp
        .sk
        .to_box(Some("basalt bundle signing key"))
        .map_err(|e| BundleWriteError::Sign(e.to_string()))?;
    let pk_box = kp
        .pk
        .to_box()
        .map_err(|e| BundleWriteError::Sign(e.to_string()))?;
    write_private(&key, sk_box.to_string().as_bytes())?;
    std::fs::write(&pubkey, pk_box.to_string()).map_err(io("writing public key", &pubkey))?;
    Ok((key, pubkey))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), BundleWriteError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io("writing secret key", path))?;
    f.write_all(bytes).map_err(io("writing secret key", path))
}

/// Sign `manifest_text` with the secret key file at `key`.
pub fn sign(
    manifest_text: &str,
    key: &Path,
    trusted_comment: &str,
) -> Result<Head, BundleWriteError> {
    let text = std::fs::read_to_string(key).map_err(io("reading secret key", key))?;
    let sk_box = minisign::SecretKeyBox::from_string(&text).map_err(|e| BundleWriteError::Key {
        path: key.into(),
        message: e.to_string(),
    })?;
    let sk = sk_box
        .into_unencrypted_secret_key()
        .map_err(|e| BundleWriteError::Key {
            path: key.into(),
            message: e.to_string(),
        })?;
    let sig = minisign::sign(
        None,
        &sk,
        manifest_text.as_bytes(),
        Some(trusted_comment),
        None,
    )
    .map_err(|e| BundleWriteError::Sign(e.to_string()))?;
    // Take the raw bytes back out of minisign's text form.
    let s = sig.into_string();
    let lines: Vec<&str> = s.lines().collect();
    let (Some(sig_line), Some(global_line)) = (lines.get(1), lines.get(3)) else {
        return Err(BundleWriteError::Sign("unexpected signature text".into()));
    };
    let raw = bundle::unbase64(sig_line).unwrap_or_default();
    let global = bundle::unbase64(global_line).unwrap_or_default();
    if raw.len() != 74 || global.len() != 64 || &raw[..2] != b"ED" {
        return Err(BundleWriteError::Sign(
            "unexpected signature encoding".into(),
        ));
    }
    let mut signature = [0u8; 138];
    signature[..74].copy_from_slice(&raw);
    signature[74..].copy_from_slice(&global);
    Ok(Head {
        manifest_text: manifest_text.to_string(),
        trusted_comment: trusted_comment.to_string(),
        signature,
    })
}

/// One payload to put in a bundle: its part and the host file holding it.
#[derive(Debug, Clone)]
pub struct PayloadSource {
    pub part: PayloadPart,
    pub path: PathBuf,
    pub verity_root_hash: Option<String>,
    pub verity_hash_offset: Option<u64>,
}

fn sha256_file(path: &Path) -> Result<(u64, String), BundleWriteError> {
    let mut f = File::open(path).map_err(io("reading payload", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io("reading payload", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, crate::verity::hex(&h.finalize())))
}

/// Write a signed bundle to `out`.
pub fn write(
    os_version: &str,
    board: &str,
    compatible_from: Vec<String>,
    payloads: &[PayloadSource],
    key: &Path,
    out: &Path,
) -> Result<Manifest, BundleWriteError> {
    let mut manifest = Manifest {
        format: bundle::FORMAT_VERSION,
        os_version: os_version.to_string(),
        board: board.to_string(),
        compatible_from,
        payloads: Vec::new(),
    };
    for p in payloads {
        let (size, sha256) = sha256_file(&p.path)?;
        manifest.payloads.push(Payload {
            part: p.part,
            size,
            sha256,
            verity_root_hash: p.verity_root_hash.clone(),
            verity_hash_offset: p.verity_hash_offset,
        });
    }
    let text = manifest.to_toml();
    let comment = format!("basalt bundle {board} {os_version}");
    let head = sign(&text, key, &comment)?;
    let tmp = out.with_extension("partial");
    let f = File::create(&tmp).map_err(io("writing bundle", &tmp))?;
    let mut w = BufWriter::new(f);
    w.write_all(&head.to_bytes())
        .map_err(io("writing bundle", &tmp))?;
    for p in payloads {
        let mut f = File::open(&p.path).map_err(io("reading payload", &p.path))?;
        std::io::copy(&mut f, &mut w).map_err(io("writing bundle", &tmp))?;
    }
    w.flush().map_err(io("writing bundle", &tmp))?;
    drop(w);
    std::fs::rename(&tmp, out).map_err(io("writing bundle", out))?;
    Ok(manifest)
}

/// Put the image definition's `[update] public_keys` into the root as
/// `/etc/basalt/update-keys/<name>.pub` (the keys the node trusts for bundles).
pub fn add_update_keys(
    tree: &mut basalt_rootfs::tree::Tree,
    keys: &[PathBuf],
    epoch: u64,
) -> Result<(), crate::root::RootError> {
    use basalt_rootfs::tree::{Entry, FileData};
    if keys.is_empty() {
        return Ok(());
    }
    let rel = basalt_init::update::device::KEY_DIR.trim_start_matches('/');
    let mut d = Entry::dir(0o755);
    d.mtime = epoch;
    let _ = tree.insert(rel, d);
    for k in keys {
        let text = std::fs::read_to_string(k).map_err(|err| crate::root::RootError::Read {
            what: "an update public key (update.public_keys)",
            path: k.clone(),
            err,
        })?;
        if bundle::pk_key_id(&text).is_none() {
            return Err(crate::root::RootError::Read {
                what: "an update public key (update.public_keys)",
                path: k.clone(),
                err: std::io::Error::other("not a minisign public key"),
            });
        }
        let name = k
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "key".into());
        let mut e = Entry::file(
            FileData::Bytes(std::sync::Arc::new(text.into_bytes())),
            0o644,
        );
        e.mtime = epoch;
        tree.insert(format!("{rel}/{name}.pub"), e).map_err(|err| {
            crate::root::RootError::Tree {
                what: format!("{rel}/{name}.pub"),
                err,
            }
        })?;
    }
    Ok(())
}

/// Raspberry Pi boards: `boot-fat-a`, `boot-fat-b` (the slot boot FAT for
/// either target slot, since `cmdline.txt` names the slot), then `root`.
fn pi_bundle(
    slot: &crate::build::SlotContent,
    key: &Path,
    out: &Path,
    root: &Path,
) -> Result<Manifest, BundleWriteError> {
    use basalt_init::slot::Slot;
    let fat_a = out.with_extension("boot-fat-a.partial");
    let fat_b = out.with_extension("boot-fat-b.partial");
    let result = (|| {
        slot.pi_boot_fat(Slot::A, &fat_a).map_err(Box::new)?;
        slot.pi_boot_fat(Slot::B, &fat_b).map_err(Box::new)?;
        std::fs::write(root, &slot.rootfs).map_err(io("writing the root payload", root))?;
        let plain = |part, path: &Path| PayloadSource {
            part,
            path: path.to_path_buf(),
            verity_root_hash: None,
            verity_hash_offset: None,
        };
        write(
            &slot.def.os_version,
            &slot.board.name,
            slot.def.update.compatible_from.clone(),
            &[
                plain(PayloadPart::BootFatA, &fat_a),
                plain(PayloadPart::BootFatB, &fat_b),
                PayloadSource {
                    part: PayloadPart::Root,
                    path: root.to_path_buf(),
                    verity_root_hash: Some(slot.verity.root_hash_hex()),
                    verity_hash_offset: Some(slot.verity.hash_offset),
                },
            ],
            key,
            out,
        )
    })();
    for p in [&fat_a, &fat_b, root] {
        let _ = std::fs::remove_file(p);
    }
    result
}

/// `basalt bundle <image.toml> --key <k> --out <file>`: build the slot's
/// content with `basalt build`'s pipeline and write a signed bundle of it:
/// `boot` (x86_64: a tar of the kernel, initramfs and loader entry options,
/// `basalt_init::update::boottar`) then `root` (squashfs + verity tree, raw).
pub fn build_bundle(
    opts: &crate::build::BuildOptions,
    key: &Path,
    out: &Path,
) -> Result<Manifest, BundleWriteError> {
    use crate::board::PartitionTable;
    let slot = crate::build::slot_content(opts).map_err(Box::new)?;
    let root = out.with_extension("root.partial");
    if slot.board.partition_table == PartitionTable::Mbr {
        return pi_bundle(&slot, key, out, &root);
    }
    let boot = out.with_extension("boot.partial");
    let result = (|| {
        let mut tar = Vec::new();
        basalt_init::update::boottar::write(
            &mut tar,
            &slot.kernel,
            &slot.initramfs,
            &slot.cmdline(),
            slot.epoch,
        )
        .map_err(io("writing the boot payload", &boot))?;
        std::fs::write(&boot, &tar).map_err(io("writing the boot payload", &boot))?;
        std::fs::write(&root, &slot.rootfs).map_err(io("writing the root payload", &root))?;
        write(
            &slot.def.os_version,
            &slot.board.name,
            slot.def.update.compatible_from.clone(),
            &[
                PayloadSource {
                    part: PayloadPart::Boot,
                    path: boot.clone(),
                    verity_root_hash: None,
                    verity_hash_offset: None,
                },
                PayloadSource {
                    part: PayloadPart::Root,
                    path: root.clone(),
                    verity_root_hash: Some(slot.verity.root_hash_hex()),
                    verity_hash_offset: Some(slot.verity.hash_offset),
                },
            ],
            key,
            out,
        )
    })();
    let _ = std::fs::remove_file(&boot);
    let _ = std::fs::remove_file(&root);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_init::bundle::{BundleError, verify_stream};
    use std::process::Command;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("basalt-bundle-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn make(d: &Path) -> (PathBuf, String, Vec<u8>) {
        let (key, pubkey) = keygen(&d.join("test")).unwrap();
        std::fs::write(d.join("boot.tar"), vec![7u8; 3000]).unwrap();
        std::fs::write(
            d.join("root.img"),
            (0..20000u32).map(|i| i as u8).collect::<Vec<_>>(),
        )
        .unwrap();
        let out = d.join("b.bundle");
        write(
            "0.2.0",
            "x86_64",
            vec!["0.1.0".into()],
            &[
                PayloadSource {
                    part: PayloadPart::Boot,
                    path: d.join("boot.tar"),
                    verity_root_hash: None,
                    verity_hash_offset: None,
                },
                PayloadSource {
                    part: PayloadPart::Root,
                    path: d.join("root.img"),
                    verity_root_hash: Some("ab".repeat(32)),
                    verity_hash_offset: Some(16384),
                },
            ],
            &key,
            &out,
        )
        .unwrap();
        (
            out,
            std::fs::read_to_string(pubkey).unwrap(),
            std::fs::read(d.join("b.bundle")).unwrap(),
        )
    }

    #[test]
    fn round_trip_and_every_flipped_bit_rejected() {
        let d = dir("flip");
        let (_, pubkey, bytes) = make(&d);
        let trusted = vec![pubkey];
        let m = verify_stream(&mut &bytes[..], &trusted).unwrap();
        assert_eq!(m.payloads.len(), 2);
        // Flip one bit in every byte of the head and a stride of payload bytes.
        let head_len = bytes.len() - 3000 - 20000;
        let positions = (0..head_len).chain((head_len..bytes.len()).step_by(97));
        for i in positions {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(
                verify_stream(&mut &b[..], &trusted).is_err(),
                "flip at {i} accepted"
            );
        }
        // Truncation anywhere, and trailing garbage.
        for cut in [1, 100, 3000, bytes.len() - 1] {
            assert!(
                verify_stream(&mut &bytes[..cut], &trusted).is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            verify_stream(&mut &longer[..], &trusted),
            Err(BundleError::Trailing)
        ));
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn unknown_key_rejected() {
        let d = dir("key");
        let (_, _, bytes) = make(&d);
        let (_, other) = keygen(&d.join("other")).unwrap();
        let other = std::fs::read_to_string(other).unwrap();
        let r = verify_stream(&mut &bytes[..], &[other]);
        assert!(matches!(r, Err(BundleError::UnknownKey { .. })), "{r:?}");
        assert!(keygen(&d.join("other")).is_err(), "keygen overwrote a key");
        std::fs::remove_dir_all(&d).ok();
    }

    /// The standard minisign tool verifies the manifest with our public key.
    #[test]
    fn minisign_tool_verifies_manifest() {
        let d = dir("tool");
        let (_, _, bytes) = make(&d);
        let head = Head::read(&mut &bytes[..]).unwrap();
        std::fs::write(d.join("manifest.toml"), &head.manifest_text).unwrap();
        std::fs::write(d.join("manifest.toml.minisig"), head.minisig()).unwrap();
        let st = Command::new("minisign")
            .arg("-V")
            .arg("-p")
            .arg(d.join("test.pub"))
            .arg("-m")
            .arg(d.join("manifest.toml"))
            .output()
            .expect("the minisign tool is required for this test");
        assert!(
            st.status.success(),
            "minisign: {}",
            String::from_utf8_lossy(&st.stderr)
        );
        std::fs::write(
            d.join("manifest.toml"),
            head.manifest_text.replace("0.2.0", "0.2.1"),
        )
        .unwrap();
        let st = Command::new("minisign")
            .arg("-V")
            .arg("-p")
            .arg(d.join("test.pub"))
            .arg("-m")
            .arg(d.join("manifest.toml"))
            .output()
            .unwrap();
        assert!(!st.status.success(), "minisign accepted a changed manifest");
        std::fs::remove_dir_all(&d).ok();
    }
}
