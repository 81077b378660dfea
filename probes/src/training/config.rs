//! Training hyperparameters, with the official defaults of the method page.

use serde::{Deserialize, Serialize};

use crate::models::ModelKind;

/// Hyperparameters of one probe training. Deserialises from a TOML/JSON table in which only
/// `model` is required: every other key defaults to the official value for that model
/// (discriminative: Adam lr 1e-3, weight decay 1e-5, batch 128, 500 epochs, validation every 25
/// epochs; zero-shot: lr 2e-3, no decay, 200 epochs, validation every 10), and unknown keys are
/// errors. Values are checked by [`TrainConfig::validate`], which training calls first, so
/// that the error can name the key (a stage's check shows it at the key's value).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "RawTrainConfig")]
pub struct TrainConfig {
    /// The probe.
    pub model: ModelKind,
    /// Adam learning rate.
    pub lr: f64,
    /// L2 weight decay added to the gradient (PyTorch Adam's `weight_decay`).
    pub weight_decay: f64,
    /// Adam beta1.
    pub beta1: f64,
    /// Adam beta2.
    pub beta2: f64,
    /// Adam epsilon (PyTorch's default 1e-8).
    pub eps: f64,
    /// Models per optimisation step (the last batch of an epoch may be smaller).
    pub batch_size: usize,
    /// Training epochs.
    pub epochs: usize,
    /// Validate after epoch `e` (0-based) when `e % validate_every == 0`, as the official loop.
    pub validate_every: usize,
    /// Save resume state after every this many epochs (0: at every validation).
    pub checkpoint_every: usize,
    /// Number of probes (ProbeX).
    pub r_u: usize,
    /// Width of the shared projection (ProbeX).
    pub r_v: usize,
    /// Width of the encoding `e` (ProbeX). Default 128 for every ProbeX, zero-shot included:
    /// the paper's parameter counts (2.3M discriminative on 768x768, 2.5M zero-shot on SD's
    /// 1280x1280 layer 46) fit 128; the authors' scripts default their `--rep_dim` to 512
    /// (9.1M zero-shot parameters there). Set `r_t = 512` to run their scripts' setting.
    pub r_t: usize,
    /// Hidden width (StatNN).
    pub hidden: usize,
    /// Standardise the input matrices (ProbeX, Dense): subtract the training split's mean
    /// matrix and divide by the training values' standard deviation around it. Off in the
    /// paper; within one model tree the shared base dominates every matrix, and removing it
    /// lets a small probe see what fine-tuning changed. The mean and scale are kept beside the
    /// checkpoint (`standardize.safetensors`), which stays the plain PyTorch state dict.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub standardize: bool,
    /// Seed of initialisation and shuffling.
    pub seed: u64,
    /// CPU threads for this training (0: the caller's rayon pool). Results are reproducible for
    /// a given seed and thread count.
    pub threads: usize,
}

impl TrainConfig {
    /// The official defaults for `model`.
    pub fn new(model: ModelKind) -> TrainConfig {
        let zero_shot = model.is_zero_shot();
        TrainConfig {
            model,
            lr: if zero_shot { 2e-3 } else { 1e-3 },
            weight_decay: if zero_shot { 0.0 } else { 1e-5 },
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            batch_size: 128,
            epochs: if zero_shot { 200 } else { 500 },
            validate_every: if zero_shot { 10 } else { 25 },
            checkpoint_every: 0,
            r_u: 128,
            r_v: 128,
            // The paper's count, not the authors' scripts' 512: see the field's doc.
            r_t: 128,
            hidden: 64,
            standardize: false,
            seed: 0,
            threads: 0,
        }
    }

    /// Discriminative ProbeX (multi-label, single-label or regression head).
    pub fn probex() -> TrainConfig {
        TrainConfig::new(ModelKind::Probex)
    }

    /// Zero-shot ProbeX (cosine logits against class text embeddings).
    pub fn probex_zeroshot() -> TrainConfig {
        TrainConfig::new(ModelKind::ProbexZeroshot)
    }

    /// The Dense baseline, with the discriminative defaults.
    pub fn dense() -> TrainConfig {
        TrainConfig::new(ModelKind::Dense)
    }

    /// The StatNN baseline, with the discriminative defaults.
    pub fn statnn() -> TrainConfig {
        TrainConfig::new(ModelKind::Statnn)
    }

    /// Checks ranges; the message names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Upper bounds catch a slip (epochs = 9223372036854775807 ran "forever", a width of
        // a billion asked for terabytes) with a message instead of a hang or an allocation
        // failure; each is far above any run that fits a machine.
        let counts = [
            ("batch_size", self.batch_size, 1, 1 << 24),
            ("epochs", self.epochs, 1, 1_000_000),
            ("validate_every", self.validate_every, 1, 1_000_000),
            ("checkpoint_every", self.checkpoint_every, 0, 1_000_000),
            ("r_u", self.r_u, 1, 1 << 16),
            ("r_v", self.r_v, 1, 1 << 16),
            ("r_t", self.r_t, 1, 1 << 16),
            ("hidden", self.hidden, 1, 1 << 16),
        ];
        for (k, v, min, max) in counts {
            if v < min {
                return Err(ConfigError::TooSmall { key: k, min });
            }
            if v > max {
                return Err(ConfigError::TooLarge {
                    key: k,
                    value: v,
                    max,
                });
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(ConfigError::NotPositive {
                key: "lr",
                value: self.lr,
            });
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(ConfigError::NegativeWeightDecay(self.weight_decay));
        }
        for (k, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(ConfigError::NotAFraction { key: k, value: v });
            }
        }
        if self.standardize && self.model == ModelKind::Statnn {
            return Err(ConfigError::StandardizeStatnn);
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(ConfigError::NotPositive {
                key: "eps",
                value: self.eps,
            });
        }
        Ok(())
    }

    /// Epoch interval of resume checkpoints.
    pub(crate) fn checkpoint_interval(&self) -> usize {
        if self.checkpoint_every == 0 {
            self.validate_every
        } else {
            self.checkpoint_every
        }
    }
}

/// A hyperparameter out of its range; the message names the key.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A count below its minimum.
    #[error("`{key}` must be at least {min}")]
    TooSmall {
        /// The key.
        key: &'static str,
        /// Its smallest allowed value.
        min: usize,
    },
    /// A count above its maximum (a slip such as `epochs = 9223372036854775807`).
    #[error("`{key}` = {value} is too large: at most {max}")]
    TooLarge {
        /// The key.
        key: &'static str,
        /// The value given.
        value: usize,
        /// Its largest allowed value.
        max: usize,
    },
    /// `lr` or `eps` not a positive finite number.
    #[error("`{key}` must be a positive number, got {value}")]
    NotPositive {
        /// The key.
        key: &'static str,
        /// The value given.
        value: f64,
    },
    /// A negative or non-finite `weight_decay`.
    #[error("`weight_decay` must be >= 0, got {0}")]
    NegativeWeightDecay(f64),
    /// `beta1` or `beta2` outside [0, 1).
    #[error("`{key}` must be in [0, 1), got {value}")]
    NotAFraction {
        /// The key.
        key: &'static str,
        /// The value given.
        value: f64,
    },
    /// `standardize = true` on a StatNN probe.
    #[error("`standardize` applies to matrix probes: statnn always standardises its statistics")]
    StandardizeStatnn,
}

impl ConfigError {
    /// The key whose value is wrong.
    pub fn key(&self) -> &'static str {
        match self {
            ConfigError::TooSmall { key, .. }
            | ConfigError::TooLarge { key, .. }
            | ConfigError::NotPositive { key, .. }
            | ConfigError::NotAFraction { key, .. } => key,
            ConfigError::NegativeWeightDecay(_) => "weight_decay",
            ConfigError::StandardizeStatnn => "standardize",
        }
    }
}

/// The on-disk form: everything optional but `model`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrainConfig {
    model: ModelKind,
    lr: Option<f64>,
    weight_decay: Option<f64>,
    beta1: Option<f64>,
    beta2: Option<f64>,
    eps: Option<f64>,
    batch_size: Option<usize>,
    epochs: Option<usize>,
    validate_every: Option<usize>,
    checkpoint_every: Option<usize>,
    r_u: Option<usize>,
    r_v: Option<usize>,
    r_t: Option<usize>,
    hidden: Option<usize>,
    standardize: Option<bool>,
    seed: Option<u64>,
    threads: Option<usize>,
}

impl From<RawTrainConfig> for TrainConfig {
    fn from(r: RawTrainConfig) -> Self {
        let d = TrainConfig::new(r.model);
        TrainConfig {
            model: r.model,
            lr: r.lr.unwrap_or(d.lr),
            weight_decay: r.weight_decay.unwrap_or(d.weight_decay),
            beta1: r.beta1.unwrap_or(d.beta1),
            beta2: r.beta2.unwrap_or(d.beta2),
            eps: r.eps.unwrap_or(d.eps),
            batch_size: r.batch_size.unwrap_or(d.batch_size),
            epochs: r.epochs.unwrap_or(d.epochs),
            validate_every: r.validate_every.unwrap_or(d.validate_every),
            checkpoint_every: r.checkpoint_every.unwrap_or(d.checkpoint_every),
            r_u: r.r_u.unwrap_or(d.r_u),
            r_v: r.r_v.unwrap_or(d.r_v),
            r_t: r.r_t.unwrap_or(d.r_t),
            hidden: r.hidden.unwrap_or(d.hidden),
            standardize: r.standardize.unwrap_or(d.standardize),
            seed: r.seed.unwrap_or(d.seed),
            threads: r.threads.unwrap_or(d.threads),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_depend_on_the_model_and_keys_override() {
        let c: TrainConfig = serde_json::from_str(r#"{"model": "probex-zeroshot"}"#).unwrap();
        assert_eq!(
            (c.lr, c.weight_decay, c.epochs, c.validate_every),
            (2e-3, 0.0, 200, 10)
        );
        let c: TrainConfig =
            serde_json::from_str(r#"{"model": "probex", "epochs": 7, "r_t": 512}"#).unwrap();
        assert_eq!(
            (c.lr, c.weight_decay, c.epochs, c.r_t),
            (1e-3, 1e-5, 7, 512)
        );
        assert_eq!(
            (c.batch_size, c.validate_every, c.r_u, c.r_v),
            (128, 25, 128, 128)
        );
    }

    /// The zero-shot default r_T is the paper's 128, not the authors' scripts' 512: at the
    /// paper's shape (SD layer 46, `attn2.to_q` [1280, 1280], CLIP ViT-L/14's 768-d text) it
    /// gives the poster's 2.5M parameters, 512 would give 9.1M.
    #[test]
    fn zero_shot_defaults_give_the_papers_parameter_count() {
        use crate::models::{ModelSpec, Net, ProbexZeroshot};
        use burn::module::Module;
        let c = TrainConfig::probex_zeroshot();
        assert_eq!((c.r_u, c.r_v, c.r_t), (128, 128, 128));
        let count = |r_t: usize| {
            let spec = ModelSpec {
                kind: ModelKind::ProbexZeroshot,
                d_h: 1280,
                d_w: 1280,
                r_u: c.r_u,
                r_v: c.r_v,
                r_t,
                d_y: 0,
                d_text: 768,
                hidden: 0,
            };
            let mut rng = probex_weights::rng::Rng::new(0, 0);
            ProbexZeroshot::<burn::backend::Flex>::init(&spec, &mut rng, &Default::default())
                .num_params()
        };
        assert_eq!(count(c.r_t), 2_523_392);
        assert_eq!(count(512), 9_110_528);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let e = serde_json::from_str::<TrainConfig>(r#"{"model": "probex", "learning_rate": 1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("learning_rate"), "{e}");
        let c: TrainConfig =
            serde_json::from_str(r#"{"model": "probex", "batch_size": 0}"#).unwrap();
        let e = c.validate().unwrap_err();
        assert_eq!(e.key(), "batch_size", "{e}");
        let e = serde_json::from_str::<TrainConfig>(r#"{"model": "mlp"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("probex-zeroshot"), "{e}");
    }

    #[test]
    fn range_errors_name_the_key() {
        let mut c = TrainConfig::probex();
        c.epochs = usize::MAX;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::TooLarge { key: "epochs", .. })
        ));
        let mut c = TrainConfig::statnn();
        c.standardize = true;
        assert_eq!(c.validate(), Err(ConfigError::StandardizeStatnn));
        let mut c = TrainConfig::probex();
        c.lr = -1.0;
        let e = c.validate().unwrap_err();
        assert_eq!(e.to_string(), "`lr` must be a positive number, got -1");
    }

    #[test]
    fn serialises_with_defaults_filled_in() {
        let v = serde_json::to_value(TrainConfig::dense()).unwrap();
        assert_eq!(v["model"], "dense");
        assert_eq!(v["epochs"], 500);
        let back: TrainConfig = serde_json::from_value(v).unwrap();
        assert_eq!(back, TrainConfig::dense());
    }
}
