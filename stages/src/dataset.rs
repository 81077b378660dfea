//! The layer dataset: the artifact that `extract` writes and `train` reads.
//!
//! One layer of every model of a collection, stacked: `weights` is `[N, d_H, d_W]`, with one
//! label and one split per model. On disk it is two files in the artifact directory:
//! `layer.safetensors` (tensors `weights` and `labels`) and `layer.json` (everything else), so a
//! Python user can open it with `safetensors` and `json` alone.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

/// File name of the tensors of a layer dataset inside its artifact directory.
pub const TENSORS_FILE: &str = "layer.safetensors";
/// File name of the JSON sidecar of a layer dataset inside its artifact directory.
pub const SIDECAR_FILE: &str = "layer.json";

/// Which part of a model collection a model belongs to (Model-J's split names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Training models.
    Train,
    /// Validation models (layer and checkpoint selection).
    Val,
    /// Test models (reported numbers).
    Test,
    /// Validation models of classes never seen in training (zero-shot).
    ValHoldout,
    /// Test models of classes never seen in training (zero-shot).
    TestHoldout,
}

impl Split {
    /// Every split, in Model-J's order.
    pub const ALL: [Split; 5] = [
        Split::Train,
        Split::Val,
        Split::Test,
        Split::ValHoldout,
        Split::TestHoldout,
    ];

    /// The split's name as Model-J spells it (`val_holdout`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
            Split::ValHoldout => "val_holdout",
            Split::TestHoldout => "test_holdout",
        }
    }

    /// Parses a Model-J split name; `None` for anything else.
    pub fn parse(s: &str) -> Option<Split> {
        Split::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One class of a single-label target: a stable id (e.g. a WordNet id) and a readable name
/// (used for text prompts).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Class {
    /// Identifier as found in the metadata (`n02111277`, `cosine`, `true`).
    pub id: String,
    /// Human-readable name (`Newfoundland dog`); equal to `id` when there is no table.
    pub name: String,
}

/// What a probe learns to predict, one value per model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Labels {
    /// A set of classes per model (Model-J's `dataset_chosen_targets`): multi-hot rows.
    MultiLabel {
        /// Class names, in label-column order (CIFAR-100 names sorted alphabetically).
        classes: Vec<String>,
        /// Row-major `[N, classes.len()]`, each 0.0 or 1.0.
        targets: Vec<f32>,
    },
    /// One class per model (an ImageNet class, a scheduler name, a boolean).
    Class {
        /// The classes, in target-index order.
        classes: Vec<Class>,
        /// Index into `classes` per model.
        targets: Vec<u32>,
    },
    /// A number per model (learning rate, epochs), for regression.
    Numeric {
        /// The target per model, after `transform`.
        targets: Vec<f32>,
        /// The transform applied to the raw metadata value (`"identity"` or `"log10"`).
        transform: String,
    },
}

impl Labels {
    /// Number of models labelled.
    pub fn len(&self) -> usize {
        match self {
            Labels::MultiLabel { classes, targets } => {
                targets.len().checked_div(classes.len()).unwrap_or(0)
            }
            Labels::Class { targets, .. } => targets.len(),
            Labels::Numeric { targets, .. } => targets.len(),
        }
    }

    /// True when no model is labelled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Output width of a probe head for these labels (classes, or 1 for regression).
    pub fn width(&self) -> usize {
        match self {
            Labels::MultiLabel { classes, .. } => classes.len(),
            Labels::Class { classes, .. } => classes.len(),
            Labels::Numeric { .. } => 1,
        }
    }

    /// The same labels without their targets: the classes (or transform) alone, as the
    /// sidecar stores them.
    pub fn without_targets(&self) -> Labels {
        match self {
            Labels::MultiLabel { classes, .. } => Labels::MultiLabel {
                classes: classes.clone(),
                targets: Vec::new(),
            },
            Labels::Class { classes, .. } => Labels::Class {
                classes: classes.clone(),
                targets: Vec::new(),
            },
            Labels::Numeric { transform, .. } => Labels::Numeric {
                targets: Vec::new(),
                transform: transform.clone(),
            },
        }
    }

    /// The label rows as f32, row-major `[N, width]` for multi-label, `[N]` otherwise
    /// (class indices as floats), which is how they are stored in `layer.safetensors`.
    pub fn as_f32(&self) -> Vec<f32> {
        match self {
            Labels::MultiLabel { targets, .. } | Labels::Numeric { targets, .. } => targets.clone(),
            Labels::Class { targets, .. } => targets.iter().map(|&t| t as f32).collect(),
        }
    }
}

/// Where one row of the dataset came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// Stable model id (repo name or `model_idx_0042`).
    pub id: String,
    /// Split of the model.
    pub split: Split,
    /// Content digest (blake3 hex) of the file the layer was read from.
    pub source_digest: String,
}

/// Which tensor the layer is and how it was turned into a matrix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// Index in the layer list `list` (the paper's layer index for the architectures it uses).
    pub index: usize,
    /// Tensor name (for LoRA, the `.lora.down.weight` name of the pair).
    pub name: String,
    /// Shape of the tensor in the model file.
    pub source_shape: Vec<usize>,
    /// The transform applied (`squeeze`, `conv_reshape`, `column`, `lora_product`).
    pub transform: String,
    /// The layer list `index` counts in (`vit`, `resnet`, `lora`, `matrices`, `tensors`).
    /// Absent in datasets written before probex had the paper's lists, whose indices counted
    /// every tensor (or the LoRA pairs): see [`LayerInfo::architecture`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list: Option<crate::weights::Architecture>,
}

impl LayerInfo {
    /// The list `index` counts in. Without a recorded list (an older dataset, probe or
    /// routing) that is what indices meant then: the LoRA pairs for a LoRA product, else every
    /// tensor; so reading such a layer from a model file still finds the same tensor.
    pub fn architecture(&self) -> crate::weights::Architecture {
        use crate::weights::{Architecture, Transform};
        self.list
            .unwrap_or(if self.transform == Transform::LoraProduct.as_str() {
                Architecture::SdLora
            } else {
                Architecture::AllTensors
            })
    }
}

/// A model that was left out, and why (labels with `on_error = "skip"`, bad weights).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// Model id.
    pub id: String,
    /// Human-readable reason, naming the file and key.
    pub reason: String,
}

/// Storage precision of `weights` on disk; always `f32` in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 4 bytes per value (default, exact).
    #[default]
    F32,
    /// IEEE half: halves disk and page cache, 11-bit mantissa.
    F16,
    /// bfloat16: halves disk and page cache, 8-bit mantissa, f32 range.
    Bf16,
}

/// The JSON sidecar of a layer dataset: everything but the tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sidecar {
    /// Format version of this sidecar.
    pub format: u32,
    /// The layer.
    pub layer: LayerInfo,
    /// `[d_H, d_W]` of every model's matrix.
    pub shape: [usize; 2],
    /// On-disk precision of `weights`.
    pub precision: Precision,
    /// One record per row, in row order.
    pub models: Vec<ModelRecord>,
    /// Metadata key the labels came from.
    pub label_key: String,
    /// Labels without their targets (the targets live in `labels` of the tensor file).
    pub labels: Labels,
    /// Models left out.
    #[serde(default)]
    pub skipped: Vec<Skipped>,
}

/// A whole layer dataset in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerDataset {
    /// The layer the rows are.
    pub layer: LayerInfo,
    /// Number of rows (models).
    pub n: usize,
    /// Rows of each model's matrix.
    pub d_h: usize,
    /// Columns of each model's matrix.
    pub d_w: usize,
    /// Row-major `[n, d_h, d_w]`.
    pub weights: Vec<f32>,
    /// One record per row.
    pub models: Vec<ModelRecord>,
    /// Metadata key the labels came from.
    pub label_key: String,
    /// One label per row.
    pub labels: Labels,
    /// Models left out.
    pub skipped: Vec<Skipped>,
}

/// Why a layer dataset could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// File system error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The files exist but do not hold a consistent layer dataset.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

fn invalid(path: &Path, message: impl Into<String>) -> DatasetError {
    DatasetError::Invalid {
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl LayerDataset {
    /// Current sidecar format version.
    pub const FORMAT: u32 = 1;

    /// Row indices of the models in `split`, in row order.
    pub fn rows(&self, split: Split) -> Vec<usize> {
        (0..self.n)
            .filter(|&i| self.models[i].split == split)
            .collect()
    }

    /// The matrix of row `i`, `[d_h * d_w]` row-major.
    pub fn matrix(&self, i: usize) -> &[f32] {
        let m = self.d_h * self.d_w;
        &self.weights[i * m..(i + 1) * m]
    }

    /// Checks that every part agrees on the number of rows and the shape.
    pub fn validate(&self) -> Result<(), String> {
        let want = self.n * self.d_h * self.d_w;
        if self.weights.len() != want {
            return Err(format!(
                "weights hold {} values, expected {} x {} x {} = {want}",
                self.weights.len(),
                self.n,
                self.d_h,
                self.d_w
            ));
        }
        if self.models.len() != self.n {
            return Err(format!(
                "{} model records for {} rows",
                self.models.len(),
                self.n
            ));
        }
        if self.labels.len() != self.n {
            return Err(format!("{} labels for {} rows", self.labels.len(), self.n));
        }
        if let Labels::Class { classes, targets } = &self.labels
            && let Some(t) = targets.iter().find(|&&t| t as usize >= classes.len())
        {
            return Err(format!(
                "class target {t} out of range ({} classes)",
                classes.len()
            ));
        }
        Ok(())
    }

    /// Writes `layer.safetensors` and `layer.json` into `dir`.
    pub fn save(&self, dir: &Path, precision: Precision) -> Result<(), DatasetError> {
        self.validate().map_err(|m| invalid(dir, m))?;
        let tensors_path = dir.join(TENSORS_FILE);
        let (dtype, weight_bytes) = encode(&self.weights, precision);
        let labels = self.labels.as_f32();
        let label_bytes: Vec<u8> = labels.iter().flat_map(|v| v.to_le_bytes()).collect();
        let label_shape = match &self.labels {
            Labels::MultiLabel { classes, .. } => vec![self.n, classes.len()],
            _ => vec![self.n],
        };
        let weights = TensorView::new(dtype, vec![self.n, self.d_h, self.d_w], &weight_bytes)
            .map_err(|e| invalid(&tensors_path, e.to_string()))?;
        let labels_view = TensorView::new(Dtype::F32, label_shape, &label_bytes)
            .map_err(|e| invalid(&tensors_path, e.to_string()))?;
        let mut meta = HashMap::new();
        meta.insert("layer".to_string(), self.layer.name.clone());
        safetensors::serialize_to_file(
            [("weights", weights), ("labels", labels_view)],
            Some(meta),
            &tensors_path,
        )
        .map_err(|e| invalid(&tensors_path, e.to_string()))?;

        let sidecar = Sidecar {
            format: Self::FORMAT,
            layer: self.layer.clone(),
            shape: [self.d_h, self.d_w],
            precision,
            models: self.models.clone(),
            label_key: self.label_key.clone(),
            labels: self.labels.without_targets(),
            skipped: self.skipped.clone(),
        };
        let sidecar_path = dir.join(SIDECAR_FILE);
        let json = serde_json::to_vec_pretty(&sidecar)
            .map_err(|e| invalid(&sidecar_path, e.to_string()))?;
        std::fs::write(&sidecar_path, json).map_err(io(&sidecar_path))
    }

    /// Reads only the sidecar of the dataset in `dir` (cheap: no tensor data).
    pub fn load_sidecar(dir: &Path) -> Result<Sidecar, DatasetError> {
        let path = dir.join(SIDECAR_FILE);
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let sidecar: Sidecar =
            serde_json::from_slice(&bytes).map_err(|e| invalid(&path, e.to_string()))?;
        if sidecar.format != Self::FORMAT {
            return Err(invalid(
                &path,
                format!(
                    "sidecar format {} is not supported (expected {}); re-run the extract stage",
                    sidecar.format,
                    Self::FORMAT
                ),
            ));
        }
        Ok(sidecar)
    }

    /// Reads the dataset in `dir` (written by [`LayerDataset::save`]), decoding weights to f32.
    pub fn load(dir: &Path) -> Result<LayerDataset, DatasetError> {
        let sidecar = Self::load_sidecar(dir)?;
        let path = dir.join(TENSORS_FILE);
        let file = std::fs::File::open(&path).map_err(io(&path))?;
        // SAFETY: cache entries are immutable once committed; nothing writes the file while mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io(&path))?;
        let st = SafeTensors::deserialize(&map).map_err(|e| invalid(&path, e.to_string()))?;
        let n = sidecar.models.len();
        let [d_h, d_w] = sidecar.shape;

        let w = st
            .tensor("weights")
            .map_err(|e| invalid(&path, format!("tensor `weights`: {e}")))?;
        if w.shape() != [n, d_h, d_w] {
            return Err(invalid(
                &path,
                format!(
                    "tensor `weights` has shape {:?}, sidecar says [{n}, {d_h}, {d_w}]",
                    w.shape()
                ),
            ));
        }
        let weights = decode(w.dtype(), w.data()).map_err(|m| invalid(&path, m))?;

        let l = st
            .tensor("labels")
            .map_err(|e| invalid(&path, format!("tensor `labels`: {e}")))?;
        let raw = decode(l.dtype(), l.data()).map_err(|m| invalid(&path, m))?;
        let labels = attach_targets(sidecar.labels, raw);

        let ds = LayerDataset {
            layer: sidecar.layer,
            n,
            d_h,
            d_w,
            weights,
            models: sidecar.models,
            label_key: sidecar.label_key,
            labels,
            skipped: sidecar.skipped,
        };
        ds.validate().map_err(|m| invalid(&path, m))?;
        Ok(ds)
    }
}

fn attach_targets(labels: Labels, raw: Vec<f32>) -> Labels {
    match labels {
        Labels::MultiLabel { classes, .. } => Labels::MultiLabel {
            classes,
            targets: raw,
        },
        Labels::Class { classes, .. } => Labels::Class {
            classes,
            targets: raw.into_iter().map(|v| v as u32).collect(),
        },
        Labels::Numeric { transform, .. } => Labels::Numeric {
            targets: raw,
            transform,
        },
    }
}

/// Encodes f32 values as little-endian bytes of the requested precision.
pub fn encode(values: &[f32], precision: Precision) -> (Dtype, Vec<u8>) {
    match precision {
        Precision::F32 => (
            Dtype::F32,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        Precision::F16 => (
            Dtype::F16,
            values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
        ),
        Precision::Bf16 => (
            Dtype::BF16,
            values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
        ),
    }
}

/// Decodes little-endian F32/F16/BF16/F64 bytes to f32; other dtypes are an error.
pub fn decode(dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, String> {
    let out = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => {
            return Err(format!(
                "dtype {other:?} is not a floating-point weight type"
            ));
        }
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(labels: Labels, n: usize) -> LayerDataset {
        LayerDataset {
            layer: LayerInfo {
                index: 3,
                name: "a.weight".into(),
                source_shape: vec![2, 3],
                transform: "squeeze".into(),
                list: None,
            },
            n,
            d_h: 2,
            d_w: 3,
            weights: (0..n * 6).map(|i| i as f32 * 0.5 - 1.0).collect(),
            models: (0..n)
                .map(|i| ModelRecord {
                    id: format!("m{i}"),
                    split: Split::ALL[i % 5],
                    source_digest: "00".into(),
                })
                .collect(),
            label_key: "k".into(),
            labels,
            skipped: vec![],
        }
    }

    #[test]
    fn round_trips_every_label_kind() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            Labels::MultiLabel {
                classes: vec!["a".into(), "b".into()],
                targets: vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0],
            },
            Labels::Class {
                classes: vec![
                    Class {
                        id: "n1".into(),
                        name: "dog".into(),
                    },
                    Class {
                        id: "n2".into(),
                        name: "cat".into(),
                    },
                ],
                targets: vec![1, 0, 1],
            },
            Labels::Numeric {
                targets: vec![-3.0, -2.5, -4.0],
                transform: "log10".into(),
            },
        ];
        for labels in cases {
            let ds = sample(labels, 3);
            ds.save(dir.path(), Precision::F32).unwrap();
            assert_eq!(LayerDataset::load(dir.path()).unwrap(), ds);
        }
    }

    #[test]
    fn half_precision_storage_rounds_but_keeps_shape() {
        let dir = tempfile::tempdir().unwrap();
        let ds = sample(
            Labels::Numeric {
                targets: vec![1.0; 4],
                transform: "identity".into(),
            },
            4,
        );
        for p in [Precision::F16, Precision::Bf16] {
            ds.save(dir.path(), p).unwrap();
            let back = LayerDataset::load(dir.path()).unwrap();
            assert_eq!(back.weights.len(), ds.weights.len());
            for (a, b) in back.weights.iter().zip(&ds.weights) {
                assert!(
                    (a - b).abs() <= b.abs() * 1e-2 + 1e-3,
                    "{a} vs {b} at {p:?}"
                );
            }
        }
    }

    #[test]
    fn rejects_inconsistent_sidecar() {
        let dir = tempfile::tempdir().unwrap();
        let ds = sample(
            Labels::Numeric {
                targets: vec![0.0; 2],
                transform: "identity".into(),
            },
            2,
        );
        ds.save(dir.path(), Precision::F32).unwrap();
        let path = dir.path().join(SIDECAR_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replace("\"shape\": [\n    2,", "\"shape\": [\n    5,"),
        )
        .unwrap();
        let err = LayerDataset::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("shape"), "{err}");
    }
}
