//! The `extract` stage kind: a model collection -> one layer dataset per selected layer.
//!
//! ```toml
//! [stage.layers]
//! kind = "extract"
//! from = "models"
//! layers = "all"                 # 59 | [57, 59] | "40..60" | "glob:*.query.weight" | "re:attn2" | a name
//! mode = "auto"                  # the layer list: auto | vit | resnet | lora | matrices | tensors
//! label = { key = "dataset_chosen_targets", kind = "multi_label", vocab = "cifar100" }
//! ```
//! Indices and `all` count in the model's layer list (the paper's for ViT, ResNet and LoRA
//! files, weight matrices for anything else; see [`probex_weights::arch`]); `mode = "tensors"`
//! counts every tensor instead.
//!
//! Layers are read in place from the model files by default; copied, LoRA layers keep their
//! factors `up` and `down` (see [`probex_weights::dataset`]), values at the files' own precision
//! unless `precision = "f32" | "f16" | "bf16"` asks for another.
//!
//! The stage fans out over `layer` (one node, one cache entry per layer, so any experiment
//! asking for that layer reuses it) and runs all layers that need computing in one pass over
//! the model files.
//!
//! Reading a routing (`from = "router"`, a `route` stage) instead of a collection, it fans out
//! over `tree` x `layer`: one dataset per model tree and layer, holding the models the router
//! placed in that tree (models in no known tree are left out), each tree's layers resolved
//! against its own first model.

use std::collections::BTreeMap;

use probex_engine::{
    FailedWith, InputSlot, Inputs, Outcome, ParamError, PlanFacts, PlanInput, RunContext, Stage,
    StageResult, Sweep,
};
use serde::{Deserialize, Serialize};

use super::{
    ExtractOptions, LayerOutput, LayerResolver, NonFinitePolicy, SplitSource, extract_with_digests,
    resolve_layers,
};
use crate::extract::ModelSource;
use crate::routing::{self as route, Routing};
use probex_fetch::collection::{self, Collection};
use probex_weights::dataset::{self, Precision};
use probex_weights::labels::{LabelSpec, OnError};
use probex_weights::{LayerMode, LayerSelector};

/// The artifact type of a layer dataset.
pub const ARTIFACT: &str = "layer";

/// Parameters of `extract`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtractParams {
    /// Which layers: after the sweep, each node holds exactly one index.
    pub layers: LayerSelector,
    /// The layer list: `auto` (the paper's list for a recognised architecture, else weight
    /// matrices), or one by name (`vit`, `resnet`, `lora`, `matrices`, `tensors`).
    #[serde(default)]
    pub mode: LayerMode,
    /// What the probe learns to predict.
    pub label: LabelSpec,
    /// Where splits come from (default: the layout).
    #[serde(default)]
    pub splits: SplitSource,
    /// On-disk precision of the matrices (or LoRA factors); default: as the model files store
    /// them, so nothing is converted and an f16 LoRA stays f16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    /// NaN/Inf weights: fail, skip the model, or zero them. Under `fail` rows read in place
    /// are checked when they are read (training fails naming the model), not by extraction,
    /// which then reads no values at all.
    #[serde(default)]
    pub non_finite: NonFinitePolicy,
    /// Unreadable files, missing tensors, shape mismatches: fail or skip the model.
    #[serde(default)]
    pub on_bad_file: OnError,
    /// Copy every layer's rows into the dataset. By default they are read where the model
    /// files have them (a plain layer's matrix, a LoRA pair's factors; the cache keeps those
    /// files while the dataset lives), and only a precision conversion or
    /// `non_finite = "zero"` copies.
    #[serde(default)]
    pub copy: bool,
    /// With a routing input: only this tree (the sweep sets it for each node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree: Option<usize>,
}

/// The `extract` stage kind.
pub struct Extract;

/// The plan fact of an extract stage naming its label kind (`multi_label`, `class`, ...).
pub const LABEL_KIND: &str = "label_kind";

impl Stage for Extract {
    type Params = ExtractParams;

    fn kind(&self) -> &'static str {
        "extract"
    }
    fn version(&self) -> u32 {
        // 2: layer indices and `all` count in the paper's per-architecture lists (weight
        // matrices for unknown architectures) instead of every tensor, so the same `layers`
        // can name another tensor; sidecars record the list. Layers are read in place or, when
        // copied, stored as LoRA factors at the files' own precision (not f32 products).
        // 3: ImageNet class names (the labels' `name`, which `embed` turns into prompts) follow
        // the authors' table for the synsets whose first lemmas coincide (`crane, bird`, ...).
        // 4: a row's source digest is its file's digest, and an in-place reference carries the
        // file's stamp instead of a digest of the bytes it reads (sidecar format 3).
        // 5: under `non_finite = "fail"` in-place rows are not read here; the dataset's reads
        // check their values, so an entry no longer promises finite values.
        5
    }
    fn about(&self) -> &'static str {
        "stack one layer of every model into a dataset with labels and splits (one node per layer)"
    }
    fn params_doc(&self) -> probex_engine::ParamsDoc {
        crate::params_doc::EXTRACT
    }
    fn output(&self) -> &'static str {
        ARTIFACT
    }
    fn inputs(&self) -> Vec<InputSlot> {
        vec![
            InputSlot::optional(collection::ARTIFACT),
            InputSlot::optional(route::ARTIFACT),
        ]
    }

    /// Tells the probes reading it what they will learn: [`LABEL_KIND`] names the label kind.
    fn plan_facts(
        &self,
        p: &ExtractParams,
        _inputs: &[PlanInput<'_>],
    ) -> Result<PlanFacts, ParamError> {
        Ok(PlanFacts {
            facts: serde_json::json!({ LABEL_KIND: p.label.kind }),
            ..PlanFacts::default()
        })
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
        let node = |tree: Option<usize>, index: usize| ExtractParams {
            layers: LayerSelector::Index(index),
            tree,
            ..p.clone()
        };
        let Source::Routed(routing) = Source::of(inputs)? else {
            let models = models_of(inputs, p.tree)?;
            let layers = resolve_layers(&models[0].path, &p.layers, p.mode)?;
            return Ok(Sweep::Many {
                dim: "layer",
                nodes: layers
                    .into_iter()
                    .map(|l| (l.index.to_string(), node(None, l.index)))
                    .collect(),
            });
        };
        let mut nodes = Vec::new();
        for t in &routing.trees {
            if p.tree.is_some_and(|k| k != t.index) {
                continue;
            }
            let members = routing.members(t.index);
            let Some(first) = members.first() else {
                continue;
            };
            for l in resolve_layers(&first.path, &p.layers, p.mode)? {
                nodes.push((
                    vec![t.index.to_string(), l.index.to_string()],
                    node(Some(t.index), l.index),
                ));
            }
        }
        if let Some(k) = p.tree
            && nodes.is_empty()
        {
            anyhow::bail!(
                "`tree` = {k}, but the routing has {} trees (0 to {})",
                routing.trees.len(),
                routing.trees.len().saturating_sub(1)
            );
        }
        Ok(Sweep::Grid {
            dims: vec!["tree", "layer"],
            nodes,
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
                // One pass failed: its error is said once, on the first node; the others
                // failed with it (a 30-layer sweep gave 30 copies of one bad file's error).
                Err(e) => {
                    let first = jobs[members[0]].1.node().to_string();
                    results[members[0]] = Some(Err(e));
                    for &i in &members[1..] {
                        results[i] = Some(Err(FailedWith(first.clone()).into()));
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

/// The list of models a layer left out, published into the run record when there are any.
const SKIPPED_FILE: &str = "skipped.json";

/// What `extract` reads: a collection, or the trees of a routing.
enum Source {
    Collection(Collection),
    Routed(Box<Routing>),
}

impl Source {
    fn of(inputs: &Inputs) -> StageResult<Source> {
        match (
            inputs.optional(collection::ARTIFACT)?,
            inputs.optional(route::ARTIFACT)?,
        ) {
            (Some(c), None) => Ok(Source::Collection(Collection::load(&c.dir)?)),
            (None, Some(r)) => Ok(Source::Routed(Box::new(Routing::load(&r.dir)?))),
            (None, None) => anyhow::bail!(
                "`from` names no model collection (a `fetch` or `zoo` stage) or routing (a \
                 `route` stage)"
            ),
            (Some(_), Some(_)) => {
                anyhow::bail!("`from` names both a model collection and a routing: name one")
            }
        }
    }
}

/// The models a node reads: the collection, or tree `tree` of the routing.
fn models_of(inputs: &Inputs, tree: Option<usize>) -> StageResult<Vec<ModelSource>> {
    let models = match (Source::of(inputs)?, tree) {
        (Source::Collection(c), None) => c.models,
        (Source::Collection(_), Some(_)) => {
            anyhow::bail!("`tree` needs a routing input (a `route` stage in `from`)")
        }
        (Source::Routed(r), Some(k)) => r.members(k),
        (Source::Routed(r), None) => anyhow::bail!(
            "reading a routing, each node reads one tree; this one has none ({} trees)",
            r.trees.len()
        ),
    };
    if models.is_empty() {
        anyhow::bail!(match tree {
            Some(k) => format!("tree {k} holds no models"),
            None => "the model collection is empty".to_string(),
        });
    }
    Ok(models)
}

fn run_group(jobs: &[(&ExtractParams, &RunContext)], inputs: &Inputs) -> StageResult<Vec<Outcome>> {
    let (p, lead) = jobs[0];
    let models = models_of(inputs, p.tree)?;
    let first = &models[0];
    let mut outputs = Vec::new();
    // The first model's layer list, read once for the whole batch (one node per layer).
    let mut resolvers: Vec<(LayerMode, LayerResolver)> = Vec::new();
    for (q, cx) in jobs {
        let at = match resolvers.iter().position(|(m, _)| *m == q.mode) {
            Some(at) => at,
            None => {
                resolvers.push((q.mode, LayerResolver::open(&first.path, q.mode)?));
                resolvers.len() - 1
            }
        };
        let mut layer = resolvers[at].1.resolve(&q.layers)?;
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
    if let Some(o) = outputs.first() {
        lead.log(format!(
            "layer list: {}, resolved on {}: {}",
            o.layer.list,
            first.path.display(),
            o.layer.list.rule()
        ));
    }
    lead.log(format!(
        "extracting {} layers from {} models in one pass{}",
        outputs.len(),
        models.len(),
        p.tree.map(|k| format!(" (tree {k})")).unwrap_or_default()
    ));
    let opts = ExtractOptions {
        precision: p.precision,
        non_finite: p.non_finite,
        splits: p.splits.clone(),
        on_bad_file: p.on_bad_file,
        in_place: !p.copy,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(lead.threads())
        .build()?;
    let report =
        pool.install(|| extract_with_digests(&models, &outputs, &p.label, &opts, lead.digests()))?;
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
        // Left-out models were only in the sidecar and the lead's log: say how many on the
        // terminal and in every report that uses this layer, and publish the list.
        let mut publish = Vec::new();
        if !layer.skipped.is_empty() {
            std::fs::write(
                cx.out_dir().join(SKIPPED_FILE),
                serde_json::to_vec_pretty(&layer.skipped)?,
            )?;
            publish.push(SKIPPED_FILE.to_string());
            cx.warn(format!(
                "left out {} of {} models (skipped by `on_error`, `on_bad_file` or \
                 `non_finite`); the list, with why, is {SKIPPED_FILE} among the node's files \
                 in the run record",
                layer.skipped.len(),
                models.len()
            ));
        }
        let sidecar = &layer.sidecar;
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
                "storage": sidecar.storage,
            }),
            references: referenced_files(sidecar),
            publish,
            ..Outcome::default()
        });
    }
    Ok(outcomes)
}

/// The model files a dataset reads in place, with the stamps extraction read them under, for
/// the cache to keep and watch. Each row is a different model's file; the cache sorts and
/// dedups what it records anyway.
fn referenced_files(sidecar: &dataset::Sidecar) -> Vec<probex_engine::cache::Referent> {
    sidecar
        .references
        .iter()
        .map(|r| probex_engine::cache::Referent {
            path: r.file.clone(),
            stamp: r.stamp,
        })
        .collect()
}
