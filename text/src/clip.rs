//! The CLIP text tower (ViT-L/14's is 12 layers, width 768, projection 768) in the Hugging Face
//! layout: `text_model.*` tensors plus `text_projection.weight`, sizes from `config.json`
//! (a full `CLIPConfig` with a `text_config` section, or a bare `CLIPTextConfig`).

use std::path::Path;

use anyhow::{Context, bail};
use burn::prelude::Backend;
use burn::tensor::activation::{gelu, sigmoid};
use burn::tensor::{Int, Tensor, TensorData};
use serde::Deserialize;
use serde_json::Value;

use probex_nn::{LayerNorm, Linear, Precision};

use super::nn::{Batch, SelfAttention, load_linear, load_norm, positions, to_rows};
use super::tensors::WeightFile;

/// The fields of a CLIP text config the forward pass needs, with `CLIPTextConfig`'s defaults.
#[derive(Clone, Debug, Deserialize)]
pub struct ClipTextConfig {
    /// Token vocabulary size.
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// Width of the hidden states.
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    /// Width of the feed-forward layer.
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    /// Width of the output embedding (after `text_projection`).
    #[serde(default = "d_proj")]
    pub projection_dim: usize,
    /// Number of transformer layers.
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Context length (77 for OpenAI CLIP).
    #[serde(default = "d_pos")]
    pub max_position_embeddings: usize,
    /// `quick_gelu` (OpenAI CLIP) or `gelu`.
    #[serde(default = "d_act")]
    pub hidden_act: String,
    /// Layer-norm epsilon.
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// End-of-text id. The value 2 marks old configs (OpenAI's own) whose pooling takes the
    /// position of the largest id instead, as `transformers` does.
    #[serde(default = "d_eos")]
    pub eos_token_id: u32,
}

fn d_vocab() -> usize {
    49408
}
fn d_hidden() -> usize {
    512
}
fn d_inter() -> usize {
    2048
}
fn d_proj() -> usize {
    512
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    8
}
fn d_pos() -> usize {
    77
}
fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_eos() -> u32 {
    49407
}

impl ClipTextConfig {
    /// Reads the text part of `config.json`: the `text_config` section of a `CLIPConfig` (whose
    /// top-level `projection_dim` wins, as in `CLIPModel`), or a bare `CLIPTextConfig`.
    pub fn load(path: &Path) -> anyhow::Result<ClipTextConfig> {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let root: Value = serde_json::from_slice(&text)
            .with_context(|| format!("{}: not JSON", path.display()))?;
        Self::from_json(&root).with_context(|| format!("{}: not a CLIP config", path.display()))
    }

    /// [`ClipTextConfig::load`] on parsed JSON.
    pub fn from_json(root: &Value) -> anyhow::Result<ClipTextConfig> {
        let section = match root.get("text_config") {
            Some(Value::Object(m)) => {
                let mut m = m.clone();
                // CLIPModel sizes `text_projection` from the top-level `projection_dim`; the
                // text section's own value is a default that may disagree (512).
                if let Some(p) = root.get("projection_dim") {
                    m.insert("projection_dim".into(), p.clone());
                }
                Value::Object(m)
            }
            Some(_) => bail!("`text_config` is not an object"),
            None => root.clone(),
        };
        // transformers writes unset fields as null: they take the defaults.
        let section = match section {
            Value::Object(m) => {
                Value::Object(m.into_iter().filter(|(_, v)| !v.is_null()).collect())
            }
            other => other,
        };
        let c: ClipTextConfig = serde_json::from_value(section)?;
        if c.hidden_act != "quick_gelu" && c.hidden_act != "gelu" {
            bail!(
                "hidden_act = {:?} is not supported (quick_gelu or gelu)",
                c.hidden_act
            );
        }
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            bail!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                c.hidden_size,
                c.num_attention_heads
            );
        }
        Ok(c)
    }

    /// Index of the token whose state is pooled: the first end-of-text id, or for legacy
    /// configs (`eos_token_id == 2`) the first position of the largest id.
    pub fn pool_position(&self, ids: &[u32]) -> anyhow::Result<usize> {
        if self.eos_token_id == 2 {
            // First maximum, as torch.argmax returns it.
            let mut best = 0;
            for (i, &id) in ids.iter().enumerate() {
                if id > ids[best] {
                    best = i;
                }
            }
            return Ok(best);
        }
        ids.iter()
            .position(|&i| i == self.eos_token_id)
            .with_context(|| {
                format!(
                    "the tokenizer did not end the sequence with the end-of-text id {} \
                     (eos_token_id in config.json); tokenizer and model do not match",
                    self.eos_token_id
                )
            })
    }
}

struct ClipLayer<B: Backend> {
    norm1: LayerNorm<B>,
    attn: SelfAttention<B>,
    norm2: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
}

/// The CLIP text encoder: pre-norm causal transformer, final layer norm, the end-of-text
/// token's state, then the linear `text_projection` (no normalisation, as `get_text_features`).
pub struct ClipText<B: Backend> {
    config: ClipTextConfig,
    token: Tensor<B, 2>,
    position: Tensor<B, 2>,
    layers: Vec<ClipLayer<B>>,
    final_norm: LayerNorm<B>,
    projection: Linear<B>,
    precision: Precision,
    device: B::Device,
}

impl<B: Backend> ClipText<B> {
    /// Loads the text tower of `config` from `weights` (a full CLIP checkpoint is fine: the
    /// vision tensors are ignored).
    pub fn load(
        config: ClipTextConfig,
        weights: &Path,
        device: &B::Device,
    ) -> anyhow::Result<Self> {
        let mut w = WeightFile::open(weights)?;
        if !w.contains("text_projection.weight") {
            bail!(
                "{}: no tensor `text_projection.weight`; a CLIPModel or \
                 CLIPTextModelWithProjection checkpoint is needed",
                weights.display()
            );
        }
        let projection = load_linear(
            &w,
            "text_projection",
            config.hidden_size,
            config.projection_dim,
            false,
            device,
        )?;
        w.detect_prefix("embeddings.token_embedding.weight", &["text_model."])?;
        let c = &config;
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        let token = w.tensor(
            "embeddings.token_embedding.weight",
            [c.vocab_size, d],
            device,
        )?;
        let position = w.tensor(
            "embeddings.position_embedding.weight",
            [c.max_position_embeddings, d],
            device,
        )?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("encoder.layers.{i}");
            let lin =
                |name: &str, a, b| load_linear(&w, &format!("{p}.{name}"), a, b, true, device);
            layers.push(ClipLayer {
                norm1: load_norm(&w, &format!("{p}.layer_norm1"), d, eps, device)?,
                attn: SelfAttention {
                    q: lin("self_attn.q_proj", d, d)?,
                    k: lin("self_attn.k_proj", d, d)?,
                    v: lin("self_attn.v_proj", d, d)?,
                    out: lin("self_attn.out_proj", d, d)?,
                    heads: c.num_attention_heads,
                    precision: Precision::F32,
                },
                norm2: load_norm(&w, &format!("{p}.layer_norm2"), d, eps, device)?,
                fc1: lin("mlp.fc1", d, c.intermediate_size)?,
                fc2: lin("mlp.fc2", c.intermediate_size, d)?,
            });
        }
        let final_norm = load_norm(&w, "final_layer_norm", d, eps, device)?;
        Ok(ClipText {
            config,
            token,
            position,
            layers,
            final_norm,
            projection,
            precision: Precision::F32,
            device: device.clone(),
        })
    }

    /// The tower in precision `p` (weights rounded now, activations as it runs): `F16` is
    /// OpenAI's `clip.load` on a GPU, which the authors use.
    pub fn with_precision(self, p: Precision) -> Self {
        ClipText {
            config: self.config,
            token: p.round(self.token),
            position: p.round(self.position),
            layers: self
                .layers
                .into_iter()
                .map(|l| ClipLayer {
                    norm1: l.norm1.with_precision(p),
                    attn: l.attn.with_precision(p),
                    norm2: l.norm2.with_precision(p),
                    fc1: l.fc1.with_precision(p),
                    fc2: l.fc2.with_precision(p),
                })
                .collect(),
            final_norm: self.final_norm.with_precision(p),
            projection: self.projection.with_precision(p),
            precision: p,
            device: self.device,
        }
    }

    /// The configuration read from `config.json`.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Width of the embeddings (`projection_dim`).
    pub fn dim(&self) -> usize {
        self.config.projection_dim
    }

    fn act(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let r = |t| self.precision.round(t);
        if self.config.hidden_act == "quick_gelu" {
            // Three ops in PyTorch, each stored.
            r(x.clone() * r(sigmoid(r(x * 1.702))))
        } else {
            r(gelu(x))
        }
    }

    /// Final-layer-normed hidden states `[batch, seq, hidden]` of a padded batch.
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
        let mut x = r(batch.lookup(&self.token) + positions(&self.position, batch.seq));
        let mask = batch.causal_mask::<B>(&self.device);
        for l in &self.layers {
            x = r(x.clone() + l.attn.forward(l.norm1.forward(x), mask.clone()));
            let f = l.fc1.forward_seq(l.norm2.forward(x.clone()));
            x = r(x + l.fc2.forward_seq(self.act(f)));
        }
        Ok(self.final_norm.forward(x))
    }

    /// Projected end-of-text embeddings, one row per sequence of the batch.
    pub fn embed(&self, batch: &Batch) -> anyhow::Result<Vec<Vec<f32>>> {
        let h = self.hidden(batch)?;
        let [b, s, d] = h.dims();
        let mut rows = Vec::with_capacity(b);
        for (r, &len) in batch.lens.iter().enumerate() {
            let ids = &batch.ids[r * s..r * s + len];
            rows.push((r * s + self.config.pool_position(ids)?) as i64);
        }
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [b]), &self.device);
        let pooled = h.reshape([b * s, d]).select(0, idx);
        to_rows(self.projection.forward(pooled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_nested_and_flat_forms() {
        let nested = serde_json::json!({
            "projection_dim": 768,
            "text_config": {"hidden_size": 768, "num_attention_heads": 12, "eos_token_id": 2,
                "projection_dim": 512},
            "vision_config": {"hidden_size": 1024}
        });
        let c = ClipTextConfig::from_json(&nested).unwrap();
        assert_eq!(
            (c.hidden_size, c.projection_dim, c.num_hidden_layers),
            (768, 768, 12)
        );
        assert_eq!(c.hidden_act, "quick_gelu");
        let flat = serde_json::json!({"hidden_size": 32, "num_attention_heads": 4,
            "projection_dim": 16, "hidden_act": "gelu"});
        let c = ClipTextConfig::from_json(&flat).unwrap();
        assert_eq!(
            (c.hidden_size, c.projection_dim, c.eos_token_id),
            (32, 16, 49407)
        );
        let bad = serde_json::json!({"hidden_act": "relu"});
        assert!(format!("{:#}", ClipTextConfig::from_json(&bad).unwrap_err()).contains("relu"));
    }

    #[test]
    fn pooling_position_follows_transformers() {
        let mut c = ClipTextConfig::from_json(&serde_json::json!({"eos_token_id": 2})).unwrap();
        // Legacy: first position of the largest id.
        assert_eq!(c.pool_position(&[49406, 320, 49407, 49407]).unwrap(), 2);
        c.eos_token_id = 7;
        assert_eq!(c.pool_position(&[5, 9, 7, 7]).unwrap(), 2);
        assert!(c.pool_position(&[5, 9]).is_err());
    }
}
