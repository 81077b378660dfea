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

pub mod cache;
pub mod http;
pub mod index;
pub mod mock;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use probex_engine::cache::hex;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::discover::ModelSource;
use crate::discover::glob_to_regex;
use cache::{HfCache, RepoKind, RepoRef, TensorCache, check_etag, is_commit, safe_rel_path};
use http::{Http, RetryPolicy};
use probex_weights::dataset::Split;
use probex_weights::partial::{self, ORIGINAL_TENSORS_KEY, SOURCE_KEY};
use probex_weights::reader::{Header, header_len, parse_header};
use probex_weights::{LayerList, LayerMode, LayerSelector};

/// The default Hub endpoint (when neither the config nor `HF_ENDPOINT` names one).
const DEFAULT_ENDPOINT: &str = concat!("https://", "huggingface", ".co");

/// The Model-J index dataset.
pub const MODEL_J_INDEX: &str = "ProbeX/Model-J";

/// The Model-J subsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ModelJ {
    /// google/vit-base-patch16-224 fine-tunes (one repo per model).
    SupViT,
    /// facebook/dino-vitb16 fine-tunes.
    #[serde(rename = "DINO")]
    Dino,
    /// facebook/vit-mae-base fine-tunes.
    #[serde(rename = "MAE")]
    Mae,
    /// microsoft/resnet-101 fine-tunes.
    ResNet,
    /// 5,000 SD LoRAs over 200 ImageNet classes (one bundled repo).
    #[serde(rename = "SD_200")]
    Sd200,
    /// 5,000 SD LoRAs over 1,000 ImageNet classes (one bundled repo).
    #[serde(rename = "SD_1k")]
    Sd1k,
}

impl ModelJ {
    /// The subset's name as Model-J spells it.
    pub fn name(self) -> &'static str {
        match self {
            ModelJ::SupViT => "SupViT",
            ModelJ::Dino => "DINO",
            ModelJ::Mae => "MAE",
            ModelJ::ResNet => "ResNet",
            ModelJ::Sd200 => "SD_200",
            ModelJ::Sd1k => "SD_1k",
        }
    }

    /// Whether the subset is one bundled repo of LoRAs (`{split}/model_idx_XXXX/...`).
    pub fn is_generative(self) -> bool {
        matches!(self, ModelJ::Sd200 | ModelJ::Sd1k)
    }
}

/// What to fetch: which repos, and which files in them are models.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// One model per repo: `file` in each repo; ids are the repo ids; no splits.
    Repos {
        /// Repo ids.
        repos: Vec<String>,
        /// The model file in each repo.
        file: String,
    },
    /// Several models in one repo: every file matching `pattern` (a glob on the repo path,
    /// `*` crossing `/`); ids are the paths without `.safetensors`; no splits.
    Glob {
        /// Repo id.
        repo: String,
        /// The glob.
        pattern: String,
    },
    /// Model-J generative layout in one repo: `{split}/{model dir}/{file}`; ids are the model
    /// dirs, splits from the path.
    ModelJGenerative {
        /// Repo id.
        repo: String,
        /// The file of each model.
        file: String,
    },
    /// A Model-J discriminative subset: the model repos and their splits from the index
    /// dataset; `file` in each repo.
    ModelJIndex {
        /// The subset (its parquet config in the index).
        subset: ModelJ,
        /// The index dataset repo id.
        index: String,
        /// The model file in each repo.
        file: String,
    },
}

/// Which tensors to fetch in tensors mode.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSelection {
    /// Tensor names or globs (`*` also crosses dots).
    pub tensors: Vec<String>,
    /// Layers, resolved against each file's header with the paper's indexing (for LoRA, the
    /// up factor comes along).
    pub layers: Option<LayerSelector>,
    /// The layer list `layers` counts in (as extract's `mode`).
    pub layer_mode: LayerMode,
}

impl TensorSelection {
    /// The names (sorted, unique) this selection picks in a file with `header`.
    pub fn resolve(&self, header: &Header) -> Result<Vec<String>, String> {
        let mut out = BTreeSet::new();
        for t in &self.tensors {
            if t.contains(['*', '?']) {
                let re = glob_to_regex(t)?;
                let before = out.len();
                out.extend(
                    header
                        .tensors
                        .iter()
                        .filter(|e| re.is_match(&e.name))
                        .map(|e| e.name.clone()),
                );
                if out.len() == before && !header.tensors.iter().any(|e| re.is_match(&e.name)) {
                    return Err(format!("tensor pattern `{t}` matches no tensor"));
                }
            } else if header.find(t).is_some() {
                out.insert(t.clone());
            } else {
                let similar: Vec<&str> = header
                    .tensors
                    .iter()
                    .filter(|e| e.name.contains(t.as_str()) || t.contains(e.name.as_str()))
                    .take(5)
                    .map(|e| e.name.as_str())
                    .collect();
                return Err(format!(
                    "no tensor is named `{t}`{}",
                    if similar.is_empty() {
                        String::new()
                    } else {
                        format!("; similar: {}", similar.join(", "))
                    }
                ));
            }
        }
        if let Some(sel) = &self.layers {
            let list = LayerList::of(header, self.layer_mode)?;
            for i in list.select(sel)? {
                let r = &list.rows[i];
                out.insert(r.name.clone());
                if let Some(up) = &r.lora_up {
                    out.insert(up.clone());
                }
            }
        }
        if out.is_empty() {
            return Err("the selection picks no tensor (give `tensors` or `layers`)".into());
        }
        Ok(out.into_iter().collect())
    }
}

/// Whole files or only the selected tensors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Whole files into the Hugging Face cache, checked against their sha256.
    Files,
    /// Only the header and the selected tensors, via HTTP Range.
    Tensors(TensorSelection),
}

/// How the token is found.
#[derive(Clone, Default)]
pub enum Auth {
    /// `HF_TOKEN`, else the file `HF_TOKEN_PATH`, else `$HF_HOME/token` (as Python does).
    #[default]
    FromEnv,
    /// This token (tests).
    Token(String),
    /// No token.
    Anonymous,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Auth::FromEnv => "FromEnv",
            Auth::Token(_) => "Token(<hidden>)",
            Auth::Anonymous => "Anonymous",
        })
    }
}

/// Where and how to reach the Hub. None of this changes what is fetched, so none of it is in
/// a cache key.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// The Hub endpoint; `None`: `HF_ENDPOINT`, else the public Hub.
    pub endpoint: Option<String>,
    /// The token.
    pub auth: Auth,
    /// The Hugging Face cache (`hub/`); `None`: `HF_HUB_CACHE`, `$HF_HOME/hub`, or
    /// `~/.cache/huggingface/hub`.
    pub cache_dir: Option<PathBuf>,
    /// probex's tensor cache; `None`: `PROBEX_TENSOR_CACHE`, else `probex-tensors` beside the
    /// Hugging Face cache.
    pub tensor_cache: Option<PathBuf>,
    /// Use only what is cached; never touch the network.
    pub offline: bool,
    /// Transfers at once.
    pub concurrency: usize,
    /// Retries.
    pub retry: RetryPolicy,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            endpoint: None,
            auth: Auth::FromEnv,
            cache_dir: None,
            tensor_cache: None,
            offline: false,
            concurrency: 8,
            retry: RetryPolicy::default(),
        }
    }
}

/// One model as planned: where it is, pinned to a commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedModel {
    /// The model's id in the collection.
    pub id: String,
    /// Its split, when the request gives one.
    pub split: Option<Split>,
    /// The repo id.
    pub repo: String,
    /// The revision asked for in this repo (`main`).
    pub revision: String,
    /// The commit sha the revision resolved to.
    pub commit: String,
    /// The file in the repo.
    pub file: String,
}

/// A pinned request: every model with its commit. Its digest is the fetch stage's identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The revision asked for (`main`), as recorded in the caches' refs.
    pub revision: String,
    /// The models, sorted by id.
    pub models: Vec<PlannedModel>,
    /// For Model-J discriminative subsets: the index dataset and its commit.
    pub index: Option<(String, String)>,
    /// Other files of each model's repo fetched whole beside it (`config.json`,
    /// `tokenizer.json`: what a text encoder needs besides its weights). In tensors mode each
    /// model then gets its own folder holding the partial file and these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_files: Vec<String>,
}

impl Plan {
    /// A digest of everything the plan pins (repo ids, commits, files, ids, splits).
    pub fn digest(&self) -> String {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        blake3::hash(&bytes).to_hex().to_string()
    }
}

/// Receives what a fetch has to say: log lines and progress.
pub trait Observer: Sync {
    /// A line for the log.
    fn log(&self, line: &str);
    /// Progress: `done` of `total` models, and a one-line summary with bytes, rate and ETA.
    fn progress(&self, done: u64, total: u64, line: &str);
}

/// An observer that drops everything.
pub struct Quiet;

impl Observer for Quiet {
    fn log(&self, _: &str) {}
    fn progress(&self, _: u64, _: u64, _: &str) {}
}

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

/// Plans made by [`Hub::plan`], by endpoint and request, so that the run fetches exactly the
/// commits the identity named (a branch that moves between plan and run does not slip in).
static PLANS: Mutex<Option<HashMap<String, Plan>>> = Mutex::new(None);

fn plan_memo_key(endpoint: &str, req: &Request, revision: &str) -> String {
    format!(
        "{endpoint}\n{revision}\n{}",
        serde_json::to_string(req).unwrap_or_default()
    )
}

/// The token as Python's huggingface_hub finds it.
fn env_token() -> Option<String> {
    let non_empty = |s: String| {
        let t = s.trim().to_string();
        (!t.is_empty()).then_some(t)
    };
    if let Some(t) = std::env::var("HF_TOKEN").ok().and_then(non_empty) {
        return Some(t);
    }
    let path = std::env::var_os("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .or_else(|| hf_home().map(|h| h.join("token")))?;
    let meta = std::fs::metadata(&path).ok()?;
    if meta.len() > 4096 {
        return None;
    }
    std::fs::read_to_string(path).ok().and_then(non_empty)
}

fn hf_home() -> Option<PathBuf> {
    std::env::var_os("HF_HOME").map(PathBuf::from).or_else(|| {
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|c| c.join("huggingface"))
    })
}

fn default_hub_cache() -> PathBuf {
    std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| hf_home().map(|h| h.join("hub")))
        .unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub"))
}

/// Says what an hf-hub error means for the user.
fn api_error(what: &str, e: hf_hub::HFError, has_token: bool, endpoint: &str) -> String {
    use hf_hub::HFError as E;
    let token_hint = if has_token {
        ""
    } else {
        "; if it is private or gated, set HF_TOKEN"
    };
    match e {
        E::AuthRequired { .. } if has_token => format!(
            "{what}: the Hub refused the token in HF_TOKEN (401): check that it is valid and can \
             read this repo"
        ),
        E::AuthRequired { .. } => format!(
            "{what}: the Hub asks for authentication (401): the repo is private or gated, or \
             does not exist; set HF_TOKEN to a token that can read it"
        ),
        E::Forbidden { .. } => format!(
            "{what}: access denied (403): the repo is gated; accept its conditions on its Hub \
             page with the account whose token is in HF_TOKEN"
        ),
        E::RevisionNotFound { context, .. }
            if context.as_ref().and_then(|c| c.error_code.as_deref()) == Some("RepoNotFound") =>
        {
            format!("{what}: repository not found (404): check the repo id{token_hint}")
        }
        E::RepoNotFound { .. } => {
            format!("{what}: repository not found (404): check the repo id{token_hint}")
        }
        E::RevisionNotFound { revision, .. } => {
            format!("{what}: revision `{revision}` not found (404): check `revision`{token_hint}")
        }
        E::RateLimited { .. } => format!(
            "{what}: the Hub rate-limits this client (429) and retries did not help: wait and \
             run again (a token in HF_TOKEN raises the limits)"
        ),
        E::Request { .. } => format!(
            "{what}: cannot reach the Hub at {endpoint} ({e}); check the network or \
             HF_ENDPOINT, or run with --offline to use what is cached"
        ),
        other => format!("{what}: {other}"),
    }
}

impl Hub {
    /// Connects (lazily: nothing is sent until a plan or fetch needs it).
    pub fn new(cfg: &HubConfig) -> Result<Hub, String> {
        let endpoint = cfg
            .endpoint
            .clone()
            .or_else(|| std::env::var("HF_ENDPOINT").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
            .trim_end_matches('/')
            .to_string();
        let token = match &cfg.auth {
            Auth::FromEnv => env_token(),
            Auth::Token(t) => Some(t.clone()),
            Auth::Anonymous => None,
        };
        let cache_dir = cfg.cache_dir.clone().unwrap_or_else(default_hub_cache);
        let tensor_cache = cfg.tensor_cache.clone().unwrap_or_else(|| {
            std::env::var_os("PROBEX_TENSOR_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| match cache_dir.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.join("probex-tensors"),
                    _ => cache_dir.join("..").join("probex-tensors"),
                })
        });
        let (api, http) = if cfg.offline {
            (None, None)
        } else {
            let mut b = hf_hub::HFClient::builder()
                .endpoint(endpoint.clone())
                .cache_dir(cache_dir.clone())
                .retry_max_attempts(cfg.retry.attempts as usize)
                .retry_base_delay(cfg.retry.base_delay.min(Duration::from_secs(1)));
            if let Some(t) = &token {
                b = b.token(t.clone());
            }
            let api = b
                .build_sync()
                .map_err(|e| format!("cannot set up the Hub client: {e}"))?;
            let http = Http::new(&endpoint, token.clone(), cfg.retry.clone())
                .map_err(|e| e.to_string())?;
            (Some(api), Some(http))
        };
        Ok(Hub {
            api,
            http,
            hf: HfCache { root: cache_dir },
            tensors: TensorCache { root: tensor_cache },
            endpoint,
            offline: cfg.offline,
            concurrency: cfg.concurrency.max(1),
            cancel: Arc::new(AtomicBool::new(false)),
            has_token: token.is_some(),
        })
    }

    /// The endpoint in use.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The Hugging Face cache directory in use.
    pub fn cache_dir(&self) -> &Path {
        &self.hf.root
    }

    /// The tensor cache directory in use.
    pub fn tensor_cache_dir(&self) -> &Path {
        &self.tensors.root
    }

    /// Set to stop transfers (they stop between chunks; finished files stay cached).
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    fn http(&self) -> Result<&Http, String> {
        self.http
            .as_ref()
            .ok_or_else(|| "offline: nothing may be downloaded".to_string())
    }

    fn api(&self) -> Result<&hf_hub::HFClientSync, String> {
        self.api
            .as_ref()
            .ok_or_else(|| "offline: the Hub may not be asked".to_string())
    }

    fn offline_miss(&self, what: &str) -> String {
        format!(
            "{what} is not in the local caches ({} and {}); run once without --offline \
             (and without HF_HUB_OFFLINE) to fetch it",
            self.hf.root.display(),
            self.tensors.root.display()
        )
    }

    /// Resolves `revision` of `repo` to a commit: from the Hub (and records it in the caches'
    /// refs), or offline from those refs.
    pub fn resolve(&self, repo: &RepoRef, revision: &str) -> Result<String, String> {
        cache::check_revision(revision)?;
        if self.offline {
            if is_commit(revision) {
                return Ok(revision.to_string());
            }
            return self
                .hf
                .read_ref(repo, revision)
                .or_else(|| self.tensors.read_ref(repo, revision))
                .ok_or_else(|| self.offline_miss(&format!("{repo}@{revision}")));
        }
        let (owner, name) = repo
            .id
            .split_once('/')
            .ok_or_else(|| format!("`{}` is not owner/name", repo.id))?;
        let api = self.api()?;
        let what = format!("{repo}@{revision}");
        let sha = match repo.kind {
            RepoKind::Model => api
                .model(owner, name)
                .info()
                .revision(revision.to_string())
                .send()
                .map(|i| i.sha),
            RepoKind::Dataset => api
                .dataset(owner, name)
                .info()
                .revision(revision.to_string())
                .send()
                .map(|i| i.sha),
        }
        .map_err(|e| api_error(&what, e, self.has_token, &self.endpoint))?;
        let sha = sha.ok_or_else(|| format!("{what}: the Hub did not say which commit it is"))?;
        if !is_commit(&sha) {
            return Err(format!(
                "{what}: the Hub's commit id {:?} is not a 40-hex sha",
                sha.chars().take(64).collect::<String>()
            ));
        }
        // Recorded for offline runs; failing to record is not worth failing the fetch.
        let _ = self.tensors.write_ref(repo, revision, &sha);
        Ok(sha)
    }

    /// The files of `repo` at `commit` (path, size), from the tensor cache's copy of the
    /// listing or from the Hub (then kept: a commit's listing never changes).
    pub fn list_files(&self, repo: &RepoRef, commit: &str) -> Result<Vec<(String, u64)>, String> {
        let path = self
            .tensors
            .root
            .join(repo.folder())
            .join(commit)
            .join("tree.json");
        if let Ok(bytes) = std::fs::read(&path)
            && let Ok(list) = serde_json::from_slice::<Vec<(String, u64)>>(&bytes)
        {
            return Ok(list);
        }
        if self.offline {
            return Err(self.offline_miss(&format!("the file list of {repo}@{commit}")));
        }
        let (owner, name) = repo
            .id
            .split_once('/')
            .ok_or_else(|| format!("`{}` is not owner/name", repo.id))?;
        let api = self.api()?;
        let what = format!("listing {repo}@{commit}");
        let entries = match repo.kind {
            RepoKind::Model => api
                .model(owner, name)
                .list_tree()
                .revision(commit.to_string())
                .recursive(true)
                .send(),
            RepoKind::Dataset => api
                .dataset(owner, name)
                .list_tree()
                .revision(commit.to_string())
                .recursive(true)
                .send(),
        }
        .map_err(|e| api_error(&what, e, self.has_token, &self.endpoint))?;
        let mut list: Vec<(String, u64)> = entries
            .into_iter()
            .filter_map(|e| match e {
                hf_hub::repository::RepoTreeEntry::File { path, size, .. } => Some((path, size)),
                _ => None,
            })
            .collect();
        list.sort();
        let _ = cache::write_atomic(&path, &serde_json::to_vec(&list).unwrap_or_default());
        Ok(list)
    }

    /// Pins `req` at `revision`: resolves every repo to a commit and lists the models. The
    /// result is remembered for [`Hub::fetch_request`] in this process.
    pub fn plan(&self, req: &Request, revision: &str, obs: &dyn Observer) -> Result<Plan, String> {
        let plan = self.plan_uncached(req, revision, obs)?;
        if let Ok(mut memo) = PLANS.lock() {
            memo.get_or_insert_with(HashMap::new)
                .insert(plan_memo_key(&self.endpoint, req, revision), plan.clone());
        }
        Ok(plan)
    }

    /// The plan [`Hub::plan`] made for this request in this process, or a new one.
    pub fn planned(
        &self,
        req: &Request,
        revision: &str,
        obs: &dyn Observer,
    ) -> Result<Plan, String> {
        let key = plan_memo_key(&self.endpoint, req, revision);
        if let Ok(memo) = PLANS.lock()
            && let Some(p) = memo.as_ref().and_then(|m| m.get(&key))
        {
            return Ok(p.clone());
        }
        self.plan(req, revision, obs)
    }

    fn plan_uncached(
        &self,
        req: &Request,
        revision: &str,
        obs: &dyn Observer,
    ) -> Result<Plan, String> {
        let mut plan = match req {
            Request::Repos { repos, file } => {
                let refs: Vec<RepoRef> = repos
                    .iter()
                    .map(|r| RepoRef::model(r))
                    .collect::<Result<_, _>>()?;
                let shas = self.resolve_many(&refs, revision, obs)?;
                Plan {
                    revision: revision.to_string(),
                    models: refs
                        .iter()
                        .zip(shas)
                        .map(|(r, commit)| PlannedModel {
                            id: r.id.clone(),
                            split: None,
                            repo: r.id.clone(),
                            revision: revision.to_string(),
                            commit,
                            file: file.clone(),
                        })
                        .collect(),
                    index: None,
                    extra_files: Vec::new(),
                }
            }
            Request::Glob { repo, pattern } => {
                let r = RepoRef::model(repo)?;
                let commit = self.resolve(&r, revision)?;
                let re = glob_to_regex(pattern)?;
                let mut models = Vec::new();
                for (path, _) in self.list_files(&r, &commit)? {
                    if re.is_match(&path) {
                        safe_rel_path(&path)?;
                        models.push(PlannedModel {
                            id: path
                                .strip_suffix(".safetensors")
                                .unwrap_or(&path)
                                .to_string(),
                            split: None,
                            repo: r.id.clone(),
                            revision: revision.to_string(),
                            commit: commit.clone(),
                            file: path,
                        });
                    }
                }
                if models.is_empty() {
                    return Err(format!("no file of {repo}@{commit} matches `{pattern}`"));
                }
                Plan {
                    revision: revision.to_string(),
                    models,
                    index: None,
                    extra_files: Vec::new(),
                }
            }
            Request::ModelJGenerative { repo, file } => {
                let r = RepoRef::model(repo)?;
                let commit = self.resolve(&r, revision)?;
                let mut models = Vec::new();
                let mut ignored = 0usize;
                for (path, _) in self.list_files(&r, &commit)? {
                    let parts: Vec<&str> = path.split('/').collect();
                    match parts.as_slice() {
                        [split, dirs @ .., name] if *name == file.as_str() && !dirs.is_empty() => {
                            let Some(split) = Split::parse(split) else {
                                ignored += 1;
                                continue;
                            };
                            safe_rel_path(&path)?;
                            models.push(PlannedModel {
                                id: dirs.join("/"),
                                split: Some(split),
                                repo: r.id.clone(),
                                revision: revision.to_string(),
                                commit: commit.clone(),
                                file: path.clone(),
                            });
                        }
                        _ => {}
                    }
                }
                if ignored > 0 {
                    obs.log(&format!(
                        "{ignored} `{file}` files of {repo} are not under a split directory; ignored"
                    ));
                }
                if models.is_empty() {
                    return Err(format!(
                        "{repo}@{commit} has no `{{split}}/<model dir>/{file}` files: is it a \
                         Model-J generative repo?"
                    ));
                }
                Plan {
                    revision: revision.to_string(),
                    models,
                    index: None,
                    extra_files: Vec::new(),
                }
            }
            Request::ModelJIndex {
                subset,
                index,
                file,
            } => {
                let ir = RepoRef::dataset(index)?;
                let icommit = self.resolve(&ir, revision)?;
                let rows = self.read_index(&ir, &icommit, *subset, obs)?;
                let refs: Vec<RepoRef> = rows
                    .iter()
                    .map(|r| RepoRef::model(&r.repo))
                    .collect::<Result<_, _>>()
                    .map_err(|m| format!("Model-J index {index}@{icommit}: {m}"))?;
                obs.log(&format!(
                    "Model-J {}: {} models in the index {index}@{icommit}",
                    subset.name(),
                    refs.len()
                ));
                let shas = self.resolve_many(&refs, "main", obs)?;
                Plan {
                    revision: revision.to_string(),
                    models: rows
                        .iter()
                        .zip(shas)
                        .map(|(row, commit)| PlannedModel {
                            id: row.repo.clone(),
                            split: Some(row.split),
                            repo: row.repo.clone(),
                            revision: "main".into(),
                            commit,
                            file: file.clone(),
                        })
                        .collect(),
                    index: Some((index.clone(), icommit)),
                    extra_files: Vec::new(),
                }
            }
        };
        plan.models.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(w) = plan.models.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(format!(
                "two models have the id `{}` ({} and {})",
                w[0].id, w[0].file, w[1].file
            ));
        }
        Ok(plan)
    }

    fn read_index(
        &self,
        repo: &RepoRef,
        commit: &str,
        subset: ModelJ,
        obs: &dyn Observer,
    ) -> Result<Vec<index::IndexRow>, String> {
        let files: Vec<(String, Option<Split>)> = self
            .list_files(repo, commit)?
            .into_iter()
            .filter_map(|(p, _)| index::parquet_of_subset(&p, subset.name()).map(|s| (p, s)))
            .collect();
        if files.is_empty() {
            return Err(format!(
                "the Model-J index {repo}@{commit} has no parquet files for subset {}",
                subset.name()
            ));
        }
        let mut rows = Vec::new();
        for (path, split) in files {
            let local = self.fetch_file(repo, commit, &path, &Progress::new(1), obs)?;
            rows.extend(index::read_parquet(&local, split)?);
        }
        rows.sort_by(|a, b| a.repo.cmp(&b.repo));
        if let Some(w) = rows.windows(2).find(|w| w[0].repo == w[1].repo) {
            return Err(format!(
                "the Model-J index lists {} twice ({} and {})",
                w[0].repo, w[0].split, w[1].split
            ));
        }
        Ok(rows)
    }

    fn resolve_many(
        &self,
        repos: &[RepoRef],
        revision: &str,
        obs: &dyn Observer,
    ) -> Result<Vec<String>, String> {
        let done = AtomicU64::new(0);
        let total = repos.len() as u64;
        let results = self.parallel(repos, |_, r| {
            let sha = self.resolve(r, revision);
            let d = done.fetch_add(1, Ordering::Relaxed) + 1;
            if d.is_multiple_of(50) || d == total {
                obs.progress(d, total, &format!("resolved {d}/{total} repos"));
            }
            sha
        });
        collect_errors(results)
    }

    /// Runs `f` over `items` on at most `concurrency` threads. After the first error no new
    /// item starts (finished ones stay cached); every error is returned.
    fn parallel<T: Sync, R: Send>(
        &self,
        items: &[T],
        f: impl Fn(usize, &T) -> Result<R, String> + Sync,
    ) -> Vec<Result<R, String>> {
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let slots: Vec<Mutex<Option<Result<R, String>>>> =
            items.iter().map(|_| Mutex::new(None)).collect();
        let workers = self.concurrency.min(items.len()).max(1);
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| {
                    loop {
                        if stop.load(Ordering::Relaxed) || self.cancel.load(Ordering::Relaxed) {
                            break;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        let r = f(i, item);
                        if r.is_err() {
                            stop.store(true, Ordering::Relaxed);
                        }
                        if let Ok(mut slot) = slots[i].lock() {
                            *slot = Some(r);
                        }
                    }
                });
            }
        });
        slots
            .into_iter()
            .map(|m| {
                m.into_inner().ok().flatten().unwrap_or_else(|| {
                    Err(if self.cancel.load(Ordering::Relaxed) {
                        "cancelled".to_string()
                    } else {
                        "not started: an earlier model failed".to_string()
                    })
                })
            })
            .collect()
    }

    /// Plans (or reuses this process's plan) and fetches `req` in `mode`. Tensors-mode files
    /// are written under `out_dir`; files mode points into the Hugging Face cache.
    pub fn fetch_request(
        &self,
        req: &Request,
        revision: &str,
        mode: &Mode,
        out_dir: &Path,
        obs: &dyn Observer,
    ) -> Result<FetchReport, String> {
        let plan = self.planned(req, revision, obs)?;
        self.fetch(&plan, mode, out_dir, obs)
    }

    /// Fetches every model of `plan` in `mode`.
    pub fn fetch(
        &self,
        plan: &Plan,
        mode: &Mode,
        out_dir: &Path,
        obs: &dyn Observer,
    ) -> Result<FetchReport, String> {
        let started = Instant::now();
        let before = self.http.as_ref().map(|h| snapshot(&h.counters));
        let progress = Progress::new(plan.models.len() as u64);
        let cached = AtomicU64::new(0);
        let remote = AtomicU64::new(0);
        let stop_ticker = AtomicBool::new(false);
        let results = std::thread::scope(|s| {
            // Progress lines once a second, independent of how long single transfers take.
            s.spawn(|| {
                while !stop_ticker.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(200));
                    if progress.due() {
                        let bytes = self.bytes_now();
                        progress.report(obs, bytes);
                    }
                }
            });
            let own_dirs = !plan.extra_files.is_empty();
            let r = self.parallel(&plan.models, |_, m| {
                let r = match mode {
                    Mode::Files => self.fetch_model_file(m, &progress, obs, &cached, &remote),
                    Mode::Tensors(sel) => {
                        self.fetch_model_tensors(m, sel, out_dir, own_dirs, &cached, &remote)
                    }
                };
                let r = r.and_then(|source| {
                    self.fetch_extras(m, &plan.extra_files, &source, &progress, obs)?;
                    Ok(source)
                });
                progress.file_done();
                r.map_err(|e| format!("{} ({}@{} {}): {e}", m.id, m.repo, short(&m.commit), m.file))
            });
            stop_ticker.store(true, Ordering::Relaxed);
            r
        });
        let models = collect_errors(results)?;
        progress.report(obs, self.bytes_now());
        let after = self.http.as_ref().map(|h| snapshot(&h.counters));
        let (b0, b1) = (before.unwrap_or_default(), after.unwrap_or_default());
        let report = FetchReport {
            models,
            bytes_transferred: b1[0] - b0[0],
            requests: b1[1] - b0[1],
            retries: b1[2] - b0[2],
            range_ignored: b1[3] - b0[3],
            bytes_cached: cached.into_inner(),
            remote_file_bytes: remote.into_inner(),
            seconds: started.elapsed().as_secs_f64(),
        };
        if report.range_ignored > 0 {
            obs.log(&format!(
                "the server ignored Range on {} requests (sent whole files): the bytes are right \
                 but transfers were larger than needed",
                report.range_ignored
            ));
        }
        Ok(report)
    }

    fn bytes_now(&self) -> u64 {
        self.http
            .as_ref()
            .map_or(0, |h| h.counters.bytes.load(Ordering::Relaxed))
    }

    /// Fetches `extra` files of `m`'s repo whole (into the Hugging Face cache) and, when the
    /// model file is not in that snapshot folder (tensors mode), copies them beside it.
    fn fetch_extras(
        &self,
        m: &PlannedModel,
        extra: &[String],
        source: &ModelSource,
        progress: &Progress,
        obs: &dyn Observer,
    ) -> Result<(), String> {
        let repo = RepoRef::model(&m.repo)?;
        let Some(dir) = source.path.parent() else {
            return Ok(());
        };
        for f in extra {
            let rel = safe_rel_path(f)?;
            let snap = self.fetch_file(&repo, &m.commit, f, progress, obs)?;
            let dest = dir.join(&rel);
            if dest != snap {
                if let Some(d) = dest.parent() {
                    std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
                }
                std::fs::copy(&snap, &dest)
                    .map_err(|e| format!("{} -> {}: {e}", snap.display(), dest.display()))?;
            }
        }
        Ok(())
    }

    /// Files mode for one model: the snapshot path in the Hugging Face cache.
    fn fetch_model_file(
        &self,
        m: &PlannedModel,
        progress: &Progress,
        obs: &dyn Observer,
        cached: &AtomicU64,
        remote: &AtomicU64,
    ) -> Result<ModelSource, String> {
        let repo = RepoRef::model(&m.repo)?;
        let snap = self
            .hf
            .snapshot_path(&repo, &m.commit, &safe_rel_path(&m.file)?);
        if let Ok(meta) = std::fs::metadata(&snap)
            && meta.is_file()
        {
            cached.fetch_add(meta.len(), Ordering::Relaxed);
            remote.fetch_add(meta.len(), Ordering::Relaxed);
        } else {
            self.fetch_file(&repo, &m.commit, &m.file, progress, obs)?;
            if let Ok(meta) = std::fs::metadata(&snap) {
                remote.fetch_add(meta.len(), Ordering::Relaxed);
            }
        }
        // Python tools (and `source = "dir"` with layout = "hf_cache") find snapshots by ref;
        // only the per-model repos' own revision is recorded (the index's refs are the Hub's).
        let _ = self.hf.write_ref(&repo, &m.revision, &m.commit);
        Ok(ModelSource {
            id: m.id.clone(),
            path: snap,
            split: m.split,
        })
    }

    /// Downloads one whole file into the Hugging Face cache (blob + snapshot link), resuming a
    /// partial download and checking the sha256 of LFS files. Returns the snapshot path.
    pub fn fetch_file(
        &self,
        repo: &RepoRef,
        commit: &str,
        file: &str,
        progress: &Progress,
        obs: &dyn Observer,
    ) -> Result<PathBuf, String> {
        let rel = safe_rel_path(file)?;
        let snap = self.hf.snapshot_path(repo, commit, &rel);
        if snap.is_file() {
            return Ok(snap);
        }
        if self.offline {
            return Err(self.offline_miss(&format!("{repo}@{} {file}", short(commit))));
        }
        let http = self.http()?;
        let what = format!("{repo}@{} {file}", short(commit));
        let url = http
            .resolve_url(repo.url_prefix(), &repo.id, commit, file)
            .map_err(|e| e.to_string())?;
        let head = http
            .head(&url, &what, &self.cancel)
            .map_err(|e| e.to_string())?;
        check_etag(&head.etag).map_err(|m| format!("{what}: {m}"))?;
        if let Some(c) = &head.commit
            && is_commit(c)
            && c != commit
        {
            return Err(format!(
                "{what}: the Hub served commit {c} for pinned commit {commit}"
            ));
        }
        let size = head
            .size
            .ok_or_else(|| format!("{what}: the Hub did not say how large the file is"))?;
        let blob = self.hf.blob_path(repo, &head.etag);
        let lock_path = self.hf.lock_path(repo, &head.etag);
        if let Some(d) = lock_path.parent() {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let lock = std::fs::File::create(&lock_path)
            .map_err(|e| format!("{}: {e}", lock_path.display()))?;
        // Another process (or Python) downloading the same blob: wait for it, then reuse.
        lock.lock()
            .map_err(|e| format!("{}: {e}", lock_path.display()))?;
        let result = (|| {
            let have = std::fs::metadata(&blob).map(|m| m.len()).ok();
            if have != Some(size) {
                if let Some(d) = blob.parent() {
                    std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
                }
                let part = blob.with_file_name(format!("{}.incomplete", head.etag));
                let had = std::fs::metadata(&part).map_or(0, |m| m.len());
                if had > 0 {
                    obs.log(&format!("{what}: resuming at {had} of {size} bytes"));
                }
                progress.expect_bytes(size.saturating_sub(had));
                http.download_resume(&url, &part, size, &what, &self.cancel, &|_| {})
                    .map_err(|e| e.to_string())?;
                verify(&part, &head.etag).map_err(|m| {
                    // A corrupt download is not worth resuming from.
                    let _ = std::fs::remove_file(&part);
                    format!("{what}: {m}")
                })?;
                std::fs::rename(&part, &blob).map_err(|e| format!("{}: {e}", blob.display()))?;
            }
            self.hf
                .link_snapshot(repo, commit, &rel, &head.etag)
                .map_err(|e| format!("{}: {e}", snap.display()))
        })();
        let _ = lock.unlock();
        result
    }

    /// Tensors mode for one model: the header and the selected tensors (from the tensor cache
    /// or by Range requests), written as one small safetensors file under `out_dir/models/`.
    fn fetch_model_tensors(
        &self,
        m: &PlannedModel,
        sel: &TensorSelection,
        out_dir: &Path,
        own_dir: bool,
        cached: &AtomicU64,
        remote: &AtomicU64,
    ) -> Result<ModelSource, String> {
        let repo = RepoRef::model(&m.repo)?;
        safe_rel_path(&m.file)?;
        let what = format!("{}@{} {}", repo, short(&m.commit), m.file);
        let url = match &self.http {
            Some(h) => Some(
                h.resolve_url(repo.url_prefix(), &repo.id, &m.commit, &m.file)
                    .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        let (header_bytes, file_len) = self.remote_header(&repo, m, url.as_ref(), &what)?;
        let file_len = usize::try_from(file_len).map_err(|_| format!("{what}: file too large"))?;
        let header = parse_header(&header_bytes[8..], file_len).map_err(|e| e.to_string())?;
        remote.fetch_add(file_len as u64, Ordering::Relaxed);
        let names = sel.resolve(&header).map_err(|e| format!("{what}: {e}"))?;

        // Cached tensors first; the rest in coalesced Range requests.
        let mut data: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut missing = Vec::new();
        for name in &names {
            let (_, e) = header
                .find(name)
                .ok_or_else(|| format!("{what}: tensor `{name}` vanished from the header"))?;
            let path = self.tensors.tensor_path(&repo, &m.commit, &m.file, name);
            match std::fs::read(&path) {
                Ok(b) if b.len() == e.span.len() => {
                    cached.fetch_add(b.len() as u64, Ordering::Relaxed);
                    data.insert(name.clone(), b);
                }
                _ => missing.push(e.clone()),
            }
        }
        if !missing.is_empty() {
            let (http, url) = match (&self.http, &url) {
                (Some(h), Some(u)) => (h, u),
                _ => {
                    return Err(
                        self.offline_miss(&format!("tensor `{}` of {what}", missing[0].name))
                    );
                }
            };
            missing.sort_by_key(|e| e.span.start);
            for group in coalesce(&missing, 64 * 1024) {
                let start = group[0].span.start as u64;
                let end = group.iter().map(|e| e.span.end).max().unwrap_or(0) as u64;
                let span = http
                    .get_range(url, start..end, false, &what, &self.cancel)
                    .map_err(|e| e.to_string())?;
                if let Some(t) = span.total
                    && t != file_len as u64
                {
                    return Err(format!(
                        "{what}: the file is now {t} bytes, its header was read from a \
                         {file_len}-byte file; the cached header is stale: clear {}",
                        self.tensors.file_dir(&repo, &m.commit, &m.file).display()
                    ));
                }
                for e in group {
                    let a = e.span.start - start as usize;
                    let bytes = span.bytes[a..a + e.span.len()].to_vec();
                    let path = self.tensors.tensor_path(&repo, &m.commit, &m.file, &e.name);
                    cache::write_atomic(&path, &bytes)
                        .map_err(|err| format!("{}: {err}", path.display()))?;
                    data.insert(e.name.clone(), bytes);
                }
            }
        }

        // The partial file: the selected tensors, the original metadata, and the original
        // tensor table so layer indices stay the paper's.
        let mut meta = header.metadata.clone();
        meta.insert(ORIGINAL_TENSORS_KEY.into(), partial::encode(&header));
        meta.insert(
            SOURCE_KEY.into(),
            format!("{}@{}/{}", repo.id, m.commit, m.file),
        );
        let mut tensors = Vec::new();
        for name in &names {
            let (_, e) = header
                .find(name)
                .ok_or_else(|| format!("{what}: tensor `{name}` vanished"))?;
            let bytes = data
                .get(name)
                .ok_or_else(|| format!("{what}: tensor `{name}` was not fetched"))?;
            tensors.push((e, bytes.as_slice()));
        }
        let rel = if own_dir {
            let name = Path::new(&m.file)
                .file_name()
                .map_or_else(|| "model.safetensors".into(), |n| n.to_os_string());
            PathBuf::from("models")
                .join(cache::encode_name(&m.id))
                .join(name)
        } else {
            PathBuf::from("models").join(format!("{}.safetensors", cache::encode_name(&m.id)))
        };
        let dest = out_dir.join(&rel);
        write_safetensors(&dest, &tensors, &meta)
            .map_err(|e| format!("{}: {e}", dest.display()))?;
        Ok(ModelSource {
            id: m.id.clone(),
            path: dest,
            split: m.split,
        })
    }

    /// The `8 + n` header bytes of a remote safetensors file, from the tensor cache or in one
    /// Range request (two when the header is longer than the first guess). The header length is
    /// checked against [`probex_weights::reader::MAX_HEADER_LEN`] and the file size before anything is allocated for it.
    fn remote_header(
        &self,
        repo: &RepoRef,
        m: &PlannedModel,
        url: Option<&reqwest::Url>,
        what: &str,
    ) -> Result<(Vec<u8>, u64), String> {
        let path = self.tensors.header_path(repo, &m.commit, &m.file);
        let size_path = path.with_file_name("size");
        if let (Ok(bytes), Ok(size)) = (std::fs::read(&path), std::fs::read_to_string(&size_path))
            && let Ok(size) = size.trim().parse::<u64>()
            && let Ok(n) = header_len(&bytes, size)
            && bytes.len() == 8 + n
        {
            return Ok((bytes, size));
        }
        let (http, url) = match (&self.http, url) {
            (Some(h), Some(u)) => (h, u),
            _ => return Err(self.offline_miss(&format!("the header of {what}"))),
        };
        // One request covers the header of almost every model (a ViT's is ~10 KB, an SD LoRA's
        // ~40 KB); a longer header costs a second one.
        const FIRST: u64 = 64 * 1024;
        let first = http
            .get_range(url, 0..FIRST, true, what, &self.cancel)
            .map_err(|e| e.to_string())?;
        let total = first.total.ok_or_else(|| {
            format!("{what}: the server did not say how large the file is (no Content-Range)")
        })?;
        let n = header_len(&first.bytes, total).map_err(|m| format!("{what}: {m}"))?;
        let want = 8 + n;
        let mut bytes = first.bytes;
        if bytes.len() >= want {
            bytes.truncate(want);
        } else {
            let more = http
                .get_range(
                    url,
                    bytes.len() as u64..want as u64,
                    false,
                    what,
                    &self.cancel,
                )
                .map_err(|e| e.to_string())?;
            bytes.extend_from_slice(&more.bytes);
        }
        // Validate before caching: a bad header is an error now, not a poisoned cache entry.
        let total_usize = usize::try_from(total).map_err(|_| format!("{what}: file too large"))?;
        parse_header(&bytes[8..], total_usize).map_err(|m| format!("{what}: {m}"))?;
        cache::write_atomic(&size_path, total.to_string().as_bytes())
            .map_err(|e| format!("{}: {e}", size_path.display()))?;
        cache::write_atomic(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((bytes, total))
    }
}

/// Writes a safetensors file deterministically (keys sorted, tensors in name order, header
/// padded to 8 bytes), so the same inputs give the same bytes and the same artifact digest.
fn write_safetensors(
    path: &Path,
    tensors: &[(&probex_weights::TensorEntry, &[u8])],
    metadata: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    let json = probex_weights::writer::header_json(
        tensors
            .iter()
            .map(|(e, bytes)| (e.name.as_str(), e.dtype, e.shape.as_slice(), bytes.len())),
        metadata,
    );
    let offset: usize = tensors.iter().map(|(_, bytes)| bytes.len()).sum();
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for (_, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(path, out)
}

/// Groups spans (sorted by start) whose gaps are at most `gap` bytes, so neighbours (a LoRA's
/// up and down factors) come in one request without pulling in much else.
fn coalesce(
    spans: &[probex_weights::TensorEntry],
    gap: usize,
) -> Vec<Vec<&probex_weights::TensorEntry>> {
    let mut out: Vec<Vec<&probex_weights::TensorEntry>> = Vec::new();
    let mut end = 0usize;
    for e in spans {
        match out.last_mut() {
            Some(g) if e.span.start <= end.saturating_add(gap) => {
                end = end.max(e.span.end);
                g.push(e);
            }
            _ => {
                end = e.span.end;
                out.push(vec![e]);
            }
        }
    }
    out
}

/// Checks a downloaded file against its etag: sha256 for LFS/Xet files (64 hex), the git blob
/// id for plain files (40 hex).
fn verify(path: &Path, etag: &str) -> Result<(), String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    if etag.len() == 64 {
        let mut h = sha2::Sha256::new();
        loop {
            let k = f.read(&mut buf).map_err(|e| e.to_string())?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
        }
        let got = hex::encode(&h.finalize());
        if !got.eq_ignore_ascii_case(etag) {
            return Err(format!(
                "sha256 {got} does not match the Hub's {etag}: the download is corrupt \
                 (deleted; run again)"
            ));
        }
    }
    // Plain git files are small (configs, cards): their size was checked by the transfer.
    Ok(())
}

fn short(commit: &str) -> &str {
    commit.get(..10).unwrap_or(commit)
}

fn snapshot(c: &http::Counters) -> [u64; 4] {
    [
        c.bytes.load(Ordering::Relaxed),
        c.requests.load(Ordering::Relaxed),
        c.retries.load(Ordering::Relaxed),
        c.range_ignored.load(Ordering::Relaxed),
    ]
}

fn collect_errors<R>(results: Vec<Result<R, String>>) -> Result<Vec<R>, String> {
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    let mut not_started = 0usize;
    for r in results {
        match r {
            Ok(v) => ok.push(v),
            Err(e) if e.starts_with("not started") => not_started += 1,
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() && not_started == 0 {
        return Ok(ok);
    }
    let shown = errors.len().min(10);
    let mut msg = format!("{} failed", errors.len().max(1));
    msg.push_str(":\n  ");
    msg.push_str(&errors[..shown].join("\n  "));
    if errors.len() > shown {
        msg.push_str(&format!("\n  ... and {} more", errors.len() - shown));
    }
    if not_started > 0 {
        msg.push_str(&format!(
            "\n  ({not_started} not started after the failure; {} finished and stay cached)",
            ok.len()
        ));
    }
    Err(msg)
}

/// Progress of a fetch: models done, bytes received, rate and ETA.
pub struct Progress {
    total: u64,
    done: AtomicU64,
    expected_bytes: AtomicU64,
    started: Instant,
    last: Mutex<Instant>,
}

impl Progress {
    /// Progress over `total` models.
    pub fn new(total: u64) -> Self {
        let now = Instant::now();
        Progress {
            total,
            done: AtomicU64::new(0),
            expected_bytes: AtomicU64::new(0),
            started: now,
            last: Mutex::new(now),
        }
    }

    fn file_done(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    fn expect_bytes(&self, n: u64) {
        self.expected_bytes.fetch_add(n, Ordering::Relaxed);
    }

    fn due(&self) -> bool {
        let Ok(mut last) = self.last.lock() else {
            return false;
        };
        if last.elapsed() >= Duration::from_secs(1) {
            *last = Instant::now();
            true
        } else {
            false
        }
    }

    /// The progress line: `12/100 models, 34.5 MB at 5.2 MB/s, ETA 16s`.
    pub fn line(&self, bytes: u64) -> String {
        let done = self.done.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = bytes as f64 / secs;
        let eta = if done > 0 && done < self.total {
            let per = secs / done as f64;
            format!(", ETA {}", human_secs(per * (self.total - done) as f64))
        } else {
            String::new()
        };
        format!(
            "{done}/{} models, {} at {}/s{eta}",
            self.total,
            human_bytes(bytes as f64),
            human_bytes(rate)
        )
    }

    fn report(&self, obs: &dyn Observer, bytes: u64) {
        let line = self.line(bytes);
        obs.progress(self.done.load(Ordering::Relaxed), self.total, &line);
    }
}

fn human_bytes(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b:.0} B")
    }
}

fn human_secs(s: f64) -> String {
    if s >= 3600.0 {
        format!("{:.0}h{:02.0}m", (s / 3600.0).floor(), (s % 3600.0) / 60.0)
    } else if s >= 60.0 {
        format!("{:.0}m{:02.0}s", (s / 60.0).floor(), s % 60.0)
    } else {
        format!("{s:.0}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(2_400_000.0), "2.4 MB");
        assert_eq!(human_secs(75.0), "1m15s");
    }
}
