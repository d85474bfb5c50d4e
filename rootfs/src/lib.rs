//! Root filesystem trees: overlays and (later) Alpine packages.
pub mod overlay;
pub mod tree;
