//! `probex export LAYER OUT`: a layer dataset as one plain stacked `layer.safetensors`
//! (`weights` `[N, d_H, d_W]`, `labels`) and its `layer.json`, for tools that read neither
//! LoRA factors nor in-place references. Rows are written one by one, so a layer larger than
//! memory exports too.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use probex_cache::Store;
use probex_engine::cli::CacheArgs;
use probex_weights::dataset::{LayerDataset, Precision};

/// Arguments of `probex export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The layer dataset: its directory, or the key (or a unique prefix of it, as `probex
    /// cache ls` shows) of an `extract` node's cache entry
    layer: String,
    /// Directory to write `layer.safetensors` and `layer.json` into (created if missing)
    out: PathBuf,
    /// Precision of the written matrices
    #[arg(long, value_enum, default_value = "f32")]
    precision: PrecisionArg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PrecisionArg {
    F32,
    F16,
    Bf16,
}

/// Writes the export; returns the exit code (2: bad input).
pub fn run(args: &ExportArgs, cache: &CacheArgs) -> i32 {
    match export(args, cache) {
        Ok(msg) => {
            probex_engine::outln!("{msg}");
            0
        }
        Err(e) => {
            probex_engine::errln!("error: {e}");
            2
        }
    }
}

fn export(args: &ExportArgs, cache: &CacheArgs) -> Result<String, String> {
    let dir = locate(&args.layer, cache)?;
    // Read on demand: never more than one row in memory beyond the output's own buffers.
    let ds = LayerDataset::open(&dir, 0).map_err(|e| e.to_string())?;
    let precision = match args.precision {
        PrecisionArg::F32 => Precision::F32,
        PrecisionArg::F16 => Precision::F16,
        PrecisionArg::Bf16 => Precision::Bf16,
    };
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    if args.out.canonicalize().ok() == dir.canonicalize().ok() {
        return Err("the output directory is the dataset itself: name another".into());
    }
    ds.save_stacked(&args.out, precision)
        .map_err(|e| e.to_string())?;
    Ok(format!(
        "wrote {} rows of layer {} `{}` ([{}, {}]) to {}",
        ds.n,
        ds.layer.index,
        ds.layer.name,
        ds.d_h,
        ds.d_w,
        args.out.display()
    ))
}

/// The dataset directory `what` names: a directory holding `layer.json`, or a cache key.
fn locate(what: &str, cache: &CacheArgs) -> Result<PathBuf, String> {
    let path = Path::new(what);
    if path.join(probex_weights::dataset::SIDECAR_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        return Err(format!(
            "{what} holds no layer dataset (no {})",
            probex_weights::dataset::SIDECAR_FILE
        ));
    }
    if what.is_empty() || !what.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "`{what}` is neither a layer dataset directory nor a cache key (`probex cache ls` \
             lists them)"
        ));
    }
    let store: Store = cache.open()?;
    let entries = store.list().map_err(|e| e.to_string())?;
    let found: Vec<_> = entries
        .iter()
        .filter(|e| e.key.as_str().starts_with(what))
        .collect();
    match found.as_slice() {
        [e] if e.manifest.kind == "extract" => Ok(e.dir.clone()),
        [e] => Err(format!(
            "entry {} is a `{}` node ({}), not an extract node's layer dataset",
            e.key, e.manifest.kind, e.manifest.label
        )),
        [] => Err(format!("no cache entry's key starts with `{what}`")),
        many => Err(format!(
            "{} cache entries' keys start with `{what}`: give more of the key",
            many.len()
        )),
    }
}
