//! Content digests of local files, kept fast by a stat cache as git's index does: a file whose
//! path, size, modification time and inode are unchanged is not hashed again.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

pub use probex_cache::FileStamp;

/// What [`FileDigests::identify`] knows of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileIdentity {
    /// The file's path, absolute and through symlinks.
    pub path: PathBuf,
    /// blake3 of its content, hex.
    pub digest: String,
    /// The stamp the digest is trusted by.
    pub stamp: FileStamp,
}

/// One remembered file: its stamp's fields inline (the file's layout since before stamps had
/// a type; `serde(flatten)` cannot carry the i128 time), and its digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Stat {
    size: u64,
    mtime_ns: i128,
    inode: u64,
    digest: String,
}

impl Stat {
    fn new(stamp: FileStamp, digest: String) -> Self {
        Stat {
            size: stamp.size,
            mtime_ns: stamp.mtime_ns,
            inode: stamp.inode,
            digest,
        }
    }

    fn stamp(&self) -> FileStamp {
        FileStamp {
            size: self.size,
            mtime_ns: self.mtime_ns,
            inode: self.inode,
        }
    }
}

/// Blake3 digests of files, remembered across runs in a JSON file.
pub struct FileDigests {
    path: Option<PathBuf>,
    entries: Mutex<BTreeMap<PathBuf, Stat>>,
    dirty: Mutex<bool>,
}

impl FileDigests {
    /// A stat cache persisted at `path` (created on first save). A damaged file is ignored.
    pub fn open(path: PathBuf) -> Self {
        let entries = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        FileDigests {
            path: Some(path),
            entries: Mutex::new(entries),
            dirty: Mutex::new(false),
        }
    }

    /// A stat cache that lives only in memory.
    pub fn in_memory() -> Self {
        FileDigests {
            path: None,
            entries: Mutex::new(BTreeMap::new()),
            dirty: Mutex::new(false),
        }
    }

    /// The blake3 hex digest of the file at `path`.
    pub fn digest(&self, path: &Path) -> std::io::Result<String> {
        self.identify(path).map(|id| id.digest)
    }

    /// The file at `path`: where it really is, its blake3 hex digest, and the stamp the digest
    /// is trusted by (the stamp seen before hashing, so a file changed while it was hashed
    /// never pairs a new stamp with old content: its next digest hashes it again).
    pub fn identify(&self, path: &Path) -> std::io::Result<FileIdentity> {
        let path = fs::canonicalize(path)?;
        let stamp = FileStamp::of(&fs::metadata(&path)?);
        if let Ok(map) = self.entries.lock()
            && let Some(s) = map.get(&path)
            && s.stamp() == stamp
        {
            let digest = s.digest.clone();
            return Ok(FileIdentity {
                path,
                digest,
                stamp,
            });
        }
        let digest = hash_file(&path)?;
        if let Ok(mut map) = self.entries.lock() {
            map.insert(path.clone(), Stat::new(stamp, digest.clone()));
            if let Ok(mut d) = self.dirty.lock() {
                *d = true;
            }
        }
        Ok(FileIdentity {
            path,
            digest,
            stamp,
        })
    }

    /// Writes the cache back (atomically) if anything was hashed.
    pub fn save(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let dirty = self.dirty.lock().map(|d| *d).unwrap_or(false);
        if !dirty {
            return Ok(());
        }
        let bytes = {
            let map = self
                .entries
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?;
            serde_json::to_vec(&*map).map_err(std::io::Error::other)?
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        fs::write(&tmp, bytes)?;
        fs::rename(&tmp, path)
    }
}

/// Blake3 hex digest of a file's content, streamed.
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reopened cache trusts what it saved (its file keeps the layout older caches have:
    /// size, mtime_ns, inode and digest per path), so a saved digest is not recomputed.
    #[test]
    fn a_reopened_cache_trusts_its_saved_entries() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.bin");
        fs::write(&f, b"one").unwrap();
        let cache = dir.path().join("stat.json");
        let d = FileDigests::open(cache.clone());
        let real = d.digest(&f).unwrap();
        d.save().unwrap();
        let saved: serde_json::Value = serde_json::from_slice(&fs::read(&cache).unwrap()).unwrap();
        let entry = saved.as_object().unwrap().values().next().unwrap();
        let mut keys: Vec<&str> = entry
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, ["digest", "inode", "mtime_ns", "size"]);
        let planted = fs::read_to_string(&cache)
            .unwrap()
            .replace(&real, "planted");
        fs::write(&cache, planted).unwrap();
        assert_eq!(FileDigests::open(cache).digest(&f).unwrap(), "planted");
    }

    #[test]
    fn rehashes_only_changed_files_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.bin");
        fs::write(&f, b"one").unwrap();
        let cache = dir.path().join("stat.json");
        let d = FileDigests::open(cache.clone());
        let first = d.digest(&f).unwrap();
        assert_eq!(first, blake3::hash(b"one").to_hex().to_string());
        d.save().unwrap();
        let again = FileDigests::open(cache);
        assert_eq!(again.digest(&f).unwrap(), first);
        fs::write(&f, b"two!").unwrap();
        assert_eq!(
            again.digest(&f).unwrap(),
            blake3::hash(b"two!").to_hex().to_string()
        );
    }
}
