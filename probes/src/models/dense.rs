//! The Dense baseline: one Linear layer on the flattened weight matrix.

use burn::prelude::*;

use super::{Linear, ModelKind, ModelSpec, Net, text_cosines};
use probex_weights::rng::Rng;

/// Shapes of a Dense probe.
#[derive(Config, Debug)]
pub struct DenseConfig {
    /// Rows of the input matrix.
    pub d_h: usize,
    /// Columns of the input matrix.
    pub d_w: usize,
    /// Output width (classes, or 1 for regression).
    pub d_y: usize,
}

impl DenseConfig {
    /// The model spec stored in checkpoints.
    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            kind: ModelKind::Dense,
            d_h: self.d_h,
            d_w: self.d_w,
            r_u: 0,
            r_v: 0,
            r_t: 0,
            d_y: self.d_y,
            d_text: 0,
            hidden: 0,
        }
    }

    /// A freshly initialised model.
    pub fn init<B: Backend>(&self, rng: &mut Rng, device: &B::Device) -> Dense<B> {
        Dense::init(&self.spec(), rng, device)
    }
}

/// `y = dense(vec(X))`, `dense.weight` `[d_Y, d_H*d_W]` (row-major flattening of X).
#[derive(Module, Debug)]
pub struct Dense<B: Backend> {
    /// `dense.{weight,bias}`.
    pub dense: Linear<B>,
}

impl<B: Backend> Net<B> for Dense<B> {
    fn init(spec: &ModelSpec, rng: &mut Rng, device: &B::Device) -> Self {
        Dense {
            dense: Linear::init(spec.d_h * spec.d_w, spec.d_y, true, rng, device),
        }
    }

    fn encode(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        self.scores(x, None)
    }

    fn scores(&self, x: Tensor<B, 3>, _text: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
        let [b, h, w] = x.dims();
        self.dense.forward(x.reshape([b, h * w]))
    }
}

/// The zero-shot Dense baseline: `e = dense(vec(X))` `[B, r_T]` and
/// `regression_head(text)` `[C, r_T]`, both L2-normalised; logits are their cosines, as in
/// zero-shot ProbeX, so the two differ only in the encoder.
#[derive(Module, Debug)]
pub struct DenseZeroshot<B: Backend> {
    /// `dense.{weight,bias}` `[r_T, d_H*d_W]`, `[r_T]`.
    pub dense: Linear<B>,
    /// `regression_head.{weight,bias}` `[r_T, d_text]`, `[r_T]`.
    pub regression_head: Linear<B>,
}

impl<B: Backend> Net<B> for DenseZeroshot<B> {
    fn init(spec: &ModelSpec, rng: &mut Rng, device: &B::Device) -> Self {
        DenseZeroshot {
            dense: Linear::init(spec.d_h * spec.d_w, spec.r_t, true, rng, device),
            regression_head: Linear::init(spec.d_text, spec.r_t, true, rng, device),
        }
    }

    fn encode(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        let [b, h, w] = x.dims();
        self.dense.forward(x.reshape([b, h * w]))
    }

    fn scores(&self, x: Tensor<B, 3>, text: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
        text_cosines(self.encode(x), &self.regression_head, text)
    }
}
