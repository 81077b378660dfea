//! Run records: `runs/<experiment>/<timestamp>/` holds the resolved plan, each node's status,
//! timing, key and log, the results, the expectations and the published reports of one run.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::experiment::Experiment;

/// File names inside a run directory.
pub mod files {
    /// The resolved plan at the start of the run.
    pub const PLAN: &str = "plan.json";
    /// Per-node status, timings and keys at the end.
    pub const STATUS: &str = "status.json";
    /// Results of every reporting node and the expectations.
    pub const RESULTS: &str = "results.json";
    /// The human-readable report: summaries and expectations.
    pub const REPORT: &str = "report.md";
    /// Per-node logs.
    pub const LOGS: &str = "logs";
}

/// The directory of one run.
///
/// Every file of the record is written whole or not at all ([`write_atomic`]), and every write
/// that fails is remembered ([`RunDir::problems`]): a run whose record is incomplete has not
/// succeeded, whatever its nodes did.
#[derive(Clone, Debug)]
pub struct RunDir {
    path: PathBuf,
    problems: Arc<Mutex<Vec<String>>>,
}

impl RunDir {
    /// Creates `out`, or `<experiment dir>/runs/<name>/<UTC timestamp>` when `out` is `None`.
    pub fn create(exp: &Experiment, out: Option<&Path>) -> std::io::Result<RunDir> {
        let path = match out {
            Some(p) => p.to_path_buf(),
            None => {
                // `load` checked the name; this keeps a record inside runs/ whatever built `exp`.
                if crate::experiment::check_name(&exp.name).is_err() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("experiment name `{}` is not a folder name", exp.name),
                    ));
                }
                let base = exp.base_dir.join("runs").join(&exp.name);
                let stamp = utc_stamp(SystemTime::now());
                let mut path = base.join(&stamp);
                let mut n = 2;
                while path.exists() {
                    path = base.join(format!("{stamp}-{n}"));
                    n += 1;
                }
                path
            }
        };
        fs::create_dir_all(path.join(files::LOGS))
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Ok(RunDir {
            path,
            problems: Arc::default(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The log file of a node.
    pub fn log_path(&self, node: &str) -> PathBuf {
        self.path
            .join(files::LOGS)
            .join(format!("{}.log", file_safe(node)))
    }

    /// Where a node's published files go.
    pub fn publish_dir(&self, node: &str) -> PathBuf {
        self.path.join(file_safe(node))
    }

    /// Writes `value` as pretty JSON to `name`, atomically; a failure is also remembered.
    pub fn write_json(&self, name: &str, value: &impl Serialize) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
        self.write_bytes(name, &bytes)
    }

    /// Writes text to `name`, atomically; a failure is also remembered.
    pub fn write_text(&self, name: &str, text: &str) -> io::Result<()> {
        self.write_bytes(name, text.as_bytes())
    }

    fn write_bytes(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let path = self.path.join(name);
        write_atomic(&path, bytes).inspect_err(|e| self.problem(e.to_string()))
    }

    /// Remembers that part of the record could not be written (a node's log, a published file).
    pub fn problem(&self, what: impl Into<String>) {
        if let Ok(mut p) = self.problems.lock() {
            p.push(what.into());
        }
    }

    /// Every write to the record that failed so far, in order.
    pub fn problems(&self) -> Vec<String> {
        self.problems.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

/// Writes `bytes` to `path` whole or not at all: into a temporary file beside it, synced, then
/// renamed over `path` and the directory synced. A reader (`probex report`, `compare`) sees the
/// old file, the new one, or none; never a truncated one, even when the disk fills up or the
/// process dies. The error names the path.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map_or_else(|| "record".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(with_path(e));
    }
    // The rename is only durable once the directory is; some file systems refuse to sync a
    // directory (EINVAL), which loses nothing the rename itself did not already guarantee.
    if let Ok(d) = fs::File::open(dir)
        && let Err(e) = d.sync_all()
        && e.kind() != io::ErrorKind::InvalidInput
    {
        return Err(with_path(e));
    }
    Ok(())
}

/// A node name as a file name: brackets and separators replaced.
pub fn file_safe(node: &str) -> String {
    node.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `2026-11-27T12-04-53Z` for a time (UTC, file-name safe).
pub fn utc_stamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}-{:02}-{:02}Z",
        s / 3600,
        (s / 60) % 60,
        s % 60
    )
}

/// Days since 1970-01-01 -> (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stamps_are_utc_calendar_dates() {
        assert_eq!(utc_stamp(UNIX_EPOCH), "1970-01-01T00-00-00Z");
        // 2024-02-29 12:34:56 UTC (a leap day).
        assert_eq!(
            utc_stamp(UNIX_EPOCH + Duration::from_secs(1_709_210_096)),
            "2024-02-29T12-34-56Z"
        );
    }

    #[test]
    fn node_names_become_safe_file_names() {
        assert_eq!(
            file_safe("probe[layer=59,seed=1]"),
            "probe_layer=59_seed=1_"
        );
        assert_eq!(file_safe("../x"), ".._x");
    }
}
