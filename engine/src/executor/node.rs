//! Computing chosen nodes of a plan in this process: what a SLURM job runs
//! (`probex run-node`). The experiment is planned again, the nodes are found by name (and
//! checked against the key they were submitted with), their inputs must already be in the
//! cache, and they are computed by [`Worker::compute`], exactly as a local run computes them:
//! under their key locks, committed atomically, or taken from the cache if another process got
//! there first.

use std::sync::atomic::{AtomicBool, Ordering};

use super::local::{Worker, batch_inputs};
use super::slurm::script::NodeRef;
use crate::plan::{Node, Planner};
use crate::progress::Reporter;
use crate::record::RunDir;

/// How one chosen node ended.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeOutcome {
    /// Computed and committed here.
    Computed,
    /// Already in the cache (committed by another process).
    Cached,
    /// Failed, with the error.
    Failed(String),
    /// Stopped because this process was asked to stop.
    Stopped,
}

/// Computes the nodes `wanted` of `planner`'s experiment (one batch: one declared stage, the
/// same inputs), logging into `run_dir`. An error (not a node failure) means the nodes could
/// not even be started: they are not in the plan any more, or an input is not in the cache.
pub fn run_nodes(
    planner: &Planner,
    run_dir: &RunDir,
    reporter: &Reporter,
    cancel: &AtomicBool,
    threads: usize,
    wanted: &[NodeRef],
) -> Result<Vec<(String, NodeOutcome)>, String> {
    let exp = planner.experiment();
    let store = planner.store();
    let plan = planner.plan().map_err(|d| d.to_string())?;
    let mut batch: Vec<Node> = Vec::new();
    for w in wanted {
        let Some(node) = plan.nodes.iter().find(|n| n.name == w.node) else {
            let waiting = plan
                .pending
                .iter()
                .find(|p| w.node == p.stage || w.node.starts_with(&format!("{}[", p.stage)));
            return Err(match waiting {
                Some(p) => format!(
                    "node `{}` cannot be planned yet: stage `{}` waits for {} (are they in the cache at {}? It must be on a filesystem every node sees)",
                    w.node,
                    p.stage,
                    p.waits_for.join(", "),
                    store.root().display()
                ),
                None => format!(
                    "{} has no node `{}`: the experiment changed since the job was submitted",
                    exp.path.display(),
                    w.node
                ),
            });
        };
        if !w.key.is_empty() && node.key.as_str() != w.key {
            return Err(format!(
                "node `{}` has key {} now, but the job was submitted for key {}: the experiment or its sources changed since; run it again",
                w.node, node.key, w.key
            ));
        }
        batch.push(node.clone());
    }
    let Some(first) = batch.first() else {
        return Ok(Vec::new());
    };
    // A gang's nodes read inputs of their own; a batch's share theirs.
    let gangs = exp.stages[first.stage].stage.gangs();
    if batch
        .iter()
        .any(|n| n.stage != first.stage || (!gangs && n.material.inputs != first.material.inputs))
    {
        return Err("the nodes of one job must be of one stage and share their inputs".into());
    }
    // Pinned for as long as this job computes, so a `cache gc` cannot take them meanwhile.
    let mut pins = Vec::new();
    let mut pinned = std::collections::HashSet::new();
    for n in &batch {
        for (_, ids) in &n.inputs {
            for &u in ids {
                let up = &plan.nodes[u];
                if !pinned.insert(u) {
                    continue;
                }
                if let Ok(Some(pin)) = store.pin(&up.key) {
                    pins.push(pin);
                } else {
                    return Err(format!(
                        "input `{}` of `{}` is not in the cache at {} on {}: the cache must be on a filesystem every node sees",
                        up.name,
                        n.name,
                        store.root().display(),
                        hostname()
                    ));
                }
            }
        }
    }

    for n in &batch {
        reporter.started(&n.name);
    }
    // A job computes one batch: it only stops when it is told to (scancel, Ctrl-C).
    let failure_stop = AtomicBool::new(false);
    let worker = Worker {
        planner,
        run_dir,
        reporter,
        cancel,
        failure_stop: &failure_stop,
        threads,
    };
    let inputs = batch_inputs(&plan, &batch, store);
    let mut out = Vec::new();
    for done in worker.compute(&batch, inputs) {
        let name = batch
            .iter()
            .find(|n| n.key == done.key)
            .map_or_else(|| done.key.to_string(), |n| n.name.clone());
        let outcome = match done.result {
            Ok(_) if done.computed => NodeOutcome::Computed,
            Ok(_) => NodeOutcome::Cached,
            Err(_) if done.stopped || cancel.load(Ordering::Relaxed) => NodeOutcome::Stopped,
            Err(e) => NodeOutcome::Failed(e),
        };
        let what = match &outcome {
            NodeOutcome::Computed => "done",
            NodeOutcome::Cached => "cached",
            NodeOutcome::Failed(_) => "FAILED",
            NodeOutcome::Stopped => "stopped",
        };
        reporter.finished(&name, what, done.seconds);
        out.push((name, outcome));
    }
    drop(pins);
    Ok(out)
}

/// This machine's name, for messages about what it cannot see.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "this machine".into())
}
