//! `probex search "QUERY" --index RUN_OR_ARTIFACT`: rank a collection's models by free text,
//! with a trained zero-shot probe.

use std::path::PathBuf;

use clap::Args;
use probex_stages::probe::{Probe, search};
use probex_weights::dataset::Split;

fn parse_split(s: &str) -> Result<Split, String> {
    Split::parse(s).ok_or_else(|| {
        let all: Vec<&str> = Split::ALL.iter().map(|v| v.as_str()).collect();
        format!("unknown split `{s}`; one of {}", all.join(", "))
    })
}

/// Arguments of `probex search`.
#[derive(Args, Debug)]
pub struct SearchArgs {
    /// What the models should have been trained on, as a prompt ("a photo of a dog")
    query: String,
    /// A run directory (its zero-shot probe) or a probe artifact directory
    #[arg(long)]
    index: PathBuf,
    /// The stage (or node) of the run whose probe to use, when it has several
    #[arg(long)]
    stage: Option<String>,
    /// How many models to list
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Rank only models of this split (repeatable), e.g. `test_holdout`: models of classes
    /// the probe never trained on
    #[arg(long = "split", value_parser = parse_split)]
    splits: Vec<Split>,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

/// Prints the best matches; returns the exit code.
pub fn run(args: &SearchArgs) -> i32 {
    let hits = Probe::locate(&args.index, args.stage.as_deref(), true)
        .and_then(|probe| search(&probe, &args.query, args.top, &args.splits).map(|h| (probe, h)));
    let (probe, hits) = match hits {
        Ok(x) => x,
        Err(e) => {
            probex_engine::errln!("error: {e:#}");
            return 2;
        }
    };
    if args.json {
        let rows: Vec<serde_json::Value> = hits
            .iter()
            .map(|h| {
                serde_json::json!({
                    "id": h.id, "split": h.split.as_str(), "label": h.label, "score": h.score,
                })
            })
            .collect();
        probex_engine::outln!("{}", serde_json::Value::Array(rows));
        return 0;
    }
    probex_engine::outln!(
        "{} models of {} by cosine to \"{}\" (probe `{}`, layer {}):",
        hits.len(),
        probe.rows.models.len(),
        args.query,
        probe.name,
        probe.rows.layer.index
    );
    let width = hits.iter().map(|h| h.id.len()).max().unwrap_or(2).max(2);
    probex_engine::outln!(
        "{:>4}  {:>7}  {:<width$}  {:<12}  label",
        "rank",
        "score",
        "id",
        "split"
    );
    for (i, h) in hits.iter().enumerate() {
        probex_engine::outln!(
            "{:>4}  {:>7.4}  {:<width$}  {:<12}  {}",
            i + 1,
            h.score,
            h.id,
            h.split.as_str(),
            h.label.as_deref().unwrap_or("-")
        );
    }
    0
}
