//! The builder: board + image definition → image.
pub mod verity;
