//! Model-J's architectures at their real tensor names and shapes, and a writer that makes
//! safetensors files of them with pseudo-random values: test and benchmark models that read like
//! the real ones (same names, shapes, dtypes and metadata) without downloading any.
//!
//! - [`vit`] / [`vit_b16`]: Hugging Face `ViTForImageClassification` (SupViT, DINO and MAE in
//!   Model-J are all fine-tuned ViT-B/16s): 200 tensors at ViT-B/16, biases, layer norms,
//!   `cls_token` and the patch convolution included.
//! - [`resnet`] / [`resnet101`]: Hugging Face `ResNetForImageClassification` with bottleneck
//!   blocks: convolutions, batch norms with their running statistics and `num_batches_tracked`
//!   (an `I64` scalar, as PyTorch's `state_dict` has it), and the classifier.
//! - [`sd1_lora`]: a diffusers LoRA of Stable Diffusion 1.x's UNet attention (what Model-J's
//!   SD_200 and SD_1k files hold): 128 `lora.down` / `lora.up` pairs.
//!
//! [`write_safetensors`] streams a file (a ViT-B/16 in f32 is ~343 MB, written without holding
//! more than a small buffer); [`header`] gives the header such a file would have without writing
//! it, for tests that only need names and shapes.
//!
//! The values are noise (uniform in `[-0.05, 0.05)`), not a trained model: what these files
//! are good for is layer lists, I/O and scale, not accuracy.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;

/// The element type of a tensor (re-exported so callers need no `safetensors` dependency).
pub use safetensors::Dtype;

use crate::Header;
use crate::rng::Rng;

/// One tensor of a generated model: its name and shape, and its dtype when it is not the
/// file's (`num_batches_tracked` is `I64` in a float file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name, exactly as the real model's state dict has it.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// The dtype when it is fixed by the model (`Some(Dtype::I64)` for a counter); `None`: the
    /// dtype the file is written in.
    pub dtype: Option<Dtype>,
}

impl TensorSpec {
    /// A weight in the file's dtype.
    pub fn new(name: impl Into<String>, shape: &[usize]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            shape: shape.to_vec(),
            dtype: None,
        }
    }

    /// Elements in the tensor.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A Hugging Face ViT (`ViTForImageClassification`) configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VitConfig {
    /// Hidden size (768 for ViT-B).
    pub hidden: usize,
    /// Encoder blocks (12 for ViT-B).
    pub blocks: usize,
    /// MLP size (3072 for ViT-B).
    pub intermediate: usize,
    /// Patch side (16).
    pub patch: usize,
    /// Image side (224).
    pub image: usize,
    /// Input channels (3).
    pub channels: usize,
    /// Classifier outputs.
    pub classes: usize,
}

impl VitConfig {
    /// ViT-B/16 at 224 pixels (google/vit-base-patch16-224, facebook/dino-vitb16,
    /// facebook/vit-mae-base) with a `classes`-way head.
    pub fn b16(classes: usize) -> VitConfig {
        VitConfig {
            hidden: 768,
            blocks: 12,
            intermediate: 3072,
            patch: 16,
            image: 224,
            channels: 3,
            classes,
        }
    }
}

/// Every tensor of a `ViTForImageClassification` with configuration `c`, sorted by name.
pub fn vit(c: &VitConfig) -> Vec<TensorSpec> {
    let (h, m) = (c.hidden, c.intermediate);
    let tokens = (c.image / c.patch.max(1)).pow(2) + 1;
    let mut out = vec![
        TensorSpec::new("classifier.bias", &[c.classes]),
        TensorSpec::new("classifier.weight", &[c.classes, h]),
        TensorSpec::new("vit.embeddings.cls_token", &[1, 1, h]),
        TensorSpec::new("vit.embeddings.position_embeddings", &[1, tokens, h]),
        TensorSpec::new(
            "vit.embeddings.patch_embeddings.projection.weight",
            &[h, c.channels, c.patch, c.patch],
        ),
        TensorSpec::new("vit.embeddings.patch_embeddings.projection.bias", &[h]),
        TensorSpec::new("vit.layernorm.weight", &[h]),
        TensorSpec::new("vit.layernorm.bias", &[h]),
    ];
    for b in 0..c.blocks {
        let p = format!("vit.encoder.layer.{b}");
        for (name, shape) in [
            ("attention.attention.query", [h, h]),
            ("attention.attention.key", [h, h]),
            ("attention.attention.value", [h, h]),
            ("attention.output.dense", [h, h]),
            ("intermediate.dense", [m, h]),
            ("output.dense", [h, m]),
        ] {
            out.push(TensorSpec::new(format!("{p}.{name}.weight"), &shape));
            out.push(TensorSpec::new(format!("{p}.{name}.bias"), &shape[..1]));
        }
        for norm in ["layernorm_before", "layernorm_after"] {
            out.push(TensorSpec::new(format!("{p}.{norm}.weight"), &[h]));
            out.push(TensorSpec::new(format!("{p}.{norm}.bias"), &[h]));
        }
    }
    sorted(out)
}

/// ViT-B/16 with a `classes`-way head: 200 tensors, 86M weights (~343 MB in f32).
pub fn vit_b16(classes: usize) -> Vec<TensorSpec> {
    vit(&VitConfig::b16(classes))
}

/// A Hugging Face ResNet (`ResNetForImageClassification`, bottleneck blocks) configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResnetConfig {
    /// Channels out of the stem (64).
    pub embedding: usize,
    /// Channels out of each stage ([256, 512, 1024, 2048]).
    pub hidden_sizes: Vec<usize>,
    /// Bottleneck blocks per stage ([3, 4, 23, 3] for ResNet-101).
    pub depths: Vec<usize>,
    /// Input channels (3).
    pub channels: usize,
    /// Classifier outputs.
    pub classes: usize,
}

impl ResnetConfig {
    /// ResNet-101 (microsoft/resnet-101) with a `classes`-way head.
    pub fn resnet101(classes: usize) -> ResnetConfig {
        ResnetConfig {
            embedding: 64,
            hidden_sizes: vec![256, 512, 1024, 2048],
            depths: vec![3, 4, 23, 3],
            channels: 3,
            classes,
        }
    }
}

/// Every tensor of a `ResNetForImageClassification` with configuration `c`, sorted by name.
///
/// As Hugging Face builds it: a 7x7 stem convolution; each stage's first bottleneck has a 1x1
/// shortcut convolution (its channels or stride change); a bottleneck is 1x1 (to a quarter of
/// the stage's channels), 3x3, 1x1 convolutions, each followed by a batch norm; convolutions
/// have no bias; the head is `classifier.1` (after a `Flatten`).
pub fn resnet(c: &ResnetConfig) -> Vec<TensorSpec> {
    let mut out = Vec::new();
    let mut conv = |prefix: &str, out_ch: usize, in_ch: usize, k: usize| {
        out.push(TensorSpec::new(
            format!("{prefix}.convolution.weight"),
            &[out_ch, in_ch, k, k],
        ));
        for stat in ["weight", "bias", "running_mean", "running_var"] {
            out.push(TensorSpec::new(
                format!("{prefix}.normalization.{stat}"),
                &[out_ch],
            ));
        }
        out.push(TensorSpec {
            name: format!("{prefix}.normalization.num_batches_tracked"),
            shape: Vec::new(),
            dtype: Some(Dtype::I64),
        });
    };
    conv("resnet.embedder.embedder", c.embedding, c.channels, 7);
    let mut in_ch = c.embedding;
    for (s, (&width, &depth)) in c.hidden_sizes.iter().zip(&c.depths).enumerate() {
        let reduced = width / 4;
        for l in 0..depth {
            let p = format!("resnet.encoder.stages.{s}.layers.{l}");
            let block_in = if l == 0 { in_ch } else { width };
            // Stage 0 keeps the resolution but widens 64 -> 256; the others halve it.
            if l == 0 {
                conv(&format!("{p}.shortcut"), width, block_in, 1);
            }
            conv(&format!("{p}.layer.0"), reduced, block_in, 1);
            conv(&format!("{p}.layer.1"), reduced, reduced, 3);
            conv(&format!("{p}.layer.2"), width, reduced, 1);
        }
        in_ch = width;
    }
    out.push(TensorSpec::new("classifier.1.weight", &[c.classes, in_ch]));
    out.push(TensorSpec::new("classifier.1.bias", &[c.classes]));
    sorted(out)
}

/// ResNet-101 with a `classes`-way head: 626 tensors, 105 of them the convolutions and the head.
pub fn resnet101(classes: usize) -> Vec<TensorSpec> {
    resnet(&ResnetConfig::resnet101(classes))
}

/// The attention blocks of Stable Diffusion 1.x's UNet and their channels: two per down block
/// with attention, one in the middle, three per up block with attention.
fn sd1_attention_blocks() -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for (b, ch) in [(0, 320), (1, 640), (2, 1280)] {
        for a in 0..2 {
            out.push((format!("unet.down_blocks.{b}.attentions.{a}"), ch));
        }
    }
    out.push(("unet.mid_block.attentions.0".into(), 1280));
    for (b, ch) in [(1, 1280), (2, 640), (3, 320)] {
        for a in 0..3 {
            out.push((format!("unet.up_blocks.{b}.attentions.{a}"), ch));
        }
    }
    out
}

/// The text encoder's width SD1.x cross-attends to (CLIP ViT-L/14): the input of `attn2.to_k`
/// and `attn2.to_v`.
pub const SD1_CROSS_ATTENTION_DIM: usize = 768;

/// Every tensor of a rank-`rank` diffusers LoRA of SD1.x's UNet attention, sorted by name: for
/// each of the 16 transformer blocks, `attn1` (self) and `attn2` (cross) x `to_q`, `to_k`,
/// `to_v`, `to_out.0`, each a `lora.down.weight` `[rank, in]` and a `lora.up.weight`
/// `[out, rank]`; `attn2.to_k` and `attn2.to_v` read the 768-wide text states. 256 tensors.
pub fn sd1_lora(rank: usize) -> Vec<TensorSpec> {
    let mut out = Vec::new();
    for (block, ch) in sd1_attention_blocks() {
        for attn in ["attn1", "attn2"] {
            for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
                let cross = attn == "attn2" && (proj == "to_k" || proj == "to_v");
                let input = if cross { SD1_CROSS_ATTENTION_DIM } else { ch };
                let p = format!("{block}.transformer_blocks.0.{attn}.{proj}");
                out.push(TensorSpec::new(
                    format!("{p}.lora.down.weight"),
                    &[rank, input],
                ));
                out.push(TensorSpec::new(format!("{p}.lora.up.weight"), &[ch, rank]));
            }
        }
    }
    sorted(out)
}

fn sorted(mut v: Vec<TensorSpec>) -> Vec<TensorSpec> {
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// The floating-point dtypes [`write_safetensors`] can write values in.
fn check_float(dtype: Dtype) -> io::Result<()> {
    match dtype {
        Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64 => Ok(()),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("generated weights are F32, F16, BF16 or F64, not {other:?}"),
        )),
    }
}

fn bytes_per(dtype: Dtype) -> usize {
    dtype.bitsize() / 8
}

/// The header JSON of a safetensors file of `specs` in `dtype` and the size of its data
/// section, after checking what the shared encoder ([`crate::writer::header_json`])
/// assumes: a float dtype, sizes that fit, unique names.
fn header_json(
    specs: &[TensorSpec],
    dtype: Dtype,
    metadata: &BTreeMap<String, String>,
) -> io::Result<(Vec<u8>, u64)> {
    check_float(dtype)?;
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
    let mut lens = Vec::with_capacity(specs.len());
    let mut names = std::collections::BTreeSet::new();
    for s in specs {
        if !names.insert(s.name.as_str()) {
            return Err(invalid(format!("tensor `{}` is listed twice", s.name)));
        }
        let len = s
            .shape
            .iter()
            .try_fold(bytes_per(s.dtype.unwrap_or(dtype)), |acc, &x| {
                acc.checked_mul(x)
            })
            .ok_or_else(|| {
                invalid(format!(
                    "tensor `{}`: shape {:?} overflows",
                    s.name, s.shape
                ))
            })?;
        lens.push(len);
    }
    let data = lens
        .iter()
        .try_fold(0u64, |acc, &l| acc.checked_add(l as u64))
        .ok_or_else(|| invalid("the tensors' sizes overflow".into()))?;
    let json = crate::writer::header_json(
        specs.iter().zip(&lens).map(|(s, &len)| {
            (
                s.name.as_str(),
                s.dtype.unwrap_or(dtype),
                s.shape.as_slice(),
                len,
            )
        }),
        metadata,
    );
    Ok((json, data))
}

/// The validated header a file of `specs` written by [`write_safetensors`] would have, without
/// writing it: for tests and tools that only need names, dtypes and shapes (a ViT-B header
/// without its 343 MB).
pub fn header(
    specs: &[TensorSpec],
    dtype: Dtype,
    metadata: &BTreeMap<String, String>,
) -> io::Result<Header> {
    let (json, data) = header_json(specs, dtype, metadata)?;
    let file_len = usize::try_from(8 + json.len() as u64 + data)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large"))?;
    crate::reader::parse_header(&json, file_len)
        .map_err(|m| io::Error::new(io::ErrorKind::InvalidData, m))
}

/// Uniform in `[-0.05, 0.05)`, the scale of a trained layer's weights, from probex's one
/// SplitMix64 generator (the same seed gives the same file).
fn weight(rng: &mut Rng) -> f32 {
    (rng.unit_f32() - 0.5) * 0.1
}

/// Writes `specs` as a safetensors file at `path`: floating-point tensors in `dtype` (F32, F16,
/// BF16 or F64) with pseudo-random values from `seed`, integer tensors (their own `dtype`) as
/// zeros, and `metadata` as `__metadata__`. Values are generated and written in chunks, so
/// memory stays small whatever the model. Each tensor's values depend only on `seed` and the
/// tensor's name, so files with the same seed differ only where their tensors do. Returns the
/// bytes written.
pub fn write_safetensors(
    path: &Path,
    specs: &[TensorSpec],
    dtype: Dtype,
    metadata: &BTreeMap<String, String>,
    seed: u64,
) -> io::Result<u64> {
    let file = std::fs::File::create(path)?;
    let mut w = io::BufWriter::with_capacity(1 << 20, file);
    let n = safetensors_to(&mut w, specs, dtype, metadata, seed)?;
    w.flush()?;
    Ok(n)
}

/// Writes the header of a file of `specs` in `dtype` and leaves its data section a hole: a
/// sparse file of the real size whose tensors read as zeros, written in microseconds and
/// taking a few kB of disk. For measuring what reading, hashing or extracting such files
/// costs where the values do not matter (200 ViT-B/16s are 69 GB written out). Returns the
/// file's size.
pub fn write_sparse_safetensors(
    path: &Path,
    specs: &[TensorSpec],
    dtype: Dtype,
    metadata: &BTreeMap<String, String>,
) -> io::Result<u64> {
    let (json, data) = header_json(specs, dtype, metadata)?;
    let mut file = std::fs::File::create(path)?;
    file.write_all(&(json.len() as u64).to_le_bytes())?;
    file.write_all(&json)?;
    let size = 8 + json.len() as u64 + data;
    file.set_len(size)?;
    Ok(size)
}

/// [`write_safetensors`] into any writer (a `Vec<u8>` for a file image held in memory).
pub fn safetensors_to(
    w: &mut impl Write,
    specs: &[TensorSpec],
    dtype: Dtype,
    metadata: &BTreeMap<String, String>,
    seed: u64,
) -> io::Result<u64> {
    let (json, data) = header_json(specs, dtype, metadata)?;
    w.write_all(&(json.len() as u64).to_le_bytes())?;
    w.write_all(&json)?;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
    for s in specs {
        let d = s.dtype.unwrap_or(dtype);
        let name_hash = blake3::hash(s.name.as_bytes());
        let mut first8 = [0u8; 8];
        first8.copy_from_slice(&name_hash.as_bytes()[..8]);
        let mut rng = Rng::from_state(seed ^ u64::from_le_bytes(first8));
        let mut left = s.numel();
        while left > 0 {
            let n = left.min(8192);
            buf.clear();
            for _ in 0..n {
                match d {
                    Dtype::F32 => buf.extend_from_slice(&weight(&mut rng).to_le_bytes()),
                    Dtype::F16 => {
                        buf.extend_from_slice(&half::f16::from_f32(weight(&mut rng)).to_le_bytes())
                    }
                    Dtype::BF16 => {
                        buf.extend_from_slice(&half::bf16::from_f32(weight(&mut rng)).to_le_bytes())
                    }
                    Dtype::F64 => buf.extend_from_slice(&f64::from(weight(&mut rng)).to_le_bytes()),
                    other => buf.extend(std::iter::repeat_n(0u8, bytes_per(other))),
                }
            }
            w.write_all(&buf)?;
            left -= n;
        }
    }
    Ok(8 + json.len() as u64 + data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generated values are pinned: benchmarks and tests compare files made on different
    /// days, so the generator must not change what a seed makes.
    #[test]
    fn generated_values_are_pinned() {
        let meta = BTreeMap::new();
        let mut bytes = Vec::new();
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64] {
            safetensors_to(&mut bytes, &sd1_lora(2)[..4], dtype, &meta, 7).unwrap();
        }
        assert_eq!(
            blake3::hash(&bytes).to_hex().as_str(),
            "656aa23f6d859bc8f6dfb461f1d40c4d96e3f9881e70f7fea8805ba4426943d2"
        );
    }

    fn count(specs: &[TensorSpec], f: impl Fn(&TensorSpec) -> bool) -> usize {
        specs.iter().filter(|s| f(s)).count()
    }

    /// A sparse file has the real file's header and size, and its tensors read as zeros.
    #[test]
    fn sparse_files_have_the_real_header_and_read_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let specs = sd1_lora(4);
        let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let full = write_safetensors(&a, &specs, Dtype::F16, &meta, 1).unwrap();
        let sparse = write_sparse_safetensors(&b, &specs, Dtype::F16, &meta).unwrap();
        assert_eq!(full, sparse);
        assert_eq!(std::fs::metadata(&b).unwrap().len(), sparse);
        let (ha, hb) = (
            crate::reader::read_header(&a).unwrap(),
            crate::reader::read_header(&b).unwrap(),
        );
        assert_eq!(ha.tensors, hb.tensors);
        let bytes = std::fs::read(&b).unwrap();
        assert!(bytes[hb.data_start..].iter().all(|&x| x == 0));
    }

    #[test]
    fn vit_b16_has_hugging_faces_200_tensors_and_86m_weights() {
        let v = vit_b16(100);
        assert_eq!(v.len(), 200);
        let params: usize = v.iter().map(TensorSpec::numel).sum();
        // 85.8M in the backbone (google/vit-base-patch16-224-in21k) plus the 100-way head.
        assert_eq!(params, 85_798_656 + 768 * 100 + 100);
        let shape = |n: &str| v.iter().find(|s| s.name == n).unwrap().shape.clone();
        assert_eq!(
            shape("vit.embeddings.patch_embeddings.projection.weight"),
            [768, 3, 16, 16]
        );
        assert_eq!(shape("vit.embeddings.position_embeddings"), [1, 197, 768]);
        assert_eq!(
            shape("vit.encoder.layer.11.intermediate.dense.weight"),
            [3072, 768]
        );
        assert_eq!(
            shape("vit.encoder.layer.11.output.dense.weight"),
            [768, 3072]
        );
        assert_eq!(shape("classifier.weight"), [100, 768]);
    }

    #[test]
    fn resnet101_has_105_convolutions_and_the_head() {
        let r = resnet101(100);
        assert_eq!(count(&r, |s| s.name.ends_with(".convolution.weight")), 104);
        assert_eq!(count(&r, |s| s.name.ends_with("num_batches_tracked")), 104);
        let params: usize = r
            .iter()
            .filter(|s| s.dtype.is_none() && !s.name.contains("running_"))
            .map(TensorSpec::numel)
            .sum();
        // microsoft/resnet-101: 42.5M trainable weights besides the 1000-way head.
        assert_eq!(params, 42_500_160 + 2048 * 100 + 100);
        let shape = |n: &str| r.iter().find(|s| s.name == n).unwrap().shape.clone();
        assert_eq!(
            shape("resnet.embedder.embedder.convolution.weight"),
            [64, 3, 7, 7]
        );
        assert_eq!(
            shape("resnet.encoder.stages.0.layers.0.shortcut.convolution.weight"),
            [256, 64, 1, 1]
        );
        assert_eq!(
            shape("resnet.encoder.stages.2.layers.19.layer.1.convolution.weight"),
            [256, 256, 3, 3]
        );
        assert_eq!(
            shape("resnet.encoder.stages.3.layers.2.layer.2.convolution.weight"),
            [2048, 512, 1, 1]
        );
        assert_eq!(shape("classifier.1.weight"), [100, 2048]);
    }

    #[test]
    fn sd1_lora_has_128_pairs_at_the_real_widths() {
        let l = sd1_lora(16);
        assert_eq!(l.len(), 256);
        let shape = |n: &str| l.iter().find(|s| s.name == n).unwrap().shape.clone();
        let p = "unet.down_blocks.2.attentions.1.transformer_blocks.0";
        assert_eq!(
            shape(&format!("{p}.attn2.to_q.lora.down.weight")),
            [16, 1280]
        );
        assert_eq!(
            shape(&format!("{p}.attn2.to_k.lora.down.weight")),
            [16, 768]
        );
        assert_eq!(shape(&format!("{p}.attn2.to_v.lora.up.weight")), [1280, 16]);
        let p = "unet.up_blocks.3.attentions.2.transformer_blocks.0";
        assert_eq!(
            shape(&format!("{p}.attn1.to_out.0.lora.up.weight")),
            [320, 16]
        );
        // 3.19M factor values per model at rank 16, as Model-J's SD LoRAs.
        let values: usize = l.iter().map(TensorSpec::numel).sum();
        assert_eq!(values, 3_188_736);
    }

    #[test]
    fn written_files_parse_and_are_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let specs = resnet(&ResnetConfig {
            embedding: 4,
            hidden_sizes: vec![8, 16],
            depths: vec![1, 2],
            channels: 3,
            classes: 5,
        });
        let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let a = dir.path().join("a.safetensors");
        let b = dir.path().join("b.safetensors");
        let n = write_safetensors(&a, &specs, Dtype::F16, &meta, 7).unwrap();
        write_safetensors(&b, &specs, Dtype::F16, &meta, 7).unwrap();
        let bytes = std::fs::read(&a).unwrap();
        assert_eq!(bytes.len() as u64, n);
        assert_eq!(bytes, std::fs::read(&b).unwrap());
        // The reference crate reads it, dtypes and metadata as written.
        let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(m.metadata().as_ref().unwrap()["k"], "v");
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), specs.len());
        let t = st
            .tensor("resnet.embedder.embedder.normalization.num_batches_tracked")
            .unwrap();
        assert_eq!((t.dtype(), t.shape()), (Dtype::I64, &[][..]));
        let w = st.tensor("classifier.1.weight").unwrap();
        assert_eq!(w.dtype(), Dtype::F16);
        let values = crate::dataset::decode(w.dtype(), w.data()).unwrap();
        assert!(values.iter().all(|v| v.abs() <= 0.05) && values.iter().any(|&v| v != 0.0));
        // The header without the file is the file's header.
        let h = header(&specs, Dtype::F16, &meta).unwrap();
        assert_eq!(h, crate::reader::parse_bytes(&bytes).unwrap());
        // Another seed, other values.
        write_safetensors(&b, &specs, Dtype::F16, &meta, 8).unwrap();
        assert_ne!(bytes, std::fs::read(&b).unwrap());
        assert!(write_safetensors(&b, &specs, Dtype::I64, &meta, 8).is_err());
    }
}
