//! A syntax-neutral value tree with a source position on every node.
//!
//! Both syntaxes (TOML and YAML) are first parsed into this tree; the schema
//! decoder then reads only the tree, so a key means the same thing whichever
//! syntax carried it, and every error can point at a line and column.

use std::fmt;

/// A 1-based line and column (columns count characters, not bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos {
    pub line: u32,
    pub column: u32,
}

impl Pos {
    /// The start of a file: where whole-file problems are reported.
    pub const START: Pos = Pos { line: 1, column: 1 };

    /// The position of byte `offset` in `text` (clamped to the text, and to a
    /// character boundary).
    pub fn of_offset(text: &str, offset: usize) -> Pos {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
        let column = before[line_start..].chars().count() + 1;
        Pos {
            line: u32::try_from(line).unwrap_or(u32::MAX),
            column: u32::try_from(column).unwrap_or(u32::MAX),
        }
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// One node of the tree.
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    pub kind: Kind,
    pub pos: Pos,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Null,
    Bool(bool),
    /// An integer, with the radix it was written in (TOML keeps `0o644` octal).
    Int {
        value: i128,
        radix: u32,
    },
    Float(f64),
    Str(String),
    /// A TOML date or time: never valid in a node config, kept to name it.
    Datetime(String),
    Seq(Vec<Value>),
    Map(Vec<Entry>),
}

/// A key and its value, in source order.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: String,
    pub key_pos: Pos,
    pub value: Value,
}

impl Kind {
    /// What this is, with an article, for messages ("expected a string, found an integer").
    pub fn describe(&self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Bool(_) => "a boolean",
            Kind::Int { .. } => "an integer",
            Kind::Float(_) => "a float",
            Kind::Str(_) => "a string",
            Kind::Datetime(_) => "a date/time",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a table",
        }
    }
}
