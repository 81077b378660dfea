//! The library behind the `evaluate` stage: metrics of a selected probe, the downstream tasks on
//! its encodings (one-class classification, kNN classification, retrieval) and the report tables.
//!
//! Everything here works on plain row-major `f32`/`f64` slices, so it needs no Burn and can be
//! checked against scikit-learn on the same numbers (see `stages/tests/golden/`).

pub mod downstream;
pub mod experts;
pub mod linalg;
pub mod metrics;
pub mod report;
pub mod stage;

use thiserror::Error;

pub use downstream::{
    ClassAuc, Encodings, KnnClassification, Neighbour, OneClassMethod, OneClassResult, Predictions,
    Targets, TieBreak, knn_classify, knn_scores, mahalanobis_scores, nearest, one_class_auc,
    one_query_per_class, retrieval_csv, retrieval_top_k,
};
pub use metrics::{
    LedoitWolf, ledoit_wolf, multilabel_accuracy, predict_by_cosine, roc_auc, top1_accuracy,
    top1_by_cosine,
};
pub use report::{
    Block, Column, MethodRow, Report, Section, format_params, render_table, table_csv,
};

/// Why an evaluation could not be computed. Messages say which input was wrong and how.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum EvalError {
    /// Two inputs that must describe the same rows (or dimensions) do not.
    #[error("{what}: expected {expected}, got {got}")]
    Shape {
        /// Which input and which dimension.
        what: String,
        /// The size implied by the other inputs.
        expected: usize,
        /// The size found.
        got: usize,
    },
    /// Inputs that cannot be read as the rows they claim to be (lengths not a multiple of d, ...).
    #[error("bad input: {0}")]
    Input(String),
    /// The metric is not defined for this input (e.g. ROC-AUC with a single class present).
    #[error("undefined: {0}")]
    Undefined(String),
    /// A value that must be a number is NaN.
    #[error("{0} contains NaN")]
    NaN(String),
    /// A numeric routine did not converge.
    #[error("{0}")]
    Numeric(String),
    /// A parameter is out of range (k = 0, ...).
    #[error("invalid parameter: {0}")]
    Param(String),
}
