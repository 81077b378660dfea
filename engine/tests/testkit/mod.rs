//! The `testkit` example (the engine's CLI with the test kinds), for tests that drive it as a
//! separate process.
//!
//! `cargo test` builds examples, but `cargo test --test NAME` does not, so the first test to
//! need it runs `cargo build --example testkit` (a no-op when it is fresh) into the same target
//! directory as the test binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

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
