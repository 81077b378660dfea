//! The one error type of the Hub client: each variant names the repo, commit or file involved
//! and says what to do, so that callers can show it to a person as is.

use std::path::PathBuf;

use probex_fetch::discover::GlobError;
use probex_fetch::hub::{NameError, SelectionError};
use probex_weights::reader::HeaderError;

use super::http::HttpError;
use super::index::IndexError;

/// Everything that can go wrong while planning or fetching from the Hub.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// A repo id, revision or file path that cannot be used.
    #[error(transparent)]
    Name(#[from] NameError),
    /// An etag that is not a hash, so no safe blob name.
    #[error(
        "the Hub's etag {0:?} is not a sha256 or git object id; the file cannot be cached safely"
    )]
    BadEtag(String),
    /// hf-hub's client could not be set up.
    #[error("cannot set up the Hub client: {0}")]
    ClientSetup(#[source] hf_hub::HFError),
    /// A transfer failed.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// Offline, and the operation needs the network.
    #[error("offline: {0}")]
    Offline(&'static str),
    /// Offline, and what was asked for is in neither local cache.
    #[error(
        "{what} is not in the local caches ({} and {}); run once without --offline (and \
         without HF_HUB_OFFLINE) to fetch it",
        hf_cache.display(),
        tensor_cache.display()
    )]
    NotCached {
        /// What was looked for.
        what: String,
        /// The Hugging Face cache.
        hf_cache: PathBuf,
        /// probex's tensor cache.
        tensor_cache: PathBuf,
    },
    /// A repo id without an owner.
    #[error("`{0}` is not owner/name")]
    NotOwnerName(String),
    /// The Hub refused the token.
    #[error(
        "{what}: the Hub refused the token in HF_TOKEN (401): check that it is valid and can \
         read this repo"
    )]
    TokenRefused {
        /// The repo (and revision) asked about.
        what: String,
    },
    /// The Hub wants a token.
    #[error(
        "{what}: the Hub asks for authentication (401): the repo is private or gated, or does \
         not exist; set HF_TOKEN to a token that can read it"
    )]
    AuthRequired {
        /// The repo (and revision) asked about.
        what: String,
    },
    /// The repo is gated and its conditions are not accepted.
    #[error(
        "{what}: access denied (403): the repo is gated; accept its conditions on its Hub page \
         with the account whose token is in HF_TOKEN"
    )]
    Forbidden {
        /// The repo (and revision) asked about.
        what: String,
    },
    /// No such repo (or no access without a token).
    #[error("{what}: repository not found (404): check the repo id{token_hint}")]
    RepoNotFound {
        /// The repo (and revision) asked about.
        what: String,
        /// Advice about HF_TOKEN when none is set, else empty.
        token_hint: &'static str,
    },
    /// No such revision.
    #[error("{what}: revision `{revision}` not found (404): check `revision`{token_hint}")]
    RevisionNotFound {
        /// The repo (and revision) asked about.
        what: String,
        /// The revision.
        revision: String,
        /// Advice about HF_TOKEN when none is set, else empty.
        token_hint: &'static str,
    },
    /// Rate-limited past every retry.
    #[error(
        "{what}: the Hub rate-limits this client (429) and retries did not help: wait and run \
         again (a token in HF_TOKEN raises the limits)"
    )]
    RateLimited {
        /// The repo (and revision) asked about.
        what: String,
    },
    /// The Hub cannot be reached.
    #[error(
        "{what}: cannot reach the Hub at {endpoint} ({source}); check the network or \
         HF_ENDPOINT, or run with --offline to use what is cached"
    )]
    Unreachable {
        /// The repo (and revision) asked about.
        what: String,
        /// The endpoint.
        endpoint: String,
        /// hf-hub's error.
        #[source]
        source: hf_hub::HFError,
    },
    /// Any other API failure.
    #[error("{what}: {source}")]
    Api {
        /// The repo (and revision) asked about.
        what: String,
        /// hf-hub's error.
        #[source]
        source: hf_hub::HFError,
    },
    /// The Hub answered without a commit id.
    #[error("{0}: the Hub did not say which commit it is")]
    NoCommit(String),
    /// The Hub's commit id is not a sha.
    #[error("{what}: the Hub's commit id {sha:?} is not a 40-hex sha")]
    BadCommit {
        /// The repo and revision.
        what: String,
        /// The id it gave (shortened).
        sha: String,
    },
    /// The Hub served another commit than the pinned one.
    #[error("{what}: the Hub served commit {served} for pinned commit {pinned}")]
    WrongCommit {
        /// The file.
        what: String,
        /// The commit it served.
        served: String,
        /// The commit asked for.
        pinned: String,
    },
    /// The Hub did not give a file's size.
    #[error("{0}: the Hub did not say how large the file is")]
    NoSize(String),
    /// A Range answer without `Content-Range`.
    #[error("{0}: the server did not say how large the file is (no Content-Range)")]
    NoContentRange(String),
    /// A file larger than this machine can address.
    #[error("{0}: file too large")]
    TooLarge(String),
    /// A download whose hash does not match its etag.
    #[error(
        "sha256 {got} does not match the Hub's {etag}: the download is corrupt (deleted; run \
         again)"
    )]
    Corrupt {
        /// The hash of what arrived.
        got: String,
        /// The etag it should have.
        etag: String,
    },
    /// A file changed size since its header was cached.
    #[error(
        "{what}: the file is now {now} bytes, its header was read from a {was}-byte file; the \
         cached header is stale: clear {}",
        dir.display()
    )]
    StaleHeader {
        /// The file.
        what: String,
        /// Its size now.
        now: u64,
        /// Its size when the header was read.
        was: usize,
        /// The tensor-cache folder to clear.
        dir: PathBuf,
    },
    /// A selected tensor is not in the header (or was not fetched).
    #[error("{what}: tensor `{name}` {problem}")]
    Tensor {
        /// The file.
        what: String,
        /// The tensor.
        name: String,
        /// What happened to it.
        problem: &'static str,
    },
    /// A safetensors header that cannot be read.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// The tensor selection does not fit the file.
    #[error(transparent)]
    Selection(#[from] SelectionError),
    /// A pattern that is not a usable glob.
    #[error(transparent)]
    Glob(#[from] GlobError),
    /// The Model-J index file cannot be read.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// A file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Copying a file beside a model failed.
    #[error("{} -> {}: {source}", from.display(), to.display())]
    Copy {
        /// The source.
        from: PathBuf,
        /// The destination.
        to: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Two planned models share an id.
    #[error("two models have the id `{id}` ({first} and {second})")]
    DuplicateId {
        /// The id.
        id: String,
        /// One file.
        first: String,
        /// The other.
        second: String,
    },
    /// A glob request matches no file of the repo.
    #[error("no file of {repo}@{commit} matches `{pattern}`")]
    NoMatch {
        /// The repo.
        repo: String,
        /// Its commit.
        commit: String,
        /// The pattern.
        pattern: String,
    },
    /// A repo without Model-J's generative layout.
    #[error(
        "{repo}@{commit} has no `{{split}}/<model dir>/{file}` files: is it a Model-J \
         generative repo?"
    )]
    NotGenerative {
        /// The repo.
        repo: String,
        /// Its commit.
        commit: String,
        /// The model file name.
        file: String,
    },
    /// The Model-J index has no parquet files for the subset.
    #[error("the Model-J index {repo}@{commit} has no parquet files for subset {subset}")]
    NoIndexFiles {
        /// The index repo.
        repo: String,
        /// Its commit.
        commit: String,
        /// The subset.
        subset: &'static str,
    },
    /// The Model-J index lists a repo twice.
    #[error("the Model-J index lists {repo} twice ({first} and {second})")]
    IndexDuplicate {
        /// The repo.
        repo: String,
        /// One split.
        first: probex_weights::dataset::Split,
        /// The other.
        second: probex_weights::dataset::Split,
    },
    /// An error about one thing, with the thing named first (`{what}: {source}`).
    #[error("{what}: {source}")]
    At {
        /// What it is about (a repo, a file).
        what: String,
        /// The error.
        #[source]
        source: Box<HubError>,
    },
    /// The run was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// Some of many parallel transfers failed.
    #[error("{}", many_failed(errors, *not_started, *finished))]
    Many {
        /// Every failure, in order.
        errors: Vec<HubError>,
        /// Transfers not started after the first failure.
        not_started: usize,
        /// Transfers that finished.
        finished: usize,
    },
}

impl HubError {
    /// This error about `what`: `{what}: {self}`.
    pub fn at(self, what: impl Into<String>) -> HubError {
        HubError::At {
            what: what.into(),
            source: Box::new(self),
        }
    }

    /// An I/O error on `path`.
    pub(super) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> HubError {
        let path = path.into();
        move |source| HubError::Io { path, source }
    }
}

/// The message of [`HubError::Many`]: the count, the first ten errors, and what became of the
/// rest.
fn many_failed(errors: &[HubError], not_started: usize, finished: usize) -> String {
    let shown = errors.len().min(10);
    let mut msg = format!("{} failed", errors.len().max(1));
    msg.push_str(":\n  ");
    let lines: Vec<String> = errors[..shown].iter().map(ToString::to_string).collect();
    msg.push_str(&lines.join("\n  "));
    if errors.len() > shown {
        msg.push_str(&format!("\n  ... and {} more", errors.len() - shown));
    }
    if not_started > 0 {
        msg.push_str(&format!(
            "\n  ({not_started} not started after the failure; {finished} finished and stay cached)"
        ));
    }
    msg
}
