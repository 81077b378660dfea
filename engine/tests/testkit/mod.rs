//! The `testkit` example (the engine's CLI with the test kinds), for tests that drive it as a
//! separate process.
//!
//! `cargo test` builds examples, but `cargo test --test NAME` does not, so the first test to
//! need it runs `cargo build --example testkit` (a no-op when it is fresh) into the same target
//! directory as the test binary.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use probex_cache::Store;

use crate::kinds::{self, read_trace};

/// The `testkit` binary, built once per test process.
pub fn testkit() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("current exe");
        // <target>/debug/deps/process-HASH -> <target>/debug
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in <target>/<profile>/deps");
        let target_dir = profile_dir.parent().expect("target dir");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "probex-engine",
                "--example",
                "testkit",
            ])
            .arg("--target-dir")
            .arg(target_dir)
            .output()
            .expect("run cargo build --example testkit");
        assert!(
            out.status.success(),
            "building the testkit example failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = profile_dir
            .join("examples")
            .join(format!("testkit{}", std::env::consts::EXE_SUFFIX));
        assert!(bin.is_file(), "no testkit at {}", bin.display());
        bin
    })
}

/// One test's directory: experiment files, a private cache and a trace of executions.
pub struct Kit {
    pub dir: tempfile::TempDir,
}

impl Kit {
    pub fn new() -> Self {
        Kit {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn cache(&self) -> PathBuf {
        self.path("cache")
    }

    pub fn trace(&self) -> Vec<kinds::TraceLine> {
        read_trace(&self.path("trace.tsv"))
    }

    /// How many times `node` started executing, over every process so far.
    pub fn starts(&self, node: &str) -> usize {
        self.trace()
            .iter()
            .filter(|l| l.what == "start" && l.node == node)
            .count()
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, text).expect("write experiment");
        p
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(testkit());
        c.arg("--cache")
            .arg(self.cache())
            .args(args)
            .env("PROBEX_TESTKIT_TRACE", self.path("trace.tsv"))
            .current_dir(self.dir.path());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run testkit")
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn testkit")
    }

    pub fn store(&self) -> Store {
        Store::open(self.cache()).expect("open store")
    }

    /// `cache verify` must say every entry is sound.
    pub fn assert_verify_clean(&self, entries: usize) {
        let out = self.run(&["cache", "verify"]);
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
        assert!(
            text.contains(&format!("{entries} entries verified, 0 corrupt")),
            "{text}"
        );
    }

    /// Entry directories on disk, complete or not.
    pub fn entry_dirs(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for shard in fs::read_dir(self.cache().join("entries"))
            .into_iter()
            .flatten()
        {
            for e in fs::read_dir(shard.unwrap().path()).into_iter().flatten() {
                out.push(e.unwrap().path());
            }
        }
        out
    }

    /// The key of `node` in the current plan of `file`.
    pub fn key_of(&self, file: &str, node: &str) -> probex_cache::Key {
        let out = self.run(&["plan", "--json", file]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("plan json");
        let key = v["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|r| r["node"] == node))
            .and_then(|r| r["key"].as_str())
            .unwrap_or_else(|| panic!("no node {node} in {v}"));
        probex_cache::Key::parse(key).expect("key")
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Polls `cond` every few milliseconds for at most `limit`.
pub fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(3));
    }
}
