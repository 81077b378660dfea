//! The `select` stage kind: the best layer (and setting) of a sweep of trained probes.
//!
//! ```toml
//! [stage.best]
//! kind = "select"
//! from = "probe"            # a fan-out of `train` nodes, read whole
//! by = "val.accuracy"       # a path into each probe's results
//! direction = "max"         # or "min" (losses)
//! ```
//! The upstream may sweep more than layers (`for_each = ["layer", "lr", "standardize"]` with
//! `lr = [1e-3, 2e-3]`, ...): a row is then a layer and a setting, the probe's other
//! coordinates that vary within the sweep (`lr=0.002, standardize=true`), and the choice is
//! over both. Coordinates the select node itself is bound to (its own `for_each`, e.g. `tree`)
//! are the same for every row and are no part of the setting.
//!
//! The artifact is the chosen probe's files (so `evaluate` needs nothing else) plus the whole
//! table (`selection.json`, `layers.csv`) and the metric-per-layer plot (`layers.svg`,
//! `layers.png`; over a grid, each layer's best setting), which the run record publishes.

use probex_engine::{
    InputSlot, Inputs, Outcome, ParamError, PlanFacts, PlanInput, RunContext, Shape, Stage,
    StageResult,
};
use serde::{Deserialize, Serialize};

use super::{Direction, LayerScore, MetricPlot, plot_metric, select_best};
use crate::train::{self, files};

/// The artifact type of a selection.
pub const ARTIFACT: &str = "selection";
/// The selection table inside a selection artifact.
pub const SELECTION_FILE: &str = "selection.json";

/// Parameters of `select`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectParams {
    /// Path of the metric in each probe's results (`val.accuracy`, `val.top1`, `val.r2`).
    #[serde(default = "default_by")]
    pub by: String,
    /// Whether larger or smaller is better.
    #[serde(default = "default_direction")]
    pub direction: Direction,
}

fn default_by() -> String {
    "val.accuracy".into()
}
fn default_direction() -> Direction {
    Direction::Max
}

/// The `select` stage kind.
pub struct Select;

impl Stage for Select {
    type Params = SelectParams;

    fn kind(&self) -> &'static str {
        "select"
    }
    fn version(&self) -> u32 {
        // 2: zero-shot selections carry the text table and encoder record.
        // 3: standardised probes carry standardize.safetensors beside the checkpoint.
        // 4: rows are (layer, setting) over grids; results carry `setting`.
        4
    }
    fn about(&self) -> &'static str {
        "pick the best layer (and setting, over a grid) of a sweep of probes by a validation metric"
    }
    fn params_doc(&self) -> probex_engine::ParamsDoc {
        crate::params_doc::SELECT
    }
    fn output(&self) -> &'static str {
        ARTIFACT
    }
    fn inputs(&self) -> Vec<InputSlot> {
        vec![InputSlot::one(train::ARTIFACT).gathered()]
    }

    fn check(&self, p: &SelectParams) -> Result<(), ParamError> {
        if p.by.split('.').any(str::is_empty) {
            return Err(ParamError::at(
                "by",
                format!(
                    "`by = \"{}\"` is not a metric path (e.g. \"val.accuracy\")",
                    p.by
                ),
            ));
        }
        Ok(())
    }

    /// Checks `by` against the metrics its probes will report (their task decides them: a
    /// category probe has `val.top1`, not `val.accuracy`), before anything trains; reports
    /// what the chosen probe reports, plus the choice.
    fn plan_facts(
        &self,
        p: &SelectParams,
        inputs: &[PlanInput<'_>],
    ) -> Result<PlanFacts, ParamError> {
        let Some(probes) = inputs.iter().find(|i| i.ty == train::ARTIFACT) else {
            return Ok(PlanFacts::default());
        };
        let up = probes.facts;
        if let Err(m) = up.results.check(&p.by) {
            let task = up
                .facts
                .get(train::TASK)
                .and_then(|t| t.as_str())
                .map_or(String::new(), |t| {
                    format!(" (`{}` trains {t} probes)", probes.stage)
                });
            let default = if p.by == default_by() {
                " (the default; set `by`)"
            } else {
                ""
            };
            return Err(ParamError::at(
                "by",
                format!(
                    "`by = \"{}\"`{default} names no metric its probes report{task}: {m}",
                    p.by
                ),
            ));
        }
        Ok(PlanFacts {
            results: up
                .results
                .clone()
                .with("layer", Shape::Value)
                .with("setting", Shape::Value)
                .with("selected_by", Shape::Value)
                .with("layers_swept", Shape::Value),
            facts: up.facts.clone(),
        })
    }

    fn run(&self, p: &SelectParams, inputs: &Inputs, cx: &RunContext) -> StageResult<Outcome> {
        let probes = inputs.all(train::ARTIFACT);
        let varying = varying_dims(probes.iter().map(|a| &a.coords));
        let rows: Vec<LayerScore> = probes
            .iter()
            .map(|a| LayerScore {
                layer: a
                    .coords
                    .iter()
                    .find(|(d, _)| d == "layer")
                    .map_or_else(|| a.node.clone(), |(_, v)| v.clone()),
                setting: a
                    .coords
                    .iter()
                    .filter(|(d, _)| d != "layer" && varying.contains(d))
                    .map(|(d, v)| format!("{d}={v}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                metrics: a.results.clone().unwrap_or_default(),
            })
            .collect();
        let sel = select_best(&rows, &p.by, p.direction)?;
        let chosen = &probes[sel.chosen];
        let setting = if sel.has_settings() {
            format!(", setting {}", sel.chosen_setting())
        } else {
            String::new()
        };
        cx.log(format!(
            "best layer {}{setting} by {} = {:.4} ({} rows)",
            sel.chosen_layer(),
            p.by,
            sel.best_value(),
            rows.len()
        ));

        let out = cx.out_dir();
        let probe_files = [
            files::CHECKPOINT,
            files::HOLDOUT_CHECKPOINT,
            files::STANDARDIZE,
            files::REPORT,
            files::OUTPUTS,
            files::ROWS,
            files::TEXT,
        ];
        for f in probe_files.iter().chain(&files::TEXT_TABLE) {
            let src = chosen.dir.join(f);
            if src.is_file() {
                std::fs::copy(&src, out.join(f))
                    .map_err(|e| anyhow::anyhow!("{}: {e}", src.display()))?;
            }
        }
        std::fs::write(out.join(SELECTION_FILE), serde_json::to_vec_pretty(&sel)?)?;
        std::fs::write(out.join("layers.csv"), sel.csv())?;
        let (plot_layers, plot_values, plot_chosen) = sel.per_layer();
        plot_metric(
            &MetricPlot {
                layers: &plot_layers,
                values: &plot_values,
                metric: &sel.metric,
                chosen: Some(plot_chosen),
            },
            &out.join("layers.svg"),
            &out.join("layers.png"),
        )?;

        let mut results = chosen.results.clone().unwrap_or_default();
        if let Some(obj) = results.as_object_mut() {
            // A numeric layer stays a number, so expectations can compare it.
            let layer = sel.chosen_layer();
            obj.insert(
                "layer".into(),
                layer
                    .parse::<u64>()
                    .map_or_else(|_| layer.into(), Into::into),
            );
            // Which setting won (empty when the sweep is over layers alone), so a report or a
            // user of the checkpoint knows how this probe was trained.
            obj.insert("setting".into(), sel.chosen_setting().into());
            obj.insert("selected_by".into(), p.by.clone().into());
            obj.insert("layers_swept".into(), rows.len().into());
        }
        let mut meta = chosen.meta.clone();
        if let Some(obj) = meta.as_object_mut() {
            obj.insert("chosen_layer".into(), sel.chosen_layer().into());
            obj.insert("chosen_setting".into(), sel.chosen_setting().into());
            obj.insert("probe_node".into(), chosen.node.clone().into());
        }
        Ok(Outcome {
            meta,
            results: Some(results),
            summary: Some(format!(
                "Best layer by `{}` ({}): **{}**{}\n\n{}",
                p.by,
                p.direction,
                sel.chosen_layer(),
                if sel.has_settings() {
                    format!(", setting **{}**", sel.chosen_setting())
                } else {
                    String::new()
                },
                sel.markdown_table()
            )),
            publish: vec![
                "layers.svg".into(),
                "layers.png".into(),
                "layers.csv".into(),
            ],
            references: Vec::new(),
        })
    }
}

/// The coordinate names whose value is not the same for every probe: what tells the rows of a
/// grid apart (the select node's own coordinates, such as `tree`, are shared by all).
fn varying_dims<'a>(
    coords: impl Iterator<Item = &'a probex_engine::Coords> + Clone,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in coords.clone() {
        for (d, v) in c {
            if out.contains(d) {
                continue;
            }
            let differs = coords
                .clone()
                .any(|o| o.iter().find(|(od, _)| od == d).map(|(_, ov)| ov) != Some(v));
            if differs {
                out.push(d.clone());
            }
        }
    }
    out
}
