//! Vocabularies compiled into probex (see `weights/data/README.md` for their origin and licence).

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

/// Class names of the authors' ImageNet table (`tiny_imagenet_id2class` in their `utils.py`,
/// which names every LoRA's class for its CLIP prompt) where it is not the first lemma.
///
/// Their table is the first lemma everywhere except here: four synsets share two first lemmas
/// (`crane`: the bird and the machine; `maillot`: a dancer's tights and a swimsuit), and the
/// authors renamed three of them so that each prompt names one thing. Taking the first lemma
/// there would embed "a photo of a crane" for two different classes, and not the text the
/// paper's probes were trained against. `n03710637` keeps `maillot` in their table; it is listed
/// so that all four synsets of the two shared lemmas are decided here, in one place.
pub const AUTHORS_NAMES: [(&str, &str); 4] = [
    ("n02012849", "crane, bird"),
    ("n03126707", "construction crane"),
    ("n03710637", "maillot"),
    ("n03710721", "maillot, tank suit"),
];

impl Synset {
    /// The class name used for labels and text prompts: the authors' name, which is the first
    /// lemma except for the synsets in [`AUTHORS_NAMES`].
    pub fn name(&self) -> &'static str {
        AUTHORS_NAMES
            .iter()
            .find(|(wnid, _)| *wnid == self.wnid)
            .map(|&(_, name)| name)
            .or_else(|| self.lemmas.first().copied())
            .unwrap_or(self.wnid)
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

    /// The four synsets whose first lemmas coincide get the authors' names (checked by hand
    /// against their `tiny_imagenet_id2class`); every other class keeps its first lemma.
    #[test]
    fn imagenet_names_follow_the_authors_table() {
        let name = |wnid| imagenet1k_by_wnid(wnid).unwrap().name();
        assert_eq!(name("n02012849"), "crane, bird");
        assert_eq!(name("n03126707"), "construction crane");
        assert_eq!(name("n03710637"), "maillot");
        assert_eq!(name("n03710721"), "maillot, tank suit");
        // The first lemmas these replace, so that a changed table cannot go unnoticed.
        assert_eq!(imagenet1k_by_wnid("n02012849").unwrap().lemmas, ["crane"]);
        assert_eq!(imagenet1k_by_wnid("n03126707").unwrap().lemmas, ["crane"]);
        assert_eq!(
            imagenet1k_by_wnid("n03710721").unwrap().lemmas,
            ["maillot", "tank suit"]
        );
        // The authors' table names each of the 1,000 classes differently: with it, no two
        // prompts coincide.
        let names: std::collections::BTreeSet<&str> =
            imagenet1k().iter().map(Synset::name).collect();
        assert_eq!(names.len(), 1000);
        // Elsewhere it is the first lemma (with spaces; prompts turn underscores into spaces).
        assert_eq!(name("n02111277"), "Newfoundland");
        assert_eq!(name("n04356056"), "sunglasses");
        let overridden = imagenet1k()
            .iter()
            .filter(|s| Some(&s.name()) != s.lemmas.first())
            .count();
        assert_eq!(overridden, 3);
    }
}
