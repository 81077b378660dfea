//! A pinned request: every model with its commit ([`Plan`]), whose digest is the fetch stage's
//! identity.

use serde::{Deserialize, Serialize};

use probex_weights::dataset::Split;

/// One model as planned: where it is, pinned to a commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedModel {
    /// The model's id in the collection.
    pub id: String,
    /// Its split, when the request gives one.
    pub split: Option<Split>,
    /// The repo id.
    pub repo: String,
    /// The revision asked for in this repo (`main`).
    pub revision: String,
    /// The commit sha the revision resolved to.
    pub commit: String,
    /// The file in the repo.
    pub file: String,
}

/// A pinned request: every model with its commit. Its digest is the fetch stage's identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The revision asked for (`main`), as recorded in the caches' refs.
    pub revision: String,
    /// The models, sorted by id.
    pub models: Vec<PlannedModel>,
    /// For Model-J discriminative subsets: the index dataset and its commit.
    pub index: Option<(String, String)>,
    /// Other files of each model's repo fetched whole beside it (`config.json`,
    /// `tokenizer.json`: what a text encoder needs besides its weights). In tensors mode each
    /// model then gets its own folder holding the partial file and these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_files: Vec<String>,
}

impl Plan {
    /// A digest of everything the plan pins (repo ids, commits, files, ids, splits).
    pub fn digest(&self) -> String {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        blake3::hash(&bytes).to_hex().to_string()
    }
}
