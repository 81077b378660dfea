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

mod cache;
mod record;
mod run;

use cache::{cache_cmd, list_some};
use record::{compare_cmd, report_cmd};
use run::{ExecutorChoice, NodeChoice, run_cmd, run_node_cmd};

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
        /// Run record directory [default: runs/EXPERIMENT/TIMESTAMP beside the file]
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
        /// A run directory (runs/EXPERIMENT/TIMESTAMP)
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
    let gpus = crate::gpus::Gpus::from_env(args.devices.as_deref(), registry.gpu_probe())
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
