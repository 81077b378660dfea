//! Adam's update in place, as PyTorch's `torch.optim.Adam` computes it (L2 weight decay added
//! to the gradient, bias correction, epsilon added to the corrected root second moment).

use rayon::prelude::*;

/// The scalars of one update, in `f32` as the tensor ops round them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step {
    /// L2 weight decay.
    pub weight_decay: f32,
    /// First-moment decay and `1 - beta1`.
    pub beta1: (f32, f32),
    /// Second-moment decay and `1 - beta2`.
    pub beta2: (f32, f32),
    /// Denominator epsilon.
    pub eps: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bc2_sqrt: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// The first step: the moments start from zero.
    pub first: bool,
}

/// Updates parameter `p` and its moments `m`, `v` in place from gradient `g`, element by
/// element in the order of operations of the tensor path (`g + p*wd`, `m*b1 + g*(1-b1)`,
/// `v*b2 + g*g*(1-b2)`, `p - m / (sqrt(v) / bc2 + eps) * step`), so the bits are the same.
///
/// # Panics
/// When the four slices differ in length.
pub fn update(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: &Step) {
    assert!(
        p.len() == m.len() && p.len() == v.len() && p.len() == g.len(),
        "Adam: parameter, moments and gradient differ in length"
    );
    let decay = s.weight_decay != 0.0;
    let one = |p: &mut f32, m: &mut f32, v: &mut f32, g: f32| {
        let g = if decay { g + *p * s.weight_decay } else { g };
        (*m, *v) = if s.first {
            (g * s.beta1.1, g * g * s.beta2.1)
        } else {
            (
                *m * s.beta1.0 + g * s.beta1.1,
                *v * s.beta2.0 + g * g * s.beta2.1,
            )
        };
        *p -= *m / (v.sqrt() / s.bc2_sqrt + s.eps) * s.step_size;
    };
    // Large enough to amortise rayon, small enough to share out a 100K parameter; each
    // element's arithmetic is independent, so the split is invisible in the result.
    const CHUNK: usize = 1 << 14;
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| {
            for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
                one(p, m, v, g);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two steps against PyTorch's formulas written out in f64.
    #[test]
    fn follows_pytorchs_formulas() {
        let (lr, wd, b1, b2, eps) = (0.1f64, 0.01f64, 0.9f64, 0.999f64, 1e-8f64);
        let (mut p, mut m, mut v) = (vec![0.5f32, -1.0], vec![0.0; 2], vec![0.0; 2]);
        let g = [2.0f32, 0.25];
        for t in 1..=2 {
            let step = Step {
                weight_decay: wd as f32,
                beta1: (b1 as f32, (1.0 - b1) as f32),
                beta2: (b2 as f32, (1.0 - b2) as f32),
                eps: eps as f32,
                bc2_sqrt: (1.0 - b2.powi(t)).sqrt() as f32,
                step_size: (lr / (1.0 - b1.powi(t))) as f32,
                first: t == 1,
            };
            update(&mut p, &mut m, &mut v, &g, &step);
        }
        for k in 0..2 {
            let (mut pk, mut mk, mut vk) = ([0.5f64, -1.0][k], 0.0, 0.0);
            for t in 1..=2 {
                let gk = g[k] as f64 + wd * pk;
                mk = b1 * mk + (1.0 - b1) * gk;
                vk = b2 * vk + (1.0 - b2) * gk * gk;
                pk -= lr / (1.0 - b1.powi(t)) * mk / ((vk / (1.0 - b2.powi(t))).sqrt() + eps);
            }
            assert!((p[k] as f64 - pk).abs() < 1e-6, "{p:?} vs {pk}");
        }
    }
}
