//! What a fetch says while it runs: the [`Observer`] it reports to and the one-line
//! [`Progress`] summary (models, bytes, rate, ETA).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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

    /// Counts one model as done.
    pub fn file_done(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to the bytes the fetch expects to move (for the ETA).
    pub fn expect_bytes(&self, n: u64) {
        self.expected_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Whether a second has passed since the last report (and so another is due).
    pub fn due(&self) -> bool {
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

    /// Sends the summary line to `obs` as progress.
    pub fn report(&self, obs: &dyn Observer, bytes: u64) {
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
