//! The Hugging Face Hub client: whole files into the shared Hugging Face cache, or only the
//! tensors a probe needs through HTTP Range requests. It implements probex-fetch's
//! [`HubClient`]; [`connect`] is what the binary hands the fetch stage.
//!
//! The split of work: hf-hub 1.0's blocking client makes the API calls (resolving a revision
//! to a commit, listing a repo's files), and [`http`] moves bytes (resumable downloads, Range
//! reads that check for `206`, retries honouring `Retry-After`), because hf-hub's downloads do
//! neither. Both see the same endpoint and token.
//!
//! Two phases, as the engine wants them: [`Hub::plan`] pins every repo to a commit sha (one API
//! call per repo, or the local refs when offline) and returns the list of models with their
//! commits, whose digest is the stage's identity; [`Hub::fetch`] then fetches exactly that.
//!
//! A crate of its own, linked by the binary alone: the stage kinds know the Hub through
//! [`HubClient`], so an edit here rebuilds this crate and relinks the binary, never the crate
//! that instantiates the probe models.
//!
//! The files, one job each: `client` (the API calls), `plan` (phase one), `fetch` (phase two)
//! with `files` and `tensors` (its two modes), `parallel` (many repos at once); [`cache`],
//! [`http`] and [`index`] below them; [`mock`], a Hub on 127.0.0.1 for tests.

pub mod cache;
mod client;
mod error;
mod fetch;
mod files;
pub mod http;
pub mod index;
pub mod mock;
mod parallel;
mod plan;
mod tensors;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use cache::{HfCache, TensorCache};
use http::Http;

pub use error::HubError;
pub use probex_fetch::hub::*;

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

impl HubClient for Hub {
    fn plan(&self, req: &Request, revision: &str, obs: &dyn Observer) -> Result<Plan, ClientError> {
        Ok(Hub::plan(self, req, revision, obs)?)
    }

    fn planned(
        &self,
        req: &Request,
        revision: &str,
        obs: &dyn Observer,
    ) -> Result<Plan, ClientError> {
        Ok(Hub::planned(self, req, revision, obs)?)
    }

    fn fetch(
        &self,
        plan: &Plan,
        mode: &Mode,
        out_dir: &Path,
        obs: &dyn Observer,
    ) -> Result<FetchReport, ClientError> {
        Ok(Hub::fetch(self, plan, mode, out_dir, obs)?)
    }

    fn cancel_flag(&self) -> Arc<AtomicBool> {
        Hub::cancel_flag(self)
    }

    fn endpoint(&self) -> &str {
        Hub::endpoint(self)
    }

    fn cache_dir(&self) -> &Path {
        Hub::cache_dir(self)
    }

    fn tensor_cache_dir(&self) -> &Path {
        Hub::tensor_cache_dir(self)
    }
}

/// Opens the Hub for `cfg` ([`Connect`]).
pub fn connect(cfg: &HubConfig) -> Result<Box<dyn HubClient>, ClientError> {
    Ok(Box::new(Hub::new(cfg)?))
}
