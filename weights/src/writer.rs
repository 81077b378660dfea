//! Writing safetensors headers: one encoder for every file probex writes in the format (zoo
//! models, fetched partial files, generated test models), so they are laid out alike.

use std::collections::BTreeMap;

use safetensors::Dtype;

/// The JSON header of a safetensors file holding `tensors` (name, dtype, shape, byte length),
/// laid out back to back in the order given, with `metadata` as `__metadata__`: keys sorted and
/// the text padded with spaces to a multiple of 8, as the reference writer does. The same
/// tensors and metadata give the same bytes (files written with it have stable digests).
///
/// The caller writes the 8-byte little-endian length of the result, the result, then the
/// tensors' bytes in the same order. Names must be unique (a repeated name keeps its last entry).
pub fn header_json<'a>(
    tensors: impl IntoIterator<Item = (&'a str, Dtype, &'a [usize], usize)>,
    metadata: &BTreeMap<String, String>,
) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::Value::Object(
            metadata
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect(),
        ),
    );
    let mut offset = 0usize;
    for (name, dtype, shape, len) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({
                "dtype": format!("{dtype:?}"),
                "shape": shape,
                "data_offsets": [offset, offset + len],
            }),
        );
        offset += len;
    }
    let mut json = serde_json::Value::Object(header).to_string().into_bytes();
    json.resize(json.len().next_multiple_of(8), b' ');
    json
}
