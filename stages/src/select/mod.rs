//! The library behind the `select` stage: given one trained probe per layer of a sweep (or per
//! layer and setting of a grid, e.g. layer x lr x standardize), pick the row with the best
//! validation metric, keep the whole table, and plot it.
//!
//! The paper trains every layer and keeps the one with the best validation accuracy; the metric
//! path and its direction are configurable so the same stage serves losses and other targets.
//! Over a grid the same rule picks a method's setting on validation alone, so methods compared
//! in one report each get the same search.

pub mod plot;
pub mod stage;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use crate::csv::csv_record;

pub use plot::{MetricPlot, PlotError, plot_metric, render_png, render_svg};

/// The results of one probe of a sweep: its layer coordinate, its setting, and its metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerScore {
    /// The sweep coordinate as a label (the layer index, e.g. `"59"`).
    pub layer: String,
    /// The probe's other sweep coordinates as text, e.g. `"lr=0.002, standardize=true"`;
    /// empty when the sweep is over layers alone. A row is a (layer, setting) pair.
    pub setting: String,
    /// That probe's results (e.g. `{"val": {"accuracy": 0.88}, "test": {...}}`).
    pub metrics: Value,
}

impl LayerScore {
    /// A row of a sweep over layers alone (no setting).
    pub fn new(layer: impl Into<String>, metrics: Value) -> Self {
        LayerScore {
            layer: layer.into(),
            setting: String::new(),
            metrics,
        }
    }

    /// The row's label: the layer, and the setting in parentheses when there is one.
    pub fn label(&self) -> String {
        row_label(&self.layer, &self.setting)
    }
}

fn row_label(layer: &str, setting: &str) -> String {
    if setting.is_empty() {
        layer.to_string()
    } else {
        format!("{layer} ({setting})")
    }
}

/// Whether larger or smaller metric values are better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Larger is better (accuracy, AUC).
    Max,
    /// Smaller is better (loss, error).
    Min,
}

impl FromStr for Direction {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "max" => Ok(Direction::Max),
            "min" => Ok(Direction::Min),
            _ => Err(format!("direction must be \"max\" or \"min\", not {s:?}")),
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Max => "max",
            Direction::Min => "min",
        })
    }
}

/// Why no layer could be selected.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum SelectError {
    /// The sweep delivered no probe.
    #[error("nothing to select from: the sweep has no layers")]
    Empty,
    /// Two probes claim the same layer (and setting): the row's label.
    #[error("layer {0:?} appears more than once in the sweep")]
    DuplicateLayer(String),
    /// No probe has the metric (usually a misspelt path).
    #[error(
        "no layer has the metric {metric:?}; metrics the first layer has: {}. Set the selection metric to one of them",
        if available.is_empty() { "none".to_string() } else { available.join(", ") }
    )]
    MetricMissing {
        /// The requested path.
        metric: String,
        /// Numeric leaf paths of the first layer's metrics.
        available: Vec<String>,
    },
    /// The path leads to something that is not a number.
    #[error("metric {metric:?} of layer {layer:?} is not a number: {found}")]
    NotANumber {
        /// The requested path.
        metric: String,
        /// The offending layer.
        layer: String,
        /// What was found there, as JSON.
        found: String,
    },
    /// Every layer's value is missing or not finite.
    #[error("no layer has a finite value for {metric:?}")]
    NoFiniteValue {
        /// The requested path.
        metric: String,
    },
}

/// The outcome of [`select_best`]: the chosen row and the whole per-layer table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    /// The metric path used.
    pub metric: String,
    /// Its direction.
    pub direction: Direction,
    /// Index of the chosen row in the input.
    pub chosen: usize,
    /// Layer labels, in input order.
    pub layers: Vec<String>,
    /// Each row's setting, in input order; empty (and absent from the JSON) when the sweep is
    /// over layers alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub settings: Vec<String>,
    /// The metric per row, in input order; `None` where the row lacks it.
    pub values: Vec<Option<f64>>,
    /// Rows without the metric (never chosen), by label.
    pub missing: Vec<String>,
}

impl Selection {
    /// The chosen layer's label (empty if `chosen` is out of range, which only a hand-edited
    /// selection file can cause: [`Selection::validate`] reports it).
    pub fn chosen_layer(&self) -> &str {
        self.layers.get(self.chosen).map_or("", String::as_str)
    }

    /// The chosen row's setting (empty for a sweep over layers alone).
    pub fn chosen_setting(&self) -> &str {
        self.setting(self.chosen)
    }

    /// Row `i`'s setting (empty when there is none).
    pub fn setting(&self, i: usize) -> &str {
        self.settings.get(i).map_or("", String::as_str)
    }

    /// Whether the rows differ in more than the layer.
    pub fn has_settings(&self) -> bool {
        !self.settings.is_empty()
    }

    /// The chosen layer's metric value (NaN if it has none).
    pub fn best_value(&self) -> f64 {
        self.values
            .get(self.chosen)
            .copied()
            .flatten()
            .unwrap_or(f64::NAN)
    }

    /// Checks a selection read back from disk: one value per layer and a chosen row that exists
    /// and has a value.
    pub fn validate(&self) -> Result<(), String> {
        if self.layers.len() != self.values.len() {
            return Err(format!(
                "selection of {:?}: {} layers but {} values",
                self.metric,
                self.layers.len(),
                self.values.len()
            ));
        }
        if self.has_settings() && self.settings.len() != self.layers.len() {
            return Err(format!(
                "selection of {:?}: {} layers but {} settings",
                self.metric,
                self.layers.len(),
                self.settings.len()
            ));
        }
        if self.values.get(self.chosen).copied().flatten().is_none() {
            return Err(format!(
                "selection of {:?}: chosen row {} is not a layer with a value (there are {} layers)",
                self.metric,
                self.chosen,
                self.layers.len()
            ));
        }
        Ok(())
    }

    /// The table as markdown, in input order (a Setting column when rows have settings); the
    /// chosen row is bold and marked.
    pub fn markdown_table(&self) -> String {
        let metric = self.metric.replace('|', "\\|");
        let mut out = if self.has_settings() {
            format!("| Layer | Setting | {metric} | |\n|---|---|---:|---|\n")
        } else {
            format!("| Layer | {metric} | |\n|---|---:|---|\n")
        };
        for (i, (layer, v)) in self.layers.iter().zip(&self.values).enumerate() {
            let v = v
                .map(|v| format!("{v:.4}"))
                .unwrap_or_else(|| "missing".into());
            let cells = if self.has_settings() {
                vec![layer.clone(), self.setting(i).to_string(), v]
            } else {
                vec![layer.clone(), v]
            };
            if i == self.chosen {
                let bold: Vec<String> = cells.iter().map(|c| format!("**{c}**")).collect();
                out.push_str(&format!("| {} | selected |\n", bold.join(" | ")));
            } else {
                out.push_str(&format!("| {} | |\n", cells.join(" | ")));
            }
        }
        out
    }

    /// The table as CSV: `layer,<metric>,selected`, or `layer,setting,<metric>,selected` when
    /// rows have settings (value empty where missing).
    pub fn csv(&self) -> String {
        let mut head = vec!["layer"];
        if self.has_settings() {
            head.push("setting");
        }
        head.extend([self.metric.as_str(), "selected"]);
        let mut out = csv_record(&head);
        for (i, (layer, v)) in self.layers.iter().zip(&self.values).enumerate() {
            let v = v.map(|v| v.to_string()).unwrap_or_default();
            let mut rec = vec![layer.as_str()];
            if self.has_settings() {
                rec.push(self.setting(i));
            }
            rec.extend([v.as_str(), if i == self.chosen { "true" } else { "false" }]);
            out.push_str(&csv_record(&rec));
        }
        out
    }

    /// The plot description of this selection, for [`plot_metric`]: one point per row. For a
    /// grid, [`Selection::per_layer`] gives the plot of each layer's best setting.
    pub fn plot(&self) -> MetricPlot<'_> {
        MetricPlot {
            layers: &self.layers,
            values: &self.values,
            metric: &self.metric,
            chosen: Some(self.chosen),
        }
    }

    /// Each layer's best value over its settings, as (layers in first-appearance order, values,
    /// index of the chosen row's layer): what the per-layer plot shows for a grid. For a sweep
    /// over layers alone it is the table itself.
    pub fn per_layer(&self) -> (Vec<String>, Vec<Option<f64>>, usize) {
        let mut layers: Vec<String> = Vec::new();
        let mut values: Vec<Option<f64>> = Vec::new();
        for (layer, v) in self.layers.iter().zip(&self.values) {
            let v = v.filter(|v| v.is_finite());
            match layers.iter().position(|l| l == layer) {
                Some(j) => {
                    values[j] = match (values[j], v) {
                        (Some(a), Some(b)) => Some(match self.direction {
                            Direction::Max => a.max(b),
                            Direction::Min => a.min(b),
                        }),
                        (a, b) => a.or(b),
                    }
                }
                None => {
                    layers.push(layer.clone());
                    values.push(v);
                }
            }
        }
        let chosen = layers
            .iter()
            .position(|l| l == self.chosen_layer())
            .unwrap_or(0);
        (layers, values, chosen)
    }
}

/// Looks up a dotted path (`val.accuracy`) in a metrics document. Keys may themselves contain
/// dots (`{"val.accuracy": 0.9}` also matches); the longest key matching at each level wins.
/// `Ok(None)` when the path is absent or null; an error string (the JSON found) when it is not a
/// number.
pub fn metric_value(metrics: &Value, path: &str) -> Result<Option<f64>, String> {
    let parts: Vec<&str> = path.split('.').collect();
    match lookup(metrics, &parts) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => {
            let mut s = other.to_string();
            if s.len() > 80 {
                s.truncate(80);
                s.push_str("...");
            }
            Err(s)
        }
    }
}

fn lookup<'v>(v: &'v Value, parts: &[&str]) -> Option<&'v Value> {
    if parts.is_empty() {
        return Some(v);
    }
    let obj = v.as_object()?;
    (1..=parts.len()).rev().find_map(|j| {
        obj.get(&parts[..j].join("."))
            .and_then(|next| lookup(next, &parts[j..]))
    })
}

/// Numeric leaf paths of a metrics document (for "did you mean" errors), at most 30.
fn numeric_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    if out.len() >= 30 {
        return;
    }
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                numeric_paths(child, &p, out);
            }
        }
        Value::Number(_) if !prefix.is_empty() => out.push(prefix.to_string()),
        _ => {}
    }
}

/// Order key for tie-breaking: numeric labels by value (so `"9"` < `"10"`), before any
/// non-numeric label, which order as strings.
fn layer_key(label: &str) -> (u8, u64, &str) {
    match label.parse::<u64>() {
        Ok(n) => (0, n, ""),
        Err(_) => (1, 0, label),
    }
}

/// Picks the best row (layer, or layer and setting) by the metric at `metric_path`.
///
/// Rows without the metric (absent or null) are recorded as missing and never chosen; so are
/// non-finite values. Equal best values are broken by the lowest layer (numeric labels by
/// value), then by the setting's text, so the choice does not depend on the order the sweep
/// delivered its probes. Errors: no rows, a (layer, setting) pair twice, a metric that no row
/// has (listing the metrics that exist), a non-numeric value, or no finite value at all.
pub fn select_best(
    rows: &[LayerScore],
    metric_path: &str,
    dir: Direction,
) -> Result<Selection, SelectError> {
    if rows.is_empty() {
        return Err(SelectError::Empty);
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = rows
        .iter()
        .find(|r| !seen.insert((r.layer.as_str(), r.setting.as_str())))
    {
        return Err(SelectError::DuplicateLayer(dup.label()));
    }
    let mut values = Vec::with_capacity(rows.len());
    for r in rows {
        let v = metric_value(&r.metrics, metric_path).map_err(|found| SelectError::NotANumber {
            metric: metric_path.to_string(),
            layer: r.label(),
            found,
        })?;
        values.push(v);
    }
    if values.iter().all(Option::is_none) {
        let mut available = Vec::new();
        numeric_paths(&rows[0].metrics, "", &mut available);
        return Err(SelectError::MetricMissing {
            metric: metric_path.to_string(),
            available,
        });
    }
    let better = |a: f64, b: f64| match dir {
        Direction::Max => a > b,
        Direction::Min => a < b,
    };
    fn order(r: &LayerScore) -> ((u8, u64, &str), &str) {
        (layer_key(&r.layer), &r.setting)
    }
    let mut chosen: Option<usize> = None;
    for (i, v) in values.iter().enumerate() {
        let Some(v) = v.filter(|v| v.is_finite()) else {
            continue;
        };
        chosen = match chosen {
            None => Some(i),
            Some(c) => {
                let cv = values[c].unwrap_or(f64::NAN);
                if better(v, cv) || (v == cv && order(&rows[i]) < order(&rows[c])) {
                    Some(i)
                } else {
                    Some(c)
                }
            }
        };
    }
    let chosen = chosen.ok_or_else(|| SelectError::NoFiniteValue {
        metric: metric_path.to_string(),
    })?;
    let missing = rows
        .iter()
        .zip(&values)
        .filter(|(_, v)| v.is_none())
        .map(|(r, _)| r.label())
        .collect();
    let settings = if rows.iter().any(|r| !r.setting.is_empty()) {
        rows.iter().map(|r| r.setting.clone()).collect()
    } else {
        Vec::new()
    };
    Ok(Selection {
        metric: metric_path.to_string(),
        direction: dir,
        chosen,
        layers: rows.iter().map(|r| r.layer.clone()).collect(),
        settings,
        values,
        missing,
    })
}
