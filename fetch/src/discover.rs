//! Finding model files on disk in the layouts Model-J and the Hugging Face cache use.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use probex_weights::dataset::Split;

/// One model file to extract from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSource {
    /// Stable id: the repo id (`ProbeX/Model-J__DINO__model_idx_0042`), the directory
    /// (`model_idx_0042`) or the file stem, by layout. Rows are sorted by it.
    pub id: String,
    /// The `.safetensors` file.
    pub path: PathBuf,
    /// The split when the layout says it (Model-J's `{split}/` directories).
    pub split: Option<Split>,
}

/// Where model files are and how they are laid out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Layout {
    /// A Hugging Face hub cache (`models--org--name/refs/<revision>` and
    /// `models--org--name/snapshots/<commit>/<file>`), one model per repo. No splits.
    HfCache {
        /// The cache directory (holds the `models--*` directories).
        root: PathBuf,
        /// Only repos whose id (`org/name`) matches this glob (default: all).
        #[serde(default)]
        repos: Option<String>,
        /// The file inside each snapshot (default `model.safetensors`).
        #[serde(default = "default_model_file")]
        file: String,
        /// The ref to read (default `main`).
        #[serde(default = "default_revision")]
        revision: String,
    },
    /// Model-J discriminative download: `root/{split}/` per split, each either a hub cache
    /// (what the official download script makes) or plain repo directories holding `file`.
    ModelJDiscriminative {
        /// The directory holding the split directories.
        root: PathBuf,
        /// The file of each model (default `model.safetensors`).
        #[serde(default = "default_model_file")]
        file: String,
    },
    /// Model-J generative: `root/{split}/model_idx_XXXX/pytorch_lora_weights.safetensors`.
    ModelJGenerative {
        /// The directory holding the split directories (a snapshot of the subset's repo).
        root: PathBuf,
        /// The file of each model (default `pytorch_lora_weights.safetensors`).
        #[serde(default = "default_lora_file")]
        file: String,
    },
    /// A folder of `.safetensors` files; ids are the paths below it without the extension.
    Folder {
        /// The folder.
        root: PathBuf,
        /// Also look in subfolders.
        #[serde(default)]
        recursive: bool,
    },
}

fn default_model_file() -> String {
    "model.safetensors".into()
}
fn default_lora_file() -> String {
    "pytorch_lora_weights.safetensors".into()
}
fn default_revision() -> String {
    "main".into()
}

/// The result of a discovery: the models, sorted by id, and notes on what was passed over
/// (incomplete downloads, stray files), for the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Discovered {
    /// Models found, sorted by id.
    pub models: Vec<ModelSource>,
    /// What was passed over and why.
    pub notes: Vec<String>,
    /// Files named like a model that cannot be read (a dangling or looping symbolic link):
    /// passed over too, but worth a warning, not only a log line.
    pub problems: Vec<String>,
}

/// How deep below a root discovery looks: Model-J needs 4 levels; the cap stops runaway walks.
const MAX_DEPTH: usize = 8;

/// A glob (`*`, `?`) that does not make a pattern.
#[derive(Debug, thiserror::Error)]
#[error("pattern `{glob}`: {source}")]
pub struct GlobError {
    /// The glob as written.
    pub glob: String,
    /// The regex engine's objection.
    #[source]
    pub source: regex::Error,
}

/// Why a layout yields no usable model list.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    /// A directory cannot be listed.
    #[error("{}: {source}", dir.display())]
    ReadDir {
        /// The directory.
        dir: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The `repos` filter is not a usable glob.
    #[error(transparent)]
    Glob(#[from] GlobError),
    /// Two model files give the same id.
    #[error("two models have the id `{id}`: {} and {}", first.display(), second.display())]
    DuplicateId {
        /// The id.
        id: String,
        /// One file.
        first: PathBuf,
        /// The other.
        second: PathBuf,
    },
    /// Nothing found; `passed` lists what was skipped and why.
    #[error("no model files found: {described}{}", passed_note(passed))]
    NoModels {
        /// Where the layout looked, in words.
        described: String,
        /// The problems and notes met on the way.
        passed: Vec<String>,
    },
    /// A split layout without split directories.
    #[error("{}: no split directories (train/, val/, test/, ...) found", root.display())]
    NoSplitDirs {
        /// The layout's root.
        root: PathBuf,
    },
    /// A model file directly in a split directory (its id would be empty).
    #[error(
        "{}: a model file directly in the split directory; expected {}/<model dir>/{file}",
        path.display(),
        base.display()
    )]
    FileInSplitDir {
        /// The file.
        path: PathBuf,
        /// The split directory.
        base: PathBuf,
        /// The model file name the layout looks for.
        file: String,
    },
}

/// ` (a; b)` after the no-models message, or nothing.
fn passed_note(passed: &[String]) -> String {
    if passed.is_empty() {
        String::new()
    } else {
        format!(" ({})", passed.join("; "))
    }
}

/// Why a model gets no split.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    /// `splits = "layout"` on a layout without split directories.
    #[error(
        "model `{0}` has no split: its layout has no split directories; give `splits` as a \
         metadata key or a table"
    )]
    NoLayoutSplit(String),
    /// The metadata key is missing from the model's header.
    #[error("metadata key `{0}` (the split) is missing")]
    MissingKey(String),
    /// The metadata value names no split.
    #[error(
        "metadata key `{key}` = {value:?} is not a split (train, val, test, val_holdout, \
         test_holdout)"
    )]
    NotASplit {
        /// The key.
        key: String,
        /// Its value.
        value: String,
    },
    /// No pattern of the table matches the model.
    #[error("model `{0}` is in no split of the splits table")]
    NotInTable(String),
    /// Patterns of two splits match the model.
    #[error(
        "model `{model}` is in two splits of the table: {first} (`{first_pattern}`) and {second} (`{second_pattern}`)"
    )]
    TwoSplits {
        /// The model's id.
        model: String,
        /// The first split.
        first: Split,
        /// The pattern that put it there.
        first_pattern: String,
        /// The other split.
        second: Split,
        /// The pattern that put it there.
        second_pattern: String,
    },
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<fs::DirEntry>, DiscoverError> {
    let failed = |source| DiscoverError::ReadDir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut entries: Vec<fs::DirEntry> = fs::read_dir(dir)
        .map_err(failed)?
        .collect::<Result<_, _>>()
        .map_err(failed)?;
    entries.sort_by_key(|e| e.file_name());
    Ok(entries)
}

fn is_dir_no_follow(e: &fs::DirEntry) -> bool {
    e.file_type().map(|t| t.is_dir()).unwrap_or(false)
}

/// Why `path`, named like a model file, is not one: a symbolic link that leads nowhere
/// (dangling), goes round in circles, or leads to something else than a file; `None` for anything that
/// is not a symbolic link (a folder named `x.safetensors` is just not a model).
fn unusable_link(path: &Path) -> Option<String> {
    let meta = fs::symlink_metadata(path).ok()?;
    if !meta.file_type().is_symlink() {
        return None;
    }
    let target = fs::read_link(path)
        .map(|t| t.display().to_string())
        .unwrap_or_else(|_| "?".into());
    let why = match fs::metadata(path) {
        Ok(m) if m.is_file() => return None,
        Ok(_) => format!("is a symbolic link to {target}, which is not a file"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            format!("is a symbolic link to {target}, which does not exist (dangling)")
        }
        // A loop says "Too many levels of symbolic links" (io::ErrorKind::FilesystemLoop is
        // not stable yet).
        Err(e) => format!("is a symbolic link to {target} that cannot be followed: {e}"),
    };
    Some(format!("{}: {why}; skipped", path.display()))
}

/// Finds the model files of `layout`. Ids are unique (a clash is an error naming both files)
/// and sorted, so row order is reproducible.
pub fn discover(layout: &Layout) -> Result<Discovered, DiscoverError> {
    let mut found = Discovered::default();
    match layout {
        Layout::HfCache {
            root,
            repos,
            file,
            revision,
        } => {
            let filter = repos.as_deref().map(glob_to_regex).transpose()?;
            hf_cache(root, filter.as_ref(), file, revision, None, &mut found)?;
        }
        Layout::ModelJDiscriminative { root, file } => {
            for (split, dir) in split_dirs(root, &mut found.notes)? {
                let has_cache = read_dir_sorted(&dir)?
                    .iter()
                    .any(|e| e.file_name().to_string_lossy().starts_with("models--"));
                if has_cache {
                    hf_cache(&dir, None, file, "main", Some(split), &mut found)?;
                } else {
                    walk_named(&dir, &dir, file, split, 0, &mut found)?;
                }
            }
        }
        Layout::ModelJGenerative { root, file } => {
            for (split, dir) in split_dirs(root, &mut found.notes)? {
                walk_named(&dir, &dir, file, split, 0, &mut found)?;
            }
        }
        Layout::Folder { root, recursive } => {
            folder(root, root, *recursive, 0, &mut found)?;
        }
    }
    found.models.sort_by(|a, b| a.id.cmp(&b.id));
    if let Some(w) = found.models.windows(2).find(|w| w[0].id == w[1].id) {
        return Err(DiscoverError::DuplicateId {
            id: w[0].id.clone(),
            first: w[0].path.clone(),
            second: w[1].path.clone(),
        });
    }
    if found.models.is_empty() {
        return Err(DiscoverError::NoModels {
            described: describe(layout),
            passed: found.problems.iter().chain(&found.notes).cloned().collect(),
        });
    }
    Ok(found)
}

/// Where `layout` looked and for what, in words (for "no model files found").
fn describe(layout: &Layout) -> String {
    match layout {
        Layout::HfCache {
            root,
            repos,
            file,
            revision,
        } => format!(
            "no {file} in the Hugging Face cache at {} (models--*/snapshots/<{revision}>/{file}{})",
            root.display(),
            repos
                .as_deref()
                .map_or(String::new(), |r| format!(", repos matching `{r}`"))
        ),
        Layout::ModelJDiscriminative { root, file } => format!(
            "no {file} under the split folders of {} (<split>/<model>/{file}, or a hub cache per split)",
            root.display()
        ),
        Layout::ModelJGenerative { root, file } => format!(
            "no {file} under the split folders of {} (<split>/<model>/{file})",
            root.display()
        ),
        Layout::Folder { root, recursive } => format!(
            "no *.safetensors files in the folder {}{}",
            root.display(),
            if *recursive {
                " or its subfolders"
            } else {
                " (set recursive = true to look in subfolders)"
            }
        ),
    }
}

fn split_dirs(
    root: &Path,
    notes: &mut Vec<String>,
) -> Result<Vec<(Split, PathBuf)>, DiscoverError> {
    let mut out = Vec::new();
    for e in read_dir_sorted(root)? {
        let name = e.file_name().to_string_lossy().to_string();
        match Split::parse(&name) {
            Some(s) if is_dir_no_follow(&e) || e.path().is_dir() => out.push((s, e.path())),
            _ if name.starts_with('.') => {}
            _ => notes.push(format!(
                "{}: not a split directory (expected one of train, val, test, val_holdout, \
                 test_holdout); ignored",
                e.path().display()
            )),
        }
    }
    if out.is_empty() {
        return Err(DiscoverError::NoSplitDirs {
            root: root.to_path_buf(),
        });
    }
    Ok(out)
}

/// `models--org--name` -> `org/name` (hub repo names cannot contain `--`).
fn repo_id(dir_name: &str) -> Option<String> {
    let rest = dir_name.strip_prefix("models--")?;
    let (org, name) = rest.split_once("--")?;
    Some(format!("{org}/{name}"))
}

fn hf_cache(
    root: &Path,
    filter: Option<&regex::Regex>,
    file: &str,
    revision: &str,
    split: Option<Split>,
    found: &mut Discovered,
) -> Result<(), DiscoverError> {
    for e in read_dir_sorted(root)? {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(id) = repo_id(&name) else { continue };
        if filter.is_some_and(|re| !re.is_match(&id)) {
            continue;
        }
        let repo = e.path();
        let ref_path = repo.join("refs").join(revision);
        let commit = match fs::read(&ref_path) {
            Ok(b) if b.len() <= 256 => String::from_utf8_lossy(&b).trim().to_string(),
            Ok(_) => {
                found.notes.push(format!(
                    "{}: ref file too large; skipped",
                    ref_path.display()
                ));
                continue;
            }
            Err(_) => {
                found.notes.push(format!(
                    "{id}: no refs/{revision} (incomplete download); skipped"
                ));
                continue;
            }
        };
        if commit.is_empty() || commit.contains(['/', '\\']) || commit.starts_with('.') {
            found
                .notes
                .push(format!("{}: not a commit id; skipped", ref_path.display()));
            continue;
        }
        let path = repo.join("snapshots").join(&commit).join(file);
        if path.is_file() {
            found.models.push(ModelSource { id, path, split });
        } else {
            found
                .notes
                .push(format!("{id}: no {file} in snapshot {commit}; skipped"));
        }
    }
    Ok(())
}

fn walk_named(
    base: &Path,
    dir: &Path,
    file: &str,
    split: Split,
    depth: usize,
    found: &mut Discovered,
) -> Result<(), DiscoverError> {
    if depth > MAX_DEPTH {
        found.notes.push(format!(
            "{}: deeper than {MAX_DEPTH} levels; not searched",
            dir.display()
        ));
        return Ok(());
    }
    for e in read_dir_sorted(dir)? {
        let name = e.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = e.path();
        if is_dir_no_follow(&e) {
            walk_named(base, &path, file, split, depth + 1, found)?;
        } else if name == *file
            && let Some(problem) = unusable_link(&path)
        {
            found.problems.push(problem);
        } else if name == *file && path.is_file() {
            let id = path
                .parent()
                .and_then(|p| p.strip_prefix(base).ok())
                .map(rel_id)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| DiscoverError::FileInSplitDir {
                    path: path.clone(),
                    base: base.to_path_buf(),
                    file: file.to_owned(),
                })?;
            found.models.push(ModelSource {
                id,
                path,
                split: Some(split),
            });
        }
    }
    Ok(())
}

fn folder(
    base: &Path,
    dir: &Path,
    recursive: bool,
    depth: usize,
    found: &mut Discovered,
) -> Result<(), DiscoverError> {
    for e in read_dir_sorted(dir)? {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with('.') {
            continue;
        }
        let path = e.path();
        if is_dir_no_follow(&e) {
            if recursive && depth < MAX_DEPTH {
                folder(base, &path, recursive, depth + 1, found)?;
            }
        } else if name.ends_with(".safetensors")
            && let Some(problem) = unusable_link(&path)
        {
            found.problems.push(problem);
        } else if name.ends_with(".safetensors") && path.is_file() {
            // `path` was listed under `base`, so the prefix is always there.
            let id = rel_id(path.strip_prefix(base).unwrap_or(&path));
            let id = id.strip_suffix(".safetensors").unwrap_or(&id).to_string();
            found.models.push(ModelSource {
                id,
                path,
                split: None,
            });
        }
    }
    Ok(())
}

fn rel_id(rel: &Path) -> String {
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().to_string())
        .collect::<Vec<_>>()
        .join("/")
}

/// Translates a glob (`*`, `?`) into an anchored regex for matching ids.
pub fn glob_to_regex(glob: &str) -> Result<regex::Regex, GlobError> {
    let mut re = String::from("^");
    for c in glob.chars() {
        match c {
            '*' => re.push_str(".*"),
            '?' => re.push('.'),
            c => re.push_str(&regex::escape(&c.to_string())),
        }
    }
    re.push('$');
    regex::Regex::new(&re).map_err(|source| GlobError {
        glob: glob.to_owned(),
        source,
    })
}

/// Where each model's split comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SplitSource {
    /// From the layout (Model-J's split directories); an error for models without one.
    #[default]
    Layout,
    /// From a `__metadata__` key whose value is a split name (`train`, `val`, ...).
    Metadata {
        /// The key.
        key: String,
    },
    /// From a table: split name -> model ids or id globs (`["model_0*"]`). Every model must
    /// match exactly one split.
    Table(BTreeMap<Split, Vec<String>>),
}

/// Decides the split of each model.
#[derive(Debug)]
pub struct SplitAssigner {
    source: SplitSource,
    table: Vec<(Split, regex::Regex, String)>,
}

impl SplitAssigner {
    /// Prepares `source` (compiling the table's globs).
    pub fn new(source: &SplitSource) -> Result<Self, GlobError> {
        let mut table = Vec::new();
        if let SplitSource::Table(t) = source {
            for (split, pats) in t {
                for p in pats {
                    table.push((*split, glob_to_regex(p)?, p.clone()));
                }
            }
        }
        Ok(SplitAssigner {
            source: source.clone(),
            table,
        })
    }

    /// The split of `model` (with its metadata). The error says what is missing.
    pub fn split(
        &self,
        model: &ModelSource,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Split, SplitError> {
        match &self.source {
            SplitSource::Layout => model
                .split
                .ok_or_else(|| SplitError::NoLayoutSplit(model.id.clone())),
            SplitSource::Metadata { key } => {
                let v = metadata
                    .get(key)
                    .ok_or_else(|| SplitError::MissingKey(key.clone()))?;
                Split::parse(v.trim()).ok_or_else(|| SplitError::NotASplit {
                    key: key.clone(),
                    value: v.clone(),
                })
            }
            SplitSource::Table(_) => {
                let hits: Vec<&(Split, regex::Regex, String)> = self
                    .table
                    .iter()
                    .filter(|(_, re, _)| re.is_match(&model.id))
                    .collect();
                match hits.as_slice() {
                    [] => Err(SplitError::NotInTable(model.id.clone())),
                    [(s, _, _)] => Ok(*s),
                    [first, rest @ ..] => match rest.iter().find(|h| h.0 != first.0) {
                        None => Ok(first.0),
                        Some(other) => Err(SplitError::TwoSplits {
                            model: model.id.clone(),
                            first: first.0,
                            first_pattern: first.2.clone(),
                            second: other.0,
                            second_pattern: other.2.clone(),
                        }),
                    },
                }
            }
        }
    }
}
