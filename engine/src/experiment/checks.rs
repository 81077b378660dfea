//! Checks across stages once all are declared: `from` links typed by artifact, what each
//! stage says at load time its nodes will report, and the result paths that name them.

use super::*;

/// Asks every stage, inputs first, what its nodes will report ([`Stage::plan_facts`]); a
/// stage's objection (a path it reads that its inputs will not report) is an error at it.
///
/// [`Stage::plan_facts`]: crate::Stage::plan_facts
pub(super) fn plan_facts(sources: &SourceMap, decls: &mut [StageDecl]) -> Result<(), Diagnostics> {
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
                Err(e) => {
                    // Where the key is written: its top-level value (a swept key's whole list).
                    let at = e
                        .key()
                        .and_then(|k| d.values.get(k.split('.').next().unwrap_or(k)))
                        .unwrap_or(&d.span);
                    errors.push(
                        Diagnostic::at(
                            sources,
                            at,
                            format!("stage `{}` ({}): {e}", d.name, d.kind),
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
pub(super) fn check_result_paths(
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
                d.plan.results.check(rest).map_err(|e| e.to_string())
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

/// Fills each stage's input slots from `from` by the upstream's output type, and reports
/// names whose type no slot reads and required slots left empty.
pub(super) fn check_types(sources: &SourceMap, decls: &[StageDecl]) -> Result<(), Diagnostics> {
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
pub(super) fn producers(decls: &[StageDecl], ty: &str, reader: &str) -> String {
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
