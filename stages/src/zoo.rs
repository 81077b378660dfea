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
//! A text-conditioned LoRA tree also reads its text encoder's package, the one `lora.text.from`
//! names: `from = ["emoji", "minilm"]`, `lora = { text = { from = "minilm", ... } }`.
//! Every key of [`ZooConfig`] is a param (unknown keys are errors); the output is a byte-for-byte
//! function of them and of the package, so the key is too. The engine's `threads` sets the
//! worker count, which never changes the files.

use std::path::{Path, PathBuf};

use probex_engine::{InputSlot, Inputs, Outcome, ParamError, RunContext, Stage, StageResult};

use burn::backend::Flex;

use crate::extract;
use probex_fetch::collection::{self, Collection};
use probex_fetch::discover::{ModelSource, discover};
use probex_text::{self as text, Encoder};
use probex_zoo::{
    Phase, Progress, TextEmbedder, TreeKind, ZooConfig, ZooError, build_tree, layout::Layout,
};

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
    fn params_doc(&self) -> probex_engine::ParamsDoc {
        crate::params_doc::ZOO
    }
    fn output(&self) -> &'static str {
        collection::ARTIFACT
    }
    fn inputs(&self) -> Vec<InputSlot> {
        // The emoji package, and for a text-conditioned LoRA tree its encoder's package too.
        vec![InputSlot::many(probex_fetch::packages::ARTIFACT)]
    }

    fn check(&self, p: &ZooConfig) -> Result<(), ParamError> {
        p.validate().map_err(|e| match e {
            ZooError::Invalid { key, .. } => ParamError::at(key, e),
            e => ParamError::whole(e),
        })
    }

    fn run(&self, p: &ZooConfig, inputs: &Inputs, cx: &RunContext) -> StageResult<Outcome> {
        let (emoji, encoder_dir) = packages(p, inputs)?;
        let encoder = match (&p.lora.text, encoder_dir) {
            (Some(t), Some(dir)) => {
                cx.log(format!("text encoder {} from {}", t.encoder, dir.display()));
                Some(load_encoder(t.encoder, &dir)?)
            }
            _ => None,
        };
        let embed = |texts: &[String]| -> Result<Vec<Vec<f32>>, String> {
            let Some(e) = &encoder else {
                return Err("no text encoder".into());
            };
            text::embed_texts(e, texts).map_err(|e| format!("{e:#}"))
        };
        let text = encoder.as_ref().map(|_| &embed as &TextEmbedder<'_>);
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
        let report = match build_tree(&config, emoji, text, out, &progress) {
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

/// The emoji package's folder and, for a text-conditioned tree, the encoder's model folder: the
/// package input of stage `lora.text.from` (with `model_subdir`) is the encoder, the other one
/// the emoji.
fn packages<'a>(p: &ZooConfig, inputs: &'a Inputs) -> anyhow::Result<(&'a Path, Option<PathBuf>)> {
    let all = inputs.all(probex_fetch::packages::ARTIFACT);
    let text_from = p.lora.text.as_ref().map(|t| t.from.as_str());
    let (encoders, emoji): (Vec<_>, Vec<_>) = all
        .iter()
        .partition(|a| Some(a.stage.as_str()) == text_from);
    let [emoji] = emoji[..] else {
        let names: Vec<&str> = emoji.iter().map(|a| a.stage.as_str()).collect();
        if names.is_empty() {
            anyhow::bail!("`from` names no emoji package, only the text encoder's");
        }
        anyhow::bail!(
            "`from` names {} package stages ({}) where the zoo reads one emoji package; a text \
             encoder's package must be the one `lora.text.from` names",
            names.len(),
            names.join(", ")
        );
    };
    let encoder = match (&p.lora.text, &encoders[..]) {
        (None, _) => None,
        (Some(t), [pkg]) => Some(match &t.model_subdir {
            Some(sub) => pkg.dir.join(sub),
            None => pkg.dir.clone(),
        }),
        (Some(t), _) => anyhow::bail!(
            "`lora.text.from` = {:?} is not a package stage in this stage's `from`: add it there",
            t.from
        ),
    };
    Ok((&emoji.dir, encoder))
}

fn load_encoder(kind: text::EncoderKind, dir: &Path) -> anyhow::Result<Encoder<Flex>> {
    let device = Default::default();
    Encoder::<Flex>::load(kind, dir, &device).map_err(|e| {
        anyhow::anyhow!(
            "loading the `{kind}` text encoder from {}: {e:#}",
            dir.display()
        )
    })
}

/// The collection of what was written, found with the same discovery code that reads real
/// Model-J downloads (so a layout defect shows here, not in `extract`), with each model's split
/// from the build where the layout does not carry it.
fn collect(
    config: &ZooConfig,
    report: &probex_zoo::TreeReport,
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
    let split_of: std::collections::HashMap<PathBuf, probex_weights::dataset::Split> = report
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
