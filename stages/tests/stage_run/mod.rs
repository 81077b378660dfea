//! Runs one stage kind directly, outside the engine, as a node would run: params checked, a
//! quiet progress sink, the output folder with a work folder inside it.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use probex_engine::{Inputs, Outcome, ProgressSink, RunContext, Stage};

struct Quiet;
impl ProgressSink for Quiet {
    fn progress(&self, _: &str, _: u64, _: u64, _: &str) {}
}

/// Checks `p` and runs `stage` on `inputs` into `out` with `threads` threads, offline.
pub fn run<S: Stage>(
    stage: &S,
    p: &S::Params,
    inputs: &Inputs,
    out: &Path,
    threads: usize,
) -> anyhow::Result<Outcome> {
    let cancel = AtomicBool::new(false);
    let cx = RunContext::new(
        stage.kind().into(),
        out.to_path_buf(),
        out.join("work"),
        PathBuf::from("/"),
        None,
        threads,
        true,
        None,
        &Quiet,
        &cancel,
    );
    stage.check(p).map_err(anyhow::Error::msg)?;
    stage.run(p, inputs, &cx)
}
