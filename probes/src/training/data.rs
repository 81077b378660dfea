//! Turns a layer dataset (and a text table) into what a training needs: the model inputs, the
//! targets, the rows of each split, and the task description stored in checkpoints.

use std::collections::BTreeMap;

use burn::prelude::*;
use burn::tensor::TensorData;

use crate::models::checkpoint::{TaskInfo, TaskKind};
use crate::models::{Batch, ModelKind, ModelSpec, Standardize, statnn};
use probex_weights::dataset::{Labels, LayerDataset, Matrices, Split};
use probex_weights::embeddings::TextTable;
use probex_weights::gemm::add_product;

use super::TrainConfig;

/// Why a layer dataset (with its text table) cannot be used for a model: the inputs, labels
/// or class texts do not fit it, or a row cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A row of the dataset cannot be read.
    #[error(transparent)]
    Rows(#[from] probex_weights::dataset::DatasetError),
    /// The dataset's parts disagree.
    #[error("layer dataset: {0}")]
    Dataset(#[source] probex_weights::dataset::Inconsistent),
    /// The text table's names and vectors disagree.
    #[error("text table: {0}")]
    Table(#[source] probex_weights::embeddings::TableError),
    /// Classes without a text vector.
    #[error(
        "the text table has no vector for {} class(es) (looked up by name, then id): {:?}{}; \
         re-run the embed stage on these labels",
        missing.len(),
        missing.iter().take(10).collect::<Vec<_>>(),
        if missing.len() > 10 { " ..." } else { "" }
    )]
    MissingText {
        /// The classes, by name.
        missing: Vec<String>,
    },
    /// No model in the train split.
    #[error("layer `{0}` has no model in the train split; nothing to train on")]
    NoTrainModel(String),
    /// A layer whose matrices are empty.
    #[error("layer `{0}` has an empty matrix shape")]
    EmptyShape(String),
    /// Class labels with no classes.
    #[error("labels from key `{0}` have no classes")]
    NoClasses(String),
    /// A zero-shot model on labels that are not single-class.
    #[error("model `{model}` needs single-class labels, but key `{key}` gives {kind} labels")]
    NeedsClassLabels {
        /// The model kind.
        model: ModelKind,
        /// The label key.
        key: String,
        /// The kind of labels it gives.
        kind: &'static str,
    },
    /// A zero-shot model without a text table.
    #[error(
        "model `{0}` needs a text table (class-name embeddings); add the embed stage's output \
         to `from`"
    )]
    NeedsTextTable(ModelKind),
    /// A held-in model whose class no training model has.
    #[error(
        "model `{model}` ({split} split) has class `{class}`, which no training model has; \
         zero-shot classes must be in val_holdout/test_holdout"
    )]
    UnseenClass {
        /// The model's id.
        model: String,
        /// Its split.
        split: Split,
        /// The class's name.
        class: String,
    },
    /// A regression target that is NaN or infinite.
    #[error("model `{model}` has a non-finite target {value}")]
    NonFiniteTarget {
        /// The model's id.
        model: String,
        /// The target.
        value: f32,
    },
    /// Scoring with a zero-shot checkpoint without a text table.
    #[error("{}: a zero-shot checkpoint needs a text table to score classes", .0.display())]
    CheckpointNeedsText(std::path::PathBuf),
    /// Zero-shot prediction on labels that are not single-class.
    #[error("zero-shot prediction needs single-class labels (for the candidate classes)")]
    PredictNeedsClasses,
    /// Text vectors of another width than the checkpoint's.
    #[error("text vectors have dimension {found}, the checkpoint expects {expected}")]
    TextDim {
        /// The table's width.
        found: usize,
        /// The checkpoint's.
        expected: usize,
    },
    /// A checkpoint for matrices of another shape than the layer's.
    #[error(
        "{}: the checkpoint reads {checkpoint_shape:?} matrices, layer `{layer}` is \
         {layer_shape:?}",
        checkpoint.display()
    )]
    MatrixShape {
        /// The checkpoint file.
        checkpoint: std::path::PathBuf,
        /// The shape it reads.
        checkpoint_shape: [usize; 2],
        /// The layer.
        layer: String,
        /// The layer's shape.
        layer_shape: [usize; 2],
    },
    /// A training that produced no model (an earlier failure took it).
    #[error("{0}")]
    NotTrained(&'static str),
}

/// Targets kept on the host for metrics.
#[derive(Clone, Debug)]
pub(crate) enum HostTargets {
    /// Multi-hot rows `[n, w]`.
    MultiLabel(Vec<f32>, usize),
    /// Class index per row, relative to the row's candidate set.
    Class(Vec<u32>),
    /// Original-scale targets.
    Numeric(Vec<f32>),
}

/// What a model reads of every row, on the host, ready to go to a device.
pub(crate) enum HostInputs<'a> {
    /// StatNN's standardised statistics `[n, 1, F]`.
    Stacked { values: Vec<f32>, dims: [usize; 3] },
    /// The layer's matrices, read from the dataset (in memory or on disk) a batch of rows at
    /// a time and standardised then, so no second copy of the layer is ever made.
    Rows {
        ds: &'a LayerDataset,
        standardize: Option<(Vec<f32>, f32)>,
    },
    /// A LoRA layer's factors as the dataset holds them; the standardisation (mean matrix,
    /// scale) is applied on the device, after the product.
    Factored {
        up: &'a [f32],
        down: &'a [f32],
        /// `[n, d_h, d_w]`.
        dims: [usize; 3],
        rank: usize,
        standardize: Option<(Vec<f32>, f32)>,
    },
}

impl HostInputs<'_> {
    /// Number of rows (models).
    pub fn rows(&self) -> usize {
        match self {
            HostInputs::Stacked { dims, .. } | HostInputs::Factored { dims, .. } => dims[0],
            HostInputs::Rows { ds, .. } => ds.n,
        }
    }

    /// Whether [`HostInputs::upload`] can hold every row on a device at once: all but a
    /// layer the dataset itself keeps on disk.
    pub fn fits(&self) -> bool {
        !matches!(self, HostInputs::Rows { ds, .. } if matches!(ds.weights, Matrices::OnDisk(_)))
    }

    /// The inputs as a batch of every row on `device`.
    pub fn upload<B: Backend>(&self, device: &B::Device) -> Result<Batch<B>, DataError> {
        match self {
            HostInputs::Stacked { values, dims } => Ok(Batch::Stacked(Tensor::from_data(
                TensorData::new(values.clone(), *dims),
                device,
            ))),
            HostInputs::Rows { ds, standardize } => read_batch(
                ds,
                standardize.as_ref(),
                &(0..ds.n).collect::<Vec<_>>(),
                device,
            ),
            HostInputs::Factored {
                up,
                down,
                dims: [n, d_h, d_w],
                rank,
                standardize,
            } => Ok(Batch::Factored {
                up_t: Tensor::from_data(
                    TensorData::new(transposed_factors(up, *d_h, *rank), [*n, *rank, *d_h]),
                    device,
                ),
                down: Tensor::from_data(TensorData::new(down.to_vec(), [*n, *rank, *d_w]), device),
                standardize: standardize.as_ref().map(|(mean, scale)| Standardize {
                    mean: Tensor::from_data(TensorData::new(mean.clone(), [*d_h, *d_w]), device),
                    scale: *scale,
                }),
            }),
        }
    }
}

/// Rows `rows` of a dataset's matrices as a batch on `device`, standardised as asked.
fn read_batch<B: Backend>(
    ds: &LayerDataset,
    standardize: Option<&(Vec<f32>, f32)>,
    rows: &[usize],
    device: &B::Device,
) -> Result<Batch<B>, DataError> {
    let mut x = Vec::new();
    ds.read_rows(rows, &mut x)?;
    if let Some((mean, scale)) = standardize {
        for row in x.chunks_exact_mut(mean.len().max(1)) {
            for (v, m) in row.iter_mut().zip(mean) {
                *v = (*v - m) / scale;
            }
        }
    }
    Ok(Batch::Stacked(Tensor::from_data(
        TensorData::new(x, [rows.len(), ds.d_h, ds.d_w]),
        device,
    )))
}

/// The model inputs as a device sees them: every row held there at once (a selection per
/// batch), or a layer's matrices read from the dataset a batch at a time. The CPU backend
/// always reads per batch (its "device" is this memory: holding the layer twice gains
/// nothing), other backends when the dataset keeps the layer on disk.
pub(crate) enum DeviceInputs<'h, B: Backend> {
    /// Every row, on the device.
    Resident(Batch<B>),
    /// A layer's matrices, read per batch from the dataset and standardised as asked.
    PerBatch {
        ds: &'h LayerDataset,
        standardize: Option<&'h (Vec<f32>, f32)>,
    },
}

impl<'h, B: Backend> DeviceInputs<'h, B> {
    /// Places `host` on `device` (see the type's docs for which way).
    pub fn new(host: &'h HostInputs<'h>, device: &B::Device) -> Result<Self, DataError> {
        let cpu = crate::cpu_buffers::Host::<B>::of().is_some();
        match host {
            HostInputs::Rows { ds, standardize } if cpu || !host.fits() => {
                Ok(DeviceInputs::PerBatch {
                    ds,
                    standardize: standardize.as_ref(),
                })
            }
            _ => host.upload(device).map(DeviceInputs::Resident),
        }
    }

    /// Rows `rows` as a batch on `device`.
    pub fn batch(&self, rows: &[usize], device: &B::Device) -> Result<Batch<B>, DataError> {
        match self {
            DeviceInputs::Resident(all) => {
                let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
                Ok(all.select(Tensor::from_data(
                    TensorData::new(idx, [rows.len()]),
                    device,
                )))
            }
            DeviceInputs::PerBatch { ds, standardize } => {
                read_batch(ds, *standardize, rows, device)
            }
        }
    }
}

/// The up factors `[n, d_h, r]` (each model's `B`, as the dataset holds them) as `[n, r, d_h]`
/// (each model's `B^T`): the layout the factored encoder multiplies in place, made once per
/// training instead of once per batch.
fn transposed_factors(up: &[f32], d_h: usize, r: usize) -> Vec<f32> {
    let mut out = vec![0f32; up.len()];
    for (b, t) in up.chunks_exact(d_h * r).zip(out.chunks_exact_mut(d_h * r)) {
        probex_nn::transpose_into(b, d_h, r, t);
    }
    out
}

/// A text matrix `[rows, dim]`.
#[derive(Clone, Debug)]
pub(crate) struct TextMatrix {
    pub values: Vec<f32>,
    pub rows: usize,
    pub dim: usize,
}

/// Everything a training loop needs, independent of the backend.
pub(crate) struct Prepared<'a> {
    pub spec: ModelSpec,
    pub task: TaskInfo,
    /// What the model reads of every row.
    pub inputs: HostInputs<'a>,
    /// `[n, w]` training targets as the loss wants them (multi-hot, one-hot, standardised).
    pub targets: Vec<f32>,
    pub target_width: usize,
    pub host: HostTargets,
    /// Rows of each split present, in row order.
    pub rows: BTreeMap<Split, Vec<usize>>,
    /// Zero-shot: the training classes' text (in-distribution candidates).
    pub text_train: Option<TextMatrix>,
    /// Zero-shot: the held-out classes' text (candidates of the holdout splits).
    pub text_holdout: Option<TextMatrix>,
    /// Metric chosen on `val` to keep the best checkpoint.
    pub selection: &'static str,
    /// Standardised inputs: the training mean matrix (saved beside the checkpoint).
    pub input_mean: Option<Vec<f32>>,
}

impl Prepared<'_> {
    /// Whether rows of `split` are scored against the held-out classes.
    pub fn uses_holdout_text(&self, split: Split) -> bool {
        self.task.kind == TaskKind::ZeroShot
            && matches!(split, Split::ValHoldout | Split::TestHoldout)
    }
}

fn text_of<'a>(table: &'a TextTable, class: &probex_weights::dataset::Class) -> Option<&'a [f32]> {
    table.get(&class.name).or_else(|| table.get(&class.id))
}

/// Builds the text matrix of `classes` (indices into the label classes), naming every class
/// that has no vector.
pub(crate) fn text_matrix(
    table: &TextTable,
    all: &[probex_weights::dataset::Class],
    classes: &[usize],
) -> Result<TextMatrix, DataError> {
    let mut values = Vec::with_capacity(classes.len() * table.dim);
    let mut missing = Vec::new();
    for &c in classes {
        match text_of(table, &all[c]) {
            Some(v) => values.extend_from_slice(v),
            None => missing.push(all[c].name.clone()),
        }
    }
    if !missing.is_empty() {
        return Err(DataError::MissingText { missing });
    }
    Ok(TextMatrix {
        values,
        rows: classes.len(),
        dim: table.dim,
    })
}

/// Validates the inputs and prepares a training.
pub(crate) fn prepare<'a>(
    ds: &'a LayerDataset,
    text: Option<&TextTable>,
    cfg: &TrainConfig,
) -> Result<Prepared<'a>, DataError> {
    ds.validate().map_err(DataError::Dataset)?;
    let mut rows: BTreeMap<Split, Vec<usize>> = BTreeMap::new();
    for (i, m) in ds.models.iter().enumerate() {
        rows.entry(m.split).or_default().push(i);
    }
    let train_rows = rows.get(&Split::Train).cloned().unwrap_or_default();
    if train_rows.is_empty() {
        return Err(DataError::NoTrainModel(ds.layer.name.clone()));
    }
    if ds.d_h == 0 || ds.d_w == 0 {
        return Err(DataError::EmptyShape(ds.layer.name.clone()));
    }
    let mut spec = model_spec(ds, cfg);
    let mut task = TaskInfo {
        kind: TaskKind::Class,
        classes: Vec::new(),
        target_mean: 0.0,
        target_std: 1.0,
        feature_mean: Vec::new(),
        feature_std: Vec::new(),
        input_scale: None,
    };
    let (t, text_train, text_holdout) = if cfg.model.is_zero_shot() {
        zero_shot_targets(ds, text, cfg, &rows, &mut spec, &mut task)?
    } else {
        (
            supervised_targets(ds, &train_rows, &mut spec, &mut task)?,
            None,
            None,
        )
    };
    if matches!(task.kind, TaskKind::MultiLabel | TaskKind::Class) && spec.d_y == 0 {
        return Err(DataError::NoClasses(ds.label_key.clone()));
    }
    let input_mean = cfg.standardize.then(|| {
        let train = rows.get(&Split::Train).map_or(&[][..], Vec::as_slice);
        input_moments(ds, train).map(|(mean, scale)| {
            task.input_scale = Some(scale);
            mean
        })
    });
    let input_mean = input_mean.transpose()?;
    let inputs = model_inputs(ds, cfg.model, &rows, &mut task, input_mean.as_deref())?;
    Ok(Prepared {
        input_mean,
        spec,
        task,
        inputs,
        targets: t.values,
        target_width: t.width,
        host: t.host,
        rows,
        text_train,
        text_holdout,
        selection: t.selection,
    })
}

/// A training's targets: as the loss reads them (one-hot, scaled), their width, as the
/// metrics read them, and the metric that selects the best epoch.
struct Targets {
    values: Vec<f32>,
    width: usize,
    host: HostTargets,
    selection: &'static str,
}

/// The model's shape for `ds` (the ranks its kind uses; outputs are set with the targets).
fn model_spec(ds: &LayerDataset, cfg: &TrainConfig) -> ModelSpec {
    let mut spec = ModelSpec {
        kind: cfg.model,
        d_h: ds.d_h,
        d_w: ds.d_w,
        r_u: 0,
        r_v: 0,
        r_t: 0,
        d_y: 0,
        d_text: 0,
        hidden: 0,
    };
    match cfg.model {
        ModelKind::Probex | ModelKind::ProbexZeroshot => {
            (spec.r_u, spec.r_v, spec.r_t) = (cfg.r_u, cfg.r_v, cfg.r_t);
        }
        ModelKind::Statnn => spec.hidden = cfg.hidden,
        ModelKind::Dense => {}
        ModelKind::DenseZeroshot => spec.r_t = cfg.r_t,
    }
    spec
}

/// Targets of a zero-shot probe: each model's class among the training classes (held-out
/// models among the held-out ones), and the text embeddings of both class sets.
fn zero_shot_targets(
    ds: &LayerDataset,
    text: Option<&TextTable>,
    cfg: &TrainConfig,
    rows: &BTreeMap<Split, Vec<usize>>,
    spec: &mut ModelSpec,
    task: &mut TaskInfo,
) -> Result<(Targets, Option<TextMatrix>, Option<TextMatrix>), DataError> {
    let n = ds.n;
    let Labels::Class { classes, targets } = &ds.labels else {
        return Err(DataError::NeedsClassLabels {
            model: cfg.model,
            key: ds.label_key.clone(),
            kind: label_kind(&ds.labels),
        });
    };
    let Some(table) = text else {
        return Err(DataError::NeedsTextTable(cfg.model));
    };
    table.validate().map_err(DataError::Table)?;
    let collect = |splits: &[Split]| -> Vec<usize> {
        let mut set: Vec<usize> = splits
            .iter()
            .flat_map(|s| rows.get(s).into_iter().flatten())
            .map(|&r| targets[r] as usize)
            .collect();
        set.sort_unstable();
        set.dedup();
        set
    };
    let train_classes = collect(&[Split::Train]);
    let holdout_classes = collect(&[Split::ValHoldout, Split::TestHoldout]);
    let mut pos_train = vec![u32::MAX; classes.len()];
    for (i, &c) in train_classes.iter().enumerate() {
        pos_train[c] = i as u32;
    }
    let mut pos_hold = vec![u32::MAX; classes.len()];
    for (i, &c) in holdout_classes.iter().enumerate() {
        pos_hold[c] = i as u32;
    }
    let tt = text_matrix(table, classes, &train_classes)?;
    spec.d_text = tt.dim;
    let text_train = Some(tt);
    let text_holdout = if holdout_classes.is_empty() {
        None
    } else {
        Some(text_matrix(table, classes, &holdout_classes)?)
    };
    let w = train_classes.len();
    let mut onehot = vec![0.0f32; n * w];
    let mut idx = vec![0u32; n];
    for (i, m) in ds.models.iter().enumerate() {
        let c = targets[i] as usize;
        let holdout = matches!(m.split, Split::ValHoldout | Split::TestHoldout);
        let p = if holdout { pos_hold[c] } else { pos_train[c] };
        if p == u32::MAX {
            return Err(DataError::UnseenClass {
                model: m.id.clone(),
                split: m.split,
                class: classes[c].name.clone(),
            });
        }
        idx[i] = p;
        if !holdout {
            onehot[i * w + p as usize] = 1.0;
        }
    }
    task.kind = TaskKind::ZeroShot;
    task.classes = train_classes
        .iter()
        .map(|&c| classes[c].name.clone())
        .collect();
    Ok((
        Targets {
            values: onehot,
            width: w,
            host: HostTargets::Class(idx),
            selection: "top1",
        },
        text_train,
        text_holdout,
    ))
}

/// Targets of a supervised probe, from the dataset's labels; a regression's are standardised
/// on the training rows.
fn supervised_targets(
    ds: &LayerDataset,
    train_rows: &[usize],
    spec: &mut ModelSpec,
    task: &mut TaskInfo,
) -> Result<Targets, DataError> {
    let n = ds.n;
    let (values, width, host, selection) = match &ds.labels {
        Labels::MultiLabel { classes, targets } => {
            task.kind = TaskKind::MultiLabel;
            task.classes = classes.clone();
            spec.d_y = classes.len();
            let host = HostTargets::MultiLabel(targets.clone(), classes.len());
            (targets.clone(), classes.len(), host, "accuracy")
        }
        Labels::Class { classes, targets } => {
            task.kind = TaskKind::Class;
            task.classes = classes.iter().map(|c| c.name.clone()).collect();
            let w = classes.len();
            spec.d_y = w;
            let mut onehot = vec![0.0f32; n * w];
            for (i, &t) in targets.iter().enumerate() {
                onehot[i * w + t as usize] = 1.0;
            }
            (onehot, w, HostTargets::Class(targets.clone()), "top1")
        }
        Labels::Numeric { targets, .. } => {
            if let Some(i) = targets.iter().position(|t| !t.is_finite()) {
                return Err(DataError::NonFiniteTarget {
                    model: ds.models[i].id.clone(),
                    value: targets[i],
                });
            }
            task.kind = TaskKind::Regression;
            spec.d_y = 1;
            let k = train_rows.len() as f64;
            let mean = train_rows.iter().map(|&r| targets[r] as f64).sum::<f64>() / k;
            let var = train_rows
                .iter()
                .map(|&r| (targets[r] as f64 - mean).powi(2))
                .sum::<f64>()
                / k;
            let std = if var > 0.0 { var.sqrt() } else { 1.0 };
            task.target_mean = mean as f32;
            task.target_std = std as f32;
            let scaled = targets
                .iter()
                .map(|&t| ((t as f64 - mean) / std) as f32)
                .collect();
            (scaled, 1, HostTargets::Numeric(targets.clone()), "r2")
        }
    };
    Ok(Targets {
        values,
        width,
        host,
        selection,
    })
}

/// The mean matrix of the `train` rows and the standard deviation of their values around it
/// (1 when they do not vary), accumulated in f64.
fn input_moments(ds: &LayerDataset, train: &[usize]) -> Result<(Vec<f32>, f32), DataError> {
    let m = ds.d_h * ds.d_w;
    let n = train.len().max(1) as f64;
    let (mean, ss) = match &ds.weights {
        Matrices::Stacked(_) | Matrices::OnDisk(_) => {
            let mut mean = vec![0f64; m];
            for &r in train {
                let x = ds.matrix(r)?;
                for (a, &x) in mean.iter_mut().zip(x.iter()) {
                    *a += f64::from(x);
                }
            }
            mean.iter_mut().for_each(|a| *a /= n);
            let mut ss = 0f64;
            for &r in train {
                let x = ds.matrix(r)?;
                for (a, &x) in mean.iter().zip(x.iter()) {
                    ss += (f64::from(x) - a).powi(2);
                }
            }
            (mean, ss)
        }
        // Without forming any matrix: the sum of the products B_i A_i accumulates in one
        // buffer, and sum_i |X_i - M|^2 is sum_i |X_i|^2 - n |M|^2, where |B A|^2 is
        // <B^T B, A A^T>, two r x r Gram matrices.
        Matrices::Factored { rank, up, down } => {
            let (r, d_h, d_w) = (*rank, ds.d_h, ds.d_w);
            let (b_len, a_len) = (d_h * r, r * d_w);
            let mut sum = vec![0f32; m];
            let mut norms = 0f64;
            let (mut btb, mut aat) = (vec![0f32; r * r], vec![0f32; r * r]);
            for &i in train {
                let (b, a) = (
                    &up[i * b_len..(i + 1) * b_len],
                    &down[i * a_len..(i + 1) * a_len],
                );
                add_product(b, false, a, false, [d_h, r, d_w], &mut sum);
                btb.fill(0.0);
                aat.fill(0.0);
                add_product(b, true, b, false, [r, d_h, r], &mut btb);
                add_product(a, false, a, true, [r, d_w, r], &mut aat);
                norms += btb
                    .iter()
                    .zip(&aat)
                    .map(|(x, y)| f64::from(*x) * f64::from(*y))
                    .sum::<f64>();
            }
            let mean: Vec<f64> = sum.iter().map(|&s| f64::from(s) / n).collect();
            let ss = norms - n * mean.iter().map(|a| a * a).sum::<f64>();
            (mean, ss.max(0.0))
        }
    };
    let std = (ss / (n * m as f64).max(1.0)).sqrt();
    let scale = if std.is_finite() && std > 0.0 {
        std as f32
    } else {
        1.0
    };
    Ok((mean.into_iter().map(|a| a as f32).collect(), scale))
}

/// The model input: the matrices (standardised by `input_mean` and `task.input_scale` when
/// both are set; LoRA layers as their factors, standardised on the device), or for StatNN
/// their standardised statistics (the moments come from `task` when set, else from the
/// training rows, and are stored into it).
pub(crate) fn model_inputs<'a>(
    ds: &'a LayerDataset,
    kind: ModelKind,
    rows: &BTreeMap<Split, Vec<usize>>,
    task: &mut TaskInfo,
    input_mean: Option<&[f32]>,
) -> Result<HostInputs<'a>, DataError> {
    let standardize = input_mean
        .zip(task.input_scale)
        .map(|(mean, scale)| (mean.to_vec(), scale));
    if kind != ModelKind::Statnn {
        return Ok(match &ds.weights {
            Matrices::Factored { rank, up, down } => HostInputs::Factored {
                up,
                down,
                dims: [ds.n, ds.d_h, ds.d_w],
                rank: *rank,
                standardize,
            },
            Matrices::Stacked(_) | Matrices::OnDisk(_) => HostInputs::Rows { ds, standardize },
        });
    }
    let f = statnn::FEATURES.len();
    let mut feats = match &ds.weights {
        Matrices::Stacked(w) => statnn::statistics_of_all(w, ds.n, ds.d_h * ds.d_w),
        Matrices::Factored { .. } | Matrices::OnDisk(_) => {
            use rayon::prelude::*;
            let per_row: Vec<[f32; statnn::FEATURES.len()]> = (0..ds.n)
                .into_par_iter()
                .map(|i| ds.matrix(i).map(|x| statnn::statistics(&x)))
                .collect::<Result<_, _>>()?;
            per_row.concat()
        }
    };
    if task.feature_mean.len() != f || task.feature_std.len() != f {
        let train = rows.get(&Split::Train).cloned().unwrap_or_default();
        let (mean, std) = statnn::moments(&feats, &train);
        task.feature_mean = mean;
        task.feature_std = std;
    }
    statnn::standardise(&mut feats, &task.feature_mean, &task.feature_std);
    Ok(HostInputs::Stacked {
        values: feats,
        dims: [ds.n, 1, f],
    })
}

fn label_kind(l: &Labels) -> &'static str {
    match l {
        Labels::MultiLabel { .. } => "multi-label",
        Labels::Class { .. } => "single-class",
        Labels::Numeric { .. } => "numeric",
    }
}

#[cfg(test)]
mod tests {
    use super::transposed_factors;

    #[test]
    fn factors_are_transposed_model_by_model() {
        // Two models, d_h = 3, r = 2: B_b[h][i] = 100 b + 10 h + i.
        let up: Vec<f32> = (0..2)
            .flat_map(|b| {
                (0..3).flat_map(move |h| (0..2).map(move |i| (100 * b + 10 * h + i) as f32))
            })
            .collect();
        let t = transposed_factors(&up, 3, 2);
        let want: Vec<f32> = (0..2)
            .flat_map(|b| {
                (0..2).flat_map(move |i| (0..3).map(move |h| (100 * b + 10 * h + i) as f32))
            })
            .collect();
        assert_eq!(t, want);
    }
}
