//! Streaming writer of `layer.safetensors`: rows go straight to their place in the file as each
//! model is read, so no layer is ever held whole in memory.
//!
//! The file is the one [`crate::dataset::LayerDataset::save`] writes (the matrices in their
//! [`Storage`] form, `labels`, `__metadata__.layer`), laid out as: header padded with spaces to
//! a capacity reserved for the largest possible row count, then each stored tensor (`weights`,
//! or `up` then `down`), then `labels`. A row (one model) has one piece in each stored tensor.
//! Rows are first written at the position of their model; [`LayerFile::finish`] closes the gaps
//! left by models that were dropped, appends the labels and rewrites the header for the final
//! count (same capacity, so nothing moves).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use super::rows::{read_at, write_at};
use crate::dataset::{LABELS, Precision, Storage, TENSORS_FILE};

/// Bytes per stored value at `precision`.
pub fn value_bytes(precision: Precision) -> usize {
    match precision {
        Precision::F32 => 4,
        Precision::F16 | Precision::Bf16 => 2,
    }
}

/// The safetensors dtype of values stored at `precision`.
pub fn dtype_of(precision: Precision) -> Dtype {
    match precision {
        Precision::F32 => Dtype::F32,
        Precision::F16 => Dtype::F16,
        Precision::Bf16 => Dtype::BF16,
    }
}

/// The shape of one stored tensor of a layer file: its name and the shape of one row's piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Part {
    name: &'static str,
    row: [usize; 2],
}

fn header_json(
    layer: &str,
    precision: Precision,
    parts: &[Part],
    n: usize,
    label_width: Option<usize>,
) -> Vec<u8> {
    let mut tensors = serde_json::Map::new();
    let mut at = 0;
    for p in parts {
        let bytes = n * p.row[0] * p.row[1] * value_bytes(precision);
        tensors.insert(
            p.name.into(),
            serde_json::json!({
                "dtype": dtype_of(precision),
                "shape": [n, p.row[0], p.row[1]],
                "data_offsets": [at, at + bytes],
            }),
        );
        at += bytes;
    }
    let label_shape: Vec<usize> = match label_width {
        Some(w) => vec![n, w],
        None => vec![n],
    };
    let label_bytes = label_shape.iter().product::<usize>() * 4;
    tensors.insert(
        LABELS.into(),
        serde_json::json!({
            "dtype": Dtype::F32,
            "shape": label_shape,
            "data_offsets": [at, at + label_bytes],
        }),
    );
    tensors.insert("__metadata__".into(), serde_json::json!({ "layer": layer }));
    // Serialising a map of strings and integers cannot fail.
    serde_json::to_vec(&tensors).unwrap_or_default()
}

/// One layer's `layer.safetensors`, being written.
pub struct LayerFile {
    path: PathBuf,
    file: File,
    name: String,
    precision: Precision,
    parts: Vec<Part>,
    label_width: Option<usize>,
    capacity: usize,
    slots: usize,
}

impl LayerFile {
    /// Creates `dir/layer.safetensors` with room for `slots` rows of `[d_h, d_w]` matrices
    /// stored as `storage`. `label_width` is `Some(classes)` for multi-label targets (`labels`
    /// is `[n, classes]`).
    pub fn create(
        dir: &Path,
        name: &str,
        precision: Precision,
        storage: Storage,
        matrix: [usize; 2],
        slots: usize,
        label_width: Option<usize>,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(TENSORS_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        let parts: Vec<Part> = storage
            .parts(1, matrix)
            .into_iter()
            .map(|(name, [_, a, b])| Part { name, row: [a, b] })
            .collect();
        // Reserve the header for the largest counts; the final one is never longer.
        let capacity = (header_json(name, precision, &parts, slots, label_width).len() + 16)
            .next_multiple_of(8);
        let lf = LayerFile {
            path,
            file,
            name: name.to_string(),
            precision,
            parts,
            label_width,
            capacity,
            slots,
        };
        lf.file
            .set_len(lf.part_start(lf.parts.len(), slots) as u64)?;
        Ok(lf)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of stored tensors a row has a piece in (1 stacked, 2 factored).
    pub fn parts(&self) -> usize {
        self.parts.len()
    }

    /// Bytes of row piece `part` at the stored precision.
    pub fn part_bytes(&self, part: usize) -> usize {
        self.parts
            .get(part)
            .map_or(0, |p| p.row[0] * p.row[1] * value_bytes(self.precision))
    }

    /// Where stored tensor `part` starts when the file holds `rows` rows (`part == parts()`:
    /// where the labels start).
    fn part_start(&self, part: usize, rows: usize) -> usize {
        8 + self.capacity + (0..part).map(|p| rows * self.part_bytes(p)).sum::<usize>()
    }

    /// Writes piece `part` of row `slot` (encoded at the file's precision, `part_bytes` long).
    /// Safe to call from several threads for different slots.
    pub fn write_row(&self, slot: usize, part: usize, bytes: &[u8]) -> std::io::Result<()> {
        if bytes.len() != self.part_bytes(part) {
            return Err(std::io::Error::other(format!(
                "piece {part} of row {slot} is {} bytes, expected {}",
                bytes.len(),
                self.part_bytes(part)
            )));
        }
        self.write_row_part(slot, part, 0, bytes)
    }

    /// Writes `bytes` at byte `at` of piece `part` of row `slot` (pieces can be written in
    /// chunks).
    pub fn write_row_part(
        &self,
        slot: usize,
        part: usize,
        at: usize,
        bytes: &[u8],
    ) -> std::io::Result<()> {
        let pb = self.part_bytes(part);
        if slot >= self.slots
            || part >= self.parts.len()
            || at.checked_add(bytes.len()).is_none_or(|end| end > pb)
        {
            return Err(std::io::Error::other(format!(
                "{} bytes at {at} do not fit piece {part} of row {slot} ({} slots of {pb} bytes)",
                bytes.len(),
                self.slots
            )));
        }
        write_at(
            &self.file,
            bytes,
            (self.part_start(part, self.slots) + slot * pb + at) as u64,
        )
    }

    /// Keeps the rows of `kept` (ascending slots) in that order, appends `labels` (row-major
    /// f32, one row per kept slot, `label_width` columns or one value per row when `None`) and
    /// writes the final header. Returns the file size.
    pub fn finish(
        self,
        kept: &[usize],
        labels: &[f32],
        label_width: Option<usize>,
    ) -> std::io::Result<u64> {
        if label_width.unwrap_or(1) * kept.len() != labels.len() || label_width > self.label_width {
            return Err(std::io::Error::other(format!(
                "{} label values for {} rows of width {label_width:?}",
                labels.len(),
                kept.len()
            )));
        }
        let n = kept.len();
        // Every piece moves down or stays (n <= slots, destination row <= source slot), and
        // tensors are compacted in file order, so no copy overwrites bytes still to be read.
        for part in 0..self.parts.len() {
            let pb = self.part_bytes(part);
            let (from, to) = (self.part_start(part, self.slots), self.part_start(part, n));
            if from == to && kept.iter().enumerate().all(|(i, &s)| s == i) {
                continue;
            }
            let mut buf = vec![0u8; pb];
            for (dst, &src) in kept.iter().enumerate() {
                if from + src * pb != to + dst * pb {
                    read_at(&self.file, &mut buf, (from + src * pb) as u64)?;
                    write_at(&self.file, &buf, (to + dst * pb) as u64)?;
                }
            }
        }
        let labels_at = self.part_start(self.parts.len(), n);
        let label_bytes: Vec<u8> = labels.iter().flat_map(|v| v.to_le_bytes()).collect();
        write_at(&self.file, &label_bytes, labels_at as u64)?;
        let end = labels_at + label_bytes.len();
        self.file.set_len(end as u64)?;

        let mut json = header_json(&self.name, self.precision, &self.parts, n, label_width);
        if json.len() > self.capacity {
            return Err(std::io::Error::other(
                "layer header outgrew its reserved space",
            ));
        }
        json.resize(self.capacity, b' ');
        let mut head = Vec::with_capacity(8 + self.capacity);
        head.extend_from_slice(&(self.capacity as u64).to_le_bytes());
        head.extend_from_slice(&json);
        write_at(&self.file, &head, 0)?;
        Ok(end as u64)
    }
}
