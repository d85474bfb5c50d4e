//! Alpine version ordering (REFERENCE.md §5.2), following apk-tools' tokenizer:
//! `num{.num}{letter}{_suffix{num}}{~hash}{-rN}`.
//!
//! Versions are compared token by token. Numbers after a `.` that start with `0`
//! compare as fractions (apk gives leading zeros a negative weight: `1.01 < 1.1`),
//! a letter sorts after no letter (`1.0a > 1.0`), pre-release suffixes
//! (`_alpha _beta _pre _rc`) sort before the plain version and post-release ones
//! (`_cvs _svn _git _hg _p`) after it, the `~hash` commit marker does not order,
//! and `-rN` is the final revision. When one version is a prefix of the other, the
//! longer one is newer unless what follows is a pre-release suffix.
//!
//! One deliberate deviation from apk-tools 2.x: after a lone `0` component apk
//! expects more digits, so it orders `1.0_rc1` *after* `1.0`; here a lone `0` is
//! an ordinary number and `1.0_rc1 < 1.0`, as the suffix rules state.

use std::cmp::Ordering;

/// Token kinds, in apk's order: a version may only move "forward" through them
/// (with the exceptions apk allows: `.` after a digit, another suffix after a
/// suffix number, a digit after a letter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Tok {
    DigitOrZero = 0,
    Digit = 1,
    Letter = 2,
    Suffix = 3,
    SuffixNo = 4,
    Hash = 5,
    Revision = 6,
    End = 7,
    Invalid = 8,
}

const PRE: [&str; 4] = ["alpha", "beta", "pre", "rc"];
const POST: [&str; 5] = ["cvs", "svn", "git", "hg", "p"];

struct Lexer<'a> {
    s: &'a [u8],
    kind: Tok,
}

impl<'a> Lexer<'a> {
    fn new(s: &'a str) -> Lexer<'a> {
        Lexer {
            s: s.as_bytes(),
            kind: Tok::Digit,
        }
    }

    /// Decide the kind of the next token from the separator at the cursor.
    fn next_kind(&mut self) {
        let prev = self.kind;
        let Some(&c) = self.s.first() else {
            self.kind = Tok::End;
            return;
        };
        let mut n = Tok::Invalid;
        if matches!(prev, Tok::Digit | Tok::DigitOrZero) && c.is_ascii_lowercase() {
            n = Tok::Letter;
        } else if prev == Tok::Letter && c.is_ascii_digit() {
            n = Tok::Digit;
        } else if prev == Tok::Suffix && c.is_ascii_digit() {
            n = Tok::SuffixNo;
        } else {
            match c {
                b'.' => n = Tok::DigitOrZero,
                b'_' => n = Tok::Suffix,
                b'~' => n = Tok::Hash,
                b'-' if self.s.get(1) == Some(&b'r') => {
                    n = Tok::Revision;
                    self.s = &self.s[1..];
                }
                _ => {}
            }
            self.s = &self.s[1..];
        }
        if n < prev
            && !((n == Tok::DigitOrZero && prev == Tok::Digit)
                || (n == Tok::Suffix && prev == Tok::SuffixNo)
                || (n == Tok::Digit && prev == Tok::Letter))
        {
            n = Tok::Invalid;
        }
        self.kind = n;
    }

    /// Value of the token at the cursor; advances to the next one.
    fn value(&mut self) -> i64 {
        if self.s.is_empty() {
            self.kind = Tok::End;
            return 0;
        }
        let mut i = 0usize;
        let mut v: i64 = 0;
        let mut forced: Option<Tok> = None;
        match self.kind {
            Tok::DigitOrZero if self.s[0] == b'0' => {
                while i < self.s.len() && self.s[i] == b'0' {
                    i += 1;
                }
                v = -(i as i64);
                // apk forces the next token to be a digit run here even when no
                // digit follows, which orders `1.0_rc1` after `1.0`; Basalt only
                // does so when digits follow (`1.01`), so pre-releases of `x.0` sort
                // before it as the suffix rules intend.
                if self.s.get(i).is_some_and(u8::is_ascii_digit) {
                    forced = Some(Tok::Digit);
                }
            }
            Tok::DigitOrZero | Tok::Digit | Tok::SuffixNo | Tok::Revision => {
                while i < self.s.len() && self.s[i].is_ascii_digit() {
                    v = v
                        .saturating_mul(10)
                        .saturating_add(i64::from(self.s[i] - b'0'));
                    i += 1;
                }
            }
            Tok::Letter => {
                v = i64::from(self.s[0]);
                i = 1;
            }
            Tok::Suffix => {
                if let Some((k, p)) = PRE
                    .iter()
                    .enumerate()
                    .find(|(_, p)| self.s.starts_with(p.as_bytes()))
                {
                    v = k as i64 - PRE.len() as i64;
                    i = p.len();
                } else if let Some((k, p)) = POST
                    .iter()
                    .enumerate()
                    .find(|(_, p)| self.s.starts_with(p.as_bytes()))
                {
                    v = k as i64;
                    i = p.len();
                } else {
                    self.kind = Tok::Invalid;
                    return -1;
                }
            }
            Tok::Hash => {
                // A commit hash: skipped, it carries no order.
                while i < self.s.len() && self.s[i].is_ascii_hexdigit() {
                    i += 1;
                }
            }
            Tok::End | Tok::Invalid => {
                self.kind = Tok::Invalid;
                return -1;
            }
        }
        self.s = &self.s[i..];
        if self.s.is_empty() {
            self.kind = Tok::End;
        } else if let Some(f) = forced {
            self.kind = f;
        } else {
            self.next_kind();
        }
        v
    }
}

/// Is `v` a well-formed Alpine version?
pub fn is_valid(v: &str) -> bool {
    if v.is_empty() || !v.as_bytes()[0].is_ascii_digit() {
        return false;
    }
    let mut l = Lexer::new(v);
    while l.kind != Tok::End {
        l.value();
        if l.kind == Tok::Invalid {
            return false;
        }
    }
    true
}

/// Compare two versions. With `fuzzy`, `b` is a prefix pattern: `1.2.3` matches
/// `1.2` (the `~` operator).
pub fn compare_fuzzy(a: &str, b: &str, fuzzy: bool) -> Ordering {
    let mut la = Lexer::new(a);
    let mut lb = Lexer::new(b);
    let (mut av, mut bv) = (0i64, 0i64);
    while la.kind == lb.kind && la.kind != Tok::End && la.kind != Tok::Invalid && av == bv {
        av = la.value();
        bv = lb.value();
    }
    if av != bv {
        return av.cmp(&bv);
    }
    if la.kind == lb.kind || (fuzzy && lb.kind == Tok::End) {
        return Ordering::Equal;
    }
    // Equal so far and one side has more: more is newer, unless it is a pre-release suffix.
    if la.kind == Tok::Suffix {
        let mut t = Lexer {
            s: la.s,
            kind: la.kind,
        };
        if t.value() < 0 {
            return Ordering::Less;
        }
    }
    if lb.kind == Tok::Suffix {
        let mut t = Lexer {
            s: lb.s,
            kind: lb.kind,
        };
        if t.value() < 0 {
            return Ordering::Greater;
        }
    }
    // A later token kind means "ran out sooner" in apk's ordering (End is last).
    lb.kind.cmp(&la.kind)
}

/// Total order used to pick the newest package.
pub fn compare(a: &str, b: &str) -> Ordering {
    compare_fuzzy(a, b, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Ordering::*;

    #[test]
    fn tricky_pairs() {
        let table: &[(&str, &str, Ordering)] = &[
            ("1.0", "1.0", Equal),
            ("1.0", "1.0-r0", Less),
            ("1.0-r0", "1.0-r0", Equal),
            ("1.0-r1", "1.0-r0", Greater),
            ("1.0-r10", "1.0-r9", Greater),
            ("1.10", "1.9", Greater),
            ("1.0.1", "1.0", Greater),
            ("1.0", "1.0.0", Less),
            ("1.01", "1.1", Less),
            ("1.001", "1.01", Less),
            ("1.0a", "1.0", Greater),
            ("1.0b", "1.0a", Greater),
            ("1.0_alpha", "1.0", Less),
            ("1.0_alpha", "1.0_beta", Less),
            ("1.0_beta", "1.0_pre", Less),
            ("1.0_pre", "1.0_rc", Less),
            ("1.0_rc1", "1.0", Less),
            ("1.0_rc2", "1.0_rc10", Less),
            ("1.0_p1", "1.0", Greater),
            ("1.0_cvs", "1.0_svn", Less),
            ("1.0_svn", "1.0_git", Less),
            ("1.0_git", "1.0_hg", Less),
            ("1.0_hg", "1.0_p", Less),
            ("1.0_p1", "1.0_p2", Less),
            ("1.0_rc1", "1.0.1", Less),
            ("1.0_git20220101", "1.0_git20211231", Greater),
            ("2.0_alpha1", "1.9.9", Greater),
            ("1.35.0-r17", "1.35.0-r9", Greater),
            ("6.1.2-r0", "6.1.10-r0", Less),
            ("1.2.3~abcdef-r0", "1.2.3~012345-r0", Equal),
            ("1.2.3~abcdef-r1", "1.2.3~012345-r0", Greater),
            ("5.15.79-r0", "5.15.80-r0", Less),
            ("20220614-r0", "20211220-r0", Greater),
            ("1.0-r1", "1.0_p1-r0", Less),
        ];
        for (a, b, want) in table {
            assert_eq!(compare(a, b), *want, "{a} vs {b}");
            assert_eq!(compare(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn fuzzy_prefix() {
        assert_eq!(compare_fuzzy("1.2.3", "1.2", true), Equal);
        assert_eq!(compare_fuzzy("1.2.3-r4", "1.2.3", true), Equal);
        assert_eq!(compare_fuzzy("1.3", "1.2", true), Greater);
        assert_eq!(compare_fuzzy("1.2.3", "1.2", false), Greater);
    }

    #[test]
    fn validity() {
        for v in [
            "1",
            "1.0",
            "1.0a_rc1-r3",
            "1.0_p1",
            "0.1~abc-r0",
            "20220614-r0",
        ] {
            assert!(is_valid(v), "{v}");
        }
        for v in ["", "a1", "1.0-x", "1.0_foo", "1.0_rc1.x"] {
            assert!(!is_valid(v), "{v}");
        }
    }
}
