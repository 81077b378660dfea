//! Running a plan: the scheduling loop shared by every executor. Ready nodes are handed to an
//! [`Executor`] (threads of this process, or SLURM jobs), each computed under its key's lock
//! into a staging directory and committed atomically; planning again after each finished node
//! expands fan-outs that waited for it. The run record is written at the end.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use probex_cache::{Entry, Key, Pinned};

use crate::diagnostic::Diagnostics;
use crate::executor::local::{Local, Worker};
use crate::executor::slurm::{Slurm, SlurmOptions};
use crate::executor::{Done, Executor};
use crate::expect::{self, ResultsByStage};
use crate::history::History;
use crate::plan::{Node, Plan, Planner, StoredOutcome};
use crate::progress::{ProgressMode, Reporter};
use crate::record::{RunDir, files};
// Re-exported where they were declared before `report` held the schema of `status.json`.
pub use crate::report::{NodeReport, NodeState, RunReport, Warning};

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

/// Why a run could not even start.
#[derive(Debug)]
pub enum RunError {
    /// The experiment cannot be planned (bad input).
    Invalid(Diagnostics),
    /// The run record cannot be written (a full disk, a read-only `--out`): nothing was run.
    Record(String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Invalid(d) => write!(f, "{d}"),
            RunError::Record(e) => write!(
                f,
                "error: cannot write the run record: {e}\n  = help: free some space or give another directory with --out"
            ),
        }
    }
}

impl std::error::Error for RunError {}

impl From<Diagnostics> for RunError {
    fn from(d: Diagnostics) -> Self {
        RunError::Invalid(d)
    }
}

/// Runs the experiment behind `planner` on threads of this process, writing the run record
/// into `run_dir`.
pub fn run(planner: &Planner, run_dir: &RunDir, opts: &RunOptions) -> Result<RunReport, RunError> {
    let start = Start::new(planner, run_dir, opts)?;
    let failure_stop = AtomicBool::new(false);
    let jobs = opts.jobs.max(1);
    let threads = opts.threads.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / jobs).max(1)
    });
    std::thread::scope(|scope| {
        let worker = Worker {
            planner,
            run_dir,
            reporter: &start.reporter,
            cancel: &opts.cancel,
            failure_stop: &failure_stop,
            threads,
        };
        let mut exec = Local::new(scope, worker, jobs);
        drive(planner, run_dir, opts, &start, &mut exec, &failure_stop)
    })
}

/// Runs the experiment behind `planner` with every node computed by a SLURM job over the
/// shared cache; this process only plans, submits, tracks and writes the run record.
pub fn run_slurm(
    planner: &Planner,
    run_dir: &RunDir,
    opts: &RunOptions,
    slurm: &SlurmOptions,
) -> Result<RunReport, RunError> {
    // Bars would draw one spinner per queued job (hundreds): plain lines read better.
    let opts = &RunOptions {
        progress: match opts.progress {
            ProgressMode::Auto => ProgressMode::Plain,
            p => p,
        },
        ..opts.clone()
    };
    let start = Start::new(planner, run_dir, opts)?;
    let mut exec = Slurm::new(planner, run_dir, &start.reporter, &opts.cancel, slurm);
    drive(
        planner,
        run_dir,
        opts,
        &start,
        &mut exec,
        &AtomicBool::new(false),
    )
}

/// What every run does before its first node: the first plan, written to the record, and the
/// progress display.
struct Start {
    first: Plan,
    reporter: Reporter,
    started: Instant,
}

impl Start {
    fn new(planner: &Planner, run_dir: &RunDir, opts: &RunOptions) -> Result<Start, RunError> {
        let exp = planner.experiment();
        let store = planner.store();
        let history = History::open(store, &exp.path);
        let started = Instant::now();
        let first = planner.plan()?;
        // A record that cannot be written now will not be writable at the end either: stop
        // before computing anything.
        run_dir
            .write_json(
                files::PLAN,
                &crate::status::rows(&first, exp, store, &history),
            )
            .map_err(|e| RunError::Record(e.to_string()))?;
        let reporter = Reporter::new(opts.progress, first.nodes.len() as u64);
        // What killed runs left in the cache's staging area is garbage nobody else removes
        // unless someone thinks of `cache gc`: a run removes it (only dead writers' slots,
        // by their locks; a live run's staging is never touched).
        match store.clean_dead_staging() {
            Ok((0, _)) => {}
            Ok((n, bytes)) => reporter.println(&format!(
                "cache: removed {n} staging folder(s) of killed runs ({})",
                crate::status::human(bytes)
            )),
            Err(e) => reporter.println(&format!(
                "cache: could not remove the staging folders of killed runs: {e}"
            )),
        }
        Ok(Start {
            first,
            reporter,
            started,
        })
    }
}

/// The scheduling loop every executor shares: settle cached nodes and nodes whose inputs
/// failed, hand ready batches to `exec`, wait for some to finish, plan again (a finished node
/// may let a pending fan-out expand), until nothing is left to start or running.
/// `failure_stop` is set when a failure (not the user) stops the run.
fn drive(
    planner: &Planner,
    run_dir: &RunDir,
    opts: &RunOptions,
    start: &Start,
    exec: &mut dyn Executor,
    failure_stop: &AtomicBool,
) -> Result<RunReport, RunError> {
    let mut plan = start.first.clone();
    let exp = planner.experiment();
    let mut s = Schedule {
        planner,
        opts,
        reporter: &start.reporter,
        failure_stop,
        history: History::open(planner.store(), &exp.path),
        states: HashMap::new(),
        running: HashSet::new(),
        stop: false,
        pins: HashMap::new(),
        names: HashMap::new(),
        recomputed: HashSet::new(),
        devices: HashMap::new(),
        gangs: HashMap::new(),
    };
    loop {
        s.settle(&plan);
        if opts.cancel.load(Ordering::Relaxed) {
            s.stop = true;
        }
        if !s.stop {
            s.start_ready(&plan, exec);
        }
        if s.running.is_empty() {
            break;
        }
        let finished = exec.wait();
        if finished.is_empty() {
            // The executor has nothing in flight although nodes were handed to it: a bug, but
            // the run must still end (the nodes are reported as not run).
            break;
        }
        for d in finished {
            s.finished(&plan, d);
        }
        plan = planner.plan()?;
    }
    s.reporter.finish();

    let cancelled = opts.cancel.load(Ordering::Relaxed)
        && !s
            .states
            .values()
            .any(|(st, _)| matches!(st, NodeState::Failed(_) | NodeState::FailedWith(_)));
    let report = finish(
        planner,
        run_dir,
        &plan,
        &s.states,
        &s.pins,
        &s.devices,
        cancelled,
        start.started.elapsed().as_secs_f64(),
    );
    drop(s);
    report
}

/// What the scheduling loop knows between plans.
struct Schedule<'a> {
    planner: &'a Planner<'a>,
    opts: &'a RunOptions,
    reporter: &'a Reporter,
    failure_stop: &'a AtomicBool,
    history: History,
    /// How each settled node ended, and its seconds.
    states: HashMap<Key, (NodeState, f64)>,
    /// Nodes handed to the executor and not back yet.
    running: HashSet<Key>,
    /// No more nodes start (a failure without `--keep-going`, or an interrupt).
    stop: bool,
    /// Every entry this run has found or made stays pinned until the run ends, so that a
    /// `cache gc` meanwhile (another experiment's --keep, --older-than 0) cannot take what a
    /// later node reads, or what the record publishes.
    pins: HashMap<Key, Pinned>,
    /// Names of every node ever planned: a re-plan can lose a node, its messages must not.
    names: HashMap<Key, String>,
    /// Inputs found corrupt once and computed again: a second time is a failure, not a loop.
    recomputed: HashSet<Key>,
    /// The GPU each node ran on, for the record.
    devices: HashMap<Key, String>,
    /// Each ready node's gang key and limit, asked once (a kind may read its inputs' files to
    /// answer, and a node may wait many rounds for a free worker).
    gangs: HashMap<Key, (Option<String>, usize)>,
}

impl Schedule<'_> {
    /// Settles the nodes of `plan` that need no executor: cached ones, and those whose inputs
    /// failed.
    fn settle(&mut self, plan: &Plan) {
        let store = self.planner.store();
        for n in &plan.nodes {
            self.names
                .entry(n.key.clone())
                .or_insert_with(|| n.name.clone());
        }
        self.reporter.set_total(plan.nodes.len() as u64);
        for node in &plan.nodes {
            if self.states.contains_key(&node.key) || self.running.contains(&node.key) {
                continue;
            }
            if let Some(bad) = failed_input(plan, node, &self.states) {
                self.states.insert(
                    node.key.clone(),
                    (NodeState::Skipped(format!("input {bad} failed")), 0.0),
                );
                continue;
            }
            // `get` first: pinning creates a lock file, which an absent entry does not need.
            if matches!(store.get(&node.key), Ok(Some(_)))
                && let Ok(Some(pin)) = store.pin(&node.key)
            {
                self.history.record(node);
                self.reporter.finished(&node.name, "cached", 0.0);
                self.states
                    .insert(node.key.clone(), (NodeState::Cached, 0.0));
                self.pins.insert(node.key.clone(), pin);
            }
        }
    }

    /// Hands every ready node (all inputs done) to `exec`, in batches, while it has room.
    fn start_ready(&mut self, plan: &Plan, exec: &mut dyn Executor) {
        let ready: Vec<&Node> = plan
            .nodes
            .iter()
            .filter(|n| !self.states.contains_key(&n.key) && !self.running.contains(&n.key))
            .filter(|n| {
                n.inputs
                    .iter()
                    .flat_map(|(_, ids)| ids)
                    .all(|&u| is_done(&self.states, &plan.nodes[u].key))
            })
            .collect();
        for batch in batches(self.planner, plan, ready, &mut self.gangs) {
            if exec.full() {
                break;
            }
            for n in &batch {
                self.running.insert(n.key.clone());
                self.reporter.started(&n.name);
            }
            let batch: Vec<Node> = batch.into_iter().cloned().collect();
            exec.start(plan, batch);
        }
        exec.flush();
    }

    /// Records a node the executor finished: its state, its pin, and whether the run stops.
    fn finished(&mut self, plan: &Plan, d: Done) {
        self.running.remove(&d.key);
        if let Some(dev) = &d.device {
            self.devices.insert(d.key.clone(), dev.clone());
        }
        let name = self
            .names
            .get(&d.key)
            .cloned()
            .unwrap_or_else(|| d.key.to_string());
        if !d.corrupt_inputs.is_empty()
            && d.corrupt_inputs
                .iter()
                .all(|k| !self.recomputed.contains(k))
        {
            // The node did not run: its inputs go back to be computed, then it runs.
            self.reporter.requeued(&name);
            for k in &d.corrupt_inputs {
                self.recomputed.insert(k.clone());
                self.states.remove(k);
                self.pins.remove(k);
                let input = self.names.get(k).cloned().unwrap_or_else(|| k.to_string());
                self.reporter.println(&format!(
                    "cache: {input} failed verification as {name} was about to read it; moved to quarantine, computing it again"
                ));
            }
            return;
        }
        let state = match d.result {
            Ok(_) => {
                let store = self.planner.store();
                let pin = d.pin.or_else(|| store.pin(&d.key).ok().flatten());
                if let Some(pin) = pin {
                    self.pins.insert(d.key.clone(), pin);
                }
                if let Some(n) = plan.nodes.iter().find(|n| n.key == d.key) {
                    self.history.record(n);
                }
                if d.computed {
                    self.reporter.finished(&name, "done", d.seconds);
                    NodeState::Ran
                } else {
                    self.reporter.finished(&name, "cached", 0.0);
                    NodeState::Cached
                }
            }
            Err(_) if d.stopped && !self.failure_stop.load(Ordering::Relaxed) => {
                self.reporter.finished(&name, "interrupted", d.seconds);
                NodeState::Interrupted
            }
            Err(_) if d.stopped => {
                self.reporter.finished(&name, "stopped", d.seconds);
                NodeState::NotRun
            }
            Err(e) => {
                self.reporter.finished(&name, "FAILED", d.seconds);
                // One line as it happens; the whole error once, in the summary at the end.
                if d.with.is_none() {
                    self.reporter.println(&format!(
                        "error in {name}: {}",
                        e.lines().next().unwrap_or_default()
                    ));
                }
                if !self.opts.keep_going && !self.opts.cancel.load(Ordering::Relaxed) {
                    self.stop = true;
                    // Before `cancel`: a node that sees `cancel` must know it is not the
                    // user's interrupt.
                    self.failure_stop.store(true, Ordering::SeqCst);
                    self.opts.cancel.store(true, Ordering::SeqCst);
                }
                match d.with {
                    Some(first) => NodeState::FailedWith(first),
                    None => NodeState::Failed(e),
                }
            }
        };
        let seconds = match state {
            NodeState::Cached => 0.0,
            _ => d.seconds,
        };
        self.states.insert(d.key, (state, seconds));
    }
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
            Some((NodeState::Failed(_) | NodeState::FailedWith(_) | NodeState::Skipped(_), _)) => {
                Some(up.name.clone())
            }
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

/// Groups ready nodes: nodes of a batching stage with identical inputs go together, and so
/// do nodes of a ganging stage with equal gang keys (and device), up to the gang's limit.
/// `known` remembers each node's gang key and limit between rounds.
fn batches<'n>(
    planner: &Planner,
    plan: &Plan,
    ready: Vec<&'n Node>,
    known: &mut HashMap<Key, (Option<String>, usize)>,
) -> Vec<Vec<&'n Node>> {
    let exp = planner.experiment();
    let mut out: Vec<Vec<&Node>> = Vec::new();
    let mut index: BTreeMap<(usize, String), usize> = BTreeMap::new();
    // Per gang: the batch being filled, and how many members it may hold.
    let mut gangs: BTreeMap<(usize, Option<String>, String), (usize, usize)> = BTreeMap::new();
    for n in ready {
        let stage = &exp.stages[n.stage].stage;
        if stage.gangs() {
            let (key, limit) = known
                .entry(n.key.clone())
                .or_insert_with(|| {
                    let inputs = crate::executor::local::inputs_of(plan, n, planner.store());
                    match stage.gang(&n.params, &inputs) {
                        Some(key) => {
                            let limit = stage.gang_limit(&n.params, &inputs, n.device.as_deref());
                            (Some(key), limit)
                        }
                        None => (None, 1),
                    }
                })
                .clone();
            let Some(key) = key else {
                out.push(vec![n]);
                continue;
            };
            let id = (n.stage, n.device.clone(), key);
            match gangs.get(&id) {
                Some(&(i, limit)) if out[i].len() < limit => out[i].push(n),
                _ => {
                    gangs.insert(id, (out.len(), limit));
                    out.push(vec![n]);
                }
            }
        } else if stage.batches() {
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

/// Writes the run record and checks expectations. `status.json` is written last: a record
/// with a complete `status.json` is complete.
#[allow(clippy::too_many_arguments)]
fn finish(
    planner: &Planner,
    run_dir: &RunDir,
    plan: &Plan,
    states: &HashMap<Key, (NodeState, f64)>,
    pins: &HashMap<Key, Pinned>,
    devices: &HashMap<Key, String>,
    cancelled: bool,
    seconds: f64,
) -> Result<RunReport, RunError> {
    let exp = planner.experiment();
    let store = planner.store();
    let mut nodes = Vec::new();
    let mut results = ResultsByStage::new();
    let mut summaries = Vec::new();
    let mut all_results = BTreeMap::new();
    let mut warnings: Vec<Warning> = Vec::new();
    for n in &plan.nodes {
        let decl = &exp.stages[n.stage];
        let (state, secs) = states
            .get(&n.key)
            .cloned()
            .unwrap_or((NodeState::NotRun, 0.0));
        let ran = matches!(
            state,
            NodeState::Ran
                | NodeState::Failed(_)
                | NodeState::FailedWith(_)
                | NodeState::Interrupted
        );
        // The pinned entry, validated when it was pinned: reading it back would stat every file
        // an in-place dataset refers to, once per node.
        let entry = || match pins.get(&n.key) {
            Some(pin) => Some(std::borrow::Cow::Borrowed(pin.entry())),
            None => store
                .get(&n.key)
                .ok()
                .flatten()
                .map(std::borrow::Cow::Owned),
        };
        if matches!(state, NodeState::Cached | NodeState::Ran)
            && let Some(entry) = entry()
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
            for w in &stored.warnings {
                match warnings.iter_mut().find(|x| x.message == *w) {
                    Some(x) => x.nodes.push(n.name.clone()),
                    None => warnings.push(Warning {
                        message: w.clone(),
                        nodes: vec![n.name.clone()],
                        files: (!stored.publish.is_empty()).then(|| run_dir.publish_dir(&n.name)),
                    }),
                }
            }
            if let Err(e) = publish(&entry, &stored.publish, &run_dir.publish_dir(&n.name)) {
                run_dir.problem(e);
            }
        }
        nodes.push(NodeReport {
            node: n.name.clone(),
            stage: decl.name.clone(),
            kind: decl.kind.clone(),
            key: n.key.to_string(),
            state,
            seconds: secs,
            log: ran.then(|| run_dir.log_path(&n.name)),
            device: devices.get(&n.key).cloned(),
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
    let mut report = RunReport {
        run_dir: run_dir.path().to_path_buf(),
        cache: std::fs::canonicalize(planner.store().root())
            .unwrap_or_else(|_| planner.store().root().to_path_buf()),
        nodes,
        never_planned,
        expectations,
        summaries,
        cancelled,
        seconds,
        warnings,
        record_errors: run_dir.problems(),
    };
    // Each file says what was known to have failed when it was written; the caller gets every
    // failure. Write errors are remembered by `run_dir`.
    let _ = run_dir.write_json(
        files::RESULTS,
        &serde_json::json!({
            "experiment": exp.name,
            "results": all_results,
            "expectations": report.expectations,
            "success": report.success(),
        }),
    );
    report.record_errors = run_dir.problems();
    let _ = run_dir.write_text(files::REPORT, &crate::status::markdown_report(exp, &report));
    report.record_errors = run_dir.problems();
    let _ = run_dir.write_json(files::STATUS, &report);
    report.record_errors = run_dir.problems();
    Ok(report)
}

/// Copies a node's published files into the run directory (hard links would tie the run to
/// the cache entry's lifetime; copies survive `cache gc`), each whole or not at all.
fn publish(entry: &Entry, files: &[String], dest: &Path) -> Result<(), String> {
    for f in files {
        let src = entry.dir.join(f);
        let dst = dest.join(f);
        let bytes = std::fs::read(&src).map_err(|e| format!("{}: {e}", src.display()))?;
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        crate::record::write_atomic(&dst, &bytes).map_err(|e| e.to_string())?;
    }
    Ok(())
}
