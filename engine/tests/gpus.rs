//! Several GPUs: nodes on plain `cuda` spread over the run's GPUs, one node per GPU at a time.
//! No GPU is needed: the device list is given (as `--devices` or `PROBEX_DEVICES` give it) and
//! the `sleep` test kind occupies a GPU slot as `train` does, recording the device its context
//! named.

mod kinds;
mod support;
mod testkit;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use probex_engine::digest::FileDigests;
use probex_engine::gpus::Gpus;
use probex_engine::progress::ProgressMode;
use probex_engine::record::RunDir;
use probex_engine::{Overrides, PlanContext, Planner, RunOptions, RunReport};
use support::{Bench, ran, state};
use testkit::{Kit, stderr};

/// Four GPU nodes and one CPU node, all independent.
const FOUR_ON_GPUS: &str = r#"
[stage.g0]
kind = "sleep"
ms = 250
value = 0
device = "cuda"

[stage.g1]
kind = "sleep"
ms = 250
value = 1
device = "cuda"

[stage.g2]
kind = "sleep"
ms = 250
value = 2
device = "cuda"

[stage.g3]
kind = "sleep"
ms = 250
value = 3
device = "cuda"

[stage.c]
kind = "sleep"
ms = 250
value = 4
"#;

const GPU_NODES: [&str; 4] = ["g0", "g1", "g2", "g3"];

/// Runs `file` with `jobs` workers over the GPUs `list` names (as `--devices LIST`).
fn run_on(b: &Bench, file: &Path, list: &str, jobs: usize, out: &str) -> RunReport {
    b.trace.clear();
    let exp = b.load(file);
    let store = b.store();
    let digests = FileDigests::in_memory();
    let cx = PlanContext {
        base_dir: &exp.base_dir,
        digests: &digests,
        offline: true,
    };
    let overrides = Overrides {
        gpus: Gpus::new(Some(list), None, None).unwrap(),
        ..Overrides::default()
    };
    let planner = Planner::new(&exp, &store, cx, overrides);
    let run_dir = RunDir::create(&exp, Some(&b.path(out))).unwrap();
    let opts = RunOptions {
        jobs,
        threads: Some(1),
        progress: ProgressMode::Quiet,
        ..RunOptions::default()
    };
    probex_engine::run(&planner, &run_dir, &opts).unwrap()
}

/// The most intervals (start, end) open at one moment.
fn most_at_once(spans: &[(std::time::Instant, std::time::Instant)]) -> usize {
    spans
        .iter()
        .map(|&(s, _)| spans.iter().filter(|&&(a, z)| a <= s && s < z).count())
        .max()
        .unwrap_or(0)
}

#[test]
fn concurrent_gpu_nodes_get_distinct_gpus_and_the_record_says_which() {
    let b = Bench::new();
    let file = b.write("x.toml", FOUR_ON_GPUS);
    let report = run_on(&b, &file, "cuda:0,cuda:1", 5, "run1");
    assert!(report.success());
    let events = b.trace.events();
    assert_eq!(events.len(), 5);
    let gpu: Vec<_> = events.iter().filter(|e| e.node != "c").collect();
    // Every GPU node ran on a listed GPU, and the two GPUs both worked.
    let used: BTreeSet<&str> = gpu.iter().filter_map(|e| e.device.as_deref()).collect();
    assert_eq!(used, BTreeSet::from(["cuda:0", "cuda:1"]), "{gpu:?}");
    assert!(gpu.iter().all(|e| e.device.is_some()), "{gpu:?}");
    // Nodes that overlapped in time never shared a GPU ...
    for (i, x) in gpu.iter().enumerate() {
        for y in &gpu[i + 1..] {
            if x.start < y.end && y.start < x.end {
                assert_ne!(x.device, y.device, "{} and {} overlapped", x.node, y.node);
            }
        }
    }
    // ... and two GPUs ran two nodes at once, never more, though five workers were free.
    let spans: Vec<_> = gpu.iter().map(|e| (e.start, e.end)).collect();
    assert_eq!(most_at_once(&spans), 2, "{gpu:?}");
    // A CPU node is no GPU node: it gets no device and runs beside them.
    let c = events.iter().find(|e| e.node == "c").unwrap();
    assert_eq!(c.device, None);
    assert!(gpu.iter().any(|e| e.start < c.end && c.start < e.end));

    // status.json and each node's log say which GPU it ran on.
    for e in &gpu {
        let node = report.nodes.iter().find(|n| n.node == e.node).unwrap();
        assert_eq!(node.device, e.device, "{}", e.node);
        let log = fs::read_to_string(node.log.as_ref().unwrap()).unwrap();
        let dev = e.device.as_deref().unwrap();
        assert!(log.contains(&format!("device {dev}\n")), "{log}");
    }
    let status: serde_json::Value =
        serde_json::from_slice(&fs::read(b.path("run1/status.json")).unwrap()).unwrap();
    let devices: Vec<_> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["node"].as_str().unwrap(), n.get("device").cloned()))
        .collect();
    assert!(
        devices.iter().all(|(n, d)| (*n == "c") == d.is_none()),
        "{devices:?}"
    );
}

#[test]
fn one_gpu_runs_its_nodes_one_after_another() {
    let b = Bench::new();
    let file = b.write("x.toml", FOUR_ON_GPUS);
    assert!(run_on(&b, &file, "1", 4, "run").success());
    let gpu: Vec<_> = b
        .trace
        .events()
        .into_iter()
        .filter(|e| e.node != "c")
        .collect();
    assert!(gpu.iter().all(|e| e.device.as_deref() == Some("cuda:1")));
    let spans: Vec<_> = gpu.iter().map(|e| (e.start, e.end)).collect();
    assert_eq!(most_at_once(&spans), 1, "{gpu:?}");
}

#[test]
fn which_gpu_ran_a_node_is_not_part_of_its_key() {
    let b = Bench::new();
    let file = b.write("x.toml", FOUR_ON_GPUS);
    let first = run_on(&b, &file, "0,1", 4, "run1");
    assert_eq!(ran(&first).len(), 5);
    let keys: Vec<_> = first.nodes.iter().map(|n| n.key.clone()).collect();
    // Other GPUs, other counts: the same keys, everything cached, nothing on a GPU.
    let again = run_on(&b, &file, "cuda:3,cuda:4,cuda:5", 4, "run2");
    assert!(ran(&again).is_empty(), "{:?}", ran(&again));
    for n in GPU_NODES {
        assert_eq!(state(&again, n), "cached");
    }
    let keys_again: Vec<_> = again.nodes.iter().map(|n| n.key.clone()).collect();
    assert_eq!(keys, keys_again);
    assert!(again.nodes.iter().all(|n| n.device.is_none()));
}

#[test]
fn a_pinned_node_keeps_its_gpu_and_plain_cuda_nodes_take_the_others() {
    let b = Bench::new();
    let text = FOUR_ON_GPUS.replacen("device = \"cuda\"", "device = \"cuda:0\"", 1);
    let file = b.write("x.toml", &text);
    assert!(run_on(&b, &file, "0,1,2", 4, "run").success());
    let events = b.trace.events();
    let g0 = events.iter().find(|e| e.node == "g0").unwrap();
    assert_eq!(g0.device.as_deref(), Some("cuda:0"));
    // The three others ran at the same time as g0, so on cuda:1 and cuda:2.
    let others: Vec<_> = events
        .iter()
        .filter(|e| e.node != "g0" && e.node != "c")
        .collect();
    for e in &others {
        if e.start < g0.end && g0.start < e.end {
            assert_ne!(e.device.as_deref(), Some("cuda:0"), "{e:?}");
        }
    }
    let spans: Vec<_> = events
        .iter()
        .filter(|e| e.node != "c")
        .map(|e| (e.start, e.end))
        .collect();
    assert_eq!(most_at_once(&spans), 3, "{events:?}");
}

#[test]
fn the_cli_takes_the_gpus_from_the_flag_over_probex_devices_and_rejects_bad_lists() {
    let k = Kit::new();
    k.write("x.toml", FOUR_ON_GPUS);
    // A second directory and cache, so that the nodes run again there.
    let k2 = Kit::new();
    k2.write("x.toml", FOUR_ON_GPUS);
    let run_in = |k: &Kit, args: &[&str], env: Option<&str>| {
        let mut c = k.cmd(args);
        c.env_remove("CUDA_VISIBLE_DEVICES");
        match env {
            Some(v) => c.env("PROBEX_DEVICES", v),
            None => c.env_remove("PROBEX_DEVICES"),
        };
        c.output().unwrap()
    };
    let run = |args: &[&str], env: Option<&str>| run_in(&k, args, env);
    let out = run(
        &[
            "run",
            "x.toml",
            "-j",
            "4",
            "--out",
            "r1",
            "--progress",
            "plain",
        ],
        Some("cuda:2, 3"),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("GPUs for `cuda` nodes: cuda:2, cuda:3 (from PROBEX_DEVICES)"),
        "{}",
        stderr(&out)
    );
    let status: serde_json::Value =
        serde_json::from_slice(&fs::read(k.path("r1/status.json")).unwrap()).unwrap();
    let used: BTreeSet<&str> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["device"].as_str())
        .collect();
    assert_eq!(used, BTreeSet::from(["cuda:2", "cuda:3"]), "{status}");

    // The flag wins over the variable.
    let out = run_in(
        &k2,
        &[
            "run",
            "x.toml",
            "-j",
            "4",
            "--devices",
            "5",
            "--out",
            "r2",
            "--progress",
            "plain",
        ],
        Some("0,1"),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("GPUs for `cuda` nodes: cuda:5 (from --devices)"),
        "{}",
        stderr(&out)
    );

    // A list that names no GPU is a usage error that says where it came from.
    let out = run(&["run", "x.toml"], Some("gpu0"));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("PROBEX_DEVICES=gpu0: `gpu0` is not a GPU"),
        "{}",
        stderr(&out)
    );
    let out = run(&["plan", "x.toml", "--devices", "cpu"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--devices cpu: `cpu` is not a GPU"),
        "{}",
        stderr(&out)
    );
}
