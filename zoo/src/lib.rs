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
mod config;
mod discriminative;
mod draw;
pub mod emoji;
pub mod fixture;
pub mod layout;
mod lora;
pub mod nets;
mod report;
pub mod train;
mod workers;

pub use config::{
    Architecture, FinetuneConfig, HeadInit, LoraClasses, LoraConfig, LoraText, PretrainConfig,
    SplitFractions, TextEmbedder, TreeKind, ZooConfig,
};
pub use report::{
    BaseRecord, INDEX_FILE, ModelRecord, Phase, Progress, ProgressFn, Timings, TreeReport,
};
pub use workers::thread_cpu_seconds;

use std::path::Path;
use std::time::Instant;

/// Why a tree could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ZooError {
    /// The config is unusable.
    #[error("zoo config: {0}")]
    Config(String),
    /// A value of the config is out of range ([`ZooConfig::validate`]).
    #[error("zoo config: {problem}")]
    Invalid {
        /// The key, as a dotted path (`finetune.epochs`).
        key: &'static str,
        /// What is wrong with its value.
        problem: String,
    },
    /// The shipped class table is malformed (a build defect).
    #[error("zoo config: {0}")]
    Mapping(#[from] classes::MappingError),
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
    /// A defect of the zoo itself (a thread pool failed).
    #[error("zoo internal error: {0}")]
    Internal(String),
    /// A defect of the zoo itself: a net's state dict that does not fit it.
    #[error("zoo internal error: {0}")]
    State(#[from] nets::StateError),
}

impl ZooError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> ZooError {
        ZooError::Io {
            path: path.display().to_string(),
            source,
        }
    }
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
    let threads = workers::worker_count(config.threads);
    let mut report = match config.kind {
        TreeKind::Discriminative => {
            discriminative::build_discriminative(config, set, out_dir, threads, progress)?
        }
        TreeKind::Lora => lora::build_lora(config, set, text, out_dir, threads, progress)?,
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

#[cfg(test)]
mod tests;
