//! "Never panics": feed mutated corpus bytes to both parsers for a few
//! thousand iterations (a cheap, deterministic stand-in for the fuzz targets
//! in `fuzz/`, so it runs in every `cargo test`). Every diagnostic must also
//! point inside the text it describes.

use std::path::Path;

use basalt_init::nodeconfig::{self, CloudInitSources, Diagnostic};

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Tokens that steer mutations toward the parsers' interesting paths.
const TOKENS: &[&[u8]] = &[
    b"[",
    b"]",
    b"{",
    b"}",
    b"\"",
    b"'",
    b"\"\"\"",
    b"=",
    b":",
    b"- ",
    b"? ",
    b"&a ",
    b"*a",
    b"<<: ",
    b"!!binary ",
    b"\n",
    b"\r\n",
    b"\t",
    b"#",
    b"---\n",
    b"\xef\xbb\xbf",
    b"\xff",
    b"\x00",
    b"\\u0000",
    b"..",
    b"/",
    b"0o777",
    b"1e999",
    b"99999999999999999999999",
    b"-",
    b"true",
    b"null",
    b"~",
    b"[[files]]\n",
    b"[kubernetes]\n",
    b"#cloud-config\n",
    b"basalt:\n  ",
    b"\xc3\xa9",
    b"\xf0\x9f\x92\xa5",
];

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut data = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(5) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                data.splice(at..at, t.iter().copied());
            }
            2 if !data.is_empty() => {
                let end = (at + rng.below(16)).min(data.len());
                data.drain(at.min(end)..end);
            }
            3 if !data.is_empty() => {
                let start = rng.below(data.len());
                let end = (start + rng.below(64)).min(data.len());
                let chunk: Vec<u8> = data[start..end].to_vec();
                data.splice(at..at, chunk);
            }
            _ => data.insert(at, rng.below(256) as u8),
        }
    }
    data
}

fn check_positions(text: &str, diags: &[Diagnostic]) {
    let lines = text.split('\n').count() as u32;
    for d in diags {
        assert!(d.line >= 1 && d.column >= 1, "position not 1-based: {d}");
        assert!(
            d.line <= lines.max(1),
            "line past the end ({lines} lines): {d}"
        );
        assert!(!d.message.is_empty(), "empty message: {d}");
    }
}

fn run_all(bytes: &[u8]) {
    let Ok(text) = nodeconfig::text_of(Path::new("x"), bytes.to_vec()) else {
        return;
    };
    let r = nodeconfig::load_toml(Path::new("node.toml"), &text);
    // init's TOML subset reader, where it answers, changes nothing.
    assert_eq!(
        r,
        nodeconfig::load_toml_full(Path::new("node.toml"), &text),
        "{text:?}"
    );
    if let Err(d) = r {
        check_positions(&text, &d);
    }
    // The same bytes as each cloud-init file, and with the header forced.
    let with_header = format!("#cloud-config\n{text}");
    for (i, t) in [&text, &with_header].into_iter().enumerate() {
        let mut src = CloudInitSources::default();
        match i {
            0 => {
                src.meta_data = Some(t);
                src.network_config = Some(t);
            }
            _ => src.user_data = Some(t),
        }
        if let Err(d) = nodeconfig::parse_cloud_init(Path::new(""), &src) {
            check_positions(
                t,
                &d.into_iter()
                    .filter(|d| d.file.ends_with("user-data") == (i == 1))
                    .collect::<Vec<_>>(),
            );
        }
    }
}

#[test]
fn mutated_corpus_never_panics_and_points_inside_the_text() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nodeconfig-corpus");
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    let mut stack = vec![dir];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read corpus") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_none_or(|x| x != "expect") {
                let b = std::fs::read(&p).expect("read seed");
                // Keep the run quick: the big seeds add nothing mutation can't.
                if b.len() <= 16 * 1024 {
                    seeds.push(b);
                }
            }
        }
    }
    seeds.sort();
    assert!(seeds.len() >= 60, "too few seeds: {}", seeds.len());
    // Every seed once as it is; the alias bomb (which spends its whole
    // budget by design, ~0.5 s in a debug build) is then left out of the
    // mutation pool so the loop stays a few seconds.
    for seed in &seeds {
        run_all(seed);
    }
    let pool: Vec<&Vec<u8>> = seeds
        .iter()
        .filter(|s| s.iter().filter(|&&b| b == b'&').count() <= 2)
        .collect();
    let mut rng = Rng(0x00ba_5a17_c0ff_ee00);
    for _ in 0..4000 {
        let seed = pool[rng.below(pool.len())];
        run_all(&mutate(&mut rng, seed));
    }
}
