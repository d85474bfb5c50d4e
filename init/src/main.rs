//! `init`: stage 1, stage 2 or `basaltctl`, chosen by `basalt_init::entry`.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

fn main() {
    let args: Vec<String> = std::env::args().collect();
    std::process::exit(basalt_init::entry(&args));
}
