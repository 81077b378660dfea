//! Runs an experiment file through the engine with every probex stage kind, quietly: what the
//! `probex run` command does, minus the printing.

use std::path::Path;

use probex_engine::cache::Store;
use probex_engine::digest::FileDigests;
use probex_engine::record::RunDir;
use probex_engine::run::RunOptions;
use probex_engine::{Overrides, PlanContext, Planner, RunReport};

/// Loads and runs `exp` against the cache at `cache`, recording the run in `run_dir` (default:
/// `run/` beside the experiment file); `offline` as `--offline`.
pub fn run(exp: &Path, cache: &Path, run_dir: Option<&Path>, offline: bool) -> RunReport {
    let registry = probex_stages::registry(probex_hub::connect);
    let exp = probex_engine::load(exp, &registry).unwrap_or_else(|d| panic!("{d}"));
    let store = Store::open(cache).unwrap();
    let digests = FileDigests::in_memory();
    let cx = PlanContext {
        base_dir: &exp.base_dir,
        digests: &digests,
        offline,
    };
    let planner = Planner::new(&exp, &store, cx, Overrides::default());
    let dir = run_dir.map_or_else(|| exp.base_dir.join("run"), Path::to_path_buf);
    let record = RunDir::create(&exp, Some(&dir)).unwrap();
    let opts = RunOptions {
        jobs: 2,
        progress: probex_engine::progress::ProgressMode::Quiet,
        ..RunOptions::default()
    };
    probex_engine::run(&planner, &record, &opts).unwrap_or_else(|d| panic!("{d}"))
}
