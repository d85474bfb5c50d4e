//! The TOML that machines write, read without the full parser.
//!
//! PID 1's path to Kubernetes reads a handful of small TOML files that the
//! builder, stage 1 and the node config's child wrote (`initramfs.toml`,
//! `image.toml`, the service files, the child's results). Under QEMU TCG,
//! init's own time is mostly the emulator translating code the first time it
//! runs (docs/performance.md), and the `toml` crate's parser and
//! deserializer were the largest single share of the code PID 1 ran before
//! it started Kubernetes. So [`from_str`] first tries a small reader for the
//! subset such files use, and hands anything else to the `toml` crate:
//!
//! - key/value lines with bare or quoted keys (no dotted keys);
//! - `[table]` headers (dotted paths, each table defined once) and
//!   `[[array of tables]]` headers (not nested in another array's element);
//! - basic, literal and multi-line strings, integers (decimal, `0x`, `0o`,
//!   `0b`), booleans,
//!   arrays (over several lines, with comments and a trailing comma) and
//!   one-line inline tables;
//! - comments and blank lines.
//!
//! The subset reader either produces exactly what the `toml` crate would, or
//! declines (floats, dates, hex integers, a redefined table, a control
//! character, an unknown field, a type mismatch, ...): then `toml` parses the
//! text, and its answer, error messages with line and column included, is
//! the answer. The tests compare both readers on generated documents.
//!
//! [`Writer`] writes the same subset (stage 1's handoff).

use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};

/// A value of the subset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Val {
    Str(String),
    Int(i64),
    /// An integer written in base 16, 8 or 2 (`0x`, `0o`, `0b`): the node
    /// config tells `0o644` from `644`.
    Based(i64, u32),
    Bool(bool),
    Arr(Vec<Val>),
    /// Keys in document order, each once.
    Table(Vec<(String, Val)>),
}

impl Val {
    /// The value under `key` of a table.
    pub fn get(&self, key: &str) -> Option<&Val> {
        match self {
            Val::Table(t) => t.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Val::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_integer(&self) -> Option<i64> {
        match self {
            Val::Int(i) | Val::Based(i, _) => Some(*i),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Val::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The value as the `toml` crate's tree holds it, for comparing the two
    /// readers (the tests here, `fuzz/` `tomlfast`): tables' keys sorted
    /// (the crate sorts them), integers without their base (it drops it).
    pub fn comparable(self) -> Val {
        match self {
            Val::Table(mut t) => {
                t.sort_by(|a, b| a.0.cmp(&b.0));
                Val::Table(t.into_iter().map(|(k, v)| (k, v.comparable())).collect())
            }
            Val::Arr(a) => Val::Arr(a.into_iter().map(Val::comparable).collect()),
            Val::Based(i, _) => Val::Int(i),
            v => v,
        }
    }

    /// The same value from the `toml` crate's tree; `None` for what the
    /// subset has no place for (floats, dates).
    pub fn from_toml(v: &toml::Value) -> Option<Val> {
        Some(match v {
            toml::Value::String(s) => Val::Str(s.clone()),
            toml::Value::Integer(i) => Val::Int(*i),
            toml::Value::Boolean(b) => Val::Bool(*b),
            toml::Value::Array(a) => Val::Arr(a.iter().map(Val::from_toml).collect::<Option<_>>()?),
            toml::Value::Table(t) => Val::Table(
                t.iter()
                    .map(|(k, v)| Some((k.clone(), Val::from_toml(v)?)))
                    .collect::<Option<_>>()?,
            ),
            toml::Value::Float(_) | toml::Value::Datetime(_) => return None,
        })
    }
}

/// Deserialize `text` like `toml::from_str`, through the subset reader when
/// it can (module docs).
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, toml::de::Error> {
    if let Some(v) = parse(text)
        && let Ok(t) = T::deserialize(De(v))
    {
        return Ok(t);
    }
    toml::from_str(text)
}

/// The document as a table, through the subset reader when it can, else the
/// `toml` crate (floats and dates dropped); `None` when it is not TOML.
pub fn parse_table(text: &str) -> Option<Val> {
    parse(text).or_else(|| {
        let t: toml::Table = text.parse().ok()?;
        Some(Val::Table(
            t.iter()
                .filter_map(|(k, v)| Some((k.clone(), Val::from_toml(v)?)))
                .collect(),
        ))
    })
}

/// Nesting deeper than this (arrays in arrays, table headers) is left to
/// the `toml` crate: the reader recurses.
const MAX_DEPTH: usize = 32;

/// Keys of one table, and tables defined by headers, beyond which the text
/// is left to the `toml` crate: the reader looks them up one by one (the
/// files it is for have a few dozen), and a node config is user input.
const MAX_KEYS: usize = 512;

/// The subset reader: the document's root table, or `None` when the text is
/// outside the subset (or not TOML at all).
pub fn parse(text: &str) -> Option<Val> {
    let mut r = Reader {
        s: text.as_bytes(),
        i: 0,
    };
    let mut root: Vec<(String, Val)> = Vec::new();
    // Table paths that headers defined or created on the way (they take
    // more headers below them); inline tables are not in it.
    let mut header_tables: Vec<Vec<String>> = vec![Vec::new()];
    // Paths of `[[arrays of tables]]`: only they take another `[[...]]`.
    let mut arrays: Vec<Vec<String>> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    loop {
        r.blank_lines()?;
        let Some(c) = r.peek() else { break };
        if c == b'[' {
            r.i += 1;
            let array = r.peek() == Some(b'[');
            if array {
                r.i += 1;
            }
            let mut path = Vec::new();
            loop {
                r.ws();
                path.push(r.key()?);
                r.ws();
                match r.next()? {
                    b'.' => {}
                    b']' if !array => break,
                    b']' if r.next()? == b']' => break,
                    _ => return None,
                }
                if path.len() > MAX_DEPTH {
                    return None;
                }
            }
            r.line_end()?;
            if array {
                append_table(&mut root, &header_tables, &mut arrays, &path)?;
            } else {
                define_table(&mut root, &mut header_tables, &path)?;
            }
            current = path;
        } else {
            let key = r.key()?;
            r.ws();
            if r.next()? != b'=' {
                return None;
            }
            r.ws();
            let v = r.value(0)?;
            r.line_end()?;
            insert(table_at(&mut root, &current)?, key, v)?;
        }
    }
    Some(Val::Table(root))
}

/// Create the table at `path` for a header: every table on the way must be
/// one headers may extend; the last one must not exist yet.
fn define_table(
    root: &mut Vec<(String, Val)>,
    header_tables: &mut Vec<Vec<String>>,
    path: &[String],
) -> Option<()> {
    let mut t = root;
    for n in 0..path.len() {
        let last = n + 1 == path.len();
        let prefix = &path[..=n];
        let pos = t.iter().position(|(k, _)| *k == path[n]);
        let pos = match pos {
            Some(_) if last => return None,
            Some(p) => {
                if !header_tables.iter().any(|h| h == prefix) {
                    return None;
                }
                p
            }
            None => {
                if t.len() >= MAX_KEYS || header_tables.len() >= MAX_KEYS {
                    return None;
                }
                t.push((path[n].clone(), Val::Table(Vec::new())));
                header_tables.push(prefix.to_vec());
                t.len() - 1
            }
        };
        match &mut t[pos].1 {
            Val::Table(inner) => t = inner,
            _ => return None,
        }
    }
    Some(())
}

/// A `[[path]]` header: a new table at the end of the array of tables at
/// `path`, made by the first such header. Every table on the way must be
/// one headers made (tables inside an array's elements — `[a.b]` or
/// `[[a.b]]` after `[[a]]` — are the `toml` crate's); the array must not be
/// anything else (a key's array, a table).
fn append_table(
    root: &mut Vec<(String, Val)>,
    header_tables: &[Vec<String>],
    arrays: &mut Vec<Vec<String>>,
    path: &[String],
) -> Option<()> {
    let (last, parents) = path.split_last()?;
    // Each parent a table a header made (never an array's element).
    if !(1..=parents.len()).all(|n| header_tables.iter().any(|h| h == &path[..n])) {
        return None;
    }
    let t = table_at(root, parents)?;
    match t.iter_mut().find(|(k, _)| k == last) {
        Some((_, Val::Arr(items))) if arrays.iter().any(|a| a == path) => {
            if items.len() >= MAX_KEYS {
                return None;
            }
            items.push(Val::Table(Vec::new()));
        }
        Some(_) => return None,
        None => {
            if t.len() >= MAX_KEYS || arrays.len() >= MAX_KEYS {
                return None;
            }
            t.push((last.clone(), Val::Arr(vec![Val::Table(Vec::new())])));
            arrays.push(path.to_vec());
        }
    }
    Some(())
}

/// The table keys go into: the one at `path`, or for an array of tables
/// its last element.
fn table_at<'a>(
    root: &'a mut Vec<(String, Val)>,
    path: &[String],
) -> Option<&'a mut Vec<(String, Val)>> {
    let mut t = root;
    for name in path {
        t = match &mut t.iter_mut().find(|(k, _)| k == name)?.1 {
            Val::Table(inner) => inner,
            Val::Arr(items) => match items.last_mut()? {
                Val::Table(inner) => inner,
                _ => return None,
            },
            _ => return None,
        };
    }
    Some(t)
}

fn insert(t: &mut Vec<(String, Val)>, key: String, v: Val) -> Option<()> {
    if t.len() >= MAX_KEYS || t.iter().any(|(k, _)| *k == key) {
        return None;
    }
    t.push((key, v));
    Some(())
}

struct Reader<'a> {
    s: &'a [u8],
    i: usize,
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn starts_with(&self, p: &[u8]) -> bool {
        self.s[self.i..].starts_with(p)
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    /// A comment to the end of its line (not the newline).
    fn comment(&mut self) -> Option<()> {
        if self.peek() == Some(b'#') {
            while let Some(c) = self.peek() {
                if c == b'\n' || (c == b'\r' && self.s.get(self.i + 1) == Some(&b'\n')) {
                    break;
                }
                if forbidden_control(c) || c == b'\r' {
                    return None;
                }
                self.i += 1;
            }
        }
        Some(())
    }

    /// A newline (`\n` or `\r\n`); `false` at anything else.
    fn newline(&mut self) -> bool {
        if self.starts_with(b"\n") {
            self.i += 1;
        } else if self.starts_with(b"\r\n") {
            self.i += 2;
        } else {
            return false;
        }
        true
    }

    /// Whitespace and a comment, then the end of the line or of the text.
    fn line_end(&mut self) -> Option<()> {
        self.ws();
        self.comment()?;
        if self.peek().is_none() || self.newline() {
            Some(())
        } else {
            None
        }
    }

    /// Blank and comment-only lines; inside an array, the whitespace,
    /// newlines and comments between values.
    fn blank_lines(&mut self) -> Option<()> {
        loop {
            self.ws();
            self.comment()?;
            if !self.newline() {
                return Some(());
            }
        }
    }

    fn key(&mut self) -> Option<String> {
        match self.peek()? {
            b'"' => {
                self.i += 1;
                self.basic_string()
            }
            b'\'' => {
                self.i += 1;
                self.literal_string()
            }
            _ => {
                let start = self.i;
                while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
                {
                    self.i += 1;
                }
                if self.i == start {
                    return None;
                }
                Some(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
            }
        }
    }

    fn value(&mut self, depth: usize) -> Option<Val> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' if self.starts_with(b"\"\"\"") => {
                self.i += 3;
                self.multiline_basic().map(Val::Str)
            }
            b'"' => {
                self.i += 1;
                self.basic_string().map(Val::Str)
            }
            b'\'' if self.starts_with(b"'''") => {
                self.i += 3;
                self.multiline_literal().map(Val::Str)
            }
            b'\'' => {
                self.i += 1;
                self.literal_string().map(Val::Str)
            }
            b't' if self.starts_with(b"true") => {
                self.i += 4;
                self.delimited(Val::Bool(true))
            }
            b'f' if self.starts_with(b"false") => {
                self.i += 5;
                self.delimited(Val::Bool(false))
            }
            b'[' => {
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    self.blank_lines()?;
                    if self.peek()? == b']' {
                        self.i += 1;
                        return Some(Val::Arr(items));
                    }
                    items.push(self.value(depth + 1)?);
                    self.blank_lines()?;
                    match self.next()? {
                        b',' => {}
                        b']' => return Some(Val::Arr(items)),
                        _ => return None,
                    }
                }
            }
            b'{' => {
                self.i += 1;
                let mut t = Vec::new();
                self.ws();
                if self.peek()? == b'}' {
                    self.i += 1;
                    return Some(Val::Table(t));
                }
                loop {
                    self.ws();
                    let k = self.key()?;
                    self.ws();
                    if self.next()? != b'=' {
                        return None;
                    }
                    self.ws();
                    let v = self.value(depth + 1)?;
                    insert(&mut t, k, v)?;
                    self.ws();
                    match self.next()? {
                        b',' => {}
                        b'}' => return Some(Val::Table(t)),
                        _ => return None,
                    }
                }
            }
            b'0'..=b'9' | b'+' | b'-' => self.integer(),
            _ => None,
        }
    }

    /// `v`, if what follows ends the value (else it is something longer:
    /// `trueish`, a float, a date).
    fn delimited(&self, v: Val) -> Option<Val> {
        match self.peek() {
            None | Some(b' ' | b'\t' | b',' | b']' | b'}' | b'#' | b'\n' | b'\r') => Some(v),
            _ => None,
        }
    }

    /// An integer within i64: decimal (optional sign, no leading zero) or
    /// `0x`/`0o`/`0b` (no sign), `_` only between digits.
    fn integer(&mut self) -> Option<Val> {
        let radix = match (self.peek()?, self.s.get(self.i + 1)) {
            (b'0', Some(b'x')) => 16,
            (b'0', Some(b'o')) => 8,
            (b'0', Some(b'b')) => 2,
            _ => 10,
        };
        let negative = match (radix, self.peek()?) {
            (10, b'-') => {
                self.i += 1;
                true
            }
            (10, b'+') => {
                self.i += 1;
                false
            }
            (10, _) => false,
            _ => {
                self.i += 2;
                false
            }
        };
        let start = self.i;
        // Accumulated negatively: i64::MIN has no positive counterpart.
        let mut n: i64 = 0;
        let mut last_digit = false;
        while let Some(c) = self.peek() {
            match (c as char).to_digit(radix) {
                Some(d) => {
                    n = n.checked_mul(i64::from(radix))?.checked_sub(i64::from(d))?;
                    last_digit = true;
                }
                None if c == b'_' && last_digit => last_digit = false,
                None => break,
            }
            self.i += 1;
        }
        // No leading zero in a decimal.
        if !last_digit || (radix == 10 && self.s[start] == b'0' && self.i - start > 1) {
            return None;
        }
        let n = if negative { n } else { n.checked_neg()? };
        self.delimited(if radix == 10 {
            Val::Int(n)
        } else {
            Val::Based(n, radix)
        })
    }

    /// After the opening `"`.
    fn basic_string(&mut self) -> Option<String> {
        let mut out = Vec::new();
        loop {
            match self.next()? {
                b'"' => return String::from_utf8(out).ok(),
                b'\\' => self.escape(&mut out)?,
                c if forbidden_control(c) || c == b'\n' || c == b'\r' => return None,
                c => out.push(c),
            }
        }
    }

    /// After the opening `"""`.
    fn multiline_basic(&mut self) -> Option<String> {
        self.newline();
        let mut out = Vec::new();
        loop {
            if self.starts_with(b"\"\"\"") {
                return self.close_multiline(b'"', out);
            }
            match self.next()? {
                b'\\' => {
                    // A line-ending backslash eats the newline and the
                    // whitespace and newlines after it.
                    let save = self.i;
                    self.ws();
                    if self.newline() {
                        loop {
                            self.ws();
                            if !self.newline() {
                                break;
                            }
                        }
                    } else {
                        self.i = save;
                        self.escape(&mut out)?;
                    }
                }
                // Kept as written, as the `toml` crate does.
                b'\r' => {
                    if self.next()? != b'\n' {
                        return None;
                    }
                    out.extend_from_slice(b"\r\n");
                }
                c if forbidden_control(c) => return None,
                c => out.push(c),
            }
        }
    }

    /// After the opening `'`.
    fn literal_string(&mut self) -> Option<String> {
        let start = self.i;
        loop {
            match self.next()? {
                b'\'' => return String::from_utf8(self.s[start..self.i - 1].to_vec()).ok(),
                c if forbidden_control(c) || c == b'\n' || c == b'\r' => return None,
                _ => {}
            }
        }
    }

    /// After the opening `'''`.
    fn multiline_literal(&mut self) -> Option<String> {
        self.newline();
        let mut out = Vec::new();
        loop {
            if self.starts_with(b"'''") {
                return self.close_multiline(b'\'', out);
            }
            match self.next()? {
                // Kept as written, as the `toml` crate does.
                b'\r' => {
                    if self.next()? != b'\n' {
                        return None;
                    }
                    out.extend_from_slice(b"\r\n");
                }
                c if forbidden_control(c) => return None,
                c => out.push(c),
            }
        }
    }

    /// At three or more `quote`s: up to two of them belong to the string,
    /// the last three close it.
    fn close_multiline(&mut self, quote: u8, mut out: Vec<u8>) -> Option<String> {
        let mut n = 0;
        while self.peek() == Some(quote) {
            n += 1;
            self.i += 1;
        }
        if n > 5 {
            return None;
        }
        out.extend(std::iter::repeat_n(quote, n - 3));
        String::from_utf8(out).ok()
    }

    /// After a `\` in a basic string.
    fn escape(&mut self, out: &mut Vec<u8>) -> Option<()> {
        let c = match self.next()? {
            b'b' => '\u{8}',
            b't' => '\t',
            b'n' => '\n',
            b'f' => '\u{c}',
            b'r' => '\r',
            b'"' => '"',
            b'\\' => '\\',
            b'u' => self.hex_char(4)?,
            b'U' => self.hex_char(8)?,
            _ => return None,
        };
        let mut buf = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        Some(())
    }

    fn hex_char(&mut self, digits: usize) -> Option<char> {
        let hex = self.s.get(self.i..self.i + digits)?;
        let mut n: u32 = 0;
        for &h in hex {
            n = n * 16 + char::from(h).to_digit(16)?;
        }
        self.i += digits;
        char::from_u32(n)
    }
}

/// Control characters TOML allows nowhere but as escapes (tab is allowed).
fn forbidden_control(c: u8) -> bool {
    (c < 0x20 && c != b'\t' && c != b'\n' && c != b'\r') || c == 0x7f
}

/// Why the subset deserializer gave up; never shown (the `toml` crate then
/// reads the text and reports).
#[derive(Debug)]
pub struct Declined;

impl std::fmt::Display for Declined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("outside the TOML subset")
    }
}

impl std::error::Error for Declined {}

impl de::Error for Declined {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Declined
    }
}

/// A [`Val`] as a serde deserializer.
struct De(Val);

impl<'de> IntoDeserializer<'de, Declined> for De {
    type Deserializer = De;
    fn into_deserializer(self) -> De {
        self
    }
}

impl<'de> de::Deserializer<'de> for De {
    type Error = Declined;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        match self.0 {
            Val::Str(s) => visitor.visit_string(s),
            Val::Int(i) | Val::Based(i, _) => visitor.visit_i64(i),
            Val::Bool(b) => visitor.visit_bool(b),
            Val::Arr(a) => {
                let mut seq = de::value::SeqDeserializer::new(a.into_iter().map(De));
                let v = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(v)
            }
            Val::Table(t) => {
                let mut map =
                    de::value::MapDeserializer::new(t.into_iter().map(|(k, v)| (k, De(v))));
                let v = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(v)
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        visitor.visit_some(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Declined> {
        match self.0 {
            Val::Str(s) => visitor.visit_enum(s.into_deserializer()),
            _ => Err(Declined),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Declined> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map struct
        identifier ignored_any
    }
}

/// Writes TOML in the subset: `key = value` lines and `[table]` headers,
/// strings as basic strings with escapes.
#[derive(Debug, Default)]
pub struct Writer {
    out: String,
}

impl Writer {
    pub fn str(&mut self, key: &str, v: &str) -> &mut Self {
        self.key(key);
        quote(&mut self.out, v);
        self.out.push('\n');
        self
    }

    pub fn int(&mut self, key: &str, v: i64) -> &mut Self {
        self.key(key);
        self.out.push_str(itoa(v).as_str());
        self.out.push('\n');
        self
    }

    /// An unsigned value; above `i64::MAX` (TOML's limit) it is written as
    /// `i64::MAX`.
    pub fn uint(&mut self, key: &str, v: u64) -> &mut Self {
        self.int(key, i64::try_from(v).unwrap_or(i64::MAX))
    }

    pub fn bool(&mut self, key: &str, v: bool) -> &mut Self {
        self.key(key);
        self.out.push_str(if v { "true" } else { "false" });
        self.out.push('\n');
        self
    }

    pub fn strs(&mut self, key: &str, v: &[String]) -> &mut Self {
        self.key(key);
        self.out.push('[');
        for (n, s) in v.iter().enumerate() {
            if n > 0 {
                self.out.push_str(", ");
            }
            quote(&mut self.out, s);
        }
        self.out.push_str("]\n");
        self
    }

    /// A `[table]` header: the keys written after it are its.
    pub fn table(&mut self, name: &str) -> &mut Self {
        if !self.out.is_empty() {
            self.out.push('\n');
        }
        self.out.push('[');
        write_key(&mut self.out, name);
        self.out.push_str("]\n");
        self
    }

    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.out)
    }

    fn key(&mut self, key: &str) {
        write_key(&mut self.out, key);
        self.out.push_str(" = ");
    }
}

fn write_key(out: &mut String, key: &str) {
    if !key.is_empty()
        && key
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
    {
        out.push_str(key);
    } else {
        quote(out, key);
    }
}

/// `s` as a TOML basic string (the same literal is valid JSON).
fn quote(out: &mut String, s: &str) {
    crate::report::push_quoted(out, s);
}

/// Decimal digits of `v` without `core::fmt`.
fn itoa(v: i64) -> String {
    let mut digits = Vec::with_capacity(20);
    let mut n = v.unsigned_abs();
    loop {
        digits.push(b'0' + (n % 10) as u8);
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if v < 0 {
        digits.push(b'-');
    }
    digits.reverse();
    String::from_utf8(digits).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    /// What the `toml` crate makes of `text`, in the subset's terms.
    fn by_toml(text: &str) -> Option<Val> {
        let t: toml::Table = text.parse().ok()?;
        Val::from_toml(&toml::Value::Table(t))
    }

    /// Whenever the subset reader answers, `toml` agrees.
    fn agrees(text: &str) -> bool {
        match parse(text) {
            Some(v) => {
                assert_eq!(
                    Some(v.comparable()),
                    by_toml(text).map(Val::comparable),
                    "on {text:?}"
                );
                true
            }
            None => false,
        }
    }

    #[test]
    fn reads_what_the_files_use() {
        let text = r#"# comment
board = "x86_64"   # trailing
kernel_version = '6.1.0-28-amd64'
modules = [
  "kernel/a.ko", # one
  "kernel/b.ko",
]
n = -42
big = 9_223_372_036_854_775_807
small = -9223372036854775808
yes = true
no = false
empty = []
inline = { a = "b", "c d" = 1 }
exec = ["/bin/sh", "-c", '''
echo "hi" \ there
''', """
esc \"q\" \u00e9 \U0001F600 \
    joined"""]

[module_deps]
"kernel/b.ko" = ["kernel/a.ko"]

[ready]
y = 2
[ready.inner]
x = 1
"#;
        assert!(agrees(text));
        assert!(agrees(&text.replace('\n', "\r\n")));
        let v = parse(text).unwrap();
        assert_eq!(v.get("n"), Some(&Val::Int(-42)));
        assert_eq!(v.get("small"), Some(&Val::Int(i64::MIN)));
        let exec = v.get("exec").unwrap();
        assert_eq!(
            *exec,
            Val::Arr(vec![
                Val::Str("/bin/sh".into()),
                Val::Str("-c".into()),
                Val::Str("echo \"hi\" \\ there\n".into()),
                Val::Str("esc \"q\" é 😀 joined".into()),
            ])
        );
        // Node configs: arrays of tables, modes in octal.
        let node = r#"hostname = "edge-1"
[[users]]
name = "ops"
ssh_authorized_keys = ["ssh-ed25519 AAAA ops@laptop"]
[[users]]
name = "backup"
[kernel.sysctl]
"net.ipv4.ip_forward" = 1
[[files]]
path = "/etc/motd"
mode = 0o644
content = "hello\n"
[[files]]
path = "/etc/x"
mode = 0o0600
[kubernetes]
labels = { "zone" = "north" }
[[kubernetes.extra]]
a = 1
[[kubernetes.extra]]
[[files]]
path = "/etc/y"
"#;
        assert!(agrees(node), "{node}");
        let v = parse(node).unwrap();
        match v.get("files") {
            Some(Val::Arr(f)) => {
                assert_eq!(f.len(), 3);
                assert_eq!(f[0].get("mode"), Some(&Val::Based(0o644, 8)));
                assert_eq!(f[2].get("path").and_then(Val::as_str), Some("/etc/y"));
            }
            other => panic!("{other:?}"),
        }
        for text in [
            "a = 0x7fff_FFFF_ffff_ffff",
            "a = 0xdead_beef",
            "a = 0o755",
            "a = 0b1010",
            "a = 0x0",
            "a = [0x1, 0o2, 0b11]",
            "[[a]]",
            "[[a]]\n[[a]]\n[[a]]\nb = 2",
            "[t]\n[[t.a]]\nx = 1\n[[t.a]]\nx = 2\n[u]",
            "[[ a ]]\nb = 1",
            "[[\"q k\"]]\nb = 1",
        ] {
            assert!(agrees(text), "{text:?}");
        }
    }

    #[test]
    fn declines_what_it_does_not_read() {
        for text in [
            "a = 1.5",
            "a = 1e3",
            "a = +0x10",
            "a = -0o7",
            "a = 0x",
            "a = 0x_1",
            "a = 0x1_",
            "a = 0x1__2",
            "a = 0xg",
            "a = 0o8",
            "a = 0b2",
            "a = 0X10",
            "a = 0x8000000000000000",
            "a = 0x1.5",
            "a = 012",
            "a = 1__0",
            "a = 1_",
            "a = _1",
            "a = inf",
            "a = nan",
            "a = 1979-05-27",
            "a = 07:32:00",
            "a = 99999999999999999999",
            "a.b = 1",
            "[a]\n[[a]]",
            "a = [1]\n[[a]]",
            "a = []\n[[a]]",
            "[[a]]\n[a]",
            "[[a]]\n[a.b]",
            "[[a]]\n[[a.b]]",
            "[a.b]\n[[a]]",
            "[[a.b]]",
            "[[a]",
            "[[a] ]",
            "[[a]]]",
            "[[a]]\nb = 1\nb = 2",
            "a = 1\na = 2",
            "[t]\n[t]",
            "t = 1\n[t]",
            "t = {}\n[t.u]",
            "[a.b]\n[a]",
            "a = \"tab\u{1}\"",
            "a = \"\\q\"",
            "a = \"\\uD800\"",
            "a = \"open",
            "a = 'open",
            "a = \"\"\"open",
            "a = { b = 1, }",
            "a = { b = 1\n}",
            "a = [1, 2",
            "a = truey",
            "a = 1 b = 2",
            "a =",
            "= 1",
            "a = 1\r",
            "# \u{7f}",
            "# lone \r carriage return\na = 1",
            "a = '''x''''''",
        ] {
            assert_eq!(parse(text), None, "{text:?}");
        }
        let deep = format!("a = {}{}", "[".repeat(40), "]".repeat(40));
        assert_eq!(parse(&deep), None);
        // Large tables are the toml crate's (lookups here are linear).
        let many: String = (0..MAX_KEYS + 1).map(|i| format!("k{i} = {i}\n")).collect();
        assert_eq!(parse(&many), None);
        let headers: String = (0..MAX_KEYS + 1).map(|i| format!("[t{i}]\n")).collect();
        assert_eq!(parse(&headers), None);
        let fits: String = (0..MAX_KEYS).map(|i| format!("k{i} = {i}\n")).collect();
        assert!(agrees(&fits));
        // Declined text still parses through `toml` where it is TOML.
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct F {
            a: f64,
        }
        assert_eq!(from_str::<F>("a = 1.5").unwrap(), F { a: 1.5 });
        assert!(from_str::<F>("a = 1.5\na = 2.5").is_err());
    }

    #[test]
    fn serde_through_the_subset_matches_toml() {
        #[derive(serde::Deserialize, Debug, PartialEq)]
        #[serde(rename_all = "kebab-case")]
        enum Mode {
            OnFailure,
            Never,
        }
        #[derive(serde::Deserialize, Debug, PartialEq)]
        #[serde(deny_unknown_fields)]
        struct Inner {
            #[serde(default = "five")]
            n: u64,
            tag: Option<String>,
        }
        fn five() -> u64 {
            5
        }
        #[derive(serde::Deserialize, Debug, PartialEq)]
        #[serde(deny_unknown_fields)]
        struct S {
            name: String,
            count: u32,
            on: bool,
            list: Vec<String>,
            mode: Mode,
            env: BTreeMap<String, String>,
            inner: Option<Inner>,
            #[serde(default)]
            absent: Vec<u8>,
        }
        let ok = "name = \"x\"\ncount = 3\non = true\nlist = [\"a\"]\nmode = \"on-failure\"\nenv = { K = \"v\" }\n[inner]\ntag = \"t\"\n";
        let fast: S = S::deserialize(De(parse(ok).unwrap())).unwrap();
        assert_eq!(fast, toml::from_str::<S>(ok).unwrap());
        assert_eq!(fast.inner.as_ref().unwrap().n, 5);
        assert_eq!(fast.mode, Mode::OnFailure);
        // Whatever the subset deserializer refuses, from_str reports as toml does.
        for bad in [
            ok.replace("count = 3", "count = -3"),
            ok.replace("count = 3", "count = \"3\""),
            ok.replace("mode = \"on-failure\"", "mode = \"sometimes\""),
            ok.replace("[inner]", "[inner]\nextra = 1"),
            ok.replace("name = \"x\"\n", ""),
            ok.replace("list = [\"a\"]", "list = [1]"),
        ] {
            assert!(parse(&bad).is_some());
            assert!(S::deserialize(De(parse(&bad).unwrap())).is_err(), "{bad}");
            let ours = from_str::<S>(&bad).unwrap_err().to_string();
            assert_eq!(ours, toml::from_str::<S>(&bad).unwrap_err().to_string());
        }
        let never = ok.replace("on-failure", "never");
        assert_eq!(from_str::<S>(&never).unwrap().mode, Mode::Never);
    }

    /// A tiny deterministic generator (no dependency): documents built from
    /// random values, written by `toml`'s own serializer and by [`Writer`],
    /// must read back the same through both readers.
    #[test]
    fn generated_documents_read_the_same_both_ways() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let alphabet: Vec<char> = "aZ09_- .\"'\\\n\t\r\u{1}\u{7f}é😀#=[]{},".chars().collect();
        let word = |rnd: &mut dyn FnMut(u64) -> u64| -> String {
            (0..rnd(8))
                .map(|_| alphabet[rnd(alphabet.len() as u64) as usize])
                .collect()
        };
        let mut read = 0;
        for _ in 0..400 {
            let mut t = toml::Table::new();
            let mut w = Writer::default();
            let mut flat = Vec::new();
            for _ in 0..rnd(6) {
                let k = word(&mut rnd);
                if t.contains_key(&k) {
                    continue;
                }
                let v = match rnd(4) {
                    0 => {
                        let s = word(&mut rnd);
                        w.str(&k, &s);
                        toml::Value::String(s)
                    }
                    1 => {
                        let i = (rnd(u64::MAX) as i64) >> rnd(64);
                        w.int(&k, i);
                        toml::Value::Integer(i)
                    }
                    2 => {
                        let b = rnd(2) == 1;
                        w.bool(&k, b);
                        toml::Value::Boolean(b)
                    }
                    _ => {
                        let a: Vec<String> = (0..rnd(4)).map(|_| word(&mut rnd)).collect();
                        w.strs(&k, &a);
                        toml::Value::Array(a.into_iter().map(toml::Value::String).collect())
                    }
                };
                flat.push(k.clone());
                t.insert(k, v);
            }
            let mut sub = toml::Table::new();
            let sub_name = word(&mut rnd);
            w.table(&sub_name);
            for _ in 0..rnd(3) {
                let (k, s) = (word(&mut rnd), word(&mut rnd));
                if sub.contains_key(&k) {
                    continue;
                }
                w.str(&k, &s);
                sub.insert(k, toml::Value::String(s));
            }
            if t.contains_key(&sub_name) {
                continue;
            }
            t.insert(sub_name, toml::Value::Table(sub));
            let expected = Val::from_toml(&toml::Value::Table(t.clone())).map(Val::comparable);
            // Ours, read by both.
            let ours = w.finish();
            assert_eq!(parse(&ours).map(Val::comparable), expected, "{ours}");
            assert_eq!(by_toml(&ours).map(Val::comparable), expected, "{ours}");
            // `toml`'s, read by ours whenever it answers.
            let theirs = toml::to_string(&t).unwrap();
            if agrees(&theirs) {
                read += 1;
            }
        }
        // The subset covers what `toml` itself writes for such documents.
        assert!(
            read > 350,
            "only {read} of 400 of toml's own documents read"
        );
    }

    #[test]
    fn parse_table_falls_back_and_drops_what_it_cannot_hold() {
        let v = parse_table("a = 1.5\nb = 2\n[logs]\nring_kib = 64").unwrap();
        assert_eq!(v.get("a"), None);
        assert_eq!(v.get("b"), Some(&Val::Int(2)));
        assert_eq!(
            v.get("logs").and_then(|l| l.get("ring_kib")),
            Some(&Val::Int(64))
        );
        assert_eq!(parse_table("not toml ="), None);
    }

    #[test]
    fn writer_and_itoa() {
        assert_eq!(itoa(0), "0");
        assert_eq!(itoa(-7), "-7");
        assert_eq!(itoa(i64::MIN), "-9223372036854775808");
        let text = Writer::default()
            .str("a b", "x\u{1}y")
            .int("n", 12)
            .uint("u", u64::MAX)
            .bool("on", true)
            .table("t.u")
            .strs("l", &["p".into(), "q\"".into()])
            .finish();
        assert_eq!(
            text,
            "\"a b\" = \"x\\u0001y\"\nn = 12\nu = 9223372036854775807\non = true\n\n[\"t.u\"]\nl = [\"p\", \"q\\\"\"]\n"
        );
        assert!(agrees(&text));
    }
}
