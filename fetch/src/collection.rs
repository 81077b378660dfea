//! A model collection: the `models` artifact that `fetch` and `zoo` produce and `extract`
//! reads. It lists model files (not their bytes: a local folder or the Hugging Face cache keeps
//! them), each with a stable id and, where the layout gives one, a split.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::discover::ModelSource;

/// File name of a collection inside its artifact directory.
pub const FILE: &str = "models.json";

/// The artifact type name of a collection.
pub const ARTIFACT: &str = "models";

/// A list of model files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Collection {
    /// Format version.
    pub format: u32,
    /// Where the models came from, for people (`dir:/data/model-j/DINO`, `zoo:mlp`).
    pub origin: String,
    /// The models, sorted by id. Relative paths are relative to the artifact directory.
    pub models: Vec<ModelSource>,
}

impl Collection {
    /// Current format version.
    pub const FORMAT: u32 = 1;

    /// A collection of `models` (sorted here by id).
    pub fn new(origin: impl Into<String>, mut models: Vec<ModelSource>) -> Self {
        models.sort_by(|a, b| a.id.cmp(&b.id));
        Collection {
            format: Self::FORMAT,
            origin: origin.into(),
            models,
        }
    }

    /// Writes `models.json` into `dir`.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let path = dir.join(FILE);
        std::fs::write(&path, serde_json::to_vec_pretty(self)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Reads the collection in artifact directory `dir`, resolving relative paths against it.
    pub fn load(dir: &Path) -> anyhow::Result<Collection> {
        let path = dir.join(FILE);
        let bytes = std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let mut c: Collection = serde_json::from_slice(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: not a model collection: {e}", path.display()))?;
        if c.format != Self::FORMAT {
            anyhow::bail!(
                "{}: collection format {} is not supported; run its stage again",
                path.display(),
                c.format
            );
        }
        for m in &mut c.models {
            if m.path.is_relative() {
                m.path = dir.join(&m.path);
            }
        }
        Ok(c)
    }

    /// Paths relative to `dir` where the file lies inside it (so cache entries stay movable).
    pub fn relative_to(mut self, dir: &Path) -> Self {
        for m in &mut self.models {
            if let Ok(rel) = m.path.strip_prefix(dir) {
                m.path = PathBuf::from(rel);
            }
        }
        self
    }
}
