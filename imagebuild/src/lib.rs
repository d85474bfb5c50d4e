//! The builder: board + image definition → image.
pub mod bmap;
pub mod bundle;
pub mod devices;
pub mod flash;
pub mod outputs;
pub mod run;
pub mod verity;
