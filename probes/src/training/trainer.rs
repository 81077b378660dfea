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

use super::data::{DataError, DeviceInputs, HostTargets, Prepared};
use super::optim::Adam;
use super::{
    CheckpointMismatch, Curves, EvalPoint, GangError, SplitMetrics, StepPath, TrainConfig,
    TrainError, TrainOutcome, TrainProgress, TrainReport, metrics,
};
use crate::models::checkpoint::{
    Checkpoint, CheckpointError, CheckpointMeta, Standardization, TaskKind, deserialize_named,
    serialize_named, write_atomic,
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

mod batched;

pub(crate) use batched::{batchable, run_gang_batched};

/// One training's inputs, independent of the backend.
pub(crate) struct Job<'a> {
    pub prep: &'a Prepared<'a>,
    pub cfg: &'a TrainConfig,
    pub device_name: String,
    pub work_dir: Option<&'a Path>,
    pub fingerprint: String,
    pub path: StepPath,
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
    .map_err(TrainError::from)
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
    .map_err(TrainError::from)
}

fn save_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), TrainError> {
    Ok(write_atomic(&dir.join(name), bytes)?)
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
        Err(source) => return Err(CheckpointError::Io { path, source }.into()),
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
    train_scores_on(model, x, text, scratch, StepPath::Auto)
}

/// [`train_scores`], with the encoder on the tensor path on every backend when `path` says so.
fn train_scores_on<AB, M>(
    model: &M,
    x: Batch<AB::InnerBackend>,
    text: Option<Tensor<AB, 2>>,
    scratch: &mut Scratch,
    path: StepPath,
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
    let weights = layers.weights().inner();
    let encoding = match path {
        StepPath::Auto => encoder::forward(x, weights, scratch),
        StepPath::Tensors => encoder::forward_tensors(x, weights),
    };
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
    let mut member = Member::<AB, M>::new(job, device)?;
    for epoch in member.first_epoch..job.cfg.epochs {
        let rows = member.epoch_rows();
        for chunk in rows.chunks(job.cfg.batch_size) {
            member.step(chunk, device)?;
        }
        if member.end_epoch(epoch, device, progress)? {
            return Err(TrainError::Cancelled { epoch });
        }
    }
    member.finish(device)
}

/// Trains several models `M` of one gang together: the layers of one shape, each with its own
/// data, model, optimiser, metrics, checkpoints and resume state (in its own work dir), in
/// lockstep, one step of every member before the next step. `progress` hears which member
/// (its index in `jobs`) finished an epoch. One result per job, in order.
///
/// Every member's result is its solo [`run`]'s: each computes exactly the operations its solo
/// run computes, in the same order (a loop over members calling the same kernels). Members
/// whose resume states stopped at different epochs (a kill during a save) form sub-gangs by
/// resume epoch, run one after the other.
pub(crate) fn run_gang<AB, M>(
    jobs: &[Job],
    device: &AB::Device,
    progress: &mut dyn FnMut(usize, &TrainProgress) -> ControlFlow<()>,
) -> Vec<Result<TrainOutcome, TrainError>>
where
    AB: AutodiffBackend,
    M: Net<AB> + AutodiffModule<AB>,
    M::InnerModule: Net<AB::InnerBackend>,
{
    run_lockstep::<AB, M, _>(jobs, device, progress, |_| Ok(OneByOne))
}

/// How the members of a (sub-)gang take their steps together: one after another
/// ([`OneByOne`]), or as one batched problem ([`batched`]).
trait Lockstep<'j, AB: AutodiffBackend, M> {
    /// One optimiser step of every member, member `g` of `gang` on the rows `chunks[g]`. The
    /// members that failed, by position in `gang`, already dropped from any state of this
    /// stepper (their errors go to their results).
    fn step(
        &mut self,
        gang: &mut [(usize, Member<'j, AB, M>)],
        chunks: &[&[usize]],
        device: &AB::Device,
    ) -> Vec<(usize, TrainError)>;

    /// Brings every member's own model, optimiser and epoch loss up to date, before it ends
    /// its epoch (validation, checkpoints, resume state).
    fn sync(&mut self, gang: &mut [(usize, Member<'j, AB, M>)]) -> Result<(), TrainError>;

    /// Keeps only the members at positions `kept` (ascending) of the gang as it was.
    fn retain(&mut self, kept: &[usize]);
}

/// Each member steps alone, with the kernels of its solo run.
struct OneByOne;

impl<'j, AB, M> Lockstep<'j, AB, M> for OneByOne
where
    AB: AutodiffBackend,
    M: Net<AB> + AutodiffModule<AB>,
    M::InnerModule: Net<AB::InnerBackend>,
{
    fn step(
        &mut self,
        gang: &mut [(usize, Member<'j, AB, M>)],
        chunks: &[&[usize]],
        device: &AB::Device,
    ) -> Vec<(usize, TrainError)> {
        let mut failed = Vec::new();
        for (g, (_, m)) in gang.iter_mut().enumerate() {
            if let Err(e) = m.step(chunks[g], device) {
                failed.push((g, e));
            }
        }
        failed
    }

    fn sync(&mut self, _gang: &mut [(usize, Member<'j, AB, M>)]) -> Result<(), TrainError> {
        Ok(())
    }

    fn retain(&mut self, _kept: &[usize]) {}
}

/// The gang loop of [`run_gang`], with the members of each sub-gang stepped by the stepper
/// `stepper` makes for them.
fn run_lockstep<'j, AB, M, S>(
    jobs: &'j [Job<'j>],
    device: &AB::Device,
    progress: &mut dyn FnMut(usize, &TrainProgress) -> ControlFlow<()>,
    mut stepper: impl FnMut(&mut [(usize, Member<'j, AB, M>)]) -> Result<S, TrainError>,
) -> Vec<Result<TrainOutcome, TrainError>>
where
    AB: AutodiffBackend,
    M: Net<AB> + AutodiffModule<AB>,
    M::InnerModule: Net<AB::InnerBackend>,
    S: Lockstep<'j, AB, M>,
{
    let mut results: Vec<Option<Result<TrainOutcome, TrainError>>> =
        jobs.iter().map(|_| None).collect();
    let mut members: Vec<(usize, Member<AB, M>)> = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        match Member::<AB, M>::new(job, device) {
            Ok(m) => members.push((i, m)),
            Err(e) => results[i] = Some(Err(e)),
        }
    }
    let mut epochs: Vec<usize> = members.iter().map(|(_, m)| m.first_epoch).collect();
    epochs.sort_unstable();
    epochs.dedup();
    for first in epochs {
        let (mut gang, rest): (Vec<_>, Vec<_>) = members
            .into_iter()
            .partition(|(_, m)| m.first_epoch == first);
        members = rest;
        let mut step = match stepper(&mut gang) {
            Ok(s) => s,
            Err(e) => {
                let msg = e.to_string();
                for (i, _) in gang {
                    results[i] = Some(Err(GangError::Shared(msg.clone()).into()));
                }
                continue;
            }
        };
        let end = gang.first().map_or(0, |(i, _)| jobs[*i].cfg.epochs);
        for epoch in first..end {
            let mut rows: Vec<Vec<usize>> = gang.iter_mut().map(|(_, m)| m.epoch_rows()).collect();
            let batch = gang
                .first()
                .map_or(1, |(i, _)| jobs[*i].cfg.batch_size.max(1));
            let steps = rows.first().map_or(0, |r| r.len().div_ceil(batch));
            for k in 0..steps {
                let chunks: Vec<&[usize]> = rows
                    .iter()
                    .map(|r| r.chunks(batch).nth(k).unwrap_or(&[]))
                    .collect();
                let mut failed = step.step(&mut gang, &chunks, device);
                failed.sort_by_key(|(g, _)| std::cmp::Reverse(*g));
                for (g, e) in failed {
                    results[gang.remove(g).0] = Some(Err(e));
                    rows.remove(g);
                }
            }
            if let Err(e) = step.sync(&mut gang) {
                let msg = e.to_string();
                for (i, _) in gang.drain(..) {
                    results[i] = Some(Err(GangError::Shared(msg.clone()).into()));
                }
            }
            let mut kept = Vec::new();
            let mut positions = Vec::new();
            for (g, (i, mut m)) in gang.into_iter().enumerate() {
                match m.end_epoch(epoch, device, &mut |p| progress(i, p)) {
                    Ok(false) => {
                        kept.push((i, m));
                        positions.push(g);
                    }
                    Ok(true) => results[i] = Some(Err(TrainError::Cancelled { epoch })),
                    Err(e) => results[i] = Some(Err(e)),
                }
            }
            step.retain(&positions);
            gang = kept;
        }
        for (i, m) in gang {
            results[i] = Some(m.finish(device));
        }
    }
    results
        .into_iter()
        .map(|r| {
            r.unwrap_or(Err(TrainError::Data(DataError::NotTrained(
                "a gang member was not trained",
            ))))
        })
        .collect()
}

/// One training in progress: what [`run`] keeps between steps, so that [`run_gang`] can step
/// several in lockstep.
struct Member<'j, AB: AutodiffBackend, M> {
    job: &'j Job<'j>,
    start: Instant,
    inputs: DeviceInputs<'j, AB::InnerBackend>,
    targets: Tensor<AB::InnerBackend, 2>,
    text_train: Option<Tensor<AB::InnerBackend, 2>>,
    text_holdout: Option<Tensor<AB::InnerBackend, 2>>,
    text_train_ad: Option<Tensor<AB, 2>>,
    /// Taken out while an optimiser step replaces it (`None` only then): a model whose
    /// tensors are uniquely owned is updated in place.
    model: Option<M>,
    names: Vec<(String, Vec<usize>)>,
    adam: Adam<AB::InnerBackend>,
    shuffle: Rng,
    curves: Curves,
    best: Option<Best>,
    best_holdout: Option<Best>,
    best_params: Option<Vec<NamedTensor>>,
    best_holdout_params: Option<Vec<NamedTensor>>,
    first_epoch: usize,
    resumed_from: Option<usize>,
    scratch: Scratch,
    /// The current epoch's loss, weighted by batch size.
    loss_sum: Option<Tensor<AB::InnerBackend, 1>>,
    /// The current epoch's rows.
    epoch_len: usize,
}

impl<'j, AB, M> Member<'j, AB, M>
where
    AB: AutodiffBackend,
    M: Net<AB> + AutodiffModule<AB>,
    M::InnerModule: Net<AB::InnerBackend>,
{
    /// The data on the device, the initial model, and the resume state of the work dir if it
    /// has a matching one.
    fn new(job: &'j Job<'j>, device: &AB::Device) -> Result<Self, TrainError> {
        let start = Instant::now();
        let (prep, cfg) = (job.prep, job.cfg);
        let n = prep.inputs.rows();
        // Batches are row selections of data held on the device, or read from the dataset as
        // they are needed (see DeviceInputs).
        let inputs = DeviceInputs::<AB::InnerBackend>::new(&prep.inputs, device)
            .map_err(TrainError::Data)?;
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

        let model = M::init(&prep.spec, &mut Rng::new(cfg.seed, 0), device);
        let names = param_names(&model);
        let adam =
            Adam::<AB::InnerBackend>::new(cfg.lr, cfg.weight_decay, cfg.beta1, cfg.beta2, cfg.eps);
        let mut member = Member {
            job,
            start,
            inputs,
            targets,
            text_train,
            text_holdout,
            text_train_ad,
            model: Some(model),
            names,
            adam,
            shuffle: Rng::new(cfg.seed, 1),
            curves: Curves::default(),
            best: None,
            best_holdout: None,
            best_params: None,
            best_holdout_params: None,
            first_epoch: 0,
            resumed_from: None,
            scratch: Scratch::default(),
            loss_sum: None,
            epoch_len: 0,
        };
        member.resume(device)?;
        Ok(member)
    }

    /// Takes up the resume state of the work dir, if it has one of this training.
    fn resume(&mut self, device: &AB::Device) -> Result<(), TrainError> {
        let Some(dir) = self.job.work_dir else {
            return Ok(());
        };
        std::fs::create_dir_all(dir).map_err(|source| CheckpointError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let Some((m, tensors)) = load_resume(dir, &self.job.fingerprint)? else {
            return Ok(());
        };
        let names = &self.names;
        let params: HashMap<String, NamedTensor> = names
            .iter()
            .filter_map(|(k, _)| tensors.get(k).map(|t| (k.clone(), t.clone())))
            .collect();
        let bp = m.best.as_ref().map(|_| read_best(dir, BEST_FILE, names));
        let bhp = m
            .best_holdout
            .as_ref()
            .map(|_| read_best(dir, BEST_HOLDOUT_FILE, names));
        // A state whose best files are gone is not resumable: start over.
        if matches!(bp, Some(None)) || matches!(bhp, Some(None)) {
            return Ok(());
        }
        let model = self.model.take().ok_or_else(lost_model)?;
        self.model =
            Some(
                load_named(model, &params, device).map_err(|e| CheckpointMismatch::Resume {
                    path: dir.join(STATE_FILE),
                    source: e,
                })?,
            );
        self.adam
            .load_state(names, &tensors, m.adam_steps, device)?;
        self.shuffle = Rng::from_state(m.rng_state);
        self.curves = m.curves;
        self.best = m.best;
        self.best_holdout = m.best_holdout;
        self.best_params = bp.flatten();
        self.best_holdout_params = bhp.flatten();
        self.first_epoch = m.next_epoch;
        self.resumed_from = Some(m.next_epoch);
        Ok(())
    }

    /// The next epoch's training rows, in their order.
    fn epoch_rows(&mut self) -> Vec<usize> {
        // Each epoch permutes the row order afresh, so the order depends only on the random
        // state (which a resume restores), not on the previous epoch's order.
        let mut rows = self
            .job
            .prep
            .rows
            .get(&Split::Train)
            .cloned()
            .unwrap_or_default();
        self.shuffle.shuffle(&mut rows);
        self.loss_sum = None;
        self.epoch_len = rows.len();
        rows
    }

    /// One optimiser step on the rows `chunk`.
    fn step(&mut self, chunk: &[usize], device: &AB::Device) -> Result<(), TrainError> {
        let idx = index_tensor::<AB::InnerBackend>(chunk, device);
        let xb = self.inputs.batch(chunk, device).map_err(TrainError::Data)?;
        let y = Tensor::<AB, 2>::from_inner(self.targets.clone().select(0, idx));
        let model = self.model.take().ok_or_else(lost_model)?;
        let (scores, split) = train_scores_on(
            &model,
            xb,
            self.text_train_ad.clone(),
            &mut self.scratch,
            self.job.path,
        );
        let loss = task_loss(self.job.prep.task.kind, scores, y);
        let weighted = loss.clone().inner().mul_scalar(chunk.len() as f64);
        self.loss_sum = Some(match self.loss_sum.take() {
            Some(s) => s + weighted,
            None => weighted,
        });
        let grads = loss.backward();
        let extra = split_gradients(split, &grads, &mut self.scratch);
        self.model = Some(self.adam.step_with(model, &grads, extra));
        Ok(())
    }

    /// Ends epoch `epoch`: its loss, a validation when one is due (and the best checkpoints),
    /// progress, and the resume state when one is due. True when `progress` asked to stop.
    fn end_epoch(
        &mut self,
        epoch: usize,
        device: &AB::Device,
        progress: &mut dyn FnMut(&TrainProgress) -> ControlFlow<()>,
    ) -> Result<bool, TrainError> {
        let (job, prep, cfg) = (self.job, self.job.prep, self.job.cfg);
        let zero_shot = prep.task.kind == TaskKind::ZeroShot;
        let train_loss = self
            .loss_sum
            .take()
            .map(|s| s.into_scalar().elem::<f64>() / self.epoch_len as f64)
            .unwrap_or(f64::NAN);
        self.curves.train_loss.push(train_loss);

        let mut evaluated = false;
        if epoch.is_multiple_of(cfg.validate_every) {
            let inner = self.model.as_ref().ok_or_else(lost_model)?.valid();
            let splits = evaluate(
                &inner,
                prep,
                &self.inputs,
                device,
                self.text_train.as_ref(),
                self.text_holdout.as_ref(),
                cfg.batch_size,
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
            if let Some(score) = pick(Split::Val.as_str(), &self.best) {
                let params = named_tensors(&inner);
                if let Some(dir) = job.work_dir {
                    save_file(dir, BEST_FILE, &ckpt_bytes(prep, params.clone(), epoch)?)?;
                }
                self.best_params = Some(params);
                self.best = Some(Best {
                    epoch,
                    score,
                    splits: splits.clone(),
                });
            }
            if zero_shot && let Some(score) = pick(Split::ValHoldout.as_str(), &self.best_holdout) {
                let params = named_tensors(&inner);
                if let Some(dir) = job.work_dir {
                    save_file(
                        dir,
                        BEST_HOLDOUT_FILE,
                        &ckpt_bytes(prep, params.clone(), epoch)?,
                    )?;
                }
                self.best_holdout_params = Some(params);
                self.best_holdout = Some(Best {
                    epoch,
                    score,
                    splits: splits.clone(),
                });
            }
            self.curves.evals.push(EvalPoint { epoch, splits });
            evaluated = true;
        }

        let flow = progress(&TrainProgress {
            epoch,
            epochs: cfg.epochs,
            train_loss,
            eval: if evaluated {
                self.curves.evals.last()
            } else {
                None
            },
            resumed_from: self.resumed_from,
        });
        let stop = flow.is_break();
        if let Some(dir) = job.work_dir
            && (stop || epoch.is_multiple_of(cfg.checkpoint_interval()) || epoch + 1 == cfg.epochs)
        {
            let mut tensors = named_tensors(self.model.as_ref().ok_or_else(lost_model)?);
            tensors.extend(self.adam.state_tensors(&self.names));
            let meta = ResumeMeta {
                format: RESUME_FORMAT,
                fingerprint: job.fingerprint.clone(),
                next_epoch: epoch + 1,
                adam_steps: self.adam.steps,
                rng_state: self.shuffle.state(),
                best: self.best.clone(),
                best_holdout: self.best_holdout.clone(),
                curves: self.curves.clone(),
            };
            let json = serde_json::to_string(&meta).map_err(CheckpointError::from)?;
            let bytes = serialize_named(&tensors, HashMap::from([(RESUME_KEY.to_string(), json)]))?;
            save_file(dir, STATE_FILE, &bytes)?;
        }
        Ok(stop)
    }

    /// The outcome: the best checkpoints (or the last model, without a val split), metrics
    /// and report.
    fn finish(self, device: &AB::Device) -> Result<TrainOutcome, TrainError> {
        let (job, prep, cfg) = (self.job, self.job.prep, self.job.cfg);
        let model = self.model.ok_or_else(lost_model)?;
        // Without a val split (or before any validation) the last model is kept.
        let (best_epoch, metrics, params) = match (self.best, self.best_params) {
            (Some(b), Some(p)) => (b.epoch, b.splits, p),
            _ => {
                let inner = model.valid();
                let splits = evaluate(
                    &inner,
                    prep,
                    &self.inputs,
                    device,
                    self.text_train.as_ref(),
                    self.text_holdout.as_ref(),
                    cfg.batch_size,
                )?;
                (cfg.epochs.saturating_sub(1), splits, named_tensors(&inner))
            }
        };
        let checkpoint = ckpt_bytes(prep, params, best_epoch)?;
        let (best_holdout_epoch, holdout_metrics, holdout_checkpoint) =
            match (self.best_holdout, self.best_holdout_params) {
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
                curves: self.curves,
                resumed_from: self.resumed_from,
                seconds: self.start.elapsed().as_secs_f64(),
            },
        })
    }
}

/// The error of a member whose model was lost to a failed step (a step that fails leaves
/// none): it is dropped from its gang, so this is never seen.
fn lost_model() -> TrainError {
    TrainError::Data(DataError::NotTrained(
        "the model was lost to an earlier failure",
    ))
}
