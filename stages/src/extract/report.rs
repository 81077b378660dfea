//! What an extraction reports: per layer, per run, and its errors.

use super::*;

/// A NaN/Inf finding in one model's layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NonFiniteFinding {
    /// Model id.
    pub model: String,
    /// The file.
    pub path: PathBuf,
    /// The layer (tensor name).
    pub layer: String,
    /// Number of NaN values in the matrix.
    pub nan: usize,
    /// Number of infinite values in the matrix.
    pub inf: usize,
    /// What was done (`failed`, `skipped`, `zeroed`).
    pub action: String,
}

/// The outcome of one layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    /// The layer.
    pub layer: LayerInfo,
    /// Its artifact directory.
    pub dir: PathBuf,
    /// Rows written.
    pub rows: usize,
    /// Models left out of this layer (label/split problems and this layer's own).
    pub skipped: Vec<Skipped>,
    /// The sidecar written to `dir`, so a caller need not read it back.
    pub sidecar: Sidecar,
}

/// What an extraction did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExtractReport {
    /// One entry per output, in the order given.
    pub layers: Vec<LayerReport>,
    /// Models left out of every layer (labels with `on_error = "skip"`, bad files when skipped).
    pub skipped: Vec<Skipped>,
    /// Every NaN/Inf finding, whatever the policy did with it.
    pub non_finite: Vec<NonFiniteFinding>,
    /// Model files visited.
    pub files: usize,
    /// Bytes of tensors read (plus headers).
    pub bytes_read: u64,
    /// Bytes written to layer files.
    pub bytes_written: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Why an extraction failed.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// The request itself is wrong (labels spec, no layers, ...).
    #[error("{0}")]
    Config(String),
    /// The label spec's options do not fit together.
    #[error(transparent)]
    Labels(#[from] probex_weights::labels::LabelSpecError),
    /// The rows' labels cannot be assembled.
    #[error(transparent)]
    Assemble(#[from] probex_weights::labels::AssembleError),
    /// A pattern of the `splits` table is not a usable glob.
    #[error(transparent)]
    Splits(#[from] probex_fetch::discover::GlobError),
    /// A file could not be read.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// Models failed; each message names the model, its file and the problem.
    #[error("{} model(s) failed:\n  {}{}", .0.len(), .0.iter().take(10).cloned().collect::<Vec<_>>().join("\n  "), if .0.len() > 10 { format!("\n  ... and {} more", .0.len() - 10) } else { String::new() })]
    Models(Vec<String>),
    /// Writing an output failed (a full disk): about the output, not the models.
    // Not `source`: thiserror would make it the error's source too, and a chain print
    // (`{:#}`) said the cause twice.
    #[error("{path}: {error}")]
    Io {
        /// The output file.
        path: String,
        /// The error.
        error: std::io::Error,
    },
}
