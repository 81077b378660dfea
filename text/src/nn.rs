//! The few transformer pieces both text encoders share, written against Burn tensors so they run
//! on any backend. Inference only: the norms and projections are probex-nn's [`LayerNorm`] and
//! [`Linear`], loaded frozen.
//!
//! Each piece computes in f32 and can round what it produces to f16 ([`Precision::F16`]), which
//! is what a half-precision PyTorch model on a GPU does: weights stored in f16, every op's result
//! stored in f16, matrix products accumulated in f32 (cuBLAS) and layer norms computed in f32
//! (OpenAI CLIP's `LayerNorm` casts up and back; PyTorch's CUDA kernel accumulates in f32).

use burn::module::Module;
use burn::prelude::Backend;
use burn::tensor::activation::softmax;
use burn::tensor::{Tensor, TensorData};
use probex_nn::{LayerNorm, Linear, Precision, WeightLayout};

use super::tensors::WeightFile;

/// Reads the PyTorch `Linear` `{name}.weight` (`[d_out, d_in]`) and, when `bias`,
/// `{name}.bias`, into a frozen layer that holds `W^T` ([`WeightLayout::InOut`]), so the
/// forward pass is one matmul.
pub fn load_linear<B: Backend>(
    w: &WeightFile,
    name: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &B::Device,
) -> anyhow::Result<Linear<B>> {
    let weight = w.tensor::<B, 2>(&format!("{name}.weight"), [d_out, d_in], device)?;
    let bias = if bias {
        Some(w.tensor::<B, 1>(&format!("{name}.bias"), [d_out], device)?)
    } else {
        None
    };
    Ok(Linear::new(weight.transpose(), bias, WeightLayout::InOut).no_grad())
}

/// Reads the PyTorch `LayerNorm` `{name}.weight` and `{name}.bias`, both `[d]`, into a frozen
/// norm.
pub fn load_norm<B: Backend>(
    w: &WeightFile,
    name: &str,
    d: usize,
    eps: f64,
    device: &B::Device,
) -> anyhow::Result<LayerNorm<B>> {
    let gamma = w.tensor::<B, 1>(&format!("{name}.weight"), [d], device)?;
    let beta = w.tensor::<B, 1>(&format!("{name}.bias"), [d], device)?;
    Ok(LayerNorm::new(gamma, beta, eps).no_grad())
}

/// Multi-head self-attention with separate q/k/v/out projections (BERT's and CLIP's layout).
pub struct SelfAttention<B: Backend> {
    /// Query projection.
    pub q: Linear<B>,
    /// Key projection.
    pub k: Linear<B>,
    /// Value projection.
    pub v: Linear<B>,
    /// Output projection.
    pub out: Linear<B>,
    /// Number of heads.
    pub heads: usize,
    /// What the attention's own products (scores, probabilities, context) are stored in; the
    /// projections carry their own.
    pub precision: Precision,
}

impl<B: Backend> SelfAttention<B> {
    /// The attention in precision `p`, projections included.
    pub fn with_precision(self, p: Precision) -> Self {
        SelfAttention {
            q: self.q.with_precision(p),
            k: self.k.with_precision(p),
            v: self.v.with_precision(p),
            out: self.out.with_precision(p),
            heads: self.heads,
            precision: p,
        }
    }

    /// Attends over `[batch, seq, d]`; `mask` is additive, `[batch, 1, seq | 1, seq]`, with 0
    /// where a key may be seen and a large negative number where not.
    pub fn forward(&self, x: Tensor<B, 3>, mask: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, s, d] = x.dims();
        let h = self.heads;
        let dh = d / h;
        let split = |t: Tensor<B, 3>| t.reshape([b, s, h, dh]).swap_dims(1, 2);
        let q = split(self.q.forward_seq(x.clone()));
        let k = split(self.k.forward_seq(x.clone()));
        let v = split(self.v.forward_seq(x));
        let r = |t| self.precision.round(t);
        // In f16 each product is stored before the next op reads it; a masked score becomes
        // -inf there, whose softmax weight is 0 as in f32 (a row always keeps a visible key).
        let scores = r(r(q.matmul(k.swap_dims(2, 3))) / (dh as f64).sqrt());
        let [mb, _, mq, mk] = mask.dims();
        let scores = r(scores + mask.expand([mb, h, if mq == 1 { s } else { mq }, mk]));
        let probs = r(softmax(scores, 3));
        let ctx = r(probs.matmul(v)).swap_dims(1, 2).reshape([b, s, d]);
        self.out.forward_seq(ctx)
    }
}

/// What masked-out attention scores get: finite so that no row can become NaN, and so negative
/// that `exp` of it is exactly zero in f32.
pub const MASKED: f32 = -1.0e9;

/// A right-padded batch of token ids: `ids` is `[batch, seq]` row-major, `lens[i]` the number of
/// real tokens of row `i`.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Padded ids, row-major.
    pub ids: Vec<u32>,
    /// Real length of each row.
    pub lens: Vec<usize>,
    /// Padded length.
    pub seq: usize,
}

impl Batch {
    /// Pads `rows` on the right with `pad` to the longest row.
    pub fn pad(rows: &[Vec<u32>], pad: u32) -> Batch {
        let seq = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * seq);
        for r in rows {
            ids.extend_from_slice(r);
            ids.extend(std::iter::repeat_n(pad, seq - r.len()));
        }
        Batch {
            ids,
            lens: rows.iter().map(Vec::len).collect(),
            seq,
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.lens.len()
    }

    /// Embeds the ids with table `[vocab, d]`: `[batch, seq, d]`.
    pub fn lookup<B: Backend>(&self, table: &Tensor<B, 2>) -> Tensor<B, 3> {
        let d = table.dims()[1];
        let device = table.device();
        let ids: Vec<i64> = self.ids.iter().map(|&i| i as i64).collect();
        let ids = Tensor::<B, 1, burn::tensor::Int>::from_data(
            TensorData::new(ids, [self.ids.len()]),
            &device,
        );
        table
            .clone()
            .select(0, ids)
            .reshape([self.rows(), self.seq, d])
    }

    /// Additive key-padding mask `[batch, 1, 1, seq]`.
    pub fn padding_mask<B: Backend>(&self, device: &B::Device) -> Tensor<B, 4> {
        let mut m = Vec::with_capacity(self.rows() * self.seq);
        for &len in &self.lens {
            m.extend((0..self.seq).map(|j| if j < len { 0.0 } else { MASKED }));
        }
        Tensor::from_data(TensorData::new(m, [self.rows(), 1, 1, self.seq]), device)
    }

    /// Additive causal plus key-padding mask `[batch, 1, seq, seq]`.
    pub fn causal_mask<B: Backend>(&self, device: &B::Device) -> Tensor<B, 4> {
        let s = self.seq;
        let mut m = Vec::with_capacity(self.rows() * s * s);
        for &len in &self.lens {
            for i in 0..s {
                m.extend((0..s).map(|j| if j <= i && j < len { 0.0 } else { MASKED }));
            }
        }
        Tensor::from_data(TensorData::new(m, [self.rows(), 1, s, s]), device)
    }

    /// `[batch, seq]` with 1.0 on real tokens and 0.0 on padding.
    pub fn token_mask<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2> {
        let mut m = Vec::with_capacity(self.rows() * self.seq);
        for &len in &self.lens {
            m.extend((0..self.seq).map(|j| if j < len { 1.0f32 } else { 0.0 }));
        }
        Tensor::from_data(TensorData::new(m, [self.rows(), self.seq]), device)
    }
}

/// Position ids `0..seq` embedded with table `[max_pos, d]`: `[1, seq, d]`.
pub fn positions<B: Backend>(table: &Tensor<B, 2>, seq: usize) -> Tensor<B, 3> {
    let d = table.dims()[1];
    table.clone().slice([0..seq, 0..d]).unsqueeze_dim::<3>(0)
}

/// Reads a `[rows, cols]` tensor back as rows of f32.
pub fn to_rows<B: Backend>(t: Tensor<B, 2>) -> anyhow::Result<Vec<Vec<f32>>> {
    let [_, cols] = t.dims();
    let values: Vec<f32> = t
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("reading embeddings back from the device: {e:?}"))?;
    Ok(values.chunks(cols.max(1)).map(<[f32]>::to_vec).collect())
}
