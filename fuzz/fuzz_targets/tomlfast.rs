//! PID 1's TOML subset reader against the `toml` crate: whenever the subset
//! reader answers, the `toml` crate must read the same document (keys
//! compared without their order; `0x`/`0o`/`0b` integers as their value).
#![no_main]

use basalt_init::tomlfast::{self, Val};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(ours) = tomlfast::parse(text) else {
        return;
    };
    let theirs = text
        .parse::<toml::Table>()
        .map(|t| Val::from_toml(&toml::Value::Table(t)).map(Val::comparable));
    match theirs {
        Ok(theirs) => assert_eq!(Some(ours.comparable()), theirs, "on {text:?}"),
        Err(e) => panic!("the subset reader accepted what toml refuses ({e}) on {text:?}"),
    }
});
