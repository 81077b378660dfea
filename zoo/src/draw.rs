//! The tree's random draws that are not training: which stream serves which purpose, how models
//! are assigned to splits, how a hyperparameter is picked.
//!
//! Every purpose has its own tag, and every stream is derived from `(seed, [tag, ...indices])`,
//! so that a model's draws do not depend on how many draws other models or purposes made.

use probex_weights::dataset::Split;

use crate::SplitFractions;
use crate::ZooError;
use probex_weights::rng::StreamRng;

/// Stream of a base's pretraining (`[TAG_BASE, base]`).
pub(crate) const TAG_BASE: u64 = 1;
/// Stream of the split assignment (`[TAG_SPLIT, base]`).
pub(crate) const TAG_SPLIT: u64 = 2;
/// Stream of one model's fine-tune or LoRA (`[TAG_MODEL, ...]`).
pub(crate) const TAG_MODEL: u64 = 3;
/// Stream that picks a LoRA tree's held-out classes.
pub(crate) const TAG_HOLDOUT: u64 = 4;
/// Stream of the fresh examples an accuracy is measured on.
pub(crate) const TAG_EVAL: u64 = 5;
/// Stream that picks a LoRA tree's classes when `max_classes` cuts them.
pub(crate) const TAG_CLASSES: u64 = 6;

/// Assigns `n` models to train/val/test: a seeded permutation cut by the fractions (every
/// split with a positive fraction gets at least one model when `n` allows).
pub(crate) fn assign_splits(n: usize, f: &SplitFractions, rng: &mut StreamRng) -> Vec<Split> {
    let total = f.train + f.val + f.test;
    let mut counts = [
        (n as f64 * f.train / total).round() as usize,
        (n as f64 * f.val / total).round() as usize,
        0,
    ];
    for (i, frac) in [f.train, f.val].into_iter().enumerate() {
        if frac > 0.0 && counts[i] == 0 && n >= 3 {
            counts[i] = 1;
        }
    }
    counts[0] = counts[0].min(n);
    counts[1] = counts[1].min(n - counts[0]);
    counts[2] = n - counts[0] - counts[1];
    if f.test > 0.0 && counts[2] == 0 && n >= 3 {
        let donor = if counts[0] > counts[1] { 0 } else { 1 };
        counts[donor] -= 1;
        counts[2] = 1;
    }
    let mut order: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut order);
    let mut out = vec![Split::Train; n];
    for (k, &i) in order.iter().enumerate() {
        out[i] = if k < counts[0] {
            Split::Train
        } else if k < counts[0] + counts[1] {
            Split::Val
        } else {
            Split::Test
        };
    }
    out
}

/// One of `v`, uniformly; an internal error for an empty list (validation rejects those).
pub(crate) fn pick<T: Copy>(rng: &mut StreamRng, v: &[T]) -> Result<T, ZooError> {
    rng.pick(v)
        .copied()
        .ok_or_else(|| ZooError::Internal("empty choice list".into()))
}
