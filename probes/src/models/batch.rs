//! A batch of layer matrices as the models read them: stacked, or as the LoRA factors they
//! are the product of.
//!
//! A LoRA layer's matrix `X = B @ A` has rank `r` (16 for Model-J's SD LoRAs) against a side
//! of 320 to 1280, so its factors are up to 40x smaller than `X`. ProbeX's encoder reads them
//! directly ([`super::encoder::factored`]); the other models form `X` per batch
//! ([`Batch::stacked`]), so no layer is ever held materialised whole.

use burn::prelude::*;
use burn::tensor::Int;
use burn::tensor::backend::AutodiffBackend;

/// The standardisation a model's inputs go through before the model reads them:
/// `(X - mean) / scale`, with the training rows' mean matrix and value spread.
#[derive(Clone, Debug)]
pub struct Standardize<B: Backend> {
    /// `[d_H, d_W]`.
    pub mean: Tensor<B, 2>,
    /// One standard deviation of the training rows' values around `mean`.
    pub scale: f32,
}

/// Layer matrices, one per model.
#[derive(Clone, Debug)]
pub enum Batch<B: Backend> {
    /// `[N, a, b]`: the matrices, already standardised where the model standardises (or
    /// StatNN's statistics `[N, 1, F]`).
    Stacked(Tensor<B, 3>),
    /// LoRA factors: model `i`'s matrix is `(up_t_i^T @ down_i - mean) / scale`.
    Factored {
        /// `B^T` `[N, r, d_H]`: the up factors transposed once when they reach the device, so
        /// the encoder's `B^T V^T` is one GEMM over the batch's rows without a copy per batch.
        up_t: Tensor<B, 3>,
        /// `A` `[N, r, d_W]`.
        down: Tensor<B, 3>,
        /// Applied after the product, when the model standardises its inputs.
        standardize: Option<Standardize<B>>,
    },
}

impl<B: Backend> From<Tensor<B, 3>> for Batch<B> {
    fn from(x: Tensor<B, 3>) -> Self {
        Batch::Stacked(x)
    }
}

impl<B: Backend> Batch<B> {
    /// Number of models in the batch.
    pub fn len(&self) -> usize {
        match self {
            Batch::Stacked(x) => x.dims()[0],
            Batch::Factored { up_t, .. } => up_t.dims()[0],
        }
    }

    /// True when the batch holds no model.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The models `rows` (indices into this batch), in that order.
    pub fn select(&self, rows: Tensor<B, 1, Int>) -> Batch<B> {
        match self {
            Batch::Stacked(x) => Batch::Stacked(x.clone().select(0, rows)),
            Batch::Factored {
                up_t,
                down,
                standardize,
            } => Batch::Factored {
                up_t: up_t.clone().select(0, rows.clone()),
                down: down.clone().select(0, rows),
                standardize: standardize.clone(),
            },
        }
    }

    /// The matrices themselves `[N, d_H, d_W]`, formed from the factors and standardised
    /// when the batch is factored.
    pub fn stacked(self) -> Tensor<B, 3> {
        match self {
            Batch::Stacked(x) => x,
            Batch::Factored {
                up_t,
                down,
                standardize,
            } => {
                let x = up_t.swap_dims(1, 2).matmul(down);
                match standardize {
                    Some(s) => (x - s.mean.unsqueeze_dim(0)).div_scalar(s.scale),
                    None => x,
                }
            }
        }
    }

    /// The same batch as constants of the autodiff backend over `B`.
    pub fn tracked<AB: AutodiffBackend<InnerBackend = B>>(self) -> Batch<AB> {
        match self {
            Batch::Stacked(x) => Batch::Stacked(Tensor::from_inner(x)),
            Batch::Factored {
                up_t,
                down,
                standardize,
            } => Batch::Factored {
                up_t: Tensor::from_inner(up_t),
                down: Tensor::from_inner(down),
                standardize: standardize.map(|s| Standardize {
                    mean: Tensor::from_inner(s.mean),
                    scale: s.scale,
                }),
            },
        }
    }
}
