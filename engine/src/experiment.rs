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
use crate::params::{engine_keys, is_engine_key};
use crate::shape::{PlanFacts, PlanInput};
use crate::stage::{Coords, DynStage, InputSlot, ParamBox, Registry};

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

/// The entry of `stage` that a `check` message names: the first key in backticks that is a
/// key of the table (`` `epochs` ``, `` `layers = "5..2"` ``; for `` `finetune.epochs` ``, the
/// `finetune` table).
fn named_key<'s, 'a>(message: &str, stage: &'s MergedStage<'a>) -> Option<&'s Entry<'a>> {
    message.split('`').skip(1).step_by(2).find_map(|quoted| {
        let key = quoted
            .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-'))
            .next()
            .unwrap_or(quoted);
        stage.get(key)
    })
}

/// Loads and validates the experiment at `path` against the kinds in `registry`.
pub fn load(path: &Path, registry: &Registry) -> Result<Experiment, Diagnostics> {
    let mut sources = SourceMap::default();
    let mut order = Vec::new();
    read_tree(path, &mut sources, &mut Vec::new(), &mut order, None)?;
    let texts: Vec<(FileId, &str)> = order
        .iter()
        .map(|&id| (id, sources.file(id).text.as_str()))
        .collect();

    let mut errors = Vec::new();
    let mut name = None;
    let mut description = String::new();
    let mut stages: Vec<MergedStage> = Vec::new();
    let mut expect_entries: Vec<Entry> = Vec::new();

    for &(file, text) in &texts {
        let root = match DeTable::parse(text) {
            Ok(t) => t.into_inner(),
            Err(e) => {
                errors.push(Diagnostic::from_toml(&sources, file, &e));
                continue;
            }
        };
        for (key, value) in in_file_order(root) {
            let span = Span {
                file,
                range: key.span(),
            };
            match key.get_ref().as_ref() {
                "experiment" => {
                    if let Err(d) = read_header(&sources, file, value, &mut name, &mut description)
                    {
                        errors.push(d);
                    }
                }
                "stage" => match value.into_inner() {
                    DeValue::Table(t) => merge_stages(&sources, file, t, &mut stages, &mut errors),
                    other => errors.push(
                        Diagnostic::at(
                            &sources,
                            &span,
                            format!(
                                "`stage` must be a table of stages, found {}",
                                other.type_str()
                            ),
                        )
                        .with_help("declare stages as [stage.NAME] tables"),
                    ),
                },
                "expect" => match value.into_inner() {
                    DeValue::Table(t) => {
                        for (k, v) in in_file_order(t) {
                            expect_entries.retain(|e| e.key.get_ref() != k.get_ref());
                            expect_entries.push(Entry {
                                key: k,
                                value: v,
                                file,
                            });
                        }
                    }
                    other => errors.push(Diagnostic::at(
                        &sources,
                        &span,
                        format!("`expect` must be a table, found {}", other.type_str()),
                    )),
                },
                // Where nodes run, not what they compute: read by `executor::slurm::config`.
                "executor" => {}
                other => errors.push(
                    Diagnostic::at(&sources, &span, format!("unknown table `{other}`"))
                        .with_label("not an experiment table")
                        .with_help("expected one of `experiment`, `stage`, `expect`, `executor`"),
                ),
            }
        }
    }
    if !errors.is_empty() {
        return Err(Diagnostics(errors));
    }

    let mut expect = Vec::new();
    for e in &expect_entries {
        match crate::expect::parse_entry(&sources, e.file, &e.key, &e.value, None) {
            Ok(x) => expect.push(x),
            Err(d) => errors.push(d),
        }
    }

    if stages.is_empty() {
        return Err(Diagnostic::in_file(
            path,
            format!("{} declares no stages", path.display()),
        )
        .with_help("an experiment declares at least one [stage.NAME] table with a `kind = ...` line (`probex kinds` lists the kinds)")
        .into());
    }

    let declared: BTreeSet<String> = stages.iter().map(|s| s.name.clone()).collect();
    let mut decls = Vec::new();
    for s in &stages {
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
    for x in &expect {
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
                    &sources,
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
    if !errors.is_empty() {
        return Err(Diagnostics(errors));
    }
    plan_facts(&sources, &mut decls)?;
    check_result_paths(&sources, &decls, &expect)?;

    let name = match name {
        Some(n) => n,
        None => {
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
            stem
        }
    };
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(Experiment {
        name,
        description,
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

/// Reads `path` and, depth first, the files it includes; `order` lists included files before
/// the files that include them.
fn read_tree(
    path: &Path,
    sources: &mut SourceMap,
    chain: &mut Vec<PathBuf>,
    order: &mut Vec<FileId>,
    included_at: Option<(FileId, std::ops::Range<usize>)>,
) -> Result<(), Diagnostics> {
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if let Some(pos) = chain.iter().position(|p| *p == canonical) {
        let cycle: Vec<String> = chain[pos..]
            .iter()
            .chain([&canonical])
            .map(|p| {
                p.file_name().map_or_else(
                    || p.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                )
            })
            .collect();
        let msg = format!("include loop: {}", cycle.join(" -> "));
        let d = match included_at {
            Some((file, range)) => Diagnostic::at(sources, &Span { file, range }, msg),
            None => Diagnostic::new(msg),
        };
        return Err(d
            .with_help("an experiment cannot include itself, directly or through other files")
            .into());
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        let msg = format!("cannot read experiment file {}: {e}", path.display());
        match &included_at {
            Some((file, range)) => Diagnostic::at(
                sources,
                &Span {
                    file: *file,
                    range: range.clone(),
                },
                msg,
            ),
            None => Diagnostic::new(msg),
        }
    })?;
    let id = sources.add(path.to_path_buf(), text);
    let includes = includes_of(sources, id)?;
    chain.push(canonical);
    let dir = path.parent().unwrap_or(Path::new("."));
    for (inc, range) in includes {
        read_tree(&dir.join(&inc), sources, chain, order, Some((id, range)))?;
    }
    chain.pop();
    order.push(id);
    Ok(())
}

/// The `include` list of a file, with spans; syntax errors are reported later, in order.
fn includes_of(
    sources: &SourceMap,
    id: FileId,
) -> Result<Vec<(String, std::ops::Range<usize>)>, Diagnostics> {
    let text = &sources.file(id).text;
    let Ok(root) = DeTable::parse(text) else {
        return Ok(Vec::new());
    };
    let root = root.into_inner();
    let Some(header) = root.get("experiment") else {
        return Ok(Vec::new());
    };
    let Some(inc) = header.get_ref().as_table().and_then(|t| t.get("include")) else {
        return Ok(Vec::new());
    };
    let span = Span {
        file: id,
        range: inc.span(),
    };
    let bad = || {
        Diagnostics::from(
            Diagnostic::at(
                sources,
                &span,
                "`include` must be a file path or a list of file paths",
            )
            .with_help("e.g. include = [\"base.toml\"]"),
        )
    };
    match inc.get_ref() {
        DeValue::String(s) => Ok(vec![(s.to_string(), inc.span())]),
        DeValue::Array(items) => items
            .iter()
            .map(|v| {
                v.get_ref()
                    .as_str()
                    .map(|s| (s.to_string(), v.span()))
                    .ok_or_else(bad)
            })
            .collect(),
        _ => Err(bad()),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    name: Option<Spanned<String>>,
    description: Option<String>,
    #[allow(dead_code)] // read by `includes_of`; declared here so it is a known key
    include: Option<toml::Value>,
}

const NAME_HELP: &str =
    "use letters, digits, `-`, `_` and `.` (not first), e.g. name = \"mini-zeroshot\"";

/// Why `name` cannot name the folder `runs/<name>/` of an experiment's run records, if it
/// cannot: it must be one plain folder name, so that no record lands outside `runs/` (`..`,
/// `/abs`), in `runs/` itself (empty) or in a hidden folder.
pub fn check_name(name: &str) -> Result<(), String> {
    const MAX: usize = 100;
    if name.is_empty() {
        return Err("is empty".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | '+')))
    {
        return Err(format!(
            "contains `{}`, which cannot be part of a folder name",
            c.escape_debug()
        ));
    }
    if name.starts_with('.') {
        return Err("starts with `.`".into());
    }
    if name.chars().count() > MAX {
        return Err(format!("is longer than {MAX} characters"));
    }
    Ok(())
}

fn read_header(
    sources: &SourceMap,
    file: FileId,
    value: Spanned<DeValue>,
    name: &mut Option<String>,
    description: &mut String,
) -> Result<(), Diagnostic> {
    let h: Header = serde::Deserialize::deserialize(toml::de::ValueDeserializer::from(value))
        .map_err(|e| Diagnostic::from_toml(sources, file, &e))?;
    if let Some(n) = h.name {
        let span = Span {
            file,
            range: n.span(),
        };
        let n = n.into_inner();
        if let Err(why) = check_name(&n) {
            return Err(Diagnostic::at(
                sources,
                &span,
                format!("experiment name `{}` {why}", n.escape_debug()),
            )
            .with_label("the run record goes into runs/<name>/ beside the file")
            .with_help(NAME_HELP));
        }
        *name = Some(n);
    }
    if let Some(d) = h.description {
        *description = d;
    }
    Ok(())
}

fn merge_stages<'a>(
    sources: &SourceMap,
    file: FileId,
    table: DeTable<'a>,
    stages: &mut Vec<MergedStage<'a>>,
    errors: &mut Vec<Diagnostic>,
) {
    for (name, body) in in_file_order(table) {
        let name_span = Span {
            file,
            range: name.span(),
        };
        let body_span = Span {
            file,
            range: body.span(),
        };
        let DeValue::Table(entries) = body.into_inner() else {
            errors.push(
                Diagnostic::at(
                    sources,
                    &body_span,
                    format!("stage `{}` must be a table", name.get_ref()),
                )
                .with_help(format!(
                    "write it as [stage.{}] with a `kind = ...` line",
                    name.get_ref()
                )),
            );
            continue;
        };
        let name_str = name.get_ref().to_string();
        if !is_identifier(&name_str) {
            errors.push(
                Diagnostic::at(
                    sources,
                    &name_span,
                    format!("stage name `{name_str}` is not a plain identifier"),
                )
                .with_help("use letters, digits, `_` and `-`, starting with a letter"),
            );
            continue;
        }
        let idx = match stages.iter().position(|s| s.name == name_str) {
            Some(i) => i,
            None => {
                stages.push(MergedStage {
                    name: name_str,
                    name_span: name_span.clone(),
                    entries: Vec::new(),
                });
                stages.len() - 1
            }
        };
        let stage = &mut stages[idx];
        stage.name_span = name_span;
        for (key, value) in entries {
            stage.entries.retain(|e| e.key.get_ref() != key.get_ref());
            stage.entries.push(Entry { key, value, file });
        }
    }
}

/// The entries of a table in the order they are written: `toml`'s tables iterate sorted by key,
/// but stages, plans and reports should follow the file.
fn in_file_order(t: DeTable<'_>) -> Vec<(Spanned<DeString<'_>>, Spanned<DeValue<'_>>)> {
    let mut items: Vec<_> = t.into_iter().collect();
    items.sort_by_key(|(k, _)| k.span().start);
    items
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn list<'a>(items: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<String> = items.map(|s| format!("`{s}`")).collect();
    if v.is_empty() {
        "(none)".into()
    } else {
        v.join(", ")
    }
}

fn entry_span(e: &Entry) -> Span {
    Span {
        file: e.file,
        range: e.value.span(),
    }
}

/// A string or a list of strings, with the span of each.
fn names_of(sources: &SourceMap, e: &Entry, what: &str) -> Result<Vec<(String, Span)>, Diagnostic> {
    let bad = || {
        Diagnostic::at(
            sources,
            &entry_span(e),
            format!("`{what}` must be a name or a list of names"),
        )
        .with_help(format!(
            "e.g. {what} = \"layers\" or {what} = [\"layers\", \"text\"]"
        ))
    };
    match e.value.get_ref() {
        DeValue::String(s) => Ok(vec![(s.to_string(), entry_span(e))]),
        DeValue::Array(items) => items
            .iter()
            .map(|v| {
                v.get_ref()
                    .as_str()
                    .map(|s| {
                        (
                            s.to_string(),
                            Span {
                                file: e.file,
                                range: v.span(),
                            },
                        )
                    })
                    .ok_or_else(bad)
            })
            .collect(),
        _ => Err(bad()),
    }
}

/// Turns one merged stage table into a declaration: engine keys, then the kind's params (once
/// per combination of the stage's own sweep values).
fn declare(
    sources: &SourceMap,
    registry: &Registry,
    s: &MergedStage,
    declared: &BTreeSet<String>,
) -> Result<(StageDecl, Vec<Expectation>), Vec<Diagnostic>> {
    let mut errors = Vec::new();
    let Some(kind_entry) = s.get("kind") else {
        return Err(vec![
            Diagnostic::at(
                sources,
                &s.name_span,
                format!("stage `{}` has no `kind`", s.name),
            )
            .with_help(format!(
                "add `kind = \"...\"`; known kinds: {}",
                registry.names().join(", ")
            )),
        ]);
    };
    let Some(kind) = kind_entry.value.get_ref().as_str().map(str::to_string) else {
        return Err(vec![Diagnostic::at(
            sources,
            &entry_span(kind_entry),
            "`kind` must be a string",
        )]);
    };
    let Some(stage) = registry.get(&kind).cloned() else {
        return Err(vec![
            Diagnostic::at(
                sources,
                &entry_span(kind_entry),
                format!("unknown stage kind `{kind}`"),
            )
            .with_label("no such kind")
            .with_help(format!("known kinds: {}", registry.names().join(", "))),
        ]);
    };

    let from = match s.get("from") {
        Some(e) => names_of(sources, e, "from").unwrap_or_else(|d| {
            errors.push(d);
            Vec::new()
        }),
        None => Vec::new(),
    };
    let for_each = match s.get("for_each") {
        Some(e) => names_of(sources, e, "for_each").unwrap_or_else(|d| {
            errors.push(d);
            Vec::new()
        }),
        None => Vec::new(),
    };
    let device = match s.get("device") {
        Some(e) => match e.value.get_ref().as_str() {
            Some(d) if valid_device(d) => Some(d.to_string()),
            _ => {
                errors.push(
                    Diagnostic::at(
                        sources,
                        &entry_span(e),
                        "`device` must be \"cpu\", \"cuda\" or \"cuda:N\"",
                    )
                    .with_label("unknown device"),
                );
                None
            }
        },
        None => None,
    };
    let threads = match s.get("threads") {
        Some(e) => match e
            .value
            .get_ref()
            .as_integer()
            .and_then(|i| i.as_str().parse::<usize>().ok())
        {
            Some(n) if n > 0 => Some(n),
            _ => {
                errors.push(Diagnostic::at(
                    sources,
                    &entry_span(e),
                    "`threads` must be a positive integer",
                ));
                None
            }
        },
        None => None,
    };
    let mut expect = Vec::new();
    if let Some(e) = s.get("expect") {
        match e.value.get_ref() {
            DeValue::Table(t) => {
                for (k, v) in t {
                    match crate::expect::parse_entry(sources, e.file, k, v, Some(&s.name)) {
                        Ok(x) => expect.push(x),
                        Err(d) => errors.push(d),
                    }
                }
            }
            _ => errors.push(
                Diagnostic::at(sources, &entry_span(e), "`expect` must be a table")
                    .with_help("e.g. expect = { \"test.top1\" = \"0.97 +- 0.02\" }"),
            ),
        }
    }

    // Resolve `from` into input slots by the upstream's artifact type (checked later, once
    // every stage is declared); here only names and duplicates.
    let mut seen = BTreeSet::new();
    let mut from_names = Vec::new();
    for (name, span) in &from {
        if name == &s.name {
            errors.push(
                Diagnostic::at(sources, span, format!("stage `{name}` reads itself"))
                    .with_label("cycle"),
            );
        } else if !declared.contains(name) {
            let mut d = Diagnostic::at(sources, span, format!("unknown input `{name}`"))
                .with_label("no stage with this name");
            if let Some(close) = closest(name, declared.iter()) {
                d = d.with_help(format!("did you mean `{close}`?"));
            }
            errors.push(d.with_help(format!("declared stages: {}", list(declared.iter()))));
        } else if !seen.insert(name.clone()) {
            errors.push(Diagnostic::at(
                sources,
                span,
                format!("`{name}` is named twice in `from`"),
            ));
        } else {
            from_names.push((name.clone(), span.clone()));
        }
    }

    // The stage's own sweeps: a `for_each` dimension whose value is an array in this table.
    let sweeps: Vec<(&str, &Entry)> = for_each
        .iter()
        .filter_map(|(dim, _)| {
            s.get(dim)
                .filter(|e| e.value.get_ref().is_array())
                .map(|e| (dim.as_str(), e))
        })
        .collect();
    for (dim, e) in &sweeps {
        if e.value.get_ref().as_array().is_some_and(|a| a.is_empty()) {
            errors.push(
                Diagnostic::at(
                    sources,
                    &entry_span(e),
                    format!("`{dim}` sweeps over no values"),
                )
                .with_help("give at least one value"),
            );
        }
        let mut seen = BTreeSet::new();
        for v in e.value.get_ref().as_array().into_iter().flatten() {
            let label = scalar_label(v.get_ref());
            if !seen.insert(label.clone()) {
                errors.push(
                    Diagnostic::at(
                        sources,
                        &Span {
                            file: e.file,
                            range: v.span(),
                        },
                        format!("`{dim}` lists `{label}` twice"),
                    )
                    .with_label("repeated sweep value")
                    .with_help("each value makes one node; remove the repeat"),
                );
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    let mut variants = Vec::new();
    for combo in combinations(&sweeps) {
        let mut table = DeTable::new();
        for e in &s.entries {
            if is_engine_key(e.key.get_ref().as_ref()) {
                continue;
            }
            let value = combo
                .iter()
                .find(|(dim, _)| *dim == e.key.get_ref().as_ref())
                .map_or_else(|| e.value.clone(), |(_, v)| (*v).clone());
            table.insert(e.key.clone(), value);
        }
        let coords: Coords = combo
            .iter()
            .map(|(dim, v)| (dim.to_string(), scalar_label(v.get_ref())))
            .collect();
        let span = s.name_span.range.clone();
        let parsed = stage.parse(toml::de::ValueDeserializer::from(Spanned::new(
            span,
            DeValue::Table(table),
        )));
        match parsed {
            Ok(params) => {
                if let Err(m) = stage.check(&params) {
                    // Point at the value of the key the message names (the trait asks kinds
                    // to name it first, in backticks), or at the stage when it names none.
                    let at = named_key(&m, s).map_or_else(
                        || s.name_span.clone(),
                        |e| {
                            let swept = combo
                                .iter()
                                .find(|(dim, _)| *dim == e.key.get_ref().as_ref());
                            Span {
                                file: e.file,
                                range: swept.map_or_else(|| e.value.span(), |(_, v)| v.span()),
                            }
                        },
                    );
                    errors.push(
                        Diagnostic::at(sources, &at, format!("stage `{}` ({kind}): {m}", s.name))
                            .with_help(if coords.is_empty() {
                                "fix the value in the stage table".to_string()
                            } else {
                                format!("for the sweep value {}", fmt_coords(&coords))
                            }),
                    );
                }
                variants.push(Variant { coords, params });
            }
            Err(e) => {
                let file = file_of_error(s, &e);
                let mut d = Diagnostic::from_toml(sources, file, &e);
                // A kind that validates while deserializing (`try_from`) gives an error with
                // no position; point at the key it names, as for `check`.
                if e.span().is_none()
                    && let Some(entry) = named_key(e.message(), s)
                {
                    let at = Span {
                        file: entry.file,
                        range: entry.value.span(),
                    };
                    d.location = Diagnostic::at(sources, &at, "").location;
                }
                d.message = format!("stage `{}` ({kind}): {}", s.name, d.message);
                // A misspelt engine key (`for-each`) lands among the kind's params; say what
                // the engine itself reads too.
                if let Some(field) = unknown_field(e.message()) {
                    let engine: Vec<String> = engine_keys().iter().map(|k| k.to_string()).collect();
                    if let Some(close) = closest(field, engine.iter()) {
                        d = d.with_help(format!("did you mean `{close}`?"));
                    }
                    d = d.with_help(format!(
                        "stage keys read by the engine: {}",
                        list(engine.iter())
                    ));
                }
                errors.push(d);
                break;
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    let outputs: BTreeSet<&'static str> = variants
        .iter()
        .map(|v| stage.output_for(&v.params))
        .collect();
    let output = match outputs.len() {
        0 | 1 => outputs.first().copied().unwrap_or_else(|| stage.output()),
        _ => {
            return Err(vec![
                Diagnostic::at(
                    sources,
                    &s.name_span,
                    format!(
                        "stage `{}` ({kind}): its sweep changes what it produces ({})",
                        s.name,
                        outputs
                            .iter()
                            .map(|o| format!("`{o}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
                .with_help("split it into one stage per artifact type"),
            ]);
        }
    };
    let inputs = stage
        .inputs()
        .into_iter()
        .map(|slot| (slot, Vec::new()))
        .collect();
    let decl = StageDecl {
        name: s.name.clone(),
        kind,
        span: s.name_span.clone(),
        from: from_names,
        inputs,
        for_each: for_each.into_iter().map(|(d, _)| d).collect(),
        device,
        threads,
        variants,
        output,
        plan: PlanFacts::default(),
        stage,
    };
    Ok((decl, expect))
}

/// Asks every stage, inputs first, what its nodes will report ([`Stage::plan_facts`]); a
/// stage's objection (a path it reads that its inputs will not report) is an error at it.
///
/// [`Stage::plan_facts`]: crate::Stage::plan_facts
fn plan_facts(sources: &SourceMap, decls: &mut [StageDecl]) -> Result<(), Diagnostics> {
    let mut errors = Vec::new();
    for i in 0..decls.len() {
        let (done, rest) = decls.split_at_mut(i);
        let d = &mut rest[0];
        let inputs: Vec<PlanInput> = d
            .inputs
            .iter()
            .flat_map(|(slot, names)| names.iter().map(move |n| (slot.ty, n)))
            .filter_map(|(ty, n)| {
                let up = done.iter().find(|u| &u.name == n)?;
                Some(PlanInput {
                    ty,
                    stage: &up.name,
                    facts: &up.plan,
                })
            })
            .collect();
        let mut united: Option<PlanFacts> = None;
        for v in &d.variants {
            match d.stage.plan_facts(&v.params, &inputs) {
                Ok(f) => united = Some(united.map_or(f.clone(), |u| u.union(f))),
                Err(m) => {
                    errors.push(
                        Diagnostic::at(
                            sources,
                            &d.span,
                            format!("stage `{}` ({}): {m}", d.name, d.kind),
                        )
                        .with_help(if v.coords.is_empty() {
                            "fix the value in the stage table".to_string()
                        } else {
                            format!("for the sweep value {}", fmt_coords(&v.coords))
                        }),
                    );
                    break;
                }
            }
        }
        d.plan = united.unwrap_or_default();
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Diagnostics(errors))
    }
}

/// Checks every expectation's paths against what their stages said they will report.
fn check_result_paths(
    sources: &SourceMap,
    decls: &[StageDecl],
    expect: &[Expectation],
) -> Result<(), Diagnostics> {
    let mut errors = Vec::new();
    for x in expect {
        let mut paths = vec![x.path.as_str()];
        if let crate::expect::Rule::Compare {
            rhs: crate::expect::Operand::Path(p),
            ..
        } = &x.rule
        {
            paths.push(p);
        }
        for path in paths {
            let (stage, rest) = path.split_once('.').unwrap_or((path, ""));
            let Some(d) = decls.iter().find(|d| d.name == stage) else {
                continue;
            };
            let checked = if rest.is_empty() {
                Err(format!(
                    "`{stage}` alone is not a value: name one of its results"
                ))
            } else {
                d.plan.results.check(rest)
            };
            if let Err(m) = checked {
                errors.push(
                    Diagnostic::at(
                        sources,
                        &x.span,
                        format!(
                            "expectation on `{path}`: stage `{stage}` ({}) will not report it",
                            d.kind
                        ),
                    )
                    .with_help(m),
                );
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Diagnostics(errors))
    }
}

/// Whether `d` names a device: `cpu`, `cuda` or `cuda:N`. Whether this build and machine can
/// use it is for the stage kinds to say.
pub fn valid_device(d: &str) -> bool {
    d == "cpu"
        || d == "cuda"
        || d.strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<u32>().is_ok())
}

/// The field name of serde's "unknown field `x`, expected ..." message.
fn unknown_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("unknown field `")?
        .split_once('`')
        .map(|(f, _)| f)
}

fn scalar_label(v: &DeValue) -> String {
    match v {
        DeValue::String(s) => s.to_string(),
        DeValue::Integer(i) => i.to_string(),
        DeValue::Float(f) => f.to_string(),
        DeValue::Boolean(b) => b.to_string(),
        other => other.type_str().to_string(),
    }
}

/// Every combination of one value per sweep, in row-major order (last sweep fastest).
fn combinations<'s, 'a>(
    sweeps: &'s [(&'s str, &'s Entry<'a>)],
) -> Vec<Vec<(&'s str, &'s Spanned<DeValue<'a>>)>> {
    let mut out: Vec<Vec<(&str, &Spanned<DeValue>)>> = vec![Vec::new()];
    for (dim, e) in sweeps {
        let Some(values) = e.value.get_ref().as_array() else {
            continue;
        };
        out = out
            .into_iter()
            .flat_map(|prefix| {
                values.iter().map(move |v| {
                    let mut next = prefix.clone();
                    next.push((*dim, v));
                    next
                })
            })
            .collect();
    }
    out
}

/// The file an error in a merged table comes from: the entry whose key or value contains the
/// error's span (entries of one stage can come from several files).
fn file_of_error(s: &MergedStage, e: &toml::de::Error) -> FileId {
    let Some(span) = e.span() else {
        return s.name_span.file;
    };
    let contains =
        |r: std::ops::Range<usize>| r.start <= span.start && span.end <= r.end.max(r.start + 1);
    s.entries
        .iter()
        .find(|en| contains(en.key.span()) || contains(en.value.span()))
        .map_or(s.name_span.file, |en| en.file)
}

/// Fills each stage's input slots from `from` by the upstream's output type, and reports
/// names whose type no slot reads and required slots left empty.
fn check_types(sources: &SourceMap, decls: &[StageDecl]) -> Result<(), Diagnostics> {
    let outputs: BTreeMap<&str, &str> = decls.iter().map(|d| (d.name.as_str(), d.output)).collect();
    let mut errors = Vec::new();
    for d in decls {
        let slots: Vec<&InputSlot> = d.inputs.iter().map(|(s, _)| s).collect();
        let mut filled: BTreeMap<&str, usize> = BTreeMap::new();
        let mut unreadable = false;
        for (up, span) in &d.from {
            let ty = outputs.get(up.as_str()).copied().unwrap_or_default();
            let span = span.clone();
            match slots.iter().find(|s| s.ty == ty) {
                None => {
                    unreadable = true;
                    errors.push(
                        Diagnostic::at(
                            sources,
                            &span,
                            format!("stage `{}` ({}) cannot read `{up}`", d.name, d.kind),
                        )
                        .with_label(format!("`{up}` produces `{ty}`"))
                        .with_help(format!(
                            "{} reads: {}",
                            d.kind,
                            slots
                                .iter()
                                .map(|s| format!("`{}`", s.ty))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )),
                    )
                }
                Some(slot) => {
                    let n = filled.entry(slot.ty).or_default();
                    *n += 1;
                    if *n > 1 && !slot.many {
                        errors.push(
                            Diagnostic::at(
                                sources,
                                &span,
                                format!("stage `{}` reads only one `{ty}` input", d.name),
                            )
                            .with_label("second input of the same type"),
                        );
                    }
                }
            }
        }
        // A `from` of the wrong type was reported above; "needs an input" would repeat it.
        for slot in slots.iter().filter(|_| !unreadable) {
            if slot.required && !filled.contains_key(slot.ty) {
                errors.push(
                    Diagnostic::at(
                        sources,
                        &d.span,
                        format!(
                            "stage `{}` ({}) needs an input of type `{}`",
                            d.name, d.kind, slot.ty
                        ),
                    )
                    .with_help(format!(
                        "name a stage producing `{}` in `from`{}",
                        slot.ty,
                        producers(decls, slot.ty, &d.name)
                    )),
                );
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Diagnostics(errors))
    }
}

/// The stages (other than `reader`) that produce `ty`, as a hint.
fn producers(decls: &[StageDecl], ty: &str, reader: &str) -> String {
    let names: Vec<String> = decls
        .iter()
        .filter(|d| d.output == ty && d.name != reader)
        .map(|d| format!("`{}`", d.name))
        .collect();
    if names.is_empty() {
        String::new()
    } else {
        format!(" (here: {})", names.join(", "))
    }
}

/// Sorts `from` names into their typed slots and sorts stages topologically; a cycle is an
/// error that prints the whole cycle.
fn order_stages(
    sources: &SourceMap,
    mut decls: Vec<StageDecl>,
) -> Result<Vec<StageDecl>, Diagnostics> {
    let outputs: BTreeMap<String, &'static str> =
        decls.iter().map(|d| (d.name.clone(), d.output)).collect();
    for d in &mut decls {
        for (up, _) in &d.from {
            let ty = outputs.get(up).copied().unwrap_or_default();
            if let Some((_, names)) = d.inputs.iter_mut().find(|(s, _)| s.ty == ty) {
                names.push(up.clone());
            }
        }
    }

    let mut graph = DiGraph::<usize, ()>::new();
    let idx: Vec<NodeIndex> = (0..decls.len()).map(|i| graph.add_node(i)).collect();
    let by_name: BTreeMap<&str, usize> = decls
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), i))
        .collect();
    for (i, d) in decls.iter().enumerate() {
        for up in d.upstream() {
            if let Some(&j) = by_name.get(up) {
                graph.add_edge(idx[j], idx[i], ());
            }
        }
    }
    match stable_toposort(&graph) {
        Some(order) => {
            let mut slots: Vec<Option<StageDecl>> = decls.into_iter().map(Some).collect();
            Ok(order.into_iter().filter_map(|i| slots[i].take()).collect())
        }
        None => {
            let mut errors = Vec::new();
            for scc in petgraph::algo::tarjan_scc(&graph) {
                if scc.len() < 2 {
                    continue;
                }
                let members: BTreeSet<usize> = scc.iter().map(|n| graph[*n]).collect();
                let path = cycle_path(&decls, &members);
                let first = &decls[*members.iter().next().unwrap_or(&0)];
                errors.push(
                    Diagnostic::at(sources, &first.span, format!("stages form a cycle: {path}"))
                        .with_help("a stage cannot depend on its own output; remove one `from` on the cycle"),
                );
            }
            Err(Diagnostics(errors))
        }
    }
}

/// A topological order of the graph's node weights (declaration indices) that keeps the
/// declaration order wherever the edges allow it (Kahn's algorithm, lowest index first), so
/// plans and reports list stages as the file does; `None` if there is a cycle.
fn stable_toposort(graph: &DiGraph<usize, ()>) -> Option<Vec<usize>> {
    let mut indegree: Vec<usize> = graph
        .node_indices()
        .map(|n| {
            graph
                .neighbors_directed(n, petgraph::Direction::Incoming)
                .count()
        })
        .collect();
    let mut ready: BTreeSet<usize> = graph
        .node_indices()
        .filter(|n| indegree[n.index()] == 0)
        .map(|n| n.index())
        .collect();
    let mut order = Vec::with_capacity(indegree.len());
    while let Some(i) = ready.pop_first() {
        let n = NodeIndex::new(i);
        order.push(graph[n]);
        for r in graph.neighbors_directed(n, petgraph::Direction::Outgoing) {
            indegree[r.index()] -= 1;
            if indegree[r.index()] == 0 {
                ready.insert(r.index());
            }
        }
    }
    (order.len() == indegree.len()).then_some(order)
}

/// `a -> b -> c -> a` for a strongly connected set, following `from` edges.
fn cycle_path(decls: &[StageDecl], members: &BTreeSet<usize>) -> String {
    let by_name: BTreeMap<&str, usize> = decls
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), i))
        .collect();
    let start = *members.iter().next().unwrap_or(&0);
    let mut path = vec![start];
    let mut cur = start;
    // Walk readers -> upstream inside the component until we return to the start.
    for _ in 0..members.len() {
        let next = decls[cur]
            .upstream()
            .filter_map(|u| by_name.get(u).copied())
            .find(|j| members.contains(j) && (*j == start || !path.contains(j)));
        match next {
            Some(j) => {
                path.push(j);
                if j == start {
                    break;
                }
                cur = j;
            }
            None => break,
        }
    }
    path.reverse();
    path.iter()
        .map(|&i| decls[i].name.as_str())
        .collect::<Vec<_>>()
        .join(" -> ")
}

/// The declared name closest to `name` by edit distance, if it is close.
fn closest<'a>(name: &str, candidates: impl Iterator<Item = &'a String>) -> Option<&'a String> {
    candidates
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Up to `n` of `candidates` close enough to `name` to be what was meant (as [`closest`]
/// judges it), closest first: the suggestions of an error about an unknown name.
pub(crate) fn closest_n<'a>(
    name: &str,
    candidates: impl Iterator<Item = &'a str>,
    n: usize,
) -> Vec<String> {
    let mut close: Vec<(usize, &str)> = candidates
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .collect();
    close.sort_by_key(|(d, _)| *d);
    close
        .into_iter()
        .take(n)
        .map(|(_, c)| c.to_string())
        .collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

/// `[layer=59, seed=1]`.
pub fn fmt_coords(coords: &Coords) -> String {
    let parts: Vec<String> = coords.iter().map(|(d, v)| format!("{d}={v}")).collect();
    format!("[{}]", parts.join(","))
}
