//! The one error type of the store.

use std::io;
use std::path::PathBuf;

/// Advice for I/O failures on paths the store writes.
pub(crate) const HINT_WRITABLE: &str = "Check that the cache directory exists, is writable and has free space, or point PROBEX_CACHE (or --cache) at another directory";
/// Advice for I/O failures on paths the store only reads.
pub(crate) const HINT_READABLE: &str =
    "Check the permissions of the cache directory and that no other program is changing it";

/// Everything that can go wrong in the store. Each variant names the path (or key) involved and
/// says what to do, so that callers can show it to a person as is.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// An I/O operation on a path in the cache failed.
    #[error("cache: cannot {action} `{path}`: {source}. {hint}")]
    Io {
        /// What the store was doing, e.g. "create directory".
        action: &'static str,
        /// The path it was doing it to.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
        /// What a person can do about it.
        hint: &'static str,
    },
    /// A string is not a valid cache key.
    #[error(
        "invalid cache key `{input}`: {reason}. A key is 64 lowercase hexadecimal characters (a blake3 digest)"
    )]
    BadKey {
        /// The rejected input (shortened when long).
        input: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A committed entry's manifest could not be read or failed validation.
    #[error(
        "cache entry manifest `{path}` is invalid: {reason}. Run a cache verify (it moves broken entries to quarantine) or delete `{entry}`; the entry is then recomputed"
    )]
    BadManifest {
        /// The manifest file.
        path: PathBuf,
        /// The entry directory that holds it.
        entry: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A staging directory holds something that a commit cannot accept.
    #[error(
        "cannot commit staging directory: `{path}` {reason}. A stage must write only regular files and directories, and only inside the folder Staging::dir() gives it"
    )]
    BadStaging {
        /// The offending path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A key lock was used with a store other than the one that issued it.
    #[error(
        "the lock for key {key} was taken on the cache at `{lock_root}`, not on `{store_root}`. Take the lock from the store you stage into"
    )]
    ForeignLock {
        /// The locked key.
        key: String,
        /// Root of the store that issued the lock.
        lock_root: PathBuf,
        /// Root of the store it was used with.
        store_root: PathBuf,
    },
    /// A key lock was used for an entry of another key.
    #[error(
        "the lock for key {lock_key} does not cover the entry of key {key}. Lock the key you pin"
    )]
    WrongKey {
        /// The entry's key.
        key: String,
        /// The key the lock holds.
        lock_key: String,
    },
}

/// Builds a closure that wraps an `io::Error` with the action, path and hint.
pub(crate) fn io_err(
    action: &'static str,
    path: impl Into<PathBuf>,
    hint: &'static str,
) -> impl FnOnce(io::Error) -> CacheError {
    let path = path.into();
    move |source| CacheError::Io {
        action,
        path,
        source,
        hint,
    }
}
