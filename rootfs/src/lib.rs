//! Root filesystem trees: overlays and Alpine packages.
pub mod apk;
pub mod overlay;
pub mod tree;
