//! Garbage collection: policies, entries in use, dead writers' leftovers, scratch, quarantine.

mod common;

use std::collections::HashSet;
use std::fs;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use probex_cache::{GcPolicy, Key, Verified};

fn keep(keys: &[&Key]) -> GcPolicy {
    GcPolicy {
        keep: Some(keys.iter().map(|k| (*k).clone()).collect::<HashSet<Key>>()),
        older_than: None,
    }
}

fn older_than(t: SystemTime) -> GcPolicy {
    GcPolicy {
        keep: None,
        older_than: Some(t),
    }
}

/// Backdates an entry (created_unix is not part of the content digest).
fn backdate(store: &probex_cache::Store, k: &Key, secs: u64) {
    edit_manifest(store, k, |m| m["created_unix"] = secs.into());
}

#[test]
fn keep_set_removes_everything_else() {
    let (_t, store) = store();
    let (a, b, c) = (key("a"), key("b"), key("c"));
    commit(&store, &a, &[("f", &[1u8; 10])]);
    commit(&store, &b, &[("f", &[1u8; 200])]);
    commit(&store, &c, &[("f", &[1u8; 3000]), ("g/h", &[2u8; 4])]);
    let r = store.gc(&keep(&[&a])).unwrap();
    let mut want = vec![b.clone(), c.clone()];
    want.sort();
    assert_eq!(r.removed, want);
    assert!(r.freed_bytes >= 3204, "{r:?}");
    assert!(r.skipped_in_use.is_empty());
    assert!(store.get(&a).unwrap().is_some());
    assert!(store.get(&b).unwrap().is_none());
    assert!(store.get(&c).unwrap().is_none());
    assert_eq!(store.list().unwrap().len(), 1);
    assert!(names(&store.root().join("tmp")).is_empty());
}

#[test]
fn older_than_removes_by_commit_time() {
    let (_t, store) = store();
    let (old, new) = (key("old"), key("new"));
    commit(&store, &old, &[("f", b"1")]);
    commit(&store, &new, &[("f", b"2")]);
    backdate(&store, &old, 1_000);
    let r = store
        .gc(&older_than(UNIX_EPOCH + Duration::from_secs(2_000)))
        .unwrap();
    assert_eq!(r.removed, vec![old.clone()]);
    assert!(store.get(&new).unwrap().is_some());
    let r = store
        .gc(&older_than(SystemTime::now() + Duration::from_secs(5)))
        .unwrap();
    assert_eq!(r.removed, vec![new]);
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn keep_and_older_than_must_both_select() {
    let (_t, store) = store();
    let (old_kept, old_dropped, new_dropped) = (key("ok"), key("od"), key("nd"));
    for k in [&old_kept, &old_dropped, &new_dropped] {
        commit(&store, k, &[("f", k.as_str().as_bytes())]);
    }
    backdate(&store, &old_kept, 1_000);
    backdate(&store, &old_dropped, 1_000);
    let policy = GcPolicy {
        keep: Some([old_kept.clone()].into()),
        older_than: Some(UNIX_EPOCH + Duration::from_secs(2_000)),
    };
    let r = store.gc(&policy).unwrap();
    assert_eq!(r.removed, vec![old_dropped]);
    assert!(store.get(&old_kept).unwrap().is_some());
    assert!(store.get(&new_dropped).unwrap().is_some());
}

#[test]
fn default_policy_removes_no_entry() {
    let (_t, store) = store();
    commit(&store, &key("a"), &[("f", b"1")]);
    let r = store.gc(&GcPolicy::default()).unwrap();
    assert!(r.removed.is_empty(), "{r:?}");
    assert_eq!(store.list().unwrap().len(), 1);
}

#[test]
fn entries_in_use_are_never_removed() {
    let (_t, store) = store();
    let (locked, pinned, free) = (key("l"), key("p"), key("f"));
    for k in [&locked, &pinned, &free] {
        commit(&store, k, &[("f", b"1")]);
    }
    let lock = store.lock(&locked).unwrap();
    let pin = store.pin(&pinned).unwrap().unwrap();
    let r = store.gc(&keep(&[])).unwrap();
    assert_eq!(r.removed, vec![free]);
    let mut want = vec![locked.clone(), pinned.clone()];
    want.sort();
    assert_eq!(r.skipped_in_use, want);
    assert!(pin.file("f").unwrap().is_file());
    drop((lock, pin));
    let r = store.gc(&keep(&[])).unwrap();
    assert_eq!(r.removed, want);
}

#[test]
fn dead_staging_dirs_are_removed_and_live_ones_kept() {
    let (_t, store) = store();
    let tmp = store.root().join("tmp");
    let k = key("live");
    let lock = store.lock(&k).unwrap();
    let live = store.stage(&lock).unwrap();
    fs::write(live.dir().join("f"), b"live data").unwrap();
    // Leftovers of dead writers: a slot with its (unheld) lock file, a slot whose lock file is
    // gone, and a lock file whose slot was never created.
    fs::create_dir_all(tmp.join("stage-dead-1/data")).unwrap();
    fs::write(tmp.join("stage-dead-1/data/f"), [0u8; 1000]).unwrap();
    fs::write(tmp.join("stage-dead-1.lock"), b"").unwrap();
    fs::create_dir_all(tmp.join("stage-dead-2/data")).unwrap();
    fs::write(tmp.join("stage-dead-3.lock"), b"").unwrap();

    let r = store.gc(&GcPolicy::default()).unwrap();
    assert_eq!(r.tmp_cleaned, 2, "{r:?}");
    assert!(r.freed_bytes >= 1000);
    let left = names(&tmp);
    assert_eq!(
        left.len(),
        2,
        "only the live slot and its lock remain: {left:?}"
    );
    assert!(live.dir().join("f").is_file());
    let e = live.commit(info("live")).unwrap();
    assert_eq!(fs::read(e.file("f").unwrap()).unwrap(), b"live data");
    assert!(names(&tmp).is_empty());
}

#[test]
fn scratch_of_committed_keys_goes_and_in_progress_scratch_stays() {
    let (_t, store) = store();
    let work = store.root().join("work");
    let (done, resumable, running) = (key("done"), key("resumable"), key("running"));
    commit(&store, &done, &[("f", b"1")]);
    // A crash between the rename and the scratch removal leaves this behind.
    fs::create_dir_all(work.join(done.as_str())).unwrap();
    for k in [&resumable, &running] {
        let lock = store.lock(k).unwrap();
        fs::write(store.work_dir(&lock).unwrap().join("ckpt"), b"c").unwrap();
    }
    let running_lock = store.lock(&running).unwrap();

    let r = store.gc(&GcPolicy::default()).unwrap();
    assert_eq!(r.work_cleaned, 1, "{r:?}");
    assert!(!work.join(done.as_str()).exists());
    assert!(work.join(resumable.as_str()).join("ckpt").is_file());

    let r = store.gc(&keep(&[&done])).unwrap();
    assert_eq!(r.work_cleaned, 1, "{r:?}");
    assert!(!work.join(resumable.as_str()).exists());
    assert!(work.join(running.as_str()).join("ckpt").is_file());
    drop(running_lock);
}

#[test]
fn quarantine_is_emptied_only_when_asked() {
    let (_t, store) = store();
    let k = key("a");
    let e = commit(&store, &k, &[("f", &[3u8; 64])]);
    flip_byte(&e.file("f").unwrap(), 0);
    assert!(matches!(store.verify(&k).unwrap(), Verified::Corrupt(_)));
    let q = store.root().join("quarantine");
    assert_eq!(names(&q).len(), 1);
    assert_eq!(
        store.gc(&GcPolicy::default()).unwrap().quarantine_cleaned,
        0
    );
    let r = store
        .gc(&older_than(UNIX_EPOCH + Duration::from_secs(1_000)))
        .unwrap();
    assert_eq!(r.quarantine_cleaned, 0, "quarantined after the cutoff");
    let r = store.gc(&keep(&[])).unwrap();
    assert_eq!(r.quarantine_cleaned, 1);
    assert!(names(&q).is_empty());
}

#[test]
fn unused_lock_files_are_removed_and_locking_still_works() {
    let (_t, store) = store();
    let locks = store.root().join("locks");
    let (a, b) = (key("a"), key("b"));
    drop(store.lock(&a).unwrap());
    let held = store.lock(&b).unwrap();
    assert_eq!(names(&locks).len(), 2);
    store.gc(&GcPolicy::default()).unwrap();
    assert_eq!(names(&locks), vec![format!("{b}.lock")]);
    assert!(store.try_lock(&b).unwrap().is_none());
    drop(held);
    let again = store.lock(&a).unwrap();
    assert!(store.try_lock(&a).unwrap().is_none());
    drop(again);
}

#[test]
fn leftovers_count_what_gc_would_free_without_removing_it() {
    let (_t, store) = store();
    let tmp = store.root().join("tmp");
    let k = key("live");
    let lock = store.lock(&k).unwrap();
    let live = store.stage(&lock).unwrap();
    fs::write(live.dir().join("f"), [0u8; 100]).unwrap();
    // A dead writer's slot (its lock file unheld) and one whose lock file is gone.
    fs::create_dir_all(tmp.join("stage-dead-1/data")).unwrap();
    fs::write(tmp.join("stage-dead-1/data/f"), [0u8; 1000]).unwrap();
    fs::write(tmp.join("stage-dead-1.lock"), b"").unwrap();
    fs::create_dir_all(tmp.join("stage-dead-2/data")).unwrap();
    fs::write(tmp.join("stage-dead-2/data/f"), [0u8; 10]).unwrap();
    let l = store.leftovers().unwrap();
    assert_eq!((l.dead_staging, l.dead_staging_bytes), (2, 1010), "{l:?}");
    // Nothing was removed, and the live staging is not counted.
    assert!(tmp.join("stage-dead-1/data/f").is_file());
    assert_eq!(store.clean_dead_staging().unwrap(), (2, 1010));
    assert_eq!(store.leftovers().unwrap().dead_staging, 0);
    assert!(live.dir().join("f").is_file());
}
