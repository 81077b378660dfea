//! A parser for the Python literals found in Model-J metadata (`"['apple', 'maple_tree']"`).
//!
//! The official code calls `eval` on these strings; probex parses them. Accepted: lists and
//! tuples, strings in single or double quotes with the usual escapes, integers, floats,
//! `True`, `False`, `None`. Anything else (names, calls, operators, prefixed strings, implicit
//! string concatenation) is an error that says where it is.

use std::fmt;

/// A parsed Python literal.
#[derive(Clone, Debug, PartialEq)]
pub enum PyValue {
    /// `'text'` or `"text"`.
    Str(String),
    /// An integer that fits in i64.
    Int(i64),
    /// A float (or an integer too large for i64).
    Float(f64),
    /// `True` or `False`.
    Bool(bool),
    /// `None`.
    None,
    /// `[...]` or `(...)`.
    List(Vec<PyValue>),
}

impl fmt::Display for PyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PyValue::Str(s) => write!(f, "{s:?}"),
            PyValue::Int(i) => write!(f, "{i}"),
            PyValue::Float(x) => write!(f, "{x}"),
            PyValue::Bool(true) => f.write_str("True"),
            PyValue::Bool(false) => f.write_str("False"),
            PyValue::None => f.write_str("None"),
            PyValue::List(v) => write!(f, "a list of {} items", v.len()),
        }
    }
}

/// Why a metadata string is not an accepted Python literal, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LiteralError {
    /// The text is not a literal: `what` is wrong at character `at` (`near` is an excerpt).
    #[error("{what} at character {at} (near `{near}`)")]
    Syntax {
        /// What is wrong.
        what: String,
        /// Character offset in the text.
        at: usize,
        /// The text around it.
        near: String,
    },
    /// Item `index` of a list of strings is another kind of value.
    #[error("item {index} is {found}, expected a quoted string")]
    NotAString {
        /// The item's position in the list.
        index: usize,
        /// What it is instead.
        found: String,
    },
    /// A list of strings was expected; the literal is another kind of value.
    #[error("expected a list of strings, found {found}")]
    NotAList {
        /// What it is instead.
        found: String,
    },
}

/// Deepest nesting accepted: real metadata has depth 1; the cap keeps recursion bounded.
const MAX_DEPTH: usize = 32;

/// Parses one Python literal; the whole input must be consumed (surrounding whitespace allowed).
pub fn parse(text: &str) -> Result<PyValue, LiteralError> {
    let mut p = Parser {
        s: text.as_bytes(),
        text,
        i: 0,
    };
    p.ws();
    let v = p.value(0)?;
    p.ws();
    if p.i != p.s.len() {
        return Err(p.err("unexpected text after the literal"));
    }
    Ok(v)
}

/// Parses a Python list (or tuple) of strings, e.g. `['apple', "maple_tree"]`.
pub fn parse_str_list(text: &str) -> Result<Vec<String>, LiteralError> {
    match parse(text)? {
        PyValue::List(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                PyValue::Str(s) => Ok(s),
                other => Err(LiteralError::NotAString {
                    index: i,
                    found: other.to_string(),
                }),
            })
            .collect(),
        other => Err(LiteralError::NotAList {
            found: other.to_string(),
        }),
    }
}

struct Parser<'a> {
    s: &'a [u8],
    text: &'a str,
    i: usize,
}

impl Parser<'_> {
    fn err(&self, what: &str) -> LiteralError {
        // Show a short excerpt around the position, on a char boundary.
        let mut start = self.i.saturating_sub(10);
        while !self.text.is_char_boundary(start) {
            start -= 1;
        }
        let mut end = (self.i + 10).min(self.s.len());
        while !self.text.is_char_boundary(end) {
            end += 1;
        }
        LiteralError::Syntax {
            what: what.to_string(),
            at: self.i,
            near: self.text[start..end].to_string(),
        }
    }

    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn value(&mut self, depth: usize) -> Result<PyValue, LiteralError> {
        if depth > MAX_DEPTH {
            return Err(self.err("literal nested too deeply"));
        }
        match self.s.get(self.i) {
            None => Err(self.err("unexpected end of the literal")),
            Some(b'[') => self.seq(b']', depth),
            Some(b'(') => self.seq(b')', depth),
            Some(b'\'') | Some(b'"') => {
                let s = self.string()?;
                // Python would concatenate `'a' 'b'`; metadata never does, so refuse it.
                let save = self.i;
                self.ws();
                if matches!(self.s.get(self.i), Some(b'\'') | Some(b'"')) {
                    return Err(self.err("adjacent strings are not supported"));
                }
                self.i = save;
                Ok(PyValue::Str(s))
            }
            Some(c) if c.is_ascii_digit() || matches!(c, b'-' | b'+' | b'.') => self.number(),
            Some(c) if c.is_ascii_alphabetic() || *c == b'_' => {
                let start = self.i;
                while self.i < self.s.len()
                    && (self.s[self.i].is_ascii_alphanumeric() || self.s[self.i] == b'_')
                {
                    self.i += 1;
                }
                match &self.text[start..self.i] {
                    "True" => Ok(PyValue::Bool(true)),
                    "False" => Ok(PyValue::Bool(false)),
                    "None" => Ok(PyValue::None),
                    word => {
                        let word: String = match word.char_indices().nth(24) {
                            Some((cut, _)) => format!("{}...", &word[..cut]),
                            None => word.to_string(),
                        };
                        self.i = start;
                        Err(self.err(&format!(
                            "`{word}` is not a literal (only strings, numbers, True, False, None \
                             and lists are accepted; metadata is never evaluated)"
                        )))
                    }
                }
            }
            Some(_) => Err(self.err("unexpected character")),
        }
    }

    fn seq(&mut self, close: u8, depth: usize) -> Result<PyValue, LiteralError> {
        self.i += 1;
        let mut items = Vec::new();
        loop {
            self.ws();
            if self.s.get(self.i) == Some(&close) {
                self.i += 1;
                return Ok(PyValue::List(items));
            }
            items.push(self.value(depth + 1)?);
            self.ws();
            match self.s.get(self.i) {
                Some(b',') => self.i += 1,
                Some(&c) if c == close => {
                    self.i += 1;
                    return Ok(PyValue::List(items));
                }
                None => return Err(self.err("list is never closed")),
                Some(_) => return Err(self.err("expected `,` or the end of the list")),
            }
        }
    }

    fn string(&mut self) -> Result<String, LiteralError> {
        let quote = self.s[self.i];
        let open = self.i;
        self.i += 1;
        let mut out = String::new();
        loop {
            let Some(c) = self.text[self.i..].chars().next() else {
                self.i = open;
                return Err(self.err("string is never closed"));
            };
            self.i += c.len_utf8();
            match c {
                '\\' => {
                    let Some(e) = self.text[self.i..].chars().next() else {
                        return Err(self.err("string ends in a backslash"));
                    };
                    self.i += e.len_utf8();
                    match e {
                        '\\' => out.push('\\'),
                        '\'' => out.push('\''),
                        '"' => out.push('"'),
                        'n' => out.push('\n'),
                        't' => out.push('\t'),
                        'r' => out.push('\r'),
                        '0' => out.push('\0'),
                        'a' => out.push('\x07'),
                        'b' => out.push('\x08'),
                        'f' => out.push('\x0c'),
                        'v' => out.push('\x0b'),
                        '\n' => {}
                        'x' => out.push(self.hex_escape(2)?),
                        'u' => out.push(self.hex_escape(4)?),
                        'U' => out.push(self.hex_escape(8)?),
                        other => {
                            // Python keeps unknown escapes verbatim.
                            out.push('\\');
                            out.push(other);
                        }
                    }
                }
                '\n' => {
                    self.i -= 1;
                    return Err(self.err("line break inside a string"));
                }
                c if c as u32 == u32::from(quote) => return Ok(out),
                c => out.push(c),
            }
        }
    }

    fn hex_escape(&mut self, digits: usize) -> Result<char, LiteralError> {
        let end = self.i + digits;
        let hex = self
            .text
            .get(self.i..end)
            .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| self.err(&format!("escape needs {digits} hex digits")))?;
        let code = u32::from_str_radix(hex, 16).map_err(|_| self.err("bad hex escape"))?;
        let c = char::from_u32(code).ok_or_else(|| self.err("escape is not a valid character"))?;
        self.i = end;
        Ok(c)
    }

    fn number(&mut self) -> Result<PyValue, LiteralError> {
        let start = self.i;
        if matches!(self.s[self.i], b'-' | b'+') {
            self.i += 1;
        }
        let mut is_float = false;
        while let Some(&c) = self.s.get(self.i) {
            match c {
                b'0'..=b'9' | b'_' => {}
                b'.' => is_float = true,
                b'e' | b'E' => {
                    is_float = true;
                    if matches!(self.s.get(self.i + 1), Some(b'-') | Some(b'+')) {
                        self.i += 1;
                    }
                }
                _ => break,
            }
            self.i += 1;
        }
        let raw: String = self.text[start..self.i]
            .chars()
            .filter(|&c| c != '_')
            .collect();
        if !is_float && let Ok(v) = raw.parse::<i64>() {
            return Ok(PyValue::Int(v));
        }
        match raw.parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(PyValue::Float(v)),
            _ => {
                self.i = start;
                Err(self.err("malformed number"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_model_j_lists() {
        let v = parse_str_list("['apple', \"maple_tree\", 'it\\'s', \"say \\\"hi\\\"\",]").unwrap();
        assert_eq!(v, ["apple", "maple_tree", "it's", "say \"hi\""]);
        assert_eq!(parse_str_list("[]").unwrap(), Vec::<String>::new());
        assert_eq!(parse_str_list("('a', 'b')").unwrap(), ["a", "b"]);
        assert_eq!(
            parse_str_list("['\\x41\\u00e9\\U0001F600']").unwrap(),
            ["Aé😀"]
        );
    }

    #[test]
    fn parses_scalars() {
        assert_eq!(parse("1e-4").unwrap(), PyValue::Float(1e-4));
        assert_eq!(parse("-12").unwrap(), PyValue::Int(-12));
        assert_eq!(parse("1_000").unwrap(), PyValue::Int(1000));
        assert_eq!(parse(" True ").unwrap(), PyValue::Bool(true));
        assert_eq!(parse("None").unwrap(), PyValue::None);
        assert_eq!(
            parse("[1, [2.5, 'x'], False]").unwrap(),
            PyValue::List(vec![
                PyValue::Int(1),
                PyValue::List(vec![PyValue::Float(2.5), PyValue::Str("x".into())]),
                PyValue::Bool(false)
            ])
        );
    }

    #[test]
    fn refuses_code_and_garbage() {
        for bad in [
            "__import__('os').system('x')",
            "['a' + 'b']",
            "['a' 'b']",
            "['a'",
            "'abc",
            "[1, 2",
            "[a]",
            "b'x'",
            "['a'] ['b']",
            "",
            "1.2.3",
            "inf",
            "1e999",
            "['\\x4']",
            "['\\ud800']",
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
        let deep = "[".repeat(1000) + &"]".repeat(1000);
        assert!(parse(&deep).unwrap_err().to_string().contains("deep"));
        let e = parse_str_list("['apple', 3]").unwrap_err();
        assert_eq!(
            e,
            LiteralError::NotAString {
                index: 1,
                found: "3".into()
            }
        );
        let e = parse("[os.system('rm')]").unwrap_err();
        assert!(
            matches!(&e, LiteralError::Syntax { at: 1, .. }) && e.to_string().contains("`os`"),
            "{e}"
        );
    }
}
