//! File-system building blocks: OS file locks that survive lock-file deletion, private slots
//! under `tmp/`, tree walks that never follow symlinks, streaming hashes and fsyncs.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{HINT_READABLE, HINT_WRITABLE, io_err};
use crate::{CacheError, FileRecord};

/// How a lock file is locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockMode {
    Exclusive,
    Shared,
}

/// Opens (creating if needed) and locks `path`. With `wait == false`, returns `None` when
/// another holder has it.
///
/// The lock is only returned once the locked file is still the one at `path`: `gc` deletes lock
/// files it holds, and a waiter that locked the deleted file must retry on the new one, or two
/// holders could believe they own the same key.
pub(crate) fn lock_at(path: &Path, mode: LockMode, wait: bool) -> Result<Option<File>, CacheError> {
    loop {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err("open lock file", path, HINT_WRITABLE))?;
        let res = match (mode, wait) {
            (LockMode::Exclusive, true) => file.lock().map_err(TryLockError::Error),
            (LockMode::Shared, true) => file.lock_shared().map_err(TryLockError::Error),
            (LockMode::Exclusive, false) => file.try_lock(),
            (LockMode::Shared, false) => file.try_lock_shared(),
        };
        match res {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(None),
            Err(TryLockError::Error(e)) => {
                return Err(io_err("lock", path, HINT_WRITABLE)(e));
            }
        }
        if is_same_file(&file, path).map_err(io_err("inspect lock file", path, HINT_WRITABLE))? {
            return Ok(Some(file));
        }
    }
}

/// Whether the open `file` is the file currently at `path` (false if `path` is gone).
#[cfg(unix)]
fn is_same_file(file: &File, path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let held = file.metadata()?;
    match fs::metadata(path) {
        Ok(now) => Ok(held.dev() == now.dev() && held.ino() == now.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Without inode numbers the store never deletes lock files, so the file cannot have changed.
#[cfg(not(unix))]
fn is_same_file(_file: &File, _path: &Path) -> io::Result<bool> {
    Ok(true)
}

/// Deletes a lock file the caller holds exclusively. Only sound where [`lock_at`] can detect the
/// deletion (unix); elsewhere lock files are left in place.
pub(crate) fn unlink_held_lock(path: &Path) {
    #[cfg(unix)]
    {
        // Best effort: a leftover lock file is harmless and gc retries.
        let _ = fs::remove_file(path);
    }
    #[cfg(not(unix))]
    {
        let _ = path;
    }
}

/// A fresh, uniquely named place under `tmp/`: `dir` (not yet created) and `dir.lock`, which
/// this process holds exclusively for as long as the slot lives. `gc` removes a slot only when
/// it can take that lock, i.e. when its owner has died.
#[derive(Debug)]
pub(crate) struct Slot {
    pub dir: PathBuf,
    pub lock_path: PathBuf,
    pub lock: File,
}

static SLOT_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Slot {
    /// Allocates a slot in `tmp`; `tag` is a readable prefix ("stage", "trash").
    pub fn new(tmp: &Path, tag: &str) -> Result<Slot, CacheError> {
        let pid = std::process::id();
        let mut last_err = None;
        for _ in 0..64 {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let n = SLOT_COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!("{tag}-{pid}-{nanos:x}-{n}");
            let dir = tmp.join(&name);
            let lock_path = tmp.join(format!("{name}.lock"));
            // The lock file exists and is held before the directory appears, so a directory
            // without a held lock always belongs to a dead writer.
            let lock = match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&lock_path)
            {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    last_err = Some(e);
                    continue;
                }
                Err(e) => return Err(io_err("create", lock_path, HINT_WRITABLE)(e)),
            };
            match lock.try_lock() {
                Ok(()) => {}
                // A concurrent gc took it before we did; it will delete it. Pick another name.
                Err(TryLockError::WouldBlock) => continue,
                Err(TryLockError::Error(e)) => {
                    return Err(io_err("lock", lock_path, HINT_WRITABLE)(e));
                }
            }
            if !is_same_file(&lock, &lock_path).map_err(io_err(
                "inspect lock file",
                &lock_path,
                HINT_WRITABLE,
            ))? {
                continue;
            }
            if fs::symlink_metadata(&dir).is_ok() {
                unlink_held_lock(&lock_path);
                continue;
            }
            return Ok(Slot {
                dir,
                lock_path,
                lock,
            });
        }
        Err(io_err("allocate a staging slot in", tmp, HINT_WRITABLE)(
            last_err.unwrap_or_else(|| io::Error::other("too many name collisions")),
        ))
    }

    /// Removes whatever sits at the slot's path, then its lock file. Best effort: on failure the
    /// leftovers are an orphan slot that gc removes later.
    pub fn discard(self) {
        if remove_any(&self.dir).is_ok() {
            unlink_held_lock(&self.lock_path);
        }
        drop(self.lock);
    }
}

/// Removes a file or a directory tree; a missing path is not an error.
pub(crate) fn remove_any(path: &Path) -> io::Result<()> {
    let res = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match res {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Total size of the regular files under `path` (0 if missing). Does not follow symlinks.
pub(crate) fn tree_size(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            if let Ok(rd) = fs::read_dir(&p) {
                stack.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
            }
        } else if m.is_file() {
            total += m.len();
        }
    }
    total
}

/// One item found by [`walk`], with its `/`-separated path relative to the walk's root.
#[derive(Debug)]
pub(crate) enum Node {
    File {
        rel: String,
        size: u64,
    },
    Dir {
        rel: String,
    },
    /// A symlink, device, socket, fifo or non-UTF-8 name: never part of an entry.
    Other {
        rel: String,
        what: &'static str,
    },
}

/// Lists everything under `root` (not `root` itself) without following symlinks.
pub(crate) fn walk(root: &Path) -> Result<Vec<Node>, CacheError> {
    let mut out = Vec::new();
    let mut stack: Vec<(PathBuf, String)> = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let rd = fs::read_dir(&dir).map_err(io_err("list directory", &dir, HINT_READABLE))?;
        for item in rd {
            let item = item.map_err(io_err("list directory", &dir, HINT_READABLE))?;
            let path = item.path();
            let name = item.file_name();
            let Some(name) = name.to_str() else {
                out.push(Node::Other {
                    rel: format!("{prefix}{}", name.to_string_lossy()),
                    what: "has a name that is not UTF-8",
                });
                continue;
            };
            let rel = format!("{prefix}{name}");
            let ft = item
                .file_type()
                .map_err(io_err("inspect", &path, HINT_READABLE))?;
            if ft.is_symlink() {
                out.push(Node::Other {
                    rel,
                    what: "is a symbolic link",
                });
            } else if ft.is_dir() {
                stack.push((path, format!("{rel}/")));
                out.push(Node::Dir { rel });
            } else if ft.is_file() {
                let size = item
                    .metadata()
                    .map_err(io_err("inspect", &path, HINT_READABLE))?
                    .len();
                out.push(Node::File { rel, size });
            } else {
                out.push(Node::Other {
                    rel,
                    what: "is not a regular file or directory",
                });
            }
        }
    }
    Ok(out)
}

/// Streams a file through blake3. With `sync`, also fsyncs it (commit needs its bytes durable
/// before the rename publishes them). Returns the record for `rel`.
pub(crate) fn hash_file(
    path: &Path,
    rel: &str,
    sync: bool,
    buf: &mut [u8],
) -> Result<FileRecord, CacheError> {
    let mut f = File::open(path).map_err(io_err("open", path, HINT_READABLE))?;
    let mut h = blake3::Hasher::new();
    let mut size = 0u64;
    loop {
        let n = match f.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("read", path, HINT_READABLE)(e)),
        };
        h.update(&buf[..n]);
        size += n as u64;
    }
    if sync {
        f.sync_all().map_err(io_err("fsync", path, HINT_WRITABLE))?;
    }
    Ok(FileRecord {
        path: rel.to_owned(),
        size,
        blake3: h.finalize().to_hex().to_string(),
    })
}

/// Makes a directory's entries (creations, renames) durable.
#[cfg(unix)]
pub(crate) fn sync_dir(dir: &Path) -> Result<(), CacheError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(
        "fsync directory",
        dir,
        HINT_WRITABLE,
    ))
}

/// Directories cannot be opened for fsync here; the rename is still atomic.
#[cfg(not(unix))]
pub(crate) fn sync_dir(_dir: &Path) -> Result<(), CacheError> {
    Ok(())
}

/// Seconds since the Unix epoch (0 for times before it).
pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Modification time of `path` in Unix seconds, if it can be read.
pub(crate) fn mtime_secs(path: &Path) -> Option<u64> {
    fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .map(unix_secs)
}

/// Names of the items directly in `dir` (empty if `dir` is missing); non-UTF-8 names are
/// returned lossily so callers can skip them.
pub(crate) fn list_names(dir: &Path) -> Result<Vec<String>, CacheError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list directory", dir, HINT_READABLE)(e)),
    };
    let mut names = Vec::new();
    for item in rd {
        let item = item.map_err(io_err("list directory", dir, HINT_READABLE))?;
        names.push(item.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_retries_when_its_file_was_replaced() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k.lock");
        let first = lock_at(&p, LockMode::Exclusive, true).unwrap().unwrap();
        assert!(lock_at(&p, LockMode::Exclusive, false).unwrap().is_none());
        assert!(lock_at(&p, LockMode::Shared, false).unwrap().is_none());
        // The holder deletes the file (as gc does); a new locker gets a fresh file at once.
        unlink_held_lock(&p);
        let second = lock_at(&p, LockMode::Exclusive, false).unwrap();
        assert!(second.is_some());
        drop(first);
    }

    #[test]
    fn a_waiter_on_a_deleted_lock_file_does_not_think_it_holds_the_lock() {
        use std::sync::mpsc::channel;
        use std::time::Duration;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k.lock");
        let old = lock_at(&p, LockMode::Exclusive, true).unwrap().unwrap();
        let (tx, rx) = channel();
        let p2 = p.clone();
        let waiter = std::thread::spawn(move || {
            let got = lock_at(&p2, LockMode::Exclusive, true).unwrap();
            tx.send(()).unwrap();
            got
        });
        // Let the waiter open the old file and block on it.
        std::thread::sleep(Duration::from_millis(100));
        // What gc does: delete the file while holding it. Then a newcomer locks the new file.
        unlink_held_lock(&p);
        let new = lock_at(&p, LockMode::Exclusive, false).unwrap().unwrap();
        drop(old);
        // The waiter now gets the old (deleted) file's lock, notices, and waits on the new one.
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(new);
        assert!(rx.recv_timeout(Duration::from_secs(10)).is_ok());
        assert!(waiter.join().unwrap().is_some());
    }

    #[test]
    fn shared_locks_coexist_and_exclude_writers() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k.lock");
        let a = lock_at(&p, LockMode::Shared, true).unwrap().unwrap();
        let b = lock_at(&p, LockMode::Shared, false).unwrap();
        assert!(b.is_some());
        assert!(lock_at(&p, LockMode::Exclusive, false).unwrap().is_none());
        drop((a, b));
        assert!(lock_at(&p, LockMode::Exclusive, false).unwrap().is_some());
    }

    #[test]
    fn slots_are_unique_and_locked() {
        let d = tempfile::tempdir().unwrap();
        let a = Slot::new(d.path(), "t").unwrap();
        let b = Slot::new(d.path(), "t").unwrap();
        assert_ne!(a.dir, b.dir);
        assert!(
            lock_at(&a.lock_path, LockMode::Exclusive, false)
                .unwrap()
                .is_none()
        );
        fs::create_dir(&a.dir).unwrap();
        fs::write(a.dir.join("f"), b"x").unwrap();
        a.discard();
        b.discard();
        assert!(list_names(d.path()).unwrap().is_empty());
    }

    #[test]
    fn walk_reports_files_dirs_and_symlinks() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("a/b")).unwrap();
        fs::write(d.path().join("a/b/f"), b"hello").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink("/etc", d.path().join("link")).unwrap();
        let nodes = walk(d.path()).unwrap();
        assert!(
            nodes
                .iter()
                .any(|n| matches!(n, Node::Dir { rel } if rel == "a/b"))
        );
        assert!(
            nodes
                .iter()
                .any(|n| matches!(n, Node::File { rel, size: 5 } if rel == "a/b/f"))
        );
        #[cfg(unix)]
        assert!(
            nodes
                .iter()
                .any(|n| matches!(n, Node::Other { rel, .. } if rel == "link"))
        );
    }

    #[test]
    fn hash_file_streams_in_small_buffers() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        fs::write(&p, &data).unwrap();
        let mut buf = [0u8; 1000];
        let r = hash_file(&p, "f", true, &mut buf).unwrap();
        assert_eq!(r.size, data.len() as u64);
        assert_eq!(r.blake3, blake3::hash(&data).to_hex().as_str());
    }
}
