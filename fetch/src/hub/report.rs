//! What a fetch did ([`FetchReport`]).

use serde::Serialize;

use crate::discover::ModelSource;

/// What a fetch did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FetchReport {
    /// The models, ready for a [`crate::collection::Collection`].
    #[serde(skip)]
    pub models: Vec<ModelSource>,
    /// Body bytes received over the network in this run.
    pub bytes_transferred: u64,
    /// Bytes of tensor data (or files) that came from the local caches instead.
    pub bytes_cached: u64,
    /// Full size of the remote files involved, where known (what whole-file downloads cost).
    pub remote_file_bytes: u64,
    /// Requests sent.
    pub requests: u64,
    /// Retries made.
    pub retries: u64,
    /// Responses that ignored `Range`.
    pub range_ignored: u64,
    /// Wall time.
    pub seconds: f64,
}
