//! Generated layer datasets with planted class-dependent structure, for learning tests.

#![allow(dead_code, clippy::needless_range_loop, clippy::too_many_arguments)]

use probex_probes::models::checkpoint::Checkpoint;
use probex_probes::training::DeviceSpec;
use probex_weights::dataset::{
    Class, Labels, LayerDataset, LayerInfo, Matrices, ModelRecord, Split,
};
use probex_weights::embeddings::TextTable;
use probex_weights::rng::Rng;

/// The device tests run on: `$PROBEX_TEST_DEVICE` (`cpu`, `cuda`, `cuda:N`), default the CPU.
pub fn device() -> DeviceSpec {
    match std::env::var("PROBEX_TEST_DEVICE") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|e| panic!("PROBEX_TEST_DEVICE: {e}")),
        Err(_) => DeviceSpec::Cpu,
    }
}

/// Split counts, in `Split::ALL` order.
pub type Counts = [usize; 5];

fn records(counts: Counts) -> Vec<ModelRecord> {
    let mut out = Vec::new();
    for (s, &k) in Split::ALL.iter().zip(&counts) {
        for i in 0..k {
            out.push(ModelRecord {
                id: format!("{s}_{i:04}"),
                split: *s,
                source_digest: format!("{s}{i}"),
            });
        }
    }
    out
}

fn layer(d_h: usize, d_w: usize) -> LayerInfo {
    LayerInfo {
        index: 0,
        name: "generated.weight".into(),
        source_shape: vec![d_h, d_w],
        transform: "squeeze".into(),
        list: None,
    }
}

fn rank_one(rng: &mut Rng, d_h: usize, d_w: usize) -> Vec<f32> {
    let a: Vec<f32> = (0..d_h).map(|_| rng.normal()).collect();
    let b: Vec<f32> = (0..d_w).map(|_| rng.normal()).collect();
    let s = 1.0 / ((d_h * d_w) as f32).sqrt();
    (0..d_h * d_w)
        .map(|i| a[i / d_w] * b[i % d_w] * s * 4.0)
        .collect()
}

/// Multi-label: each model has each class with probability 1/2, and its matrix is
/// `noise * N + sum over its classes of a rank-one pattern of that class`.
pub fn multilabel(
    counts: Counts,
    d_h: usize,
    d_w: usize,
    classes: usize,
    noise: f32,
    seed: u64,
) -> LayerDataset {
    let mut rng = Rng::new(seed, 100);
    let patterns: Vec<Vec<f32>> = (0..classes).map(|_| rank_one(&mut rng, d_h, d_w)).collect();
    let models = records(counts);
    let n = models.len();
    let mut weights = Vec::with_capacity(n * d_h * d_w);
    let mut targets = Vec::with_capacity(n * classes);
    for _ in 0..n {
        let y: Vec<f32> = (0..classes)
            .map(|_| (rng.unit_f32() < 0.5) as u8 as f32)
            .collect();
        for i in 0..d_h * d_w {
            let mut v = noise * rng.normal();
            for c in 0..classes {
                v += y[c] * patterns[c][i];
            }
            weights.push(v);
        }
        targets.extend(y);
    }
    LayerDataset {
        layer: layer(d_h, d_w),
        n,
        d_h,
        d_w,
        weights: Matrices::Stacked(weights),
        models,
        label_key: "dataset_chosen_targets".into(),
        labels: Labels::MultiLabel {
            classes: (0..classes).map(|c| format!("class_{c}")).collect(),
            targets,
        },
        skipped: vec![],
    }
}

/// Multi-label where the statistics carry no information at all: every model has exactly half
/// of the classes; class `c` owns a block of rows, filled with `+B` when present and `-B` when
/// absent (the same block `B` for every class), plus noise. Every model's weights are then the
/// same multiset of values up to noise, while the classes are linear in the weights.
pub fn sign_blocks(
    counts: Counts,
    rows_per_class: usize,
    d_w: usize,
    classes: usize,
    noise: f32,
    seed: u64,
) -> LayerDataset {
    let mut rng = Rng::new(seed, 400);
    let d_h = rows_per_class * classes;
    let block: Vec<f32> = (0..rows_per_class * d_w).map(|_| rng.normal()).collect();
    let models = records(counts);
    let n = models.len();
    let mut weights = Vec::with_capacity(n * d_h * d_w);
    let mut targets = Vec::with_capacity(n * classes);
    for _ in 0..n {
        let mut order: Vec<usize> = (0..classes).collect();
        rng.shuffle(&mut order);
        let mut y = vec![0.0f32; classes];
        for &c in &order[..classes / 2] {
            y[c] = 1.0;
        }
        for c in 0..classes {
            let sign = if y[c] > 0.5 { 1.0 } else { -1.0 };
            weights.extend(block.iter().map(|&b| sign * b + noise * rng.normal()));
        }
        targets.extend(y);
    }
    LayerDataset {
        layer: layer(d_h, d_w),
        n,
        d_h,
        d_w,
        weights: Matrices::Stacked(weights),
        models,
        label_key: "dataset_chosen_targets".into(),
        labels: Labels::MultiLabel {
            classes: (0..classes).map(|c| format!("class_{c}")).collect(),
            targets,
        },
        skipped: vec![],
    }
}

/// Single-label where the class only sets the scale of i.i.d. Gaussian weights: no direction
/// carries information, the statistics do.
pub fn scale_classes(
    counts: Counts,
    d_h: usize,
    d_w: usize,
    scales: &[f32],
    seed: u64,
) -> LayerDataset {
    let mut rng = Rng::new(seed, 200);
    let models = records(counts);
    let n = models.len();
    let mut weights = Vec::with_capacity(n * d_h * d_w);
    let mut targets = Vec::with_capacity(n);
    for i in 0..n {
        let c = i % scales.len();
        targets.push(c as u32);
        weights.extend((0..d_h * d_w).map(|_| scales[c] * rng.normal()));
    }
    LayerDataset {
        layer: layer(d_h, d_w),
        n,
        d_h,
        d_w,
        weights: Matrices::Stacked(weights),
        models,
        label_key: "scale".into(),
        labels: Labels::Class {
            classes: (0..scales.len())
                .map(|c| Class {
                    id: format!("s{c}"),
                    name: format!("scale {c}"),
                })
                .collect(),
            targets,
        },
        skipped: vec![],
    }
}

/// Zero-shot data: class `c` has a random text vector `t_c`, and a model of class `c` has
/// weights `sum_k t_c[k] P_k + noise * N` for fixed random matrices `P_k` (the planted map).
/// Classes `0..train_classes` appear in train/val/test, the others only in the holdout
/// splits (`per_class` models per class and split, holdout splits get `per_class` each too).
pub fn zero_shot(
    train_classes: usize,
    holdout_classes: usize,
    per_class: [usize; 5],
    d_h: usize,
    d_w: usize,
    d_text: usize,
    noise: f32,
    seed: u64,
) -> (LayerDataset, TextTable) {
    let mut rng = Rng::new(seed, 300);
    let total = train_classes + holdout_classes;
    let text: Vec<f32> = (0..total * d_text).map(|_| rng.normal()).collect();
    let maps: Vec<Vec<f32>> = (0..d_text).map(|_| rank_one(&mut rng, d_h, d_w)).collect();
    let mut models = Vec::new();
    let mut targets = Vec::new();
    let mut weights = Vec::new();
    for (si, split) in Split::ALL.iter().enumerate() {
        let holdout = matches!(split, Split::ValHoldout | Split::TestHoldout);
        let classes: Vec<usize> = if holdout {
            (train_classes..total).collect()
        } else {
            (0..train_classes).collect()
        };
        for &c in &classes {
            for i in 0..per_class[si] {
                models.push(ModelRecord {
                    id: format!("{split}_{c}_{i}"),
                    split: *split,
                    source_digest: format!("{split}{c}{i}"),
                });
                targets.push(c as u32);
                for j in 0..d_h * d_w {
                    let mut v = noise * rng.normal();
                    for k in 0..d_text {
                        v += text[c * d_text + k] * maps[k][j] / (d_text as f32).sqrt();
                    }
                    weights.push(v);
                }
            }
        }
    }
    let names: Vec<String> = (0..total).map(|c| format!("thing {c}")).collect();
    let ds = LayerDataset {
        layer: layer(d_h, d_w),
        n: models.len(),
        d_h,
        d_w,
        weights: Matrices::Stacked(weights),
        models,
        label_key: "imagenet_class_id".into(),
        labels: Labels::Class {
            classes: names
                .iter()
                .enumerate()
                .map(|(c, name)| Class {
                    id: format!("n{c:08}"),
                    name: name.clone(),
                })
                .collect(),
            targets,
        },
        skipped: vec![],
    };
    (
        ds,
        TextTable {
            names,
            dim: d_text,
            vectors: text,
        },
    )
}

/// A multi-label LoRA-like layer, twice: stored as factors, and as the products of the same
/// factors. Model `i`'s matrix is `sum_c y_ic p_c q_c^T + noise * n_i m_i^T`, i.e. `up_i` has
/// the columns `y_ic p_c` and `noise n_i`, `down_i` the rows `q_c^T` and `m_i^T` (rank
/// `classes + 1`), so the labels are in the weights and the probes learn them confidently.
pub fn factored_multilabel(
    counts: Counts,
    d_h: usize,
    d_w: usize,
    classes: usize,
    noise: f32,
    seed: u64,
) -> (LayerDataset, LayerDataset) {
    let mut rng = Rng::new(seed, 400);
    let rank = classes + 1;
    let p: Vec<Vec<f32>> = (0..classes)
        .map(|_| (0..d_h).map(|_| rng.normal()).collect())
        .collect();
    let q: Vec<Vec<f32>> = (0..classes)
        .map(|_| (0..d_w).map(|_| rng.normal()).collect())
        .collect();
    let models = records(counts);
    let n = models.len();
    let (mut up, mut down, mut targets) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let y: Vec<f32> = (0..classes)
            .map(|_| (rng.unit_f32() < 0.5) as u8 as f32)
            .collect();
        let own: Vec<f32> = (0..d_h).map(|_| noise * rng.normal()).collect();
        for i in 0..d_h {
            up.extend((0..classes).map(|c| y[c] * p[c][i]));
            up.push(own[i]);
        }
        for qc in &q {
            down.extend_from_slice(qc);
        }
        down.extend((0..d_w).map(|_| rng.normal()));
        targets.extend(y);
    }
    let factored = LayerDataset {
        layer: LayerInfo {
            transform: "lora_product".into(),
            ..layer(d_h, d_w)
        },
        n,
        d_h,
        d_w,
        weights: Matrices::Factored { rank, up, down },
        models,
        label_key: "dataset_chosen_targets".into(),
        labels: Labels::MultiLabel {
            classes: (0..classes).map(|c| format!("class_{c}")).collect(),
            targets,
        },
        skipped: vec![],
    };
    let stacked = LayerDataset {
        weights: Matrices::Stacked(
            (0..n)
                .flat_map(|i| factored.matrix(i).unwrap().into_owned())
                .collect(),
        ),
        ..factored.clone()
    };
    (factored, stacked)
}

/// Asserts that checkpoint `got` holds what `want` holds (metadata, tensor names and shapes)
/// with every value within `tol`; returns the largest difference, for the test to report.
pub fn assert_checkpoints_close(got: &[u8], want: &[u8], tol: f32, what: &str) -> f32 {
    let (a, b) = (
        Checkpoint::from_bytes(got, "got").unwrap(),
        Checkpoint::from_bytes(want, "want").unwrap(),
    );
    assert_eq!(a.meta, b.meta, "{what}");
    assert_eq!(a.tensors.len(), b.tensors.len(), "{what}");
    let mut largest = 0.0f32;
    for (x, y) in a.tensors.iter().zip(&b.tensors) {
        assert_eq!((&x.name, &x.shape), (&y.name, &y.shape), "{what}");
        let err = x
            .values
            .iter()
            .zip(&y.values)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        assert!(err <= tol, "{what}: {} differs by {err}", x.name);
        largest = largest.max(err);
    }
    largest
}
