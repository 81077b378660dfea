//! The second phase: fetching every model of a plan, in files or tensors mode.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use probex_fetch::hub::{FetchReport, Mode, Observer, Plan, Progress, Request};

use super::{Hub, HubError, http};

impl Hub {
    /// Plans (or reuses this process's plan) and fetches `req` in `mode`. Tensors-mode files
    /// are written under `out_dir`; files mode points into the Hugging Face cache.
    pub fn fetch_request(
        &self,
        req: &Request,
        revision: &str,
        mode: &Mode,
        out_dir: &Path,
        obs: &dyn Observer,
    ) -> Result<FetchReport, HubError> {
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
    ) -> Result<FetchReport, HubError> {
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
                r.map_err(|e| {
                    e.at(format!(
                        "{} ({}@{} {})",
                        m.id,
                        m.repo,
                        short(&m.commit),
                        m.file
                    ))
                })
            });
            stop_ticker.store(true, Ordering::Relaxed);
            r
        });
        let models = self.collect(results)?;
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

    pub(super) fn bytes_now(&self) -> u64 {
        self.http
            .as_ref()
            .map_or(0, |h| h.counters.bytes.load(Ordering::Relaxed))
    }
}

/// The first 8 hex digits of a commit, for messages.
pub(super) fn short(commit: &str) -> &str {
    commit.get(..10).unwrap_or(commit)
}

/// The HTTP counters now: bytes, requests, retries, ignored ranges.
fn snapshot(c: &http::Counters) -> [u64; 4] {
    [
        c.bytes.load(Ordering::Relaxed),
        c.requests.load(Ordering::Relaxed),
        c.retries.load(Ordering::Relaxed),
        c.range_ignored.load(Ordering::Relaxed),
    ]
}
