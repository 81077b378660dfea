//! Labels from safetensors metadata: what a probe learns to predict.
//!
//! A [`LabelSpec`] (an inline TOML table in an experiment) names a `__metadata__` key and how to
//! read it. Metadata values are strings; they are parsed, never evaluated:
//!
//! ```toml
//! label = { key = "dataset_chosen_targets", kind = "multi_label", vocab = "cifar100" }
//! label = { key = "imagenet_class_id", kind = "class", names = "imagenet1k" }
//! label = { key = "lr_scheduler", kind = "category" }
//! label = { key = "learning_rate", kind = "numeric", transform = "log10" }
//! label = { key = "random_flip", kind = "bool", on_error = "skip" }
//! ```

pub mod pylist;
pub mod vocab;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::dataset::{Class, Labels};

/// What kind of value the metadata key holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelKind {
    /// A Python-list literal of class names: multi-hot over a vocabulary.
    MultiLabel,
    /// One class id per model, optionally named through a table (`names`).
    Class,
    /// Any string value; the classes are the distinct values seen, sorted.
    Category,
    /// A number, for regression (optionally `transform = "log10"`).
    Numeric,
    /// `True`/`False` (also `true`/`false`, `1`/`0`): classes `false`, `true`.
    Bool,
}

/// The vocabulary of a multi-label target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Vocab {
    /// The 100 CIFAR-100 fine labels, sorted (`"cifar100"` or `"cifar-100"`).
    Cifar100,
    /// An explicit list of class names, in column order.
    Inline(Vec<String>),
}

impl Vocab {
    /// The class names, in label-column order.
    pub fn classes(&self) -> Vec<String> {
        match self {
            Vocab::Cifar100 => vocab::cifar100(),
            Vocab::Inline(v) => v.clone(),
        }
    }
}

impl<'de> Deserialize<'de> for Vocab {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Name(String),
            List(Vec<String>),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected \"cifar100\" or a list of class names")
        })? {
            Raw::Name(n) if n == "cifar100" || n == "cifar-100" => Ok(Vocab::Cifar100),
            Raw::Name(n) => Err(serde::de::Error::custom(format!(
                "unknown vocabulary `{n}`; built in: \"cifar100\" (or give a list of class names)"
            ))),
            Raw::List(v) => Ok(Vocab::Inline(v)),
        }
    }
}

impl Serialize for Vocab {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Vocab::Cifar100 => s.serialize_str("cifar100"),
            Vocab::Inline(v) => v.serialize(s),
        }
    }
}

/// A table naming class ids (for prompts and reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NameTable {
    /// ImageNet-1k: WordNet id to first lemma (`n02111277` -> `Newfoundland`).
    #[serde(rename = "imagenet1k", alias = "imagenet-1k")]
    Imagenet1k,
}

/// Transform applied to a numeric label.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NumericTransform {
    /// The value as written.
    #[default]
    Identity,
    /// Base-10 logarithm (learning rates, weight decays); the value must be positive.
    Log10,
}

impl NumericTransform {
    /// The name stored in [`Labels::Numeric`].
    pub fn as_str(self) -> &'static str {
        match self {
            NumericTransform::Identity => "identity",
            NumericTransform::Log10 => "log10",
        }
    }
}

/// What to do with a model whose label is missing or malformed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Stop with an error naming the file and key (default).
    #[default]
    Fail,
    /// Leave the model out and list it, with the reason, in the output's `skipped`.
    Skip,
}

/// How to label models from their metadata (the `label` table of an extract stage).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelSpec {
    /// The `__metadata__` key to read.
    pub key: String,
    /// How to read it.
    pub kind: LabelKind,
    /// `multi_label` only: the class vocabulary (default: the sorted union of names seen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab: Option<Vocab>,
    /// `class` only: a table naming the ids; ids not in it are errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<NameTable>,
    /// `numeric` only: transform of the value (default identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<NumericTransform>,
    /// Missing or malformed values: fail (default) or skip the model.
    #[serde(default)]
    pub on_error: OnError,
}

impl LabelSpec {
    /// A spec with defaults for `key` and `kind`.
    pub fn new(key: impl Into<String>, kind: LabelKind) -> Self {
        LabelSpec {
            key: key.into(),
            kind,
            vocab: None,
            names: None,
            transform: None,
            on_error: OnError::Fail,
        }
    }

    /// Checks that the options fit the kind (e.g. `vocab` only with `multi_label`).
    pub fn validate(&self) -> Result<(), LabelSpecError> {
        if self.key.is_empty() {
            return Err(LabelSpecError::EmptyKey);
        }
        let kind = self.kind_name();
        let misplaced = |option, applies_to| LabelSpecError::Misplaced {
            option,
            applies_to,
            kind,
        };
        if self.vocab.is_some() && self.kind != LabelKind::MultiLabel {
            return Err(misplaced("vocab", "multi_label"));
        }
        if self.names.is_some() && self.kind != LabelKind::Class {
            return Err(misplaced("names", "class"));
        }
        if self.transform.is_some() && self.kind != LabelKind::Numeric {
            return Err(misplaced("transform", "numeric"));
        }
        if let Some(Vocab::Inline(v)) = &self.vocab {
            if v.is_empty() {
                return Err(LabelSpecError::EmptyVocab);
            }
            let mut seen = BTreeSet::new();
            if let Some(d) = v.iter().find(|c| !seen.insert(c.as_str())) {
                return Err(LabelSpecError::VocabTwice(d.clone()));
            }
        }
        Ok(())
    }

    fn kind_name(&self) -> &'static str {
        match self.kind {
            LabelKind::MultiLabel => "multi_label",
            LabelKind::Class => "class",
            LabelKind::Category => "category",
            LabelKind::Numeric => "numeric",
            LabelKind::Bool => "bool",
        }
    }
}

/// One model's label, read from its metadata (before the label set is assembled).
#[derive(Clone, Debug, PartialEq)]
pub enum LabelValue {
    /// Class names of a multi-label target (validated against the vocabulary when there is one).
    Multi(Vec<String>),
    /// A class id (`class`, `category`).
    Class(String),
    /// A number after the transform.
    Numeric(f32),
    /// A boolean.
    Bool(bool),
}

/// Reads labels according to a [`LabelSpec`].
#[derive(Clone, Debug)]
pub struct Labeler {
    spec: LabelSpec,
    vocab: Option<Vec<String>>,
    vocab_index: HashMap<String, usize>,
}

impl fmt::Display for LabelValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabelValue::Multi(v) => write!(f, "{v:?}"),
            LabelValue::Class(c) => f.write_str(c),
            LabelValue::Numeric(x) => write!(f, "{x}"),
            LabelValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// Shortens a metadata value for an error message (values can be megabytes).
/// Why a model's label could not be read from its metadata; the caller adds the file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// The metadata has no such key.
    #[error("metadata key `{key}` is missing ({})", present_keys(present, *more))]
    Missing {
        /// The key.
        key: String,
        /// The first keys the metadata does have.
        present: Vec<String>,
        /// How many more it has.
        more: usize,
    },
    /// The key's value is not a label of the spec's kind.
    #[error("metadata key `{key}` = {value}: {problem}")]
    Malformed {
        /// The key.
        key: String,
        /// The value, quoted and cut short.
        value: String,
        /// What is wrong with it.
        problem: LabelProblem,
    },
}

/// What is wrong with a label's value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LabelProblem {
    /// Not a Python literal of the expected form (a list of strings, a number).
    #[error(transparent)]
    Literal(#[from] pylist::LiteralError),
    /// A class name outside the spec's vocabulary.
    #[error("`{0}` is not in the label vocabulary")]
    NotInVocabulary(String),
    /// A class id that is empty.
    #[error("empty class id")]
    EmptyClassId,
    /// Not a synset id of ImageNet-1k (`names = "imagenet1k"`).
    #[error("not an ImageNet-1k WordNet id (like `n02111277`)")]
    NotImagenetId,
    /// A category that is empty.
    #[error("empty value")]
    Empty,
    /// A numeric label that is not a number.
    #[error("not a number")]
    NotANumber,
    /// `transform = "log10"` of a number that is not positive.
    #[error("log10 needs a positive number")]
    NotPositive,
    /// A number too large for an f32.
    #[error("does not fit in an f32")]
    TooLarge,
    /// A boolean label that is not one.
    #[error("not a boolean (True/False, true/false, 1/0)")]
    NotABool,
}

/// The "keys present" part of [`LabelError::Missing`].
fn present_keys(present: &[String], more: usize) -> String {
    match (present.is_empty(), more) {
        (true, _) => "the file has no `__metadata__`".to_string(),
        (false, 0) => format!("keys present: {}", present.join(", ")),
        (false, more) => format!("keys present: {}, and {more} more", present.join(", ")),
    }
}

fn excerpt(v: &str) -> String {
    const MAX: usize = 60;
    if v.chars().count() <= MAX {
        format!("{v:?}")
    } else {
        let head: String = v.chars().take(MAX).collect();
        format!("{head:?}... ({} bytes)", v.len())
    }
}

/// A label spec whose options do not fit together.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LabelSpecError {
    /// No key.
    #[error("label `key` is empty")]
    EmptyKey,
    /// An option for another kind.
    #[error("label option `{option}` applies to kind \"{applies_to}\", not \"{kind}\"")]
    Misplaced {
        /// The option.
        option: &'static str,
        /// The kind it applies to.
        applies_to: &'static str,
        /// The spec's kind.
        kind: &'static str,
    },
    /// An empty inline vocabulary.
    #[error("label `vocab` is an empty list")]
    EmptyVocab,
    /// A name listed twice in the vocabulary.
    #[error("label `vocab` lists `{0}` twice")]
    VocabTwice(String),
}

/// Why the labels of the rows cannot be assembled ([`Labeler::assemble`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AssembleError {
    /// A value of another kind than the labeler's.
    #[error("row {row}: label {label} is not {expected}")]
    WrongKind {
        /// The row.
        row: usize,
        /// The value, as shown.
        label: String,
        /// What it should be ("a class", "a number", ...).
        expected: &'static str,
    },
    /// A multi-label name outside the vocabulary.
    #[error("row {row}: `{name}` is not in the vocabulary")]
    NotInVocab {
        /// The row.
        row: usize,
        /// The name.
        name: String,
    },
}

impl Labeler {
    /// Validates `spec` and prepares its vocabulary.
    pub fn new(spec: LabelSpec) -> Result<Self, LabelSpecError> {
        spec.validate()?;
        let vocab = spec.vocab.as_ref().map(Vocab::classes);
        let vocab_index = vocab
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, c)| (c.clone(), i))
            .collect();
        Ok(Labeler {
            spec,
            vocab,
            vocab_index,
        })
    }

    /// The spec this labeler reads.
    pub fn spec(&self) -> &LabelSpec {
        &self.spec
    }

    /// Reads one model's label. The error names the key and says what is wrong; the caller
    /// adds the file.
    pub fn read(&self, metadata: &BTreeMap<String, String>) -> Result<LabelValue, LabelError> {
        let key = &self.spec.key;
        let Some(raw) = metadata.get(key) else {
            let present: Vec<String> = metadata.keys().take(12).cloned().collect();
            return Err(LabelError::Missing {
                key: key.clone(),
                more: metadata.len() - present.len(),
                present,
            });
        };
        let bad = |problem: LabelProblem| LabelError::Malformed {
            key: key.clone(),
            value: excerpt(raw),
            problem,
        };
        match self.spec.kind {
            LabelKind::MultiLabel => {
                let names = pylist::parse_str_list(raw).map_err(|e| bad(e.into()))?;
                if self.vocab.is_some()
                    && let Some(unknown) = names.iter().find(|n| !self.vocab_index.contains_key(*n))
                {
                    return Err(bad(LabelProblem::NotInVocabulary(unknown.clone())));
                }
                Ok(LabelValue::Multi(names))
            }
            LabelKind::Class => {
                let id = raw.trim();
                if id.is_empty() {
                    return Err(bad(LabelProblem::EmptyClassId));
                }
                if self.spec.names == Some(NameTable::Imagenet1k)
                    && vocab::imagenet1k_by_wnid(id).is_none()
                {
                    return Err(bad(LabelProblem::NotImagenetId));
                }
                Ok(LabelValue::Class(id.to_string()))
            }
            LabelKind::Category => {
                if raw.trim().is_empty() {
                    return Err(bad(LabelProblem::Empty));
                }
                Ok(LabelValue::Class(raw.trim().to_string()))
            }
            LabelKind::Numeric => {
                let v = match pylist::parse(raw.trim()) {
                    Ok(pylist::PyValue::Int(i)) => i as f64,
                    Ok(pylist::PyValue::Float(x)) => x,
                    _ => return Err(bad(LabelProblem::NotANumber)),
                };
                let v = match self.spec.transform.unwrap_or_default() {
                    NumericTransform::Identity => v,
                    NumericTransform::Log10 if v > 0.0 => v.log10(),
                    NumericTransform::Log10 => {
                        return Err(bad(LabelProblem::NotPositive));
                    }
                };
                let f = v as f32;
                if !f.is_finite() {
                    return Err(bad(LabelProblem::TooLarge));
                }
                Ok(LabelValue::Numeric(f))
            }
            LabelKind::Bool => match raw.trim() {
                "True" | "true" | "1" => Ok(LabelValue::Bool(true)),
                "False" | "false" | "0" => Ok(LabelValue::Bool(false)),
                _ => Err(bad(LabelProblem::NotABool)),
            },
        }
    }

    /// Assembles the labels of the rows, in row order. Values must come from [`Labeler::read`]
    /// of this labeler.
    ///
    /// Class lists: `class` and `category` use the distinct ids seen, sorted (so the ids present
    /// define the classes, e.g. 200 of ImageNet's 1,000 for SD_200); `bool` is always
    /// `[false, true]`; `multi_label` uses the vocabulary, or the sorted union of names seen.
    pub fn assemble(&self, values: &[LabelValue]) -> Result<Labels, AssembleError> {
        let wrong = |row: usize, v: &LabelValue, expected| AssembleError::WrongKind {
            row,
            label: v.to_string(),
            expected,
        };
        match self.spec.kind {
            LabelKind::MultiLabel => {
                let classes: Vec<String> = match &self.vocab {
                    Some(v) => v.clone(),
                    None => values
                        .iter()
                        .flat_map(|v| match v {
                            LabelValue::Multi(n) => n.as_slice(),
                            _ => &[],
                        })
                        .cloned()
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect(),
                };
                let index: HashMap<&str, usize> = classes
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.as_str(), i))
                    .collect();
                let width = classes.len();
                let mut targets = vec![0.0f32; values.len() * width];
                for (row, v) in values.iter().enumerate() {
                    let LabelValue::Multi(names) = v else {
                        return Err(wrong(row, v, "a multi-label value"));
                    };
                    for n in names {
                        let c = index
                            .get(n.as_str())
                            .ok_or_else(|| AssembleError::NotInVocab {
                                row,
                                name: n.clone(),
                            })?;
                        targets[row * width + c] = 1.0;
                    }
                }
                Ok(Labels::MultiLabel { classes, targets })
            }
            LabelKind::Class | LabelKind::Category => {
                let mut ids = Vec::with_capacity(values.len());
                for (row, v) in values.iter().enumerate() {
                    let LabelValue::Class(id) = v else {
                        return Err(wrong(row, v, "a class"));
                    };
                    ids.push(id.as_str());
                }
                let distinct: Vec<&str> = ids
                    .iter()
                    .copied()
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let index: HashMap<&str, u32> = distinct
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| (c, i as u32))
                    .collect();
                let classes = distinct
                    .iter()
                    .map(|&id| Class {
                        id: id.to_string(),
                        name: self.class_name(id),
                    })
                    .collect();
                let targets = ids.iter().map(|id| index[id]).collect();
                Ok(Labels::Class { classes, targets })
            }
            LabelKind::Bool => {
                let classes = ["false", "true"]
                    .iter()
                    .map(|s| Class {
                        id: s.to_string(),
                        name: s.to_string(),
                    })
                    .collect();
                let targets = values
                    .iter()
                    .enumerate()
                    .map(|(row, v)| match v {
                        LabelValue::Bool(b) => Ok(u32::from(*b)),
                        other => Err(wrong(row, other, "a boolean")),
                    })
                    .collect::<Result<_, _>>()?;
                Ok(Labels::Class { classes, targets })
            }
            LabelKind::Numeric => {
                let targets = values
                    .iter()
                    .enumerate()
                    .map(|(row, v)| match v {
                        LabelValue::Numeric(x) => Ok(*x),
                        other => Err(wrong(row, other, "a number")),
                    })
                    .collect::<Result<_, _>>()?;
                Ok(Labels::Numeric {
                    targets,
                    transform: self.spec.transform.unwrap_or_default().as_str().to_string(),
                })
            }
        }
    }

    fn class_name(&self, id: &str) -> String {
        match self.spec.names {
            Some(NameTable::Imagenet1k) => vocab::imagenet1k_by_wnid(id)
                .map(|s| s.name().to_string())
                .unwrap_or_else(|| id.to_string()),
            None => id.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn spec(toml_text: &str) -> LabelSpec {
        #[derive(Deserialize)]
        struct W {
            label: LabelSpec,
        }
        toml::from_str::<W>(toml_text).unwrap().label
    }

    #[test]
    fn multi_label_over_cifar100() {
        let l = Labeler::new(spec(
            r#"label = { key = "dataset_chosen_targets", kind = "multi_label", vocab = "cifar100" }"#,
        ))
        .unwrap();
        let rows = [
            meta(&[("dataset_chosen_targets", "['maple_tree', 'apple']")]),
            meta(&[("dataset_chosen_targets", "[\"worm\"]")]),
        ];
        let values: Vec<_> = rows.iter().map(|m| l.read(m).unwrap()).collect();
        let Labels::MultiLabel { classes, targets } = l.assemble(&values).unwrap() else {
            panic!("wrong kind")
        };
        assert_eq!(classes.len(), 100);
        let col = |n: &str| classes.iter().position(|c| c == n).unwrap();
        assert_eq!(col("apple"), 0);
        assert_eq!(col("worm"), 99);
        let ones: Vec<usize> = (0..200).filter(|&i| targets[i] == 1.0).collect();
        assert_eq!(ones, vec![0, col("maple_tree"), 100 + 99]);
        let e = l
            .read(&meta(&[("dataset_chosen_targets", "['apple', 'dragon']")]))
            .unwrap_err();
        assert!(
            matches!(&e, LabelError::Malformed { key, problem: LabelProblem::NotInVocabulary(n), .. }
                if key == "dataset_chosen_targets" && n == "dragon"),
            "{e}"
        );
    }

    #[test]
    fn class_through_imagenet_names() {
        let l = Labeler::new(spec(
            r#"label = { key = "imagenet_class_id", kind = "class", names = "imagenet1k" }"#,
        ))
        .unwrap();
        let values: Vec<_> = ["n02111277", "n01440764", "n02111277"]
            .iter()
            .map(|id| l.read(&meta(&[("imagenet_class_id", id)])).unwrap())
            .collect();
        let Labels::Class { classes, targets } = l.assemble(&values).unwrap() else {
            panic!("wrong kind")
        };
        assert_eq!(
            classes,
            vec![
                Class {
                    id: "n01440764".into(),
                    name: "tench".into()
                },
                Class {
                    id: "n02111277".into(),
                    name: "Newfoundland".into()
                },
            ]
        );
        assert_eq!(targets, vec![1, 0, 1]);
        let e = l
            .read(&meta(&[("imagenet_class_id", "n00000001")]))
            .unwrap_err();
        assert!(
            matches!(
                &e,
                LabelError::Malformed {
                    problem: LabelProblem::NotImagenetId,
                    ..
                }
            ) && e.to_string().contains("ImageNet-1k"),
            "{e}"
        );
    }

    #[test]
    fn category_numeric_and_bool() {
        let cat = Labeler::new(spec(
            r#"label = { key = "lr_scheduler", kind = "category" }"#,
        ))
        .unwrap();
        let v: Vec<_> = ["cosine", "linear", "cosine"]
            .iter()
            .map(|s| cat.read(&meta(&[("lr_scheduler", s)])).unwrap())
            .collect();
        let Labels::Class { classes, targets } = cat.assemble(&v).unwrap() else {
            panic!()
        };
        assert_eq!(
            classes.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            ["cosine", "linear"]
        );
        assert_eq!(targets, vec![0, 1, 0]);

        let num = Labeler::new(spec(
            r#"label = { key = "learning_rate", kind = "numeric", transform = "log10" }"#,
        ))
        .unwrap();
        let v: Vec<_> = ["0.001", "1e-4", "100"]
            .iter()
            .map(|s| num.read(&meta(&[("learning_rate", s)])).unwrap())
            .collect();
        let Labels::Numeric { targets, transform } = num.assemble(&v).unwrap() else {
            panic!()
        };
        assert_eq!(transform, "log10");
        for (t, want) in targets.iter().zip([-3.0f32, -4.0, 2.0]) {
            assert!((t - want).abs() < 1e-6, "{t} vs {want}");
        }
        assert!(matches!(
            num.read(&meta(&[("learning_rate", "-1")])),
            Err(LabelError::Malformed {
                problem: LabelProblem::NotPositive,
                ..
            })
        ));
        assert!(matches!(
            num.read(&meta(&[("learning_rate", "fast")])),
            Err(LabelError::Malformed {
                problem: LabelProblem::NotANumber,
                ..
            })
        ));

        let b = Labeler::new(spec(r#"label = { key = "random_flip", kind = "bool" }"#)).unwrap();
        let v: Vec<_> = ["True", "False", "true", "0"]
            .iter()
            .map(|s| b.read(&meta(&[("random_flip", s)])).unwrap())
            .collect();
        let Labels::Class { classes, targets } = b.assemble(&v).unwrap() else {
            panic!()
        };
        assert_eq!(
            classes.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            ["false", "true"]
        );
        assert_eq!(targets, vec![1, 0, 1, 0]);
        assert!(
            b.read(&meta(&[("random_flip", "maybe")]))
                .unwrap_err()
                .to_string()
                .contains("boolean")
        );
    }

    #[test]
    fn missing_key_lists_what_is_there() {
        let l = Labeler::new(LabelSpec::new("seed", LabelKind::Numeric)).unwrap();
        let e = l
            .read(&meta(&[("epochs", "3"), ("lr", "0.1")]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "metadata key `seed` is missing (keys present: epochs, lr)"
        );
        let many: Vec<(String, String)> =
            (0..15).map(|i| (format!("k{i:02}"), "1".into())).collect();
        let many: BTreeMap<String, String> = many.into_iter().collect();
        let e = l.read(&many).unwrap_err();
        assert!(
            matches!(&e, LabelError::Missing { present, more: 3, .. } if present.len() == 12),
            "{e}"
        );
        assert!(e.to_string().ends_with(", and 3 more)"), "{e}");
        let e = l.read(&BTreeMap::new()).unwrap_err();
        assert!(e.to_string().contains("no `__metadata__`"), "{e}");
    }

    #[test]
    fn specs_reject_unknown_and_misplaced_options() {
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct W {
            label: LabelSpec,
        }
        let e = toml::from_str::<W>(r#"label = { key = "a", kind = "class", colour = 1 }"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("colour"), "{e}");
        let e =
            toml::from_str::<W>(r#"label = { key = "a", kind = "multi_label", vocab = "mnist" }"#)
                .unwrap_err()
                .to_string();
        assert!(e.contains("mnist"), "{e}");
        let s = spec(r#"label = { key = "a", kind = "category", vocab = "cifar100" }"#);
        let e = Labeler::new(s).unwrap_err();
        assert_eq!(
            e,
            LabelSpecError::Misplaced {
                option: "vocab",
                applies_to: "multi_label",
                kind: "category"
            }
        );
        assert!(e.to_string().contains("vocab"), "{e}");
        let s = spec(r#"label = { key = "a", kind = "multi_label", vocab = ["x", "y", "x"] }"#);
        let e = Labeler::new(s).unwrap_err();
        assert_eq!(e, LabelSpecError::VocabTwice("x".into()));
        assert!(e.to_string().contains("twice"), "{e}");
        let s = spec(
            r#"label = { key = "a", kind = "class", names = "imagenet-1k", on_error = "skip" }"#,
        );
        assert_eq!(s.on_error, OnError::Skip);
        assert_eq!(s.names, Some(NameTable::Imagenet1k));
    }

    #[test]
    fn inferred_vocab_is_the_sorted_union() {
        let l = Labeler::new(LabelSpec::new("t", LabelKind::MultiLabel)).unwrap();
        let v: Vec<_> = ["['b', 'a']", "['c']"]
            .iter()
            .map(|s| l.read(&meta(&[("t", s)])).unwrap())
            .collect();
        let Labels::MultiLabel { classes, targets } = l.assemble(&v).unwrap() else {
            panic!()
        };
        assert_eq!(classes, ["a", "b", "c"]);
        assert_eq!(targets, vec![1.0, 1.0, 0.0, 0.0, 0.0, 1.0]);
    }
}
