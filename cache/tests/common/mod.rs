//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

use probex_cache::{Entry, EntryInfo, Key, Store};
use tempfile::TempDir;

/// A store in a fresh temporary directory (kept alive by the returned guard).
pub fn store() -> (TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("cache")).unwrap();
    (dir, store)
}

/// A distinct valid key per name.
pub fn key(name: &str) -> Key {
    Key::from_hash(&blake3::hash(name.as_bytes()))
}

pub fn info(label: &str) -> EntryInfo {
    EntryInfo {
        kind: "test".into(),
        label: label.into(),
        meta: serde_json::json!({ "label": label }),
        references: Vec::new(),
    }
}

/// Locks, stages the given files (creating parent folders) and commits.
pub fn commit(store: &Store, key: &Key, files: &[(&str, &[u8])]) -> Entry {
    let lock = store.lock(key).unwrap();
    let st = store.stage(&lock).unwrap();
    for (rel, bytes) in files {
        let p = st.dir().join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, bytes).unwrap();
    }
    st.commit(info(key.as_str())).unwrap()
}

/// Names directly under `dir`, sorted (empty if it does not exist).
pub fn names(dir: &Path) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The entry directory (parent of `data/`) of a key.
pub fn entry_dir(store: &Store, key: &Key) -> PathBuf {
    store
        .root()
        .join("entries")
        .join(&key.as_str()[..2])
        .join(key.as_str())
}

/// Overwrites one byte of a committed file (committed files are read-only).
pub fn flip_byte(path: &Path, at: usize) {
    let mut perm = fs::metadata(path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    fs::set_permissions(path, perm).unwrap();
    let mut bytes = fs::read(path).unwrap();
    bytes[at] ^= 0xff;
    fs::write(path, bytes).unwrap();
}

/// Rewrites an entry's manifest.json through a JSON edit (to simulate tampering).
pub fn edit_manifest(store: &Store, key: &Key, f: impl FnOnce(&mut serde_json::Value)) {
    let p = entry_dir(store, key).join("manifest.json");
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}
