//! Listing, removing and garbage-collecting entries, and the housekeeping of what dead
//! writers left behind.

use super::*;

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

impl Store {
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

#[cfg(test)]
mod tests {
    use super::*;

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
