//! What a fetch asks for: which repos and files ([`Request`]), and whole files or which
//! tensors ([`Mode`], [`TensorSelection`]).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::discover::{GlobError, glob_to_regex};
use probex_weights::reader::Header;
use probex_weights::{LayerList, LayerMode, LayerSelector};

/// The Model-J index dataset.
pub const MODEL_J_INDEX: &str = "ProbeX/Model-J";

/// The Model-J subsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ModelJ {
    /// google/vit-base-patch16-224 fine-tunes (one repo per model).
    SupViT,
    /// facebook/dino-vitb16 fine-tunes.
    #[serde(rename = "DINO")]
    Dino,
    /// facebook/vit-mae-base fine-tunes.
    #[serde(rename = "MAE")]
    Mae,
    /// microsoft/resnet-101 fine-tunes.
    ResNet,
    /// 5,000 SD LoRAs over 200 ImageNet classes (one bundled repo).
    #[serde(rename = "SD_200")]
    Sd200,
    /// 5,000 SD LoRAs over 1,000 ImageNet classes (one bundled repo).
    #[serde(rename = "SD_1k")]
    Sd1k,
}

impl ModelJ {
    /// The subset's name as Model-J spells it.
    pub fn name(self) -> &'static str {
        match self {
            ModelJ::SupViT => "SupViT",
            ModelJ::Dino => "DINO",
            ModelJ::Mae => "MAE",
            ModelJ::ResNet => "ResNet",
            ModelJ::Sd200 => "SD_200",
            ModelJ::Sd1k => "SD_1k",
        }
    }

    /// Whether the subset is one bundled repo of LoRAs (`{split}/model_idx_XXXX/...`).
    pub fn is_generative(self) -> bool {
        matches!(self, ModelJ::Sd200 | ModelJ::Sd1k)
    }
}

/// What to fetch: which repos, and which files in them are models.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// One model per repo: `file` in each repo; ids are the repo ids; no splits.
    Repos {
        /// Repo ids.
        repos: Vec<String>,
        /// The model file in each repo.
        file: String,
    },
    /// Several models in one repo: every file matching `pattern` (a glob on the repo path,
    /// `*` crossing `/`); ids are the paths without `.safetensors`; no splits.
    Glob {
        /// Repo id.
        repo: String,
        /// The glob.
        pattern: String,
    },
    /// Model-J generative layout in one repo: `{split}/{model dir}/{file}`; ids are the model
    /// dirs, splits from the path.
    ModelJGenerative {
        /// Repo id.
        repo: String,
        /// The file of each model.
        file: String,
    },
    /// A Model-J discriminative subset: the model repos and their splits from the index
    /// dataset; `file` in each repo.
    ModelJIndex {
        /// The subset (its parquet config in the index).
        subset: ModelJ,
        /// The index dataset repo id.
        index: String,
        /// The model file in each repo.
        file: String,
    },
}

/// Which tensors to fetch in tensors mode.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSelection {
    /// Tensor names or globs (`*` also crosses dots).
    pub tensors: Vec<String>,
    /// Layers, resolved against each file's header with the paper's indexing (for LoRA, the
    /// up factor comes along).
    pub layers: Option<LayerSelector>,
    /// The layer list `layers` counts in (as extract's `mode`).
    pub layer_mode: LayerMode,
}

impl TensorSelection {
    /// The names (sorted, unique) this selection picks in a file with `header`.
    pub fn resolve(&self, header: &Header) -> Result<Vec<String>, SelectionError> {
        let mut out = BTreeSet::new();
        for t in &self.tensors {
            if t.contains(['*', '?']) {
                let re = glob_to_regex(t)?;
                let before = out.len();
                out.extend(
                    header
                        .tensors
                        .iter()
                        .filter(|e| re.is_match(&e.name))
                        .map(|e| e.name.clone()),
                );
                if out.len() == before && !header.tensors.iter().any(|e| re.is_match(&e.name)) {
                    return Err(SelectionError::NoMatch(t.clone()));
                }
            } else if header.find(t).is_some() {
                out.insert(t.clone());
            } else {
                return Err(SelectionError::NoSuchTensor {
                    name: t.clone(),
                    similar: header
                        .tensors
                        .iter()
                        .filter(|e| e.name.contains(t.as_str()) || t.contains(e.name.as_str()))
                        .take(5)
                        .map(|e| e.name.clone())
                        .collect(),
                });
            }
        }
        if let Some(sel) = &self.layers {
            let list = LayerList::of(header, self.layer_mode)?;
            for i in list.select(sel)? {
                let r = &list.rows[i];
                out.insert(r.name.clone());
                if let Some(up) = &r.lora_up {
                    out.insert(up.clone());
                }
            }
        }
        if out.is_empty() {
            return Err(SelectionError::Empty);
        }
        Ok(out.into_iter().collect())
    }
}

/// Whole files or only the selected tensors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Whole files into the Hugging Face cache, checked against their sha256.
    Files,
    /// Only the header and the selected tensors, via HTTP Range.
    Tensors(TensorSelection),
}

/// Why a tensor selection picks nothing usable in a file.
#[derive(Debug, thiserror::Error)]
pub enum SelectionError {
    /// A glob in `tensors` that is not a pattern.
    #[error(transparent)]
    Glob(#[from] GlobError),
    /// A glob in `tensors` that matches nothing.
    #[error("tensor pattern `{0}` matches no tensor")]
    NoMatch(String),
    /// A name in `tensors` that the file does not have.
    #[error("no tensor is named `{name}`{}", similar_note(similar))]
    NoSuchTensor {
        /// The name.
        name: String,
        /// Up to five names that contain it or that it contains.
        similar: Vec<String>,
    },
    /// `layers` does not fit the file.
    #[error(transparent)]
    Layers(#[from] probex_weights::layers::LayerError),
    /// Nothing selected at all.
    #[error("the selection picks no tensor (give `tensors` or `layers`)")]
    Empty,
}

/// `; similar: a, b` or nothing.
fn similar_note(similar: &[String]) -> String {
    if similar.is_empty() {
        String::new()
    } else {
        format!("; similar: {}", similar.join(", "))
    }
}
