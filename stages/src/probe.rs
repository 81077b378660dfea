//! A trained probe, used on its own: rank the models of a collection by a free-text query
//! (`probex search`) and say what one model file was probably trained on (`probex describe`).
//!
//! A probe is found from a run directory (its `status.json` names the cache and the key of
//! every node) or from a probe artifact's directory (a `train` or `select` output). Nothing is
//! retrained: search reads the encodings the probe stored for every model of its collection,
//! describe reads one layer of one file and applies the checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use probex_engine::cache::{Key, Store};
use probex_engine::report::RunReport;
use serde::Deserialize;

use crate::train::{Rows, files};
use probex_probes::models::ModelSpec;
use probex_probes::models::checkpoint::{Checkpoint, TaskKind};
use probex_probes::training::{self, DeviceSpec};
use probex_text::{Encoder, EncoderKind};
use probex_weights::dataset::{Labels, LayerDataset, Matrices, ModelRecord, Split};
use probex_weights::embeddings::TextTable;

/// The one candidate of `found` in the run at `path`, or an error saying there is no `what`
/// (named `stage`, when given) or naming the several to choose from with `--stage`.
pub(crate) fn only_one<T>(
    mut found: Vec<T>,
    path: &Path,
    stage: Option<&str>,
    what: &str,
    name: impl Fn(&T) -> &str,
) -> anyhow::Result<T> {
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!(
            "{} has no {what}{}",
            path.display(),
            stage.map_or(String::new(), |s| format!(" named `{s}`"))
        ),
        k => bail!(
            "{} has {k} {what}s ({}): choose one with --stage",
            path.display(),
            found
                .iter()
                .map(|f| format!("`{}`", name(f)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A trained probe artifact and what it was trained on.
#[derive(Debug)]
pub struct Probe {
    /// The artifact directory.
    pub dir: PathBuf,
    /// Where it came from, for messages (`best_probex` in a run, or the directory).
    pub name: String,
    /// The layer, models and labels of its collection.
    pub rows: Rows,
    /// The model's shapes and kind.
    pub spec: ModelSpec,
}

impl Probe {
    /// Opens the probe artifact in `dir`.
    pub fn open(dir: &Path, name: impl Into<String>) -> anyhow::Result<Probe> {
        let ckpt = dir.join(files::CHECKPOINT);
        if !ckpt.is_file() {
            bail!(
                "{} holds no probe ({} is missing): give a run directory or the directory of a \
                 `train` or `select` artifact",
                dir.display(),
                files::CHECKPOINT
            );
        }
        let spec = Checkpoint::read(&ckpt).and_then(|c| c.spec())?;
        let rows_path = dir.join(files::ROWS);
        let rows: Rows = serde_json::from_slice(
            &std::fs::read(&rows_path)
                .with_context(|| format!("reading {}", rows_path.display()))?,
        )
        .with_context(|| format!("{}: not a probe's row list", rows_path.display()))?;
        Ok(Probe {
            dir: dir.to_path_buf(),
            name: name.into(),
            rows,
            spec,
        })
    }

    /// Finds a probe at `path`: a probe artifact directory (or a cache entry holding one in
    /// `data/`), or a run directory. In a run, `stage` picks the node (a stage or node name);
    /// without it the run must hold exactly one suitable `select` node (or, failing that, one
    /// `train` node). `zero_shot` keeps only probes that score against text.
    pub fn locate(path: &Path, stage: Option<&str>, zero_shot: bool) -> anyhow::Result<Probe> {
        for dir in [path.to_path_buf(), path.join("data")] {
            if dir.join(files::CHECKPOINT).is_file() {
                let probe = Probe::open(&dir, dir.display().to_string())?;
                if zero_shot && !probe.spec.kind.is_zero_shot() {
                    bail!(
                        "{} is a `{}` probe; search needs a zero-shot probe (probex-zeroshot or \
                         dense-zeroshot) trained with text embeddings",
                        dir.display(),
                        probe.spec.kind
                    );
                }
                return Ok(probe);
            }
        }
        let mut found = Vec::new();
        for (n, dir) in finished_nodes(path, &["train", "select"], stage)? {
            let probe = Probe::open(&dir, n.node.clone())?;
            if !zero_shot || probe.spec.kind.is_zero_shot() {
                found.push((n.kind == "select", probe));
            }
        }
        if found.iter().any(|(select, _)| *select) {
            found.retain(|(select, _)| *select);
        }
        let what = if zero_shot {
            "zero-shot probe"
        } else {
            "probe"
        };
        only_one(found, path, stage, what, |(_, p)| &p.name).map(|(_, p)| p)
    }

    fn checkpoint(&self) -> anyhow::Result<Checkpoint> {
        Ok(Checkpoint::read(&self.dir.join(files::CHECKPOINT))?)
    }

    fn class_of(&self, row: usize) -> Option<String> {
        match &self.rows.labels {
            Labels::Class { classes, targets } => targets
                .get(row)
                .and_then(|&t| classes.get(t as usize))
                .map(|c| c.name.clone()),
            _ => None,
        }
    }
}

/// One node of a run record (`status.json`), in the engine's schema.
pub use probex_engine::report::NodeReport as RunNode;

/// The finished nodes of kinds `kinds` in the run directory `run` (filtered to one stage or
/// node name if given), with their artifact directories in the run's cache.
pub fn finished_nodes(
    run: &Path,
    kinds: &[&str],
    stage: Option<&str>,
) -> anyhow::Result<Vec<(RunNode, PathBuf)>> {
    let status = run.join(probex_engine::record::files::STATUS);
    if !status.is_file() {
        bail!(
            "{}: neither a run directory (no status.json) nor an artifact directory",
            run.display()
        );
    }
    let record = RunReport::read(run)?;
    let store = Store::open(&record.cache).with_context(|| {
        format!(
            "opening the run's cache {} (recorded in {})",
            record.cache.display(),
            status.display()
        )
    })?;
    let mut found = Vec::new();
    for n in record.nodes {
        let usable = kinds.contains(&n.kind.as_str())
            && n.state.finished()
            && stage.is_none_or(|s| s == n.node || s == n.stage);
        if !usable {
            continue;
        }
        let Some(entry) = store.get(&Key::parse(&n.key)?)? else {
            bail!(
                "node `{}` of {} is no longer in the cache {} (collected?): run the experiment \
                 again",
                n.node,
                run.display(),
                record.cache.display()
            );
        };
        found.push((n, entry.dir));
    }
    Ok(found)
}

/// What a zero-shot probe's text side was made with (`text.json`, written by `train`).
#[derive(Deserialize)]
struct TextRecord {
    encoder: EncoderKind,
    model_dir: PathBuf,
    /// Records written before `precision` existed are f32.
    #[serde(default)]
    precision: probex_text::Precision,
}

/// One model of a search result.
#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    /// Model id.
    pub id: String,
    /// Its split in the probe's collection.
    pub split: Split,
    /// Its labelled class, when the labels are classes.
    pub label: Option<String>,
    /// Cosine between the model's encoding and the query's.
    pub score: f32,
}

/// Embeds `query` with the encoder the probe's class vectors came from.
fn embed_query(probe: &Probe, query: &str) -> anyhow::Result<Vec<f32>> {
    let path = probe.dir.join(files::TEXT);
    let record: TextRecord = serde_json::from_slice(&std::fs::read(&path).with_context(|| {
        format!(
            "reading {}: this probe has no record of its text encoder (trained before probex \
             kept one); run its experiment again",
            path.display()
        )
    })?)
    .with_context(|| format!("{}: not a text encoder record", path.display()))?;
    if !record.model_dir.is_dir() {
        bail!(
            "the text encoder of {} was at {}, which is gone (cache collected?): run the \
             experiment again",
            probe.name,
            record.model_dir.display()
        );
    }
    let device = Default::default();
    let enc = Encoder::<burn::backend::Flex>::load_with(
        record.encoder,
        &record.model_dir,
        record.precision,
        &device,
    )?;
    let mut v = probex_text::embed_texts(&enc, &[query.to_string()])?;
    Ok(v.remove(0))
}

fn normalized(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
}

/// Ranks the models of the probe's collection in `splits` (every split when empty) by the
/// cosine between their encoding and the query mapped through the probe's text head; returns
/// the best `top`. `splits = [TestHoldout]` searches only models of classes the probe never
/// trained on.
pub fn search(
    probe: &Probe,
    query: &str,
    top: usize,
    splits: &[Split],
) -> anyhow::Result<Vec<Hit>> {
    if !probe.spec.kind.is_zero_shot() {
        bail!(
            "{} is a `{}` probe; search needs a zero-shot probe (probex-zeroshot or \
             dense-zeroshot) trained with text embeddings",
            probe.name,
            probe.spec.kind
        );
    }
    if query.trim().is_empty() {
        bail!("the query is empty: describe the models you want, e.g. \"a photo of a dog\"");
    }
    let q = embed_query(probe, query)?;
    let ckpt = probe.checkpoint()?;
    let t = ckpt.by_name();
    let (Some(w), Some(b)) = (
        t.get("regression_head.weight"),
        t.get("regression_head.bias"),
    ) else {
        bail!("{}: the checkpoint has no `regression_head`", probe.name);
    };
    let &[r_t, d_text] = &w.shape[..] else {
        bail!("{}: `regression_head.weight` is not a matrix", probe.name);
    };
    if d_text != q.len() {
        bail!(
            "the text encoder gives {}-d vectors but the probe expects {d_text}-d",
            q.len()
        );
    }
    let mut target: Vec<f32> = (0..r_t)
        .map(|i| {
            let row = &w.values[i * d_text..(i + 1) * d_text];
            row.iter().zip(&q).map(|(a, x)| a * x).sum::<f32>() + b.values[i]
        })
        .collect();
    normalized(&mut target);

    let (values, dim) = read_encodings(&probe.dir.join(files::OUTPUTS))?;
    if dim != r_t || values.len() != dim * probe.rows.models.len() {
        bail!(
            "{}: encodings are {} x {dim}, expected {} x {r_t}",
            probe.name,
            values.len() / dim.max(1),
            probe.rows.models.len()
        );
    }
    let mut hits: Vec<Hit> = probe
        .rows
        .models
        .iter()
        .enumerate()
        .filter(|(_, m)| splits.is_empty() || splits.contains(&m.split))
        .map(|(i, m)| {
            let mut e = values[i * dim..(i + 1) * dim].to_vec();
            normalized(&mut e);
            Hit {
                id: m.id.clone(),
                split: m.split,
                label: probe.class_of(i),
                score: e.iter().zip(&target).map(|(a, b)| a * b).sum(),
            }
        })
        .collect();
    hits.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.id.cmp(&b.id)));
    hits.truncate(top);
    Ok(hits)
}

fn read_encodings(path: &Path) -> anyhow::Result<(Vec<f32>, usize)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let t = st
        .tensor("encodings")
        .with_context(|| format!("{}: no `encodings` tensor", path.display()))?;
    let &[_, dim] = t.shape() else {
        bail!("{}: `encodings` is not a matrix", path.display());
    };
    let values = probex_weights::dataset::decode(t.dtype(), t.data())?;
    Ok((values, dim))
}

/// What a probe says about one model.
#[derive(Clone, Debug, PartialEq)]
pub struct Description {
    /// The probe's task.
    pub task: TaskKind,
    /// Classes by score, best first (probability for multi-label and class probes, cosine
    /// for zero-shot ones); empty for regression.
    pub classes: Vec<(String, f32)>,
    /// The predicted value (regression).
    pub value: Option<f32>,
}

/// Applies the probe to the layer it reads in `model` (a safetensors file from the same model
/// tree) and returns the `top` classes, or the predicted value.
pub fn describe(probe: &Probe, model: &Path, top: usize) -> anyhow::Result<Description> {
    let layer = &probe.rows.layer;
    let x = crate::extract::read_matrix(model, layer)?;
    let (d_h, d_w) = (probe.spec.d_h, probe.spec.d_w);
    if x.len() != d_h * d_w {
        bail!(
            "{}: layer `{}` gives {} values, the probe reads [{d_h}, {d_w}]",
            model.display(),
            layer.name,
            x.len()
        );
    }
    let labels = match &probe.rows.labels {
        Labels::MultiLabel { classes, .. } => Labels::MultiLabel {
            classes: classes.clone(),
            targets: vec![0.0; classes.len()],
        },
        Labels::Class { classes, .. } => Labels::Class {
            classes: classes.clone(),
            targets: vec![0],
        },
        Labels::Numeric { transform, .. } => Labels::Numeric {
            targets: vec![0.0],
            transform: transform.clone(),
        },
    };
    // Regression predictions are named by the label key (the probe's one score column).
    let label_key = match &labels {
        Labels::Numeric { .. } => probe.rows.columns.first().cloned().unwrap_or_default(),
        _ => "label".to_string(),
    };
    let ds = LayerDataset {
        layer: layer.clone(),
        n: 1,
        d_h,
        d_w,
        weights: Matrices::Stacked(x),
        models: vec![ModelRecord {
            id: model.display().to_string(),
            split: Split::Test,
            source_digest: String::new(),
        }],
        label_key,
        labels,
        skipped: Vec::new(),
    };
    let text = if probe.spec.kind.is_zero_shot() {
        Some(TextTable::load(&probe.dir).with_context(|| {
            format!(
                "{}: the zero-shot probe's class text table is missing; run its experiment again",
                probe.name
            )
        })?)
    } else {
        None
    };
    let ckpt = probe.dir.join(files::CHECKPOINT);
    let pred = training::predict(&ckpt, &ds, text.as_ref(), &DeviceSpec::Cpu)?;
    let scores = &pred.scores;
    let mut classes: Vec<(String, f32)> = match pred.task {
        TaskKind::Regression => Vec::new(),
        TaskKind::MultiLabel => pred
            .columns
            .iter()
            .zip(scores)
            .map(|(c, &s)| (c.clone(), 1.0 / (1.0 + (-s).exp())))
            .collect(),
        TaskKind::Class => {
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = scores.iter().map(|s| (s - max).exp()).sum();
            pred.columns
                .iter()
                .zip(scores)
                .map(|(c, &s)| (c.clone(), (s - max).exp() / z))
                .collect()
        }
        TaskKind::ZeroShot => pred
            .columns
            .iter()
            .cloned()
            .zip(scores.iter().copied())
            .collect(),
    };
    classes.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    classes.truncate(top);
    Ok(Description {
        task: pred.task,
        value: (pred.task == TaskKind::Regression).then(|| scores[0]),
        classes,
    })
}
