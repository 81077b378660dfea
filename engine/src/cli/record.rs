//! `probex report` and `probex compare`: reading finished run records.

use super::*;

/// Reads a JSON file of a run record; an empty, truncated or missing file is an error that
/// says the record is incomplete rather than a parse error.
pub(super) fn read_record_json(run: &Path, name: &str) -> Result<Value, String> {
    let path = run.join(name);
    let incomplete = |why: String| {
        format!(
            "error: {} is not a complete run record: {why}\n  = help: give a run directory (runs/<experiment>/<timestamp>); a run whose disk filled up or that was killed before it finished has no complete record, run it again",
            run.display()
        )
    };
    let bytes = std::fs::read(&path).map_err(|e| incomplete(format!("{}: {e}", path.display())))?;
    if bytes.is_empty() {
        return Err(incomplete(format!("{} is empty", path.display())));
    }
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| incomplete(format!("{}: {e}", path.display())))?;
    if !v.is_object() {
        return Err(incomplete(format!(
            "{} is not a JSON object",
            path.display()
        )));
    }
    Ok(v)
}

pub(super) fn report_cmd(run: &Path) -> Result<i32, Failure> {
    // status.json is written last: a record without a whole one is not finished.
    read_record_json(run, files::STATUS)?;
    let path = run.join(files::REPORT);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "error: cannot read {}: {e}\n  = help: give a run directory (runs/<experiment>/<timestamp>)",
            path.display()
        )
    })?;
    if text.trim().is_empty() {
        return Err(format!(
            "error: {} is empty: the run record is incomplete\n  = help: run the experiment again",
            path.display()
        )
        .into());
    }
    crate::out!("{text}");
    Ok(EXIT_OK)
}

pub(super) fn read_results(run: &Path) -> Result<BTreeMap<String, f64>, String> {
    let v = read_record_json(run, files::RESULTS)?;
    let mut out = BTreeMap::new();
    flatten("", v.get("results").unwrap_or(&Value::Null), &mut out);
    Ok(out)
}

pub(super) fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, f64>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                flatten(
                    &if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    },
                    x,
                    out,
                );
            }
        }
        Value::Number(n) => {
            if let Some(f) = n.as_f64() {
                out.insert(prefix.to_string(), f);
            }
        }
        _ => {}
    }
}

pub(super) fn compare_cmd(a: &Path, b: &Path) -> Result<i32, Failure> {
    let (ra, rb) = (read_results(a)?, read_results(b)?);
    let mut keys: Vec<&String> = ra.keys().chain(rb.keys()).collect();
    keys.sort();
    keys.dedup();
    let width = keys.iter().map(|k| k.len()).max().unwrap_or(4);
    crate::outln!(
        "{:<width$}  {:>12}  {:>12}  {:>10}",
        "result",
        "a",
        "b",
        "b - a"
    );
    let mut differ = 0;
    for k in keys {
        let (x, y) = (ra.get(k), rb.get(k));
        if x == y {
            continue;
        }
        differ += 1;
        let f = |v: Option<&f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"));
        let d = match (x, y) {
            (Some(x), Some(y)) => format!("{:+.4}", y - x),
            _ => String::new(),
        };
        crate::outln!("{k:<width$}  {:>12}  {:>12}  {d:>10}", f(x), f(y));
    }
    crate::outln!(
        "{differ} results differ ({} in a, {} in b)",
        ra.len(),
        rb.len()
    );
    Ok(EXIT_OK)
}
