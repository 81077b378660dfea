//! `probex run --executor slurm` against a real SLURM cluster (on CI, the one-node cluster
//! .ci/slurm/start.sh starts on the machine itself): a layer sweep submitted through sbatch
//! completes and its results equal a local run's; a second submission finds everything cached
//! and submits nothing; a job killed with scancel while it trains is detected, resubmitted and
//! resumes from its checkpoint; Ctrl-C cancels the run's jobs.
//!
//! Without SLURM (no `sbatch` on PATH, or no controller answering) the test says why and
//! passes, unless `PROBEX_REQUIRE_SLURM=1` (set by .ci/run after starting the cluster), which
//! makes a missing SLURM a failure. The run directories live under `$PROBEX_SLURM_TEST_DIR`
//! when set (on a multi-node cluster, a directory every node sees), else under the system's
//! temporary directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The planted models of experiments/planted.toml, their three layers extracted, ProbeX
/// trained on each (one array of three jobs), the best layer selected and evaluated.
fn sweep(data: &Path) -> String {
    format!(
        r#"
[experiment]
name = "slurm-sweep"

[stage.models]
kind = "fetch"
source = "dir"
path = "{}"

[stage.layers]
kind = "extract"
from = "models"
layers = "all"
splits = {{ metadata = {{ key = "split" }} }}
label = {{ key = "dataset_chosen_targets", kind = "multi_label", vocab = "cifar100" }}

[stage.probex]
kind = "train"
from = "layers"
for_each = "layer"
model = "probex"
epochs = 30
batch_size = 32
validate_every = 10
r_u = 8
r_v = 8
r_t = 16

[stage.best]
kind = "select"
from = "probex"
by = "val.accuracy"

[stage.report]
kind = "evaluate"
from = "best"

[executor.slurm]
poll_seconds = 0.5
cpus = 1
time = "00:10:00"
"#,
        data.display()
    )
}

/// The same models, one layer, and one training long enough (tens of seconds) to be caught
/// running and killed.
fn slow(data: &Path) -> String {
    format!(
        r#"
[experiment]
name = "slurm-slow"

[stage.models]
kind = "fetch"
source = "dir"
path = "{}"

[stage.layer0]
kind = "extract"
from = "models"
layers = 0
splits = {{ metadata = {{ key = "split" }} }}
label = {{ key = "dataset_chosen_targets", kind = "multi_label", vocab = "cifar100" }}

[stage.slow]
kind = "train"
from = "layer0"
model = "probex"
epochs = 1000
batch_size = 32
validate_every = 10
r_u = 8
r_v = 8
r_t = 16

[executor.slurm]
poll_seconds = 0.5
cpus = 1
"#,
        data.display()
    )
}

/// Why SLURM cannot be used here, if it cannot.
fn slurm_missing() -> Option<String> {
    let sbatch = Command::new("sbatch").arg("--version").output();
    match sbatch {
        Err(e) => return Some(format!("no sbatch on PATH ({e})")),
        Ok(o) if !o.status.success() => {
            return Some(format!(
                "sbatch --version failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Ok(_) => {}
    }
    match Command::new("sinfo").args(["-h", "-o", "%T"]).output() {
        Ok(o) if o.status.success() => {
            let states = String::from_utf8_lossy(&o.stdout);
            if states
                .lines()
                .any(|s| ["idle", "mixed", "allocated"].contains(&s.trim().trim_end_matches('*')))
            {
                None
            } else {
                Some(format!("no SLURM node is up (sinfo: {})", states.trim()))
            }
        }
        Ok(o) => Some(format!(
            "no SLURM controller answers (sinfo: {})",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("no sinfo on PATH ({e})")),
    }
}

fn probex(cache: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_probex"));
    c.arg("--cache").arg(cache).args(args);
    c
}

fn text(o: &Output) -> String {
    format!(
        "--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn json(path: &Path) -> serde_json::Value {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `results` without wall times (`seconds`), which differ between any two runs.
fn without_timings(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => m
            .into_iter()
            .filter(|(k, _)| k != "seconds")
            .map(|(k, v)| (k, without_timings(v)))
            .collect(),
        serde_json::Value::Array(a) => a.into_iter().map(without_timings).collect(),
        v => v,
    }
}

/// (node, key, state) of every node of a run record.
fn nodes(run: &Path) -> Vec<(String, String, String)> {
    let status = json(&run.join("status.json"));
    let mut out: Vec<_> = status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            let s = |k: &str| n[k].as_str().unwrap_or_default().to_string();
            (s("node"), s("key"), s("state"))
        })
        .collect();
    out.sort();
    out
}

/// Job ids of this user's jobs named `name`, in any state SLURM still lists, with the state.
fn jobs_named(name: &str) -> Vec<(String, String)> {
    let out = Command::new("squeue")
        .args(["-h", "-r", "--states=all", "-o", "%i|%j|%T"])
        .output()
        .expect("squeue");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.trim().split('|');
            let (id, job, state) = (f.next()?, f.next()?, f.next()?);
            (job == name).then(|| (id.to_string(), state.to_string()))
        })
        .collect()
}

#[test]
fn a_sweep_runs_on_slurm_like_a_local_run_is_then_all_cached_and_survives_scancel() {
    if let Some(why) = slurm_missing() {
        if std::env::var("PROBEX_REQUIRE_SLURM").is_ok_and(|v| v == "1") {
            panic!("PROBEX_REQUIRE_SLURM=1 but SLURM cannot be used: {why}");
        }
        eprintln!("skipped: {why} (run .ci/slurm/start.sh to start a one-node cluster)");
        return;
    }
    let started = Instant::now();
    let root =
        std::env::var_os("PROBEX_SLURM_TEST_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let tmp = tempfile::tempdir_in(&root).expect("temp dir");
    let dir = tmp.path();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/data/planted");
    let exp = dir.join("sweep.toml");
    fs::write(&exp, sweep(&data)).unwrap();
    let (cache, local_cache) = (dir.join("cache"), dir.join("local-cache"));
    let exp_arg = exp.to_str().unwrap();

    // 1. The sweep through sbatch, and the same experiment run here on another cache.
    let rec = dir.join("slurm-run");
    let out = probex(
        &cache,
        &[
            "run",
            exp_arg,
            "--executor",
            "slurm",
            "--progress",
            "plain",
            "--out",
        ],
    )
    .arg(&rec)
    .output()
    .expect("probex run --executor slurm");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("slurm: submitted job"), "{}", text(&out));
    // The three layers went as one array of three tasks.
    assert!(err.contains("for probex (3 tasks)"), "{}", text(&out));
    let local = dir.join("local-run");
    let out = probex(&local_cache, &["run", exp_arg, "--threads", "1", "--out"])
        .arg(&local)
        .output()
        .expect("probex run");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (a, b) = (
        without_timings(json(&rec.join("results.json"))["results"].clone()),
        without_timings(json(&local.join("results.json"))["results"].clone()),
    );
    assert!(a["report"]["best"]["test"]["accuracy"].is_number(), "{a}");
    assert_eq!(a, b, "the cluster's results differ from the local run's");
    let (on_slurm, here) = (nodes(&rec), nodes(&local));
    assert_eq!(on_slurm.len(), 9, "{on_slurm:?}");
    assert_eq!(
        on_slurm.iter().map(|(n, k, _)| (n, k)).collect::<Vec<_>>(),
        here.iter().map(|(n, k, _)| (n, k)).collect::<Vec<_>>()
    );
    assert!(on_slurm.iter().all(|(_, _, s)| s == "ran"), "{on_slurm:?}");
    eprintln!(
        "sweep on slurm and locally: {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // 2. A second submission finds everything cached and submits no job.
    let again = dir.join("again");
    let out = probex(&cache, &["run", exp_arg, "--executor", "slurm", "--out"])
        .arg(&again)
        .output()
        .expect("probex run again");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("(0 computed, 9 cached)"),
        "{}",
        text(&out)
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("submitted job"),
        "{}",
        text(&out)
    );
    assert!(!again.join("slurm").exists(), "a job script was written");

    // 3. A training job killed with scancel while it runs is detected and resubmitted, and
    // the new job resumes from the checkpoint the first one left in the cache.
    let slow_exp = dir.join("slow.toml");
    fs::write(&slow_exp, slow(&data)).unwrap();
    let slow_rec = dir.join("slow-run");
    let driver = probex(
        &cache,
        &[
            "run",
            slow_exp.to_str().unwrap(),
            "--executor",
            "slurm",
            "--progress",
            "plain",
            "--out",
        ],
    )
    .arg(&slow_rec)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn probex");
    // `slow` reads a one-layer fan-out, so its node is `slow[layer=0]`.
    let log = slow_rec.join("logs/slow_layer=0_.log");
    let t = Instant::now();
    let job = loop {
        // Running, and past a validation (so a checkpoint exists to resume from).
        let trained = fs::read_to_string(&log).is_ok_and(|l| l.contains("epoch 20:"));
        let running: Vec<_> = jobs_named("probex:slurm-slow:slow")
            .into_iter()
            .filter(|(_, s)| s == "RUNNING")
            .collect();
        if trained && let Some((id, _)) = running.first() {
            break id.clone();
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the slow job never ran: {:?}",
            jobs_named("probex:slurm-slow:slow")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let cancel = Command::new("scancel").arg(&job).output().expect("scancel");
    assert!(cancel.status.success(), "{}", text(&cancel));
    let out = driver.wait_with_output().expect("wait for probex");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("slurm: job {job} (slow[layer=0]) ended CANCELLED"))
            && err.contains("resubmitting (retry 1 of 2)"),
        "{}",
        text(&out)
    );
    let report = json(&slow_rec.join("slow_layer=0_/report.json"));
    let resumed = report["resumed_from"].as_u64();
    assert!(
        resumed.is_some_and(|e| e >= 10),
        "the resubmitted job did not resume from a checkpoint: resumed_from = {}",
        report["resumed_from"]
    );
    assert_eq!(report["config"]["epochs"], 1000);

    // 4. Ctrl-C cancels the jobs the run submitted, and leaves nothing in the cache.
    fs::write(
        &slow_exp,
        slow(&data).replace("epochs = 1000", "epochs = 1001"),
    )
    .unwrap();
    let stopped_rec = dir.join("stopped-run");
    let driver = probex(
        &cache,
        &[
            "run",
            slow_exp.to_str().unwrap(),
            "--executor",
            "slurm",
            "--out",
        ],
    )
    .arg(&stopped_rec)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn probex");
    let t = Instant::now();
    let job = loop {
        let known: Vec<_> = jobs_named("probex:slurm-slow:slow")
            .into_iter()
            .filter(|(id, s)| s == "RUNNING" && *id != job)
            .collect();
        if let Some((id, _)) = known.first() {
            break id.clone();
        }
        assert!(t.elapsed() < Duration::from_secs(120), "the job never ran");
        std::thread::sleep(Duration::from_millis(100));
    };
    let sent = Command::new("kill")
        .args(["-INT", &driver.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(sent.success());
    let out = driver.wait_with_output().expect("wait for probex");
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("slurm: cancelled job"),
        "{}",
        text(&out)
    );
    let t = Instant::now();
    while !jobs_named("probex:slurm-slow:slow")
        .iter()
        .any(|(id, s)| *id == job && s == "CANCELLED")
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "job {job} was not cancelled: {:?}",
            jobs_named("probex:slurm-slow:slow")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let stopped = nodes(&stopped_rec);
    assert!(
        stopped
            .iter()
            .any(|(n, _, s)| n == "slow[layer=0]" && s == "interrupted"),
        "{stopped:?}"
    );
    eprintln!("whole test: {:.1}s", started.elapsed().as_secs_f64());
}
