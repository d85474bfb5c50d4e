//! The device's update agent (`basalt_init::update`) against a node laid out
//! in a temporary directory: an ESP directory with slot a's loader entry, the
//! two root partitions as files, slots.toml. Bundles are made and signed by
//! the builder (`basalt_imagebuild::bundle`). No QEMU: the install, every
//! rejection, commit, rollback and a trial that never came up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use basalt_imagebuild::bundle::{self, PayloadSource};
use basalt_init::bundle::PayloadPart;
use basalt_init::slot::Slot;
use basalt_init::update::device::Device;
use basalt_init::update::entry::{LoaderEntry, Rank};
use basalt_init::update::gate::{self, BootCheck};
use basalt_init::update::install::{self, InstallOptions};
use basalt_init::update::state::{SlotState, SlotsState};
use basalt_init::update::{UpdateError, boottar};

const ROOT_LEN: u64 = 4 << 20;
const HASH: &str = "5e1f0a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7";

struct Node {
    dir: tempfile::TempDir,
    dev: Device,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("esp/loader/entries")).unwrap();
        std::fs::create_dir_all(d.join("esp/a")).unwrap();
        std::fs::write(d.join("esp/a/vmlinuz"), b"kernel a").unwrap();
        std::fs::write(d.join("esp/a/initramfs"), b"initramfs a").unwrap();
        std::fs::write(
            d.join("esp/loader/entries/basalt-a.conf"),
            basalt_imagebuild::esp::loader_entry("0.1.0", "a", "console=ttyS0 basalt.verity=aa"),
        )
        .unwrap();
        std::fs::write(d.join("root-a"), pattern(ROOT_LEN as usize, 3)).unwrap();
        std::fs::write(d.join("root-b"), vec![0u8; ROOT_LEN as usize]).unwrap();
        std::fs::write(
            d.join("image.toml"),
            "os_version = \"0.1.0\"\nboard = \"x86_64\"\n",
        )
        .unwrap();
        std::fs::create_dir_all(d.join("keys")).unwrap();
        let (_, pubkey) = bundle::keygen(&d.join("signing")).unwrap();
        std::fs::copy(&pubkey, d.join("keys/release.pub")).unwrap();
        let dev = Device {
            boot_dir: d.join("esp"),
            state_path: d.join("var/lib/basalt/slots.toml"),
            lock_path: d.join("run/update.lock"),
            image_facts: d.join("image.toml"),
            key_dir: d.join("keys"),
            update_config: d.join("run/update.toml"),
            handoff: d.join("run/stage1.toml"),
            class_block: d.join("sys"),
            dev_dir: d.join("dev"),
            root_devices: Some([d.join("root-a"), d.join("root-b")]),
            control_socket: d.join("run/control.sock"),
            node_configs: vec![d.join("esp/node.toml")],
            bootloader_dt: d.join("dt"),
            numbered: None,
        };
        let n = Node { dir, dev };
        n.boot(Slot::A, "0.1.0");
        n
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Pretend stage 1 booted `slot` running `version`.
    fn boot(&self, slot: Slot, version: &str) {
        std::fs::create_dir_all(self.path("run")).unwrap();
        std::fs::write(&self.dev.handoff, format!("slot = \"{}\"\n", slot.name())).unwrap();
        std::fs::write(
            &self.dev.image_facts,
            format!("os_version = \"{version}\"\nboard = \"x86_64\"\n"),
        )
        .unwrap();
    }

    /// Every file of the ESP and root-a, for before/after comparisons.
    fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        walk(&self.path("esp"), &mut out);
        out.insert("root-a".into(), std::fs::read(self.path("root-a")).unwrap());
        out
    }

    fn state(&self) -> SlotsState {
        SlotsState::load(&self.dev.state_path).unwrap().unwrap()
    }

    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.path("esp/loader/entries"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn entry(&self, name: &str) -> LoaderEntry {
        LoaderEntry::parse(
            &std::fs::read_to_string(self.path(&format!("esp/loader/entries/{name}"))).unwrap(),
        )
        .unwrap()
    }

    /// A signed bundle: (bytes, offsets of the boot and root payloads).
    fn bundle(&self, version: &str, board: &str, key: &str) -> (Vec<u8>, usize, usize) {
        let d = self.dir.path();
        let mut tar = Vec::new();
        boottar::write(
            &mut tar,
            &pattern(70_000, 5),
            &pattern(30_000, 7),
            &format!("console=ttyS0 basalt.verity={HASH} basalt.verity_data_blocks=600"),
            0,
        )
        .unwrap();
        std::fs::write(d.join("boot.tar"), &tar).unwrap();
        std::fs::write(d.join("root.img"), pattern(2 << 20, 11)).unwrap();
        let out = d.join(format!("{version}-{board}.bundle"));
        bundle::write(
            version,
            board,
            vec![],
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
                    verity_root_hash: Some(HASH.into()),
                    verity_hash_offset: Some(600 * 4096),
                },
            ],
            &d.join(key),
            &out,
        )
        .unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let root_at = bytes.len() - (2 << 20);
        (bytes, root_at - tar.len(), root_at)
    }

    fn install(&self, bytes: &[u8]) -> Result<install::Installed, UpdateError> {
        install::install(&self.dev, &mut &bytes[..], InstallOptions::default())
    }
}

fn walk(dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.insert(p.display().to_string(), std::fs::read(&p).unwrap());
        }
    }
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(seed).wrapping_add(i >> 9)) as u8)
        .collect()
}

#[test]
fn install_trial_commit_rollback() {
    let n = Node::new();
    let before_a = std::fs::read(n.path("esp/loader/entries/basalt-a.conf")).unwrap();
    let (b, _, _) = n.bundle("0.2.0", "x86_64", "signing.key");
    let done = n.install(&b).unwrap();
    assert_eq!((done.slot, done.version.as_str()), (Slot::B, "0.2.0"));
    // Primary untouched, a counted trial entry for b that sorts first.
    assert_eq!(
        std::fs::read(n.path("esp/loader/entries/basalt-a.conf")).unwrap(),
        before_a
    );
    assert_eq!(n.entries(), ["basalt-a.conf", "basalt-b+1.conf"]);
    let t = n.entry("basalt-b+1.conf");
    assert_eq!(t.rank, Rank::Trial);
    assert!(t.options.contains(HASH) && !t.options.contains("basalt.slot=a"));
    assert!(
        std::fs::read_to_string(n.path("esp/loader/entries/basalt-b+1.conf"))
            .unwrap()
            .contains("basalt.slot=b")
    );
    assert_eq!(
        std::fs::read(n.path("esp/b/vmlinuz")).unwrap(),
        pattern(70_000, 5)
    );
    assert_eq!(
        std::fs::read(n.path("esp/b/initramfs")).unwrap(),
        pattern(30_000, 7)
    );
    let root_b = std::fs::read(n.path("root-b")).unwrap();
    assert_eq!(&root_b[..2 << 20], &pattern(2 << 20, 11)[..]);
    let st = n.state();
    assert_eq!(
        (st.b.state, st.b.version.as_str()),
        (SlotState::Trial, "0.2.0")
    );
    assert_eq!(st.primary(), Some(Slot::A));
    assert_eq!(st.last_update.result, "installed");

    // Another update while the trial is pending is refused... from the trial itself.
    // systemd-boot boots the trial entry: renames it before starting it.
    std::fs::rename(
        n.path("esp/loader/entries/basalt-b+1.conf"),
        n.path("esp/loader/entries/basalt-b+0-1.conf"),
    )
    .unwrap();
    n.boot(Slot::B, "0.2.0");
    let check = gate::boot_check(&n.dev, Slot::B, "0.2.0").unwrap();
    assert_eq!(
        check,
        BootCheck::Trial {
            slot: Slot::B,
            version: "0.2.0".into()
        }
    );
    let (b3, _, _) = n.bundle("0.3.0", "x86_64", "signing.key");
    assert!(matches!(n.install(&b3), Err(UpdateError::Rejected(_))));

    gate::commit(&n.dev, Slot::B).unwrap();
    assert_eq!(n.entries(), ["basalt-a.conf", "basalt-b.conf"]);
    assert_eq!(n.entry("basalt-b.conf").rank, Rank::Primary);
    assert_eq!(n.entry("basalt-a.conf").rank, Rank::Fallback);
    let st = n.state();
    assert_eq!((st.b.state, st.primary()), (SlotState::Good, Some(Slot::B)));
    assert_eq!(st.last_update.result, "committed");
    // The next boot finds nothing to do.
    assert_eq!(
        gate::boot_check(&n.dev, Slot::B, "0.2.0").unwrap(),
        BootCheck::Normal
    );
    assert_eq!(n.entries(), ["basalt-a.conf", "basalt-b.conf"]);

    // Rollback: a (good) becomes primary again.
    assert_eq!(gate::rollback(&n.dev).unwrap(), Slot::A);
    assert_eq!(n.entry("basalt-a.conf").rank, Rank::Primary);
    assert_eq!(n.entry("basalt-b.conf").rank, Rank::Fallback);
    assert_eq!(n.state().primary(), Some(Slot::A));
    // Updating the primary slot from the other one is refused until rebooted.
    assert!(matches!(n.install(&b3), Err(UpdateError::Rejected(_))));
}

#[test]
fn rejections_leave_the_node_unchanged() {
    let n = Node::new();
    let (good, boot_at, root_at) = n.bundle("0.2.0", "x86_64", "signing.key");
    let (other_board, _, _) = n.bundle("0.2.0", "rpi4", "signing.key");
    let (older, _, _) = n.bundle("0.0.9", "x86_64", "signing.key");
    let (same, _, _) = n.bundle("0.1.0", "x86_64", "signing.key");
    bundle::keygen(&n.path("stranger")).unwrap();
    let (unknown, _, _) = n.bundle("0.2.0", "x86_64", "stranger.key");
    let flip = |at: usize| {
        let mut b = good.clone();
        b[at] ^= 0x04;
        b
    };
    // The signature's last byte sits right before the boot payload.
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("bad signature", flip(boot_at - 1), false),
        ("signed manifest changed", flip(20), false),
        ("unknown key", unknown, false),
        ("wrong board", other_board, false),
        ("downgrade", older, false),
        ("same version", same, false),
        ("flipped bit in boot payload", flip(boot_at + 700), true),
        (
            "flipped bit in boot payload's kernel",
            flip(boot_at + 40_000),
            true,
        ),
        (
            "flipped bit in root payload",
            flip(root_at + 1_000_000),
            true,
        ),
        (
            "truncated in root payload",
            good[..root_at + 5000].to_vec(),
            true,
        ),
        (
            "truncated in boot payload",
            good[..boot_at + 100].to_vec(),
            true,
        ),
        ("trailing garbage", [good.clone(), vec![0]].concat(), true),
    ];
    for (what, bytes, touches_b) in cases {
        let before = n.snapshot();
        let r = n.install(&bytes);
        assert!(r.is_err(), "{what}: accepted");
        let after = n.snapshot();
        // The booted slot (root-a, a's files, a's entry) and the rest of
        // the ESP stay as they were; only b's own files may have changed.
        for (k, v) in before.iter().filter(|(k, _)| !k.contains("/esp/b/")) {
            assert!(after.get(k) == Some(v), "{what}: {k} changed");
        }
        assert!(
            after
                .keys()
                .all(|k| before.contains_key(k) || k.contains("/esp/b/")),
            "{what}: new files {:?}",
            after
                .keys()
                .filter(|k| !before.contains_key(*k))
                .collect::<Vec<_>>()
        );
        assert_eq!(n.entries(), ["basalt-a.conf"], "{what}");
        let st = n.state();
        assert_eq!(st.primary(), Some(Slot::A), "{what}");
        assert_eq!(st.a.state, SlotState::Good, "{what}");
        assert_eq!(st.b.state, SlotState::Empty, "{what}");
        let expect = if touches_b { "failed" } else { "rejected" };
        assert_eq!(
            st.last_update.result, expect,
            "{what}: {:?}",
            st.last_update
        );
        assert!(!st.last_update.reason.is_empty(), "{what}");
    }
    // --allow-downgrade installs an older bundle.
    let (older, _, _) = n.bundle("0.0.9", "x86_64", "signing.key");
    install::install(
        &n.dev,
        &mut &older[..],
        InstallOptions {
            allow_downgrade: true,
        },
    )
    .unwrap();
    // And after all that, a good bundle installs.
    let (good, _, _) = n.bundle("0.2.0", "x86_64", "signing.key");
    n.install(&good).unwrap();
    assert_eq!(n.state().b.state, SlotState::Trial);
}

#[test]
fn trial_that_never_came_up_is_bad_and_a_later_update_starts_clean() {
    let n = Node::new();
    let (b, _, _) = n.bundle("0.2.0", "x86_64", "signing.key");
    n.install(&b).unwrap();
    // The trial boot panicked: systemd-boot counted it down, then booted a.
    std::fs::rename(
        n.path("esp/loader/entries/basalt-b+1.conf"),
        n.path("esp/loader/entries/basalt-b+0-1.conf"),
    )
    .unwrap();
    let check = gate::boot_check(&n.dev, Slot::A, "0.1.0").unwrap();
    assert_eq!(
        check,
        BootCheck::TrialFailed {
            slot: Slot::B,
            reason: gate::DID_NOT_COME_UP.into()
        }
    );
    let st = n.state();
    assert_eq!(
        (st.b.state, st.b.reason.as_str()),
        (SlotState::Bad, gate::DID_NOT_COME_UP)
    );
    assert_eq!(st.last_update.result, "rolled-back");
    assert_eq!(n.entries(), ["basalt-a.conf"]);
    // Nothing stale: the next boot is normal, the next update installs a fresh trial.
    assert_eq!(
        gate::boot_check(&n.dev, Slot::A, "0.1.0").unwrap(),
        BootCheck::Normal
    );
    n.install(&b).unwrap();
    assert_eq!(n.entries(), ["basalt-a.conf", "basalt-b+1.conf"]);
    assert_eq!(n.state().b.state, SlotState::Trial);
    assert!(n.state().b.reason.is_empty());

    // A gate that fails records the reason and removes the trial entry.
    gate::fail(
        &n.dev,
        Slot::B,
        "health gate not passed within 600 s of boot: kubernetes: not ready",
    )
    .unwrap();
    assert_eq!(n.entries(), ["basalt-a.conf"]);
    assert_eq!(n.state().b.state, SlotState::Bad);
    assert!(n.state().b.reason.contains("kubernetes"));
}

#[test]
fn update_settings_from_the_node_config() {
    let n = Node::new();
    assert_eq!(n.dev.config().health_gate.timeout_seconds, 600);
    assert_eq!(n.dev.config().health_gate.checks, ["kubernetes"]);
    std::fs::write(
        n.path("esp/node.toml"),
        "hostname = \"x\"\n[update.health_gate]\ntimeout_seconds = 90\nchecks = [\"kubernetes\", \"network\"]\n",
    )
    .unwrap();
    let c = n.dev.config();
    assert_eq!(c.health_gate.timeout_seconds, 90);
    assert_eq!(c.health_gate.checks, ["kubernetes", "network"]);
    // What stage 2 publishes wins.
    std::fs::write(
        &n.dev.update_config,
        "public_keys = [\"RWQ\"]\n[health_gate]\ntimeout_seconds = 30\n",
    )
    .unwrap();
    let c = n.dev.config();
    assert_eq!(
        (c.health_gate.timeout_seconds, c.public_keys.len()),
        (30, 1)
    );
    // A key given only in the node config is trusted.
    let (b, _, _) = n.bundle("0.2.0", "x86_64", "signing.key");
    std::fs::remove_file(n.path("keys/release.pub")).unwrap();
    assert!(n.install(&b).is_err());
    let line = std::fs::read_to_string(n.path("signing.pub")).unwrap();
    let line = line.lines().last().unwrap();
    std::fs::write(
        &n.dev.update_config,
        format!("public_keys = [\"{line}\"]\n"),
    )
    .unwrap();
    n.install(&b).unwrap();
}

#[test]
fn an_install_cut_short_is_recorded_at_the_next_boot() {
    let n = Node::new();
    let (b, _, root_at) = n.bundle("0.2.0", "x86_64", "signing.key");
    // A reader that stops in the middle of the root payload and never
    // returns, as a power cut would: emulate it by keeping the state the
    // agent wrote at its point of no return.
    let _ = n.install(&b[..root_at + 1000]);
    let mut st = n.state();
    st.last_update.result = "installing".into();
    st.last_update.reason.clear();
    st.b.reason = "installing 0.2.0".into();
    st.save(&n.dev.state_path).unwrap();
    assert_eq!(
        gate::boot_check(&n.dev, Slot::A, "0.1.0").unwrap(),
        BootCheck::Normal
    );
    let st = n.state();
    assert_eq!(st.last_update.result, "failed");
    assert_eq!(
        (st.b.state, st.b.reason.as_str()),
        (SlotState::Empty, gate::INTERRUPTED)
    );
    assert_eq!(n.entries(), ["basalt-a.conf"]);

    // Cut after the state said trial, before the entry was written.
    n.install(&b).unwrap();
    std::fs::remove_file(n.path("esp/loader/entries/basalt-b+1.conf")).unwrap();
    let check = gate::boot_check(&n.dev, Slot::A, "0.1.0").unwrap();
    assert_eq!(
        check,
        BootCheck::TrialFailed {
            slot: Slot::B,
            reason: gate::INTERRUPTED.into()
        }
    );
    assert_eq!(n.entries(), ["basalt-a.conf"]);
    n.install(&b).unwrap();
    assert_eq!(n.state().b.state, SlotState::Trial);
}

#[test]
fn a_corrupt_state_file_is_set_aside() {
    let n = Node::new();
    std::fs::create_dir_all(n.dev.state_path.parent().unwrap()).unwrap();
    std::fs::write(&n.dev.state_path, "primary = [").unwrap();
    assert_eq!(
        gate::boot_check(&n.dev, Slot::A, "0.1.0").unwrap(),
        BootCheck::Normal
    );
    assert_eq!(n.state().primary(), Some(Slot::A));
    assert!(n.dev.state_path.with_extension("toml.corrupt").exists());
    let (b, _, _) = n.bundle("0.2.0", "x86_64", "signing.key");
    n.install(&b).unwrap();
}

#[test]
fn a_commit_cut_after_its_intent_is_finished_at_the_next_boot() {
    let n = Node::new();
    let (b, _, _) = n.bundle("0.2.0", "x86_64", "signing.key");
    n.install(&b).unwrap();
    std::fs::rename(
        n.path("esp/loader/entries/basalt-b+1.conf"),
        n.path("esp/loader/entries/basalt-b+0-1.conf"),
    )
    .unwrap();
    // Step 1 of the commit (the intent) reached the disk, nothing else.
    let mut st = n.state();
    st.b.state = SlotState::Good;
    st.primary = "b".into();
    st.save(&n.dev.state_path).unwrap();
    // The firmware skips the exhausted entry and boots a; stage 2 finishes the commit.
    n.boot(Slot::A, "0.1.0");
    assert_eq!(
        gate::boot_check(&n.dev, Slot::A, "0.1.0").unwrap(),
        BootCheck::Normal
    );
    assert_eq!(n.entries(), ["basalt-a.conf", "basalt-b.conf"]);
    assert_eq!(n.entry("basalt-b.conf").rank, Rank::Primary);
    assert_eq!(n.entry("basalt-a.conf").rank, Rank::Fallback);
    assert!(n.entry("basalt-b.conf").options.contains(HASH));
}
