//! Expectations: target values with tolerances, or orderings, checked against a run's results.
//!
//! ```toml
//! [expect]
//! "report.probex.test.accuracy" = "0.885 +- 0.02"     # within a tolerance
//! "report.probex.test.accuracy " = "> report.dense.test.accuracy"   # an ordering
//!
//! [stage.report]
//! expect = { "test.top1" = ">= 0.9" }                # paths relative to the stage
//! ```
//! A path starts with a stage name; the rest walks that stage's `results` JSON. A stage that
//! fans out is checked node by node: every node must meet it.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use toml::Spanned;
use toml::de::DeValue;

use crate::diagnostic::{Diagnostic, FileId, SourceMap, Span};

/// One expectation, as written.
#[derive(Clone, Debug)]
pub struct Expectation {
    /// Full path: stage name, then keys into its results.
    pub path: String,
    /// What must hold.
    pub rule: Rule,
    /// The text as written, for reports.
    pub text: String,
    /// Where it is written.
    pub span: Span,
}

/// What must hold for a value.
#[derive(Clone, Debug, PartialEq)]
pub enum Rule {
    /// `|value - target| <= tolerance`.
    Within {
        /// Target value.
        target: f64,
        /// Allowed absolute deviation.
        tolerance: f64,
    },
    /// `value <op> rhs`.
    Compare {
        /// The comparison.
        op: Op,
        /// A number or another result path.
        rhs: Operand,
    },
}

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Op {
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `<`
    Lt,
    /// `<=`
    Le,
}

impl Op {
    fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Op::Gt => a > b,
            Op::Ge => a >= b,
            Op::Lt => a < b,
            Op::Le => a <= b,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Lt => "<",
            Op::Le => "<=",
        })
    }
}

/// The right-hand side of a comparison.
#[derive(Clone, Debug, PartialEq)]
pub enum Operand {
    /// A number.
    Number(f64),
    /// Another result path (full, starting with a stage name).
    Path(String),
}

const FORMS: &str = "write \"0.885 +- 0.02\", \">= 0.8\", or \"> other_stage.path\"";

/// Parses one `path = "rule"` entry; `stage` prefixes paths of a stage's own `expect` table.
pub(crate) fn parse_entry(
    sources: &SourceMap,
    file: FileId,
    key: &Spanned<Cow<str>>,
    value: &Spanned<DeValue>,
    stage: Option<&str>,
) -> Result<Expectation, Diagnostic> {
    let span = Span {
        file,
        range: value.span(),
    };
    let Some(text) = value.get_ref().as_str() else {
        return Err(
            Diagnostic::at(sources, &span, "an expectation must be a string").with_help(FORMS),
        );
    };
    let prefix = |p: &str| match stage {
        Some(s) => format!("{s}.{p}"),
        None => p.to_string(),
    };
    let path = prefix(key.get_ref().trim());
    if path.split('.').any(str::is_empty) {
        let kspan = Span {
            file,
            range: key.span(),
        };
        return Err(
            Diagnostic::at(sources, &kspan, format!("`{path}` is not a result path"))
                .with_help("paths are dot-separated: stage.split.metric"),
        );
    }
    let rule = parse_rule(text, &prefix)
        .map_err(|m| Diagnostic::at(sources, &span, m.to_string()).with_help(FORMS))?;
    Ok(Expectation {
        path,
        rule,
        text: text.to_string(),
        span,
    })
}

/// Why an expectation's rule cannot be read.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RuleError {
    /// A negative tolerance.
    #[error("tolerance {0} is negative")]
    NegativeTolerance(f64),
    /// No known operator.
    #[error("cannot read expectation \"{0}\"")]
    Unreadable(String),
    /// An operator with nothing after it.
    #[error("\"{0}\" has nothing to compare with")]
    NothingToCompare(String),
    /// A number that is infinite or NaN.
    #[error("\"{0}\" is not a finite number")]
    NotFinite(String),
    /// Neither a number nor a result path.
    #[error("\"{0}\" is neither a number nor a result path")]
    NotAnOperand(String),
    /// A target or tolerance that is not a number.
    #[error("\"{0}\" is not a number")]
    NotANumber(String),
}

fn parse_rule(text: &str, prefix: &dyn Fn(&str) -> String) -> Result<Rule, RuleError> {
    let t = text.trim();
    for sep in ["+-", "±"] {
        if let Some((a, b)) = t.split_once(sep) {
            let target = number(a)?;
            let tolerance = number(b)?;
            if tolerance < 0.0 {
                return Err(RuleError::NegativeTolerance(tolerance));
            }
            return Ok(Rule::Within { target, tolerance });
        }
    }
    let (op, rest) = if let Some(r) = t.strip_prefix(">=") {
        (Op::Ge, r)
    } else if let Some(r) = t.strip_prefix("<=") {
        (Op::Le, r)
    } else if let Some(r) = t.strip_prefix('>') {
        (Op::Gt, r)
    } else if let Some(r) = t.strip_prefix('<') {
        (Op::Lt, r)
    } else {
        return Err(RuleError::Unreadable(text.to_owned()));
    };
    let rest = rest.trim();
    if rest.is_empty() {
        return Err(RuleError::NothingToCompare(text.to_owned()));
    }
    let rhs = match rest.parse::<f64>() {
        Ok(v) if v.is_finite() => Operand::Number(v),
        Ok(_) => return Err(RuleError::NotFinite(rest.to_owned())),
        Err(_)
            if rest
                .split('.')
                .all(|s| !s.is_empty() && !s.contains(char::is_whitespace)) =>
        {
            Operand::Path(prefix(rest))
        }
        Err(_) => return Err(RuleError::NotAnOperand(rest.to_owned())),
    };
    Ok(Rule::Compare { op, rhs })
}

fn number(s: &str) -> Result<f64, RuleError> {
    let s = s.trim();
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(RuleError::NotANumber(s.to_owned())),
    }
}

/// The outcome of one expectation for one node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Checked {
    /// The path checked (with the node name where the stage fans out).
    pub path: String,
    /// The rule as written.
    pub expected: String,
    /// The value found, if any.
    pub actual: Option<f64>,
    /// Whether it held.
    pub pass: bool,
    /// Why it failed, when it did.
    pub note: Option<String>,
}

/// Results of every node, grouped by stage: stage -> [(node name, results)].
pub type ResultsByStage = BTreeMap<String, Vec<(String, Value)>>;

/// Checks every expectation against the results.
pub fn check(expectations: &[Expectation], results: &ResultsByStage) -> Vec<Checked> {
    let mut out = Vec::new();
    for x in expectations {
        let (stage, rest) = x.path.split_once('.').unwrap_or((&x.path, ""));
        let nodes = results.get(stage).map(Vec::as_slice).unwrap_or_default();
        if nodes.is_empty() {
            out.push(Checked {
                path: x.path.clone(),
                expected: x.text.clone(),
                actual: None,
                pass: false,
                note: Some(format!("stage `{stage}` reported no results")),
            });
            continue;
        }
        for (node, value) in nodes {
            let shown = if nodes.len() > 1 {
                format!("{node}.{rest}")
            } else {
                x.path.clone()
            };
            let actual = lookup(value, rest);
            let (pass, note) = match (actual, &x.rule) {
                (None, _) => (
                    false,
                    Some(format!("no number at `{rest}` in the results of `{node}`")),
                ),
                (Some(a), Rule::Within { target, tolerance }) => {
                    // A small epsilon keeps "0.9 +- 0.1" from failing on 1.0000000000000002.
                    let ok = (a - target).abs() <= tolerance + 1e-12;
                    (
                        ok,
                        (!ok).then(|| format!("off by {:.4}", (a - target).abs())),
                    )
                }
                (Some(a), Rule::Compare { op, rhs }) => match rhs {
                    Operand::Number(b) => (op.holds(a, *b), None),
                    Operand::Path(p) => match resolve_single(p, results) {
                        Ok(b) => {
                            let ok = op.holds(a, b);
                            (
                                ok,
                                (!ok).then(|| format!("{a:.4} {op} {b:.4} does not hold")),
                            )
                        }
                        Err(m) => (false, Some(m)),
                    },
                },
            };
            out.push(Checked {
                path: shown,
                expected: x.text.clone(),
                actual,
                pass,
                note,
            });
        }
    }
    out
}

fn resolve_single(path: &str, results: &ResultsByStage) -> Result<f64, String> {
    let (stage, rest) = path.split_once('.').unwrap_or((path, ""));
    match results.get(stage).map(Vec::as_slice) {
        Some([(_, v)]) => lookup(v, rest).ok_or_else(|| format!("no number at `{path}`")),
        Some([]) | None => Err(format!("stage `{stage}` reported no results")),
        Some(_) => Err(format!(
            "`{stage}` fans out: compare with a stage that reports one value"
        )),
    }
}

/// Walks `path` (dot-separated keys; numbers index arrays) into `v` and returns a number.
pub fn lookup(v: &Value, path: &str) -> Option<f64> {
    let mut cur = v;
    if !path.is_empty() {
        for part in path.split('.') {
            cur = match cur {
                Value::Object(m) => m.get(part)?,
                Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
    }
    cur.as_f64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(t: &str) -> Result<Rule, RuleError> {
        parse_rule(t, &|p| p.to_string())
    }

    #[test]
    fn parses_tolerances_and_comparisons() {
        assert_eq!(
            rule("0.885 +- 0.02").unwrap(),
            Rule::Within {
                target: 0.885,
                tolerance: 0.02
            }
        );
        assert_eq!(
            rule(" 0.5 ± 0.1 ").unwrap(),
            Rule::Within {
                target: 0.5,
                tolerance: 0.1
            }
        );
        assert_eq!(
            rule(">= 0.8").unwrap(),
            Rule::Compare {
                op: Op::Ge,
                rhs: Operand::Number(0.8)
            }
        );
        assert_eq!(
            rule("> dense.test.acc").unwrap(),
            Rule::Compare {
                op: Op::Gt,
                rhs: Operand::Path("dense.test.acc".into())
            }
        );
        for bad in ["0.9", "> ", "0.9 +- -1", "0.9 +- x", "> a..b", "= 3"] {
            assert!(rule(bad).is_err(), "{bad} should be rejected");
        }
        assert_eq!(rule("0.9 +- -1"), Err(RuleError::NegativeTolerance(-1.0)));
        assert_eq!(rule("0.9 +- x"), Err(RuleError::NotANumber("x".into())));
        assert_eq!(rule("= 3"), Err(RuleError::Unreadable("= 3".into())));
    }

    fn x(path: &str, rule: Rule) -> Expectation {
        Expectation {
            path: path.into(),
            rule,
            text: "t".into(),
            span: Span {
                file: 0,
                range: 0..0,
            },
        }
    }

    #[test]
    fn checks_values_orderings_and_missing_paths() {
        let mut results = ResultsByStage::new();
        results.insert(
            "a".into(),
            vec![(
                "a".into(),
                json!({"test": {"acc": 0.9}, "list": [0.1, 0.2]}),
            )],
        );
        results.insert(
            "b".into(),
            vec![("b".into(), json!({"test": {"acc": 0.7}}))],
        );
        let exps = [
            x(
                "a.test.acc",
                Rule::Within {
                    target: 0.88,
                    tolerance: 0.03,
                },
            ),
            x(
                "a.test.acc",
                Rule::Within {
                    target: 0.8,
                    tolerance: 0.05,
                },
            ),
            x(
                "a.test.acc",
                Rule::Compare {
                    op: Op::Gt,
                    rhs: Operand::Path("b.test.acc".into()),
                },
            ),
            x(
                "b.test.acc",
                Rule::Compare {
                    op: Op::Gt,
                    rhs: Operand::Path("a.test.acc".into()),
                },
            ),
            x(
                "a.list.1",
                Rule::Compare {
                    op: Op::Le,
                    rhs: Operand::Number(0.2),
                },
            ),
            x(
                "a.test.missing",
                Rule::Compare {
                    op: Op::Gt,
                    rhs: Operand::Number(0.0),
                },
            ),
            x(
                "c.x",
                Rule::Compare {
                    op: Op::Gt,
                    rhs: Operand::Number(0.0),
                },
            ),
        ];
        let got: Vec<bool> = check(&exps, &results).iter().map(|c| c.pass).collect();
        assert_eq!(got, [true, false, true, false, true, false, false]);
    }
}
