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

/// Why one Model-J index parquet file cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("Model-J index {}: {problem}", path.display())]
pub struct IndexError {
    /// The parquet file.
    pub path: std::path::PathBuf,
    /// What is wrong with it.
    #[source]
    pub problem: IndexProblem,
}

/// What is wrong with an index file ([`IndexError`]).
#[derive(Debug, thiserror::Error)]
pub enum IndexProblem {
    /// The parquet reader panicked.
    #[error("the parquet reader failed on this file (corrupt?)")]
    ReaderPanicked,
    /// The file cannot be opened.
    #[error(transparent)]
    Open(#[from] std::io::Error),
    /// Not a parquet file.
    #[error("not a parquet file: {0}")]
    NotParquet(#[source] parquet::errors::ParquetError),
    /// No `hf_model_id` column.
    #[error("no `hf_model_id` column (columns: {}); is this the Model-J index?", columns.join(", "))]
    NoModelColumn {
        /// The columns it has.
        columns: Vec<String>,
    },
    /// The rows cannot be read.
    #[error("cannot read rows: {0}")]
    Rows(#[source] parquet::errors::ParquetError),
    /// One row cannot be read.
    #[error("row {row}: {source}")]
    Row {
        /// The row (0-based).
        row: usize,
        /// The reader's error.
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// A `split` value that is no split.
    #[error("row {row}: split {split:?} is not train, val or test")]
    BadSplit {
        /// The row.
        row: usize,
        /// Its value.
        split: String,
    },
    /// A row without a model id.
    #[error("row {0}: `hf_model_id` is missing or not text")]
    NoRepo(usize),
    /// The `split` column and the file name disagree.
    #[error("row {row} ({repo}): column split {column} disagrees with the file's split {file}")]
    SplitDisagrees {
        /// The row.
        row: usize,
        /// Its repo.
        repo: String,
        /// The column's split.
        column: Split,
        /// The file name's split.
        file: Split,
    },
    /// Neither a `split` column nor a split in the file name.
    #[error("row {row} ({repo}): no `split` column and the file name names no split")]
    NoSplit {
        /// The row.
        row: usize,
        /// Its repo.
        repo: String,
    },
}

/// Reads the rows of one index parquet file. `file_split` is the split its path gives; a
/// `split` column, when present, takes precedence (and must agree with the path if both exist).
pub fn read_parquet(path: &Path, file_split: Option<Split>) -> Result<Vec<IndexRow>, IndexError> {
    // The parquet reader is not hardened against hostile files (it can panic on some corrupt
    // inputs): keep a panic from taking the run down and report it as a corrupt file.
    std::panic::catch_unwind(|| read_parquet_inner(path, file_split))
        .unwrap_or(Err(IndexProblem::ReaderPanicked))
        .map_err(|problem| IndexError {
            path: path.to_path_buf(),
            problem,
        })
}

fn read_parquet_inner(
    path: &Path,
    file_split: Option<Split>,
) -> Result<Vec<IndexRow>, IndexProblem> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;

    let file = std::fs::File::open(path)?;
    let reader = SerializedFileReader::new(file).map_err(IndexProblem::NotParquet)?;
    let fields: Vec<String> = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    if !fields.iter().any(|f| f == "hf_model_id") {
        return Err(IndexProblem::NoModelColumn { columns: fields });
    }
    let rows = reader.get_row_iter(None).map_err(IndexProblem::Rows)?;
    let mut out = Vec::new();
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|source| IndexProblem::Row { row: i, source })?;
        let mut repo = None;
        let mut split = None;
        for (name, field) in row.get_column_iter() {
            match (name.as_str(), field) {
                ("hf_model_id", Field::Str(s)) => repo = Some(s.clone()),
                ("split", Field::Str(s)) => {
                    split = Some(split_name(s).ok_or_else(|| IndexProblem::BadSplit {
                        row: i,
                        split: s.clone(),
                    })?)
                }
                _ => {}
            }
        }
        let repo = repo.ok_or(IndexProblem::NoRepo(i))?;
        let split = match (split, file_split) {
            (Some(a), Some(b)) if a != b => {
                return Err(IndexProblem::SplitDisagrees {
                    row: i,
                    repo,
                    column: a,
                    file: b,
                });
            }
            (Some(s), _) | (None, Some(s)) => s,
            (None, None) => {
                return Err(IndexProblem::NoSplit { row: i, repo });
            }
        };
        out.push(IndexRow { repo, split });
    }
    Ok(out)
}
