//! A BERT encoder with sentence-transformers mean pooling and L2 normalisation: the
//! all-MiniLM-L6-v2 sentence embedder (6 layers, hidden 384), or any BERT checkpoint in the
//! Hugging Face layout.

use std::path::Path;

use anyhow::{Context, bail};
use burn::prelude::Backend;
use burn::tensor::Tensor;
use burn::tensor::activation::gelu;
use serde::Deserialize;

use probex_nn::{LayerNorm, Linear, Precision};

use super::nn::{Batch, SelfAttention, load_linear, load_norm, positions, to_rows};
use super::tensors::WeightFile;

/// The fields of a BERT `config.json` the forward pass needs.
#[derive(Clone, Debug, Deserialize)]
pub struct BertConfig {
    /// Token vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Feed-forward activation; only the exact (erf) `gelu` is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Longest sequence the position table covers.
    pub max_position_embeddings: usize,
    /// Number of token types (segments).
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// Layer-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

impl BertConfig {
    /// Reads and checks `config.json`.
    pub fn load(path: &Path) -> anyhow::Result<BertConfig> {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let c: BertConfig = serde_json::from_slice(&text)
            .with_context(|| format!("{}: not a BERT config", path.display()))?;
        if c.hidden_act != "gelu" {
            bail!(
                "{}: hidden_act = {:?} is not supported (only \"gelu\")",
                path.display(),
                c.hidden_act
            );
        }
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            bail!(
                "{}: hidden_size {} is not a multiple of num_attention_heads {}",
                path.display(),
                c.hidden_size,
                c.num_attention_heads
            );
        }
        Ok(c)
    }
}

struct BertLayer<B: Backend> {
    attn: SelfAttention<B>,
    attn_norm: LayerNorm<B>,
    up: Linear<B>,
    down: Linear<B>,
    out_norm: LayerNorm<B>,
}

/// A BERT encoder whose output is the mean of its last hidden states over the real tokens,
/// L2-normalised (what sentence-transformers computes for all-MiniLM-L6-v2).
pub struct Bert<B: Backend> {
    config: BertConfig,
    word: Tensor<B, 2>,
    position: Tensor<B, 2>,
    token_type0: Tensor<B, 1>,
    emb_norm: LayerNorm<B>,
    layers: Vec<BertLayer<B>>,
    precision: Precision,
    device: B::Device,
}

impl<B: Backend> Bert<B> {
    /// Loads the weights of `config` from `weights` (names with or without a `bert.` prefix).
    pub fn load(config: BertConfig, weights: &Path, device: &B::Device) -> anyhow::Result<Self> {
        let mut w = WeightFile::open(weights)?;
        w.detect_prefix("embeddings.word_embeddings.weight", &["", "bert."])?;
        let c = &config;
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        let word = w.tensor(
            "embeddings.word_embeddings.weight",
            [c.vocab_size, d],
            device,
        )?;
        let position = w.tensor(
            "embeddings.position_embeddings.weight",
            [c.max_position_embeddings, d],
            device,
        )?;
        let types = w.tensor::<B, 2>(
            "embeddings.token_type_embeddings.weight",
            [c.type_vocab_size, d],
            device,
        )?;
        // Single sentences are all segment 0.
        let token_type0 = types.slice([0..1, 0..d]).reshape([d]);
        let emb_norm = load_norm(&w, "embeddings.LayerNorm", d, eps, device)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let lin =
                |name: &str, a, b| load_linear(&w, &format!("{p}.{name}"), a, b, true, device);
            layers.push(BertLayer {
                attn: SelfAttention {
                    q: lin("attention.self.query", d, d)?,
                    k: lin("attention.self.key", d, d)?,
                    v: lin("attention.self.value", d, d)?,
                    out: lin("attention.output.dense", d, d)?,
                    heads: c.num_attention_heads,
                    precision: Precision::F32,
                },
                attn_norm: load_norm(
                    &w,
                    &format!("{p}.attention.output.LayerNorm"),
                    d,
                    eps,
                    device,
                )?,
                up: lin("intermediate.dense", d, c.intermediate_size)?,
                down: lin("output.dense", c.intermediate_size, d)?,
                out_norm: load_norm(&w, &format!("{p}.output.LayerNorm"), d, eps, device)?,
            });
        }
        Ok(Bert {
            config,
            word,
            position,
            token_type0,
            emb_norm,
            layers,
            precision: Precision::F32,
            device: device.clone(),
        })
    }

    /// The encoder in precision `p` (weights rounded now, activations as it runs).
    pub fn with_precision(self, p: Precision) -> Self {
        Bert {
            config: self.config,
            word: p.round(self.word),
            position: p.round(self.position),
            token_type0: p.round(self.token_type0),
            emb_norm: self.emb_norm.with_precision(p),
            layers: self
                .layers
                .into_iter()
                .map(|l| BertLayer {
                    attn: l.attn.with_precision(p),
                    attn_norm: l.attn_norm.with_precision(p),
                    up: l.up.with_precision(p),
                    down: l.down.with_precision(p),
                    out_norm: l.out_norm.with_precision(p),
                })
                .collect(),
            precision: p,
            device: self.device,
        }
    }

    /// The configuration read from `config.json`.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Width of the embeddings.
    pub fn dim(&self) -> usize {
        self.config.hidden_size
    }

    /// Last hidden states `[batch, seq, hidden]` of a padded batch.
    pub fn hidden(&self, batch: &Batch) -> anyhow::Result<Tensor<B, 3>> {
        if batch.seq > self.config.max_position_embeddings {
            bail!(
                "sequence of {} tokens exceeds max_position_embeddings {}",
                batch.seq,
                self.config.max_position_embeddings
            );
        }
        let vocab = self.config.vocab_size as u32;
        if let Some(&bad) = batch.ids.iter().find(|&&i| i >= vocab) {
            bail!("token id {bad} is outside the model's vocabulary of {vocab}");
        }
        let r = |t| self.precision.round(t);
        let x = r(
            r(batch.lookup(&self.word) + positions(&self.position, batch.seq))
                + self
                    .token_type0
                    .clone()
                    .unsqueeze_dim::<2>(0)
                    .unsqueeze_dim::<3>(0),
        );
        let mut x = self.emb_norm.forward(x);
        let mask = batch.padding_mask::<B>(&self.device);
        for l in &self.layers {
            let a = l.attn.forward(x.clone(), mask.clone());
            x = l.attn_norm.forward(r(a + x));
            let f = l.down.forward_seq(r(gelu(l.up.forward_seq(x.clone()))));
            x = l.out_norm.forward(r(f + x));
        }
        Ok(x)
    }

    /// Mean-pooled, L2-normalised embeddings, one row per sequence of the batch.
    pub fn embed(&self, batch: &Batch) -> anyhow::Result<Vec<Vec<f32>>> {
        let h = self.hidden(batch)?;
        let mask = batch.token_mask::<B>(&self.device).unsqueeze_dim::<3>(2);
        let summed = (h * mask.clone()).sum_dim(1);
        let counts = mask.sum_dim(1).clamp_min(1e-9);
        let r = |t| self.precision.round(t);
        let mean: Tensor<B, 2> = r(r(summed) / counts).squeeze_dim(1);
        // The norm of an f16 vector is summed in f32 (as PyTorch's reduction kernels do); only
        // the result is stored in f16.
        let rows = l2_normalize(to_rows(mean)?);
        Ok(match self.precision {
            Precision::F32 => rows,
            Precision::F16 => rows
                .into_iter()
                .map(|v| {
                    v.into_iter()
                        .map(|x| half::f16::from_f32(x).to_f32())
                        .collect()
                })
                .collect(),
        })
    }
}

/// Divides each row by its L2 norm (at least 1e-12), as `torch.nn.functional.normalize` does.
pub fn l2_normalize(rows: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
    rows.into_iter()
        .map(|r| {
            let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            r.into_iter().map(|v| v / norm).collect()
        })
        .collect()
}
