//! One merged stage table into a typed declaration: the engine's keys (`kind`, `from`,
//! `for_each`, `device`, `threads`, `expect`), then the kind's params once per sweep value.

use super::*;

/// Turns one merged stage table into a declaration: engine keys, then the kind's params (once
/// per combination of the stage's own sweep values).
pub(super) fn declare(
    sources: &SourceMap,
    registry: &Registry,
    s: &MergedStage,
    declared: &BTreeSet<String>,
) -> Result<(StageDecl, Vec<Expectation>), Vec<Diagnostic>> {
    let (kind, stage) = kind_of(sources, registry, s)?;
    let mut errors = Vec::new();
    let keys = EngineKeys::read(sources, s, &mut errors);
    let from = inputs_named(sources, s, declared, &keys.from, &mut errors);
    let sweeps = own_sweeps(sources, s, &keys.for_each, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let variants = variants(sources, s, &kind, stage.as_ref(), &sweeps)?;
    let output = output_of(sources, s, &kind, stage.as_ref(), &variants)?;
    let inputs = stage
        .inputs()
        .into_iter()
        .map(|slot| (slot, Vec::new()))
        .collect();
    let decl = StageDecl {
        name: s.name.clone(),
        kind,
        span: s.name_span.clone(),
        from,
        inputs,
        for_each: keys.for_each.into_iter().map(|(d, _)| d).collect(),
        device: keys.device,
        threads: keys.threads,
        variants,
        output,
        plan: PlanFacts::default(),
        values: s
            .entries
            .iter()
            .filter(|e| !is_engine_key(e.key.get_ref()))
            .map(|e| {
                let at = Span {
                    file: e.file,
                    range: e.value.span(),
                };
                (e.key.get_ref().to_string(), at)
            })
            .collect(),
        stage,
    };
    Ok((decl, keys.expect))
}

/// The stage's `kind` and the registered kind it names.
fn kind_of(
    sources: &SourceMap,
    registry: &Registry,
    s: &MergedStage,
) -> Result<(String, Arc<dyn DynStage>), Vec<Diagnostic>> {
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
    Ok((kind, stage))
}

/// The keys of a stage table the engine reads itself (the rest are the kind's params).
struct EngineKeys {
    from: Vec<(String, Span)>,
    for_each: Vec<(String, Span)>,
    device: Option<String>,
    threads: Option<usize>,
    expect: Vec<Expectation>,
}

impl EngineKeys {
    /// Reads them from `s`, pushing an error for each malformed one (and leaving it unset).
    fn read(sources: &SourceMap, s: &MergedStage, errors: &mut Vec<Diagnostic>) -> Self {
        let mut names = |key: &str| match s.get(key) {
            Some(e) => names_of(sources, e, key).unwrap_or_else(|d| {
                errors.push(d);
                Vec::new()
            }),
            None => Vec::new(),
        };
        let from = names("from");
        let for_each = names("for_each");
        let device = s
            .get("device")
            .and_then(|e| match e.value.get_ref().as_str() {
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
            });
        let threads = s.get("threads").and_then(|e| {
            match e
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
            }
        });
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
        EngineKeys {
            from,
            for_each,
            device,
            threads,
            expect,
        }
    }
}

/// The `from` names that name another declared stage, once each. They are matched to input
/// slots by the upstream's artifact type later, once every stage is declared.
fn inputs_named(
    sources: &SourceMap,
    s: &MergedStage,
    declared: &BTreeSet<String>,
    from: &[(String, Span)],
    errors: &mut Vec<Diagnostic>,
) -> Vec<(String, Span)> {
    let mut seen = BTreeSet::new();
    let mut named = Vec::new();
    for (name, span) in from {
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
            named.push((name.clone(), span.clone()));
        }
    }
    named
}

/// The stage's own sweeps: each `for_each` dimension whose value is an array in this table,
/// checked to list at least one value and none twice.
fn own_sweeps<'s, 'a>(
    sources: &SourceMap,
    s: &'s MergedStage<'a>,
    for_each: &'s [(String, Span)],
    errors: &mut Vec<Diagnostic>,
) -> Vec<(&'s str, &'s Entry<'a>)> {
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
    sweeps
}

/// The kind's params for every combination of the sweep values, parsed from the spanned table
/// (so errors keep their positions) and checked by the kind.
fn variants(
    sources: &SourceMap,
    s: &MergedStage,
    kind: &str,
    stage: &dyn DynStage,
    sweeps: &[(&str, &Entry)],
) -> Result<Vec<Variant>, Vec<Diagnostic>> {
    let mut errors = Vec::new();
    let mut variants = Vec::new();
    for combo in combinations(sweeps) {
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
                if let Err(e) = stage.check(&params) {
                    errors.push(check_error(sources, s, kind, &combo, &coords, &e));
                }
                variants.push(Variant { coords, params });
            }
            Err(e) => {
                errors.push(parse_error(sources, s, kind, stage, &e));
                break;
            }
        }
    }
    if errors.is_empty() {
        Ok(variants)
    } else {
        Err(errors)
    }
}

/// The kind's objection `e` to one sweep combination's params, at the value of the key it
/// blames, or at the stage when it blames none.
fn check_error(
    sources: &SourceMap,
    s: &MergedStage,
    kind: &str,
    combo: &[(&str, &Spanned<DeValue>)],
    coords: &Coords,
    e: &ParamError,
) -> Diagnostic {
    let at = e
        .key()
        .and_then(|key| key_span(s, combo, key))
        .unwrap_or_else(|| s.name_span.clone());
    Diagnostic::at(sources, &at, format!("stage `{}` ({kind}): {e}", s.name)).with_help(
        if coords.is_empty() {
            "fix the value in the stage table".to_string()
        } else {
            format!("for the sweep value {}", fmt_coords(coords))
        },
    )
}

/// Where the value at `key` (a dotted path, see [`ParamError`]) is written: the deepest part
/// of the path the stage table has, in this combination's value where the first key is swept.
fn key_span(s: &MergedStage, combo: &[(&str, &Spanned<DeValue>)], key: &str) -> Option<Span> {
    let mut parts = key.split('.');
    let entry = s.get(parts.next()?)?;
    let mut value = combo
        .iter()
        .find(|(dim, _)| *dim == entry.key.get_ref().as_ref())
        .map_or(&entry.value, |(_, v)| *v);
    for part in parts {
        let inner = match (value.get_ref(), part.parse::<usize>()) {
            (DeValue::Array(_), Ok(i)) => value.get_ref().get(i),
            (v, _) => v.get(part),
        };
        let Some(inner) = inner else { break };
        value = inner;
    }
    Some(Span {
        file: entry.file,
        range: value.span(),
    })
}

/// A stage table that does not deserialize into the kind's params.
fn parse_error(
    sources: &SourceMap,
    s: &MergedStage,
    kind: &str,
    stage: &dyn DynStage,
    e: &toml::de::Error,
) -> Diagnostic {
    let file = file_of_error(s, e);
    let mut d = Diagnostic::from_toml(sources, file, e);
    // A kind that converts while deserializing (`try_from`) gives an error with no position:
    // it is about the stage as a whole.
    if e.span().is_none() {
        d.location = Diagnostic::at(sources, &s.name_span, "").location;
    }
    d.message = format!("stage `{}` ({kind}): {}", s.name, d.message);
    // A misspelt engine key (`for-each`) lands among the kind's params; say what the engine
    // itself reads too.
    if let Some(field) = unknown_key(s, stage) {
        let engine: Vec<String> = engine_keys().iter().map(|k| k.to_string()).collect();
        if let Some(close) = closest(field, engine.iter()) {
            d = d.with_help(format!("did you mean `{close}`?"));
        }
        d = d.with_help(format!(
            "stage keys read by the engine: {}",
            list(engine.iter())
        ));
    }
    d
}

/// The first key of the stage table that neither the engine nor the kind reads.
fn unknown_key<'s>(s: &'s MergedStage, stage: &dyn DynStage) -> Option<&'s str> {
    let fields = stage.param_fields()?;
    s.entries
        .iter()
        .map(|e| e.key.get_ref().as_ref())
        .find(|k| !is_engine_key(k) && !fields.contains(k))
}

/// The artifact type every variant produces; a sweep that changes it is an error.
fn output_of(
    sources: &SourceMap,
    s: &MergedStage,
    kind: &str,
    stage: &dyn DynStage,
    variants: &[Variant],
) -> Result<&'static str, Vec<Diagnostic>> {
    let outputs: BTreeSet<&'static str> = variants
        .iter()
        .map(|v| stage.output_for(&v.params))
        .collect();
    match outputs.len() {
        0 | 1 => Ok(outputs.first().copied().unwrap_or_else(|| stage.output())),
        _ => Err(vec![
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
        ]),
    }
}

pub(super) fn entry_span(e: &Entry) -> Span {
    Span {
        file: e.file,
        range: e.value.span(),
    }
}

/// A string or a list of strings, with the span of each.
pub(super) fn names_of(
    sources: &SourceMap,
    e: &Entry,
    what: &str,
) -> Result<Vec<(String, Span)>, Diagnostic> {
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

pub(super) fn scalar_label(v: &DeValue) -> String {
    match v {
        DeValue::String(s) => s.to_string(),
        DeValue::Integer(i) => i.to_string(),
        DeValue::Float(f) => f.to_string(),
        DeValue::Boolean(b) => b.to_string(),
        other => other.type_str().to_string(),
    }
}

/// Every combination of one value per sweep, in row-major order (last sweep fastest).
pub(super) fn combinations<'s, 'a>(
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
pub(super) fn file_of_error(s: &MergedStage, e: &toml::de::Error) -> FileId {
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
