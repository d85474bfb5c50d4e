//! YAML (cloud-init) into the value tree, through serde-saphyr.
//!
//! serde-saphyr's budget stays on: it is what stops alias bombs and runaway
//! nesting in a file anyone with the SD card can write. Keys must be scalars;
//! duplicate keys are errors.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{Budget, DuplicateKeyPolicy, MessageFormatter, Spanned, UserMessageFormatter};

use super::tree::{Entry, Kind, Pos, Value};

/// The most scalar text one YAML file may hold (files are capped at 2 MiB anyway).
pub const MAX_YAML_BYTES: usize = 2 * 1024 * 1024;

/// Parse one YAML document into the tree. An empty document (or only
/// comments) is `Kind::Null` at 1:1.
pub fn parse(text: &str) -> Result<Value, (Pos, String)> {
    let mut budget = Budget::default();
    budget.max_depth = 32;
    budget.max_nodes = 20_000;
    budget.max_documents = 1;
    budget.max_aliases = 1_000;
    budget.max_total_scalar_bytes = MAX_YAML_BYTES;
    let options = serde_saphyr::options! {
        budget: Some(budget),
        duplicate_keys: DuplicateKeyPolicy::Error,
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        legacy_octal_numbers: false,
        with_snippet: false,
    };
    if text.trim().is_empty()
        || text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Ok(Value {
            kind: Kind::Null,
            pos: Pos::START,
        });
    }
    let root: Result<Spanned<Raw>, _> = serde_saphyr::from_str_with_options(text, options);
    match root {
        Ok(root) => root
            .value
            .into_value(pos_of(&root.referenced))
            .map_err(|(pos, msg)| {
                (
                    if pos.line == 0 {
                        explicit_key(text)
                    } else {
                        pos
                    },
                    msg,
                )
            }),
        Err(err) => {
            let pos = err.location().map_or(Pos::START, |l| error_pos(text, &l));
            Err((pos, message_of(&err)))
        }
    }
}

/// Where the first explicit (`? `) key starts: the only way to write a
/// list or mapping as a key in block style, and serde-saphyr gives no
/// location for it.
fn explicit_key(text: &str) -> Pos {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed.starts_with("? ") || trimmed.trim_end() == "?" {
            return Pos::of_offset(text, offset + (line.len() - trimmed.len()));
        }
        offset += line.len();
    }
    Pos::START
}

/// An error's position. YAML also breaks lines at a lone `\r`, which
/// editors and the rest of the node config count as part of a line: in such
/// a text the position is taken again from the byte offset (else clamped to
/// the last line), so it points where an editor shows it.
fn error_pos(text: &str, loc: &serde_saphyr::Location) -> Pos {
    let pos = pos_of(loc);
    let lone_cr = text
        .as_bytes()
        .windows(2)
        .any(|w| matches!(w, [b'\r', next] if *next != b'\n'))
        || text.ends_with('\r');
    if !lone_cr {
        return pos;
    }
    let lines = text.split('\n').count();
    let span = loc.span();
    let byte = span
        .byte_offset()
        .and_then(|o| usize::try_from(o).ok())
        .or_else(|| {
            let chars = usize::try_from(span.offset()).ok()?;
            Some(
                text.char_indices()
                    .nth(chars)
                    .map_or(text.len(), |(i, _)| i),
            )
        });
    match byte {
        Some(o) => Pos::of_offset(text, o),
        None if usize::try_from(pos.line).is_ok_and(|l| l > lines) => Pos {
            line: u32::try_from(lines).unwrap_or(u32::MAX),
            column: 1,
        },
        None => pos,
    }
}

fn pos_of(loc: &serde_saphyr::Location) -> Pos {
    let line = loc.line().max(1);
    let column = loc.column().max(1);
    Pos {
        line: u32::try_from(line).unwrap_or(u32::MAX),
        column: u32::try_from(column).unwrap_or(u32::MAX),
    }
}

/// The error's own words, without location or snippet. Taken from the
/// formatter directly (not `Display`), so serde-saphyr's snippet renderer is
/// never linked into PID 1.
fn message_of(err: &serde_saphyr::Error) -> String {
    let mut err = err;
    while let serde_saphyr::Error::AliasError { error, .. }
    | serde_saphyr::Error::WithSnippet { error, .. } = err
    {
        err = error;
    }
    let text = UserMessageFormatter.format_message(err);
    let text: String = text.chars().filter(|c| !c.is_control()).collect();
    let text = text
        .split(", set DuplicateKeyPolicy")
        .next()
        .unwrap_or(&text);
    if text.contains("budget breached") || matches!(err, serde_saphyr::Error::Budget { .. }) {
        let what = if text.contains("Documents") || text.contains("documents") {
            "more than one YAML document (`---`); use one".to_owned()
        } else {
            format!("too large or too deeply nested for a node config, refused ({text})")
        };
        return format!("YAML: {what}");
    }
    format!("YAML: {text}")
}

/// What serde-saphyr hands us; positions are attached by the `Spanned` around it.
enum Raw {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<Raw>>),
    Map(Vec<(Spanned<Raw>, Spanned<Raw>)>),
}

impl Raw {
    fn into_value(self, pos: Pos) -> Result<Value, (Pos, String)> {
        let kind = match self {
            Raw::Null => Kind::Null,
            Raw::Bool(b) => Kind::Bool(b),
            Raw::Int(value) => Kind::Int { value, radix: 10 },
            Raw::Float(f) => Kind::Float(f),
            Raw::Str(s) => Kind::Str(s),
            Raw::Seq(items) => Kind::Seq(
                items
                    .into_iter()
                    .map(|s| s.value.into_value(pos_of(&s.referenced)))
                    .collect::<Result<_, _>>()?,
            ),
            Raw::Map(entries) => Kind::Map(
                entries
                    .into_iter()
                    .map(|(k, v)| {
                        let key_pos = pos_of(&k.referenced);
                        let key = match k.value {
                            Raw::Str(s) => s,
                            Raw::Null => "null".to_owned(),
                            Raw::Bool(b) => b.to_string(),
                            Raw::Int(i) => i.to_string(),
                            Raw::Float(f) => f.to_string(),
                            Raw::Seq(_) | Raw::Map(_) => {
                                // Complex keys carry no location: `parse` finds it.
                                let at = if k.referenced.line() == 0 {
                                    Pos { line: 0, column: 0 }
                                } else {
                                    key_pos
                                };
                                return Err((
                                    at,
                                    "YAML: keys must be plain scalars, not lists or mappings"
                                        .to_owned(),
                                ));
                            }
                        };
                        let mut value = v.value.into_value(pos_of(&v.referenced))?;
                        // A mapping's own position is its first key; point at
                        // the key that names it instead, as for TOML tables.
                        if matches!(value.kind, Kind::Map(_)) {
                            value.pos = key_pos;
                        }
                        Ok(Entry {
                            key,
                            key_pos,
                            value,
                        })
                    })
                    .collect::<Result<_, _>>()?,
            ),
        };
        Ok(Value { kind, pos })
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }
    fn visit_none<E>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
        Raw::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Raw, E> {
        Ok(Raw::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Raw, E> {
        Ok(Raw::Int(i128::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Raw, E> {
        Ok(Raw::Int(i128::from(v)))
    }
    fn visit_i128<E>(self, v: i128) -> Result<Raw, E> {
        Ok(Raw::Int(v))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Raw, E> {
        i128::try_from(v)
            .map(Raw::Int)
            .map_err(|_| E::custom("integer too large"))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Raw, E> {
        Ok(Raw::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Raw, E> {
        Ok(Raw::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Raw, E> {
        Ok(Raw::Str(v))
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Raw, E> {
        String::from_utf8(v.to_vec())
            .map(Raw::Str)
            .map_err(|_| E::custom("binary values are not supported"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Raw>>()? {
            items.push(item);
        }
        Ok(Raw::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<Raw>>()? {
            let value = map.next_value::<Spanned<Raw>>()?;
            entries.push((key, value));
        }
        Ok(Raw::Map(entries))
    }
}
