//! Report rendering: markdown tables in the paper's layout (rows = methods, columns = subsets or
//! metrics, with parameter counts), the same tables as CSV, and a small document model for
//! `report.md`. Everything renders to `String`; the stage decides where files go.

use std::collections::BTreeMap;

use crate::csv::csv_record;

/// One row of a results table: a method (ProbeX, Dense, StatNN, random) and its numbers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MethodRow {
    /// Method name as printed.
    pub method: String,
    /// Optional group printed in a leading column (the subset, in the paper's zero-shot table).
    pub group: Option<String>,
    /// Trainable parameters; `None` prints `-` (e.g. for a random baseline).
    pub params: Option<u64>,
    /// Values by metric key. A key `K.std` next to `K` prints as `value ± std`.
    pub metrics: BTreeMap<String, f64>,
}

impl MethodRow {
    /// A row with no metrics yet.
    pub fn new(method: impl Into<String>, params: Option<u64>) -> Self {
        MethodRow {
            method: method.into(),
            group: None,
            params,
            metrics: BTreeMap::new(),
        }
    }

    /// Sets the group (subset) column of this row.
    pub fn in_group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Adds one metric value.
    pub fn with(mut self, key: impl Into<String>, value: f64) -> Self {
        self.metrics.insert(key.into(), value);
        self
    }
}

/// One value column of a table: which metric key it shows, under which header, with how many
/// decimals (the paper prints 3: `0.885`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Metric key looked up in [`MethodRow::metrics`].
    pub key: String,
    /// Header text.
    pub header: String,
    /// Decimals printed in markdown (CSV keeps full precision).
    pub digits: usize,
}

impl Column {
    /// A column with the paper's 3 decimals.
    pub fn new(key: impl Into<String>, header: impl Into<String>) -> Self {
        Column {
            key: key.into(),
            header: header.into(),
            digits: 3,
        }
    }

    /// The same column with `digits` decimals.
    pub fn digits(mut self, digits: usize) -> Self {
        self.digits = digits;
        self
    }
}

/// A parameter count as papers print it: `850`, `12K`, `2.3M`, `59M`, `105M`, `1.2B` (one
/// decimal below 10 of a unit, none above; a trailing `.0` is dropped).
pub fn format_params(n: u64) -> String {
    const UNITS: [(f64, &str); 3] = [(1e9, "B"), (1e6, "M"), (1e3, "K")];
    if n < 1000 {
        return n.to_string();
    }
    let x = n as f64;
    // Pick the unit after rounding, so 999,999 prints as 1M rather than 1000K.
    for (i, &(scale, unit)) in UNITS.iter().enumerate() {
        let v = x / scale;
        if v < 1.0 && i + 1 < UNITS.len() {
            continue;
        }
        let rounded = if v < 10.0 {
            (v * 10.0).round() / 10.0
        } else {
            v.round()
        };
        if rounded >= 1000.0 && i > 0 {
            let up = x / UNITS[i - 1].0;
            return trim(format!("{:.1}", (up * 10.0).round() / 10.0)) + UNITS[i - 1].1;
        }
        return if rounded < 10.0 {
            trim(format!("{rounded:.1}")) + unit
        } else {
            format!("{rounded:.0}{unit}")
        };
    }
    n.to_string()
}

fn trim(s: String) -> String {
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

/// One markdown table line; an empty cell prints as `| |`.
fn table_line(cells: &[String]) -> String {
    let mut out = String::from("|");
    for c in cells {
        if c.is_empty() {
            out.push_str(" |");
        } else {
            out.push_str(&format!(" {c} |"));
        }
    }
    out.push('\n');
    out
}

/// Text safe inside a markdown table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

fn value_text(row: &MethodRow, col: &Column) -> String {
    match row.metrics.get(&col.key) {
        Some(v) if v.is_finite() => {
            let digits = col.digits;
            match row.metrics.get(&format!("{}.std", col.key)) {
                Some(s) if s.is_finite() => format!("{v:.digits$} ± {s:.digits$}"),
                _ => format!("{v:.digits$}"),
            }
        }
        Some(v) => v.to_string(),
        None => "-".into(),
    }
}

/// A markdown table: `| [Subset |] Method | <columns> | [Params |]`. The subset column appears
/// when any row has a group (printed on the first row of each run), the params column when any
/// row has a count. Missing values print `-`.
pub fn render_table(rows: &[MethodRow], columns: &[Column]) -> String {
    let grouped = rows.iter().any(|r| r.group.is_some());
    let with_params = rows.iter().any(|r| r.params.is_some());
    let mut header: Vec<String> = Vec::new();
    let mut align: Vec<&str> = Vec::new();
    if grouped {
        header.push("Subset".into());
        align.push("---");
    }
    header.push("Method".into());
    align.push("---");
    for c in columns {
        header.push(cell(&c.header));
        align.push("---:");
    }
    if with_params {
        header.push("Params".into());
        align.push("---:");
    }
    let mut out = table_line(&header) + &format!("|{}|\n", align.join("|"));
    let mut last_group: Option<&str> = None;
    for r in rows {
        let mut cells: Vec<String> = Vec::new();
        if grouped {
            let g = r.group.as_deref().unwrap_or("");
            cells.push(if last_group == Some(g) {
                String::new()
            } else {
                cell(g)
            });
            last_group = Some(g);
        }
        cells.push(cell(&r.method));
        cells.extend(columns.iter().map(|c| value_text(r, c)));
        if with_params {
            cells.push(r.params.map(format_params).unwrap_or_else(|| "-".into()));
        }
        out.push_str(&table_line(&cells));
    }
    out
}

/// The table as CSV: `[group,]method,<column keys>,[<key>.std,]params`, values at full
/// precision (shortest round-trip form), empty cells where missing, raw parameter counts.
pub fn table_csv(rows: &[MethodRow], columns: &[Column]) -> String {
    let grouped = rows.iter().any(|r| r.group.is_some());
    let mut header: Vec<String> = Vec::new();
    if grouped {
        header.push("group".into());
    }
    header.push("method".into());
    for c in columns {
        header.push(c.key.clone());
        let std_key = format!("{}.std", c.key);
        if rows.iter().any(|r| r.metrics.contains_key(&std_key)) {
            header.push(std_key);
        }
    }
    header.push("params".into());
    let h: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut out = csv_record(&h);
    for r in rows {
        let mut cells: Vec<String> = Vec::new();
        if grouped {
            cells.push(r.group.clone().unwrap_or_default());
        }
        cells.push(r.method.clone());
        let skip = usize::from(grouped) + 1;
        for key in &header[skip..header.len() - 1] {
            cells.push(
                r.metrics
                    .get(key)
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
            );
        }
        cells.push(r.params.map(|p| p.to_string()).unwrap_or_default());
        let c: Vec<&str> = cells.iter().map(String::as_str).collect();
        out.push_str(&csv_record(&c));
    }
    out
}

/// One piece of a report section.
#[derive(Clone, Debug, PartialEq)]
pub enum Block {
    /// A paragraph of markdown text.
    Text(String),
    /// A results table, rendered by [`render_table`].
    Table {
        /// The rows.
        rows: Vec<MethodRow>,
        /// The value columns.
        columns: Vec<Column>,
    },
    /// Markdown rendered elsewhere (e.g. the layer-selection table), inserted as is.
    Markdown(String),
    /// An image beside the report (a plot), by relative path.
    Image {
        /// Alt text.
        alt: String,
        /// Path relative to `report.md`.
        path: String,
    },
    /// A two-column `| key | value |` table (run facts: layer, shrinkage, tie rule...).
    Facts(Vec<(String, String)>),
}

/// A titled part of a report.
#[derive(Clone, Debug, PartialEq)]
pub struct Section {
    /// `##` heading.
    pub heading: String,
    /// Contents, in order.
    pub blocks: Vec<Block>,
}

/// The `report.md` of a run: a title, an introduction and sections.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// `#` title.
    pub title: String,
    /// Blocks before the first section.
    pub intro: Vec<Block>,
    /// The sections.
    pub sections: Vec<Section>,
}

fn render_block(b: &Block) -> String {
    match b {
        Block::Text(t) => format!("{}\n", t.trim_end()),
        Block::Table { rows, columns } => render_table(rows, columns),
        Block::Markdown(m) => format!("{}\n", m.trim_end()),
        Block::Image { alt, path } => format!("![{alt}]({path})\n"),
        Block::Facts(kv) => {
            let mut out = String::from("| | |\n|---|---|\n");
            for (k, v) in kv {
                out.push_str(&format!("| {} | {} |\n", cell(k), cell(v)));
            }
            out
        }
    }
}

impl Report {
    /// The markdown document: blocks separated by one blank line, ending with one newline.
    pub fn render(&self) -> String {
        let mut parts = vec![format!("# {}\n", self.title)];
        parts.extend(self.intro.iter().map(render_block));
        for s in &self.sections {
            parts.push(format!("## {}\n", s.heading));
            parts.extend(s.blocks.iter().map(render_block));
        }
        parts.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_like_the_paper() {
        let cases = [
            (0, "0"),
            (850, "850"),
            (1_000, "1K"),
            (12_345, "12K"),
            (999_999, "1M"),
            (2_306_788, "2.3M"),
            (2_500_000, "2.5M"),
            (9_960_000, "10M"),
            (32_000_000, "32M"),
            (59_000_000, "59M"),
            (104_857_600, "105M"),
            (210_000_000, "210M"),
            (1_234_567_890, "1.2B"),
        ];
        for (n, want) in cases {
            assert_eq!(format_params(n), want, "{n}");
        }
    }

    #[test]
    fn csv_quotes_only_when_needed() {
        assert_eq!(
            csv_record(&["a", "b,c", "say \"hi\"", ""]),
            "a,\"b,c\",\"say \"\"hi\"\"\",\n"
        );
    }

    #[test]
    fn table_cells_escape_pipes() {
        let t = render_table(
            &[MethodRow::new("a|b", None).with("x", f64::NAN)],
            &[Column::new("x", "X")],
        );
        assert_eq!(t, "| Method | X |\n|---|---:|\n| a\\|b | NaN |\n");
    }
}
