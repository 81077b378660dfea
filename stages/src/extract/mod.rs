//! Extraction: a set of model files in, one [`LayerDataset`] artifact per requested layer out.
//!
//! Usage: [`discover`] the models (or build [`ModelSource`]s from a fetch), [`resolve_layers`]
//! a [`LayerSelector`] against the first model, give each layer an output directory, and call
//! [`extract`]. One pass over the files: each file is mapped once, its header parsed once, and
//! only the requested tensors' pages are touched; rows are written straight into each layer's
//! file (files in parallel with rayon), so memory stays at a few rows per thread whatever the
//! number of models or layers.
//!
//! Plain layers are stacked; LoRA layers keep their factors (`up` `B`, `down` `A`), never the
//! product `B @ A`, which for an SD LoRA is ~40x larger. Values are stored as the files store
//! them (f16 stays f16) unless a precision is asked for: then a row whose dtype already is that
//! precision is a byte copy of the file, and only a conversion costs decoding.

mod pass;
mod report;
mod resolve;
mod scan;
pub mod stage;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use rayon::prelude::*;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use probex_weights::dataset::{
    Labels, LayerDataset, LayerInfo, ModelRecord, Precision, SIDECAR_FILE, Sidecar, Skipped, Split,
    Storage, TensorRef, TensorSpan, count_non_finite, encode,
};
use probex_weights::labels::{LabelSpec, LabelValue, Labeler, OnError};
use probex_weights::layers::is_float;
use probex_weights::reader::{SharedMmap, read_header};
use probex_weights::{
    Architecture, LayerIndex, LayerList, LayerMode, LayerSelector, SafetensorsFile, TensorEntry,
    Transform, WeightsError, transform,
};

use pass::*;
use probex_engine::digest::{FileDigests, FileStamp};
pub use probex_fetch::discover::{
    DiscoverError, Discovered, Layout, ModelSource, SplitAssigner, SplitSource, discover,
};
use probex_weights::dataset::writer::{self, LayerFile};
pub use report::{ExtractError, ExtractReport, LayerReport, NonFiniteFinding};
pub use resolve::{LayerResolver, ResolvedLayer, precision_of, read_matrix, resolve_layers};
use scan::*;
pub use stage::{ARTIFACT, Extract, ExtractParams};

/// One layer to extract and the directory its artifact goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerOutput {
    /// The layer.
    pub layer: ResolvedLayer,
    /// Output directory (created if missing); `layer.safetensors` and `layer.json` go in it.
    pub dir: PathBuf,
}

/// What to do with weights that are NaN or infinite.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonFinitePolicy {
    /// Stop with an error naming the file and tensor (default).
    #[default]
    Fail,
    /// Leave the model out of that layer's dataset (listed in its `skipped`).
    Skip,
    /// Replace each non-finite value by 0 and keep the model (reported).
    Zero,
}

/// Options of an extraction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtractOptions {
    /// On-disk precision of the matrices; `None`: as the files store them (see
    /// [`ResolvedLayer::source_precision`]).
    pub precision: Option<Precision>,
    /// NaN/Inf weights.
    pub non_finite: NonFinitePolicy,
    /// Where splits come from.
    pub splits: SplitSource,
    /// Unreadable files, missing tensors and shape mismatches: fail (default) or skip the model.
    pub on_bad_file: OnError,
    /// Layers refer to the model files ([`Storage::References`]) instead of copying their
    /// rows (a LoRA pair's factors, a plain layer's matrix), unless a precision conversion or
    /// `non_finite = zero` needs a copy. Each reference keeps the file's stamp (size,
    /// modification time, inode), which loading checks.
    pub in_place: bool,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ExtractError + '_ {
    move |error| ExtractError::Io {
        path: path.display().to_string(),
        error,
    }
}

/// Keeps the label rows `rows` of `labels` (which has one row per labelled model).
fn select_rows(labels: &Labels, rows: &[usize]) -> Labels {
    match labels {
        Labels::MultiLabel { classes, targets } => {
            let w = classes.len();
            Labels::MultiLabel {
                classes: classes.clone(),
                targets: rows
                    .iter()
                    .flat_map(|&r| targets[r * w..(r + 1) * w].iter().copied())
                    .collect(),
            }
        }
        Labels::Class { classes, targets } => Labels::Class {
            classes: classes.clone(),
            targets: rows.iter().map(|&r| targets[r]).collect(),
        },
        Labels::Numeric { targets, transform } => Labels::Numeric {
            targets: rows.iter().map(|&r| targets[r]).collect(),
            transform: transform.clone(),
        },
    }
}

/// Extracts every layer of `outputs` from every model of `models`, in one pass over the files,
/// and writes one layer dataset per output directory.
///
/// `models` must have unique ids; rows follow the id order (sorted here), so a run is
/// reproducible. Models whose label is missing or malformed fail the run or are skipped (per
/// `label.on_error`); skipped models and NaN/Inf findings are in the report and in each
/// layer's sidecar. Each row's source digest is its model file's blake3, which this hashes
/// (see [`extract_with_digests`] to take it from a stat cache).
pub fn extract(
    models: &[ModelSource],
    outputs: &[LayerOutput],
    label: &LabelSpec,
    opts: &ExtractOptions,
) -> Result<ExtractReport, ExtractError> {
    extract_with_digests(models, outputs, label, opts, &FileDigests::in_memory())
}

/// [`extract`], with the files' digests from `digests`: the stage passes the run's stat cache,
/// which planning filled (a folder's fetch hashes every model file for its key), so a file
/// costs a stat here, not a second read.
pub fn extract_with_digests(
    models: &[ModelSource],
    outputs: &[LayerOutput],
    label: &LabelSpec,
    opts: &ExtractOptions,
    digests: &FileDigests,
) -> Result<ExtractReport, ExtractError> {
    let started = Instant::now();
    if outputs.is_empty() {
        return Err(ExtractError::Config("no layers to extract".into()));
    }
    let models = sorted_models(models)?;
    // A layer is read where it is unless a copy pays: a conversion was asked for, or NaN/Inf
    // values are to be zeroed (the file's bytes are not the row then).
    let referenced: Vec<bool> = outputs
        .iter()
        .map(|o| {
            opts.in_place
                && opts.non_finite != NonFinitePolicy::Zero
                && opts.precision.is_none_or(|p| p == o.layer.source_precision)
        })
        .collect();
    // A copied LoRA layer is laid out at its largest rank before the pass; a referenced one
    // learns its models' ranks in the pass, so its files' headers are read once, not twice.
    let outputs = &widen_lora_ranks(&models, outputs, &referenced);
    let labeler = Labeler::new(label.clone())?;
    let splits = SplitAssigner::new(&opts.splits)?;
    let label_width = match &label.vocab {
        Some(v) => Some(v.classes().len()),
        // Inferred vocabularies are known only at the end: reserve for the worst case.
        None if label.kind == probex_weights::labels::LabelKind::MultiLabel => Some(100_000),
        None => None,
    };
    let precision: Vec<Precision> = outputs
        .iter()
        .map(|o| opts.precision.unwrap_or(o.layer.source_precision))
        .collect();
    let storage = storage_of(outputs, &referenced);
    let files = create_files(outputs, &precision, &storage, models.len(), label_width)?;
    let layers = Layers {
        outputs,
        files: &files,
        precision: &precision,
        referenced: &referenced,
    };
    let (outcomes, bytes_read) = read_models(&models, &layers, &labeler, &splits, opts, digests)?;
    let (labelled, values, skipped) = match labelled_models(&models, &outcomes) {
        Ok(kept) => kept,
        Err(e) => {
            for f in &files {
                let _ = std::fs::remove_file(f.path());
            }
            return Err(e);
        }
    };
    let all_labels = labeler.assemble(&values)?;
    check_label_width(&all_labels, label, label_width)?;
    let label_columns = match &all_labels {
        Labels::MultiLabel { classes, .. } => Some(classes.len()),
        _ => None,
    };
    let assembly = Assembly {
        models: &models,
        outcomes: &outcomes,
        labelled: &labelled,
        skipped: &skipped,
        labels: &all_labels,
        label_key: &label.key,
        label_columns,
    };
    // Each layer's sidecar lists every model (for 1,000 models and 128 layers, 50 MB of JSON):
    // written in parallel.
    let written: Vec<(LayerReport, u64)> = outputs
        .par_iter()
        .zip(files)
        .enumerate()
        .map(|(out_i, (out, file))| {
            assembly.layer(out_i, out, file, precision[out_i], storage[out_i])
        })
        .collect::<Result<_, _>>()?;
    let bytes_written = written.iter().map(|(_, size)| size).sum();
    let reports = written.into_iter().map(|(report, _)| report).collect();

    let mut non_finite: Vec<NonFiniteFinding> =
        outcomes.into_iter().flat_map(|o| o.findings).collect();
    non_finite.sort_by(|a, b| (&a.model, &a.layer).cmp(&(&b.model, &b.layer)));
    Ok(ExtractReport {
        layers: reports,
        skipped,
        non_finite,
        files: models.len(),
        bytes_read,
        bytes_written,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The models sorted by id (the slot order of every layer file); an error when there are none
/// or an id repeats.
fn sorted_models(models: &[ModelSource]) -> Result<Vec<&ModelSource>, ExtractError> {
    if models.is_empty() {
        return Err(ExtractError::Config("no models to extract from".into()));
    }
    let mut models: Vec<&ModelSource> = models.iter().collect();
    models.sort_by(|a, b| a.id.cmp(&b.id));
    if let Some(w) = models.windows(2).find(|w| w[0].id == w[1].id) {
        return Err(ExtractError::Config(format!(
            "two models have the id `{}`: {} and {}",
            w[0].id,
            w[0].path.display(),
            w[1].path.display()
        )));
    }
    Ok(models)
}

/// Each layer's storage: as its layer says when copied, references (keeping a LoRA's rank)
/// when read where it is.
fn storage_of(outputs: &[LayerOutput], referenced: &[bool]) -> Vec<Storage> {
    outputs
        .iter()
        .zip(referenced)
        .map(|(o, &r)| match o.layer.storage {
            _ if !r => o.layer.storage,
            Storage::References { lora_rank } => Storage::References { lora_rank },
            _ => Storage::References { lora_rank: None },
        })
        .collect()
}

/// Creates every layer's file, sized for `n_models` rows.
fn create_files(
    outputs: &[LayerOutput],
    precision: &[Precision],
    storage: &[Storage],
    n_models: usize,
    label_width: Option<usize>,
) -> Result<Vec<LayerFile>, ExtractError> {
    outputs
        .iter()
        .zip(precision.iter().zip(storage))
        .map(|(o, (&p, &st))| {
            LayerFile::create(
                &o.dir,
                &o.layer.name,
                p,
                st,
                o.layer.matrix,
                n_models,
                label_width,
            )
            .map_err(io_err(&o.dir))
        })
        .collect()
}

/// The models the pass gave a label and a split, in slot order: `(slot, split)` and label
/// value of each, and the skipped ones with their reason. An error (the caller removes the
/// layer files) lists every fatal problem in id order, or says that every model was skipped.
#[allow(clippy::type_complexity)]
fn labelled_models(
    models: &[&ModelSource],
    outcomes: &[ModelOutcome],
) -> Result<(Vec<(usize, Split)>, Vec<LabelValue>, Vec<Skipped>), ExtractError> {
    let mut failures = Vec::new();
    for (m, o) in models.iter().zip(outcomes) {
        for p in [o.label.as_ref().err(), o.split.as_ref().err()]
            .into_iter()
            .flatten()
        {
            if p.fatal {
                failures.push(format!("{}: {}", m.id, p.message));
            }
        }
    }
    if !failures.is_empty() {
        return Err(ExtractError::Models(failures));
    }
    let mut skipped = Vec::new();
    let mut labelled = Vec::new();
    let mut values = Vec::new();
    for (slot, (m, o)) in models.iter().zip(outcomes).enumerate() {
        match (&o.label, &o.split) {
            (Ok(v), Ok(s)) => {
                labelled.push((slot, *s));
                values.push(v.clone());
            }
            (Err(p), _) | (_, Err(p)) => skipped.push(Skipped {
                id: m.id.clone(),
                reason: p.message.clone(),
            }),
        }
    }
    if labelled.is_empty() {
        return Err(ExtractError::Config(format!(
            "no model is left to extract: all {} were skipped (first: {})",
            models.len(),
            skipped.first().map(|s| s.reason.as_str()).unwrap_or("")
        )));
    }
    Ok((labelled, values, skipped))
}

/// Checks that the labels give at least one class, and no more than the files were sized for.
fn check_label_width(
    labels: &Labels,
    label: &LabelSpec,
    label_width: Option<usize>,
) -> Result<(), ExtractError> {
    if labels.width() == 0 {
        return Err(ExtractError::Config(format!(
            "label key `{}` gives no classes (every list is empty)",
            label.key
        )));
    }
    if label_width.is_some_and(|w| labels.width() > w) {
        return Err(ExtractError::Config(format!(
            "label key `{}` has {} classes, more than the {} supported without a vocabulary",
            label.key,
            labels.width(),
            label_width.unwrap_or(0)
        )));
    }
    Ok(())
}

/// What every layer's dataset is assembled from once the pass is done.
struct Assembly<'a> {
    models: &'a [&'a ModelSource],
    outcomes: &'a [ModelOutcome],
    /// (slot, split) of each model with a label and a split, in slot order.
    labelled: &'a [(usize, Split)],
    /// Models left out of every layer.
    skipped: &'a [Skipped],
    /// The labels of `labelled`, one row each.
    labels: &'a Labels,
    label_key: &'a str,
    label_columns: Option<usize>,
}

impl Assembly<'_> {
    /// Finishes `out`'s layer file (output `out_i`) with the rows its models gave and writes its sidecar;
    /// returns its report and the bytes its file holds.
    fn layer(
        &self,
        out_i: usize,
        out: &LayerOutput,
        file: LayerFile,
        precision: Precision,
        mut storage: Storage,
    ) -> Result<(LayerReport, u64), ExtractError> {
        let mut kept_slots = Vec::new();
        let mut kept_label_rows = Vec::new();
        let mut records = Vec::new();
        let mut references = Vec::new();
        let mut layer_skipped = self.skipped.to_vec();
        for (row, &(slot, split)) in self.labelled.iter().enumerate() {
            let m = self.models[slot];
            let o = &self.outcomes[slot];
            match o.rows.get(out_i) {
                Some(RowOutcome::Written { reference }) => {
                    kept_slots.push(slot);
                    kept_label_rows.push(row);
                    references.extend(reference.clone());
                    records.push(ModelRecord {
                        id: m.id.clone(),
                        split,
                        source_digest: o.file_digest.clone().unwrap_or_default(),
                    });
                }
                Some(RowOutcome::Dropped(why)) => layer_skipped.push(Skipped {
                    id: m.id.clone(),
                    reason: why.clone(),
                }),
                None => layer_skipped.push(Skipped {
                    id: m.id.clone(),
                    reason: "not extracted".into(),
                }),
            }
        }
        layer_skipped.sort_by(|a, b| a.id.cmp(&b.id));
        let labels = select_rows(self.labels, &kept_label_rows);
        let tensors_path = file.path().to_path_buf();
        if kept_slots.is_empty() {
            let _ = std::fs::remove_file(&tensors_path);
            return Err(ExtractError::Config(format!(
                "layer `{}`: every model was left out (first: {})",
                out.layer.name,
                layer_skipped
                    .first()
                    .map(|s| s.reason.as_str())
                    .unwrap_or("")
            )));
        }
        // A referenced LoRA layer's rank is its models' largest (loading pads lower ones).
        if let Storage::References {
            lora_rank: Some(rank),
        } = &mut storage
        {
            *rank = references
                .iter()
                .filter_map(|r| r.tensors.last().and_then(|down| down.shape.first()))
                .fold(*rank, |a, &b| a.max(b));
        }
        let size = file
            .finish(&kept_slots, &labels.as_f32(), self.label_columns)
            .map_err(io_err(&tensors_path))?;
        let sidecar = Sidecar {
            format: LayerDataset::FORMAT,
            layer: out.layer.info(),
            shape: out.layer.matrix,
            precision,
            storage,
            references,
            models: records,
            label_key: self.label_key.to_string(),
            labels: labels.without_targets(),
            skipped: layer_skipped.clone(),
        };
        let sidecar_path = out.dir.join(SIDECAR_FILE);
        // Compact: an in-place sidecar lists every row's file and tensors (~0.1 MB per
        // thousand models and layer).
        let json = serde_json::to_vec(&sidecar)
            .map_err(|e| ExtractError::Config(format!("{}: {e}", sidecar_path.display())))?;
        std::fs::write(&sidecar_path, json).map_err(io_err(&sidecar_path))?;
        Ok((
            LayerReport {
                layer: out.layer.info(),
                dir: out.dir.clone(),
                rows: kept_slots.len(),
                skipped: layer_skipped,
                sidecar,
            },
            size,
        ))
    }
}

/// `outputs` with each LoRA layer's rank raised to the largest rank any model has for it, so
/// that every model's factors fit the layer's rows (lower ranks are zero-padded).
///
/// Reads every header once more (a few kB each); headers that cannot be read are left to the
/// extraction pass, which reports them with everything else about that file.
fn widen_lora_ranks(
    models: &[&ModelSource],
    outputs: &[LayerOutput],
    referenced: &[bool],
) -> Vec<LayerOutput> {
    let mut outputs = outputs.to_vec();
    // A referenced pair is checked against no rank: its rows are what the files hold.
    for (o, _) in outputs.iter_mut().zip(referenced).filter(|(_, r)| **r) {
        if let Storage::LoraFactors { rank } = o.layer.storage {
            o.layer.storage = Storage::References {
                lora_rank: Some(rank),
            };
        }
    }
    if !outputs
        .iter()
        .any(|o| matches!(o.layer.storage, Storage::LoraFactors { .. }))
    {
        return outputs;
    }
    let ranks: Vec<Vec<usize>> = models
        .par_iter()
        .map(|m| {
            let header = read_header(&m.path).ok();
            outputs
                .iter()
                .map(|o| {
                    // Only pairs that form the layer's matrix count: any other is an error the
                    // extraction pass reports, and must not size every model's rows.
                    let (h, (up, _)) = (header.as_ref()?, o.layer.lora_up.as_ref()?);
                    let (_, down) = h.find(&o.layer.name)?;
                    let (_, up) = h.find(up)?;
                    let fits = transform::plan_lora(&up.shape, &down.shape).ok()? == o.layer.matrix;
                    fits.then(|| down.shape[0])
                })
                .map(|r| r.unwrap_or(0))
                .collect()
        })
        .collect();
    for (i, o) in outputs.iter_mut().enumerate() {
        if let Storage::LoraFactors { rank } = &mut o.layer.storage {
            *rank = ranks.iter().map(|r| r[i]).fold(*rank, usize::max);
        }
    }
    outputs
}

/// Summary of the split sizes of a layer's rows, for logs (`train 701, val 100, test 201`).
pub fn split_counts(records: &[ModelRecord]) -> BTreeMap<Split, usize> {
    let mut m = BTreeMap::new();
    for r in records {
        *m.entry(r.split).or_insert(0) += 1;
    }
    m
}
