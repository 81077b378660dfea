//! The training loop, generic over the autodiff backend and the model.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

use burn::module::{AutodiffModule, ParamId};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, TensorData};
use serde::{Deserialize, Serialize};

use super::data::{DeviceInputs, HostTargets, Prepared};
use super::optim::Adam;
use super::{
    Curves, EvalPoint, SplitMetrics, TrainConfig, TrainError, TrainOutcome, TrainProgress,
    TrainReport, metrics,
};
use crate::models::checkpoint::{
    Checkpoint, CheckpointMeta, Standardization, TaskKind, deserialize_named, serialize_named,
    write_atomic,
};
use crate::models::encoder::{self, Encoding, Scratch};
use crate::models::{
    Batch, NamedTensor, Net, forward_batch, load_named, named_tensors, param_names,
};
use probex_weights::dataset::{LayerDataset, Split};
use probex_weights::embeddings::TextTable;
use probex_weights::rng::Rng;

/// File names inside a work dir.
const STATE_FILE: &str = "state.safetensors";
const BEST_FILE: &str = "best.safetensors";
const BEST_HOLDOUT_FILE: &str = "best_holdout.safetensors";
const RESUME_KEY: &str = "probex_resume";
const RESUME_FORMAT: u32 = 1;

/// One training's inputs, independent of the backend.
pub(crate) struct Job<'a> {
    pub prep: &'a Prepared<'a>,
    pub cfg: &'a TrainConfig,
    pub device_name: String,
    pub work_dir: Option<&'a Path>,
    pub fingerprint: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Best {
    epoch: usize,
    score: f64,
    splits: SplitMetrics,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResumeMeta {
    format: u32,
    fingerprint: String,
    next_epoch: usize,
    adam_steps: u64,
    rng_state: u64,
    best: Option<Best>,
    best_holdout: Option<Best>,
    curves: Curves,
}

/// A digest of everything that makes a resume state valid: the semantic config (not threads,
/// not the checkpoint interval), the layer, the models (their source digests) and labels, and
/// the text table.
pub(crate) fn fingerprint(
    ds: &LayerDataset,
    text: Option<&TextTable>,
    cfg: &TrainConfig,
) -> String {
    let mut c = cfg.clone();
    c.threads = 0;
    c.checkpoint_every = 0;
    let mut h = blake3::Hasher::new();
    let mut put = |v: serde_json::Result<Vec<u8>>| {
        h.update(&v.unwrap_or_default());
        h.update(b"\0");
    };
    put(serde_json::to_vec(&c));
    put(serde_json::to_vec(&ds.layer));
    put(serde_json::to_vec(&(ds.n, ds.d_h, ds.d_w)));
    put(serde_json::to_vec(&ds.models));
    put(serde_json::to_vec(&ds.labels));
    if let Some(t) = text {
        put(serde_json::to_vec(&t.names));
        put(serde_json::to_vec(&t.vectors));
    }
    h.finalize().to_hex().to_string()
}

fn task_loss<B: Backend>(kind: TaskKind, s: Tensor<B, 2>, y: Tensor<B, 2>) -> Tensor<B, 1> {
    match kind {
        TaskKind::MultiLabel => {
            // BCE with logits, the numerically stable form PyTorch uses.
            (s.clone().clamp_min(0.0) - s.clone() * y + s.abs().neg().exp().log1p()).mean()
        }
        TaskKind::Class | TaskKind::ZeroShot => (log_softmax(s, 1) * y).sum_dim(1).mean().neg(),
        TaskKind::Regression => (s - y).powi_scalar(2).mean(),
    }
}

fn index_tensor<B: Backend>(rows: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let v: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    Tensor::from_data(TensorData::new(v, [rows.len()]), device)
}

/// Scores (or encodings) of `rows` of `inputs`, in chunks of `batch`: row-major values and the
/// width.
pub(crate) fn forward_rows<B: Backend, N: Net<B>>(
    model: &N,
    inputs: &DeviceInputs<B>,
    device: &B::Device,
    rows: &[usize],
    text: Option<&Tensor<B, 2>>,
    batch: usize,
    encode: bool,
) -> Result<(Vec<f32>, usize), TrainError> {
    let mut out = Vec::new();
    let mut width = 0;
    for chunk in rows.chunks(batch.max(1)) {
        let x = inputs.batch(chunk, device).map_err(TrainError::Data)?;
        let s = forward_batch(model, x, text.cloned(), encode);
        width = s.dims()[1];
        out.extend(
            s.into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .unwrap_or_default(),
        );
    }
    Ok((out, width))
}

fn rows_of(v: &[f32], w: usize, rows: &[usize]) -> Vec<f32> {
    rows.iter()
        .flat_map(|&r| v[r * w..(r + 1) * w].iter().copied())
        .collect()
}

/// Metrics of every split present.
fn evaluate<B: Backend, N: Net<B>>(
    model: &N,
    prep: &Prepared,
    inputs: &DeviceInputs<B>,
    device: &B::Device,
    text_train: Option<&Tensor<B, 2>>,
    text_holdout: Option<&Tensor<B, 2>>,
    batch: usize,
) -> Result<SplitMetrics, TrainError> {
    let mut out = SplitMetrics::new();
    for (split, rows) in &prep.rows {
        let text = if prep.uses_holdout_text(*split) {
            text_holdout
        } else {
            text_train
        };
        let (scores, w) = forward_rows(model, inputs, device, rows, text, batch, false)?;
        let m = match &prep.host {
            HostTargets::MultiLabel(t, tw) => {
                metrics::multi_label(&scores, &rows_of(t, *tw, rows), w)
            }
            HostTargets::Class(idx) => {
                let t: Vec<u32> = rows.iter().map(|&r| idx[r]).collect();
                let mut m = metrics::classes(&scores, &t, w);
                // The trivial baseline beside top-1, so a report (and an expectation) can say
                // whether the probe learned anything. Not for zero-shot probes: their held-out
                // classes never occur in training.
                if prep.task.kind == TaskKind::Class {
                    let train: Vec<u32> = prep
                        .rows
                        .get(&Split::Train)
                        .map(|r| r.iter().map(|&i| idx[i]).collect())
                        .unwrap_or_default();
                    m.insert("majority".into(), metrics::majority(&train, &t));
                }
                m
            }
            HostTargets::Numeric(t) => {
                let (mean, std) = (prep.task.target_mean, prep.task.target_std);
                let pred: Vec<f32> = scores.iter().map(|&s| mean + std * s).collect();
                metrics::regression(&pred, &rows_of(t, 1, rows), std)
            }
        };
        out.insert(split.as_str().to_string(), m);
    }
    Ok(out)
}

fn ckpt_bytes(
    prep: &Prepared,
    mut tensors: Vec<NamedTensor>,
    epoch: usize,
) -> Result<Vec<u8>, TrainError> {
    // The module's parameters only (the official state_dict, for a strict load): the
    // standardisation goes beside the checkpoint, see `standardize_bytes`.
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Checkpoint {
        meta: Some(CheckpointMeta {
            format: CheckpointMeta::FORMAT,
            spec: prep.spec.clone(),
            task: prep.task.clone(),
            epoch: Some(epoch),
        }),
        tensors,
    }
    .to_bytes()
    .map_err(TrainError::Checkpoint)
}

/// `standardize = true`: the inputs' standardisation, the file both checkpoints need beside
/// them (recomputed from the data on every run, resumed or not, so the work dir keeps none).
fn standardize_bytes(prep: &Prepared) -> Result<Option<Vec<u8>>, TrainError> {
    let (Some(mean), Some(scale)) = (&prep.input_mean, prep.task.input_scale) else {
        return Ok(None);
    };
    Standardization {
        d_h: prep.spec.d_h,
        d_w: prep.spec.d_w,
        mean: mean.clone(),
        scale,
    }
    .to_bytes()
    .map(Some)
    .map_err(TrainError::Checkpoint)
}

fn save_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), TrainError> {
    write_atomic(&dir.join(name), bytes).map_err(TrainError::Checkpoint)
}

/// A resume state: its metadata and its tensors (model and optimiser) by name.
type Resume = (ResumeMeta, HashMap<String, NamedTensor>);

/// Loads a matching resume state from `dir`; `None` when there is none or it belongs to
/// another training (then the training starts over).
fn load_resume(dir: &Path, fingerprint: &str) -> Result<Option<Resume>, TrainError> {
    let path = dir.join(STATE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TrainError::Checkpoint(format!("{}: {e}", path.display()))),
    };
    let what = path.display().to_string();
    let Ok((meta, tensors)) = deserialize_named(&bytes, &what) else {
        return Ok(None);
    };
    let Some(Ok(m)) = meta
        .get(RESUME_KEY)
        .map(|j| serde_json::from_str::<ResumeMeta>(j))
    else {
        return Ok(None);
    };
    if m.format != RESUME_FORMAT || m.fingerprint != fingerprint {
        return Ok(None);
    }
    let map = tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
    Ok(Some((m, map)))
}

/// The parameters in a best-so-far file of the work dir; only the model's own (`names`), so
/// a file written by an older probex that kept other tensors there (the training mean, before
/// train version 3) cannot carry them into the final checkpoint.
fn read_best(dir: &Path, name: &str, names: &[(String, Vec<usize>)]) -> Option<Vec<NamedTensor>> {
    let mut tensors = Checkpoint::read(&dir.join(name)).ok()?.tensors;
    tensors.retain(|t| names.iter().any(|(n, _)| *n == t.name));
    Some(tensors)
}

/// A training forward pass whose ProbeX encoder ran outside the autodiff graph.
pub struct SplitForward<AB: AutodiffBackend> {
    encoding: Encoding<AB::InnerBackend>,
    /// `e`: a gradient leaf of the graph of the head and the loss.
    leaf: Tensor<AB, 2>,
    /// The encoder's parameters, in [`encoder::Encoding::gradients`]' order.
    params: Vec<ParamId>,
}

/// Scores of a batch for training: through the autodiff graph, except a model's ProbeX
/// encoder ([`crate::models::ProbeEncoded`]) reading stacked matrices, which
/// [`split_gradients`] differentiates. LoRA factors go through the graph whole: their encoder
/// is a few small products ([`encoder::factored`]).
pub fn train_scores<AB, M>(
    model: &M,
    x: Batch<AB::InnerBackend>,
    text: Option<Tensor<AB, 2>>,
    scratch: &mut Scratch,
) -> (Tensor<AB, 2>, Option<SplitForward<AB>>)
where
    AB: AutodiffBackend,
    M: Net<AB>,
{
    let (Batch::Stacked(x), Some(net)) = (&x, model.probe_encoded()) else {
        return (forward_batch(model, x.tracked(), text, false), None);
    };
    let x = x.clone();
    let layers = net.encoder();
    let encoding = encoder::forward(x, layers.weights().inner(), scratch);
    let leaf = Tensor::<AB, 2>::from_inner(encoding.e.clone()).require_grad();
    let scores = net.scores_from_encoding(leaf.clone(), text);
    let split = SplitForward {
        encoding,
        leaf,
        params: layers.param_ids(),
    };
    (scores, Some(split))
}

/// The gradients of the parameters [`train_scores`] left out of the graph, flattened for
/// [`Adam::step_with`].
pub fn split_gradients<AB: AutodiffBackend>(
    split: Option<SplitForward<AB>>,
    grads: &AB::Gradients,
    scratch: &mut Scratch,
) -> Vec<(ParamId, Tensor<AB::InnerBackend, 1>)> {
    let Some(split) = split else {
        return Vec::new();
    };
    let Some(de) = split.leaf.grad(grads) else {
        return Vec::new();
    };
    let gradients = split.encoding.gradients(de, scratch).0;
    split.params.into_iter().zip(gradients).collect()
}

/// Trains model `M` on backend `AB`.
pub(crate) fn run<AB, M>(
    job: &Job,
    device: &AB::Device,
    progress: &mut dyn FnMut(&TrainProgress) -> ControlFlow<()>,
) -> Result<TrainOutcome, TrainError>
where
    AB: AutodiffBackend,
    M: Net<AB> + AutodiffModule<AB>,
    M::InnerModule: Net<AB::InnerBackend>,
{
    let start = Instant::now();
    let (prep, cfg) = (job.prep, job.cfg);
    let zero_shot = prep.task.kind == TaskKind::ZeroShot;
    let n = prep.inputs.rows();

    // Batches are row selections of data held on the device, or read from the dataset as
    // they are needed (see DeviceInputs).
    let inputs =
        DeviceInputs::<AB::InnerBackend>::new(&prep.inputs, device).map_err(TrainError::Data)?;
    let targets = Tensor::<AB::InnerBackend, 2>::from_data(
        TensorData::new(prep.targets.clone(), [n, prep.target_width]),
        device,
    );
    let to_dev = |m: &super::data::TextMatrix| {
        Tensor::<AB::InnerBackend, 2>::from_data(
            TensorData::new(m.values.clone(), [m.rows, m.dim]),
            device,
        )
    };
    let text_train = prep.text_train.as_ref().map(to_dev);
    let text_holdout = prep.text_holdout.as_ref().map(to_dev);
    let text_train_ad = text_train.clone().map(Tensor::<AB, 2>::from_inner);

    let mut model = M::init(&prep.spec, &mut Rng::new(cfg.seed, 0), device);
    let names = param_names(&model);
    let mut adam =
        Adam::<AB::InnerBackend>::new(cfg.lr, cfg.weight_decay, cfg.beta1, cfg.beta2, cfg.eps);
    let mut shuffle = Rng::new(cfg.seed, 1);
    let mut curves = Curves::default();
    let (mut best, mut best_holdout): (Option<Best>, Option<Best>) = (None, None);
    let (mut best_params, mut best_holdout_params) = (None, None);
    let mut first_epoch = 0;
    let mut resumed_from = None;

    if let Some(dir) = job.work_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", dir.display())))?;
        if let Some((m, tensors)) = load_resume(dir, &job.fingerprint)? {
            let params: HashMap<String, NamedTensor> = names
                .iter()
                .filter_map(|(k, _)| tensors.get(k).map(|t| (k.clone(), t.clone())))
                .collect();
            let bp = m.best.as_ref().map(|_| read_best(dir, BEST_FILE, &names));
            let bhp = m
                .best_holdout
                .as_ref()
                .map(|_| read_best(dir, BEST_HOLDOUT_FILE, &names));
            // A state whose best files are gone is not resumable: start over.
            if !matches!(bp, Some(None)) && !matches!(bhp, Some(None)) {
                model = load_named(model, &params, device).map_err(|e| {
                    TrainError::Checkpoint(format!("{}: {e}", dir.join(STATE_FILE).display()))
                })?;
                adam.load_state(&names, &tensors, m.adam_steps, device)
                    .map_err(TrainError::Checkpoint)?;
                shuffle = Rng::from_state(m.rng_state);
                curves = m.curves;
                best = m.best;
                best_holdout = m.best_holdout;
                best_params = bp.flatten();
                best_holdout_params = bhp.flatten();
                first_epoch = m.next_epoch;
                resumed_from = Some(m.next_epoch);
            }
        }
    }

    let base_rows = prep.rows.get(&Split::Train).cloned().unwrap_or_default();
    let batch = cfg.batch_size;
    let interval = cfg.checkpoint_interval();
    let mut scratch = Scratch::default();
    for epoch in first_epoch..cfg.epochs {
        // Each epoch permutes the row order afresh, so the order depends only on the random
        // state (which a resume restores), not on the previous epoch's order.
        let mut train_rows = base_rows.clone();
        shuffle.shuffle(&mut train_rows);
        let mut loss_sum: Option<Tensor<AB::InnerBackend, 1>> = None;
        for chunk in train_rows.chunks(batch) {
            let idx = index_tensor::<AB::InnerBackend>(chunk, device);
            let xb = inputs.batch(chunk, device).map_err(TrainError::Data)?;
            let y = Tensor::<AB, 2>::from_inner(targets.clone().select(0, idx));
            let (scores, split) = train_scores(&model, xb, text_train_ad.clone(), &mut scratch);
            let loss = task_loss(prep.task.kind, scores, y);
            let weighted = loss.clone().inner().mul_scalar(chunk.len() as f64);
            loss_sum = Some(match loss_sum {
                Some(s) => s + weighted,
                None => weighted,
            });
            let grads = loss.backward();
            let extra = split_gradients(split, &grads, &mut scratch);
            model = adam.step_with(model, &grads, extra);
        }
        let train_loss = loss_sum
            .map(|s| s.into_scalar().elem::<f64>() / train_rows.len() as f64)
            .unwrap_or(f64::NAN);
        curves.train_loss.push(train_loss);

        let mut evaluated = false;
        if epoch % cfg.validate_every == 0 {
            let inner = model.valid();
            let splits = evaluate(
                &inner,
                prep,
                &inputs,
                device,
                text_train.as_ref(),
                text_holdout.as_ref(),
                batch,
            )?;
            let pick = |split: &str, current: &Option<Best>| -> Option<f64> {
                let v = *splits.get(split)?.get(prep.selection)?;
                let better = match current {
                    None => true,
                    Some(b) if zero_shot => v >= b.score,
                    Some(b) => v > b.score,
                };
                better.then_some(v)
            };
            if let Some(score) = pick(Split::Val.as_str(), &best) {
                let params = named_tensors(&inner);
                if let Some(dir) = job.work_dir {
                    save_file(dir, BEST_FILE, &ckpt_bytes(prep, params.clone(), epoch)?)?;
                }
                best_params = Some(params);
                best = Some(Best {
                    epoch,
                    score,
                    splits: splits.clone(),
                });
            }
            if zero_shot && let Some(score) = pick(Split::ValHoldout.as_str(), &best_holdout) {
                let params = named_tensors(&inner);
                if let Some(dir) = job.work_dir {
                    save_file(
                        dir,
                        BEST_HOLDOUT_FILE,
                        &ckpt_bytes(prep, params.clone(), epoch)?,
                    )?;
                }
                best_holdout_params = Some(params);
                best_holdout = Some(Best {
                    epoch,
                    score,
                    splits: splits.clone(),
                });
            }
            curves.evals.push(EvalPoint { epoch, splits });
            evaluated = true;
        }

        let flow = progress(&TrainProgress {
            epoch,
            epochs: cfg.epochs,
            train_loss,
            eval: if evaluated { curves.evals.last() } else { None },
            resumed_from,
        });
        let stop = flow.is_break();
        if let Some(dir) = job.work_dir
            && (stop || epoch % interval == 0 || epoch + 1 == cfg.epochs)
        {
            let mut tensors = named_tensors(&model);
            tensors.extend(adam.state_tensors(&names));
            let meta = ResumeMeta {
                format: RESUME_FORMAT,
                fingerprint: job.fingerprint.clone(),
                next_epoch: epoch + 1,
                adam_steps: adam.steps,
                rng_state: shuffle.state(),
                best: best.clone(),
                best_holdout: best_holdout.clone(),
                curves: curves.clone(),
            };
            let json =
                serde_json::to_string(&meta).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
            let bytes = serialize_named(&tensors, HashMap::from([(RESUME_KEY.to_string(), json)]))
                .map_err(TrainError::Checkpoint)?;
            save_file(dir, STATE_FILE, &bytes)?;
        }
        if stop {
            return Err(TrainError::Cancelled { epoch });
        }
    }

    // Without a val split (or before any validation) the last model is kept.
    let (best_epoch, metrics, params) = match (best, best_params) {
        (Some(b), Some(p)) => (b.epoch, b.splits, p),
        _ => {
            let inner = model.valid();
            let splits = evaluate(
                &inner,
                prep,
                &inputs,
                device,
                text_train.as_ref(),
                text_holdout.as_ref(),
                batch,
            )?;
            (cfg.epochs.saturating_sub(1), splits, named_tensors(&inner))
        }
    };
    let checkpoint = ckpt_bytes(prep, params, best_epoch)?;
    let (best_holdout_epoch, holdout_metrics, holdout_checkpoint) =
        match (best_holdout, best_holdout_params) {
            (Some(b), Some(p)) => (
                Some(b.epoch),
                Some(b.splits),
                Some(ckpt_bytes(prep, p, b.epoch)?),
            ),
            _ => (None, None, None),
        };
    Ok(TrainOutcome {
        checkpoint,
        holdout_checkpoint,
        standardize: standardize_bytes(prep)?,
        report: TrainReport {
            config: cfg.clone(),
            task: prep.task.kind,
            device: job.device_name.clone(),
            params: model.num_params(),
            selection_metric: prep.selection.to_string(),
            best_epoch,
            metrics,
            best_holdout_epoch,
            holdout_metrics,
            curves,
            resumed_from,
            seconds: start.elapsed().as_secs_f64(),
        },
    })
}
