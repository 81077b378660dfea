//! Threads of one process racing for the same key.

mod common;

use std::fs;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use common::*;

#[test]
fn racing_threads_compute_once() {
    let (_t, store) = store();
    let k = key("shared");
    let computed = Arc::new(AtomicUsize::new(0));
    const N: usize = 6;
    let barrier = Arc::new(Barrier::new(N));
    let handles: Vec<_> = (0..N)
        .map(|i| {
            let (store, k, computed, barrier) =
                (store.clone(), k.clone(), computed.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                let lock = store.lock(&k).unwrap();
                if let Some(e) = store.get(&k).unwrap() {
                    return e.manifest.content_digest;
                }
                computed.fetch_add(1, Ordering::SeqCst);
                let st = store.stage(&lock).unwrap();
                fs::write(st.dir().join("out"), format!("computed by {i}")).unwrap();
                // Long enough that every other thread is waiting on the lock by now.
                thread::sleep(Duration::from_millis(100));
                st.commit(info("race")).unwrap().manifest.content_digest
            })
        })
        .collect();
    let digests: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(computed.load(Ordering::SeqCst), 1);
    assert!(digests.iter().all(|d| d == &digests[0]), "{digests:?}");
    assert!(store.verify(&k).unwrap().is_ok());
}

#[test]
fn try_lock_sees_a_holder_in_another_thread() {
    let (_t, store) = store();
    let k = key("a");
    let lock = store.lock(&k).unwrap();
    let s2 = store.clone();
    let k2 = k.clone();
    let busy = thread::spawn(move || s2.try_lock(&k2).unwrap().is_none())
        .join()
        .unwrap();
    assert!(busy);
    drop(lock);
    assert!(store.try_lock(&k).unwrap().is_some());
}

#[test]
fn staging_keeps_the_key_locked_after_the_lock_guard_is_dropped() {
    let (_t, store) = store();
    let k = key("a");
    let lock = store.lock(&k).unwrap();
    let st = store.stage(&lock).unwrap();
    drop(lock);
    assert!(store.try_lock(&k).unwrap().is_none());
    st.commit(info("x")).unwrap();
    assert!(store.try_lock(&k).unwrap().is_some());
}
