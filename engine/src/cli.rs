//! The engine's commands (`run`, `plan`, `show`, `cache`, `report`, `compare`, `kinds`, and
//! the hidden `run-node` a SLURM job runs), shared by the `probex` binary and anything else
//! that embeds the engine with its own stage kinds.
//!
//! Exit codes (the README has the table): 0 success; 1 the work failed (a stage, an
//! expectation, writing the run record or the cache); 2 bad input or usage; 130 interrupted.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand, ValueEnum};
use probex_cache::{GcPolicy, Key, Store, Verified};
use serde_json::Value;

use crate::digest::FileDigests;
use crate::executor::node::{NodeOutcome, run_nodes};
use crate::executor::slurm::commands::Commands;
use crate::executor::slurm::config::SlurmConfig;
use crate::executor::slurm::script::{BatchFile, NodeRef};
use crate::executor::slurm::{
    DEFAULT_CACHE_WAIT_SECONDS, DEFAULT_MAX_JOBS, DEFAULT_POLL_SECONDS, DEFAULT_RETRIES,
    SlurmOptions, absolute,
};
use crate::history::History;
use crate::plan::{Overrides, Planner};
use crate::progress::{ProgressMode, Reporter};
use crate::record::{RunDir, files};
use crate::report::NodeState;
use crate::run::RunOptions;
use crate::stage::{PlanContext, Registry};
use crate::status::human;

/// Exit code: everything worked and every expectation held.
pub const EXIT_OK: i32 = 0;
/// Exit code: the work failed: a stage, an expectation, or writing the run record or cache.
pub const EXIT_FAILED: i32 = 1;
/// Exit code: bad input (experiment file, flags, cache directory).
pub const EXIT_USAGE: i32 = 2;
/// Exit code: stopped by Ctrl-C.
pub const EXIT_INTERRUPTED: i32 = 130;

/// Why a command stopped early: the message (printed as is) and the exit code.
#[derive(Debug)]
pub struct Failure {
    /// The exit code: [`EXIT_USAGE`] for bad input, [`EXIT_FAILED`] when the work failed.
    pub code: i32,
    /// What went wrong, for stderr.
    pub message: String,
}

impl Failure {
    /// The work failed (a full disk, an incomplete run record): exit 1.
    pub fn failed(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_FAILED,
            message: message.into(),
        }
    }
}

/// Bad input: exit 2.
impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure {
            code: EXIT_USAGE,
            message,
        }
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        message.to_string().into()
    }
}

impl From<crate::run::RunError> for Failure {
    fn from(e: crate::run::RunError) -> Self {
        let code = match e {
            crate::run::RunError::Invalid(_) => EXIT_USAGE,
            crate::run::RunError::Record(_) => EXIT_FAILED,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

/// Where the artifact cache is.
#[derive(Args, Clone, Debug)]
pub struct CacheArgs {
    /// Artifact cache directory [default: $PROBEX_CACHE, else the user cache dir]
    #[arg(long, global = true, value_name = "DIR")]
    pub cache: Option<PathBuf>,
}

impl CacheArgs {
    /// The cache directory asked for.
    pub fn root(&self) -> PathBuf {
        self.cache.clone().unwrap_or_else(Store::default_root)
    }

    /// Opens the store, creating it if needed, or explains why it cannot.
    pub fn open(&self) -> Result<Store, String> {
        let root = self.root();
        Store::open(&root).map_err(|e| format!("cannot open the cache at {}: {e}", root.display()))
    }

    /// Opens a store that must already exist: the commands that only inspect or clean a cache
    /// (`cache ls`, `verify`, `gc`) never create one where a mistyped `--cache` points.
    pub fn open_existing(&self) -> Result<Store, String> {
        let root = self.root();
        if !root.is_dir() {
            return Err(format!(
                "no cache at {}: the directory does not exist\n  = help: check --cache or PROBEX_CACHE; `probex run` creates the cache",
                root.display()
            ));
        }
        self.open()
    }
}

/// Settings shared by `run` and `plan`.
#[derive(Args, Clone, Debug)]
pub struct PlanArgs {
    /// The experiment file
    pub file: PathBuf,
    /// Run every stage on this device (cpu, cuda, cuda:N); not part of cache keys
    #[arg(long)]
    pub device: Option<String>,
    /// GPUs that nodes on plain `cuda` spread over, one node per GPU at a time (cuda:0,cuda:1
    /// or 0,1) [default: $PROBEX_DEVICES, else CUDA_VISIBLE_DEVICES, else every GPU CUDA
    /// reports]; not part of cache keys
    #[arg(long, value_name = "LIST")]
    pub devices: Option<String>,
    /// Use only what is cached or local; never touch the network (also HF_HUB_OFFLINE=1)
    #[arg(long)]
    pub offline: bool,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

/// Progress display.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ProgressArg {
    /// Bars on a terminal, lines otherwise.
    Auto,
    /// Plain lines.
    Plain,
    /// Nothing but errors.
    Quiet,
}

impl ProgressArg {
    fn mode(self) -> ProgressMode {
        match self {
            ProgressArg::Auto => ProgressMode::Auto,
            ProgressArg::Plain => ProgressMode::Plain,
            ProgressArg::Quiet => ProgressMode::Quiet,
        }
    }
}

/// Where `run` computes nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExecutorArg {
    /// Threads of this process.
    Local,
    /// One SLURM job per ready node (job arrays for sweeps), over a shared cache directory.
    Slurm,
}

/// The engine's subcommands.
#[derive(Subcommand, Debug)]
pub enum EngineCommand {
    /// Run an experiment: compute what is not cached, write a run record, check expectations
    Run {
        /// The experiment file and the settings shared with `plan`.
        #[command(flatten)]
        plan: PlanArgs,
        /// Nodes to run at once [default: number of CPUs; with --executor slurm, jobs in the
        /// queue at once: max_jobs or 100]
        #[arg(short, long)]
        jobs: Option<usize>,
        /// Threads per node when its stage does not say [default: CPUs / jobs]
        #[arg(long)]
        threads: Option<usize>,
        /// Keep running independent nodes after a failure
        #[arg(long)]
        keep_going: bool,
        /// Run record directory [default: runs/<experiment>/<timestamp> beside the file]
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Progress display
        #[arg(long, value_enum, default_value = "auto")]
        progress: ProgressArg,
        /// Where nodes are computed: threads here, or jobs of a SLURM cluster sharing the cache
        #[arg(long, value_enum, default_value = "local")]
        executor: ExecutorArg,
        /// SLURM settings ([executor.slurm] tables), over the experiment's own
        #[arg(long, value_name = "FILE")]
        executor_config: Option<PathBuf>,
        /// Resubmissions of a SLURM job that was cancelled, preempted or timed out [default: 2]
        #[arg(long, value_name = "N")]
        retries: Option<u32>,
    },
    /// Compute chosen nodes of an experiment in this process (what a SLURM job runs)
    #[command(hide = true)]
    RunNode {
        /// The experiment file and the settings shared with `plan`.
        #[command(flatten)]
        plan: PlanArgs,
        /// A node, by name (repeatable; together they must form one batch)
        #[arg(long = "node", value_name = "NAME")]
        nodes: Vec<String>,
        /// A batch file written by `run --executor slurm`: a JSON list of batches
        #[arg(
            long,
            value_name = "FILE",
            requires = "index",
            conflicts_with = "nodes"
        )]
        batches: Option<PathBuf>,
        /// Which batch of --batches to compute (the array task index)
        #[arg(long)]
        index: Option<usize>,
        /// The run record that node logs go into
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Threads for the nodes [default: the CPUs this process may use]
        #[arg(long)]
        threads: Option<usize>,
        /// Progress display
        #[arg(long, value_enum, default_value = "plain")]
        progress: ProgressArg,
    },
    /// Show every node of an experiment: cached, or will run and why. Cached means a valid
    /// manifest; files are re-hashed when a node reads them, and by `cache verify`
    Plan {
        /// The experiment file and the settings shared with `plan`.
        #[command(flatten)]
        plan: PlanArgs,
    },
    /// Show one node: its key, whether it is cached (and if not, why it would run), where its
    /// artifact is, its files and its results
    Show {
        /// The experiment file and the settings shared with `plan`.
        #[command(flatten)]
        plan: PlanArgs,
        /// The node, as `probex plan` names it (`probe[layer=5]`)
        node: String,
    },
    /// Inspect and maintain the artifact cache
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Print the report of a finished run
    Report {
        /// A run directory (runs/<experiment>/<timestamp>)
        run: PathBuf,
    },
    /// Compare the results of two runs
    Compare {
        /// First run directory
        a: PathBuf,
        /// Second run directory
        b: PathBuf,
    },
    /// List the stage kinds this build knows; with a kind, its inputs and params with their
    /// defaults and meaning
    Kinds {
        /// A kind to describe (`train`)
        kind: Option<String>,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
}

/// `probex cache ...`
#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// List entries
    Ls {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every entry; report and quarantine bad ones
    Verify,
    /// Remove entries no given experiment uses, or older than some days
    Gc {
        /// Keep entries used by these experiment files (others are removed)
        #[arg(long, value_name = "FILE", num_args = 1..)]
        keep: Vec<PathBuf>,
        /// Remove entries older than this many days
        #[arg(long, value_name = "DAYS")]
        older_than: Option<f64>,
    },
    /// Print the cache directory
    Path,
}

/// Runs one engine command and returns the exit code. `cancel` is set by the caller's Ctrl-C
/// handler.
pub fn dispatch(
    cmd: EngineCommand,
    cache: &CacheArgs,
    registry: &Registry,
    cancel: Arc<AtomicBool>,
) -> i32 {
    let result = match cmd {
        EngineCommand::Run {
            plan,
            jobs,
            threads,
            keep_going,
            out,
            progress,
            executor,
            executor_config,
            retries,
        } => {
            let opts = RunOptions {
                jobs: jobs.unwrap_or_else(|| RunOptions::default().jobs),
                keep_going,
                threads,
                progress: progress.mode(),
                cancel,
            };
            let exec = ExecutorChoice {
                executor,
                config: executor_config,
                retries,
                jobs,
            };
            run_cmd(&plan, cache, registry, &opts, out.as_deref(), &exec)
        }
        EngineCommand::RunNode {
            plan,
            nodes,
            batches,
            index,
            out,
            threads,
            progress,
        } => run_node_cmd(
            &plan,
            cache,
            registry,
            &NodeChoice {
                nodes,
                batches,
                index,
                out,
                threads,
                progress: progress.mode(),
            },
            &cancel,
        ),
        EngineCommand::Plan { plan } => plan_cmd(&plan, cache, registry),
        EngineCommand::Show { plan, node } => show_cmd(&plan, &node, cache, registry),
        EngineCommand::Cache(c) => cache_cmd(c, cache, registry),
        EngineCommand::Report { run } => report_cmd(&run),
        EngineCommand::Compare { a, b } => compare_cmd(&a, &b),
        EngineCommand::Kinds { kind, json } => kinds_cmd(kind.as_deref(), json, registry),
    };
    let code = match result {
        Ok(code) => code,
        Err(Failure { code, message }) => {
            // Every error starts the same way, whichever layer worded it.
            if !message.starts_with("error") {
                crate::err!("error: ");
            }
            crate::err!("{message}");
            if !message.ends_with('\n') {
                crate::errln!();
            }
            code
        }
    };
    crate::console::finish(code)
}

fn offline(flag: bool) -> bool {
    flag || std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Loads and plans; calls `f` with the planner.
fn with_planner<T>(
    args: &PlanArgs,
    cache: &CacheArgs,
    registry: &Registry,
    plan_only: bool,
    f: impl FnOnce(&Planner, &Store) -> Result<T, Failure>,
) -> Result<T, Failure> {
    if let Some(d) = args
        .device
        .as_deref()
        .filter(|d| !crate::experiment::valid_device(d))
    {
        return Err(format!(
            "error: --device {d}: not a device\n  = help: use cpu, cuda or cuda:N"
        )
        .into());
    }
    let gpus = crate::executor::gpus::Gpus::from_env(args.devices.as_deref(), registry.gpu_probe())
        .map_err(|e| format!("error: {e}"))?;
    let exp = crate::experiment::load(&args.file, registry).map_err(|d| d.to_string())?;
    let store = cache.open()?;
    let digests = FileDigests::open(store.root().join("statcache.json"));
    let cx = PlanContext {
        base_dir: &exp.base_dir,
        digests: &digests,
        offline: offline(args.offline),
    };
    let planner = Planner::new(
        &exp,
        &store,
        cx,
        Overrides {
            device: args.device.clone(),
            gpus,
            unresolved_ok: plan_only,
        },
    );
    let out = f(&planner, &store);
    let _ = digests.save();
    out
}

fn plan_cmd(args: &PlanArgs, cache: &CacheArgs, registry: &Registry) -> Result<i32, Failure> {
    with_planner(args, cache, registry, true, |planner, store| {
        let plan = planner.plan().map_err(|d| d.to_string())?;
        let history = History::open(store, &planner.experiment().path);
        let view = crate::status::rows(&plan, planner.experiment(), store, &history);
        if args.json {
            crate::outln!(
                "{}",
                serde_json::to_string_pretty(&view).map_err(|e| e.to_string())?
            );
        } else {
            crate::out!("{}", crate::status::render_plan(&view));
        }
        Ok(EXIT_OK)
    })
}

fn kinds_cmd(kind: Option<&str>, json: bool, registry: &Registry) -> Result<i32, Failure> {
    let Some(kind) = kind else {
        if json {
            let rows: Vec<Value> = registry
                .describe()
                .into_iter()
                .map(|(kind, about)| serde_json::json!({"kind": kind, "about": about}))
                .collect();
            crate::outln!(
                "{}",
                serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?
            );
        } else {
            for (kind, about) in registry.describe() {
                crate::outln!("{kind:<12} {about}");
            }
        }
        return Ok(EXIT_OK);
    };
    let Some(help) = registry.help(kind) else {
        let names = registry.names();
        let close = crate::experiment::closest_n(kind, names.iter().copied(), 3);
        let hint = match close.first() {
            Some(c) => format!("did you mean `{c}`?"),
            None => format!("kinds: {}", names.join(", ")),
        };
        return Err(format!("no stage kind `{kind}`\n  = help: {hint}").into());
    };
    let help = help.map_err(|e| Failure::failed(format!("kind `{kind}`: {e}")))?;
    if json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&help).map_err(|e| e.to_string())?
        );
    } else {
        crate::out!("{}", crate::params::render(&help));
    }
    Ok(EXIT_OK)
}

fn show_cmd(
    args: &PlanArgs,
    node: &str,
    cache: &CacheArgs,
    registry: &Registry,
) -> Result<i32, Failure> {
    with_planner(args, cache, registry, true, |planner, store| {
        let plan = planner.plan().map_err(|d| d.to_string())?;
        let view = crate::show::show(&plan, planner.experiment(), store, node)
            .map_err(|e| e.to_string())?;
        if args.json {
            crate::outln!(
                "{}",
                serde_json::to_string_pretty(&view).map_err(|e| e.to_string())?
            );
        } else {
            crate::out!("{}", crate::show::render(&view));
        }
        Ok(EXIT_OK)
    })
}

/// `run`'s executor flags.
struct ExecutorChoice {
    executor: ExecutorArg,
    config: Option<PathBuf>,
    retries: Option<u32>,
    jobs: Option<usize>,
}

/// `run-node`'s flags.
struct NodeChoice {
    nodes: Vec<String>,
    batches: Option<PathBuf>,
    index: Option<usize>,
    out: PathBuf,
    threads: Option<usize>,
    progress: ProgressMode,
}

/// The SLURM options of a run, from its flags and the executor settings.
fn slurm_options(
    args: &PlanArgs,
    planner: &Planner,
    config: SlurmConfig,
    exec: &ExecutorChoice,
    threads: Option<usize>,
) -> Result<SlurmOptions, String> {
    Commands::new().check()?;
    let probex = match &config.probex {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(|e| {
            format!(
                "cannot tell where the probex binary is ({e}); set `probex` in [executor.slurm]"
            )
        })?,
    };
    Ok(SlurmOptions {
        probex,
        experiment: absolute(&planner.experiment().path),
        cache: absolute(planner.store().root()),
        device: args.device.clone(),
        offline: offline(args.offline),
        threads,
        max_jobs: exec
            .jobs
            .or(config.max_jobs.map(|m| m.get()))
            .unwrap_or(DEFAULT_MAX_JOBS)
            .max(1),
        retries: exec.retries.or(config.retries).unwrap_or(DEFAULT_RETRIES),
        poll: config.poll_seconds.map_or_else(
            || Duration::from_secs_f64(DEFAULT_POLL_SECONDS),
            |p| p.duration(),
        ),
        cache_wait: config.cache_wait_seconds.map_or_else(
            || Duration::from_secs_f64(DEFAULT_CACHE_WAIT_SECONDS),
            |w| w.duration(),
        ),
        config,
    })
}

fn run_cmd(
    args: &PlanArgs,
    cache: &CacheArgs,
    registry: &Registry,
    opts: &RunOptions,
    out: Option<&Path>,
    exec: &ExecutorChoice,
) -> Result<i32, Failure> {
    with_planner(args, cache, registry, false, |planner, _| {
        let exp = planner.experiment();
        // Checked on every run, so a mistake in the settings shows before they are needed.
        let config =
            crate::executor::slurm::config::load(exp, exec.config.as_deref(), &registry.names())
                .map_err(|d| d.to_string())?;
        let slurm = match exec.executor {
            ExecutorArg::Slurm => Some(slurm_options(args, planner, config, exec, opts.threads)?),
            ExecutorArg::Local => None,
        };
        let run_dir = RunDir::create(exp, out).map_err(|e| {
            Failure::failed(format!(
                "error: cannot create the run directory {e}\n  = help: free some space or give another directory with --out"
            ))
        })?;
        let report = match &slurm {
            Some(s) => crate::run::run_slurm(planner, &run_dir, opts, s),
            None => crate::run::run(planner, &run_dir, opts),
        }?;
        if args.json {
            crate::outln!(
                "{}",
                serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
            );
        } else {
            for (node, summary) in &report.summaries {
                crate::outln!("\n== {node} ==\n{}", summary.trim_end());
            }
            if !report.expectations.is_empty() {
                crate::outln!("\nexpectations:");
                for c in &report.expectations {
                    let actual = c
                        .actual
                        .map_or_else(|| "missing".into(), |a| format!("{a:.4}"));
                    let mark = if c.pass { "ok" } else { "MISSED" };
                    crate::outln!(
                        "  {mark:<6} {} = {actual} (expected {}){}",
                        c.path,
                        c.expected,
                        c.note.as_ref().map_or(String::new(), |n| format!(": {n}"))
                    );
                }
            }
            for f in report.failures() {
                if let NodeState::Failed(e) = &f.state {
                    crate::errln!("\nerror: stage {} failed: {e}", f.node);
                    let with: Vec<&str> = report
                        .failed_with(&f.node)
                        .map(|n| n.node.as_str())
                        .collect();
                    if !with.is_empty() {
                        crate::errln!(
                            "  = note: {} more node(s) computed in the same pass failed with it: {}",
                            with.len(),
                            list_some(&with, 6)
                        );
                    }
                }
            }
            if !report.warnings.is_empty() {
                crate::outln!("\nwarnings:");
                for w in &report.warnings {
                    let nodes: Vec<&str> = w.nodes.iter().map(String::as_str).collect();
                    crate::outln!("  {}: {}", list_some(&nodes, 3), w.message);
                    if let Some(files) = &w.files {
                        crate::outln!("    files: {}", files.display());
                    }
                }
            }
            let interrupted: Vec<&str> = report
                .nodes
                .iter()
                .filter(|n| n.state == NodeState::Interrupted)
                .map(|n| n.node.as_str())
                .collect();
            if !interrupted.is_empty() {
                crate::errln!(
                    "note: interrupted while running: {}; run again to finish (they resume where they keep checkpoints)",
                    interrupted.join(", ")
                );
            }
            if !report.cancelled {
                for p in &report.never_planned {
                    crate::errln!("note: stage {p} never ran (its inputs did not complete)");
                }
            }
            if !report.record_errors.is_empty() {
                crate::errln!(
                    "\nerror: the run record {} is incomplete:",
                    report.run_dir.display()
                );
                for e in &report.record_errors {
                    crate::errln!("  {e}");
                }
                crate::errln!("  = help: free some space, or give another directory with --out");
            }
            let ran = report
                .nodes
                .iter()
                .filter(|n| n.state == NodeState::Ran)
                .count();
            let cached = report
                .nodes
                .iter()
                .filter(|n| n.state == NodeState::Cached)
                .count();
            crate::outln!(
                "\n{}: {} nodes ({ran} computed, {cached} cached) in {:.1}s; record: {}",
                if report.success() {
                    "ok"
                } else if report.cancelled {
                    "interrupted"
                } else {
                    "FAILED"
                },
                report.nodes.len(),
                report.seconds,
                report.run_dir.display()
            );
        }
        Ok(if report.cancelled && report.record_errors.is_empty() {
            EXIT_INTERRUPTED
        } else if report.success() {
            EXIT_OK
        } else {
            EXIT_FAILED
        })
    })
}

fn run_node_cmd(
    args: &PlanArgs,
    cache: &CacheArgs,
    registry: &Registry,
    choice: &NodeChoice,
    cancel: &AtomicBool,
) -> Result<i32, Failure> {
    let wanted: Vec<NodeRef> = match (&choice.batches, choice.index) {
        (Some(file), Some(i)) => {
            let bytes = std::fs::read(file)
                .map_err(|e| format!("cannot read batch file {}: {e}", file.display()))?;
            let batches: BatchFile = serde_json::from_slice(&bytes)
                .map_err(|e| format!("{}: not a batch file: {e}", file.display()))?;
            let n = batches.len();
            batches
                .into_iter()
                .nth(i)
                .ok_or_else(|| format!("{}: no batch {i} (it has {n})", file.display()))?
        }
        _ if !choice.nodes.is_empty() => choice
            .nodes
            .iter()
            .map(|n| NodeRef {
                node: n.clone(),
                key: String::new(),
            })
            .collect(),
        _ => return Err("error: give --node NAME, or --batches FILE --index I".into()),
    };
    with_planner(args, cache, registry, false, |planner, store| {
        let run_dir = RunDir::create(planner.experiment(), Some(&choice.out))
            .map_err(|e| Failure::failed(format!("error: cannot create the run directory {e}")))?;
        let reporter = Reporter::new(choice.progress, wanted.len() as u64);
        let threads = choice
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        reporter.println(&format!(
            "probex run-node: {} of {} with cache {}",
            wanted
                .iter()
                .map(|w| w.node.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            planner.experiment().path.display(),
            store.root().display()
        ));
        let outcomes = run_nodes(planner, &run_dir, &reporter, cancel, threads, &wanted)
            .map_err(|e| format!("error: {e}"))?;
        reporter.finish();
        let mut code = EXIT_OK;
        for (node, outcome) in &outcomes {
            match outcome {
                NodeOutcome::Failed(e) => {
                    crate::errln!("error: stage {node} failed: {e}");
                    code = EXIT_FAILED;
                }
                NodeOutcome::Stopped if code == EXIT_OK => code = EXIT_INTERRUPTED,
                _ => {}
            }
        }
        Ok(code)
    })
}

fn cache_cmd(cmd: CacheCommand, cache: &CacheArgs, registry: &Registry) -> Result<i32, Failure> {
    if let CacheCommand::Path = cmd {
        // Where it is or would be; asking must not create it.
        let root = cache.root();
        let shown = std::fs::canonicalize(&root)
            .or_else(|_| std::path::absolute(&root))
            .unwrap_or(root);
        crate::outln!("{}", shown.display());
        return Ok(EXIT_OK);
    }
    let store = cache.open_existing()?;
    match cmd {
        CacheCommand::Path => {}
        CacheCommand::Ls { json } => {
            let entries = store.list().map_err(|e| e.to_string())?;
            if json {
                let rows: Vec<Value> = entries
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "key": e.key.to_string(), "kind": e.manifest.kind, "node": e.manifest.label,
                            "bytes": e.size(), "created_unix": e.manifest.created_unix,
                        })
                    })
                    .collect();
                crate::outln!(
                    "{}",
                    serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?
                );
            } else {
                let total: u64 = entries.iter().map(|e| e.size()).sum();
                for e in &entries {
                    crate::outln!(
                        "{}  {:<9} {:>10}  {}",
                        &e.key.as_str()[..12],
                        e.manifest.kind,
                        human(e.size()),
                        e.manifest.label
                    );
                }
                crate::outln!("{} entries, {}", entries.len(), human(total));
                print_leftovers(&store)?;
            }
        }
        CacheCommand::Verify => {
            let results = store.verify_all().map_err(|e| e.to_string())?;
            let bad: Vec<_> = results
                .iter()
                .filter(|(_, v)| matches!(v, Verified::Corrupt(_)))
                .collect();
            for (k, v) in &bad {
                if let Verified::Corrupt(problems) = v {
                    crate::outln!("corrupt {k}:");
                    for p in problems {
                        crate::outln!("  {p}");
                    }
                }
            }
            crate::outln!(
                "{} entries verified, {} corrupt (quarantined)",
                results.len(),
                bad.len()
            );
            print_leftovers(&store)?;
            return Ok(if bad.is_empty() { EXIT_OK } else { EXIT_FAILED });
        }
        CacheCommand::Gc { keep, older_than } => {
            let keep_set = if keep.is_empty() {
                None
            } else {
                let mut set = HashSet::new();
                for file in &keep {
                    set.extend(keys_of(file, &store, registry)?);
                }
                Some(set)
            };
            let older = match older_than {
                Some(days) if days.is_finite() && days >= 0.0 => {
                    Some(SystemTime::now() - Duration::from_secs_f64(days * 86_400.0))
                }
                Some(days) => {
                    return Err(format!("--older-than {days}: give a number of days >= 0").into());
                }
                None => None,
            };
            let report = store
                .gc(&GcPolicy {
                    keep: keep_set,
                    older_than: older,
                })
                .map_err(|e| e.to_string())?;
            crate::outln!(
                "removed {} entries, {} staging dirs of dead runs; freed {}",
                report.removed.len(),
                report.tmp_cleaned,
                human(report.freed_bytes),
            );
            if !report.kept_referenced.is_empty() {
                crate::outln!(
                    "kept {} entries that kept entries read in place (the model files under \
                     their layer datasets)",
                    report.kept_referenced.len()
                );
            }
            if !report.skipped_in_use.is_empty() {
                let label = |k: &Key| match store.get(k) {
                    Ok(Some(e)) => e.manifest.label,
                    _ => k.as_str()[..12].to_string(),
                };
                let shown: Vec<String> = report.skipped_in_use.iter().take(8).map(label).collect();
                let more = report.skipped_in_use.len() - shown.len();
                crate::outln!(
                    "kept {} entries in use by a running probex (being computed, or read by a live run): {}{}",
                    report.skipped_in_use.len(),
                    shown.join(", "),
                    if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    }
                );
                crate::outln!(
                    "  = help: run gc again once those runs have finished to remove them"
                );
            }
        }
    }
    Ok(EXIT_OK)
}

/// Says what lies in the cache beside its entries, and what removes it (nothing when empty).
fn print_leftovers(store: &Store) -> Result<(), Failure> {
    let l = store
        .leftovers()
        .map_err(|e| Failure::failed(format!("error: {e}")))?;
    if l.dead_staging > 0 || l.stale_scratch_bytes > 0 {
        crate::outln!(
            "reclaimable: {} ({} staging folder(s) of killed runs, {} scratch of finished nodes); `probex cache gc` removes it, as does the next run for the staging",
            human(l.reclaimable_bytes()),
            l.dead_staging,
            human(l.stale_scratch_bytes),
        );
    }
    if l.quarantined > 0 {
        crate::outln!(
            "quarantined: {} entr{} that failed verification ({}); `probex cache gc --older-than DAYS` removes them",
            l.quarantined,
            if l.quarantined == 1 { "y" } else { "ies" },
            human(l.quarantined_bytes),
        );
    }
    if l.resumable_bytes > 0 {
        crate::outln!(
            "resumable: {} of checkpoints of unfinished nodes (kept for the next run)",
            human(l.resumable_bytes)
        );
    }
    Ok(())
}

/// Every key an experiment's current plan references.
fn keys_of(file: &Path, store: &Store, registry: &Registry) -> Result<Vec<Key>, String> {
    let exp = crate::experiment::load(file, registry).map_err(|d| d.to_string())?;
    let digests = FileDigests::open(store.root().join("statcache.json"));
    let cx = PlanContext {
        base_dir: &exp.base_dir,
        digests: &digests,
        offline: true,
    };
    let planner = Planner::new(&exp, store, cx, Overrides::default());
    let plan = planner.plan().map_err(|d| d.to_string())?;
    Ok(plan.nodes.into_iter().map(|n| n.key).collect())
}

/// `a, b, c and N more`: the first `n` items of a long list.
fn list_some(items: &[&str], n: usize) -> String {
    let shown = items[..items.len().min(n)].join(", ");
    match items.len().saturating_sub(n) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

/// Reads a JSON file of a run record; an empty, truncated or missing file is an error that
/// says the record is incomplete rather than a parse error.
fn read_record_json(run: &Path, name: &str) -> Result<Value, String> {
    let path = run.join(name);
    let incomplete = |why: String| {
        format!(
            "error: {} is not a complete run record: {why}\n  = help: give a run directory (runs/<experiment>/<timestamp>); a run whose disk filled up or that was killed before it finished has no complete record, run it again",
            run.display()
        )
    };
    let bytes = std::fs::read(&path).map_err(|e| incomplete(format!("{}: {e}", path.display())))?;
    if bytes.is_empty() {
        return Err(incomplete(format!("{} is empty", path.display())));
    }
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| incomplete(format!("{}: {e}", path.display())))?;
    if !v.is_object() {
        return Err(incomplete(format!(
            "{} is not a JSON object",
            path.display()
        )));
    }
    Ok(v)
}

fn report_cmd(run: &Path) -> Result<i32, Failure> {
    // status.json is written last: a record without a whole one is not finished.
    read_record_json(run, files::STATUS)?;
    let path = run.join(files::REPORT);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "error: cannot read {}: {e}\n  = help: give a run directory (runs/<experiment>/<timestamp>)",
            path.display()
        )
    })?;
    if text.trim().is_empty() {
        return Err(format!(
            "error: {} is empty: the run record is incomplete\n  = help: run the experiment again",
            path.display()
        )
        .into());
    }
    crate::out!("{text}");
    Ok(EXIT_OK)
}

fn read_results(run: &Path) -> Result<BTreeMap<String, f64>, String> {
    let v = read_record_json(run, files::RESULTS)?;
    let mut out = BTreeMap::new();
    flatten("", v.get("results").unwrap_or(&Value::Null), &mut out);
    Ok(out)
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, f64>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                flatten(
                    &if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    },
                    x,
                    out,
                );
            }
        }
        Value::Number(n) => {
            if let Some(f) = n.as_f64() {
                out.insert(prefix.to_string(), f);
            }
        }
        _ => {}
    }
}

fn compare_cmd(a: &Path, b: &Path) -> Result<i32, Failure> {
    let (ra, rb) = (read_results(a)?, read_results(b)?);
    let mut keys: Vec<&String> = ra.keys().chain(rb.keys()).collect();
    keys.sort();
    keys.dedup();
    let width = keys.iter().map(|k| k.len()).max().unwrap_or(4);
    crate::outln!(
        "{:<width$}  {:>12}  {:>12}  {:>10}",
        "result",
        "a",
        "b",
        "b - a"
    );
    let mut differ = 0;
    for k in keys {
        let (x, y) = (ra.get(k), rb.get(k));
        if x == y {
            continue;
        }
        differ += 1;
        let f = |v: Option<&f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"));
        let d = match (x, y) {
            (Some(x), Some(y)) => format!("{:+.4}", y - x),
            _ => String::new(),
        };
        crate::outln!("{k:<width$}  {:>12}  {:>12}  {d:>10}", f(x), f(y));
    }
    crate::outln!(
        "{differ} results differ ({} in a, {} in b)",
        ra.len(),
        rb.len()
    );
    Ok(EXIT_OK)
}
