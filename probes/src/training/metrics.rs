//! Metrics per split, computed on the host from a probe's scores.

use std::collections::BTreeMap;

use crate::models::checkpoint::TaskKind;

/// Metric name -> value for one split.
pub type Metrics = BTreeMap<String, f64>;

/// The metrics a probe of `task` reports for each split (what `select`'s `by` and expectations
/// may name): [`multi_label`]'s, [`classes`]' (with [`majority`] for class labels) or
/// [`regression`]'s.
pub fn names(task: TaskKind) -> &'static [&'static str] {
    match task {
        TaskKind::MultiLabel => &["accuracy", "f1_macro", "f1_micro", "loss", "map"],
        TaskKind::Class => &["loss", "majority", "top1", "top5"],
        TaskKind::ZeroShot => &["loss", "top1", "top5"],
        TaskKind::Regression => &["loss", "mae", "mse", "r2"],
    }
}

/// The trivial baseline of a class probe: the share of `split` (class ids) in the most common
/// class of `train` (ties: the lowest id), i.e. the top-1 of always answering that class.
pub fn majority(train: &[u32], split: &[u32]) -> f64 {
    let mut counts = BTreeMap::<u32, usize>::new();
    for &c in train {
        *counts.entry(c).or_default() += 1;
    }
    // max_by_key keeps the last maximum; reversed, the lowest id among the ties.
    let Some((&top, _)) = counts.iter().rev().max_by_key(|(_, n)| **n) else {
        return 0.0;
    };
    if split.is_empty() {
        return 0.0;
    }
    split.iter().filter(|&&c| c == top).count() as f64 / split.len() as f64
}

fn log1p_exp(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// Multi-label metrics of logits `[n, w]` against 0/1 `targets` `[n, w]`:
/// `loss` (mean BCE-with-logits), `accuracy` (the paper's element-wise binary accuracy,
/// sigmoid > 0.5), `map` (mean over classes with a positive of average precision), `f1_micro`,
/// `f1_macro` (over classes with a positive or a prediction).
pub fn multi_label(logits: &[f32], targets: &[f32], w: usize) -> Metrics {
    let n = logits.len().checked_div(w).unwrap_or(0);
    let mut m = Metrics::new();
    if n == 0 {
        return m;
    }
    let mut loss = 0.0;
    let mut correct = 0usize;
    let (mut tp, mut fp, mut fnn) = (vec![0usize; w], vec![0usize; w], vec![0usize; w]);
    for (i, (&s, &t)) in logits.iter().zip(targets).enumerate() {
        let (x, y) = (s as f64, t as f64);
        loss += log1p_exp(x) - x * y;
        let pred = s > 0.0;
        let pos = t > 0.5;
        correct += (pred == pos) as usize;
        let c = i % w;
        match (pred, pos) {
            (true, true) => tp[c] += 1,
            (true, false) => fp[c] += 1,
            (false, true) => fnn[c] += 1,
            _ => {}
        }
    }
    m.insert("loss".into(), loss / (n * w) as f64);
    m.insert("accuracy".into(), correct as f64 / (n * w) as f64);
    let (stp, sfp, sfn) = (
        tp.iter().sum::<usize>() as f64,
        fp.iter().sum::<usize>() as f64,
        fnn.iter().sum::<usize>() as f64,
    );
    m.insert(
        "f1_micro".into(),
        if stp + sfp + sfn > 0.0 {
            2.0 * stp / (2.0 * stp + sfp + sfn)
        } else {
            0.0
        },
    );
    let f1s: Vec<f64> = (0..w)
        .filter(|&c| tp[c] + fp[c] + fnn[c] > 0)
        .map(|c| 2.0 * tp[c] as f64 / (2 * tp[c] + fp[c] + fnn[c]) as f64)
        .collect();
    m.insert("f1_macro".into(), mean(&f1s));
    let aps: Vec<f64> = (0..w)
        .filter_map(|c| {
            let mut col: Vec<(f32, bool)> = (0..n)
                .map(|r| (logits[r * w + c], targets[r * w + c] > 0.5))
                .collect();
            average_precision(&mut col)
        })
        .collect();
    m.insert("map".into(), mean(&aps));
    m
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Average precision of scores against binary labels (sklearn's definition: mean of the
/// precision at each positive, ties broken by the stable order); `None` without positives.
fn average_precision(col: &mut [(f32, bool)]) -> Option<f64> {
    let positives = col.iter().filter(|c| c.1).count();
    if positives == 0 {
        return None;
    }
    col.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut hits, mut sum) = (0usize, 0.0);
    for (rank, &(_, pos)) in col.iter().enumerate() {
        if pos {
            hits += 1;
            sum += hits as f64 / (rank + 1) as f64;
        }
    }
    Some(sum / positives as f64)
}

/// Single-label metrics of scores `[n, w]` against class indices: `loss` (mean cross-entropy
/// of the softmax of the scores), `top1`, `top5` (top-min(5, w)).
pub fn classes(scores: &[f32], targets: &[u32], w: usize) -> Metrics {
    let n = targets.len();
    let mut m = Metrics::new();
    if n == 0 || w == 0 {
        return m;
    }
    let (mut loss, mut top1, mut top5) = (0.0, 0usize, 0usize);
    for (r, &t) in targets.iter().enumerate() {
        let row = &scores[r * w..(r + 1) * w];
        let t = t as usize;
        let max = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        let lse = max
            + row
                .iter()
                .map(|&s| (s as f64 - max).exp())
                .sum::<f64>()
                .ln();
        loss += lse - row[t] as f64;
        // Rank of the target: classes scoring strictly higher, plus equal ones before it.
        let above = row
            .iter()
            .enumerate()
            .filter(|&(c, &s)| s > row[t] || (s == row[t] && c < t))
            .count();
        top1 += (above == 0) as usize;
        top5 += (above < 5) as usize;
    }
    m.insert("loss".into(), loss / n as f64);
    m.insert("top1".into(), top1 as f64 / n as f64);
    m.insert("top5".into(), top5 as f64 / n as f64);
    m
}

/// Regression metrics of predictions against targets (both on the original scale): `mse`,
/// `mae`, `r2` (1 - SS_res / SS_tot within the split; 1 for a perfect fit of a constant
/// target, else 0 when the target is constant), and `loss`, the MSE on the standardised
/// scale the model was trained on.
pub fn regression(pred: &[f32], targets: &[f32], target_std: f32) -> Metrics {
    let n = targets.len();
    let mut m = Metrics::new();
    if n == 0 {
        return m;
    }
    let mean_t = targets.iter().map(|&t| t as f64).sum::<f64>() / n as f64;
    let (mut se, mut ae, mut tot) = (0.0, 0.0, 0.0);
    for (&p, &t) in pred.iter().zip(targets) {
        let d = p as f64 - t as f64;
        se += d * d;
        ae += d.abs();
        tot += (t as f64 - mean_t).powi(2);
    }
    let r2 = if tot > 0.0 {
        1.0 - se / tot
    } else if se == 0.0 {
        1.0
    } else {
        0.0
    };
    let s = (target_std as f64).max(f64::MIN_POSITIVE);
    m.insert("loss".into(), se / n as f64 / (s * s));
    m.insert("mse".into(), se / n as f64);
    m.insert("mae".into(), ae / n as f64);
    m.insert("r2".into(), r2);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_accuracy_is_element_wise_at_zero_logit() {
        // 2 models x 3 classes; predictions: [+,-,+], [-,-,+]; targets [1,0,0], [0,1,1].
        let m = multi_label(
            &[2.0, -1.0, 0.5, -3.0, -0.1, 4.0],
            &[1.0, 0.0, 0.0, 0.0, 1.0, 1.0],
            3,
        );
        assert!((m["accuracy"] - 4.0 / 6.0).abs() < 1e-12);
        // tp: c0 1, c2 1; fp: c2 1; fn: c1 1 -> micro F1 = 4 / (4 + 1 + 1).
        assert!((m["f1_micro"] - 4.0 / 6.0).abs() < 1e-12);
        // AP: c0 1, c1 (scores -1 neg, -0.1 pos) 1, c2 (4 pos, 0.5 neg) 1.
        assert!((m["map"] - 1.0).abs() < 1e-12);
        let bce0 = (1.0f64 + (-2.0f64).exp()).ln();
        assert!(m["loss"] > bce0 / 6.0);
    }

    #[test]
    fn average_precision_of_a_ranking() {
        // Ranked: pos, neg, pos -> (1/1 + 2/3) / 2.
        let mut c = vec![(0.9, true), (0.5, false), (0.1, true)];
        assert!((average_precision(&mut c).unwrap() - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        assert_eq!(average_precision(&mut [(0.1, false)]), None);
    }

    #[test]
    fn top_k_and_cross_entropy() {
        let scores = [
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, /* row 2 */ 5.0, 4.0, 3.0, 2.0, 1.0, 0.0,
        ];
        let m = classes(&scores, &[5, 5], 6);
        assert_eq!(m["top1"], 0.5);
        assert_eq!(m["top5"], 0.5);
        let m = classes(&[0.0, 0.0], &[1], 2);
        assert!((m["loss"] - 2f64.ln()).abs() < 1e-12);
        // A tie ranks the earlier class first.
        assert_eq!(m["top1"], 0.0);
    }

    /// `names` lists exactly what each metric function reports, so plan-time checks of
    /// metric paths accept every real name and nothing else.
    #[test]
    fn names_are_the_reported_metrics() {
        let keys = |m: Metrics| m.into_keys().collect::<Vec<_>>();
        assert_eq!(
            keys(multi_label(&[1.0, -1.0], &[1.0, 0.0], 2)),
            names(TaskKind::MultiLabel)
        );
        assert_eq!(
            keys(classes(&[1.0, 0.0], &[0], 2)),
            names(TaskKind::ZeroShot)
        );
        let mut class = keys(classes(&[1.0, 0.0], &[0], 2));
        class.push("majority".into());
        class.sort();
        assert_eq!(class, names(TaskKind::Class));
        assert_eq!(
            keys(regression(&[1.0], &[1.0], 1.0)),
            names(TaskKind::Regression)
        );
    }

    #[test]
    fn majority_is_the_most_common_training_class() {
        // Train: class 2 three times, 0 and 1 once: always answering 2 gets 2 of 4 right.
        assert_eq!(majority(&[2, 0, 2, 1, 2], &[2, 1, 2, 0]), 0.5);
        // A tie (0 and 1 twice each) goes to the lower id.
        assert_eq!(majority(&[1, 0, 1, 0], &[0, 0, 1]), 2.0 / 3.0);
        assert_eq!(majority(&[], &[0]), 0.0);
        assert_eq!(majority(&[0], &[]), 0.0);
    }

    #[test]
    fn regression_metrics() {
        let m = regression(&[1.0, 2.0, 3.0], &[1.0, 2.0, 5.0], 2.0);
        assert!((m["mse"] - 4.0 / 3.0).abs() < 1e-12);
        assert!((m["mae"] - 2.0 / 3.0).abs() < 1e-12);
        // SS_tot around mean 8/3: (25 + 4 + 49) / 9 = 78/9.
        assert!((m["r2"] - (1.0 - 4.0 / (78.0 / 9.0))).abs() < 1e-9);
        assert!((m["loss"] - 1.0 / 3.0).abs() < 1e-12);
    }
}
