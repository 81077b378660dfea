//! The library behind the `select` stage: given one trained probe per layer of a sweep, pick the
//! layer with the best validation metric, keep the whole per-layer table, and plot it.
//!
//! The paper trains every layer and keeps the one with the best validation accuracy; the metric
//! path and its direction are configurable so the same stage serves losses and other targets.

pub mod plot;
pub mod stage;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use crate::evaluate::report::csv_record;

pub use plot::{MetricPlot, PlotError, plot_metric, render_png, render_svg};

/// The results of one probe of a sweep: its layer coordinate and its metrics document.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerScore {
    /// The sweep coordinate as a label (the layer index, e.g. `"59"`).
    pub layer: String,
    /// That probe's results (e.g. `{"val": {"accuracy": 0.88}, "test": {...}}`).
    pub metrics: Value,
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
    /// Two probes claim the same layer.
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
    /// The metric per layer, in input order; `None` where the layer lacks it.
    pub values: Vec<Option<f64>>,
    /// Layers without the metric (never chosen).
    pub missing: Vec<String>,
}

impl Selection {
    /// The chosen layer's label (empty if `chosen` is out of range, which only a hand-edited
    /// selection file can cause: [`Selection::validate`] reports it).
    pub fn chosen_layer(&self) -> &str {
        self.layers.get(self.chosen).map_or("", String::as_str)
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

    /// The per-layer table as markdown, in input order; the chosen row is bold and marked.
    pub fn markdown_table(&self) -> String {
        let mut out = format!(
            "| Layer | {} | |\n|---|---:|---|\n",
            self.metric.replace('|', "\\|")
        );
        for (i, (layer, v)) in self.layers.iter().zip(&self.values).enumerate() {
            let v = v
                .map(|v| format!("{v:.4}"))
                .unwrap_or_else(|| "missing".into());
            if i == self.chosen {
                out.push_str(&format!("| **{layer}** | **{v}** | selected |\n"));
            } else {
                out.push_str(&format!("| {layer} | {v} | |\n"));
            }
        }
        out
    }

    /// The per-layer table as CSV: `layer,<metric>,selected` (value empty where missing).
    pub fn csv(&self) -> String {
        let mut out = csv_record(&["layer", &self.metric, "selected"]);
        for (i, (layer, v)) in self.layers.iter().zip(&self.values).enumerate() {
            let v = v.map(|v| v.to_string()).unwrap_or_default();
            out.push_str(&csv_record(&[
                layer,
                &v,
                if i == self.chosen { "true" } else { "false" },
            ]));
        }
        out
    }

    /// The plot description of this selection, for [`plot_metric`].
    pub fn plot(&self) -> MetricPlot<'_> {
        MetricPlot {
            layers: &self.layers,
            values: &self.values,
            metric: &self.metric,
            chosen: Some(self.chosen),
        }
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

/// Picks the best layer by the metric at `metric_path`.
///
/// Layers without the metric (absent or null) are recorded as missing and never chosen; so are
/// non-finite values. Equal best values are broken by the lowest layer (numeric labels by
/// value), so the choice does not depend on the order the sweep delivered its probes. Errors: no
/// layers, duplicate layers, a metric that no layer has (listing the metrics that exist), a
/// non-numeric value, or no finite value at all.
pub fn select_best(
    rows: &[LayerScore],
    metric_path: &str,
    dir: Direction,
) -> Result<Selection, SelectError> {
    if rows.is_empty() {
        return Err(SelectError::Empty);
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = rows.iter().find(|r| !seen.insert(r.layer.as_str())) {
        return Err(SelectError::DuplicateLayer(dup.layer.clone()));
    }
    let mut values = Vec::with_capacity(rows.len());
    for r in rows {
        let v = metric_value(&r.metrics, metric_path).map_err(|found| SelectError::NotANumber {
            metric: metric_path.to_string(),
            layer: r.layer.clone(),
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
    let mut chosen: Option<usize> = None;
    for (i, v) in values.iter().enumerate() {
        let Some(v) = v.filter(|v| v.is_finite()) else {
            continue;
        };
        chosen = match chosen {
            None => Some(i),
            Some(c) => {
                let cv = values[c].unwrap_or(f64::NAN);
                if better(v, cv)
                    || (v == cv && layer_key(&rows[i].layer) < layer_key(&rows[c].layer))
                {
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
        .map(|(r, _)| r.layer.clone())
        .collect();
    Ok(Selection {
        metric: metric_path.to_string(),
        direction: dir,
        chosen,
        layers: rows.iter().map(|r| r.layer.clone()).collect(),
        values,
        missing,
    })
}
