//! Streaming writer of `layer.safetensors`: rows go straight to their place in the file as each
//! model is read, so no layer is ever held whole in memory.
//!
//! The file is the one [`crate::dataset::LayerDataset::save`] writes (tensors `weights`
//! `[n, d_H, d_W]` and `labels`, `__metadata__.layer`), laid out as: header padded with spaces
//! to a capacity reserved for the largest possible row count, then `weights`, then `labels`.
//! Rows are first written at the position of their model; [`LayerFile::finish`] closes the gaps
//! left by models that were dropped, appends the labels and rewrites the header for the final
//! count (same capacity, so nothing moves).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use crate::dataset::{Precision, TENSORS_FILE};

#[cfg(unix)]
fn write_at(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(buf, offset)
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
}

#[cfg(windows)]
fn write_at(file: &File, mut buf: &[u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let k = file.seek_write(buf, offset)?;
        if k == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf = &buf[k..];
        offset += k as u64;
    }
    Ok(())
}

#[cfg(windows)]
fn read_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let k = file.seek_read(buf, offset)?;
        if k == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut std::mem::take(&mut buf)[k..];
        offset += k as u64;
    }
    Ok(())
}

/// Bytes per stored value at `precision`.
pub fn value_bytes(precision: Precision) -> usize {
    match precision {
        Precision::F32 => 4,
        Precision::F16 | Precision::Bf16 => 2,
    }
}

fn dtype_of(precision: Precision) -> Dtype {
    match precision {
        Precision::F32 => Dtype::F32,
        Precision::F16 => Dtype::F16,
        Precision::Bf16 => Dtype::BF16,
    }
}

fn header_json(
    layer: &str,
    precision: Precision,
    n: usize,
    matrix: [usize; 2],
    label_width: Option<usize>,
) -> Vec<u8> {
    let weight_bytes = n * matrix[0] * matrix[1] * value_bytes(precision);
    let label_shape: Vec<usize> = match label_width {
        Some(w) => vec![n, w],
        None => vec![n],
    };
    let label_bytes = label_shape.iter().product::<usize>() * 4;
    let json = serde_json::json!({
        "__metadata__": { "layer": layer },
        "weights": {
            "dtype": dtype_of(precision),
            "shape": [n, matrix[0], matrix[1]],
            "data_offsets": [0, weight_bytes],
        },
        "labels": {
            "dtype": Dtype::F32,
            "shape": label_shape,
            "data_offsets": [weight_bytes, weight_bytes + label_bytes],
        },
    });
    // Serialising a json! value of strings and integers cannot fail.
    serde_json::to_vec(&json).unwrap_or_default()
}

/// One layer's `layer.safetensors`, being written.
pub struct LayerFile {
    path: PathBuf,
    file: File,
    name: String,
    precision: Precision,
    matrix: [usize; 2],
    label_width: Option<usize>,
    capacity: usize,
    slots: usize,
}

impl LayerFile {
    /// Creates `dir/layer.safetensors` with room for `slots` rows of `matrix` values.
    /// `label_width` is `Some(classes)` for multi-label targets (`labels` is `[n, classes]`).
    pub fn create(
        dir: &Path,
        name: &str,
        precision: Precision,
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
        // Reserve the header for the largest counts; the final one is never longer.
        let capacity = (header_json(name, precision, slots, matrix, label_width).len() + 16)
            .next_multiple_of(8);
        let lf = LayerFile {
            path,
            file,
            name: name.to_string(),
            precision,
            matrix,
            label_width,
            capacity,
            slots,
        };
        lf.file
            .set_len((lf.data_start() + lf.row_bytes() * slots) as u64)?;
        Ok(lf)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn data_start(&self) -> usize {
        8 + self.capacity
    }

    /// Bytes of one row (one model's matrix) at the stored precision.
    pub fn row_bytes(&self) -> usize {
        self.matrix[0] * self.matrix[1] * value_bytes(self.precision)
    }

    /// Writes row `slot` (encoded at the file's precision, `row_bytes` long). Safe to call
    /// from several threads for different slots.
    pub fn write_row(&self, slot: usize, bytes: &[u8]) -> std::io::Result<()> {
        if slot >= self.slots || bytes.len() != self.row_bytes() {
            return Err(std::io::Error::other(format!(
                "row {slot} of {} bytes does not fit {} slots of {} bytes",
                bytes.len(),
                self.slots,
                self.row_bytes()
            )));
        }
        write_at(
            &self.file,
            bytes,
            (self.data_start() + slot * self.row_bytes()) as u64,
        )
    }

    /// Writes `bytes` at byte `at` of row `slot` (rows can be written in pieces).
    pub fn write_row_part(&self, slot: usize, at: usize, bytes: &[u8]) -> std::io::Result<()> {
        let rb = self.row_bytes();
        if slot >= self.slots || at.checked_add(bytes.len()).is_none_or(|end| end > rb) {
            return Err(std::io::Error::other(format!(
                "{} bytes at {at} do not fit row {slot} ({} slots of {rb} bytes)",
                bytes.len(),
                self.slots
            )));
        }
        write_at(
            &self.file,
            bytes,
            (self.data_start() + slot * rb + at) as u64,
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
        let rb = self.row_bytes();
        let start = self.data_start();
        if kept.iter().enumerate().any(|(i, &s)| s != i) {
            let mut buf = vec![0u8; rb];
            for (dst, &src) in kept.iter().enumerate() {
                if src != dst {
                    read_at(&self.file, &mut buf, (start + src * rb) as u64)?;
                    write_at(&self.file, &buf, (start + dst * rb) as u64)?;
                }
            }
        }
        let n = kept.len();
        let labels_at = start + n * rb;
        let label_bytes: Vec<u8> = labels.iter().flat_map(|v| v.to_le_bytes()).collect();
        write_at(&self.file, &label_bytes, labels_at as u64)?;
        let end = labels_at + label_bytes.len();
        self.file.set_len(end as u64)?;

        let mut json = header_json(&self.name, self.precision, n, self.matrix, label_width);
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
