//! Real child processes: SIGKILL mid-write and around commit, and processes racing for a key.
//! The child is `probex-cache-crashtest` (src/bin), which prints a line per phase.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use probex_cache::{GcPolicy, Key, Store, Verified};

const BIN: &str = env!("CARGO_BIN_EXE_probex-cache-crashtest");

struct Proc {
    child: Child,
    lines: Receiver<String>,
}

fn spawn(args: &[&str]) -> Proc {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, lines) = channel();
    thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Proc { child, lines }
}

impl Proc {
    /// Waits for a line starting with `prefix`; panics after 20 s or if the child exits first.
    fn wait_for(&self, prefix: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return,
                Ok(_) => {}
                Err(e) => panic!("child never printed `{prefix}`: {e}"),
            }
        }
    }

    fn kill(mut self) {
        self.child.kill().unwrap(); // SIGKILL on unix
        self.child.wait().unwrap();
    }

    fn output(mut self) -> Vec<String> {
        assert!(self.child.wait().unwrap().success());
        self.lines.iter().collect()
    }
}

fn root(store: &Store) -> &str {
    store.root().to_str().unwrap()
}

/// What must hold after any crash: the entry is absent or whole, no lock is stuck, and gc
/// leaves no trace of the dead writer.
fn assert_recovers(store: &Store, k: &Key) -> bool {
    let committed = match store.get(k) {
        Ok(None) => false,
        Ok(Some(_)) => {
            assert_eq!(
                store.verify(k).unwrap(),
                Verified::Ok,
                "a visible entry must be whole"
            );
            true
        }
        Err(e) => panic!("a crash left a broken entry: {e}"),
    };
    assert!(
        store.try_lock(k).unwrap().is_some(),
        "the dead writer's lock must be free"
    );
    store.gc(&GcPolicy::default()).unwrap();
    assert!(
        names(&store.root().join("tmp")).is_empty(),
        "gc must clean tmp/"
    );
    assert!(names(&store.root().join("work")).is_empty());
    // Whatever happened, the key can be (re)computed now.
    let e = commit(store, k, &[("f", b"again")]);
    assert!(store.verify(&e.key).unwrap().is_ok());
    committed
}

#[test]
fn sigkill_mid_write_leaves_nothing_and_gc_cleans_the_staging_dir() {
    let (_t, store) = store();
    let k = key("mid-write");
    // 32 MiB at 1 MiB per 10 ms: the kill lands well inside the write loop.
    let p = spawn(&["write", root(&store), k.as_str(), "32", "10", "4"]);
    p.wait_for("writing");
    thread::sleep(Duration::from_millis(40));
    assert!(
        store.try_lock(&k).unwrap().is_none(),
        "the writer holds the key"
    );
    p.kill();

    assert!(store.get(&k).unwrap().is_none());
    assert!(store.try_lock(&k).unwrap().is_some());
    let tmp = store.root().join("tmp");
    assert_eq!(
        names(&tmp).len(),
        2,
        "the dead writer's slot and its lock file"
    );
    let r = store.gc(&GcPolicy::default()).unwrap();
    assert_eq!(r.tmp_cleaned, 1, "{r:?}");
    assert!(r.freed_bytes >= 1 << 20, "{r:?}");
    assert!(names(&tmp).is_empty());
    assert!(!assert_recovers(&store, &k));
}

#[test]
fn sigkill_around_commit_is_all_or_nothing() {
    const ARGS: [&str; 3] = ["4", "0", "40"]; // 4 MiB + 40 small files: a commit of some ms
    let spawn_writer = |store: &Store, k: &Key| {
        let mut args = vec!["write", root(store), k.as_str()];
        args.extend(ARGS);
        spawn(&args)
    };
    // Calibrate on this machine: how long an uninterrupted commit takes.
    let (_cal_dir, cal) = store();
    let k = key("calibrate");
    let p = spawn_writer(&cal, &k);
    p.wait_for("committing");
    let start = Instant::now();
    p.wait_for("committed");
    let commit_time = start.elapsed();
    drop(p.output());
    assert!(cal.verify(&k).unwrap().is_ok());

    // Kill at 0..200% of that, so kills land before, during and after the rename even when
    // the machine's load changes between runs.
    let mut outcomes = Vec::new();
    for step in 0..=16u32 {
        let delay = commit_time * step / 8;
        let (_t, store) = store();
        let k = key(&format!("commit-{step}"));
        let p = spawn_writer(&store, &k);
        p.wait_for("committing");
        thread::sleep(delay);
        p.kill();
        outcomes.push((delay.as_micros(), assert_recovers(&store, &k)));
    }
    eprintln!("commit takes {commit_time:?}; (kill delay µs, committed): {outcomes:?}");
}

#[test]
fn racing_processes_compute_once() {
    let (_t, store) = store();
    let k = key("race");
    let procs: Vec<Proc> = (0..3)
        .map(|_| spawn(&["race", root(&store), k.as_str(), "300"]))
        .collect();
    let mut results: Vec<String> = procs.into_iter().flat_map(Proc::output).collect();
    results.sort();
    assert_eq!(results, ["computed", "hit", "hit"]);
    assert!(store.verify(&k).unwrap().is_ok());
}
