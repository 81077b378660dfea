//! Training and inference of the probe models: the loop, the optimiser, metrics, resume and
//! device selection. The public API hides the Burn backend: callers pass a [`DeviceSpec`].
//!
//! ```no_run
//! # use probex_probes::training::*;
//! # use probex_weights::dataset::LayerDataset;
//! # fn demo(ds: &LayerDataset) -> Result<(), TrainError> {
//! let cfg = TrainConfig { epochs: 100, threads: 2, ..TrainConfig::probex() };
//! let out = train(ds, None, &cfg, &DeviceSpec::Cpu, None, &mut |_p| std::ops::ControlFlow::Continue(()))?;
//! std::fs::write("best.safetensors", &out.checkpoint).unwrap();
//! println!("{}", serde_json::to_string_pretty(&out.report).unwrap());
//! # Ok(()) }
//! ```

pub mod config;
pub(crate) mod data;
pub mod device;
pub mod memory;
pub mod metrics;
pub mod optim;
mod trainer;

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;

use burn::backend::flex::FlexDevice;
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::TensorData;
use serde::{Deserialize, Serialize};

use crate::models::checkpoint::{
    Checkpoint, CheckpointError, LEGACY_INPUT_MEAN, STANDARDIZE_FILE, Standardization, TaskInfo,
    TaskKind,
};
use crate::models::{
    Dense, DenseZeroshot, ModelKind, ModelSpec, Net, Probex, ProbexZeroshot, StatNn, load_named,
};
use probex_weights::dataset::{LayerDataset, Split};
use probex_weights::embeddings::TextTable;

pub use config::{ConfigError, TrainConfig};
pub use data::DataError;
pub use device::{DeviceError, DeviceSpec};
pub use metrics::Metrics;
pub use trainer::{SplitForward, split_gradients, train_scores};

/// Why a training or an inference failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Bad hyperparameters.
    #[error("train config: {0}")]
    Config(#[from] ConfigError),
    /// The data cannot be used for this model (labels, splits, missing text vectors).
    #[error(transparent)]
    Data(#[from] DataError),
    /// The requested device cannot be used.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A checkpoint or resume file does not fit this training or model (what the file format
    /// itself allows; see [`TrainError::File`] for files that cannot be read).
    #[error(transparent)]
    Checkpoint(#[from] CheckpointMismatch),
    /// A checkpoint, standardisation or resume file could not be read or written.
    #[error(transparent)]
    File(#[from] CheckpointError),
    /// A resume file's optimiser state does not fit the model.
    #[error(transparent)]
    Optimiser(#[from] optim::OptimStateError),
    /// A checkpoint's tensors do not fit the model.
    #[error(transparent)]
    Load(#[from] crate::models::LoadError),
    /// The members of a gang cannot step together, or a failure their gang shares.
    #[error(transparent)]
    Gang(#[from] GangError),
    /// The progress callback asked to stop; the resume state (if a work dir was given) is
    /// saved at this epoch.
    #[error("training cancelled after epoch {epoch}")]
    Cancelled {
        /// Last completed epoch (0-based).
        epoch: usize,
    },
}

/// Why the members of a gang cannot train as one batched problem, or a failure of the gang
/// that every member reports. The gang key keeps members alike; these guard a direct caller
/// and a resume that left members apart.
#[derive(Debug, thiserror::Error)]
pub enum GangError {
    /// Some members read LoRA factors, others matrices.
    #[error("a gang mixes factors and matrices")]
    MixedInputs,
    /// Some members read standardised inputs, others raw ones.
    #[error("a gang mixes standardised and raw members")]
    MixedStandardization,
    /// No members.
    #[error("an empty gang")]
    Empty,
    /// Resumed members whose optimisers took different numbers of steps.
    #[error("the members of a gang resumed with different optimiser step counts")]
    StepCounts,
    /// A zero-shot member without its class texts.
    #[error("a zero-shot member has no text")]
    NoText,
    /// Members whose batches differ in size within one step.
    #[error("the members of a batched gang took batches of different sizes")]
    BatchSizes,
    /// The gang failed as a whole; each member reports the gang's error (which is not `Clone`)
    /// by its message.
    #[error("{0}")]
    Shared(String),
}

/// A readable checkpoint (or resume state) that does not fit the model or data it is used
/// with. Paths are the checkpoint's and the standardisation file's beside it.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointMismatch {
    /// The layout of probex before train version 3.
    #[error(
        "{}: holds `{LEGACY_INPUT_MEAN}`, the layout of probex before train version 3 (the mean \
         now lives beside the checkpoint in {STANDARDIZE_FILE}); run its experiment again to \
         retrain it",
        .0.display()
    )]
    Legacy(std::path::PathBuf),
    /// The model spec cannot be read off the checkpoint.
    #[error("{}: {source}", path.display())]
    Spec {
        /// The checkpoint.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: CheckpointError,
    },
    /// A standardisation of another training.
    #[error(
        "{} has scale {side_scale} but the checkpoint {} was trained with {scale}: it belongs \
         to another training; copy the checkpoint and its {STANDARDIZE_FILE} together",
        side.display(),
        path.display()
    )]
    ScaleMismatch {
        /// The standardisation file.
        side: std::path::PathBuf,
        /// Its scale.
        side_scale: f32,
        /// The checkpoint.
        path: std::path::PathBuf,
        /// The scale it was trained with.
        scale: f32,
    },
    /// A standardised checkpoint without its standardisation.
    #[error(
        "{} was trained on standardised inputs (standardize = true) but {} is missing beside \
         it: it holds the training mean and scale the probe subtracts and divides by; copy it \
         along with the checkpoint",
        path.display(),
        side.display()
    )]
    MissingStandardization {
        /// The checkpoint.
        path: std::path::PathBuf,
        /// The standardisation file it needs.
        side: std::path::PathBuf,
    },
    /// A raw-input checkpoint with a standardisation beside it.
    #[error(
        "{} says it was trained on raw inputs, yet {} lies beside it: remove that file or put \
         the checkpoint it belongs to here",
        path.display(),
        side.display()
    )]
    StrayStandardization {
        /// The checkpoint.
        path: std::path::PathBuf,
        /// The standardisation file.
        side: std::path::PathBuf,
    },
    /// A standardisation mean of another shape than the layer.
    #[error(
        "{}: the mean is {mean:?}, the layer `{layer}` is {layer_shape:?}",
        side.display()
    )]
    MeanShape {
        /// The standardisation file.
        side: std::path::PathBuf,
        /// Its mean's shape.
        mean: [usize; 2],
        /// The layer.
        layer: String,
        /// The layer's shape.
        layer_shape: [usize; 2],
    },
    /// A StatNN checkpoint without its feature standardisation.
    #[error("StatNN checkpoint lacks its feature standardisation (metadata `feature_mean`)")]
    StatnnFeatures,
    /// A resume state whose parameters do not fit the model.
    #[error("{}: {source}", path.display())]
    Resume {
        /// The resume file.
        path: std::path::PathBuf,
        /// What does not fit.
        #[source]
        source: crate::models::LoadError,
    },
}

/// Metrics of one evaluation, per split name (`train`, `val`, `test`, `val_holdout`, ...).
pub type SplitMetrics = BTreeMap<String, Metrics>;

/// One evaluation during training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalPoint {
    /// Epoch (0-based) after which the evaluation ran.
    pub epoch: usize,
    /// Metrics of every split present.
    pub splits: SplitMetrics,
}

/// Loss and metric curves.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Curves {
    /// Mean training loss of each epoch.
    pub train_loss: Vec<f64>,
    /// Every evaluation, in order.
    pub evals: Vec<EvalPoint>,
}

/// Reported after every epoch.
#[derive(Clone, Debug)]
pub struct TrainProgress<'a> {
    /// Epoch just finished (0-based).
    pub epoch: usize,
    /// Total epochs.
    pub epochs: usize,
    /// Its mean training loss.
    pub train_loss: f64,
    /// The evaluation that followed it, if this was a validation epoch.
    pub eval: Option<&'a EvalPoint>,
    /// Epoch at which this run resumed (`None`: started from scratch).
    pub resumed_from: Option<usize>,
}

/// What a training reports (serialisable to `results.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// The hyperparameters, defaults filled in.
    pub config: TrainConfig,
    /// What the outputs mean.
    pub task: TaskKind,
    /// Device the training ran on.
    pub device: String,
    /// Number of trainable parameters.
    pub params: usize,
    /// The `val` metric that chose the checkpoint (`accuracy`, `top1` or `r2`).
    pub selection_metric: String,
    /// Epoch (0-based) of the kept checkpoint.
    pub best_epoch: usize,
    /// Metrics of the kept checkpoint on every split.
    pub metrics: SplitMetrics,
    /// Zero-shot: epoch of the best `val_holdout` checkpoint.
    pub best_holdout_epoch: Option<usize>,
    /// Zero-shot: metrics of that checkpoint on every split.
    pub holdout_metrics: Option<SplitMetrics>,
    /// Loss and metric curves.
    pub curves: Curves,
    /// Epoch at which this run resumed from a work dir (`None`: from scratch).
    pub resumed_from: Option<usize>,
    /// Wall-clock seconds of this run.
    pub seconds: f64,
}

/// The result of a training.
#[derive(Clone, Debug)]
pub struct TrainOutcome {
    /// The best-validation checkpoint (safetensors bytes, official names).
    pub checkpoint: Vec<u8>,
    /// Zero-shot: the best-`val_holdout` checkpoint.
    pub holdout_checkpoint: Option<Vec<u8>>,
    /// `standardize = true`: the inputs' [`Standardization`] (safetensors bytes), which both
    /// checkpoints need beside them as [`STANDARDIZE_FILE`].
    pub standardize: Option<Vec<u8>>,
    /// Metrics and curves.
    pub report: TrainReport,
}

/// Which implementation runs a training's steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum StepPath {
    /// The fastest for the device: on the CPU, ProbeX's encoder on the host kernels and a
    /// gang's members stepped one by one (each exactly its solo run); on any other device,
    /// Burn's tensor operations and a ProbeX gang stepped as one batched problem.
    #[default]
    Auto,
    /// Burn's tensor operations on every device (what CUDA runs), a ProbeX gang stepped as one
    /// batched problem: the device path, runnable on the CPU for tests and benchmarks.
    Tensors,
}

/// Trains one probe on one layer dataset.
///
/// Model selection follows the official loop: validate after epoch `e` when
/// `e % validate_every == 0`, keep the best `val` score (strictly greater; zero-shot: greater or
/// equal, and separately the best `val_holdout`); without a `val` split the last epoch is kept.
/// With `work_dir`, the model, optimiser, epoch and random state are saved there every
/// `checkpoint_every` epochs (default: at each validation), on cancellation and at the end,
/// and a later call with the same data and config resumes from
/// them. `progress` is called after every epoch; returning `Break` stops the training
/// ([`TrainError::Cancelled`]). Reproducible for a given seed and thread count.
pub fn train(
    ds: &LayerDataset,
    text: Option<&TextTable>,
    cfg: &TrainConfig,
    device: &DeviceSpec,
    work_dir: Option<&Path>,
    progress: &mut (dyn FnMut(&TrainProgress) -> ControlFlow<()> + Send),
) -> Result<TrainOutcome, TrainError> {
    train_on(ds, text, cfg, device, StepPath::Auto, work_dir, progress)
}

/// [`train`] on the implementation `path` (the result agrees with [`train`]'s within float
/// tolerance: the paths order their float additions differently).
pub fn train_on(
    ds: &LayerDataset,
    text: Option<&TextTable>,
    cfg: &TrainConfig,
    device: &DeviceSpec,
    path: StepPath,
    work_dir: Option<&Path>,
    progress: &mut (dyn FnMut(&TrainProgress) -> ControlFlow<()> + Send),
) -> Result<TrainOutcome, TrainError> {
    cfg.validate().map_err(TrainError::Config)?;
    device.check().map_err(TrainError::Device)?;
    let prep = data::prepare(ds, text, cfg).map_err(TrainError::Data)?;
    let fingerprint = trainer::fingerprint(ds, text, cfg);
    let job = trainer::Job {
        prep: &prep,
        cfg,
        device_name: device.to_string(),
        work_dir,
        fingerprint,
        path,
    };
    device::with_threads(cfg.threads, move || match device {
        DeviceSpec::Cpu => train_kind::<Autodiff<Flex>>(&job, &FlexDevice, progress),
        DeviceSpec::Cuda(_i) => {
            #[cfg(feature = "cuda")]
            {
                let dev = burn::backend::cuda::CudaDevice::new(*_i);
                train_kind::<Autodiff<burn::backend::Cuda>>(&job, &dev, progress)
            }
            #[cfg(not(feature = "cuda"))]
            Err(TrainError::Device(DeviceError::NoCudaBuild(*_i)))
        }
    })
    .map_err(TrainError::Device)?
}

fn train_kind<AB: burn::tensor::backend::AutodiffBackend>(
    job: &trainer::Job,
    device: &AB::Device,
    progress: &mut dyn FnMut(&TrainProgress) -> ControlFlow<()>,
) -> Result<TrainOutcome, TrainError> {
    match job.cfg.model {
        ModelKind::Probex => trainer::run::<AB, Probex<AB>>(job, device, progress),
        ModelKind::ProbexZeroshot => trainer::run::<AB, ProbexZeroshot<AB>>(job, device, progress),
        ModelKind::Dense => trainer::run::<AB, Dense<AB>>(job, device, progress),
        ModelKind::DenseZeroshot => trainer::run::<AB, DenseZeroshot<AB>>(job, device, progress),
        ModelKind::Statnn => trainer::run::<AB, StatNn<AB>>(job, device, progress),
    }
}

/// One member of a gang trained by [`train_gang`]: a layer, its text table, its config and
/// its own work dir.
pub struct GangMember<'a> {
    /// The member's layer dataset.
    pub ds: &'a LayerDataset,
    /// Zero-shot models: the class text table.
    pub text: Option<&'a TextTable>,
    /// Its hyperparameters.
    pub cfg: &'a TrainConfig,
    /// Where its resume state and best-so-far checkpoints live.
    pub work_dir: Option<&'a Path>,
}

/// Trains the members of a gang together (the layers of one shape in a sweep): one result per
/// member, in order, each what [`train`] gives for that member alone (same initial values and
/// batch order for one `seed`). On the CPU the host path steps every member with the same
/// kernels its solo run uses (the same bits); on other devices a ProbeX gang steps as one
/// batched problem (see [`train_gang_on`]). Each member keeps its own resume state in its own
/// work dir, so a killed gang resumes member by member. `progress` hears the member's index
/// with each epoch. Members whose configs differ (other than `threads`) cannot step in
/// lockstep: they are trained one after another.
pub fn train_gang(
    members: &[GangMember],
    device: &DeviceSpec,
    progress: &mut (dyn FnMut(usize, &TrainProgress) -> ControlFlow<()> + Send),
) -> Vec<Result<TrainOutcome, TrainError>> {
    train_gang_on(members, device, StepPath::Auto, progress)
}

/// [`train_gang`] on the implementation `path`. On the tensor path (`Tensors`, or `Auto` on a
/// GPU) the members of a ProbeX gang (discriminative or zero-shot, on matrices or LoRA
/// factors) train as one batched problem: stacked inputs `[G, B, d_H, d_W]` and parameters `[G, ...]`, batched products, one
/// loss that is the sum of the members' and an element-wise Adam step, so each member gets
/// what [`train_on`] on the same path gives it alone, within float tolerance (the GEMMs may
/// order their additions differently). Dense and StatNN gangs step member by member.
pub fn train_gang_on(
    members: &[GangMember],
    device: &DeviceSpec,
    path: StepPath,
    progress: &mut (dyn FnMut(usize, &TrainProgress) -> ControlFlow<()> + Send),
) -> Vec<Result<TrainOutcome, TrainError>> {
    let same = |a: &TrainConfig, b: &TrainConfig| {
        let strip = |c: &TrainConfig| TrainConfig {
            threads: 0,
            ..c.clone()
        };
        serde_json::to_value(strip(a)).ok() == serde_json::to_value(strip(b)).ok()
    };
    let Some(first) = members.first() else {
        return Vec::new();
    };
    if members.iter().any(|m| !same(m.cfg, first.cfg)) {
        return members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                train_on(m.ds, m.text, m.cfg, device, path, m.work_dir, &mut |p| {
                    progress(i, p)
                })
            })
            .collect();
    }
    let fail_all = |e: &dyn Fn() -> TrainError| -> Vec<Result<TrainOutcome, TrainError>> {
        members.iter().map(|_| Err(e())).collect()
    };
    if let Err(e) = first.cfg.validate() {
        return fail_all(&|| TrainError::Config(e.clone()));
    }
    if let Err(e) = device.check() {
        return fail_all(&|| TrainError::Device(e.clone()));
    }
    // Members whose data cannot be prepared fail alone; the others train.
    let mut results: Vec<Option<Result<TrainOutcome, TrainError>>> =
        members.iter().map(|_| None).collect();
    let mut preps = Vec::new();
    for (i, m) in members.iter().enumerate() {
        match data::prepare(m.ds, m.text, m.cfg) {
            Ok(p) => preps.push((i, p)),
            Err(e) => results[i] = Some(Err(TrainError::Data(e))),
        }
    }
    let jobs: Vec<trainer::Job> = preps
        .iter()
        .map(|(i, prep)| {
            let m = &members[*i];
            trainer::Job {
                prep,
                cfg: m.cfg,
                device_name: device.to_string(),
                work_dir: m.work_dir,
                fingerprint: trainer::fingerprint(m.ds, m.text, m.cfg),
                path,
            }
        })
        .collect();
    let index: Vec<usize> = preps.iter().map(|(i, _)| *i).collect();
    let mut inner = |j: usize, p: &TrainProgress| progress(index[j], p);
    let trained = device::with_threads(first.cfg.threads, || match device {
        DeviceSpec::Cpu => train_gang_kind::<Autodiff<Flex>>(&jobs, &FlexDevice, &mut inner),
        DeviceSpec::Cuda(_i) => {
            #[cfg(feature = "cuda")]
            {
                let dev = burn::backend::cuda::CudaDevice::new(*_i);
                train_gang_kind::<Autodiff<burn::backend::Cuda>>(&jobs, &dev, &mut inner)
            }
            #[cfg(not(feature = "cuda"))]
            jobs.iter()
                .map(|_| Err(TrainError::Device(DeviceError::NoCudaBuild(*_i))))
                .collect()
        }
    });
    match trained {
        Ok(outcomes) => {
            for (i, r) in index.into_iter().zip(outcomes) {
                results[i] = Some(r);
            }
        }
        Err(e) => {
            for i in index {
                results[i] = Some(Err(TrainError::Device(e.clone())));
            }
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or(Err(TrainError::Data(DataError::NotTrained("not trained")))))
        .collect()
}

fn train_gang_kind<AB: burn::tensor::backend::AutodiffBackend>(
    jobs: &[trainer::Job],
    device: &AB::Device,
    progress: &mut dyn FnMut(usize, &TrainProgress) -> ControlFlow<()>,
) -> Vec<Result<TrainOutcome, TrainError>> {
    let Some(first) = jobs.first() else {
        return Vec::new();
    };
    match first.cfg.model {
        ModelKind::Probex if trainer::batchable::<AB>(jobs) => {
            trainer::run_gang_batched::<AB, Probex<AB>>(jobs, device, progress)
        }
        ModelKind::ProbexZeroshot if trainer::batchable::<AB>(jobs) => {
            trainer::run_gang_batched::<AB, ProbexZeroshot<AB>>(jobs, device, progress)
        }
        ModelKind::Probex => trainer::run_gang::<AB, Probex<AB>>(jobs, device, progress),
        ModelKind::ProbexZeroshot => {
            trainer::run_gang::<AB, ProbexZeroshot<AB>>(jobs, device, progress)
        }
        ModelKind::Dense => trainer::run_gang::<AB, Dense<AB>>(jobs, device, progress),
        ModelKind::DenseZeroshot => {
            trainer::run_gang::<AB, DenseZeroshot<AB>>(jobs, device, progress)
        }
        ModelKind::Statnn => trainer::run_gang::<AB, StatNn<AB>>(jobs, device, progress),
    }
}

/// Encodings `[N, dim]` of every model of `ds` (row order) under a checkpoint: ProbeX's `e`
/// (`dim = r_T`), StatNN's hidden layer, Dense's logits. For kNN, retrieval, one-class scores.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Encodings {
    /// Width of one encoding.
    pub dim: usize,
    /// Row-major `[N, dim]`.
    pub values: Vec<f32>,
}

/// Scores of every model of `ds` (row order) under a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Predictions {
    /// What the scores mean.
    pub task: TaskKind,
    /// Column names: classes (zero-shot: every class of the dataset's labels), or the label
    /// key for regression.
    pub columns: Vec<String>,
    /// Row-major `[N, columns.len()]`: logits (multi-label, class), cosines (zero-shot),
    /// predictions on the original scale (regression).
    pub scores: Vec<f32>,
}

/// Computes the encodings of `ds` under `checkpoint` (a probex checkpoint, or a plain ProbeX
/// state dict written by PyTorch). A probe trained on standardised inputs needs its
/// [`STANDARDIZE_FILE`] in the same directory.
pub fn encode(
    checkpoint: &Path,
    ds: &LayerDataset,
    device: &DeviceSpec,
) -> Result<Encodings, TrainError> {
    let opened = open_checkpoint(checkpoint, ds)?;
    let (values, dim) = infer(&opened, ds, device, Mode::Encode, None)?;
    Ok(Encodings { dim, values })
}

/// Computes the scores of `ds` under `checkpoint`. Zero-shot checkpoints need `text` and score
/// every class of the dataset's labels; a probe trained on standardised inputs needs its
/// [`STANDARDIZE_FILE`] in the same directory.
pub fn predict(
    checkpoint: &Path,
    ds: &LayerDataset,
    text: Option<&TextTable>,
    device: &DeviceSpec,
) -> Result<Predictions, TrainError> {
    let opened = open_checkpoint(checkpoint, ds)?;
    let (spec, task) = (&opened.spec, &opened.task);
    let (columns, text_m) = match task.kind {
        TaskKind::ZeroShot => {
            let Some(table) = text else {
                return Err(TrainError::Data(DataError::CheckpointNeedsText(
                    checkpoint.to_path_buf(),
                )));
            };
            let probex_weights::dataset::Labels::Class { classes, .. } = &ds.labels else {
                return Err(TrainError::Data(DataError::PredictNeedsClasses));
            };
            let all: Vec<usize> = (0..classes.len()).collect();
            let m = data::text_matrix(table, classes, &all).map_err(TrainError::Data)?;
            if m.dim != spec.d_text {
                return Err(TrainError::Data(DataError::TextDim {
                    found: m.dim,
                    expected: spec.d_text,
                }));
            }
            (classes.iter().map(|c| c.name.clone()).collect(), Some(m))
        }
        TaskKind::Regression => (vec![ds.label_key.clone()], None),
        _ => (task.classes.clone(), None),
    };
    let (mut scores, _) = infer(&opened, ds, device, Mode::Scores, text_m.as_ref())?;
    if task.kind == TaskKind::Regression {
        for s in &mut scores {
            *s = task.target_mean + task.target_std * *s;
        }
    }
    Ok(Predictions {
        task: task.kind,
        columns,
        scores,
    })
}

/// A checkpoint read for inference.
struct Opened {
    ckpt: Checkpoint,
    spec: ModelSpec,
    task: TaskInfo,
    /// Standardised inputs: the standardisation read from beside the checkpoint.
    std: Option<Standardization>,
}

fn open_checkpoint(path: &Path, ds: &LayerDataset) -> Result<Opened, TrainError> {
    let ckpt = Checkpoint::read(path)?;
    if ckpt.tensors.iter().any(|t| t.name == LEGACY_INPUT_MEAN) {
        return Err(CheckpointMismatch::Legacy(path.to_path_buf()).into());
    }
    let spec = ckpt.spec().map_err(|source| CheckpointMismatch::Spec {
        path: path.to_path_buf(),
        source,
    })?;
    if spec.d_h != ds.d_h || spec.d_w != ds.d_w {
        return Err(TrainError::Data(DataError::MatrixShape {
            checkpoint: path.to_path_buf(),
            checkpoint_shape: [spec.d_h, spec.d_w],
            layer: ds.layer.name.clone(),
            layer_shape: [ds.d_h, ds.d_w],
        }));
    }
    let task = match &ckpt.meta {
        Some(m) => m.task.clone(),
        None => {
            // A plain state dict: the task comes from the data it is applied to.
            let kind = match (&spec.kind, &ds.labels) {
                (k, _) if k.is_zero_shot() => TaskKind::ZeroShot,
                (_, probex_weights::dataset::Labels::MultiLabel { .. }) => TaskKind::MultiLabel,
                (_, probex_weights::dataset::Labels::Class { .. }) => TaskKind::Class,
                (_, probex_weights::dataset::Labels::Numeric { .. }) => TaskKind::Regression,
            };
            let classes = match &ds.labels {
                probex_weights::dataset::Labels::MultiLabel { classes, .. } => classes.clone(),
                probex_weights::dataset::Labels::Class { classes, .. } => {
                    classes.iter().map(|c| c.name.clone()).collect()
                }
                probex_weights::dataset::Labels::Numeric { .. } => Vec::new(),
            };
            let classes = if classes.len() == spec.d_y {
                classes
            } else {
                (0..spec.d_y).map(|i| format!("output_{i}")).collect()
            };
            TaskInfo {
                kind,
                classes,
                target_mean: 0.0,
                target_std: 1.0,
                feature_mean: Vec::new(),
                feature_std: Vec::new(),
                input_scale: None,
            }
        }
    };
    let std = standardization(path, &task, ckpt.meta.is_some(), ds)?;
    Ok(Opened {
        ckpt,
        spec,
        task,
        std,
    })
}

/// The standardisation a checkpoint needs, read from beside it: required when its metadata
/// says it was trained on standardised inputs (and then of the same training: same scale),
/// refused when the metadata says it was not, and applied to a plain PyTorch state dict when
/// present.
fn standardization(
    path: &Path,
    task: &TaskInfo,
    with_meta: bool,
    ds: &LayerDataset,
) -> Result<Option<Standardization>, TrainError> {
    let side = Standardization::beside(path);
    let std = if side.is_file() {
        Some(Standardization::read(&side)?)
    } else {
        None
    };
    let std = match (task.input_scale, std) {
        (Some(scale), Some(s)) if s.scale.to_bits() != scale.to_bits() => {
            return Err(CheckpointMismatch::ScaleMismatch {
                side,
                side_scale: s.scale,
                path: path.to_path_buf(),
                scale,
            }
            .into());
        }
        (Some(_), None) => {
            return Err(CheckpointMismatch::MissingStandardization {
                path: path.to_path_buf(),
                side,
            }
            .into());
        }
        (None, Some(_)) if with_meta => {
            return Err(CheckpointMismatch::StrayStandardization {
                path: path.to_path_buf(),
                side,
            }
            .into());
        }
        (_, s) => s,
    };
    if let Some(s) = &std
        && (s.d_h, s.d_w) != (ds.d_h, ds.d_w)
    {
        return Err(CheckpointMismatch::MeanShape {
            side,
            mean: [s.d_h, s.d_w],
            layer: ds.layer.name.clone(),
            layer_shape: [ds.d_h, ds.d_w],
        }
        .into());
    }
    Ok(std)
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Encode,
    Scores,
}

fn infer(
    opened: &Opened,
    ds: &LayerDataset,
    device: &DeviceSpec,
    mode: Mode,
    text: Option<&data::TextMatrix>,
) -> Result<(Vec<f32>, usize), TrainError> {
    device.check().map_err(TrainError::Device)?;
    match device {
        DeviceSpec::Cpu => infer_on::<Flex>(opened, ds, &FlexDevice, mode, text),
        DeviceSpec::Cuda(_i) => {
            #[cfg(feature = "cuda")]
            {
                let dev = burn::backend::cuda::CudaDevice::new(*_i);
                infer_on::<burn::backend::Cuda>(opened, ds, &dev, mode, text)
            }
            #[cfg(not(feature = "cuda"))]
            Err(TrainError::Device(DeviceError::NoCudaBuild(*_i)))
        }
    }
}

fn infer_on<B: Backend>(
    opened: &Opened,
    ds: &LayerDataset,
    device: &B::Device,
    mode: Mode,
    text: Option<&data::TextMatrix>,
) -> Result<(Vec<f32>, usize), TrainError> {
    match opened.spec.kind {
        ModelKind::Probex => infer_net::<B, Probex<B>>(opened, ds, device, mode, text),
        ModelKind::ProbexZeroshot => {
            infer_net::<B, ProbexZeroshot<B>>(opened, ds, device, mode, text)
        }
        ModelKind::Dense => infer_net::<B, Dense<B>>(opened, ds, device, mode, text),
        ModelKind::DenseZeroshot => {
            infer_net::<B, DenseZeroshot<B>>(opened, ds, device, mode, text)
        }
        ModelKind::Statnn => infer_net::<B, StatNn<B>>(opened, ds, device, mode, text),
    }
}

fn infer_net<B: Backend, M: Net<B>>(
    opened: &Opened,
    ds: &LayerDataset,
    device: &B::Device,
    mode: Mode,
    text: Option<&data::TextMatrix>,
) -> Result<(Vec<f32>, usize), TrainError> {
    let spec = &opened.spec;
    let model = load_net::<B, M>(&opened.ckpt, spec, device)?;
    if spec.kind == ModelKind::Statnn
        && opened.task.feature_mean.len() != crate::models::statnn::FEATURES.len()
    {
        return Err(CheckpointMismatch::StatnnFeatures.into());
    }
    let mut task = opened.task.clone();
    // A plain state dict with a standardisation beside it has no scale in its metadata.
    task.input_scale = opened.std.as_ref().map(|s| s.scale);
    let rows = BTreeMap::from([(Split::Train, (0..ds.n).collect::<Vec<_>>())]);
    let input_mean = opened.std.as_ref().map(|s| s.mean.as_slice());
    let host = data::model_inputs(ds, spec.kind, &rows, &mut task, input_mean)
        .map_err(TrainError::Data)?;
    let x = data::DeviceInputs::<B>::new(&host, device).map_err(TrainError::Data)?;
    let t = text.map(|m| {
        Tensor::<B, 2>::from_data(TensorData::new(m.values.clone(), [m.rows, m.dim]), device)
    });
    let all: Vec<usize> = (0..ds.n).collect();
    trainer::forward_rows(
        &model,
        &x,
        device,
        &all,
        t.as_ref(),
        128,
        mode == Mode::Encode,
    )
}

/// Builds a model of kind `M` holding the checkpoint's parameters.
pub(crate) fn load_net<B: Backend, M: Net<B>>(
    ckpt: &Checkpoint,
    spec: &ModelSpec,
    device: &B::Device,
) -> Result<M, TrainError> {
    let mut rng = probex_weights::rng::Rng::new(0, 0);
    let model = M::init(spec, &mut rng, device);
    Ok(load_named(model, &ckpt.by_name(), device)?)
}
