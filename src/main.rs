//! `probex`: run ProbeX experiments declared in TOML.
//!
//! The engine's commands (run, plan, cache, report, compare, kinds) come from
//! `probex_engine::cli`; the commands here need the stage kinds' libraries (reading weights,
//! applying trained probes).

// Output goes through probex_engine::console (outln!, errln!): println! panics on a closed pipe.
#![deny(clippy::print_stdout, clippy::print_stderr)]

mod describe;
mod export;
mod layers;
mod route;
mod search;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand};
use probex_engine::cli::{CacheArgs, EngineCommand, dispatch};

/// Learning on model weights: declarative ProbeX pipelines with a content-addressed cache.
#[derive(Parser, Debug)]
#[command(name = "probex", version, about, propagate_version = true)]
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
    /// List a model file's tensors: position in the file, layer index (the paper's list), shape, matrix
    Layers(layers::LayersArgs),
    /// Rank the models a zero-shot probe has seen by a free-text query
    Search(search::SearchArgs),
    /// Say what one model file was probably trained on, with a trained probe
    Describe(describe::DescribeArgs),
    /// Say which model tree each model file belongs to, with a fitted router, or none
    Route(route::RouteArgs),
    /// Write a layer dataset as one plain stacked safetensors file (for Python tools)
    Export(export::ExportArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    // First Ctrl-C: stop starting nodes and ask running ones to stop; a second one exits now
    // (the cache stays consistent either way: only complete entries are ever committed).
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        probex_engine::errln!("\nstopping (Ctrl-C again to exit at once)...");
    });
    let code = match cli.command {
        Command::Engine(cmd) => dispatch(
            cmd,
            &cli.cache,
            &probex_stages::registry(probex_hub::connect),
            cancel,
        ),
        Command::Layers(args) => layers::run(&args),
        Command::Search(args) => search::run(&args),
        Command::Describe(args) => describe::run(&args),
        Command::Route(args) => route::run(&args),
        Command::Export(args) => export::run(&args, &cli.cache),
    };
    ExitCode::from(probex_engine::console::finish(code) as u8)
}
