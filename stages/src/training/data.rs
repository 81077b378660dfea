//! Turns a layer dataset (and a text table) into what a training needs: the model inputs, the
//! targets, the rows of each split, and the task description stored in checkpoints.

use std::borrow::Cow;
use std::collections::BTreeMap;

use crate::dataset::{Labels, LayerDataset, Split};
use crate::embeddings::TextTable;
use crate::models::checkpoint::{TaskInfo, TaskKind};
use crate::models::{ModelKind, ModelSpec, statnn};

use super::TrainConfig;

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
    /// `[n, a, b]` model inputs (the dataset's own weights, not a copy, for matrix models).
    pub inputs: Cow<'a, [f32]>,
    pub in_dims: [usize; 3],
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
    /// Standardised inputs: the training mean matrix (saved with the checkpoint).
    pub input_mean: Option<Vec<f32>>,
}

impl Prepared<'_> {
    /// Whether rows of `split` are scored against the held-out classes.
    pub fn uses_holdout_text(&self, split: Split) -> bool {
        self.task.kind == TaskKind::ZeroShot
            && matches!(split, Split::ValHoldout | Split::TestHoldout)
    }
}

fn text_of<'a>(table: &'a TextTable, class: &crate::dataset::Class) -> Option<&'a [f32]> {
    table.get(&class.name).or_else(|| table.get(&class.id))
}

/// Builds the text matrix of `classes` (indices into the label classes), naming every class
/// that has no vector.
pub(crate) fn text_matrix(
    table: &TextTable,
    all: &[crate::dataset::Class],
    classes: &[usize],
) -> Result<TextMatrix, String> {
    let mut values = Vec::with_capacity(classes.len() * table.dim);
    let mut missing = Vec::new();
    for &c in classes {
        match text_of(table, &all[c]) {
            Some(v) => values.extend_from_slice(v),
            None => missing.push(all[c].name.clone()),
        }
    }
    if !missing.is_empty() {
        let shown: Vec<&String> = missing.iter().take(10).collect();
        return Err(format!(
            "the text table has no vector for {} class(es) (looked up by name, then id): {:?}{}; \
             re-run the embed stage on these labels",
            missing.len(),
            shown,
            if missing.len() > 10 { " ..." } else { "" }
        ));
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
) -> Result<Prepared<'a>, String> {
    ds.validate().map_err(|m| format!("layer dataset: {m}"))?;
    let mut rows: BTreeMap<Split, Vec<usize>> = BTreeMap::new();
    for (i, m) in ds.models.iter().enumerate() {
        rows.entry(m.split).or_default().push(i);
    }
    let train_rows = rows.get(&Split::Train).cloned().unwrap_or_default();
    if train_rows.is_empty() {
        return Err(format!(
            "layer `{}` has no model in the train split; nothing to train on",
            ds.layer.name
        ));
    }
    if ds.d_h == 0 || ds.d_w == 0 {
        return Err(format!(
            "layer `{}` has an empty matrix shape",
            ds.layer.name
        ));
    }
    let n = ds.n;
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
    let mut task = TaskInfo {
        kind: TaskKind::Class,
        classes: Vec::new(),
        target_mean: 0.0,
        target_std: 1.0,
        feature_mean: Vec::new(),
        feature_std: Vec::new(),
        input_scale: None,
    };
    let (mut text_train, mut text_holdout) = (None, None);
    let (targets, target_width, host, selection) = if cfg.model.is_zero_shot() {
        let Labels::Class { classes, targets } = &ds.labels else {
            return Err(format!(
                "model `{}` needs single-class labels, but key `{}` gives {} labels",
                cfg.model,
                ds.label_key,
                label_kind(&ds.labels)
            ));
        };
        let Some(table) = text else {
            return Err(format!(
                "model `{}` needs a text table (class-name embeddings); add the embed stage's \
                 output to `from`",
                cfg.model
            ));
        };
        table.validate().map_err(|m| format!("text table: {m}"))?;
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
        text_train = Some(tt);
        if !holdout_classes.is_empty() {
            text_holdout = Some(text_matrix(table, classes, &holdout_classes)?);
        }
        let w = train_classes.len();
        let mut onehot = vec![0.0f32; n * w];
        let mut idx = vec![0u32; n];
        for (i, m) in ds.models.iter().enumerate() {
            let c = targets[i] as usize;
            let holdout = matches!(m.split, Split::ValHoldout | Split::TestHoldout);
            let p = if holdout { pos_hold[c] } else { pos_train[c] };
            if p == u32::MAX {
                return Err(format!(
                    "model `{}` ({} split) has class `{}`, which no training model has; zero-shot \
                     classes must be in val_holdout/test_holdout",
                    m.id, m.split, classes[c].name
                ));
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
        (onehot, w, HostTargets::Class(idx), "top1")
    } else {
        match &ds.labels {
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
                    return Err(format!(
                        "model `{}` has a non-finite target {}",
                        ds.models[i].id, targets[i]
                    ));
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
        }
    };
    if matches!(task.kind, TaskKind::MultiLabel | TaskKind::Class) && spec.d_y == 0 {
        return Err(format!(
            "labels from key `{}` have no classes",
            ds.label_key
        ));
    }
    let input_mean = cfg.standardize.then(|| {
        let train = rows.get(&Split::Train).map_or(&[][..], Vec::as_slice);
        let (mean, scale) = input_moments(ds, train);
        task.input_scale = Some(scale);
        mean
    });
    let (inputs, in_dims) = model_inputs(ds, cfg.model, &rows, &mut task, input_mean.as_deref());
    Ok(Prepared {
        input_mean,
        spec,
        task,
        inputs,
        in_dims,
        targets,
        target_width,
        host,
        rows,
        text_train,
        text_holdout,
        selection,
    })
}

/// The mean matrix of the `train` rows and the standard deviation of their values around it
/// (1 when they do not vary), accumulated in f64.
fn input_moments(ds: &LayerDataset, train: &[usize]) -> (Vec<f32>, f32) {
    let m = ds.d_h * ds.d_w;
    let mut mean = vec![0f64; m];
    for &r in train {
        for (a, &x) in mean.iter_mut().zip(ds.matrix(r)) {
            *a += f64::from(x);
        }
    }
    let n = train.len().max(1) as f64;
    mean.iter_mut().for_each(|a| *a /= n);
    let mut ss = 0f64;
    for &r in train {
        for (a, &x) in mean.iter().zip(ds.matrix(r)) {
            ss += (f64::from(x) - a).powi(2);
        }
    }
    let std = (ss / (n * m as f64).max(1.0)).sqrt();
    let scale = if std.is_finite() && std > 0.0 {
        std as f32
    } else {
        1.0
    };
    (mean.into_iter().map(|a| a as f32).collect(), scale)
}

/// The model input: the matrices (standardised by `input_mean` and `task.input_scale` when
/// both are set), or for StatNN their standardised statistics (the moments come from `task`
/// when set, else from the training rows, and are stored into it).
pub(crate) fn model_inputs<'a>(
    ds: &'a LayerDataset,
    kind: ModelKind,
    rows: &BTreeMap<Split, Vec<usize>>,
    task: &mut TaskInfo,
    input_mean: Option<&[f32]>,
) -> (Cow<'a, [f32]>, [usize; 3]) {
    if kind != ModelKind::Statnn {
        let dims = [ds.n, ds.d_h, ds.d_w];
        return match (input_mean, task.input_scale) {
            (Some(mean), Some(scale)) => {
                let mut x = ds.weights.clone();
                for row in x.chunks_exact_mut(mean.len()) {
                    for (v, m) in row.iter_mut().zip(mean) {
                        *v = (*v - m) / scale;
                    }
                }
                (Cow::Owned(x), dims)
            }
            _ => (Cow::Borrowed(&ds.weights), dims),
        };
    }
    let f = statnn::FEATURES.len();
    let mut feats = statnn::statistics_of_all(&ds.weights, ds.n, ds.d_h * ds.d_w);
    if task.feature_mean.len() != f || task.feature_std.len() != f {
        let train = rows.get(&Split::Train).cloned().unwrap_or_default();
        let (mean, std) = statnn::moments(&feats, &train);
        task.feature_mean = mean;
        task.feature_std = std;
    }
    statnn::standardise(&mut feats, &task.feature_mean, &task.feature_std);
    (Cow::Owned(feats), [ds.n, 1, f])
}

fn label_kind(l: &Labels) -> &'static str {
    match l {
        Labels::MultiLabel { .. } => "multi-label",
        Labels::Class { .. } => "single-class",
        Labels::Numeric { .. } => "numeric",
    }
}
