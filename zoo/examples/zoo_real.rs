//! End-to-end check of the zoo on the real emoji package: fetch it with npm (pinned), unpack it
//! with probex's safe unpacker, build a tree, then fit a ridge probe from one layer to the
//! training classes and report its top-k precision on the test split.
//!
//! `cargo run -p probex-zoo --example zoo_real -- [--models N] [--arch mlp|vit]
//!  [--size 32] [--threads T] [--layer NAME] [--work DIR] [--pretrain-steps S]`

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use probex_fetch::packages::{Manager, PackageSpec, UnpackLimits, fetch_package, unpack};
use probex_zoo::classes::CIFAR100;
use probex_zoo::{Architecture, Progress, ZooConfig, build_tree};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: BTreeMap<String, String> = BTreeMap::new();
    let raw: Vec<String> = std::env::args().skip(1).collect();
    for pair in raw.chunks(2) {
        if let [k, v] = pair {
            args.insert(k.trim_start_matches("--").to_string(), v.clone());
        }
    }
    let get = |k: &str, d: &str| args.get(k).cloned().unwrap_or_else(|| d.to_string());
    let work = PathBuf::from(get("work", "/tmp/probex-zoo-real"));
    let spec = PackageSpec {
        manager: Manager::Npm,
        name: "emoji-datasource".into(),
        version: "16.0.0".into(),
        sha256: "2006725061dc0098daa832d65f854a7bec0740af2eb47cb5b23d89f7e2c849f9".into(),
    };
    let t = Instant::now();
    let archive = fetch_package(&spec, &work.join("downloads"))?;
    println!(
        "fetched {} in {:.1}s",
        archive.display(),
        t.elapsed().as_secs_f64()
    );
    let emoji_dir = work.join("emoji");
    if !emoji_dir.join("package/emoji.json").exists() {
        let _ = std::fs::remove_dir_all(&emoji_dir);
        let t = Instant::now();
        let r = unpack(&archive, &emoji_dir, &UnpackLimits::default())?;
        println!(
            "unpacked {} files, {} bytes in {:.1}s",
            r.files,
            r.bytes,
            t.elapsed().as_secs_f64()
        );
    }

    let mut config = ZooConfig {
        models: get("models", "300").parse()?,
        image_size: get("size", "16").parse()?,
        threads: get("threads", "0").parse()?,
        ..ZooConfig::default()
    };
    config.pretrain.steps = get("pretrain-steps", &config.pretrain.steps.to_string()).parse()?;
    if get("head", "base") == "random" {
        config.finetune.head_init = probex_zoo::HeadInit::Random;
    }
    if let Some(e) = args.get("epochs") {
        config.finetune.epochs = e.split(',').map(|v| v.parse()).collect::<Result<_, _>>()?;
    }
    if let Some(e) = args.get("lrs") {
        config.finetune.learning_rates =
            e.split(',').map(|v| v.parse()).collect::<Result<_, _>>()?;
    }
    if let Some(e) = args.get("hidden") {
        config.mlp.hidden = e.split(',').map(|v| v.parse()).collect::<Result<_, _>>()?;
    }
    if get("kind", "discriminative") == "lora" {
        config.kind = probex_zoo::TreeKind::Lora;
        config.name = "MiniLoRA".into();
    }
    if get("arch", "mlp") == "vit" {
        config.architecture = Architecture::Vit;
        config.name = "MiniViT".into();
    }
    let out = work.join(format!("tree-{}", config.name));
    let _ = std::fs::remove_dir_all(&out);
    let last = std::sync::Mutex::new(Instant::now());
    let progress = |p: &Progress<'_>| {
        if let Ok(mut l) = last.lock()
            && (l.elapsed().as_secs_f64() > 10.0 || p.done == p.total)
        {
            *l = Instant::now();
            println!("  {} {:?} {}/{}", p.tree, p.phase, p.done, p.total);
        }
        Ok(())
    };
    let report = build_tree(&config, &emoji_dir, None, &out, &progress)?;
    let tm = &report.timings;
    println!(
        "classes {} (missing {}), base acc {:.3}",
        report.classes.len(),
        report.missing_classes.len(),
        report.bases[0].score
    );
    println!(
        "timings: data {:.1}s, base {:.1}s, models wall {:.1}s ({} models, {} threads, {:.3}s per model single-thread), total {:.1}s",
        tm.data_s,
        tm.base_s[0],
        tm.models_wall_s[0],
        report.models.len(),
        tm.threads,
        tm.per_model_s,
        tm.total_s
    );
    if config.kind == probex_zoo::TreeKind::Lora {
        return lora_probe(&report, &out, &get("layer", "unet.up_blocks.1.proj"));
    }
    let accs: Vec<f64> = report
        .models
        .iter()
        .filter_map(|m| m.metadata.get("eval_accuracy")?.parse().ok())
        .collect();
    println!(
        "fine-tune eval accuracy: mean {:.3}, min {:.3}",
        accs.iter().sum::<f64>() / accs.len().max(1) as f64,
        accs.iter().cloned().fold(f64::INFINITY, f64::min)
    );

    // Ridge probe from one layer to the multi-hot labels.
    let layers: Vec<String> = get(
        "layer",
        if config.architecture == Architecture::Vit {
            "vit.encoder.layer.1.attention.attention.value.weight"
        } else {
            "mlp.encoder.layer.0.dense.weight,mlp.encoder.layer.1.dense.weight"
        },
    )
    .split(',')
    .map(String::from)
    .collect();
    for layer in layers {
        probe(&report, &out, &layer)?;
    }
    Ok(())
}

fn probe(
    report: &probex_zoo::TreeReport,
    out: &std::path::Path,
    layer: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    type Rows = (Vec<Vec<f64>>, Vec<Vec<f64>>);
    let mut rows: BTreeMap<&str, Rows> = BTreeMap::new();
    for m in &report.models {
        let bytes = std::fs::read(out.join(&m.path))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        let x: Vec<f64> = st
            .tensor(layer)?
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect();
        let chosen = &m.metadata["dataset_chosen_targets"];
        let y: Vec<f64> = CIFAR100
            .iter()
            .map(|n| {
                if chosen.contains(&format!("'{n}'")) {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        let e = rows.entry(m.split.as_str()).or_default();
        e.0.push(x);
        e.1.push(y);
    }
    let (xtr, ytr) = rows.remove("train").ok_or("no train split")?;
    let (xva, yva) = rows.remove("val").ok_or("no val split")?;
    let (xte, yte) = rows.remove("test").ok_or("no test split")?;
    let k = report.models[0].metadata["num_classes"].parse::<usize>()?;
    let f = xtr[0].len();
    let mean: Vec<f64> = (0..f)
        .map(|j| xtr.iter().map(|r| r[j]).sum::<f64>() / xtr.len() as f64)
        .collect();
    let center = |x: &Vec<Vec<f64>>| -> Vec<Vec<f64>> {
        x.iter()
            .map(|r| r.iter().zip(&mean).map(|(a, m)| a - m).collect())
            .collect()
    };
    let (xtr, xva, xte) = (center(&xtr), center(&xva), center(&xte));
    let ymean: Vec<f64> = (0..100)
        .map(|j| ytr.iter().map(|r| r[j]).sum::<f64>() / ytr.len() as f64)
        .collect();
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let n = xtr.len();
    let gram: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| dot(&xtr[i], &xtr[j])).collect())
        .collect();
    let scale = (0..n).map(|i| gram[i][i]).sum::<f64>() / n as f64;
    let mut best = (f64::NEG_INFINITY, 0.0, 0.0);
    for lam in [1e-3, 1e-2, 1e-1, 1.0, 10.0] {
        let alpha = ridge_dual(&gram, &ytr, &ymean, lam * scale)?;
        let prec = |x: &Vec<Vec<f64>>, y: &Vec<Vec<f64>>| {
            let mut hits = 0.0;
            for (xi, yi) in x.iter().zip(y) {
                let kx: Vec<f64> = xtr.iter().map(|t| dot(xi, t)).collect();
                let mut pred: Vec<(f64, usize)> = (0..100)
                    .map(|c| {
                        (
                            ymean[c] + (0..n).map(|j| kx[j] * alpha[j][c]).sum::<f64>(),
                            c,
                        )
                    })
                    .collect();
                pred.sort_by(|a, b| b.0.total_cmp(&a.0));
                hits += pred[..k].iter().filter(|(_, c)| yi[*c] == 1.0).count() as f64 / k as f64;
            }
            hits / x.len() as f64
        };
        let (pv, pt) = (prec(&xva, &yva), prec(&xte, &yte));
        println!("  ridge lambda {lam:>6}: val top-{k} precision {pv:.3}, test {pt:.3}");
        let _ = &yte;
        if pv > best.0 {
            best = (pv, pt, lam);
        }
    }
    println!(
        "ridge probe on `{layer}` ({} train / {} val / {} test models): test top-{k} precision {:.3} at lambda {} (chance {:.3})",
        n,
        xva.len(),
        xte.len(),
        best.1,
        best.2,
        k as f64 / report.classes.len() as f64
    );
    Ok(())
}

/// Ridge from one LoRA layer's `B @ A` to the class (seen classes only): top-1 on test.
fn lora_probe(
    report: &probex_zoo::TreeReport,
    out: &std::path::Path,
    layer: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let seen: Vec<&String> = report
        .classes
        .iter()
        .filter(|c| !report.holdout_classes.contains(c))
        .collect();
    let mut sets: BTreeMap<&str, (Vec<Vec<f64>>, Vec<usize>)> = BTreeMap::new();
    for m in &report.models {
        let bytes = std::fs::read(out.join(&m.path))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        let read = |n: &str| -> Result<(Vec<usize>, Vec<f64>), Box<dyn std::error::Error>> {
            let t = st.tensor(n)?;
            Ok((
                t.shape().to_vec(),
                t.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                    .collect(),
            ))
        };
        let (ds, a) = read(&format!("{layer}.lora.down.weight"))?;
        let (us, b) = read(&format!("{layer}.lora.up.weight"))?;
        let (r, i, o) = (ds[0], ds[1], us[0]);
        let mut x = vec![0.0; o * i];
        for p in 0..o {
            for q in 0..r {
                let bv = b[p * r + q];
                for j in 0..i {
                    x[p * i + j] += bv * a[q * i + j];
                }
            }
        }
        let Some(c) = seen.iter().position(|s| **s == m.metadata["class_name"]) else {
            continue;
        };
        let e = sets.entry(m.split.as_str()).or_default();
        e.0.push(x);
        e.1.push(c);
    }
    let (xtr, ytr) = sets.remove("train").ok_or("no train")?;
    let (xte, yte) = sets.remove("test").ok_or("no test")?;
    let nc = seen.len();
    let yoh: Vec<Vec<f64>> = ytr
        .iter()
        .map(|&c| (0..nc).map(|j| if j == c { 1.0 } else { 0.0 }).collect())
        .collect();
    let ymean = vec![0.0; nc];
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let n = xtr.len();
    let gram: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| dot(&xtr[i], &xtr[j])).collect())
        .collect();
    let scale = (0..n).map(|i| gram[i][i]).sum::<f64>() / n as f64;
    for lam in [1e-3, 1e-2, 1e-1, 1.0] {
        let alpha = ridge_dual(&gram, &yoh, &ymean, lam * scale)?;
        let mut right = 0;
        for (x, &y) in xte.iter().zip(&yte) {
            let kx: Vec<f64> = xtr.iter().map(|t| dot(x, t)).collect();
            let best = (0..nc)
                .max_by(|&a, &b| {
                    let sa: f64 = (0..n).map(|j| kx[j] * alpha[j][a]).sum();
                    let sb: f64 = (0..n).map(|j| kx[j] * alpha[j][b]).sum();
                    sa.total_cmp(&sb)
                })
                .unwrap_or(0);
            right += usize::from(best == y);
        }
        println!(
            "LoRA ridge on `{layer}` B@A, lambda {lam}: test top-1 {:.3} over {} seen classes ({} train / {} test LoRAs, chance {:.3})",
            right as f64 / yte.len() as f64,
            nc,
            n,
            yte.len(),
            1.0 / nc as f64
        );
    }
    Ok(())
}

/// Solves (K + lam I) A = Y - mean(Y) by Cholesky.
#[allow(clippy::needless_range_loop)]
fn ridge_dual(
    k: &[Vec<f64>],
    y: &[Vec<f64>],
    ymean: &[f64],
    lam: f64,
) -> Result<Vec<Vec<f64>>, String> {
    let n = k.len();
    let mut l = vec![vec![0.0; n]; n];
    for i in 0..n {
        for j in 0..=i {
            let mut s = k[i][j] + if i == j { lam } else { 0.0 };
            for p in 0..j {
                s -= l[i][p] * l[j][p];
            }
            if i == j {
                if s <= 0.0 {
                    return Err("not positive definite".into());
                }
                l[i][j] = s.sqrt();
            } else {
                l[i][j] = s / l[j][j];
            }
        }
    }
    let cols = ymean.len();
    let mut a = vec![vec![0.0; cols]; n];
    for c in 0..cols {
        let mut z = vec![0.0; n];
        for i in 0..n {
            let mut s = y[i][c] - ymean[c];
            for p in 0..i {
                s -= l[i][p] * z[p];
            }
            z[i] = s / l[i][i];
        }
        for i in (0..n).rev() {
            let mut s = z[i];
            for p in i + 1..n {
                s -= l[p][i] * a[p][c];
            }
            a[i][c] = s / l[i][i];
        }
    }
    Ok(a)
}
