//! The text-embedding table: one vector per class name, the input of zero-shot probes.
//!
//! The `embed` stage writes it; `train` with `model = "probex-zeroshot"` reads it. On disk it
//! is two files in the artifact directory: `embeddings.safetensors` (tensor `embeddings`,
//! `[C, D]`, f32) and `embeddings.json` (the `C` names, in row order), so a Python user can
//! read it with `safetensors` and `json` alone.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::dataset::decode;

/// File name of the vectors inside a text-table directory.
pub const TENSORS_FILE: &str = "embeddings.safetensors";
/// File name of the names inside a text-table directory.
pub const NAMES_FILE: &str = "embeddings.json";
/// Name of the `[C, D]` tensor in [`TENSORS_FILE`].
pub const TENSOR_NAME: &str = "embeddings";

/// A class-name -> vector table (for example CLIP text embeddings of `"a photo of a {name}"`).
#[derive(Clone, Debug, PartialEq)]
pub struct TextTable {
    /// Class names, one per row of `vectors`.
    pub names: Vec<String>,
    /// Length of each vector.
    pub dim: usize,
    /// Row-major `[names.len(), dim]`.
    pub vectors: Vec<f32>,
}

/// Why a text table could not be read, written or used.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddingsError {
    /// File system error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The files (or the in-memory table) are not a consistent table.
    #[error("{path}: {message}")]
    Invalid {
        /// The file (or `<memory>`).
        path: String,
        /// What is wrong.
        message: String,
    },
}

fn invalid(path: &Path, message: impl std::fmt::Display) -> EmbeddingsError {
    EmbeddingsError::Invalid {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// A text table whose names and vectors do not agree ([`TextTable::validate`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// Vectors of no width.
    #[error("text vectors have dimension 0")]
    NoDimension,
    /// Values that do not fill one vector per name.
    #[error("{values} values for {names} names of dimension {dim}")]
    Count {
        /// The values held.
        values: usize,
        /// The names.
        names: usize,
        /// The width of a vector.
        dim: usize,
    },
    /// A name given twice with different vectors.
    #[error("name `{name}` appears twice (rows {first} and {second}) with different vectors")]
    Ambiguous {
        /// The name.
        name: String,
        /// Its first row.
        first: usize,
        /// The row that repeats it.
        second: usize,
    },
    /// A vector with NaN or an infinity.
    #[error("vector of `{0}` holds a non-finite value")]
    NonFinite(String),
}

impl TextTable {
    /// Checks that the names and vectors agree and that names are unique.
    pub fn validate(&self) -> Result<(), TableError> {
        if self.dim == 0 {
            return Err(TableError::NoDimension);
        }
        if self.vectors.len() != self.names.len() * self.dim {
            return Err(TableError::Count {
                values: self.vectors.len(),
                names: self.names.len(),
                dim: self.dim,
            });
        }
        // A vocabulary may repeat a name (a user's `classes` list may; ImageNet's first lemmas
        // have two "crane"s, which the authors' names used for labels tell apart); the same
        // prompt gives the same vector, so a repeat is only an error when its vector differs,
        // because then a lookup by name would be ambiguous.
        let mut seen = HashMap::new();
        for (i, n) in self.names.iter().enumerate() {
            if let Some(&j) = seen.get(n.as_str()) {
                if self.row(i) != self.row(j) {
                    return Err(TableError::Ambiguous {
                        name: n.clone(),
                        first: j,
                        second: i,
                    });
                }
            } else {
                seen.insert(n.as_str(), i);
            }
        }
        if let Some(i) = self.vectors.iter().position(|v| !v.is_finite()) {
            return Err(TableError::NonFinite(self.names[i / self.dim].clone()));
        }
        Ok(())
    }

    /// Builds a table from one vector per name; every vector must have the same width.
    pub fn from_rows(
        names: Vec<String>,
        rows: Vec<Vec<f32>>,
    ) -> Result<TextTable, EmbeddingsError> {
        let memory = Path::new("<memory>");
        if names.len() != rows.len() {
            return Err(invalid(
                memory,
                format!("{} names but {} embedding vectors", names.len(), rows.len()),
            ));
        }
        let dim = rows.first().map_or(0, Vec::len);
        let mut vectors = Vec::with_capacity(rows.len() * dim);
        for (name, row) in names.iter().zip(&rows) {
            if row.len() != dim {
                return Err(invalid(
                    memory,
                    format!(
                        "embedding of `{name}` has {} values, expected {dim}",
                        row.len()
                    ),
                ));
            }
            vectors.extend_from_slice(row);
        }
        let table = TextTable {
            names,
            dim,
            vectors,
        };
        table.validate().map_err(|m| invalid(memory, m))?;
        Ok(table)
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Row index of the first row named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// The vector of row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.vectors[i * self.dim..(i + 1) * self.dim]
    }

    /// The vector named `name`, if any.
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.index_of(name).map(|i| self.row(i))
    }

    /// Writes `embeddings.safetensors` and `embeddings.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), EmbeddingsError> {
        self.validate().map_err(|m| invalid(dir, m))?;
        let path = dir.join(TENSORS_FILE);
        let bytes: Vec<u8> = self.vectors.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = TensorView::new(Dtype::F32, vec![self.names.len(), self.dim], &bytes)
            .map_err(|e| invalid(&path, e.to_string()))?;
        safetensors::serialize_to_file([(TENSOR_NAME, view)], None, &path)
            .map_err(|e| invalid(&path, e.to_string()))?;
        let names_path = dir.join(NAMES_FILE);
        let json = serde_json::to_vec_pretty(&self.names)
            .map_err(|e| invalid(&names_path, e.to_string()))?;
        std::fs::write(&names_path, json).map_err(|source| EmbeddingsError::Io {
            path: names_path.display().to_string(),
            source,
        })
    }

    /// Reads a table written by [`TextTable::save`] (F32, F16, BF16 or F64 vectors).
    pub fn load(dir: &Path) -> Result<TextTable, EmbeddingsError> {
        let names_path = dir.join(NAMES_FILE);
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| EmbeddingsError::Io { path, source }
        };
        let raw = std::fs::read(&names_path).map_err(io(&names_path))?;
        let names: Vec<String> = serde_json::from_slice(&raw).map_err(|e| {
            invalid(
                &names_path,
                format!("expected a JSON list of class names: {e}"),
            )
        })?;
        let path = dir.join(TENSORS_FILE);
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| invalid(&path, e.to_string()))?;
        let t = st
            .tensor(TENSOR_NAME)
            .map_err(|e| invalid(&path, format!("tensor `{TENSOR_NAME}`: {e}")))?;
        let &[c, dim] = t.shape() else {
            return Err(invalid(
                &path,
                format!(
                    "tensor `{TENSOR_NAME}` has shape {:?}, expected [classes, dim]",
                    t.shape()
                ),
            ));
        };
        if c != names.len() {
            return Err(invalid(
                &path,
                format!(
                    "tensor `{TENSOR_NAME}` has {c} rows but {} lists {} names",
                    NAMES_FILE,
                    names.len()
                ),
            ));
        }
        let vectors = decode(t.dtype(), t.data()).map_err(|m| invalid(&path, m))?;
        let table = TextTable {
            names,
            dim,
            vectors,
        };
        table.validate().map_err(|m| invalid(&path, m))?;
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_looks_up() {
        let dir = tempfile::tempdir().unwrap();
        let t = TextTable {
            names: vec!["tabby cat".into(), "dog".into()],
            dim: 3,
            vectors: vec![1.0, 2.0, 3.0, -1.0, 0.5, 0.25],
        };
        t.save(dir.path()).unwrap();
        let back = TextTable::load(dir.path()).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.get("dog"), Some(&[-1.0, 0.5, 0.25][..]));
        assert_eq!(back.get("cow"), None);
    }

    #[test]
    fn rejects_duplicates_and_row_mismatch() {
        let t = TextTable {
            names: vec!["a".into(), "a".into()],
            dim: 1,
            vectors: vec![1.0, 2.0],
        };
        let e = t.validate().unwrap_err();
        assert!(matches!(e, TableError::Ambiguous { .. }), "{e:?}");
        assert!(e.to_string().contains("twice"), "{e}");
        let same = TextTable::from_rows(vec!["crane".into(), "crane".into()], vec![vec![1.0]; 2]);
        assert_eq!(same.unwrap().index_of("crane"), Some(0));
        let ragged = TextTable::from_rows(vec!["a".into(), "b".into()], vec![vec![1.0], vec![]]);
        assert!(ragged.unwrap_err().to_string().contains("`b`"));
        let dir = tempfile::tempdir().unwrap();
        let ok = TextTable {
            names: vec!["a".into(), "b".into()],
            dim: 1,
            vectors: vec![1.0, 2.0],
        };
        ok.save(dir.path()).unwrap();
        std::fs::write(dir.path().join(NAMES_FILE), r#"["a"]"#).unwrap();
        let err = TextTable::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("2 rows") && err.contains("1 names"), "{err}");
    }
}
