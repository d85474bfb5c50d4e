//! Basalt's init: the only process the kernel starts.
//!
//! Stage 1 runs as PID 1 in the initramfs, finds and mounts the slot, and
//! `switch_root`s; stage 2 runs as PID 1 in the real root and supervises
//! everything. The same binary answers as `basaltctl` when called by that name.
//!
//! Formats that the builder writes and this crate reads (slot naming, the
//! kernel command line, image facts) live here, in modules the builder uses.
//! All `unsafe` code is in `sys`.
#![deny(unsafe_code)]
// PID 1 must not die on a surprise: no unwrap/expect/panic outside tests.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod apply;
pub mod blockdev;
pub mod bootdisk;
pub mod boottime;
pub mod bundle;
pub mod cleanup;
pub mod cmdline;
pub mod console;
pub mod control;
pub mod controlconn;
pub mod gpt;
pub mod image;
pub mod logs;
pub mod mbr;
pub mod modules;
pub mod mounts;
pub mod nodeconfig;
pub mod report;
pub mod rpi;
pub mod service;
pub mod slot;
pub mod stage1;
pub mod stage2;
pub mod storage;
pub mod supervisor;
#[allow(unsafe_code)]
pub mod sys;
pub mod tomlfast;
pub mod update;
pub mod verity;

use std::path::Path;

/// What this invocation of the binary is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Stage1,
    Stage2,
    Basaltctl,
    /// The node config child PID 1 starts in stage 2 (`apply`).
    NodeConfig,
    /// Not PID 1 and not called `basaltctl`.
    Refuse,
}

/// Stage selection (docs/boot-protocol.md): `basaltctl` by name; as PID 1,
/// stage 1 when the initramfs marker exists, else stage 2.
pub fn role(argv0: &str, pid: u32, marker_exists: bool) -> Role {
    let name = Path::new(argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    if name == "basaltctl" {
        Role::Basaltctl
    } else if name == apply::CHILD_NAME {
        Role::NodeConfig
    } else if pid != 1 {
        Role::Refuse
    } else if marker_exists {
        Role::Stage1
    } else {
        Role::Stage2
    }
}

/// The binary's entry: returns an exit code only for `basaltctl` and refusals.
pub fn entry(args: &[String]) -> i32 {
    let argv0 = args.first().map(String::as_str).unwrap_or("init");
    let marker = Path::new(slot::INITRAMFS_MARKER).exists();
    match role(argv0, sys::getpid(), marker) {
        Role::Stage1 => stage1::run(),
        Role::Stage2 => stage2::run(None),
        Role::Basaltctl => control::main(args.get(1..).unwrap_or(&[])),
        Role::NodeConfig => apply::child_main(),
        Role::Refuse if args.get(1).map(String::as_str) == Some("--version") => {
            println!("basalt init {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Role::Refuse => {
            eprintln!(
                "init: must run as PID 1 (or be called as basaltctl: status [--json] | reboot | poweroff)"
            );
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_selection() {
        assert_eq!(role("/init", 1, true), Role::Stage1);
        assert_eq!(role("/usr/lib/basalt/init", 1, false), Role::Stage2);
        assert_eq!(role("/sbin/init", 1, false), Role::Stage2);
        assert_eq!(role("/usr/bin/basaltctl", 4242, false), Role::Basaltctl);
        assert_eq!(role("basaltctl", 1, true), Role::Basaltctl);
        assert_eq!(role("/init", 4242, true), Role::Refuse);
        assert_eq!(role("basalt-node-config", 77, false), Role::NodeConfig);
    }
}
