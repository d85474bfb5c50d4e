//! Root filesystem trees: overlays and (later) Alpine packages.
pub mod apk;
pub mod tree;
