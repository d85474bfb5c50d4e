//! Dependency syntax (REFERENCE.md §5.4): `[!]name[@tag][op version]`, with ops
//! `<` `<=` `=` `>=` `>` `~` (fuzzy prefix) `<~` `>~` and `><Q1…` (pin to a package
//! checksum). The same syntax is used for `D:`, `i:`, `r:`, world entries and,
//! without operators other than `=`, for provides.

use std::cmp::Ordering;
use std::fmt;

use super::version;

#[derive(Debug, thiserror::Error)]
pub enum DepError {
    #[error("dependency {0:?} is empty")]
    Empty(String),
    #[error("dependency {dep:?}: name {name:?} has characters apk does not allow")]
    BadName { dep: String, name: String },
    #[error("dependency {dep:?}: unknown version operator {op:?}")]
    BadOperator { dep: String, op: String },
    #[error("dependency {dep:?}: {version:?} is not a valid Alpine version")]
    BadVersion { dep: String, version: String },
    #[error("provide {0:?} must be `name` or `name=version`")]
    BadProvide(String),
}

/// Which comparison results a version constraint accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    pub less: bool,
    pub equal: bool,
    pub greater: bool,
    /// `~`: equality is a prefix match (`~1.2` accepts `1.2.7-r3`).
    pub fuzzy: bool,
}

impl Op {
    fn parse(s: &str) -> Option<Op> {
        let (less, equal, greater, fuzzy) = match s {
            "<" => (true, false, false, false),
            "<=" => (true, true, false, false),
            "=" => (false, true, false, false),
            ">=" => (false, true, true, false),
            ">" => (false, false, true, false),
            "~" | "=~" => (false, true, false, true),
            "<~" => (true, true, false, true),
            ">~" => (false, true, true, true),
            _ => return None,
        };
        Some(Op {
            less,
            equal,
            greater,
            fuzzy,
        })
    }

    fn as_str(self) -> &'static str {
        match (self.less, self.equal, self.greater, self.fuzzy) {
            (true, false, false, _) => "<",
            (true, true, false, false) => "<=",
            (false, true, false, false) => "=",
            (false, true, true, false) => ">=",
            (false, false, true, _) => ">",
            (false, true, false, true) => "~",
            (true, true, false, true) => "<~",
            (false, true, true, true) => ">~",
            _ => "?",
        }
    }

    /// Does `candidate` satisfy `op wanted`?
    pub fn accepts(self, candidate: &str, wanted: &str) -> bool {
        match version::compare_fuzzy(candidate, wanted, self.fuzzy) {
            Ordering::Less => self.less,
            Ordering::Equal => self.equal,
            Ordering::Greater => self.greater,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Constraint {
    Version {
        op: Op,
        version: String,
    },
    /// `><Q1…`: only the package with this identity checksum.
    Checksum(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    pub name: String,
    /// `!name`: must not be installed (or, with a constraint, not in that range).
    pub conflict: bool,
    /// `name@tag`: may come from the repository tagged `tag`.
    pub tag: Option<String>,
    pub constraint: Option<Constraint>,
}

fn name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-:/,[]".contains(&b))
}

impl Dependency {
    pub fn parse(s: &str) -> Result<Dependency, DepError> {
        let orig = s;
        let s = s.trim();
        if s.is_empty() {
            return Err(DepError::Empty(orig.to_string()));
        }
        let (conflict, s) = match s.strip_prefix('!') {
            Some(r) => (true, r),
            None => (false, s),
        };
        let op_start = s.find(['<', '>', '=', '~']).unwrap_or(s.len());
        let (name_tag, rest) = s.split_at(op_start);
        let (name, tag) = match name_tag.split_once('@') {
            Some((n, t)) => (n, Some(t.to_string())),
            None => (name_tag, None),
        };
        if !name_ok(name) || tag.as_deref().is_some_and(|t| !name_ok(t)) {
            return Err(DepError::BadName {
                dep: orig.to_string(),
                name: name_tag.to_string(),
            });
        }
        let constraint = if rest.is_empty() {
            None
        } else if let Some(sum) = rest.strip_prefix("><") {
            Some(Constraint::Checksum(sum.to_string()))
        } else {
            let op_len = rest
                .find(|c: char| !matches!(c, '<' | '>' | '=' | '~'))
                .unwrap_or(rest.len());
            let (op_s, ver) = rest.split_at(op_len);
            let op = Op::parse(op_s).ok_or_else(|| DepError::BadOperator {
                dep: orig.to_string(),
                op: op_s.to_string(),
            })?;
            if !version::is_valid(ver) {
                return Err(DepError::BadVersion {
                    dep: orig.to_string(),
                    version: ver.to_string(),
                });
            }
            Some(Constraint::Version {
                op,
                version: ver.to_string(),
            })
        };
        Ok(Dependency {
            name: name.to_string(),
            conflict,
            tag,
            constraint,
        })
    }

    /// Parse a space-separated list (`D:`, `i:`, `r:` lines).
    pub fn parse_list(s: &str) -> Result<Vec<Dependency>, DepError> {
        s.split_whitespace().map(Dependency::parse).collect()
    }

    /// Does a package (or provide) at `version` with identity `checksum` satisfy the
    /// version part of this dependency? `version == None` is an unversioned
    /// (virtual) provide: it only satisfies an unconstrained dependency.
    pub fn version_matches(&self, version: Option<&str>, checksum: Option<&str>) -> bool {
        match (&self.constraint, version) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(Constraint::Version { op, version: want }), Some(have)) => op.accepts(have, want),
            (Some(Constraint::Checksum(want)), Some(_)) => checksum == Some(want.as_str()),
        }
    }
}

impl fmt::Display for Dependency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.conflict {
            f.write_str("!")?;
        }
        f.write_str(&self.name)?;
        if let Some(t) = &self.tag {
            write!(f, "@{t}")?;
        }
        match &self.constraint {
            None => Ok(()),
            Some(Constraint::Version { op, version }) => write!(f, "{}{version}", op.as_str()),
            Some(Constraint::Checksum(c)) => write!(f, "><{c}"),
        }
    }
}

/// A `p:` entry: a name this package also answers to, with or without a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provide {
    pub name: String,
    /// `None` = virtual: never auto-selected unless the package has a `provider_priority`.
    pub version: Option<String>,
}

impl Provide {
    pub fn parse(s: &str) -> Result<Provide, DepError> {
        let (name, version) = match s.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (s, None),
        };
        // Real indexes carry provides such as `pc:librtmp=v2.4`: the version is kept
        // as written (it then compares as apk compares invalid versions).
        if !name_ok(name) || version.as_deref().is_some_and(str::is_empty) {
            return Err(DepError::BadProvide(s.to_string()));
        }
        Ok(Provide {
            name: name.to_string(),
            version,
        })
    }

    pub fn parse_list(s: &str) -> Result<Vec<Provide>, DepError> {
        s.split_whitespace().map(Provide::parse).collect()
    }
}

impl fmt::Display for Provide {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.version {
            Some(v) => write!(f, "{}={v}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_forms() {
        let d = Dependency::parse("so:libc.musl-x86_64.so.1").unwrap();
        assert_eq!(d.name, "so:libc.musl-x86_64.so.1");
        assert!(d.constraint.is_none());
        let d = Dependency::parse("!busybox-suid<1.2").unwrap();
        assert!(d.conflict);
        assert_eq!(d.name, "busybox-suid");
        assert_eq!(d.to_string(), "!busybox-suid<1.2");
        let d = Dependency::parse("linux-lts@edge>=5.15.80-r0").unwrap();
        assert_eq!(d.tag.as_deref(), Some("edge"));
        assert_eq!(d.to_string(), "linux-lts@edge>=5.15.80-r0");
        let d = Dependency::parse("musl><Q1abc=").unwrap();
        assert_eq!(d.constraint, Some(Constraint::Checksum("Q1abc=".into())));
        let d = Dependency::parse("python3~3.10").unwrap();
        assert!(d.version_matches(Some("3.10.8-r0"), None));
        assert!(!d.version_matches(Some("3.11.0-r0"), None));
        assert!(Dependency::parse("cmd:[").is_ok());
        assert!(Dependency::parse("pc:glib-2.0>=2.70").is_ok());
    }

    #[test]
    fn operators() {
        let cases: &[(&str, &str, bool)] = &[
            ("a<2", "1.9", true),
            ("a<2", "2", false),
            ("a<=2", "2", true),
            ("a=2-r1", "2-r1", true),
            ("a=2-r1", "2-r2", false),
            ("a>=2", "2.0.1", true),
            ("a>2", "2", false),
            ("a<~2.1", "2.1.9", true),
            ("a<~2.1", "2.2", false),
            ("a>~2.1", "2.1.0", true),
            ("a>~2.1", "2.0", false),
        ];
        for (dep, have, want) in cases {
            let d = Dependency::parse(dep).unwrap();
            assert_eq!(
                d.version_matches(Some(have), None),
                *want,
                "{dep} vs {have}"
            );
        }
        // A virtual provide never satisfies a versioned dependency.
        assert!(
            !Dependency::parse("a>1")
                .unwrap()
                .version_matches(None, None)
        );
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "!", "a<=>1", "a>=x1", "a b", "@tag", "a=1.0_foo"] {
            assert!(Dependency::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Provide::parse("cmd:sh=1.35.0-r17").is_ok());
        assert!(Provide::parse("=1").is_err());
        assert!(Provide::parse("a=").is_err());
    }
}
