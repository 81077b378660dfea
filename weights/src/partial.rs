//! Partial model files: valid safetensors files that hold only some tensors of a larger
//! original (what `fetch` writes in `tensors` mode), with the original's tensor table kept in
//! `__metadata__` so that layer indices stay the paper's.
//!
//! Layer `N` is the `N`-th name of the sorted list of *all* the original file's tensors (or of
//! its LoRA down factors); a file holding 2 of 74 tensors must still call
//! `vit.encoder.layer.7.attention.output.dense.weight` layer 59. So the writer records the full
//! original table (name, dtype, shape) under [`ORIGINAL_TENSORS_KEY`], and [`layer_rows`] and
//! [`layer_index`] read it whenever it is present.
//!
//! [`layer_rows`]: super::layers::layer_rows
//! [`layer_index`]: super::layers::layer_index

use std::collections::BTreeMap;

use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use super::reader::{Header, TensorEntry};

/// Reserved `__metadata__` key holding the original file's tensor table (JSON list of
/// `{name, dtype, shape}`, sorted by name).
pub const ORIGINAL_TENSORS_KEY: &str = "probex.original_tensors";

/// Reserved `__metadata__` key naming where a partial file came from (`repo@commit/file`), for
/// people reading it.
pub const SOURCE_KEY: &str = "probex.source";

/// Most tensors an original table may list: far above any real model (a ViT has 74 tensors, an
/// SD LoRA 256), and a cap on what a hostile table can make us allocate.
const MAX_ORIGINAL_TENSORS: usize = 1_000_000;

/// One tensor of the original file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginalTensor {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
}

/// The table to record for an original file with this (validated) header, as the JSON text
/// stored under [`ORIGINAL_TENSORS_KEY`].
pub fn encode(original: &Header) -> String {
    let table: Vec<OriginalTensor> = original
        .tensors
        .iter()
        .map(|t| OriginalTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect();
    // Serialising plain strings, enums and integers cannot fail.
    serde_json::to_string(&table).unwrap_or_default()
}

/// Why a partial file's original tensor table cannot be trusted (the file is corrupt).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PartialError {
    /// The metadata value is not a tensor table.
    #[error(
        "metadata key `{ORIGINAL_TENSORS_KEY}` is not a tensor table ({0}); the partial file is \
         corrupt: fetch it again"
    )]
    NotATable(String),
    /// More tensors than supported.
    #[error(
        "metadata key `{ORIGINAL_TENSORS_KEY}` lists {0} tensors, more than the \
         {MAX_ORIGINAL_TENSORS} supported"
    )]
    TooMany(usize),
    /// A shape whose element count overflows.
    #[error(
        "metadata key `{ORIGINAL_TENSORS_KEY}`: tensor `{name}` has shape {shape:?}, which \
         overflows"
    )]
    Overflows {
        /// The tensor.
        name: String,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A name listed twice.
    #[error("metadata key `{ORIGINAL_TENSORS_KEY}` lists tensor `{0}` twice")]
    Twice(String),
    /// A tensor of the file missing from the table.
    #[error(
        "tensor `{0}` is in the file but not in its original tensor list \
         (`{ORIGINAL_TENSORS_KEY}`): the partial file is corrupt; fetch it again"
    )]
    NotListed(String),
    /// A tensor whose dtype or shape differs from the table's.
    #[error(
        "tensor `{name}` is {file} in the file but {listed} in its original tensor list: the \
         partial file is corrupt; fetch it again"
    )]
    Differs {
        /// The tensor.
        name: String,
        /// Its dtype and shape in the file.
        file: String,
        /// Its dtype and shape in the table.
        listed: String,
    },
}

/// The original file's header as far as layers are concerned (names, dtypes, shapes; spans are
/// empty), or `None` when `header` is not a partial file.
///
/// The table is checked: names unique, shapes that do not overflow, and every tensor the file
/// actually holds listed with the same dtype and shape (otherwise the file is corrupt and its
/// indices cannot be trusted).
pub fn original(header: &Header) -> Result<Option<Header>, PartialError> {
    let Some(text) = header.metadata.get(ORIGINAL_TENSORS_KEY) else {
        return Ok(None);
    };
    let table: Vec<OriginalTensor> =
        serde_json::from_str(text).map_err(|e| PartialError::NotATable(e.to_string()))?;
    if table.len() > MAX_ORIGINAL_TENSORS {
        return Err(PartialError::TooMany(table.len()));
    }
    let mut tensors = Vec::with_capacity(table.len());
    for t in table {
        if t.shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .is_none()
        {
            return Err(PartialError::Overflows {
                name: t.name,
                shape: t.shape,
            });
        }
        tensors.push(TensorEntry {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
            span: 0..0,
        });
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = tensors.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(PartialError::Twice(w[0].name.clone()));
    }
    let by_name: BTreeMap<&str, &TensorEntry> =
        tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    for t in &header.tensors {
        match by_name.get(t.name.as_str()) {
            None => {
                return Err(PartialError::NotListed(t.name.clone()));
            }
            Some(o) if o.dtype != t.dtype || o.shape != t.shape => {
                return Err(PartialError::Differs {
                    name: t.name.clone(),
                    file: format!("{:?} {:?}", t.dtype, t.shape),
                    listed: format!("{:?} {:?}", o.dtype, o.shape),
                });
            }
            Some(_) => {}
        }
    }
    Ok(Some(Header {
        tensors,
        metadata: header.metadata.clone(),
        data_start: 0,
        file_len: 0,
    }))
}
