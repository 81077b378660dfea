//! `probex cache`: list, verify, gc, remove and locate entries.

use super::*;

pub(super) fn cache_cmd(
    cmd: CacheCommand,
    cache: &CacheArgs,
    registry: &Registry,
) -> Result<i32, Failure> {
    if let CacheCommand::Path = cmd {
        // Where it is or would be; asking must not create it.
        let root = cache.root();
        let shown = std::fs::canonicalize(&root)
            .or_else(|_| std::path::absolute(&root))
            .unwrap_or(root);
        crate::outln!("{}", shown.display());
        return Ok(EXIT_OK);
    }
    let store = cache.open_existing()?;
    match cmd {
        CacheCommand::Path => {}
        CacheCommand::Ls { json } => {
            let entries = store.list().map_err(|e| e.to_string())?;
            if json {
                let rows: Vec<Value> = entries
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "key": e.key.to_string(), "kind": e.manifest.kind, "node": e.manifest.label,
                            "bytes": e.size(), "created_unix": e.manifest.created_unix,
                        })
                    })
                    .collect();
                crate::outln!(
                    "{}",
                    serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?
                );
            } else {
                let total: u64 = entries.iter().map(|e| e.size()).sum();
                for e in &entries {
                    crate::outln!(
                        "{}  {:<9} {:>10}  {}",
                        &e.key.as_str()[..12],
                        e.manifest.kind,
                        human(e.size()),
                        e.manifest.label
                    );
                }
                crate::outln!("{} entries, {}", entries.len(), human(total));
                print_leftovers(&store)?;
            }
        }
        CacheCommand::Verify => {
            let results = store.verify_all().map_err(|e| e.to_string())?;
            let bad: Vec<_> = results
                .iter()
                .filter(|(_, v)| matches!(v, Verified::Corrupt(_)))
                .collect();
            for (k, v) in &bad {
                if let Verified::Corrupt(problems) = v {
                    crate::outln!("corrupt {k}:");
                    for p in problems {
                        crate::outln!("  {p}");
                    }
                }
            }
            crate::outln!(
                "{} entries verified, {} corrupt (quarantined)",
                results.len(),
                bad.len()
            );
            print_leftovers(&store)?;
            return Ok(if bad.is_empty() { EXIT_OK } else { EXIT_FAILED });
        }
        CacheCommand::Gc { keep, older_than } => {
            let keep_set = if keep.is_empty() {
                None
            } else {
                let mut set = HashSet::new();
                for file in &keep {
                    set.extend(keys_of(file, &store, registry)?);
                }
                Some(set)
            };
            let older = match older_than {
                Some(days) if days.is_finite() && days >= 0.0 => {
                    Some(SystemTime::now() - Duration::from_secs_f64(days * 86_400.0))
                }
                Some(days) => {
                    return Err(format!("--older-than {days}: give a number of days >= 0").into());
                }
                None => None,
            };
            let report = store
                .gc(&GcPolicy {
                    keep: keep_set,
                    older_than: older,
                })
                .map_err(|e| e.to_string())?;
            crate::outln!(
                "removed {} entries, {} staging dirs of dead runs; freed {}",
                report.removed.len(),
                report.tmp_cleaned,
                human(report.freed_bytes),
            );
            if !report.kept_referenced.is_empty() {
                crate::outln!(
                    "kept {} entries that kept entries read in place (the model files under \
                     their layer datasets)",
                    report.kept_referenced.len()
                );
            }
            if !report.skipped_in_use.is_empty() {
                let label = |k: &Key| match store.get(k) {
                    Ok(Some(e)) => e.manifest.label,
                    _ => k.as_str()[..12].to_string(),
                };
                let shown: Vec<String> = report.skipped_in_use.iter().take(8).map(label).collect();
                let more = report.skipped_in_use.len() - shown.len();
                crate::outln!(
                    "kept {} entries in use by a running probex (being computed, or read by a live run): {}{}",
                    report.skipped_in_use.len(),
                    shown.join(", "),
                    if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    }
                );
                crate::outln!(
                    "  = help: run gc again once those runs have finished to remove them"
                );
            }
        }
    }
    Ok(EXIT_OK)
}

/// Says what lies in the cache beside its entries, and what removes it (nothing when empty).
pub(super) fn print_leftovers(store: &Store) -> Result<(), Failure> {
    let l = store
        .leftovers()
        .map_err(|e| Failure::failed(format!("error: {e}")))?;
    if l.dead_staging > 0 || l.stale_scratch_bytes > 0 {
        crate::outln!(
            "reclaimable: {} ({} staging folder(s) of killed runs, {} scratch of finished nodes); `probex cache gc` removes it, as does the next run for the staging",
            human(l.reclaimable_bytes()),
            l.dead_staging,
            human(l.stale_scratch_bytes),
        );
    }
    if l.quarantined > 0 {
        crate::outln!(
            "quarantined: {} entr{} that failed verification ({}); `probex cache gc --older-than DAYS` removes them",
            l.quarantined,
            if l.quarantined == 1 { "y" } else { "ies" },
            human(l.quarantined_bytes),
        );
    }
    if l.resumable_bytes > 0 {
        crate::outln!(
            "resumable: {} of checkpoints of unfinished nodes (kept for the next run)",
            human(l.resumable_bytes)
        );
    }
    Ok(())
}

/// Every key an experiment's current plan references.
pub(super) fn keys_of(file: &Path, store: &Store, registry: &Registry) -> Result<Vec<Key>, String> {
    let exp = crate::experiment::load(file, registry).map_err(|d| d.to_string())?;
    let digests = FileDigests::open(store.root().join("statcache.json"));
    let cx = PlanContext {
        base_dir: &exp.base_dir,
        digests: &digests,
        offline: true,
    };
    let planner = Planner::new(&exp, store, cx, Overrides::default());
    let plan = planner.plan().map_err(|d| d.to_string())?;
    Ok(plan.nodes.into_iter().map(|n| n.key).collect())
}

/// `a, b, c and N more`: the first `n` items of a long list.
pub(super) fn list_some(items: &[&str], n: usize) -> String {
    let shown = items[..items.len().min(n)].join(", ");
    match items.len().saturating_sub(n) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}
