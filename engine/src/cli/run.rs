//! `probex run` (here or on SLURM) and the hidden `run-node` a SLURM job runs.

use super::*;

/// `run`'s executor flags.
pub(super) struct ExecutorChoice {
    pub(super) executor: ExecutorArg,
    pub(super) config: Option<PathBuf>,
    pub(super) retries: Option<u32>,
    pub(super) jobs: Option<usize>,
}

/// `run-node`'s flags.
pub(super) struct NodeChoice {
    pub(super) nodes: Vec<String>,
    pub(super) batches: Option<PathBuf>,
    pub(super) index: Option<usize>,
    pub(super) out: PathBuf,
    pub(super) threads: Option<usize>,
    pub(super) progress: ProgressMode,
}

/// The SLURM options of a run, from its flags and the executor settings.
pub(super) fn slurm_options(
    args: &PlanArgs,
    planner: &Planner,
    config: SlurmConfig,
    exec: &ExecutorChoice,
    threads: Option<usize>,
) -> Result<SlurmOptions, String> {
    Commands::new().check().map_err(|e| e.to_string())?;
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

pub(super) fn run_cmd(
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

pub(super) fn run_node_cmd(
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
