//! In-process engine tests with the test kinds: keys, reruns and their reasons, scheduling,
//! failures, fan-outs, includes and expectations.

mod kinds;
mod support;

use std::collections::BTreeMap;
use std::time::Instant;

use probex_engine::history::{Reason, Status};
use support::{Bench, names, ran, result, state};

/// Keys of every node of a plan, by node name.
fn keys(b: &Bench, file: &std::path::Path) -> BTreeMap<String, String> {
    b.plan(file)
        .nodes
        .into_iter()
        .map(|r| (r.node, r.key))
        .collect()
}

#[test]
fn keys_are_stable_under_reformatting() {
    let b = Bench::new();
    let plain = b.write(
        "plain/x.toml",
        r#"
[experiment]
name = "fmt"

[stage.a]
kind = "const"
value = 1.5
extra = { x = 1.0, y = 2.0 }

[stage.b]
kind = "add"
from = "a"
"#,
    );
    // Same experiment: stages and keys reordered, comments, odd whitespace, a standard table
    // instead of an inline one, a list instead of a single name, and the default of `scale`
    // and `offset` spelled out.
    let reformatted = b.write(
        "reformatted/x.toml",
        r#"
# a comment
[experiment]
name    =   "fmt"     # trailing comment

[stage.b]
from = [ "a" ]
offset = 0.0
kind="add"

[stage.a]
scale = 1.0          # the default, written out
kind  = "const"
value =	1.5

    [stage.a.extra]
    y = 2.0
    x = 1.0
"#,
    );
    let k1 = keys(&b, &plain);
    let k2 = keys(&b, &reformatted);
    assert_eq!(k1.len(), 2);
    assert_eq!(k1, k2, "reformatting changed keys");

    // A real change changes the key of the node and of its reader.
    let changed = b.write(
        "changed/x.toml",
        &std::fs::read_to_string(&plain)
            .unwrap()
            .replace("y = 2.0", "y = 2.5"),
    );
    let k3 = keys(&b, &changed);
    assert_ne!(k1["a"], k3["a"]);
    assert_ne!(k1["b"], k3["b"]);
}

#[test]
fn device_and_threads_are_not_part_of_keys() {
    let b = Bench::new();
    let plain = b.write("p/x.toml", "[stage.a]\nkind = \"const\"\nvalue = 2.0\n");
    let placed = b.write(
        "q/x.toml",
        "[stage.a]\nkind = \"const\"\nvalue = 2.0\ndevice = \"cuda:1\"\nthreads = 3\n",
    );
    assert_eq!(keys(&b, &plain), keys(&b, &placed));
    let exp = b.load(&placed);
    assert_eq!(exp.stages[0].device.as_deref(), Some("cuda:1"));
    assert_eq!(exp.stages[0].threads, Some(3));
}

#[test]
fn integer_and_float_spellings_of_a_float_param_share_a_key() {
    let b = Bench::new();
    let f = b.write("f/x.toml", "[stage.a]\nkind = \"const\"\nvalue = 2.0\n");
    let i = b.write("i/x.toml", "[stage.a]\nkind = \"const\"\nvalue = 2\n");
    assert_eq!(keys(&b, &f), keys(&b, &i));
}

const CHAIN: &str = r#"
[stage.a]
kind = "const"
value = 1.0

[stage.b]
kind = "const"
value = 5.0

[stage.c]
kind = "add"
from = "a"

[stage.d]
kind = "add"
from = "b"

[stage.e]
kind = "add"
from = ["c", "d"]
"#;

#[test]
fn a_param_change_reruns_exactly_that_node_and_its_dependants() {
    let b = Bench::new();
    let file = b.write("x.toml", CHAIN);
    let first = b.run(&file);
    assert!(first.success());
    assert_eq!(ran(&first), ["a", "b", "c", "d", "e"]);
    assert_eq!(result(&first, "e")["value"], 6.0);

    b.write("x.toml", &CHAIN.replacen("value = 1.0", "value = 2.0", 1));
    let view = b.plan(&file);
    let status: BTreeMap<String, Status> = view
        .nodes
        .iter()
        .map(|r| (r.node.clone(), r.status.clone()))
        .collect();
    assert_eq!(status["b"], Status::Cached);
    assert_eq!(status["d"], Status::Cached);
    assert_eq!(
        status["a"],
        Status::Run(Reason::ParamsChanged(vec!["value: 1.0 -> 2.0".into()]))
    );
    assert_eq!(
        status["c"],
        Status::Run(Reason::UpstreamChanged(vec!["a".into()]))
    );
    assert_eq!(
        status["e"],
        Status::Run(Reason::UpstreamChanged(vec!["c".into()]))
    );
    let text = b.plan_text(&file);
    assert!(text.contains("params changed: value: 1.0 -> 2.0"), "{text}");
    assert!(text.contains("upstream changed: a"), "{text}");
    assert!(text.contains("upstream changed: c"), "{text}");
    assert!(text.contains("5 nodes: 2 cached, 3 to run"), "{text}");

    let second = b.run(&file);
    assert!(second.success());
    assert_eq!(ran(&second), ["a", "c", "e"]);
    assert_eq!(b.trace.nodes(), ["a", "c", "e"]);
    assert_eq!(state(&second, "b"), "cached");
    assert_eq!(result(&second, "e")["value"], 7.0);
}

#[test]
fn plan_says_never_run_and_entry_missing() {
    let b = Bench::new();
    let file = b.write("x.toml", CHAIN);
    let text = b.plan_text(&file);
    assert!(text.contains("never run"), "{text}");
    let report = b.run(&file);
    // Remove one entry behind the engine's back: the plan says it is missing, not changed.
    let key = report
        .nodes
        .iter()
        .find(|n| n.node == "c")
        .unwrap()
        .key
        .clone();
    let key = probex_cache::Key::parse(&key).unwrap();
    assert!(b.store().remove(&key).unwrap());
    let text = b.plan_text(&file);
    let line = text.lines().find(|l| l.starts_with("c ")).unwrap();
    assert!(line.contains("cache entry missing"), "{text}");
}

#[test]
fn an_unchanged_second_run_executes_nothing_in_under_a_second() {
    let b = Bench::new();
    let file = b.write("x.toml", CHAIN);
    assert!(b.run(&file).success());
    let t = Instant::now();
    let again = b.run(&file);
    let elapsed = t.elapsed();
    assert!(again.success());
    assert!(b.trace.events().is_empty(), "{:?}", b.trace.nodes());
    assert!(ran(&again).is_empty());
    assert!(names(&again).iter().all(|n| state(&again, n) == "cached"));
    assert!(elapsed.as_secs_f64() < 1.0, "second run took {elapsed:?}");
    assert_eq!(b.plan(&file).to_run(), 0);
}

const PARALLEL: &str = r#"
[stage.p]
kind = "sleep"
ms = 300
value = 1

[stage.q]
kind = "sleep"
ms = 300
value = 2

[stage.r]
kind = "sleep"
ms = 300
value = 3

[stage.sum]
kind = "add"
from = ["p", "q", "r"]
"#;

#[test]
fn independent_nodes_run_at_the_same_time() {
    let b = Bench::new();
    let file = b.write("x.toml", PARALLEL);
    let t = Instant::now();
    let report = b.run_with(&file, 3, false);
    let wall = t.elapsed();
    assert!(report.success());
    let ev: Vec<_> = b
        .trace
        .events()
        .into_iter()
        .filter(|e| e.kind == "sleep")
        .collect();
    assert_eq!(ev.len(), 3);
    let last_start = ev.iter().map(|e| e.start).max().unwrap();
    let first_end = ev.iter().map(|e| e.end).min().unwrap();
    assert!(
        last_start < first_end,
        "the three sleeps did not overlap: {ev:?}"
    );
    // Below what one after another would take.
    assert!(
        wall.as_millis() < 900,
        "3 x 300 ms on 3 workers took {wall:?}"
    );
    // The reader starts only after all three ended.
    let sum = b
        .trace
        .events()
        .into_iter()
        .find(|e| e.node == "sum")
        .unwrap();
    assert!(ev.iter().all(|e| e.end <= sum.start));
    assert_eq!(result(&report, "sum")["value"], 6.0);
}

#[test]
fn one_worker_runs_nodes_one_after_another() {
    let b = Bench::new();
    let file = b.write("x.toml", &PARALLEL.replace("ms = 300", "ms = 60"));
    assert!(b.run_with(&file, 1, false).success());
    let mut ev: Vec<_> = b.trace.events();
    ev.sort_by_key(|e| e.start);
    for w in ev.windows(2) {
        assert!(
            w[0].end <= w[1].start,
            "{} and {} overlapped",
            w[0].node,
            w[1].node
        );
    }
}

const FAILING: &str = r#"
[stage.f]
kind = "fail"
message = "the kind said no"

[stage.g]
kind = "add"
from = "f"

[stage.h]
kind = "add"
from = "g"

[stage.x]
kind = "sleep"
ms = 300

[stage.y]
kind = "add"
from = "x"
"#;

#[test]
fn a_failure_stops_its_dependants_and_the_run() {
    let b = Bench::new();
    let file = b.write("x.toml", FAILING);
    let report = b.run_with(&file, 4, false);
    assert!(!report.success());
    assert!(!report.cancelled);
    assert_eq!(state(&report, "f"), "failed");
    assert_eq!(state(&report, "g"), "skipped");
    assert_eq!(state(&report, "h"), "skipped");
    // Without --keep-going nothing new starts after the failure, and the running sleep is
    // stopped: reported as not run, not as a second failure.
    assert_eq!(state(&report, "x"), "not_run");
    assert_eq!(state(&report, "y"), "not_run");
    assert_eq!(report.failures().count(), 1);
    let executed = b.trace.nodes();
    assert_eq!(executed, ["f"], "only the failing node finished");
    let f = report.failures().find(|n| n.node == "f").unwrap();
    let probex_engine::run::NodeState::Failed(msg) = &f.state else {
        unreachable!()
    };
    assert!(msg.contains("the kind said no"), "{msg}");
    let log = std::fs::read_to_string(f.log.as_ref().unwrap()).unwrap();
    assert!(
        log.contains("about to fail") && log.contains("the kind said no"),
        "{log}"
    );
    // The skipped node says which input failed.
    let g = report.nodes.iter().find(|n| n.node == "g").unwrap();
    assert_eq!(
        g.state,
        probex_engine::run::NodeState::Skipped("input f failed".into())
    );
}

/// `status.json` is written with the schema of `probex_engine::report` and reads back with it:
/// every node with its state (failed, skipped and not run too), and what the run returned.
#[test]
fn the_status_json_a_run_writes_reads_back_as_its_report() {
    let b = Bench::new();
    let file = b.write("x.toml", FAILING);
    let report = b.run_with(&file, 4, true);
    let back = probex_engine::report::RunReport::read(&report.run_dir).expect("status.json");
    let view = |r: &probex_engine::RunReport| {
        r.nodes
            .iter()
            .map(|n| {
                (
                    n.node.clone(),
                    n.key.clone(),
                    n.state.clone(),
                    n.log.clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(view(&back), view(&report));
    assert_eq!(back.cache, report.cache);
    assert_eq!(back.run_dir, report.run_dir);
    assert_eq!(back.success(), report.success());
    assert_eq!(back.failures().count(), 1);
    // A directory without a record says so rather than failing to parse.
    let e = probex_engine::report::RunReport::read(&b.path("nowhere")).unwrap_err();
    assert!(e.to_string().contains("not a run directory"), "{e}");
}

#[test]
fn keep_going_runs_independent_nodes_after_a_failure() {
    let b = Bench::new();
    let file = b.write("x.toml", FAILING);
    let report = b.run_with(&file, 4, true);
    assert!(!report.success());
    assert_eq!(state(&report, "f"), "failed");
    assert_eq!(state(&report, "g"), "skipped");
    assert_eq!(state(&report, "h"), "skipped");
    assert_eq!(state(&report, "x"), "ran");
    assert_eq!(state(&report, "y"), "ran");
    assert_eq!(b.trace.nodes(), ["f", "x", "y"]);
    // What succeeded is cached: the next run retries only the failure.
    let again = b.run_with(&file, 4, true);
    assert_eq!(b.trace.nodes(), ["f"]);
    assert_eq!(state(&again, "y"), "cached");
}

// ---------------------------------------------------------------------------------------------
// Fan-outs

const LAYERS: &str = r#"
[stage.s]
kind = "sweep"
layers = "0..4"
base = 10

[stage.d]
kind = "double"
from = "s"

[stage.g]
kind = "gather"
from = "d"
"#;

#[test]
fn a_kind_that_sweeps_itself_fans_out_element_wise_and_gathers() {
    let b = Bench::new();
    let file = b.write("x.toml", LAYERS);
    let report = b.run(&file);
    assert!(report.success(), "{:?}", report.nodes);
    assert_eq!(
        names(&report),
        [
            "s[layer=0]",
            "s[layer=1]",
            "s[layer=2]",
            "s[layer=3]",
            "d[layer=0]",
            "d[layer=1]",
            "d[layer=2]",
            "d[layer=3]",
            "g"
        ]
    );
    assert_eq!(result(&report, "s[layer=2]")["value"], 12.0);
    assert_eq!(result(&report, "d[layer=2]")["value"], 24.0);
    let g = result(&report, "g");
    assert_eq!(g["count"], 4);
    assert_eq!(g["value"], 2.0 * (10.0 + 11.0 + 12.0 + 13.0));
    assert_eq!(
        g["nodes"],
        serde_json::json!(["d[layer=0]", "d[layer=1]", "d[layer=2]", "d[layer=3]"])
    );

    // Widening the sweep computes only the new layer, and the gather again.
    b.write("x.toml", &LAYERS.replace("0..4", "0..5"));
    let text = b.plan_text(&file);
    assert!(
        text.contains("4 to run") || text.contains("3 to run"),
        "{text}"
    );
    let again = b.run(&file);
    assert_eq!(ran(&again), ["d[layer=4]", "g", "s[layer=4]"]);
    assert_eq!(result(&again, "g")["count"], 5);
}

#[test]
fn an_engine_sweep_over_a_list_fans_out_and_gathers() {
    let b = Bench::new();
    let file = b.write(
        "x.toml",
        r#"
[stage.c]
kind = "const"
value = 1
seed = [1, 2, 3]
for_each = "seed"

[stage.a]
kind = "add"
from = "c"
offset = 100

[stage.t]
kind = "gather"
from = "a"
"#,
    );
    let report = b.run(&file);
    assert!(report.success());
    assert_eq!(
        names(&report),
        [
            "c[seed=1]",
            "c[seed=2]",
            "c[seed=3]",
            "a[seed=1]",
            "a[seed=2]",
            "a[seed=3]",
            "t"
        ]
    );
    assert_eq!(result(&report, "c[seed=3]")["value"], 4.0);
    assert_eq!(result(&report, "a[seed=3]")["value"], 104.0);
    assert_eq!(result(&report, "t")["value"], 309.0);
    assert_eq!(result(&report, "t")["count"], 3);
}

#[test]
fn a_gather_with_for_each_groups_by_that_coordinate() {
    let b = Bench::new();
    let file = b.write(
        "x.toml",
        r#"
[stage.c]
kind = "const"
value = 0
seed = [1, 2]
for_each = "seed"

[stage.s]
kind = "sweep"
from = "c"
layers = "0..3"

[stage.per_seed]
kind = "gather"
from = "s"
for_each = "seed"
"#,
    );
    let report = b.run(&file);
    assert!(report.success(), "{:?}", report.nodes);
    assert!(
        names(&report).contains(&"s[seed=2,layer=1]".to_string()),
        "{:?}",
        names(&report)
    );
    assert_eq!(result(&report, "per_seed[seed=1]")["count"], 3);
    assert_eq!(result(&report, "per_seed[seed=2]")["count"], 3);
}

#[test]
fn a_sweep_that_needs_its_inputs_is_pending_until_they_exist() {
    let b = Bench::new();
    let file = b.write(
        "x.toml",
        r#"
[stage.n]
kind = "const"
value = 3

[stage.s]
kind = "sweep"
from = "n"
layers = "all"

[stage.g]
kind = "gather"
from = "s"
"#,
    );
    let view = b.plan(&file);
    assert_eq!(view.nodes.len(), 1);
    let pending: Vec<(&str, Vec<String>)> = view
        .pending
        .iter()
        .map(|p| (p.stage.as_str(), p.waits_for.clone()))
        .collect();
    assert_eq!(
        pending,
        [("s", vec!["n".to_string()]), ("g", vec!["s".to_string()])]
    );
    let text = b.plan_text(&file);
    assert!(text.contains("s[*]") && text.contains("pending"), "{text}");

    let report = b.run(&file);
    assert!(report.success(), "{:?}", report);
    assert_eq!(
        names(&report),
        ["n", "s[layer=0]", "s[layer=1]", "s[layer=2]", "g"]
    );
    assert_eq!(result(&report, "g")["count"], 3);
    let view = b.plan(&file);
    assert!(view.pending.is_empty());
    assert_eq!(view.to_run(), 0);
    assert_eq!(view.nodes.len(), 5);
}

#[test]
fn a_sweep_whose_inputs_exist_only_in_part_stays_pending_as_a_whole() {
    let b = Bench::new();
    let text = r#"
[stage.c]
kind = "const"
value = 2
seed = [0]
for_each = "seed"

[stage.s]
kind = "sweep"
from = "c"
layers = "all"
"#;
    let file = b.write("x.toml", text);
    let first = b.run(&file);
    assert_eq!(
        names(&first),
        ["c[seed=0]", "s[seed=0,layer=0]", "s[seed=0,layer=1]"]
    );
    // c[seed=0] exists, c[seed=1] does not: `s` is not half expanded.
    b.write("x.toml", &text.replace("seed = [0]", "seed = [0, 1]"));
    let view = b.plan(&file);
    let nodes: Vec<&str> = view.nodes.iter().map(|r| r.node.as_str()).collect();
    assert_eq!(nodes, ["c[seed=0]", "c[seed=1]"]);
    assert_eq!(view.pending.len(), 1);
    let second = b.run(&file);
    assert_eq!(
        b.trace.nodes(),
        [
            "c[seed=1]",
            "s[seed=1,layer=0]",
            "s[seed=1,layer=1]",
            "s[seed=1,layer=2]"
        ]
    );
    assert_eq!(state(&second, "s[seed=0,layer=1]"), "cached");
}

#[test]
fn cancelling_a_run_stops_running_nodes_without_failing_them() {
    let b = Bench::new();
    let file = b.write(
        "x.toml",
        "[stage.long]\nkind = \"sleep\"\nms = 5000\n\n[stage.after]\nkind = \"add\"\nfrom = \"long\"\n",
    );
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = cancel.clone();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(150));
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let t = Instant::now();
    let report = b.run_opts(
        &file,
        &probex_engine::RunOptions {
            jobs: 2,
            keep_going: false,
            threads: Some(1),
            progress: probex_engine::progress::ProgressMode::Quiet,
            cancel,
        },
    );
    stopper.join().unwrap();
    assert!(
        t.elapsed().as_secs_f64() < 2.0,
        "cancel took {:?}",
        t.elapsed()
    );
    assert!(
        report.cancelled,
        "a cancelled run is reported as interrupted"
    );
    assert!(!report.success());
    assert_eq!(report.failures().count(), 0);
    // Running when interrupted: not failed, not finished. Never started: not run.
    assert_eq!(state(&report, "long"), "interrupted");
    assert_eq!(state(&report, "after"), "not_run");
    let text = b.plan_text(&file);
    assert!(text.contains("2 to run"), "{text}");
}

#[test]
fn a_batching_kind_receives_ready_nodes_together() {
    let b = Bench::new();
    let file = b.write(
        "x.toml",
        r#"
[stage.batched]
kind = "bsweep"
layers = "0..3"

[stage.single]
kind = "sweep"
layers = "0..3"
"#,
    );
    assert!(b.run_with(&file, 1, false).success());
    let ev = b.trace.events();
    let batch = |kind: &str| -> Vec<usize> {
        ev.iter()
            .filter(|e| e.kind == kind)
            .map(|e| e.batch)
            .collect()
    };
    assert_eq!(batch("bsweep"), [3, 3, 3]);
    assert_eq!(batch("sweep"), [1, 1, 1]);
}

/// Per call of `gang`'s `run_gang`, the nodes it computed, sorted; and the nodes run alone.
fn gang_calls(ev: &[kinds::Event]) -> (Vec<Vec<String>>, Vec<String>) {
    let mut calls: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let mut alone = Vec::new();
    for e in ev.iter().filter(|e| e.kind == "gang") {
        match e.call {
            Some(c) => calls.entry(c).or_default().push(e.node.clone()),
            None => alone.push(e.node.clone()),
        }
    }
    let mut calls: Vec<Vec<String>> = calls
        .into_values()
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    calls.sort();
    alone.sort();
    (calls, alone)
}

#[test]
fn nodes_with_equal_gang_keys_run_in_one_call_and_keep_their_own_entries() {
    let b = Bench::new();
    let file = b.write(
        "g.toml",
        r#"
[stage.s]
kind = "bsweep"
layers = "0..5"
base = 10

[stage.g]
kind = "gang"
from = "s"
groups = 2
"#,
    );
    let report = b.run_with(&file, 1, false);
    assert!(report.success());
    let (calls, alone) = gang_calls(&b.trace.events());
    // Even layers share key 0, odd ones key 1: two calls, whatever the worker count.
    let g = |l: &[u32]| -> Vec<String> { l.iter().map(|i| format!("g[layer={i}]")).collect() };
    assert_eq!(calls, vec![g(&[0, 2, 4]), g(&[1, 3])]);
    assert!(alone.is_empty(), "{alone:?}");
    // Each node has its own key, its own entry and its own result: 3 x (10 + layer).
    let keys = keys(&b, &file);
    let store = b.store();
    for l in 0..5 {
        let name = format!("g[layer={l}]");
        assert_eq!(result(&report, &name)["value"], 3.0 * (10.0 + f64::from(l)));
        let key = probex_cache::Key::parse(&keys[&name]).expect("key");
        assert!(store.get(&key).unwrap().is_some(), "{name} has no entry");
    }
    let distinct: std::collections::BTreeSet<&String> = keys
        .iter()
        .filter(|(n, _)| n.starts_with("g["))
        .map(|(_, k)| k)
        .collect();
    assert_eq!(distinct.len(), 5);
    // Ganging is how nodes run, not what they are: every member is cached on the next run.
    let again = b.run_with(&file, 1, false);
    assert!(again.success());
    assert!(ran(&again).is_empty(), "{:?}", ran(&again));
}

#[test]
fn a_gang_larger_than_its_limit_is_split() {
    let b = Bench::new();
    let file = b.write(
        "g.toml",
        r#"
[stage.s]
kind = "bsweep"
layers = "0..5"

[stage.g]
kind = "gang"
from = "s"
groups = 1
limit = 2
"#,
    );
    assert!(b.run_with(&file, 4, false).success());
    let (calls, alone) = gang_calls(&b.trace.events());
    let mut sizes: Vec<usize> = calls.iter().map(Vec::len).collect();
    sizes.sort();
    assert_eq!(sizes, [2, 2]);
    // The fifth member is a gang of one, which the kind runs alone (`run`).
    assert_eq!(alone.len(), 1, "{alone:?}");
    let mut all: Vec<String> = calls.concat();
    all.extend(alone);
    all.sort();
    assert_eq!(all.len(), 5);
    all.dedup();
    assert_eq!(all.len(), 5, "a member ran twice: {all:?}");
}

// ---------------------------------------------------------------------------------------------
// include / extend

#[test]
fn an_including_file_overrides_one_key_of_one_stage() {
    let b = Bench::new();
    let base = b.write(
        "base.toml",
        r#"
[experiment]
name = "base"

[stage.a]
kind = "const"
value = 1.0
scale = 3.0

[stage.b]
kind = "add"
from = "a"
offset = 10
"#,
    );
    let derived = b.write(
        "sub/derived.toml",
        r#"
[experiment]
name = "derived"
include = "../base.toml"

[stage.a]
value = 2.0

[stage.c]
kind = "add"
from = "b"
"#,
    );
    let exp = b.load(&derived);
    assert_eq!(exp.name, "derived");
    let stages: Vec<&str> = exp.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(stages, ["a", "b", "c"]);
    let a = &exp.stages[0].variants[0].params;
    assert_eq!(a.canonical()["value"], 2.0);
    assert_eq!(a.canonical()["scale"], 3.0, "keys not overridden are kept");

    let report = b.run(&derived);
    assert!(report.success());
    assert_eq!(result(&report, "c")["value"], 16.0);
    let kb = keys(&b, &base);
    let kd = keys(&b, &derived);
    assert_ne!(kb["a"], kd["a"]);
    // The base alone still plans with its own value.
    assert_eq!(b.load(&base).stages.len(), 2);
}

#[test]
fn include_loops_are_reported_with_the_loop() {
    let b = Bench::new();
    b.write("one.toml", "[experiment]\ninclude = \"two.toml\"\n");
    b.write("two.toml", "[experiment]\ninclude = [\"three.toml\"]\n");
    b.write("three.toml", "[experiment]\ninclude = \"one.toml\"\n");
    let err = b.load_err(&b.path("one.toml"));
    assert!(
        err.contains("include loop: one.toml -> two.toml -> three.toml -> one.toml"),
        "{err}"
    );
    assert!(err.contains("three.toml:2:11"), "{err}");
    let own = b.write("self.toml", "[experiment]\ninclude = \"self.toml\"\n");
    let err = b.load_err(&own);
    assert!(
        err.contains("include loop: self.toml -> self.toml"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Expectations

const EXPECTING: &str = r#"
[stage.a]
kind = "const"
value = 2.0

[stage.s]
kind = "sweep"
layers = "0..3"
base = 1
expect = { value = ">= 1" }

[stage.b]
kind = "add"
from = "a"
offset = 0.5
expect = { value = "2.5 +- 0.01" }

[expect]
"b.value" = "> a.value"
"a.value" = "2.0 +- 0.1"
"#;

#[test]
fn expectations_pass_and_are_reported() {
    let b = Bench::new();
    let file = b.write("x.toml", EXPECTING);
    let report = b.run(&file);
    assert!(report.success(), "{:?}", report.expectations);
    // One check per node of the swept stage.
    assert_eq!(report.expectations.len(), 3 + 1 + 2);
    assert!(report.expectations.iter().all(|c| c.pass));
    let md = std::fs::read_to_string(report.run_dir.join("report.md")).unwrap();
    assert!(md.contains("Outcome: **success**"), "{md}");
    assert!(md.contains("`b.value`"), "{md}");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(report.run_dir.join("results.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json["success"], true);
    assert_eq!(json["results"]["b"]["value"], 2.5);
}

#[test]
fn missed_expectations_fail_the_run() {
    let b = Bench::new();
    let file = b.write(
        "x.toml",
        &EXPECTING
            .replace("2.5 +- 0.01", "3.0 +- 0.1")
            .replace("\">= 1\"", "\">= 2\""),
    );
    let report = b.run(&file);
    assert!(!report.success());
    let missed: Vec<&str> = report
        .expectations
        .iter()
        .filter(|c| !c.pass)
        .map(|c| c.path.as_str())
        .collect();
    assert_eq!(missed, ["s[layer=0].value", "b.value"]);
    let md = std::fs::read_to_string(report.run_dir.join("report.md")).unwrap();
    assert!(md.contains("**MISSED**") && md.contains("FAILED"), "{md}");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(report.run_dir.join("results.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json["success"], false);
}
