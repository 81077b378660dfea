//! Commit, get, verify, quarantine, staging hygiene, list, remove.

mod common;

use std::fs;

use common::*;
use probex_cache::{CacheError, Key, Store, Verified};

#[test]
fn commit_then_get_returns_the_same_files_and_digests() {
    let (_t, store) = store();
    let k = key("a");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let files: &[(&str, &[u8])] = &[
        ("weights.bin", &big),
        ("meta/labels.json", b"[1,2,3]"),
        ("empty", b""),
    ];
    let committed = commit(&store, &k, files);
    let got = store.get(&k).unwrap().expect("entry after commit");
    assert_eq!(got, committed);
    assert_eq!(got.key, k);
    assert_eq!(got.manifest.kind, "test");
    assert_eq!(got.manifest.meta["label"], k.as_str());
    let paths: Vec<&str> = got.manifest.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["empty", "meta/labels.json", "weights.bin"]);
    for (rel, bytes) in files {
        let rec = got.manifest.files.iter().find(|f| f.path == *rel).unwrap();
        assert_eq!(rec.size, bytes.len() as u64);
        assert_eq!(rec.blake3, blake3::hash(bytes).to_hex().as_str());
        assert_eq!(fs::read(got.file(rel).unwrap()).unwrap(), *bytes);
    }
    assert_eq!(
        got.manifest.content_digest,
        probex_cache::content_digest(&got.manifest.files)
    );
    assert_eq!(store.verify(&k).unwrap(), Verified::Ok);
    // The staging area is empty again and nothing is locked.
    assert!(names(&store.root().join("tmp")).is_empty());
    assert!(store.try_lock(&k).unwrap().is_some());
}

#[test]
fn same_content_same_digest_different_content_different_digest() {
    let (_t, store) = store();
    let a = commit(&store, &key("a"), &[("f", b"x")]);
    let b = commit(&store, &key("b"), &[("f", b"x")]);
    let c = commit(&store, &key("c"), &[("f", b"y")]);
    assert_eq!(a.content_digest(), b.content_digest());
    assert_ne!(a.content_digest(), c.content_digest());
}

#[test]
fn get_of_unknown_key_is_none_and_verify_is_missing() {
    let (_t, store) = store();
    assert!(store.get(&key("nope")).unwrap().is_none());
    assert_eq!(store.verify(&key("nope")).unwrap(), Verified::Missing);
}

#[test]
fn corrupt_byte_is_reported_and_quarantined() {
    let (_t, store) = store();
    let k = key("a");
    let e = commit(&store, &k, &[("w.bin", &[7u8; 5000]), ("ok.txt", b"fine")]);
    flip_byte(&e.file("w.bin").unwrap(), 1234);
    // get does not re-hash: the entry still looks committed.
    assert!(store.get(&k).unwrap().is_some());
    let Verified::Corrupt(problems) = store.verify(&k).unwrap() else {
        panic!("expected corrupt");
    };
    assert!(
        problems
            .iter()
            .any(|p| p.contains("w.bin") && p.contains("hash")),
        "{problems:?}"
    );
    assert!(
        !problems.iter().any(|p| p.contains("ok.txt")),
        "{problems:?}"
    );
    assert!(
        problems.last().unwrap().contains("quarantine"),
        "{problems:?}"
    );
    assert!(store.get(&k).unwrap().is_none());
    assert_eq!(store.verify(&k).unwrap(), Verified::Missing);
    let q = names(&store.root().join("quarantine"));
    assert_eq!(q.len(), 1);
    assert!(q[0].starts_with(k.as_str()), "{q:?}");
    // The key can be computed again.
    commit(&store, &k, &[("w.bin", &[7u8; 5000]), ("ok.txt", b"fine")]);
    assert!(store.verify(&k).unwrap().is_ok());
}

#[test]
fn verify_reports_missing_extra_resized_files_and_symlinks() {
    let (_t, store) = store();
    let k = key("a");
    let e = commit(
        &store,
        &k,
        &[("a", b"aaaa"), ("b", b"bbbb"), ("c", b"cccc")],
    );
    fs::remove_file(e.file("a").unwrap()).unwrap();
    fs::write(e.dir.join("extra"), b"?").unwrap();
    let c = e.file("c").unwrap();
    fs::remove_file(&c).unwrap();
    fs::write(&c, b"cc").unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink("/etc/passwd", e.dir.join("link")).unwrap();
    let Verified::Corrupt(p) = store.verify(&k).unwrap() else {
        panic!("expected corrupt");
    };
    let has = |needle: &str| p.iter().any(|s| s.contains(needle));
    assert!(has("data/a is missing"), "{p:?}");
    assert!(has("data/extra is not listed"), "{p:?}");
    assert!(has("data/c has 2 bytes"), "{p:?}");
    #[cfg(unix)]
    assert!(has("data/link is a symbolic link"), "{p:?}");
    assert!(!has("data/b"), "{p:?}");
}

#[test]
fn tampered_manifest_paths_are_rejected_on_read_and_verify() {
    for bad in ["../../../etc/passwd", "/etc/passwd", "a/./b", ""] {
        let (_t, store) = store();
        let k = key("a");
        commit(&store, &k, &[("a", b"1")]);
        edit_manifest(&store, &k, |m| {
            m["files"][0]["path"] = bad.into();
            // Keep the digest consistent so only the path check can catch it.
            let files: Vec<probex_cache::FileRecord> =
                serde_json::from_value(m["files"].clone()).unwrap();
            m["content_digest"] = probex_cache::content_digest(&files).into();
        });
        let err = store.get(&k).expect_err(bad);
        assert!(
            matches!(err, CacheError::BadManifest { .. }),
            "{bad}: {err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("manifest.json") && msg.contains("delete"),
            "{msg}"
        );
        assert!(
            store.list().unwrap().is_empty(),
            "broken entries are not listed"
        );
        let Verified::Corrupt(p) = store.verify(&k).unwrap() else {
            panic!("{bad}: expected corrupt");
        };
        assert!(p[0].contains("manifest.json"), "{p:?}");
        assert!(store.get(&k).unwrap().is_none());
    }
}

#[test]
fn manifest_naming_another_key_or_garbage_is_corrupt() {
    let (_t, store) = store();
    let k = key("a");
    commit(&store, &k, &[("a", b"1")]);
    let other = key("b").to_string();
    edit_manifest(&store, &k, |m| m["key"] = other.into());
    assert!(matches!(store.get(&k), Err(CacheError::BadManifest { .. })));
    assert!(matches!(store.verify(&k).unwrap(), Verified::Corrupt(_)));

    let k = key("c");
    commit(&store, &k, &[("a", b"1")]);
    fs::write(entry_dir(&store, &k).join("manifest.json"), b"{ not json").unwrap();
    assert!(matches!(store.get(&k), Err(CacheError::BadManifest { .. })));
    let all = store.verify_all().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].0, k);
    assert!(matches!(all[0].1, Verified::Corrupt(_)));
}

#[test]
fn dropped_staging_leaves_nothing() {
    let (_t, store) = store();
    let k = key("a");
    {
        let lock = store.lock(&k).unwrap();
        let st = store.stage(&lock).unwrap();
        fs::create_dir_all(st.dir().join("sub")).unwrap();
        fs::write(st.dir().join("sub/f"), b"partial").unwrap();
        assert!(!names(&store.root().join("tmp")).is_empty());
    }
    assert!(names(&store.root().join("tmp")).is_empty());
    assert!(store.get(&k).unwrap().is_none());
    assert!(names(&store.root().join("entries")).is_empty());
}

#[test]
fn commit_rejects_symlinks_and_files_outside_the_output_folder() {
    let (_t, store) = store();
    let k = key("a");
    let lock = store.lock(&k).unwrap();

    #[cfg(unix)]
    {
        let st = store.stage(&lock).unwrap();
        fs::write(st.dir().join("ok"), b"1").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", st.dir().join("evil")).unwrap();
        let err = st.commit(info("x")).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, CacheError::BadStaging { .. }), "{msg}");
        assert!(
            msg.contains("evil") && msg.contains("symbolic link"),
            "{msg}"
        );
    }

    let st = store.stage(&lock).unwrap();
    fs::write(st.dir().join("ok"), b"1").unwrap();
    fs::write(st.dir().join("../stray"), b"2").unwrap();
    let err = st.commit(info("x")).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("stray") && msg.contains("outside"), "{msg}");

    // Failed commits clean up after themselves.
    assert!(store.get(&k).unwrap().is_none());
    assert!(names(&store.root().join("tmp")).is_empty());
}

#[test]
fn second_commit_keeps_the_existing_entry() {
    let (_t, store) = store();
    let k = key("a");
    let first = commit(&store, &k, &[("f", b"first")]);
    let second = commit(&store, &k, &[("f", b"second")]);
    assert_eq!(second, first);
    assert_eq!(fs::read(second.file("f").unwrap()).unwrap(), b"first");
    assert!(names(&store.root().join("tmp")).is_empty());
}

#[test]
fn work_dir_persists_across_failed_attempts_and_commit_removes_it() {
    let (_t, store) = store();
    let k = key("a");
    {
        let lock = store.lock(&k).unwrap();
        let w = store.work_dir(&lock).unwrap();
        fs::write(w.join("ckpt"), b"epoch 3").unwrap();
        let _failed = store.stage(&lock).unwrap();
    }
    let lock = store.lock(&k).unwrap();
    let w = store.work_dir(&lock).unwrap();
    assert_eq!(fs::read(w.join("ckpt")).unwrap(), b"epoch 3");
    let st = store.stage(&lock).unwrap();
    fs::write(st.dir().join("model"), b"m").unwrap();
    st.commit(info("x")).unwrap();
    assert!(!w.exists());
}

#[test]
fn a_lock_from_another_store_is_refused() {
    let (_t1, s1) = store();
    let (_t2, s2) = store();
    let lock = s1.lock(&key("a")).unwrap();
    let err = s2.stage(&lock).unwrap_err();
    assert!(matches!(err, CacheError::ForeignLock { .. }), "{err}");
    assert!(s2.work_dir(&lock).is_err());
}

#[test]
fn reopening_a_store_sees_its_entries() {
    let (t, store) = store();
    let k = key("a");
    commit(&store, &k, &[("f", b"1")]);
    let again = Store::open(t.path().join("cache")).unwrap();
    assert_eq!(again.root(), store.root());
    assert!(again.get(&k).unwrap().is_some());
    assert!(store.root().join("CACHEDIR.TAG").is_file());
}

#[test]
fn list_and_sizes() {
    let (_t, store) = store();
    let keys: Vec<Key> = ["x", "y", "z"].iter().map(|n| key(n)).collect();
    commit(&store, &keys[0], &[("a", &[0u8; 100])]);
    commit(&store, &keys[1], &[("a", &[0u8; 10]), ("b/c", &[0u8; 20])]);
    commit(&store, &keys[2], &[]);
    let listed = store.list().unwrap();
    let mut want = keys.clone();
    want.sort();
    assert_eq!(
        listed.iter().map(|e| e.key.clone()).collect::<Vec<_>>(),
        want
    );
    let size_of = |k: &Key| listed.iter().find(|e| &e.key == k).unwrap().size();
    assert_eq!(size_of(&keys[0]), 100);
    assert_eq!(size_of(&keys[1]), 30);
    assert_eq!(size_of(&keys[2]), 0);
}

#[test]
fn remove_deletes_entry_and_scratch() {
    let (_t, store) = store();
    let k = key("a");
    commit(&store, &k, &[("f", b"1")]);
    assert!(store.remove(&k).unwrap());
    assert!(store.get(&k).unwrap().is_none());
    assert!(!store.remove(&k).unwrap());
    // remove_locked for a caller that holds the lock, including its scratch.
    let lock = store.lock(&k).unwrap();
    let w = store.work_dir(&lock).unwrap();
    fs::write(w.join("ckpt"), b"1").unwrap();
    assert!(!store.remove_locked(&lock).unwrap());
    assert!(!w.exists());
    assert!(names(&store.root().join("tmp")).is_empty());
}

#[test]
fn pinned_entries_block_removal_but_not_readers_or_the_key_lock() {
    let (_t, store) = store();
    let k = key("a");
    commit(&store, &k, &[("f", b"1")]);
    let p1 = store.pin(&k).unwrap().expect("pinned");
    let p2 = store.pin(&k).unwrap().expect("two readers at once");
    assert_eq!(p1.size(), 1);
    // The key lock is free: whoever commits a key can pin the entry before letting go of it.
    let lock = store
        .try_lock(&k)
        .unwrap()
        .expect("the key lock is not held by readers");
    let p3 = store.pin(&k).unwrap().expect("pinned under the key lock");
    drop(lock);
    // Removal waits for every reader.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| tx.send(store.remove(&k).unwrap()).unwrap());
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "removed while pinned"
        );
        assert!(p3.file("f").unwrap().is_file());
        drop((p1, p2, p3));
        assert!(rx.recv().unwrap(), "removed once unpinned");
    });
    assert!(store.get(&k).unwrap().is_none());
    assert!(store.pin(&key("none")).unwrap().is_none());
}
