//! The `extract` stage kind: a model collection -> one layer dataset per selected layer.
//!
//! ```toml
//! [stage.layers]
//! kind = "extract"
//! from = "models"
//! layers = "all"                 # 59 | [57, 59] | "40..60" | "glob:*.query.weight" | "re:attn2" | a name
//! label = { key = "dataset_chosen_targets", kind = "multi_label", vocab = "cifar100" }
//! ```
//! The stage fans out over `layer` (one node, one cache entry per layer, so any experiment
//! asking for that layer reuses it) and runs all layers that need computing in one pass over
//! the model files.

use std::collections::BTreeMap;

use probex_engine::{InputSlot, Inputs, Outcome, RunContext, Stage, StageResult, Sweep};
use serde::{Deserialize, Serialize};

use super::{ExtractOptions, LayerOutput, NonFinitePolicy, SplitSource, extract, resolve_layers};
use crate::collection::{self, Collection};
use crate::dataset::{self, Precision};
use crate::labels::{LabelSpec, OnError};
use crate::weights::{LayerMode, LayerSelector};

/// The artifact type of a layer dataset.
pub const ARTIFACT: &str = "layer";

/// Parameters of `extract`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtractParams {
    /// Which layers: after the sweep, each node holds exactly one index.
    pub layers: LayerSelector,
    /// Plain tensors, LoRA pairs (X = B @ A), or decide per file.
    #[serde(default)]
    pub mode: LayerMode,
    /// What the probe learns to predict.
    pub label: LabelSpec,
    /// Where splits come from (default: the layout).
    #[serde(default)]
    pub splits: SplitSource,
    /// On-disk precision of the stacked weights.
    #[serde(default)]
    pub precision: Precision,
    /// NaN/Inf weights: fail, skip the model, or zero them.
    #[serde(default)]
    pub non_finite: NonFinitePolicy,
    /// Unreadable files, missing tensors, shape mismatches: fail or skip the model.
    #[serde(default)]
    pub on_bad_file: OnError,
}

/// The `extract` stage kind.
pub struct Extract;

impl Stage for Extract {
    type Params = ExtractParams;

    fn kind(&self) -> &'static str {
        "extract"
    }
    fn version(&self) -> u32 {
        1
    }
    fn about(&self) -> &'static str {
        "stack one layer of every model into a dataset with labels and splits (one node per layer)"
    }
    fn output(&self) -> &'static str {
        ARTIFACT
    }
    fn inputs(&self) -> Vec<InputSlot> {
        vec![InputSlot::one(collection::ARTIFACT)]
    }

    fn sweep(
        &self,
        p: &ExtractParams,
        inputs: Option<&Inputs>,
    ) -> StageResult<Sweep<ExtractParams>> {
        // Indices and names are resolved against the first model's header, so even `59`
        // waits for the collection: it also checks the layer exists.
        let Some(inputs) = inputs else {
            return Ok(Sweep::NeedsInputs);
        };
        let models = Collection::load(&inputs.one(collection::ARTIFACT)?.dir)?;
        let Some(first) = models.models.first() else {
            anyhow::bail!("the model collection is empty");
        };
        let layers = resolve_layers(&first.path, &p.layers, p.mode)?;
        Ok(Sweep::Many {
            dim: "layer",
            nodes: layers
                .into_iter()
                .map(|l| {
                    (
                        l.index.to_string(),
                        ExtractParams {
                            layers: LayerSelector::Index(l.index),
                            ..p.clone()
                        },
                    )
                })
                .collect(),
        })
    }

    fn batches(&self) -> bool {
        true
    }

    fn run(&self, p: &ExtractParams, inputs: &Inputs, cx: &RunContext) -> StageResult<Outcome> {
        self.run_batch(&[(p, cx)], inputs)
            .pop()
            .unwrap_or_else(|| anyhow::bail!("nothing ran"))
    }

    fn run_batch(
        &self,
        jobs: &[(&ExtractParams, &RunContext)],
        inputs: &Inputs,
    ) -> Vec<StageResult<Outcome>> {
        // Jobs that differ only in their layer share one pass over the files.
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, (p, _)) in jobs.iter().enumerate() {
            let shared = ExtractParams {
                layers: LayerSelector::All,
                ..(*p).clone()
            };
            groups
                .entry(serde_json::to_string(&shared).unwrap_or_default())
                .or_default()
                .push(i);
        }
        let mut results: Vec<Option<StageResult<Outcome>>> = jobs.iter().map(|_| None).collect();
        for members in groups.values() {
            let group: Vec<(&ExtractParams, &RunContext)> =
                members.iter().map(|&i| jobs[i]).collect();
            match run_group(&group, inputs) {
                Ok(outcomes) => {
                    for (&i, o) in members.iter().zip(outcomes) {
                        results[i] = Some(Ok(o));
                    }
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    for &i in members {
                        results[i] = Some(Err(anyhow::anyhow!("{msg}")));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(anyhow::anyhow!("not run"))))
            .collect()
    }
}

fn run_group(jobs: &[(&ExtractParams, &RunContext)], inputs: &Inputs) -> StageResult<Vec<Outcome>> {
    let models = Collection::load(&inputs.one(collection::ARTIFACT)?.dir)?;
    let Some(first) = models.models.first() else {
        anyhow::bail!("the model collection is empty")
    };
    let (p, lead) = jobs[0];
    let mut outputs = Vec::new();
    for (q, cx) in jobs {
        let mut layer = resolve_layers(&first.path, &q.layers, q.mode)?;
        if layer.len() != 1 {
            anyhow::bail!(
                "node {} resolves to {} layers, expected one",
                cx.node(),
                layer.len()
            );
        }
        outputs.push(LayerOutput {
            layer: layer.remove(0),
            dir: cx.out_dir().to_path_buf(),
        });
    }
    lead.log(format!(
        "extracting {} layers from {} models in one pass",
        outputs.len(),
        models.models.len()
    ));
    let opts = ExtractOptions {
        precision: p.precision,
        non_finite: p.non_finite,
        digest: super::DigestMode::Read,
        digest_cache: None,
        splits: p.splits.clone(),
        on_bad_file: p.on_bad_file,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(lead.threads())
        .build()?;
    let report = pool.install(|| extract(&models.models, &outputs, &p.label, &opts))?;
    for f in &report.non_finite {
        lead.log(format!(
            "non-finite weights in {} ({}): {} NaN, {} Inf -> {}",
            f.model, f.layer, f.nan, f.inf, f.action
        ));
    }
    for s in &report.skipped {
        lead.log(format!("skipped {}: {}", s.id, s.reason));
    }
    lead.log(format!(
        "{} files, {:.1} MB read, {:.1} MB written in {:.2}s",
        report.files,
        report.bytes_read as f64 / 1e6,
        report.bytes_written as f64 / 1e6,
        report.seconds
    ));
    let mut outcomes = Vec::new();
    for ((_, cx), layer) in jobs.iter().zip(&report.layers) {
        let sidecar = dataset::LayerDataset::load_sidecar(cx.out_dir())?;
        let splits: BTreeMap<String, usize> = super::split_counts(&sidecar.models)
            .into_iter()
            .map(|(s, n)| (s.to_string(), n))
            .collect();
        outcomes.push(Outcome {
            meta: serde_json::json!({
                "layer": layer.layer,
                "rows": layer.rows,
                "shape": sidecar.shape,
                "splits": splits,
                "skipped": layer.skipped.len(),
                "label_width": sidecar.labels.width(),
            }),
            ..Outcome::default()
        });
    }
    Ok(outcomes)
}
