//! The YAML subset k3s's config file uses: a flat mapping whose keys are flag
//! names and whose values are scalars or lists of scalars
//! (`key: value`, `key: [a, b]`, or `key:` followed by `- item` lines).
//! Anything else (nested mappings, anchors, multi-line strings) is an error
//! naming the line: the stand-in must never guess what a config meant.

use thiserror::Error;

/// One value of the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Scalar(String),
    List(Vec<String>),
}

impl Value {
    /// The values as a list (a scalar is a one-item list), as k3s treats
    /// repeatable flags given in the config file.
    pub fn items(&self) -> Vec<String> {
        match self {
            Value::Scalar(s) => vec![s.clone()],
            Value::List(l) => l.clone(),
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum YamlError {
    #[error("line {line}: {what}")]
    Syntax { line: usize, what: String },
}

fn syntax(line: usize, what: impl Into<String>) -> YamlError {
    YamlError::Syntax {
        line,
        what: what.into(),
    }
}

/// Parses a flat mapping; keys keep file order.
pub fn parse(text: &str) -> Result<Vec<(String, Value)>, YamlError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out: Vec<(String, Value)> = Vec::new();
    // The key whose value is a block list still being read.
    let mut open_list: Option<usize> = None;
    for (idx, raw) in text.lines().enumerate() {
        let line_no = idx + 1;
        let line = strip_comment(raw.trim_end_matches('\r'));
        if line.trim().is_empty() || line.trim() == "---" {
            continue;
        }
        if line.contains('\t') && line.trim_start_matches(' ').starts_with('\t') {
            return Err(syntax(line_no, "tab used for indentation"));
        }
        let indented = line.starts_with(' ');
        let body = line.trim();
        if let Some(item) = body
            .strip_prefix("- ")
            .or(if body == "-" { Some("") } else { None })
        {
            let Some(pos) = open_list else {
                return Err(syntax(line_no, "list item without a key above it"));
            };
            let item = scalar(item.trim(), line_no)?;
            match &mut out[pos].1 {
                Value::List(items) => items.push(item),
                Value::Scalar(_) => return Err(syntax(line_no, "list item after a scalar value")),
            }
            continue;
        }
        if indented {
            return Err(syntax(
                line_no,
                "nested mapping (the stand-in reads flat `flag: value` files only)",
            ));
        }
        let Some((key, value)) = body.split_once(':') else {
            return Err(syntax(
                line_no,
                format!("expected `key: value`, found `{body}`"),
            ));
        };
        let key = key.trim();
        if key.is_empty() || key.contains(' ') || key.starts_with(['"', '\'', '&', '*', '!']) {
            return Err(syntax(line_no, format!("unsupported key `{key}`")));
        }
        if out.iter().any(|(k, _)| k == key) {
            return Err(syntax(line_no, format!("duplicate key `{key}`")));
        }
        let value = value.trim();
        let parsed = if value.is_empty() {
            open_list = Some(out.len());
            Value::List(Vec::new())
        } else {
            open_list = None;
            if let Some(inner) = value.strip_prefix('[') {
                let Some(inner) = inner.strip_suffix(']') else {
                    return Err(syntax(line_no, "unterminated `[` list"));
                };
                let items = if inner.trim().is_empty() {
                    Vec::new()
                } else {
                    split_flow(inner)
                        .iter()
                        .map(|s| scalar(s.trim(), line_no))
                        .collect::<Result<Vec<_>, _>>()?
                };
                Value::List(items)
            } else if value.starts_with(['{', '&', '*', '|', '>', '!']) {
                return Err(syntax(line_no, format!("unsupported YAML value `{value}`")));
            } else {
                Value::Scalar(scalar(value, line_no)?)
            }
        };
        out.push((key.to_string(), parsed));
    }
    Ok(out)
}

/// Removes a `#` comment that starts the line or follows whitespace, outside quotes.
fn strip_comment(line: &str) -> &str {
    let mut quote: Option<char> = None;
    let mut prev_space = true;
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '#' && prev_space => return &line[..i],
            None => {}
        }
        prev_space = c == ' ' || c == '\t';
    }
    line
}

/// Splits a flow list body on commas outside quotes.
fn split_flow(s: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    for c in s.chars() {
        match quote {
            Some(q) if c == q => {
                quote = None;
                cur.push(c);
            }
            Some(_) => cur.push(c),
            None if c == '"' || c == '\'' => {
                quote = Some(c);
                cur.push(c);
            }
            None if c == ',' => items.push(std::mem::take(&mut cur)),
            None => cur.push(c),
        }
    }
    items.push(cur);
    items
}

fn scalar(s: &str, line: usize) -> Result<String, YamlError> {
    if let Some(inner) = s.strip_prefix('"') {
        let Some(inner) = inner.strip_suffix('"') else {
            return Err(syntax(line, "unterminated double quote"));
        };
        let mut out = String::new();
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('"') => out.push('"'),
                Some('\\') => out.push('\\'),
                Some(other) => return Err(syntax(line, format!("unsupported escape `\\{other}`"))),
                None => return Err(syntax(line, "dangling backslash")),
            }
        }
        Ok(out)
    } else if let Some(inner) = s.strip_prefix('\'') {
        let Some(inner) = inner.strip_suffix('\'') else {
            return Err(syntax(line, "unterminated single quote"));
        };
        Ok(inner.replace("''", "'"))
    } else {
        Ok(s.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(s: &str) -> Value {
        Value::Scalar(s.into())
    }

    #[test]
    fn k3s_style_config() {
        let text = "# k3s config\n---\nwrite-kubeconfig-mode: \"0644\"\ntoken: 's3cr''et' # trailing\n\
                    node-label:\n  - \"foo=bar\"\n  - something=amazing\ndisable: [traefik, 'servicelb']\n\
                    cluster-init: true\nurl: http://x:1/#frag\n";
        let got = parse(text).unwrap();
        assert_eq!(
            got,
            vec![
                ("write-kubeconfig-mode".into(), scalar("0644")),
                ("token".into(), scalar("s3cr'et")),
                (
                    "node-label".into(),
                    Value::List(vec!["foo=bar".into(), "something=amazing".into()])
                ),
                (
                    "disable".into(),
                    Value::List(vec!["traefik".into(), "servicelb".into()])
                ),
                ("cluster-init".into(), scalar("true")),
                ("url".into(), scalar("http://x:1/#frag")),
            ]
        );
    }

    #[test]
    fn crlf_bom_and_empty() {
        assert_eq!(parse("").unwrap(), vec![]);
        assert_eq!(
            parse("\u{feff}a: b\r\nc: []\r\n").unwrap(),
            vec![("a".into(), scalar("b")), ("c".into(), Value::List(vec![]))]
        );
    }

    #[test]
    fn rejects_what_it_does_not_understand() {
        let cases = [
            ("a:\n  b: c\n", 2),
            ("- x\n", 1),
            ("a: b\na: c\n", 2),
            ("just text\n", 1),
            ("a: [x, y\n", 1),
            ("a: {b: c}\n", 1),
            ("a: &anchor x\n", 1),
            ("a: \"open\n", 1),
            ("\ta: b\n", 1),
            ("a: b\n- c\n", 2),
        ];
        for (text, line) in cases {
            match parse(text) {
                Err(YamlError::Syntax { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                Ok(v) => panic!("{text:?} parsed as {v:?}"),
            }
        }
    }
}
