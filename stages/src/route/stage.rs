//! The `route` stage kind: a mixed collection of models -> its model trees, every model placed.
//!
//! ```toml
//! [stage.router]
//! kind = "route"
//! from = "hub_mix"          # one mixed collection, or several (`from = ["a", "b"]`)
//! layers = "2.weight"       # the weights that place a model (as extract's `layers`)
//! trees = "auto"            # or a number
//! splits = { metadata = { key = "split" } }
//! truth = "subset"          # optional: a metadata key naming each model's true tree
//! ```
//! Downstream, `extract` reading a routing fans out over `tree` x `layer`, so per-tree experts
//! are one `train` node per tree and layer, and `evaluate` reading the routing shows the
//! confusion of true and assigned trees.

use std::collections::{BTreeMap, HashMap};

use probex_engine::{InputSlot, Inputs, Outcome, ParamError, RunContext, Stage, StageResult};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    ARTIFACT, Architecture, Point, RoutedModel, Routing, Settings, Tree, TreeCount, signature,
    stride_for,
};
use crate::extract::{ModelSource, SplitAssigner, SplitSource, resolve_layers};
use probex_fetch::collection::{self, Collection};
use probex_weights::dataset::Split;
use probex_weights::{LayerMode, LayerSelector, partial, reader::read_header};

/// Parameters of `route`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteParams {
    /// The layers whose weights place a model, as `extract`'s `layers` (several are
    /// concatenated). A small layer is enough: bases are far apart in every layer.
    pub layers: LayerSelector,
    /// The layer list `layers` counts in, as `extract`'s `mode`.
    #[serde(default)]
    pub mode: LayerMode,
    /// How many trees: a number, or `"auto"` (the cut with the best-separated clusters).
    #[serde(default)]
    pub trees: TreeCount,
    /// With `trees = "auto"`: the mean silhouette a cut must reach to split an architecture
    /// into several trees. Default 0.7.
    #[serde(default = "default_min_silhouette")]
    pub min_silhouette: f64,
    /// A tree's threshold is `margin` times its farthest training or validation model's
    /// distance from the centre. Default 1.5.
    #[serde(default = "default_margin")]
    pub margin: f64,
    /// Compare at most this many evenly spaced weights per model (0 = all). Default 65536.
    #[serde(default = "default_sample")]
    pub sample: usize,
    /// Where splits come from, as in `extract`. Training models define the trees.
    #[serde(default)]
    pub splits: SplitSource,
    /// A metadata key holding each model's true tree, to score the routing (default: the
    /// name of the collection each model came from, when several are given).
    #[serde(default)]
    pub truth: Option<String>,
}

fn default_min_silhouette() -> f64 {
    super::DEFAULT_MIN_SILHOUETTE
}
fn default_margin() -> f64 {
    1.5
}
fn default_sample() -> usize {
    65_536
}

/// The `route` stage kind.
pub struct Route;

impl Stage for Route {
    type Params = RouteParams;

    fn kind(&self) -> &'static str {
        "route"
    }
    fn version(&self) -> u32 {
        // 3: `layers` counts in the paper's per-architecture layer lists (as extract 2), and
        // the routing records the list of each layer it reads.
        3
    }
    fn about(&self) -> &'static str {
        "split a mixed collection into model trees by clustering weights; place every model in its tree or none"
    }
    fn params_doc(&self) -> probex_engine::ParamsDoc {
        crate::params_doc::ROUTE
    }
    fn output(&self) -> &'static str {
        ARTIFACT
    }
    fn inputs(&self) -> Vec<InputSlot> {
        vec![InputSlot::many(collection::ARTIFACT)]
    }

    fn check(&self, p: &RouteParams) -> Result<(), ParamError> {
        if !(p.margin.is_finite() && p.margin >= 1.0) {
            return Err(ParamError::at("margin", super::FitError::Margin(p.margin)));
        }
        super::check_min_silhouette(p.min_silhouette)
            .map_err(|e| ParamError::at("min_silhouette", e))?;
        SplitAssigner::new(&p.splits).map_err(|e| ParamError::at("splits", e))?;
        Ok(())
    }

    fn run(&self, p: &RouteParams, inputs: &Inputs, cx: &RunContext) -> StageResult<Outcome> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cx.threads())
            .build()?;
        let routing_and_centres = pool.install(|| route(p, inputs, cx))?;
        let (routing, centroids) = routing_and_centres;
        routing.save(cx.out_dir(), &centroids)?;

        let scores = routing.score();
        let mut results = serde_json::Map::new();
        results.insert("trees".into(), routing.trees.len().into());
        results.insert("architectures".into(), routing.architectures.len().into());
        for s in &scores {
            let mut m = serde_json::Map::new();
            m.insert("models".into(), s.models.into());
            m.insert("rejected".into(), s.rejected.into());
            if let Some(a) = s.accuracy {
                m.insert("accuracy".into(), a.into());
            }
            results.insert(s.split.as_str().into(), Value::Object(m));
        }
        let mut summary = format!(
            "{} trees in {} architecture(s); routing per split:\n",
            routing.trees.len(),
            routing.architectures.len()
        );
        for s in &scores {
            summary.push_str(&format!(
                "  {:<12} {:>5} models, {:>4} to no known tree{}\n",
                s.split.as_str(),
                s.models,
                s.rejected,
                s.accuracy
                    .map(|a| format!(", accuracy {a:.3}"))
                    .unwrap_or_default()
            ));
        }
        if routing.models.iter().any(|m| m.truth.is_some()) {
            summary.push_str("\ntest models, true tree (rows) against routed tree:\n");
            summary.push_str(&routing.confusion_table(Split::Test));
        }
        cx.log(&summary);
        Ok(Outcome {
            meta: json!({
                "trees": routing.trees.len(),
                "sizes": routing.trees.iter().map(|t| t.train).collect::<Vec<_>>(),
            }),
            results: Some(Value::Object(results)),
            summary: Some(summary),
            publish: vec![super::FILE.to_string()],
            references: Vec::new(),
        })
    }
}

/// One model while it is being routed.
struct Candidate {
    model: ModelSource,
    truth: Option<String>,
    signature: String,
    tensors: usize,
    parameters: u64,
}

/// Routes the models of the input collections: reads their headers, groups them by
/// architecture, reads their routing weights, finds the trees and places every model. Returns
/// the routing and the trees' centroids.
fn route(
    p: &RouteParams,
    inputs: &Inputs,
    cx: &RunContext,
) -> StageResult<(Routing, Vec<Vec<f32>>)> {
    let models = input_models(inputs)?;
    let splits = SplitAssigner::new(&p.splits)?;
    cx.log(format!("reading the headers of {} models", models.len()));
    let candidates: Vec<Candidate> = models
        .into_par_iter()
        .map(|(model, origin)| candidate(model, origin, p, &splits))
        .collect::<StageResult<_>>()?;
    cx.check_cancelled()?;
    let (archs, arch_of) = architectures(&candidates, p)?;
    cx.log(format!(
        "{} architecture(s); reading routing weights ({})",
        archs.len(),
        archs
            .iter()
            .map(|a| format!("{} of {} tensors", a.features, a.tensors))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let features: Vec<Vec<f32>> = candidates
        .par_iter()
        .zip(&arch_of)
        .map(|(c, &a)| Ok(super::features_of(&archs[a], &c.model.path)?))
        .collect::<StageResult<_>>()?;
    cx.check_cancelled()?;
    let fit = cluster(&candidates, &arch_of, &features, p, cx)?;
    Ok(assemble(candidates, archs, arch_of, fit))
}

/// The models of every input collection, each with the collection it came from when there are
/// several (its true tree); an error when there are none or an id repeats.
fn input_models(inputs: &Inputs) -> StageResult<Vec<(ModelSource, Option<String>)>> {
    let collections = inputs.all(collection::ARTIFACT);
    let mut models: Vec<(ModelSource, Option<String>)> = Vec::new();
    for a in collections {
        let c = Collection::load(&a.dir)?;
        // With several collections, the one a model came from is its true tree.
        let origin = (collections.len() > 1).then(|| a.stage.clone());
        models.extend(c.models.into_iter().map(|m| (m, origin.clone())));
    }
    if models.is_empty() {
        anyhow::bail!("the model collection is empty");
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, (m, _)) in models.iter().enumerate() {
        if let Some(j) = seen.insert(m.id.as_str(), i) {
            anyhow::bail!(
                "model id `{}` is in the collection twice ({} and {}): mixed collections need \
                 distinct ids (give each zoo tree its own `name`)",
                m.id,
                models[j].0.path.display(),
                m.path.display()
            );
        }
    }
    Ok(models)
}

/// The architectures in order of first appearance, each with its routing layers, and the
/// architecture of every candidate.
fn architectures(
    candidates: &[Candidate],
    p: &RouteParams,
) -> StageResult<(Vec<Architecture>, Vec<usize>)> {
    let mut archs: Vec<Architecture> = Vec::new();
    let mut arch_of = Vec::with_capacity(candidates.len());
    for c in candidates {
        let a = match archs.iter().position(|a| a.signature == c.signature) {
            Some(a) => a,
            None => {
                let layers = resolve_layers(&c.model.path, &p.layers, p.mode).map_err(|e| {
                    anyhow::anyhow!(
                        "routing layers `{}` in the architecture of `{}` ({} tensors): {e}",
                        p.layers,
                        c.model.id,
                        c.tensors
                    )
                })?;
                let len: usize = layers.iter().map(|l| l.matrix[0] * l.matrix[1]).sum();
                let stride = stride_for(len, p.sample);
                archs.push(Architecture {
                    signature: c.signature.clone(),
                    tensors: c.tensors,
                    parameters: c.parameters,
                    example: c.model.id.clone(),
                    layers: layers.iter().map(|l| l.info()).collect(),
                    stride,
                    features: len.div_ceil(stride),
                });
                archs.len() - 1
            }
        };
        arch_of.push(a);
    }
    Ok((archs, arch_of))
}

/// Finds the trees among the candidates' routing weights (`features`, by candidate) and places
/// every candidate; logs each architecture's silhouette.
fn cluster(
    candidates: &[Candidate],
    arch_of: &[usize],
    features: &[Vec<f32>],
    p: &RouteParams,
    cx: &RunContext,
) -> StageResult<super::Fit> {
    let points: Vec<Point> = candidates
        .iter()
        .zip(arch_of)
        .zip(features)
        .map(|((c, &arch), f)| Point {
            arch,
            split: c.model.split.unwrap_or(Split::Test),
            features: f,
        })
        .collect();
    let settings = Settings {
        trees: p.trees,
        min_silhouette: p.min_silhouette,
        margin: p.margin,
    };
    cx.log(format!(
        "clustering {} training models",
        points.iter().filter(|p| p.split == Split::Train).count()
    ));
    let fit = super::fit(&points, &settings)?;
    for (a, score) in fit.silhouettes.iter().enumerate() {
        let score = score.map_or("too few models to judge a cut".into(), |s| {
            format!(
                "best cut's silhouette {s:.3} (min_silhouette {})",
                p.min_silhouette
            )
        });
        cx.log(format!("architecture {a}: {score}"));
    }
    cx.log(format!("{} trees", fit.trees.len()));

    Ok(fit)
}

/// The routing record of a fit: its trees (each named after the true tree most of its members
/// come from, when known) and every model's placement; and the trees' centroids.
fn assemble(
    candidates: Vec<Candidate>,
    archs: Vec<Architecture>,
    arch_of: Vec<usize>,
    fit: super::Fit,
) -> (Routing, Vec<Vec<f32>>) {
    let trees: Vec<Tree> = fit
        .trees
        .iter()
        .enumerate()
        .map(|(k, t)| Tree {
            index: k,
            architecture: t.arch,
            train: t.members.len(),
            radius: t.radius,
            threshold: t.threshold,
            truth: majority(
                t.members
                    .iter()
                    .filter_map(|&i| candidates[i].truth.as_deref()),
            ),
        })
        .collect();
    let centroids = fit.trees.into_iter().map(|t| t.centroid).collect();
    let routed = candidates
        .into_iter()
        .zip(arch_of)
        .zip(fit.placements)
        .map(|((c, architecture), placement)| RoutedModel {
            model: c.model,
            truth: c.truth,
            architecture,
            placement,
        })
        .collect();
    (
        Routing {
            format: Routing::FORMAT,
            architectures: archs,
            trees,
            models: routed,
        },
        centroids,
    )
}

/// Reads one model's header: its split, true tree and architecture signature.
fn candidate(
    mut model: ModelSource,
    origin: Option<String>,
    p: &RouteParams,
    splits: &SplitAssigner,
) -> StageResult<Candidate> {
    let header = read_header(&model.path)?;
    let at = |m: &dyn std::fmt::Display| {
        anyhow::anyhow!("{} (model `{}`): {m}", model.path.display(), model.id)
    };
    let split = splits.split(&model, &header.metadata).map_err(|e| at(&e))?;
    let truth =
        match &p.truth {
            Some(key) => {
                Some(header.metadata.get(key).cloned().ok_or_else(|| {
                    at(&format!("metadata key `{key}` (the true tree) is missing"))
                })?)
            }
            None => origin,
        };
    // A file fetched in tensors mode keeps the original header: that is its architecture.
    let full = partial::original(&header)
        .map_err(|e| at(&e))?
        .unwrap_or(header);
    let (signature, tensors, parameters) = signature(&full);
    model.split = Some(split);
    Ok(Candidate {
        model,
        truth,
        signature,
        tensors,
        parameters,
    })
}

/// The most common value (the first of the most common, in sorted order, on ties).
fn majority<'a>(values: impl Iterator<Item = &'a str>) -> Option<String> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for v in values {
        *counts.entry(v).or_default() += 1;
    }
    let top = counts.values().copied().max()?;
    counts
        .into_iter()
        .find(|&(_, c)| c == top)
        .map(|(v, _)| v.to_string())
}
