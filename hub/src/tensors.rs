//! Tensors mode: only a file's header and the selected tensors, by HTTP Range requests (or
//! from probex's tensor cache), written as one small deterministic safetensors file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::cache::{self, RepoRef, safe_rel_path};
use super::fetch::short;
use super::{Hub, HubError, PlannedModel};
use probex_fetch::discover::ModelSource;
use probex_fetch::hub::TensorSelection;
use probex_weights::partial::{self, ORIGINAL_TENSORS_KEY, SOURCE_KEY};
use probex_weights::reader::{header_len, parse_header};

impl Hub {
    /// Tensors mode for one model: the header and the selected tensors (from the tensor cache
    /// or by Range requests), written as one small safetensors file under `out_dir/models/`.
    pub(super) fn fetch_model_tensors(
        &self,
        m: &PlannedModel,
        sel: &TensorSelection,
        out_dir: &Path,
        own_dir: bool,
        cached: &AtomicU64,
        remote: &AtomicU64,
    ) -> Result<ModelSource, HubError> {
        let repo = RepoRef::model(&m.repo)?;
        safe_rel_path(&m.file)?;
        let what = format!("{}@{} {}", repo, short(&m.commit), m.file);
        let url = match &self.http {
            Some(h) => Some(h.resolve_url(repo.url_prefix(), &repo.id, &m.commit, &m.file)?),
            None => None,
        };
        let (header_bytes, file_len) = self.remote_header(&repo, m, url.as_ref(), &what)?;
        let file_len = usize::try_from(file_len).map_err(|_| HubError::TooLarge(what.clone()))?;
        let header = parse_header(&header_bytes[8..], file_len)?;
        remote.fetch_add(file_len as u64, Ordering::Relaxed);
        let names = sel
            .resolve(&header)
            .map_err(|e| HubError::from(e).at(&what))?;

        // Cached tensors first; the rest in coalesced Range requests.
        let mut data: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut missing = Vec::new();
        for name in &names {
            let (_, e) = header.find(name).ok_or_else(|| HubError::Tensor {
                what: what.clone(),
                name: name.clone(),
                problem: "vanished from the header",
            })?;
            let path = self.tensors.tensor_path(&repo, &m.commit, &m.file, name);
            match std::fs::read(&path) {
                Ok(b) if b.len() == e.span.len() => {
                    cached.fetch_add(b.len() as u64, Ordering::Relaxed);
                    data.insert(name.clone(), b);
                }
                _ => missing.push(e.clone()),
            }
        }
        if !missing.is_empty() {
            let (http, url) = match (&self.http, &url) {
                (Some(h), Some(u)) => (h, u),
                _ => {
                    return Err(
                        self.offline_miss(&format!("tensor `{}` of {what}", missing[0].name))
                    );
                }
            };
            missing.sort_by_key(|e| e.span.start);
            for group in coalesce(&missing, 64 * 1024) {
                let start = group[0].span.start as u64;
                let end = group.iter().map(|e| e.span.end).max().unwrap_or(0) as u64;
                let span = http.get_range(url, start..end, false, &what, &self.cancel)?;
                if let Some(t) = span.total
                    && t != file_len as u64
                {
                    return Err(HubError::StaleHeader {
                        what,
                        now: t,
                        was: file_len,
                        dir: self.tensors.file_dir(&repo, &m.commit, &m.file),
                    });
                }
                for e in group {
                    let a = e.span.start - start as usize;
                    let bytes = span.bytes[a..a + e.span.len()].to_vec();
                    let path = self.tensors.tensor_path(&repo, &m.commit, &m.file, &e.name);
                    cache::write_atomic(&path, &bytes).map_err(HubError::io(&path))?;
                    data.insert(e.name.clone(), bytes);
                }
            }
        }

        // The partial file: the selected tensors, the original metadata, and the original
        // tensor table so layer indices stay the paper's.
        let mut meta = header.metadata.clone();
        meta.insert(ORIGINAL_TENSORS_KEY.into(), partial::encode(&header));
        meta.insert(
            SOURCE_KEY.into(),
            format!("{}@{}/{}", repo.id, m.commit, m.file),
        );
        let mut tensors = Vec::new();
        for name in &names {
            let tensor = |problem| HubError::Tensor {
                what: what.clone(),
                name: name.clone(),
                problem,
            };
            let (_, e) = header
                .find(name)
                .ok_or_else(|| tensor("vanished from the header"))?;
            let bytes = data.get(name).ok_or_else(|| tensor("was not fetched"))?;
            tensors.push((e, bytes.as_slice()));
        }
        let rel = if own_dir {
            let name = Path::new(&m.file)
                .file_name()
                .map_or_else(|| "model.safetensors".into(), |n| n.to_os_string());
            PathBuf::from("models")
                .join(cache::encode_name(&m.id))
                .join(name)
        } else {
            PathBuf::from("models").join(format!("{}.safetensors", cache::encode_name(&m.id)))
        };
        let dest = out_dir.join(&rel);
        write_safetensors(&dest, &tensors, &meta).map_err(HubError::io(&dest))?;
        Ok(ModelSource {
            id: m.id.clone(),
            path: dest,
            split: m.split,
        })
    }

    /// The `8 + n` header bytes of a remote safetensors file, from the tensor cache or in one
    /// Range request (two when the header is longer than the first guess). The header length is
    /// checked against [`probex_weights::reader::MAX_HEADER_LEN`] and the file size before anything is allocated for it.
    pub(super) fn remote_header(
        &self,
        repo: &RepoRef,
        m: &PlannedModel,
        url: Option<&reqwest::Url>,
        what: &str,
    ) -> Result<(Vec<u8>, u64), HubError> {
        let path = self.tensors.header_path(repo, &m.commit, &m.file);
        let size_path = path.with_file_name("size");
        if let (Ok(bytes), Ok(size)) = (std::fs::read(&path), std::fs::read_to_string(&size_path))
            && let Ok(size) = size.trim().parse::<u64>()
            && let Ok(n) = header_len(&bytes, size)
            && bytes.len() == 8 + n
        {
            return Ok((bytes, size));
        }
        let (http, url) = match (&self.http, url) {
            (Some(h), Some(u)) => (h, u),
            _ => return Err(self.offline_miss(&format!("the header of {what}"))),
        };
        // One request covers the header of almost every model (a ViT's is ~10 KB, an SD LoRA's
        // ~40 KB); a longer header costs a second one.
        const FIRST: u64 = 64 * 1024;
        let first = http.get_range(url, 0..FIRST, true, what, &self.cancel)?;
        let total = first
            .total
            .ok_or_else(|| HubError::NoContentRange(what.to_owned()))?;
        let n = header_len(&first.bytes, total).map_err(|e| HubError::from(e).at(what))?;
        let want = 8 + n;
        let mut bytes = first.bytes;
        if bytes.len() >= want {
            bytes.truncate(want);
        } else {
            let more = http.get_range(
                url,
                bytes.len() as u64..want as u64,
                false,
                what,
                &self.cancel,
            )?;
            bytes.extend_from_slice(&more.bytes);
        }
        // Validate before caching: a bad header is an error now, not a poisoned cache entry.
        let total_usize =
            usize::try_from(total).map_err(|_| HubError::TooLarge(what.to_owned()))?;
        parse_header(&bytes[8..], total_usize).map_err(|e| HubError::from(e).at(what))?;
        cache::write_atomic(&size_path, total.to_string().as_bytes())
            .map_err(HubError::io(&size_path))?;
        cache::write_atomic(&path, &bytes).map_err(HubError::io(&path))?;
        Ok((bytes, total))
    }
}

/// Writes a safetensors file deterministically (keys sorted, tensors in name order, header
/// padded to 8 bytes), so the same inputs give the same bytes and the same artifact digest.
fn write_safetensors(
    path: &Path,
    tensors: &[(&probex_weights::TensorEntry, &[u8])],
    metadata: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    let json = probex_weights::writer::header_json(
        tensors
            .iter()
            .map(|(e, bytes)| (e.name.as_str(), e.dtype, e.shape.as_slice(), bytes.len())),
        metadata,
    );
    let offset: usize = tensors.iter().map(|(_, bytes)| bytes.len()).sum();
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for (_, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(path, out)
}

/// Groups spans (sorted by start) whose gaps are at most `gap` bytes, so neighbours (a LoRA's
/// up and down factors) come in one request without pulling in much else.
fn coalesce(
    spans: &[probex_weights::TensorEntry],
    gap: usize,
) -> Vec<Vec<&probex_weights::TensorEntry>> {
    let mut out: Vec<Vec<&probex_weights::TensorEntry>> = Vec::new();
    let mut end = 0usize;
    for e in spans {
        match out.last_mut() {
            Some(g) if e.span.start <= end.saturating_add(gap) => {
                end = end.max(e.span.end);
                g.push(e);
            }
            _ => {
                end = e.span.end;
                out.push(vec![e]);
            }
        }
    }
    out
}
