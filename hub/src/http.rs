//! The byte-moving half of the Hub client: HTTP Range reads and resumable file downloads with
//! retries, on reqwest's blocking client.
//!
//! hf-hub 1.0 covers the API calls (repo info, tree listings), but not this: its downloads do
//! not resume, its range reads do not check for `206 Partial Content` (a server that ignores
//! `Range` would hand back the whole file as if it were the span), and its retries do not honour
//! `Retry-After`. So file contents go through this small layer instead.
//!
//! Everything the server says is untrusted: lengths are checked against what was asked for,
//! `Content-Range` must match the request, allocations are bounded by the requested span (never
//! by a header), and the token is sent only to the endpoint's own origin (reqwest drops it on
//! redirects to another host, such as a CDN's signed URL) and never appears in an error.

use std::io::{Read, Write};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use probex_fetch::hub::RetryPolicy;
use reqwest::StatusCode;
use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::header::{self, HeaderMap};

/// Why a request failed, and whether trying again may help.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Trying again will not help (missing file, no access, bad data); the message says why and
    /// what to do.
    #[error("{0}")]
    Fatal(String),
    /// A transient failure that outlived every retry (the last error is in the message).
    #[error("{0}")]
    Exhausted(String),
    /// The run was cancelled while waiting.
    #[error("cancelled")]
    Cancelled,
}

/// Byte counters shared by every transfer of a fetch, for progress and for the benchmark.
#[derive(Debug, Default)]
pub struct Counters {
    /// Body bytes received (including bytes skipped when a server ignored `Range`).
    pub bytes: AtomicU64,
    /// Requests sent (retries included).
    pub requests: AtomicU64,
    /// Responses that ignored a `Range` header (200 instead of 206).
    pub range_ignored: AtomicU64,
    /// Retries made.
    pub retries: AtomicU64,
}

/// A blocking HTTP client for one Hub endpoint.
pub struct Http {
    client: Client,
    head_client: Client,
    endpoint: String,
    token: Option<String>,
    retry: RetryPolicy,
    /// Shared transfer counters.
    pub counters: std::sync::Arc<Counters>,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("Http")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// What a successful GET of a span returned.
pub struct Span {
    /// The bytes of the requested range (exactly its length).
    pub bytes: Vec<u8>,
    /// The full size of the file, from `Content-Range` (or the body length of a 200).
    pub total: Option<u64>,
    /// Whether the server ignored `Range` and sent the whole file.
    pub range_ignored: bool,
}

/// The headers of a file on the Hub (what a `HEAD` on its resolve URL says).
#[derive(Clone, Debug)]
pub struct FileHead {
    /// The content's etag (`X-Linked-Etag`, else `ETag`), quotes removed: the sha256 for
    /// LFS/Xet files, the git blob id otherwise.
    pub etag: String,
    /// The commit the revision resolved to (`X-Repo-Commit`), if sent.
    pub commit: Option<String>,
    /// The file's size (`X-Linked-Size`, else `Content-Length`).
    pub size: Option<u64>,
}

impl Http {
    /// A client for `endpoint` (no trailing slash) authenticating with `token` when given.
    pub fn new(
        endpoint: &str,
        token: Option<String>,
        retry: RetryPolicy,
    ) -> Result<Self, HttpError> {
        let endpoint = endpoint.trim_end_matches('/').to_string();
        let origin = reqwest::Url::parse(&endpoint)
            .map_err(|e| HttpError::Fatal(format!("Hub endpoint `{endpoint}`: {e}")))?;
        let host = origin.host_str().unwrap_or_default().to_string();
        let port = origin.port_or_known_default();
        // HEAD must see the Hub's own headers (X-Linked-Etag, X-Repo-Commit) on the redirect to
        // a CDN, so its client follows redirects only within the endpoint's origin; GETs follow
        // them all (the signed CDN URL is where the bytes are).
        let build = |policy: reqwest::redirect::Policy| {
            Client::builder()
                .user_agent(concat!("probex/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(Duration::from_secs(20))
                // Per read, not per transfer (blocking client): a stalled connection fails, a
                // slow 350 MB download does not.
                .timeout(Duration::from_secs(60))
                .redirect(policy)
                .build()
                .map_err(|e| HttpError::Fatal(format!("cannot build the HTTP client: {e}")))
        };
        let client = build(reqwest::redirect::Policy::limited(10))?;
        let head_client = build(reqwest::redirect::Policy::custom(move |a| {
            if a.previous().len() > 10 {
                a.error("too many redirects")
            } else if a.url().host_str() == Some(host.as_str())
                && a.url().port_or_known_default() == port
            {
                a.follow()
            } else {
                a.stop()
            }
        }))?;
        Ok(Http {
            client,
            head_client,
            endpoint,
            token,
            retry,
            counters: Default::default(),
        })
    }

    /// The endpoint, without a trailing slash.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Whether a token is configured (for error messages; never the token itself).
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// `{endpoint}/{prefix}{repo}/resolve/{revision}/{path}`, every segment percent-encoded.
    pub fn resolve_url(
        &self,
        url_prefix: &str,
        repo: &str,
        revision: &str,
        path: &str,
    ) -> Result<reqwest::Url, HttpError> {
        let mut url = reqwest::Url::parse(&format!("{}/", self.endpoint))
            .map_err(|e| HttpError::Fatal(format!("Hub endpoint: {e}")))?;
        {
            let mut seg = url
                .path_segments_mut()
                .map_err(|_| HttpError::Fatal("Hub endpoint cannot take a path".into()))?;
            seg.pop_if_empty();
            for s in url_prefix.split('/').filter(|s| !s.is_empty()) {
                seg.push(s);
            }
            for s in repo.split('/') {
                seg.push(s);
            }
            seg.push("resolve");
            seg.push(revision);
            for s in path.split('/') {
                seg.push(s);
            }
        }
        Ok(url)
    }

    fn request(&self, method: reqwest::Method, url: &reqwest::Url) -> RequestBuilder {
        let client = if method == reqwest::Method::HEAD {
            &self.head_client
        } else {
            &self.client
        };
        let mut rb = client.request(method, url.clone());
        let same_origin = reqwest::Url::parse(&self.endpoint).is_ok_and(|e| {
            e.host_str() == url.host_str()
                && e.port_or_known_default() == url.port_or_known_default()
        });
        if let (Some(t), true) = (&self.token, same_origin) {
            rb = rb.bearer_auth(t);
        }
        rb
    }

    /// Sends a request built by `build`, retrying transient failures (connection errors, 408,
    /// 429, 5xx) with backoff, honouring `Retry-After`. Non-success statuses that retrying
    /// cannot fix become [`HttpError::Fatal`] with an explanation (`what` names the object).
    pub fn send(
        &self,
        what: &str,
        cancel: &AtomicBool,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Response, HttpError> {
        let mut last = String::new();
        for attempt in 0..self.retry.attempts.max(1) {
            if attempt > 0 {
                self.counters.retries.fetch_add(1, Ordering::Relaxed);
            }
            if cancel.load(Ordering::Relaxed) {
                return Err(HttpError::Cancelled);
            }
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            let wait = match build().send() {
                // A redirect comes back only from HEAD's same-origin policy: the Hub's answer.
                Ok(resp) if resp.status().is_success() || resp.status().is_redirection() => {
                    return Ok(resp);
                }
                Ok(resp) if is_transient(resp.status()) => {
                    let status = resp.status();
                    let ra = retry_after(resp.headers());
                    last = format!("{what}: HTTP {status}");
                    match ra {
                        Some(d) if d > self.retry.max_retry_after => {
                            return Err(HttpError::Exhausted(format!(
                                "{what}: the Hub answered {status} and asks to wait {}s \
                                 (Retry-After), more than the {}s allowed; try again later",
                                d.as_secs(),
                                self.retry.max_retry_after.as_secs()
                            )));
                        }
                        Some(d) => d,
                        None => self.backoff(attempt),
                    }
                }
                Ok(resp) => return Err(HttpError::Fatal(explain(what, &resp, self.has_token()))),
                Err(e) => {
                    last = format!("{what}: {}", scrub(&e));
                    self.backoff(attempt)
                }
            };
            if attempt + 1 < self.retry.attempts {
                sleep_cancellable(wait, cancel)?;
            }
        }
        Err(HttpError::Exhausted(format!(
            "{last} (gave up after {} attempts)",
            self.retry.attempts
        )))
    }

    /// Exponential backoff with jitter for retry number `attempt` (0-based).
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.retry.base_delay.as_millis() as u64;
        let exp = base.saturating_mul(1u64 << attempt.min(16));
        let capped = exp.min(self.retry.max_delay.as_millis() as u64);
        // Cheap jitter from the clock: spreads parallel workers without a rand dependency.
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as u64);
        let jitter = if capped > 1 {
            nanos % (capped / 2 + 1)
        } else {
            0
        };
        Duration::from_millis(capped / 2 + jitter)
    }

    /// `HEAD` of a file: its etag, commit and size, as the Hub reports them before any redirect
    /// to a CDN.
    pub fn head(
        &self,
        url: &reqwest::Url,
        what: &str,
        cancel: &AtomicBool,
    ) -> Result<FileHead, HttpError> {
        let resp = self.send(what, cancel, || {
            self.request(reqwest::Method::HEAD, url)
                .header(header::ACCEPT_ENCODING, "identity")
        })?;
        let h = resp.headers();
        let text = |name: &str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.trim().to_string())
        };
        let etag = text("x-linked-etag")
            .or_else(|| text("etag"))
            .map(|e| clean_etag(&e))
            .filter(|e| !e.is_empty())
            .ok_or_else(|| {
                HttpError::Fatal(format!(
                    "{what}: the Hub sent no ETag, so the file cannot be checked or cached; \
                     is HF_ENDPOINT a Hugging Face Hub?"
                ))
            })?;
        let size = text("x-linked-size")
            .or_else(|| text("content-length"))
            .and_then(|s| s.parse::<u64>().ok());
        Ok(FileHead {
            etag,
            commit: text("x-repo-commit"),
            size,
        })
    }

    /// Reads bytes `range` of `url`, retrying transient failures, including bodies cut short.
    ///
    /// A `206` must carry a `Content-Range` for exactly that span; a `200` (server ignored
    /// `Range`) is streamed, skipping to `range.start` and stopping after the span. The result
    /// is exactly `range` long or an error; memory use is the span's length.
    ///
    /// With `allow_short`, a file that ends inside the range is not an error: the result holds
    /// the bytes up to its end (for reading a header when the file size is not known yet).
    pub fn get_range(
        &self,
        url: &reqwest::Url,
        range: Range<u64>,
        allow_short: bool,
        what: &str,
        cancel: &AtomicBool,
    ) -> Result<Span, HttpError> {
        let want = range.end.saturating_sub(range.start);
        let mut cap = usize::try_from(want)
            .map_err(|_| HttpError::Fatal(format!("{what}: span of {want} bytes is too large")))?;
        let mut last = String::new();
        for attempt in 0..self.retry.attempts.max(1) {
            if attempt > 0 {
                self.counters.retries.fetch_add(1, Ordering::Relaxed);
                sleep_cancellable(self.backoff(attempt - 1), cancel)?;
            }
            let mut resp = self.send(what, cancel, || {
                self.request(reqwest::Method::GET, url)
                    .header(
                        header::RANGE,
                        format!("bytes={}-{}", range.start, range.end - 1),
                    )
                    .header(header::ACCEPT_ENCODING, "identity")
            })?;
            let status = resp.status();
            if status != StatusCode::OK && status != StatusCode::PARTIAL_CONTENT {
                last = format!("{what}: unexpected HTTP {status}");
                continue;
            }
            let (skip, total, ignored) = if status == StatusCode::PARTIAL_CONTENT {
                let cr = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_content_range);
                match cr {
                    Some((s, e, total)) if s == range.start && e + 1 == range.end => {
                        (0, total, false)
                    }
                    // The server clipped the range at the end of the file.
                    Some((s, e, Some(total)))
                        if allow_short
                            && s == range.start
                            && e + 1 < range.end
                            && e + 1 == total =>
                    {
                        cap = (e + 1 - s) as usize;
                        (0, Some(total), false)
                    }
                    Some((s, e, _)) => {
                        last = format!(
                            "{what}: asked for bytes {}..{} but the server sent {}..{}",
                            range.start,
                            range.end,
                            s,
                            e + 1
                        );
                        continue;
                    }
                    None => {
                        last = format!("{what}: 206 without a valid Content-Range");
                        continue;
                    }
                }
            } else {
                // 200: the whole file. Skip to the span and stop after it.
                self.counters.range_ignored.fetch_add(1, Ordering::Relaxed);
                let total = resp.content_length();
                if allow_short && let Some(t) = total {
                    cap = cap.min(t.saturating_sub(range.start) as usize);
                }
                (range.start, total, true)
            };
            match read_span(&mut resp, skip, cap, &self.counters, cancel) {
                Ok(bytes) if bytes.len() == cap => {
                    return Ok(Span {
                        bytes,
                        total,
                        range_ignored: ignored,
                    });
                }
                Ok(bytes) => {
                    last = format!(
                        "{what}: the body ended after {} of {want} bytes (file shorter than its \
                         header says, or a wrong Content-Length)",
                        bytes.len()
                    );
                }
                Err(e) if cancel.load(Ordering::Relaxed) => {
                    let _ = e;
                    return Err(HttpError::Cancelled);
                }
                Err(e) => last = format!("{what}: transfer cut: {e}"),
            }
        }
        Err(HttpError::Exhausted(format!(
            "{last} (gave up after {} attempts)",
            self.retry.attempts
        )))
    }

    /// Downloads `url` into `part` (appending: a partial file from an interrupted run is
    /// resumed with a `Range` request), until it holds `size` bytes. Returns when `part` is
    /// complete; checking its digest is the caller's job. `on_bytes` sees each chunk's length.
    pub fn download_resume(
        &self,
        url: &reqwest::Url,
        part: &std::path::Path,
        size: u64,
        what: &str,
        cancel: &AtomicBool,
        on_bytes: &dyn Fn(u64),
    ) -> Result<(), HttpError> {
        let mut last = String::new();
        for attempt in 0..self.retry.attempts.max(1) {
            if attempt > 0 {
                self.counters.retries.fetch_add(1, Ordering::Relaxed);
                sleep_cancellable(self.backoff(attempt - 1), cancel)?;
            }
            let have = std::fs::metadata(part).map_or(0, |m| m.len());
            if have == size {
                return Ok(());
            }
            if have > size {
                // Longer than the file: not ours to resume from.
                std::fs::remove_file(part)
                    .map_err(|e| HttpError::Fatal(format!("{}: {e}", part.display())))?;
                continue;
            }
            let mut resp = self.send(what, cancel, || {
                let rb = self
                    .request(reqwest::Method::GET, url)
                    .header(header::ACCEPT_ENCODING, "identity");
                if have > 0 {
                    rb.header(header::RANGE, format!("bytes={have}-"))
                } else {
                    rb
                }
            })?;
            if resp.status() != StatusCode::OK && resp.status() != StatusCode::PARTIAL_CONTENT {
                last = format!("{what}: unexpected HTTP {}", resp.status());
                continue;
            }
            let skip = if have > 0 && resp.status() == StatusCode::PARTIAL_CONTENT {
                let ok = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_content_range)
                    .is_some_and(|(s, _, _)| s == have);
                if !ok {
                    last = format!("{what}: resume answered with the wrong Content-Range");
                    let _ = std::fs::remove_file(part);
                    continue;
                }
                0
            } else {
                if have > 0 {
                    self.counters.range_ignored.fetch_add(1, Ordering::Relaxed);
                }
                // 200: the whole file again; keep what we have and skip that much.
                have
            };
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(part)
                .map_err(|e| HttpError::Fatal(format!("{}: {e}", part.display())))?;
            match copy_body(
                &mut resp,
                &mut file,
                skip,
                size - have,
                &self.counters,
                cancel,
                on_bytes,
            ) {
                Ok(()) => {
                    let now = std::fs::metadata(part).map_or(0, |m| m.len());
                    if now == size {
                        return Ok(());
                    }
                    last = format!(
                        "{what}: the body ended at {now} of {size} bytes (wrong Content-Length \
                         or a cut connection)"
                    );
                }
                Err(_) if cancel.load(Ordering::Relaxed) => return Err(HttpError::Cancelled),
                Err(e) => last = format!("{what}: transfer cut: {e}"),
            }
        }
        Err(HttpError::Exhausted(format!(
            "{last} (gave up after {} attempts; what was downloaded is kept and resumed next \
             time)",
            self.retry.attempts
        )))
    }
}

fn is_transient(s: StatusCode) -> bool {
    matches!(s.as_u16(), 408 | 425 | 429 | 500 | 502 | 503 | 504)
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let v = h.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate(v)?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the only form servers send today.
fn httpdate(s: &str) -> Option<SystemTime> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_, day, mon, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let day: u64 = day.parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| m == mon)? as u64
        + 1;
    let year: u64 = year.parse().ok()?;
    let t: Vec<u64> = time.split(':').filter_map(|x| x.parse().ok()).collect();
    let [hh, mm, ss] = t.as_slice() else {
        return None;
    };
    // Days from 1970-01-01 (civil-from-days inverse, Howard Hinnant's algorithm).
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// `bytes a-b/total` -> (a, b, total); `total` may be `*`.
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    let a: u64 = a.trim().parse().ok()?;
    let b: u64 = b.trim().parse().ok()?;
    if b < a {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((a, b, total))
}

/// Strips `W/` and quotes from an etag.
fn clean_etag(e: &str) -> String {
    e.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

/// A reqwest error without anything secret (URLs carry no token; headers are not printed).
fn scrub(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// A clear message for a status that retrying will not fix.
fn explain(what: &str, resp: &Response, has_token: bool) -> String {
    let status = resp.status();
    let code = resp
        .headers()
        .get("x-error-code")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let server = resp
        .headers()
        .get("x-error-message")
        .and_then(|v| v.to_str().ok())
        .map(|m| {
            let m: String = m.chars().filter(|c| !c.is_control()).take(200).collect();
            format!(" (the Hub says: {m})")
        })
        .unwrap_or_default();
    match (status.as_u16(), code) {
        (401, _) if has_token => format!(
            "{what}: the Hub refused the token in HF_TOKEN (401){server}: check that it is valid \
             and can read this repo"
        ),
        (401, _) => format!(
            "{what}: the Hub asks for authentication (401){server}: the repo is private or \
             gated, or does not exist; set HF_TOKEN to a token that can read it"
        ),
        (403, _) => format!(
            "{what}: access denied (403){server}: the repo is gated; accept its conditions on \
             its Hub page with the account whose token is in HF_TOKEN{}",
            if has_token {
                ""
            } else {
                " (HF_TOKEN is not set)"
            }
        ),
        (404, "RepoNotFound") => format!(
            "{what}: repository not found (404){server}: check the repo id{}",
            if has_token {
                ""
            } else {
                "; if it is private, set HF_TOKEN"
            }
        ),
        (404, "RevisionNotFound") => {
            format!("{what}: revision not found (404){server}: check `revision`")
        }
        (404, "EntryNotFound") => format!(
            "{what}: no such file in the repo (404){server}: check `file` (list the repo's files \
             on its Hub page)"
        ),
        (404, _) => format!("{what}: not found (404){server}"),
        (416, _) => format!(
            "{what}: the server refused the byte range (416): the file is shorter than its header says"
        ),
        _ => format!("{what}: HTTP {status}{server}"),
    }
}

fn sleep_cancellable(d: Duration, cancel: &AtomicBool) -> Result<(), HttpError> {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if cancel.load(Ordering::Relaxed) {
            return Err(HttpError::Cancelled);
        }
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}

/// Reads `len` bytes after skipping `skip` from a body, or fewer if it ends first.
fn read_span(
    body: &mut Response,
    skip: u64,
    len: usize,
    counters: &Counters,
    cancel: &AtomicBool,
) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut skipped = 0u64;
    while skipped < skip {
        if cancel.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("cancelled"));
        }
        let n = (skip - skipped).min(buf.len() as u64) as usize;
        let k = body.read(&mut buf[..n])?;
        if k == 0 {
            return Ok(Vec::new());
        }
        skipped += k as u64;
        counters.bytes.fetch_add(k as u64, Ordering::Relaxed);
    }
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        if cancel.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("cancelled"));
        }
        let n = (len - out.len()).min(buf.len());
        let k = body.read(&mut buf[..n])?;
        if k == 0 {
            break;
        }
        out.extend_from_slice(&buf[..k]);
        counters.bytes.fetch_add(k as u64, Ordering::Relaxed);
    }
    Ok(out)
}

/// Appends up to `len` body bytes (after skipping `skip`) to `file`, flushing as it goes so an
/// interruption keeps everything received.
fn copy_body(
    body: &mut Response,
    file: &mut std::fs::File,
    skip: u64,
    len: u64,
    counters: &Counters,
    cancel: &AtomicBool,
    on_bytes: &dyn Fn(u64),
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut skipped = 0u64;
    while skipped < skip {
        if cancel.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("cancelled"));
        }
        let n = (skip - skipped).min(buf.len() as u64) as usize;
        let k = body.read(&mut buf[..n])?;
        if k == 0 {
            return Ok(());
        }
        skipped += k as u64;
        counters.bytes.fetch_add(k as u64, Ordering::Relaxed);
    }
    let mut done = 0u64;
    while done < len {
        if cancel.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("cancelled"));
        }
        let n = (len - done).min(buf.len() as u64) as usize;
        let k = body.read(&mut buf[..n])?;
        if k == 0 {
            break;
        }
        file.write_all(&buf[..k])?;
        done += k as u64;
        counters.bytes.fetch_add(k as u64, Ordering::Relaxed);
        on_bytes(k as u64);
    }
    file.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_and_dates_parse() {
        assert_eq!(
            parse_content_range("bytes 0-7/100"),
            Some((0, 7, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range("bytes 9-5/10"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        let t = httpdate("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            784_111_777
        );
        assert_eq!(clean_etag("W/\"abc\""), "abc");
    }
}
