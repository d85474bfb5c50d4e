//! The builder: board + image definition → image.
//!
//! `build::build` runs the pipeline; each step is a module named after its
//! concept (DESIGN.md vocabulary): board, imagedef, modules, initramfs,
//! rootfs additions (root), squashfs, esp, data, disk.
pub mod board;
pub mod build;
pub mod cpio;
pub mod data;
pub mod disk;
pub mod esp;
pub mod imagedef;
pub mod initramfs;
pub mod modules;
pub mod root;
pub mod squashfs;
