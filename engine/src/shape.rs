//! What a stage's nodes will report, as far as it is known when an experiment is loaded, so
//! that a misspelt or inapplicable result path (an expectation, `select`'s `by`) is an error
//! at plan time, with the valid names, instead of a failure after hours of training.
//!
//! Stage kinds describe their results with [`Shape`] in [`crate::Stage::plan_facts`], from
//! their params and what their inputs' kinds said ([`PlanFacts`]); the engine passes the facts
//! down the graph in topological order and checks every expectation path against them.

use std::collections::BTreeMap;

use serde_json::Value;

/// The shape of a stage's `results` JSON.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Shape {
    /// Not known at plan time: every path below is accepted.
    #[default]
    Any,
    /// A value (a number, or a string that names something): where a path ends.
    Value,
    /// An object with these keys; when `open`, keys not listed may appear too (unchecked).
    Object {
        /// The known keys and their shapes.
        keys: BTreeMap<String, Shape>,
        /// Whether other keys may appear.
        open: bool,
    },
}

impl Shape {
    /// An object with exactly these keys.
    pub fn object<K: Into<String>>(keys: impl IntoIterator<Item = (K, Shape)>) -> Shape {
        Shape::Object {
            keys: keys.into_iter().map(|(k, s)| (k.into(), s)).collect(),
            open: false,
        }
    }

    /// An object with exactly these keys, each a value.
    pub fn values<K: Into<String>>(names: impl IntoIterator<Item = K>) -> Shape {
        Shape::object(names.into_iter().map(|n| (n, Shape::Value)))
    }

    /// This shape with `key` added (or replaced), if it is an object; otherwise unchanged (an
    /// unknown shape stays unknown).
    pub fn with(mut self, key: impl Into<String>, shape: Shape) -> Shape {
        if let Shape::Object { keys, .. } = &mut self {
            keys.insert(key.into(), shape);
        }
        self
    }

    /// The shape under `key`: `Some(Any)` below an unknown or open object, `None` where the
    /// key cannot be.
    pub fn get(&self, key: &str) -> Option<&Shape> {
        const ANY: &Shape = &Shape::Any;
        match self {
            Shape::Any => Some(ANY),
            Shape::Value => None,
            Shape::Object { keys, open } => keys.get(key).or(open.then_some(ANY)),
        }
    }

    /// What either of two shapes allows (the variants of one stage may differ).
    pub fn union(self, other: Shape) -> Shape {
        match (self, other) {
            (a, b) if a == b => a,
            (
                Shape::Object { mut keys, open },
                Shape::Object {
                    keys: other,
                    open: other_open,
                },
            ) => {
                for (k, s) in other {
                    let merged = match keys.remove(&k) {
                        Some(mine) => mine.union(s),
                        None => s,
                    };
                    keys.insert(k, merged);
                }
                Shape::Object {
                    keys,
                    open: open || other_open,
                }
            }
            _ => Shape::Any,
        }
    }

    /// Checks that the dot-separated `path` leads to a value; the error says where it goes
    /// wrong and what is there instead.
    pub fn check(&self, path: &str) -> Result<(), PathError> {
        let mut cur = self;
        let mut walked: Vec<&str> = Vec::new();
        for part in path.split('.') {
            cur = match cur.get(part) {
                Some(s) => s,
                None if walked.is_empty() => {
                    return Err(PathError::NoTop {
                        part: part.to_owned(),
                        listing: cur.listing(),
                    });
                }
                None => {
                    let here = walked.join(".");
                    return Err(match cur {
                        Shape::Value => PathError::UnderValue { here },
                        _ => PathError::NoKey {
                            here,
                            part: part.to_owned(),
                            listing: cur.listing(),
                        },
                    });
                }
            };
            walked.push(part);
        }
        match cur {
            Shape::Object { .. } => Err(PathError::Group {
                path: path.to_owned(),
                listing: cur.listing(),
            }),
            _ => Ok(()),
        }
    }

    /// "it has `a`, `b`" for an object (its known keys).
    fn listing(&self) -> String {
        match self {
            Shape::Object { keys, .. } => format!(
                "it has {}",
                keys.keys()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => String::new(),
        }
    }
}

/// Why a result path does not lead to a value ([`Shape::check`]); each message says what is
/// there instead (`listing`: "it has `a`, `b`", empty when the keys are unknown).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The first key is not in the results.
    #[error("no `{part}` in the results; {listing}")]
    NoTop {
        /// The key.
        part: String,
        /// The keys there are.
        listing: String,
    },
    /// The path goes on below a single value.
    #[error("`{here}` is a single value; nothing is under it")]
    UnderValue {
        /// The path up to that value.
        here: String,
    },
    /// A key is not in the group the path reached.
    #[error("`{here}` has no `{part}`; {listing}")]
    NoKey {
        /// The path up to the group.
        here: String,
        /// The key.
        part: String,
        /// The keys there are.
        listing: String,
    },
    /// The path ends at a group.
    #[error("`{path}` is a group, not a value; {listing}")]
    Group {
        /// The path.
        path: String,
        /// The keys under it.
        listing: String,
    },
}

/// What a stage tells the engine and the stages reading it when an experiment is loaded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlanFacts {
    /// The shape of each node's results.
    pub results: Shape,
    /// Whatever the kinds reading this stage need to know (`extract`: the label kind), as
    /// JSON; `Null` when nothing is known.
    pub facts: Value,
}

impl PlanFacts {
    /// What either of two variants of one stage may report; facts only where they agree.
    pub fn union(self, other: PlanFacts) -> PlanFacts {
        PlanFacts {
            results: self.results.union(other.results),
            facts: if self.facts == other.facts {
                self.facts
            } else {
                Value::Null
            },
        }
    }
}

/// One upstream stage as [`crate::Stage::plan_facts`] sees it.
#[derive(Clone, Copy, Debug)]
pub struct PlanInput<'a> {
    /// The artifact type it is read as (the input slot).
    pub ty: &'static str,
    /// Its stage name.
    pub stage: &'a str,
    /// What it said about itself.
    pub facts: &'a PlanFacts,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe() -> Shape {
        let metrics = Shape::values(["loss", "top1", "top5"]);
        Shape::object([("val", metrics.clone()), ("test", metrics)])
            .with("params", Shape::Value)
            .with("downstream", Shape::Any)
    }

    #[test]
    fn paths_are_checked_down_to_a_value_with_the_valid_names_in_the_error() {
        let s = probe();
        assert!(s.check("val.top1").is_ok());
        assert!(s.check("params").is_ok());
        assert!(s.check("downstream.knn.anything").is_ok());
        let e = s.check("val.accuracy").unwrap_err();
        assert!(
            matches!(&e, PathError::NoKey { here, part, .. } if here == "val" && part == "accuracy"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "`val` has no `accuracy`; it has `loss`, `top1`, `top5`"
        );
        let e = s.check("tset.top1").unwrap_err().to_string();
        assert!(
            e.starts_with("no `tset` in the results") && e.contains("`test`"),
            "{e}"
        );
        let e = s.check("val").unwrap_err().to_string();
        assert!(
            e.contains("group, not a value") && e.contains("`top1`"),
            "{e}"
        );
        let e = s.check("params.x").unwrap_err();
        assert_eq!(
            e,
            PathError::UnderValue {
                here: "params".into()
            }
        );
        let e = e.to_string();
        assert!(e.contains("`params` is a single value"), "{e}");
        assert!(Shape::Any.check("a.b.c").is_ok());
    }

    #[test]
    fn union_keeps_what_either_variant_reports() {
        let a = Shape::values(["top1"]);
        let b = Shape::values(["accuracy"]);
        let u = a.clone().union(b);
        assert!(u.check("top1").is_ok() && u.check("accuracy").is_ok());
        assert!(u.check("r2").is_err());
        assert_eq!(a.clone().union(Shape::Any), Shape::Any);
        assert_eq!(a.clone().union(a.clone()), a);
    }
}
