//! `probex describe MODEL.safetensors --probe RUN_OR_ARTIFACT`: what one model was probably
//! trained on, from the weights of the layer the probe reads.

use std::path::PathBuf;

use clap::Args;
use probex_probes::models::checkpoint::TaskKind;
use probex_stages::probe::{Probe, describe};

/// Arguments of `probex describe`.
#[derive(Args, Debug)]
pub struct DescribeArgs {
    /// A .safetensors model file from the probe's model tree
    model: PathBuf,
    /// A run directory (its selected probe) or a probe artifact directory
    #[arg(long)]
    probe: PathBuf,
    /// The stage (or node) of the run whose probe to use, when it has several
    #[arg(long)]
    stage: Option<String>,
    /// How many classes to list
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

/// Prints the prediction; returns the exit code.
pub fn run(args: &DescribeArgs) -> i32 {
    let described = Probe::locate(&args.probe, args.stage.as_deref(), false)
        .and_then(|probe| describe(&probe, &args.model, args.top).map(|d| (probe, d)));
    let (probe, d) = match described {
        Ok(x) => x,
        Err(e) => {
            probex_engine::errln!("error: {e:#}");
            return 2;
        }
    };
    if args.json {
        let v = serde_json::json!({
            "model": args.model,
            "probe": probe.name,
            "layer": probe.rows.layer,
            "task": d.task,
            "classes": d.classes.iter().map(|(c, s)| serde_json::json!({"class": c, "score": s})).collect::<Vec<_>>(),
            "value": d.value,
        });
        probex_engine::outln!("{v}");
        return 0;
    }
    probex_engine::outln!(
        "{} (layer {} `{}`, probe `{}`, {} {}):",
        args.model.display(),
        probe.rows.layer.index,
        probe.rows.layer.name,
        probe.name,
        probe.spec.kind,
        match d.task {
            TaskKind::MultiLabel => "multi-label: probability each class was in its training set",
            TaskKind::Class => "single class: probability",
            TaskKind::ZeroShot => "zero-shot: cosine to each class's text",
            TaskKind::Regression => "regression",
        }
    );
    if let Some(v) = d.value {
        probex_engine::outln!("  {} = {v:.6}", probe.rows.columns.join(", "));
    }
    for (c, s) in &d.classes {
        probex_engine::outln!("  {s:>8.4}  {c}");
    }
    0
}
