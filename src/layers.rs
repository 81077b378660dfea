//! `probex layers FILE`: what a layer index means for a given model file.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use probex_stages::weights::{LayerMode, list_layers};

/// Arguments of `probex layers`.
#[derive(Args, Debug)]
pub struct LayersArgs {
    /// A .safetensors model file
    file: PathBuf,
    /// Plain tensors, LoRA pairs (X = B @ A), or decide from the file
    #[arg(long, value_enum, default_value = "auto")]
    mode: ModeArg,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    Auto,
    Tensors,
    Lora,
}

/// Prints the layers; returns the exit code.
pub fn run(args: &LayersArgs) -> i32 {
    let mode = match args.mode {
        ModeArg::Auto => LayerMode::Auto,
        ModeArg::Tensors => LayerMode::Tensors,
        ModeArg::Lora => LayerMode::Lora,
    };
    let rows = match list_layers(&args.file, mode) {
        Ok(r) => r,
        Err(e) => {
            probex_engine::errln!("error: {e}");
            return 2;
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&rows) {
            Ok(s) => probex_engine::outln!("{s}"),
            Err(e) => {
                probex_engine::errln!("error: {e}");
                return 2;
            }
        }
        return 0;
    }
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
    probex_engine::outln!(
        "{:>5}  {:<width$}  {:<18}  {:<5}  probe matrix",
        "index",
        "name",
        "shape",
        "dtype"
    );
    for r in &rows {
        let matrix = match (&r.matrix, &r.transform) {
            (Some([h, w]), Some(t)) => format!("[{h}, {w}] ({})", t.as_str()),
            _ => r.note.clone().unwrap_or_else(|| "-".into()),
        };
        probex_engine::outln!(
            "{:>5}  {:<width$}  {:<18}  {:<5}  {matrix}",
            r.index,
            r.name,
            format!("{:?}", r.shape),
            r.dtype
        );
    }
    0
}
