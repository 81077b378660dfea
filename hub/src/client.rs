//! The connection: setting up hf-hub's API client and probex's HTTP client, and the API calls
//! (resolving a revision to a commit, listing a repo's files), with errors that say what to do.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use super::cache::{self, HfCache, RepoKind, RepoRef, TensorCache, is_commit};
use super::http::Http;
use super::{Hub, HubError};
use probex_fetch::hub::{Auth, DEFAULT_ENDPOINT, HubConfig, default_hub_cache, env_token};

/// Says what an hf-hub error means for the user.
fn api_error(what: &str, e: hf_hub::HFError, has_token: bool, endpoint: &str) -> HubError {
    use hf_hub::HFError as E;
    let token_hint = if has_token {
        ""
    } else {
        "; if it is private or gated, set HF_TOKEN"
    };
    let what = what.to_owned();
    match e {
        E::AuthRequired { .. } if has_token => HubError::TokenRefused { what },
        E::AuthRequired { .. } => HubError::AuthRequired { what },
        E::Forbidden { .. } => HubError::Forbidden { what },
        E::RevisionNotFound { context, .. }
            if context.as_ref().and_then(|c| c.error_code.as_deref()) == Some("RepoNotFound") =>
        {
            HubError::RepoNotFound { what, token_hint }
        }
        E::RepoNotFound { .. } => HubError::RepoNotFound { what, token_hint },
        E::RevisionNotFound { revision, .. } => HubError::RevisionNotFound {
            what,
            revision,
            token_hint,
        },
        E::RateLimited { .. } => HubError::RateLimited { what },
        source @ E::Request { .. } => HubError::Unreachable {
            what,
            endpoint: endpoint.to_owned(),
            source,
        },
        source => HubError::Api { what, source },
    }
}

impl Hub {
    /// Connects (lazily: nothing is sent until a plan or fetch needs it).
    pub fn new(cfg: &HubConfig) -> Result<Hub, HubError> {
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
            let api = b.build_sync().map_err(HubError::ClientSetup)?;
            let http = Http::new(&endpoint, token.clone(), cfg.retry.clone())?;
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

    pub(super) fn http(&self) -> Result<&Http, HubError> {
        self.http
            .as_ref()
            .ok_or(HubError::Offline("nothing may be downloaded"))
    }

    pub(super) fn api(&self) -> Result<&hf_hub::HFClientSync, HubError> {
        self.api
            .as_ref()
            .ok_or(HubError::Offline("the Hub may not be asked"))
    }

    pub(super) fn offline_miss(&self, what: &str) -> HubError {
        HubError::NotCached {
            what: what.to_owned(),
            hf_cache: self.hf.root.clone(),
            tensor_cache: self.tensors.root.clone(),
        }
    }

    /// Resolves `revision` of `repo` to a commit: from the Hub (and records it in the caches'
    /// refs), or offline from those refs.
    pub fn resolve(&self, repo: &RepoRef, revision: &str) -> Result<String, HubError> {
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
            .ok_or_else(|| HubError::NotOwnerName(repo.id.clone()))?;
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
        let Some(sha) = sha else {
            return Err(HubError::NoCommit(what));
        };
        if !is_commit(&sha) {
            return Err(HubError::BadCommit {
                what,
                sha: sha.chars().take(64).collect(),
            });
        }
        // Recorded for offline runs; failing to record is not worth failing the fetch.
        let _ = self.tensors.write_ref(repo, revision, &sha);
        Ok(sha)
    }

    /// The files of `repo` at `commit` (path, size), from the tensor cache's copy of the
    /// listing or from the Hub (then kept: a commit's listing never changes).
    pub fn list_files(&self, repo: &RepoRef, commit: &str) -> Result<Vec<(String, u64)>, HubError> {
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
            .ok_or_else(|| HubError::NotOwnerName(repo.id.clone()))?;
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
}
