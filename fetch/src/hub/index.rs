//! The Model-J index dataset (`ProbeX/Model-J`): one parquet config per subset, one row per
//! model with its `hf_model_id` and its split. This is where the discriminative subsets' splits
//! come from (the official download script reads the same table).

use std::path::Path;

use probex_weights::dataset::Split;

/// One row of the index: a model repo and its split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexRow {
    /// `ProbeX/Model-J__{subset}__model_idx_XXXX`.
    pub repo: String,
    /// Its split.
    pub split: Split,
}

/// Whether the repo file `path` is a parquet file of config `subset`, and the split its name
/// gives (`{subset}/train-00000-of-00001.parquet` -> train), if any.
pub fn parquet_of_subset(path: &str, subset: &str) -> Option<Option<Split>> {
    if !path.ends_with(".parquet") {
        return None;
    }
    let parts: Vec<&str> = path.split('/').collect();
    if !parts[..parts.len() - 1].contains(&subset) {
        return None;
    }
    let file = parts.last().copied().unwrap_or_default();
    let from_name = file.split(['-', '.']).next().and_then(split_name);
    let from_dir = parts[..parts.len() - 1].iter().find_map(|p| split_name(p));
    Some(from_name.or(from_dir))
}

/// A split name as the index spells it (`validation` is `val`).
pub fn split_name(s: &str) -> Option<Split> {
    match s {
        "validation" => Some(Split::Val),
        other => Split::parse(other),
    }
}

/// Reads the rows of one index parquet file. `file_split` is the split its path gives; a
/// `split` column, when present, takes precedence (and must agree with the path if both exist).
pub fn read_parquet(path: &Path, file_split: Option<Split>) -> Result<Vec<IndexRow>, String> {
    // The parquet reader is not hardened against hostile files (it can panic on some corrupt
    // inputs): keep a panic from taking the run down and report it as a corrupt file.
    let label = path.display().to_string();
    std::panic::catch_unwind(|| read_parquet_inner(path, file_split))
        .unwrap_or_else(|_| Err("the parquet reader failed on this file (corrupt?)".into()))
        .map_err(|m| format!("Model-J index {label}: {m}"))
}

fn read_parquet_inner(path: &Path, file_split: Option<Split>) -> Result<Vec<IndexRow>, String> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;

    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let reader = SerializedFileReader::new(file).map_err(|e| format!("not a parquet file: {e}"))?;
    let fields: Vec<String> = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    if !fields.iter().any(|f| f == "hf_model_id") {
        return Err(format!(
            "no `hf_model_id` column (columns: {}); is this the Model-J index?",
            fields.join(", ")
        ));
    }
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| format!("cannot read rows: {e}"))?;
    let mut out = Vec::new();
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| format!("row {i}: {e}"))?;
        let mut repo = None;
        let mut split = None;
        for (name, field) in row.get_column_iter() {
            match (name.as_str(), field) {
                ("hf_model_id", Field::Str(s)) => repo = Some(s.clone()),
                ("split", Field::Str(s)) => {
                    split =
                        Some(split_name(s).ok_or_else(|| {
                            format!("row {i}: split {s:?} is not train, val or test")
                        })?)
                }
                _ => {}
            }
        }
        let repo = repo.ok_or_else(|| format!("row {i}: `hf_model_id` is missing or not text"))?;
        let split = match (split, file_split) {
            (Some(a), Some(b)) if a != b => {
                return Err(format!(
                    "row {i} ({repo}): column split {a} disagrees with the file's split {b}"
                ));
            }
            (Some(s), _) | (None, Some(s)) => s,
            (None, None) => {
                return Err(format!(
                    "row {i} ({repo}): no `split` column and the file name names no split"
                ));
            }
        };
        out.push(IndexRow { repo, split });
    }
    Ok(out)
}
