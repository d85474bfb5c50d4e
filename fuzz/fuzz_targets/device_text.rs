//! The small formats the device reads from files and the kernel command line
//! (cmdline, Pi `autoboot.txt` and trial marker, loader entries and their
//! counted file names, service files, OS versions, dm-verity superblocks,
//! bundle heads and manifests, EFI boot entries, base64): arbitrary input must never panic,
//! and what can be written back reads back the same.
//!
//! Input: one selector byte, then the text or bytes.
#![no_main]

use std::cmp::Ordering;
use std::path::Path;

use basalt_init::update::{entry, version};
use basalt_init::{bootdisk, bundle, cmdline, rpi, service, verity};
use libfuzzer_sys::fuzz_target;

/// A real key pair is not needed: the head is read, then checked against a
/// key that signed nothing here (every input must be refused, none panic).
const PUBLIC_KEY: &str = "untrusted comment: minisign public key 8F7A4B2C1D3E5F60\n\
RWRgXz4dLEt6j6nbCRgoXhVXwZ1y6JzsYFTGNQpyUtT6xjk0R0XlvO6V\n";

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match which % 11 {
        0 => {
            let args = cmdline::parse(&text);
            let _ = cmdline::words(&text);
            let _ = format!("{args:?}");
        }
        1 => {
            if let Ok(a) = rpi::Autoboot::parse(rest) {
                assert_eq!(rpi::Autoboot::parse(a.render().as_bytes()).ok(), Some(a));
                assert_eq!(
                    rpi::Autoboot::parse(a.swapped().render().as_bytes()).ok(),
                    Some(a.swapped())
                );
            }
            let _ = rpi::evaluate_autoboot(rest, true);
        }
        2 => {
            if let Ok(m) = rpi::TrialMarker::parse(&text) {
                assert_eq!(rpi::TrialMarker::parse(&m.render()).ok(), Some(m));
            }
        }
        3 => {
            if let Some(e) = entry::LoaderEntry::parse(&text) {
                let again = entry::LoaderEntry::parse(&e.render());
                assert_eq!(again.map(|a| (a.slot, a.rank)), Some((e.slot, e.rank)));
            }
            let _ = entry::EntryFile::parse(&text).map(|f| f.exhausted());
        }
        4 => {
            let _ = service::ServiceDef::parse("fuzz", &text, Path::new("fuzz.toml"));
            let _ = service::parse_http_url(&text);
        }
        5 => {
            let (a, b) = text.split_once('\n').unwrap_or((&text, ""));
            let (ab, ba) = (version::compare(a, b), version::compare(b, a));
            assert_eq!(ab, ba.reverse(), "{a:?} {b:?}");
            assert_eq!(version::compare(a, a), Ordering::Equal);
            let _ = version::compatible(a, &[b.to_string()]);
        }
        6 => {
            let _ = verity::parse_superblock(rest);
        }
        7 => {
            if let Ok(head) = bundle::Head::read(&mut &rest[..]) {
                assert!(head.verify(&[PUBLIC_KEY.to_string()]).is_err());
                let _ = head.minisig();
            }
        }
        8 => {
            if let Ok(m) = bundle::Manifest::parse(&text) {
                assert_eq!(bundle::Manifest::parse(&m.to_toml()).ok(), Some(m));
            }
        }
        9 => {
            let _ = bootdisk::parse_load_option(rest);
            let _ = bootdisk::parse_boot_current(rest);
            let _ = bootdisk::parse_part_uuid(rest);
            let _ = bootdisk::sysfs_pci_chain(&text);
        }
        _ => {
            assert_eq!(
                bundle::unbase64(&bundle::base64(rest)).as_deref(),
                Some(rest)
            );
            let _ = bundle::unbase64(&text);
            let _ = bundle::pk_key_id(&text);
        }
    }
});
