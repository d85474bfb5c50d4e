//! The builder: board + image definition → image.
//!
//! `build::build` runs the pipeline; each step is a module named after its
//! concept (DESIGN.md vocabulary): board, imagedef, modules, initramfs,
//! rootfs additions (root), squashfs, esp, data, disk. Beside the pipeline:
//! verity, outputs (.img.zst, .bmap, SHA256SUMS), bundle, flash, devices, run.
pub mod artifacts;
pub mod bmap;
pub mod board;
pub mod build;
pub mod bundle;
pub mod cpio;
pub mod data;
pub mod devices;
pub mod disk;
pub mod esp;
pub mod flash;
pub mod imagedef;
pub mod initramfs;
pub mod inject;
pub mod kubernetes;
pub mod lock;
pub mod mbr;
pub mod modules;
pub mod outputs;
pub mod packages;
pub mod root;
pub mod rpiboot;
pub mod run;
pub mod squashfs;
pub mod treecache;
pub mod verity;
