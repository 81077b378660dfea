//! Where fetched bytes live on disk: the Hugging Face cache (whole files, in the layout Python
//! tools use) and probex's tensor cache (single tensors and headers, per repo commit).
//!
//! Every name that reaches the file system is checked or encoded first: repo ids and revisions
//! against the Hub's own character rules, file paths from the server component by component
//! (no `..`, no absolute paths), etags as hex. Nothing the server says can place a file outside
//! these two directories.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::HubError;
pub use probex_fetch::hub::names::{check_repo_id, check_revision, is_commit, safe_rel_path};

/// A repository on the Hub: kind and id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoRef {
    /// `model` or `dataset`.
    pub kind: RepoKind,
    /// `owner/name`.
    pub id: String,
}

/// The kinds of repository fetch reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RepoKind {
    /// A model repository.
    Model,
    /// A dataset repository (the Model-J index).
    Dataset,
}

impl RepoRef {
    /// A model repo, checked.
    pub fn model(id: &str) -> Result<Self, HubError> {
        check_repo_id(id)?;
        Ok(RepoRef {
            kind: RepoKind::Model,
            id: id.to_string(),
        })
    }

    /// A dataset repo, checked.
    pub fn dataset(id: &str) -> Result<Self, HubError> {
        check_repo_id(id)?;
        Ok(RepoRef {
            kind: RepoKind::Dataset,
            id: id.to_string(),
        })
    }

    /// The cache folder name (`models--owner--name`), as Python's huggingface_hub writes it.
    pub fn folder(&self) -> String {
        let prefix = match self.kind {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        };
        format!("{prefix}--{}", self.id.replace('/', "--"))
    }

    /// The URL prefix before the repo id in resolve URLs (`""` or `"datasets/"`).
    pub fn url_prefix(&self) -> &'static str {
        match self.kind {
            RepoKind::Model => "",
            RepoKind::Dataset => "datasets/",
        }
    }
}

impl std::fmt::Display for RepoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            RepoKind::Model => f.write_str(&self.id),
            RepoKind::Dataset => write!(f, "datasets/{}", self.id),
        }
    }
}

/// A short, file-system-safe, collision-free name for an arbitrary string (a server file path
/// or a tensor name): readable characters kept, the rest replaced, plus a digest.
pub fn encode_name(s: &str) -> String {
    let readable: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .take(80)
        .collect();
    let readable = readable.trim_start_matches('.');
    let digest = blake3::hash(s.as_bytes()).to_hex();
    format!("{readable}-{}", &digest[..16])
}

/// Checks an etag used as a blob name: hex only (sha256 or git sha1), so it is a safe file name.
pub fn check_etag(etag: &str) -> Result<(), HubError> {
    if (etag.len() == 40 || etag.len() == 64) && etag.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(HubError::BadEtag(etag.chars().take(80).collect()))
    }
}

/// The Hugging Face cache directory (`hub/`), in Python's layout.
#[derive(Clone, Debug)]
pub struct HfCache {
    /// The directory holding `models--*` folders.
    pub root: PathBuf,
}

impl HfCache {
    /// `root/models--owner--name`.
    pub fn repo_dir(&self, repo: &RepoRef) -> PathBuf {
        self.root.join(repo.folder())
    }

    /// The commit `refs/{revision}` points at, if recorded and well formed.
    pub fn read_ref(&self, repo: &RepoRef, revision: &str) -> Option<String> {
        read_ref(&self.repo_dir(repo), revision)
    }

    /// Records `refs/{revision}` = `commit` (not for a revision that is itself the commit).
    pub fn write_ref(&self, repo: &RepoRef, revision: &str, commit: &str) -> std::io::Result<()> {
        write_ref(&self.repo_dir(repo), revision, commit)
    }

    /// `snapshots/{commit}/{path}`.
    pub fn snapshot_path(&self, repo: &RepoRef, commit: &str, path: &Path) -> PathBuf {
        self.repo_dir(repo)
            .join("snapshots")
            .join(commit)
            .join(path)
    }

    /// `blobs/{etag}`.
    pub fn blob_path(&self, repo: &RepoRef, etag: &str) -> PathBuf {
        self.repo_dir(repo).join("blobs").join(etag)
    }

    /// The lock file Python uses for this blob (`.locks/{folder}/{etag}.lock`).
    pub fn lock_path(&self, repo: &RepoRef, etag: &str) -> PathBuf {
        self.root
            .join(".locks")
            .join(repo.folder())
            .join(format!("{etag}.lock"))
    }

    /// Points `snapshots/{commit}/{path}` at `blobs/{etag}` with a relative symlink (a copy
    /// where symlinks are not possible), as Python does.
    pub fn link_snapshot(
        &self,
        repo: &RepoRef,
        commit: &str,
        path: &Path,
        etag: &str,
    ) -> std::io::Result<PathBuf> {
        let link = self.snapshot_path(repo, commit, path);
        if let Some(dir) = link.parent() {
            fs::create_dir_all(dir)?;
        }
        let blob = self.blob_path(repo, etag);
        // snapshots/{commit}/a/b/file -> ../../../../blobs/{etag}
        let depth = path.components().count() + 1;
        let mut rel = PathBuf::new();
        for _ in 0..depth {
            rel.push("..");
        }
        rel.push("blobs");
        rel.push(etag);
        let _ = fs::remove_file(&link);
        #[cfg(unix)]
        let made = std::os::unix::fs::symlink(&rel, &link);
        #[cfg(not(unix))]
        let made: std::io::Result<()> = Err(std::io::Error::other("no symlinks"));
        if made.is_err() {
            fs::copy(&blob, &link)?;
        }
        Ok(link)
    }
}

/// probex's cache of single tensors and headers, per repo and commit.
///
/// ```text
/// {root}/models--owner--name/refs/{revision}                         commit (for offline runs)
/// {root}/models--owner--name/{commit}/{encoded file path}/header     the 8 + n header bytes
/// {root}/models--owner--name/{commit}/{encoded file path}/{encoded tensor name}.bin
/// ```
/// Entries are immutable (a commit's files never change) and written atomically, so an
/// interrupted run keeps whatever it finished.
#[derive(Clone, Debug)]
pub struct TensorCache {
    /// The cache directory.
    pub root: PathBuf,
}

impl TensorCache {
    /// The directory of one file of one commit.
    pub fn file_dir(&self, repo: &RepoRef, commit: &str, file: &str) -> PathBuf {
        self.root
            .join(repo.folder())
            .join(commit)
            .join(encode_name(file))
    }

    /// The cached header of a file.
    pub fn header_path(&self, repo: &RepoRef, commit: &str, file: &str) -> PathBuf {
        self.file_dir(repo, commit, file).join("header")
    }

    /// The cached bytes of one tensor.
    pub fn tensor_path(&self, repo: &RepoRef, commit: &str, file: &str, tensor: &str) -> PathBuf {
        self.file_dir(repo, commit, file)
            .join(format!("{}.bin", encode_name(tensor)))
    }

    /// The commit `refs/{revision}` points at, if recorded.
    pub fn read_ref(&self, repo: &RepoRef, revision: &str) -> Option<String> {
        read_ref(&self.root.join(repo.folder()), revision)
    }

    /// Records `refs/{revision}` = `commit`.
    pub fn write_ref(&self, repo: &RepoRef, revision: &str, commit: &str) -> std::io::Result<()> {
        write_ref(&self.root.join(repo.folder()), revision, commit)
    }
}

fn read_ref(repo_dir: &Path, revision: &str) -> Option<String> {
    if is_commit(revision) {
        return Some(revision.to_string());
    }
    check_revision(revision).ok()?;
    let path = repo_dir.join("refs").join(revision);
    let meta = fs::metadata(&path).ok()?;
    if meta.len() > 256 {
        return None;
    }
    let text = fs::read_to_string(path).ok()?;
    let commit = text.trim();
    is_commit(commit).then(|| commit.to_string())
}

fn write_ref(repo_dir: &Path, revision: &str, commit: &str) -> std::io::Result<()> {
    if revision == commit || check_revision(revision).is_err() || !is_commit(commit) {
        return Ok(());
    }
    let path = repo_dir.join("refs").join(revision);
    if read_ref(repo_dir, revision).as_deref() == Some(commit) {
        return Ok(());
    }
    write_atomic(&path, commit.as_bytes())
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers never see a
/// partial file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("no parent directory"))?;
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".tmp-{}-{:?}-{}",
        std::process::id(),
        std::thread::current().id(),
        path.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().to_string())
    ));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_the_server_cannot_escape() {
        assert!(check_repo_id("ProbeX/Model-J__SD_200").is_ok());
        for bad in [
            "a",
            "a/b/c",
            "../x",
            "a/..",
            "a/b c",
            "/b",
            "a/",
            "a/.hidden",
        ] {
            assert!(check_repo_id(bad).is_err(), "{bad}");
        }
        for bad in ["../etc/passwd", "/abs", "a/../../b", "", "a\\b"] {
            assert!(safe_rel_path(bad).is_err(), "{bad}");
        }
        assert_eq!(
            safe_rel_path("train/model_idx_0001/x.safetensors").unwrap(),
            PathBuf::from("train/model_idx_0001/x.safetensors")
        );
        assert!(check_revision("main").is_ok());
        assert!(check_revision("refs/pr/1").is_ok());
        for bad in ["..", "a/../b", "", "a b", ".git"] {
            assert!(check_revision(bad).is_err(), "{bad}");
        }
        let n = encode_name("../../etc/passwd");
        assert!(!n.contains('/') && !n.starts_with('.'));
        assert_ne!(encode_name("a/b"), encode_name("a_b"));
        assert!(check_etag("../x").is_err());
        assert!(check_etag(&"a".repeat(64)).is_ok());
    }
}
