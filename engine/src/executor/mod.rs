//! Executors: where the nodes the scheduler finds ready are computed.
//!
//! The scheduling loop ([`crate::run()`]) is the same for every executor: plan, settle cached
//! nodes, hand ready batches to the executor, wait for some to finish, plan again. An
//! [`Executor`] only decides *where* a batch is computed: on threads of this process
//! ([`local`]) or as jobs of a SLURM cluster over a shared cache ([`slurm`]). Either way a node
//! is computed by one function, [`local::Worker::compute`], under its key's lock, so every guarantee of
//! the cache (atomic commits, no node computed twice) holds whatever runs it.

pub mod local;
pub mod node;
pub mod slurm;

use probex_cache::{Entry, Key, Pinned};

use crate::plan::{Node, Plan};

/// A node's result coming back from an executor.
#[derive(Debug)]
pub struct Done {
    /// The node's key.
    pub key: Key,
    /// Its cache entry, or why there is none.
    pub result: Result<Entry, String>,
    /// Seconds spent computing it.
    pub seconds: f64,
    /// False when the node was found committed by another process instead of computed here.
    pub computed: bool,
    /// The node gave up because the run was cancelled: not a failure of the node.
    pub stopped: bool,
    /// The entry, pinned before the key's lock was released (so `cache gc` could not take it
    /// in between), when the executor computed it in this process.
    pub pin: Option<Pinned>,
    /// The node failed because the node named here, computed in the same pass, failed: its
    /// error is that node's to report.
    pub with: Option<String>,
    /// Inputs that failed verification when the node was about to read them (moved to
    /// quarantine): the node did not run; the run computes them again, then the node.
    pub corrupt_inputs: Vec<Key>,
    /// The GPU the executor gave the node (a plain `cuda` node spread over the run's GPUs),
    /// for the run record.
    pub device: Option<String>,
}

/// Computes batches of ready nodes somewhere, and says when they are done.
///
/// A batch is one or more nodes of one declared stage that share their inputs (a batching
/// stage such as `extract` computes several layers in one pass). Every node handed to
/// [`Executor::start`] comes back exactly once from [`Executor::wait`].
pub trait Executor {
    /// True when no more batches may start now (the worker pool or the job limit is used up).
    fn full(&self) -> bool;

    /// Starts computing `batch` (ready nodes of `plan`), or queues it until [`Executor::flush`].
    fn start(&mut self, plan: &Plan, batch: Vec<Node>);

    /// Called once the ready batches of a scheduling round were handed over: an executor that
    /// groups work (SLURM job arrays) submits it here.
    fn flush(&mut self) {}

    /// Blocks until at least one started node finished and returns every node that has; empty
    /// only when nothing is in flight.
    fn wait(&mut self) -> Vec<Done>;
}
