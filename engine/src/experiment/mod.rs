//! Loading experiment files: TOML -> typed, validated stage declarations.
//!
//! An experiment file has an `[experiment]` table (name, description, `include`), one
//! `[stage.NAME]` table per stage, and an optional `[expect]` table. `include` names other
//! experiment files (relative to the including file) whose stages and expectations come first;
//! the including file may add stages or override single keys of included ones.
//!
//! Every error points at its file, line and column. Kind parameters are deserialized from the
//! spanned TOML tree one stage at a time, so `deny_unknown_fields` errors keep their position
//! (an internally tagged enum over all kinds would lose it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use petgraph::graph::{DiGraph, NodeIndex};
use toml::Spanned;
use toml::de::{DeString, DeTable, DeValue};

use crate::diagnostic::{Diagnostic, Diagnostics, FileId, SourceMap, Span};
use crate::expect::Expectation;
use crate::param_error::ParamError;
use crate::params::{engine_keys, is_engine_key};
use crate::shape::{PlanFacts, PlanInput};
use crate::stage::{Coords, DynStage, InputSlot, ParamBox, Registry};

mod checks;
mod declare;
mod files;
mod order;
mod suggest;

use checks::{check_result_paths, check_types, plan_facts};
use declare::declare;
use files::{in_file_order, merge_stages, read_header, read_tree};
use order::order_stages;
pub(crate) use suggest::closest_n;
use suggest::{closest, list};

/// A loaded, validated experiment.
#[derive(Clone)]
pub struct Experiment {
    /// `[experiment] name`, or the file stem.
    pub name: String,
    /// `[experiment] description`.
    pub description: String,
    /// The file that was loaded.
    pub path: PathBuf,
    /// Directory of that file: relative paths in params resolve against it.
    pub base_dir: PathBuf,
    /// Every file read (the experiment and its includes).
    pub sources: SourceMap,
    /// Stages in a topological order (inputs before readers).
    pub stages: Vec<StageDecl>,
    /// Expectations from `[expect]` and the stages' `expect` tables.
    pub expect: Vec<Expectation>,
}

/// One declared stage.
#[derive(Clone)]
pub struct StageDecl {
    /// The `NAME` of `[stage.NAME]`.
    pub name: String,
    /// The kind name.
    pub kind: String,
    /// Where the stage is declared (its name).
    pub span: Span,
    /// The `from` names, in order, with where each is written.
    pub from: Vec<(String, Span)>,
    /// Upstream stage names per input slot of the kind, in `from` order.
    pub inputs: Vec<(InputSlot, Vec<String>)>,
    /// The coordinates this stage runs once per value of (`for_each`).
    pub for_each: Vec<String>,
    /// `device = ...` (not part of the key).
    pub device: Option<String>,
    /// `threads = ...` (not part of the key).
    pub threads: Option<usize>,
    /// One entry per combination of the stage's own `for_each` sweeps (one if it has none).
    pub variants: Vec<Variant>,
    /// The artifact type every variant produces (what `from` links are typed by).
    pub output: &'static str,
    /// What the kind says, at load time, its nodes will report (every variant's, united).
    pub plan: PlanFacts,
    /// Where the value of each of the kind's keys is written, for errors about it found after
    /// the stage is declared ([`crate::Stage::plan_facts`]).
    pub(crate) values: BTreeMap<String, Span>,
    pub(crate) stage: Arc<dyn DynStage>,
}

/// The params of one combination of a stage's own sweep values.
#[derive(Clone, Debug)]
pub struct Variant {
    /// The swept params and their values, e.g. `[("seed", "1")]`.
    pub coords: Coords,
    /// The parsed params.
    pub params: ParamBox,
}

impl StageDecl {
    /// Names of every upstream stage.
    pub fn upstream(&self) -> impl Iterator<Item = &str> {
        self.inputs
            .iter()
            .flat_map(|(_, names)| names.iter().map(String::as_str))
    }

    /// The kind's version.
    pub fn version(&self) -> u32 {
        self.stage.version()
    }
}

/// A key/value of a stage table after includes are merged, with the file it came from.
struct Entry<'a> {
    key: Spanned<std::borrow::Cow<'a, str>>,
    value: Spanned<DeValue<'a>>,
    file: FileId,
}

struct MergedStage<'a> {
    name: String,
    name_span: Span,
    entries: Vec<Entry<'a>>,
}

impl<'a> MergedStage<'a> {
    fn get(&self, key: &str) -> Option<&Entry<'a>> {
        self.entries.iter().find(|e| e.key.get_ref() == key)
    }
}

/// Loads and validates the experiment at `path` against the kinds in `registry`.
pub fn load(path: &Path, registry: &Registry) -> Result<Experiment, Diagnostics> {
    let mut sources = SourceMap::default();
    let mut order = Vec::new();
    read_tree(path, &mut sources, &mut Vec::new(), &mut order, None)?;
    let tables = Tables::parse(&sources, &order)?;
    if tables.stages.is_empty() {
        return Err(Diagnostic::in_file(
            path,
            format!("{} declares no stages", path.display()),
        )
        .with_help("an experiment declares at least one [stage.NAME] table with a `kind = ...` line (`probex kinds` lists the kinds)")
        .into());
    }

    let mut errors = Vec::new();
    let mut expect = Vec::new();
    for e in &tables.expect {
        match crate::expect::parse_entry(&sources, e.file, &e.key, &e.value, None) {
            Ok(x) => expect.push(x),
            Err(d) => errors.push(d),
        }
    }
    let declared: BTreeSet<String> = tables.stages.iter().map(|s| s.name.clone()).collect();
    let mut decls = Vec::new();
    for s in &tables.stages {
        match declare(&sources, registry, s, &declared) {
            Ok((decl, mut ex)) => {
                expect.append(&mut ex);
                decls.push(decl);
            }
            Err(mut d) => errors.append(&mut d),
        }
    }
    if !errors.is_empty() {
        return Err(Diagnostics(errors));
    }

    check_types(&sources, &decls)?;
    let mut decls = order_stages(&sources, decls)?;
    check_expected_stages(&sources, &expect, &declared)?;
    plan_facts(&sources, &mut decls)?;
    check_result_paths(&sources, &decls, &expect)?;

    let name = match tables.name {
        Some(n) => n,
        None => name_from_file(path)?,
    };
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(Experiment {
        name,
        description: tables.description,
        path: path.to_path_buf(),
        base_dir: if base_dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base_dir
        },
        sources,
        stages: decls,
        expect,
    })
}

/// The top-level tables of every file of an experiment, includes first, merged: the header's
/// name and description, the stage tables key by key, and the `[expect]` entries.
struct Tables<'a> {
    name: Option<String>,
    description: String,
    stages: Vec<MergedStage<'a>>,
    expect: Vec<Entry<'a>>,
}

impl<'a> Tables<'a> {
    /// Parses the files of `order` (as read into `sources`), reporting every malformed table.
    fn parse(sources: &'a SourceMap, order: &[FileId]) -> Result<Self, Diagnostics> {
        let mut errors = Vec::new();
        let mut tables = Tables {
            name: None,
            description: String::new(),
            stages: Vec::new(),
            expect: Vec::new(),
        };
        for &file in order {
            let root = match DeTable::parse(sources.file(file).text.as_str()) {
                Ok(t) => t.into_inner(),
                Err(e) => {
                    errors.push(Diagnostic::from_toml(sources, file, &e));
                    continue;
                }
            };
            for (key, value) in in_file_order(root) {
                if let Err(d) = tables.add(sources, file, key, value, &mut errors) {
                    errors.push(d);
                }
            }
        }
        if errors.is_empty() {
            Ok(tables)
        } else {
            Err(Diagnostics(errors))
        }
    }

    /// Adds one top-level table of `file`.
    fn add(
        &mut self,
        sources: &SourceMap,
        file: FileId,
        key: Spanned<DeString<'a>>,
        value: Spanned<DeValue<'a>>,
        errors: &mut Vec<Diagnostic>,
    ) -> Result<(), Diagnostic> {
        let span = Span {
            file,
            range: key.span(),
        };
        match key.get_ref().as_ref() {
            "experiment" => {
                read_header(sources, file, value, &mut self.name, &mut self.description)
            }
            "stage" => match value.into_inner() {
                DeValue::Table(t) => {
                    merge_stages(sources, file, t, &mut self.stages, errors);
                    Ok(())
                }
                other => Err(Diagnostic::at(
                    sources,
                    &span,
                    format!(
                        "`stage` must be a table of stages, found {}",
                        other.type_str()
                    ),
                )
                .with_help("declare stages as [stage.NAME] tables")),
            },
            "expect" => match value.into_inner() {
                DeValue::Table(t) => {
                    for (k, v) in in_file_order(t) {
                        self.expect.retain(|e| e.key.get_ref() != k.get_ref());
                        self.expect.push(Entry {
                            key: k,
                            value: v,
                            file,
                        });
                    }
                    Ok(())
                }
                other => Err(Diagnostic::at(
                    sources,
                    &span,
                    format!("`expect` must be a table, found {}", other.type_str()),
                )),
            },
            // Where nodes run, not what they compute: read by `executor::slurm::config`.
            "executor" => Ok(()),
            other => Err(
                Diagnostic::at(sources, &span, format!("unknown table `{other}`"))
                    .with_label("not an experiment table")
                    .with_help("expected one of `experiment`, `stage`, `expect`, `executor`"),
            ),
        }
    }
}

/// Every stage an expectation's path (or the path it compares with) starts with is declared.
fn check_expected_stages(
    sources: &SourceMap,
    expect: &[Expectation],
    declared: &BTreeSet<String>,
) -> Result<(), Diagnostics> {
    let mut errors = Vec::new();
    for x in expect {
        let mut stages = vec![x.path.split('.').next().unwrap_or_default()];
        if let crate::expect::Rule::Compare {
            rhs: crate::expect::Operand::Path(p),
            ..
        } = &x.rule
        {
            stages.push(p.split('.').next().unwrap_or_default());
        }
        for stage in stages.into_iter().filter(|s| !declared.contains(*s)) {
            errors.push(
                Diagnostic::at(
                    sources,
                    &x.span,
                    format!("expectation names unknown stage `{stage}`"),
                )
                .with_help(format!(
                    "paths start with a stage name: {}",
                    list(declared.iter())
                )),
            );
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Diagnostics(errors))
    }
}

/// An unnamed experiment's name: its file's stem, when that is a valid name.
fn name_from_file(path: &Path) -> Result<String, Diagnostics> {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Err(why) = check_name(&stem) {
        return Err(Diagnostic::in_file(
            path,
            format!(
                "the experiment has no name, and its file name `{}` {why}",
                stem.escape_debug()
            ),
        )
        .with_help(format!(
            "name it in the file: [experiment] name = \"...\"; {NAME_HELP}"
        ))
        .into());
    }
    Ok(stem)
}

const NAME_HELP: &str =
    "use letters, digits, `-`, `_` and `.` (not first), e.g. name = \"mini-zeroshot\"";

/// The longest experiment name, in characters.
const MAX_NAME: usize = 100;

/// Why a name cannot name an experiment's run folder ([`check_name`]); the message follows the
/// name (`experiment name `x` is empty`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("is empty")]
    Empty,
    /// A character that cannot be part of a folder name.
    #[error("contains `{}`, which cannot be part of a folder name", .0.escape_debug())]
    BadChar(char),
    /// A hidden folder.
    #[error("starts with `.`")]
    Hidden,
    /// Longer than the longest name allowed (`MAX_NAME` characters).
    #[error("is longer than {MAX_NAME} characters")]
    TooLong,
}

/// Why `name` cannot name the folder `runs/<name>/` of an experiment's run records, if it
/// cannot: it must be one plain folder name, so that no record lands outside `runs/` (`..`,
/// `/abs`), in `runs/` itself (empty) or in a hidden folder.
pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | '+')))
    {
        return Err(NameError::BadChar(c));
    }
    if name.starts_with('.') {
        return Err(NameError::Hidden);
    }
    if name.chars().count() > MAX_NAME {
        return Err(NameError::TooLong);
    }
    Ok(())
}

/// Whether `d` names a device: `cpu`, `cuda` or `cuda:N`. Whether this build and machine can
/// use it is for the stage kinds to say.
pub fn valid_device(d: &str) -> bool {
    d == "cpu"
        || d == "cuda"
        || d.strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<u32>().is_ok())
}

/// `[layer=59, seed=1]`.
pub fn fmt_coords(coords: &Coords) -> String {
    let parts: Vec<String> = coords.iter().map(|(d, v)| format!("{d}={v}")).collect();
    format!("[{}]", parts.join(","))
}
