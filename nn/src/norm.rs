//! A PyTorch `LayerNorm` as a Burn module: the zoo's ViTs train it, the text encoders run it
//! frozen.

use burn::module::{Module, Param};
use burn::tensor::{Tensor, backend::Backend};

use crate::Precision;

/// `torch.nn.LayerNorm` over the last axis: `(x - mean) / sqrt(var + eps) * gamma + beta`, with
/// the biased variance PyTorch computes.
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    /// Scale `[d]` (PyTorch's `weight`).
    pub gamma: Param<Tensor<B, 1>>,
    /// Shift `[d]` (PyTorch's `bias`).
    pub beta: Param<Tensor<B, 1>>,
    eps: f64,
    precision: Precision,
}

impl<B: Backend> LayerNorm<B> {
    /// A norm from device tensors `gamma` and `beta`, both `[d]`; in f32.
    pub fn new(gamma: Tensor<B, 1>, beta: Tensor<B, 1>, eps: f64) -> Self {
        LayerNorm {
            gamma: Param::from_tensor(gamma),
            beta: Param::from_tensor(beta),
            eps,
            precision: Precision::F32,
        }
    }

    /// The norm in precision `p`: its parameters rounded now, its outputs rounded from now on
    /// (computed in f32 in between).
    pub fn with_precision(self, p: Precision) -> Self {
        LayerNorm {
            gamma: self.gamma.map(|g| p.round(g)),
            beta: self.beta.map(|b| p.round(b)),
            eps: self.eps,
            precision: p,
        }
    }

    /// The width it normalises.
    pub fn d(&self) -> usize {
        self.gamma.val().dims()[0]
    }

    /// Normalises `x` over its last axis. Callers on the CPU keep `x` 2-D where they can:
    /// the CPU backend broadcasts 2-D operands row by row but walks higher-rank broadcasts
    /// element by element, an order of magnitude slower.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mean = x.clone().mean_dim(D - 1);
        let centered = x - mean;
        let var = centered.clone().powi_scalar(2).mean_dim(D - 1);
        let normed = centered / (var + self.eps).sqrt();
        let y = normed * self.gamma.val().unsqueeze::<D>() + self.beta.val().unsqueeze::<D>();
        self.precision.round(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    type Cpu = Flex;

    fn norm(gamma: [f32; 3], beta: [f32; 3], eps: f64) -> LayerNorm<Cpu> {
        let d = Default::default();
        LayerNorm::new(
            Tensor::from_data(TensorData::from(gamma), &d),
            Tensor::from_data(TensorData::from(beta), &d),
            eps,
        )
    }

    /// PyTorch's formula worked by hand: `torch.nn.LayerNorm(3, eps=1e-5)` with weight
    /// `[1, 2, 0.5]` and bias `[0, 1, -1]` on `[1, 2, 4]` (mean 7/3, biased variance 14/9).
    #[test]
    fn normalises_the_last_axis_as_pytorch_does_in_any_rank() {
        let n = norm([1.0, 2.0, 0.5], [0.0, 1.0, -1.0], 1e-5);
        let d = Default::default();
        let want = [-1.069_041_5, 0.465_479_2, -0.331_849];
        let rows = n.forward(Tensor::<Cpu, 2>::from_data([[1.0f32, 2.0, 4.0]], &d));
        let batched = n.forward(Tensor::<Cpu, 3>::from_data([[[1.0f32, 2.0, 4.0]]], &d));
        for got in [
            rows.into_data().to_vec::<f32>().unwrap(),
            batched.into_data().to_vec::<f32>().unwrap(),
        ] {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-5, "{got:?}");
            }
        }
        assert_eq!(n.d(), 3);
    }

    #[test]
    fn f16_rounds_the_parameters_and_the_output() {
        let n = norm([1.0 + 1e-4, 1.0, 1.0], [0.0; 3], 1e-5).with_precision(Precision::F16);
        let g = n.gamma.val().into_data().to_vec::<f32>().unwrap();
        assert_eq!(g[0], 1.0, "1 + 1e-4 is below f16's half step at 1");
        let y = n.forward(Tensor::<Cpu, 2>::from_data(
            [[0.0f32, 1.0, 3.0]],
            &Default::default(),
        ));
        for v in y.into_data().to_vec::<f32>().unwrap() {
            // An f16 value in f32 has zeros in the 13 mantissa bits f16 lacks.
            assert_eq!(v.to_bits() & 0x1fff, 0, "{v} is not an f16 value");
        }
    }
}
