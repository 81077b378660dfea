//! `testkit`: the engine's CLI with the test-only stage kinds, for tests that need a separate
//! process (exit codes, SIGKILL in the middle of a stage, concurrent runs).
//!
//! It calls [`probex_engine::cli::dispatch`] exactly as the `probex` binary does. Set
//! `PROBEX_TESTKIT_TRACE=FILE` to have every execution appended to FILE.

#[path = "../tests/kinds/mod.rs"]
mod kinds;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand};
use probex_engine::cli::{CacheArgs, EngineCommand, dispatch};

/// The probex engine with test-only stage kinds.
#[derive(Parser, Debug)]
#[command(name = "testkit")]
struct Cli {
    #[command(flatten)]
    cache: CacheArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    #[command(flatten)]
    Engine(EngineCommand),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let trace = match std::env::var_os("PROBEX_TESTKIT_TRACE") {
        Some(path) => kinds::Trace::to_file(path.into()),
        None => kinds::Trace::new(),
    };
    let registry = kinds::registry(&trace);
    // As in `probex`: the first Ctrl-C (or SIGTERM, which is how SLURM stops a job) asks the
    // run to stop, a second one exits at once.
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
    let code = match cli.command {
        Command::Engine(cmd) => dispatch(cmd, &cli.cache, &registry, cancel),
    };
    ExitCode::from(code as u8)
}
