//! Fetching model collections from the Hugging Face Hub: whole files into the shared Hugging
//! Face cache, or only the tensors a probe needs through HTTP Range requests.
//!
//! The split of work: hf-hub 1.0's blocking client makes the API calls (resolving a revision
//! to a commit, listing a repo's files), and [`http`] moves bytes (resumable downloads, Range
//! reads that check for `206`, retries honouring `Retry-After`), because hf-hub's downloads do
//! neither. Both see the same endpoint and token.
//!
//! Two phases, as the engine wants them: [`Hub::plan`] pins every repo to a commit sha (one API
//! call per repo, or the local refs when offline) and returns the list of models with their
//! commits, whose digest is the stage's identity; [`Hub::fetch`] then fetches exactly that.

//! The files, one job each: [`request`] (what is asked for), [`config`] (where the Hub and the
//! caches are), [`client`] (the API calls), [`plan`] (phase one), [`fetch`] (phase two) with
//! [`files`] and [`tensors`] (its two modes), [`parallel`] (many repos at once), [`progress`]
//! (what it reports); [`cache`], [`http`] and [`index`] below them.

pub mod cache;
mod client;
mod config;
mod error;
mod fetch;
mod files;
pub mod http;
pub mod index;
pub mod mock;
mod parallel;
mod plan;
mod progress;
mod request;
mod tensors;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use cache::{HfCache, TensorCache};
use http::Http;

pub use config::{Auth, HubConfig};
pub use error::{HubError, SelectionError};
pub use fetch::FetchReport;
pub use plan::{Plan, PlannedModel};
pub use progress::{Observer, Progress, Quiet};
pub use request::{MODEL_J_INDEX, Mode, ModelJ, Request, TensorSelection};

/// A connection to the Hub and the local caches.
pub struct Hub {
    api: Option<hf_hub::HFClientSync>,
    http: Option<Http>,
    hf: HfCache,
    tensors: TensorCache,
    endpoint: String,
    offline: bool,
    concurrency: usize,
    cancel: Arc<AtomicBool>,
    has_token: bool,
}
