//! The 100 CIFAR-100 class names and the shipped table that maps them to emoji.
//!
//! Model-J labels a model with the CIFAR-100 classes it was fine-tuned on; the zoo names its
//! emoji classes the same way, so `dataset_chosen_targets` and the multi-hot over the 100 sorted
//! names mean exactly what they mean on real Model-J files. The table
//! (`zoo/data/cifar100_emoji.tsv`) is data, not code: 55 names are emoji short names, 29 are
//! hand-chosen aliases, 16 have no emoji.

/// The 100 CIFAR-100 fine label names, sorted alphabetically (the label column order).
pub const CIFAR100: [&str; 100] = [
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
];

/// The shipped mapping table, verbatim.
pub const MAPPING_TSV: &str = include_str!("../data/cifar100_emoji.tsv");

/// How a CIFAR-100 name was matched to an emoji.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match {
    /// The name is one of the emoji's short names.
    Exact,
    /// Chosen by hand: the emoji depicts the class or its closest kind.
    Alias,
}

/// One mapped class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassMapping {
    /// CIFAR-100 name (`maple_tree`).
    pub cifar: &'static str,
    /// Emoji short name in emoji-datasource (`deciduous_tree`).
    pub short_name: &'static str,
    /// Emoji code points as emoji-datasource spells them (`1F333`).
    pub unified: &'static str,
    /// Exact or alias.
    pub matched: Match,
}

/// A malformed line of the shipped CIFAR-100 to emoji table (a build defect).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cifar100_emoji.tsv line {line}: {problem}")]
pub struct MappingError {
    /// The line (1-based).
    pub line: usize,
    /// What is wrong with it.
    pub problem: String,
}

/// Parses the shipped table: the mapped classes in sorted CIFAR order. The table is checked by
/// the tests, so a malformed line here is a build defect, reported as an error all the same.
pub fn mapping() -> Result<Vec<ClassMapping>, MappingError> {
    let mut out = Vec::new();
    for (n, line) in MAPPING_TSV.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let cols: Vec<&'static str> = line.split('\t').collect();
        let [cifar, short_name, unified, matched] = cols.as_slice() else {
            return Err(MappingError {
                line: n + 1,
                problem: "expected 4 tab-separated columns".into(),
            });
        };
        if !CIFAR100.contains(cifar) {
            return Err(MappingError {
                line: n + 1,
                problem: format!("`{cifar}` is not a CIFAR-100 name"),
            });
        }
        let matched = match *matched {
            "exact" => Match::Exact,
            "alias" => Match::Alias,
            "none" => continue,
            other => {
                return Err(MappingError {
                    line: n + 1,
                    problem: format!("unknown match kind `{other}`"),
                });
            }
        };
        out.push(ClassMapping {
            cifar,
            short_name,
            unified,
            matched,
        });
    }
    Ok(out)
}

/// Column of a CIFAR-100 name in the multi-hot label (its index in [`CIFAR100`]).
pub fn cifar_index(name: &str) -> Option<usize> {
    CIFAR100.binary_search(&name).ok()
}

/// Formats class names as a Python list literal (`['apple', 'maple_tree']`), the form Model-J
/// stores in `dataset_chosen_targets`.
pub fn python_list(names: &[&str]) -> String {
    let quoted: Vec<String> = names
        .iter()
        .map(|n| format!("'{}'", n.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect();
    format!("[{}]", quoted.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn cifar_names_are_sorted_and_unique() {
        assert!(CIFAR100.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(cifar_index("apple"), Some(0));
        assert_eq!(cifar_index("worm"), Some(99));
        assert_eq!(cifar_index("maple_tree"), Some(47));
        assert_eq!(cifar_index("dog"), None);
    }

    #[test]
    fn mapping_table_is_complete_and_consistent() {
        let data_lines: Vec<&str> = MAPPING_TSV
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .collect();
        // Every CIFAR name has exactly one row, in order.
        let names: Vec<&str> = data_lines
            .iter()
            .map(|l| l.split('\t').next().unwrap_or(""))
            .collect();
        assert_eq!(names, CIFAR100.to_vec());
        let m = mapping().unwrap();
        let exact: Vec<_> = m.iter().filter(|c| c.matched == Match::Exact).collect();
        let alias: Vec<_> = m.iter().filter(|c| c.matched == Match::Alias).collect();
        assert_eq!((exact.len(), alias.len()), (55, 29));
        // Exact rows name the emoji by the CIFAR name itself, which is one of the emoji's short
        // names (for `telephone` the second one, after `phone`).
        for c in &exact {
            assert_eq!(c.cifar, c.short_name, "{c:?}");
        }
        for c in &alias {
            assert_ne!(c.cifar, c.short_name, "{c:?}");
        }
        // No emoji serves two classes (two classes would share their images).
        let unified: BTreeSet<_> = m.iter().map(|c| c.unified).collect();
        let shorts: BTreeSet<_> = m.iter().map(|c| c.short_name).collect();
        assert_eq!(unified.len(), m.len());
        assert_eq!(shorts.len(), m.len());
        for c in &m {
            assert!(
                c.unified.split('-').all(|p| p.len() >= 4
                    && p.chars()
                        .all(|ch| ch.is_ascii_hexdigit() && !ch.is_lowercase())),
                "{c:?}"
            );
        }
    }

    #[test]
    fn python_list_literals_match_model_j() {
        assert_eq!(
            python_list(&["apple", "maple_tree"]),
            "['apple', 'maple_tree']"
        );
        assert_eq!(python_list(&[]), "[]");
    }
}
