//! The local executor: batches on a bounded pool of threads of this process, GPU nodes one at a
//! time per GPU slot (plain `cuda` nodes spread over the run's GPUs, [`crate::gpus`]); and
//! [`Worker::compute`], the one function that computes a batch of nodes under their key locks
//! and commits them, used by every executor (a SLURM job runs it too).

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::Scope;
use std::time::Instant;

use probex_cache::{Entry, EntryInfo, KeyLock, Store, Verified};

use super::{Done, Executor};
use crate::gpus::GpuPool;
use crate::parallel::in_parallel;
use crate::plan::{Node, Plan, Planner, StoredOutcome, artifact};
use crate::progress::Reporter;
use crate::record::RunDir;
use crate::stage::{Cancelled, FailedWith, Inputs, Outcome, RunContext, StageResult};

/// Computes batches on scoped threads, at most `jobs` nodes at once.
pub struct Local<'scope, 'env> {
    scope: &'scope Scope<'scope, 'env>,
    worker: Worker<'env>,
    jobs: usize,
    in_flight: usize,
    gpus: GpuPool,
    tx: mpsc::Sender<Vec<Done>>,
    rx: mpsc::Receiver<Vec<Done>>,
}

impl<'scope, 'env> Local<'scope, 'env> {
    /// An executor whose threads live in `scope` and run at most `jobs` nodes at once, GPU
    /// nodes on the GPUs of the planner's [`crate::Overrides::gpus`].
    pub fn new(scope: &'scope Scope<'scope, 'env>, worker: Worker<'env>, jobs: usize) -> Self {
        let gpus = GpuPool::new(worker.planner.overrides().gpus.clone());
        Self::with_gpus(scope, worker, jobs, gpus)
    }

    /// [`Local::new`] over a given GPU pool.
    pub fn with_gpus(
        scope: &'scope Scope<'scope, 'env>,
        worker: Worker<'env>,
        jobs: usize,
        gpus: GpuPool,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        Local {
            scope,
            worker,
            jobs: jobs.max(1),
            in_flight: 0,
            gpus,
            tx,
            rx,
        }
    }
}

impl Executor for Local<'_, '_> {
    fn full(&self) -> bool {
        self.in_flight >= self.jobs
    }

    fn start(&mut self, plan: &Plan, mut batch: Vec<Node>) {
        self.in_flight += batch.len();
        let inputs = batch_inputs(plan, &batch, self.worker.planner.store());
        let tx = self.tx.clone();
        let worker = self.worker;
        let gpus = self.gpus.clone();
        self.scope.spawn(move || {
            // Held until the batch is computed: no other node gets this GPU slot meanwhile.
            let lease = gpus.acquire(&batch[0].resource);
            if let Some(l) = &lease {
                for n in &mut batch {
                    n.device = Some(l.name().to_string());
                }
            }
            if let Some(line) = gpus.announcement() {
                worker.reporter.println(&line);
            }
            let mut done = worker.compute(&batch, inputs);
            if let Some(l) = &lease {
                // Not for a node another process committed meanwhile: it ran elsewhere.
                for d in done.iter_mut().filter(|d| d.computed) {
                    d.device = Some(l.name().to_string());
                }
            }
            drop(lease);
            let _ = tx.send(done);
        });
    }

    fn wait(&mut self) -> Vec<Done> {
        if self.in_flight == 0 {
            return Vec::new();
        }
        // At least one batch, then whatever else has finished meanwhile.
        let Ok(mut finished) = self.rx.recv() else {
            return Vec::new();
        };
        while let Ok(more) = self.rx.try_recv() {
            finished.extend(more);
        }
        self.in_flight = self.in_flight.saturating_sub(finished.len());
        finished
    }
}

/// The artifacts of `node`'s inputs that are in the cache (a missing one is simply absent:
/// [`Worker::compute`] notices and fails the node).
pub fn inputs_of(plan: &Plan, node: &Node, store: &Store) -> Inputs {
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

/// The inputs of a batch's nodes: one [`Inputs`] shared by every node when they read the
/// same artifacts (a batch), else one per node, in the batch's order (a gang).
pub fn batch_inputs(plan: &Plan, batch: &[Node], store: &Store) -> Vec<Inputs> {
    let shared = batch
        .windows(2)
        .all(|w| w[0].material.inputs == w[1].material.inputs);
    if shared {
        batch
            .first()
            .map(|n| inputs_of(plan, n, store))
            .into_iter()
            .collect()
    } else {
        batch.iter().map(|n| inputs_of(plan, n, store)).collect()
    }
}

/// What computing a batch needs: the planner (experiment and cache), where logs go, progress,
/// the cancel flag and the default thread count.
#[derive(Clone, Copy)]
pub struct Worker<'a> {
    /// The planner of the experiment the nodes belong to.
    pub planner: &'a Planner<'a>,
    /// The run record nodes log into.
    pub run_dir: &'a RunDir,
    /// Progress display.
    pub reporter: &'a Reporter,
    /// Set to stop: stages see it through their context.
    pub cancel: &'a AtomicBool,
    /// Set (before `cancel`) when the run stops because a node failed, not because it was
    /// interrupted (Ctrl-C, SIGTERM, scancel).
    pub failure_stop: &'a AtomicBool,
    /// Threads per node when its stage does not say.
    pub threads: usize,
}

impl Worker<'_> {
    /// Computes a batch of nodes (one declared stage; the same inputs, or a gang of nodes
    /// with inputs of their own) under their locks and commits each atomically; nodes
    /// another process committed meanwhile are taken from the cache. `inputs` holds one
    /// [`Inputs`] shared by every node, or one per node of `batch` in its order
    /// ([`batch_inputs`]). Returns one [`Done`] per node.
    pub fn compute(&self, batch: &[Node], inputs: Vec<Inputs>) -> Vec<Done> {
        let started = Instant::now();
        let of: HashMap<usize, &Inputs> = match inputs.as_slice() {
            [shared] => batch.iter().map(|n| (n.id, shared)).collect(),
            each => batch.iter().map(|n| n.id).zip(each).collect(),
        };
        let (mut out, todo) = self.lock_or_take(batch, started);
        if todo.is_empty() {
            return out;
        }
        let (todo, failed) = self.check_inputs(todo, &of, started);
        out.extend(failed);
        let mut prepared = Vec::new();
        for m in self.prepare(&todo, started) {
            match m {
                Ok(p) => prepared.push(p),
                Err(done) => out.push(*done),
            }
        }
        if prepared.is_empty() {
            return out;
        }
        let decl = &self.planner.experiment().stages[prepared[0].0.stage];
        let n = prepared.len();
        let results = if decl.stage.gangs() {
            let mut jobs: Vec<(&crate::stage::ParamBox, &Inputs, &RunContext)> = Vec::new();
            for (node, _, _, cx) in &prepared {
                match of.get(&node.id) {
                    Some(inputs) => jobs.push((&node.params, *inputs, cx)),
                    // `of` holds every node of the batch: not reached.
                    None => return out,
                }
            }
            run_guarded(|| decl.stage.run_gang(&jobs), n)
        } else {
            let jobs: Vec<(&crate::stage::ParamBox, &RunContext)> = prepared
                .iter()
                .map(|(n, _, _, cx)| (&n.params, cx))
                .collect();
            let Some(shared) = of.get(&prepared[0].0.id) else {
                return out;
            };
            run_guarded(|| decl.stage.run_batch(&jobs, shared), n)
        };
        let seconds = started.elapsed().as_secs_f64() / n as f64;
        let kind = decl.kind.as_str();
        let finished: Vec<_> = prepared.into_iter().zip(results).collect();
        out.extend(in_parallel(
            finished,
            COMMIT_THREADS,
            |((n, lock, staging, cx), result)| {
                self.finish(n, lock, staging, cx, result, seconds, kind)
            },
        ));
        drop(todo);
        out
    }

    /// Locks every node of `batch`, in key order (so two processes batching overlapping sets
    /// cannot deadlock): a node another process committed meanwhile is done, taken from the
    /// cache; the others are left to compute, with their locks.
    fn lock_or_take<'n>(
        &self,
        batch: &'n [Node],
        started: Instant,
    ) -> (Vec<Done>, Vec<(&'n Node, KeyLock)>) {
        let store = self.planner.store();
        let mut order: Vec<&Node> = batch.iter().collect();
        order.sort_by(|a, b| a.key.cmp(&b.key));
        let mut out = Vec::new();
        let mut todo = Vec::new();
        for n in order {
            match store.lock(&n.key) {
                Err(e) => out.push(failed(n, format!("cannot lock cache entry: {e}"), started)),
                Ok(lock) => match store.pin(&n.key) {
                    Ok(Some(pin)) => out.push(Done {
                        key: n.key.clone(),
                        result: Ok(pin.entry().clone()),
                        seconds: 0.0,
                        computed: false,
                        stopped: false,
                        pin: Some(pin),
                        with: None,
                        corrupt_inputs: Vec::new(),
                        device: None,
                    }),
                    _ => todo.push((n, lock)),
                },
            }
        }
        (out, todo)
    }

    /// Checks that every node's inputs are still there (a concurrent `cache gc` could have
    /// removed one) and still verify: `plan` and the scheduler trust a valid manifest, and
    /// the files themselves are re-hashed here, when a node is about to read them (about
    /// 0.25 s per GB on one core, once per artifact however many nodes read it), so a
    /// bit-flipped input is caught before it is used, moved to quarantine and recomputed.
    /// Returns the nodes that may run, and the others done with their problem.
    #[allow(clippy::type_complexity)]
    fn check_inputs<'n>(
        &self,
        todo: Vec<(&'n Node, KeyLock)>,
        of: &HashMap<usize, &Inputs>,
        started: Instant,
    ) -> (Vec<(&'n Node, KeyLock)>, Vec<Done>) {
        let store = self.planner.store();
        // Each artifact is verified once: `Err` holds why it cannot be read.
        let mut verdicts: HashMap<probex_cache::Key, Result<(), (bool, String)>> = HashMap::new();
        let mut ok = Vec::new();
        let mut out = Vec::new();
        for (n, lock) in todo {
            let Some(inputs) = of.get(&n.id) else {
                out.push(failed(n, "its inputs were not handed over".into(), started));
                continue;
            };
            let expected: usize = n.inputs.iter().map(|(_, ids)| ids.len()).sum();
            let present: usize = n.inputs.iter().map(|(ty, _)| inputs.all(ty).len()).sum();
            if present != expected {
                out.push(failed(
                    n,
                    "an input vanished from the cache; run again".into(),
                    started,
                ));
                continue;
            }
            let mut corrupt = Vec::new();
            let mut error = None;
            for a in inputs.iter() {
                let verdict =
                    verdicts
                        .entry(a.key.clone())
                        .or_insert_with(|| match store.verify(&a.key) {
                            Ok(Verified::Ok) => Ok(()),
                            Ok(Verified::Corrupt(problems)) => {
                                Err((true, format!("{}: {}", a.node, problems.join("; "))))
                            }
                            Ok(Verified::Missing) => {
                                Err((true, format!("{}: vanished from the cache", a.node)))
                            }
                            Err(e) => Err((false, format!("cannot verify input {}: {e}", a.node))),
                        });
                match verdict {
                    Ok(()) => {}
                    Err((true, why)) => corrupt.push((a.key.clone(), why.clone())),
                    Err((false, why)) => error = Some(why.clone()),
                }
            }
            if let Some(why) = error {
                out.push(failed(n, why, started));
            } else if corrupt.is_empty() {
                ok.push((n, lock));
            } else {
                let why: Vec<&str> = corrupt.iter().map(|(_, w)| w.as_str()).collect();
                let msg = format!(
                    "an input failed verification (moved to quarantine; the next run computes it again): {}",
                    why.join("; ")
                );
                out.push(Done {
                    corrupt_inputs: corrupt.into_iter().map(|(k, _)| k).collect(),
                    ..failed(n, msg, started)
                });
            }
        }
        (ok, out)
    }

    /// Each node's staging, work directory, log and run context. They are a handful of new
    /// files per node, made side by side as commits are (128 layers of one batch are 768).
    #[allow(clippy::type_complexity)]
    fn prepare<'n, 'l>(
        &'l self,
        todo: &'l [(&'n Node, KeyLock)],
        started: Instant,
    ) -> Vec<Result<(&'n Node, &'l KeyLock, probex_cache::Staging, RunContext<'l>), Box<Done>>>
    {
        let store = self.planner.store();
        let exp = self.planner.experiment();
        in_parallel(todo.iter().collect(), COMMIT_THREADS, |(n, lock)| {
            let fail = |m: String| Box::new(failed(n, m, started));
            let decl = &exp.stages[n.stage];
            let staging = store
                .stage(lock)
                .map_err(|e| fail(format!("cannot create staging directory: {e}")))?;
            let work = store
                .work_location(lock)
                .map_err(|e| fail(format!("cannot use the work directory: {e}")))?;
            let log_path = self.run_dir.log_path(&n.name);
            let log = File::create(&log_path)
                .inspect_err(|e| self.run_dir.problem(format!("{}: {e}", log_path.display())))
                .ok();
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
            )
            .with_digests(self.planner.context().digests);
            cx.log(format!("key {}", n.key));
            if let Some(d) = &n.device {
                cx.log(format!("device {d}"));
            }
            Ok((*n, lock, staging, cx))
        })
    }

    /// Commits one node's outcome (or records its failure) and pins the entry it made.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        n: &Node,
        lock: &KeyLock,
        staging: probex_cache::Staging,
        cx: RunContext,
        result: StageResult<Outcome>,
        seconds: f64,
        kind: &str,
    ) -> Done {
        let store = self.planner.store();
        // A stage that gives up because the run is stopping did not fail. When the user
        // interrupted the run, any error counts (a kind may surface cancellation as its own
        // error type); when a failure elsewhere stops the run, only the engine's typed
        // `Cancelled`, so that genuine errors during the wind-down still show.
        let stopped = matches!(&result, Err(e) if self.cancel.load(Ordering::SeqCst)
            && (!self.failure_stop.load(Ordering::SeqCst)
                || e.chain().any(|c| c.is::<Cancelled>())));
        let with = match &result {
            Err(e) => e.chain().find_map(|c| c.downcast_ref::<FailedWith>()),
            Ok(_) => None,
        }
        .map(|w| w.0.clone());
        let done = match result {
            Ok(outcome) => commit(n, staging, &outcome, seconds, &cx, kind),
            Err(e) if stopped => {
                cx.log(format!(
                    "stopped: the run was cancelled ({})",
                    crate::stage::error_text(&e)
                ));
                Err("cancelled".to_string())
            }
            Err(e) => {
                let msg = crate::stage::error_text(&e);
                cx.log(format!("error: {msg}"));
                Err(format!(
                    "{msg}\n  log: {}",
                    self.run_dir.log_path(&n.name).display()
                ))
            }
        };
        if let Some(e) = cx.log_error() {
            let path = self.run_dir.log_path(&n.name);
            self.run_dir.problem(format!("{}: {e}", path.display()));
        }
        // Pinned while the key is still locked: no moment in which `cache gc` could take
        // the entry before the run that needs it reads it.
        let pin = match &done {
            Ok(entry) => store.pin_committed(lock, entry.clone()).ok(),
            Err(_) => None,
        };
        Done {
            key: n.key.clone(),
            result: done,
            seconds,
            computed: true,
            stopped,
            pin,
            with,
            corrupt_inputs: Vec::new(),
            device: None,
        }
    }
}

/// Entries of one batch committed side by side: a commit mostly waits on fsync, so a batch of
/// 128 layers commits in about the time of a few.
const COMMIT_THREADS: usize = 8;

/// A node that failed with `e`, `started` seconds into its batch.
fn failed(n: &Node, e: String, started: Instant) -> Done {
    Done {
        key: n.key.clone(),
        result: Err(e),
        seconds: started.elapsed().as_secs_f64(),
        computed: false,
        stopped: false,
        pin: None,
        with: None,
        corrupt_inputs: Vec::new(),
        device: None,
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
        warnings: cx.warnings(),
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
        references: outcome.references.clone(),
    };
    let entry = staging
        .commit(info)
        .map_err(|e| format!("cannot commit to the cache: {e}"))?;
    cx.log(format!("committed in {seconds:.2}s"));
    Ok(entry)
}
