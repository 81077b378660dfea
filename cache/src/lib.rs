//! `probex-cache`: the content-addressed artifact store under every probex run.
//!
//! Each pipeline node's output is stored under a [`Key`] (a blake3 digest the engine computes
//! from the node's kind, params and inputs). A node is computed at most once per key, even
//! across concurrent processes, and a crash at any moment never leaves a half-written entry:
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use probex_cache::{EntryInfo, Key, Store};
//! let store = Store::open(Store::default_root())?;
//! let key = Key::from_hash(&blake3::hash(b"canonical node description"));
//! let lock = store.lock(&key)?; // waits while another process computes this key
//! let entry = match store.get(&key)? {
//!     Some(entry) => entry, // cached
//!     None => {
//!         let staging = store.stage(&lock)?;
//!         std::fs::write(staging.dir().join("out.json"), b"{}")?;
//!         let info = EntryInfo {
//!             kind: "demo".into(),
//!             label: "demo".into(),
//!             meta: serde_json::Value::Null,
//!             references: Vec::new(),
//!         };
//!         staging.commit(info)? // atomic; also removes the key's work dir
//!     }
//! };
//! drop(lock);
//! println!("{} bytes at {}", entry.size(), entry.dir.display());
//! # Ok(()) }
//! ```
//!
//! Locks are OS file locks (`std::fs::File::lock`), so a dead process never leaves a key stuck;
//! `gc` removes what dead writers left in `tmp/` and whatever a [`GcPolicy`] selects, skipping
//! entries in use.

mod error;
mod fsutil;
pub mod hex;
mod key;
mod manifest;
mod stamp;
mod store;

pub use error::CacheError;
pub use key::Key;
pub use manifest::{
    Entry, EntryInfo, FileRecord, MANIFEST_FORMAT, Manifest, ManifestError, RelPathError,
    content_digest,
};
pub use stamp::{FileStamp, Referent};
pub use store::{GcPolicy, GcReport, KeyLock, Leftovers, Pinned, Staging, Store, Verified};

#[cfg(test)]
mod tests {
    /// The engine moves these across worker threads.
    #[test]
    fn handles_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<crate::Store>();
        check::<crate::KeyLock>();
        check::<crate::Staging>();
        check::<crate::Pinned>();
        check::<crate::Entry>();
        check::<crate::CacheError>();
    }
}
