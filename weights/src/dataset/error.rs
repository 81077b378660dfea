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
