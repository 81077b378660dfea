//! Staging an entry and committing it: files hashed and synced, the manifest written last,
//! one atomic rename into `entries/`.

use super::*;

impl Store {
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
