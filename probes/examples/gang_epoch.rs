//! Benchmark: the epoch time of a gang of G ProbeX layers trained as one batched problem
//! against G solo trainings, both on the tensor path (Burn's tensor operations: what CUDA
//! runs; on the CPU the solo default is the faster host path, which this does not time).
//!
//! ```text
//! cargo run --release --example gang_epoch -- --gangs 1,3 --models 64
//! ./gang_epoch --device cuda --gangs 1,4,12,24 --models 400 --epochs 4
//! ```
//! Options: `--gangs G1,G2,...` (3: gang sizes, each timed in turn), `--models N` (64 per
//! layer, 80% train, 10% val, 10% test), `--d D` (768: D x D layers), `--rank R` (128:
//! r_U = r_V = r_T), `--classes C` (100, multi-label), `--batch B` (128), `--epochs E` (3;
//! the first is warm-up and validation and is not counted), `--solo K` (1: solo trainings
//! timed; a solo training's epoch does not depend on the other layers, so G solo runs cost G
//! times one), `--threads T` (0: all cores), `--device D` (`cpu`; `cuda[:N]` needs the
//! `cuda` feature).
//!
//! Every layer has its own generated values (uniform, cheap to make in bulk) and labels, so
//! a gang reads G layers' worth of data, as in a sweep.

use std::ops::ControlFlow;
use std::time::Instant;

use rayon::prelude::*;

use probex_probes::models::ModelKind;
use probex_probes::training::{
    DeviceError, DeviceSpec, GangMember, StepPath, TrainConfig, TrainProgress, train_gang_on,
    train_on,
};
use probex_weights::dataset::{Labels, LayerDataset, LayerInfo, Matrices, ModelRecord, Split};

struct Args {
    gangs: Vec<usize>,
    models: usize,
    d: usize,
    rank: usize,
    classes: usize,
    batch: usize,
    epochs: usize,
    solo: usize,
    threads: usize,
    device: DeviceSpec,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        gangs: vec![3],
        models: 64,
        d: 768,
        rank: 128,
        classes: 100,
        batch: 128,
        epochs: 3,
        solo: 1,
        threads: 0,
        device: DeviceSpec::Cpu,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        let num = |v: &str| {
            v.parse::<usize>()
                .map_err(|_| format!("{k}: `{v}` is not a number"))
        };
        match k.as_str() {
            "--device" => a.device = v.parse().map_err(|e: DeviceError| e.to_string())?,
            "--gangs" => a.gangs = v.split(',').map(num).collect::<Result<_, _>>()?,
            "--models" => a.models = num(&v)?,
            "--d" => a.d = num(&v)?,
            "--rank" => a.rank = num(&v)?,
            "--classes" => a.classes = num(&v)?,
            "--batch" => a.batch = num(&v)?,
            "--epochs" => a.epochs = num(&v)?,
            "--solo" => a.solo = num(&v)?,
            "--threads" => a.threads = num(&v)?,
            _ => return Err(format!("unknown option {k}")),
        }
    }
    if a.epochs < 2 || a.gangs.contains(&0) || a.models < 10 {
        return Err("need --epochs >= 2, gang sizes >= 1 and --models >= 10".into());
    }
    Ok(a)
}

/// A cheap uniform in [-1, 1) from a counter (SplitMix64), so G layers of N 768x768 matrices
/// are made in seconds on many cores.
fn uniform(seed: u64, i: u64) -> f32 {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(i.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// Layer `seed`: N random D x D matrices with random multi-hot labels.
fn layer(a: &Args, seed: u64) -> LayerDataset {
    let (n, d) = (a.models, a.d);
    let weights: Vec<f32> = (0..(n * d * d) as u64)
        .into_par_iter()
        .map(|i| uniform(seed, i))
        .collect();
    let targets: Vec<f32> = (0..(n * a.classes) as u64)
        .map(|i| (uniform(seed + 1_000, i) > 0.0) as u8 as f32)
        .collect();
    let split = |i: usize| match i * 10 / n {
        8 => Split::Val,
        9 => Split::Test,
        _ => Split::Train,
    };
    LayerDataset {
        layer: LayerInfo {
            index: seed as usize,
            name: format!("layer.{seed}.weight"),
            source_shape: vec![d, d],
            transform: "squeeze".into(),
            list: None,
        },
        n,
        d_h: d,
        d_w: d,
        weights: Matrices::Stacked(weights),
        models: (0..n)
            .map(|i| ModelRecord {
                id: format!("model_{i:05}"),
                split: split(i),
                source_digest: format!("{i}"),
            })
            .collect(),
        label_key: "classes".into(),
        labels: Labels::MultiLabel {
            classes: (0..a.classes).map(|c| format!("class_{c}")).collect(),
            targets,
        },
        skipped: vec![],
    }
}

/// Seconds between consecutive epoch ends after the first (warm-up, validation), median.
fn epoch_seconds(ends: &[Instant]) -> f64 {
    let mut d: Vec<f64> = ends
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    d.sort_by(f64::total_cmp);
    d.get(d.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("gang_epoch: {e}");
            std::process::exit(2);
        }
    };
    let cfg = TrainConfig {
        epochs: a.epochs,
        batch_size: a.batch,
        // Validate after epoch 0 only: its time is not counted.
        validate_every: 1_000_000,
        r_u: a.rank,
        r_v: a.rank,
        r_t: a.rank,
        threads: a.threads,
        ..TrainConfig::new(ModelKind::Probex)
    };
    let most = a.gangs.iter().copied().max().unwrap_or(1).max(a.solo);
    let t = Instant::now();
    let layers: Vec<LayerDataset> = (0..most as u64).map(|s| layer(&a, s)).collect();
    println!(
        "{most} layers of {} models of {d}x{d} generated in {:.1} s; device {}, batch {}, \
         ranks {}, {} classes, {} epochs (the first not counted)",
        a.models,
        t.elapsed().as_secs_f64(),
        a.device,
        a.batch,
        a.rank,
        a.classes,
        a.epochs,
        d = a.d,
    );

    let mut solo = Vec::new();
    for ds in layers.iter().take(a.solo) {
        let mut ends = Vec::new();
        let mut on_epoch = |_: &TrainProgress| {
            ends.push(Instant::now());
            ControlFlow::Continue(())
        };
        if let Err(e) = train_on(
            ds,
            None,
            &cfg,
            &a.device,
            StepPath::Tensors,
            None,
            &mut on_epoch,
        ) {
            eprintln!("gang_epoch: solo training failed: {e}");
            std::process::exit(1);
        }
        solo.push(epoch_seconds(&ends));
    }
    let one = solo.iter().sum::<f64>() / solo.len().max(1) as f64;
    println!("solo (tensor path): {one:.4} s/epoch per layer");

    for &g in &a.gangs {
        let members: Vec<GangMember> = layers[..g]
            .iter()
            .map(|ds| GangMember {
                ds,
                text: None,
                cfg: &cfg,
                work_dir: None,
            })
            .collect();
        let mut ends = Vec::new();
        let results = train_gang_on(&members, &a.device, StepPath::Tensors, &mut |m, _| {
            if m == 0 {
                ends.push(Instant::now());
            }
            ControlFlow::Continue(())
        });
        if let Some(e) = results.iter().find_map(|r| r.as_ref().err()) {
            eprintln!("gang_epoch: gang of {g} failed: {e}");
            std::process::exit(1);
        }
        let batched = epoch_seconds(&ends);
        println!(
            "gang of {g:>2}: batched {batched:.4} s/epoch ({:.4} s per layer); {g} solo runs \
             {:.4} s/epoch; batched is {:.2}x the solo runs' speed",
            batched / g as f64,
            one * g as f64,
            one * g as f64 / batched
        );
    }
}
