//! The kernel command line as stage 1 reads it (`/proc/cmdline`): which slot
//! booted, and whether this boot is a trial. Keys are listed in docs/boot-protocol.md; unknown `basalt.*` keys
//! are reported and ignored, other keys belong to the kernel and are skipped.

use crate::slot::{CMDLINE_SLOT, CMDLINE_VERITY, CMDLINE_VERITY_DATA_BLOCKS, Slot};

/// `basalt.trial=1`: this boot is a slot's trial (the update agent's counted
/// loader entry carries it; the committed entry does not). Stage 1 arms the
/// watchdog and gives up with a reboot instead of waiting forever.
pub const CMDLINE_TRIAL: &str = "basalt.trial";

/// `basalt.*` keys this init understands.
const KNOWN_KEYS: &[&str] = &[
    CMDLINE_SLOT,
    CMDLINE_TRIAL,
    CMDLINE_VERITY,
    CMDLINE_VERITY_DATA_BLOCKS,
    "basalt.root",
    "basalt.watchdog",
];

/// What the command line tells init.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BootArgs {
    pub slot: Option<Slot>,
    pub verity: Option<String>,
    /// MBR boards: the partition number of this slot's root (`basalt.root=5`).
    pub root_partition: Option<u32>,
    /// `basalt.watchdog=0|1`: arm `/dev/watchdog` (default yes).
    pub watchdog: Option<bool>,
    /// Data blocks (4096 bytes) covered by the verity tree.
    pub verity_data_blocks: Option<u64>,
    /// `basalt.trial=1`: a trial boot of the slot (default no).
    pub trial: bool,
    /// Problems to report as `basalt: error` lines (unknown keys, bad values).
    pub problems: Vec<String>,
}

/// Split a command line into words, honouring double quotes the way the
/// kernel does (`key="a b"` is one word, quotes removed).
pub fn words(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

pub fn parse(cmdline: &str) -> BootArgs {
    let mut args = BootArgs::default();
    for w in words(cmdline) {
        let (key, value) = match w.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (w.as_str(), None),
        };
        if !key.starts_with("basalt.") {
            continue;
        }
        if !KNOWN_KEYS.contains(&key) {
            args.problems.push(format!("unknown key {key}"));
            continue;
        }
        match (key, value) {
            (CMDLINE_SLOT, Some(v)) => match Slot::parse(v) {
                Some(s) => args.slot = Some(s),
                None => args.problems.push(format!("bad value {key}={v}")),
            },
            (CMDLINE_VERITY_DATA_BLOCKS, Some(v)) => match v.parse::<u64>() {
                Ok(n) if n > 0 => args.verity_data_blocks = Some(n),
                _ => args.problems.push(format!("bad value {key}={v}")),
            },
            (CMDLINE_VERITY, Some(v)) => {
                if v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) {
                    args.verity = Some(v.to_ascii_lowercase());
                } else {
                    args.problems.push(format!("bad value {key}={v}"));
                }
            }
            ("basalt.watchdog", Some(v)) => match v {
                "0" => args.watchdog = Some(false),
                "1" => args.watchdog = Some(true),
                _ => args.problems.push(format!("bad value {key}={v}")),
            },
            (CMDLINE_TRIAL, Some(v)) => match v {
                "0" => args.trial = false,
                "1" => args.trial = true,
                _ => args.problems.push(format!("bad value {key}={v}")),
            },
            ("basalt.root", Some(v)) => match v.parse::<u32>() {
                Ok(n) if (1..=63).contains(&n) => args.root_partition = Some(n),
                _ => args.problems.push(format!("bad value {key}={v}")),
            },
            (k, None) => args.problems.push(format!("missing value for {k}")),
            _ => {}
        }
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases: &[(&str, Option<Slot>, usize)] = &[
            ("console=ttyS0,115200 basalt.slot=a", Some(Slot::A), 0),
            ("basalt.slot=b quiet\n", Some(Slot::B), 0),
            ("basalt.slot=c", None, 1),
            ("basalt.slot", None, 1),
            ("root=/dev/x basalt.bogus=1 basalt.slot=a", Some(Slot::A), 1),
            ("", None, 0),
            ("init=\"/x y\" basalt.slot=b", Some(Slot::B), 0),
            ("abasalt.slot=a", None, 0),
            ("basalt.slot=a basalt.slot=b", Some(Slot::B), 0),
        ];
        for (line, slot, problems) in cases {
            let a = parse(line);
            assert_eq!(a.slot, *slot, "{line}");
            assert_eq!(a.problems.len(), *problems, "{line}: {:?}", a.problems);
        }
    }

    #[test]
    fn trial() {
        assert!(!parse("basalt.slot=b").trial);
        let a = parse("console=ttyS0 panic=10 basalt.trial=1 basalt.slot=b");
        assert!(a.trial && a.problems.is_empty());
        assert_eq!(a.slot, Some(Slot::B));
        assert!(!parse("basalt.trial=0").trial);
        for bad in ["basalt.trial=yes", "basalt.trial"] {
            let a = parse(bad);
            assert!(!a.trial, "{bad}");
            assert_eq!(a.problems.len(), 1, "{bad}: {:?}", a.problems);
        }
    }

    #[test]
    fn quotes() {
        assert_eq!(words("a=\"b c\" d"), vec!["a=b c", "d"]);
        assert_eq!(words("  x  "), vec!["x"]);
    }

    #[test]
    fn verity() {
        let h = "A".repeat(64);
        assert_eq!(
            parse(&format!("basalt.verity={h}")).verity,
            Some("a".repeat(64))
        );
        assert_eq!(parse("basalt.verity=abc").problems.len(), 1);
        let a = parse(&format!("basalt.verity={h} basalt.verity_data_blocks=12"));
        assert_eq!(a.verity_data_blocks, Some(12));
        assert!(a.problems.is_empty());
        assert_eq!(parse("basalt.verity_data_blocks=0").problems.len(), 1);
        assert_eq!(parse("basalt.verity_data_blocks=x").problems.len(), 1);
    }
}
