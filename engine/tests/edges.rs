//! The edges a user falls into (issue 23): a full disk under the run record, Ctrl-C and SIGTERM
//! in the middle of a stage, a closed stdout, experiment names that are paths, `cache gc` while a
//! run is live, staging left by killed runs. Each drives the `testkit` example (the engine's CLI
//! with the test kinds) as a separate process.
//!
//! A full disk is simulated without root by a file-size limit on the child process
//! (`RLIMIT_FSIZE`, with `SIGXFSZ` ignored so a write past it fails with `EFBIG`, as a write to
//! a full disk fails with `ENOSPC`): every write the child makes past the limit fails.

mod kinds;
mod testkit;

use std::fs;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use testkit::{Kit, stderr, stdout, wait_for};

const GOOD: &str = r#"
[experiment]
name = "good"
description = "two numbers and their sum"

[stage.a]
kind = "const"
value = 2.0

[stage.b]
kind = "add"
from = "a"
offset = 0.5
expect = { value = "2.5 +- 0.01" }

[stage.g]
kind = "gather"
from = "b"
"#;

/// The files of a run record a reader relies on.
const RECORD: [&str; 4] = ["plan.json", "status.json", "results.json", "report.md"];

/// Runs the testkit with every file it writes limited to `bytes`.
fn run_with_file_limit(k: &Kit, bytes: u64, args: &[&str]) -> Output {
    let mut cmd = k.cmd(args);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: bytes as libc::rlim_t,
                rlim_max: bytes as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("run testkit")
}

/// Every file of the record is absent or whole: never empty, never cut short.
fn assert_no_partial_record(dir: &Path) {
    for f in RECORD {
        let path = dir.join(f);
        let Ok(bytes) = fs::read(&path) else { continue };
        assert!(!bytes.is_empty(), "{f} was left empty");
        if f.ends_with(".json") {
            let parsed: Result<serde_json::Value, _> = serde_json::from_slice(&bytes);
            assert!(parsed.is_ok(), "{f} was left cut short: {parsed:?}");
        }
    }
    let leftovers: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn a_full_disk_under_the_run_record_fails_the_run_and_leaves_no_partial_file() {
    let k = Kit::new();
    k.write("good.toml", GOOD);
    // Everything cached first, so the limited runs write nothing but their record.
    let out = k.run(&["run", "good.toml", "--out", "warm"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = k.run(&["run", "good.toml", "--out", "cached"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let size = |f: &str| fs::metadata(k.path("cached").join(f)).unwrap().len();

    // Nothing can be written: the run stops before its first node.
    let out = run_with_file_limit(&k, 0, &["run", "good.toml", "--out", "full"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{}{err}", stdout(&out));
    assert!(err.contains("cannot write the run record"), "{err}");
    assert!(err.contains("plan.json"), "{err}");
    assert!(!stdout(&out).contains("ok:"), "{}", stdout(&out));
    assert_no_partial_record(&k.path("full"));

    // plan.json fits but status.json does not: the run fails at the end and says which file.
    let limit = size("plan.json") + 64;
    assert!(
        size("status.json") > limit + 64,
        "the fixture needs a status.json larger than plan.json"
    );
    let out = run_with_file_limit(&k, limit, &["run", "good.toml", "--out", "late"]);
    let (text, err) = (stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(1), "{text}{err}");
    assert!(err.contains("the run record"), "{err}");
    assert!(err.contains("is incomplete"), "{err}");
    assert!(err.contains("status.json"), "{err}");
    assert!(text.contains("FAILED: 3 nodes"), "{text}");
    assert_no_partial_record(&k.path("late"));

    // Reading an incomplete record is an error, not an empty print.
    for rec in ["full", "late"] {
        let out = k.run(&["report", rec]);
        assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
        assert!(stdout(&out).is_empty(), "{}", stdout(&out));
        assert!(
            stderr(&out).contains("is not a complete run record"),
            "{}",
            stderr(&out)
        );
    }
    fs::write(k.path("late/status.json"), b"").unwrap();
    let out = k.run(&["report", "late"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("status.json is empty"),
        "{}",
        stderr(&out)
    );
    let out = k.run(&["compare", "cached", "full"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("is not a complete run record"),
        "{}",
        stderr(&out)
    );
    // A complete record still reads.
    let out = k.run(&["report", "cached"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("Outcome: **success**"));
}

/// The state of `node` in a run record's status.json.
fn node_state(record: &Path, node: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(record.join("status.json")).expect("status.json"))
            .expect("status json");
    v["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|r| r["node"] == node))
        .and_then(|r| r["state"].as_str())
        .unwrap_or_else(|| panic!("no node {node} in {v}"))
        .to_string()
}

#[test]
fn a_signal_during_a_stage_is_an_interruption_that_the_next_run_resumes() {
    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let k = Kit::new();
        k.write(
            "count.toml",
            "[stage.c]\nkind = \"count\"\nsteps = 1000\nstep_ms = 1\n\n[stage.d]\nkind = \"add\"\nfrom = \"c\"\n",
        );
        let key = k.key_of("count.toml", "c");
        let progress = k.cache().join("work").join(key.as_str()).join("count");
        let child = k
            .cmd(&["run", "count.toml", "--out", "r1", "--progress", "plain"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn testkit");
        wait_for(Duration::from_secs(20), "the stage to count", || {
            fs::read_to_string(&progress).is_ok_and(|s| s.trim().parse::<u64>().unwrap_or(0) >= 5)
        });
        // SAFETY: kill takes plain integers and touches no memory; the pid is our own child's,
        // not yet waited for, so it cannot name another process.
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
        let out = child.wait_with_output().expect("wait");
        let (text, err) = (stdout(&out), stderr(&out));
        assert_eq!(out.status.code(), Some(130), "{name}: {text}{err}");
        assert!(text.contains("interrupted: 2 nodes"), "{name}: {text}");
        assert!(
            !text.contains("FAILED") && !err.contains("error"),
            "{name}: {text}{err}"
        );
        assert!(
            err.contains("interrupted while running: c"),
            "{name}: {err}"
        );
        assert_eq!(node_state(&k.path("r1"), "c"), "interrupted", "{name}");
        assert_eq!(node_state(&k.path("r1"), "d"), "not_run", "{name}");
        let md = fs::read_to_string(k.path("r1/report.md")).unwrap();
        assert!(md.contains("Outcome: **interrupted**"), "{name}: {md}");

        // The next run resumes the count and says so.
        let out = k.run(&["run", "count.toml", "--out", "r2", "--progress", "plain"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{name}: {}{err}", stdout(&out));
        assert!(err.contains("note c: resumed from step "), "{name}: {err}");
        assert_eq!(node_state(&k.path("r2"), "c"), "ran", "{name}");
        assert_eq!(k.starts("c"), 2, "{name}");
    }
}

/// The write end of a pipe whose read end is already closed: every write to it fails with
/// EPIPE, as when `probex ... | head -1` has read what it wanted.
fn closed_pipe() -> Stdio {
    let mut fds = [0; 2];
    // SAFETY: `pipe` fills both descriptors; the read end is closed at once and the write end
    // is owned by the returned Stdio.
    unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        libc::close(fds[0]);
        Stdio::from(OwnedFd::from_raw_fd(fds[1]))
    }
}

#[test]
fn a_closed_stdout_ends_every_command_quietly() {
    let k = Kit::new();
    k.write("good.toml", GOOD);
    for rec in ["r1", "r2"] {
        let out = k.run(&["run", "good.toml", "--out", rec]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    let commands: &[&[&str]] = &[
        &["kinds"],
        &["plan", "good.toml"],
        &["plan", "--json", "good.toml"],
        &["cache", "ls"],
        &["cache", "ls", "--json"],
        &["cache", "verify"],
        &["cache", "path"],
        &["report", "r1"],
        &["compare", "r1", "r2"],
        &["run", "good.toml", "--out", "r3"],
        &["run", "good.toml", "--json", "--out", "r4"],
    ];
    for args in commands {
        let out = k
            .cmd(args)
            .stdout(closed_pipe())
            .stderr(Stdio::piped())
            .output()
            .expect("run testkit");
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{args:?}: {err}"
        );
    }
    // The run still wrote its whole record.
    assert!(k.path("r3/status.json").is_file());

    // A write that fails for another reason (a full disk under `> file`) is an error.
    let full = fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let out = k
        .cmd(&["cache", "ls"])
        .stdout(full)
        .stderr(Stdio::piped())
        .output()
        .expect("run testkit");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("error: cannot write the output to stdout"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn names_that_are_paths_and_empty_files_never_write_a_record() {
    let k = Kit::new();
    fs::create_dir_all(k.path("exp")).unwrap();
    let outside = k.path("escaped");
    for (name, text) in [
        (
            "escape",
            "[experiment]\nname = \"../../escaped\"\n".to_string(),
        ),
        (
            "absolute",
            format!("[experiment]\nname = \"{}\"\n", outside.display()),
        ),
        ("empty", "[experiment]\nname = \"\"\n".to_string()),
    ] {
        let file = format!("exp/{name}.toml");
        k.write(
            &file,
            &format!("{text}\n[stage.a]\nkind = \"const\"\nvalue = 1\n"),
        );
        let out = k.run(&["run", &file]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {}{err}", stdout(&out));
        assert!(err.contains(&format!("--> {file}:2:8")), "{name}: {err}");
        assert!(err.contains('^'), "{name}: {err}");
    }
    assert!(!outside.exists(), "a record was written outside runs/");
    assert!(!k.path("exp/runs").exists(), "a record was written");

    // `probex run /dev/null`: nothing to run is an error, and nothing is created beside it.
    let out = k.run(&["run", "/dev/null", "--progress", "quiet"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{}{err}", stdout(&out));
    assert!(err.contains("/dev/null declares no stages"), "{err}");
    assert!(!Path::new("/dev/runs").exists());
    k.write("empty.toml", "");
    let out = k.run(&["run", "empty.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(!stdout(&out).contains("ok: 0 nodes"), "{}", stdout(&out));
    assert!(!k.path("runs").exists());
}

#[test]
fn cache_gc_during_a_run_keeps_what_the_run_uses_and_says_so() {
    let k = Kit::new();
    k.write("other.toml", "[stage.o]\nkind = \"const\"\nvalue = 7\n");
    let out = k.run(&["run", "other.toml", "--out", "o"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // `s` reads `a`'s files only when it has slept: a gc in between must leave them.
    k.write(
        "live.toml",
        "[stage.a]\nkind = \"const\"\nvalue = 2\n\n[stage.s]\nkind = \"sleep\"\nfrom = \"a\"\nms = 1500\n\n[stage.b]\nkind = \"add\"\nfrom = \"s\"\n",
    );
    let child = k
        .cmd(&["run", "live.toml", "--out", "live", "--progress", "plain"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn testkit");
    wait_for(Duration::from_secs(20), "s to start", || k.starts("s") == 1);
    // Every entry but `other`'s is selected; `a` is read by the live run (`s` is not
    // committed yet, so it has no entry to take).
    let out = k.run(&["cache", "gc", "--keep", "other.toml"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    assert!(
        text.contains("kept 1 entries in use by a running probex") && text.contains(": a\n"),
        "{text}"
    );
    let out = child.wait_with_output().expect("wait");
    let (text, err) = (stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{text}{err}");
    assert!(text.contains("ok: 3 nodes"), "{text}");
    assert!(!err.contains("never ran"), "{err}");
    let results: serde_json::Value =
        serde_json::from_slice(&fs::read(k.path("live/results.json")).unwrap()).unwrap();
    assert_eq!(results["results"]["b"]["value"], 2.0);
    // Once the run is over, the same gc removes what it kept.
    let out = k.run(&["cache", "gc", "--keep", "other.toml"]);
    assert!(
        stdout(&out).contains("removed 3 entries"),
        "{}",
        stdout(&out)
    );
    assert!(!stdout(&out).contains("kept"), "{}", stdout(&out));
}

#[test]
fn a_killed_runs_staging_is_shown_as_reclaimable_and_removed_by_the_next_run() {
    let k = Kit::new();
    k.write(
        "slow.toml",
        "[stage.w]\nkind = \"slow_write\"\nchunks = 400\nchunk_ms = 25\n",
    );
    let mut child = k.spawn(&["run", "slow.toml", "--out", "r1"]);
    let staged = || -> u64 {
        fs::read_dir(k.cache().join("tmp"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|slot| slot.path().join("data/big.bin"))
            .filter_map(|f| fs::metadata(f).ok())
            .map(|m| m.len())
            .sum()
    };
    wait_for(Duration::from_secs(20), "the stage to write 1 MiB", || {
        staged() >= 1 << 20
    });
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let left = staged();

    let ls = k.run(&["cache", "ls"]);
    let text = stdout(&ls);
    assert!(
        text.contains("reclaimable: ") && text.contains("(1 staging folder(s) of killed runs"),
        "{text}"
    );
    let verify = k.run(&["cache", "verify"]);
    assert!(
        stdout(&verify).contains("1 staging folder(s) of killed runs"),
        "{}",
        stdout(&verify)
    );

    // Any later run removes it (here another experiment's), saying how much it freed.
    k.write("other.toml", "[stage.o]\nkind = \"const\"\nvalue = 1\n");
    let out = k.run(&["run", "other.toml", "--out", "r2"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("cache: removed 1 staging folder(s) of killed runs"),
        "{err}"
    );
    assert!(left >= 1 << 20);
    assert_eq!(staged(), 0);
    let dirs: Vec<_> = fs::read_dir(k.cache().join("tmp"))
        .unwrap()
        .flatten()
        .collect();
    assert!(dirs.is_empty(), "{dirs:?}");
    assert!(!stdout(&k.run(&["cache", "ls"])).contains("reclaimable"));
}

#[test]
fn warnings_are_in_the_summary_and_the_report_of_every_run_that_uses_the_node() {
    let k = Kit::new();
    k.write(
        "warn.toml",
        "[stage.a]\nkind = \"const\"\nvalue = 1\nseed = [1, 2]\nfor_each = \"seed\"\nwarn = \"left out 2 of 9 models\"\n",
    );
    for (rec, computed) in [("r1", "2 computed"), ("r2", "0 computed")] {
        let out = k.run(&["run", "warn.toml", "--out", rec]);
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
        assert!(text.contains(computed), "{text}");
        assert!(
            text.contains("warnings:\n  a[seed=1], a[seed=2]: left out 2 of 9 models\n"),
            "{text}"
        );
        let md = fs::read_to_string(k.path(rec).join("report.md")).unwrap();
        assert!(
            md.contains("## Warnings\n\n- `a[seed=1]`, `a[seed=2]`: left out 2 of 9 models (files: `a_seed=1_/`)"),
            "{md}"
        );
    }
}

#[test]
fn a_bit_flipped_input_is_caught_when_read_and_computed_again() {
    let k = Kit::new();
    k.write("good.toml", GOOD);
    let out = k.run(&["run", "good.toml", "--out", "r1"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // Flip one byte of `a`'s file, keeping its size.
    let key = k.key_of("good.toml", "a");
    let file = k.store().get(&key).unwrap().unwrap().dir.join("value.json");
    let mut bytes = fs::read(&file).unwrap();
    let at = bytes.iter().position(|&b| b == b'2').expect("the value 2");
    bytes[at] = b'3';
    let mut perm = fs::metadata(&file).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    fs::set_permissions(&file, perm).unwrap();
    fs::write(&file, &bytes).unwrap();

    // `plan` trusts manifests: it still says cached (the README says what is checked when).
    let plan = stdout(&k.run(&["plan", "good.toml"]));
    assert!(plan.contains("3 cached"), "{plan}");
    // A node that reads `a` re-hashes it first: `a` is computed again, then the node.
    k.write(
        "good.toml",
        &GOOD
            .replace("offset = 0.5", "offset = 1.5")
            .replace("2.5 +- 0.01", "3.5 +- 0.01"),
    );
    let out = k.run(&["run", "good.toml", "--out", "r2", "--progress", "plain"]);
    let (text, err) = (stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{text}{err}");
    assert!(
        err.contains("cache: a failed verification as b was about to read it; moved to quarantine, computing it again"),
        "{err}"
    );
    assert_eq!(k.starts("a"), 2);
    let results: serde_json::Value =
        serde_json::from_slice(&fs::read(k.path("r2/results.json")).unwrap()).unwrap();
    assert_eq!(results["results"]["b"]["value"], 3.5);
    // a (computed again), b and g of both runs.
    k.assert_verify_clean(5);
}

#[test]
fn cache_commands_do_not_create_a_missing_cache_and_errors_say_error() {
    let k = Kit::new();
    let missing = k.path("no-such-cache");
    for args in [&["ls"][..], &["verify"][..], &["gc"][..]] {
        let out = std::process::Command::new(testkit::testkit())
            .args(["--cache", missing.to_str().unwrap(), "cache"])
            .args(args)
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with("error: no cache at "), "{args:?}: {err}");
        assert!(!missing.exists(), "{args:?} created the cache");
    }
    let out = std::process::Command::new(testkit::testkit())
        .args(["--cache", missing.to_str().unwrap(), "cache", "path"])
        .output()
        .unwrap();
    assert_eq!(stdout(&out).trim(), missing.to_str().unwrap());
    assert!(!missing.exists());
    // A cache that cannot be opened says so with the same prefix as every other error.
    k.write("good.toml", GOOD);
    let out = std::process::Command::new(testkit::testkit())
        .args(["--cache", "/dev/null/cache", "run", "good.toml"])
        .current_dir(k.dir.path())
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with("error: cannot open the cache at /dev/null/cache"),
        "{err}"
    );
}
