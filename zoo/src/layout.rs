//! Writing zoo models exactly as Model-J stores them.
//!
//! Discriminative trees, one repository per model:
//! - `hf_cache`: `models--ProbeX--Model-J__{Tree}__model_idx_XXXX/` with `refs/main` (the
//!   snapshot id) and `snapshots/<id>/{model.safetensors, config.json}`, as the Hugging Face
//!   cache lays out a downloaded repository;
//! - `splits`: `{split}/Model-J__{Tree}__model_idx_XXXX/{model.safetensors, config.json}`.
//!
//! LoRA trees, one repository for the whole tree (as `ProbeX/Model-J__SD_200`):
//! `{split}/model_idx_XXXX/pytorch_lora_weights.safetensors`, either directly under the output
//! folder (`splits`) or inside `models--ProbeX--Model-J__{Tree}/snapshots/<id>/` (`hf_cache`).
//!
//! Files are byte-for-byte reproducible: tensors sorted by name, metadata keys sorted, no
//! timestamps; snapshot ids are derived from the content.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use probex_engine::cache::hex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ZooError;
use super::nets::StateDict;

/// The owner in Model-J repository ids.
pub const OWNER: &str = "ProbeX";

/// How model files are laid out on disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// Hugging Face cache folders (`models--ProbeX--...`), what a Hub download leaves.
    #[default]
    HfCache,
    /// Plain `{split}/...` folders.
    Splits,
}

/// Serialises tensors (F32, little-endian) and string metadata into a safetensors file image.
/// Tensors are laid out in name order; the header is padded with spaces to a multiple of 8.
pub fn safetensors_bytes(state: &StateDict, metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let json = probex_weights::writer::header_json(
        state.iter().map(|(name, t)| {
            (
                name.as_str(),
                safetensors::Dtype::F32,
                t.shape.as_slice(),
                t.data.len() * 4,
            )
        }),
        metadata,
    );
    let offset: usize = state.values().map(|t| t.data.len() * 4).sum();
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for t in state.values() {
        for v in &t.data {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// `Model-J__{tree}__model_idx_{idx:04}`.
pub fn repo_name(tree: &str, idx: usize) -> String {
    format!("Model-J__{tree}__model_idx_{idx:04}")
}

/// First 40 hex digits of the sha256 of `bytes`: a content-derived snapshot id shaped like a
/// git commit id.
pub fn snapshot_id(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    hex::encode(&digest[..20]).to_string()
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), ZooError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| ZooError::io(parent, e))?;
    }
    fs::write(path, bytes).map_err(|e| ZooError::io(path, e))
}

/// Writes one discriminative model (`model.safetensors` + `config.json`) and returns the path
/// of its `model.safetensors`.
pub fn write_model_repo(
    out_dir: &Path,
    layout: Layout,
    tree: &str,
    idx: usize,
    split: &str,
    weights: &[u8],
    config_json: &[u8],
) -> Result<PathBuf, ZooError> {
    let repo = repo_name(tree, idx);
    let dir = match layout {
        Layout::HfCache => {
            let root = out_dir.join(format!("models--{OWNER}--{repo}"));
            let mut both = weights.to_vec();
            both.extend_from_slice(config_json);
            let id = snapshot_id(&both);
            write(&root.join("refs").join("main"), id.as_bytes())?;
            root.join("snapshots").join(id)
        }
        Layout::Splits => out_dir.join(split).join(repo),
    };
    let model = dir.join("model.safetensors");
    write(&model, weights)?;
    write(&dir.join("config.json"), config_json)?;
    Ok(model)
}

/// Where the files of a LoRA tree go before and after its snapshot id is known.
pub struct LoraRepo {
    layout: Layout,
    root: PathBuf,
    files: BTreeMap<String, Vec<u8>>,
}

impl LoraRepo {
    /// A repository for tree `tree` under `out_dir`.
    pub fn new(out_dir: &Path, layout: Layout, tree: &str) -> LoraRepo {
        let root = match layout {
            Layout::HfCache => out_dir.join(format!("models--{OWNER}--Model-J__{tree}")),
            Layout::Splits => out_dir.to_path_buf(),
        };
        LoraRepo {
            layout,
            root,
            files: BTreeMap::new(),
        }
    }

    /// `{split}/model_idx_{idx:04}/pytorch_lora_weights.safetensors`.
    pub fn rel_path(split: &str, idx: usize) -> String {
        format!("{split}/model_idx_{idx:04}/pytorch_lora_weights.safetensors")
    }

    /// Queues one LoRA file.
    pub fn add(&mut self, rel: String, bytes: Vec<u8>) {
        self.files.insert(rel, bytes);
    }

    /// Writes every queued file; returns the folder holding the `{split}/...` tree.
    pub fn finish(self) -> Result<PathBuf, ZooError> {
        let dir = match self.layout {
            Layout::Splits => self.root.clone(),
            Layout::HfCache => {
                let mut listing = Vec::new();
                for (rel, bytes) in &self.files {
                    listing.extend_from_slice(rel.as_bytes());
                    listing.extend_from_slice(Sha256::digest(bytes).as_slice());
                }
                let id = snapshot_id(&listing);
                write(&self.root.join("refs").join("main"), id.as_bytes())?;
                self.root.join("snapshots").join(id)
            }
        };
        for (rel, bytes) in &self.files {
            write(&dir.join(rel), bytes)?;
        }
        Ok(dir)
    }
}

/// A float as Python's `str()` prints it (`0.001`, `3e-05`, `1.0`), so metadata reads like
/// Model-J's.
pub fn py_float(x: f64) -> String {
    if x == 0.0 {
        return "0.0".into();
    }
    let a = x.abs();
    if !(1e-4..1e16).contains(&a) {
        let s = format!("{x:e}");
        if let Some((mantissa, exp)) = s.split_once('e') {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            return format!("{mantissa}e{sign}{digits:0>2}");
        }
        return s;
    }
    let s = format!("{x}");
    if s.contains('.') { s } else { format!("{s}.0") }
}

/// A boolean as Python prints it.
pub fn py_bool(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}

/// A metric rounded to 4 decimals for metadata (the f32 digits beyond are noise).
pub(crate) fn round4(x: f32) -> f64 {
    (f64::from(x) * 1e4).round() / 1e4
}

/// `path` relative to `out_dir`, with `/` separators, as the index lists it.
pub(crate) fn rel(out_dir: &Path, path: &Path) -> String {
    path.strip_prefix(out_dir)
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

/// Writes `bytes` to `path`, creating its folder.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ZooError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| ZooError::io(parent, e))?;
    }
    std::fs::write(path, bytes).map_err(|e| ZooError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nets::HostTensor;

    #[test]
    fn python_number_formatting() {
        assert_eq!(py_float(0.001), "0.001");
        assert_eq!(py_float(3e-5), "3e-05");
        assert_eq!(py_float(0.0001), "0.0001");
        assert_eq!(py_float(1.0), "1.0");
        assert_eq!(py_float(0.0), "0.0");
        assert_eq!(py_float(0.05), "0.05");
        assert_eq!(py_bool(true), "True");
    }

    #[test]
    fn safetensors_images_parse_with_the_reference_crate() {
        let mut s = StateDict::new();
        s.insert(
            "b.weight".into(),
            HostTensor {
                shape: vec![2, 3],
                data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            },
        );
        s.insert(
            "a.bias".into(),
            HostTensor {
                shape: vec![1],
                data: vec![-1.5],
            },
        );
        let mut meta = BTreeMap::new();
        meta.insert("dataset_chosen_targets".into(), "['apple']".into());
        let bytes = safetensors_bytes(&s, &meta);
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let w = st.tensor("b.weight").unwrap();
        assert_eq!(w.shape(), &[2, 3]);
        assert_eq!(w.dtype(), safetensors::Dtype::F32);
        let vals: Vec<f32> = w
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(vals, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let (_, md) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            md.metadata()
                .as_ref()
                .unwrap()
                .get("dataset_chosen_targets")
                .unwrap(),
            "['apple']"
        );
        assert_eq!(safetensors_bytes(&s, &meta), bytes);
    }
}
