//! A mock Hugging Face Hub on 127.0.0.1, for tests and benchmarks: std only, one thread per
//! connection, serving the few endpoints fetch uses, with faults injected on demand.
//!
//! Endpoints: `GET /api/{models,datasets}/{owner}/{name}[/revision/{rev}]` (info with `sha`),
//! `GET /api/{...}/tree/{rev}?recursive=true` (file list), `HEAD`/`GET
//! /[datasets/]{owner}/{name}/resolve/{rev}/{path}` (with `Range`, `ETag`, `X-Linked-Etag`,
//! `X-Repo-Commit`, `X-Error-Code` on 404). Private repos want `Authorization: Bearer {token}`.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use probex_engine::cache::hex;
use sha2::Digest as _;

/// A fault to apply to the next matching request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status (and `Retry-After` seconds if given), no body.
    Status(u16, Option<u64>),
    /// Send the headers (correct Content-Length) and this many body bytes, then close.
    CutBody(usize),
    /// Announce `Content-Length` this much larger than the body, send the body, close.
    LongerContentLength(usize),
    /// Announce `Content-Length` this much smaller than the body (the client reads less).
    ShorterContentLength(usize),
}

/// One repository of the mock.
#[derive(Clone, Debug, Default)]
pub struct MockRepo {
    /// The commit `main` resolves to (40 hex).
    pub commit: String,
    /// Files by path.
    pub files: BTreeMap<String, Vec<u8>>,
    /// Whether a token is required.
    pub private: bool,
}

/// One request the mock saw.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Path (decoded, without the query).
    pub path: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// The `Authorization` header, if any.
    pub auth: Option<String>,
    /// The status answered.
    pub status: u16,
}

#[derive(Default)]
struct State {
    /// Repos by `models/owner/name` or `datasets/owner/name`.
    repos: BTreeMap<String, MockRepo>,
    /// Faults by resolve-path substring, applied to GETs in order.
    faults: Vec<(String, VecDeque<Fault>)>,
    seen: Vec<Seen>,
}

/// A running mock Hub. Dropping it stops accepting connections.
pub struct MockHub {
    addr: String,
    state: Arc<Mutex<State>>,
    /// Body bytes sent for resolve GETs.
    pub body_bytes: Arc<AtomicU64>,
    /// When set, `Range` is ignored (200 with the whole file).
    pub ignore_range: Arc<AtomicBool>,
    /// The token private repos want.
    pub token: String,
    stop: Arc<AtomicBool>,
}

impl MockHub {
    /// Starts a mock on a free port of 127.0.0.1.
    pub fn start() -> std::io::Result<MockHub> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = format!("http://{}", listener.local_addr()?);
        let hub = MockHub {
            addr,
            state: Arc::new(Mutex::new(State::default())),
            body_bytes: Arc::new(AtomicU64::new(0)),
            ignore_range: Arc::new(AtomicBool::new(false)),
            token: "hf_mock_secret_token".into(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let state = hub.state.clone();
        let bytes = hub.body_bytes.clone();
        let ignore = hub.ignore_range.clone();
        let token = hub.token.clone();
        let stop = hub.stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (state, bytes, ignore, token) =
                    (state.clone(), bytes.clone(), ignore.clone(), token.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &state, &bytes, &ignore, &token);
                });
            }
        });
        Ok(hub)
    }

    /// The endpoint (`http://127.0.0.1:PORT`).
    pub fn endpoint(&self) -> &str {
        &self.addr
    }

    /// Adds or replaces a model repo.
    pub fn put_model(&self, id: &str, repo: MockRepo) {
        self.lock().repos.insert(format!("models/{id}"), repo);
    }

    /// Adds or replaces a dataset repo.
    pub fn put_dataset(&self, id: &str, repo: MockRepo) {
        self.lock().repos.insert(format!("datasets/{id}"), repo);
    }

    /// Changes a model repo: `f` edits it in place.
    pub fn edit_model(&self, id: &str, f: impl FnOnce(&mut MockRepo)) {
        if let Some(r) = self.lock().repos.get_mut(&format!("models/{id}")) {
            f(r);
        }
    }

    /// Queues faults for GETs whose path contains `path_part`.
    pub fn fault(&self, path_part: &str, faults: impl IntoIterator<Item = Fault>) {
        self.lock()
            .faults
            .push((path_part.to_string(), faults.into_iter().collect()));
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// Forgets the requests seen so far and resets the byte counter.
    pub fn reset_counts(&self) {
        self.lock().seen.clear();
        self.body_bytes.store(0, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for MockHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr.trim_start_matches("http://"));
    }
}

/// A commit-like id (40 hex) derived from a seed.
pub fn commit_id(seed: &str) -> String {
    let h = sha2::Sha256::digest(seed.as_bytes());
    hex::encode(&h[..20])
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Req {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
}

fn read_req(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<Req>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let path = decode(target.split('?').next().unwrap_or_default());
    Ok(Some(Req {
        method,
        path,
        headers,
    }))
}

fn respond(
    w: &mut TcpStream,
    status: u16,
    headers: &[(&str, String)],
    body: &[u8],
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        _ => "Status",
    };
    let mut out = format!("HTTP/1.1 {status} {reason}\r\nConnection: close\r\n");
    let mut has_len = false;
    for (k, v) in headers {
        has_len |= k.eq_ignore_ascii_case("content-length");
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_len {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    w.write_all(out.as_bytes())?;
    if !head_only {
        w.write_all(body)?;
    }
    w.flush()
}

/// Answers one connection: reads its request and dispatches it to the API or the file
/// endpoints (anything else is a 404).
fn serve(
    conn: TcpStream,
    state: &Mutex<State>,
    bytes: &AtomicU64,
    ignore_range: &AtomicBool,
    token: &str,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut w = conn;
    let Some(req) = read_req(&mut reader)? else {
        return Ok(());
    };
    // Drain a body if one was sent (none of our requests have one).
    if let Some(n) = req
        .headers
        .get("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        let mut sink = vec![0u8; n.min(1 << 20)];
        let _ = reader.read_exact(&mut sink);
    }
    let x = Exchange {
        auth_ok: req.headers.get("authorization").map(String::as_str)
            == Some(format!("Bearer {token}").as_str()),
        head: req.method == "HEAD",
        req: &req,
        bytes,
        ignore_range,
    };
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    let segs: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();

    // API: /api/{kind}/{o}/{n}[/revision/{rev}] and /api/{kind}/{o}/{n}/tree/{rev}
    if segs.first() == Some(&"api") && segs.len() >= 4 {
        return x.api(st, &mut w, &segs);
    }
    // Files: /[datasets/]{o}/{n}/resolve/{rev}/{path...}
    let (kind, segs) = if segs.first() == Some(&"datasets") {
        ("datasets", &segs[1..])
    } else {
        ("models", &segs[..])
    };
    if segs.len() >= 5 && segs[2] == "resolve" {
        return x.resolve(st, &mut w, kind, segs);
    }
    x.record(&mut st, 404);
    drop(st);
    respond(&mut w, 404, &[], b"", x.head)
}

/// One request being answered: the request, whether its token is right, whether it is a HEAD,
/// and the mock's switches and counters that the answer reads and counts in.
struct Exchange<'a> {
    req: &'a Req,
    auth_ok: bool,
    head: bool,
    /// Body bytes sent for resolve GETs.
    bytes: &'a AtomicU64,
    /// When set, `Range` is ignored.
    ignore_range: &'a AtomicBool,
}

impl Exchange<'_> {
    /// Notes the request and the status it got in what the mock has seen.
    fn record(&self, st: &mut State, status: u16) {
        st.seen.push(Seen {
            method: self.req.method.clone(),
            path: self.req.path.clone(),
            range: self.req.headers.get("range").cloned(),
            auth: self.req.headers.get("authorization").cloned(),
            status,
        })
    }

    /// Records `status` and answers it with an empty body and, when given, `X-Error-Code`.
    fn refuse(
        &self,
        mut st: MutexGuard<'_, State>,
        w: &mut TcpStream,
        status: u16,
        code: Option<&str>,
    ) -> std::io::Result<()> {
        self.record(&mut st, status);
        drop(st);
        let headers: Vec<(&str, String)> = code
            .map(|c| ("X-Error-Code", c.to_string()))
            .into_iter()
            .collect();
        respond(w, status, &headers, b"", self.head)
    }

    /// The API endpoints: a repo's info (`sha`, files) and its file tree.
    fn api(
        &self,
        mut st: MutexGuard<'_, State>,
        w: &mut TcpStream,
        segs: &[&str],
    ) -> std::io::Result<()> {
        let key = format!("{}/{}/{}", segs[1], segs[2], segs[3]);
        let not_found = |mut st: MutexGuard<'_, State>, w: &mut TcpStream, code: &str| {
            self.record(&mut st, 404);
            drop(st);
            respond(
                w,
                404,
                &[
                    ("X-Error-Code", code.to_string()),
                    ("Content-Type", "application/json".into()),
                ],
                br#"{"error":"not found"}"#,
                self.head,
            )
        };
        let Some(repo) = st.repos.get(&key).cloned() else {
            return not_found(st, w, "RepoNotFound");
        };
        if repo.private && !self.auth_ok {
            self.record(&mut st, 401);
            drop(st);
            return respond(w, 401, &[], b"{\"error\":\"auth\"}", self.head);
        }
        let body = match api_body(&repo, segs) {
            Ok(body) => body,
            Err(code) => return not_found(st, w, code),
        };
        self.record(&mut st, 200);
        drop(st);
        let body = serde_json::to_vec(&body).unwrap_or_default();
        respond(
            w,
            200,
            &[("Content-Type", "application/json".into())],
            &body,
            self.head,
        )
    }

    /// The file endpoint: a file of `kind/{segs[0]}/{segs[1]}` at revision `segs[3]`, whole or
    /// a `Range` of it, with the fault queued for its path applied.
    fn resolve(
        &self,
        mut st: MutexGuard<'_, State>,
        w: &mut TcpStream,
        kind: &str,
        segs: &[&str],
    ) -> std::io::Result<()> {
        let key = format!("{kind}/{}/{}", segs[0], segs[1]);
        let file = segs[4..].join("/");
        let Some(repo) = st.repos.get(&key).cloned() else {
            return self.refuse(st, w, 404, Some("RepoNotFound"));
        };
        if repo.private && !self.auth_ok {
            return self.refuse(st, w, 401, None);
        }
        if segs[3] != "main" && segs[3] != repo.commit {
            return self.refuse(st, w, 404, Some("RevisionNotFound"));
        }
        let Some(data) = repo.files.get(&file).cloned() else {
            return self.refuse(st, w, 404, Some("EntryNotFound"));
        };
        let fault = if self.head {
            None
        } else {
            st.faults
                .iter_mut()
                .find(|(p, q)| self.req.path.contains(p.as_str()) && !q.is_empty())
                .and_then(|(_, q)| q.pop_front())
        };
        let etag = hex::encode(&sha2::Sha256::digest(&data));
        let mut headers = vec![
            ("ETag", format!("\"{etag}\"")),
            ("X-Linked-Etag", format!("\"{etag}\"")),
            ("X-Repo-Commit", repo.commit.clone()),
            ("Accept-Ranges", "bytes".into()),
        ];
        let range = self
            .req
            .headers
            .get("range")
            .filter(|_| !self.ignore_range.load(Ordering::Relaxed))
            .and_then(|r| parse_range(r, data.len()));
        let (status, body) = match range {
            Some((a, b)) if a <= b && a < data.len() => {
                headers.push(("Content-Range", format!("bytes {a}-{b}/{}", data.len())));
                (206, data[a..=b].to_vec())
            }
            Some(_) => {
                headers.push(("Content-Range", format!("bytes */{}", data.len())));
                (416, Vec::new())
            }
            None => (200, data),
        };
        if let Some(fault) = fault {
            return self.faulty(st, w, fault, (status, headers, &body));
        }
        self.record(&mut st, status);
        drop(st);
        if !self.head {
            self.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
        }
        respond(w, status, &headers, &body, self.head)
    }

    /// Answers a file GET with `fault` instead of the right answer (status, headers, body).
    fn faulty(
        &self,
        mut st: MutexGuard<'_, State>,
        w: &mut TcpStream,
        fault: Fault,
        (status, mut headers, body): (u16, Vec<(&str, String)>, &[u8]),
    ) -> std::io::Result<()> {
        if let Fault::Status(code, ra) = fault {
            self.record(&mut st, code);
            drop(st);
            let h: Vec<(&str, String)> = ra
                .map(|s| ("Retry-After", s.to_string()))
                .into_iter()
                .collect();
            return respond(w, code, &h, b"", false);
        }
        self.record(&mut st, status);
        drop(st);
        let (len, sent) = match fault {
            Fault::CutBody(n) => (body.len(), n.min(body.len())),
            Fault::LongerContentLength(extra) => (body.len() + extra, body.len()),
            Fault::ShorterContentLength(less) => (body.len().saturating_sub(less), body.len()),
            Fault::Status(..) => (body.len(), body.len()),
        };
        headers.push(("Content-Length", len.to_string()));
        self.bytes.fetch_add(sent as u64, Ordering::Relaxed);
        respond(w, status, &headers, &body[..sent], false)
    }
}

/// The JSON an API request for `repo` answers: its info (`[]` or `["revision", rev]` after the
/// repo) or its file tree (`["tree", rev, ..]`); the `X-Error-Code` of a 404 otherwise.
fn api_body(repo: &MockRepo, segs: &[&str]) -> Result<serde_json::Value, &'static str> {
    let rest = &segs[4..];
    let rev_ok = |rev: &str| rev == "main" || rev == repo.commit;
    match rest {
        [] | ["revision", _] => {
            if let ["revision", rev] = rest
                && !rev_ok(rev)
            {
                return Err("RevisionNotFound");
            }
            Ok(serde_json::json!({
                "id": format!("{}/{}", segs[2], segs[3]),
                "sha": repo.commit,
                "siblings": repo.files.keys().map(|k| serde_json::json!({"rfilename": k})).collect::<Vec<_>>(),
            }))
        }
        ["tree", rev, ..] => {
            if !rev_ok(rev) {
                return Err("RevisionNotFound");
            }
            Ok(serde_json::Value::Array(
                repo.files
                    .iter()
                    .map(|(p, b)| {
                        let sha = hex::encode(&sha2::Sha256::digest(b));
                        serde_json::json!({
                            "type": "file",
                            "oid": commit_id(p),
                            "size": b.len(),
                            "path": p,
                            "lfs": {"oid": sha, "size": b.len(), "pointerSize": 134},
                        })
                    })
                    .collect(),
            ))
        }
        _ => Err("EntryNotFound"),
    }
}

/// A `Range` header's `bytes=a-b` (or `a-`) as inclusive bounds, the end clamped to a file of
/// `len` bytes; `None` when it cannot be read (the whole file is sent).
fn parse_range(header: &str, len: usize) -> Option<(usize, usize)> {
    let r = header.strip_prefix("bytes=")?;
    let (a, b) = r.split_once('-')?;
    let a: usize = a.parse().ok()?;
    let b: usize = if b.is_empty() {
        len.checked_sub(1)?
    } else {
        b.parse::<usize>().ok()?.min(len.checked_sub(1)?)
    };
    Some((a, b))
}
