//! The contract between the engine and a stage kind.
//!
//! A stage kind is a pure function from (typed parameters, input artifacts) to an output
//! artifact: it parses its own parameters, says what it reads and produces, may fan out into
//! several nodes (a layer sweep), and computes into a directory the engine gives it. It never
//! decides whether it is cached and never writes anywhere else: the engine owns keys, locks,
//! commits and scheduling.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use probex_cache::Key;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::digest::FileDigests;
pub use crate::params::{InputHelp, KindHelp, ParamHelp, ParamsDoc};
pub use crate::shape::{PathError, PlanFacts, PlanInput, Shape};

/// What stage kinds return on failure: any error with context, printed with its chain.
pub type StageResult<T> = anyhow::Result<T>;

pub use crate::param_error::ParamError;

/// One input a stage kind accepts, identified by the artifact type it reads.
#[derive(Clone, Debug)]
pub struct InputSlot {
    /// Artifact type read (the `output()` of the upstream kind), e.g. `"layer"`.
    pub ty: &'static str,
    /// Whether an experiment must name an upstream of this type.
    pub required: bool,
    /// Whether several upstream stages of this type may be named (`from = ["a", "b"]`).
    pub many: bool,
    /// Whether a fanned-out upstream is consumed whole (one node reads every element, as
    /// `select` does) instead of element by element.
    pub gather: bool,
}

impl InputSlot {
    /// Exactly one upstream of type `ty`, consumed element by element.
    pub fn one(ty: &'static str) -> Self {
        InputSlot {
            ty,
            required: true,
            many: false,
            gather: false,
        }
    }

    /// At most one upstream of type `ty`.
    pub fn optional(ty: &'static str) -> Self {
        InputSlot {
            ty,
            required: false,
            many: false,
            gather: false,
        }
    }

    /// One or more upstream stages of type `ty`.
    pub fn many(ty: &'static str) -> Self {
        InputSlot {
            ty,
            required: true,
            many: true,
            gather: false,
        }
    }

    /// Consumes the whole fan-out of its upstream in one node.
    pub fn gathered(mut self) -> Self {
        self.gather = true;
        self
    }
}

/// How one declared stage turns into nodes beyond the engine's own `for_each` sweeps.
#[derive(Debug)]
pub enum Sweep<P> {
    /// One node (the common case).
    One,
    /// The stage fans out but needs its inputs materialised to know how (`layers = "all"`
    /// reads the models' tensor names). The engine plans it again once they are.
    NeedsInputs,
    /// One node per value along a new coordinate `dim`, in order: (value label, params).
    Many {
        /// The coordinate's name, e.g. `"layer"`.
        dim: &'static str,
        /// One entry per node: the coordinate value as shown to users, and that node's params.
        nodes: Vec<(String, P)>,
    },
    /// One node per point of a grid of new coordinates, in order: (one value per coordinate,
    /// params). `extract` over a routed collection sweeps `tree` x `layer` this way, because
    /// each tree resolves its own layers.
    Grid {
        /// The coordinates' names, e.g. `["tree", "layer"]`.
        dims: Vec<&'static str>,
        /// One entry per node: its value along each of `dims`, and its params.
        nodes: Vec<(Vec<String>, P)>,
    },
}

/// Which shared device a node occupies while it runs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    /// CPU only; many may run at once (bounded by `--jobs`).
    Cpu,
    /// One accelerator (by name, e.g. `cuda:0`); nodes on the same one never overlap.
    Gpu(String),
    /// One accelerator, whichever of the run's GPUs is free (the device asked for is plain
    /// `cuda`): the executor picks it and the stage finds its name in
    /// [`RunContext::device`]. See [`crate::gpus`].
    AnyGpu,
}

/// What a finished node reports besides its files.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Outcome {
    /// Free-form facts stored in the manifest and handed to downstream stages with the artifact
    /// (a layer dataset's shape, a probe's parameter count).
    pub meta: Value,
    /// Numbers collected into the run's `results.json` and checked by `expect`.
    pub results: Option<Value>,
    /// A human-readable table printed at the end of `probex run` and kept in the run record.
    pub summary: Option<String>,
    /// Files (relative to the output directory) copied into the run record.
    pub publish: Vec<String>,
    /// Files outside the output directory that its files refer to, with the stamps the stage
    /// read them under, such as model files a layer dataset reads in place: the cache keeps
    /// the entries holding them and treats this one as stale once a stamp changes.
    pub references: Vec<probex_cache::Referent>,
}

/// The coordinates of a node in a fan-out, e.g. `[("layer", "59")]`.
pub type Coords = Vec<(String, String)>;

/// A finished upstream artifact, as a stage sees it.
#[derive(Clone, Debug)]
pub struct Artifact {
    /// The upstream node's name (`probe[layer=59]`).
    pub node: String,
    /// The declared stage it belongs to (`probe`): nodes of one sweep share it.
    pub stage: String,
    /// Its cache key.
    pub key: Key,
    /// The directory holding its files (read-only).
    pub dir: PathBuf,
    /// Its coordinates.
    pub coords: Coords,
    /// The `meta` its stage returned.
    pub meta: Value,
    /// The `results` its stage returned, if any.
    pub results: Option<Value>,
}

/// The artifacts a node reads, grouped by input slot.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    slots: BTreeMap<&'static str, Vec<Artifact>>,
}

impl Inputs {
    /// Builds inputs from (slot type, artifacts) pairs.
    pub fn new(slots: impl IntoIterator<Item = (&'static str, Vec<Artifact>)>) -> Self {
        Inputs {
            slots: slots.into_iter().collect(),
        }
    }

    /// Every artifact of every slot.
    pub fn iter(&self) -> impl Iterator<Item = &Artifact> {
        self.slots.values().flatten()
    }

    /// Every artifact of slot `ty` (empty if none was declared).
    pub fn all(&self, ty: &str) -> &[Artifact] {
        self.slots.get(ty).map_or(&[], Vec::as_slice)
    }

    /// The single artifact of slot `ty`; an error if there is none or several.
    pub fn one(&self, ty: &str) -> StageResult<&Artifact> {
        match self.all(ty) {
            [a] => Ok(a),
            [] => anyhow::bail!("no `{ty}` input (name one in `from`)"),
            many => anyhow::bail!("{} `{ty}` inputs where one was expected", many.len()),
        }
    }

    /// The artifact of slot `ty` if one was declared.
    pub fn optional(&self, ty: &str) -> StageResult<Option<&Artifact>> {
        match self.all(ty) {
            [] => Ok(None),
            [a] => Ok(Some(a)),
            many => anyhow::bail!(
                "{} `{ty}` inputs where at most one was expected",
                many.len()
            ),
        }
    }
}

/// What a stage may ask of the engine while it is planned (before it runs).
pub struct PlanContext<'a> {
    /// Directory of the experiment file: relative paths in params resolve against it.
    pub base_dir: &'a Path,
    /// Digests of local files, kept fast by a stat cache.
    pub digests: &'a FileDigests,
    /// When set, stages must not touch the network (only what is cached locally).
    pub offline: bool,
}

/// Receives progress of running nodes; the engine draws bars or prints lines from it.
pub trait ProgressSink: Send + Sync {
    /// `node` has done `done` of `total` units, with an optional short message.
    fn progress(&self, node: &str, done: u64, total: u64, message: &str);

    /// A line the person running `node` should see (it resumed from a checkpoint, it skipped
    /// models); by default dropped.
    fn note(&self, _node: &str, _message: &str) {}
}

/// What a running stage may use: its output and work directories, settings, logging,
/// progress and cancellation.
pub struct RunContext<'a> {
    node: String,
    out_dir: PathBuf,
    work_dir: PathBuf,
    /// Whether `work_dir` was made (or why not), on the first ask.
    work_made: std::sync::OnceLock<Result<(), String>>,
    base_dir: PathBuf,
    device: Option<String>,
    threads: usize,
    offline: bool,
    log: Arc<Mutex<Option<File>>>,
    log_error: Mutex<Option<String>>,
    warnings: Mutex<Vec<String>>,
    progress: &'a dyn ProgressSink,
    cancel: &'a AtomicBool,
    started: Instant,
    digests: Option<&'a FileDigests>,
    own_digests: FileDigests,
}

impl<'a> RunContext<'a> {
    /// Builds a context; the engine calls this, tests of stage kinds may too.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node: String,
        out_dir: PathBuf,
        work_dir: PathBuf,
        base_dir: PathBuf,
        device: Option<String>,
        threads: usize,
        offline: bool,
        log: Option<File>,
        progress: &'a dyn ProgressSink,
        cancel: &'a AtomicBool,
    ) -> Self {
        RunContext {
            node,
            out_dir,
            work_dir,
            work_made: std::sync::OnceLock::new(),
            base_dir,
            device,
            threads: threads.max(1),
            offline,
            log: Arc::new(Mutex::new(log)),
            log_error: Mutex::new(None),
            warnings: Mutex::new(Vec::new()),
            progress,
            cancel,
            started: Instant::now(),
            digests: None,
            own_digests: FileDigests::in_memory(),
        }
    }

    /// Shares the run's stat cache of file digests, which planning filled (a `fetch` from a
    /// folder hashes every model file for its key), so a stage that needs a file's digest
    /// gets it without reading the file again.
    pub fn with_digests(mut self, digests: &'a FileDigests) -> Self {
        self.digests = Some(digests);
        self
    }

    /// Digests of local files: the run's stat cache, or one of this node's own.
    pub fn digests(&self) -> &FileDigests {
        self.digests.unwrap_or(&self.own_digests)
    }

    /// The node's name (`probe[layer=59]`).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Where the stage writes its output files. Everything in it becomes the artifact.
    pub fn out_dir(&self) -> &Path {
        &self.out_dir
    }

    /// A directory that survives a crash for the same key: checkpoints for resuming. Made on
    /// the first call (most nodes never ask, and a directory made and removed for each node
    /// of a batch of hundreds costs two inode operations each); removed when the node commits.
    pub fn work_dir(&self) -> std::io::Result<&Path> {
        let made = self
            .work_made
            .get_or_init(|| std::fs::create_dir_all(&self.work_dir).map_err(|e| e.to_string()));
        match made {
            Ok(()) => Ok(&self.work_dir),
            Err(e) => Err(std::io::Error::other(format!(
                "cannot create the work directory {}: {e}",
                self.work_dir.display()
            ))),
        }
    }

    /// Directory of the experiment file, for relative paths in params.
    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    /// The device asked for (`--device` or the stage's `device`), if any; for a node whose
    /// resource is [`Resource::AnyGpu`], the GPU the executor gave it (`cuda:1`).
    pub fn device(&self) -> Option<&str> {
        self.device.as_deref()
    }

    /// How many threads this node may use.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Whether the network is off limits.
    pub fn offline(&self) -> bool {
        self.offline
    }

    /// Appends a line to the node's log. A stage never fails for a log line; the first write
    /// error is kept for the engine ([`RunContext::log_error`]), which fails the run record.
    pub fn log(&self, line: impl AsRef<str>) {
        if let Ok(mut guard) = self.log.lock()
            && let Some(f) = guard.as_mut()
        {
            let t = self.started.elapsed().as_secs_f64();
            if let Err(e) = writeln!(f, "[{t:8.2}s] {}", line.as_ref())
                && let Ok(mut first) = self.log_error.lock()
            {
                first.get_or_insert_with(|| e.to_string());
            }
        }
    }

    /// The first error writing the node's log, if any.
    pub fn log_error(&self) -> Option<String> {
        self.log_error.lock().ok().and_then(|e| e.clone())
    }

    /// Logs `line` and shows it on the terminal too: for what the person running the
    /// experiment should know (a resume from a checkpoint, models skipped), not for progress.
    pub fn note(&self, line: impl AsRef<str>) {
        self.log(line.as_ref());
        self.progress.note(&self.node, line.as_ref());
    }

    /// Warns about the artifact being made (models left out, files passed over): logged,
    /// shown on the terminal, and kept with the artifact, so every run's summary and report
    /// that uses it says it again, cached or not. Say how many and where the list is.
    pub fn warn(&self, message: impl AsRef<str>) {
        let message = message.as_ref();
        self.log(format!("warning: {message}"));
        self.progress
            .note(&self.node, &format!("warning: {message}"));
        if let Ok(mut w) = self.warnings.lock() {
            w.push(message.to_string());
        }
    }

    /// What [`RunContext::warn`] said so far.
    pub fn warnings(&self) -> Vec<String> {
        self.warnings.lock().map(|w| w.clone()).unwrap_or_default()
    }

    /// Reports progress: `done` of `total` units.
    pub fn progress(&self, done: u64, total: u64, message: &str) {
        self.progress.progress(&self.node, done, total, message);
    }

    /// True once the user asked to stop (Ctrl-C) or a failure stops the run.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Returns [`Cancelled`] if the run was cancelled; call between units of work and pass the
    /// error on (`?`), so the engine reports the node as stopped rather than failed.
    pub fn check_cancelled(&self) -> StageResult<()> {
        if self.is_cancelled() {
            return Err(Cancelled.into());
        }
        Ok(())
    }
}

/// A stage's error with its causes, as `{:#}` prints it (`outer: cause: root`), except that a
/// cause whose text an outer message already holds is not said again: many error types put
/// their `source` in their own message too (`{path}: {source}`), and a full disk read
/// "File too large: File too large".
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// The error of a stage that stopped because the run was cancelled (Ctrl-C, or another node
/// failed without `--keep-going`): the node did not fail, it was not finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cancelled")
    }
}

impl std::error::Error for Cancelled {}

/// The error a batching stage gives the other nodes of a batch that failed as one (one bad
/// model file fails every layer read in the same pass): the engine reports the error once, on
/// the node named here, and the others as failed with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailedWith(pub String);

impl std::fmt::Display for FailedWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "failed with {} (computed in the same pass)", self.0)
    }
}

impl std::error::Error for FailedWith {}

/// One kind of stage. Implementations parse `Params` with `#[serde(deny_unknown_fields)]`
/// and defaults filled in: the canonical encoding of the parsed params is part of the key.
pub trait Stage: Send + Sync + 'static {
    /// The parameters of one node, as written in the stage's TOML table.
    type Params: DeserializeOwned + Serialize + Clone + Debug + Send + Sync + 'static;

    /// The `kind = "..."` name.
    fn kind(&self) -> &'static str;

    /// Bump when the output of the same params changes meaning: invalidates this kind's entries.
    fn version(&self) -> u32;

    /// One line for `probex kinds` and error messages.
    fn about(&self) -> &'static str;

    /// One line per param, and the params a stage cannot do without, for `probex kinds KIND`.
    /// The names must be exactly the fields `Params` accepts (less the keys the engine reads
    /// itself, such as `threads`); the defaults shown are computed from `Params`, never
    /// written here. Default: nothing documented.
    fn params_doc(&self) -> ParamsDoc {
        ParamsDoc::default()
    }

    /// The artifact type this kind produces, which downstream input slots name.
    fn output(&self) -> &'static str;

    /// The artifact type of one configured stage of this kind. Most kinds always produce
    /// [`Stage::output`]; a kind whose params choose what it makes (`fetch` of models or of a
    /// package) says so here, and the engine types `from` links with it.
    fn output_for(&self, _p: &Self::Params) -> &'static str {
        self.output()
    }

    /// The inputs this kind reads.
    fn inputs(&self) -> Vec<InputSlot>;

    /// Checks that go beyond types (ranges, combinations). Blame a key with
    /// [`ParamError::at`] and the error points at its value in the experiment file.
    fn check(&self, _params: &Self::Params) -> Result<(), ParamError> {
        Ok(())
    }

    /// What this stage's nodes will report ([`PlanFacts::results`], against which the engine
    /// checks expectation paths) and what the stages reading it need to know, as far as its
    /// params and its inputs' facts say; `inputs` lists every upstream stage in `from` order.
    /// Called when the experiment is loaded, in topological order. An error is a mistake in
    /// the experiment (a path this stage reads that its inputs will not report), shown at the
    /// value of the key it blames ([`ParamError::at`]; its top-level key), else at the stage.
    /// Default: nothing known, nothing checked.
    fn plan_facts(
        &self,
        _params: &Self::Params,
        _inputs: &[PlanInput<'_>],
    ) -> Result<PlanFacts, ParamError> {
        Ok(PlanFacts::default())
    }

    /// How the stage fans out by itself (layers of a model). `inputs` is `None` until the
    /// upstream artifacts exist.
    fn sweep(
        &self,
        _params: &Self::Params,
        _inputs: Option<&Inputs>,
    ) -> StageResult<Sweep<Self::Params>> {
        Ok(Sweep::One)
    }

    /// For source stages: a digest of what they read (file contents, a pinned commit), which
    /// joins the key so that changed sources rerun.
    fn identity(&self, _params: &Self::Params, _cx: &PlanContext) -> StageResult<Option<String>> {
        Ok(None)
    }

    /// Which shared device the node occupies, given the requested device.
    fn resource(&self, _params: &Self::Params, _device: Option<&str>) -> Resource {
        Resource::Cpu
    }

    /// Whether ready nodes of one declared stage with the same inputs should be handed to
    /// [`Stage::run_batch`] together (extract reads every model file once for all layers).
    fn batches(&self) -> bool {
        false
    }

    /// Whether this kind may gang nodes ([`Stage::gang`]): only then does the scheduler read
    /// a ready node's inputs to ask for its gang key. A kind that gangs is never batched by
    /// [`Stage::batches`].
    fn gangs(&self) -> bool {
        false
    }

    /// The gang of a ready node: nodes of one declared stage whose keys are equal may be
    /// computed together by [`Stage::run_gang`] although their inputs differ (the layers of
    /// one shape train as one batched problem). `None`: the node runs alone. Ganging is how
    /// nodes run, never what they are: each keeps its own key, lock and cache entry, so the
    /// key must only group nodes whose results do not depend on their company.
    fn gang(&self, _params: &Self::Params, _inputs: &Inputs) -> Option<String> {
        None
    }

    /// How many nodes of a gang may run in one call (device memory), given one member's
    /// params and inputs and the device asked for; larger gangs are split. At least 1.
    fn gang_limit(&self, _params: &Self::Params, _inputs: &Inputs, _device: Option<&str>) -> usize {
        usize::MAX
    }

    /// Computes one node into `cx.out_dir()`.
    fn run(&self, params: &Self::Params, inputs: &Inputs, cx: &RunContext) -> StageResult<Outcome>;

    /// Computes the nodes of one gang, each with its own params, inputs and context; one
    /// result per job, in order. By default one after another.
    fn run_gang(
        &self,
        jobs: &[(&Self::Params, &Inputs, &RunContext)],
    ) -> Vec<StageResult<Outcome>> {
        jobs.iter()
            .map(|(p, inputs, cx)| self.run(p, inputs, cx))
            .collect()
    }

    /// Computes several nodes that share their inputs; by default one after another.
    fn run_batch(
        &self,
        jobs: &[(&Self::Params, &RunContext)],
        inputs: &Inputs,
    ) -> Vec<StageResult<Outcome>> {
        jobs.iter().map(|(p, cx)| self.run(p, inputs, cx)).collect()
    }
}

/// Parsed params of some kind, with their canonical JSON encoding (sorted keys), which is what
/// enters the key and what `plan` compares to explain a rerun.
#[derive(Clone, Debug)]
pub struct ParamBox {
    value: Arc<dyn Any + Send + Sync>,
    canonical: Value,
}

impl ParamBox {
    fn new<P: Serialize + Send + Sync + 'static>(p: P) -> Result<Self, serde_json::Error> {
        let canonical = serde_json::to_value(&p)?;
        Ok(ParamBox {
            value: Arc::new(p),
            canonical: crate::key::canonical(canonical),
        })
    }

    /// The canonical JSON of the params.
    pub fn canonical(&self) -> &Value {
        &self.canonical
    }

    fn get<P: 'static>(&self) -> &P {
        self.value
            .downcast_ref::<P>()
            .expect("params are always created by the kind that reads them")
    }
}

/// A stage kind with its parameter type erased, so the engine can hold every kind in one
/// registry.
pub(crate) trait DynStage: Send + Sync {
    fn kind(&self) -> &'static str;
    fn version(&self) -> u32;
    fn about(&self) -> &'static str;
    fn params_doc(&self) -> ParamsDoc;
    fn param_fields(&self) -> Option<Vec<&'static str>>;
    fn params_help(&self) -> Result<Vec<ParamHelp>, crate::params::HelpError>;
    fn output(&self) -> &'static str;
    fn output_for(&self, p: &ParamBox) -> &'static str;
    fn inputs(&self) -> Vec<InputSlot>;
    fn parse(&self, de: toml::de::ValueDeserializer<'_>) -> Result<ParamBox, toml::de::Error>;
    fn check(&self, p: &ParamBox) -> Result<(), ParamError>;
    fn plan_facts(&self, p: &ParamBox, inputs: &[PlanInput<'_>]) -> Result<PlanFacts, ParamError>;
    fn sweep(&self, p: &ParamBox, inputs: Option<&Inputs>) -> StageResult<Sweep<ParamBox>>;
    fn identity(&self, p: &ParamBox, cx: &PlanContext) -> StageResult<Option<String>>;
    fn resource(&self, p: &ParamBox, device: Option<&str>) -> Resource;
    fn batches(&self) -> bool;
    fn gangs(&self) -> bool;
    fn gang(&self, p: &ParamBox, inputs: &Inputs) -> Option<String>;
    fn gang_limit(&self, p: &ParamBox, inputs: &Inputs, device: Option<&str>) -> usize;
    fn run_batch(
        &self,
        jobs: &[(&ParamBox, &RunContext)],
        inputs: &Inputs,
    ) -> Vec<StageResult<Outcome>>;
    fn run_gang(&self, jobs: &[(&ParamBox, &Inputs, &RunContext)]) -> Vec<StageResult<Outcome>>;
}

impl<S: Stage> DynStage for S {
    fn kind(&self) -> &'static str {
        Stage::kind(self)
    }
    fn version(&self) -> u32 {
        Stage::version(self)
    }
    fn about(&self) -> &'static str {
        Stage::about(self)
    }
    fn params_doc(&self) -> ParamsDoc {
        Stage::params_doc(self)
    }
    fn param_fields(&self) -> Option<Vec<&'static str>> {
        crate::params::field_names::<S::Params>().map(|names| {
            names
                .into_iter()
                .filter(|n| !crate::params::is_engine_key(n))
                .collect()
        })
    }
    fn params_help(&self) -> Result<Vec<ParamHelp>, crate::params::HelpError> {
        crate::params::help::<S::Params>(&Stage::params_doc(self), &crate::params::engine_keys())
    }
    fn output(&self) -> &'static str {
        Stage::output(self)
    }
    fn output_for(&self, p: &ParamBox) -> &'static str {
        Stage::output_for(self, p.get::<S::Params>())
    }
    fn inputs(&self) -> Vec<InputSlot> {
        Stage::inputs(self)
    }
    fn parse(&self, de: toml::de::ValueDeserializer<'_>) -> Result<ParamBox, toml::de::Error> {
        let p = S::Params::deserialize(de)?;
        ParamBox::new(p).map_err(<toml::de::Error as serde::de::Error>::custom)
    }
    fn check(&self, p: &ParamBox) -> Result<(), ParamError> {
        Stage::check(self, p.get::<S::Params>())
    }
    fn plan_facts(&self, p: &ParamBox, inputs: &[PlanInput<'_>]) -> Result<PlanFacts, ParamError> {
        Stage::plan_facts(self, p.get::<S::Params>(), inputs)
    }
    fn sweep(&self, p: &ParamBox, inputs: Option<&Inputs>) -> StageResult<Sweep<ParamBox>> {
        Ok(match Stage::sweep(self, p.get::<S::Params>(), inputs)? {
            Sweep::One => Sweep::One,
            Sweep::NeedsInputs => Sweep::NeedsInputs,
            Sweep::Many { dim, nodes } => Sweep::Many {
                dim,
                nodes: nodes
                    .into_iter()
                    .map(|(label, p)| Ok((label, ParamBox::new(p)?)))
                    .collect::<StageResult<_>>()?,
            },
            Sweep::Grid { dims, nodes } => Sweep::Grid {
                dims,
                nodes: nodes
                    .into_iter()
                    .map(|(values, p)| Ok((values, ParamBox::new(p)?)))
                    .collect::<StageResult<_>>()?,
            },
        })
    }
    fn identity(&self, p: &ParamBox, cx: &PlanContext) -> StageResult<Option<String>> {
        Stage::identity(self, p.get::<S::Params>(), cx)
    }
    fn resource(&self, p: &ParamBox, device: Option<&str>) -> Resource {
        Stage::resource(self, p.get::<S::Params>(), device)
    }
    fn batches(&self) -> bool {
        Stage::batches(self)
    }
    fn gangs(&self) -> bool {
        Stage::gangs(self)
    }
    fn gang(&self, p: &ParamBox, inputs: &Inputs) -> Option<String> {
        Stage::gang(self, p.get::<S::Params>(), inputs)
    }
    fn gang_limit(&self, p: &ParamBox, inputs: &Inputs, device: Option<&str>) -> usize {
        Stage::gang_limit(self, p.get::<S::Params>(), inputs, device).max(1)
    }
    fn run_gang(&self, jobs: &[(&ParamBox, &Inputs, &RunContext)]) -> Vec<StageResult<Outcome>> {
        let typed: Vec<(&S::Params, &Inputs, &RunContext)> = jobs
            .iter()
            .map(|(p, inputs, cx)| (p.get::<S::Params>(), *inputs, *cx))
            .collect();
        if let [(p, inputs, cx)] = typed[..] {
            return vec![Stage::run(self, p, inputs, cx)];
        }
        Stage::run_gang(self, &typed)
    }
    fn run_batch(
        &self,
        jobs: &[(&ParamBox, &RunContext)],
        inputs: &Inputs,
    ) -> Vec<StageResult<Outcome>> {
        let typed: Vec<(&S::Params, &RunContext)> = jobs
            .iter()
            .map(|(p, cx)| (p.get::<S::Params>(), *cx))
            .collect();
        if typed.len() == 1 {
            let (p, cx) = typed[0];
            return vec![Stage::run(self, p, inputs, cx)];
        }
        Stage::run_batch(self, &typed, inputs)
    }
}

use serde::Deserialize as _;

/// Counts the GPUs the stage library can use (a `cuda` build asks the driver), or says why it
/// cannot.
pub type GpuProbe = fn() -> Result<usize, GpuProbeError>;

/// Why a [`GpuProbe`] cannot count the GPUs (the stage library's own error, boxed: the engine
/// only shows it).
pub type GpuProbeError = Box<dyn std::error::Error + Send + Sync>;

/// Every stage kind the engine can run, by name.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn DynStage>>,
    gpu_probe: Option<GpuProbe>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a kind; a later kind with the same name replaces the earlier one.
    pub fn register<S: Stage>(&mut self, stage: S) -> &mut Self {
        self.kinds.insert(Stage::kind(&stage), Arc::new(stage));
        self
    }

    /// Sets how to count the GPUs the kinds can use, asked when a run's plain `cuda` nodes
    /// need a GPU and nothing lists them (the engine knows no GPU library; the kinds' does).
    pub fn set_gpu_probe(&mut self, probe: GpuProbe) -> &mut Self {
        self.gpu_probe = Some(probe);
        self
    }

    /// The probe [`Registry::set_gpu_probe`] set, if any.
    pub fn gpu_probe(&self) -> Option<GpuProbe> {
        self.gpu_probe
    }

    pub(crate) fn get(&self, kind: &str) -> Option<&Arc<dyn DynStage>> {
        self.kinds.get(kind)
    }

    /// Names and one-line descriptions of every kind, sorted.
    pub fn describe(&self) -> Vec<(&'static str, &'static str)> {
        self.kinds.values().map(|k| (k.kind(), k.about())).collect()
    }

    /// Names of every kind, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.kinds.keys().copied().collect()
    }

    /// The fields a kind's params accept (as its `Deserialize` reads them), less the keys the
    /// engine reads itself; `None` for an unknown kind, or params that are not a plain struct.
    pub fn param_fields(&self, kind: &str) -> Option<Vec<&'static str>> {
        self.kinds.get(kind).and_then(|k| k.param_fields())
    }

    /// What a kind documents of its params ([`Stage::params_doc`]).
    pub fn params_doc(&self, kind: &str) -> Option<ParamsDoc> {
        self.kinds.get(kind).map(|k| k.params_doc())
    }

    /// Everything `probex kinds KIND` says of a kind; `None` for an unknown kind. An error is
    /// a kind whose documented example does not parse as its params (a bug of the kind).
    pub fn help(&self, kind: &str) -> Option<Result<KindHelp, crate::params::HelpError>> {
        let k = self.kinds.get(kind)?;
        Some(k.params_help().map(|params| {
            KindHelp {
                kind: k.kind(),
                about: k.about(),
                version: k.version(),
                output: k.output(),
                inputs: k
                    .inputs()
                    .into_iter()
                    .map(|s| InputHelp {
                        ty: s.ty,
                        required: s.required,
                        many: s.many,
                        gather: s.gather,
                    })
                    .collect(),
                example: k.params_doc().example,
                params,
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::error_text;

    struct Quiet;
    impl super::ProgressSink for Quiet {
        fn progress(&self, _: &str, _: u64, _: u64, _: &str) {}
    }

    /// The engine hands a node the path of its work directory; the directory exists only
    /// once the stage asks for it (most nodes never do), and an unusable one is an error.
    #[test]
    fn the_work_directory_is_made_when_asked_for() {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().join("work").join("key");
        let cancel = std::sync::atomic::AtomicBool::new(false);
        let context = |work: std::path::PathBuf| {
            super::RunContext::new(
                "n".into(),
                tmp.path().join("out"),
                work,
                tmp.path().to_path_buf(),
                None,
                1,
                true,
                None,
                &Quiet,
                &cancel,
            )
        };
        let cx = context(work.clone());
        assert!(!work.exists());
        assert_eq!(cx.work_dir().unwrap(), work.as_path());
        assert!(work.is_dir());
        let blocked = tmp.path().join("file");
        std::fs::write(&blocked, b"").unwrap();
        let cx = context(blocked.join("key"));
        let e = cx.work_dir().unwrap_err().to_string();
        assert!(e.contains("cannot create the work directory"), "{e}");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("{path}: {source}")]
    struct Io {
        path: String,
        source: std::io::Error,
    }

    #[test]
    fn a_cause_already_said_is_not_said_again() {
        let io = Io {
            path: "out/layer.safetensors".into(),
            source: std::io::Error::other("No space left on device"),
        };
        let e = anyhow::Error::new(io).context("extracting layer 3");
        assert_eq!(
            error_text(&e),
            "extracting layer 3: out/layer.safetensors: No space left on device"
        );
        assert_eq!(format!("{e:#}").matches("No space").count(), 2);
        let plain = anyhow::anyhow!("root").context("outer");
        assert_eq!(error_text(&plain), "outer: root");
    }
}
