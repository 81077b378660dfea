//! Helpers for in-process engine tests: a private directory and cache per test, the test
//! kinds, and shortcuts to load, plan and run experiment files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use probex_cache::Store;
use probex_engine::digest::FileDigests;
use probex_engine::history::History;
use probex_engine::progress::ProgressMode;
use probex_engine::record::RunDir;
use probex_engine::status::{PlanView, render_plan, rows};
use probex_engine::{Experiment, Overrides, PlanContext, Planner, Registry, RunOptions, RunReport};

use crate::kinds::{Trace, registry};

/// One test's world: a temporary directory for experiment files, runs and the cache.
pub struct Bench {
    pub dir: tempfile::TempDir,
    pub trace: Trace,
    pub registry: Registry,
    runs: std::cell::Cell<usize>,
}

impl Bench {
    pub fn new() -> Self {
        let trace = Trace::new();
        Bench {
            dir: tempfile::tempdir().expect("temp dir"),
            registry: registry(&trace),
            trace,
            runs: std::cell::Cell::new(0),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.path("cache")
    }

    pub fn store(&self) -> Store {
        Store::open(self.cache_dir()).expect("open store")
    }

    /// Writes an experiment file and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&p, text).expect("write experiment");
        p
    }

    /// Loads an experiment that must be valid.
    pub fn load(&self, file: &Path) -> Experiment {
        match probex_engine::load(file, &self.registry) {
            Ok(e) => e,
            Err(d) => panic!("{} should load, got:\n{d}", file.display()),
        }
    }

    /// The error text of an experiment that must not load.
    pub fn load_err(&self, file: &Path) -> String {
        match probex_engine::load(file, &self.registry) {
            Ok(_) => panic!("{} should not load", file.display()),
            Err(d) => d.to_string(),
        }
    }

    /// The plan view (`probex plan`) of a valid experiment.
    pub fn plan(&self, file: &Path) -> PlanView {
        let exp = self.load(file);
        let store = self.store();
        let digests = FileDigests::in_memory();
        let planner = Planner::new(&exp, &store, self.cx(&exp, &digests), Overrides::default());
        let plan = match planner.plan() {
            Ok(p) => p,
            Err(d) => panic!("{} should plan, got:\n{d}", file.display()),
        };
        let history = History::open(&store, &exp.path);
        rows(&plan, &exp, &store, &history)
    }

    /// The text `probex plan` prints.
    pub fn plan_text(&self, file: &Path) -> String {
        render_plan(&self.plan(file))
    }

    /// The planning error of an experiment that loads but must not plan.
    pub fn plan_err(&self, file: &Path) -> String {
        let exp = self.load(file);
        let store = self.store();
        let digests = FileDigests::in_memory();
        let planner = Planner::new(&exp, &store, self.cx(&exp, &digests), Overrides::default());
        match planner.plan() {
            Ok(_) => panic!("{} should not plan", file.display()),
            Err(d) => d.to_string(),
        }
    }

    fn cx<'a>(&self, exp: &'a Experiment, digests: &'a FileDigests) -> PlanContext<'a> {
        PlanContext {
            base_dir: &exp.base_dir,
            digests,
            offline: true,
        }
    }

    /// Runs with `jobs` workers; the trace is cleared first so it shows this run only.
    pub fn run_with(&self, file: &Path, jobs: usize, keep_going: bool) -> RunReport {
        self.run_opts(
            file,
            &RunOptions {
                jobs,
                keep_going,
                threads: Some(1),
                progress: ProgressMode::Quiet,
                cancel: Arc::new(AtomicBool::new(false)),
            },
        )
    }

    /// Runs with the given options; the trace is cleared first so it shows this run only.
    pub fn run_opts(&self, file: &Path, opts: &RunOptions) -> RunReport {
        self.trace.clear();
        let exp = self.load(file);
        let store = self.store();
        let digests = FileDigests::in_memory();
        let planner = Planner::new(&exp, &store, self.cx(&exp, &digests), Overrides::default());
        let n = self.runs.get() + 1;
        self.runs.set(n);
        let out = self.path(&format!("runs/{n}"));
        let run_dir = RunDir::create(&exp, Some(&out)).expect("run dir");
        match probex_engine::run(&planner, &run_dir, opts) {
            Ok(r) => r,
            Err(d) => panic!("{} should run, got:\n{d}", file.display()),
        }
    }

    pub fn run(&self, file: &Path) -> RunReport {
        self.run_with(file, 4, false)
    }
}

/// The state of node `name` in a report (`cached`, `ran`, `failed`, `skipped`, `not_run`).
pub fn state(report: &RunReport, name: &str) -> String {
    let n = report
        .nodes
        .iter()
        .find(|n| n.node == name)
        .unwrap_or_else(|| panic!("no node {name} in {:?}", names(report)));
    serde_json::to_value(&n.state).expect("state json")["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Node names of a report, in plan order.
pub fn names(report: &RunReport) -> Vec<String> {
    report.nodes.iter().map(|n| n.node.clone()).collect()
}

/// Nodes of a report that were computed in that run, sorted.
pub fn ran(report: &RunReport) -> Vec<String> {
    let mut v: Vec<String> = report
        .nodes
        .iter()
        .filter(|n| state(report, &n.node) == "ran")
        .map(|n| n.node.clone())
        .collect();
    v.sort();
    v
}

/// The `results` a node stored, from the run's `results.json`.
pub fn result(report: &RunReport, node: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(report.run_dir.join("results.json")).expect("results.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("results json");
    v["results"][node].clone()
}
