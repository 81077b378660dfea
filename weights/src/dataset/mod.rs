//! The layer dataset: the artifact that `extract` writes and `train` reads.
//!
//! One layer of every model of a collection, with one label and one split per model. The
//! matrices are held in the form that costs least and stays exact ([`Matrices`]): stacked,
//! `weights` `[N, d_H, d_W]`, or for LoRA layers the factors `up` `[N, d_H, r]` and `down`
//! `[N, r, d_W]` (each model's matrix is `up[i] @ down[i]`; the product would be ~40x larger
//! for an SD LoRA). On disk it is two files in the artifact directory: `layer.safetensors`
//! (those tensors and `labels`) and `layer.json` (everything else, its `storage` saying which
//! form), so a Python user can open it with `safetensors` and `json` alone:
//!
//! ```python
//! from safetensors.numpy import load_file
//! t = load_file("layer.safetensors")
//! x = t["weights"] if "weights" in t else t["up"] @ t["down"]   # [N, d_H, d_W]
//! ```

mod error;
pub mod rows;
pub mod writer;

use std::borrow::Cow;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

pub use crate::codec::{Precision, decode, encode};
pub use error::{DatasetError, Inconsistent};
use error::{invalid, io, non_finite_or};
pub use rows::count_non_finite;
pub use rows::{RowError, RowReader};

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
    /// Content digest (blake3 hex) of the whole file the layer was read from.
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
    pub list: Option<crate::Architecture>,
}

impl LayerInfo {
    /// The list `index` counts in. Without a recorded list (an older dataset, probe or
    /// routing) that is what indices meant then: the LoRA pairs for a LoRA product, else every
    /// tensor; so reading such a layer from a model file still finds the same tensor.
    pub fn architecture(&self) -> crate::Architecture {
        use crate::{Architecture, Transform};
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

/// How the matrices of a layer dataset are stored (the sidecar's `storage`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "form", rename_all = "snake_case")]
pub enum Storage {
    /// One tensor `weights` `[N, d_H, d_W]`.
    #[default]
    Stacked,
    /// LoRA factors `up` `[N, d_H, rank]` and `down` `[N, rank, d_W]`; a model's matrix is
    /// `up[i] @ down[i]`. Models trained at a lower rank are zero-padded to `rank`, which
    /// leaves their product unchanged.
    LoraFactors {
        /// The largest rank of the layer's models.
        rank: usize,
    },
    /// No copy: each row stays where its model file has it, as the sidecar's `references`
    /// say (file, header length, and each tensor's offset, dtype and shape: the matrix, or a
    /// LoRA pair's up and down factors). Loading checks each file's stamp against the one its
    /// digest was taken with, so a changed file is an error, never other numbers. `probex export`
    /// writes the stacked form for tools that want one file.
    References {
        /// For a LoRA layer, the largest rank of its models (loading pads lower ranks to it,
        /// as [`Storage::LoraFactors`] stores them); `None` for a plain layer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lora_rank: Option<usize>,
    },
}

impl Storage {
    /// The tensors this form stores, with their shapes for `n` rows of `[d_h, d_w]`
    /// matrices, in file order.
    pub fn parts(self, n: usize, [d_h, d_w]: [usize; 2]) -> Vec<(&'static str, [usize; 3])> {
        match self {
            Storage::Stacked => vec![(WEIGHTS, [n, d_h, d_w])],
            Storage::LoraFactors { rank } => vec![(UP, [n, d_h, rank]), (DOWN, [n, rank, d_w])],
            Storage::References { .. } => Vec::new(),
        }
    }
}

/// Where one row is in its model file (a [`Storage::References`] dataset).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorRef {
    /// The model file (absolute).
    pub file: std::path::PathBuf,
    /// The file's size, modification time and inode when its digest (the row's
    /// `source_digest`) was taken: the file is trusted to hold those bytes while they hold,
    /// as the stat cache behind every folder fetch's key trusts it.
    pub stamp: probex_engine::digest::FileStamp,
    /// The row's tensors: the matrix, or a LoRA pair's up then down factor.
    pub tensors: Vec<TensorSpan>,
}

/// One tensor's bytes in a model file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpan {
    /// Offset of its first byte in the file.
    pub offset: u64,
    /// Its dtype (`F32`, `F16`, `BF16`, `F64`), little-endian, row-major.
    pub dtype: Dtype,
    /// Its shape in the file.
    pub shape: Vec<usize>,
}

/// Name of the stacked matrices in `layer.safetensors`.
pub const WEIGHTS: &str = "weights";
/// Name of the LoRA up factors (`B`) in `layer.safetensors`.
pub const UP: &str = "up";
/// Name of the LoRA down factors (`A`) in `layer.safetensors`.
pub const DOWN: &str = "down";
/// Name of the label rows in `layer.safetensors`.
pub const LABELS: &str = "labels";

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
    /// On-disk precision of the matrices.
    pub precision: Precision,
    /// The form the matrices are stored in.
    pub storage: Storage,
    /// One record per row, in row order.
    pub models: Vec<ModelRecord>,
    /// Metadata key the labels came from.
    pub label_key: String,
    /// Labels without their targets (the targets live in `labels` of the tensor file).
    pub labels: Labels,
    /// Models left out.
    #[serde(default)]
    pub skipped: Vec<Skipped>,
    /// [`Storage::References`]: where each row's matrix is, in row order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<TensorRef>,
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
    /// The matrices.
    pub weights: Matrices,
    /// One record per row.
    pub models: Vec<ModelRecord>,
    /// Metadata key the labels came from.
    pub label_key: String,
    /// One label per row.
    pub labels: Labels,
    /// Models left out.
    pub skipped: Vec<Skipped>,
}

/// The matrices of a layer dataset, one per row, as f32 (decoded from whatever precision they
/// are stored at).
#[derive(Clone, Debug, PartialEq)]
pub enum Matrices {
    /// In memory, row-major `[n, d_h, d_w]`.
    Stacked(Vec<f32>),
    /// LoRA factors: row `i`'s matrix is `up_i @ down_i`, `up` row-major `[n, d_h, rank]`,
    /// `down` `[n, rank, d_w]` (see [`Storage::LoraFactors`]).
    Factored {
        /// The common (padded) rank.
        rank: usize,
        /// `B` of every row.
        up: Vec<f32>,
        /// `A` of every row.
        down: Vec<f32>,
    },
    /// On disk, read row by row when asked ([`LayerDataset::open`] of a layer larger than
    /// the memory it may use).
    OnDisk(Arc<RowReader>),
}

impl Matrices {
    /// The form [`LayerDataset::save`] stores these matrices in.
    pub fn storage(&self) -> Storage {
        match self {
            Matrices::Stacked(_) | Matrices::OnDisk(_) => Storage::Stacked,
            Matrices::Factored { rank, .. } => Storage::LoraFactors { rank: *rank },
        }
    }

    /// Values held in memory per stored tensor, in [`Storage::parts`] order (`None` on disk).
    fn in_memory(&self) -> Option<Vec<&[f32]>> {
        match self {
            Matrices::Stacked(w) => Some(vec![w]),
            Matrices::Factored { up, down, .. } => Some(vec![up, down]),
            Matrices::OnDisk(_) => None,
        }
    }
}

impl LayerDataset {
    /// Current sidecar format version (2: the `storage` form; LoRA layers stored factored;
    /// 3: in-place references carry their file's stamp, source digests are file digests).
    pub const FORMAT: u32 = 3;

    /// Row indices of the models in `split`, in row order.
    pub fn rows(&self, split: Split) -> Vec<usize> {
        (0..self.n)
            .filter(|&i| self.models[i].split == split)
            .collect()
    }

    /// The matrix of row `i`, `[d_h * d_w]` row-major: formed from the factors when the
    /// layer is stored factored, read from disk when it is on disk.
    pub fn matrix(&self, i: usize) -> Result<Cow<'_, [f32]>, DatasetError> {
        let m = self.d_h * self.d_w;
        if i >= self.n {
            return Err(DatasetError::Row(format!("row {i} of {}", self.n)));
        }
        Ok(match &self.weights {
            Matrices::Stacked(w) => Cow::Borrowed(&w[i * m..(i + 1) * m]),
            Matrices::Factored { rank, up, down } => {
                let (b, a) = (self.d_h * rank, rank * self.d_w);
                let mut x = Vec::new();
                crate::transform::lora_product(
                    &up[i * b..(i + 1) * b],
                    &down[i * a..(i + 1) * a],
                    self.d_h,
                    *rank,
                    self.d_w,
                    &mut x,
                );
                Cow::Owned(x)
            }
            Matrices::OnDisk(reader) => {
                let mut x = vec![0.0; m];
                reader.read(i, &mut x).map_err(|e| self.row_error(e))?;
                Cow::Owned(x)
            }
        })
    }

    /// The matrices of `rows`, one after the other, into `out` (resized to fit).
    pub fn read_rows(&self, rows: &[usize], out: &mut Vec<f32>) -> Result<(), DatasetError> {
        let m = self.d_h * self.d_w;
        out.clear();
        out.resize(rows.len() * m, 0.0);
        if let Some(&i) = rows.iter().find(|&&i| i >= self.n) {
            return Err(DatasetError::Row(format!("row {i} of {}", self.n)));
        }
        match &self.weights {
            Matrices::OnDisk(reader) => reader.read_rows(rows, out).map_err(|e| self.row_error(e)),
            Matrices::Stacked(w) => {
                for (o, &i) in out.chunks_exact_mut(m.max(1)).zip(rows) {
                    o.copy_from_slice(&w[i * m..(i + 1) * m]);
                }
                Ok(())
            }
            Matrices::Factored { .. } => {
                for (o, &i) in out.chunks_exact_mut(m.max(1)).zip(rows) {
                    o.copy_from_slice(&self.matrix(i)?);
                }
                Ok(())
            }
        }
    }

    /// A read error of row reading, with the model and layer it is about.
    fn row_error(&self, e: RowError) -> DatasetError {
        non_finite_or(e, &self.models, &self.layer.name, DatasetError::Row)
    }

    /// Checks that every part agrees on the number of rows and the shape.
    pub fn validate(&self) -> Result<(), Inconsistent> {
        let held = match &self.weights {
            Matrices::OnDisk(r) if r.len() != self.n => {
                return Err(Inconsistent::RowsOnDisk {
                    rows: r.len(),
                    models: self.n,
                });
            }
            w => w.in_memory().unwrap_or_default(),
        };
        for ((name, shape), values) in self
            .weights
            .storage()
            .parts(self.n, [self.d_h, self.d_w])
            .into_iter()
            .zip(held)
        {
            let want: usize = shape.iter().product();
            if values.len() != want {
                return Err(Inconsistent::Values {
                    part: name.to_string(),
                    values: values.len(),
                    shape: shape.to_vec(),
                    expected: want,
                });
            }
        }
        if self.models.len() != self.n {
            return Err(Inconsistent::Models {
                models: self.models.len(),
                rows: self.n,
            });
        }
        if self.labels.len() != self.n {
            return Err(Inconsistent::Labels {
                labels: self.labels.len(),
                rows: self.n,
            });
        }
        if let Labels::Class { classes, targets } = &self.labels
            && let Some(t) = targets.iter().find(|&&t| t as usize >= classes.len())
        {
            return Err(Inconsistent::Target {
                target: *t,
                classes: classes.len(),
            });
        }
        Ok(())
    }

    /// Writes `layer.safetensors` and `layer.json` into `dir`, the matrices at `precision`
    /// (a dataset on disk is written row by row, never held whole).
    pub fn save(&self, dir: &Path, precision: Precision) -> Result<(), DatasetError> {
        self.write(dir, precision, self.weights.storage())
    }

    /// Writes the dataset into `dir` stacked, whatever its form: one `weights` `[N, d_H,
    /// d_W]` tensor of the rows' matrices (LoRA products formed row by row), for tools that
    /// read nothing else (`probex export`).
    pub fn save_stacked(&self, dir: &Path, precision: Precision) -> Result<(), DatasetError> {
        self.write(dir, precision, Storage::Stacked)
    }

    fn write(
        &self,
        dir: &Path,
        precision: Precision,
        storage: Storage,
    ) -> Result<(), DatasetError> {
        self.validate().map_err(|m| invalid(dir, m))?;
        let tensors_path = dir.join(TENSORS_FILE);
        let label_width = match &self.labels {
            Labels::MultiLabel { classes, .. } => Some(classes.len()),
            _ => None,
        };
        let file = writer::LayerFile::create(
            dir,
            &self.layer.name,
            precision,
            storage,
            [self.d_h, self.d_w],
            self.n,
            label_width,
        )
        .map_err(io(&tensors_path))?;
        let shapes = storage.parts(1, [self.d_h, self.d_w]);
        let write = |i: usize, part: usize, values: &[f32]| {
            file.write_row(i, part, &encode(values, precision).1)
                .map_err(io(&tensors_path))
        };
        let held = self
            .weights
            .in_memory()
            .filter(|_| storage == self.weights.storage());
        for i in 0..self.n {
            match &held {
                Some(parts) => {
                    for (part, (values, (_, [_, a, b]))) in parts.iter().zip(&shapes).enumerate() {
                        write(i, part, &values[i * a * b..(i + 1) * a * b])?;
                    }
                }
                None => write(i, 0, &self.matrix(i)?)?,
            }
        }
        let rows: Vec<usize> = (0..self.n).collect();
        file.finish(&rows, &self.labels.as_f32(), label_width)
            .map_err(io(&tensors_path))?;

        let sidecar = Sidecar {
            format: Self::FORMAT,
            layer: self.layer.clone(),
            shape: [self.d_h, self.d_w],
            precision,
            storage,
            references: Vec::new(),
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
        // The version first: another format's fields would fail the parse with a less
        // helpful message.
        #[derive(Deserialize)]
        struct Format {
            format: u32,
        }
        let format = serde_json::from_slice::<Format>(&bytes)
            .map_err(|e| invalid(&path, e.to_string()))?
            .format;
        if format != Self::FORMAT {
            return Err(invalid(
                &path,
                format!(
                    "sidecar format {format} is not supported (expected {}); run the experiment \
                     again and its extract node is recomputed",
                    Self::FORMAT
                ),
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| invalid(&path, e.to_string()))
    }

    /// Reads the dataset in `dir` (written by [`LayerDataset::save`] or `extract`), every
    /// matrix decoded to f32 in memory.
    pub fn load(dir: &Path) -> Result<LayerDataset, DatasetError> {
        Self::open(dir, u64::MAX)
    }

    /// Reads the dataset in `dir` like [`LayerDataset::load`], but leaves stacked or in-place
    /// matrices on disk ([`Matrices::OnDisk`]) when they would take more than `budget` bytes
    /// as f32. LoRA factors are always read: they are small.
    pub fn open(dir: &Path, budget: u64) -> Result<LayerDataset, DatasetError> {
        let sidecar = Self::load_sidecar(dir)?;
        let path = dir.join(TENSORS_FILE);
        let file = std::fs::File::open(&path).map_err(io(&path))?;
        // SAFETY: cache entries are immutable once committed; nothing writes the file while mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io(&path))?;
        let st = SafeTensors::deserialize(&map).map_err(|e| invalid(&path, e.to_string()))?;
        let n = sidecar.models.len();
        let [d_h, d_w] = sidecar.shape;
        let values = d_h * d_w;
        let fits = (n as u64).saturating_mul(values as u64).saturating_mul(4) <= budget;

        let tensor = |name: &str, shape: [usize; 3]| {
            let t = st
                .tensor(name)
                .map_err(|e| invalid(&path, format!("tensor `{name}`: {e}")))?;
            if t.shape() != shape {
                return Err(invalid(
                    &path,
                    format!(
                        "tensor `{name}` has shape {:?}, the sidecar says {shape:?}",
                        t.shape()
                    ),
                ));
            }
            Ok(t)
        };
        let read_all = |reader: &RowReader| {
            let mut all = vec![0.0; n * values];
            reader
                .read_rows(&(0..n).collect::<Vec<_>>(), &mut all)
                .map(|()| all)
        };
        let weights = match sidecar.storage {
            Storage::Stacked => {
                let w = tensor(WEIGHTS, [n, d_h, d_w])?;
                if fits {
                    Matrices::Stacked(decode(w.dtype(), w.data()).map_err(|m| invalid(&path, m))?)
                } else {
                    let header = crate::reader::read_header(&path)
                        .map_err(|e| invalid(&path, e.to_string()))?;
                    let (_, entry) = header
                        .find(WEIGHTS)
                        .ok_or_else(|| invalid(&path, "tensor `weights` is missing"))?;
                    Matrices::OnDisk(Arc::new(RowReader::stacked(
                        &path,
                        entry.span.start as u64,
                        w.dtype(),
                        n,
                        values,
                    )))
                }
            }
            Storage::LoraFactors { rank } => {
                let up = tensor(UP, [n, d_h, rank])?;
                let down = tensor(DOWN, [n, rank, d_w])?;
                Matrices::Factored {
                    rank,
                    up: decode(up.dtype(), up.data()).map_err(|m| invalid(&path, m))?,
                    down: decode(down.dtype(), down.data()).map_err(|m| invalid(&path, m))?,
                }
            }
            Storage::References { lora_rank } => {
                let at = dir.join(SIDECAR_FILE);
                if sidecar.references.len() != n {
                    return Err(invalid(
                        &at,
                        format!("{} references for {n} rows", sidecar.references.len()),
                    ));
                }
                let stale = |e: RowError| {
                    non_finite_or(e, &sidecar.models, &sidecar.layer.name, |e| {
                        invalid(
                            &at,
                            format!(
                                "{e}. This layer dataset reads the model files in place; run \
                                 the experiment again and its extract node is recomputed"
                            ),
                        )
                    })
                };
                let reader = RowReader::references(&sidecar.references, values);
                match lora_rank {
                    Some(rank) => {
                        let (up, down) = reader.factors(rank, [d_h, d_w]).map_err(stale)?;
                        Matrices::Factored { rank, up, down }
                    }
                    None if fits => Matrices::Stacked(read_all(&reader).map_err(stale)?),
                    None => Matrices::OnDisk(Arc::new(reader)),
                }
            }
        };

        let l = st
            .tensor(LABELS)
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
            weights: Matrices::Stacked((0..n * 6).map(|i| i as f32 * 0.5 - 1.0).collect()),
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
            let (Matrices::Stacked(got), Matrices::Stacked(want)) = (&back.weights, &ds.weights)
            else {
                panic!("stacked in, stacked out");
            };
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(want) {
                assert!(
                    (a - b).abs() <= b.abs() * 1e-2 + 1e-3,
                    "{a} vs {b} at {p:?}"
                );
            }
        }
    }

    /// A factored layer saves `up` and `down` (never their product), loads back as it was,
    /// and each row's matrix is the product of its factors.
    #[test]
    fn factored_layers_round_trip_and_multiply_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut ds = sample(
            Labels::Numeric {
                targets: vec![0.5, 1.5],
                transform: "identity".into(),
            },
            2,
        );
        // d_h = 2, d_w = 3, rank 2; row 1 has rank 1 (its second column/row are padding).
        ds.weights = Matrices::Factored {
            rank: 2,
            up: vec![1.0, 2.0, 3.0, 4.0, /* row 1 */ 1.0, 0.0, -1.0, 0.0],
            down: vec![
                1.0, 0.0, 2.0, 0.0, 1.0, -1.0, /* row 1 */ 2.0, 3.0, 4.0, 0.0, 0.0, 0.0,
            ],
        };
        ds.save(dir.path(), Precision::F32).unwrap();
        let header = crate::reader::read_header(&dir.path().join(TENSORS_FILE)).unwrap();
        let names: Vec<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, [DOWN, LABELS, UP]);
        let back = LayerDataset::load(dir.path()).unwrap();
        assert_eq!(back, ds);
        assert_eq!(
            LayerDataset::load_sidecar(dir.path()).unwrap().storage,
            Storage::LoraFactors { rank: 2 }
        );
        assert_eq!(&*back.matrix(0).unwrap(), &[1.0, 2.0, 0.0, 3.0, 4.0, 2.0]);
        assert_eq!(
            &*back.matrix(1).unwrap(),
            &[2.0, 3.0, 4.0, -2.0, -3.0, -4.0]
        );
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
