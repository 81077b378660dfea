//! The store: its layout, lookups, key locks and pins. Staging and commit, verification and
//! gc are its submodules.

mod gc;
mod staging;
mod verify;

pub use gc::{GcPolicy, GcReport, Leftovers};
pub use staging::Staging;
pub use verify::Verified;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::error::{HINT_READABLE, HINT_WRITABLE, io_err};
use crate::fsutil::{
    LockMode, Node, Slot, hash_file, list_names, lock_at, mtime_secs, remove_any, sync_dir,
    tree_size, unix_secs, unlink_held_lock, walk,
};
use crate::manifest::Reference;
use crate::manifest::{MANIFEST_FORMAT, check_rel_path, content_digest, join_rel};
use crate::{CacheError, Entry, EntryInfo, FileRecord, FileStamp, Key, Manifest, Referent};

const ENTRIES: &str = "entries";
const TMP: &str = "tmp";
const LOCKS: &str = "locks";
const WORK: &str = "work";
const QUARANTINE: &str = "quarantine";
const MANIFEST: &str = "manifest.json";
const DATA: &str = "data";
const CACHEDIR_TAG: &str = "Signature: 8a477f597d28d172789f06886806bc55\n\
# This file is a cache directory tag created by probex.\n\
# For information about cache directory tags see https://bford.info/cachedir/\n";
/// Read buffer for hashing; large enough that blake3 uses its SIMD paths.
const HASH_BUF: usize = 1 << 20;

/// A content-addressed artifact store rooted at one directory.
///
/// Layout: `entries/<first 2 hex>/<key>/{manifest.json, data/...}` (committed entries),
/// `tmp/<name>/` + `tmp/<name>.lock` (staging and trash), `locks/<key>.lock` (per-key OS locks),
/// `locks/<key>.pin` (readers' shared locks),
/// `work/<key>/` (resumable scratch) and `quarantine/<key>-<unix>` (entries that failed verify).
/// Where a referenced file is: the entry holding it and its path there, or `None` and the
/// path itself.
type Located = (Option<Key>, String);

/// An entry exists iff its directory holds `manifest.json`; commit publishes the directory with
/// one atomic rename, so readers never see half an entry. Several processes may share a store.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// Where referenced paths are (see [`Store::locate`]), remembered for the life of this
    /// handle (and its clones) by the path's bytes: a batch of 128 layer entries refers to the
    /// same 1,000 model files, and resolving a path costs a `readlink` per component.
    located: Arc<Mutex<HashMap<OsString, Located>>>,
}

/// An exclusive OS lock on one key (`locks/<key>.lock`). Whoever holds it is the only one
/// computing, committing or removing that key. Released on drop, and by the OS when the holding
/// process dies, so a crash never leaves a key stuck.
///
/// Locks are per open file, not per process: a second `lock()` of the same key from another
/// thread of the same process waits too (and from the same thread, deadlocks).
pub struct KeyLock {
    key: Key,
    root: PathBuf,
    file: File,
}

impl KeyLock {
    /// The locked key.
    pub fn key(&self) -> &Key {
        &self.key
    }
}

impl std::fmt::Debug for KeyLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyLock")
            .field("key", &self.key)
            .field("root", &self.root)
            .finish()
    }
}

/// A committed entry held under a shared lock (`locks/<key>.pin`): `gc` and `remove` leave it
/// alone until dropped, so a run can read its files safely for as long as it needs them.
/// Dereferences to the [`Entry`].
pub struct Pinned {
    entry: Entry,
    _lock: File,
}

impl Pinned {
    /// The pinned entry.
    pub fn entry(&self) -> &Entry {
        &self.entry
    }
}

impl Deref for Pinned {
    type Target = Entry;
    fn deref(&self) -> &Entry {
        &self.entry
    }
}

impl std::fmt::Debug for Pinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Pinned").field(&self.entry).finish()
    }
}

/// Resolves the default root from environment variables through `get` (testable without
/// touching the process environment).
pub(crate) fn root_from_env(get: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let nonempty = |k: &str| get(k).filter(|v| !v.is_empty());
    if let Some(p) = nonempty("PROBEX_CACHE") {
        return PathBuf::from(p);
    }
    // The XDG spec says relative values are invalid and must be ignored.
    if let Some(p) = nonempty("XDG_CACHE_HOME").map(PathBuf::from)
        && p.is_absolute()
    {
        return p.join("probex");
    }
    if let Some(h) = nonempty("HOME") {
        return PathBuf::from(h).join(".cache").join("probex");
    }
    if let Some(p) = nonempty("LOCALAPPDATA") {
        return PathBuf::from(p).join("probex");
    }
    std::env::temp_dir().join("probex-cache")
}

fn not_found(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

impl Store {
    /// Opens the store at `root`, creating it and its layout if needed. The root is made
    /// absolute, so locks and entries keep pointing at the same place if the process changes
    /// directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, CacheError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io_err(
            "create cache directory",
            &root,
            HINT_WRITABLE,
        ))?;
        let root = fs::canonicalize(&root).map_err(io_err("resolve", &root, HINT_READABLE))?;
        for sub in [ENTRIES, TMP, LOCKS, WORK, QUARANTINE] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err("create directory", &p, HINT_WRITABLE))?;
        }
        // Marks the directory as a cache for backup tools; harmless if it already exists.
        let tag = root.join("CACHEDIR.TAG");
        if !exists(&tag) {
            fs::write(&tag, CACHEDIR_TAG).map_err(io_err("write", &tag, HINT_WRITABLE))?;
        }
        Ok(Store {
            root,
            located: Arc::default(),
        })
    }

    /// The default store location: `$PROBEX_CACHE`, else `$XDG_CACHE_HOME/probex`, else
    /// `$HOME/.cache/probex` (empty variables count as unset).
    pub fn default_root() -> PathBuf {
        root_from_env(|k| std::env::var_os(k))
    }

    /// The store's root directory (absolute).
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn entry_dir(&self, key: &Key) -> PathBuf {
        self.root.join(ENTRIES).join(key.shard()).join(key.as_str())
    }

    fn lock_path(&self, key: &Key) -> PathBuf {
        self.root.join(LOCKS).join(format!("{key}.lock"))
    }

    /// Readers hold this one shared, so that a writer's exclusive `<key>.lock` (held by the
    /// process that computed the entry, until it has pinned it) never conflicts with them.
    fn pin_path(&self, key: &Key) -> PathBuf {
        self.root.join(LOCKS).join(format!("{key}.pin"))
    }

    fn work_path(&self, key: &Key) -> PathBuf {
        self.root.join(WORK).join(key.as_str())
    }

    /// The committed entry for `key`, or `None`. The manifest is parsed and validated (paths,
    /// digests, key) but files are not re-hashed; use [`Store::verify`] for that. A manifest
    /// that fails validation is an error ([`CacheError::BadManifest`]) rather than `None`, so
    /// that damage is reported instead of silently recomputed.
    pub fn get(&self, key: &Key) -> Result<Option<Entry>, CacheError> {
        let Some(manifest) = self.read_manifest(key)? else {
            return Ok(None);
        };
        let dir = self.entry_dir(key);
        // An entry whose referenced files changed or vanished is stale: it goes to quarantine
        // like a corrupt one (a plan then says so), and the node computes it again.
        if !self.stale_references(&manifest).is_empty() {
            self.quarantine(key, &dir)?;
            return Ok(None);
        }
        Ok(Some(Entry {
            key: key.clone(),
            dir: dir.join(DATA),
            manifest,
        }))
    }

    /// The validated manifest of `key`'s entry, or `None` when there is none; referenced
    /// files are not looked at (gc judges entries by their own files).
    fn read_manifest(&self, key: &Key) -> Result<Option<Manifest>, CacheError> {
        let dir = self.entry_dir(key);
        let mpath = dir.join(MANIFEST);
        let bytes = match fs::read(&mpath) {
            Ok(b) => b,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(io_err("read", mpath, HINT_READABLE)(e)),
        };
        let bad = |reason: String| CacheError::BadManifest {
            path: mpath.clone(),
            entry: dir.clone(),
            reason,
        };
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("not a valid manifest: {e}")))?;
        manifest.validate(key).map_err(|e| bad(e.to_string()))?;
        Ok(Some(manifest))
    }

    /// Where a reference's file is on disk.
    fn reference_path(&self, r: &Reference) -> PathBuf {
        match &r.entry {
            Some(k) => join_rel(&self.entry_dir(k).join(DATA), &r.path),
            None => PathBuf::from(&r.path),
        }
    }

    /// What is wrong with the files `manifest` refers to (empty when each still has the stamp
    /// it was read under).
    fn stale_references(&self, manifest: &Manifest) -> Vec<String> {
        manifest
            .references
            .iter()
            .filter_map(|r| {
                let path = self.reference_path(r);
                let now = match FileStamp::now(&path) {
                    Ok(now) => now,
                    Err(e) => return Some(format!("referenced `{}`: {e}", path.display())),
                };
                r.stamp().change(&now).map(|what| {
                    format!(
                        "referenced `{}` changed since the entry was made ({what})",
                        path.display()
                    )
                })
            })
            .collect()
    }

    /// The record of a file an entry refers to: where it is (see [`Store::locate`]) and the
    /// stamp the stage read it under (no `stat`: 1,000 model files referred to by 128 layer
    /// datasets would be 128,000 of them).
    fn reference(&self, referent: &Referent, entries: &Path) -> Reference {
        let (entry, path) = self.locate(&referent.path, entries);
        let FileStamp {
            size,
            mtime_ns,
            inode,
        } = referent.stamp;
        Reference {
            entry,
            path,
            size,
            mtime_ns,
            inode,
        }
    }

    /// Which entry of this cache holds `path` and where in its data folder (`/`-separated),
    /// or `None` and the path itself for a file outside the cache. `entries` is the entries
    /// folder, canonical: paths are compared through symlinks, so a cache under a linked
    /// folder still owns its files.
    fn locate(&self, path: &Path, entries: &Path) -> Located {
        if let Ok(map) = self.located.lock()
            && let Some(found) = map.get(path.as_os_str())
        {
            return found.clone();
        }
        let canonical = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let in_entry = canonical.strip_prefix(entries).ok().and_then(|rest| {
            let mut parts = rest.components();
            let shard = parts.next()?.as_os_str().to_str()?;
            let key = Key::parse(parts.next()?.as_os_str().to_str()?).ok()?;
            (key.shard() == shard && parts.next()?.as_os_str() == DATA).then_some(())?;
            let rel: Vec<&str> = parts
                .map(|c| c.as_os_str().to_str())
                .collect::<Option<_>>()?;
            Some((key, rel.join("/")))
        });
        let found = match in_entry {
            Some((key, rel)) => (Some(key), rel),
            None => (None, path.to_string_lossy().into_owned()),
        };
        if let Ok(mut map) = self.located.lock() {
            map.insert(path.as_os_str().to_owned(), found.clone());
        }
        found
    }

    /// Takes the exclusive lock on `key`, waiting for the current holder (in any process) to
    /// release it. Typical use: lock, `get`, and only if that is `None`, stage and commit.
    pub fn lock(&self, key: &Key) -> Result<KeyLock, CacheError> {
        let path = self.lock_path(key);
        match lock_at(&path, LockMode::Exclusive, true)? {
            Some(file) => Ok(self.key_lock(key, file)),
            None => Err(io_err("lock", path, HINT_WRITABLE)(io::Error::other(
                "a blocking lock reported contention",
            ))),
        }
    }

    /// Takes the exclusive lock on `key` if nobody holds it; `None` if someone does.
    pub fn try_lock(&self, key: &Key) -> Result<Option<KeyLock>, CacheError> {
        Ok(lock_at(&self.lock_path(key), LockMode::Exclusive, false)?
            .map(|file| self.key_lock(key, file)))
    }

    fn key_lock(&self, key: &Key, file: File) -> KeyLock {
        KeyLock {
            key: key.clone(),
            root: self.root.clone(),
            file,
        }
    }

    /// Takes a shared pin on `key` and returns the committed entry it protects, or `None` if
    /// there is no entry. While pinned, `gc` and `remove` leave the entry alone; several readers
    /// may pin at once. A writer's [`Store::lock`] does not wait for pins (it only ever adds
    /// an entry), so the holder of the key's lock may pin the entry it just committed before
    /// letting go of the lock, leaving no moment in which `gc` could take it. Waits only while
    /// a `gc` or `remove` is deleting the entry. Do not call [`Store::remove`] on a key while
    /// this process pins it (it would wait for itself).
    pub fn pin(&self, key: &Key) -> Result<Option<Pinned>, CacheError> {
        let path = self.pin_path(key);
        let Some(lock) = lock_at(&path, LockMode::Shared, true)? else {
            return Err(io_err("lock", path, HINT_WRITABLE)(io::Error::other(
                "a blocking lock reported contention",
            )));
        };
        Ok(self.get(key)?.map(|entry| Pinned { entry, _lock: lock }))
    }

    /// Pins `entry`, which the caller just committed and whose key lock it still holds, so
    /// nobody can have removed it meanwhile: [`Store::pin`] without reading the manifest back
    /// (for an in-place layer dataset, a stat of each of its thousand referenced files).
    pub fn pin_committed(&self, lock: &KeyLock, entry: Entry) -> Result<Pinned, CacheError> {
        self.check_lock(lock)?;
        if lock.key != entry.key {
            return Err(CacheError::WrongKey {
                key: entry.key.to_string(),
                lock_key: lock.key.to_string(),
            });
        }
        let path = self.pin_path(&entry.key);
        let Some(lock) = lock_at(&path, LockMode::Shared, true)? else {
            return Err(io_err("lock", path, HINT_WRITABLE)(io::Error::other(
                "a blocking lock reported contention",
            )));
        };
        Ok(Pinned { entry, _lock: lock })
    }

    fn check_lock(&self, lock: &KeyLock) -> Result<(), CacheError> {
        if lock.root == self.root {
            Ok(())
        } else {
            Err(CacheError::ForeignLock {
                key: lock.key.to_string(),
                lock_root: lock.root.clone(),
                store_root: self.root.clone(),
            })
        }
    }

    /// Where [`Store::work_dir`] is, without creating it: for a caller that creates it only
    /// when it first writes there (most nodes never do, and a directory made and removed per
    /// node costs two inode operations each on a batch of hundreds).
    pub fn work_location(&self, lock: &KeyLock) -> Result<PathBuf, CacheError> {
        self.check_lock(lock)?;
        Ok(self.work_path(&lock.key))
    }

    /// The persistent scratch directory `work/<key>/` of the locked key, created if needed. A
    /// long stage keeps resumable checkpoints there: it survives crashes and failed runs, and
    /// is removed when the key commits (or by `gc`).
    pub fn work_dir(&self, lock: &KeyLock) -> Result<PathBuf, CacheError> {
        self.check_lock(lock)?;
        let p = self.work_path(&lock.key);
        fs::create_dir_all(&p).map_err(io_err("create directory", &p, HINT_WRITABLE))?;
        Ok(p)
    }

    /// Keys of all entry directories (sorted), whether or not their manifests are valid.
    fn entry_keys(&self) -> Result<Vec<Key>, CacheError> {
        let entries = self.root.join(ENTRIES);
        let mut keys = Vec::new();
        for shard in list_names(&entries)? {
            for name in list_names(&entries.join(&shard))? {
                if let Ok(key) = Key::parse(&name)
                    && key.shard() == shard
                {
                    keys.push(key);
                }
            }
        }
        keys.sort();
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn default_root_precedence() {
        let all = [
            ("PROBEX_CACHE", "/p"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(root_from_env(env(&all)), PathBuf::from("/p"));
        assert_eq!(
            root_from_env(env(&[
                ("PROBEX_CACHE", ""),
                ("XDG_CACHE_HOME", "/x"),
                ("HOME", "/h")
            ])),
            PathBuf::from("/x/probex")
        );
        assert_eq!(
            root_from_env(env(&[("XDG_CACHE_HOME", "rel"), ("HOME", "/h")])),
            PathBuf::from("/h/.cache/probex")
        );
        assert_eq!(
            root_from_env(env(&[("HOME", "/h")])),
            PathBuf::from("/h/.cache/probex")
        );
        assert!(root_from_env(env(&[])).is_absolute());
    }
}
