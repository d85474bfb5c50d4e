//! The update agent on a Raspberry Pi node laid out in a temporary
//! directory: the config FAT (autoboot.txt) as a directory, partitions 2, 3,
//! 5 and 6 as files, the firmware's `/chosen/bootloader` properties as
//! fixture files. The firmware side is `basalt_init::rpi::evaluate_autoboot`
//! (the documented selection rules, REFERENCE.md §1.4): which partition boots
//! normally and on the one-shot tryboot.

use std::collections::BTreeMap;
use std::path::PathBuf;

use basalt_imagebuild::bundle::{self, PayloadSource};
use basalt_init::bundle::PayloadPart;
use basalt_init::rpi::{self, Autoboot, Capabilities};
use basalt_init::slot::Slot;
use basalt_init::update::device::Device;
use basalt_init::update::gate::{self, BootCheck};
use basalt_init::update::install::{self, InstallOptions};
use basalt_init::update::state::{SlotState, SlotsState};
use basalt_init::update::{UpdateError, cli};

const BOOT_LEN: usize = 1 << 20;
const ROOT_LEN: usize = 4 << 20;

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(seed).wrapping_add(i >> 9)) as u8)
        .collect()
}

struct Pi {
    dir: tempfile::TempDir,
    dev: Device,
}

impl Pi {
    fn new() -> Pi {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("config")).unwrap();
        std::fs::write(
            d.join("config/autoboot.txt"),
            Autoboot { primary: Slot::A }.render(),
        )
        .unwrap();
        std::fs::create_dir_all(d.join("dt")).unwrap();
        let caps = Capabilities::TRYBOOT | Capabilities::TRYBOOT_A_B;
        std::fs::write(d.join("dt/capabilities"), caps.to_be_bytes()).unwrap();
        std::fs::write(d.join("p2"), pattern(BOOT_LEN, 3)).unwrap();
        std::fs::write(d.join("p3"), vec![0u8; BOOT_LEN]).unwrap();
        std::fs::write(d.join("p5"), pattern(ROOT_LEN, 5)).unwrap();
        std::fs::write(d.join("p6"), vec![0u8; ROOT_LEN]).unwrap();
        std::fs::create_dir_all(d.join("run")).unwrap();
        std::fs::write(d.join("run/stage1.toml"), "slot = \"a\"\n").unwrap();
        std::fs::write(
            d.join("image.toml"),
            "os_version = \"0.1.0\"\nboard = \"rpi4\"\n",
        )
        .unwrap();
        std::fs::create_dir_all(d.join("keys")).unwrap();
        let (_, pubkey) = bundle::keygen(&d.join("signing")).unwrap();
        std::fs::copy(&pubkey, d.join("keys/release.pub")).unwrap();
        let numbered: BTreeMap<u8, PathBuf> = [2u8, 3, 5, 6]
            .iter()
            .map(|n| (*n, d.join(format!("p{n}"))))
            .collect();
        let dev = Device {
            boot_dir: d.join("config"),
            state_path: d.join("var/slots.toml"),
            lock_path: d.join("run/update.lock"),
            image_facts: d.join("image.toml"),
            key_dir: d.join("keys"),
            update_config: d.join("run/update.toml"),
            handoff: d.join("run/stage1.toml"),
            class_block: d.join("sys"),
            dev_dir: d.join("dev"),
            root_devices: None,
            control_socket: d.join("run/control.sock"),
            node_configs: vec![],
            bootloader_dt: d.join("dt"),
            numbered: Some(numbered),
        };
        Pi { dir, dev }
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join(name)).unwrap()
    }

    fn state(&self) -> SlotsState {
        SlotsState::load(&self.dev.state_path).unwrap().unwrap()
    }

    /// Which boot partition the firmware takes: (normally, on tryboot).
    fn firmware(&self) -> (Option<u8>, Option<u8>) {
        let text = self.read("config/autoboot.txt");
        (
            rpi::evaluate_autoboot(&text, false).unwrap().boot_partition,
            rpi::evaluate_autoboot(&text, true).unwrap().boot_partition,
        )
    }

    fn bundle(&self, version: &str, parts: &[PayloadPart]) -> (Vec<u8>, usize) {
        let d = self.dir.path();
        let mut sources = Vec::new();
        for part in parts {
            let (name, data) = match part {
                PayloadPart::BootFatA => ("fat-a", pattern(600_000, 7)),
                PayloadPart::BootFatB => ("fat-b", pattern(600_000, 11)),
                PayloadPart::Root => ("root", pattern(2 << 20, 13)),
                PayloadPart::Boot => ("boot", pattern(1000, 17)),
            };
            std::fs::write(d.join(name), data).unwrap();
            sources.push(PayloadSource {
                part: *part,
                path: d.join(name),
                verity_root_hash: None,
                verity_hash_offset: None,
            });
        }
        let out = d.join(format!("{version}.bundle"));
        bundle::write(
            version,
            "rpi4",
            vec![],
            &sources,
            &d.join("signing.key"),
            &out,
        )
        .unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let payloads: usize = parts
            .iter()
            .map(|p| match p {
                PayloadPart::BootFatA | PayloadPart::BootFatB => 600_000,
                PayloadPart::Root => 2 << 20,
                PayloadPart::Boot => 1000,
            })
            .sum();
        let head = bytes.len() - payloads;
        (bytes, head)
    }

    fn install(&self, b: &[u8]) -> Result<install::Installed, UpdateError> {
        install::install(&self.dev, &mut &b[..], InstallOptions::default())
    }
}

const PI_PARTS: &[PayloadPart] = &[
    PayloadPart::BootFatA,
    PayloadPart::BootFatB,
    PayloadPart::Root,
];

#[test]
fn pi_install_tryboot_trial_and_commit() {
    let pi = Pi::new();
    let (b, _) = pi.bundle("0.2.0", PI_PARTS);
    let done = pi.install(&b).unwrap();
    assert_eq!(done.slot, Slot::B);
    assert_eq!(&pi.read("p3")[..600_000], &pattern(600_000, 11)[..]);
    assert_eq!(&pi.read("p6")[..2 << 20], &pattern(2 << 20, 13)[..]);
    assert_eq!(pi.read("p2"), pattern(BOOT_LEN, 3));
    assert_eq!(pi.read("p5"), pattern(ROOT_LEN, 5));
    // autoboot.txt untouched: p2 normally, p3 on the one-shot tryboot.
    assert_eq!(pi.firmware(), (Some(2), Some(3)));
    assert_eq!(pi.state().b.state, SlotState::Trial);

    // --no-reboot, then a plain reboot into a: the trial is still pending.
    assert_eq!(
        gate::boot_check(&pi.dev, Slot::A, "0.1.0").unwrap(),
        BootCheck::Normal
    );
    assert_eq!(pi.state().b.state, SlotState::Trial);
    // `basaltctl reboot tryboot` notes the trial start; the firmware boots p3 once.
    cli::mark_trial_started(&pi.dev).unwrap();
    assert_eq!(pi.state().last_update.result, gate::TRIAL_STARTED);
    std::fs::write(pi.dir.path().join("run/stage1.toml"), "slot = \"b\"\n").unwrap();
    let check = gate::boot_check(&pi.dev, Slot::B, "0.2.0").unwrap();
    assert_eq!(
        check,
        BootCheck::Trial {
            slot: Slot::B,
            version: "0.2.0".into()
        }
    );
    gate::commit(&pi.dev, Slot::B).unwrap();
    assert_eq!(pi.firmware(), (Some(3), Some(2)));
    let st = pi.state();
    assert_eq!((st.b.state, st.primary()), (SlotState::Good, Some(Slot::B)));
    // Rollback to a (good) rewrites autoboot.txt again.
    assert_eq!(gate::rollback(&pi.dev).unwrap(), Slot::A);
    assert_eq!(pi.firmware(), (Some(2), Some(3)));
}

#[test]
fn pi_trial_that_falls_back_is_bad_and_autoboot_stays() {
    let pi = Pi::new();
    let (b, _) = pi.bundle("0.2.0", PI_PARTS);
    pi.install(&b).unwrap();
    cli::mark_trial_started(&pi.dev).unwrap();
    // The trial never reached its gate: the next (normal) boot is a again.
    let check = gate::boot_check(&pi.dev, Slot::A, "0.1.0").unwrap();
    assert_eq!(
        check,
        BootCheck::TrialFailed {
            slot: Slot::B,
            reason: gate::DID_NOT_COME_UP.into()
        }
    );
    assert_eq!(pi.state().b.state, SlotState::Bad);
    assert_eq!(pi.firmware(), (Some(2), Some(3)));
    // A later update of b starts clean.
    pi.install(&b).unwrap();
    assert_eq!(pi.state().b.state, SlotState::Trial);
    assert_eq!(pi.state().last_update.result, "installed");
}

#[test]
fn pi_rejections_and_bad_payloads_leave_a_and_autoboot_unchanged() {
    let pi = Pi::new();
    let (good, head) = pi.bundle("0.2.0", PI_PARTS);
    let flip = |at: usize| {
        let mut b = good.clone();
        b[at] ^= 0x20;
        b
    };
    let (x86, _) = pi.bundle("0.2.0", &[PayloadPart::Boot, PayloadPart::Root]);
    let cases = [
        ("systemd-boot bundle", x86),
        (
            "flipped bit in boot-fat-b's first sector",
            flip(head + 600_000 + 100),
        ),
        (
            "flipped bit in boot-fat-b's body",
            flip(head + 600_000 + 300_000),
        ),
        (
            "flipped bit in boot-fat-a (not installed, still checked)",
            flip(head + 10),
        ),
        ("flipped bit in root", flip(head + 1_200_000 + 1_000_000)),
        ("truncated", good[..good.len() - 10].to_vec()),
    ];
    for (what, bytes) in cases {
        assert!(pi.install(&bytes).is_err(), "{what}: accepted");
        assert_eq!(pi.read("p2"), pattern(BOOT_LEN, 3), "{what}");
        assert_eq!(pi.read("p5"), pattern(ROOT_LEN, 5), "{what}");
        assert_eq!(pi.firmware(), (Some(2), Some(3)), "{what}");
        // p3 holds no FAT the firmware could boot: its first sector is zero.
        assert!(
            pi.read("p3")[..512].iter().all(|b| *b == 0),
            "{what}: p3 bootable"
        );
        assert_ne!(pi.state().b.state, SlotState::Trial, "{what}");
    }
    // Firmware without tryboot: refused before anything is written.
    std::fs::write(pi.dir.path().join("dt/capabilities"), 0u32.to_be_bytes()).unwrap();
    assert!(matches!(pi.install(&good), Err(UpdateError::Rejected(_))));
}
