//! Content digests of source files, with a stat cache so unchanged files are not re-hashed.
//!
//! As git's index does, an entry is trusted while the file's size, modification time, change
//! time, inode and device are unchanged (nanosecond times). The cache is one JSON file in a
//! directory the caller chooses; it is only a cache: a missing or unreadable one starts empty.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

/// File name of the stat cache inside its directory.
pub const CACHE_FILE: &str = "source-digests.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Stat {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    inode: u64,
    dev: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    stat: Stat,
    digest: String,
}

#[derive(Default, Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    entries: HashMap<String, Entry>,
}

/// blake3 digests of whole files, remembered by (path, size, mtime, ctime, inode, device).
pub struct DigestCache {
    path: Option<PathBuf>,
    entries: Mutex<HashMap<String, Entry>>,
    dirty: AtomicBool,
}

fn stat_of(meta: &fs::Metadata) -> Stat {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Stat {
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
            inode: meta.ino(),
            dev: meta.dev(),
        }
    }
    #[cfg(not(unix))]
    {
        let ns = |t: std::io::Result<std::time::SystemTime>| {
            t.ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos() as i128)
                .unwrap_or(0)
        };
        Stat {
            size: meta.len(),
            mtime_ns: ns(meta.modified()),
            ctime_ns: ns(meta.created()),
            inode: 0,
            dev: 0,
        }
    }
}

impl DigestCache {
    /// A cache that remembers nothing between runs (every file is hashed).
    pub fn in_memory() -> Self {
        DigestCache {
            path: None,
            entries: Mutex::new(HashMap::new()),
            dirty: AtomicBool::new(false),
        }
    }

    /// Opens the cache stored in `dir` (created on [`DigestCache::save`] if missing).
    pub fn open(dir: &Path) -> Self {
        let path = dir.join(CACHE_FILE);
        let entries = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<CacheFile>(&b).ok())
            .filter(|c| c.version == 1)
            .map(|c| c.entries)
            .unwrap_or_default();
        DigestCache {
            path: Some(path),
            entries: Mutex::new(entries),
            dirty: AtomicBool::new(false),
        }
    }

    fn key(path: &Path) -> String {
        fs::canonicalize(path)
            .unwrap_or_else(|_| path.to_path_buf())
            .to_string_lossy()
            .to_string()
    }

    /// The blake3 hex digest of the file at `path`. `contents` is the file's bytes when the
    /// caller has them mapped already (hashed only on a cache miss); otherwise the file is read.
    pub fn digest(&self, path: &Path, contents: Option<&[u8]>) -> Result<String, String> {
        let meta = fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let stat = stat_of(&meta);
        let key = Self::key(path);
        if let Ok(map) = self.entries.lock()
            && let Some(e) = map.get(&key)
            && e.stat == stat
        {
            return Ok(e.digest.clone());
        }
        let digest = match contents {
            Some(bytes) if bytes.len() as u64 == stat.size => {
                blake3::hash(bytes).to_hex().to_string()
            }
            _ => {
                let mut h = blake3::Hasher::new();
                h.update_reader(
                    fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?,
                )
                .map_err(|e| format!("{}: {e}", path.display()))?;
                h.finalize().to_hex().to_string()
            }
        };
        if let Ok(mut map) = self.entries.lock() {
            map.insert(
                key,
                Entry {
                    stat,
                    digest: digest.clone(),
                },
            );
            self.dirty.store(true, Ordering::Relaxed);
        }
        Ok(digest)
    }

    /// Writes the cache back (atomically: temporary file, then rename) if it changed.
    pub fn save(&self) -> Result<(), String> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.dirty.load(Ordering::Relaxed) {
            return Ok(());
        }
        let entries = self
            .entries
            .lock()
            .map_err(|_| "digest cache lock poisoned".to_string())?
            .clone();
        let file = CacheFile {
            version: 1,
            entries,
        };
        let json = serde_json::to_vec(&file).map_err(|e| e.to_string())?;
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let tmp = path.with_extension(format!("json.tmp{}", std::process::id()));
        fs::write(&tmp, json).map_err(|e| format!("{}: {e}", tmp.display()))?;
        fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
        self.dirty.store(false, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_digest_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.bin");
        fs::write(&f, b"hello").unwrap();
        let cache = DigestCache::open(dir.path());
        let d1 = cache.digest(&f, None).unwrap();
        assert_eq!(d1, blake3::hash(b"hello").to_hex().to_string());
        cache.save().unwrap();

        // A reopened cache answers from the stat entry: prove it by handing in wrong contents
        // of the right length, which are only hashed on a miss.
        let cache = DigestCache::open(dir.path());
        assert_eq!(cache.digest(&f, Some(b"HELLO")).unwrap(), d1);

        fs::write(&f, b"hello, world").unwrap();
        let d2 = cache.digest(&f, None).unwrap();
        assert_eq!(d2, blake3::hash(b"hello, world").to_hex().to_string());
    }

    #[test]
    fn corrupt_cache_file_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(CACHE_FILE), b"{not json").unwrap();
        let f = dir.path().join("a.bin");
        fs::write(&f, b"x").unwrap();
        let cache = DigestCache::open(dir.path());
        assert_eq!(
            cache.digest(&f, None).unwrap(),
            blake3::hash(b"x").to_hex().to_string()
        );
        cache.save().unwrap();
    }
}
