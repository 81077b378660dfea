//! Layer selectors: which layers of a model to extract.
//!
//! Written in TOML as an integer (`59`), a string, or a list of those. Strings are `all`, an
//! index (`"59"`), a range (`"40..60"` end-exclusive, `"40..=60"` inclusive), `re:<regex>`
//! (searched anywhere in the name), `glob:<pattern>` or a bare pattern containing `*`, `?` or
//! `[` (matched against the whole name; `*` also crosses dots), or an exact tensor name.
//!
//! Every selector picks among the model's layers (its layer list, see [`super::arch`]):
//! indices count in that list, and `all`, names and patterns see only its tensors (on a ViT,
//! `"*.weight"` matches no layernorm).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

use super::layers::LayerRow;

/// Which layers to extract; see the module docs for the syntax.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerSelector {
    /// Every layer that can be a probe input (floating point, non-empty).
    All,
    /// One layer by its index in the layer list.
    Index(usize),
    /// Layers `start..end` (end exclusive).
    Range {
        /// First index.
        start: usize,
        /// One past the last index.
        end: usize,
    },
    /// One layer by exact tensor name.
    Name(String),
    /// Layers whose whole name matches a glob.
    Glob(String),
    /// Layers whose name contains a match of a regex.
    Regex(String),
    /// The union of several selectors.
    List(Vec<LayerSelector>),
}

impl fmt::Display for LayerSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayerSelector::All => f.write_str("all"),
            LayerSelector::Index(i) => write!(f, "{i}"),
            LayerSelector::Range { start, end } => write!(f, "{start}..{end}"),
            LayerSelector::Name(n) => f.write_str(n),
            LayerSelector::Glob(g) => write!(f, "glob:{g}"),
            LayerSelector::Regex(r) => write!(f, "re:{r}"),
            LayerSelector::List(v) => {
                f.write_str("[")?;
                for (i, s) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{s}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// Why a layer selector cannot be read or picks no usable layer of a file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// An empty selector.
    #[error(
        "empty layer selector; use an index, a range like \"40..60\", a name, a glob, \
         \"re:<regex>\" or \"all\""
    )]
    Empty,
    /// A `re:` selector that is not a regex.
    #[error("layer regex `{regex}`: {reason}")]
    BadRegex {
        /// The regex as written.
        regex: String,
        /// The regex engine's objection.
        reason: String,
    },
    /// A glob that is not a pattern.
    #[error("layer glob `{glob}`: {reason}")]
    BadGlob {
        /// The glob as written.
        glob: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An index past `usize`.
    #[error("layer index `{0}` is too large")]
    IndexTooLarge(String),
    /// A range bound that is not an index.
    #[error("layer range `{range}`: `{bound}` is not an index")]
    BadBound {
        /// The range as written.
        range: String,
        /// The bound.
        bound: String,
    },
    /// A range whose end overflows.
    #[error("layer range `{0}` is too large")]
    RangeTooLarge(String),
    /// A range with no layer in it.
    #[error("layer range `{0}` is empty")]
    EmptyRange(String),
    /// A selector that picks no layer of the file.
    #[error("layer selector `{0}` selects no layer")]
    SelectsNothing(String),
    /// A layer named by index or name that cannot be a probe input.
    #[error("layer {index} `{name}` cannot be a probe input: {why}")]
    NotAnInput {
        /// Its index.
        index: usize,
        /// Its tensor name.
        name: String,
        /// Why (the row's note).
        why: String,
    },
    /// An index past the last layer.
    #[error("layer {index} does not exist: {}", count_note(*count))]
    OutOfRange {
        /// The index asked for.
        index: usize,
        /// How many layers the model has.
        count: usize,
    },
    /// A name that is no layer.
    #[error("no layer is named `{name}`{}", similar_note(similar))]
    NoSuchLayer {
        /// The name.
        name: String,
        /// Up to five layer names that contain it or that it contains.
        similar: Vec<String>,
    },
}

/// How many layers a model has, for [`SelectorError::OutOfRange`].
fn count_note(n: usize) -> String {
    if n == 0 {
        "the model has no layers".to_string()
    } else {
        format!("the model has {n} layers (0..={})", n - 1)
    }
}

/// The end of [`SelectorError::NoSuchLayer`]'s message.
fn similar_note(similar: &[String]) -> String {
    if similar.is_empty() {
        " (list them with `probex layers FILE`)".to_string()
    } else {
        format!("; similar: {}", similar.join(", "))
    }
}

impl FromStr for LayerSelector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, SelectorError> {
        let t = s.trim();
        if t.is_empty() {
            return Err(SelectorError::Empty);
        }
        if t == "all" {
            return Ok(LayerSelector::All);
        }
        if let Some(r) = t.strip_prefix("re:") {
            regex::Regex::new(r).map_err(|e| bad_regex(r, e))?;
            return Ok(LayerSelector::Regex(r.to_string()));
        }
        if let Some(g) = t.strip_prefix("glob:") {
            glob_regex(g)?;
            return Ok(LayerSelector::Glob(g.to_string()));
        }
        if t.bytes().all(|b| b.is_ascii_digit()) {
            return t
                .parse()
                .map(LayerSelector::Index)
                .map_err(|_| SelectorError::IndexTooLarge(t.to_owned()));
        }
        if let Some((a, b)) = t.split_once("..")
            && a.bytes().all(|c| c.is_ascii_digit())
            && !a.is_empty()
        {
            let (inclusive, b) = match b.strip_prefix('=') {
                Some(b) => (true, b),
                None => (false, b),
            };
            let parse = |x: &str| {
                x.parse::<usize>().map_err(|_| SelectorError::BadBound {
                    range: t.to_owned(),
                    bound: x.to_owned(),
                })
            };
            let start = parse(a)?;
            let end = parse(b)?
                .checked_add(usize::from(inclusive))
                .ok_or_else(|| SelectorError::RangeTooLarge(t.to_owned()))?;
            if end <= start {
                return Err(SelectorError::EmptyRange(t.to_owned()));
            }
            return Ok(LayerSelector::Range { start, end });
        }
        if t.contains(['*', '?', '[']) {
            glob_regex(t)?;
            return Ok(LayerSelector::Glob(t.to_string()));
        }
        Ok(LayerSelector::Name(t.to_string()))
    }
}

impl<'de> Deserialize<'de> for LayerSelector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Index(u64),
            Text(String),
            List(Vec<Raw>),
        }
        fn convert(r: Raw) -> Result<LayerSelector, SelectorError> {
            match r {
                Raw::Index(i) => usize::try_from(i)
                    .map(LayerSelector::Index)
                    .map_err(|_| SelectorError::IndexTooLarge(i.to_string())),
                Raw::Text(s) => s.parse(),
                Raw::List(v) => v
                    .into_iter()
                    .map(convert)
                    .collect::<Result<Vec<_>, _>>()
                    .map(LayerSelector::List),
            }
        }
        let raw = Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected a layer index, a string (\"all\", \"40..60\", a name, a glob, \
                 \"re:<regex>\") or a list of those",
            )
        })?;
        convert(raw).map_err(serde::de::Error::custom)
    }
}

/// Translates a glob into an anchored regex: `*` any run of characters, `?` one character,
/// `[...]` a class (`[!...]` negated); everything else literal.
fn glob_regex(glob: &str) -> Result<regex::Regex, SelectorError> {
    let mut re = String::from("^");
    let mut chars = glob.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => re.push_str(".*"),
            '?' => re.push('.'),
            '[' => {
                let mut class = String::from("[");
                if chars.peek() == Some(&'!') {
                    chars.next();
                    class.push('^');
                }
                let mut closed = false;
                for c in chars.by_ref() {
                    if c == ']' {
                        closed = true;
                        break;
                    }
                    if matches!(c, '\\' | '[' | '&' | '~' | '^') {
                        class.push('\\');
                    }
                    class.push(c);
                }
                if !closed {
                    return Err(SelectorError::BadGlob {
                        glob: glob.to_owned(),
                        reason: "`[` is never closed".to_owned(),
                    });
                }
                class.push(']');
                re.push_str(&class);
            }
            c => re.push_str(&regex::escape(&c.to_string())),
        }
    }
    re.push('$');
    regex::Regex::new(&re).map_err(|e| SelectorError::BadGlob {
        glob: glob.to_owned(),
        reason: e.to_string(),
    })
}

/// [`SelectorError::BadRegex`] for `regex`.
fn bad_regex(regex: &str, e: regex::Error) -> SelectorError {
    SelectorError::BadRegex {
        regex: regex.to_owned(),
        reason: e.to_string(),
    }
}

impl LayerSelector {
    /// The exact tensor names this selector gives (its [`LayerSelector::Name`]s, in lists too).
    pub fn names(&self) -> Vec<&str> {
        match self {
            LayerSelector::Name(n) => vec![n.as_str()],
            LayerSelector::List(v) => v.iter().flat_map(LayerSelector::names).collect(),
            _ => Vec::new(),
        }
    }

    /// The indices (ascending, unique) of the layers of `rows` this selector picks.
    ///
    /// `All`, globs and regexes pick only layers that can be probe inputs (`matrix` present);
    /// naming a layer that cannot (by index or name) is an error saying why. A selector that
    /// picks nothing is an error.
    pub fn resolve(&self, rows: &[LayerRow]) -> Result<Vec<usize>, SelectorError> {
        let mut out = Vec::new();
        self.collect(rows, &mut out)?;
        out.sort_unstable();
        out.dedup();
        if out.is_empty() {
            return Err(SelectorError::SelectsNothing(self.to_string()));
        }
        Ok(out)
    }

    fn collect(&self, rows: &[LayerRow], out: &mut Vec<usize>) -> Result<(), SelectorError> {
        let usable = |r: &LayerRow| r.matrix.is_some();
        let explicit = |r: &LayerRow| -> Result<usize, SelectorError> {
            match &r.note {
                Some(why) if r.matrix.is_none() => Err(SelectorError::NotAnInput {
                    index: r.index,
                    name: r.name.clone(),
                    why: why.clone(),
                }),
                _ => Ok(r.index),
            }
        };
        match self {
            LayerSelector::All => out.extend(rows.iter().filter(|r| usable(r)).map(|r| r.index)),
            LayerSelector::Index(i) => {
                let r = rows.get(*i).ok_or_else(|| out_of_range(*i, rows.len()))?;
                out.push(explicit(r)?);
            }
            LayerSelector::Range { start, end } => {
                if *end > rows.len() {
                    return Err(out_of_range(end - 1, rows.len()));
                }
                for r in &rows[*start..*end] {
                    out.push(explicit(r)?);
                }
            }
            LayerSelector::Name(n) => {
                let r = rows.iter().find(|r| &r.name == n).ok_or_else(|| {
                    SelectorError::NoSuchLayer {
                        name: n.clone(),
                        similar: rows
                            .iter()
                            .filter(|r| r.name.contains(n.as_str()) || n.contains(r.name.as_str()))
                            .take(5)
                            .map(|r| r.name.clone())
                            .collect(),
                    }
                })?;
                out.push(explicit(r)?);
            }
            LayerSelector::Glob(g) => {
                let re = glob_regex(g)?;
                out.extend(
                    rows.iter()
                        .filter(|r| usable(r) && re.is_match(&r.name))
                        .map(|r| r.index),
                );
            }
            LayerSelector::Regex(r) => {
                let re = regex::Regex::new(r).map_err(|e| bad_regex(r, e))?;
                out.extend(
                    rows.iter()
                        .filter(|row| usable(row) && re.is_match(&row.name))
                        .map(|row| row.index),
                );
            }
            LayerSelector::List(v) => {
                for s in v {
                    s.collect(rows, out)?;
                }
            }
        }
        Ok(())
    }
}

fn out_of_range(index: usize, count: usize) -> SelectorError {
    SelectorError::OutOfRange { index, count }
}

/// Serialises as it is written in TOML: an index as a number, a list as an array, anything
/// else as its text (`"all"`, `"40..60"`, `"glob:*.query.weight"`, `"re:attn2"`, a name).
impl serde::Serialize for LayerSelector {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            LayerSelector::Index(i) => s.serialize_u64(*i as u64),
            LayerSelector::List(v) => s.collect_seq(v),
            other => s.collect_str(other),
        }
    }
}
