//! Probe checkpoints: a safetensors file whose tensors are the official PyTorch `state_dict`
//! (names and layouts) and nothing else, so a strict
//! `model.load_state_dict(safetensors.torch.load_file(path))` works, plus a JSON entry
//! `probex` in the header metadata with what PyTorch does not need (model kind, shapes, class
//! names, target scaling).
//!
//! A probe trained on standardised inputs (`standardize = true`) reads `(X - mean) / scale`;
//! `mean` and `scale` are not parameters of the PyTorch module, so they live in a second file
//! beside the checkpoint, [`STANDARDIZE_FILE`] ([`Standardization`]), which a PyTorch user
//! applies to the weights before the forward pass (docs/load_in_pytorch.py).
//!
//! A file without that entry (for example one written by PyTorch with `save_file`) still loads:
//! the ProbeX shapes are read off the tensors, and the task comes from the data it is used on.

use std::collections::HashMap;
use std::path::Path;

use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use super::{ModelKind, ModelSpec, NamedTensor};
use probex_weights::dataset::decode;

/// Why a checkpoint, standardisation or resume file cannot be read or written. `what` names
/// the file (its path, or a label for bytes in memory).
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a safetensors file.
    #[error("{what}: not a safetensors file: {source}")]
    NotSafetensors {
        /// The file.
        what: String,
        /// The safetensors reader's error.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// The safetensors file is malformed.
    #[error("{what}: {source}")]
    Safetensors {
        /// The file.
        what: String,
        /// The safetensors reader's error.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// A tensor of a dtype that is not a float.
    #[error("{what}: tensor `{tensor}`: {source}")]
    Dtype {
        /// The file.
        what: String,
        /// The tensor.
        tensor: String,
        /// The dtype.
        #[source]
        source: probex_weights::codec::NotAFloat,
    },
    /// The `probex` metadata entry is not valid.
    #[error("{what}: metadata entry `{META_KEY}`: {source}")]
    Meta {
        /// The file.
        what: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A checkpoint format this probex does not read.
    #[error(
        "{what}: checkpoint format {found} is not supported (expected {}); retrain it",
        CheckpointMeta::FORMAT
    )]
    Format {
        /// The file.
        what: String,
        /// Its format.
        found: u32,
    },
    /// A standardisation file with a tensor other than `mean` and `scale`.
    #[error(
        "{what}: unexpected tensor `{tensor}` (a standardisation file holds `mean` and `scale`)"
    )]
    StdUnexpected {
        /// The file.
        what: String,
        /// The tensor.
        tensor: String,
    },
    /// A standardisation file without `mean` or `scale`.
    #[error(
        "{what}: a standardisation file must hold the tensors `mean` [d_H, d_W] and `scale` [1]"
    )]
    StdMissing {
        /// The file.
        what: String,
    },
    /// A `mean` that is not a matrix.
    #[error("{what}: `mean` has shape {shape:?}, expected a matrix [d_H, d_W]")]
    StdMeanShape {
        /// The file.
        what: String,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A `scale` of more or less than one value.
    #[error("{what}: `scale` holds {count} values, expected one")]
    StdScaleCount {
        /// The file.
        what: String,
        /// How many values it holds.
        count: usize,
    },
    /// A `scale` that is not a positive number.
    #[error("{what}: `scale` is {value}, expected a positive number")]
    StdScaleValue {
        /// The file.
        what: String,
        /// Its value.
        value: f32,
    },
    /// A plain state dict without the ProbeX tensors.
    #[error(
        "a checkpoint without probex metadata must hold the ProbeX tensors `probes.weight`, \
         `shared_probe_proj.weight` and `per_probe_encoders.weight`"
    )]
    NoProbexTensors,
    /// ProbeX tensors of unexpected ranks.
    #[error(
        "unexpected ProbeX shapes: probes.weight {probes:?}, shared_probe_proj.weight \
         {shared:?}, per_probe_encoders.weight {encoders:?}"
    )]
    ProbexShapes {
        /// `probes.weight`'s shape.
        probes: Vec<usize>,
        /// `shared_probe_proj.weight`'s shape.
        shared: Vec<usize>,
        /// `per_probe_encoders.weight`'s shape.
        encoders: Vec<usize>,
    },
    /// A plain state dict without a head.
    #[error("checkpoint has neither `classification_head.weight` nor `regression_head.weight`")]
    NoHead,
    /// A tensor whose values do not fill its shape.
    #[error("tensor `{tensor}`: shape {shape:?} needs {needs} values, got {got}")]
    Values {
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
        /// The values the shape needs.
        needs: usize,
        /// The values given.
        got: usize,
    },
    /// A tensor name that is reserved or given twice.
    #[error("tensor name `{0}` is reserved or repeated")]
    Name(String),
    /// Metadata that cannot be written as JSON.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

impl CheckpointError {
    /// An I/O error on `path`.
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
        move |source| CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Metadata key holding [`CheckpointMeta`] as JSON.
pub const META_KEY: &str = "probex";

/// What a probe's outputs mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Independent sigmoid per class (BCE-with-logits).
    MultiLabel,
    /// One class per model (cross-entropy).
    Class,
    /// One number per model (MSE on standardised targets).
    Regression,
    /// One class per model, scored by cosine against class text embeddings.
    ZeroShot,
}

/// The task a checkpoint was trained for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskInfo {
    /// What the outputs mean.
    pub kind: TaskKind,
    /// Class names in output order (zero-shot: the training classes, in text-matrix order).
    #[serde(default)]
    pub classes: Vec<String>,
    /// Regression: outputs are `target_mean + target_std * raw` .
    #[serde(default)]
    pub target_mean: f32,
    /// Regression: see `target_mean` (1 otherwise).
    #[serde(default = "one")]
    pub target_std: f32,
    /// StatNN: training-set mean of each statistic.
    #[serde(default)]
    pub feature_mean: Vec<f32>,
    /// StatNN: training-set standard deviation of each statistic.
    #[serde(default)]
    pub feature_std: Vec<f32>,
    /// Standardised inputs: the model reads `(X - mean) / input_scale`, with `mean` and the
    /// scale in the [`STANDARDIZE_FILE`] beside the checkpoint. Kept here too so that a
    /// checkpoint separated from that file is refused instead of fed raw weights, and a file
    /// of another training (another scale) is recognised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_scale: Option<f32>,
}

/// Name of the tensor in which probex before train version 3 kept the training mean inside
/// the checkpoint (which made a strict `load_state_dict` fail); recognised only to say so.
pub const LEGACY_INPUT_MEAN: &str = "input_mean";

/// The file beside a checkpoint (same directory) holding its [`Standardization`].
pub const STANDARDIZE_FILE: &str = "standardize.safetensors";

/// What a probe trained with `standardize = true` applies to a weight matrix `X` before its
/// forward pass: `(X - mean) / scale`. Stored as [`STANDARDIZE_FILE`]: tensors `mean`
/// `[d_H, d_W]` (the training models' mean matrix) and `scale` `[1]` (the standard deviation
/// of their values around it), f32.
#[derive(Clone, Debug, PartialEq)]
pub struct Standardization {
    /// Rows of the mean matrix (`d_H`).
    pub d_h: usize,
    /// Columns of the mean matrix (`d_W`).
    pub d_w: usize,
    /// The mean matrix, row-major `[d_H, d_W]`.
    pub mean: Vec<f32>,
    /// The divisor applied after subtracting the mean.
    pub scale: f32,
}

impl Standardization {
    /// Metadata entry saying what the file is, for someone who opens it without the docs.
    const ABOUT_KEY: &'static str = "probex_standardize";
    const ABOUT: &'static str = "apply (W - mean) / scale to the weight matrix W [d_H, d_W] \
                                 before the probe's forward pass";

    /// The path of the standardisation file belonging to `checkpoint`.
    pub fn beside(checkpoint: &Path) -> std::path::PathBuf {
        checkpoint.with_file_name(STANDARDIZE_FILE)
    }

    /// Serialises to safetensors bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, CheckpointError> {
        let tensors = [
            NamedTensor {
                name: "mean".into(),
                shape: vec![self.d_h, self.d_w],
                values: self.mean.clone(),
            },
            NamedTensor {
                name: "scale".into(),
                shape: vec![1],
                values: vec![self.scale],
            },
        ];
        let meta = HashMap::from([(Self::ABOUT_KEY.to_string(), Self::ABOUT.to_string())]);
        serialize_named(&tensors, meta)
    }

    /// Parses safetensors bytes; `what` names the source in errors.
    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Standardization, CheckpointError> {
        let (_, tensors) = deserialize_named(bytes, what)?;
        let mut mean = None;
        let mut scale = None;
        for t in tensors {
            match t.name.as_str() {
                "mean" => mean = Some(t),
                "scale" => scale = Some(t),
                other => {
                    return Err(CheckpointError::StdUnexpected {
                        what: what.to_owned(),
                        tensor: other.to_owned(),
                    });
                }
            }
        }
        let (Some(mean), Some(scale)) = (mean, scale) else {
            return Err(CheckpointError::StdMissing {
                what: what.to_owned(),
            });
        };
        let &[d_h, d_w] = &mean.shape[..] else {
            return Err(CheckpointError::StdMeanShape {
                what: what.to_owned(),
                shape: mean.shape,
            });
        };
        let &[s] = &scale.values[..] else {
            return Err(CheckpointError::StdScaleCount {
                what: what.to_owned(),
                count: scale.values.len(),
            });
        };
        if !(s.is_finite() && s > 0.0) {
            return Err(CheckpointError::StdScaleValue {
                what: what.to_owned(),
                value: s,
            });
        }
        Ok(Standardization {
            d_h,
            d_w,
            mean: mean.values,
            scale: s,
        })
    }

    /// Reads a standardisation file.
    pub fn read(path: &Path) -> Result<Standardization, CheckpointError> {
        let bytes = std::fs::read(path).map_err(CheckpointError::io(path))?;
        Standardization::from_bytes(&bytes, &path.display().to_string())
    }
}

fn one() -> f32 {
    1.0
}

/// The `probex` metadata entry of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointMeta {
    /// Format version of this entry.
    pub format: u32,
    /// The model's shapes.
    pub spec: ModelSpec,
    /// The task.
    pub task: TaskInfo,
    /// The training epoch (0-based) the parameters are from.
    pub epoch: Option<usize>,
}

impl CheckpointMeta {
    /// Current format version.
    pub const FORMAT: u32 = 1;
}

/// A checkpoint in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The `probex` metadata, absent in plain PyTorch state dicts.
    pub meta: Option<CheckpointMeta>,
    /// The parameters, official names and layouts.
    pub tensors: Vec<NamedTensor>,
}

impl Checkpoint {
    /// Serialises to safetensors bytes (tensors in the given order, f32).
    pub fn to_bytes(&self) -> Result<Vec<u8>, CheckpointError> {
        let mut meta = HashMap::new();
        if let Some(m) = &self.meta {
            meta.insert(META_KEY.to_string(), serde_json::to_string(m)?);
        }
        serialize_named(&self.tensors, meta)
    }

    /// Parses safetensors bytes; `what` names the source in errors.
    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Checkpoint, CheckpointError> {
        let (header, tensors) = deserialize_named(bytes, what)?;
        let meta =
            match header.get(META_KEY) {
                Some(json) => Some(serde_json::from_str::<CheckpointMeta>(json).map_err(
                    |source| CheckpointError::Meta {
                        what: what.to_owned(),
                        source,
                    },
                )?),
                None => None,
            };
        if let Some(m) = &meta
            && m.format != CheckpointMeta::FORMAT
        {
            return Err(CheckpointError::Format {
                what: what.to_owned(),
                found: m.format,
            });
        }
        Ok(Checkpoint { meta, tensors })
    }

    /// Reads a checkpoint file.
    pub fn read(path: &Path) -> Result<Checkpoint, CheckpointError> {
        let bytes = std::fs::read(path).map_err(CheckpointError::io(path))?;
        Checkpoint::from_bytes(&bytes, &path.display().to_string())
    }

    /// Writes a checkpoint file atomically (temporary file, then rename).
    pub fn write(&self, path: &Path) -> Result<(), CheckpointError> {
        write_atomic(path, &self.to_bytes()?)
    }

    /// The tensors by name.
    pub fn by_name(&self) -> HashMap<String, NamedTensor> {
        self.tensors
            .iter()
            .map(|t| (t.name.clone(), t.clone()))
            .collect()
    }

    /// The model spec: from the metadata, or (plain state dicts) read off the ProbeX tensor
    /// shapes.
    pub fn spec(&self) -> Result<ModelSpec, CheckpointError> {
        if let Some(m) = &self.meta {
            return Ok(m.spec.clone());
        }
        let t = self.by_name();
        let shape = |n: &str| t.get(n).map(|t| t.shape.clone());
        let (Some(u), Some(v), Some(m)) = (
            shape("probes.weight"),
            shape("shared_probe_proj.weight"),
            shape("per_probe_encoders.weight"),
        ) else {
            return Err(CheckpointError::NoProbexTensors);
        };
        let (&[d_w, r_u], &[r_v, d_h], &[r_t, _]) = (&u[..], &v[..], &m[..]) else {
            return Err(CheckpointError::ProbexShapes {
                probes: u,
                shared: v,
                encoders: m,
            });
        };
        let mut spec = ModelSpec {
            kind: ModelKind::Probex,
            d_h,
            d_w,
            r_u,
            r_v,
            r_t,
            d_y: 0,
            d_text: 0,
            hidden: 0,
        };
        if let Some(h) = shape("classification_head.weight") {
            spec.d_y = h[0];
        } else if let Some(h) = shape("regression_head.weight") {
            spec.kind = ModelKind::ProbexZeroshot;
            spec.d_text = h.get(1).copied().unwrap_or(0);
        } else {
            return Err(CheckpointError::NoHead);
        }
        Ok(spec)
    }
}

/// Serialises named f32 tensors with header metadata, as a safetensors file whose bytes depend
/// only on the contents (tensors and header keys sorted by name; the safetensors crate takes a
/// `HashMap` and so writes metadata in random order). The entry `format = pt` is
/// added, as `safetensors.torch` does (some PyTorch tooling checks it).
pub fn serialize_named(
    tensors: &[NamedTensor],
    mut metadata: HashMap<String, String>,
) -> Result<Vec<u8>, CheckpointError> {
    metadata.insert("format".to_string(), "pt".to_string());
    let mut header = serde_json::Map::new();
    let mut items: Vec<(String, String)> = metadata.into_iter().collect();
    items.sort();
    let meta: serde_json::Map<String, serde_json::Value> = items
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    let mut tensors: Vec<&NamedTensor> = tensors.iter().collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let mut offset = 0usize;
    for t in &tensors {
        let n: usize = t.shape.iter().product();
        if n != t.values.len() {
            return Err(CheckpointError::Values {
                tensor: t.name.clone(),
                shape: t.shape.clone(),
                needs: n,
                got: t.values.len(),
            });
        }
        if t.name == "__metadata__" || header.contains_key(&t.name) {
            return Err(CheckpointError::Name(t.name.clone()));
        }
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + 4 * n]}),
        );
        offset += 4 * n;
    }
    let mut json = serde_json::to_vec(&header)?;
    // The data must start 8-byte aligned; pad the header with spaces as the reference does.
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for t in tensors {
        for v in &t.values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    Ok(out)
}

/// Parses safetensors bytes into header metadata and f32 tensors sorted by name (F16, BF16
/// and F64 are converted); `what` names the source in errors.
pub fn deserialize_named(
    bytes: &[u8],
    what: &str,
) -> Result<(HashMap<String, String>, Vec<NamedTensor>), CheckpointError> {
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|source| CheckpointError::NotSafetensors {
            what: what.to_owned(),
            source,
        })?;
    let meta = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(bytes).map_err(|source| CheckpointError::Safetensors {
        what: what.to_owned(),
        source,
    })?;
    let mut tensors = Vec::new();
    for (name, view) in st.iter() {
        let values =
            decode(view.dtype(), view.data()).map_err(|source| CheckpointError::Dtype {
                what: what.to_owned(),
                tensor: name.to_string(),
                source,
            })?;
        tensors.push(NamedTensor {
            name: name.to_string(),
            shape: view.shape().to_vec(),
            values,
        });
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((meta, tensors))
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// crash never leaves a half-written file under `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(CheckpointError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(CheckpointError::io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, shape: Vec<usize>) -> NamedTensor {
        let n = shape.iter().product();
        NamedTensor {
            name: name.into(),
            shape,
            values: (0..n).map(|i| i as f32 * 0.25).collect(),
        }
    }

    #[test]
    fn round_trips_and_infers_probex_shapes_without_metadata() {
        let c = Checkpoint {
            meta: None,
            tensors: vec![
                t("classification_head.bias", vec![3]),
                t("classification_head.weight", vec![3, 7]),
                t("per_probe_encoders.bias", vec![7]),
                t("per_probe_encoders.weight", vec![7, 8]),
                t("probes.weight", vec![5, 2]),
                t("shared_probe_proj.weight", vec![4, 6]),
            ],
        };
        let back = Checkpoint::from_bytes(&c.to_bytes().unwrap(), "mem").unwrap();
        assert_eq!(back, c);
        let s = back.spec().unwrap();
        assert_eq!(
            (s.kind, s.d_h, s.d_w, s.r_u, s.r_v, s.r_t, s.d_y),
            (ModelKind::Probex, 6, 5, 2, 4, 7, 3)
        );
    }

    #[test]
    fn standardization_round_trips_and_names_what_is_wrong() {
        let s = Standardization {
            d_h: 2,
            d_w: 3,
            mean: vec![0.5, -1.0, 2.0, 0.0, 1.5, 3.0],
            scale: 0.25,
        };
        let bytes = s.to_bytes().unwrap();
        assert_eq!(Standardization::from_bytes(&bytes, "s").unwrap(), s);
        // Exactly the two tensors a user reads: `mean` [d_H, d_W] and `scale` [1].
        let (_, tensors) = deserialize_named(&bytes, "s").unwrap();
        let shapes: Vec<(&str, &[usize])> = tensors
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
            .collect();
        assert_eq!(shapes, [("mean", &[2, 3][..]), ("scale", &[1][..])]);
        let bad = |tensors: Vec<NamedTensor>| {
            let b = serialize_named(&tensors, HashMap::new()).unwrap();
            Standardization::from_bytes(&b, "std.safetensors").unwrap_err()
        };
        let e = bad(vec![t("mean", vec![2, 3])]);
        assert!(
            matches!(&e, CheckpointError::StdMissing { what } if what == "std.safetensors"),
            "{e:?}"
        );
        let e = e.to_string();
        assert!(
            e.contains("std.safetensors") && e.contains("`scale`"),
            "{e}"
        );
        let e = bad(vec![t("mean", vec![6]), t("scale", vec![1])]);
        assert!(
            matches!(&e, CheckpointError::StdMeanShape { shape, .. } if shape == &[6]),
            "{e:?}"
        );
        let e = e.to_string();
        assert!(e.contains("[6]") && e.contains("matrix"), "{e}");
        // t() fills 0, 0.25, ...: a zero scale would divide by zero.
        let e = bad(vec![t("mean", vec![2, 3]), t("scale", vec![1])]);
        assert!(
            matches!(e, CheckpointError::StdScaleValue { value, .. } if value == 0.0),
            "{e:?}"
        );
        assert!(e.to_string().contains("positive"), "{e}");
        let e = bad(vec![
            t("mean", vec![2, 3]),
            t("scale", vec![1]),
            t("x", vec![1]),
        ]);
        let e = e.to_string();
        assert!(e.contains("unexpected tensor `x`"), "{e}");
    }

    #[test]
    fn rejects_garbage_and_foreign_state_dicts() {
        let e = Checkpoint::from_bytes(b"nope", "x.safetensors").unwrap_err();
        assert!(
            matches!(&e, CheckpointError::NotSafetensors { what, .. } if what == "x.safetensors"),
            "{e:?}"
        );
        assert!(e.to_string().contains("x.safetensors"), "{e}");
        let c = Checkpoint {
            meta: None,
            tensors: vec![t("fc.weight", vec![2, 2])],
        };
        let back = Checkpoint::from_bytes(&c.to_bytes().unwrap(), "mem").unwrap();
        let e = back.spec().unwrap_err();
        assert!(matches!(e, CheckpointError::NoProbexTensors), "{e:?}");
        assert!(e.to_string().contains("probes.weight"), "{e}");
    }
}
