//! The `train` stage kind: one probe (ProbeX, ProbeX zero-shot, Dense or StatNN) on one layer
//! dataset.
//!
//! ```toml
//! [stage.probe]
//! kind = "train"
//! from = ["layers", "text"]   # a layer dataset, and text embeddings for probex-zeroshot
//! for_each = "layer"          # one node per layer of the sweep
//! model = "probex"            # probex | probex-zeroshot | dense | dense-zeroshot | statnn
//! epochs = 500                # every hyperparameter defaults to the paper's value
//! ```
//! The artifact holds the best-validation checkpoint, exactly the official PyTorch state dict
//! (`checkpoint.safetensors`; with `standardize = true`, the inputs' mean and scale beside it in
//! `standardize.safetensors`), the metrics and curves (`report.json`), and every model's
//! encoding and scores under that checkpoint (`outputs.safetensors`, rows as in `rows.json`),
//! which `select` and `evaluate` read without loading the layer again.

mod gang;

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;

use probex_engine::{
    Artifact, Cancelled, InputSlot, Inputs, Outcome, ParamError, PlanFacts, PlanInput, Resource,
    RunContext, Shape, Stage, StageResult,
};
use safetensors::{Dtype, tensor::TensorView};
use serde::{Deserialize, Serialize};

use crate::extract::ARTIFACT as LAYER;
use probex_probes::models::ModelKind;
use probex_probes::models::checkpoint::TaskKind;
use probex_probes::training::{self, DeviceSpec, TrainConfig};
use probex_weights::dataset::{Labels, LayerDataset, Matrices, ModelRecord, Split};
use probex_weights::embeddings::TextTable;
use probex_weights::labels::LabelKind;

/// The plan fact of a train stage (and of the selections of its probes) naming the probes'
/// task (`multi_label`, `class`, `regression`, `zero_shot`).
pub const TASK: &str = "task";

/// A zero-shot model on labels that are not one class per model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "model `{model}` scores classes by their text, so it needs single-class labels (label kind \
     `class` or `category`), but its layers are labelled `{kind}`"
)]
pub struct NeedsSingleClass {
    /// The zero-shot model.
    pub model: ModelKind,
    /// The layers' label kind, as written in TOML.
    pub kind: String,
}

/// What a `model` trained on labels of `kind` predicts; an error for a zero-shot model on
/// labels that are not one class per model (what `train` would say when it runs).
pub fn task_of(model: ModelKind, kind: LabelKind) -> Result<TaskKind, NeedsSingleClass> {
    let single = matches!(
        kind,
        LabelKind::Class | LabelKind::Category | LabelKind::Bool
    );
    Ok(match kind {
        _ if model.is_zero_shot() && single => TaskKind::ZeroShot,
        _ if model.is_zero_shot() => {
            return Err(NeedsSingleClass {
                model,
                kind: serde_json::to_value(kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
            });
        }
        LabelKind::MultiLabel => TaskKind::MultiLabel,
        LabelKind::Numeric => TaskKind::Regression,
        LabelKind::Class | LabelKind::Category | LabelKind::Bool => TaskKind::Class,
    })
}

/// The results of a train node for `task`: the metrics of every split, the parameter count,
/// the kept epoch and the time; zero-shot probes add their best-`val_holdout` checkpoint's.
pub fn results_shape(task: TaskKind) -> Shape {
    let metrics = Shape::values(training::metrics::names(task).iter().copied());
    let splits = Shape::object(Split::ALL.iter().map(|s| (s.as_str(), metrics.clone())));
    let mut shape = splits
        .clone()
        .with("params", Shape::Value)
        .with("best_epoch", Shape::Value)
        .with("seconds", Shape::Value);
    if task == TaskKind::ZeroShot {
        shape = shape
            .with("holdout_checkpoint", splits)
            .with("best_holdout_epoch", Shape::Value);
    }
    shape
}

/// The artifact type of a trained probe.
pub const ARTIFACT: &str = "probe";
/// The artifact type of a text-embedding table.
pub const EMBEDDINGS: &str = "embeddings";

/// File names inside a probe artifact.
pub mod files {
    /// Best-validation checkpoint (official PyTorch names).
    pub const CHECKPOINT: &str = "checkpoint.safetensors";
    /// Zero-shot: best-`val_holdout` checkpoint.
    pub const HOLDOUT_CHECKPOINT: &str = "checkpoint_holdout.safetensors";
    /// `standardize = true`: the inputs' mean and scale, which both checkpoints apply before
    /// their forward pass (`(W - mean) / scale`).
    pub const STANDARDIZE: &str = probex_probes::models::checkpoint::STANDARDIZE_FILE;
    /// Metrics, curves, config.
    pub const REPORT: &str = "report.json";
    /// `encodings` [N, dim] and `scores` [N, C] of every model under the checkpoint.
    pub const OUTPUTS: &str = "outputs.safetensors";
    /// Model ids, splits and labels of the rows of `outputs.safetensors`.
    pub const ROWS: &str = "rows.json";
    /// Zero-shot: the text encoder the class vectors came from (`encoder`, `template`,
    /// `model_dir`), so free-text queries are embedded the same way.
    pub const TEXT: &str = "text.json";
    /// Zero-shot: the class text table the probe was trained and scored with.
    pub const TEXT_TABLE: [&str; 2] = [
        probex_weights::embeddings::TENSORS_FILE,
        probex_weights::embeddings::NAMES_FILE,
    ];
}

/// Who the rows of a probe's outputs are.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rows {
    /// The layer the probe read.
    pub layer: probex_weights::dataset::LayerInfo,
    /// One record per row.
    pub models: Vec<ModelRecord>,
    /// Labels with targets.
    pub labels: Labels,
    /// Names of the score columns.
    pub columns: Vec<String>,
}

/// The `train` stage kind.
pub struct Train;

impl Stage for Train {
    type Params = TrainConfig;

    fn kind(&self) -> &'static str {
        "train"
    }
    fn version(&self) -> u32 {
        // 2: zero-shot probes keep their text table and encoder record.
        // 3: the standardisation moved out of the checkpoint into standardize.safetensors.
        3
    }
    fn about(&self) -> &'static str {
        "train a probe (probex, probex-zeroshot, dense, dense-zeroshot, statnn) on one layer dataset"
    }
    fn params_doc(&self) -> probex_engine::ParamsDoc {
        crate::params_doc::TRAIN
    }
    fn output(&self) -> &'static str {
        ARTIFACT
    }
    fn inputs(&self) -> Vec<InputSlot> {
        vec![InputSlot::one(LAYER), InputSlot::optional(EMBEDDINGS)]
    }

    fn check(&self, p: &TrainConfig) -> Result<(), ParamError> {
        p.validate().map_err(|e| ParamError::at(e.key(), e))
    }

    /// From the label kind of its layer input: the probe's task (passed on as [`TASK`]) and
    /// so its metrics, under every split; unknown when the layer's label kind is.
    fn plan_facts(
        &self,
        p: &TrainConfig,
        inputs: &[PlanInput<'_>],
    ) -> Result<PlanFacts, ParamError> {
        let label_kind = inputs
            .iter()
            .find(|i| i.ty == LAYER)
            .and_then(|i| i.facts.facts.get(crate::extract::stage::LABEL_KIND))
            .and_then(|k| serde_json::from_value::<LabelKind>(k.clone()).ok());
        let Some(label_kind) = label_kind else {
            return Ok(PlanFacts::default());
        };
        let task = task_of(p.model, label_kind).map_err(|e| ParamError::at("model", e))?;
        Ok(PlanFacts {
            results: results_shape(task),
            facts: serde_json::json!({ TASK: task }),
        })
    }

    /// Plain `cuda` may run on any of the run's GPUs (the engine hands the one it picked to
    /// `run` as `cuda:N`); `cuda:N` on that one only.
    fn resource(&self, _p: &TrainConfig, device: Option<&str>) -> Resource {
        match device.map(str::trim) {
            Some("cuda") => Resource::AnyGpu,
            Some(d) => match d.parse::<DeviceSpec>() {
                Ok(DeviceSpec::Cuda(i)) => Resource::Gpu(format!("cuda:{i}")),
                _ => Resource::Cpu,
            },
            None => Resource::Cpu,
        }
    }

    /// ProbeX probes of one shape and row set train as a gang (sweep mode, see the `gang`
    /// module).
    fn gangs(&self) -> bool {
        true
    }

    fn gang(&self, p: &TrainConfig, inputs: &Inputs) -> Option<String> {
        gang::gang_key(p, inputs)
    }

    fn gang_limit(&self, p: &TrainConfig, inputs: &Inputs, device: Option<&str>) -> usize {
        gang::gang_limit(p, inputs, device)
    }

    fn run_gang(&self, jobs: &[(&TrainConfig, &Inputs, &RunContext)]) -> Vec<StageResult<Outcome>> {
        gang::run_gang(jobs)
    }

    fn run(&self, p: &TrainConfig, inputs: &Inputs, cx: &RunContext) -> StageResult<Outcome> {
        let device: DeviceSpec = cx
            .device()
            .unwrap_or("cpu")
            .parse()
            .map_err(anyhow::Error::msg)?;
        let budget = training::memory::budget()?;
        let Opened {
            ds,
            text,
            text_input,
            cfg,
        } = open(p, inputs, cx, budget, &device, None)?;
        let mut said_resumed = false;
        let mut on_epoch = |pr: &training::TrainProgress| on_epoch(cx, &mut said_resumed, pr);
        let outcome = match training::train(
            &ds,
            text.as_ref(),
            &cfg,
            &device,
            Some(cx.work_dir()?),
            &mut on_epoch,
        ) {
            // The engine tells a stopped node from a failed one by its typed `Cancelled`.
            Err(training::TrainError::Cancelled { epoch }) => {
                cx.log(format!(
                    "stopped after epoch {epoch}; the next run resumes from the checkpoint in the work directory"
                ));
                return Err(Cancelled.into());
            }
            r => r?,
        };
        write_trained(cx, &cfg, &ds, text.as_ref(), text_input, &outcome, &device)
    }
}

/// Writes a finished training's artifact into the node's output folder (checkpoints, report,
/// encodings and predictions, the text table it read) and says what the node reports: what
/// `run` and every member of a gang write alike.
fn write_trained(
    cx: &RunContext,
    cfg: &TrainConfig,
    ds: &LayerDataset,
    text: Option<&TextTable>,
    text_input: Option<&Artifact>,
    outcome: &training::TrainOutcome,
    device: &DeviceSpec,
) -> StageResult<Outcome> {
    let out = cx.out_dir();
    save_training(out, outcome)?;
    save_predictions(out, ds, text, device)?;
    if let (Some(a), Some(table)) = (text_input, text) {
        table.save(out)?;
        write(out, files::TEXT, &serde_json::to_vec_pretty(&a.meta)?)?;
    }
    let r = &outcome.report;
    cx.log(format!(
        "best epoch {} ({} parameters) in {:.1}s",
        r.best_epoch, r.params, r.seconds
    ));
    Ok(Outcome {
        meta: serde_json::json!({
            "model": cfg.model.as_str(),
            "layer": ds.layer,
            "params": r.params,
            "selection_metric": r.selection_metric,
            "task": r.task,
        }),
        results: Some(results_of(r)?),
        summary: None,
        publish: vec![files::REPORT.into()],
        references: Vec::new(),
    })
}

/// A node's layer (within its memory budget), text table and settings, opened for training.
struct Opened<'a> {
    ds: LayerDataset,
    text: Option<TextTable>,
    text_input: Option<&'a Artifact>,
    cfg: TrainConfig,
}

/// Opens a node's layer within `budget` (saying so when it stays on disk), its text table and
/// its settings, and logs what will train; `gang` is the size of the gang it trains in, if any
/// (its budget is then its share).
fn open<'a>(
    p: &TrainConfig,
    inputs: &'a Inputs,
    cx: &RunContext,
    budget: u64,
    device: &DeviceSpec,
    gang: Option<usize>,
) -> StageResult<Opened<'a>> {
    let ds = LayerDataset::open(&inputs.one(LAYER)?.dir, budget)?;
    if let Matrices::OnDisk(_) = ds.weights {
        let whose = match gang {
            Some(_) => "this gang member's share of the memory budget".to_string(),
            None => format!("the memory budget ({})", training::memory::ENV),
        };
        cx.log(format!(
            "layer of {} MB as f32 exceeds {whose} of {} MB: reading it from disk batch by batch",
            (ds.n * ds.d_h * ds.d_w * 4) >> 20,
            budget >> 20
        ));
    }
    let text_input = inputs.optional(EMBEDDINGS)?;
    let text = match text_input {
        Some(a) => Some(TextTable::load(&a.dir)?),
        None => None,
    };
    // Threads are a run setting, not a hyperparameter: they come from the engine.
    let cfg = TrainConfig {
        threads: cx.threads(),
        ..p.clone()
    };
    cx.log(format!(
        "{} on layer {} ({}): {} models of [{}, {}], device {device}, {} threads{}",
        cfg.model.as_str(),
        ds.layer.index,
        ds.layer.name,
        ds.n,
        ds.d_h,
        ds.d_w,
        cfg.threads,
        gang.map_or(String::new(), |n| format!(", in a gang of {n}"))
    ));
    Ok(Opened {
        ds,
        text,
        text_input,
        cfg,
    })
}

/// Reports one epoch to the engine (progress, the val metric, a resume said once) and says
/// whether to go on (not when the run is cancelled).
fn on_epoch(
    cx: &RunContext,
    said_resumed: &mut bool,
    pr: &training::TrainProgress,
) -> ControlFlow<()> {
    if let Some(from) = pr.resumed_from
        && !std::mem::replace(said_resumed, true)
    {
        cx.note(format!(
            "resumed from the checkpoint of an interrupted run at epoch {from} of {}",
            pr.epochs
        ));
    }
    cx.progress(
        pr.epoch as u64 + 1,
        pr.epochs as u64,
        &format!("loss {:.4}", pr.train_loss),
    );
    if let Some(e) = pr.eval {
        let val = e
            .splits
            .get("val")
            .and_then(|m| m.iter().next().map(|(k, v)| format!("{k} {v:.4}")));
        cx.log(format!(
            "epoch {}: loss {:.5}{}",
            pr.epoch,
            pr.train_loss,
            val.map_or(String::new(), |v| format!(", val {v}"))
        ));
    }
    if cx.is_cancelled() {
        ControlFlow::Break(())
    } else {
        ControlFlow::Continue(())
    }
}

/// Writes the training's checkpoints, standardisation and report.
fn save_training(out: &Path, outcome: &training::TrainOutcome) -> StageResult<()> {
    write(out, files::CHECKPOINT, &outcome.checkpoint)?;
    if let Some(h) = &outcome.holdout_checkpoint {
        write(out, files::HOLDOUT_CHECKPOINT, h)?;
    }
    if let Some(s) = &outcome.standardize {
        write(out, files::STANDARDIZE, s)?;
    }
    write(
        out,
        files::REPORT,
        &serde_json::to_vec_pretty(&outcome.report)?,
    )
}

/// Encodes and predicts every model of `ds` with the saved checkpoint and writes the outputs
/// and their rows.
fn save_predictions(
    out: &Path,
    ds: &LayerDataset,
    text: Option<&TextTable>,
    device: &DeviceSpec,
) -> StageResult<()> {
    let ckpt = out.join(files::CHECKPOINT);
    let enc = training::encode(&ckpt, ds, device)?;
    let pred = training::predict(&ckpt, ds, text, device)?;
    write_outputs(
        &out.join(files::OUTPUTS),
        ds.n,
        &enc.values,
        enc.dim,
        &pred.scores,
        pred.columns.len(),
    )?;
    let rows = Rows {
        layer: ds.layer.clone(),
        models: ds.models.clone(),
        labels: ds.labels.clone(),
        columns: pred.columns,
    };
    write(out, files::ROWS, &serde_json::to_vec(&rows)?)
}

/// The node's results: the report's metrics with its size, best epoch and time.
fn results_of(r: &training::TrainReport) -> StageResult<serde_json::Value> {
    let mut results = serde_json::to_value(&r.metrics)?;
    if let Some(obj) = results.as_object_mut() {
        obj.insert("params".into(), r.params.into());
        obj.insert("best_epoch".into(), r.best_epoch.into());
        obj.insert("seconds".into(), r.seconds.into());
        // Zero-shot: the checkpoint chosen on val_holdout, whose held-out numbers the
        // paper reports (evaluate shows both).
        if let Some(h) = &r.holdout_metrics {
            obj.insert("holdout_checkpoint".into(), serde_json::to_value(h)?);
        }
        if let Some(e) = r.best_holdout_epoch {
            obj.insert("best_holdout_epoch".into(), e.into());
        }
    }
    Ok(results)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> StageResult<()> {
    let path = dir.join(name);
    std::fs::write(&path, bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn write_outputs(
    path: &Path,
    n: usize,
    enc: &[f32],
    dim: usize,
    scores: &[f32],
    cols: usize,
) -> StageResult<()> {
    let eb: Vec<u8> = enc.iter().flat_map(|v| v.to_le_bytes()).collect();
    let sb: Vec<u8> = scores.iter().flat_map(|v| v.to_le_bytes()).collect();
    let e = TensorView::new(Dtype::F32, vec![n, dim], &eb)?;
    let s = TensorView::new(Dtype::F32, vec![n, cols], &sb)?;
    safetensors::serialize_to_file(
        [("encodings", e), ("scores", s)],
        None::<HashMap<String, String>>,
        path,
    )?;
    Ok(())
}

/// Reads `encodings` [N, dim] and `scores` [N, C] from a probe artifact.
pub fn read_outputs(dir: &Path) -> StageResult<(Vec<f32>, usize, Vec<f32>, usize)> {
    let path = dir.join(files::OUTPUTS);
    let bytes = std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let get = |name: &str| -> StageResult<(Vec<f32>, usize)> {
        let t = st.tensor(name)?;
        let dim = t.shape().get(1).copied().unwrap_or(0);
        Ok((probex_weights::dataset::decode(t.dtype(), t.data())?, dim))
    };
    let (e, ed) = get("encodings")?;
    let (s, sd) = get("scores")?;
    Ok((e, ed, s, sd))
}

/// Reads `rows.json` from a probe artifact.
pub fn read_rows(dir: &Path) -> StageResult<Rows> {
    let path = dir.join(files::ROWS);
    let bytes = std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(serde_json::from_slice(&bytes)?)
}
