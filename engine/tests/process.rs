//! Tests that need separate processes: exit codes and run records of the CLI, a run killed
//! (SIGKILL) in the middle of a stage's write and in the middle of a commit, and two
//! concurrent runs sharing a cache.
//!
//! They drive the `testkit` example (the engine's CLI with the test kinds). `cargo test`
//! builds examples, but `cargo test --test process` does not, so the first test to need it
//! runs `cargo build --example testkit` (a no-op when it is fresh) into the same target
//! directory as this test binary.

mod kinds;
mod testkit;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use probex_cache::Verified;
use testkit::{Kit, stderr, stdout, wait_for};

/// Files under the `data/` of every staging directory in the cache's `tmp/`.
fn staged_files(cache: &Path, sub: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for slot in fs::read_dir(cache.join("tmp"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let dir = slot.path().join("data").join(sub);
        for f in fs::read_dir(&dir).into_iter().flatten().flatten() {
            out.push(f.path());
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------

const GOOD: &str = r#"
[experiment]
name = "good"
description = "two numbers and their sum"

[stage.a]
kind = "const"
value = 2.0

[stage.b]
kind = "add"
from = "a"
offset = 0.5
expect = { value = "2.5 +- 0.01" }

[stage.g]
kind = "gather"
from = "b"

[expect]
"b.value" = "> a.value"
"#;

#[test]
fn exit_code_is_0_when_every_expectation_holds_and_the_run_record_is_written() {
    let k = Kit::new();
    k.write("good.toml", GOOD);
    let out = k.run(&["run", "good.toml", "--out", "rec", "--progress", "plain"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    assert!(text.contains("ok     b.value"), "{text}");
    assert!(
        text.contains("ok: 3 nodes (3 computed, 0 cached)"),
        "{text}"
    );
    assert!(
        text.contains("== g ==\ngathered 1 nodes, sum 2.5"),
        "{text}"
    );
    for f in [
        "report.md",
        "results.json",
        "status.json",
        "plan.json",
        "logs/b.log",
    ] {
        assert!(
            k.path("rec").join(f).is_file(),
            "{f} missing from the run record"
        );
    }
    let results: serde_json::Value =
        serde_json::from_slice(&fs::read(k.path("rec/results.json")).unwrap()).unwrap();
    assert_eq!(results["success"], true);
    assert_eq!(results["results"]["b"]["value"], 2.5);
    assert_eq!(results["expectations"].as_array().unwrap().len(), 2);
    let md = fs::read_to_string(k.path("rec/report.md")).unwrap();
    assert!(
        md.starts_with("# good\n\ntwo numbers and their sum"),
        "{md}"
    );
    assert!(md.contains("Outcome: **success**"), "{md}");
    // Published files are copied into the run record.
    assert!(k.path("rec/g/value.json").is_file());

    // Without --out the record goes beside the experiment file.
    let again = k.run(&["run", "good.toml"]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert!(stdout(&again).contains("(0 computed, 3 cached)"));
    let runs: Vec<_> = fs::read_dir(k.path("runs/good")).unwrap().collect();
    assert_eq!(runs.len(), 1);

    k.assert_verify_clean(3);
    let plan = k.run(&["plan", "good.toml"]);
    assert!(
        stdout(&plan).contains("3 nodes: 3 cached, 0 to run"),
        "{}",
        stdout(&plan)
    );
}

/// `show` finds one node: why it would run before a run, its artifact, files and results
/// after; an unknown name is a usage error that offers the closest names.
#[test]
fn show_tells_where_a_nodes_artifact_is_and_why_it_would_run() {
    let k = Kit::new();
    k.write("good.toml", GOOD);
    let before = k.run(&["show", "good.toml", "b"]);
    let text = stdout(&before);
    assert_eq!(before.status.code(), Some(0), "{}", stderr(&before));
    assert!(text.contains("state     would run: never run"), "{text}");
    assert!(text.contains("inputs    a"), "{text}");
    assert!(text.contains("artifact  none"), "{text}");

    let run = k.run(&["run", "good.toml", "--out", "rec", "--progress", "quiet"]);
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    let after = k.run(&["show", "good.toml", "b", "--json"]);
    assert_eq!(after.status.code(), Some(0), "{}", stderr(&after));
    let v: serde_json::Value = serde_json::from_slice(&after.stdout).unwrap();
    assert_eq!(v["node"], "b");
    assert_eq!(v["kind"], "add");
    assert_eq!(v["status"], "cached");
    assert_eq!(v["results"]["value"], 2.5);
    assert_eq!(v["params"]["offset"], 0.5);
    // The key and the artifact are the ones the run record names.
    let status: serde_json::Value =
        serde_json::from_slice(&fs::read(k.path("rec/status.json")).unwrap()).unwrap();
    let b = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "b")
        .unwrap();
    assert_eq!(v["key"], b["key"]);
    let dir = PathBuf::from(v["artifact"].as_str().unwrap());
    assert!(
        dir.starts_with(fs::canonicalize(k.cache()).unwrap()),
        "{dir:?}"
    );
    let files = v["files"].as_array().unwrap();
    assert!(!files.is_empty());
    for f in files {
        let path = dir.join(f["path"].as_str().unwrap());
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            f["bytes"].as_u64().unwrap()
        );
    }
    let text = stdout(&k.run(&["show", "good.toml", "b"]));
    assert!(text.contains("state     cached"), "{text}");
    assert!(text.contains("  value  2.5"), "{text}");

    // A changed param: the same reason `plan` gives.
    k.write("good.toml", &GOOD.replace("offset = 0.5", "offset = 1.5"));
    let text = stdout(&k.run(&["show", "good.toml", "b"]));
    assert!(text.contains("would run: params changed: offset"), "{text}");

    let unknown = k.run(&["show", "good.toml", "bb"]);
    assert_eq!(unknown.status.code(), Some(2));
    let err = stderr(&unknown);
    assert!(err.contains("error: no node `bb`"), "{err}");
    assert!(err.contains("did you mean `b`"), "{err}");
}

/// A node of a stage that fans out once its input exists is not known before the run, and
/// `show` says what it waits for; after the run a stage's own name offers its nodes.
#[test]
fn show_explains_fan_outs_not_known_yet_and_offers_a_stages_nodes() {
    let k = Kit::new();
    k.write(
        "sweep.toml",
        r#"
[stage.n]
kind = "const"
value = 3.0

[stage.s]
kind = "sweep"
from = "n"
layers = "all"
"#,
    );
    let before = k.run(&["show", "sweep.toml", "s[layer=1]"]);
    assert_eq!(before.status.code(), Some(2));
    let err = stderr(&before);
    assert!(err.contains("stage `s` has no nodes yet"), "{err}");
    assert!(err.contains("known once n ran"), "{err}");

    let run = k.run(&["run", "sweep.toml", "--progress", "quiet"]);
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    let node = k.run(&["show", "sweep.toml", "s[layer=1]"]);
    assert_eq!(node.status.code(), Some(0), "{}", stderr(&node));
    assert!(
        stdout(&node).contains("state     cached"),
        "{}",
        stdout(&node)
    );
    let stage = k.run(&["show", "sweep.toml", "s"]);
    assert_eq!(stage.status.code(), Some(2));
    let err = stderr(&stage);
    assert!(
        err.contains("did you mean `s[layer=0]`, `s[layer=1]`, `s[layer=2]`?"),
        "{err}"
    );
}

#[test]
fn exit_code_is_1_when_an_expectation_is_missed() {
    let k = Kit::new();
    k.write("miss.toml", &GOOD.replace("2.5 +- 0.01", "3.0 +- 0.1"));
    let out = k.run(&["run", "miss.toml", "--out", "rec"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    assert!(
        text.contains("MISSED b.value = 2.5000 (expected 3.0 +- 0.1): off by 0.5000"),
        "{text}"
    );
    assert!(text.contains("FAILED"), "{text}");
    let md = fs::read_to_string(k.path("rec/report.md")).unwrap();
    assert!(md.contains("**MISSED**"), "{md}");
    let results: serde_json::Value =
        serde_json::from_slice(&fs::read(k.path("rec/results.json")).unwrap()).unwrap();
    assert_eq!(results["success"], false);
}

#[test]
fn exit_code_is_1_when_a_stage_fails_and_2_for_bad_input() {
    let k = Kit::new();
    k.write(
        "fails.toml",
        "[stage.f]\nkind = \"fail\"\nmessage = \"no luck\"\n\n[stage.g]\nkind = \"add\"\nfrom = \"f\"\n",
    );
    let out = k.run(&["run", "fails.toml", "--out", "rec"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("error: stage f failed: no luck"), "{err}");
    assert!(err.contains("logs/f.log"), "{err}");
    assert!(k.path("rec/report.md").is_file() && k.path("rec/results.json").is_file());

    k.write(
        "cycle.toml",
        "[stage.a]\nkind = \"add\"\nfrom = \"b\"\n\n[stage.b]\nkind = \"add\"\nfrom = \"a\"\n",
    );
    for cmd in ["run", "plan"] {
        let out = k.run(&[cmd, "cycle.toml"]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("stages form a cycle: a -> b -> a"), "{err}");
        assert!(err.contains("--> cycle.toml:1:8"), "{err}");
        assert!(stdout(&out).is_empty());
    }
    let out = k.run(&["run", "fails.toml", "--device", "gpu"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--device gpu: not a device"),
        "{}",
        stderr(&out)
    );
    let out = k.run(&["run", "absent.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot read experiment file absent.toml"),
        "{}",
        stderr(&out)
    );
    assert!(
        !k.path("runs").exists(),
        "a bad experiment must not leave a run record"
    );
}

#[test]
fn a_corrupt_entry_is_quarantined_by_verify_and_recomputed() {
    let k = Kit::new();
    k.write("good.toml", GOOD);
    assert_eq!(
        k.run(&["run", "good.toml", "--out", "r1"]).status.code(),
        Some(0)
    );
    let key = k.key_of("good.toml", "b");
    let file = k.store().get(&key).unwrap().unwrap().dir.join("value.json");
    let mut perm = fs::metadata(&file).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    fs::set_permissions(&file, perm).unwrap();
    fs::write(&file, br#"{"value": 99.0}"#).unwrap();

    let out = k.run(&["cache", "verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("3 entries verified, 1 corrupt"),
        "{}",
        stdout(&out)
    );
    let plan = stdout(&k.run(&["plan", "good.toml"]));
    let line = plan
        .lines()
        .find(|l| l.starts_with("b "))
        .unwrap_or_default();
    assert!(line.contains("cache entry failed verification"), "{plan}");
    let out = k.run(&["run", "good.toml", "--out", "r2"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(k.starts("b"), 2);
    assert_eq!(k.starts("a"), 1);
    k.assert_verify_clean(3);
}

// ---------------------------------------------------------------------------------------------
// Crash safety

#[test]
fn a_run_killed_while_a_stage_writes_leaves_no_entry_and_is_recomputed() {
    let k = Kit::new();
    k.write(
        "slow.toml",
        r#"
[stage.a]
kind = "const"
value = 1

[stage.w]
kind = "slow_write"
from = "a"
chunks = 40      # 10 MiB over about 1 s
chunk_ms = 25
"#,
    );
    let key = k.key_of("slow.toml", "w");
    let mut child = k.spawn(&["run", "slow.toml", "--out", "r1"]);
    wait_for(
        Duration::from_secs(20),
        "the stage to start writing",
        || {
            staged_files(&k.cache(), "").iter().any(|f| {
                f.ends_with("big.bin") && fs::metadata(f).is_ok_and(|m| m.len() >= 1 << 20)
            })
        },
    );
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let trace = k.trace();
    assert!(
        !trace.iter().any(|l| l.what == "end" && l.node == "w"),
        "the stage finished before the kill: {trace:?}"
    );

    // Nothing half-written is visible: `a` is committed, `w` is not, every entry is whole.
    let store = k.store();
    assert!(store.get(&key).unwrap().is_none());
    assert_eq!(k.entry_dirs().len(), 1);
    assert!(
        store
            .verify_all()
            .unwrap()
            .iter()
            .all(|(_, v)| *v == Verified::Ok)
    );
    k.assert_verify_clean(1);

    let out = k.run(&["run", "slow.toml", "--out", "r2"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("(1 computed, 1 cached)"),
        "{}",
        stdout(&out)
    );
    assert_eq!(k.starts("a"), 1);
    assert_eq!(k.starts("w"), 2);
    let entry = store.get(&key).unwrap().expect("w committed");
    assert_eq!(
        fs::metadata(entry.dir.join("big.bin")).unwrap().len(),
        40 * 256 * 1024
    );
    k.assert_verify_clean(2);
    // The dead run's staging directory was garbage, which the second run removed.
    assert!(
        stderr(&out).contains("cache: removed 1 staging folder(s) of killed runs"),
        "{}",
        stderr(&out)
    );
    let gc = k.run(&["cache", "gc"]);
    assert!(
        stdout(&gc).contains("0 staging dirs of dead runs"),
        "{}",
        stdout(&gc)
    );
}

#[test]
fn a_gang_killed_midway_is_finished_by_the_rerun_each_member_from_its_own_state() {
    let k = Kit::new();
    k.write(
        "gang.toml",
        r#"
[stage.s]
kind = "bsweep"
layers = "0..3"

[stage.g]
kind = "gang"
from = "s"
groups = 1
steps = 60       # 3 members x 60 steps x 20 ms: about 3.6 s
step_ms = 20
"#,
    );
    let members: Vec<String> = (0..3).map(|l| format!("g[layer={l}]")).collect();
    let keys: Vec<_> = members.iter().map(|m| k.key_of("gang.toml", m)).collect();
    let mut child = k.spawn(&["run", "gang.toml", "--out", "r1"]);
    // Killed once every member has saved a few steps of its own.
    let step_of = |dir: &Path| -> u64 {
        fs::read_to_string(dir.join("step"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    };
    let work_steps = || -> Vec<u64> {
        let mut v: Vec<u64> = walk(&k.cache())
            .into_iter()
            .filter(|p| p.file_name().is_some_and(|n| n == "step"))
            .filter_map(|p| p.parent().map(step_of))
            .collect();
        v.sort();
        v
    };
    wait_for(
        Duration::from_secs(30),
        "every member to save steps",
        || {
            let v = work_steps();
            v.len() == 3 && v.iter().all(|&s| s >= 5)
        },
    );
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    assert!(
        !k.trace()
            .iter()
            .any(|l| l.what == "end" && l.kind == "gang"),
        "the gang finished before the kill"
    );
    let store = k.store();
    for (m, key) in members.iter().zip(&keys) {
        assert!(store.get(key).unwrap().is_none(), "{m} was committed");
    }

    let out = k.run(&["run", "gang.toml", "--out", "r2"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let results: serde_json::Value =
        serde_json::from_slice(&fs::read(k.path("r2/results.json")).unwrap()).unwrap();
    for (l, (m, key)) in members.iter().zip(&keys).enumerate() {
        assert!(store.get(key).unwrap().is_some(), "{m} has no entry");
        let r = &results["results"][m.as_str()];
        assert_eq!(r["value"], 3.0 * l as f64, "{m}: {r}");
        let resumed = r["resumed"].as_u64().unwrap_or(0);
        assert!(resumed >= 5, "{m} started over instead of resuming: {r}");
        assert_eq!(k.starts(m), 2, "{m}");
    }
    k.assert_verify_clean(6);
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_run_killed_during_commit_leaves_no_entry_and_is_recomputed() {
    // Many small files: the commit hashes, fsyncs and write-protects each one, which takes a
    // while. Once the stage has returned and the first file is write-protected, the run is
    // frozen (SIGSTOP) to check that the commit is still under way, then killed (SIGKILL). On
    // a file system where fsync is free the commit may win the race; try again with more files.
    let mut attempt = None;
    for files in [400, 4000, 20000] {
        let k = Kit::new();
        let text = format!("[stage.w]\nkind = \"slow_write\"\nchunks = 1\nfiles = {files}\n");
        k.write("commit.toml", &text);
        let key = k.key_of("commit.toml", "w");
        let mut child = k.spawn(&["run", "commit.toml", "--out", "r1"]);
        wait_for(Duration::from_secs(60), "the commit to start", || {
            k.trace().iter().any(|l| l.what == "end" && l.node == "w")
                && staged_files(&k.cache(), "many")
                    .iter()
                    .any(|f| fs::metadata(f).is_ok_and(|m| m.permissions().readonly()))
        });
        let stopped = Command::new("kill")
            .args(["-STOP", &child.id().to_string()])
            .status()
            .expect("kill -STOP");
        assert!(stopped.success());
        let mid_commit = k.store().get(&key).unwrap().is_none();
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        if mid_commit {
            attempt = Some((k, key, files));
            break;
        }
    }
    let (k, key, files) = attempt.expect("every commit finished before it could be killed");
    let store = k.store();
    assert!(store.get(&key).unwrap().is_none());
    assert!(k.entry_dirs().is_empty(), "{:?}", k.entry_dirs());
    k.assert_verify_clean(0);

    let out = k.run(&["run", "commit.toml", "--out", "r2"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(k.starts("w"), 2);
    let entry = store.get(&key).unwrap().expect("w committed");
    assert_eq!(entry.manifest.files.len(), files + 1);
    k.assert_verify_clean(1);
}

#[test]
fn concurrent_runs_of_one_experiment_compute_each_node_once() {
    let k = Kit::new();
    k.write(
        "par.toml",
        r#"
[stage.p]
kind = "sleep"
ms = 400
value = 1

[stage.q]
kind = "sleep"
ms = 400
value = 2

[stage.r]
kind = "sleep"
ms = 400
value = 3

[stage.s]
kind = "add"
from = ["p", "q", "r"]
"#,
    );
    // Both start before either has committed anything.
    let mut runs: Vec<Child> = ["one", "two"]
        .into_iter()
        .map(|out| {
            k.cmd(&["run", "par.toml", "--jobs", "3", "--out", out])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn testkit")
        })
        .collect();
    let outputs: Vec<Output> = runs
        .drain(..)
        .map(|c| c.wait_with_output().expect("wait"))
        .collect();
    for out in &outputs {
        assert_eq!(out.status.code(), Some(0), "{}", stderr(out));
    }
    for node in ["p", "q", "r", "s"] {
        assert_eq!(
            k.starts(node),
            1,
            "{node} computed more than once: {:?}",
            k.trace()
        );
    }
    // The run that waited for the other reports those nodes as cached, not computed.
    let computed: usize = outputs
        .iter()
        .map(|o| {
            let t = stdout(o);
            let n = t
                .split(" nodes (")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse::<usize>().ok());
            n.unwrap_or_else(|| panic!("no summary line in {t}"))
        })
        .sum();
    assert_eq!(
        computed,
        4,
        "{:?}",
        outputs.iter().map(stdout).collect::<Vec<_>>()
    );
    for out in ["one", "two"] {
        let results: serde_json::Value =
            serde_json::from_slice(&fs::read(k.path(out).join("results.json")).unwrap()).unwrap();
        assert_eq!(results["results"]["s"]["value"], 6.0);
    }
    k.assert_verify_clean(4);
}
