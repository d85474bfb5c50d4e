//! The hostile-config corpus: every `NAME.<syntax>` file in
//! `tests/nodeconfig-corpus/` has a `NAME.expect` beside it holding either
//! `ok` or `FILE:LINE:COLUMN: message fragment`, and the first diagnostic
//! must be at exactly that place and contain the fragment.
//!
//! Syntax by extension: `.toml` is a `node.toml`; `.user-data`,
//! `.meta-data`, `.network-config` are that one cloud-init file alone.

use std::path::{Path, PathBuf};

use basalt_init::nodeconfig::{self, CloudInitSources, Diagnostic, NodeConfig};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nodeconfig-corpus")
}

/// Load one corpus case the way the device would read that file.
pub fn load_case(ext: &str, bytes: Vec<u8>) -> Result<NodeConfig, Vec<Diagnostic>> {
    let file = match ext {
        "toml" => "node.toml",
        other => other,
    };
    let text = nodeconfig::text_of(Path::new(file), bytes).map_err(|d| vec![d])?;
    match ext {
        "toml" => {
            let r = nodeconfig::load_toml(Path::new(file), &text);
            // init's TOML subset reader, where it answers, changes nothing.
            assert_eq!(r, nodeconfig::load_toml_full(Path::new(file), &text));
            r
        }
        _ => {
            let mut src = CloudInitSources::default();
            match ext {
                "user-data" => src.user_data = Some(&text),
                "meta-data" => src.meta_data = Some(&text),
                _ => src.network_config = Some(&text),
            }
            nodeconfig::parse_cloud_init(Path::new(""), &src)
        }
    }
}

#[test]
fn every_corpus_case_fails_at_its_expected_place() {
    let mut cases = 0;
    let mut errors = 0;
    let mut failures = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(corpus_dir())
        .expect("read corpus")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e != "expect" && e != "md"))
        .collect();
    entries.sort();
    for path in entries {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8 name");
        let (stem, ext) = name.split_once('.').expect("NAME.ext");
        let expect_path = path.with_file_name(format!("{stem}.expect"));
        let expect = std::fs::read_to_string(&expect_path)
            .unwrap_or_else(|_| panic!("{name} has no {stem}.expect"));
        let expect = expect.trim_end_matches('\n');
        let bytes = std::fs::read(&path).expect("read case");
        cases += 1;
        let result = load_case(ext, bytes);
        let got = match (&result, expect) {
            (Ok(_), "ok") => continue,
            (Ok(_), _) => {
                failures.push(format!("{name}: parsed without error, expected `{expect}`"));
                continue;
            }
            (Err(d), _) => d[0].to_string(),
        };
        errors += 1;
        // `FILE:LINE:COLUMN: fragment`: location exact, message contains fragment.
        let mut parts = expect.splitn(4, ':');
        let (file, line, column, fragment) =
            (parts.next(), parts.next(), parts.next(), parts.next());
        let (Some(file), Some(line), Some(column), Some(fragment)) = (file, line, column, fragment)
        else {
            failures.push(format!("{name}: malformed expect line `{expect}`"));
            continue;
        };
        let want_prefix = format!("{file}:{line}:{column}:");
        if !got.starts_with(&want_prefix) || !got[want_prefix.len()..].contains(fragment.trim()) {
            failures.push(format!(
                "{name}:\n    expected {expect}\n    got      {got}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} corpus failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        errors >= 60,
        "the corpus must hold at least 60 failing configs, has {errors}"
    );
    assert!(cases >= errors);
}
