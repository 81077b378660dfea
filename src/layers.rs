//! `probex layers FILE`: what a layer index means for a given model file.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use probex_weights::{LayerMode, describe_layers, format_layer_table};

/// Arguments of `probex layers`.
#[derive(Args, Debug)]
pub struct LayersArgs {
    /// A .safetensors model file
    file: PathBuf,
    /// The layer list: the paper's for a recognised architecture (ViT, ResNet, LoRA), else
    /// weight matrices (auto); or one by name; `tensors` counts every tensor
    #[arg(long, value_enum, default_value = "auto")]
    mode: ModeArg,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    Auto,
    Vit,
    Resnet,
    Lora,
    Matrices,
    Tensors,
}

/// Prints every tensor with its position in the file and its layer index; returns the exit
/// code.
pub fn run(args: &LayersArgs) -> i32 {
    let mode = match args.mode {
        ModeArg::Auto => LayerMode::Auto,
        ModeArg::Vit => LayerMode::Vit,
        ModeArg::Resnet => LayerMode::Resnet,
        ModeArg::Lora => LayerMode::Lora,
        ModeArg::Matrices => LayerMode::Matrices,
        ModeArg::Tensors => LayerMode::Tensors,
    };
    let listing = match describe_layers(&args.file, mode) {
        Ok(l) => l,
        Err(e) => {
            probex_engine::errln!("error: {e}");
            return 2;
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&listing) {
            Ok(s) => probex_engine::outln!("{s}"),
            Err(e) => {
                probex_engine::errln!("error: {e}");
                return 2;
            }
        }
        return 0;
    }
    probex_engine::outln!("{}", format_layer_table(&listing).trim_end());
    0
}
