//! The one pass over the model files: each file mapped once, its header parsed once, every
//! requested row checked, scanned and either referenced in place or sent to its layer's writer.

use super::*;

/// A problem with one model: `fatal` ones fail the run, others skip the model.
pub(super) struct Problem {
    pub(super) fatal: bool,
    pub(super) message: String,
}

pub(super) enum RowOutcome {
    /// The row is in the dataset: copied, or (`reference`) left where the model file has it.
    Written {
        reference: Option<TensorRef>,
    },
    Dropped(String),
}

pub(super) struct ModelOutcome {
    pub(super) label: Result<LabelValue, Problem>,
    pub(super) split: Result<Split, Problem>,
    pub(super) file_digest: Option<String>,
    pub(super) rows: Vec<RowOutcome>,
    pub(super) findings: Vec<NonFiniteFinding>,
    pub(super) bytes_read: u64,
}

/// Bytes of one row piece on their way to a layer file's writer thread.
pub(super) enum RowBytes {
    /// A span of a mapped model file (already in the file's byte order and dtype).
    Mapped(SharedMmap, Range<usize>),
    /// Encoded values.
    Owned(Vec<u8>),
}

pub(super) struct Job {
    pub(super) slot: usize,
    pub(super) part: usize,
    pub(super) bytes: RowBytes,
}

/// Bounds the bytes of decoded rows waiting for a writer (mapped rows cost nothing: they are
/// page cache). A row larger than the whole budget still goes through when nothing else waits.
pub(super) struct ByteBudget {
    pub(super) limit: usize,
    pub(super) used: Mutex<usize>,
    pub(super) freed: Condvar,
}

impl ByteBudget {
    pub(super) fn acquire(&self, n: usize) {
        let Ok(mut used) = self.used.lock() else {
            return;
        };
        while *used > 0 && *used + n > self.limit {
            match self.freed.wait(used) {
                Ok(u) => used = u,
                Err(_) => return,
            }
        }
        *used += n;
    }

    pub(super) fn release(&self, n: usize) {
        if let Ok(mut used) = self.used.lock() {
            *used = used.saturating_sub(n);
        }
        self.freed.notify_all();
    }
}

/// Decoded rows in flight at most (on top of a few rows per thread being built).
pub(super) const IN_FLIGHT_BYTES: usize = 512 << 20;

pub(super) struct Ctx<'a> {
    pub(super) outputs: &'a [LayerOutput],
    /// The stored precision of each output.
    pub(super) precision: &'a [Precision],
    /// Whether each output refers to the model files instead of copying its rows.
    pub(super) referenced: &'a [bool],
    pub(super) budget: &'a ByteBudget,
    pub(super) sinks: &'a [SyncSender<Job>],
    pub(super) labeler: &'a Labeler,
    pub(super) splits: &'a SplitAssigner,
    pub(super) opts: &'a ExtractOptions,
    pub(super) digests: &'a FileDigests,
    pub(super) abort: &'a AtomicBool,
}

pub(super) fn check_entry<'a>(
    st: &'a SafetensorsFile,
    indices: &LayerIndex,
    layer: &ResolvedLayer,
) -> Result<(&'a TensorEntry, Option<&'a TensorEntry>), String> {
    let Some((_, entry)) = st.header().find(&layer.name) else {
        return Err(format!(
            "tensor `{}` (layer {}) is not in this file",
            layer.name, layer.index
        ));
    };
    // Partial files (fetch in tensors mode) count in their original tensor list.
    let Some(index) = indices
        .index(&layer.name, layer.list)
        .map_err(|e| e.to_string())?
    else {
        return Err(format!(
            "tensor `{}` (layer {} of the first model) is not a layer here: in this file it \
             is not in the {} list ({})",
            layer.name,
            layer.index,
            layer.list,
            layer.list.rule()
        ));
    };
    if index != layer.index {
        return Err(format!(
            "tensor `{}` is layer {index} in this file but layer {} in the first model: the \
             models do not share one layer list, so layer indices disagree",
            layer.name, layer.index
        ));
    }
    if !is_float(entry.dtype) {
        return Err(format!(
            "tensor `{}` is {:?}, not floating point",
            layer.name, entry.dtype
        ));
    }
    let Some((up_name, _)) = &layer.lora_up else {
        if entry.shape != layer.source_shape {
            return Err(format!(
                "tensor `{}` has shape {:?}, the first model's has {:?}; all models must share \
                 the layer's shape",
                layer.name, entry.shape, layer.source_shape
            ));
        }
        return Ok((entry, None));
    };
    let (_, up) = st.header().find(up_name).ok_or_else(|| {
        format!(
            "LoRA up factor `{up_name}` of layer {} is not in this file (its down factor `{}` is)",
            layer.index, layer.name
        )
    })?;
    if !is_float(up.dtype) {
        return Err(format!(
            "tensor `{up_name}` is {:?}, not floating point",
            up.dtype
        ));
    }
    // Models may be trained at different ranks: what must agree is the matrix the pair forms.
    let matrix = transform::plan_lora(&up.shape, &entry.shape)
        .map_err(|m| format!("LoRA layer `{}`: {m}", layer.name))?;
    if matrix != layer.matrix {
        return Err(format!(
            "LoRA layer `{}` forms a {:?} matrix (up {:?}, down {:?}), the first model's forms \
             {:?}; all models must share the layer's shape",
            layer.name, matrix, up.shape, entry.shape, layer.matrix
        ));
    }
    if let Storage::LoraFactors { rank } = layer.storage
        && entry.shape[0] > rank
    {
        return Err(format!(
            "LoRA layer `{}` has rank {}, more than the {rank} its dataset was laid out for",
            layer.name, entry.shape[0]
        ));
    }
    Ok((entry, Some(up)))
}

/// One model file being read, with what every row of it shares, worked out once per file
/// rather than once per layer.
struct OpenModel<'a> {
    model: &'a ModelSource,
    st: &'a SafetensorsFile,
    /// What the file's digest was taken from: an in-place reference is trusted while the
    /// file still has this stamp.
    stamp: FileStamp,
    /// The file's layer lists, worked out once for all its rows.
    indices: LayerIndex<'a>,
    /// The file's path made absolute and followed through symlinks (the Hugging Face cache
    /// links snapshots to blobs), which is what an in-place reference names.
    canonical: PathBuf,
}

/// Reads, checks and writes one layer of one model into slot `slot`.
fn extract_row(
    cx: &Ctx,
    file: &OpenModel,
    out: usize,
    slot: usize,
    findings: &mut Vec<NonFiniteFinding>,
    bytes_read: &mut u64,
) -> Result<RowOutcome, Problem> {
    let (model, st) = (file.model, file.st);
    let layer = &cx.outputs[out].layer;
    let bad_file = |message: String| Problem {
        fatal: cx.opts.on_bad_file == OnError::Fail,
        message,
    };
    let (entry, up) = check_entry(st, &file.indices, layer).map_err(bad_file)?;
    let data = st.data(entry).map_err(|e| bad_file(e.to_string()))?;
    let up_data = match up {
        Some(u) => Some(st.data(u).map_err(|e| bad_file(e.to_string()))?),
        None => None,
    };
    let referenced = cx.referenced[out];
    if reads_values(cx, out) {
        *bytes_read += (data.len() + up_data.map_or(0, <[u8]>::len)) as u64;
    }
    let precision = cx.precision[out];
    let send = |part: usize, bytes: RowBytes| {
        cx.sinks[out]
            .send(Job { slot, part, bytes })
            .map_err(|_| Problem {
                fatal: true,
                message: "the layer writer stopped (see the write error)".into(),
            })
    };

    if referenced {
        let bad = if reads_values(cx, out) {
            non_finite_in(entry.dtype, data)
                + up.zip(up_data)
                    .map_or(0, |(u, d)| non_finite_in(u.dtype, d))
        } else {
            0
        };
        if bad > 0 {
            let mut parts = row_parts(st, layer, entry, up).map_err(bad_file)?;
            if let Some(dropped) =
                non_finite_policy(cx.opts.non_finite, model, layer, &mut parts, findings)?
            {
                return Ok(RowOutcome::Dropped(dropped));
            }
        }
        let reference = TensorRef {
            file: file.canonical.clone(),
            stamp: file.stamp,
            // Up factor first, then the down factor (or the matrix).
            tensors: up
                .into_iter()
                .chain([entry])
                .map(|e| TensorSpan {
                    offset: e.span.start as u64,
                    dtype: e.dtype,
                    shape: e.shape.clone(),
                })
                .collect(),
        };
        return Ok(RowOutcome::Written {
            reference: Some(reference),
        });
    }

    // Fast path: every stored piece is already the file's bytes (same dtype, LoRA factors of
    // the layer's full rank). The writer thread checks them for NaN/Inf while it copies them
    // from the mapping (one pass over the bytes while they are in cache); flagged rows are
    // handled after the pass.
    let pieces: Vec<&TensorEntry> = up.into_iter().chain([entry]).collect();
    let full_rank = match layer.storage {
        Storage::LoraFactors { rank } => entry.shape[0] == rank,
        Storage::Stacked | Storage::References { .. } => true,
    };
    if cfg!(target_endian = "little")
        && full_rank
        && pieces
            .iter()
            .all(|e| e.dtype == writer::dtype_of(precision))
    {
        for (part, e) in pieces.iter().enumerate() {
            send(part, RowBytes::Mapped(st.mapping(), e.span.clone()))?;
        }
        return Ok(RowOutcome::Written { reference: None });
    }

    let mut parts = row_parts(st, layer, entry, up).map_err(bad_file)?;
    if let Some(dropped) =
        non_finite_policy(cx.opts.non_finite, model, layer, &mut parts, findings)?
    {
        return Ok(RowOutcome::Dropped(dropped));
    }
    for (part, values) in parts.iter().enumerate() {
        let (_, bytes) = encode(values, precision);
        let n = bytes.len();
        cx.budget.acquire(n);
        if let Err(p) = send(part, RowBytes::Owned(bytes)) {
            cx.budget.release(n);
            return Err(p);
        }
    }
    Ok(RowOutcome::Written { reference: None })
}

/// Whether extraction reads output `out`'s values. A copied row is read to be written; a
/// referenced one only to drop a model whose values are NaN/Inf (`non_finite = "skip"`).
/// Under `"fail"` a referenced row's values are not read here: every read of the dataset
/// checks them (see [`crate::dataset::RowReader`]) and fails naming the model, so the bytes
/// are scanned once, by the training that reads them anyway, instead of twice.
fn reads_values(cx: &Ctx, out: usize) -> bool {
    !cx.referenced[out] || cx.opts.non_finite == NonFinitePolicy::Skip
}

/// The stored pieces of `layer` in `st`, decoded to f32: the matrix, or for a LoRA pair its
/// factors `up` `[out, rank]` and `down` `[rank, cols]`, zero-padded to the layer's rank.
pub(super) fn row_parts(
    st: &SafetensorsFile,
    layer: &ResolvedLayer,
    entry: &TensorEntry,
    up: Option<&TensorEntry>,
) -> Result<Vec<Vec<f32>>, String> {
    let decode = |e: &TensorEntry| {
        let d = st.data(e).map_err(|e| e.to_string())?;
        probex_weights::dataset::decode(e.dtype, d).map_err(|m| format!("tensor `{}`: {m}", e.name))
    };
    let values = decode(entry)?;
    let rank = match (up, layer.storage) {
        (Some(_), Storage::LoraFactors { rank }) => rank,
        // A referenced pair's factors as the file has them (no layout to pad to).
        (Some(u), Storage::References { .. }) => return Ok(vec![decode(u)?, values]),
        _ => return Ok(vec![values]),
    };
    let Some(u) = up else {
        return Ok(vec![values]);
    };
    let b = decode(u)?;
    let [out, cols] = layer.matrix;
    let r = entry.shape[0];
    if r == rank {
        return Ok(vec![b, values]);
    }
    // A lower rank pads `up` with zero columns and `down` with zero rows: the product is the
    // same matrix.
    let mut b_padded = vec![0.0; out * rank];
    for (dst, src) in b_padded.chunks_exact_mut(rank).zip(b.chunks_exact(r)) {
        dst[..r].copy_from_slice(src);
    }
    let mut a_padded = values;
    a_padded.resize(rank * cols, 0.0);
    Ok(vec![b_padded, a_padded])
}

/// Applies the NaN/Inf policy to a row's stored pieces (for LoRA, its factors): records a
/// finding when there are any, then fails, returns the reason the row is dropped, or zeroes
/// them in place (`Ok(None)`: keep the row).
fn non_finite_policy(
    policy: NonFinitePolicy,
    model: &ModelSource,
    layer: &ResolvedLayer,
    parts: &mut [Vec<f32>],
    findings: &mut Vec<NonFiniteFinding>,
) -> Result<Option<String>, Problem> {
    let (nan, inf) = parts.iter().fold((0, 0), |(nan, inf), p| {
        let (a, b) = count_non_finite(p);
        (nan + a, inf + b)
    });
    if nan + inf == 0 {
        return Ok(None);
    }
    let action = match policy {
        NonFinitePolicy::Fail => "failed",
        NonFinitePolicy::Skip => "skipped",
        NonFinitePolicy::Zero => "zeroed",
    };
    findings.push(NonFiniteFinding {
        model: model.id.clone(),
        path: model.path.clone(),
        layer: layer.name.clone(),
        nan,
        inf,
        action: action.into(),
    });
    let what = format!(
        "{}: tensor `{}` has {nan} NaN and {inf} infinite values",
        model.path.display(),
        layer.name
    );
    match policy {
        NonFinitePolicy::Fail => Err(Problem {
            fatal: true,
            message: format!("{what} (set non_finite = \"skip\" or \"zero\" to go on)"),
        }),
        NonFinitePolicy::Skip => Ok(Some(what)),
        NonFinitePolicy::Zero => {
            for v in parts.iter_mut().flatten() {
                if !v.is_finite() {
                    *v = 0.0;
                }
            }
            Ok(None)
        }
    }
}

/// Re-reads a fast-path row the writer flagged as holding NaN/Inf and applies the policy
/// (rare: only rows with non-finite values get here).
pub(super) fn recheck_flagged(
    cx_opts: &ExtractOptions,
    precision: Precision,
    model: &ModelSource,
    layer: &ResolvedLayer,
    file: &LayerFile,
    slot: usize,
    findings: &mut Vec<NonFiniteFinding>,
) -> Result<Option<String>, Problem> {
    let fatal = |message: String| Problem {
        fatal: true,
        message,
    };
    let st = SafetensorsFile::open(&model.path).map_err(|e| fatal(e.to_string()))?;
    let (entry, up) = check_entry(&st, &LayerIndex::new(st.header()), layer)
        .map_err(|m| fatal(prefix_path(&model.path, m)))?;
    let mut parts =
        row_parts(&st, layer, entry, up).map_err(|m| fatal(prefix_path(&model.path, m)))?;
    let dropped = non_finite_policy(cx_opts.non_finite, model, layer, &mut parts, findings)?;
    if dropped.is_none() {
        for (part, values) in parts.iter().enumerate() {
            let (_, bytes) = encode(values, precision);
            file.write_row(slot, part, &bytes)
                .map_err(|e| fatal(format!("writing {}: {e}", file.path().display())))?;
        }
    }
    Ok(dropped)
}

pub(super) fn process_model(cx: &Ctx, slot: usize, model: &ModelSource) -> ModelOutcome {
    let mut outcome = ModelOutcome {
        label: Err(Problem {
            fatal: false,
            message: String::new(),
        }),
        split: Err(Problem {
            fatal: false,
            message: String::new(),
        }),
        file_digest: None,
        rows: Vec::new(),
        findings: Vec::new(),
        bytes_read: 0,
    };
    let bad_file = |message: String| Problem {
        fatal: cx.opts.on_bad_file == OnError::Fail,
        message,
    };
    // The file's digest comes from the run's stat cache, which planning filled: a folder's
    // fetch hashed every model file for its key, so this costs a stat, not a read.
    let identity = match cx.digests.identify(&model.path) {
        Ok(id) => id,
        Err(e) => {
            outcome.label = Err(bad_file(format!("{}: {e}", model.path.display())));
            return outcome;
        }
    };
    let st = match SafetensorsFile::open(&model.path) {
        Ok(st) => st,
        Err(e) => {
            outcome.label = Err(bad_file(e.to_string()));
            return outcome;
        }
    };
    // A file replaced or rewritten between its digest and its mapping would pair one
    // content's digest with another's rows.
    match std::fs::metadata(&model.path).map(|m| identity.stamp.change(&FileStamp::of(&m))) {
        Ok(None) => {}
        Ok(Some(what)) => {
            outcome.label = Err(Problem {
                fatal: true,
                message: format!(
                    "{}: changed while it was being read ({what}); run again once nothing \
                     writes to it",
                    model.path.display()
                ),
            });
            cx.abort.store(true, Ordering::Relaxed);
            return outcome;
        }
        Err(e) => {
            outcome.label = Err(bad_file(format!("{}: {e}", model.path.display())));
            return outcome;
        }
    }
    outcome.file_digest = Some(identity.digest);
    outcome.bytes_read += st.header().data_start as u64;
    let open = OpenModel {
        model,
        st: &st,
        stamp: identity.stamp,
        indices: LayerIndex::new(st.header()),
        canonical: identity.path,
    };
    let path = model.path.display();
    outcome.label = cx.labeler.read(st.metadata()).map_err(|m| Problem {
        fatal: cx.labeler.spec().on_error == OnError::Fail,
        message: format!("{path}: {m}"),
    });
    outcome.split = cx.splits.split(model, st.metadata()).map_err(|m| Problem {
        fatal: true,
        message: format!("{path}: {m}"),
    });
    if outcome.label.as_ref().err().is_some_and(|p| p.fatal)
        || outcome.split.as_ref().err().is_some_and(|p| p.fatal)
    {
        cx.abort.store(true, Ordering::Relaxed);
    }
    if outcome.label.is_err() || outcome.split.is_err() {
        return outcome;
    }
    // Start the reads of every requested tensor at once (readahead for cold files), in as few
    // calls as the spans allow: with `layers = "all"` they are most of the file.
    let mut spans: Vec<Range<usize>> = cx
        .outputs
        .iter()
        .enumerate()
        .filter(|&(out, _)| reads_values(cx, out))
        .flat_map(|(_, o)| {
            std::iter::once(&o.layer.name).chain(o.layer.lora_up.as_ref().map(|u| &u.0))
        })
        .filter_map(|name| st.header().find(name).map(|(_, e)| e.span.clone()))
        .collect();
    for range in coalesce(&mut spans, PREFETCH_GAP) {
        st.prefetch_range(range);
    }
    for out in 0..cx.outputs.len() {
        // After a fatal error elsewhere, only the cheap header checks run, so the error report
        // lists every broken model without reading any more tensor data.
        let result = if cx.abort.load(Ordering::Relaxed) {
            check_entry(&st, &open.indices, &cx.outputs[out].layer)
                .map(|_| RowOutcome::Dropped("not read: the run stopped on an error".into()))
                .map_err(|message| Problem {
                    fatal: cx.opts.on_bad_file == OnError::Fail,
                    message,
                })
        } else {
            extract_row(
                cx,
                &open,
                out,
                slot,
                &mut outcome.findings,
                &mut outcome.bytes_read,
            )
        };
        match result {
            Ok(r) => outcome.rows.push(r),
            Err(p) => {
                if p.fatal {
                    cx.abort.store(true, Ordering::Relaxed);
                }
                // A bad file leaves the whole model out, not just this layer.
                outcome.rows.push(RowOutcome::Dropped(p.message.clone()));
                outcome.label = Err(Problem {
                    fatal: p.fatal,
                    message: prefix_path(&model.path, p.message),
                });
                return outcome;
            }
        }
    }
    outcome
}

fn prefix_path(path: &Path, message: String) -> String {
    let p = path.display().to_string();
    if message.starts_with(&p) {
        message
    } else {
        format!("{p}: {message}")
    }
}

/// The layers one pass fills: their outputs, files, stored precision, and whether each refers
/// to the model files.
pub(super) struct Layers<'a> {
    pub(super) outputs: &'a [LayerOutput],
    pub(super) files: &'a [LayerFile],
    pub(super) precision: &'a [Precision],
    pub(super) referenced: &'a [bool],
}

/// Reads every model once (in parallel), with one writer thread per layer file taking the rows
/// that are copied; then re-reads the few rows a writer flagged as holding NaN/Inf. Returns
/// each model's outcome, in `models`' order, and the bytes read. A write error is the
/// output's: the layer files are removed and the first error returned.
pub(super) fn read_models(
    models: &[&ModelSource],
    layers: &Layers,
    labeler: &Labeler,
    splits: &SplitAssigner,
    opts: &ExtractOptions,
    digests: &FileDigests,
) -> Result<(Vec<ModelOutcome>, u64), ExtractError> {
    let abort = AtomicBool::new(false);
    let bytes_read = AtomicU64::new(0);
    let write_errors: Mutex<Vec<(String, std::io::Error)>> = Mutex::new(Vec::new());
    let flagged: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());
    // One writer thread per layer file: buffered writes to one file serialise on its inode
    // lock, and page-cache writes cost more than reads, so reads (rayon) overlap with writes.
    // The bounded queues keep at most a few rows in flight.
    let depth = 4 * rayon::current_num_threads() + 8;
    let budget = ByteBudget {
        limit: IN_FLIGHT_BYTES,
        used: Mutex::new(0),
        freed: Condvar::new(),
    };
    let outcomes: Vec<ModelOutcome> = std::thread::scope(|scope| {
        let mut sinks = Vec::with_capacity(layers.files.len());
        for (out_i, file) in layers.files.iter().enumerate() {
            let (tx, rx) = sync_channel::<Job>(depth);
            sinks.push(tx);
            if layers.referenced[out_i] {
                // Its rows stay in the model files: nothing is ever sent, so no writer.
                continue;
            }
            let errors = &write_errors;
            let abort = &abort;
            let flagged = &flagged;
            let budget = &budget;
            let precision = layers.precision[out_i];
            scope.spawn(move || {
                for job in rx {
                    let result = match &job.bytes {
                        RowBytes::Mapped(map, range) => match map.as_ref().get(range.clone()) {
                            Some(b) => {
                                write_scanned(file, job.slot, job.part, precision, b).map(|bad| {
                                    if bad > 0
                                        && let Ok(mut f) = flagged.lock()
                                    {
                                        f.push((out_i, job.slot));
                                    }
                                })
                            }
                            None => Err(std::io::Error::other("row span outside its mapping")),
                        },
                        RowBytes::Owned(v) => {
                            let r = file.write_row(job.slot, job.part, v);
                            budget.release(v.len());
                            r
                        }
                    };
                    if let Err(e) = result {
                        abort.store(true, Ordering::Relaxed);
                        if let Ok(mut v) = errors.lock() {
                            v.push((file.path().display().to_string(), e));
                        }
                    }
                }
            });
        }
        let cx = Ctx {
            outputs: layers.outputs,
            precision: layers.precision,
            referenced: layers.referenced,
            budget: &budget,
            sinks: &sinks,
            labeler,
            splits,
            opts,
            digests,
            abort: &abort,
        };
        models
            .par_iter()
            .enumerate()
            .map(|(slot, m)| {
                let o = process_model(&cx, slot, m);
                bytes_read.fetch_add(o.bytes_read, Ordering::Relaxed);
                o
            })
            .collect()
        // `sinks` drops here, ending the writers; the scope joins them.
    });
    // A failed write is about the output (a full disk), not the models being read: the first
    // error says it, the rows after it failed the same way.
    if let Some((path, error)) = write_errors
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .next()
    {
        for f in layers.files {
            let _ = std::fs::remove_file(f.path());
        }
        return Err(ExtractError::Io { path, error });
    }
    let mut outcomes = outcomes;
    let mut flagged = flagged.into_inner().unwrap_or_default();
    flagged.sort_unstable();
    flagged.dedup();
    for (out_i, slot) in flagged {
        let o = &mut outcomes[slot];
        if o.label.is_err() || o.split.is_err() {
            continue; // left out anyway
        }
        match recheck_flagged(
            opts,
            layers.precision[out_i],
            models[slot],
            &layers.outputs[out_i].layer,
            &layers.files[out_i],
            slot,
            &mut o.findings,
        ) {
            Ok(None) => {}
            Ok(Some(why)) => o.rows[out_i] = RowOutcome::Dropped(why),
            Err(p) => {
                o.label = Err(p);
            }
        }
    }
    Ok((outcomes, bytes_read.into_inner()))
}
