//! Basalt's init: the only process the kernel starts.
//!
//! Stage 1 runs as PID 1 in the initramfs, finds and mounts the slot, and
//! `switch_root`s; stage 2 runs as PID 1 in the real root and supervises
//! everything. The same binary answers as `basaltctl` when called by that name.
//!
//! Formats that the builder writes and this crate reads (slot naming, the
//! kernel command line, node config) live here, in modules the builder uses.
//! All `unsafe` code is in `sys`.
#![deny(unsafe_code)]

pub mod blockdev;
pub mod cmdline;
pub mod console;
pub mod gpt;
pub mod modules;
pub mod mounts;
pub mod service;
pub mod slot;
#[allow(unsafe_code)]
pub mod sys;
