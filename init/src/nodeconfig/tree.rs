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

/// Byte offset → `Pos` for one text, in O(log lines) per lookup: the TOML
/// reader asks for a position for every value, and scanning from the start
/// each time is quadratic on a large file.
pub struct LineIndex<'a> {
    text: &'a str,
    /// Byte offset where each line starts.
    line_starts: Vec<usize>,
    /// Characters before each 64-byte block (a character is a byte that is
    /// not a UTF-8 continuation byte, so blocks may split characters).
    block_chars: Vec<usize>,
}

const BLOCK: usize = 64;

impl<'a> LineIndex<'a> {
    pub fn new(text: &'a str) -> LineIndex<'a> {
        let bytes = text.as_bytes();
        let mut line_starts = vec![0];
        line_starts.extend(
            bytes
                .iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .map(|(i, _)| i + 1),
        );
        let mut block_chars = Vec::with_capacity(bytes.len() / BLOCK + 1);
        let mut total = 0;
        for block in bytes.chunks(BLOCK) {
            block_chars.push(total);
            total += block.iter().filter(|b| !is_continuation(**b)).count();
        }
        block_chars.push(total);
        LineIndex {
            text,
            line_starts,
            block_chars,
        }
    }

    fn chars_before(&self, offset: usize) -> usize {
        let block = offset / BLOCK;
        let base = self.block_chars.get(block).copied().unwrap_or(0);
        let start = block * BLOCK;
        let partial = self.text.as_bytes().get(start..offset).unwrap_or(&[]);
        base + partial.iter().filter(|b| !is_continuation(**b)).count()
    }

    pub fn pos(&self, offset: usize) -> Pos {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset);
        let start = self
            .line_starts
            .get(line.saturating_sub(1))
            .copied()
            .unwrap_or(0);
        let column = self.chars_before(offset) - self.chars_before(start) + 1;
        Pos {
            line: u32::try_from(line.max(1)).unwrap_or(u32::MAX),
            column: u32::try_from(column).unwrap_or(u32::MAX),
        }
    }
}

fn is_continuation(b: u8) -> bool {
    b & 0xC0 == 0x80
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_index_agrees_with_the_direct_count() {
        let text = "a = 1\r\n# \u{e9}t\u{e9} \u{1f4a5}\nb = \"\u{e9}\"\n\n".repeat(9)
            + &"x".repeat(200)
            + "\u{e9}z";
        let index = LineIndex::new(&text);
        for offset in 0..=text.len() + 3 {
            if text.is_char_boundary(offset.min(text.len())) {
                assert_eq!(
                    index.pos(offset),
                    Pos::of_offset(&text, offset),
                    "offset {offset}"
                );
            }
        }
    }
}
