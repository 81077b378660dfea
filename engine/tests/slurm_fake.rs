//! The SLURM executor against stand-ins for `sbatch`, `squeue`, `sacct` and `scancel` put first
//! on PATH: fast, and on every machine (the real cluster is tested by tests/slurm.rs at the
//! root). The stand-ins run each array task in the background as SLURM would (the job script
//! with `SLURM_ARRAY_TASK_ID` set, output to the `--output` pattern), keep each task's state in
//! a file, and log every call, so a test can see what was submitted, cancel a task as another
//! user would, or make SLURM misbehave.

mod kinds;
mod testkit;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kinds::read_trace;
use testkit::testkit;

const SBATCH: &str = r#"#!/bin/bash
# Stand-in sbatch: `sbatch --parsable SCRIPT`. Every task starts at once, in the background.
set -u
d="$FAKE_SLURM"
echo "sbatch $*" >> "$d/calls"
if [ "$1" = --version ]; then echo "slurm 0.0 (stand-in)"; exit 0; fi
script="${!#}"
if [ -n "${FAKE_SLURM_SBATCH_ERROR:-}" ]; then
    echo "sbatch: error: $FAKE_SLURM_SBATCH_ERROR" >&2
    exit 1
fi
last=$(sed -n 's/^#SBATCH --array=0-\([0-9]*\)$/\1/p' "$script")
out=$(sed -n 's/^#SBATCH --output=//p' "$script")
name=$(sed -n 's/^#SBATCH --job-name=//p' "$script")
id=$(( $(cat "$d/next_id" 2>/dev/null || echo 100) + 1 ))
echo "$id" > "$d/next_id"
mkdir -p "$d/jobs"
for i in $(seq 0 "$last"); do
    t="$d/jobs/${id}_$i"
    log="${out//%A/$id}"; log="${log//%a/$i}"
    if [ -n "${FAKE_SLURM_CANCEL:-}" ] && [[ "$name" == *"$FAKE_SLURM_CANCEL"* ]]; then
        echo CANCELLED > "$t.state"
        continue
    fi
    echo RUNNING > "$t.state"
    (
        if [ -n "${FAKE_SLURM_NOOP:-}" ]; then
            true > "$log" 2>&1 &
        else
            SLURM_ARRAY_JOB_ID=$id SLURM_ARRAY_TASK_ID=$i SLURM_JOB_ID=$id bash "$script" > "$log" 2>&1 &
        fi
        pid=$!
        echo "$pid" > "$t.pid"
        wait "$pid"
        rc=$?
        if [ "$(cat "$t.state")" = RUNNING ]; then
            if [ "$rc" -eq 0 ]; then echo COMPLETED > "$t.state"; else echo FAILED > "$t.state"; fi
        fi
    ) < /dev/null > /dev/null 2>&1 &
done
echo "$id"
"#;

const SQUEUE: &str = r#"#!/bin/bash
# Stand-in squeue: `squeue ... -j ID,ID` prints `ID|INDEX|STATE|REASON` for every task.
d="$FAKE_SLURM"
echo "squeue $*" >> "$d/calls"
if [ -e "$d/down" ]; then
    echo "squeue: error: Unable to contact slurm controller (connect failure)" >&2
    exit 1
fi
ids=""
while [ $# -gt 0 ]; do
    if [ "$1" = "-j" ]; then ids="$2"; shift; fi
    shift
done
found=0
for id in ${ids//,/ }; do
    for f in "$d/jobs/${id}_"*.state; do
        [ -e "$f" ] || continue
        b=$(basename "$f" .state)
        echo "${b%_*}|${b#*_}|$(cat "$f")|None"
        found=1
    done
done
if [ "$found" = 0 ]; then
    echo "slurm_load_jobs error: Invalid job id specified" >&2
    exit 1
fi
"#;

const SCANCEL: &str = r#"#!/bin/bash
# Stand-in scancel: `scancel ID` (every task) or `scancel ID_INDEX`; SIGTERM, as SLURM sends.
d="$FAKE_SLURM"
echo "scancel $*" >> "$d/calls"
for arg in "$@"; do
    case "$arg" in
        *_*) files=("$d/jobs/$arg.state") ;;
        *) files=("$d/jobs/${arg}_"*.state) ;;
    esac
    for f in "${files[@]}"; do
        [ -e "$f" ] || continue
        case "$(cat "$f")" in
            RUNNING|PENDING)
                echo CANCELLED > "$f"
                p="${f%.state}.pid"
                [ -e "$p" ] && kill -TERM "$(cat "$p")" 2>/dev/null
                ;;
        esac
    done
done
exit 0
"#;

const SACCT: &str = r#"#!/bin/bash
echo "sacct $*" >> "$FAKE_SLURM/calls"
echo "Slurm accounting storage is disabled" >&2
exit 1
"#;

/// A constant, its value as a number of layers (known only once it is cached, so the sweep is
/// planned during the run), the layers computed in one batching job, each doubled by its own
/// array task, and their sum: 2 * (0 + 1 + 2 + 3) = 12.
const SWEEP: &str = r#"
[experiment]
name = "sweep"

[stage.n]
kind = "const"
value = 4

[stage.layers]
kind = "bsweep"
from = "n"
layers = "all"

[stage.twice]
kind = "double"
from = "layers"
for_each = "layer"

[stage.total]
kind = "gather"
from = "twice"

[expect]
"total.value" = "12 +- 0"

[executor.slurm]
poll_seconds = 0.1
time = "00:10:00"

[executor.slurm.kind.double]
cpus = 2
extra = ["--constraint=fake"]
"#;

/// One slow node between two quick ones.
const SLOW: &str = r#"
[experiment]
name = "waits"

[stage.a]
kind = "const"
value = 1

[stage.slow]
kind = "sleep"
from = "a"
ms = 3000
value = 1

[stage.b]
kind = "add"
from = "slow"

[executor.slurm]
poll_seconds = 0.1
"#;

/// One test's world: a directory with the stand-ins, their state, experiments and a cache.
struct Fake {
    dir: tempfile::TempDir,
}

impl Fake {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let bin = dir.path().join("bin");
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(dir.path().join("slurm")).unwrap();
        for (name, text) in [
            ("sbatch", SBATCH),
            ("squeue", SQUEUE),
            ("scancel", SCANCEL),
            ("sacct", SACCT),
        ] {
            let p = bin.join(name);
            fs::write(&p, text).unwrap();
            let mut perm = fs::metadata(&p).unwrap().permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
            fs::set_permissions(&p, perm).unwrap();
        }
        Fake { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, text).unwrap();
        p
    }

    /// testkit with the stand-ins first on PATH, a trace of executions and `cache`.
    fn cmd(&self, cache: &str, args: &[&str]) -> Command {
        let path = format!(
            "{}:{}",
            self.path("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut c = Command::new(testkit());
        c.arg("--cache")
            .arg(self.path(cache))
            .args(args)
            .env("PATH", path)
            .env("FAKE_SLURM", self.path("slurm"))
            .env("PROBEX_TESTKIT_TRACE", self.path("trace.tsv"))
            .current_dir(self.dir.path());
        c
    }

    fn run(&self, cache: &str, args: &[&str]) -> Output {
        self.cmd(cache, args).output().expect("run testkit")
    }

    /// Every call made to the stand-ins, in order.
    fn calls(&self) -> Vec<String> {
        fs::read_to_string(self.path("slurm/calls"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    fn sbatch_calls(&self) -> usize {
        self.calls()
            .iter()
            .filter(|c| c.starts_with("sbatch --parsable"))
            .count()
    }

    /// How many times `node` started executing, over every process so far.
    fn starts(&self, node: &str) -> usize {
        read_trace(&self.path("trace.tsv"))
            .iter()
            .filter(|l| l.what == "start" && l.node == node)
            .count()
    }

    /// The task (`ID_INDEX`) running stage `stage`, once its node has started.
    fn running_task_of(&self, stage: &str, limit: Duration) -> String {
        let t = Instant::now();
        loop {
            for e in fs::read_dir(self.path("slurm/jobs"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(task) = name.strip_suffix(".pid") else {
                    continue;
                };
                let state = fs::read_to_string(self.path(&format!("slurm/jobs/{task}.state")))
                    .unwrap_or_default();
                // The task's log is named after its stage.
                let log = self.path(&format!("rec/slurm/{stage}-{task}.out"));
                if state.trim() == "RUNNING" && log.exists() && self.starts(stage) > 0 {
                    return task.to_string();
                }
            }
            assert!(
                t.elapsed() < limit,
                "no running task of {stage}: {:?}",
                self.calls()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn text(o: &Output) -> String {
    format!(
        "--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn results(dir: &Path) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("results.json")).expect("results.json"))
            .expect("json");
    v["results"].clone()
}

fn keys(dir: &Path) -> Vec<(String, String, String)> {
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("status.json")).expect("status.json"))
            .expect("json");
    let mut out: Vec<_> = v["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            (
                n["node"].as_str().unwrap_or_default().to_string(),
                n["key"].as_str().unwrap_or_default().to_string(),
                n["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_sweep_runs_as_job_arrays_equals_a_local_run_and_is_then_all_cached() {
    let f = Fake::new();
    f.write("sweep.toml", SWEEP);
    let out = f.run(
        "cache",
        &[
            "run",
            "sweep.toml",
            "--executor",
            "slurm",
            "--out",
            "rec",
            "--progress",
            "plain",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ok: 10 nodes (10 computed, 0 cached)"),
        "{}",
        text(&out)
    );
    // n, then the four layers as one batching task, then one array of four, then the sum.
    let sbatch: Vec<String> = f
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("sbatch --parsable"))
        .collect();
    assert_eq!(sbatch.len(), 4, "{sbatch:?}");
    let script = |stage: &str| {
        let p = f.path(&format!("rec/slurm/{stage}-1.sh"));
        let p = if p.exists() {
            p
        } else {
            // Submission numbers run across stages: find this stage's script.
            fs::read_dir(f.path("rec/slurm"))
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    let n = p.file_name().unwrap().to_string_lossy().into_owned();
                    n.starts_with(&format!("{stage}-")) && n.ends_with(".sh")
                })
                .unwrap_or_else(|| panic!("no script for {stage}"))
        };
        fs::read_to_string(p).unwrap()
    };
    let twice = script("twice");
    assert!(twice.contains("#SBATCH --array=0-3\n"), "{twice}");
    assert!(twice.contains("#SBATCH --cpus-per-task=2\n"), "{twice}");
    assert!(twice.contains("#SBATCH --constraint=fake\n"), "{twice}");
    assert!(twice.contains("#SBATCH --time=00:10:00\n"), "{twice}");
    assert!(twice.contains("--threads 2"), "{twice}");
    let layers = script("layers");
    assert!(layers.contains("#SBATCH --array=0-0\n"), "{layers}");
    assert!(!layers.contains("cpus-per-task"), "{layers}");
    for node in ["n", "layers[layer=0]", "twice[layer=3]", "total"] {
        assert_eq!(f.starts(node), 1, "{node} ran {} times", f.starts(node));
    }
    // The batching stage computed its four layers in one task, as a local run does.
    let trace = fs::read_to_string(f.path("trace.tsv")).unwrap();
    let pids: std::collections::BTreeSet<&str> = trace
        .lines()
        .filter(|l| l.contains("\tbsweep\t"))
        .filter_map(|l| l.split('\t').nth(4))
        .collect();
    assert_eq!(pids.len(), 1, "{trace}");
    // Each task logged where SLURM said, and each node into the run record.
    assert!(f.path("rec/logs/twice_layer=2_.log").is_file());

    let local = f.run("local-cache", &["run", "sweep.toml", "--out", "local"]);
    assert_eq!(local.status.code(), Some(0), "{}", text(&local));
    assert_eq!(results(&f.path("rec")), results(&f.path("local")));
    let (slurm_keys, local_keys) = (keys(&f.path("rec")), keys(&f.path("local")));
    assert_eq!(
        slurm_keys
            .iter()
            .map(|(n, k, _)| (n, k))
            .collect::<Vec<_>>(),
        local_keys
            .iter()
            .map(|(n, k, _)| (n, k))
            .collect::<Vec<_>>()
    );

    // Everything is cached now: a second submission submits nothing.
    let again = f.run(
        "cache",
        &["run", "sweep.toml", "--executor", "slurm", "--out", "again"],
    );
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("(0 computed, 10 cached)"),
        "{}",
        text(&again)
    );
    assert_eq!(f.sbatch_calls(), 4, "{:?}", f.calls());
}

#[test]
fn a_job_cancelled_by_someone_else_is_detected_and_resubmitted() {
    let f = Fake::new();
    f.write("slow.toml", SLOW);
    let driver = f
        .cmd(
            "cache",
            &[
                "run",
                "slow.toml",
                "--executor",
                "slurm",
                "--out",
                "rec",
                "--progress",
                "plain",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let task = f.running_task_of("slow", Duration::from_secs(30));
    let cancel = Command::new(f.path("bin/scancel"))
        .arg(&task)
        .env("FAKE_SLURM", f.path("slurm"))
        .status()
        .expect("scancel");
    assert!(cancel.success());
    let out = driver.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "job {task} (slow) ended CANCELLED; resubmitting (retry 1 of 2)"
        )),
        "{}",
        text(&out)
    );
    // Started twice (the first was killed), finished once, one entry.
    assert_eq!(f.starts("slow"), 2);
    assert_eq!(f.sbatch_calls(), 4, "{:?}", f.calls());
    let results = results(&f.path("rec"));
    assert_eq!(results["b"]["value"], 2.0);
}

#[test]
fn resubmissions_are_bounded() {
    let f = Fake::new();
    f.write("slow.toml", SLOW);
    let out = f
        .cmd(
            "cache",
            &[
                "run",
                "slow.toml",
                "--executor",
                "slurm",
                "--out",
                "rec",
                "--retries",
                "1",
            ],
        )
        .env("FAKE_SLURM_CANCEL", ":slow")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ended CANCELLED, after 1 retries; giving up"),
        "{}",
        text(&out)
    );
    // a, slow, slow again; b never.
    assert_eq!(f.sbatch_calls(), 3, "{:?}", f.calls());
    assert_eq!(f.starts("slow"), 0);
}

#[test]
fn a_controller_that_stops_answering_for_a_while_does_not_fail_the_run() {
    let f = Fake::new();
    f.write("slow.toml", &SLOW.replace("ms = 3000", "ms = 10"));
    fs::write(f.path("slurm/down"), "").unwrap();
    let driver = f
        .cmd(
            "cache",
            &["run", "slow.toml", "--executor", "slurm", "--out", "rec"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(1500));
    fs::remove_file(f.path("slurm/down")).unwrap();
    let out = driver.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    // Said once, not at every look.
    assert_eq!(
        err.matches("slurm: cannot read the queue (trying again for 10 minutes): `squeue")
            .count(),
        1,
        "{}",
        text(&out)
    );
    assert!(
        err.contains("Unable to contact slurm controller"),
        "{}",
        text(&out)
    );
    assert!(
        err.contains("slurm: the queue can be read again"),
        "{}",
        text(&out)
    );
    assert!(f.calls().iter().filter(|c| c.starts_with("squeue")).count() > 3);
}

#[test]
fn a_failed_job_fails_its_node_with_the_job_id_the_error_and_the_log() {
    let f = Fake::new();
    f.write(
        "fail.toml",
        "[stage.a]\nkind = \"const\"\nvalue = 1\n\n[stage.f]\nkind = \"fail\"\nfrom = \"a\"\nmessage = \"the probe diverged\"\n\n[executor.slurm]\npoll_seconds = 0.1\n",
    );
    let out = f.run(
        "cache",
        &["run", "fail.toml", "--executor", "slurm", "--out", "rec"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    // Job 101 computed `a`; 102 is `f`.
    let log = f.path("rec/slurm/f-102_0.out");
    assert!(
        err.contains("error: stage f failed: job 102_0 ended FAILED: the probe diverged\n"),
        "{}",
        text(&out)
    );
    assert!(
        err.contains(&format!("log: {}", log.display())),
        "{}",
        text(&out)
    );
    assert!(
        fs::read_to_string(&log)
            .unwrap()
            .contains("the probe diverged")
    );
    // Failures are not resubmitted.
    assert_eq!(f.sbatch_calls(), 2, "{:?}", f.calls());
}

#[test]
fn ctrl_c_cancels_every_job_the_run_submitted() {
    let f = Fake::new();
    f.write("slow.toml", SLOW);
    let mut driver: Child = f
        .cmd(
            "cache",
            &["run", "slow.toml", "--executor", "slurm", "--out", "rec"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let task = f.running_task_of("slow", Duration::from_secs(30));
    let job = task.split('_').next().unwrap().to_string();
    let sent = Command::new("kill")
        .args(["-INT", &driver.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(sent.success());
    let t = Instant::now();
    let status = driver.wait().expect("wait");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(status.code(), Some(130));
    assert!(
        f.calls().contains(&format!("scancel {job}")),
        "{:?}",
        f.calls()
    );
    let state = fs::read_to_string(f.path(&format!("slurm/jobs/{task}.state"))).unwrap();
    assert_eq!(state.trim(), "CANCELLED");
    let status = keys(&f.path("rec"));
    assert!(
        status
            .iter()
            .any(|(n, _, s)| n == "slow" && s == "interrupted"),
        "{status:?}"
    );
    // Nothing half-done stays behind: the next run computes slow once more, and only it.
    let again = f.run("cache", &["run", "slow.toml", "--out", "again"]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert!(String::from_utf8_lossy(&again.stdout).contains("(2 computed, 1 cached)"));
}

#[test]
fn a_job_that_completes_without_its_node_in_the_cache_says_the_cache_must_be_shared() {
    let f = Fake::new();
    // The entry gets a second to show up (on NFS it may take a while), then the node fails.
    f.write(
        "slow.toml",
        &SLOW.replace(
            "poll_seconds = 0.1",
            "poll_seconds = 0.1\ncache_wait_seconds = 1",
        ),
    );
    let t = Instant::now();
    let out = f
        .cmd(
            "cache",
            &["run", "slow.toml", "--executor", "slurm", "--out", "rec"],
        )
        .env("FAKE_SLURM_NOOP", "1")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("job 101_0 completed, but the node is not in the cache at"),
        "{}",
        text(&out)
    );
    assert!(
        err.contains("on a filesystem every node sees"),
        "{}",
        text(&out)
    );
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
}

#[test]
fn a_completed_jobs_entry_that_shows_up_late_is_taken() {
    let f = Fake::new();
    f.write(
        "one.toml",
        "[stage.a]\nkind = \"const\"\nvalue = 1\n\n[executor.slurm]\npoll_seconds = 0.1\ncache_wait_seconds = 30\n",
    );
    let driver = f
        .cmd(
            "cache",
            &["run", "one.toml", "--executor", "slurm", "--out", "rec"],
        )
        .env("FAKE_SLURM_NOOP", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // The job "completes" without computing anything; the entry lands a second later.
    let t = Instant::now();
    while fs::read_to_string(f.path("slurm/jobs/101_0.state"))
        .map_or(true, |s| s.trim() != "COMPLETED")
    {
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", f.calls());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    let late = f.run(
        "cache",
        &["run-node", "one.toml", "--node", "a", "--out", "rec"],
    );
    assert_eq!(late.status.code(), Some(0), "{}", text(&late));
    let out = driver.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

#[test]
fn a_node_another_process_is_computing_is_not_submitted_until_it_lets_go() {
    let f = Fake::new();
    f.write("slow.toml", &SLOW.replace("ms = 3000", "ms = 10"));
    let plan = f.run("cache", &["plan", "--json", "slow.toml"]);
    let v: serde_json::Value = serde_json::from_slice(&plan.stdout).expect("plan json");
    let key = v["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|r| r["node"] == "slow"))
        .and_then(|r| r["key"].as_str())
        .map(|k| probex_cache::Key::parse(k).expect("key"))
        .expect("slow in the plan");
    // This test holds the key's lock, as a local run computing `slow` would.
    let store = probex_cache::Store::open(f.path("cache")).expect("store");
    let lock = store.lock(&key).expect("lock");
    let driver = f
        .cmd(
            "cache",
            &["run", "slow.toml", "--executor", "slurm", "--out", "rec"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let t = Instant::now();
    while f.starts("a") == 0 {
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", f.calls());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Ample time for the driver (polling every 0.1 s) to see `a` land and `slow` get ready.
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        f.sbatch_calls(),
        1,
        "slow was submitted while locked: {:?}",
        f.calls()
    );
    drop(lock);
    let out = driver.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("slurm: slow computed by another process; waiting for it"),
        "{}",
        text(&out)
    );
    assert_eq!(f.sbatch_calls(), 3, "{:?}", f.calls());
    assert_eq!(f.starts("slow"), 1);
}

#[test]
fn an_sbatch_refusal_fails_the_nodes_with_slurms_words() {
    let f = Fake::new();
    f.write("slow.toml", SLOW);
    let out = f
        .cmd(
            "cache",
            &["run", "slow.toml", "--executor", "slurm", "--out", "rec"],
        )
        .env(
            "FAKE_SLURM_SBATCH_ERROR",
            "invalid partition specified: gpu",
        )
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot submit to SLURM: `sbatch --parsable"),
        "{}",
        text(&out)
    );
    assert!(
        err.contains("invalid partition specified: gpu"),
        "{}",
        text(&out)
    );
}

#[test]
fn without_sbatch_on_path_a_slurm_run_says_so_before_starting() {
    let f = Fake::new();
    f.write("slow.toml", SLOW);
    let out = f
        .cmd(
            "cache",
            &["run", "slow.toml", "--executor", "slurm", "--out", "rec"],
        )
        .env("PATH", f.path("empty"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot run `sbatch`"), "{}", text(&out));
    assert!(err.contains("on PATH"), "{}", text(&out));
    assert!(!f.path("rec").exists(), "a run record was started");
}

#[test]
fn bad_executor_settings_point_at_the_file_and_the_experiment_file_is_checked_too() {
    let f = Fake::new();
    f.write(
        "slow.toml",
        &SLOW.replace("poll_seconds = 0.1", "time = \"2h\""),
    );
    // Local runs check the settings too, so a typo shows before a cluster run needs them.
    let out = f.run("cache", &["run", "slow.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`2h` is not a SLURM time limit"), "{err}");
    assert!(err.contains("slow.toml:20:8"), "{err}");

    f.write("slow.toml", SLOW);
    f.write(
        "site.toml",
        "[executor.slurm]\naccount = \"lab\"\n[executor.slurm.kind.sleeep]\ngpus = 1\n",
    );
    let out = f.run(
        "cache",
        &[
            "run",
            "slow.toml",
            "--executor",
            "slurm",
            "--executor-config",
            "site.toml",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown stage kind `sleeep`"), "{err}");
    assert!(err.contains("site.toml:3:22"), "{err}");

    let out = f.run(
        "cache",
        &["run", "slow.toml", "--executor-config", "missing.toml"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read executor config missing.toml")
    );
}

#[test]
fn the_config_file_overrides_the_experiment_and_plan_ignores_both() {
    let f = Fake::new();
    f.write(
        "slow.toml",
        &SLOW.replace(
            "poll_seconds = 0.1",
            "poll_seconds = 0.1\npartition = \"short\"\naccount = \"lab\"",
        ),
    );
    f.write("site.toml", "[executor.slurm]\npartition = \"long\"\n");
    let out = f.run(
        "cache",
        &[
            "run",
            "slow.toml",
            "--executor",
            "slurm",
            "--executor-config",
            "site.toml",
            "--out",
            "rec",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let script = fs::read_to_string(f.path("rec/slurm/a-1.sh")).unwrap();
    assert!(script.contains("#SBATCH --partition=long\n"), "{script}");
    assert!(script.contains("#SBATCH --account=lab\n"), "{script}");

    // The executor table is not part of any key.
    f.write("bare.toml", &SLOW[..SLOW.find("[executor.slurm]").unwrap()]);
    let plan = |file: &str| {
        let out = f.run("cache", &["plan", "--json", file]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["node"].to_string(),
                    n["key"].to_string(),
                    n["status"].to_string(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(plan("slow.toml"), plan("bare.toml"));
}

#[test]
fn run_node_computes_a_node_once_and_refuses_one_whose_inputs_are_missing() {
    let f = Fake::new();
    f.write("slow.toml", &SLOW.replace("ms = 3000", "ms = 10"));
    // `b` reads `slow`, which is not in the cache.
    let out = f.run(
        "cache",
        &["run-node", "slow.toml", "--node", "b", "--out", "rec"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("input `slow` of `b` is not in the cache at"),
        "{err}"
    );
    assert!(err.contains("on a filesystem every node sees"), "{err}");

    for node in ["a", "slow", "b"] {
        let out = f.run(
            "cache",
            &["run-node", "slow.toml", "--node", node, "--out", "rec"],
        );
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }
    // Again: already in the cache, so nothing is computed.
    let out = f.run(
        "cache",
        &["run-node", "slow.toml", "--node", "slow", "--out", "rec"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cached slow"),
        "{}",
        text(&out)
    );
    assert_eq!(f.starts("slow"), 1);

    let out = f.run(
        "cache",
        &["run-node", "slow.toml", "--node", "nope", "--out", "rec"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no node `nope`"));

    // A job submitted for another key (the experiment was edited since) refuses to run.
    fs::write(
        f.path("batches.json"),
        r#"[[{"node": "slow", "key": "0000000000000000000000000000000000000000000000000000000000000000"}]]"#,
    )
    .unwrap();
    let out = f.run(
        "cache",
        &[
            "run-node",
            "slow.toml",
            "--batches",
            "batches.json",
            "--index",
            "0",
            "--out",
            "rec",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("but the job was submitted for key 0000"),
        "{}",
        text(&out)
    );
    let out = f.run(
        "cache",
        &[
            "run-node",
            "slow.toml",
            "--batches",
            "batches.json",
            "--index",
            "3",
            "--out",
            "rec",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no batch 3 (it has 1)"));
}
