//! OS version order and `compatible_from` patterns. Versions are compared
//! segment by segment: runs of digits numerically, other runs as text, so
//! `0.10.0 > 0.9.1` and `1.0.0 > 1.0.0-rc1` is *not* assumed (a suffix makes
//! a version greater, as in `rpmvercmp` without `~`): use plain numbers.

use std::cmp::Ordering;

fn segments(v: &str) -> Vec<Result<u64, &str>> {
    let mut out = Vec::new();
    let b = v.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_alphanumeric() {
            i += 1;
            continue;
        }
        let digit = b[i].is_ascii_digit();
        let start = i;
        while i < b.len() && b[i].is_ascii_alphanumeric() && b[i].is_ascii_digit() == digit {
            i += 1;
        }
        let s = &v[start..i];
        out.push(if digit {
            s.parse::<u64>().map_err(|_| s)
        } else {
            Err(s)
        });
    }
    out
}

/// Compare two OS versions.
pub fn compare(a: &str, b: &str) -> Ordering {
    let (sa, sb) = (segments(a), segments(b));
    for (x, y) in sa.iter().zip(&sb) {
        let o = match (x, y) {
            (Ok(x), Ok(y)) => x.cmp(y),
            // A number is newer than text in the same position.
            (Ok(_), Err(_)) => Ordering::Greater,
            (Err(_), Ok(_)) => Ordering::Less,
            (Err(x), Err(y)) => x.cmp(y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    sa.len().cmp(&sb.len())
}

/// Whether `version` matches one of `patterns` (`*`, `0.1.*` prefix, or exact).
/// An empty list matches everything.
pub fn compatible(version: &str, patterns: &[String]) -> bool {
    patterns.is_empty()
        || patterns.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => version.starts_with(prefix),
            None => p == version,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order() {
        for (a, b) in [
            ("0.2.0", "0.1.0"),
            ("0.10.0", "0.9.9"),
            ("1.0", "0.99"),
            ("1.0.1", "1.0"),
            ("2026.1", "2025.12"),
        ] {
            assert_eq!(compare(a, b), Ordering::Greater, "{a} > {b}");
            assert_eq!(compare(b, a), Ordering::Less, "{b} < {a}");
        }
        assert_eq!(compare("0.1.0", "0.1.0"), Ordering::Equal);
    }

    #[test]
    fn patterns() {
        assert!(compatible("0.1.3", &[]));
        assert!(compatible("0.1.3", &["*".into()]));
        assert!(compatible("0.1.3", &["0.1.*".into()]));
        assert!(!compatible("0.2.0", &["0.1.*".into(), "0.3.0".into()]));
        assert!(compatible("0.3.0", &["0.1.*".into(), "0.3.0".into()]));
    }
}
