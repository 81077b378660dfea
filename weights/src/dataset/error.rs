//! Why a layer dataset could not be read or written.

use std::path::Path;

use super::{ModelRecord, RowError};

/// Why a layer dataset could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A row could not be read (a model file an in-place dataset reads changed or vanished,
    /// or a row past the end was asked for).
    #[error("{0}")]
    Row(String),
    /// A row read in place from a model file holds NaN or infinite values.
    #[error(
        "model `{model}`: its layer `{layer}` holds NaN or infinite values ({detail}). This \
         layer dataset reads the model files in place and checks their values when it reads \
         them; set non_finite = \"skip\" (leave the model out) or \"zero\" on its extract \
         stage"
    )]
    NonFinite {
        /// The model's id.
        model: String,
        /// The layer's tensor name.
        layer: String,
        /// Where, and how many.
        detail: String,
    },
    /// File system error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The files exist but do not hold a consistent layer dataset.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// [`DatasetError::NonFinite`] naming the row's model for non-finite values; `stale` of the
/// message for any other row error.
/// A layer dataset whose parts disagree ([`super::LayerDataset::validate`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Inconsistent {
    /// On-disk rows that do not match the models.
    #[error("{rows} rows on disk for {models} models")]
    RowsOnDisk {
        /// Rows on disk.
        rows: usize,
        /// Models.
        models: usize,
    },
    /// A tensor part whose values do not fill its shape.
    #[error("`{part}` holds {values} values, expected {shape:?} = {expected}")]
    Values {
        /// The part (`weights`, `up`, `down`).
        part: String,
        /// The values it holds.
        values: usize,
        /// Its shape.
        shape: Vec<usize>,
        /// The values the shape needs.
        expected: usize,
    },
    /// Model records that do not match the rows.
    #[error("{models} model records for {rows} rows")]
    Models {
        /// Model records.
        models: usize,
        /// Rows.
        rows: usize,
    },
    /// Labels that do not match the rows.
    #[error("{labels} labels for {rows} rows")]
    Labels {
        /// Labels.
        labels: usize,
        /// Rows.
        rows: usize,
    },
    /// A class target past the class list.
    #[error("class target {target} out of range ({classes} classes)")]
    Target {
        /// The target.
        target: u32,
        /// How many classes there are.
        classes: usize,
    },
}

pub(super) fn non_finite_or(
    e: RowError,
    models: &[ModelRecord],
    layer: &str,
    stale: impl FnOnce(String) -> DatasetError,
) -> DatasetError {
    match e {
        RowError::NonFinite { row, .. } => DatasetError::NonFinite {
            model: models
                .get(row)
                .map_or_else(|| format!("row {row}"), |m| m.id.clone()),
            layer: layer.to_string(),
            detail: e.to_string(),
        },
        RowError::Stale(m) => stale(m),
    }
}

pub(super) fn invalid(path: &Path, message: impl std::fmt::Display) -> DatasetError {
    DatasetError::Invalid {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

pub(super) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io {
        path: path.display().to_string(),
        source,
    }
}
