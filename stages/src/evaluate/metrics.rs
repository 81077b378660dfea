//! Scalar metrics: ROC-AUC, the Ledoit-Wolf covariance estimate and its Mahalanobis distance,
//! and the accuracies the paper reports (element-wise multi-label accuracy, top-1, zero-shot top-1
//! by cosine). Each mirrors a scikit-learn / PyTorch definition named in its docs, so numbers are
//! comparable with the official Python code.

use std::cmp::Ordering;

use super::EvalError;
use super::linalg::{matmul, pinvh, spd_inverse};

/// Area under the ROC curve of `scores` for the binary truth `positives` (higher score = more
/// likely positive), equal to `sklearn.metrics.roc_auc_score(positives, scores)`.
///
/// Computed as the Mann-Whitney statistic with average ranks for tied scores, which is exactly
/// the trapezoidal area scikit-learn integrates (a tie between a positive and a negative counts
/// one half). Infinite scores are ordered like any other; NaN is an error, as is a truth vector
/// with only one class (the curve is undefined: [`EvalError::Undefined`]).
pub fn roc_auc(scores: &[f64], positives: &[bool]) -> Result<f64, EvalError> {
    if scores.len() != positives.len() {
        return Err(EvalError::Shape {
            what: "roc_auc: number of truth values (one per score)".into(),
            expected: scores.len(),
            got: positives.len(),
        });
    }
    if scores.iter().any(|s| s.is_nan()) {
        return Err(EvalError::NaN("roc_auc scores".into()));
    }
    let n_pos = positives.iter().filter(|&&p| p).count();
    let n_neg = positives.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return Err(EvalError::Undefined(format!(
            "ROC-AUC needs both classes; got {n_pos} positive and {n_neg} negative samples"
        )));
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // No NaN is left, so partial_cmp always answers; -0.0 and 0.0 compare equal and tie.
    order.sort_by(|&a, &b| scores[a].partial_cmp(&scores[b]).unwrap_or(Ordering::Equal));
    let mut rank_sum_pos = 0.0;
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            end += 1;
        }
        // Ranks are 1-based: the group covers ranks start+1 ..= end.
        let avg_rank = (start + 1 + end) as f64 / 2.0;
        let pos_in_group = order[start..end].iter().filter(|&&i| positives[i]).count();
        rank_sum_pos += avg_rank * pos_in_group as f64;
        start = end;
    }
    let u = rank_sum_pos - (n_pos as f64) * (n_pos as f64 + 1.0) / 2.0;
    Ok(u / (n_pos as f64 * n_neg as f64))
}

/// A Gaussian fitted with Ledoit-Wolf shrinkage: what `sklearn.covariance.LedoitWolf()` (with
/// `assume_centered=False`) holds after `fit`.
#[derive(Clone, Debug, PartialEq)]
pub struct LedoitWolf {
    /// Number of features.
    pub d: usize,
    /// Mean of the samples (`location_`).
    pub location: Vec<f64>,
    /// Shrunk covariance, row-major `d x d` (`covariance_`).
    pub covariance: Vec<f64>,
    /// Shrinkage coefficient in `[0, 1]` (`shrinkage_`).
    pub shrinkage: f64,
    /// Pseudo-inverse of `covariance` as `scipy.linalg.pinvh` computes it (`get_precision()`).
    pub precision: Vec<f64>,
}

/// Fits [`LedoitWolf`] to `n` samples of `d` features (row-major `x`, `n * d` values).
///
/// Follows `sklearn.covariance.ledoit_wolf_shrinkage` term by term: with centred samples `x_k`,
/// empirical covariance `S = X'X / n` and `mu = tr(S) / d`,
/// `beta = (mean_k |x_k|^4 - |S|_F^2) / (d n)`, `delta = (|S|_F^2 - d mu^2) / d`,
/// `shrinkage = min(beta, delta) / delta` (0 when that minimum is 0), and the estimate is
/// `(1 - shrinkage) S + shrinkage mu I`. One feature gives shrinkage 0, as in scikit-learn.
pub fn ledoit_wolf(x: &[f64], n: usize, d: usize) -> Result<LedoitWolf, EvalError> {
    if d == 0 {
        return Err(EvalError::Param(
            "Ledoit-Wolf needs at least one feature".into(),
        ));
    }
    if n == 0 {
        return Err(EvalError::Undefined(
            "Ledoit-Wolf needs at least one sample; the class has none".into(),
        ));
    }
    if x.len() != n * d {
        return Err(EvalError::Shape {
            what: format!("Ledoit-Wolf samples: number of values (n={n} rows x d={d})"),
            expected: n * d,
            got: x.len(),
        });
    }
    if x.iter().any(|v| v.is_nan()) {
        return Err(EvalError::NaN("Ledoit-Wolf samples".into()));
    }
    let nf = n as f64;
    let df = d as f64;
    let mut location = vec![0.0; d];
    for row in x.chunks_exact(d) {
        for (m, &v) in location.iter_mut().zip(row) {
            *m += v;
        }
    }
    for m in &mut location {
        *m /= nf;
    }
    let centred: Vec<f64> = x
        .chunks_exact(d)
        .flat_map(|row| row.iter().zip(&location).map(|(v, m)| v - m))
        .collect();
    // Empirical covariance S = X'X / n (the biased estimate scikit-learn uses).
    let mut emp = matmul(&centred, true, &centred, false, d, n, d);
    for v in &mut emp {
        *v /= nf;
    }
    let trace: f64 = (0..d).map(|i| emp[i * d + i]).sum();
    let mu = trace / df;
    let shrinkage = if d == 1 {
        0.0
    } else {
        // sum(X2' X2) = sum_k |x_k|^4;  sum((X'X)^2) / n^2 = |S|_F^2.
        let beta_: f64 = centred
            .chunks_exact(d)
            .map(|row| {
                let sq: f64 = row.iter().map(|v| v * v).sum();
                sq * sq
            })
            .sum();
        let delta_: f64 = emp.iter().map(|v| v * v).sum();
        let beta = 1.0 / (df * nf) * (beta_ / nf - delta_);
        let delta = (delta_ - 2.0 * mu * trace + df * mu * mu) / df;
        let beta = beta.min(delta);
        if beta == 0.0 { 0.0 } else { beta / delta }
    };
    let mut covariance: Vec<f64> = emp.iter().map(|v| (1.0 - shrinkage) * v).collect();
    for i in 0..d {
        covariance[i * d + i] += shrinkage * mu;
    }
    // The eigenvalues of the estimate lie in [shrinkage * mu, tr(S)] = [shrinkage * tr(S) / d,
    // tr(S)], so once shrinkage > d^2 * eps (with a factor 2 against rounding) none falls under
    // pinvh's cut-off (d * eps * max): the pseudo-inverse is the inverse, and an explicit inverse
    // is several times cheaper than an eigendecomposition.
    let well_conditioned = mu > 0.0 && shrinkage > 2.0 * df * df * f64::EPSILON;
    let direct = if !well_conditioned {
        None
    } else if n < d {
        woodbury_inverse(&centred, n, d, shrinkage * mu, (1.0 - shrinkage) / nf)
    } else {
        spd_inverse(&covariance, d)
    };
    let precision = match direct {
        Some(p) => p,
        None => pinvh(&covariance, d)?,
    };
    Ok(LedoitWolf {
        d,
        location,
        covariance,
        shrinkage,
        precision,
    })
}

/// `(a I + b U'U)^-1` for `U` (`n x d`, row-major) with `n < d`, by the Woodbury identity:
/// `(1/a) (I - U' ((a/b) I + U U')^-1 U)`. Only an `n x n` system is inverted, which is what
/// makes one-class Ledoit-Wolf cheap when a class has fewer models than encoding dimensions.
/// `None` when the small system is not positive definite (the caller falls back to `pinvh`).
fn woodbury_inverse(u: &[f64], n: usize, d: usize, a: f64, b: f64) -> Option<Vec<f64>> {
    let mut p = vec![0.0; d * d];
    if b > 0.0 {
        let mut m = matmul(u, false, u, true, n, d, n);
        for i in 0..n {
            m[i * n + i] += a / b;
        }
        let m_inv = spd_inverse(&m, n)?;
        let t = matmul(&m_inv, false, u, false, n, n, d);
        p = matmul(u, true, &t, false, d, n, d);
        for v in &mut p {
            *v = -*v;
        }
    }
    for i in 0..d {
        p[i * d + i] += 1.0;
    }
    for v in &mut p {
        *v /= a;
    }
    Some(p)
}

impl LedoitWolf {
    /// Squared Mahalanobis distances of the rows of `x` (`m x d`, whole rows: callers check),
    /// as one matrix product `Z P` and a row-wise dot with `Z = x - location`.
    pub(crate) fn mahalanobis_f64(&self, x: &[f64]) -> Vec<f64> {
        let d = self.d;
        let m = x.len() / d;
        let mut z = x.to_vec();
        for row in z.chunks_exact_mut(d) {
            for (v, mu) in row.iter_mut().zip(&self.location) {
                *v -= mu;
            }
        }
        let w = matmul(&z, false, &self.precision, false, m, d, d);
        z.chunks_exact(d)
            .zip(w.chunks_exact(d))
            .map(|(zi, wi)| {
                let q: f64 = zi.iter().zip(wi).map(|(a, b)| a * b).sum();
                if q < 0.0 { 0.0 } else { q }
            })
            .collect()
    }

    /// Squared Mahalanobis distance of one sample to the fitted Gaussian,
    /// `(x - location)' precision (x - location)`, as `LedoitWolf.mahalanobis` returns it (the
    /// squares, not the distances). Clamped at 0 against rounding; NaN if `x` has the wrong
    /// length or holds NaN.
    pub fn mahalanobis(&self, x: &[f32]) -> f64 {
        let d = self.d;
        if x.len() != d {
            return f64::NAN;
        }
        let diff: Vec<f64> = x
            .iter()
            .zip(&self.location)
            .map(|(&v, m)| v as f64 - m)
            .collect();
        let mut q = 0.0;
        for i in 0..d {
            let row = &self.precision[i * d..(i + 1) * d];
            let pi: f64 = row.iter().zip(&diff).map(|(p, v)| p * v).sum();
            q += diff[i] * pi;
        }
        if q < 0.0 { 0.0 } else { q }
    }

    /// [`LedoitWolf::mahalanobis`] of every row of the row-major `queries` (`m x d`), with the
    /// products done as one matrix multiplication. Errors if `queries` is not whole rows.
    pub fn mahalanobis_rows(&self, queries: &[f32]) -> Result<Vec<f64>, EvalError> {
        let d = self.d;
        if !queries.len().is_multiple_of(d) {
            return Err(EvalError::Input(format!(
                "Mahalanobis queries: {} values are not whole rows of d={d}",
                queries.len()
            )));
        }
        let x: Vec<f64> = queries.iter().map(|&v| v as f64).collect();
        Ok(self.mahalanobis_f64(&x))
    }
}

/// Index of the largest value (the first one on ties, as `argmax` in NumPy and PyTorch); NaN
/// never wins unless every value is NaN.
fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &v) in row.iter().enumerate() {
        if !v.is_nan() && (!found || v > best_v) {
            best = i;
            best_v = v;
            found = true;
        }
    }
    best
}

/// Element-wise binary accuracy of multi-label logits (row-major, any shape) against 0/1
/// targets of the same shape: the paper's discriminative metric, "sigmoid > 0.5" (that is,
/// logit > 0) compared with target > 0.5, averaged over models x classes.
pub fn multilabel_accuracy(logits: &[f32], targets: &[f32]) -> Result<f64, EvalError> {
    if logits.len() != targets.len() {
        return Err(EvalError::Shape {
            what: "multilabel_accuracy: number of targets (one per logit)".into(),
            expected: logits.len(),
            got: targets.len(),
        });
    }
    if logits.is_empty() {
        return Err(EvalError::Undefined("accuracy of zero predictions".into()));
    }
    let hits = logits
        .iter()
        .zip(targets)
        .filter(|&(&l, &t)| (l > 0.0) == (t > 0.5))
        .count();
    Ok(hits as f64 / logits.len() as f64)
}

/// Top-1 accuracy of row-major logits `[n, classes]` against class ids (argmax, first index on
/// ties).
pub fn top1_accuracy(logits: &[f32], classes: usize, labels: &[u32]) -> Result<f64, EvalError> {
    if classes == 0 {
        return Err(EvalError::Param(
            "top-1 accuracy needs at least one class".into(),
        ));
    }
    if logits.len() != labels.len() * classes {
        return Err(EvalError::Shape {
            what: format!(
                "top1_accuracy: number of logits ({} labels x {classes} classes)",
                labels.len()
            ),
            expected: labels.len() * classes,
            got: logits.len(),
        });
    }
    if labels.is_empty() {
        return Err(EvalError::Undefined("accuracy of zero predictions".into()));
    }
    let hits = logits
        .chunks_exact(classes)
        .zip(labels)
        .filter(|&(row, &y)| argmax(row) == y as usize)
        .count();
    Ok(hits as f64 / labels.len() as f64)
}

/// Predicted class per row: the argmax of the cosine similarity between each encoding
/// (`enc`, `[n, d]`) and each class vector (`class_vecs`, `[classes, d]`). A zero vector has
/// cosine 0 with everything, as with PyTorch's `F.normalize` (eps 1e-12).
pub fn predict_by_cosine(enc: &[f32], class_vecs: &[f32], d: usize) -> Result<Vec<u32>, EvalError> {
    if d == 0 || !enc.len().is_multiple_of(d) || !class_vecs.len().is_multiple_of(d) {
        return Err(EvalError::Input(format!(
            "predict_by_cosine: encodings ({} values) and class vectors ({} values) must both be \
             whole rows of d={d}",
            enc.len(),
            class_vecs.len()
        )));
    }
    if class_vecs.is_empty() {
        return Err(EvalError::Param(
            "cosine prediction needs at least one class".into(),
        ));
    }
    let norm = |v: &[f32]| -> Vec<f32> {
        let n = v
            .iter()
            .map(|x| (*x as f64) * (*x as f64))
            .sum::<f64>()
            .sqrt()
            .max(1e-12);
        v.iter().map(|x| (*x as f64 / n) as f32).collect()
    };
    let classes: Vec<Vec<f32>> = class_vecs.chunks_exact(d).map(norm).collect();
    Ok(enc
        .chunks_exact(d)
        .map(|row| {
            let e = norm(row);
            let cos: Vec<f32> = classes
                .iter()
                .map(|c| c.iter().zip(&e).map(|(a, b)| a * b).sum())
                .collect();
            argmax(&cos) as u32
        })
        .collect())
}

/// Zero-shot top-1 accuracy: [`predict_by_cosine`] against the candidate classes' vectors
/// (for held-out evaluation, only the held-out classes, with `labels` indexing into them).
pub fn top1_by_cosine(
    enc: &[f32],
    class_vecs: &[f32],
    d: usize,
    labels: &[u32],
) -> Result<f64, EvalError> {
    let pred = predict_by_cosine(enc, class_vecs, d)?;
    if pred.len() != labels.len() {
        return Err(EvalError::Shape {
            what: "top1_by_cosine: number of labels (one per encoding)".into(),
            expected: pred.len(),
            got: labels.len(),
        });
    }
    if labels.is_empty() {
        return Err(EvalError::Undefined("accuracy of zero predictions".into()));
    }
    let hits = pred.iter().zip(labels).filter(|(p, y)| p == y).count();
    Ok(hits as f64 / labels.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_extremes_and_ties() {
        assert_eq!(
            roc_auc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]),
            Ok(1.0)
        );
        assert_eq!(
            roc_auc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]),
            Ok(0.0)
        );
        // All scores tied: every positive/negative pair counts one half.
        assert_eq!(
            roc_auc(&[1.0; 5], &[true, false, true, false, false]),
            Ok(0.5)
        );
        assert_eq!(roc_auc(&[0.0, -0.0], &[true, false]), Ok(0.5));
        assert_eq!(
            roc_auc(&[f64::NEG_INFINITY, f64::INFINITY], &[false, true]),
            Ok(1.0)
        );
    }

    #[test]
    fn auc_errors() {
        assert!(matches!(
            roc_auc(&[1.0], &[true, false]),
            Err(EvalError::Shape { .. })
        ));
        assert!(matches!(
            roc_auc(&[1.0, 2.0], &[true, true]),
            Err(EvalError::Undefined(_))
        ));
        assert!(matches!(
            roc_auc(&[f64::NAN, 2.0], &[true, false]),
            Err(EvalError::NaN(_))
        ));
    }

    #[test]
    fn ledoit_wolf_degenerate_inputs() {
        // One sample: zero covariance, zero shrinkage, zero precision (pinv of 0).
        let lw = ledoit_wolf(&[1.0, 2.0, 3.0], 1, 3).unwrap();
        assert_eq!(lw.shrinkage, 0.0);
        assert!(lw.covariance.iter().all(|&v| v == 0.0));
        assert_eq!(lw.mahalanobis(&[5.0, 5.0, 5.0]), 0.0);
        assert!(matches!(
            ledoit_wolf(&[], 0, 3),
            Err(EvalError::Undefined(_))
        ));
        assert!(matches!(
            ledoit_wolf(&[1.0; 5], 2, 3),
            Err(EvalError::Shape { .. })
        ));
        assert!(ledoit_wolf(&[1.0, f64::NAN], 1, 2).is_err());
        assert!(lw.mahalanobis(&[1.0]).is_nan());
    }

    #[test]
    fn accuracies() {
        assert_eq!(
            multilabel_accuracy(&[1.0, -1.0, 0.0, 2.0], &[1.0, 0.0, 1.0, 0.0]),
            Ok(0.5)
        );
        // Argmax takes the first of tied maxima.
        assert_eq!(
            top1_accuracy(&[1.0, 1.0, 0.0, 0.0, 2.0, 2.0], 3, &[0, 1]),
            Ok(1.0)
        );
        assert!(top1_accuracy(&[1.0, 2.0], 3, &[0]).is_err());
        let classes = [1.0, 0.0, 0.0, 1.0];
        assert_eq!(
            predict_by_cosine(&[3.0, 0.1, -0.2, 5.0, 0.0, 0.0], &classes, 2),
            Ok(vec![0, 1, 0])
        );
        assert_eq!(
            top1_by_cosine(&[3.0, 0.1, -0.2, 5.0], &classes, 2, &[0, 0]),
            Ok(0.5)
        );
    }
}
