//! Running a plan: ready nodes on a bounded pool of threads, GPU nodes one at a time per
//! device, each computed under its key's lock into a staging directory and committed
//! atomically. Planning again after each finished node expands fan-outs that waited for it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use probex_cache::{Entry, EntryInfo, Key, KeyLock, Store};
use serde::Serialize;

use crate::diagnostic::Diagnostics;
use crate::expect::{self, Checked, ResultsByStage};
use crate::history::History;
use crate::plan::{Node, Plan, Planner, StoredOutcome, artifact};
use crate::progress::{ProgressMode, Reporter};
use crate::record::{RunDir, files};
use crate::stage::{Cancelled, Inputs, Outcome, Resource, RunContext, StageResult};

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Nodes running at once.
    pub jobs: usize,
    /// Keep running independent nodes after a failure.
    pub keep_going: bool,
    /// Threads per node when the stage does not say (`threads = ...`).
    pub threads: Option<usize>,
    /// How progress is shown.
    pub progress: ProgressMode,
    /// Set to stop: running nodes see it through their context, nothing new starts.
    pub cancel: Arc<AtomicBool>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
            keep_going: false,
            threads: None,
            progress: ProgressMode::Auto,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// How one node ended.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "state", content = "detail", rename_all = "snake_case")]
pub enum NodeState {
    /// Found in the cache.
    Cached,
    /// Computed in this run.
    Ran,
    /// Failed, with the error.
    Failed(String),
    /// Not run because an upstream node failed.
    Skipped(String),
    /// Not run because the run stopped first.
    NotRun,
}

/// One node of a finished run.
#[derive(Clone, Debug, Serialize)]
pub struct NodeReport {
    /// Node name.
    pub node: String,
    /// Declared stage.
    pub stage: String,
    /// Stage kind.
    pub kind: String,
    /// Key.
    pub key: String,
    /// How it ended.
    #[serde(flatten)]
    pub state: NodeState,
    /// Seconds spent computing it in this run (0 when cached).
    pub seconds: f64,
    /// Its log, if it ran.
    pub log: Option<PathBuf>,
}

/// The outcome of a run.
#[derive(Debug, Serialize)]
pub struct RunReport {
    /// The run directory.
    pub run_dir: PathBuf,
    /// The cache the run read and wrote, so a run record names where its artifacts are
    /// (`probex search`, `describe` and `report` follow it from a run directory).
    pub cache: PathBuf,
    /// Every node, in plan order.
    pub nodes: Vec<NodeReport>,
    /// Stages that never expanded (their inputs failed).
    pub never_planned: Vec<String>,
    /// Expectations checked.
    pub expectations: Vec<Checked>,
    /// Summaries of reporting nodes: (node, text).
    pub summaries: Vec<(String, String)>,
    /// Whether the user stopped the run.
    pub cancelled: bool,
    /// Wall time in seconds.
    pub seconds: f64,
}

impl RunReport {
    /// True when every node finished and every expectation held.
    pub fn success(&self) -> bool {
        !self.cancelled
            && self.never_planned.is_empty()
            && self
                .nodes
                .iter()
                .all(|n| matches!(n.state, NodeState::Cached | NodeState::Ran))
            && self.expectations.iter().all(|c| c.pass)
    }

    /// Nodes that failed.
    pub fn failures(&self) -> impl Iterator<Item = &NodeReport> {
        self.nodes
            .iter()
            .filter(|n| matches!(n.state, NodeState::Failed(_)))
    }
}

/// A node's result coming back from a worker.
struct Done {
    key: Key,
    result: Result<Entry, String>,
    seconds: f64,
    /// False when another process committed the key while this one waited for its lock.
    computed: bool,
    /// The stage gave up because the run was cancelled: not a failure of the node.
    stopped: bool,
}

/// Runs the experiment behind `planner`, writing the run record into `run_dir`.
pub fn run(
    planner: &Planner,
    run_dir: &RunDir,
    opts: &RunOptions,
) -> Result<RunReport, Diagnostics> {
    let exp = planner.experiment();
    let store = planner.store();
    let history = History::open(store, &exp.path);
    let started = Instant::now();
    let first = planner.plan()?;
    let _ = run_dir.write_json(
        files::PLAN,
        &crate::status::rows(&first, exp, store, &history),
    );
    let reporter = Reporter::new(opts.progress, first.nodes.len() as u64);

    let jobs = opts.jobs.max(1);
    let threads_default = opts.threads.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / jobs).max(1)
    });
    let gpu_locks: Mutex<HashMap<String, Arc<Mutex<()>>>> = Mutex::new(HashMap::new());

    let mut states: HashMap<Key, (NodeState, f64)> = HashMap::new();
    let mut running: HashSet<Key> = HashSet::new();
    let mut stop = false;
    let mut plan = first;
    let (tx, rx) = mpsc::channel::<Vec<Done>>();

    std::thread::scope(|scope| -> Result<(), Diagnostics> {
        loop {
            reporter.set_total(plan.nodes.len() as u64);
            // Settle cached nodes and nodes whose inputs failed.
            for node in &plan.nodes {
                if states.contains_key(&node.key) || running.contains(&node.key) {
                    continue;
                }
                if let Some(bad) = failed_input(&plan, node, &states) {
                    states.insert(
                        node.key.clone(),
                        (NodeState::Skipped(format!("input {bad} failed")), 0.0),
                    );
                    continue;
                }
                if matches!(store.get(&node.key), Ok(Some(_))) {
                    history.record(node);
                    reporter.finished(&node.name, "cached", 0.0);
                    states.insert(node.key.clone(), (NodeState::Cached, 0.0));
                }
            }
            if opts.cancel.load(Ordering::Relaxed) {
                stop = true;
            }
            if !stop {
                let ready: Vec<&Node> = plan
                    .nodes
                    .iter()
                    .filter(|n| !states.contains_key(&n.key) && !running.contains(&n.key))
                    .filter(|n| {
                        n.inputs
                            .iter()
                            .flat_map(|(_, ids)| ids)
                            .all(|&u| is_done(&states, &plan.nodes[u].key))
                    })
                    .collect();
                for batch in batches(exp, ready) {
                    if running.len() >= jobs {
                        break;
                    }
                    for n in &batch {
                        running.insert(n.key.clone());
                        reporter.started(&n.name);
                    }
                    let inputs = inputs_of(&plan, batch[0], store);
                    let batch: Vec<Node> = batch.into_iter().cloned().collect();
                    let gpu = match &batch[0].resource {
                        Resource::Gpu(dev) => gpu_locks
                            .lock()
                            .ok()
                            .map(|mut m| m.entry(dev.clone()).or_default().clone()),
                        Resource::Cpu => None,
                    };
                    let tx = tx.clone();
                    let ctx = Worker {
                        planner,
                        run_dir,
                        reporter: &reporter,
                        cancel: &opts.cancel,
                        threads: threads_default,
                    };
                    scope.spawn(move || {
                        let _guard = gpu.as_ref().map(|m| m.lock());
                        let done = ctx.execute(&batch, inputs);
                        let _ = tx.send(done);
                    });
                }
            }
            if running.is_empty() {
                break;
            }
            // Wait for at least one batch, then take whatever else has finished.
            let mut finished = match rx.recv() {
                Ok(d) => d,
                Err(_) => break,
            };
            while let Ok(more) = rx.try_recv() {
                finished.extend(more);
            }
            for d in finished {
                running.remove(&d.key);
                let node = plan.nodes.iter().find(|n| n.key == d.key);
                let name = node.map_or_else(|| d.key.to_string(), |n| n.name.clone());
                match d.result {
                    Ok(_) => {
                        if let Some(n) = node {
                            history.record(n);
                        }
                        if d.computed {
                            reporter.finished(&name, "done", d.seconds);
                            states.insert(d.key, (NodeState::Ran, d.seconds));
                        } else {
                            reporter.finished(&name, "cached", 0.0);
                            states.insert(d.key, (NodeState::Cached, 0.0));
                        }
                    }
                    Err(_) if d.stopped => {
                        reporter.finished(&name, "stopped", d.seconds);
                        states.insert(d.key, (NodeState::NotRun, d.seconds));
                    }
                    Err(e) => {
                        reporter.finished(&name, "FAILED", d.seconds);
                        reporter.println(&format!("error in {name}: {e}"));
                        if !opts.keep_going {
                            stop = true;
                            opts.cancel.store(true, Ordering::Relaxed);
                        }
                        states.insert(d.key, (NodeState::Failed(e), d.seconds));
                    }
                }
            }
            plan = planner.plan()?;
        }
        Ok(())
    })?;
    reporter.finish();

    let cancelled = opts.cancel.load(Ordering::Relaxed)
        && !states
            .values()
            .any(|(s, _)| matches!(s, NodeState::Failed(_)));
    finish(
        planner,
        run_dir,
        &plan,
        &states,
        cancelled,
        started.elapsed().as_secs_f64(),
    )
}

/// The first failed or skipped input of `node`, if any.
fn failed_input(
    plan: &Plan,
    node: &Node,
    states: &HashMap<Key, (NodeState, f64)>,
) -> Option<String> {
    node.inputs.iter().flat_map(|(_, ids)| ids).find_map(|&u| {
        let up = &plan.nodes[u];
        match states.get(&up.key) {
            Some((NodeState::Failed(_) | NodeState::Skipped(_), _)) => Some(up.name.clone()),
            _ => None,
        }
    })
}

fn is_done(states: &HashMap<Key, (NodeState, f64)>, key: &Key) -> bool {
    matches!(
        states.get(key),
        Some((NodeState::Cached | NodeState::Ran, _))
    )
}

/// Groups ready nodes: nodes of a batching stage with identical inputs go together.
fn batches<'n>(exp: &crate::experiment::Experiment, ready: Vec<&'n Node>) -> Vec<Vec<&'n Node>> {
    let mut out: Vec<Vec<&Node>> = Vec::new();
    let mut index: BTreeMap<(usize, String), usize> = BTreeMap::new();
    for n in ready {
        if exp.stages[n.stage].stage.batches() {
            let inputs = format!("{:?}", n.material.inputs);
            match index.get(&(n.stage, inputs.clone())) {
                Some(&i) => out[i].push(n),
                None => {
                    index.insert((n.stage, inputs), out.len());
                    out.push(vec![n]);
                }
            }
        } else {
            out.push(vec![n]);
        }
    }
    out
}

fn inputs_of(plan: &Plan, node: &Node, store: &Store) -> Inputs {
    Inputs::new(node.inputs.iter().map(|(ty, ids)| {
        let arts = ids
            .iter()
            .filter_map(|&u| {
                let up = &plan.nodes[u];
                store.get(&up.key).ok().flatten().map(|e| artifact(up, &e))
            })
            .collect();
        (*ty, arts)
    }))
}

/// What a worker thread needs to compute a batch.
struct Worker<'a> {
    planner: &'a Planner<'a>,
    run_dir: &'a RunDir,
    reporter: &'a Reporter,
    cancel: &'a AtomicBool,
    threads: usize,
}

impl Worker<'_> {
    /// Computes a batch of nodes under their locks; nodes another process committed meanwhile
    /// are taken from the cache.
    fn execute(&self, batch: &[Node], inputs: Inputs) -> Vec<Done> {
        let store = self.planner.store();
        let exp = self.planner.experiment();
        let started = Instant::now();
        let fail = |n: &Node, e: String| Done {
            key: n.key.clone(),
            result: Err(e),
            seconds: started.elapsed().as_secs_f64(),
            computed: false,
            stopped: false,
        };

        // Locks in key order, so two processes batching overlapping sets cannot deadlock.
        let mut order: Vec<&Node> = batch.iter().collect();
        order.sort_by(|a, b| a.key.cmp(&b.key));
        let mut out = Vec::new();
        let mut todo: Vec<(&Node, KeyLock)> = Vec::new();
        for n in order {
            match store.lock(&n.key) {
                Err(e) => out.push(fail(n, format!("cannot lock cache entry: {e}"))),
                Ok(lock) => match store.get(&n.key) {
                    Ok(Some(entry)) => out.push(Done {
                        key: n.key.clone(),
                        result: Ok(entry),
                        seconds: 0.0,
                        computed: false,
                        stopped: false,
                    }),
                    _ => todo.push((n, lock)),
                },
            }
        }
        if todo.is_empty() {
            return out;
        }
        // Every input must still be there (a concurrent `cache gc` could have removed one).
        let expected: usize = batch[0].inputs.iter().map(|(_, ids)| ids.len()).sum();
        let present: usize = batch[0]
            .inputs
            .iter()
            .map(|(ty, _)| inputs.all(ty).len())
            .sum();
        if present != expected {
            out.extend(
                todo.iter()
                    .map(|(n, _)| fail(n, "an input vanished from the cache; run again".into())),
            );
            return out;
        }

        let mut prepared = Vec::new();
        for (n, lock) in &todo {
            let decl = &exp.stages[n.stage];
            let staging = match store.stage(lock) {
                Ok(s) => s,
                Err(e) => {
                    out.push(fail(n, format!("cannot create staging directory: {e}")));
                    continue;
                }
            };
            let work = match store.work_dir(lock) {
                Ok(w) => w,
                Err(e) => {
                    out.push(fail(n, format!("cannot create work directory: {e}")));
                    continue;
                }
            };
            let log = File::create(self.run_dir.log_path(&n.name)).ok();
            let cx = RunContext::new(
                n.name.clone(),
                staging.dir().to_path_buf(),
                work,
                exp.base_dir.clone(),
                n.device.clone(),
                decl.threads.unwrap_or(self.threads),
                self.planner.context().offline,
                log,
                self.reporter,
                self.cancel,
            );
            cx.log(format!("key {}", n.key));
            prepared.push((*n, staging, cx));
        }
        if prepared.is_empty() {
            return out;
        }
        let decl = &exp.stages[prepared[0].0.stage];
        let jobs: Vec<(&crate::stage::ParamBox, &RunContext)> =
            prepared.iter().map(|(n, _, cx)| (&n.params, cx)).collect();
        let results = run_guarded(|| decl.stage.run_batch(&jobs, &inputs), jobs.len());
        let seconds = started.elapsed().as_secs_f64() / prepared.len() as f64;
        for ((n, staging, cx), result) in prepared.into_iter().zip(results) {
            let stopped = matches!(&result, Err(e) if self.cancel.load(Ordering::Relaxed)
                && e.chain().any(|c| c.is::<Cancelled>()));
            let done = match result {
                Ok(outcome) => commit(n, staging, &outcome, seconds, &cx, decl.kind.as_str()),
                Err(_) if stopped => {
                    cx.log("stopped: the run was cancelled");
                    Err("cancelled".to_string())
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    cx.log(format!("error: {msg}"));
                    Err(format!(
                        "{msg}\n  log: {}",
                        self.run_dir.log_path(&n.name).display()
                    ))
                }
            };
            out.push(Done {
                key: n.key.clone(),
                result: done,
                seconds,
                computed: true,
                stopped,
            });
        }
        drop(todo);
        out
    }
}

/// Runs stage code, turning a panic into an error for every node of the batch.
fn run_guarded(
    f: impl FnOnce() -> Vec<StageResult<Outcome>>,
    n: usize,
) -> Vec<StageResult<Outcome>> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) if r.len() == n => r,
        Ok(r) => (0..n)
            .map(|_| {
                Err(anyhow::anyhow!(
                    "stage returned {} results for {n} nodes",
                    r.len()
                ))
            })
            .collect(),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            (0..n)
                .map(|_| Err(anyhow::anyhow!("stage panicked (a bug in probex): {msg}")))
                .collect()
        }
    }
}

fn commit(
    n: &Node,
    staging: probex_cache::Staging,
    outcome: &Outcome,
    seconds: f64,
    cx: &RunContext,
    kind: &str,
) -> Result<Entry, String> {
    let stored = StoredOutcome {
        node: n.name.clone(),
        coords: n.coords.clone(),
        params: n.params.canonical().clone(),
        meta: outcome.meta.clone(),
        results: outcome.results.clone(),
        summary: outcome.summary.clone(),
        publish: outcome.publish.clone(),
        seconds,
    };
    for p in &outcome.publish {
        if !staging.dir().join(p).is_file() {
            return Err(format!("stage publishes `{p}` but did not write it"));
        }
    }
    let info = EntryInfo {
        kind: kind.to_string(),
        label: n.name.clone(),
        meta: serde_json::to_value(&stored).map_err(|e| e.to_string())?,
    };
    let entry = staging
        .commit(info)
        .map_err(|e| format!("cannot commit to the cache: {e}"))?;
    cx.log(format!("committed in {seconds:.2}s"));
    Ok(entry)
}

/// Writes the run record and checks expectations.
fn finish(
    planner: &Planner,
    run_dir: &RunDir,
    plan: &Plan,
    states: &HashMap<Key, (NodeState, f64)>,
    cancelled: bool,
    seconds: f64,
) -> Result<RunReport, Diagnostics> {
    let exp = planner.experiment();
    let store = planner.store();
    let mut nodes = Vec::new();
    let mut results = ResultsByStage::new();
    let mut summaries = Vec::new();
    let mut all_results = BTreeMap::new();
    for n in &plan.nodes {
        let decl = &exp.stages[n.stage];
        let (state, secs) = states
            .get(&n.key)
            .cloned()
            .unwrap_or((NodeState::NotRun, 0.0));
        let ran = matches!(state, NodeState::Ran | NodeState::Failed(_));
        if matches!(state, NodeState::Cached | NodeState::Ran)
            && let Ok(Some(entry)) = store.get(&n.key)
        {
            let stored = StoredOutcome::of(&entry);
            if let Some(r) = &stored.results {
                results
                    .entry(decl.name.clone())
                    .or_default()
                    .push((n.name.clone(), r.clone()));
                all_results.insert(n.name.clone(), r.clone());
            }
            if let Some(s) = &stored.summary {
                summaries.push((n.name.clone(), s.clone()));
            }
            publish(&entry, &stored.publish, &run_dir.publish_dir(&n.name));
        }
        nodes.push(NodeReport {
            node: n.name.clone(),
            stage: decl.name.clone(),
            kind: decl.kind.clone(),
            key: n.key.to_string(),
            state,
            seconds: secs,
            log: ran.then(|| run_dir.log_path(&n.name)),
        });
    }
    let never_planned: Vec<String> = plan.pending.iter().map(|p| p.stage.clone()).collect();
    let complete = nodes
        .iter()
        .all(|n| matches!(n.state, NodeState::Cached | NodeState::Ran))
        && never_planned.is_empty();
    let expectations = if complete {
        expect::check(&exp.expect, &results)
    } else {
        Vec::new()
    };
    let report = RunReport {
        run_dir: run_dir.path().to_path_buf(),
        cache: std::fs::canonicalize(planner.store().root())
            .unwrap_or_else(|_| planner.store().root().to_path_buf()),
        nodes,
        never_planned,
        expectations,
        summaries,
        cancelled,
        seconds,
    };
    let _ = run_dir.write_json(files::STATUS, &report);
    let _ = run_dir.write_json(
        files::RESULTS,
        &serde_json::json!({
            "experiment": exp.name,
            "results": all_results,
            "expectations": report.expectations,
            "success": report.success(),
        }),
    );
    let _ = run_dir.write_text(files::REPORT, &crate::status::markdown_report(exp, &report));
    Ok(report)
}

/// Copies a node's published files into the run directory (hard links would tie the run to
/// the cache entry's lifetime; copies survive `cache gc`).
fn publish(entry: &Entry, files: &[String], dest: &Path) {
    for f in files {
        let src = entry.dir.join(f);
        let dst = dest.join(f);
        if let Some(parent) = dst.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::fs::copy(&src, &dst);
    }
}
