//! The text-embedding table: one vector per class name, the artifact of the `embed` stage and an
//! input of the zero-shot probe.
//!
//! On disk (artifact type `"embeddings"`):
//! - `embeddings.safetensors`: one F32 tensor `embeddings` of shape `[C, D]`, row `i` for class `i`;
//! - `embeddings.json`: `{"names": [...]}`, the `C` class names in row order.
//!
//! Rows follow the label-column order of the layer dataset they were made from, so a class index
//! is a row index; names may repeat (ImageNet has two "crane"s), so look rows up by index.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, bail};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

/// File holding the `[C, D]` tensor.
pub const TENSORS_FILE: &str = "embeddings.safetensors";
/// File holding the class names.
pub const NAMES_FILE: &str = "embeddings.json";
/// Name of the tensor inside [`TENSORS_FILE`].
pub const TENSOR_NAME: &str = "embeddings";

/// A table of text embeddings: `names[i]` is embedded as `vectors[i * dim..(i + 1) * dim]`.
#[derive(Clone, Debug, PartialEq)]
pub struct TextTable {
    /// Class names (not the prompts), in row order.
    pub names: Vec<String>,
    /// Width of every vector.
    pub dim: usize,
    /// Row-major `[names.len(), dim]`.
    pub vectors: Vec<f32>,
}

#[derive(Serialize, Deserialize)]
struct NamesFile {
    names: Vec<String>,
}

impl TextTable {
    /// Builds a table from one vector per name; every vector must have the same width.
    pub fn from_rows(names: Vec<String>, rows: Vec<Vec<f32>>) -> anyhow::Result<TextTable> {
        if names.len() != rows.len() {
            bail!("{} names but {} embedding vectors", names.len(), rows.len());
        }
        let dim = rows.first().map_or(0, Vec::len);
        let mut vectors = Vec::with_capacity(rows.len() * dim);
        for (name, row) in names.iter().zip(&rows) {
            if row.len() != dim {
                bail!(
                    "embedding of `{name}` has {} values, expected {dim}",
                    row.len()
                );
            }
            vectors.extend_from_slice(row);
        }
        Ok(TextTable {
            names,
            dim,
            vectors,
        })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The vector of row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.vectors[i * self.dim..(i + 1) * self.dim]
    }

    /// Row index of the first row named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// Map from name to the first row with that name.
    pub fn index(&self) -> HashMap<&str, usize> {
        let mut m = HashMap::new();
        for (i, n) in self.names.iter().enumerate() {
            m.entry(n.as_str()).or_insert(i);
        }
        m
    }

    /// Writes [`TENSORS_FILE`] and [`NAMES_FILE`] into `dir` (which must exist).
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        if self.vectors.len() != self.names.len() * self.dim {
            bail!(
                "text table holds {} values, expected {} names x {} dims",
                self.vectors.len(),
                self.names.len(),
                self.dim
            );
        }
        let bytes: Vec<u8> = self.vectors.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = TensorView::new(Dtype::F32, vec![self.names.len(), self.dim], &bytes)
            .context("building the embeddings tensor")?;
        let path = dir.join(TENSORS_FILE);
        safetensors::serialize_to_file([(TENSOR_NAME, view)], None, &path)
            .with_context(|| format!("writing {}", path.display()))?;
        let path = dir.join(NAMES_FILE);
        let json = serde_json::to_vec_pretty(&NamesFile {
            names: self.names.clone(),
        })?;
        std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Reads a table written by [`TextTable::save`], checking that names and rows agree.
    pub fn load(dir: &Path) -> anyhow::Result<TextTable> {
        let names_path = dir.join(NAMES_FILE);
        let text = std::fs::read(&names_path)
            .with_context(|| format!("reading {}", names_path.display()))?;
        let NamesFile { names } = serde_json::from_slice(&text).with_context(|| {
            format!(
                "{}: expected {{\"names\": [...]}} (the class names of the rows)",
                names_path.display()
            )
        })?;
        let path = dir.join(TENSORS_FILE);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let st = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        let t = st
            .tensor(TENSOR_NAME)
            .with_context(|| format!("{}: no tensor `{TENSOR_NAME}`", path.display()))?;
        let &[rows, dim] = t.shape() else {
            bail!(
                "{}: tensor `{TENSOR_NAME}` has shape {:?}, expected [classes, dim]",
                path.display(),
                t.shape()
            );
        };
        if rows != names.len() {
            bail!(
                "{}: tensor `{TENSOR_NAME}` has {rows} rows but {} lists {} names",
                path.display(),
                names_path.display(),
                names.len()
            );
        }
        let vectors = crate::dataset::decode(t.dtype(), t.data())
            .map_err(|e| anyhow::anyhow!("{}: tensor `{TENSOR_NAME}`: {e}", path.display()))?;
        Ok(TextTable {
            names,
            dim,
            vectors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let t = TextTable::from_rows(
            vec!["apple".into(), "maple_tree".into(), "apple".into()],
            vec![vec![1.0, 2.0], vec![-0.5, 0.25], vec![3.0, 4.0]],
        )
        .unwrap();
        t.save(dir.path()).unwrap();
        let back = TextTable::load(dir.path()).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.row(1), &[-0.5, 0.25]);
        assert_eq!(back.index_of("apple"), Some(0));
        assert_eq!(back.index()["apple"], 0);
    }

    #[test]
    fn ragged_rows_and_mismatched_files_are_errors() {
        let e = TextTable::from_rows(vec!["a".into(), "b".into()], vec![vec![1.0], vec![]]);
        assert!(format!("{:#}", e.unwrap_err()).contains("`b`"));

        let dir = tempfile::tempdir().unwrap();
        let t = TextTable::from_rows(vec!["a".into()], vec![vec![1.0, 2.0]]).unwrap();
        t.save(dir.path()).unwrap();
        std::fs::write(dir.path().join(NAMES_FILE), r#"{"names": ["a", "b"]}"#).unwrap();
        let e = format!("{:#}", TextTable::load(dir.path()).unwrap_err());
        assert!(e.contains("1 rows") && e.contains("2 names"), "{e}");
    }
}
