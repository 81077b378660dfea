//! A safetensors reader that is safe on hostile input.
//!
//! The format is an 8-byte little-endian header length `n`, `n` bytes of JSON describing each
//! tensor (`dtype`, `shape`, `data_offsets` relative to the end of the header) plus an optional
//! `__metadata__` string map, then the tensor bytes. Everything in the header is checked before any
//! tensor byte is touched: the header length against a cap and the file size, every shape's byte
//! count against its dtype and span, every span against the file, and spans against each other.
//! A file that passes can be sliced without bounds failures, and no allocation is larger than a
//! small multiple of the file itself.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::Dtype;
use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};

/// Largest header accepted (the official reader's cap): a header is a few KB to a few MB in
/// practice; a larger length is a corrupt or hostile file, and honouring it would mean a huge read.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// Why a weights file could not be read. Every variant names the file; tensor-level problems
/// also name the tensor.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The file could not be opened, mapped or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a valid safetensors file (bad header, bad offsets, truncated).
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// One tensor cannot be used (missing, wrong dtype, unusable shape).
    #[error("{path}: tensor `{tensor}`: {message}")]
    Tensor {
        /// The file.
        path: String,
        /// The tensor name.
        tensor: String,
        /// What is wrong.
        message: String,
    },
}

impl WeightsError {
    /// Builds an [`WeightsError::Invalid`] for `path`.
    pub fn invalid(path: impl fmt::Display, message: impl Into<String>) -> Self {
        WeightsError::Invalid {
            path: path.to_string(),
            message: message.into(),
        }
    }

    /// Builds a [`WeightsError::Tensor`] for `tensor` in `path`.
    pub fn tensor(path: impl fmt::Display, tensor: &str, message: impl Into<String>) -> Self {
        WeightsError::Tensor {
            path: path.to_string(),
            tensor: tensor.to_string(),
            message: message.into(),
        }
    }

    /// Builds a [`WeightsError::Io`] for `path`.
    pub fn io(path: impl fmt::Display, source: std::io::Error) -> Self {
        WeightsError::Io {
            path: path.to_string(),
            source,
        }
    }
}

/// One tensor as the header describes it, with its byte span already validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape as stored.
    pub shape: Vec<usize>,
    /// Absolute byte range in the file (header included in the offset).
    pub span: Range<usize>,
}

impl TensorEntry {
    /// Number of elements (the product of the shape; validated not to overflow).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed and validated header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Tensors sorted by name: position `i` is the paper's layer index `i`.
    pub tensors: Vec<TensorEntry>,
    /// The `__metadata__` string map (empty when absent).
    pub metadata: BTreeMap<String, String>,
    /// Absolute offset of the first tensor byte (`8 + header length`).
    pub data_start: usize,
    /// Size of the whole file in bytes, as seen when the header was parsed.
    pub file_len: usize,
}

impl Header {
    /// The tensor called `name`, with its index in the sorted list.
    pub fn find(&self, name: &str) -> Option<(usize, &TensorEntry)> {
        self.tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
            .map(|i| (i, &self.tensors[i]))
    }
}

/// Reads the header length from the first 8 bytes of a file of `file_len` bytes and checks it
/// against [`MAX_HEADER_LEN`] and the file size. Returns `n`, the JSON length.
///
/// Exposed so that a remote reader (HTTP Range) can fetch exactly the header.
pub fn header_len(first8: &[u8], file_len: u64) -> Result<usize, String> {
    let Some(bytes) = first8.get(..8) else {
        return Err(format!(
            "file is {file_len} bytes; a safetensors file starts with an 8-byte header length \
             (truncated or not a safetensors file: re-download it)"
        ));
    };
    let mut le = [0u8; 8];
    le.copy_from_slice(bytes);
    let n = u64::from_le_bytes(le);
    if n > MAX_HEADER_LEN {
        return Err(format!(
            "header length {n} exceeds the {MAX_HEADER_LEN}-byte limit (corrupt or not a \
             safetensors file)"
        ));
    }
    let avail = file_len.saturating_sub(8);
    if n > avail {
        return Err(format!(
            "header length {n} is beyond the end of the file ({file_len} bytes): the file is \
             truncated; re-download it"
        ));
    }
    // n <= MAX_HEADER_LEN, so it fits in usize on every supported target.
    usize::try_from(n).map_err(|_| format!("header length {n} does not fit in memory"))
}

#[derive(Deserialize)]
struct RawInfo {
    dtype: Dtype,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

struct RawHeader {
    tensors: Vec<(String, RawInfo)>,
    metadata: Option<BTreeMap<String, String>>,
}

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawHeader;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object of tensor descriptions")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHeader, A::Error> {
                let mut tensors = Vec::new();
                let mut metadata = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key == "__metadata__" {
                        if metadata.is_some() {
                            return Err(de::Error::custom("`__metadata__` appears twice"));
                        }
                        let m: BTreeMap<String, MetaValue> = map.next_value()?;
                        metadata = Some(m.into_iter().map(|(k, v)| (k, v.0)).collect());
                    } else {
                        let info: RawInfo = map
                            .next_value()
                            .map_err(|e| de::Error::custom(format!("tensor `{key}`: {e}")))?;
                        tensors.push((key, info));
                    }
                }
                Ok(RawHeader { tensors, metadata })
            }
        }
        d.deserialize_map(V)
    }
}

/// A metadata value: the format says string; anything else gets an error naming what was found.
struct MetaValue(String);

impl<'de> Deserialize<'de> for MetaValue {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = MetaValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string (safetensors metadata values are strings)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MetaValue, E> {
                Ok(MetaValue(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<MetaValue, E> {
                Ok(MetaValue(v))
            }
        }
        d.deserialize_str(V)
    }
}

/// Parses and validates a header. `json` is the `n` header bytes, `file_len` the size of the
/// whole file; offsets are checked against it. Errors are messages without the file name (the
/// caller adds it).
pub fn parse_header(json: &[u8], file_len: usize) -> Result<Header, String> {
    let data_start = 8usize
        .checked_add(json.len())
        .filter(|&s| s <= file_len)
        .ok_or_else(|| {
            format!(
                "header of {} bytes does not fit in a file of {file_len} bytes",
                json.len()
            )
        })?;
    let data_len = file_len - data_start;
    let raw: RawHeader = serde_json::from_slice(json).map_err(|e| {
        format!("header is not valid safetensors JSON ({e}); the file is corrupt or not a safetensors file")
    })?;

    let mut tensors = Vec::with_capacity(raw.tensors.len());
    for (name, info) in raw.tensors {
        let (start, end) = info.data_offsets;
        if start > end {
            return Err(format!(
                "tensor `{name}`: data_offsets [{start}, {end}] run backwards"
            ));
        }
        if end > data_len {
            return Err(format!(
                "tensor `{name}`: data_offsets [{start}, {end}] reach beyond the data section \
                 ({data_len} bytes): the file is truncated or corrupt; re-download it"
            ));
        }
        let numel = info
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("tensor `{name}`: shape {:?} overflows", info.shape))?;
        let bits = numel
            .checked_mul(info.dtype.bitsize())
            .ok_or_else(|| format!("tensor `{name}`: shape {:?} overflows", info.shape))?;
        if bits % 8 != 0 || bits / 8 != end - start {
            return Err(format!(
                "tensor `{name}`: shape {:?} of {:?} needs {} bytes but data_offsets [{start}, {end}] \
                 hold {} (corrupt header)",
                info.shape,
                info.dtype,
                bits.div_ceil(8),
                end - start
            ));
        }
        tensors.push(TensorEntry {
            name,
            dtype: info.dtype,
            shape: info.shape,
            span: data_start + start..data_start + end,
        });
    }

    // Overlap check on byte order; empty tensors occupy nothing and cannot overlap.
    let mut by_start: Vec<&TensorEntry> = tensors.iter().filter(|t| !t.span.is_empty()).collect();
    by_start.sort_by_key(|t| (t.span.start, t.span.end));
    for w in by_start.windows(2) {
        if w[1].span.start < w[0].span.end {
            return Err(format!(
                "tensors `{}` and `{}` overlap (bytes {}..{} and {}..{}): corrupt header",
                w[0].name,
                w[1].name,
                w[0].span.start - data_start,
                w[0].span.end - data_start,
                w[1].span.start - data_start,
                w[1].span.end - data_start
            ));
        }
    }

    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = tensors.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(format!(
            "tensor `{}` appears twice in the header",
            w[0].name
        ));
    }

    Ok(Header {
        tensors,
        metadata: raw.metadata.unwrap_or_default(),
        data_start,
        file_len,
    })
}

/// Parses the header of a complete safetensors file held in `bytes`.
pub fn parse_bytes(bytes: &[u8]) -> Result<Header, String> {
    let n = header_len(bytes, bytes.len() as u64)?;
    // header_len checked 8 + n <= len.
    let json = bytes
        .get(8..8 + n)
        .ok_or("header is beyond the end of the file")?;
    parse_header(json, bytes.len())
}

/// A safetensors file (or buffer) whose header has been validated, giving access to tensor bytes.
pub struct Safetensors<B: AsRef<[u8]>> {
    label: String,
    bytes: B,
    header: Header,
}

/// A read-only file mapping that can be shared (cloned) between threads, e.g. handed to a
/// writer thread together with a tensor's byte range.
#[derive(Clone)]
pub struct SharedMmap(Arc<Mmap>);

impl AsRef<[u8]> for SharedMmap {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// A memory-mapped safetensors file: only the header and the tensors actually read are paged in.
pub type SafetensorsFile = Safetensors<SharedMmap>;

impl<B: AsRef<[u8]>> Safetensors<B> {
    /// Validates the header of an in-memory file. `label` names it in errors.
    pub fn from_bytes(label: impl Into<String>, bytes: B) -> Result<Self, WeightsError> {
        let label = label.into();
        let header = parse_bytes(bytes.as_ref()).map_err(|m| WeightsError::invalid(&label, m))?;
        Ok(Safetensors {
            label,
            bytes,
            header,
        })
    }

    /// The name used for this file in errors (its path).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The `__metadata__` map.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.header.metadata
    }

    /// The whole file's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.bytes.as_ref()
    }

    /// The header bytes (length prefix and JSON), for digests of what was read.
    pub fn header_bytes(&self) -> &[u8] {
        &self.bytes.as_ref()[..self.header.data_start]
    }

    /// The tensor called `name`, or an error naming the file and tensor.
    pub fn entry(&self, name: &str) -> Result<&TensorEntry, WeightsError> {
        self.header
            .find(name)
            .map(|(_, e)| e)
            .ok_or_else(|| WeightsError::tensor(&self.label, name, "not in this file"))
    }

    /// Raw little-endian bytes of a tensor of this file's header.
    pub fn data(&self, entry: &TensorEntry) -> Result<&[u8], WeightsError> {
        self.bytes.as_ref().get(entry.span.clone()).ok_or_else(|| {
            WeightsError::tensor(&self.label, &entry.name, "byte span is outside the file")
        })
    }

    /// Decodes a floating-point tensor to f32 (F32, F16, BF16, F64).
    pub fn to_f32(&self, entry: &TensorEntry) -> Result<Vec<f32>, WeightsError> {
        let data = self.data(entry)?;
        crate::dataset::decode(entry.dtype, data)
            .map_err(|m| WeightsError::tensor(&self.label, &entry.name, m))
    }
}

impl Safetensors<SharedMmap> {
    /// Opens and memory-maps `path`, validating its header. Only the header pages are read.
    pub fn open(path: &Path) -> Result<Self, WeightsError> {
        let label = path.display().to_string();
        let file = File::open(path).map_err(|e| WeightsError::io(&label, e))?;
        let meta = file.metadata().map_err(|e| WeightsError::io(&label, e))?;
        if !meta.is_file() {
            return Err(WeightsError::invalid(&label, "not a regular file"));
        }
        if meta.len() < 8 {
            // Mapping an empty file fails on some systems; give the format error instead.
            return Err(WeightsError::invalid(
                &label,
                format!(
                    "file is {} bytes; a safetensors file starts with an 8-byte header length \
                     (truncated or not a safetensors file: re-download it)",
                    meta.len()
                ),
            ));
        }
        // SAFETY: the map is read-only. A file truncated by another process while mapped would
        // fault; model files are not modified during extraction (documented for callers).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| WeightsError::io(&label, e))?;
        Safetensors::from_bytes(label, SharedMmap(Arc::new(map)))
    }

    /// The mapping itself, to keep tensor bytes alive beyond this reader (cheap clone).
    pub fn mapping(&self) -> SharedMmap {
        self.bytes.clone()
    }

    /// Asks the kernel to start reading the pages of `range` (bytes of the file) now:
    /// readahead for cold files. (Prefaulting the range as well, `MADV_POPULATE_READ`, made
    /// no measurable difference to a warm 1,000-LoRA extraction.)
    pub fn prefetch_range(&self, range: std::ops::Range<usize>) {
        if !range.is_empty() && range.end <= self.bytes.as_ref().len() {
            // Advice only; a failure just means no readahead.
            let _ = self
                .bytes
                .0
                .advise_range(memmap2::Advice::WillNeed, range.start, range.len());
        }
    }
}

/// Reads only the header of `path` (no mapping of the data), for listings of large files.
pub fn read_header(path: &Path) -> Result<Header, WeightsError> {
    use std::io::Read;
    let label = path.display().to_string();
    let mut file = File::open(path).map_err(|e| WeightsError::io(&label, e))?;
    let file_len = file
        .metadata()
        .map_err(|e| WeightsError::io(&label, e))?
        .len();
    let mut first8 = [0u8; 8];
    let got = read_full(&mut file, &mut first8).map_err(|e| WeightsError::io(&label, e))?;
    let n = header_len(&first8[..got], file_len).map_err(|m| WeightsError::invalid(&label, m))?;
    let mut json = Vec::new();
    // n <= MAX_HEADER_LEN and <= file_len - 8 (checked above), so this allocation is bounded.
    (&mut file)
        .take(n as u64)
        .read_to_end(&mut json)
        .map_err(|e| WeightsError::io(&label, e))?;
    if json.len() != n {
        return Err(WeightsError::invalid(
            &label,
            "file shrank while its header was read",
        ));
    }
    let file_len = usize::try_from(file_len)
        .map_err(|_| WeightsError::invalid(&label, "file too large for this platform"))?;
    parse_header(&json, file_len).map_err(|m| WeightsError::invalid(&label, m))
}

fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..])? {
            0 => break,
            k => got += k,
        }
    }
    Ok(got)
}
