//! Re-hashing entries against their manifests, and moving damaged ones to `quarantine/`.

use super::*;

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

impl Store {
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
    pub(super) fn quarantine(&self, key: &Key, dir: &Path) -> Result<Option<PathBuf>, CacheError> {
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

    /// Verifies every entry (see [`Store::verify`]), quarantining the corrupt ones.
    pub fn verify_all(&self) -> Result<Vec<(Key, Verified)>, CacheError> {
        self.entry_keys()?
            .into_iter()
            .map(|k| self.verify(&k).map(|v| (k, v)))
            .collect()
    }
}
