//! The layer list of a model: what `layer = N` means.
//!
//! Layer `N` is the `N`-th tensor of the model's layer list: for the architectures the paper
//! uses (Hugging Face ViT and ResNet, SD LoRAs) the paper's per-architecture list, for anything
//! else the weight-matrix fallback, or every tensor on request; see [`super::arch`] for the
//! lists and why. Lists are sorted by name in byte order (as Python's `sorted`), so `layer.10`
//! comes before `layer.2`. A LoRA layer is a `.lora.down.weight` factor paired with its
//! `.lora.up.weight`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::arch::IncompleteArchitecture;
pub use super::arch::{Architecture, LORA_DOWN, LORA_UP};
use super::partial::PartialError;
use super::reader::{Header, TensorEntry};
use super::select::{LayerSelector, SelectorError};
use super::transform::{self, Transform};

/// Why a file's layer list cannot be made, or a selector picks nothing usable in it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayerError {
    /// A partial file whose original tensor table is corrupt.
    #[error(transparent)]
    Partial(#[from] PartialError),
    /// A file that lacks tensors of the architecture it was taken for.
    #[error(transparent)]
    Incomplete(#[from] IncompleteArchitecture),
    /// The selector does not fit the list.
    #[error(transparent)]
    Selector(#[from] SelectorError),
    /// A selector names a tensor the list leaves out.
    #[error(
        "`{name}` is a tensor of this file but not a layer: layers here are {architecture} \
         ({}); {hint}",
        architecture.rule()
    )]
    NotALayer {
        /// The tensor.
        name: String,
        /// The list in use.
        architecture: Architecture,
        /// How to reach it.
        hint: &'static str,
    },
    /// The list is empty.
    #[error(
        "this file has no layers: layers here are {0} ({rule}); set `mode = \"tensors\"` to \
         count every tensor",
        rule = .0.rule()
    )]
    NoLayers(Architecture),
    /// A LoRA down factor without its up factor.
    #[error("LoRA layer {index} `{down}` has no up factor `{up}`")]
    NoUpFactor {
        /// The layer's index.
        index: usize,
        /// The down factor.
        down: String,
        /// The up factor's expected name.
        up: String,
    },
}

/// Which layer list to use: the one the file's names call for, or one asked for by name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerMode {
    /// The list of the architecture recognised from the tensor names
    /// ([`Architecture::detect`]): LoRA, ViT, ResNet, else the weight-matrix fallback.
    #[default]
    Auto,
    /// Every tensor is a layer (biases and norms too): the opt-in for the old meaning.
    Tensors,
    /// Only LoRA pairs are layers.
    Lora,
    /// The paper's ViT list; an error on a file that lacks part of it.
    Vit,
    /// The paper's ResNet list; an error on a file that lacks part of it.
    Resnet,
    /// The weight-matrix fallback, whatever the architecture.
    Matrices,
}

impl LayerMode {
    /// Every mode, for tools and tests that try them all.
    pub const ALL: [LayerMode; 6] = [
        LayerMode::Auto,
        LayerMode::Tensors,
        LayerMode::Lora,
        LayerMode::Vit,
        LayerMode::Resnet,
        LayerMode::Matrices,
    ];

    /// The list this mode asks for, or `None` for `Auto` (decided per file).
    pub fn fixed(self) -> Option<Architecture> {
        match self {
            LayerMode::Auto => None,
            LayerMode::Tensors => Some(Architecture::AllTensors),
            LayerMode::Lora => Some(Architecture::SdLora),
            LayerMode::Vit => Some(Architecture::Vit),
            LayerMode::Resnet => Some(Architecture::Resnet),
            LayerMode::Matrices => Some(Architecture::Matrices),
        }
    }

    /// The list for a file with this header, checked to be whole in it (so an index means the
    /// same tensor as in the paper). For a partial file pass its original header
    /// ([`super::partial::original`]); [`LayerList::of`] does.
    pub fn resolve(self, header: &Header) -> Result<Architecture, IncompleteArchitecture> {
        let arch = self.fixed().unwrap_or_else(|| Architecture::detect(header));
        arch.check(header)?;
        Ok(arch)
    }
}

impl From<Architecture> for LayerMode {
    fn from(a: Architecture) -> LayerMode {
        match a {
            Architecture::Vit => LayerMode::Vit,
            Architecture::Resnet => LayerMode::Resnet,
            Architecture::SdLora => LayerMode::Lora,
            Architecture::Matrices => LayerMode::Matrices,
            Architecture::AllTensors => LayerMode::Tensors,
        }
    }
}

/// One layer of a model, as `probex layers FILE` prints it and as extraction uses it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRow {
    /// The layer index: the position in the layer list (the paper's index for the
    /// architectures it uses).
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

/// The layers of one model file: the list they come from and one row per layer, in index
/// order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerList {
    /// The list the indices count in.
    pub architecture: Architecture,
    /// One row per layer; `rows[i].index == i`.
    pub rows: Vec<LayerRow>,
    /// The names of the file's tensors that are not layers (to say so when one is named).
    unlisted: BTreeSet<String>,
}

impl LayerList {
    /// The layers of a header in `mode` (the list recognised from its names when `Auto`).
    ///
    /// A file that lacks part of its architecture's list is an error naming what is missing
    /// (its indices would not be the paper's). A LoRA down factor without its up factor is an
    /// error: the pair cannot be formed and the index of every later layer would be ambiguous.
    ///
    /// For a partial file (see [`super::partial`]) the list is that of the original file, so
    /// indices are the paper's; layers whose tensors the file does not hold have no matrix and
    /// a note saying so (`all` and patterns skip them; naming one is an error with that note).
    pub fn of(header: &Header, mode: LayerMode) -> Result<LayerList, LayerError> {
        Self::with_original(header, mode).map(|(list, _)| list)
    }

    /// [`LayerList::of`], and the original header of a partial file (read once for both).
    fn with_original(
        header: &Header,
        mode: LayerMode,
    ) -> Result<(LayerList, Option<Header>), LayerError> {
        let original = super::partial::original(header)?;
        let whole = original.as_ref().unwrap_or(header);
        let architecture = mode.resolve(whole)?;
        let mut rows = rows_of(whole, architecture)?;
        if original.is_some() {
            for r in &mut rows {
                let missing: Vec<&str> = std::iter::once(r.name.as_str())
                    .chain(r.lora_up.as_deref())
                    .filter(|n| header.find(n).is_none())
                    .collect();
                if !missing.is_empty() {
                    r.matrix = None;
                    r.transform = None;
                    r.note = Some(format!(
                        "`{}` is not in this partial file (fetch downloaded only the tensors it \
                         was asked for): add the layer to the fetch stage's `layers` or `tensors`",
                        missing.join("`, `")
                    ));
                }
            }
        }
        let listed: BTreeSet<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        let unlisted = whole
            .tensors
            .iter()
            .filter(|t| !listed.contains(t.name.as_str()))
            .map(|t| t.name.clone())
            .collect();
        let list = LayerList {
            architecture,
            rows,
            unlisted,
        };
        Ok((list, original))
    }

    /// The indices (ascending, unique) `selector` picks, as [`LayerSelector::resolve`]; naming
    /// a tensor of the file that is not in the list says so and how to reach it.
    pub fn select(&self, selector: &LayerSelector) -> Result<Vec<usize>, LayerError> {
        if let Some(name) = selector
            .names()
            .into_iter()
            .find(|n| self.unlisted.contains(*n))
        {
            let hint = match self.architecture {
                Architecture::SdLora => {
                    "name its `.lora.down.weight` factor, or set `mode = \"tensors\"` to \
                     count every tensor"
                }
                _ => "set `mode = \"tensors\"` to count every tensor",
            };
            return Err(LayerError::NotALayer {
                name: name.to_owned(),
                architecture: self.architecture,
                hint,
            });
        }
        if self.rows.is_empty() {
            return Err(LayerError::NoLayers(self.architecture));
        }
        Ok(selector.resolve(&self.rows)?)
    }
}

/// The layer rows of a header in `mode`: [`LayerList::of`] without the list's name.
pub fn layer_rows(header: &Header, mode: LayerMode) -> Result<Vec<LayerRow>, LayerError> {
    LayerList::of(header, mode).map(|l| l.rows)
}

/// The index of tensor `name` in `header` under list `architecture`: the number of listed
/// tensors sorted before it. Partial files count in their original tensor list. `None` when
/// `name` is not in the file or not in the list.
///
/// Cheap (no check that the whole list is present): extraction calls it for every model and
/// layer, against a list already checked on the first model; a model whose list differs shows
/// up as an index that disagrees.
pub fn layer_index(
    header: &Header,
    name: &str,
    architecture: Architecture,
) -> Result<Option<usize>, PartialError> {
    let original = super::partial::original(header)?;
    let h = original.as_ref().unwrap_or(header);
    let Some((pos, entry)) = h.find(name) else {
        return Ok(None);
    };
    if !architecture.lists(entry) {
        return Ok(None);
    }
    Ok(Some(
        h.tensors[..pos]
            .iter()
            .filter(|t| architecture.lists(t))
            .count(),
    ))
}

/// One list's positions by tensor name, or why the file's list cannot be read.
type ListIndex = Result<HashMap<String, usize>, PartialError>;

/// [`layer_index`] for many names of one file: each architecture's list is worked out once
/// (a partial file's original table parsed once), not once per name. Extraction asks for
/// every layer of every file, 128 names per LoRA file.
pub struct LayerIndex<'a> {
    header: &'a Header,
    lists: std::cell::RefCell<Vec<(Architecture, ListIndex)>>,
}

impl<'a> LayerIndex<'a> {
    /// An index of `header`'s lists, filled as they are asked for.
    pub fn new(header: &'a Header) -> Self {
        LayerIndex {
            header,
            lists: Default::default(),
        }
    }

    /// The position of tensor `name` in `architecture`'s list; `None` when the list does not
    /// hold it. As [`layer_index`].
    pub fn index(
        &self,
        name: &str,
        architecture: Architecture,
    ) -> Result<Option<usize>, PartialError> {
        let mut lists = self.lists.borrow_mut();
        let at = match lists.iter().position(|(a, _)| *a == architecture) {
            Some(at) => at,
            None => {
                lists.push((architecture, self.list(architecture)));
                lists.len() - 1
            }
        };
        match &lists[at].1 {
            Ok(map) => Ok(map.get(name).copied()),
            Err(m) => Err(m.clone()),
        }
    }

    fn list(&self, architecture: Architecture) -> ListIndex {
        let original = super::partial::original(self.header)?;
        let h = original.as_ref().unwrap_or(self.header);
        Ok(h.tensors
            .iter()
            .filter(|t| architecture.lists(t))
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect())
    }
}

fn rows_of(header: &Header, architecture: Architecture) -> Result<Vec<LayerRow>, LayerError> {
    match architecture {
        Architecture::SdLora => lora_rows(header),
        _ => Ok(architecture
            .list(header)
            .into_iter()
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
            Err(e) => (None, None, Some(e.to_string())),
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

fn lora_rows(header: &Header) -> Result<Vec<LayerRow>, LayerError> {
    let mut rows = Vec::new();
    // header.tensors is sorted, so the down names come out sorted too.
    for down in Architecture::SdLora.list(header) {
        let index = rows.len();
        let up_name = lora_up_name(&down.name).unwrap_or_default();
        let Some((_, up)) = header.find(&up_name) else {
            return Err(LayerError::NoUpFactor {
                index,
                down: down.name.clone(),
                up: up_name,
            });
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
                Err(e) => (None, None, Some(e.to_string())),
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

/// The layer rows of the file at `path` in `mode`, reading only its header.
pub fn list_layers(
    path: &std::path::Path,
    mode: LayerMode,
) -> Result<Vec<LayerRow>, super::WeightsError> {
    let header = super::reader::read_header(path)?;
    layer_rows(&header, mode).map_err(|m| super::WeightsError::layers(path.display(), m))
}

/// One tensor of a file as `probex layers FILE` shows it: where it sits among all the file's
/// tensors, and its layer index if it is a layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorRow {
    /// Position in the file's sorted tensor list (what `mode = "tensors"` would call it).
    pub position: usize,
    /// Layer index in the list used (what `layers = N` means), or `None` when it is no layer.
    pub layer: Option<usize>,
    /// Tensor name.
    pub name: String,
    /// Shape in the file.
    pub shape: Vec<usize>,
    /// Dtype name in the file (`F32`, `BF16`, `I64`, ...).
    pub dtype: String,
    /// For a layer, the matrix `[d_H, d_W]` a probe would see (for LoRA, of `B @ A`).
    pub matrix: Option<[usize; 2]>,
    /// The transform from tensor to matrix, when there is a matrix.
    pub transform: Option<Transform>,
    /// Why a layer has no matrix, or what a LoRA up factor belongs to.
    pub note: Option<String>,
}

/// What `probex layers FILE` prints: the list used, the rule it follows, and every tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    /// The list the layer indices count in (`vit`, `resnet`, `lora`, `matrices`, `tensors`).
    pub architecture: Architecture,
    /// What that list holds, in words.
    pub rule: String,
    /// How many layers the list has.
    pub layers: usize,
    /// Every tensor of the file (of the original, for a partial file), in name order.
    pub tensors: Vec<TensorRow>,
}

/// The listing of a header in `mode`: each tensor's position beside its layer index.
pub fn listing(header: &Header, mode: LayerMode) -> Result<Listing, LayerError> {
    let (list, original) = LayerList::with_original(header, mode)?;
    let whole = original.as_ref().unwrap_or(header);
    let by_name: BTreeMap<&str, &LayerRow> =
        list.rows.iter().map(|r| (r.name.as_str(), r)).collect();
    let up_of: BTreeMap<&str, usize> = list
        .rows
        .iter()
        .filter_map(|r| Some((r.lora_up.as_deref()?, r.index)))
        .collect();
    let tensors = whole
        .tensors
        .iter()
        .enumerate()
        .map(|(position, t)| {
            let row = by_name.get(t.name.as_str());
            TensorRow {
                position,
                layer: row.map(|r| r.index),
                name: t.name.clone(),
                shape: t.shape.clone(),
                dtype: dtype_name(t.dtype),
                matrix: row.and_then(|r| r.matrix),
                transform: row.and_then(|r| r.transform),
                note: match (row, up_of.get(t.name.as_str())) {
                    (Some(r), _) => r.note.clone(),
                    (None, Some(i)) => Some(format!("LoRA up factor of layer {i}")),
                    (None, None) => None,
                },
            }
        })
        .collect();
    Ok(Listing {
        architecture: list.architecture,
        rule: list.architecture.rule().to_string(),
        layers: list.rows.len(),
        tensors,
    })
}

/// The listing of the file at `path` in `mode`, reading only its header (`probex layers`).
pub fn describe_layers(
    path: &std::path::Path,
    mode: LayerMode,
) -> Result<Listing, super::WeightsError> {
    let header = super::reader::read_header(path)?;
    listing(&header, mode).map_err(|m| super::WeightsError::layers(path.display(), m))
}

/// Formats a listing as the text `probex layers FILE` prints: the list and its rule, then an
/// aligned table of every tensor: its position in the file, its layer index (`-` when it is
/// no layer), name, shape, dtype, and the matrix a probe sees (or why there is none).
pub fn format_layer_table(listing: &Listing) -> String {
    let shape = |s: &[usize]| {
        format!(
            "[{}]",
            s.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let cells: Vec<[String; 6]> = listing
        .tensors
        .iter()
        .map(|r| {
            let matrix = match (r.matrix, r.transform, &r.note) {
                (Some([h, w]), Some(t), _) => format!("{h} x {w} ({t})"),
                (_, _, Some(note)) if r.layer.is_some() => format!("- ({note})"),
                (_, _, Some(note)) => note.clone(),
                _ => "-".to_string(),
            };
            [
                r.position.to_string(),
                r.layer.map_or_else(|| "-".to_string(), |i| i.to_string()),
                r.name.clone(),
                shape(&r.shape),
                r.dtype.clone(),
                matrix,
            ]
        })
        .collect();
    let head = ["tensor", "layer", "name", "shape", "dtype", "matrix"];
    let mut width = head.map(str::len);
    for c in &cells {
        for (w, v) in width.iter_mut().zip(c) {
            *w = (*w).max(v.chars().count());
        }
    }
    let mut out = format!(
        "layer list: {} ({} layers of {} tensors): {}\n\
         `layer` is what `layers = N` means; `tensor` is the position among all tensors \
         (mode = \"tensors\")\n\n",
        listing.architecture,
        listing.layers,
        listing.tensors.len(),
        listing.rule
    );
    let mut line = |c: [&str; 6]| {
        let text = format!(
            "{:>w0$}  {:>w1$}  {:<w2$}  {:<w3$}  {:<w4$}  {}",
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            c[5],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3],
            w4 = width[4]
        );
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(head);
    for c in &cells {
        line([&c[0], &c[1], &c[2], &c[3], &c[4], &c[5]]);
    }
    out
}
