//! The probex engine: experiment files -> validated plan -> DAG -> scheduler -> run records.
//!
//! It knows nothing of Burn, safetensors or the Hub: stage kinds come from outside through
//! [`Registry`], artifacts live in a [`probex_cache::Store`].

// Output goes through `console` (outln!, errln!): println! panics on a closed pipe.
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod cli;
pub mod console;
pub mod diagnostic;
pub mod digest;
pub mod executor;
pub mod expect;
pub mod experiment;
pub mod gpus;
pub mod history;
pub mod key;
pub mod parallel;
pub mod param_error;
pub mod params;
pub mod plan;
pub mod progress;
pub mod record;
pub mod report;
pub mod run;
pub mod shape;
pub mod show;
pub mod stage;
pub mod status;

pub use probex_cache as cache;

pub use diagnostic::{Diagnostic, Diagnostics};
pub use experiment::{Experiment, load};
pub use plan::{Overrides, Plan, Planner};
pub use report::RunReport;
pub use run::{RunError, RunOptions, run, run_slurm};
pub use stage::{
    Artifact, Cancelled, Coords, FailedWith, InputSlot, Inputs, KindHelp, Outcome, ParamError,
    ParamHelp, ParamsDoc, PlanContext, PlanFacts, PlanInput, ProgressSink, Registry, Resource,
    RunContext, Shape, Stage, StageResult, Sweep, error_text,
};
