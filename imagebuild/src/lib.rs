//! The builder: board + image definition → image.
