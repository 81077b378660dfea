//! The scale benchmark: Model-J-shaped collections at real tensor shapes, generated here, through
//! fetch (dir) -> extract -> train one layer -> select, with what each step costs.
//!
//! ```sh
//! cargo run --release -p probex-stages --example scale -- --loras 1000 --vits 200
//! ```
//!
//! - SD1.x LoRAs (diffusers names, rank 16, f16, 128 pairs each; `model_j_generative` layout):
//!   extract with `layers = "all"`, then ProbeX on layer 46 (1280x1280) and select. Printed:
//!   cache bytes written against the LoRA files' bytes, extract's time against a raw read of
//!   the same files (warm page cache, both), peak RSS of each step, and a ProbeX epoch on the
//!   layer's factors against the same epoch on the materialised `B @ A`.
//! - ViT-B/16s (Hugging Face names, f32, `model_j_discriminative` layout): extract the paper's
//!   74 layers; printed: cache bytes written against the model files' bytes. The files are
//!   sparse (a real header, the data a hole that reads as zeros): what is measured is what
//!   extraction writes, which does not depend on the values, and 200 real ViT-B files would
//!   need 69 GB of disk.
//!
//! Peak RSS is the process's high-water mark (`VmHWM`), reset before each step through
//! `/proc/self/clear_refs`. Everything is written under `--dir` (default: a temporary folder,
//! removed at the end unless `--keep`).

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use probex_engine::cache::Store;
use probex_engine::digest::FileDigests;
use probex_engine::record::RunDir;
use probex_engine::run::RunOptions;
use probex_engine::{Overrides, PlanContext, Planner, RunReport};
use probex_stages::dataset::{LayerDataset, Matrices};
use probex_stages::models::ModelKind;
use probex_stages::shapes;
use probex_stages::training::{DeviceSpec, TrainConfig, train};
use rayon::prelude::*;
use safetensors::Dtype;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Args {
    loras: usize,
    vits: usize,
    epochs: usize,
    dir: Option<PathBuf>,
    keep: bool,
    cold: bool,
}

fn args() -> Result<Args> {
    let mut a = Args {
        loras: 1000,
        vits: 200,
        epochs: 10,
        dir: None,
        keep: false,
        cold: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--loras" => a.loras = value()?.parse()?,
            "--vits" => a.vits = value()?.parse()?,
            "--epochs" => a.epochs = value()?.parse()?,
            "--dir" => a.dir = Some(value()?.into()),
            "--keep" => a.keep = true,
            "--cold" => a.cold = true,
            "-h" | "--help" => {
                println!(
                    "scale [--loras N (1000)] [--vits N (200)] [--epochs N (10)] [--dir DIR] \
                     [--keep] [--cold: also time extraction and the raw read from a cold page \
                     cache; needs root]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument `{other}`").into()),
        }
    }
    Ok(a)
}

/// Split of model `i` of `n`: 70% train, 10% val, 20% test.
fn split(i: usize, n: usize) -> &'static str {
    match i * 10 / n.max(1) {
        0..=6 => "train",
        7 => "val",
        _ => "test",
    }
}

/// Bytes of every file under `dir`.
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// Resets the process's peak RSS (Linux: `VmHWM` restarts from the current RSS).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The process's peak RSS since the last [`reset_peak`], in bytes.
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// What one measured step cost.
struct Step {
    name: String,
    seconds: f64,
    peak: u64,
    written: u64,
}

/// Runs experiment `toml` (written to `dir/name.toml`) against `cache`, measuring it.
fn run_experiment(dir: &Path, name: &str, toml: &str, cache: &Path) -> Result<(RunReport, Step)> {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, toml)?;
    let registry = probex_stages::registry();
    let exp = probex_engine::load(&file, &registry).map_err(|d| d.to_string())?;
    let store = Store::open(cache)?;
    let digests = FileDigests::open(cache.join("statcache.json"));
    let cx = PlanContext {
        base_dir: &exp.base_dir,
        digests: &digests,
        offline: true,
    };
    let before = tree_bytes(cache);
    reset_peak();
    let started = Instant::now();
    let planner = Planner::new(&exp, &store, cx, Overrides::default());
    let record = RunDir::create(&exp, Some(&dir.join("runs").join(name)))?;
    let opts = RunOptions {
        jobs: 1,
        progress: probex_engine::progress::ProgressMode::Quiet,
        ..RunOptions::default()
    };
    let report = probex_engine::run(&planner, &record, &opts).map_err(|d| d.to_string())?;
    if !report.success() {
        return Err(format!("{name}: the run failed: {:#?}", report.nodes).into());
    }
    let step = Step {
        name: name.into(),
        seconds: started.elapsed().as_secs_f64(),
        peak: peak_rss(),
        written: tree_bytes(cache).saturating_sub(before),
    };
    Ok((report, step))
}

/// Empties the page cache (root only), so the next reads come from the disk.
fn drop_page_cache() -> Result<()> {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .map_err(|e| format!("--cold needs root to drop the page cache: {e}").into())
}

/// Reads every file completely, in parallel: the floor of any extraction of them.
fn raw_read(files: &[PathBuf]) -> Result<f64> {
    let started = Instant::now();
    files
        .par_iter()
        .try_for_each(|f| std::fs::read(f).map(drop))?;
    Ok(started.elapsed().as_secs_f64())
}

const GB: f64 = 1e9;
const MB: f64 = 1e6;

fn print_steps(steps: &[Step], input: u64) {
    println!(
        "  {:<28} {:>9} {:>13} {:>12} {:>10}",
        "step", "wall s", "cache written", "/ input", "peak RSS"
    );
    for s in steps {
        println!(
            "  {:<28} {:>9.2} {:>10.1} MB {:>11.4}x {:>7.0} MB",
            s.name,
            s.seconds,
            s.written as f64 / MB,
            s.written as f64 / input.max(1) as f64,
            s.peak as f64 / MB
        );
    }
}

/// Seconds of the second epoch of a ProbeX training on `ds` (the first includes a validation
/// pass; the second is the training loop alone).
fn epoch_seconds(ds: &LayerDataset, threads: usize) -> Result<f64> {
    let cfg = TrainConfig {
        epochs: 2,
        validate_every: 1000,
        threads,
        ..TrainConfig::new(ModelKind::Probex)
    };
    let mut marks = Vec::new();
    let started = Instant::now();
    train(ds, None, &cfg, &DeviceSpec::Cpu, None, &mut |_| {
        marks.push(started.elapsed().as_secs_f64());
        ControlFlow::Continue(())
    })?;
    Ok(marks[1] - marks[0])
}

fn sd_loras(root: &Path, a: &Args) -> Result<()> {
    println!(
        "\n== {} SD1.x LoRAs (rank 16, f16, diffusers names, 128 pairs each)",
        a.loras
    );
    let models = root.join("models");
    let specs = shapes::sd1_lora(16);
    let started = Instant::now();
    let files: Vec<PathBuf> = (0..a.loras)
        .into_par_iter()
        .map(|i| -> std::io::Result<PathBuf> {
            let dir = models
                .join(split(i, a.loras))
                .join(format!("model_idx_{i:04}"));
            std::fs::create_dir_all(&dir)?;
            let path = dir.join("pytorch_lora_weights.safetensors");
            let meta =
                BTreeMap::from([("imagenet_class_id".to_string(), format!("n{:08}", i % 50))]);
            shapes::write_safetensors(&path, &specs, Dtype::F16, &meta, i as u64)?;
            Ok(path)
        })
        .collect::<std::io::Result<_>>()?;
    let input: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .sum();
    println!(
        "  generated {:.2} GB in {:.0} s",
        input as f64 / GB,
        started.elapsed().as_secs_f64()
    );
    let cache = root.join("cache");
    let head = r#"
[experiment]
name = "scale-sd"

[stage.loras]
kind = "fetch"
source = "dir"
path = "models"
layout = "model_j_generative"
"#;
    let extract = format!(
        "{head}
[stage.layers]
kind = \"extract\"
from = \"loras\"
layers = \"all\"
label = {{ key = \"imagenet_class_id\", kind = \"class\" }}
"
    );
    let (_, fetch) = run_experiment(root, "fetch", &format!("{head}\n"), &cache)?;
    if a.cold {
        drop_page_cache()?;
        let raw = raw_read(&files)?;
        drop_page_cache()?;
        let cold_cache = root.join("cache-cold");
        run_experiment(
            root,
            "fetch (cold cache)",
            &format!("{head}\n"),
            &cold_cache,
        )?;
        drop_page_cache()?;
        let (_, ext) = run_experiment(root, "extract, cold", &extract, &cold_cache)?;
        println!(
            "  cold page cache: extract {:.2} s vs a raw parallel read {raw:.2} s: {:.2}x",
            ext.seconds,
            ext.seconds / raw
        );
    }
    // Warm the page cache the way extraction will find it, then time the floor.
    raw_read(&files)?;
    let raw = raw_read(&files)?;
    // The fetch node is cached by now: the step is extraction alone (and its plan).
    let (_, ext) = run_experiment(root, "extract all 128 layers", &extract, &cache)?;
    let train = format!(
        "{extract}
[stage.one]
kind = \"extract\"
from = \"loras\"
layers = 46
label = {{ key = \"imagenet_class_id\", kind = \"class\" }}

[stage.probe]
kind = \"train\"
from = \"one\"
for_each = \"layer\"
model = \"probex\"
epochs = {}
validate_every = 5

[stage.best]
kind = \"select\"
from = \"probe\"
by = \"val.top1\"
",
        a.epochs
    );
    let (ext_seconds, ext_written) = (ext.seconds, ext.written);
    let (report, trained) = run_experiment(root, "train layer 46 + select", &train, &cache)?;
    print_steps(&[fetch, ext, trained], input);
    println!(
        "  extract {ext_seconds:.2} s vs a raw parallel read of the same files {raw:.2} s: \
         {:.2}x (target <= 2x); cache written by extract {:.3}x the LoRA files (target <= 1.1x)",
        ext_seconds / raw,
        ext_written as f64 / input as f64
    );

    // One ProbeX epoch on layer 46, factored and materialised.
    let store = Store::open(&cache)?;
    let node = report
        .nodes
        .iter()
        .find(|n| n.node == "one[layer=46]")
        .ok_or("no node one[layer=46]")?;
    let entry = store
        .get(&probex_engine::cache::Key::parse(&node.key)?)?
        .ok_or("layer 46 is not in the cache")?;
    let factored = LayerDataset::load(&entry.dir)?;
    let Matrices::Factored { rank, .. } = &factored.weights else {
        return Err("layer 46 was not stored factored".into());
    };
    println!(
        "  layer 46 `{}`: {} models of [{}, {}], rank {rank}",
        factored.layer.name, factored.n, factored.d_h, factored.d_w
    );
    let threads = rayon::current_num_threads();
    let fast = epoch_seconds(&factored, threads)?;
    let mut stacked = Vec::with_capacity(factored.n * factored.d_h * factored.d_w);
    for i in 0..factored.n {
        stacked.extend_from_slice(&factored.matrix(i)?);
    }
    let materialised = LayerDataset {
        weights: Matrices::Stacked(stacked),
        ..factored.clone()
    };
    let slow = epoch_seconds(&materialised, threads)?;
    println!(
        "  ProbeX epoch on layer 46 ({threads} threads): factored {fast:.3} s, materialised \
         {slow:.3} s: {:.1}x (target >= 20x)",
        slow / fast
    );
    Ok(())
}

fn vits(root: &Path, a: &Args) -> Result<()> {
    println!(
        "\n== {} ViT-B/16s (f32, Hugging Face names; sparse files)",
        a.vits
    );
    let specs = shapes::vit_b16(100);
    let classes = "['apple', 'aquarium_fish', 'baby', 'bear', 'beaver']";
    let files: Vec<PathBuf> = (0..a.vits)
        .into_par_iter()
        .map(|i| -> std::io::Result<PathBuf> {
            let dir = root
                .join("models")
                .join(split(i, a.vits))
                .join(format!("model_idx_{i:04}"));
            std::fs::create_dir_all(&dir)?;
            let path = dir.join("model.safetensors");
            let meta =
                BTreeMap::from([("dataset_chosen_targets".to_string(), classes.to_string())]);
            shapes::write_sparse_safetensors(&path, &specs, Dtype::F32, &meta)?;
            Ok(path)
        })
        .collect::<std::io::Result<_>>()?;
    let input: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .sum();
    let toml = r#"
[experiment]
name = "scale-vit"

[stage.models]
kind = "fetch"
source = "dir"
path = "models"
layout = "model_j_discriminative"

[stage.layers]
kind = "extract"
from = "models"
layers = "all"
label = { key = "dataset_chosen_targets", kind = "multi_label", vocab = "cifar100" }
"#;
    let cache = root.join("cache");
    let (report, step) = run_experiment(root, "fetch + extract 74 layers", toml, &cache)?;
    let layers = report.nodes.iter().filter(|n| n.kind == "extract").count();
    print_steps(&[step], input);
    println!(
        "  {layers} layers of {:.1} GB of model files",
        input as f64 / GB
    );
    Ok(())
}

fn main() -> Result<()> {
    let a = args()?;
    let tmp;
    let root = match &a.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    if a.loras > 0 {
        sd_loras(&root.join("sd"), &a)?;
    }
    if a.vits > 0 {
        vits(&root.join("vit"), &a)?;
    }
    if a.keep || a.dir.is_some() {
        println!("\nfiles kept in {}", root.display());
    }
    Ok(())
}
