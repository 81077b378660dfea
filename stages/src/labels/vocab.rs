//! Vocabularies compiled into probex (see `stages/data/README.md` for their origin and licence).

use std::collections::HashMap;
use std::sync::OnceLock;

const CIFAR100: &str = include_str!("../../data/cifar100.txt");
const IMAGENET1K: &str = include_str!("../../data/imagenet1k_synsets.tsv");

/// The 100 CIFAR-100 fine label names, sorted alphabetically: the label columns of Model-J's
/// `dataset_chosen_targets` (the official code sorts them the same way).
pub fn cifar100() -> Vec<String> {
    CIFAR100
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// One ImageNet-1k class: WordNet id and its WordNet lemmas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Synset {
    /// WordNet id, e.g. `n02111277`.
    pub wnid: &'static str,
    /// Lemmas, most common first, e.g. `["Newfoundland", "Newfoundland dog"]`.
    pub lemmas: Vec<&'static str>,
}

impl Synset {
    /// The class name used for labels and text prompts: the first lemma.
    pub fn name(&self) -> &'static str {
        self.lemmas.first().copied().unwrap_or(self.wnid)
    }
}

/// The 1,000 ImageNet-1k synsets in class-index order (sorted WordNet ids).
pub fn imagenet1k() -> &'static [Synset] {
    static TABLE: OnceLock<Vec<Synset>> = OnceLock::new();
    TABLE.get_or_init(|| {
        IMAGENET1K
            .lines()
            .filter_map(|l| {
                let (wnid, lemmas) = l.split_once('\t')?;
                Some(Synset {
                    wnid,
                    lemmas: lemmas.split(", ").collect(),
                })
            })
            .collect()
    })
}

/// Looks up an ImageNet-1k synset by WordNet id.
pub fn imagenet1k_by_wnid(wnid: &str) -> Option<&'static Synset> {
    static INDEX: OnceLock<HashMap<&'static str, usize>> = OnceLock::new();
    let index = INDEX.get_or_init(|| {
        imagenet1k()
            .iter()
            .enumerate()
            .map(|(i, s)| (s.wnid, i))
            .collect()
    });
    index.get(wnid).map(|&i| &imagenet1k()[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cifar100_is_100_sorted_unique_names() {
        let v = cifar100();
        assert_eq!(v.len(), 100);
        assert!(v.windows(2).all(|w| w[0] < w[1]));
        assert!(v.contains(&"maple_tree".to_string()));
    }

    #[test]
    fn imagenet_table_has_1000_sorted_synsets() {
        let t = imagenet1k();
        assert_eq!(t.len(), 1000);
        assert!(t.windows(2).all(|w| w[0].wnid < w[1].wnid));
        assert!(
            t.iter()
                .all(|s| s.wnid.len() == 9 && s.wnid.starts_with('n'))
        );
        assert_eq!(
            imagenet1k_by_wnid("n02111277").unwrap().name(),
            "Newfoundland"
        );
        assert_eq!(t[0].name(), "tench");
        assert!(imagenet1k_by_wnid("n99999999").is_none());
    }
}
