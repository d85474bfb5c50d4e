//! Helpers for the end-to-end tests (QEMU, assets).
