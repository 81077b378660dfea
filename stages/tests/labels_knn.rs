//! Labels and the kNN classifier together: class ids follow the raw keys' string order, so
//! kNN ties fall as the authors' `np.unique` makes them fall.

use probex_stages::evaluate::{Encodings, Predictions, Targets, TieBreak, knn_classify};
use probex_weights::dataset::Labels;
use probex_weights::labels::{LabelSpec, Labeler};

/// A label spec from one inline TOML table, as an experiment file writes it.
fn label_spec(toml_text: &str) -> LabelSpec {
    #[derive(serde::Deserialize)]
    struct W {
        label: LabelSpec,
    }
    toml::from_str::<W>(toml_text).unwrap().label
}

/// The authors' kNN (downstream_generative.py) votes over raw class keys and breaks ties
/// with `np.unique` (sorted keys) and `argmax` (the first): the key that sorts first as a
/// string wins. probex breaks ties to the lowest class id, which is the same rule only
/// because class ids follow the keys' string order (not numeric, not by name): hand-made
/// ties between `a9` and `a10` (Python: `sorted(['a9', 'a10']) == ['a10', 'a9']`) and
/// between `b` and `B` (`'B' < 'b'`) go to `a10` and `B`.
#[test]
fn class_ids_sort_as_the_raw_keys_so_knn_ties_fall_as_in_np_unique() {
    let l = Labeler::new(label_spec(r#"label = { key = "x", kind = "category" }"#)).unwrap();
    let keys = ["a9", "b", "a10", "B"];
    let values: Vec<_> = keys
        .iter()
        .map(|k| l.read(&[("x".to_string(), k.to_string())].into()).unwrap())
        .collect();
    let Labels::Class { classes, targets } = l.assemble(&values).unwrap() else {
        panic!("wrong kind")
    };
    let ids: Vec<&str> = classes.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["B", "a10", "a9", "b"], "Python's sorted() order");
    // Train rows on a line: a9 at 1, a10 at -1 (both 1 from the query at 0), b at 11, B at
    // 9 (both 1 from the query at 10). Each query's two neighbours tie one vote each.
    let train = [1.0, 11.0, -1.0, 9.0];
    let queries = [0.0, 10.0];
    let truth = [0u32, 0];
    let knn = knn_classify(
        Encodings::new(&train, 1).unwrap(),
        Targets::Single {
            labels: &targets,
            classes: classes.len(),
        },
        Encodings::new(&queries, 1).unwrap(),
        Targets::Single {
            labels: &truth,
            classes: classes.len(),
        },
        2,
        TieBreak::LowestLabel,
    )
    .unwrap();
    let Predictions::Single(pred) = knn.predictions else {
        panic!("single-class predictions")
    };
    let won: Vec<&str> = pred.iter().map(|&p| ids[p as usize]).collect();
    assert_eq!(won, ["a10", "B"]);
}
