//! The `fetch` stage: a model collection from a local folder in one of the layouts Model-J and
//! the Hugging Face cache use.
//!
//! ```toml
//! [stage.models]
//! kind = "fetch"
//! source = "dir"
//! path = "data/model-j/SD_200"          # relative to the experiment file
//! layout = "model_j_generative"         # hf_cache | model_j_discriminative | model_j_generative | folder
//! ```
//! The key includes the content digest of every model file (a stat cache keeps this cheap), so
//! editing or adding a model reruns everything downstream of it.

use std::path::{Path, PathBuf};

use probex_engine::{InputSlot, Inputs, Outcome, PlanContext, RunContext, Stage, StageResult};
use serde::{Deserialize, Serialize};

use crate::collection::{self, Collection};
use crate::extract::{Layout, discover};

/// Where the models come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A local folder.
    Dir,
}

/// How model files are laid out in a folder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayoutKind {
    /// A Hugging Face hub cache (`models--org--name/snapshots/<sha>/model.safetensors`).
    HfCache,
    /// Model-J discriminative download (`{split}/<repo dirs>/model.safetensors`).
    ModelJDiscriminative,
    /// Model-J generative (`{split}/model_idx_XXXX/pytorch_lora_weights.safetensors`).
    ModelJGenerative,
    /// A plain folder of `.safetensors` files.
    #[default]
    Folder,
}

/// Parameters of `fetch`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchParams {
    /// Where the models come from.
    pub source: Source,
    /// The folder (relative paths resolve against the experiment file).
    pub path: String,
    /// How the folder is laid out.
    #[serde(default)]
    pub layout: LayoutKind,
    /// The file inside each model's folder (Model-J layouts and hf_cache); default by layout.
    #[serde(default)]
    pub file: Option<String>,
    /// hf_cache: only repos whose id matches this glob.
    #[serde(default)]
    pub repos: Option<String>,
    /// hf_cache: the ref to read (default `main`).
    #[serde(default)]
    pub revision: Option<String>,
    /// folder: also look in subfolders.
    #[serde(default)]
    pub recursive: bool,
}

impl FetchParams {
    fn layout(&self, base: &Path) -> Layout {
        let root = base.join(&self.path);
        let file = |default: &str| self.file.clone().unwrap_or_else(|| default.to_string());
        match self.layout {
            LayoutKind::HfCache => Layout::HfCache {
                root,
                repos: self.repos.clone(),
                file: file("model.safetensors"),
                revision: self.revision.clone().unwrap_or_else(|| "main".into()),
            },
            LayoutKind::ModelJDiscriminative => Layout::ModelJDiscriminative {
                root,
                file: file("model.safetensors"),
            },
            LayoutKind::ModelJGenerative => Layout::ModelJGenerative {
                root,
                file: file("pytorch_lora_weights.safetensors"),
            },
            LayoutKind::Folder => Layout::Folder {
                root,
                recursive: self.recursive,
            },
        }
    }
}

/// The `fetch` stage kind.
pub struct Fetch;

impl Stage for Fetch {
    type Params = FetchParams;

    fn kind(&self) -> &'static str {
        "fetch"
    }
    fn version(&self) -> u32 {
        1
    }
    fn about(&self) -> &'static str {
        "a model collection from a local folder (Model-J or Hugging Face cache layouts)"
    }
    fn output(&self) -> &'static str {
        collection::ARTIFACT
    }
    fn inputs(&self) -> Vec<InputSlot> {
        Vec::new()
    }

    fn check(&self, p: &FetchParams) -> Result<(), String> {
        if p.path.trim().is_empty() {
            return Err("`path` is empty: give the folder holding the models".into());
        }
        if p.layout != LayoutKind::HfCache && (p.repos.is_some() || p.revision.is_some()) {
            return Err("`repos` and `revision` apply only to layout = \"hf_cache\"".into());
        }
        if p.layout != LayoutKind::Folder && p.recursive {
            return Err("`recursive` applies only to layout = \"folder\"".into());
        }
        Ok(())
    }

    fn identity(&self, p: &FetchParams, cx: &PlanContext) -> StageResult<Option<String>> {
        let found = discover(&p.layout(cx.base_dir)).map_err(anyhow::Error::msg)?;
        if found.models.is_empty() {
            anyhow::bail!(
                "no model files found under {}",
                cx.base_dir.join(&p.path).display()
            );
        }
        let mut h = blake3::Hasher::new();
        for m in &found.models {
            let digest = cx
                .digests
                .digest(&m.path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", m.path.display()))?;
            h.update(m.id.as_bytes());
            h.update(&[0]);
            h.update(m.split.map_or("", |s| s.as_str()).as_bytes());
            h.update(&[0]);
            h.update(digest.as_bytes());
        }
        Ok(Some(h.finalize().to_hex().to_string()))
    }

    fn run(&self, p: &FetchParams, _inputs: &Inputs, cx: &RunContext) -> StageResult<Outcome> {
        let layout = p.layout(cx.base_dir());
        let found = discover(&layout).map_err(anyhow::Error::msg)?;
        for note in &found.notes {
            cx.log(note);
        }
        let root = absolute(&cx.base_dir().join(&p.path));
        let n = found.models.len();
        let models = found
            .models
            .into_iter()
            .map(|mut m| {
                m.path = absolute(&m.path);
                m
            })
            .collect();
        Collection::new(format!("dir:{}", root.display()), models).save(cx.out_dir())?;
        cx.log(format!("{n} models under {}", root.display()));
        Ok(Outcome {
            meta: serde_json::json!({ "models": n }),
            ..Outcome::default()
        })
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}
