//! Reading an experiment's files: the include tree, the `[experiment]` header, and the
//! `[stage.NAME]` tables merged across files key by key.

use super::*;

/// Reads `path` and, depth first, the files it includes; `order` lists included files before
/// the files that include them.
pub(super) fn read_tree(
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
pub(super) fn includes_of(
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
pub(super) struct Header {
    name: Option<Spanned<String>>,
    description: Option<String>,
    #[allow(dead_code)] // read by `includes_of`; declared here so it is a known key
    include: Option<toml::Value>,
}

pub(super) fn read_header(
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

pub(super) fn merge_stages<'a>(
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
pub(super) fn in_file_order(t: DeTable<'_>) -> Vec<(Spanned<DeString<'_>>, Spanned<DeValue<'_>>)> {
    let mut items: Vec<_> = t.into_iter().collect();
    items.sort_by_key(|(k, _)| k.span().start);
    items
}

pub(super) fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}
