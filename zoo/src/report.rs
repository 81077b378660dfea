//! What a build tells its caller: progress while it runs, and the report (written as
//! [`INDEX_FILE`]) of every base and model it wrote.

use std::collections::BTreeMap;

use probex_weights::dataset::Split;
use serde::{Deserialize, Serialize};

use crate::ZooError;

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
