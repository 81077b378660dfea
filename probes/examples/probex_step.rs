//! Benchmark: one ProbeX training step (forward, BCE-with-logits, backward, Adam) on the CPU at
//! the paper's shape, side by side with PyTorch's CPU step for the same model and threads.
//!
//! ```text
//! cargo run -p probex-probes --example probex_step -- --threads 2
//! PROBEX_PYTHON=/path/to/venv/bin/python cargo run ... -- --threads 2 --steps 5
//! ```
//! Options: `--threads N` (2), `--batch B` (128), `--d D` (768: a D x D layer), `--rank R`
//! (128: r_U = r_V = r_T), `--classes C` (100), `--steps S` (5), `--no-torch`, `--device D`
//! (`cpu`; `cuda[:N]` needs the `cuda` feature and skips PyTorch). The PyTorch side
//! runs `probes/python/step_bench.py` with `$PROBEX_PYTHON` (default `python3`); it is skipped
//! with a note when torch cannot be imported.

use std::process::Command;
use std::time::Instant;

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::TensorData;
use probex_probes::models::ProbexConfig;
use probex_probes::models::encoder::Scratch;
use probex_probes::training::device::with_threads;
use probex_probes::training::optim::Adam;
use probex_probes::training::{DeviceSpec, split_gradients, train_scores};
use probex_weights::rng::Rng;

struct Args {
    threads: usize,
    batch: usize,
    d: usize,
    rank: usize,
    classes: usize,
    steps: usize,
    torch: bool,
    device: DeviceSpec,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        threads: 2,
        batch: 128,
        d: 768,
        rank: 128,
        classes: 100,
        steps: 5,
        torch: true,
        device: DeviceSpec::Cpu,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--no-torch" {
            a.torch = false;
            continue;
        }
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        if k == "--device" {
            a.device = v.parse().map_err(|e| format!("{e}"))?;
            continue;
        }
        let n: usize = v
            .parse()
            .map_err(|_| format!("{k}: `{v}` is not a number"))?;
        match k.as_str() {
            "--threads" => a.threads = n,
            "--batch" => a.batch = n,
            "--d" => a.d = n,
            "--rank" => a.rank = n,
            "--classes" => a.classes = n,
            "--steps" => a.steps = n,
            _ => return Err(format!("unknown option {k}")),
        }
    }
    Ok(a)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn probex_step_seconds<B: Backend>(a: &Args, dev: &B::Device) -> f64 {
    type AB<B> = Autodiff<B>;
    let dev = dev.clone();
    let cfg = ProbexConfig::new(a.d, a.d, a.classes)
        .with_r_u(a.rank)
        .with_r_v(a.rank)
        .with_r_t(a.rank);
    let mut model = cfg.init::<AB<B>>(&mut Rng::new(0, 0), &dev);
    let mut adam = Adam::new(1e-3, 1e-5, 0.9, 0.999, 1e-8);
    let mut rng = Rng::new(1, 0);
    let x: Vec<f32> = (0..a.batch * a.d * a.d).map(|_| rng.normal()).collect();
    let y: Vec<f32> = (0..a.batch * a.classes)
        .map(|_| (rng.unit_f32() > 0.5) as u8 as f32)
        .collect();
    let x = Tensor::<B, 3>::from_data(TensorData::new(x, [a.batch, a.d, a.d]), &dev);
    let y = Tensor::<B, 2>::from_data(TensorData::new(y, [a.batch, a.classes]), &dev);
    let mut scratch = Scratch::default();
    let mut times = Vec::new();
    let mut phases = [Vec::new(), Vec::new(), Vec::new()];
    for i in 0..=a.steps {
        let t = Instant::now();
        let (s, split) = train_scores(&model, x.clone().into(), None, &mut scratch);
        let yy = Tensor::<AB<B>, 2>::from_inner(y.clone());
        let loss = (s.clone().clamp_min(0.0) - s.clone() * yy + s.abs().neg().exp().log1p()).mean();
        let _ = B::sync(&dev);
        let t_fwd = t.elapsed().as_secs_f64();
        let grads = loss.backward();
        let extra = split_gradients(split, &grads, &mut scratch);
        let _ = B::sync(&dev);
        let t_bwd = t.elapsed().as_secs_f64();
        model = adam.step_with(model, &grads, extra);
        // Force completion of the update before stopping the clock (a GPU queues work).
        let _ = model
            .classification_head
            .bias
            .as_ref()
            .map(|b| b.val().into_data());
        let _ = B::sync(&dev);
        let total = t.elapsed().as_secs_f64();
        if i > 0 {
            times.push(total);
            phases[0].push(t_fwd);
            phases[1].push(t_bwd - t_fwd);
            phases[2].push(total - t_bwd);
        }
    }
    let [f, b, o] = phases.map(median);
    println!("probex phases: forward {f:.3} s, backward {b:.3} s, adam {o:.3} s");
    median(times)
}

/// FP32 FMA throughput of `threads` threads in GFLOP/s, with the widest vectors this CPU has:
/// 12 independent FMA chains per thread, no memory traffic, best of 7 runs. No GEMM can beat
/// it, so it says how far any step time is from this machine's ceiling.
#[cfg(target_arch = "x86_64")]
fn fma_peak(threads: usize) -> Option<(f64, &'static str)> {
    use std::arch::x86_64::*;
    const ITERS: usize = 20_000_000;

    #[target_feature(enable = "avx512f")]
    fn chains_512() -> f32 {
        let (b, c) = (_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(1e-7));
        let mut a = [_mm512_setzero_ps(); 12];
        for _ in 0..ITERS {
            for v in &mut a {
                *v = _mm512_fmadd_ps(*v, b, c);
            }
        }
        a.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
    }

    #[target_feature(enable = "avx2,fma")]
    fn chains_256() -> f32 {
        let (b, c) = (_mm256_set1_ps(1.000_000_1), _mm256_set1_ps(1e-7));
        let mut a = [_mm256_setzero_ps(); 12];
        for _ in 0..ITERS {
            for v in &mut a {
                *v = _mm256_fmadd_ps(*v, b, c);
            }
        }
        let mut lanes = [0f32; 8];
        a.iter()
            .map(|&v| {
                // SAFETY: `lanes` holds the 8 floats the store writes.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
                lanes.iter().sum::<f32>()
            })
            .sum()
    }

    let (lanes, name, chains): (usize, _, fn() -> f32) = if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        (16, "AVX-512", || unsafe { chains_512() })
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        (8, "AVX2", || unsafe { chains_256() })
    } else {
        return None;
    };
    // Best of several short runs: a ceiling, so the run least disturbed by other load counts.
    let secs = (0..7)
        .map(|_| {
            let t = Instant::now();
            let sums: Vec<f32> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads).map(|_| s.spawn(chains)).collect();
                handles.into_iter().filter_map(|h| h.join().ok()).collect()
            });
            std::hint::black_box(sums);
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    let flop = (threads * ITERS * 12 * lanes * 2) as f64;
    Some((flop / secs / 1e9, name))
}

#[cfg(not(target_arch = "x86_64"))]
fn fma_peak(_threads: usize) -> Option<(f64, &'static str)> {
    None
}

fn torch_step_seconds(a: &Args) -> Result<(f64, String), String> {
    let python = std::env::var("PROBEX_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/step_bench.py");
    let out = Command::new(&python)
        .arg(script)
        .args(["--threads", &a.threads.to_string()])
        .args(["--batch", &a.batch.to_string()])
        .args(["--d", &a.d.to_string()])
        .args(["--rank", &a.rank.to_string()])
        .args(["--classes", &a.classes.to_string()])
        .args(["--steps", &a.steps.to_string()])
        .output()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("").to_string();
        return Err(format!("{python} {script} failed: {last}"));
    }
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|s| s.trim().to_string())
    };
    let secs = field("torch_step_s=")
        .and_then(|s| s.parse().ok())
        .ok_or(format!("no torch_step_s in the output of {script}"))?;
    Ok((secs, field("torch_version=").unwrap_or_default()))
}

fn main() {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("probex_step: {e}");
            std::process::exit(2);
        }
    };
    let flop = 2.0
        * a.batch as f64
        * (2.0 * (a.d * a.d * a.rank) as f64
            + 3.0 * (a.rank * a.d * a.rank) as f64
            + 3.0 * (a.rank * a.rank * a.rank) as f64);
    println!(
        "ProbeX step: batch {}, {}x{} layer, r_U=r_V=r_T={}, {} classes, {} threads, ~{:.1} GFLOP",
        a.batch,
        a.d,
        a.d,
        a.rank,
        a.classes,
        a.threads,
        flop / 1e9
    );
    if let Err(e) = a.device.check() {
        eprintln!("probex_step: {e}");
        std::process::exit(1);
    }
    let run = || match a.device {
        DeviceSpec::Cpu => probex_step_seconds::<Flex>(&a, &Default::default()),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(i) => {
            probex_step_seconds::<burn::backend::Cuda>(&a, &burn::backend::cuda::CudaDevice::new(i))
        }
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(_) => unreachable!("checked above"),
    };
    let ours = match with_threads(a.threads, run) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("probex_step: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "probex ({}): {ours:.3} s/step ({:.0} GFLOP/s), median of {}",
        a.device,
        flop / ours / 1e9,
        a.steps
    );
    if a.device != DeviceSpec::Cpu {
        return;
    }
    let peak = fma_peak(a.threads);
    if let Some((gflops, isa)) = peak {
        println!(
            "this CPU's ceiling: {gflops:.0} GFLOP/s ({isa} FMA loop, {} threads): a step takes \
             at least {:.3} s; probex runs at {:.0}% of it",
            a.threads,
            flop / gflops / 1e9,
            100.0 * flop / ours / 1e9 / gflops
        );
    }
    if !a.torch {
        return;
    }
    match torch_step_seconds(&a) {
        Ok((theirs, version)) => {
            println!(
                "pytorch {version}: {theirs:.3} s/step ({:.0} GFLOP/s), median of {}",
                flop / theirs / 1e9,
                a.steps
            );
            println!("speed-up (pytorch / probex): {:.2}x", theirs / ours);
            if let Some((gflops, _)) = peak {
                println!(
                    "2x pytorch would be {:.3} s/step: {:.0}% of the ceiling",
                    theirs / 2.0,
                    100.0 * flop / (theirs / 2.0) / 1e9 / gflops
                );
            }
        }
        Err(e) => println!("pytorch: skipped ({e}); set PROBEX_PYTHON to a python with torch"),
    }
}
