//! Where and how to reach the Hub: the endpoint, the token and the cache folders, found the way
//! Python's huggingface_hub finds them.

use std::path::PathBuf;

use std::time::Duration;

/// The default Hub endpoint (when neither the config nor `HF_ENDPOINT` names one).
pub const DEFAULT_ENDPOINT: &str = concat!("https://", "huggingface", ".co");

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

/// The token as Python's huggingface_hub finds it.
pub fn env_token() -> Option<String> {
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

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
fn hf_home() -> Option<PathBuf> {
    std::env::var_os("HF_HOME").map(PathBuf::from).or_else(|| {
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|c| c.join("huggingface"))
    })
}

/// The Hugging Face cache: `HF_HUB_CACHE`, else `$HF_HOME/hub`.
pub fn default_hub_cache() -> PathBuf {
    std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| hf_home().map(|h| h.join("hub")))
        .unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub"))
}

/// How often and how patiently to retry.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub attempts: u32,
    /// First backoff delay; doubled on each retry, with jitter.
    pub base_delay: Duration,
    /// Longest backoff between two attempts.
    pub max_delay: Duration,
    /// Longest `Retry-After` honoured; a server asking for more makes the request fail with
    /// that wait in the message (rather than a run that sleeps for an hour unseen).
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(300),
        }
    }
}
