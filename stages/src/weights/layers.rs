//! The layer list of a model: what `layer = N` means.
//!
//! For a plain model, layer `N` is the `N`-th name of the lexicographically sorted tensor-name
//! list (byte order, as Python's `sorted`), so `layer.10` comes before `layer.2`: that is the
//! paper's index. For a LoRA file, layer `N` is the `N`-th of the sorted names containing
//! `.lora.down.weight`, paired with its `.lora.up.weight`.

use serde::{Deserialize, Serialize};

use super::reader::{Header, TensorEntry};
use super::transform::{self, Transform};

/// The marker of a LoRA down factor in a tensor name (diffusers' PEFT-less LoRA format).
pub const LORA_DOWN: &str = ".lora.down.weight";
/// The marker of the matching up factor.
pub const LORA_UP: &str = ".lora.up.weight";

/// How a file's tensors become layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerMode {
    /// LoRA pairs when the file has any `.lora.down.weight` tensor, plain tensors otherwise.
    #[default]
    Auto,
    /// Every tensor is a layer.
    Tensors,
    /// Only LoRA pairs are layers.
    Lora,
}

impl LayerMode {
    /// The concrete mode (`Tensors` or `Lora`) for a file with this header.
    pub fn resolve(self, header: &Header) -> LayerMode {
        match self {
            LayerMode::Auto => {
                if header.tensors.iter().any(|t| t.name.contains(LORA_DOWN)) {
                    LayerMode::Lora
                } else {
                    LayerMode::Tensors
                }
            }
            m => m,
        }
    }
}

/// One layer of a model, as `probex layers FILE` prints it and as extraction uses it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRow {
    /// The paper's layer index.
    pub index: usize,
    /// Tensor name (the down factor's name for LoRA).
    pub name: String,
    /// Shape in the file (the down factor's for LoRA).
    pub shape: Vec<usize>,
    /// Dtype name in the file (`F32`, `BF16`, `I64`, ...).
    pub dtype: String,
    /// The matrix `[d_H, d_W]` a probe would see; `None` when the tensor cannot be a probe input
    /// (not floating point, no elements), with the reason in `note`.
    pub matrix: Option<[usize; 2]>,
    /// The transform from tensor to matrix, when there is a matrix.
    pub transform: Option<Transform>,
    /// For LoRA, the up factor's name.
    pub lora_up: Option<String>,
    /// Why there is no matrix, if there is none.
    pub note: Option<String>,
}

/// True for the dtypes that decode to f32 weights.
pub fn is_float(dtype: safetensors::Dtype) -> bool {
    use safetensors::Dtype;
    matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
}

fn dtype_name(dtype: safetensors::Dtype) -> String {
    format!("{dtype:?}")
}

/// The layer rows of a header in `mode` (resolved against the header when `Auto`).
///
/// A LoRA down factor without its up factor is an error: the pair cannot be formed and the
/// index of every later layer would be ambiguous.
///
/// For a partial file (see [`super::partial`]) the rows are those of the original file, so
/// indices are the paper's; layers whose tensors the file does not hold have no matrix and a
/// note saying so (`all` and patterns skip them; naming one is an error with that note).
pub fn layer_rows(header: &Header, mode: LayerMode) -> Result<Vec<LayerRow>, String> {
    let Some(original) = super::partial::original(header)? else {
        return rows_of(header, mode);
    };
    let mut rows = rows_of(&original, mode)?;
    for r in &mut rows {
        let missing: Vec<&str> = std::iter::once(r.name.as_str())
            .chain(r.lora_up.as_deref())
            .filter(|n| header.find(n).is_none())
            .collect();
        if !missing.is_empty() {
            r.matrix = None;
            r.transform = None;
            r.note = Some(format!(
                "`{}` is not in this partial file (fetch downloaded only the tensors it was \
                 asked for): add the layer to the fetch stage's `layers` or `tensors`",
                missing.join("`, `")
            ));
        }
    }
    Ok(rows)
}

/// The paper's index of tensor `name` in `header`: its position in the sorted name list, or
/// for a LoRA layer (`lora` set, `name` a down factor) among the sorted down factors. Partial
/// files count in their original tensor list. `None` when `name` is not listed.
pub fn layer_index(header: &Header, name: &str, lora: bool) -> Result<Option<usize>, String> {
    let original = super::partial::original(header)?;
    let h = original.as_ref().unwrap_or(header);
    let Some((pos, _)) = h.find(name) else {
        return Ok(None);
    };
    Ok(Some(if lora {
        h.tensors[..pos]
            .iter()
            .filter(|t| t.name.contains(LORA_DOWN))
            .count()
    } else {
        pos
    }))
}

fn rows_of(header: &Header, mode: LayerMode) -> Result<Vec<LayerRow>, String> {
    match mode.resolve(header) {
        LayerMode::Lora => lora_rows(header),
        _ => Ok(header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| plain_row(i, t))
            .collect()),
    }
}

fn plain_row(index: usize, t: &TensorEntry) -> LayerRow {
    let (matrix, transform, note) = if !is_float(t.dtype) {
        (
            None,
            None,
            Some(format!("{:?} is not a floating-point weight", t.dtype)),
        )
    } else {
        match transform::plan(&t.shape) {
            Ok((tr, m)) => (Some(m), Some(tr), None),
            Err(e) => (None, None, Some(e)),
        }
    };
    LayerRow {
        index,
        name: t.name.clone(),
        shape: t.shape.clone(),
        dtype: dtype_name(t.dtype),
        matrix,
        transform,
        lora_up: None,
        note,
    }
}

/// The up factor's name for a down factor's name (the last `.lora.down.weight` replaced).
pub fn lora_up_name(down: &str) -> Option<String> {
    let at = down.rfind(LORA_DOWN)?;
    Some(format!(
        "{}{}{}",
        &down[..at],
        LORA_UP,
        &down[at + LORA_DOWN.len()..]
    ))
}

fn lora_rows(header: &Header) -> Result<Vec<LayerRow>, String> {
    let mut rows = Vec::new();
    // header.tensors is sorted, so the down names come out sorted too.
    for down in header.tensors.iter().filter(|t| t.name.contains(LORA_DOWN)) {
        let index = rows.len();
        let up_name = lora_up_name(&down.name).unwrap_or_default();
        let Some((_, up)) = header.find(&up_name) else {
            return Err(format!(
                "LoRA layer {index} `{}` has no up factor `{up_name}`",
                down.name
            ));
        };
        let (matrix, transform, note) = if !is_float(down.dtype) || !is_float(up.dtype) {
            (
                None,
                None,
                Some(format!(
                    "{:?}/{:?} are not floating-point weights",
                    up.dtype, down.dtype
                )),
            )
        } else {
            match transform::plan_lora(&up.shape, &down.shape) {
                Ok(m) => (Some(m), Some(Transform::LoraProduct), None),
                Err(e) => (None, None, Some(e)),
            }
        };
        rows.push(LayerRow {
            index,
            name: down.name.clone(),
            shape: down.shape.clone(),
            dtype: dtype_name(down.dtype),
            matrix,
            transform,
            lora_up: Some(up_name),
            note,
        });
    }
    Ok(rows)
}

/// The layer rows of the file at `path`, reading only its header (for `probex layers FILE`).
pub fn list_layers(
    path: &std::path::Path,
    mode: LayerMode,
) -> Result<Vec<LayerRow>, super::WeightsError> {
    let header = super::reader::read_header(path)?;
    layer_rows(&header, mode).map_err(|m| super::WeightsError::invalid(path.display(), m))
}

/// Formats layer rows as the aligned text table `probex layers FILE` prints:
/// index, name, shape, dtype, and the matrix a probe sees (or why there is none).
pub fn format_layer_table(rows: &[LayerRow]) -> String {
    let shape = |s: &[usize]| {
        format!(
            "[{}]",
            s.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            let matrix = match (r.matrix, r.transform) {
                (Some([h, w]), Some(t)) => format!("{h} x {w} ({t})"),
                _ => format!("- ({})", r.note.as_deref().unwrap_or("not a matrix")),
            };
            [
                r.index.to_string(),
                r.name.clone(),
                shape(&r.shape),
                r.dtype.clone(),
                matrix,
            ]
        })
        .collect();
    let head = ["index", "name", "shape", "dtype", "matrix"];
    let mut width = head.map(str::len);
    for c in &cells {
        for (w, v) in width.iter_mut().zip(c) {
            *w = (*w).max(v.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |c: [&str; 5]| {
        let text = format!(
            "{:>w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}",
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3]
        );
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(head);
    for c in &cells {
        line([&c[0], &c[1], &c[2], &c[3], &c[4]]);
    }
    out
}
