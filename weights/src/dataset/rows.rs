//! Reading a layer dataset's rows on demand: from its own `layer.safetensors`, or where an
//! in-place dataset's references say they are in the model files. Training reads a layer this
//! way, batch by batch, when the whole layer does not fit the memory it may use.

use std::fs::File;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::Dtype;

use probex_engine::digest::FileStamp;

use super::{TensorRef, decode};

/// Why a row could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowError {
    /// The dataset no longer matches what it reads (a model file changed or vanished, a row
    /// past the end, a row of the wrong shape): computing its extract node again fixes it.
    Stale(String),
    /// Row `row`, read in place from a model file, holds NaN or infinite values. Extraction
    /// under `non_finite = "fail"` leaves this check to the reads (it does not read in-place
    /// rows at all), so it is found here; extracting again does not fix it.
    NonFinite {
        /// The row.
        row: usize,
        /// The model file.
        file: PathBuf,
        /// Byte offset of the tensor holding them.
        offset: u64,
        /// NaN values.
        nan: usize,
        /// Infinite values.
        inf: usize,
    },
}

impl std::fmt::Display for RowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RowError::Stale(m) => f.write_str(m),
            RowError::NonFinite {
                file,
                offset,
                nan,
                inf,
                ..
            } => write!(
                f,
                "{}: the tensor at byte {offset} has {nan} NaN and {inf} infinite values",
                file.display()
            ),
        }
    }
}

impl std::error::Error for RowError {}

/// Counts NaN and infinite values: `(NaN, infinite)`.
pub fn count_non_finite(values: &[f32]) -> (usize, usize) {
    let mut nan = 0;
    let mut inf = 0;
    for v in values {
        nan += usize::from(v.is_nan());
        inf += usize::from(v.is_infinite());
    }
    (nan, inf)
}

#[cfg(unix)]
pub(crate) fn write_at(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(buf, offset)
}

#[cfg(unix)]
pub(crate) fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
}

#[cfg(windows)]
pub(crate) fn write_at(file: &File, mut buf: &[u8], mut offset: u64) -> std::io::Result<()> {
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
pub(crate) fn read_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
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

/// Bytes of one value of a float dtype; `None` for any other.
fn width(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F64 => Some(8),
        Dtype::F32 => Some(4),
        Dtype::F16 | Dtype::BF16 => Some(2),
        _ => None,
    }
}

/// Where one row is: its tensors' spans in one file.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RowAt {
    file: PathBuf,
    /// (offset, dtype, values) of each tensor, in the row's order.
    spans: Vec<(u64, Dtype, usize)>,
    /// For a model file: the stamp its digest was taken with, checked on the row's first
    /// read (a dataset's own file is checked by the cache instead).
    check: Option<FileStamp>,
}

/// The rows of a layer dataset on disk, read on demand (see the module docs).
#[derive(Debug)]
pub struct RowReader {
    rows: Vec<RowAt>,
    values: usize,
}

impl PartialEq for RowReader {
    fn eq(&self, other: &Self) -> bool {
        self.rows == other.rows && self.values == other.values
    }
}

impl RowReader {
    /// Rows stacked in `file` from byte `start`, `values` values of `dtype` each.
    pub fn stacked(file: &Path, start: u64, dtype: Dtype, rows: usize, values: usize) -> Self {
        let row_bytes = (values * width(dtype).unwrap_or(4)) as u64;
        Self::new(
            (0..rows)
                .map(|i| RowAt {
                    file: file.to_path_buf(),
                    spans: vec![(start + i as u64 * row_bytes, dtype, values)],
                    check: None,
                })
                .collect(),
            values,
        )
    }

    /// Rows where `references` say, each file checked against its recorded stamp the first
    /// time the row is read.
    pub fn references(references: &[TensorRef], values: usize) -> Self {
        Self::new(
            references
                .iter()
                .map(|r| RowAt {
                    file: r.file.clone(),
                    spans: r
                        .tensors
                        .iter()
                        .map(|t| (t.offset, t.dtype, t.shape.iter().product()))
                        .collect(),
                    check: Some(r.stamp),
                })
                .collect(),
            values,
        )
    }

    fn new(rows: Vec<RowAt>, values: usize) -> Self {
        RowReader { rows, values }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Row `i`'s tensors, decoded. A model file's stamp is checked after its bytes are read,
    /// on every read (a stat): a write before or during the read changed the stamp. A model
    /// file's values are checked to be finite (extraction did not read them).
    fn tensors(&self, i: usize) -> Result<Vec<Vec<f32>>, RowError> {
        let Some(row) = self.rows.get(i) else {
            return Err(RowError::Stale(format!("row {i} of {}", self.rows.len())));
        };
        let gone = |e: std::io::Error| RowError::Stale(format!("{}: {e}", row.file.display()));
        let file = File::open(&row.file).map_err(gone)?;
        let mut bytes = Vec::with_capacity(row.spans.len());
        for &(offset, dtype, values) in &row.spans {
            let w = width(dtype).ok_or_else(|| {
                RowError::Stale(format!(
                    "{}: dtype {dtype:?} is not a weight",
                    row.file.display()
                ))
            })?;
            let mut data = vec![0u8; values * w];
            read_at(&file, &mut data, offset).map_err(gone)?;
            bytes.push((offset, dtype, data));
        }
        let Some(seen) = &row.check else {
            return bytes
                .into_iter()
                .map(|(_, dtype, data)| {
                    decode(dtype, &data).map_err(|e| RowError::Stale(e.to_string()))
                })
                .collect();
        };
        let now = FileStamp::of(&file.metadata().map_err(gone)?);
        if let Some(what) = seen.change(&now) {
            return Err(RowError::Stale(format!(
                "referenced model file {} changed since extraction ({what})",
                row.file.display()
            )));
        }
        bytes
            .into_iter()
            .map(|(offset, dtype, data)| {
                let values = decode(dtype, &data).map_err(|e| RowError::Stale(e.to_string()))?;
                match count_non_finite(&values) {
                    (0, 0) => Ok(values),
                    (nan, inf) => Err(RowError::NonFinite {
                        row: i,
                        file: row.file.clone(),
                        offset,
                        nan,
                        inf,
                    }),
                }
            })
            .collect()
    }

    /// Reads row `i`'s matrix into `out` (`values` long).
    pub fn read(&self, i: usize, out: &mut [f32]) -> Result<(), RowError> {
        let tensors = self.tensors(i)?;
        let [values] = tensors.as_slice() else {
            return Err(RowError::Stale(format!(
                "row {i} holds {} tensors, not one matrix",
                tensors.len()
            )));
        };
        if values.len() != out.len() {
            return Err(RowError::Stale(format!(
                "row {i}: {} values, expected {}",
                values.len(),
                out.len()
            )));
        }
        out.copy_from_slice(values);
        Ok(())
    }

    /// Every row's LoRA factors, zero-padded to `rank`: `up` `[n, d_h, rank]` and `down`
    /// `[n, rank, d_w]` (each row's tensors being its up `[d_h, r]` and down `[r, d_w]`).
    pub fn factors(
        &self,
        rank: usize,
        [d_h, d_w]: [usize; 2],
    ) -> Result<(Vec<f32>, Vec<f32>), RowError> {
        let rows: Vec<(Vec<f32>, Vec<f32>)> = (0..self.rows.len())
            .into_par_iter()
            .map(|i| {
                let mut t = self.tensors(i)?;
                let (Some(down), Some(up), None) = (t.pop(), t.pop(), t.pop()) else {
                    return Err(RowError::Stale(format!("row {i} is not a LoRA pair")));
                };
                let r = down.len() / d_w.max(1);
                if r > rank || up.len() != d_h * r || down.len() != r * d_w {
                    return Err(RowError::Stale(format!(
                        "row {i}: factors of {} and {} values do not form a [{d_h}, {d_w}] \
                         matrix of rank at most {rank}",
                        up.len(),
                        down.len()
                    )));
                }
                let mut b = vec![0.0; d_h * rank];
                for (dst, src) in b.chunks_exact_mut(rank).zip(up.chunks_exact(r.max(1))) {
                    dst[..r].copy_from_slice(&src[..r]);
                }
                let mut a = down;
                a.resize(rank * d_w, 0.0);
                Ok((b, a))
            })
            .collect::<Result<_, RowError>>()?;
        let (up, down): (Vec<Vec<f32>>, Vec<Vec<f32>>) = rows.into_iter().unzip();
        Ok((up.concat(), down.concat()))
    }

    /// Reads `rows` into `out` (`rows.len() * values` long, row after row), in parallel.
    pub fn read_rows(&self, rows: &[usize], out: &mut [f32]) -> Result<(), RowError> {
        if out.len() != rows.len() * self.values {
            return Err(RowError::Stale(format!(
                "{} values for {} rows of {}",
                out.len(),
                rows.len(),
                self.values
            )));
        }
        out.par_chunks_mut(self.values.max(1))
            .zip(rows)
            .try_for_each(|(o, &i)| self.read(i, o))
    }
}
