//! Model trees with planted structure, written as real safetensors files, for pipeline tests.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, tensor::TensorView};

/// A tiny deterministic generator (splitmix64), so fixtures need no extra crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_add(0x9E37_79B9_7F4A_7C15))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// CIFAR-100 names used as the planted classes.
pub const CLASSES: [&str; 8] = [
    "apple", "bear", "bee", "bus", "camel", "lion", "rose", "whale",
];

/// Writes `n` models into `dir/{split}/model_idx_XXXX/model.safetensors`-like plain files
/// (`dir/model_XXXX.safetensors`), each fine-tuned "on" a random half of [`CLASSES`]: layer
/// `encoder.dense.weight` [d_h, d_w] carries a planted pattern per class; `encoder.norm.bias`
/// and `head.weight` are noise. Returns the paths and each model's classes.
pub fn planted_tree(
    dir: &Path,
    n: usize,
    d_h: usize,
    d_w: usize,
    seed: u64,
) -> Vec<(PathBuf, Vec<&'static str>)> {
    planted_tree_named(dir, "model", None, 1.0, n, d_h, d_w, seed)
}

/// As [`planted_tree`], with files named `{name}_XXXX.safetensors`, metadata `subset = name`
/// (the tree, as Model-J records it) and, if given, every model in `split`. The base is scaled
/// by `base_scale`: trees with different seeds have different bases, and a large scale puts
/// them far apart, as real bases are compared with their fine-tunes.
#[allow(clippy::too_many_arguments)]
pub fn planted_tree_named(
    dir: &Path,
    name: &str,
    split: Option<&str>,
    base_scale: f32,
    n: usize,
    d_h: usize,
    d_w: usize,
    seed: u64,
) -> Vec<(PathBuf, Vec<&'static str>)> {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = Rng::new(seed);
    let base: Vec<f32> = (0..d_h * d_w).map(|_| base_scale * rng.uniform()).collect();
    let patterns: Vec<Vec<f32>> = CLASSES
        .iter()
        .map(|_| (0..d_h * d_w).map(|_| rng.uniform()).collect())
        .collect();
    let mut out = Vec::new();
    for i in 0..n {
        let mut chosen: Vec<&'static str> = Vec::new();
        let mut w = base.clone();
        for (c, name) in CLASSES.iter().enumerate() {
            if rng.next_u64().is_multiple_of(2) {
                chosen.push(name);
                for (x, p) in w.iter_mut().zip(&patterns[c]) {
                    *x += 0.5 * p;
                }
            }
        }
        for x in &mut w {
            *x += 0.2 * rng.uniform();
        }
        let bias: Vec<f32> = (0..d_h).map(|_| rng.uniform()).collect();
        let head: Vec<f32> = (0..3 * d_h).map(|_| rng.uniform()).collect();
        let split = split.unwrap_or(match i % 10 {
            0 | 1 => "val",
            2 | 3 => "test",
            _ => "train",
        });
        let targets = format!(
            "[{}]",
            chosen
                .iter()
                .map(|c| format!("'{c}'"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let meta = HashMap::from([
            ("dataset_chosen_targets".to_string(), targets),
            ("split".to_string(), split.to_string()),
            ("subset".to_string(), name.to_string()),
            (
                "learning_rate".to_string(),
                format!("{}", 1e-3 * (1 + i % 3) as f64),
            ),
        ]);
        let path = dir.join(format!("{name}_{i:04}.safetensors"));
        write(
            &path,
            &[
                ("encoder.dense.weight", vec![d_h, d_w], &w),
                ("encoder.norm.bias", vec![d_h], &bias),
                ("head.weight", vec![3, d_h], &head),
            ],
            meta,
        );
        out.push((path, chosen));
    }
    out
}

/// Writes an F32 safetensors file.
pub fn write(
    path: &Path,
    tensors: &[(&str, Vec<usize>, &Vec<f32>)],
    meta: HashMap<String, String>,
) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            (
                *name,
                TensorView::new(Dtype::F32, shape.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, Some(meta), path).unwrap();
}
