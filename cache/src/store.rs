//! The store: layout, lookups, key locks, staging and commit, verify, remove and gc.

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

/// A private directory under `tmp/` that one stage writes its output into, to be published with
/// [`Staging::commit`]. Dropping it without committing removes it.
///
/// It holds its own OS lock (so `gc` knows it is alive) and a handle on the key lock it was
/// created under, so the key stays locked until the staging is committed or dropped.
pub struct Staging {
    store: Store,
    key: Key,
    slot_dir: PathBuf,
    data: PathBuf,
    slot: Option<Slot>,
    _key_lock: File,
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staging")
            .field("key", &self.key)
            .field("dir", &self.data)
            .finish()
    }
}

/// Outcome of re-hashing one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    /// Every file is present with the recorded size and digest, and nothing else is there.
    Ok,
    /// No entry for this key.
    Missing,
    /// What was wrong; the entry has been moved to `quarantine/` (the last item says where), so
    /// `get` now returns `None` and the next run recomputes it.
    Corrupt(Vec<String>),
}

impl Verified {
    /// Whether the entry verified.
    pub fn is_ok(&self) -> bool {
        matches!(self, Verified::Ok)
    }
}

/// What `gc` may remove. With both fields `None`, gc only does housekeeping (dead staging
/// directories, scratch of committed keys, unused lock files) and removes no entry.
///
/// An entry is removed when every given criterion selects it: it is not in `keep` (if given) and
/// it was created before `older_than` (if given). Entries in use are never removed.
#[derive(Debug, Clone, Default)]
pub struct GcPolicy {
    /// Keys to keep; entries not in it are removed.
    pub keep: Option<HashSet<Key>>,
    /// Entries committed before this time are removed.
    pub older_than: Option<SystemTime>,
}

impl GcPolicy {
    /// Whether the policy selects `key` with age `created` (Unix seconds; unknown counts as old).
    fn selects(&self, key: &Key, created: Option<u64>) -> bool {
        if self.keep.is_none() && self.older_than.is_none() {
            return false;
        }
        if self.keep.as_ref().is_some_and(|k| k.contains(key)) {
            return false;
        }
        match (self.older_than, created) {
            (Some(cutoff), Some(t)) => t < unix_secs(cutoff),
            _ => true,
        }
    }
}

/// What one `gc` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Keys whose entries were removed (sorted).
    pub removed: Vec<Key>,
    /// Bytes of files deleted: entries, dead staging directories, scratch and quarantine.
    pub freed_bytes: u64,
    /// Staging directories of dead writers that were removed.
    pub tmp_cleaned: usize,
    /// `work/<key>/` scratch directories removed (their key committed, or selected by policy).
    pub work_cleaned: usize,
    /// Quarantined entries removed (only when the policy has a criterion).
    pub quarantine_cleaned: usize,
    /// Entries the policy selected but that were locked or pinned, and so were kept.
    pub skipped_in_use: Vec<Key>,
    /// Entries the policy selected but that a kept entry refers to (a layer dataset reading
    /// their files), each with that entry, and so were kept.
    pub kept_referenced: Vec<(Key, Key)>,
}

/// Disk space outside the committed entries, as `cache ls` shows it: what `gc` would free and
/// what it keeps on purpose.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// Staging (and trash) directories whose writer died: a killed run. Any `gc`, and the next
    /// run, removes them.
    pub dead_staging: usize,
    /// Their bytes.
    pub dead_staging_bytes: u64,
    /// Entries moved aside by `verify`; `gc` with a policy (`--keep`, `--older-than`) removes
    /// them.
    pub quarantined: usize,
    /// Their bytes.
    pub quarantined_bytes: u64,
    /// Scratch of nodes that never finished (checkpoints a later run resumes from); kept until
    /// the node commits, or a policy removes it.
    pub resumable_bytes: u64,
    /// Scratch of nodes that have committed since: any `gc` removes it.
    pub stale_scratch_bytes: u64,
}

impl Leftovers {
    /// Bytes a plain `gc` frees.
    pub fn reclaimable_bytes(&self) -> u64 {
        self.dead_staging_bytes + self.stale_scratch_bytes
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
        manifest.validate(key).map_err(bad)?;
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

    /// Creates a fresh private staging directory for the locked key. The stage writes its files
    /// under [`Staging::dir`], then the caller commits.
    pub fn stage(&self, lock: &KeyLock) -> Result<Staging, CacheError> {
        self.check_lock(lock)?;
        let key_lock = lock.file.try_clone().map_err(io_err(
            "duplicate the handle of lock file",
            self.lock_path(&lock.key),
            HINT_WRITABLE,
        ))?;
        let slot = Slot::new(&self.root.join(TMP), "stage")?;
        let slot_dir = slot.dir.clone();
        let data = slot_dir.join(DATA);
        if let Err(e) = fs::create_dir(&slot_dir).and_then(|()| fs::create_dir(&data)) {
            slot.discard();
            return Err(io_err("create staging directory", data, HINT_WRITABLE)(e));
        }
        Ok(Staging {
            store: self.clone(),
            key: lock.key.clone(),
            slot_dir,
            data,
            slot: Some(slot),
            _key_lock: key_lock,
        })
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

    /// Re-hashes every file of the entry and compares with its manifest (which is treated as
    /// untrusted). A corrupt entry is moved to `quarantine/<key>-<unix>`, so that the next run
    /// recomputes it. Does not take the key lock (the move is atomic), so it may be called
    /// while holding it.
    pub fn verify(&self, key: &Key) -> Result<Verified, CacheError> {
        let dir = self.entry_dir(key);
        match fs::symlink_metadata(&dir) {
            Ok(_) => {}
            Err(e) if not_found(&e) => return Ok(Verified::Missing),
            Err(e) => return Err(io_err("inspect", dir, HINT_READABLE)(e)),
        }
        let mut problems = self.check_entry(key, &dir)?;
        if problems.is_empty() {
            return Ok(Verified::Ok);
        }
        match self.quarantine(key, &dir)? {
            Some(dest) => problems.push(format!("moved to `{}`", dest.display())),
            // Removed while we looked (gc or another verify): there is nothing left to judge.
            None => return Ok(Verified::Missing),
        }
        Ok(Verified::Corrupt(problems))
    }

    /// Lists what is wrong with the entry directory `dir` of `key` (empty if nothing).
    fn check_entry(&self, key: &Key, dir: &Path) -> Result<Vec<String>, CacheError> {
        let mut problems = Vec::new();
        for name in list_names(dir)? {
            if name != MANIFEST && name != DATA {
                problems.push(format!("unexpected `{name}` beside {MANIFEST} and {DATA}/"));
            }
        }
        let mpath = dir.join(MANIFEST);
        let manifest = match fs::read(&mpath) {
            Ok(b) => match serde_json::from_slice::<Manifest>(&b) {
                Ok(m) => match m.validate(key) {
                    Ok(()) => Some(m),
                    Err(r) => {
                        problems.push(format!("{MANIFEST}: {r}"));
                        None
                    }
                },
                Err(e) => {
                    problems.push(format!("{MANIFEST} is not a valid manifest: {e}"));
                    None
                }
            },
            Err(e) if not_found(&e) => {
                problems.push(format!("{MANIFEST} is missing"));
                None
            }
            Err(e) => return Err(io_err("read", mpath, HINT_READABLE)(e)),
        };
        let data = dir.join(DATA);
        let nodes = match fs::symlink_metadata(&data) {
            Ok(m) if m.is_dir() => walk(&data)?,
            Ok(_) => {
                problems.push(format!("{DATA} is not a directory"));
                Vec::new()
            }
            Err(e) if not_found(&e) => {
                problems.push(format!("{DATA}/ is missing"));
                Vec::new()
            }
            Err(e) => return Err(io_err("inspect", data, HINT_READABLE)(e)),
        };
        let mut on_disk = std::collections::BTreeMap::new();
        for node in nodes {
            match node {
                Node::File { rel, size } => {
                    on_disk.insert(rel, size);
                }
                Node::Dir { .. } => {}
                Node::Other { rel, what } => problems.push(format!("{DATA}/{rel} {what}")),
            }
        }
        let Some(m) = manifest else {
            return Ok(problems);
        };
        let mut buf = vec![0u8; HASH_BUF];
        for f in &m.files {
            let Some(size) = on_disk.remove(&f.path) else {
                problems.push(format!("{DATA}/{} is missing", f.path));
                continue;
            };
            if size != f.size {
                problems.push(format!(
                    "{DATA}/{} has {size} bytes, the manifest says {}",
                    f.path, f.size
                ));
                continue;
            }
            let got = hash_file(&join_rel(&data, &f.path), &f.path, false, &mut buf)?;
            if got.blake3 != f.blake3 || got.size != f.size {
                problems.push(format!(
                    "{DATA}/{} has content hash {}, the manifest says {}",
                    f.path, got.blake3, f.blake3
                ));
            }
        }
        for rel in on_disk.keys() {
            problems.push(format!("{DATA}/{rel} is not listed in the manifest"));
        }
        problems.extend(self.stale_references(&m));
        Ok(problems)
    }

    /// Whether an entry of `key` was moved to quarantine by a failed verification (and not yet
    /// removed by gc), so a plan can say why the node runs again.
    pub fn was_quarantined(&self, key: &Key) -> bool {
        let prefix = format!("{key}-");
        fs::read_dir(self.root.join(QUARANTINE)).is_ok_and(|mut dir| {
            dir.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with(&prefix)))
        })
    }

    /// Moves an entry directory to `quarantine/<key>-<unix>[-n]`; `None` if it vanished first.
    fn quarantine(&self, key: &Key, dir: &Path) -> Result<Option<PathBuf>, CacheError> {
        let qdir = self.root.join(QUARANTINE);
        fs::create_dir_all(&qdir).map_err(io_err("create directory", &qdir, HINT_WRITABLE))?;
        let base = format!("{key}-{}", unix_secs(SystemTime::now()));
        for n in 0..1000 {
            let name = if n == 0 {
                base.clone()
            } else {
                format!("{base}-{n}")
            };
            let dest = qdir.join(name);
            if exists(&dest) {
                continue;
            }
            return match fs::rename(dir, &dest) {
                Ok(()) => {
                    sync_dir(&qdir)?;
                    Ok(Some(dest))
                }
                Err(e) if not_found(&e) => Ok(None),
                Err(e) => Err(io_err("move to quarantine", dir, HINT_WRITABLE)(e)),
            };
        }
        Err(io_err("move to quarantine", dir, HINT_WRITABLE)(
            io::Error::other("too many quarantined copies of this key; run gc"),
        ))
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

    /// Verifies every entry (see [`Store::verify`]), quarantining the corrupt ones.
    pub fn verify_all(&self) -> Result<Vec<(Key, Verified)>, CacheError> {
        self.entry_keys()?
            .into_iter()
            .map(|k| self.verify(&k).map(|v| (k, v)))
            .collect()
    }

    /// All committed entries, sorted by key. Entries whose manifest fails validation are left
    /// out (`verify_all` reports and quarantines them).
    pub fn list(&self) -> Result<Vec<Entry>, CacheError> {
        let mut out = Vec::new();
        for key in self.entry_keys()? {
            match self.get(&key) {
                Ok(Some(e)) => out.push(e),
                Ok(None) | Err(CacheError::BadManifest { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Removes the entry and the scratch of `key`, waiting for its lock first; returns whether
    /// there was an entry. Must not be called while this process holds the key's lock or a pin
    /// on it (use [`Store::remove_locked`] then).
    pub fn remove(&self, key: &Key) -> Result<bool, CacheError> {
        let lock = self.lock(key)?;
        self.remove_locked(&lock)
    }

    /// Like [`Store::remove`], for a caller that already holds the key's lock. Waits for the
    /// readers that pin the entry to let go.
    pub fn remove_locked(&self, lock: &KeyLock) -> Result<bool, CacheError> {
        self.check_lock(lock)?;
        let pin_path = self.pin_path(&lock.key);
        let Some(_no_readers) = lock_at(&pin_path, LockMode::Exclusive, true)? else {
            return Err(io_err("lock", pin_path, HINT_WRITABLE)(io::Error::other(
                "a blocking lock reported contention",
            )));
        };
        let dir = self.entry_dir(&lock.key);
        let existed = exists(&dir);
        self.trash(&dir)?;
        self.trash(&self.work_path(&lock.key))?;
        Ok(existed)
    }

    /// Makes `path` disappear atomically (a rename into a locked `tmp/` slot), then deletes it.
    /// Returns the bytes freed. A crash mid-delete leaves an orphan slot that gc removes.
    fn trash(&self, path: &Path) -> Result<u64, CacheError> {
        if !exists(path) {
            return Ok(0);
        }
        let slot = Slot::new(&self.root.join(TMP), "trash")?;
        match fs::rename(path, &slot.dir) {
            Ok(()) => {}
            Err(e) if not_found(&e) => {
                slot.discard();
                return Ok(0);
            }
            Err(e) => {
                slot.discard();
                return Err(io_err("move to the trash", path, HINT_WRITABLE)(e));
            }
        }
        if let Some(parent) = path.parent() {
            sync_dir(parent)?;
        }
        let size = tree_size(&slot.dir);
        slot.discard();
        Ok(size)
    }

    /// Removes what the policy selects and what dead processes left behind:
    /// staging directories whose writer died, entries selected by `policy` (never one whose key
    /// is locked or pinned), scratch of committed or selected keys, quarantined entries (when the
    /// policy has a criterion; by quarantine time for `older_than`) and unused lock files.
    pub fn gc(&self, policy: &GcPolicy) -> Result<GcReport, CacheError> {
        let mut r = GcReport::default();
        self.gc_tmp(&mut r)?;
        self.gc_entries(policy, &mut r)?;
        self.gc_work(policy, &mut r)?;
        if policy.keep.is_some() || policy.older_than.is_some() {
            self.gc_quarantine(policy, &mut r)?;
        }
        self.gc_locks()?;
        r.removed.sort();
        r.skipped_in_use.sort();
        r.kept_referenced.sort();
        Ok(r)
    }

    /// Removes the staging directories of dead writers (a killed run's), as `gc` does first;
    /// returns how many and their bytes. Runs call it when they start, so a killed run's
    /// leftovers do not pile up until someone thinks of `gc`.
    pub fn clean_dead_staging(&self) -> Result<(usize, u64), CacheError> {
        let mut r = GcReport::default();
        self.gc_tmp(&mut r)?;
        Ok((r.tmp_cleaned, r.freed_bytes))
    }

    /// What lies on disk beside the committed entries (see [`Leftovers`]); removes nothing.
    pub fn leftovers(&self) -> Result<Leftovers, CacheError> {
        let mut l = Leftovers::default();
        let tmp = self.root.join(TMP);
        for name in list_names(&tmp)? {
            if name.ends_with(".lock") {
                continue;
            }
            let lock_path = tmp.join(format!("{name}.lock"));
            // A slot's lock file exists before its directory, so one without is dead; a lock
            // that can be taken means its owner has died (let go at once: removing is gc's).
            let dead =
                !exists(&lock_path) || lock_at(&lock_path, LockMode::Exclusive, false)?.is_some();
            if dead {
                l.dead_staging += 1;
                l.dead_staging_bytes += tree_size(&tmp.join(&name));
            }
        }
        let qdir = self.root.join(QUARANTINE);
        for name in list_names(&qdir)? {
            l.quarantined += 1;
            l.quarantined_bytes += tree_size(&qdir.join(name));
        }
        let work = self.root.join(WORK);
        for name in list_names(&work)? {
            let size = tree_size(&work.join(&name));
            match Key::parse(&name) {
                Ok(key) if exists(&self.entry_dir(&key).join(MANIFEST)) => {
                    l.stale_scratch_bytes += size;
                }
                _ => l.resumable_bytes += size,
            }
        }
        Ok(l)
    }

    /// Removes `tmp/` items whose lock file can be taken: their owner has died.
    fn gc_tmp(&self, r: &mut GcReport) -> Result<(), CacheError> {
        let tmp = self.root.join(TMP);
        let stems: BTreeSet<String> = list_names(&tmp)?
            .into_iter()
            .map(|n| n.strip_suffix(".lock").map(str::to_owned).unwrap_or(n))
            .collect();
        for stem in stems {
            let lock_path = tmp.join(format!("{stem}.lock"));
            let item = tmp.join(&stem);
            let Some(lock) = lock_at(&lock_path, LockMode::Exclusive, false)? else {
                continue;
            };
            let existed = exists(&item);
            let size = tree_size(&item);
            remove_any(&item).map_err(io_err(
                "remove the staging directory of a dead writer",
                &item,
                HINT_WRITABLE,
            ))?;
            unlink_held_lock(&lock_path);
            drop(lock);
            if existed {
                r.tmp_cleaned += 1;
                r.freed_bytes += size;
            }
        }
        Ok(())
    }

    /// How old the entry of `key` is, and whether its directory is garbage (no manifest).
    fn entry_age(&self, key: &Key) -> Result<(Option<u64>, bool), CacheError> {
        match self.read_manifest(key) {
            Ok(Some(m)) => Ok((Some(m.created_unix), false)),
            Ok(None) => Ok((None, true)),
            Err(CacheError::BadManifest { .. }) => Ok((mtime_secs(&self.entry_dir(key)), false)),
            Err(e) => Err(e),
        }
    }

    /// The entries that entries kept by `policy` refer to, directly or through others, each
    /// with the kept entry that needs it (gc never removes a file a live dataset reads).
    fn referenced_by_kept(
        &self,
        policy: &GcPolicy,
        keys: &[Key],
    ) -> Result<std::collections::BTreeMap<Key, Key>, CacheError> {
        let mut refs = std::collections::BTreeMap::new();
        let mut live = Vec::new();
        for key in keys {
            let Ok(Some(m)) = self.read_manifest(key) else {
                continue;
            };
            let targets: Vec<Key> = m
                .references
                .iter()
                .filter_map(|r| r.entry.clone())
                .collect();
            if !policy.selects(key, Some(m.created_unix)) {
                live.push(key.clone());
            }
            refs.insert(key.clone(), targets);
        }
        let mut needed = std::collections::BTreeMap::new();
        while let Some(key) = live.pop() {
            for t in refs.get(&key).into_iter().flatten() {
                if !needed.contains_key(t) {
                    needed.insert(t.clone(), key.clone());
                    live.push(t.clone());
                }
            }
        }
        Ok(needed)
    }

    fn gc_entries(&self, policy: &GcPolicy, r: &mut GcReport) -> Result<(), CacheError> {
        let keys = self.entry_keys()?;
        let needed = self.referenced_by_kept(policy, &keys)?;
        for key in keys {
            let (age, garbage) = self.entry_age(&key)?;
            if !garbage && !policy.selects(&key, age) {
                continue;
            }
            if let Some(by) = needed.get(&key) {
                r.kept_referenced.push((key, by.clone()));
                continue;
            }
            let Some(lock) = self.try_lock(&key)? else {
                r.skipped_in_use.push(key);
                continue;
            };
            let Some(_no_readers) = lock_at(&self.pin_path(&key), LockMode::Exclusive, false)?
            else {
                r.skipped_in_use.push(key);
                continue;
            };
            // Decide again under the lock: the entry may have been replaced meanwhile.
            let (age, garbage) = self.entry_age(&key)?;
            if !garbage && !policy.selects(&key, age) {
                continue;
            }
            let dir = self.entry_dir(&key);
            if !exists(&dir) {
                continue;
            }
            r.freed_bytes += self.trash(&dir)?;
            r.removed.push(key);
            drop(lock);
        }
        Ok(())
    }

    fn gc_work(&self, policy: &GcPolicy, r: &mut GcReport) -> Result<(), CacheError> {
        let work = self.root.join(WORK);
        for name in list_names(&work)? {
            let Ok(key) = Key::parse(&name) else {
                continue;
            };
            let path = work.join(&name);
            let committed = exists(&self.entry_dir(&key).join(MANIFEST));
            if !committed && !policy.selects(&key, newest_mtime(&path)) {
                continue;
            }
            // A held lock means a stage is writing checkpoints there right now.
            let Some(_lock) = self.try_lock(&key)? else {
                continue;
            };
            if exists(&path) {
                r.freed_bytes += self.trash(&path)?;
                r.work_cleaned += 1;
            }
        }
        Ok(())
    }

    fn gc_quarantine(&self, policy: &GcPolicy, r: &mut GcReport) -> Result<(), CacheError> {
        let qdir = self.root.join(QUARANTINE);
        for name in list_names(&qdir)? {
            let path = qdir.join(&name);
            // Names are `<key>-<unix>[-n]`; fall back to the mtime for anything else.
            let when = name
                .get(Key::LEN + 1..)
                .and_then(|rest| rest.split('-').next())
                .and_then(|t| t.parse::<u64>().ok())
                .or_else(|| mtime_secs(&path));
            let old = match (policy.older_than, when) {
                (Some(cutoff), Some(t)) => t < unix_secs(cutoff),
                _ => true,
            };
            if old {
                r.freed_bytes += tree_size(&path);
                remove_any(&path).map_err(io_err(
                    "remove quarantined entry",
                    &path,
                    HINT_WRITABLE,
                ))?;
                r.quarantine_cleaned += 1;
            }
        }
        Ok(())
    }

    /// Deletes lock files nobody holds; `lock()` recreates them on demand, and a waiter that
    /// locked a deleted file notices and retries (see `fsutil::lock_at`).
    fn gc_locks(&self) -> Result<(), CacheError> {
        let locks = self.root.join(LOCKS);
        for name in list_names(&locks)? {
            if !name.ends_with(".lock") && !name.ends_with(".pin") {
                continue;
            }
            let path = locks.join(&name);
            if let Some(lock) = lock_at(&path, LockMode::Exclusive, false)? {
                unlink_held_lock(&path);
                drop(lock);
            }
        }
        Ok(())
    }
}

/// The newest modification time (Unix seconds) of `path` and everything under it; checkpoints
/// rewritten deep inside a scratch directory count as recent use.
fn newest_mtime(path: &Path) -> Option<u64> {
    let mut newest = mtime_secs(path)?;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else {
            continue;
        };
        for item in rd.filter_map(Result::ok) {
            let p = item.path();
            if let Some(t) = mtime_secs(&p) {
                newest = newest.max(t);
            }
            if item.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            }
        }
    }
    Some(newest)
}

impl Staging {
    /// The folder the stage writes its files into (regular files and directories only).
    pub fn dir(&self) -> &Path {
        &self.data
    }

    /// The key this staging will commit to.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// Publishes the staged files as the entry of the key: hashes every file, writes the
    /// manifest last, fsyncs files and directories, and renames the staging directory into
    /// `entries/` atomically. Committed files are made read-only. If an entry for the key
    /// already exists, it is kept and returned and the staged files are discarded. Symlinks,
    /// special files and anything written outside [`Staging::dir`] are rejected.
    pub fn commit(self, info: EntryInfo) -> Result<Entry, CacheError> {
        // On any error, dropping `self` removes the staging directory.
        self.commit_inner(info)
    }

    fn commit_inner(&self, info: EntryInfo) -> Result<Entry, CacheError> {
        for name in list_names(&self.slot_dir)? {
            if name != DATA {
                return Err(CacheError::BadStaging {
                    path: self.slot_dir.join(name),
                    reason: "was written outside the output folder".into(),
                });
            }
        }
        match fs::symlink_metadata(&self.data) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(CacheError::BadStaging {
                    path: self.data.clone(),
                    reason: "(the output folder) was replaced by something that is not a directory"
                        .into(),
                });
            }
            Err(e) => return Err(io_err("inspect", &self.data, HINT_WRITABLE)(e)),
        }
        let bad = |rel: &str, reason: String| CacheError::BadStaging {
            path: self.data.join(rel),
            reason,
        };
        let mut dirs = vec![self.data.clone()];
        let mut files: Vec<FileRecord> = Vec::new();
        let mut buf = vec![0u8; HASH_BUF];
        for node in walk(&self.data)? {
            match node {
                Node::Other { rel, what } => return Err(bad(&rel, what.into())),
                Node::Dir { rel } => {
                    check_rel_path(&rel).map_err(|r| bad(&rel, format!("has a bad name: {r}")))?;
                    dirs.push(join_rel(&self.data, &rel));
                }
                Node::File { rel, .. } => {
                    check_rel_path(&rel).map_err(|r| bad(&rel, format!("has a bad name: {r}")))?;
                    let path = join_rel(&self.data, &rel);
                    files.push(hash_file(&path, &rel, true, &mut buf)?);
                    set_readonly(&path)?;
                }
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let entries = self.store.root.join(ENTRIES);
        let entries = fs::canonicalize(&entries).unwrap_or(entries);
        let mut references: Vec<Reference> = info
            .references
            .iter()
            .map(|r| self.store.reference(r, &entries))
            .collect();
        references.sort_by(|a, b| (&a.entry, &a.path).cmp(&(&b.entry, &b.path)));
        references.dedup();
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            key: self.key.clone(),
            kind: info.kind,
            label: info.label,
            created_unix: unix_secs(SystemTime::now()),
            content_digest: content_digest(&files),
            files,
            meta: info.meta,
            references,
        };
        let mpath = self.slot_dir.join(MANIFEST);
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| io_err("serialize", &mpath, HINT_WRITABLE)(io::Error::other(e)))?;
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&mpath)
            .and_then(|mut f| {
                f.write_all(&json)?;
                f.sync_all()
            })
            .map_err(io_err("write", &mpath, HINT_WRITABLE))?;
        for d in dirs.iter().rev() {
            sync_dir(d)?;
        }
        sync_dir(&self.slot_dir)?;

        let store = &self.store;
        let target = store.entry_dir(&self.key);
        // We hold the key lock, so nobody else commits this key while we look and rename.
        match store.get(&self.key) {
            Ok(Some(existing)) => {
                let _ = remove_any(&store.work_path(&self.key));
                return Ok(existing);
            }
            Ok(None) if !exists(&target) => {}
            Ok(None) | Err(CacheError::BadManifest { .. }) => {
                store.quarantine(&self.key, &target)?;
            }
            Err(e) => return Err(e),
        }
        let shard = store.root.join(ENTRIES).join(self.key.shard());
        if !exists(&shard) {
            fs::create_dir_all(&shard).map_err(io_err(
                "create directory",
                &shard,
                HINT_WRITABLE,
            ))?;
            sync_dir(&store.root.join(ENTRIES))?;
        }
        if let Err(e) = fs::rename(&self.slot_dir, &target) {
            // Only a writer that ignored the key lock can get here first; keep its entry.
            if let Ok(Some(existing)) = store.get(&self.key) {
                return Ok(existing);
            }
            return Err(io_err(
                "move the staged entry into place at",
                target,
                HINT_WRITABLE,
            )(e));
        }
        sync_dir(&shard)?;
        sync_dir(&store.root.join(TMP))?;
        // Best effort: the key is committed, so a leftover scratch is only garbage for gc.
        let _ = remove_any(&store.work_path(&self.key));
        Ok(Entry {
            key: self.key.clone(),
            dir: target.join(DATA),
            manifest,
        })
    }
}

/// Committed files are immutable; read-only permissions stop a consumer from changing an input
/// in place by accident.
fn set_readonly(path: &Path) -> Result<(), CacheError> {
    let mut perm = fs::symlink_metadata(path)
        .map_err(io_err("inspect", path, HINT_WRITABLE))?
        .permissions();
    perm.set_readonly(true);
    fs::set_permissions(path, perm).map_err(io_err("make read-only", path, HINT_WRITABLE))
}

impl Drop for Staging {
    fn drop(&mut self) {
        // After a successful commit the directory has moved away and only the lock file goes.
        if let Some(slot) = self.slot.take() {
            slot.discard();
        }
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

    #[test]
    fn policy_selection() {
        let a = Key::parse(&"a".repeat(64)).unwrap();
        let b = Key::parse(&"b".repeat(64)).unwrap();
        let none = GcPolicy::default();
        assert!(!none.selects(&a, Some(0)));
        let keep = GcPolicy {
            keep: Some([a.clone()].into()),
            older_than: None,
        };
        assert!(!keep.selects(&a, Some(0)));
        assert!(keep.selects(&b, Some(0)));
        let cutoff = std::time::UNIX_EPOCH + std::time::Duration::from_secs(100);
        let age = GcPolicy {
            keep: None,
            older_than: Some(cutoff),
        };
        assert!(age.selects(&a, Some(99)));
        assert!(!age.selects(&a, Some(100)));
        assert!(age.selects(&a, None));
        let both = GcPolicy {
            keep: Some([a.clone()].into()),
            older_than: Some(cutoff),
        };
        assert!(!both.selects(&a, Some(1)));
        assert!(both.selects(&b, Some(1)));
        assert!(!both.selects(&b, Some(200)));
    }
}
