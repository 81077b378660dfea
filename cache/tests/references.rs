//! Entries that refer to files outside themselves (a layer dataset reading model files in
//! place): how references are recorded, noticed when stale, and kept alive by gc.

mod common;

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use probex_cache::{Entry, GcPolicy, Key, Referent, Store, Verified};

/// Commits `key` with one file and references to `refs`.
fn commit_referring(store: &Store, key: &Key, refs: &[PathBuf]) -> Entry {
    let lock = store.lock(key).unwrap();
    let st = store.stage(&lock).unwrap();
    fs::write(st.dir().join("layer.json"), b"{}").unwrap();
    let mut info = info(key.as_str());
    info.references = refs.iter().map(|p| Referent::now(p).unwrap()).collect();
    st.commit(info).unwrap()
}

fn keep(keys: &[&Key]) -> GcPolicy {
    GcPolicy {
        keep: Some(keys.iter().map(|k| (*k).clone()).collect::<HashSet<Key>>()),
        older_than: None,
    }
}

/// A file referred to inside another entry is recorded by that entry's key and a relative
/// path; one outside the cache by its absolute path. Both with their size.
#[test]
fn references_name_the_entry_holding_the_file() {
    let (tmp, store) = store();
    let models = key("models");
    let m = commit(&store, &models, &[("m/a.safetensors", &[7u8; 40])]);
    let outside = tmp.path().join("outside.bin");
    fs::write(&outside, [1u8; 9]).unwrap();
    let layer = key("layer");
    let e = commit_referring(
        &store,
        &layer,
        &[m.dir.join("m/a.safetensors"), outside.clone()],
    );
    let refs = &e.manifest.references;
    assert_eq!(refs.len(), 2);
    let inside = refs.iter().find(|r| r.entry.is_some()).unwrap();
    assert_eq!(inside.entry.as_ref(), Some(&models));
    assert_eq!((inside.path.as_str(), inside.size), ("m/a.safetensors", 40));
    let out = refs.iter().find(|r| r.entry.is_none()).unwrap();
    assert_eq!(Path::new(&out.path), outside.as_path());
    assert_eq!(out.size, 9);
    // What it refers to is not part of its content: the referring files name that content.
    let plain = commit(&store, &key("plain"), &[("layer.json", b"{}")]);
    assert_eq!(e.manifest.content_digest, plain.manifest.content_digest);
    assert!(store.get(&layer).unwrap().is_some());
    assert_eq!(store.verify(&layer).unwrap(), Verified::Ok);
}

/// A referenced file that changes or vanishes makes the entry stale: `get` quarantines it
/// (so the node is computed again and the plan says why) and `verify` names the file.
#[test]
fn a_changed_or_missing_referent_makes_the_entry_stale() {
    let (tmp, store) = store();
    let outside = tmp.path().join("model.safetensors");
    fs::write(&outside, [1u8; 9]).unwrap();
    let a = key("a");
    commit_referring(&store, &a, std::slice::from_ref(&outside));
    fs::write(&outside, [1u8; 10]).unwrap();
    assert!(store.get(&a).unwrap().is_none());
    assert!(store.was_quarantined(&a));

    let b = key("b");
    commit_referring(&store, &b, std::slice::from_ref(&outside));
    fs::remove_file(&outside).unwrap();
    match store.verify(&b).unwrap() {
        Verified::Corrupt(problems) => assert!(
            problems
                .iter()
                .any(|p| p.contains(&outside.display().to_string())),
            "{problems:?}"
        ),
        other => panic!("expected a stale entry, got {other:?}"),
    }
}

/// The manifest records the stamp the stage read a file under, not the one it has at commit:
/// a file rewritten between the stage's read and the commit makes the entry stale at once,
/// rather than vouching for bytes the stage never saw.
#[test]
fn a_referent_changed_before_commit_is_stale() {
    let (tmp, store) = store();
    let outside = tmp.path().join("model.safetensors");
    fs::write(&outside, [1u8; 9]).unwrap();
    let read_under = Referent::now(&outside).unwrap();
    fs::write(&outside, [2u8; 12]).unwrap();
    let a = key("a");
    let lock = store.lock(&a).unwrap();
    let st = store.stage(&lock).unwrap();
    fs::write(st.dir().join("layer.json"), b"{}").unwrap();
    let mut info = info(a.as_str());
    info.references = vec![read_under];
    let e = st.commit(info).unwrap();
    assert_eq!(e.manifest.references[0].size, 9);
    drop(lock);
    assert!(store.get(&a).unwrap().is_none());
    assert!(store.was_quarantined(&a));
}

/// A manifest written before inodes were recorded (no `inode` field) still reads, and its
/// references are checked by size and modification time.
#[test]
fn a_reference_without_an_inode_still_reads() {
    let (tmp, store) = store();
    let outside = tmp.path().join("model.safetensors");
    fs::write(&outside, [1u8; 9]).unwrap();
    let a = key("a");
    commit_referring(&store, &a, std::slice::from_ref(&outside));
    edit_manifest(&store, &a, |m| {
        m["references"][0]
            .as_object_mut()
            .unwrap()
            .remove("inode")
            .unwrap();
    });
    let read = store.get(&a).unwrap().unwrap();
    assert_eq!(read.manifest.references[0].inode, 0);
    fs::write(&outside, [1u8; 10]).unwrap();
    assert!(store.get(&a).unwrap().is_none());
}

/// gc keeps an entry that a kept entry refers to (directly or through another), says which,
/// and removes it once nothing kept refers to it.
#[test]
fn gc_keeps_what_a_kept_entry_refers_to() {
    let (_tmp, store) = store();
    let (models, layer, probe, other) = (key("models"), key("layer"), key("probe"), key("other"));
    let m = commit(&store, &models, &[("a.safetensors", &[7u8; 40])]);
    let l = commit_referring(&store, &layer, &[m.dir.join("a.safetensors")]);
    commit_referring(&store, &probe, &[l.dir.join("layer.json")]);
    commit(&store, &other, &[("f", &[1u8; 5])]);

    let r = store.gc(&keep(&[&probe])).unwrap();
    assert_eq!(r.removed, vec![other.clone()]);
    let mut want = vec![
        (layer.clone(), probe.clone()),
        (models.clone(), layer.clone()),
    ];
    want.sort();
    assert_eq!(r.kept_referenced, want);
    assert!(store.get(&models).unwrap().is_some());

    let r = store.gc(&keep(&[])).unwrap();
    let mut gone = vec![models, layer, probe];
    gone.sort();
    assert_eq!(r.removed, gone);
    assert!(r.kept_referenced.is_empty());
}
