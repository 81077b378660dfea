//! Files mode: whole files into the shared Hugging Face cache (blob and snapshot link),
//! resumable and checked against their sha256.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::Digest as _;

use super::cache::{RepoRef, check_etag, is_commit, safe_rel_path};
use super::fetch::short;
use super::{Hub, HubError, PlannedModel};
use probex_engine::cache::hex;
use probex_fetch::discover::ModelSource;
use probex_fetch::hub::{Observer, Progress};

impl Hub {
    /// Fetches `extra` files of `m`'s repo whole (into the Hugging Face cache) and, when the
    /// model file is not in that snapshot folder (tensors mode), copies them beside it.
    pub(super) fn fetch_extras(
        &self,
        m: &PlannedModel,
        extra: &[String],
        source: &ModelSource,
        progress: &Progress,
        obs: &dyn Observer,
    ) -> Result<(), HubError> {
        let repo = RepoRef::model(&m.repo)?;
        let Some(dir) = source.path.parent() else {
            return Ok(());
        };
        for f in extra {
            let rel = safe_rel_path(f)?;
            let snap = self.fetch_file(&repo, &m.commit, f, progress, obs)?;
            let dest = dir.join(&rel);
            if dest != snap {
                if let Some(d) = dest.parent() {
                    std::fs::create_dir_all(d).map_err(HubError::io(d))?;
                }
                std::fs::copy(&snap, &dest).map_err(|source| HubError::Copy {
                    from: snap.clone(),
                    to: dest.clone(),
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// Files mode for one model: the snapshot path in the Hugging Face cache.
    pub(super) fn fetch_model_file(
        &self,
        m: &PlannedModel,
        progress: &Progress,
        obs: &dyn Observer,
        cached: &AtomicU64,
        remote: &AtomicU64,
    ) -> Result<ModelSource, HubError> {
        let repo = RepoRef::model(&m.repo)?;
        let snap = self
            .hf
            .snapshot_path(&repo, &m.commit, &safe_rel_path(&m.file)?);
        if let Ok(meta) = std::fs::metadata(&snap)
            && meta.is_file()
        {
            cached.fetch_add(meta.len(), Ordering::Relaxed);
            remote.fetch_add(meta.len(), Ordering::Relaxed);
        } else {
            self.fetch_file(&repo, &m.commit, &m.file, progress, obs)?;
            if let Ok(meta) = std::fs::metadata(&snap) {
                remote.fetch_add(meta.len(), Ordering::Relaxed);
            }
        }
        // Python tools (and `source = "dir"` with layout = "hf_cache") find snapshots by ref;
        // only the per-model repos' own revision is recorded (the index's refs are the Hub's).
        let _ = self.hf.write_ref(&repo, &m.revision, &m.commit);
        Ok(ModelSource {
            id: m.id.clone(),
            path: snap,
            split: m.split,
        })
    }

    /// Downloads one whole file into the Hugging Face cache (blob + snapshot link), resuming a
    /// partial download and checking the sha256 of LFS files. Returns the snapshot path.
    pub fn fetch_file(
        &self,
        repo: &RepoRef,
        commit: &str,
        file: &str,
        progress: &Progress,
        obs: &dyn Observer,
    ) -> Result<PathBuf, HubError> {
        let rel = safe_rel_path(file)?;
        let snap = self.hf.snapshot_path(repo, commit, &rel);
        if snap.is_file() {
            return Ok(snap);
        }
        if self.offline {
            return Err(self.offline_miss(&format!("{repo}@{} {file}", short(commit))));
        }
        let http = self.http()?;
        let what = format!("{repo}@{} {file}", short(commit));
        let url = http.resolve_url(repo.url_prefix(), &repo.id, commit, file)?;
        let head = http.head(&url, &what, &self.cancel)?;
        check_etag(&head.etag).map_err(|e| e.at(&what))?;
        if let Some(c) = &head.commit
            && is_commit(c)
            && c != commit
        {
            return Err(HubError::WrongCommit {
                what,
                served: c.clone(),
                pinned: commit.to_owned(),
            });
        }
        let Some(size) = head.size else {
            return Err(HubError::NoSize(what));
        };
        let blob = self.hf.blob_path(repo, &head.etag);
        let lock_path = self.hf.lock_path(repo, &head.etag);
        if let Some(d) = lock_path.parent() {
            std::fs::create_dir_all(d).map_err(HubError::io(d))?;
        }
        let lock = std::fs::File::create(&lock_path).map_err(HubError::io(&lock_path))?;
        // Another process (or Python) downloading the same blob: wait for it, then reuse.
        lock.lock().map_err(HubError::io(&lock_path))?;
        let result = (|| {
            let have = std::fs::metadata(&blob).map(|m| m.len()).ok();
            if have != Some(size) {
                if let Some(d) = blob.parent() {
                    std::fs::create_dir_all(d).map_err(HubError::io(d))?;
                }
                let part = blob.with_file_name(format!("{}.incomplete", head.etag));
                let had = std::fs::metadata(&part).map_or(0, |m| m.len());
                if had > 0 {
                    obs.log(&format!("{what}: resuming at {had} of {size} bytes"));
                }
                progress.expect_bytes(size.saturating_sub(had));
                http.download_resume(&url, &part, size, &what, &self.cancel, &|_| {})?;
                verify(&part, &head.etag).map_err(|e| {
                    // A corrupt download is not worth resuming from.
                    let _ = std::fs::remove_file(&part);
                    e.at(&what)
                })?;
                std::fs::rename(&part, &blob).map_err(HubError::io(&blob))?;
            }
            self.hf
                .link_snapshot(repo, commit, &rel, &head.etag)
                .map_err(HubError::io(&snap))
        })();
        let _ = lock.unlock();
        result
    }
}

/// Checks a downloaded file against its etag: sha256 for LFS/Xet files (64 hex), the git blob
/// id for plain files (40 hex).
fn verify(path: &Path, etag: &str) -> Result<(), HubError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(HubError::io(path))?;
    let mut buf = vec![0u8; 1 << 20];
    if etag.len() == 64 {
        let mut h = sha2::Sha256::new();
        loop {
            let k = f.read(&mut buf).map_err(HubError::io(path))?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
        }
        let got = hex::encode(&h.finalize());
        if !got.eq_ignore_ascii_case(etag) {
            return Err(HubError::Corrupt {
                got,
                etag: etag.to_owned(),
            });
        }
    }
    // Plain git files are small (configs, cards): their size was checked by the transfer.
    Ok(())
}
