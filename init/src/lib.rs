//! Basalt's init: the only process the kernel starts.
//!
//! Stage 1 runs as PID 1 in the initramfs, finds and mounts the slot, and
//! `switch_root`s; stage 2 runs as PID 1 in the real root and supervises
//! everything. The same binary answers as `basaltctl` when called by that name.
//!
//! Formats that the builder writes and this crate reads (slot naming, the
//! kernel command line, node config) live here, in modules the builder uses.

pub mod nodeconfig;
pub mod slot;
