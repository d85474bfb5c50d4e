//! The builder: board + image definition → image.
pub mod bmap;
pub mod bundle;
pub mod mbr;
pub mod verity;
