//! The StatNN baseline: a fixed vector of statistics of the layer's weights, standardised with
//! training-set moments, and a one-hidden-layer MLP on it.

use burn::prelude::*;
use burn::tensor::activation::relu;
use rayon::prelude::*;

use super::{Linear, ModelKind, ModelSpec, Net};
use probex_weights::rng::Rng;

/// Names of the statistics, in feature order.
pub const FEATURES: [&str; 11] = [
    "mean", "std", "min", "q25", "median", "q75", "max", "mean_abs", "l2_norm", "skewness",
    "kurtosis",
];

/// Shapes of a StatNN probe.
#[derive(Config, Debug)]
pub struct StatNnConfig {
    /// Output width (classes, or 1 for regression).
    pub d_y: usize,
    /// Hidden width of the MLP.
    #[config(default = 64)]
    pub hidden: usize,
}

impl StatNnConfig {
    /// The model spec stored in checkpoints (`d_h`, `d_w` describe the layer, for checks).
    pub fn spec(&self, d_h: usize, d_w: usize) -> ModelSpec {
        ModelSpec {
            kind: ModelKind::Statnn,
            d_h,
            d_w,
            r_u: 0,
            r_v: 0,
            r_t: 0,
            d_y: self.d_y,
            d_text: 0,
            hidden: self.hidden,
        }
    }
}

/// `y = head(relu(hidden(standardised statistics)))`.
#[derive(Module, Debug)]
pub struct StatNn<B: Backend> {
    /// `hidden.{weight,bias}` `[hidden, F]`.
    pub hidden: Linear<B>,
    /// `classification_head.{weight,bias}` `[d_Y, hidden]`.
    pub classification_head: Linear<B>,
}

impl<B: Backend> Net<B> for StatNn<B> {
    fn init(spec: &ModelSpec, rng: &mut Rng, device: &B::Device) -> Self {
        StatNn {
            hidden: Linear::init(FEATURES.len(), spec.hidden, true, rng, device),
            classification_head: Linear::init(spec.hidden, spec.d_y, true, rng, device),
        }
    }

    fn encode(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        let [b, _, f] = x.dims();
        relu(self.hidden.forward(x.reshape([b, f])))
    }

    fn scores(&self, x: Tensor<B, 3>, _text: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
        self.classification_head.forward(self.encode(x))
    }
}

/// Quantile `q` of `v` with linear interpolation (NumPy's default); reorders `v`.
fn quantile(v: &mut [f64], q: f64) -> f64 {
    let pos = q * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let frac = pos - lo as f64;
    let (_, &mut a, right) = v.select_nth_unstable_by(lo, f64::total_cmp);
    if frac == 0.0 || right.is_empty() {
        return a;
    }
    let b = right.iter().copied().fold(f64::INFINITY, f64::min);
    a + (b - a) * frac
}

/// The statistics of one matrix, in [`FEATURES`] order.
pub fn statistics(m: &[f32]) -> [f32; FEATURES.len()] {
    if m.is_empty() {
        return [0.0; FEATURES.len()];
    }
    let n = m.len() as f64;
    let mut v: Vec<f64> = m.iter().map(|&x| x as f64).collect();
    let mean = v.iter().sum::<f64>() / n;
    let (mut m2, mut m3, mut m4, mut abs, mut sq) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for &x in &v {
        let d = x - mean;
        m2 += d * d;
        m3 += d * d * d;
        m4 += d * d * d * d;
        abs += x.abs();
        sq += x * x;
    }
    let var = m2 / n;
    let std = var.sqrt();
    let (skew, kurt) = if var > 0.0 {
        (m3 / n / (var * std), m4 / n / (var * var) - 3.0)
    } else {
        (0.0, 0.0)
    };
    let q25 = quantile(&mut v, 0.25);
    let q50 = quantile(&mut v, 0.5);
    let q75 = quantile(&mut v, 0.75);
    let (min, max) = v
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    [
        mean,
        std,
        min,
        q25,
        q50,
        q75,
        max,
        abs / n,
        sq.sqrt(),
        skew,
        kurt,
    ]
    .map(|x| x as f32)
}

/// Statistics of every matrix, row-major `[n, F]` (parallel over matrices).
pub fn statistics_of_all(weights: &[f32], n: usize, per: usize) -> Vec<f32> {
    (0..n)
        .into_par_iter()
        .flat_map_iter(|i| statistics(&weights[i * per..(i + 1) * per]))
        .collect()
}

/// Per-feature mean and standard deviation over `rows` of `feats` `[n, F]` (a zero std is
/// replaced by 1 so constant features map to 0).
pub fn moments(feats: &[f32], rows: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let f = FEATURES.len();
    let k = rows.len().max(1) as f64;
    let mut mean = vec![0.0f64; f];
    for &r in rows {
        for j in 0..f {
            mean[j] += feats[r * f + j] as f64 / k;
        }
    }
    let mut var = vec![0.0f64; f];
    for &r in rows {
        for j in 0..f {
            var[j] += (feats[r * f + j] as f64 - mean[j]).powi(2) / k;
        }
    }
    let std = var
        .iter()
        .map(|&v| if v > 1e-24 { v.sqrt() as f32 } else { 1.0 })
        .collect();
    (mean.into_iter().map(|m| m as f32).collect(), std)
}

/// Applies `(x - mean) / std` per feature in place.
pub fn standardise(feats: &mut [f32], mean: &[f32], std: &[f32]) {
    let f = mean.len();
    for row in feats.chunks_mut(f) {
        for j in 0..f {
            row[j] = (row[j] - mean[j]) / std[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_of_a_known_matrix() {
        let m = [1.0f32, 2.0, 3.0, 4.0, 5.0];
        let s = statistics(&m);
        let get = |name| s[FEATURES.iter().position(|&f| f == name).unwrap()];
        assert_eq!(get("mean"), 3.0);
        assert!((get("std") - 2f32.sqrt()).abs() < 1e-6);
        assert_eq!(get("min"), 1.0);
        assert_eq!(get("q25"), 2.0);
        assert_eq!(get("median"), 3.0);
        assert_eq!(get("q75"), 4.0);
        assert_eq!(get("max"), 5.0);
        assert!((get("l2_norm") - 55f32.sqrt()).abs() < 1e-5);
        assert!(get("skewness").abs() < 1e-6);
        // Interpolated quantile (NumPy: quantile([1,2,3,4], 0.25) = 1.75).
        assert!((statistics(&[4.0, 1.0, 3.0, 2.0])[3] - 1.75).abs() < 1e-6);
    }

    #[test]
    fn standardised_training_features_have_zero_mean() {
        let feats: Vec<f32> = (0..3 * FEATURES.len()).map(|i| (i * i) as f32).collect();
        let (mean, std) = moments(&feats, &[0, 1, 2]);
        let mut f = feats.clone();
        standardise(&mut f, &mean, &std);
        for j in 0..FEATURES.len() {
            let m: f32 = (0..3).map(|r| f[r * FEATURES.len() + j]).sum::<f32>() / 3.0;
            assert!(m.abs() < 1e-4);
        }
    }
}
