//! Extraction: a set of model files in, one [`LayerDataset`](crate::dataset::LayerDataset)
//! artifact per requested layer out.
//!
//! Usage: [`discover`] the models (or build [`ModelSource`]s from a fetch), [`resolve_layers`]
//! a [`LayerSelector`] against the first model, give each layer an output directory, and call
//! [`extract`]. One pass over the files: each file is mapped once, its header parsed once, and
//! only the requested tensors' pages are touched; rows are written straight into each layer's
//! file (files in parallel with rayon), so memory stays at a few rows per thread whatever the
//! number of models or layers.
//!
//! Plain layers are stacked; LoRA layers keep their factors (`up` `B`, `down` `A`), never the
//! product `B @ A`, which for an SD LoRA is ~40x larger. Values are stored as the files store
//! them (f16 stays f16) unless a precision is asked for: then a row whose dtype already is that
//! precision is a byte copy of the file, and only a conversion costs decoding.

pub mod discover;
pub mod stage;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use rayon::prelude::*;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::dataset::{
    Labels, LayerDataset, LayerInfo, ModelRecord, Precision, SIDECAR_FILE, Sidecar, Skipped, Split,
    Storage, TensorRef, TensorSpan, encode,
};
use crate::labels::{LabelSpec, LabelValue, Labeler, OnError};
use crate::weights::layers::is_float;
use crate::weights::reader::{SharedMmap, read_header};
use crate::weights::{
    Architecture, LayerIndex, LayerList, LayerMode, LayerSelector, SafetensorsFile, TensorEntry,
    Transform, WeightsError, transform,
};

use crate::dataset::writer::{self, LayerFile};
pub use discover::{Discovered, Layout, ModelSource, SplitAssigner, SplitSource, discover};
use probex_engine::digest::{FileDigests, FileStamp};
pub use stage::{ARTIFACT, Extract, ExtractParams};

/// A layer chosen for extraction, resolved against a reference model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedLayer {
    /// The index in the layer list `list` (the paper's, for the architectures it uses).
    pub index: usize,
    /// The layer list `index` counts in; every model is checked against it.
    pub list: Architecture,
    /// Tensor name (the down factor's for LoRA).
    pub name: String,
    /// Shape in the file (the down factor's for LoRA); every model must match it.
    pub source_shape: Vec<usize>,
    /// For LoRA: the up factor's name and shape.
    pub lora_up: Option<(String, Vec<usize>)>,
    /// Transform to a matrix.
    pub transform: Transform,
    /// `[d_H, d_W]`.
    pub matrix: [usize; 2],
    /// How the rows are stored: stacked, or (LoRA) as factors of the largest rank among the
    /// models ([`extract`] raises the reference model's rank to it).
    pub storage: Storage,
    /// The precision the reference model stores the layer at (f64 counts as f32): what the
    /// dataset keeps unless another precision is asked for.
    pub source_precision: Precision,
}

impl ResolvedLayer {
    /// The [`LayerInfo`] recorded in the layer's sidecar.
    pub fn info(&self) -> LayerInfo {
        LayerInfo {
            index: self.index,
            name: self.name.clone(),
            source_shape: self.source_shape.clone(),
            transform: self.transform.as_str().to_string(),
            list: Some(self.list),
        }
    }
}

/// Resolves `selector` against the model file `reference` (reading only its header), in the
/// layer list `mode` gives for it ([`LayerList::of`]). The result is in index order; use the
/// first model of the sorted list as the reference: every other model is checked against the
/// list, names, indices and shapes found here.
pub fn resolve_layers(
    reference: &Path,
    selector: &LayerSelector,
    mode: LayerMode,
) -> Result<Vec<ResolvedLayer>, WeightsError> {
    LayerResolver::open(reference, mode)?.resolve(selector)
}

/// A reference model's layer list, read once and resolved against many selectors: a batch of
/// one node per layer asks for 128 of them.
pub struct LayerResolver {
    label: String,
    header: crate::weights::Header,
    list: LayerList,
}

impl LayerResolver {
    /// Reads `reference`'s header and its layer list in `mode`.
    pub fn open(reference: &Path, mode: LayerMode) -> Result<Self, WeightsError> {
        let label = reference.display().to_string();
        let header = read_header(reference)?;
        let list = LayerList::of(&header, mode).map_err(|m| WeightsError::invalid(&label, m))?;
        Ok(LayerResolver {
            label,
            header,
            list,
        })
    }

    /// The layers `selector` picks, in index order (see [`resolve_layers`]).
    pub fn resolve(&self, selector: &LayerSelector) -> Result<Vec<ResolvedLayer>, WeightsError> {
        let (label, header, list) = (&self.label, &self.header, &self.list);
        let picked = list
            .select(selector)
            .map_err(|m| WeightsError::invalid(label, m))?;
        let rows = &list.rows;
        picked
            .into_iter()
            .map(|i| {
                let r = &rows[i];
                let (Some(matrix), Some(transform)) = (r.matrix, r.transform) else {
                    return Err(WeightsError::tensor(
                        label,
                        &r.name,
                        r.note
                            .clone()
                            .unwrap_or_else(|| "cannot be a probe input".into()),
                    ));
                };
                let lora_up = match &r.lora_up {
                    Some(up) => {
                        let (_, e) = header.find(up).ok_or_else(|| {
                            WeightsError::tensor(label, up, "LoRA up factor not in this file")
                        })?;
                        Some((up.clone(), e.shape.clone()))
                    }
                    None => None,
                };
                let storage = match lora_up {
                    Some(_) => Storage::LoraFactors {
                        rank: r.shape.first().copied().unwrap_or(0),
                    },
                    None => Storage::Stacked,
                };
                let dtype = header.find(&r.name).map(|(_, e)| e.dtype);
                Ok(ResolvedLayer {
                    index: r.index,
                    list: list.architecture,
                    name: r.name.clone(),
                    source_shape: r.shape.clone(),
                    lora_up,
                    transform,
                    matrix,
                    storage,
                    source_precision: dtype.map_or(Precision::F32, precision_of),
                })
            })
            .collect()
    }
}

/// The stored precision closest to a float dtype: itself, or f32 for f64.
pub fn precision_of(dtype: Dtype) -> Precision {
    match dtype {
        Dtype::F16 => Precision::F16,
        Dtype::BF16 => Precision::Bf16,
        _ => Precision::F32,
    }
}

/// Reads the matrix of `layer` (as a layer dataset records it) from one model file: the
/// matrix of the row `extract` would write for it (for LoRA, the product of its factors). The file must hold that layer under the same name, index and
/// shape; used to apply a trained probe to a model outside its dataset (`probex describe`).
pub fn read_matrix(path: &Path, layer: &LayerInfo) -> Result<Vec<f32>, WeightsError> {
    let label = path.display().to_string();
    // The list the probe's index counts in, so the same index means the same tensor here.
    let mode = LayerMode::from(layer.architecture());
    // A broken file reports itself; after that, a failed lookup means the layer is missing.
    read_header(path)?;
    let resolved = resolve_layers(path, &LayerSelector::Name(layer.name.clone()), mode).map_err(
        |e| match e {
            WeightsError::Invalid { .. } => WeightsError::invalid(
                &label,
                format!(
                    "this model has no layer `{}` (the probe reads layer {} of shape {:?}); \
                     list its layers with `probex layers {label}`",
                    layer.name, layer.index, layer.source_shape
                ),
            ),
            other => other,
        },
    )?;
    let [resolved] = &resolved[..] else {
        return Err(WeightsError::tensor(
            &label,
            &layer.name,
            "matches more than one layer",
        ));
    };
    let st = SafetensorsFile::open(path)?;
    let (entry, up) = check_entry(&st, &LayerIndex::new(st.header()), resolved)
        .map_err(|m| WeightsError::invalid(&label, m))?;
    if resolved.index != layer.index || resolved.source_shape != layer.source_shape {
        return Err(WeightsError::tensor(
            &label,
            &layer.name,
            format!(
                "is layer {} of shape {:?} here, but the probe was trained on layer {} of shape \
                 {:?}: this model is not from the probe's model tree",
                resolved.index, resolved.source_shape, layer.index, layer.source_shape
            ),
        ));
    }
    let parts =
        row_parts(&st, resolved, entry, up).map_err(|m| WeightsError::invalid(&label, m))?;
    Ok(match (resolved.storage, parts.as_slice()) {
        (Storage::LoraFactors { rank }, [b, a]) => {
            let [out, cols] = resolved.matrix;
            let mut x = Vec::new();
            transform::lora_product(b, a, out, rank, cols, &mut x);
            x
        }
        _ => parts.into_iter().next().unwrap_or_default(),
    })
}

/// One layer to extract and the directory its artifact goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerOutput {
    /// The layer.
    pub layer: ResolvedLayer,
    /// Output directory (created if missing); `layer.safetensors` and `layer.json` go in it.
    pub dir: PathBuf,
}

/// What to do with weights that are NaN or infinite.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonFinitePolicy {
    /// Stop with an error naming the file and tensor (default).
    #[default]
    Fail,
    /// Leave the model out of that layer's dataset (listed in its `skipped`).
    Skip,
    /// Replace each non-finite value by 0 and keep the model (reported).
    Zero,
}

/// Options of an extraction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtractOptions {
    /// On-disk precision of the matrices; `None`: as the files store them (see
    /// [`ResolvedLayer::source_precision`]).
    pub precision: Option<Precision>,
    /// NaN/Inf weights.
    pub non_finite: NonFinitePolicy,
    /// Where splits come from.
    pub splits: SplitSource,
    /// Unreadable files, missing tensors and shape mismatches: fail (default) or skip the model.
    pub on_bad_file: OnError,
    /// Layers refer to the model files ([`Storage::References`]) instead of copying their
    /// rows (a LoRA pair's factors, a plain layer's matrix), unless a precision conversion or
    /// `non_finite = zero` needs a copy. Each reference keeps the file's stamp (size,
    /// modification time, inode), which loading checks.
    pub in_place: bool,
}

/// A NaN/Inf finding in one model's layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NonFiniteFinding {
    /// Model id.
    pub model: String,
    /// The file.
    pub path: PathBuf,
    /// The layer (tensor name).
    pub layer: String,
    /// Number of NaN values in the matrix.
    pub nan: usize,
    /// Number of infinite values in the matrix.
    pub inf: usize,
    /// What was done (`failed`, `skipped`, `zeroed`).
    pub action: String,
}

/// The outcome of one layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    /// The layer.
    pub layer: LayerInfo,
    /// Its artifact directory.
    pub dir: PathBuf,
    /// Rows written.
    pub rows: usize,
    /// Models left out of this layer (label/split problems and this layer's own).
    pub skipped: Vec<Skipped>,
    /// The sidecar written to `dir`, so a caller need not read it back.
    pub sidecar: Sidecar,
}

/// What an extraction did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExtractReport {
    /// One entry per output, in the order given.
    pub layers: Vec<LayerReport>,
    /// Models left out of every layer (labels with `on_error = "skip"`, bad files when skipped).
    pub skipped: Vec<Skipped>,
    /// Every NaN/Inf finding, whatever the policy did with it.
    pub non_finite: Vec<NonFiniteFinding>,
    /// Model files visited.
    pub files: usize,
    /// Bytes of tensors read (plus headers).
    pub bytes_read: u64,
    /// Bytes written to layer files.
    pub bytes_written: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Why an extraction failed.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// The request itself is wrong (labels spec, no layers, ...).
    #[error("{0}")]
    Config(String),
    /// A file could not be read.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// Models failed; each message names the model, its file and the problem.
    #[error("{} model(s) failed:\n  {}{}", .0.len(), .0.iter().take(10).cloned().collect::<Vec<_>>().join("\n  "), if .0.len() > 10 { format!("\n  ... and {} more", .0.len() - 10) } else { String::new() })]
    Models(Vec<String>),
    /// Writing an output failed (a full disk): about the output, not the models.
    // Not `source`: thiserror would make it the error's source too, and a chain print
    // (`{:#}`) said the cause twice.
    #[error("{path}: {error}")]
    Io {
        /// The output file.
        path: String,
        /// The error.
        error: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ExtractError + '_ {
    move |error| ExtractError::Io {
        path: path.display().to_string(),
        error,
    }
}

/// A problem with one model: `fatal` ones fail the run, others skip the model.
struct Problem {
    fatal: bool,
    message: String,
}

enum RowOutcome {
    /// The row is in the dataset: copied, or (`reference`) left where the model file has it.
    Written {
        reference: Option<TensorRef>,
    },
    Dropped(String),
}

struct ModelOutcome {
    label: Result<LabelValue, Problem>,
    split: Result<Split, Problem>,
    file_digest: Option<String>,
    rows: Vec<RowOutcome>,
    findings: Vec<NonFiniteFinding>,
    bytes_read: u64,
}

/// Counts NaN and infinite values.
fn count_non_finite(values: &[f32]) -> (usize, usize) {
    let mut nan = 0;
    let mut inf = 0;
    for v in values {
        nan += usize::from(v.is_nan());
        inf += usize::from(v.is_infinite());
    }
    (nan, inf)
}

/// Writes a mapped row piece (already at the stored precision) in cache-sized chunks,
/// counting non-finite values of each chunk just before it is copied. Returns the count.
fn write_scanned(
    file: &LayerFile,
    slot: usize,
    part: usize,
    precision: Precision,
    bytes: &[u8],
) -> std::io::Result<usize> {
    const CHUNK: usize = 256 << 10;
    if bytes.len() != file.part_bytes(part) {
        return Err(std::io::Error::other(format!(
            "row piece of {} bytes, expected {}",
            bytes.len(),
            file.part_bytes(part)
        )));
    }
    let mut bad = 0;
    let mut at = 0;
    for chunk in bytes.chunks(CHUNK) {
        bad += count_non_finite_bytes(chunk, precision);
        file.write_row_part(slot, part, at, chunk)?;
        at += chunk.len();
    }
    Ok(bad)
}

/// Counts non-finite little-endian values straight from bytes (exponent all ones).
///
/// Extraction scans every byte it refers to, so this runs at memory speed: counts are kept in
/// lanes as wide as the values (u16 for halves, u32 for floats) over blocks short enough not
/// to overflow them, which lets the compiler vectorise the loop (a usize count per value made
/// it widen every lane to 64 bits and scan 2 values per step).
fn count_non_finite_bytes(bytes: &[u8], precision: Precision) -> usize {
    match precision {
        Precision::F32 => {
            const BLOCK: usize = 1 << 16;
            bytes
                .chunks(4 * BLOCK)
                .map(|block| {
                    let mut n: u32 = 0;
                    for c in block.chunks_exact(4) {
                        let bits = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                        n += u32::from(bits & 0x7f80_0000 == 0x7f80_0000);
                    }
                    n as usize
                })
                .sum()
        }
        Precision::F16 | Precision::Bf16 => {
            let exponent: u16 = if precision == Precision::F16 {
                0x7c00
            } else {
                0x7f80
            };
            // u16 lanes: at most 2^16 - 1 values per block.
            const BLOCK: usize = (1 << 16) - 1;
            bytes
                .chunks(2 * BLOCK)
                .map(|block| {
                    let mut n: u16 = 0;
                    for c in block.chunks_exact(2) {
                        n += u16::from(u16::from_le_bytes([c[0], c[1]]) & exponent == exponent);
                    }
                    usize::from(n)
                })
                .sum()
        }
    }
}

/// Counts non-finite values in little-endian bytes of a float dtype (0 for other dtypes).
fn non_finite_in(dtype: Dtype, bytes: &[u8]) -> usize {
    match dtype {
        Dtype::F32 => count_non_finite_bytes(bytes, Precision::F32),
        Dtype::F16 => count_non_finite_bytes(bytes, Precision::F16),
        Dtype::BF16 => count_non_finite_bytes(bytes, Precision::Bf16),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .filter(|c| {
                let bits = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                bits & 0x7ff0_0000_0000_0000 == 0x7ff0_0000_0000_0000
            })
            .count(),
        _ => 0,
    }
}

/// Bytes of one row piece on their way to a layer file's writer thread.
enum RowBytes {
    /// A span of a mapped model file (already in the file's byte order and dtype).
    Mapped(SharedMmap, Range<usize>),
    /// Encoded values.
    Owned(Vec<u8>),
}

struct Job {
    slot: usize,
    part: usize,
    bytes: RowBytes,
}

/// Bounds the bytes of decoded rows waiting for a writer (mapped rows cost nothing: they are
/// page cache). A row larger than the whole budget still goes through when nothing else waits.
struct ByteBudget {
    limit: usize,
    used: Mutex<usize>,
    freed: Condvar,
}

impl ByteBudget {
    fn acquire(&self, n: usize) {
        let Ok(mut used) = self.used.lock() else {
            return;
        };
        while *used > 0 && *used + n > self.limit {
            match self.freed.wait(used) {
                Ok(u) => used = u,
                Err(_) => return,
            }
        }
        *used += n;
    }

    fn release(&self, n: usize) {
        if let Ok(mut used) = self.used.lock() {
            *used = used.saturating_sub(n);
        }
        self.freed.notify_all();
    }
}

/// Decoded rows in flight at most (on top of a few rows per thread being built).
const IN_FLIGHT_BYTES: usize = 512 << 20;

struct Ctx<'a> {
    outputs: &'a [LayerOutput],
    /// The stored precision of each output.
    precision: &'a [Precision],
    /// Whether each output refers to the model files instead of copying its rows.
    referenced: &'a [bool],
    budget: &'a ByteBudget,
    sinks: &'a [SyncSender<Job>],
    labeler: &'a Labeler,
    splits: &'a SplitAssigner,
    opts: &'a ExtractOptions,
    digests: &'a FileDigests,
    abort: &'a AtomicBool,
}

fn check_entry<'a>(
    st: &'a SafetensorsFile,
    indices: &LayerIndex,
    layer: &ResolvedLayer,
) -> Result<(&'a TensorEntry, Option<&'a TensorEntry>), String> {
    let Some((_, entry)) = st.header().find(&layer.name) else {
        return Err(format!(
            "tensor `{}` (layer {}) is not in this file",
            layer.name, layer.index
        ));
    };
    // Partial files (fetch in tensors mode) count in their original tensor list.
    let Some(index) = indices.index(&layer.name, layer.list)? else {
        return Err(format!(
            "tensor `{}` (layer {} of the first model) is not a layer here: in this file it \
             is not in the {} list ({})",
            layer.name,
            layer.index,
            layer.list,
            layer.list.rule()
        ));
    };
    if index != layer.index {
        return Err(format!(
            "tensor `{}` is layer {index} in this file but layer {} in the first model: the \
             models do not share one layer list, so layer indices disagree",
            layer.name, layer.index
        ));
    }
    if !is_float(entry.dtype) {
        return Err(format!(
            "tensor `{}` is {:?}, not floating point",
            layer.name, entry.dtype
        ));
    }
    let Some((up_name, _)) = &layer.lora_up else {
        if entry.shape != layer.source_shape {
            return Err(format!(
                "tensor `{}` has shape {:?}, the first model's has {:?}; all models must share \
                 the layer's shape",
                layer.name, entry.shape, layer.source_shape
            ));
        }
        return Ok((entry, None));
    };
    let (_, up) = st.header().find(up_name).ok_or_else(|| {
        format!(
            "LoRA up factor `{up_name}` of layer {} is not in this file (its down factor `{}` is)",
            layer.index, layer.name
        )
    })?;
    if !is_float(up.dtype) {
        return Err(format!(
            "tensor `{up_name}` is {:?}, not floating point",
            up.dtype
        ));
    }
    // Models may be trained at different ranks: what must agree is the matrix the pair forms.
    let matrix = transform::plan_lora(&up.shape, &entry.shape)
        .map_err(|m| format!("LoRA layer `{}`: {m}", layer.name))?;
    if matrix != layer.matrix {
        return Err(format!(
            "LoRA layer `{}` forms a {:?} matrix (up {:?}, down {:?}), the first model's forms \
             {:?}; all models must share the layer's shape",
            layer.name, matrix, up.shape, entry.shape, layer.matrix
        ));
    }
    if let Storage::LoraFactors { rank } = layer.storage
        && entry.shape[0] > rank
    {
        return Err(format!(
            "LoRA layer `{}` has rank {}, more than the {rank} its dataset was laid out for",
            layer.name, entry.shape[0]
        ));
    }
    Ok((entry, Some(up)))
}

/// One model file being read, with what every row of it shares, worked out once per file
/// rather than once per layer.
struct OpenModel<'a> {
    model: &'a ModelSource,
    st: &'a SafetensorsFile,
    /// What the file's digest was taken from: an in-place reference is trusted while the
    /// file still has this stamp.
    stamp: FileStamp,
    /// The file's layer lists, worked out once for all its rows.
    indices: LayerIndex<'a>,
    /// The file's path made absolute and followed through symlinks (the Hugging Face cache
    /// links snapshots to blobs), which is what an in-place reference names.
    canonical: PathBuf,
}

/// Reads, checks and writes one layer of one model into slot `slot`.
fn extract_row(
    cx: &Ctx,
    file: &OpenModel,
    out: usize,
    slot: usize,
    findings: &mut Vec<NonFiniteFinding>,
    bytes_read: &mut u64,
) -> Result<RowOutcome, Problem> {
    let (model, st) = (file.model, file.st);
    let layer = &cx.outputs[out].layer;
    let bad_file = |message: String| Problem {
        fatal: cx.opts.on_bad_file == OnError::Fail,
        message,
    };
    let (entry, up) = check_entry(st, &file.indices, layer).map_err(bad_file)?;
    let data = st.data(entry).map_err(|e| bad_file(e.to_string()))?;
    let up_data = match up {
        Some(u) => Some(st.data(u).map_err(|e| bad_file(e.to_string()))?),
        None => None,
    };
    *bytes_read += (data.len() + up_data.map_or(0, <[u8]>::len)) as u64;
    let referenced = cx.referenced[out];
    let precision = cx.precision[out];
    let send = |part: usize, bytes: RowBytes| {
        cx.sinks[out]
            .send(Job { slot, part, bytes })
            .map_err(|_| Problem {
                fatal: true,
                message: "the layer writer stopped (see the write error)".into(),
            })
    };

    if referenced {
        let bad = non_finite_in(entry.dtype, data)
            + up.zip(up_data)
                .map_or(0, |(u, d)| non_finite_in(u.dtype, d));
        if bad > 0 {
            let mut parts = row_parts(st, layer, entry, up).map_err(bad_file)?;
            if let Some(dropped) =
                non_finite_policy(cx.opts.non_finite, model, layer, &mut parts, findings)?
            {
                return Ok(RowOutcome::Dropped(dropped));
            }
        }
        let reference = TensorRef {
            file: file.canonical.clone(),
            stamp: file.stamp,
            // Up factor first, then the down factor (or the matrix).
            tensors: up
                .into_iter()
                .chain([entry])
                .map(|e| TensorSpan {
                    offset: e.span.start as u64,
                    dtype: e.dtype,
                    shape: e.shape.clone(),
                })
                .collect(),
        };
        return Ok(RowOutcome::Written {
            reference: Some(reference),
        });
    }

    // Fast path: every stored piece is already the file's bytes (same dtype, LoRA factors of
    // the layer's full rank). The writer thread checks them for NaN/Inf while it copies them
    // from the mapping (one pass over the bytes while they are in cache); flagged rows are
    // handled after the pass.
    let pieces: Vec<&TensorEntry> = up.into_iter().chain([entry]).collect();
    let full_rank = match layer.storage {
        Storage::LoraFactors { rank } => entry.shape[0] == rank,
        Storage::Stacked | Storage::References { .. } => true,
    };
    if cfg!(target_endian = "little")
        && full_rank
        && pieces
            .iter()
            .all(|e| e.dtype == writer::dtype_of(precision))
    {
        for (part, e) in pieces.iter().enumerate() {
            send(part, RowBytes::Mapped(st.mapping(), e.span.clone()))?;
        }
        return Ok(RowOutcome::Written { reference: None });
    }

    let mut parts = row_parts(st, layer, entry, up).map_err(bad_file)?;
    if let Some(dropped) =
        non_finite_policy(cx.opts.non_finite, model, layer, &mut parts, findings)?
    {
        return Ok(RowOutcome::Dropped(dropped));
    }
    for (part, values) in parts.iter().enumerate() {
        let (_, bytes) = encode(values, precision);
        let n = bytes.len();
        cx.budget.acquire(n);
        if let Err(p) = send(part, RowBytes::Owned(bytes)) {
            cx.budget.release(n);
            return Err(p);
        }
    }
    Ok(RowOutcome::Written { reference: None })
}

/// The stored pieces of `layer` in `st`, decoded to f32: the matrix, or for a LoRA pair its
/// factors `up` `[out, rank]` and `down` `[rank, cols]`, zero-padded to the layer's rank.
fn row_parts(
    st: &SafetensorsFile,
    layer: &ResolvedLayer,
    entry: &TensorEntry,
    up: Option<&TensorEntry>,
) -> Result<Vec<Vec<f32>>, String> {
    let decode = |e: &TensorEntry| {
        let d = st.data(e).map_err(|e| e.to_string())?;
        crate::dataset::decode(e.dtype, d).map_err(|m| format!("tensor `{}`: {m}", e.name))
    };
    let values = decode(entry)?;
    let rank = match (up, layer.storage) {
        (Some(_), Storage::LoraFactors { rank }) => rank,
        // A referenced pair's factors as the file has them (no layout to pad to).
        (Some(u), Storage::References { .. }) => return Ok(vec![decode(u)?, values]),
        _ => return Ok(vec![values]),
    };
    let Some(u) = up else {
        return Ok(vec![values]);
    };
    let b = decode(u)?;
    let [out, cols] = layer.matrix;
    let r = entry.shape[0];
    if r == rank {
        return Ok(vec![b, values]);
    }
    // A lower rank pads `up` with zero columns and `down` with zero rows: the product is the
    // same matrix.
    let mut b_padded = vec![0.0; out * rank];
    for (dst, src) in b_padded.chunks_exact_mut(rank).zip(b.chunks_exact(r)) {
        dst[..r].copy_from_slice(src);
    }
    let mut a_padded = values;
    a_padded.resize(rank * cols, 0.0);
    Ok(vec![b_padded, a_padded])
}

/// Applies the NaN/Inf policy to a row's stored pieces (for LoRA, its factors): records a
/// finding when there are any, then fails, returns the reason the row is dropped, or zeroes
/// them in place (`Ok(None)`: keep the row).
fn non_finite_policy(
    policy: NonFinitePolicy,
    model: &ModelSource,
    layer: &ResolvedLayer,
    parts: &mut [Vec<f32>],
    findings: &mut Vec<NonFiniteFinding>,
) -> Result<Option<String>, Problem> {
    let (nan, inf) = parts.iter().fold((0, 0), |(nan, inf), p| {
        let (a, b) = count_non_finite(p);
        (nan + a, inf + b)
    });
    if nan + inf == 0 {
        return Ok(None);
    }
    let action = match policy {
        NonFinitePolicy::Fail => "failed",
        NonFinitePolicy::Skip => "skipped",
        NonFinitePolicy::Zero => "zeroed",
    };
    findings.push(NonFiniteFinding {
        model: model.id.clone(),
        path: model.path.clone(),
        layer: layer.name.clone(),
        nan,
        inf,
        action: action.into(),
    });
    let what = format!(
        "{}: tensor `{}` has {nan} NaN and {inf} infinite values",
        model.path.display(),
        layer.name
    );
    match policy {
        NonFinitePolicy::Fail => Err(Problem {
            fatal: true,
            message: format!("{what} (set non_finite = \"skip\" or \"zero\" to go on)"),
        }),
        NonFinitePolicy::Skip => Ok(Some(what)),
        NonFinitePolicy::Zero => {
            for v in parts.iter_mut().flatten() {
                if !v.is_finite() {
                    *v = 0.0;
                }
            }
            Ok(None)
        }
    }
}

/// Re-reads a fast-path row the writer flagged as holding NaN/Inf and applies the policy
/// (rare: only rows with non-finite values get here).
fn recheck_flagged(
    cx_opts: &ExtractOptions,
    precision: Precision,
    model: &ModelSource,
    layer: &ResolvedLayer,
    file: &LayerFile,
    slot: usize,
    findings: &mut Vec<NonFiniteFinding>,
) -> Result<Option<String>, Problem> {
    let fatal = |message: String| Problem {
        fatal: true,
        message,
    };
    let st = SafetensorsFile::open(&model.path).map_err(|e| fatal(e.to_string()))?;
    let (entry, up) = check_entry(&st, &LayerIndex::new(st.header()), layer)
        .map_err(|m| fatal(prefix_path(&model.path, m)))?;
    let mut parts =
        row_parts(&st, layer, entry, up).map_err(|m| fatal(prefix_path(&model.path, m)))?;
    let dropped = non_finite_policy(cx_opts.non_finite, model, layer, &mut parts, findings)?;
    if dropped.is_none() {
        for (part, values) in parts.iter().enumerate() {
            let (_, bytes) = encode(values, precision);
            file.write_row(slot, part, &bytes)
                .map_err(|e| fatal(format!("writing {}: {e}", file.path().display())))?;
        }
    }
    Ok(dropped)
}

fn process_model(cx: &Ctx, slot: usize, model: &ModelSource) -> ModelOutcome {
    let mut outcome = ModelOutcome {
        label: Err(Problem {
            fatal: false,
            message: String::new(),
        }),
        split: Err(Problem {
            fatal: false,
            message: String::new(),
        }),
        file_digest: None,
        rows: Vec::new(),
        findings: Vec::new(),
        bytes_read: 0,
    };
    let bad_file = |message: String| Problem {
        fatal: cx.opts.on_bad_file == OnError::Fail,
        message,
    };
    // The file's digest comes from the run's stat cache, which planning filled: a folder's
    // fetch hashed every model file for its key, so this costs a stat, not a read.
    let identity = match cx.digests.identify(&model.path) {
        Ok(id) => id,
        Err(e) => {
            outcome.label = Err(bad_file(format!("{}: {e}", model.path.display())));
            return outcome;
        }
    };
    let st = match SafetensorsFile::open(&model.path) {
        Ok(st) => st,
        Err(e) => {
            outcome.label = Err(bad_file(e.to_string()));
            return outcome;
        }
    };
    // A file replaced or rewritten between its digest and its mapping would pair one
    // content's digest with another's rows.
    match std::fs::metadata(&model.path).map(|m| identity.stamp.change(&FileStamp::of(&m))) {
        Ok(None) => {}
        Ok(Some(what)) => {
            outcome.label = Err(Problem {
                fatal: true,
                message: format!(
                    "{}: changed while it was being read ({what}); run again once nothing \
                     writes to it",
                    model.path.display()
                ),
            });
            cx.abort.store(true, Ordering::Relaxed);
            return outcome;
        }
        Err(e) => {
            outcome.label = Err(bad_file(format!("{}: {e}", model.path.display())));
            return outcome;
        }
    }
    outcome.file_digest = Some(identity.digest);
    outcome.bytes_read += st.header().data_start as u64;
    let open = OpenModel {
        model,
        st: &st,
        stamp: identity.stamp,
        indices: LayerIndex::new(st.header()),
        canonical: identity.path,
    };
    let path = model.path.display();
    outcome.label = cx.labeler.read(st.metadata()).map_err(|m| Problem {
        fatal: cx.labeler.spec().on_error == OnError::Fail,
        message: format!("{path}: {m}"),
    });
    outcome.split = cx.splits.split(model, st.metadata()).map_err(|m| Problem {
        fatal: true,
        message: format!("{path}: {m}"),
    });
    if outcome.label.as_ref().err().is_some_and(|p| p.fatal)
        || outcome.split.as_ref().err().is_some_and(|p| p.fatal)
    {
        cx.abort.store(true, Ordering::Relaxed);
    }
    if outcome.label.is_err() || outcome.split.is_err() {
        return outcome;
    }
    // Start the reads of every requested tensor at once (readahead for cold files), in as few
    // calls as the spans allow: with `layers = "all"` they are most of the file.
    let mut spans: Vec<Range<usize>> = cx
        .outputs
        .iter()
        .flat_map(|o| std::iter::once(&o.layer.name).chain(o.layer.lora_up.as_ref().map(|u| &u.0)))
        .filter_map(|name| st.header().find(name).map(|(_, e)| e.span.clone()))
        .collect();
    for range in coalesce(&mut spans, PREFETCH_GAP) {
        st.prefetch_range(range);
    }
    for out in 0..cx.outputs.len() {
        // After a fatal error elsewhere, only the cheap header checks run, so the error report
        // lists every broken model without reading any more tensor data.
        let result = if cx.abort.load(Ordering::Relaxed) {
            check_entry(&st, &open.indices, &cx.outputs[out].layer)
                .map(|_| RowOutcome::Dropped("not read: the run stopped on an error".into()))
                .map_err(|message| Problem {
                    fatal: cx.opts.on_bad_file == OnError::Fail,
                    message,
                })
        } else {
            extract_row(
                cx,
                &open,
                out,
                slot,
                &mut outcome.findings,
                &mut outcome.bytes_read,
            )
        };
        match result {
            Ok(r) => outcome.rows.push(r),
            Err(p) => {
                if p.fatal {
                    cx.abort.store(true, Ordering::Relaxed);
                }
                // A bad file leaves the whole model out, not just this layer.
                outcome.rows.push(RowOutcome::Dropped(p.message.clone()));
                outcome.label = Err(Problem {
                    fatal: p.fatal,
                    message: prefix_path(&model.path, p.message),
                });
                return outcome;
            }
        }
    }
    outcome
}

/// Spans closer than this are read ahead as one range (the pages between cost less than a call).
const PREFETCH_GAP: usize = 1 << 20;

/// Sorts `spans` and merges those that overlap or lie within `gap` bytes of each other.
fn coalesce(spans: &mut [Range<usize>], gap: usize) -> Vec<Range<usize>> {
    spans.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<usize>> = Vec::new();
    for r in spans.iter().filter(|r| !r.is_empty()) {
        match merged.last_mut() {
            Some(last) if r.start <= last.end.saturating_add(gap) => last.end = last.end.max(r.end),
            _ => merged.push(r.clone()),
        }
    }
    merged
}

fn prefix_path(path: &Path, message: String) -> String {
    let p = path.display().to_string();
    if message.starts_with(&p) {
        message
    } else {
        format!("{p}: {message}")
    }
}

/// Keeps the label rows `rows` of `labels` (which has one row per labelled model).
fn select_rows(labels: &Labels, rows: &[usize]) -> Labels {
    match labels {
        Labels::MultiLabel { classes, targets } => {
            let w = classes.len();
            Labels::MultiLabel {
                classes: classes.clone(),
                targets: rows
                    .iter()
                    .flat_map(|&r| targets[r * w..(r + 1) * w].iter().copied())
                    .collect(),
            }
        }
        Labels::Class { classes, targets } => Labels::Class {
            classes: classes.clone(),
            targets: rows.iter().map(|&r| targets[r]).collect(),
        },
        Labels::Numeric { targets, transform } => Labels::Numeric {
            targets: rows.iter().map(|&r| targets[r]).collect(),
            transform: transform.clone(),
        },
    }
}

/// Extracts every layer of `outputs` from every model of `models`, in one pass over the files,
/// and writes one layer dataset per output directory.
///
/// `models` must have unique ids; rows follow the id order (sorted here), so a run is
/// reproducible. Models whose label is missing or malformed fail the run or are skipped (per
/// `label.on_error`); skipped models and NaN/Inf findings are in the report and in each
/// layer's sidecar. Each row's source digest is its model file's blake3, which this hashes
/// (see [`extract_with_digests`] to take it from a stat cache).
pub fn extract(
    models: &[ModelSource],
    outputs: &[LayerOutput],
    label: &LabelSpec,
    opts: &ExtractOptions,
) -> Result<ExtractReport, ExtractError> {
    extract_with_digests(models, outputs, label, opts, &FileDigests::in_memory())
}

/// [`extract`], with the files' digests from `digests`: the stage passes the run's stat cache,
/// which planning filled (a folder's fetch hashes every model file for its key), so a file
/// costs a stat here, not a second read.
pub fn extract_with_digests(
    models: &[ModelSource],
    outputs: &[LayerOutput],
    label: &LabelSpec,
    opts: &ExtractOptions,
    digests: &FileDigests,
) -> Result<ExtractReport, ExtractError> {
    let started = Instant::now();
    if outputs.is_empty() {
        return Err(ExtractError::Config("no layers to extract".into()));
    }
    if models.is_empty() {
        return Err(ExtractError::Config("no models to extract from".into()));
    }
    let mut models: Vec<&ModelSource> = models.iter().collect();
    models.sort_by(|a, b| a.id.cmp(&b.id));
    if let Some(w) = models.windows(2).find(|w| w[0].id == w[1].id) {
        return Err(ExtractError::Config(format!(
            "two models have the id `{}`: {} and {}",
            w[0].id,
            w[0].path.display(),
            w[1].path.display()
        )));
    }
    // A layer is read where it is unless a copy pays: a conversion was asked for, or NaN/Inf
    // values are to be zeroed (the file's bytes are not the row then).
    let referenced: Vec<bool> = outputs
        .iter()
        .map(|o| {
            opts.in_place
                && opts.non_finite != NonFinitePolicy::Zero
                && opts.precision.is_none_or(|p| p == o.layer.source_precision)
        })
        .collect();
    // A copied LoRA layer is laid out at its largest rank before the pass; a referenced one
    // learns its models' ranks in the pass, so its files' headers are read once, not twice.
    let outputs = &widen_lora_ranks(&models, outputs, &referenced);
    let labeler = Labeler::new(label.clone()).map_err(ExtractError::Config)?;
    let splits = SplitAssigner::new(&opts.splits).map_err(ExtractError::Config)?;
    let label_width = match &label.vocab {
        Some(v) => Some(v.classes().len()),
        // Inferred vocabularies are known only at the end: reserve for the worst case.
        None if label.kind == crate::labels::LabelKind::MultiLabel => Some(100_000),
        None => None,
    };
    let precision: Vec<Precision> = outputs
        .iter()
        .map(|o| opts.precision.unwrap_or(o.layer.source_precision))
        .collect();
    let mut storage: Vec<Storage> = outputs
        .iter()
        .zip(&referenced)
        .map(|(o, &r)| match o.layer.storage {
            _ if !r => o.layer.storage,
            Storage::References { lora_rank } => Storage::References { lora_rank },
            _ => Storage::References { lora_rank: None },
        })
        .collect();
    let files: Vec<LayerFile> = outputs
        .iter()
        .zip(precision.iter().zip(&storage))
        .map(|(o, (&p, &st))| {
            LayerFile::create(
                &o.dir,
                &o.layer.name,
                p,
                st,
                o.layer.matrix,
                models.len(),
                label_width,
            )
            .map_err(io_err(&o.dir))
        })
        .collect::<Result<_, _>>()?;
    let abort = AtomicBool::new(false);
    let bytes_read = AtomicU64::new(0);
    let write_errors: Mutex<Vec<(String, std::io::Error)>> = Mutex::new(Vec::new());
    let flagged: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());
    // One writer thread per layer file: buffered writes to one file serialise on its inode
    // lock, and page-cache writes cost more than reads, so reads (rayon) overlap with writes.
    // The bounded queues keep at most a few rows in flight.
    let depth = 4 * rayon::current_num_threads() + 8;
    let budget = ByteBudget {
        limit: IN_FLIGHT_BYTES,
        used: Mutex::new(0),
        freed: Condvar::new(),
    };
    let outcomes: Vec<ModelOutcome> = std::thread::scope(|scope| {
        let mut sinks = Vec::with_capacity(files.len());
        for (out_i, file) in files.iter().enumerate() {
            let (tx, rx) = sync_channel::<Job>(depth);
            sinks.push(tx);
            let errors = &write_errors;
            let abort = &abort;
            let flagged = &flagged;
            let budget = &budget;
            let precision = precision[out_i];
            scope.spawn(move || {
                for job in rx {
                    let result = match &job.bytes {
                        RowBytes::Mapped(map, range) => match map.as_ref().get(range.clone()) {
                            Some(b) => {
                                write_scanned(file, job.slot, job.part, precision, b).map(|bad| {
                                    if bad > 0
                                        && let Ok(mut f) = flagged.lock()
                                    {
                                        f.push((out_i, job.slot));
                                    }
                                })
                            }
                            None => Err(std::io::Error::other("row span outside its mapping")),
                        },
                        RowBytes::Owned(v) => {
                            let r = file.write_row(job.slot, job.part, v);
                            budget.release(v.len());
                            r
                        }
                    };
                    if let Err(e) = result {
                        abort.store(true, Ordering::Relaxed);
                        if let Ok(mut v) = errors.lock() {
                            v.push((file.path().display().to_string(), e));
                        }
                    }
                }
            });
        }
        let cx = Ctx {
            outputs,
            precision: &precision,
            referenced: &referenced,
            budget: &budget,
            sinks: &sinks,
            labeler: &labeler,
            splits: &splits,
            opts,
            digests,
            abort: &abort,
        };
        models
            .par_iter()
            .enumerate()
            .map(|(slot, m)| {
                let o = process_model(&cx, slot, m);
                bytes_read.fetch_add(o.bytes_read, Ordering::Relaxed);
                o
            })
            .collect()
        // `sinks` drops here, ending the writers; the scope joins them.
    });
    // A failed write is about the output (a full disk), not the models being read: the first
    // error says it, the rows after it failed the same way.
    if let Some((path, error)) = write_errors
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .next()
    {
        for f in &files {
            let _ = std::fs::remove_file(f.path());
        }
        return Err(ExtractError::Io { path, error });
    }
    let mut outcomes = outcomes;
    let mut flagged = flagged.into_inner().unwrap_or_default();
    flagged.sort_unstable();
    flagged.dedup();
    for (out_i, slot) in flagged {
        let o = &mut outcomes[slot];
        if o.label.is_err() || o.split.is_err() {
            continue; // left out anyway
        }
        match recheck_flagged(
            opts,
            precision[out_i],
            models[slot],
            &outputs[out_i].layer,
            &files[out_i],
            slot,
            &mut o.findings,
        ) {
            Ok(None) => {}
            Ok(Some(why)) => o.rows[out_i] = RowOutcome::Dropped(why),
            Err(p) => {
                o.label = Err(p);
            }
        }
    }

    // Failures first: every fatal problem, in id order.
    let mut failures = Vec::new();
    for (m, o) in models.iter().zip(&outcomes) {
        for p in [o.label.as_ref().err(), o.split.as_ref().err()]
            .into_iter()
            .flatten()
        {
            if p.fatal {
                failures.push(format!("{}: {}", m.id, p.message));
            }
        }
    }
    if !failures.is_empty() {
        for f in &files {
            let _ = std::fs::remove_file(f.path());
        }
        return Err(ExtractError::Models(failures));
    }

    // Models with a label and a split, in slot order; their labels define the classes.
    let mut skipped = Vec::new();
    let mut labelled = Vec::new();
    let mut values = Vec::new();
    for (slot, (m, o)) in models.iter().zip(&outcomes).enumerate() {
        match (&o.label, &o.split) {
            (Ok(v), Ok(s)) => {
                labelled.push((slot, *s));
                values.push(v.clone());
            }
            (Err(p), _) | (_, Err(p)) => skipped.push(Skipped {
                id: m.id.clone(),
                reason: p.message.clone(),
            }),
        }
    }
    if labelled.is_empty() {
        for f in &files {
            let _ = std::fs::remove_file(f.path());
        }
        return Err(ExtractError::Config(format!(
            "no model is left to extract: all {} were skipped (first: {})",
            models.len(),
            skipped.first().map(|s| s.reason.as_str()).unwrap_or("")
        )));
    }
    let all_labels = labeler.assemble(&values).map_err(ExtractError::Config)?;
    if all_labels.width() == 0 {
        return Err(ExtractError::Config(format!(
            "label key `{}` gives no classes (every list is empty)",
            label.key
        )));
    }
    if label_width.is_some_and(|w| all_labels.width() > w) {
        return Err(ExtractError::Config(format!(
            "label key `{}` has {} classes, more than the {} supported without a vocabulary",
            label.key,
            all_labels.width(),
            label_width.unwrap_or(0)
        )));
    }

    let label_columns = match &all_labels {
        Labels::MultiLabel { classes, .. } => Some(classes.len()),
        _ => None,
    };
    let mut reports = Vec::new();
    let mut bytes_written = 0;
    for (out_i, (out, file)) in outputs.iter().zip(files).enumerate() {
        let mut kept_slots = Vec::new();
        let mut kept_label_rows = Vec::new();
        let mut records = Vec::new();
        let mut references = Vec::new();
        let mut layer_skipped = skipped.clone();
        for (row, &(slot, split)) in labelled.iter().enumerate() {
            let m = models[slot];
            let o = &outcomes[slot];
            match o.rows.get(out_i) {
                Some(RowOutcome::Written { reference }) => {
                    kept_slots.push(slot);
                    kept_label_rows.push(row);
                    references.extend(reference.clone());
                    records.push(ModelRecord {
                        id: m.id.clone(),
                        split,
                        source_digest: o.file_digest.clone().unwrap_or_default(),
                    });
                }
                Some(RowOutcome::Dropped(why)) => layer_skipped.push(Skipped {
                    id: m.id.clone(),
                    reason: why.clone(),
                }),
                None => layer_skipped.push(Skipped {
                    id: m.id.clone(),
                    reason: "not extracted".into(),
                }),
            }
        }
        layer_skipped.sort_by(|a, b| a.id.cmp(&b.id));
        let labels = select_rows(&all_labels, &kept_label_rows);
        let tensors_path = file.path().to_path_buf();
        if kept_slots.is_empty() {
            let _ = std::fs::remove_file(&tensors_path);
            return Err(ExtractError::Config(format!(
                "layer `{}`: every model was left out (first: {})",
                out.layer.name,
                layer_skipped
                    .first()
                    .map(|s| s.reason.as_str())
                    .unwrap_or("")
            )));
        }
        // A referenced LoRA layer's rank is its models' largest (loading pads lower ones).
        if let Storage::References {
            lora_rank: Some(rank),
        } = &mut storage[out_i]
        {
            *rank = references
                .iter()
                .filter_map(|r| r.tensors.last().and_then(|down| down.shape.first()))
                .fold(*rank, |a, &b| a.max(b));
        }
        let size = file
            .finish(&kept_slots, &labels.as_f32(), label_columns)
            .map_err(io_err(&tensors_path))?;
        bytes_written += size;
        let sidecar = Sidecar {
            format: LayerDataset::FORMAT,
            layer: out.layer.info(),
            shape: out.layer.matrix,
            precision: precision[out_i],
            storage: storage[out_i],
            references,
            models: records,
            label_key: label.key.clone(),
            labels: labels.without_targets(),
            skipped: layer_skipped.clone(),
        };
        let sidecar_path = out.dir.join(SIDECAR_FILE);
        // Compact: an in-place sidecar lists every row's file and tensors (~0.1 MB per
        // thousand models and layer).
        let json = serde_json::to_vec(&sidecar)
            .map_err(|e| ExtractError::Config(format!("{}: {e}", sidecar_path.display())))?;
        std::fs::write(&sidecar_path, json).map_err(io_err(&sidecar_path))?;
        reports.push(LayerReport {
            layer: out.layer.info(),
            dir: out.dir.clone(),
            rows: kept_slots.len(),
            skipped: layer_skipped,
            sidecar,
        });
    }

    let mut non_finite: Vec<NonFiniteFinding> =
        outcomes.into_iter().flat_map(|o| o.findings).collect();
    non_finite.sort_by(|a, b| (&a.model, &a.layer).cmp(&(&b.model, &b.layer)));
    Ok(ExtractReport {
        layers: reports,
        skipped,
        non_finite,
        files: models.len(),
        bytes_read: bytes_read.into_inner(),
        bytes_written,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `outputs` with each LoRA layer's rank raised to the largest rank any model has for it, so
/// that every model's factors fit the layer's rows (lower ranks are zero-padded).
///
/// Reads every header once more (a few kB each); headers that cannot be read are left to the
/// extraction pass, which reports them with everything else about that file.
fn widen_lora_ranks(
    models: &[&ModelSource],
    outputs: &[LayerOutput],
    referenced: &[bool],
) -> Vec<LayerOutput> {
    let mut outputs = outputs.to_vec();
    // A referenced pair is checked against no rank: its rows are what the files hold.
    for (o, _) in outputs.iter_mut().zip(referenced).filter(|(_, r)| **r) {
        if let Storage::LoraFactors { rank } = o.layer.storage {
            o.layer.storage = Storage::References {
                lora_rank: Some(rank),
            };
        }
    }
    if !outputs
        .iter()
        .any(|o| matches!(o.layer.storage, Storage::LoraFactors { .. }))
    {
        return outputs;
    }
    let ranks: Vec<Vec<usize>> = models
        .par_iter()
        .map(|m| {
            let header = read_header(&m.path).ok();
            outputs
                .iter()
                .map(|o| {
                    // Only pairs that form the layer's matrix count: any other is an error the
                    // extraction pass reports, and must not size every model's rows.
                    let (h, (up, _)) = (header.as_ref()?, o.layer.lora_up.as_ref()?);
                    let (_, down) = h.find(&o.layer.name)?;
                    let (_, up) = h.find(up)?;
                    let fits = transform::plan_lora(&up.shape, &down.shape).ok()? == o.layer.matrix;
                    fits.then(|| down.shape[0])
                })
                .map(|r| r.unwrap_or(0))
                .collect()
        })
        .collect();
    for (i, o) in outputs.iter_mut().enumerate() {
        if let Storage::LoraFactors { rank } = &mut o.layer.storage {
            *rank = ranks.iter().map(|r| r[i]).fold(*rank, usize::max);
        }
    }
    outputs
}

/// Summary of the split sizes of a layer's rows, for logs (`train 701, val 100, test 201`).
pub fn split_counts(records: &[ModelRecord]) -> BTreeMap<Split, usize> {
    let mut m = BTreeMap::new();
    for r in records {
        *m.entry(r.split).or_insert(0) += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::{Precision, coalesce, count_non_finite_bytes};

    /// The blockwise count equals a plain count across block edges, for every float width.
    #[test]
    fn non_finite_counts_are_exact_across_blocks() {
        let n = 3 * (1 << 16) + 7;
        let bad_at =
            |i: usize| i.is_multiple_of(997) || i == (1 << 16) - 1 || i == 1 << 16 || i == n - 1;
        let f32s: Vec<u8> = (0..n)
            .flat_map(|i| {
                let v = match (bad_at(i), i % 3) {
                    (true, 0) => f32::NAN,
                    (true, 1) => f32::INFINITY,
                    (true, _) => f32::NEG_INFINITY,
                    (false, _) => i as f32 * 1e-3 - 10.0,
                };
                v.to_le_bytes()
            })
            .collect();
        let want = (0..n).filter(|&i| bad_at(i)).count();
        assert!(want > 100);
        assert_eq!(count_non_finite_bytes(&f32s, Precision::F32), want);
        let halves = |f: fn(f32) -> [u8; 2]| -> Vec<u8> {
            f32s.chunks_exact(4)
                .flat_map(|c| f(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect()
        };
        let f16s = halves(|v| half::f16::from_f32(v).to_le_bytes());
        let bf16s = halves(|v| half::bf16::from_f32(v).to_le_bytes());
        assert_eq!(count_non_finite_bytes(&f16s, Precision::F16), want);
        assert_eq!(count_non_finite_bytes(&bf16s, Precision::Bf16), want);
    }

    #[test]
    fn prefetch_spans_merge_when_close_and_stay_apart_when_far() {
        let mut spans = vec![100..200, 0..50, 60..70, 5000..6000, 180..300, 7..7];
        assert_eq!(
            coalesce(&mut spans, 5),
            vec![0..50, 60..70, 100..300, 5000..6000]
        );
        assert_eq!(coalesce(&mut spans, 10), vec![0..70, 100..300, 5000..6000]);
        assert_eq!(coalesce(&mut spans, 10_000), vec![0..6000]);
        assert!(coalesce(&mut [], 10).is_empty());
    }
}
