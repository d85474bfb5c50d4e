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
    /// A Pi 3 (`reboot-partition`): no bootloader capabilities, stage 1 ran the
    /// trial rules (its handoff has the `trial` step).
    fn new_reboot_partition() -> Pi {
        let pi = Pi::new();
        let d = pi.dir.path();
        std::fs::remove_file(d.join("dt/capabilities")).unwrap();
        pi.set_handoff(Slot::A, false);
        std::fs::write(
            d.join("image.toml"),
            "os_version = \"0.1.0\"\nboard = \"rpi3\"\n",
        )
        .unwrap();
        pi
    }

    fn set_handoff(&self, slot: Slot, trial: bool) {
        std::fs::write(
            self.dir.path().join("run/stage1.toml"),
            format!(
                "slot = \"{}\"\ntrial = {trial}\n[steps_ms]\ntrial = 2\n",
                slot.name()
            ),
        )
        .unwrap();
    }

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
            &self.board(),
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

    fn board(&self) -> String {
        let t = std::fs::read_to_string(self.dir.path().join("image.toml")).unwrap();
        t.split("board = \"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .to_string()
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

// ---------------------------------------------------------------------------
// Boards without tryboot (`reboot-partition`: Pi 3, Zero 2 W, 32-bit images):
// the trial marker on p1, `reboot "<N>"`, stage 1's rules (`rpi::stage1_plan`),
// and the firmware's partition choice from `rpi::model::select`.

use basalt_init::rpi::model::{self, Content, Disk, Flags};
use basalt_init::rpi::{MarkerKind, Stage1Plan, Stage1Report, TrialMarker};
use std::cell::RefCell;

#[derive(Default)]
struct Seen {
    armed: RefCell<Vec<u32>>,
    reboots: RefCell<Vec<String>>,
}

impl rpi::Watchdog for Seen {
    fn arm(&self, secs: u32) -> std::io::Result<u32> {
        self.armed.borrow_mut().push(secs);
        Ok(secs)
    }
}

impl rpi::RebootWithArg for Seen {
    fn reboot_with_arg(&self, arg: &str) -> std::io::Result<()> {
        self.reboots.borrow_mut().push(arg.to_string());
        Ok(())
    }
}

/// A Pi 3's firmware: reads autoboot.txt, honours `reboot N`, no tryboot.
const PI3: model::Firmware = model::Firmware {
    reads_autoboot: true,
    tryboot: false,
    reboot_partition: true,
    partition_survives_watchdog: true,
    flag_survives_power_cut: false,
    capabilities: None,
};

impl Pi {
    /// The node's disk as the firmware model sees it: p1's files; a boot FAT
    /// or root is `Good(1)` (the image's slot a), `Good(2)` (the 0.2.0 bundle)
    /// or `Invalid` (zeroed first sector, partial or foreign content).
    fn model_disk(&self) -> Disk {
        let mut p1 = BTreeMap::new();
        for e in std::fs::read_dir(self.dir.path().join("config")).unwrap() {
            let e = e.unwrap();
            p1.insert(
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            );
        }
        let boot = |n: &str| {
            let b = self.read(n);
            if b == pattern(BOOT_LEN, 3) {
                Content::Good(1)
            } else if b[..600_000] == pattern(600_000, 11)[..] {
                Content::Good(2)
            } else {
                Content::Invalid
            }
        };
        let root = |n: &str| {
            let b = self.read(n);
            if b == pattern(ROOT_LEN, 5) {
                Content::Good(1)
            } else if b[..2 << 20] == pattern(2 << 20, 13)[..] {
                Content::Good(2)
            } else {
                Content::Invalid
            }
        };
        Disk {
            p1,
            boot: [boot("p2"), boot("p3")],
            root: [root("p5"), root("p6")],
        }
    }

    /// The partition the Pi 3 firmware boots, after `reboot "<n>"` (0: plain restart).
    fn firmware_boots(&self, reboot_partition: u8) -> u8 {
        let flags = Flags {
            tryboot: false,
            reboot_partition,
        };
        model::select(&PI3, &self.model_disk(), flags)
            .expect("firmware finds a bootable partition")
            .partition
    }

    fn marker(&self) -> Option<TrialMarker> {
        rpi::read_marker(&self.dev.boot_dir).unwrap()
    }

    fn primary(&self) -> Slot {
        rpi::read_autoboot(&self.dev.boot_dir).unwrap().primary
    }

    /// Stage 1 on `booted`: its plan, carried out on p1; the handoff it writes.
    fn stage1(&self, booted: Slot, seen: &Seen) -> Stage1Plan {
        let primary = rpi::read_autoboot(&self.dev.boot_dir)
            .ok()
            .map(|a| a.primary);
        let plan = rpi::stage1_plan(booted, primary, self.marker());
        rpi::apply_stage1_plan(&self.dev.boot_dir, &plan, seen, seen).unwrap();
        let trial = matches!(
            plan,
            Stage1Plan::Continue {
                watchdog_secs: Some(_),
                ..
            }
        );
        self.set_handoff(booted, trial);
        plan
    }

    /// Install 0.2.0 and prepare its trial: returns the control request.
    fn install_and_prepare(&self) -> String {
        let (b, _) = self.bundle("0.2.0", PI_PARTS);
        let done = self.install(&b).unwrap();
        assert_eq!(done.slot, Slot::B);
        cli::prepare_trial(&self.dev).unwrap()
    }
}

#[test]
fn reboot_partition_install_writes_marker_and_asks_for_reboot_3() {
    let pi = Pi::new_reboot_partition();
    assert_eq!(pi.dev.pi_method(), Some(rpi::BootMethod::RebootPartition));
    let (b, _) = pi.bundle("0.2.0", PI_PARTS);
    pi.install(&b).unwrap();
    assert_eq!(&pi.read("p3")[..600_000], &pattern(600_000, 11)[..]);
    assert_eq!(&pi.read("p6")[..2 << 20], &pattern(2 << 20, 13)[..]);
    assert_eq!(pi.read("p2"), pattern(BOOT_LEN, 3));
    assert_eq!(pi.read("p5"), pattern(ROOT_LEN, 5));
    assert_eq!(pi.state().b.state, SlotState::Trial);
    // Installed, trial not started (--no-reboot): no marker, a plain restart boots a.
    assert_eq!(pi.marker(), None);
    assert_eq!(pi.firmware_boots(0), 2);
    let line = cli::prepare_trial(&pi.dev).unwrap();
    assert_eq!(line, "reboot partition 3");
    assert_eq!(
        pi.read("config/trial.txt"),
        b"kind=trial\nslot=b\nattempts=0\n"
    );
    assert!(!pi.dir.path().join("config/trial.new").exists());
    assert_eq!(pi.state().last_update.result, gate::TRIAL_STARTED);
    assert_eq!(pi.primary(), Slot::A);
    // `reboot "3"`: the firmware boots b once; a plain restart still boots a.
    assert_eq!(pi.firmware_boots(3), 3);
    assert_eq!(pi.firmware_boots(0), 2);
    // `basaltctl reboot partition 2` by hand is no trial: nothing changes.
    let before = pi.read("config/trial.txt");
    cli::prepare_partition_trial(&pi.dev, 2).unwrap();
    assert_eq!(pi.read("config/trial.txt"), before);
}

#[test]
fn reboot_partition_gate_pass_commits_b() {
    let pi = Pi::new_reboot_partition();
    let line = pi.install_and_prepare();
    let seen = Seen::default();
    let boots = pi.firmware_boots(line.rsplit(' ').next().unwrap().parse().unwrap());
    assert_eq!(rpi::slot_of_boot_partition(boots.into()), Some(Slot::B));
    // Stage 1 of b: the one attempt is recorded, then the watchdog armed.
    let plan = pi.stage1(Slot::B, &seen);
    assert!(matches!(
        plan,
        Stage1Plan::Continue {
            watchdog_secs: Some(_),
            ..
        }
    ));
    assert_eq!(*seen.armed.borrow(), vec![rpi::TRIAL_WATCHDOG_SECS]);
    assert_eq!(pi.marker().unwrap().attempts, 1);
    assert!(pi.dev.handoff_trial());
    assert_eq!(
        gate::boot_check(&pi.dev, Slot::B, "0.2.0").unwrap(),
        BootCheck::Trial {
            slot: Slot::B,
            version: "0.2.0".into()
        }
    );
    gate::commit(&pi.dev, Slot::B).unwrap();
    assert_eq!(pi.primary(), Slot::B);
    assert_eq!(pi.marker(), None);
    let st = pi.state();
    assert_eq!((st.b.state, st.primary()), (SlotState::Good, Some(Slot::B)));
    assert_eq!(st.last_update.result, "committed");
    // From now on a plain restart boots b, and stage 1 boots it without a trial.
    assert_eq!(pi.firmware_boots(0), 3);
    assert_eq!(
        pi.stage1(Slot::B, &seen),
        Stage1Plan::Continue {
            marker: rpi::MarkerChange::Keep,
            watchdog_secs: None,
            report: Stage1Report::None
        }
    );
    assert_eq!(
        gate::boot_check(&pi.dev, Slot::B, "0.2.0").unwrap(),
        BootCheck::Normal
    );
}

#[test]
fn reboot_partition_gate_fail_returns_to_a_and_records_bad() {
    let pi = Pi::new_reboot_partition();
    pi.install_and_prepare();
    let seen = Seen::default();
    pi.stage1(Slot::B, &seen);
    assert!(matches!(
        gate::boot_check(&pi.dev, Slot::B, "0.2.0").unwrap(),
        BootCheck::Trial { .. }
    ));
    gate::fail(
        &pi.dev,
        Slot::B,
        "health gate not passed within 600 s of boot: x",
    )
    .unwrap();
    assert_eq!(pi.state().b.state, SlotState::Bad);
    // The gate's plain restart: the firmware reads autoboot.txt (a).
    assert_eq!(pi.firmware_boots(0), 2);
    let plan = pi.stage1(Slot::A, &seen);
    assert!(matches!(
        plan,
        Stage1Plan::Continue {
            report: Stage1Report::TrialRolledBack {
                slot: Slot::B,
                attempts: 1
            },
            ..
        }
    ));
    assert_eq!(pi.marker(), None);
    assert_eq!(
        gate::boot_check(&pi.dev, Slot::A, "0.1.0").unwrap(),
        BootCheck::Normal
    );
    let st = pi.state();
    assert_eq!(st.b.state, SlotState::Bad);
    assert!(st.b.reason.contains("health gate"), "{}", st.b.reason);
    assert_eq!((st.primary(), pi.primary()), (Some(Slot::A), Slot::A));
}

#[test]
fn reboot_partition_trial_that_hangs_falls_back_and_is_recorded_bad() {
    let pi = Pi::new_reboot_partition();
    pi.install_and_prepare();
    let seen = Seen::default();
    pi.stage1(Slot::B, &seen);
    // The trial hangs; the watchdog resets. With the `reboot N` partition kept
    // the firmware boots b again, whose stage 1 sees the used attempt.
    assert_eq!(pi.firmware_boots(3), 3);
    let plan = pi.stage1(Slot::B, &seen);
    assert_eq!(
        plan,
        Stage1Plan::Reboot {
            marker: rpi::MarkerChange::Keep,
            partition: 2
        }
    );
    assert_eq!(*seen.reboots.borrow(), vec!["2".to_string()]);
    assert_eq!(pi.firmware_boots(2), 2);
    pi.stage1(Slot::A, &seen);
    assert_eq!(pi.marker(), None);
    assert_eq!(
        gate::boot_check(&pi.dev, Slot::A, "0.1.0").unwrap(),
        BootCheck::TrialFailed {
            slot: Slot::B,
            reason: gate::DID_NOT_COME_UP.into()
        }
    );
    assert_eq!(pi.state().b.state, SlotState::Bad);
    assert_eq!(pi.primary(), Slot::A);
    // A power cut in the hang instead (the partition is lost): a boots directly.
    let pi = Pi::new_reboot_partition();
    pi.install_and_prepare();
    pi.stage1(Slot::B, &seen);
    assert_eq!(pi.firmware_boots(0), 2);
    pi.stage1(Slot::A, &seen);
    assert!(matches!(
        gate::boot_check(&pi.dev, Slot::A, "0.1.0").unwrap(),
        BootCheck::TrialFailed { slot: Slot::B, .. }
    ));
    // The next update of b starts clean.
    let (b, _) = pi.bundle("0.2.0", PI_PARTS);
    pi.install(&b).unwrap();
    assert_eq!(pi.state().b.state, SlotState::Trial);
}

/// Every file of the node but the slot state.
fn snapshot(pi: &Pi) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for n in ["p2", "p3", "p5", "p6"] {
        m.insert(n.to_string(), pi.read(n));
    }
    for e in std::fs::read_dir(pi.dir.path().join("config")).unwrap() {
        let e = e.unwrap();
        m.insert(
            format!("config/{}", e.file_name().to_string_lossy()),
            std::fs::read(e.path()).unwrap(),
        );
    }
    m
}

#[test]
fn reboot_partition_rejected_bundles_change_nothing() {
    let pi = Pi::new_reboot_partition();
    let (good, _) = pi.bundle("0.2.0", PI_PARTS);
    let (old, _) = pi.bundle("0.0.9", PI_PARTS);
    std::fs::write(
        pi.dir.path().join("image.toml"),
        "os_version = \"0.1.0\"\nboard = \"rpi4\"\n",
    )
    .unwrap();
    let (rpi4, _) = pi.bundle("0.2.0", PI_PARTS);
    std::fs::write(
        pi.dir.path().join("image.toml"),
        "os_version = \"0.1.0\"\nboard = \"rpi3\"\n",
    )
    .unwrap();
    let mut unsigned = good.clone();
    let at = unsigned.windows(6).position(|w| w == b"0.2.0\"").unwrap();
    unsigned[at + 2] = b'3';
    let (x86, _) = pi.bundle("0.2.0", &[PayloadPart::Boot, PayloadPart::Root]);
    // An older marker on p1 (a redirect into a that stage 1 will drop) stays too.
    rpi::write_marker(
        &pi.dev.boot_dir,
        &TrialMarker {
            kind: MarkerKind::Redirect,
            slot: Slot::A,
            attempts: 1,
        },
    )
    .unwrap();
    let before = snapshot(&pi);
    for (what, bytes) in [
        ("another board", rpi4),
        ("older version", old),
        ("manifest changed after signing", unsigned),
        ("systemd-boot payloads", x86),
    ] {
        let e = pi.install(&bytes).unwrap_err();
        assert!(
            matches!(e, UpdateError::Rejected(_) | UpdateError::Bundle(_)),
            "{what}: {e}"
        );
        assert_eq!(snapshot(&pi), before, "{what}");
        let st = pi.state();
        assert_eq!(st.last_update.result, "rejected", "{what}");
        assert_eq!(st.b.state, SlotState::Empty, "{what}");
    }
    // No trial pending: prepare_trial refuses and writes no marker.
    assert!(cli::prepare_trial(&pi.dev).is_err());
    assert_eq!(snapshot(&pi), before);
    // Without stage 1's reboot-partition rules there is no way to a trial: refused.
    std::fs::write(pi.dir.path().join("run/stage1.toml"), "slot = \"a\"\n").unwrap();
    assert!(matches!(pi.install(&good), Err(UpdateError::Rejected(_))));
    assert_eq!(snapshot(&pi), before);
}

#[test]
fn reboot_partition_commit_cut_after_its_intent_ends_on_b() {
    let pi = Pi::new_reboot_partition();
    pi.install_and_prepare();
    let seen = Seen::default();
    pi.stage1(Slot::B, &seen);
    // The gate passed; the commit's first write (slots.toml: b good, primary)
    // reached the disk, then the power was cut before autoboot.txt.
    let mut st = pi.state();
    st.b.state = SlotState::Good;
    st.primary = "b".into();
    st.last_update.result = "committed".into();
    st.save(&pi.dev.state_path).unwrap();
    // Power back: PM_RSTS is empty, the firmware reads autoboot.txt (still a).
    assert_eq!(pi.firmware_boots(0), 2);
    pi.stage1(Slot::A, &seen);
    assert_eq!(pi.marker(), None);
    assert_eq!(
        gate::boot_check(&pi.dev, Slot::A, "0.1.0").unwrap(),
        BootCheck::Normal
    );
    // The boot check finished the commit from the intent: the next boot is b.
    assert_eq!(pi.primary(), Slot::B);
    assert_eq!(pi.firmware_boots(0), 3);
    assert!(matches!(
        pi.stage1(Slot::B, &seen),
        Stage1Plan::Continue {
            watchdog_secs: None,
            report: Stage1Report::None,
            ..
        }
    ));
    assert_eq!(
        gate::boot_check(&pi.dev, Slot::B, "0.2.0").unwrap(),
        BootCheck::Normal
    );
    assert_eq!(pi.state().b.state, SlotState::Good);
    // The other order of the cut: autoboot.txt written, marker not yet removed
    // (rpi::commit_reboot_partition's two writes): stage 1 drops the stale marker.
    let pi = Pi::new_reboot_partition();
    pi.install_and_prepare();
    pi.stage1(Slot::B, &seen);
    rpi::write_autoboot(&pi.dev.boot_dir, Autoboot { primary: Slot::B }).unwrap();
    assert_eq!(pi.firmware_boots(0), 3);
    assert!(matches!(
        pi.stage1(Slot::B, &seen),
        Stage1Plan::Continue {
            report: Stage1Report::StaleMarker,
            ..
        }
    ));
    assert_eq!(pi.marker(), None);
    // slots.toml still says trial: the gate runs again on b and commits.
    assert!(matches!(
        gate::boot_check(&pi.dev, Slot::B, "0.2.0").unwrap(),
        BootCheck::Trial { slot: Slot::B, .. }
    ));
    gate::commit(&pi.dev, Slot::B).unwrap();
    assert_eq!(
        (pi.state().b.state, pi.primary()),
        (SlotState::Good, Slot::B)
    );
}
