//! Reading named weights from a safetensors file into Burn tensors, with errors that name the
//! file, the tensor and the expected shape.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::prelude::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

/// A memory-mapped safetensors file whose tensors are looked up by name, optionally under one of
/// several prefixes (checkpoints of the same model differ in `bert.` or `text_model.` prefixes).
pub struct WeightFile {
    path: PathBuf,
    mmap: Mmap,
    prefix: String,
}

impl WeightFile {
    /// Maps `path` and checks that its header parses.
    pub fn open(path: &Path) -> anyhow::Result<WeightFile> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the file is only read; a concurrent writer could at worst give wrong numbers,
        // as with any other read of a file being rewritten.
        let mmap =
            unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        SafeTensors::deserialize(&mmap)
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        Ok(WeightFile {
            path: path.to_path_buf(),
            mmap,
            prefix: String::new(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor name in the file.
    pub fn names(&self) -> Vec<String> {
        SafeTensors::deserialize(&self.mmap)
            .map(|st| st.names().into_iter().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Uses the first of `prefixes` under which `probe` exists (`""` means no prefix), so later
    /// lookups can use the bare names; an error lists what was tried.
    pub fn detect_prefix(&mut self, probe: &str, prefixes: &[&str]) -> anyhow::Result<()> {
        let names = self.names();
        for p in prefixes {
            let full = format!("{p}{probe}");
            if names.contains(&full) {
                self.prefix = p.to_string();
                return Ok(());
            }
        }
        let tried: Vec<String> = prefixes.iter().map(|p| format!("`{p}{probe}`")).collect();
        bail!(
            "{}: none of {} found; is this the right model file for this encoder?",
            self.path.display(),
            tried.join(", ")
        )
    }

    /// Whether tensor `name` (after the prefix) exists.
    pub fn contains(&self, name: &str) -> bool {
        let full = format!("{}{name}", self.prefix);
        self.names().contains(&full)
    }

    /// Tensor `name` as f32 values, checked against `shape`.
    pub fn values(&self, name: &str, shape: &[usize]) -> anyhow::Result<Vec<f32>> {
        let full = format!("{}{name}", self.prefix);
        let st = SafeTensors::deserialize(&self.mmap)
            .with_context(|| format!("{}: not a safetensors file", self.path.display()))?;
        let t = st
            .tensor(&full)
            .with_context(|| format!("{}: no tensor `{full}`", self.path.display()))?;
        if t.shape() != shape {
            bail!(
                "{}: tensor `{full}` has shape {:?}, expected {shape:?} (from config.json)",
                self.path.display(),
                t.shape()
            );
        }
        probex_weights::dataset::decode(t.dtype(), t.data())
            .map_err(|e| anyhow::anyhow!("{}: tensor `{full}`: {e}", self.path.display()))
    }

    /// Tensor `name` as a Burn tensor of rank `D`, checked against `shape`.
    pub fn tensor<B: Backend, const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> anyhow::Result<Tensor<B, D>> {
        let full = format!("{}{name}", self.prefix);
        let st = SafeTensors::deserialize(&self.mmap)
            .with_context(|| format!("{}: not a safetensors file", self.path.display()))?;
        let t = st
            .tensor(&full)
            .with_context(|| format!("{}: no tensor `{full}`", self.path.display()))?;
        if t.shape() != shape {
            bail!(
                "{}: tensor `{full}` has shape {:?}, expected {shape:?} (from config.json)",
                self.path.display(),
                t.shape()
            );
        }
        // Burn decodes the raw little-endian bytes itself (optimised even in dev builds, where
        // a per-value loop here takes seconds on a CLIP-L checkpoint).
        let dtype = match t.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F64 => DType::F64,
            other => bail!(
                "{}: tensor `{full}` has dtype {other:?}, expected a floating-point type",
                self.path.display()
            ),
        };
        let data = TensorData::from_bytes_vec(t.data().to_vec(), shape, dtype).convert::<f32>();
        Ok(Tensor::from_data(data, device))
    }
}
