//! Extraction throughput against raw read bandwidth of the same files.
//!
//! Generates N models (default 1,000) with one 768x768 f32 layer each, then times, in one run:
//! raw reads of every file (like `cat FILES > /dev/null`; single thread, and parallel with the
//! extraction's thread count) and the extraction of that layer, with a cold page cache (the
//! files evicted with `posix_fadvise(DONTNEED)`) and a warm one. Prints MB/s (input bytes /
//! seconds) and extraction time / raw read time.
//!
//! `cargo bench -p probex-stages --bench extract` (env: `PROBEX_BENCH_MODELS`, `PROBEX_BENCH_DIR`).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use probex_engine::digest::FileDigests;
use probex_stages::extract::{
    ExtractOptions, LayerOutput, Layout, SplitSource, discover, extract_with_digests,
    resolve_layers,
};
use probex_weights::labels::{LabelKind, LabelSpec, Vocab, vocab};
use probex_weights::{LayerMode, LayerSelector};
use rayon::prelude::*;
use safetensors::Dtype;
use safetensors::tensor::TensorView;

const DIM: usize = 768;

fn generate(dir: &Path, n: usize) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).expect("bench dir");
    let names = vocab::cifar100();
    (0..n)
        .into_par_iter()
        .map(|i| {
            let path = dir.join(format!("model_{i:05}.safetensors"));
            let mut s = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut next = || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s
            };
            let data: Vec<u8> = (0..DIM * DIM)
                .flat_map(|_| (((next() >> 40) as f32 / 16_777_216.0 - 0.5) * 0.1).to_le_bytes())
                .collect();
            let mut chosen: Vec<&str> = names.iter().map(String::as_str).collect();
            for k in (1..chosen.len()).rev() {
                chosen.swap(k, (next() % (k as u64 + 1)) as usize);
            }
            chosen.truncate(50);
            let targets = format!(
                "[{}]",
                chosen
                    .iter()
                    .map(|c| format!("'{c}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let split = [
                "train", "train", "train", "train", "train", "train", "train", "val", "test",
                "test",
            ][i % 10];
            let meta: HashMap<String, String> = [
                ("dataset_chosen_targets".to_string(), targets),
                ("split".to_string(), split.to_string()),
            ]
            .into_iter()
            .collect();
            let view = TensorView::new(Dtype::F32, vec![DIM, DIM], &data).expect("view");
            safetensors::serialize_to_file(
                [("encoder.layer.0.attention.output.dense.weight", view)],
                Some(meta),
                &path,
            )
            .expect("write model");
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .expect("sync");
            path
        })
        .collect()
}

/// Drops the files' pages from the page cache (they are clean: synced after writing).
fn evict(paths: &[PathBuf]) {
    use std::os::fd::AsRawFd;
    for p in paths {
        if let Ok(f) = std::fs::File::open(p) {
            // SAFETY: posix_fadvise only reads its integer arguments and touches no memory of ours;
            // `f` stays open for the call, so the descriptor is valid.
            unsafe {
                libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
    }
}

fn resident_fraction(paths: &[PathBuf]) -> f64 {
    // mincore over a mapping of each file: how much of it is in the page cache.
    let mut resident = 0usize;
    let mut total = 0usize;
    for p in paths {
        let Ok(f) = std::fs::File::open(p) else {
            continue;
        };
        // SAFETY: read-only map of a file nobody modifies during the bench.
        let Ok(map) = (unsafe { memmap2::Mmap::map(&f) }) else {
            continue;
        };
        let page = 4096;
        let pages = map.len().div_ceil(page);
        let mut vec = vec![0u8; pages];
        // SAFETY: the mapping is valid for map.len() bytes; vec has one byte per page.
        let rc = unsafe { libc::mincore(map.as_ptr() as *mut _, map.len(), vec.as_mut_ptr()) };
        if rc == 0 {
            resident += vec.iter().filter(|&&b| b & 1 == 1).count();
            total += pages;
        }
    }
    if total == 0 {
        0.0
    } else {
        resident as f64 / total as f64
    }
}

fn cat_all(paths: &[PathBuf]) -> u64 {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    for p in paths {
        let mut f = std::fs::File::open(p).expect("open");
        loop {
            let k = f.read(&mut buf).expect("read");
            if k == 0 {
                break;
            }
            total += k as u64;
        }
    }
    total
}

fn cat_parallel(paths: &[PathBuf]) -> u64 {
    paths
        .par_chunks(
            paths
                .len()
                .div_ceil(rayon::current_num_threads() * 8)
                .max(1),
        )
        .map(cat_all)
        .sum()
}

/// CPU seconds (user + system) used by this process so far, all threads.
fn cpu_seconds() -> f64 {
    // SAFETY: `rusage` is a C struct of integers, for which all-zero bits are a valid value.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a live, writable rusage and getrusage writes only within it.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

thread_local! {
    static LAST_CPU: std::cell::Cell<f64> = const { std::cell::Cell::new(0.0) };
}

/// Wall seconds of `f`; its CPU seconds are kept for [`last_cpu`].
#[derive(Clone, Copy)]
struct Sample {
    wall: f64,
    cpu: f64,
}

/// Reads every file and appends it to one output file (`cat FILES > out`): the cost of moving
/// the same bytes from the page cache into a new file, which extraction cannot beat.
fn copy_all(paths: &[PathBuf], out: &Path) {
    use std::io::Write;
    let mut o = std::fs::File::create(out).expect("create copy");
    let mut buf = vec![0u8; 1 << 20];
    for p in paths {
        let mut f = std::fs::File::open(p).expect("open");
        loop {
            let k = f.read(&mut buf).expect("read");
            if k == 0 {
                break;
            }
            o.write_all(&buf[..k]).expect("write");
        }
    }
}

fn timed<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let c = cpu_seconds();
    let t = Instant::now();
    let v = f();
    let wall = t.elapsed().as_secs_f64();
    LAST_CPU.with(|l| l.set(cpu_seconds() - c));
    (wall, v)
}

fn last_cpu() -> f64 {
    LAST_CPU.with(|l| l.get())
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let n: usize = std::env::var("PROBEX_BENCH_MODELS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let base = std::env::var_os("PROBEX_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let root = tempfile::Builder::new()
        .prefix("probex-bench-")
        .tempdir_in(&base)
        .expect("temp dir");
    let models_dir = root.path().join("models");
    let out_dir = root.path().join("out");
    let cache_dir = root.path().join("digest-cache");

    let (gen_s, paths) = timed(|| generate(&models_dir, n));
    let bytes: u64 = paths
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let mb = bytes as f64 / 1e6;
    println!(
        "probex extract bench: {n} models x one {DIM}x{DIM} f32 layer, {mb:.0} MB in {} ({} threads); generated in {gen_s:.1} s",
        root.path().display(),
        rayon::current_num_threads()
    );

    let found = discover(&Layout::Folder {
        root: models_dir.clone(),
        recursive: false,
    })
    .expect("discover");
    let selector: LayerSelector = "0".parse().expect("selector");
    let layers =
        resolve_layers(&found.models[0].path, &selector, LayerMode::Auto).expect("resolve");
    let label = LabelSpec {
        vocab: Some(Vocab::Cifar100),
        ..LabelSpec::new("dataset_chosen_targets", LabelKind::MultiLabel)
    };
    // `stat_cache`: file digests from a persistent stat cache, as a run takes them from the
    // one planning filled; otherwise every file is hashed. `in_place`: rows are referenced,
    // not copied.
    let run = |stat_cache: bool, in_place: bool| -> Sample {
        let _ = std::fs::remove_dir_all(&out_dir);
        let outputs = vec![LayerOutput {
            layer: layers[0].clone(),
            dir: out_dir.join("layer"),
        }];
        let digests = if stat_cache {
            FileDigests::open(cache_dir.join("statcache.json"))
        } else {
            FileDigests::in_memory()
        };
        let opts = ExtractOptions {
            in_place,
            splits: SplitSource::Metadata {
                key: "split".into(),
            },
            ..Default::default()
        };
        let (wall, r) = timed(|| {
            extract_with_digests(&found.models, &outputs, &label, &opts, &digests).expect("extract")
        });
        digests.save().expect("stat cache");
        assert_eq!(r.layers[0].rows, n);
        Sample {
            wall,
            cpu: last_cpu(),
        }
    };
    let sample = |f: &dyn Fn()| {
        let (wall, ()) = timed(f);
        Sample {
            wall,
            cpu: last_cpu(),
        }
    };
    let copy_path = root.path().join("copy.bin");
    let copy = || {
        let _ = std::fs::remove_file(&copy_path);
        copy_all(&paths, &copy_path);
    };
    let report = |what: &str, s: Sample, base: Option<Sample>| {
        let ratio = base
            .map(|b| {
                format!(
                    "  ratio {:.2}x (cpu {:.2}x)",
                    s.wall / b.wall,
                    s.cpu / b.cpu
                )
            })
            .unwrap_or_default();
        println!(
            "  {what:<50} {:>7.3} s {:>7.0} MB/s  cpu {:>6.2} s{ratio}",
            s.wall,
            mb / s.wall,
            s.cpu
        );
    };

    // Profiling aid: `PROBEX_BENCH_PROFILE=N` runs only N warm extractions (after a marker line
    // on stderr), for `perf record` without the generation and raw reads in the profile.
    if let Some(k) = std::env::var("PROBEX_BENCH_PROFILE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        let _ = run(true, false);
        eprintln!("profile: start");
        for _ in 0..k {
            let s = run(true, false);
            report("extract, copied (stat cache warm)", s, None);
        }
        return;
    }

    // Cold page cache: each measurement starts with the files evicted.
    evict(&paths);
    let cold_frac = resident_fraction(&paths);
    let raw_cold = sample(&|| assert_eq!(cat_all(&paths), bytes));
    evict(&paths);
    let raw_cold_par = sample(&|| assert_eq!(cat_parallel(&paths), bytes));
    // Fill the digest cache (this first run hashes every file; pages are warm afterwards).
    let first = run(true, false);
    evict(&paths);
    let extract_cold = run(true, false);
    evict(&paths);
    let extract_cold_in_place = run(true, true);
    evict(&paths);
    let copy_cold = sample(&copy);

    // Warm page cache: the measurements are interleaved, five rounds, medians reported, so
    // that load from other processes hits all of them alike.
    let _ = cat_all(&paths);
    let warm_frac = resident_fraction(&paths);
    let mut rounds: Vec<[Sample; 5]> = Vec::new();
    for _ in 0..5 {
        rounds.push([
            sample(&|| assert_eq!(cat_all(&paths), bytes)),
            sample(&|| assert_eq!(cat_parallel(&paths), bytes)),
            run(true, false),
            run(true, true),
            sample(&copy),
        ]);
    }
    let median = |k: usize| {
        let mut v: Vec<Sample> = rounds.iter().map(|r| r[k]).collect();
        v.sort_by(|a, b| a.wall.total_cmp(&b.wall));
        v[v.len() / 2]
    };
    let (raw_warm, raw_warm_par, extract_warm, extract_warm_in_place, copy_warm) =
        (median(0), median(1), median(2), median(3), median(4));
    let extract_warm_nocache = run(false, false);

    let best = |a: Sample, b: Sample| if a.wall <= b.wall { a } else { b };
    let raw_cold_best = best(raw_cold, raw_cold_par);
    let raw_warm_best = best(raw_warm, raw_warm_par);
    println!(
        "cold page cache ({:.0}% resident before each read):",
        cold_frac * 100.0
    );
    report("raw read, 1 thread (cat > /dev/null)", raw_cold, None);
    report("raw read, parallel", raw_cold_par, None);
    report(
        "extract, copied (stat cache warm)",
        extract_cold,
        Some(raw_cold_best),
    );
    report(
        "extract, in place (stat cache warm)",
        extract_cold_in_place,
        Some(raw_cold_best),
    );
    report(
        "raw copy into one file (cat > file), I/O floor",
        copy_cold,
        Some(raw_cold_best),
    );
    println!(
        "warm page cache ({:.0}% resident; medians of 5 interleaved rounds):",
        warm_frac * 100.0
    );
    report("raw read, 1 thread (cat > /dev/null)", raw_warm, None);
    report("raw read, parallel", raw_warm_par, None);
    report(
        "extract, copied (stat cache warm)",
        extract_warm,
        Some(raw_warm_best),
    );
    report(
        "extract, in place (stat cache warm)",
        extract_warm_in_place,
        Some(raw_warm_best),
    );
    report(
        "raw copy into one file (cat > file), I/O floor",
        copy_warm,
        Some(raw_warm_best),
    );
    report(
        "extract, copied (no stat cache: hashes all)",
        extract_warm_nocache,
        Some(raw_warm_best),
    );
    report(
        "first extract (hashes all, fills the stat cache)",
        first,
        Some(raw_warm_best),
    );
    println!(
        "ratio: time / the faster raw read in the same page-cache state (target: extract <= 2x warm)"
    );
}
