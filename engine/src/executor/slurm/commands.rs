//! Talking to SLURM through its commands (`sbatch`, `squeue`, `sacct`, `scancel`) and reading
//! what they print. Commands are found on `PATH`, so tests can put stand-ins there.
//!
//! Job states come from `squeue --states=all`, which lists finished jobs for `MinJobAge`
//! seconds (300 by default) after they end; `sacct` is asked only about jobs `squeue` no
//! longer lists, and is given up on once it says accounting is disabled (a cluster without
//! slurmdbd).

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One task of a job array: (array job id, task index).
pub type TaskId = (u64, u32);

/// What probex does about a job state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Queued, running or being requeued: wait.
    Active,
    /// Ended with exit code 0: the cache says whether the node is there.
    Completed,
    /// Ended through no fault of the node (cancelled by someone else, preempted, out of time,
    /// its machine failed): resubmit, and the node resumes from its checkpoint.
    Interrupted,
    /// The job failed: report it with its log.
    Failed,
}

/// Groups a SLURM job state (`squeue %T`, `sacct State`; `CANCELLED by 1234` reads as
/// `CANCELLED`). States this version does not know are waited on: a new transitional state
/// must not fail a run.
pub fn classify(state: &str) -> State {
    match state.split_whitespace().next().unwrap_or("") {
        "COMPLETED" => State::Completed,
        "CANCELLED" | "PREEMPTED" | "NODE_FAIL" | "BOOT_FAIL" | "TIMEOUT" | "REVOKED" => {
            State::Interrupted
        }
        "FAILED" | "OUT_OF_MEMORY" | "DEADLINE" => State::Failed,
        _ => State::Active,
    }
}

/// How long one SLURM command may take before it counts as failed (a controller that does not
/// answer must not hang the run or its Ctrl-C).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The SLURM commands.
#[derive(Clone, Debug, Default)]
pub struct Commands {
    /// False once `sacct` said accounting is disabled: it is not asked again.
    sacct_disabled: bool,
}

/// Why a SLURM command gave no answer probex can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The command could not be started (SLURM is not installed here).
    #[error(
        "cannot run `{program}`: {error}\n  = help: --executor slurm needs SLURM's commands \
         (sbatch, squeue, scancel) on PATH"
    )]
    Spawn {
        /// The command.
        program: String,
        /// The OS error.
        error: String,
    },
    /// The command did not finish within its time limit (or could not be waited for).
    #[error("`{program}` did not answer: {why}")]
    NoAnswer {
        /// The command.
        program: String,
        /// What happened.
        why: String,
    },
    /// The command ran and failed; `said` is what it printed (stderr, else stdout).
    #[error("`{command}` failed ({status}): {said}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it said.
        said: String,
    },
    /// `sbatch` succeeded but printed no job id.
    #[error("sbatch printed `{0}` where a job id was expected")]
    NoJobId(String),
}

impl CommandError {
    /// What a failed command said, if it ran: SLURM's commands report their conditions in
    /// text only (no exit codes that tell them apart), so the few probex acts on are
    /// recognised here, from that text alone, and nowhere else.
    fn said(&self) -> &str {
        match self {
            CommandError::Failed { said, .. } => said,
            _ => "",
        }
    }

    /// squeue refused a job list made only of jobs it has forgotten.
    fn forgotten_jobs(&self) -> bool {
        self.said().contains("Invalid job id")
    }

    /// sacct cannot answer: the cluster keeps no accounting.
    fn accounting_disabled(&self) -> bool {
        self.said().contains("accounting storage is disabled")
    }

    /// Worth another try: the controller was busy or briefly out of reach.
    fn transient(&self) -> bool {
        [
            "Socket timed out",
            "Unable to contact slurm controller",
            "temporarily unavailable",
            "try again",
        ]
        .iter()
        .any(|m| self.said().contains(m))
    }
}

impl Commands {
    /// Commands found on `PATH`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks that `sbatch` can be run at all, so a missing SLURM is reported before anything
    /// is planned or submitted.
    pub fn check(&self) -> Result<(), CommandError> {
        run("sbatch", &["--version".to_string()]).map(|_| ())
    }

    /// Submits `script` and returns its job id. A submission refused for a passing reason (the
    /// controller is busy) is tried again a few times.
    pub fn submit(&self, script: &Path) -> Result<u64, CommandError> {
        let args = vec!["--parsable".to_string(), script.display().to_string()];
        let mut delay = Duration::from_secs(2);
        let mut tries = 0;
        loop {
            tries += 1;
            match run("sbatch", &args).and_then(|out| parse_job_id(&out)) {
                Ok(id) => return Ok(id),
                Err(e) if tries < 4 && e.transient() => {
                    std::thread::sleep(delay);
                    delay *= 2;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The states of every task of `jobs` that SLURM still knows, by task. A job it has
    /// forgotten is simply absent.
    pub fn states(
        &mut self,
        jobs: &[u64],
    ) -> Result<HashMap<TaskId, (String, String)>, CommandError> {
        if jobs.is_empty() {
            return Ok(HashMap::new());
        }
        let list = join_ids(jobs);
        let args: Vec<String> = ["-h", "-r", "--states=all", "-o", "%F|%K|%T|%r", "-j", &list]
            .map(String::from)
            .to_vec();
        let mut states = match run("squeue", &args) {
            Ok(out) => parse_squeue(&out),
            // squeue refuses a list made only of jobs it has forgotten.
            Err(e) if e.forgotten_jobs() => HashMap::new(),
            Err(e) => return Err(e),
        };
        let forgotten: Vec<u64> = jobs
            .iter()
            .copied()
            .filter(|j| !states.keys().any(|(job, _)| job == j))
            .collect();
        if !forgotten.is_empty() && !self.sacct_disabled {
            let args: Vec<String> = ["-n", "-P", "-X", "-o", "JobID,State", "-j"]
                .map(String::from)
                .into_iter()
                .chain([join_ids(&forgotten)])
                .collect();
            match run("sacct", &args) {
                Ok(out) => {
                    for (task, state) in parse_sacct(&out) {
                        states.entry(task).or_insert((state, String::new()));
                    }
                }
                Err(e) if e.accounting_disabled() => {
                    self.sacct_disabled = true;
                }
                // sacct is a fallback: without it a forgotten job is judged by the cache.
                Err(_) => {}
            }
        }
        Ok(states)
    }

    /// Cancels `jobs` (whole arrays).
    pub fn cancel(&self, jobs: &[u64]) -> Result<(), CommandError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let args: Vec<String> = jobs.iter().map(u64::to_string).collect();
        run("scancel", &args).map(|_| ())
    }
}

fn join_ids(jobs: &[u64]) -> String {
    jobs.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// `sbatch --parsable` prints `ID` or `ID;CLUSTER`.
pub fn parse_job_id(out: &str) -> Result<u64, CommandError> {
    let line = out
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    line.split(';')
        .next()
        .and_then(|id| id.trim().parse::<u64>().ok())
        .ok_or_else(|| CommandError::NoJobId(out.trim().to_string()))
}

/// Lines of `squeue -h -r -o '%F|%K|%T|%r'`: array job id, task index (`N/A` for a job that
/// is not an array), state, reason.
pub fn parse_squeue(out: &str) -> HashMap<TaskId, (String, String)> {
    let mut states = HashMap::new();
    for line in out.lines() {
        let mut f = line.trim().split('|');
        let (Some(job), Some(index), Some(state)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let Ok(job) = job.trim().parse::<u64>() else {
            continue;
        };
        let index = match index.trim() {
            "N/A" => 0,
            i => match i.parse::<u32>() {
                Ok(i) => i,
                Err(_) => continue,
            },
        };
        let reason = f.next().unwrap_or("").trim().to_string();
        states.insert((job, index), (state.trim().to_string(), reason));
    }
    states
}

/// Lines of `sacct -n -P -X -o JobID,State`: `ID_INDEX|STATE` (a pending array's
/// `ID_[2-5]` is skipped: those tasks are still queued, which squeue reports).
pub fn parse_sacct(out: &str) -> Vec<(TaskId, String)> {
    out.lines()
        .filter_map(|line| {
            let (id, state) = line.trim().split_once('|')?;
            let (job, index) = match id.split_once('_') {
                Some((j, i)) => (j.parse::<u64>().ok()?, i.parse::<u32>().ok()?),
                None => (id.parse::<u64>().ok()?, 0),
            };
            Some(((job, index), state.trim().to_string()))
        })
        .collect()
}

/// Runs a SLURM command; its stdout, or an error that quotes what it said.
fn run(program: &str, args: &[String]) -> Result<String, CommandError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| CommandError::Spawn {
            program: program.to_string(),
            error: e.to_string(),
        })?;
    // Read both pipes on threads so a chatty command cannot block on a full pipe.
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(p) = stdout.as_mut() {
            let _ = p.read_to_string(&mut s);
        }
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(p) = stderr.as_mut() {
            let _ = p.read_to_string(&mut s);
        }
        s
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if started.elapsed() > COMMAND_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(CommandError::NoAnswer {
                    program: program.to_string(),
                    why: format!("no answer within {}s", COMMAND_TIMEOUT.as_secs()),
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                break Err(CommandError::NoAnswer {
                    program: program.to_string(),
                    why: format!("cannot wait for it: {e}"),
                });
            }
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let status = status?;
    if status.success() {
        Ok(stdout)
    } else {
        let said = if stderr.trim().is_empty() {
            stdout.trim()
        } else {
            stderr.trim()
        };
        Err(CommandError::Failed {
            command: format!("{program} {}", args.join(" ")),
            status: status.to_string(),
            said: said.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_grouped_by_what_probex_does() {
        for s in [
            "PENDING",
            "RUNNING",
            "COMPLETING",
            "CONFIGURING",
            "REQUEUED",
            "SUSPENDED",
            "RESIZING",
            "SOMETHING_NEW",
        ] {
            assert_eq!(classify(s), State::Active, "{s}");
        }
        assert_eq!(classify("COMPLETED"), State::Completed);
        for s in [
            "CANCELLED",
            "CANCELLED by 1000",
            "PREEMPTED",
            "NODE_FAIL",
            "TIMEOUT",
            "BOOT_FAIL",
        ] {
            assert_eq!(classify(s), State::Interrupted, "{s}");
        }
        for s in ["FAILED", "OUT_OF_MEMORY", "DEADLINE"] {
            assert_eq!(classify(s), State::Failed, "{s}");
        }
    }

    #[test]
    fn job_ids_are_read_with_or_without_a_cluster() {
        assert_eq!(parse_job_id("1234\n"), Ok(1234));
        assert_eq!(parse_job_id("1234;cluster\n"), Ok(1234));
        let err = parse_job_id("Submitted batch job 12\n").unwrap_err();
        assert_eq!(err, CommandError::NoJobId("Submitted batch job 12".into()));
        assert!(
            err.to_string().contains("where a job id was expected"),
            "{err}"
        );
        assert!(parse_job_id("").is_err());
    }

    #[test]
    fn squeue_lines_give_each_task_its_state_and_reason() {
        let out = "12|0|COMPLETED|None\n12|1|RUNNING|None\n12|2|PENDING|Resources\n13|N/A|FAILED|NonZeroExitCode\ngarbage\n|x|y\n";
        let s = parse_squeue(out);
        assert_eq!(s.len(), 4);
        assert_eq!(s[&(12, 0)], ("COMPLETED".into(), "None".into()));
        assert_eq!(s[&(12, 2)], ("PENDING".into(), "Resources".into()));
        assert_eq!(s[&(13, 0)].0, "FAILED");
    }

    #[test]
    fn sacct_lines_skip_unsplit_pending_arrays() {
        let s = parse_sacct("12_0|COMPLETED\n12_[1-3]|PENDING\n14|CANCELLED by 0\n");
        assert_eq!(
            s,
            vec![
                ((12, 0), "COMPLETED".into()),
                ((14, 0), "CANCELLED by 0".into())
            ]
        );
    }

    #[test]
    fn a_missing_command_says_what_is_needed() {
        let err = run("probex-no-such-command-xyz", &[]).unwrap_err();
        assert!(
            matches!(&err, CommandError::Spawn { program, .. } if program == "probex-no-such-command-xyz")
        );
        let err = err.to_string();
        assert!(
            err.contains("cannot run `probex-no-such-command-xyz`"),
            "{err}"
        );
        assert!(err.contains("on PATH"), "{err}");
    }

    #[test]
    fn a_failing_command_is_quoted() {
        let err = run("sh", &["-c".into(), "echo nope >&2; exit 3".into()]).unwrap_err();
        assert!(matches!(&err, CommandError::Failed { said, .. } if said == "nope"));
        let err = err.to_string();
        assert!(err.contains("nope"), "{err}");
        assert!(err.contains("exit status: 3"), "{err}");
    }

    /// The conditions probex acts on are recognised from what the command said, and only
    /// when it ran and failed (a missing command is never "try again").
    #[test]
    fn conditions_are_read_from_what_slurm_said() {
        let failed = |said: &str| CommandError::Failed {
            command: "squeue".into(),
            status: "exit status: 1".into(),
            said: said.into(),
        };
        assert!(failed("slurm_load_jobs error: Invalid job id specified").forgotten_jobs());
        assert!(failed("Slurm accounting storage is disabled").accounting_disabled());
        assert!(failed("Socket timed out on send/recv operation").transient());
        assert!(!failed("Invalid account").transient());
        let spawn = CommandError::Spawn {
            program: "sbatch".into(),
            error: "try again".into(),
        };
        assert!(!spawn.transient() && !spawn.forgotten_jobs());
    }
}
