//! `node.toml` from arbitrary bytes: must never panic, and every diagnostic
//! must be 1-based.
#![no_main]

use std::path::Path;

use basalt_init::nodeconfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("node.toml");
    let Ok(text) = nodeconfig::text_of(path, data.to_vec()) else {
        return;
    };
    if let Err(diags) = nodeconfig::load_toml(path, &text) {
        for d in diags {
            assert!(d.line >= 1 && d.column >= 1, "{d}");
        }
    }
});
