//! The identity a file is trusted by while it is not re-read: its size, modification time and
//! inode, as git's index and every stat cache use them.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a file is trusted by, as git's index does: while these are unchanged its content is
/// taken to be unchanged. The engine's stat cache keys digests by it, a layer dataset that
/// reads model files in place checks it on every read, and an entry's manifest records it for
/// each file the entry refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    /// Length in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i128,
    /// Inode number (0 where the platform has none).
    pub inode: u64,
}

impl FileStamp {
    /// The stamp of a file from its metadata.
    pub fn of(meta: &fs::Metadata) -> Self {
        let (mtime_ns, inode) = stat_identity(meta);
        FileStamp {
            size: meta.len(),
            mtime_ns,
            inode,
        }
    }

    /// The stamp `path` has now (following symlinks).
    pub fn now(path: &Path) -> std::io::Result<Self> {
        fs::metadata(path).map(|m| Self::of(&m))
    }

    /// What differs between `self` (what was seen) and `now`, in words; `None` if nothing.
    /// An inode of 0 on either side (a platform without them) is not compared.
    pub fn change(&self, now: &FileStamp) -> Option<String> {
        let mut what = Vec::new();
        if self.size != now.size {
            what.push(format!("size {} -> {} bytes", self.size, now.size));
        }
        if self.mtime_ns != now.mtime_ns {
            what.push("modification time".to_string());
        }
        if self.inode != now.inode && self.inode != 0 && now.inode != 0 {
            what.push("inode (the file was replaced)".to_string());
        }
        (!what.is_empty()).then(|| what.join(", "))
    }
}

/// A file outside an entry that the entry's files refer to, with the stamp it had when the
/// stage read it: the stage vouches for that identity, so committing costs no `stat`, and a
/// file changed since the stage read it makes the entry stale instead of being trusted anew.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Referent {
    /// The file (absolute).
    pub path: PathBuf,
    /// Its stamp when the stage read it.
    pub stamp: FileStamp,
}

impl Referent {
    /// `path` with the stamp it has now: for a stage that did not keep the stamp it read
    /// the file under (one `stat`).
    pub fn now(path: impl Into<PathBuf>) -> std::io::Result<Self> {
        let path = path.into();
        let stamp = FileStamp::now(&path)?;
        Ok(Referent { path, stamp })
    }
}

#[cfg(unix)]
fn stat_identity(meta: &fs::Metadata) -> (i128, u64) {
    use std::os::unix::fs::MetadataExt;
    (
        meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        meta.ino(),
    )
}

#[cfg(not(unix))]
fn stat_identity(meta: &fs::Metadata) -> (i128, u64) {
    let t = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i128);
    (t, 0)
}
