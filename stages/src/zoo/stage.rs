//! The `zoo` stage kind: a model tree built from a packaged emoji dataset, as a model
//! collection that `extract` reads exactly as it reads Model-J.
//!
//! ```toml
//! [stage.emoji]
//! kind = "fetch"
//! source = "npm"
//! package = "emoji-datasource"
//! version = "16.0.0"
//! sha256 = "2006725061dc0098daa832d65f854a7bec0740af2eb47cb5b23d89f7e2c849f9"
//!
//! [stage.tree]
//! kind = "zoo"
//! from = "emoji"
//! name = "MiniMLP"
//! models = 300
//! seed = 0
//! finetune = { epochs = [4, 6, 8] }
//! ```
//! Every key of [`ZooConfig`] is a param (unknown keys are errors); the output is a byte-for-byte
//! function of them and of the package, so the key is too. The engine's `threads` sets the
//! worker count, which never changes the files.

use std::path::{Path, PathBuf};

use probex_engine::{InputSlot, Inputs, Outcome, RunContext, Stage, StageResult};

use super::{Phase, Progress, TreeKind, ZooConfig, ZooError, build_tree, layout::Layout};
use crate::collection::{self, Collection};
use crate::extract::{self, ModelSource, discover};

/// The `zoo` stage kind.
pub struct Zoo;

impl Stage for Zoo {
    type Params = ZooConfig;

    fn kind(&self) -> &'static str {
        "zoo"
    }
    fn version(&self) -> u32 {
        // 2: LoRA splits stratified by class.
        2
    }
    fn about(&self) -> &'static str {
        "build a model tree (MLP, ViT or LoRA) from packaged emoji art, in Model-J's layout"
    }
    fn output(&self) -> &'static str {
        collection::ARTIFACT
    }
    fn inputs(&self) -> Vec<InputSlot> {
        vec![InputSlot::one(crate::packages::ARTIFACT)]
    }

    fn check(&self, p: &ZooConfig) -> Result<(), String> {
        p.validate().map_err(|e| e.to_string())
    }

    fn run(&self, p: &ZooConfig, inputs: &Inputs, cx: &RunContext) -> StageResult<Outcome> {
        let emoji = &inputs.one(crate::packages::ARTIFACT)?.dir;
        let mut config = p.clone();
        config.threads = cx.threads().max(1);
        let out = cx.out_dir();
        let progress = |pr: &Progress<'_>| {
            if cx.is_cancelled() {
                return Err(ZooError::Cancelled);
            }
            let what = match pr.phase {
                Phase::Data => "reading the emoji package",
                Phase::Base => "pretraining the base",
                Phase::Models => "fine-tuning",
            };
            cx.progress(
                pr.done as u64,
                pr.total as u64,
                &format!("{} {what}", pr.tree),
            );
            Ok(())
        };
        let report = match build_tree(&config, emoji, out, &progress) {
            Err(ZooError::Cancelled) => {
                cx.check_cancelled()?;
                anyhow::bail!("cancelled")
            }
            r => r?,
        };
        let models = collect(&config, &report, out)?;
        let n = models.len();
        Collection::new(format!("zoo:{}", config.name), models)
            .relative_to(out)
            .save(out)?;
        let t = &report.timings;
        cx.log(format!(
            "{n} models in {} tree(s), {} classes ({} missing from the package); base score {}; \
             {:.3}s per model single-threaded, {:.1}s in all on {} threads",
            report.bases.len(),
            report.classes.len(),
            report.missing_classes.len(),
            report
                .bases
                .iter()
                .map(|b| format!("{:.3}", b.score))
                .collect::<Vec<_>>()
                .join(", "),
            t.per_model_s,
            t.total_s,
            t.threads
        ));
        Ok(Outcome {
            meta: serde_json::json!({
                "models": n,
                "classes": report.classes.len(),
                "missing_classes": report.missing_classes,
                "holdout_classes": report.holdout_classes,
                "bases": report.bases,
            }),
            ..Outcome::default()
        })
    }
}

/// The collection of what was written, found with the same discovery code that reads real
/// Model-J downloads (so a layout defect shows here, not in `extract`), with each model's split
/// from the build where the layout does not carry it.
fn collect(
    config: &ZooConfig,
    report: &super::TreeReport,
    out: &Path,
) -> anyhow::Result<Vec<ModelSource>> {
    let layout = match (config.kind, config.layout) {
        (TreeKind::Discriminative, Layout::HfCache) => extract::Layout::HfCache {
            root: out.to_path_buf(),
            repos: None,
            file: "model.safetensors".into(),
            revision: "main".into(),
        },
        (TreeKind::Discriminative, Layout::Splits) => extract::Layout::ModelJDiscriminative {
            root: out.to_path_buf(),
            file: "model.safetensors".into(),
        },
        (TreeKind::Lora, _) => {
            // `{root}/{split}/model_idx_XXXX/pytorch_lora_weights.safetensors`
            let first = report
                .models
                .first()
                .ok_or_else(|| anyhow::anyhow!("the zoo wrote no models"))?;
            let root: PathBuf = out
                .join(&first.path)
                .ancestors()
                .nth(3)
                .map_or_else(|| out.to_path_buf(), Path::to_path_buf);
            extract::Layout::ModelJGenerative {
                root,
                file: "pytorch_lora_weights.safetensors".into(),
            }
        }
    };
    let found = discover(&layout).map_err(anyhow::Error::msg)?;
    if found.models.len() != report.models.len() {
        anyhow::bail!(
            "zoo defect: wrote {} models but discovery finds {} ({})",
            report.models.len(),
            found.models.len(),
            found.notes.join("; ")
        );
    }
    let split_of: std::collections::HashMap<PathBuf, crate::dataset::Split> = report
        .models
        .iter()
        .map(|m| (out.join(&m.path), m.split))
        .collect();
    Ok(found
        .models
        .into_iter()
        .map(|mut m| {
            if m.split.is_none() {
                m.split = split_of.get(&m.path).copied();
            }
            m
        })
        .collect())
}
