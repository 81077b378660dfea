//! What a fetch from the Hugging Face Hub is, apart from the client that makes it: the request
//! ([`Request`], [`Mode`]), where the Hub and the caches are ([`HubConfig`]), the pinned
//! [`Plan`] whose digest is the fetch stage's identity, the [`FetchReport`], the names the Hub
//! accepts ([`names`]), and the [`HubClient`] trait the client implements.
//!
//! The client itself (API calls, HTTP transfers, the caches, the Model-J index) is the
//! `probex-hub` crate, which only the binary (and tests) link: the stage kinds see it through
//! [`HubClient`], so an edit to the client rebuilds that crate and relinks the binary, never the
//! stage kinds that instantiate the probe models.

mod config;
pub mod names;
mod plan;
mod progress;
mod report;
mod request;

use std::error::Error;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

pub use config::{Auth, DEFAULT_ENDPOINT, HubConfig, RetryPolicy, default_hub_cache, env_token};
pub use names::NameError;
pub use plan::{Plan, PlannedModel};
pub use progress::{Observer, Progress, Quiet};
pub use report::FetchReport;
pub use request::{MODEL_J_INDEX, Mode, ModelJ, Request, SelectionError, TensorSelection};

/// A client's error, passed on as it is: its message names the repo, commit or file and says
/// what to do.
pub type ClientError = Box<dyn Error + Send + Sync>;

/// A connection to the Hub and the local caches, in two phases as the engine wants them:
/// [`HubClient::plan`] pins a request to commits (the stage's identity), [`HubClient::fetch`]
/// fetches exactly that plan.
pub trait HubClient: Send + Sync {
    /// Pins `req` at `revision`: every repo resolved to a commit, the models listed. The plan
    /// is remembered for [`HubClient::planned`].
    fn plan(&self, req: &Request, revision: &str, obs: &dyn Observer) -> Result<Plan, ClientError>;

    /// The plan [`HubClient::plan`] made for the same request in this process, or a new one:
    /// so the run fetches exactly the commits its identity named.
    fn planned(
        &self,
        req: &Request,
        revision: &str,
        obs: &dyn Observer,
    ) -> Result<Plan, ClientError>;

    /// Fetches every model of `plan` in `mode`; tensors-mode files are written under
    /// `out_dir`, files mode points into the Hugging Face cache.
    fn fetch(
        &self,
        plan: &Plan,
        mode: &Mode,
        out_dir: &Path,
        obs: &dyn Observer,
    ) -> Result<FetchReport, ClientError>;

    /// Set to stop every transfer in flight.
    fn cancel_flag(&self) -> Arc<AtomicBool>;

    /// The endpoint in use.
    fn endpoint(&self) -> &str;

    /// The Hugging Face cache.
    fn cache_dir(&self) -> &Path;

    /// probex's tensor cache.
    fn tensor_cache_dir(&self) -> &Path;
}

/// Opens a [`HubClient`] for a config: what the binary hands the fetch stage.
pub type Connect = fn(&HubConfig) -> Result<Box<dyn HubClient>, ClientError>;
