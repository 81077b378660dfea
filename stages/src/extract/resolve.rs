//! Resolving a layer selector against a reference model: which tensors, in which list, at
//! which shape and storage every other model is then checked against.

use super::*;

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
    header: probex_weights::Header,
    list: LayerList,
}

impl LayerResolver {
    /// Reads `reference`'s header and its layer list in `mode`.
    pub fn open(reference: &Path, mode: LayerMode) -> Result<Self, WeightsError> {
        let label = reference.display().to_string();
        let header = read_header(reference)?;
        let list = LayerList::of(&header, mode).map_err(|m| WeightsError::layers(&label, m))?;
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
            .map_err(|m| WeightsError::layers(label, m))?;
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
            WeightsError::Layers { .. } | WeightsError::Invalid { .. } => WeightsError::invalid(
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
