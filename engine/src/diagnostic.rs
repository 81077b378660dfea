//! Error messages about experiment files, in the style of rustc: file, line, column, the source
//! line with a caret under the offending span, and what was expected.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The text of every experiment file read for one experiment, so that any later error can still
/// point into the right file.
#[derive(Clone, Debug, Default)]
pub struct SourceMap {
    files: Vec<Arc<SourceFile>>,
}

/// One experiment file and its text.
#[derive(Debug)]
pub struct SourceFile {
    /// The path as the user gave it (or as an include resolved it).
    pub path: PathBuf,
    /// The whole text.
    pub text: String,
}

/// Index of a file in a [`SourceMap`].
pub type FileId = usize;

/// A byte range in one file of a [`SourceMap`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    /// The file.
    pub file: FileId,
    /// Byte offsets into the file's text.
    pub range: Range<usize>,
}

impl SourceMap {
    /// Adds a file and returns its id.
    pub fn add(&mut self, path: PathBuf, text: String) -> FileId {
        self.files.push(Arc::new(SourceFile { path, text }));
        self.files.len() - 1
    }

    /// The file with this id.
    pub fn file(&self, id: FileId) -> &SourceFile {
        &self.files[id]
    }

    /// Every file, in the order read.
    pub fn files(&self) -> impl Iterator<Item = &SourceFile> {
        self.files.iter().map(|f| f.as_ref())
    }
}

/// One error with an optional position and optional help lines.
#[derive(Clone, Debug)]
pub struct Diagnostic {
    /// What is wrong, in one line.
    pub message: String,
    /// Where, if known: file path, line and column (1-based), the line's text, the caret width.
    /// Boxed so that `Result<_, Diagnostic>` stays small on the success path.
    pub location: Option<Box<Location>>,
    /// A short label printed under the caret.
    pub label: Option<String>,
    /// Lines printed after the snippet, each as `= help: ...`.
    pub help: Vec<String>,
}

/// A resolved position, kept with the line's text so the diagnostic prints on its own.
#[derive(Clone, Debug)]
pub struct Location {
    /// File path as given.
    pub path: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// The text of that line.
    pub line_text: String,
    /// Number of characters to underline (at least 1).
    pub width: usize,
}

impl Diagnostic {
    /// A diagnostic with no position (a missing file, a bad command-line flag).
    pub fn new(message: impl Into<String>) -> Self {
        Diagnostic {
            message: message.into(),
            location: None,
            label: None,
            help: Vec::new(),
        }
    }

    /// A diagnostic about a whole file (it is empty, its name is unusable): `--> path` with no
    /// line.
    pub fn in_file(path: &Path, message: impl Into<String>) -> Self {
        Diagnostic {
            message: message.into(),
            location: Some(Box::new(locate(path, "", 0..0))),
            label: None,
            help: Vec::new(),
        }
    }

    /// A diagnostic pointing at `span` of a file in `sources`.
    pub fn at(sources: &SourceMap, span: &Span, message: impl Into<String>) -> Self {
        let file = sources.file(span.file);
        Diagnostic {
            message: message.into(),
            location: Some(Box::new(locate(&file.path, &file.text, span.range.clone()))),
            label: None,
            help: Vec::new(),
        }
    }

    /// Turns a `toml` parse or deserialize error on `file` into a diagnostic with its position.
    pub fn from_toml(sources: &SourceMap, file: FileId, err: &toml::de::Error) -> Self {
        let message = first_line(err.message());
        let mut d = match err.span() {
            Some(range) => Diagnostic::at(sources, &Span { file, range }, message),
            None => Diagnostic::in_file(&sources.file(file).path, message),
        };
        // toml puts "expected ..." lists on later lines of its message.
        d.help.extend(
            err.message()
                .lines()
                .skip(1)
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
        d
    }

    /// Adds a label under the caret.
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// Adds a help line.
    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help.push(help.into());
        self
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).trim().to_string()
}

fn locate(path: &Path, text: &str, range: Range<usize>) -> Location {
    let start = floor_char_boundary(text, range.start.min(text.len()));
    let end = floor_char_boundary(text, range.end.clamp(start, text.len()));
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let line_text = text[line_start..line_end]
        .trim_end_matches('\r')
        .to_string();
    let line = text[..start].matches('\n').count() + 1;
    let column = text[line_start..start].chars().count() + 1;
    let width = text[start..end.min(line_end).max(start)]
        .chars()
        .count()
        .max(1);
    Location {
        path: path.to_path_buf(),
        line,
        column,
        line_text,
        width,
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "error: {}", self.message)?;
        if let Some(loc) = &self.location {
            if loc.line_text.is_empty() && loc.line == 1 && loc.column == 1 {
                writeln!(f, "  --> {}", loc.path.display())?;
            } else {
                let gutter = loc.line.to_string().len();
                let pad = " ".repeat(gutter);
                writeln!(
                    f,
                    "{pad}--> {}:{}:{}",
                    loc.path.display(),
                    loc.line,
                    loc.column
                )?;
                writeln!(f, "{pad} |")?;
                writeln!(f, "{} | {}", loc.line, loc.line_text)?;
                let indent: String = loc
                    .line_text
                    .chars()
                    .take(loc.column - 1)
                    .map(|c| if c == '\t' { '\t' } else { ' ' })
                    .collect();
                write!(f, "{pad} | {indent}{}", "^".repeat(loc.width))?;
                match &self.label {
                    Some(label) => writeln!(f, " {label}")?,
                    None => writeln!(f)?,
                }
            }
        }
        for h in &self.help {
            writeln!(f, "  = help: {h}")?;
        }
        Ok(())
    }
}

/// One or more diagnostics: everything wrong with an experiment that could be found before
/// running it.
#[derive(Clone, Debug)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

impl From<Diagnostic> for Diagnostics {
    fn from(d: Diagnostic) -> Self {
        Diagnostics(vec![d])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_at_line_and_column_with_caret() {
        let mut sm = SourceMap::default();
        let text = "[a]\nkey = \"value\"\n";
        let id = sm.add("x.toml".into(), text.into());
        let start = text.find('"').unwrap();
        let d = Diagnostic::at(
            &sm,
            &Span {
                file: id,
                range: start..start + 7,
            },
            "bad value",
        )
        .with_label("here")
        .with_help("use a number");
        let s = d.to_string();
        assert!(s.contains("--> x.toml:2:7"), "{s}");
        assert!(s.contains("2 | key = \"value\""), "{s}");
        assert!(s.contains("  |       ^^^^^^^ here"), "{s}");
        assert!(s.contains("= help: use a number"), "{s}");
    }

    #[test]
    fn survives_spans_past_the_end_and_inside_multibyte_chars() {
        let mut sm = SourceMap::default();
        let id = sm.add("y.toml".into(), "é = 1".into());
        let d = Diagnostic::at(
            &sm,
            &Span {
                file: id,
                range: 1..99,
            },
            "m",
        );
        assert!(d.to_string().contains("y.toml:1:1"));
    }
}
