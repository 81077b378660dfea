//! CSV as the run record's tables write it (RFC 4180), shared by `select` and `evaluate`.

/// One CSV record (RFC 4180): fields with a comma, quote or line break are quoted, quotes
/// doubled; ends with `\n`.
pub fn csv_record(fields: &[&str]) -> String {
    let quoted: Vec<String> = fields
        .iter()
        .map(|f| {
            if f.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", f.replace('"', "\"\""))
            } else {
                (*f).to_string()
            }
        })
        .collect();
    quoted.join(",") + "\n"
}
