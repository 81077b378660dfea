//! The SLURM executor: ready nodes become jobs of a SLURM cluster that share this run's cache
//! directory (it must be on a filesystem every node sees).
//!
//! The ready batches of one scheduling round are grouped by declared stage, and each group is
//! submitted as one job array whose task `i` runs `probex run-node` on batch `i`
//! ([`script`]). This process then watches the queue ([`commands`]) and, when a task ends,
//! asks the cache (not the exit code) whether its nodes landed: a node in the cache is done
//! whatever SLURM says. A task cancelled by someone else, preempted, out of time or lost with
//! its machine is resubmitted (at most `retries` times; the node resumes from its checkpoint
//! in the cache's work directory); a failed one fails its nodes with the job id and the path
//! of the job's log. Ctrl-C cancels every job this run submitted.
//!
//! Jobs compute their nodes under the same key locks and atomic commits as local runs, so two
//! runs, or a run and a job resubmitted by hand, never compute a node twice; and a batch whose
//! keys are all locked by another process is not submitted until that process lets go, so no
//! allocation sits idle waiting for a lock.

pub mod commands;
pub mod config;
pub mod script;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use probex_cache::Key;

use self::commands::{Commands, State, TaskId, classify};
use self::config::SlurmConfig;
use self::script::{BatchFile, JobScript, NodeRef};
use super::{Done, Executor};
use crate::plan::{Node, Plan, Planner, StoredOutcome};
use crate::progress::Reporter;
use crate::record::{RunDir, file_safe};

/// Jobs in the queue at once when neither `max_jobs` nor `--jobs` says.
pub const DEFAULT_MAX_JOBS: usize = 100;
/// Resubmissions of an interrupted job when neither `retries` nor `--retries` says.
pub const DEFAULT_RETRIES: u32 = 2;
/// Seconds between looks at the queue when `poll_seconds` does not say.
pub const DEFAULT_POLL_SECONDS: f64 = 5.0;
/// Seconds a completed job's entry may take to show here when `cache_wait_seconds` does not
/// say: NFS clients cache directory attributes for up to a minute by default.
pub const DEFAULT_CACHE_WAIT_SECONDS: f64 = 60.0;
/// Tasks per submitted array: SLURM's default `MaxArraySize` is 1001.
const MAX_ARRAY: usize = 1000;
/// How long SLURM's queue may be unreadable (a controller restarting) before the run gives up.
const MAX_UNREADABLE: Duration = Duration::from_secs(600);
/// A job SLURM does not list yet is not taken for lost before this long after submission.
const GRACE: Duration = Duration::from_secs(30);

/// Everything a SLURM run needs besides the plan.
#[derive(Clone, Debug)]
pub struct SlurmOptions {
    /// Settings from the experiment's `[executor.slurm]` and `--executor-config`.
    pub config: SlurmConfig,
    /// The probex binary jobs run.
    pub probex: PathBuf,
    /// The experiment file, absolute (jobs plan it again).
    pub experiment: PathBuf,
    /// The cache, absolute.
    pub cache: PathBuf,
    /// `--device`, passed on to jobs.
    pub device: Option<String>,
    /// `--offline`, passed on to jobs.
    pub offline: bool,
    /// `--threads`, passed on to jobs.
    pub threads: Option<usize>,
    /// Jobs of this run in the queue at once.
    pub max_jobs: usize,
    /// Resubmissions of an interrupted job.
    pub retries: u32,
    /// Time between looks at the queue.
    pub poll: Duration,
    /// How long a completed job's entry may take to show in the cache here.
    pub cache_wait: Duration,
}

/// One task of a submitted array: one batch of nodes.
#[derive(Debug)]
struct Task {
    id: TaskId,
    stage: usize,
    nodes: Vec<NodeRef>,
    keys: Vec<Key>,
    /// The job's log (`%A_%a` resolved).
    log: PathBuf,
    /// Submissions so far, this one included.
    tries: u32,
    submitted: Instant,
    /// Whether SLURM listed it at least once.
    seen: bool,
    /// The last pending reason reported, so each is printed once.
    reason: String,
    /// When SLURM first said it completed while its nodes were not in the cache yet.
    completed: Option<Instant>,
}

/// Submits batches as job arrays and tracks them; see the module docs.
pub struct Slurm<'a> {
    planner: &'a Planner<'a>,
    reporter: &'a Reporter,
    cancel: &'a AtomicBool,
    opts: &'a SlurmOptions,
    /// The run record, absolute: jobs start elsewhere.
    record: PathBuf,
    commands: Commands,
    /// Batches handed over this round, submitted by `flush`.
    queued: Vec<Vec<Node>>,
    /// Batches whose every node another process is computing (its key is locked): they are
    /// not submitted while that lasts, so no allocation sits waiting for a lock.
    elsewhere: Vec<(usize, Vec<NodeRef>, Vec<Key>)>,
    tasks: Vec<Task>,
    finished: Vec<Done>,
    submissions: usize,
    last_poll: Instant,
    /// Since when the queue could not be read, if it cannot.
    unreadable_since: Option<Instant>,
}

impl<'a> Slurm<'a> {
    /// An executor for one run.
    pub fn new(
        planner: &'a Planner<'a>,
        run_dir: &'a RunDir,
        reporter: &'a Reporter,
        cancel: &'a AtomicBool,
        opts: &'a SlurmOptions,
    ) -> Self {
        Slurm {
            planner,
            reporter,
            cancel,
            opts,
            record: absolute(run_dir.path()),
            commands: Commands::new(),
            queued: Vec::new(),
            elsewhere: Vec::new(),
            tasks: Vec::new(),
            finished: Vec::new(),
            submissions: 0,
            last_poll: Instant::now(),
            unreadable_since: None,
        }
    }

    fn slurm_dir(&self) -> PathBuf {
        self.record.join("slurm")
    }

    /// Submits one array of `batches` (all of declared stage `stage`); on failure every node
    /// of them fails with SLURM's answer.
    fn submit(&mut self, stage: usize, batches: Vec<Vec<NodeRef>>, tries: u32) {
        let keys: Vec<Vec<Key>> = batches
            .iter()
            .map(|b| b.iter().filter_map(|n| Key::parse(&n.key).ok()).collect())
            .collect();
        match self.write_and_submit(stage, &batches) {
            Ok((job, pattern)) => {
                let name = &self.planner.experiment().stages[stage].name;
                let what = if batches.len() == 1 {
                    batches[0]
                        .iter()
                        .map(|n| n.node.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                } else {
                    format!("{} tasks", batches.len())
                };
                self.reporter.println(&format!(
                    "slurm: submitted job {job} for {name} ({what}); logs {}",
                    pattern.display()
                ));
                let now = Instant::now();
                for (i, (nodes, keys)) in batches.into_iter().zip(keys).enumerate() {
                    let log = log_of(&pattern, job, i as u32);
                    self.tasks.push(Task {
                        id: (job, i as u32),
                        stage,
                        nodes,
                        keys,
                        log,
                        tries,
                        submitted: now,
                        seen: false,
                        reason: String::new(),
                        completed: None,
                    });
                }
            }
            Err(e) => {
                for keys in keys {
                    for key in keys {
                        self.finished.push(Done {
                            key,
                            result: Err(format!("cannot submit to SLURM: {e}")),
                            seconds: 0.0,
                            computed: false,
                            stopped: false,
                            pin: None,
                            with: None,
                            corrupt_inputs: Vec::new(),
                            device: None,
                        });
                    }
                }
            }
        }
    }

    /// Writes the batch file and the job script of the next submission, submits it, and
    /// returns the job id and the log pattern.
    fn write_and_submit(
        &mut self,
        stage: usize,
        batches: &BatchFile,
    ) -> Result<(u64, PathBuf), String> {
        let exp = self.planner.experiment();
        let decl = &exp.stages[stage];
        self.submissions += 1;
        let dir = self.slurm_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let base = format!("{}-{}", file_safe(&decl.name), self.submissions);
        let batch_file = dir.join(format!("{base}.json"));
        let json = serde_json::to_vec_pretty(batches).map_err(|e| e.to_string())?;
        std::fs::write(&batch_file, json)
            .map_err(|e| format!("cannot write {}: {e}", batch_file.display()))?;

        let resources = self.opts.config.resources(&decl.name, &decl.kind);
        let mut args = vec![
            "--cache".to_string(),
            self.opts.cache.display().to_string(),
            "run-node".to_string(),
            self.opts.experiment.display().to_string(),
            "--batches".to_string(),
            batch_file.display().to_string(),
            "--out".to_string(),
            self.record.display().to_string(),
            "--progress".to_string(),
            "plain".to_string(),
        ];
        if let Some(d) = &self.opts.device {
            args.extend(["--device".to_string(), d.clone()]);
        }
        if self.opts.offline {
            args.push("--offline".to_string());
        }
        let threads = self
            .opts
            .threads
            .or(resources.cpus.map(|c| c.get() as usize));
        if let Some(t) = threads {
            args.extend(["--threads".to_string(), t.to_string()]);
        }
        let pattern = dir.join(format!("{}-%A_%a.out", file_safe(&decl.name)));
        let script = JobScript {
            name: job_name(&exp.name, &decl.name),
            tasks: batches.len(),
            output: pattern.clone(),
            resources: &resources,
            probex: &self.opts.probex,
            args,
        };
        let script_path = dir.join(format!("{base}.sh"));
        std::fs::write(&script_path, script.render())
            .map_err(|e| format!("cannot write {}: {e}", script_path.display()))?;
        let job = self
            .commands
            .submit(&script_path)
            .map_err(|e| e.to_string())?;
        Ok((job, pattern))
    }

    /// Looks at the queue once and settles every task that ended.
    fn poll(&mut self) {
        self.last_poll = Instant::now();
        let jobs: Vec<u64> = self
            .tasks
            .iter()
            .map(|t| t.id.0)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let states = match self.commands.states(&jobs) {
            Ok(s) => {
                if self.unreadable_since.take().is_some() {
                    self.reporter.println("slurm: the queue can be read again");
                }
                s
            }
            Err(e) => {
                // Said once per outage, at its first failed look (not by timing: how long
                // `squeue` takes to fail varies, so a time window could say it twice).
                let first = self.unreadable_since.is_none();
                let since = *self.unreadable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= MAX_UNREADABLE {
                    self.give_up(&format!(
                        "SLURM's queue could not be read for {} minutes: {e}",
                        MAX_UNREADABLE.as_secs() / 60
                    ));
                } else if first {
                    // The jobs keep running meanwhile.
                    self.reporter.println(&format!(
                        "slurm: cannot read the queue (trying again for {} minutes): {e}",
                        MAX_UNREADABLE.as_secs() / 60
                    ));
                }
                return;
            }
        };
        let tasks = std::mem::take(&mut self.tasks);
        for mut task in tasks {
            let seen = states.get(&task.id);
            let state = match seen {
                Some((state, reason)) => {
                    task.seen = true;
                    match classify(state) {
                        State::Active => {
                            self.note_pending(&mut task, state, reason);
                            self.tasks.push(task);
                            continue;
                        }
                        _ => state.clone(),
                    }
                }
                // SLURM may not list a job in the first moments after sbatch returned.
                None if !task.seen && task.submitted.elapsed() < GRACE => {
                    self.tasks.push(task);
                    continue;
                }
                None => String::new(),
            };
            self.settle(task, &state);
        }
    }

    /// Prints why a task waits in the queue when the reason is one a person should see (a
    /// partition limit, a held job), once per reason.
    fn note_pending(&self, task: &mut Task, state: &str, reason: &str) {
        const ORDINARY: [&str; 8] = [
            "None",
            "Priority",
            "Resources",
            "JobArrayTaskLimit",
            "BeginTime",
            "Dependency",
            "Prolog",
            "",
        ];
        if state == "PENDING" && !ORDINARY.contains(&reason) && task.reason != reason {
            self.reporter.println(&format!(
                "slurm: job {} ({}) is pending: {reason}",
                task_name(task.id),
                names(&task.nodes)
            ));
        }
        task.reason = reason.to_string();
    }

    /// A task ended (or vanished, when `state` is empty): its nodes that are in the cache are
    /// done; the others are resubmitted or fail, depending on how it ended.
    fn settle(&mut self, mut task: Task, state: &str) {
        let store = self.planner.store();
        let mut missing = Vec::new();
        for (node, key) in task.nodes.iter().zip(&task.keys) {
            match store.get(key) {
                Ok(Some(entry)) => self.finished.push(Done {
                    key: key.clone(),
                    seconds: StoredOutcome::of(&entry).seconds,
                    result: Ok(entry),
                    computed: true,
                    stopped: false,
                    pin: None,
                    with: None,
                    corrupt_inputs: Vec::new(),
                    device: None,
                }),
                _ => missing.push((node.clone(), key.clone())),
            }
        }
        if missing.is_empty() {
            return;
        }
        if classify(state) == State::Completed {
            // A shared filesystem may show the job's commit here a little later.
            let since = *task.completed.get_or_insert_with(Instant::now);
            if since.elapsed() < self.opts.cache_wait {
                (task.nodes, task.keys) = missing.into_iter().unzip();
                self.tasks.push(task);
                return;
            }
        }
        let id = task_name(task.id);
        let log = task.log.display();
        let class = if state.is_empty() {
            // Gone from squeue (and sacct) without a final state: treated like a lost node.
            State::Interrupted
        } else {
            classify(state)
        };
        let how = if state.is_empty() {
            "left the queue without a final state".to_string()
        } else {
            format!("ended {state}")
        };
        let error = match class {
            State::Interrupted if task.tries <= self.opts.retries => {
                let nodes: Vec<NodeRef> = missing.iter().map(|(n, _)| n.clone()).collect();
                self.reporter.println(&format!(
                    "slurm: job {id} ({}) {how}; resubmitting (retry {} of {})",
                    names(&nodes),
                    task.tries,
                    self.opts.retries
                ));
                self.submit(task.stage, vec![nodes], task.tries + 1);
                return;
            }
            State::Interrupted => format!(
                "job {id} {how}, after {} retries; giving up\n  log: {log}",
                task.tries - 1
            ),
            State::Completed => format!(
                "job {id} completed, but the node is not in the cache at {}: the cache must be on a filesystem every node sees\n  log: {log}",
                self.opts.cache.display()
            ),
            State::Failed | State::Active => {
                let hint = if state.starts_with("OUT_OF_MEMORY") {
                    "; give it more with `mem` in [executor.slurm]"
                } else {
                    ""
                };
                match last_error(&task.log) {
                    Some(line) => format!("job {id} {how}{hint}: {line}\n  log: {log}"),
                    None => format!("job {id} {how}{hint}\n  log: {log}"),
                }
            }
        };
        for (_, key) in missing {
            self.finished.push(Done {
                key,
                result: Err(error.clone()),
                seconds: task.submitted.elapsed().as_secs_f64(),
                computed: true,
                stopped: false,
                pin: None,
                with: None,
                corrupt_inputs: Vec::new(),
                device: None,
            });
        }
    }

    /// True when every one of `keys` is missing from the cache and locked by another process
    /// (a local run, another driver's job): submitting would only make a job wait for it.
    fn computed_elsewhere(&self, keys: &[Key]) -> bool {
        let store = self.planner.store();
        keys.iter()
            .all(|k| !matches!(store.get(k), Ok(Some(_))) && matches!(store.try_lock(k), Ok(None)))
    }

    /// Batches waited on because another process computes them: nodes that landed are done
    /// (cached); a batch whose locks were let go without its nodes landing is submitted.
    fn check_elsewhere(&mut self) {
        let store = self.planner.store();
        let mut submit: BTreeMap<usize, Vec<Vec<NodeRef>>> = BTreeMap::new();
        for (stage, refs, keys) in std::mem::take(&mut self.elsewhere) {
            let mut missing = Vec::new();
            for (r, k) in refs.into_iter().zip(keys) {
                match store.get(&k) {
                    Ok(Some(entry)) => self.finished.push(Done {
                        key: k,
                        result: Ok(entry),
                        seconds: 0.0,
                        computed: false,
                        stopped: false,
                        pin: None,
                        with: None,
                        corrupt_inputs: Vec::new(),
                        device: None,
                    }),
                    _ => missing.push((r, k)),
                }
            }
            if missing.is_empty() {
                continue;
            }
            let (refs, keys): (Vec<NodeRef>, Vec<Key>) = missing.into_iter().unzip();
            if self.computed_elsewhere(&keys) {
                self.elsewhere.push((stage, refs, keys));
            } else {
                submit.entry(stage).or_default().push(refs);
            }
        }
        for (stage, batches) in submit {
            self.submit(stage, batches, 1);
        }
    }

    /// Cancels every job in flight: nodes that landed anyway are done, the others stopped.
    fn cancel_all(&mut self) {
        let jobs: Vec<u64> = self
            .tasks
            .iter()
            .map(|t| t.id.0)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        match self.commands.cancel(&jobs) {
            Ok(()) if jobs.is_empty() => {}
            Ok(()) => self.reporter.println(&format!(
                "slurm: cancelled job{} {}",
                if jobs.len() == 1 { "" } else { "s" },
                jobs.iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            )),
            Err(e) => self.reporter.println(&format!(
                "slurm: could not cancel every job ({e}); cancel them with scancel"
            )),
        }
        let store = self.planner.store();
        let waited = std::mem::take(&mut self.elsewhere)
            .into_iter()
            .flat_map(|(_, _, keys)| keys);
        let in_flight = std::mem::take(&mut self.tasks)
            .into_iter()
            .flat_map(|t| t.keys);
        for key in in_flight.chain(waited).collect::<Vec<_>>() {
            let done = match store.get(&key) {
                Ok(Some(entry)) => Done {
                    key,
                    seconds: StoredOutcome::of(&entry).seconds,
                    result: Ok(entry),
                    computed: true,
                    stopped: false,
                    pin: None,
                    with: None,
                    corrupt_inputs: Vec::new(),
                    device: None,
                },
                _ => Done {
                    key,
                    result: Err("cancelled".into()),
                    seconds: 0.0,
                    computed: false,
                    stopped: true,
                    pin: None,
                    with: None,
                    corrupt_inputs: Vec::new(),
                    device: None,
                },
            };
            self.finished.push(done);
        }
    }

    /// Fails every task in flight (SLURM stopped answering), cancelling what can be.
    fn give_up(&mut self, why: &str) {
        let jobs: Vec<u64> = self.tasks.iter().map(|t| t.id.0).collect();
        let _ = self.commands.cancel(&jobs);
        for task in std::mem::take(&mut self.tasks) {
            for key in task.keys {
                self.finished.push(Done {
                    key,
                    result: Err(format!("{why}\n  log: {}", task.log.display())),
                    seconds: 0.0,
                    computed: false,
                    stopped: false,
                    pin: None,
                    with: None,
                    corrupt_inputs: Vec::new(),
                    device: None,
                });
            }
        }
    }
}

impl Executor for Slurm<'_> {
    fn full(&self) -> bool {
        self.tasks.len() + self.queued.len() + self.elsewhere.len() >= self.opts.max_jobs
    }

    fn start(&mut self, _plan: &Plan, batch: Vec<Node>) {
        self.queued.push(batch);
    }

    fn flush(&mut self) {
        let mut by_stage: BTreeMap<usize, Vec<Vec<NodeRef>>> = BTreeMap::new();
        for batch in std::mem::take(&mut self.queued) {
            let stage = batch[0].stage;
            let refs: Vec<NodeRef> = batch
                .iter()
                .map(|n| NodeRef {
                    node: n.name.clone(),
                    key: n.key.to_string(),
                })
                .collect();
            let keys: Vec<Key> = batch.iter().map(|n| n.key.clone()).collect();
            if self.computed_elsewhere(&keys) {
                self.reporter.println(&format!(
                    "slurm: {} computed by another process; waiting for it",
                    names(&refs)
                ));
                self.elsewhere.push((stage, refs, keys));
            } else {
                by_stage.entry(stage).or_default().push(refs);
            }
        }
        for (stage, batches) in by_stage {
            for chunk in batches.chunks(MAX_ARRAY) {
                self.submit(stage, chunk.to_vec(), 1);
            }
        }
    }

    fn wait(&mut self) -> Vec<Done> {
        loop {
            if !self.finished.is_empty() {
                return std::mem::take(&mut self.finished);
            }
            if self.tasks.is_empty() && self.elsewhere.is_empty() {
                return Vec::new();
            }
            if self.cancel.load(Ordering::Relaxed) {
                self.cancel_all();
                continue;
            }
            let since = self.last_poll.elapsed();
            if since >= self.opts.poll {
                self.check_elsewhere();
                if !self.tasks.is_empty() {
                    self.poll();
                } else {
                    self.last_poll = Instant::now();
                }
            } else {
                std::thread::sleep((self.opts.poll - since).min(Duration::from_millis(50)));
            }
        }
    }
}

/// `probex:EXPERIMENT:STAGE`, in characters any SLURM tool shows as they are.
fn job_name(experiment: &str, stage: &str) -> String {
    let safe = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("probex:{}:{}", safe(experiment), safe(stage))
}

/// `123_4`.
fn task_name((job, index): TaskId) -> String {
    format!("{job}_{index}")
}

fn names(nodes: &[NodeRef]) -> String {
    nodes
        .iter()
        .map(|n| n.node.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The log of task `index` of array `job`, from sbatch's `%A_%a` pattern.
fn log_of(pattern: &Path, job: u64, index: u32) -> PathBuf {
    let name = pattern
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .replace("%A", &job.to_string())
        .replace("%a", &index.to_string());
    pattern.with_file_name(name)
}

/// The last line of a job's log that reports an error, to quote in the failure (without
/// run-node's own `error: stage NODE failed: ` prefix, which the driver's message repeats).
fn last_error(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with("error") || l.contains("error:"))?;
    let bare = line.strip_prefix("error: ").unwrap_or(line);
    let bare = bare
        .strip_prefix("stage ")
        .and_then(|rest| rest.split_once(" failed: "))
        .map_or(bare, |(_, msg)| msg);
    let mut out: String = bare.chars().take(400).collect();
    if out.len() < bare.len() {
        out.push_str("...");
    }
    Some(out)
}

/// Absolute form of `p` (jobs start in another directory, maybe on another machine).
pub fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p)
        .or_else(|_| std::path::absolute(p))
        .unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_keep_to_plain_characters() {
        assert_eq!(job_name("planted", "probe"), "probex:planted:probe");
        assert_eq!(job_name("my \"exp\" #1", "p"), "probex:my__exp___1:p");
    }

    #[test]
    fn task_logs_resolve_the_array_pattern() {
        let p = Path::new("/r/slurm/probe-%A_%a.out");
        assert_eq!(log_of(p, 12, 3), Path::new("/r/slurm/probe-12_3.out"));
    }

    #[test]
    fn the_last_error_line_of_a_log_is_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.out");
        std::fs::write(&log, "run    a\nerror: stage a failed: first\nmore\nerror: stage a failed: boom\n  log: /x\n").unwrap();
        assert_eq!(last_error(&log).as_deref(), Some("boom"));
        std::fs::write(&log, "slurmstepd: error: *** JOB 12 ON n1 CANCELLED ***\n").unwrap();
        assert_eq!(
            last_error(&log).as_deref(),
            Some("slurmstepd: error: *** JOB 12 ON n1 CANCELLED ***")
        );
        let long = format!("error: {}\n", "x".repeat(500));
        std::fs::write(&log, long).unwrap();
        let quoted = last_error(&log).unwrap();
        assert_eq!(quoted.len(), 403, "{quoted}");
        assert!(quoted.ends_with("..."));
        std::fs::write(&log, "all good\n").unwrap();
        assert_eq!(last_error(&log), None);
        assert_eq!(last_error(&dir.path().join("missing")), None);
    }
}
