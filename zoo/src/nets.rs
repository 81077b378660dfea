//! The zoo's networks in Burn: an MLP and a small ViT classifier, and a denoising MLP with LoRA
//! adapters, each convertible to and from a PyTorch-style state dict.
//!
//! A [`StateDict`] holds tensors under the names and layouts the Hugging Face implementation
//! would use (Linear weights `[out, in]`, the ViT patch projection as a conv weight
//! `[hidden, 3, p, p]`), so sorted-name layer indexing behaves on zoo files as on real ones.
//! The nets' fully connected layers are probex-nn's [`Linear`], holding their weights as
//! `[in, out]` ([`WeightLayout::InOut`]); it converts to and from the state dict's `[out, in]`.

use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::tensor::{Tensor, TensorData, activation, backend::Backend};
use serde::{Deserialize, Serialize};

use probex_nn::{LayerNorm, Linear, LinearValues, WeightLayout, transpose};
use probex_weights::rng::StreamRng;

/// One tensor of a state dict: row-major f32 data with its PyTorch shape.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// PyTorch shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// Tensors by their Hugging Face names (sorted, as a `BTreeMap` keeps them).
pub type StateDict = BTreeMap<String, HostTensor>;

/// The ViT's patch projection in a state dict (a conv weight `[hidden, 3, p, p]` and its bias).
const PATCH: &str = "vit.embeddings.patch_embeddings.projection";

/// A state dict that does not fit a net, or a tensor that cannot be read back from its device.
/// The zoo reads only the nets it made itself, so either is a defect of the zoo.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// No tensor of that name.
    #[error("state dict has no tensor `{0}`")]
    Missing(String),
    /// The tensor has another shape than the net's.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The tensor's name.
        name: String,
        /// Its shape in the state dict.
        found: Vec<usize>,
        /// The net's shape for it.
        expected: Vec<usize>,
    },
    /// A device tensor could not be copied back to the host.
    #[error("reading a tensor back: {0:?}")]
    ReadBack(burn::tensor::DataError),
}

/// The state dict's tensor `name`, which must have `shape`.
fn take<'a>(
    state: &'a StateDict,
    name: &str,
    shape: &[usize],
) -> Result<&'a HostTensor, StateError> {
    let t = state
        .get(name)
        .ok_or_else(|| StateError::Missing(name.to_string()))?;
    if t.shape != shape {
        return Err(StateError::Shape {
            name: name.to_string(),
            found: t.shape.clone(),
            expected: shape.to_vec(),
        });
    }
    Ok(t)
}

fn tensor_data<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>, StateError> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(StateError::ReadBack)
}

/// The Linear `{prefix}.weight` `[d_out, d_in]` and, when `bias`, `{prefix}.bias` of `state`.
fn linear_values(
    state: &StateDict,
    prefix: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
) -> Result<LinearValues, StateError> {
    let weight = take(state, &format!("{prefix}.weight"), &[d_out, d_in])?;
    let bias = if bias {
        Some(
            take(state, &format!("{prefix}.bias"), &[d_out])?
                .data
                .clone(),
        )
    } else {
        None
    };
    Ok(LinearValues {
        d_in,
        d_out,
        weight: weight.data.clone(),
        bias,
    })
}

/// A layer of the zoo's nets from `state`: held `[in, out]`, so its forward pass is `x @ W^T`
/// with `W^T` as stored (what every tree was trained with, bit for bit).
fn load_linear<B: Backend>(
    state: &StateDict,
    prefix: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &B::Device,
) -> Result<Linear<B>, StateError> {
    let values = linear_values(state, prefix, d_in, d_out, bias)?;
    Ok(Linear::from_values(values, WeightLayout::InOut, device))
}

/// Writes `{prefix}.weight` `[out, in]` and, if there is one, `{prefix}.bias`.
fn insert_linear(state: &mut StateDict, prefix: &str, values: LinearValues) {
    state.insert(
        format!("{prefix}.weight"),
        HostTensor {
            shape: vec![values.d_out, values.d_in],
            data: values.weight,
        },
    );
    if let Some(bias) = values.bias {
        state.insert(
            format!("{prefix}.bias"),
            HostTensor {
                shape: vec![values.d_out],
                data: bias,
            },
        );
    }
}

/// The values of `layer`, read back from the device.
fn linear_host<B: Backend>(layer: &Linear<B>) -> Result<LinearValues, StateError> {
    layer.values().map_err(StateError::ReadBack)
}

/// Writes `layer` under `prefix` ([`insert_linear`]).
fn save_linear<B: Backend>(
    layer: &Linear<B>,
    state: &mut StateDict,
    prefix: &str,
) -> Result<(), StateError> {
    insert_linear(state, prefix, linear_host(layer)?);
    Ok(())
}

/// HF ViT's `LayerNorm` epsilon.
const NORM_EPS: f64 = 1e-12;

/// A fresh norm's values (`weight` ones, `bias` zeros) into `state` under `prefix`.
fn init_norm(d: usize, state: &mut StateDict, prefix: &str) {
    for (suffix, value) in [("weight", 1.0), ("bias", 0.0)] {
        state.insert(
            format!("{prefix}.{suffix}"),
            HostTensor {
                shape: vec![d],
                data: vec![value; d],
            },
        );
    }
}

/// The norm under `prefix` in `state`, `[d]` each.
fn load_norm<B: Backend>(
    state: &StateDict,
    prefix: &str,
    d: usize,
    device: &B::Device,
) -> Result<LayerNorm<B>, StateError> {
    let [g, b] = ["weight", "bias"].map(|suffix| take(state, &format!("{prefix}.{suffix}"), &[d]));
    let tensor = |t: &HostTensor| Tensor::from_data(TensorData::new(t.data.clone(), [d]), device);
    Ok(LayerNorm::new(tensor(g?), tensor(b?), NORM_EPS))
}

/// `norm`'s values into `state` under `prefix`.
fn save_norm<B: Backend>(
    norm: &LayerNorm<B>,
    state: &mut StateDict,
    prefix: &str,
) -> Result<(), StateError> {
    let d = norm.d();
    for (suffix, t) in [("weight", &norm.gamma), ("bias", &norm.beta)] {
        state.insert(
            format!("{prefix}.{suffix}"),
            HostTensor {
                shape: vec![d],
                data: tensor_data(t.val())?,
            },
        );
    }
    Ok(())
}

/// Shape of the MLP classifier.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MlpConfig {
    /// Hidden layer widths. Default `[256, 128]`.
    pub hidden: Vec<usize>,
}

impl Default for MlpConfig {
    fn default() -> Self {
        MlpConfig {
            hidden: vec![256, 128],
        }
    }
}

/// Shape of the ViT classifier (`ViTForImageClassification` without the pooler).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VitConfig {
    /// Patch side in pixels; the image side must be a multiple. Default 4.
    pub patch_size: usize,
    /// Token width. Default 32.
    pub hidden_size: usize,
    /// Encoder layers. Default 2.
    pub layers: usize,
    /// Attention heads; must divide `hidden_size`. Default 2.
    pub heads: usize,
    /// MLP width. Default 64.
    pub intermediate_size: usize,
}

impl Default for VitConfig {
    fn default() -> Self {
        VitConfig {
            patch_size: 4,
            hidden_size: 32,
            layers: 2,
            heads: 2,
            intermediate_size: 64,
        }
    }
}

/// Which classifier a discriminative tree uses, with its shape.
#[derive(Clone, Debug, PartialEq)]
pub enum Arch {
    /// Fully connected ReLU network over the flattened image.
    Mlp(MlpConfig),
    /// Vision transformer over `patch_size` patches.
    Vit(VitConfig),
}

impl Arch {
    /// The `architecture` metadata value.
    pub fn name(&self) -> &'static str {
        match self {
            Arch::Mlp(_) => "mlp",
            Arch::Vit(_) => "vit",
        }
    }

    /// Length of one input vector for images of side `size` (CHW for the MLP, patches for ViT).
    pub fn input_len(&self, size: usize) -> usize {
        3 * size * size
    }

    /// A fresh classifier state dict with `classes` outputs.
    pub fn init(&self, size: usize, classes: usize, rng: &mut StreamRng) -> StateDict {
        let mut s = StateDict::new();
        match self {
            Arch::Mlp(c) => {
                let mut d_in = 3 * size * size;
                for (i, &h) in c.hidden.iter().enumerate() {
                    let layer = LinearValues::torch_init(d_in, h, true, rng);
                    insert_linear(&mut s, &format!("mlp.encoder.layer.{i}.dense"), layer);
                    d_in = h;
                }
                self.init_head(&mut s, classes, rng);
            }
            Arch::Vit(c) => {
                let d = c.hidden_size;
                let p = c.patch_size;
                let tokens = (size / p) * (size / p) + 1;
                insert_linear(&mut s, PATCH, LinearValues::hf_init(3 * p * p, d, rng));
                // Hugging Face's patch projection is a conv: the same values as `[d, 3, p, p]`.
                if let Some(w) = s.get_mut(&format!("{PATCH}.weight")) {
                    w.shape = vec![d, 3, p, p];
                }
                s.insert(
                    "vit.embeddings.cls_token".into(),
                    HostTensor {
                        shape: vec![1, 1, d],
                        data: (0..d).map(|_| 0.02 * rng.normal()).collect(),
                    },
                );
                s.insert(
                    "vit.embeddings.position_embeddings".into(),
                    HostTensor {
                        shape: vec![1, tokens, d],
                        data: (0..tokens * d).map(|_| 0.02 * rng.normal()).collect(),
                    },
                );
                for l in 0..c.layers {
                    let pre = format!("vit.encoder.layer.{l}");
                    for (name, d_in, d_out) in [
                        ("attention.attention.query", d, d),
                        ("attention.attention.key", d, d),
                        ("attention.attention.value", d, d),
                        ("attention.output.dense", d, d),
                        ("intermediate.dense", d, c.intermediate_size),
                        ("output.dense", c.intermediate_size, d),
                    ] {
                        let layer = LinearValues::hf_init(d_in, d_out, rng);
                        insert_linear(&mut s, &format!("{pre}.{name}"), layer);
                    }
                    init_norm(d, &mut s, &format!("{pre}.layernorm_before"));
                    init_norm(d, &mut s, &format!("{pre}.layernorm_after"));
                }
                init_norm(d, &mut s, "vit.layernorm");
                self.init_head(&mut s, classes, rng);
            }
        }
        s
    }

    /// Replaces `classifier.*` with a fresh head of `classes` outputs, as fine-tuning a
    /// pretrained model on a new label set does (`ignore_mismatched_sizes`).
    pub fn init_head(&self, state: &mut StateDict, classes: usize, rng: &mut StreamRng) {
        let head = match self {
            Arch::Mlp(c) => {
                let d = c.hidden.last().copied().unwrap_or(0);
                LinearValues::torch_init(d, classes, true, rng)
            }
            Arch::Vit(c) => LinearValues::hf_init(c.hidden_size, classes, rng),
        };
        insert_linear(state, "classifier", head);
    }

    /// Rearranges one CHW image (`3 x size x size`) into the network's input vector.
    pub fn layout_input(&self, chw: &[f32], size: usize, out: &mut [f32]) {
        match self {
            Arch::Mlp(_) => out.copy_from_slice(chw),
            Arch::Vit(c) => {
                // Patch vectors ordered (channel, row, column), matching the conv weight
                // `[hidden, 3, p, p]` flattened row-major.
                let p = c.patch_size;
                let per_side = size / p;
                let mut k = 0;
                for py in 0..per_side {
                    for px in 0..per_side {
                        for ch in 0..3 {
                            for y in 0..p {
                                for x in 0..p {
                                    out[k] =
                                        chw[ch * size * size + (py * p + y) * size + px * p + x];
                                    k += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// MLP classifier: `mlp.encoder.layer.N.dense` (ReLU after each) then `classifier`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// Hidden layers.
    pub layers: Vec<Linear<B>>,
    /// Output layer.
    pub head: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    /// Builds the network from a state dict made by [`Arch::init`] (or a fine-tune of one).
    pub fn load(
        c: &MlpConfig,
        size: usize,
        classes: usize,
        state: &StateDict,
        device: &B::Device,
    ) -> Result<Self, StateError> {
        let mut d_in = 3 * size * size;
        let mut layers = Vec::new();
        for (i, &h) in c.hidden.iter().enumerate() {
            layers.push(load_linear(
                state,
                &format!("mlp.encoder.layer.{i}.dense"),
                d_in,
                h,
                true,
                device,
            )?);
            d_in = h;
        }
        let head = load_linear(state, "classifier", d_in, classes, true, device)?;
        Ok(Mlp { layers, head })
    }

    /// The state dict under Hugging Face-style names.
    pub fn state(&self) -> Result<StateDict, StateError> {
        let mut s = StateDict::new();
        for (i, l) in self.layers.iter().enumerate() {
            save_linear(l, &mut s, &format!("mlp.encoder.layer.{i}.dense"))?;
        }
        save_linear(&self.head, &mut s, "classifier")?;
        Ok(s)
    }

    /// Logits `[n, classes]` for inputs `[n, 3*size*size]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let mut h = x;
        for l in &self.layers {
            h = activation::relu(l.forward(h));
        }
        self.head.forward(h)
    }
}

/// One pre-norm transformer block with Hugging Face ViT names.
#[derive(Module, Debug)]
pub struct VitBlock<B: Backend> {
    ln_before: LayerNorm<B>,
    query: Linear<B>,
    key: Linear<B>,
    value: Linear<B>,
    attn_out: Linear<B>,
    ln_after: LayerNorm<B>,
    intermediate: Linear<B>,
    output: Linear<B>,
}

/// ViT classifier (`ViTForImageClassification`): patch embedding, CLS token, position
/// embeddings, pre-norm blocks, final layer norm, classifier on the CLS token.
#[derive(Module, Debug)]
pub struct Vit<B: Backend> {
    patch: Linear<B>,
    cls: Param<Tensor<B, 3>>,
    pos: Param<Tensor<B, 3>>,
    blocks: Vec<VitBlock<B>>,
    ln: LayerNorm<B>,
    head: Linear<B>,
    heads: usize,
}

impl<B: Backend> Vit<B> {
    /// Builds the network from a state dict made by [`Arch::init`] (or a fine-tune of one).
    pub fn load(
        c: &VitConfig,
        size: usize,
        classes: usize,
        state: &StateDict,
        device: &B::Device,
    ) -> Result<Self, StateError> {
        let d = c.hidden_size;
        let p = c.patch_size;
        let tokens = (size / p) * (size / p) + 1;
        let proj = take(state, &format!("{PATCH}.weight"), &[d, 3, p, p])?;
        let patch = LinearValues {
            d_in: 3 * p * p,
            d_out: d,
            weight: proj.data.clone(),
            bias: Some(take(state, &format!("{PATCH}.bias"), &[d])?.data.clone()),
        };
        let patch = Linear::from_values(patch, WeightLayout::InOut, device);
        let cls = take(state, "vit.embeddings.cls_token", &[1, 1, d])?;
        let pos = take(state, "vit.embeddings.position_embeddings", &[1, tokens, d])?;
        let mut blocks = Vec::new();
        for l in 0..c.layers {
            let pre = format!("vit.encoder.layer.{l}");
            let i = c.intermediate_size;
            blocks.push(VitBlock {
                ln_before: load_norm(state, &format!("{pre}.layernorm_before"), d, device)?,
                query: load_linear(
                    state,
                    &format!("{pre}.attention.attention.query"),
                    d,
                    d,
                    true,
                    device,
                )?,
                key: load_linear(
                    state,
                    &format!("{pre}.attention.attention.key"),
                    d,
                    d,
                    true,
                    device,
                )?,
                value: load_linear(
                    state,
                    &format!("{pre}.attention.attention.value"),
                    d,
                    d,
                    true,
                    device,
                )?,
                attn_out: load_linear(
                    state,
                    &format!("{pre}.attention.output.dense"),
                    d,
                    d,
                    true,
                    device,
                )?,
                ln_after: load_norm(state, &format!("{pre}.layernorm_after"), d, device)?,
                intermediate: load_linear(
                    state,
                    &format!("{pre}.intermediate.dense"),
                    d,
                    i,
                    true,
                    device,
                )?,
                output: load_linear(state, &format!("{pre}.output.dense"), i, d, true, device)?,
            });
        }
        Ok(Vit {
            patch,
            cls: Param::from_tensor(Tensor::from_data(
                TensorData::new(cls.data.clone(), [1, 1, d]),
                device,
            )),
            pos: Param::from_tensor(Tensor::from_data(
                TensorData::new(pos.data.clone(), [1, tokens, d]),
                device,
            )),
            blocks,
            ln: load_norm(state, "vit.layernorm", d, device)?,
            head: load_linear(state, "classifier", d, classes, true, device)?,
            heads: c.heads,
        })
    }

    /// The state dict under Hugging Face ViT names and layouts.
    pub fn state(&self) -> Result<StateDict, StateError> {
        let mut s = StateDict::new();
        let d = self.patch.d_out();
        let p = ((self.patch.d_in() / 3) as f64).sqrt().round() as usize;
        insert_linear(&mut s, PATCH, linear_host(&self.patch)?);
        // Hugging Face's patch projection is a conv: the same values as `[d, 3, p, p]`.
        if let Some(w) = s.get_mut(&format!("{PATCH}.weight")) {
            w.shape = vec![d, 3, p, p];
        }
        let cls = self.cls.val();
        let pos = self.pos.val();
        let pos_dims = pos.dims();
        s.insert(
            "vit.embeddings.cls_token".into(),
            HostTensor {
                shape: vec![1, 1, d],
                data: tensor_data(cls)?,
            },
        );
        s.insert(
            "vit.embeddings.position_embeddings".into(),
            HostTensor {
                shape: pos_dims.to_vec(),
                data: tensor_data(pos)?,
            },
        );
        for (l, b) in self.blocks.iter().enumerate() {
            let pre = format!("vit.encoder.layer.{l}");
            save_norm(&b.ln_before, &mut s, &format!("{pre}.layernorm_before"))?;
            save_linear(
                &b.query,
                &mut s,
                &format!("{pre}.attention.attention.query"),
            )?;
            save_linear(&b.key, &mut s, &format!("{pre}.attention.attention.key"))?;
            save_linear(
                &b.value,
                &mut s,
                &format!("{pre}.attention.attention.value"),
            )?;
            save_linear(
                &b.attn_out,
                &mut s,
                &format!("{pre}.attention.output.dense"),
            )?;
            save_norm(&b.ln_after, &mut s, &format!("{pre}.layernorm_after"))?;
            save_linear(
                &b.intermediate,
                &mut s,
                &format!("{pre}.intermediate.dense"),
            )?;
            save_linear(&b.output, &mut s, &format!("{pre}.output.dense"))?;
        }
        save_norm(&self.ln, &mut s, "vit.layernorm")?;
        save_linear(&self.head, &mut s, "classifier")?;
        Ok(s)
    }

    /// Logits `[n, classes]` for patch inputs `[n, tokens * 3*p*p]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let heads = self.heads.max(1);
        let [n, _] = x.dims();
        let (pd, d) = (self.patch.d_in(), self.patch.d_out());
        let t = self.pos.val().dims()[1];
        let emb = self
            .patch
            .forward(x.reshape([n * (t - 1), pd]))
            .reshape([n, t - 1, d]);
        let cls = self.cls.val().repeat_dim(0, n);
        let tokens = Tensor::cat(vec![cls, emb], 1).reshape([n, t * d]);
        let mut h = (tokens + self.pos.val().reshape([1, t * d])).reshape([n * t, d]);
        let dh = d / heads;
        let scale = 1.0 / (dh as f64).sqrt();
        for b in &self.blocks {
            let a = b.ln_before.forward(h.clone());
            // Per head: project with that head's rows of the query/key/value weights.
            let project = |layer: &Linear<B>, off: usize| layer.forward_outputs(a.clone(), off, dh);
            let mut ctx = Vec::with_capacity(heads);
            for head in 0..heads {
                let off = head * dh;
                let q = project(&b.query, off).reshape([n, t, dh]);
                let k = project(&b.key, off).reshape([n, t, dh]);
                let v = project(&b.value, off).reshape([n, t, dh]);
                let scores = q.matmul(k.swap_dims(1, 2)).mul_scalar(scale);
                let att = activation::softmax(scores.reshape([n * t, t]), 1).reshape([n, t, t]);
                ctx.push(att.matmul(v).reshape([n * t, dh]));
            }
            let ctx = if heads == 1 {
                ctx.remove(0)
            } else {
                Tensor::cat(ctx, 1)
            };
            h = h + b.attn_out.forward(ctx);
            let m = b.ln_after.forward(h.clone());
            h = h + b
                .output
                .forward(activation::gelu(b.intermediate.forward(m)));
        }
        let h = self.ln.forward(h);
        // The CLS token is the first of each sample's `t` rows.
        let cls_out = h.reshape([n, t * d]).narrow(1, 0, d);
        self.head.forward(cls_out)
    }
}

/// Shape of the denoising MLP that LoRA trees adapt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DenoiserConfig {
    /// Encoder widths; the decoder mirrors them. Default `[256, 64]`.
    pub hidden: Vec<usize>,
}

impl Default for DenoiserConfig {
    fn default() -> Self {
        DenoiserConfig {
            hidden: vec![256, 64],
        }
    }
}

impl DenoiserConfig {
    /// The full shape for images of side `size`, reading text vectors of `text_dim` values
    /// (0: not text-conditioned).
    pub fn shape(&self, size: usize, text_dim: usize) -> DenoiserShape {
        DenoiserShape {
            hidden: self.hidden.clone(),
            size,
            text_dim,
        }
    }
}

/// Everything that fixes a denoiser's tensors: the configured widths, the image side and the
/// width of the text vector it reads (0 when it reads none).
#[derive(Clone, Debug, PartialEq)]
pub struct DenoiserShape {
    /// Encoder widths; the decoder mirrors them.
    pub hidden: Vec<usize>,
    /// Image side in pixels.
    pub size: usize,
    /// Text vector width; 0 for an unconditioned denoiser.
    pub text_dim: usize,
}

impl DenoiserShape {
    /// Block names in forward order, diffusers style (`unet.down_blocks.0`).
    fn blocks(&self) -> Vec<String> {
        let n = self.hidden.len();
        (0..n)
            .map(|i| format!("unet.down_blocks.{i}"))
            .chain((0..n).map(|i| format!("unet.up_blocks.{i}")))
            .collect()
    }

    /// `(name, in, out)` of each image layer, in forward order. Names follow the diffusers
    /// UNet convention so LoRA keys read `unet.down_blocks.0.proj.lora.down.weight`.
    pub fn layers(&self) -> Vec<(String, usize, usize)> {
        let mut widths = vec![3 * self.size * self.size];
        widths.extend(self.hidden.iter().copied());
        let n = self.hidden.len();
        let dims = (0..n)
            .map(|i| (widths[i], widths[i + 1]))
            .chain((0..n).map(|i| (widths[n - i], widths[n - i - 1])));
        self.blocks()
            .into_iter()
            .zip(dims)
            .map(|(block, (i, o))| (format!("{block}.proj"), i, o))
            .collect()
    }

    /// `(name, text_dim, out)` of each block's text layer, in forward order; none when
    /// unconditioned. SD's blocks read the prompt through cross-attention; with one pooled
    /// text vector as the only key, attention weights are all 1 and cross-attention reduces
    /// to its value projection, so each block's text layer is SD's `attn2.to_v` (bias-free),
    /// its output added to the block's.
    pub fn text_layers(&self) -> Vec<(String, usize, usize)> {
        if self.text_dim == 0 {
            return Vec::new();
        }
        self.blocks()
            .into_iter()
            .zip(self.layers())
            .map(|(block, (_, _, o))| (format!("{block}.attn2.to_v"), self.text_dim, o))
            .collect()
    }

    /// Every layer a LoRA adapts: the image layers, then the text layers.
    pub fn adapted(&self) -> Vec<(String, usize, usize)> {
        let mut all = self.layers();
        all.extend(self.text_layers());
        all
    }

    /// A fresh denoiser state dict.
    pub fn init(&self, rng: &mut StreamRng) -> StateDict {
        let mut s = StateDict::new();
        for (name, d_in, d_out) in self.layers() {
            insert_linear(
                &mut s,
                &name,
                LinearValues::torch_init(d_in, d_out, true, rng),
            );
        }
        for (name, d_in, d_out) in self.text_layers() {
            // Bias-free, but a bias is drawn (and dropped) all the same: the trees' draws.
            let layer = LinearValues::torch_init(d_in, d_out, true, rng);
            let layer = LinearValues {
                bias: None,
                ..layer
            };
            insert_linear(&mut s, &name, layer);
        }
        s
    }
}

/// The denoising MLP: ReLU between layers, linear output (predicts the clean image). A
/// text-conditioned one adds each block's text layer applied to the prompt's vector.
#[derive(Module, Debug)]
pub struct Denoiser<B: Backend> {
    /// Image layers in forward order.
    pub layers: Vec<Linear<B>>,
    /// Per block, `attn2.to_v` (bias-free); empty when unconditioned.
    pub text: Vec<Linear<B>>,
}

impl<B: Backend> Denoiser<B> {
    /// Builds the network from a state dict.
    pub fn load(
        shape: &DenoiserShape,
        state: &StateDict,
        device: &B::Device,
    ) -> Result<Self, StateError> {
        let layers = shape
            .layers()
            .iter()
            .map(|(name, i, o)| load_linear(state, name, *i, *o, true, device))
            .collect::<Result<_, _>>()?;
        let text = shape
            .text_layers()
            .iter()
            .map(|(name, i, o)| load_linear(state, name, *i, *o, false, device))
            .collect::<Result<_, _>>()?;
        Ok(Denoiser { layers, text })
    }

    /// The state dict under the layer names of [`DenoiserShape::layers`] and
    /// [`DenoiserShape::text_layers`].
    pub fn state(&self, shape: &DenoiserShape) -> Result<StateDict, StateError> {
        let mut s = StateDict::new();
        for ((name, _, _), l) in shape.layers().iter().zip(&self.layers) {
            save_linear(l, &mut s, name)?;
        }
        for ((name, _, _), l) in shape.text_layers().iter().zip(&self.text) {
            save_linear(l, &mut s, name)?;
        }
        Ok(s)
    }

    /// Denoised images `[n, 3*size*size]` from noisy ones; `text` is `[n, text_dim]`, each
    /// image's prompt vector, and is ignored by an unconditioned denoiser.
    pub fn forward(&self, x: Tensor<B, 2>, text: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
        let last = self.layers.len().saturating_sub(1);
        let mut h = x;
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(h);
            if let (Some(t), Some(w)) = (&text, self.text.get(i)) {
                h = h + w.forward(t.clone());
            }
            if i < last {
                h = activation::relu(h);
            }
        }
        h
    }
}

/// Rank-r adapters for every denoiser layer: `W x + B (A x)`, `A` `[r, in]` (`lora.down`),
/// `B` `[out, r]` (`lora.up`), no alpha scaling (ProbeX reads `B @ A` as is). Only these
/// are trained; the base layers are frozen.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// Per layer: `A` stored transposed as `[in, r]` for Burn.
    pub down: Vec<Param<Tensor<B, 2>>>,
    /// Per layer: `B` stored transposed as `[r, out]` for Burn.
    pub up: Vec<Param<Tensor<B, 2>>>,
}

impl<B: Backend> Lora<B> {
    /// Fresh adapters as peft/diffusers initialise them: `A` random, `B` zero, so training
    /// starts from the base model exactly. Every layer of [`DenoiserShape::adapted`] gets one.
    pub fn init(
        shape: &DenoiserShape,
        rank: usize,
        rng: &mut StreamRng,
        device: &B::Device,
    ) -> Self {
        let mut down = Vec::new();
        let mut up = Vec::new();
        for (_, d_in, d_out) in shape.adapted() {
            let bound = 1.0 / (d_in as f32).sqrt();
            let a: Vec<f32> = (0..d_in * rank).map(|_| rng.range(-bound, bound)).collect();
            down.push(Param::from_tensor(Tensor::from_data(
                TensorData::new(a, [d_in, rank]),
                device,
            )));
            up.push(Param::from_tensor(Tensor::zeros([rank, d_out], device)));
        }
        Lora { down, up }
    }

    /// The adapters under diffusers names: `{layer}.lora.down.weight` `[r, in]` and
    /// `{layer}.lora.up.weight` `[out, r]`.
    pub fn state(&self, shape: &DenoiserShape) -> Result<StateDict, StateError> {
        let mut s = StateDict::new();
        for (((name, d_in, d_out), a), b) in shape.adapted().iter().zip(&self.down).zip(&self.up) {
            let r = a.val().dims()[1];
            s.insert(
                format!("{name}.lora.down.weight"),
                HostTensor {
                    shape: vec![r, *d_in],
                    data: transpose(&tensor_data(a.val())?, *d_in, r),
                },
            );
            s.insert(
                format!("{name}.lora.up.weight"),
                HostTensor {
                    shape: vec![*d_out, r],
                    data: transpose(&tensor_data(b.val())?, r, *d_out),
                },
            );
        }
        Ok(s)
    }

    /// The adapted denoiser's output; `base` is frozen (its tensors carry no gradient). `text`
    /// as in [`Denoiser::forward`].
    pub fn forward(
        &self,
        base: &Denoiser<B>,
        x: Tensor<B, 2>,
        text: Option<Tensor<B, 2>>,
    ) -> Tensor<B, 2> {
        let n = base.layers.len();
        let last = n.saturating_sub(1);
        let low = |i: usize, h: Tensor<B, 2>| h.matmul(self.down[i].val()).matmul(self.up[i].val());
        let mut h = x;
        for (i, l) in base.layers.iter().enumerate() {
            h = l.forward(h.clone()) + low(i, h);
            if let (Some(t), Some(w)) = (&text, base.text.get(i)) {
                h = h + w.forward(t.clone()) + low(n + i, t.clone());
            }
            if i < last {
                h = activation::relu(h);
            }
        }
        h
    }
}
