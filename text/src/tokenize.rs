//! Tokenisation with the Hugging Face `tokenizers` crate, reading the `tokenizer.json` shipped
//! beside a model. Padding is done by the encoders (each knows its pad id and mask), so the
//! file's own padding settings are switched off; truncation is set to the model's limit.

use std::path::{Path, PathBuf};

use anyhow::bail;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

/// A loaded `tokenizer.json` that turns texts into id sequences with the model's special tokens.
pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    max_len: usize,
}

impl TextTokenizer {
    /// Loads `path`, truncating every sequence (special tokens included) to `max_len` tokens.
    pub fn from_file(path: &Path, max_len: usize) -> anyhow::Result<TextTokenizer> {
        let mut inner = Tokenizer::from_file(path).map_err(|e| {
            anyhow::anyhow!(
                "{}: cannot load the tokenizer: {e} (expected a Hugging Face tokenizer.json)",
                path.display()
            )
        })?;
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| anyhow::anyhow!("{}: setting truncation: {e}", path.display()))?;
        Ok(TextTokenizer {
            inner,
            path: path.to_path_buf(),
            max_len,
        })
    }

    /// The longest sequence produced, special tokens included.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The id of `token` in the vocabulary, if present.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Ids of `text` with the special tokens of the file's post-processor.
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| {
            anyhow::anyhow!("{}: cannot tokenise {text:?}: {e}", self.path.display())
        })?;
        let ids = enc.get_ids().to_vec();
        if ids.is_empty() {
            bail!("{}: {text:?} tokenises to nothing", self.path.display());
        }
        Ok(ids)
    }

    /// [`TextTokenizer::encode`] for every text.
    pub fn encode_all(&self, texts: &[String]) -> anyhow::Result<Vec<Vec<u32>>> {
        texts.iter().map(|t| self.encode(t)).collect()
    }
}
