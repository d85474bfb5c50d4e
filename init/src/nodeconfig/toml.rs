//! TOML (`node.toml`) into the value tree, through the toml crate's spanned
//! document parser (which also refuses duplicate keys and tables), or
//! through init's small reader for the TOML tools write ([`parse_subset`]).

use toml::de::{DeTable, DeValue};

use super::tree::{Entry, Kind, LineIndex, Pos, Value};

/// Parse a TOML document into the tree.
pub fn parse(text: &str) -> Result<Value, (Pos, String)> {
    let root = DeTable::parse(text).map_err(|err| {
        let pos = err
            .span()
            .map_or(Pos::START, |s| Pos::of_offset(text, s.start));
        let mut message = err.message().trim().to_owned();
        if message == "duplicate key"
            && let Some(span) = err.span()
            && let Some(key) = text.get(span.clone())
        {
            message = format!("duplicate key `{}`", super::check::shorten(key.trim()));
        }
        (pos, format!("TOML: {message}"))
    })?;
    let span = root.span();
    let ix = LineIndex::new(text);
    Ok(Value {
        kind: table(&ix, root.into_inner()),
        pos: ix.pos(span.start),
    })
}

/// The document through `tomlfast` (the subset of TOML that tools write:
/// no dotted keys, floats or dates), every position
/// the start of the file: `None` outside the subset. Used only when the
/// config then decodes without a single problem (`load_toml`), so none of
/// these positions is ever shown: a config with a problem is read again by
/// [`parse`], whose positions the diagnostics carry.
pub fn parse_subset(text: &str) -> Option<Value> {
    crate::tomlfast::parse(text).map(subset_value)
}

fn subset_value(v: crate::tomlfast::Val) -> Value {
    use crate::tomlfast::Val;
    let kind = match v {
        Val::Str(s) => Kind::Str(s),
        Val::Int(value) => Kind::Int {
            value: i128::from(value),
            radix: 10,
        },
        Val::Based(value, radix) => Kind::Int {
            value: i128::from(value),
            radix,
        },
        Val::Bool(b) => Kind::Bool(b),
        Val::Arr(items) => Kind::Seq(items.into_iter().map(subset_value).collect()),
        Val::Table(t) => Kind::Map(
            t.into_iter()
                .map(|(key, v)| Entry {
                    key,
                    key_pos: Pos::START,
                    value: subset_value(v),
                })
                .collect(),
        ),
    };
    Value {
        kind,
        pos: Pos::START,
    }
}

fn table(ix: &LineIndex<'_>, t: DeTable<'_>) -> Kind {
    let mut entries: Vec<Entry> = t
        .into_iter()
        .map(|(k, v)| {
            let key_pos = ix.pos(k.span().start);
            let value_span = v.span();
            let mut value = value(ix, v.into_inner(), ix.pos(value_span.start));
            // A table's own span may be empty (implicit or dotted tables):
            // point at its key, which is what the user wrote.
            if matches!(value.kind, Kind::Map(_)) {
                value.pos = key_pos;
            }
            Entry {
                key: k.into_inner().into_owned(),
                key_pos,
                value,
            }
        })
        .collect();
    entries.sort_by_key(|e| e.key_pos);
    Kind::Map(entries)
}

fn value(ix: &LineIndex<'_>, v: DeValue<'_>, pos: Pos) -> Value {
    let kind = match v {
        DeValue::String(s) => Kind::Str(s.into_owned()),
        DeValue::Integer(i) => {
            let radix = i.radix();
            match i128::from_str_radix(i.as_str(), radix) {
                Ok(value) => Kind::Int { value, radix },
                // Out of i128 range: no setting takes such a number.
                Err(_) => Kind::Int {
                    value: i128::MAX,
                    radix,
                },
            }
        }
        DeValue::Float(f) => Kind::Float(f.as_str().parse().unwrap_or(f64::NAN)),
        DeValue::Boolean(b) => Kind::Bool(b),
        DeValue::Datetime(d) => Kind::Datetime(d.to_string()),
        DeValue::Array(items) => Kind::Seq(
            items
                .into_iter()
                .map(|item| {
                    let p = ix.pos(item.span().start);
                    value(ix, item.into_inner(), p)
                })
                .collect(),
        ),
        DeValue::Table(t) => table(ix, t),
    };
    Value { kind, pos }
}
