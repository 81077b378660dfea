//! The evaluate metrics against values computed independently by scikit-learn on the same
//! numbers (`golden/metrics.json`, made by `golden/make_golden.py`).
//!
//! Tolerances: 1e-12 for results that are sums and ratios of the inputs (AUC, accuracies,
//! distances, the covariance), 1e-9 relative where a matrix inverse amplifies summation-order
//! rounding (precision, Mahalanobis distances).

use std::collections::BTreeMap;

use probex_stages::evaluate::{
    Encodings, OneClassMethod, Predictions, Targets, TieBreak, knn_classify, ledoit_wolf,
    multilabel_accuracy, one_class_auc, predict_by_cosine, retrieval_top_k, roc_auc, top1_accuracy,
    top1_by_cosine,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    roc_auc: Vec<RocCase>,
    ledoit_wolf: Vec<LwCase>,
    single_label: Downstream,
    multi_label: Downstream,
    retrieval: Retrieval,
    accuracy: Accuracy,
}

#[derive(Deserialize)]
struct RocCase {
    name: String,
    scores: Vec<f64>,
    positives: Vec<bool>,
    auc: f64,
}

#[derive(Deserialize)]
struct LwCase {
    name: String,
    n: usize,
    d: usize,
    x: Vec<f64>,
    queries: Vec<f64>,
    location: Vec<f64>,
    covariance: Vec<f64>,
    shrinkage: f64,
    precision: Vec<f64>,
    mahalanobis: Vec<f64>,
}

#[derive(Deserialize)]
struct Occ {
    per_class: BTreeMap<String, f64>,
    mean: f64,
}

#[derive(Deserialize)]
struct Downstream {
    d: usize,
    classes: usize,
    train: Vec<f64>,
    test: Vec<f64>,
    #[serde(default)]
    train_labels: Vec<u32>,
    #[serde(default)]
    test_labels: Vec<u32>,
    #[serde(default)]
    train_hot: Vec<f64>,
    #[serde(default)]
    test_hot: Vec<f64>,
    occ_knn: Occ,
    occ_ledoit: Occ,
    knn_predictions: Vec<f64>,
    knn_accuracy: f64,
}

#[derive(Deserialize)]
struct Retrieval {
    d: usize,
    pool: Vec<f64>,
    queries: Vec<usize>,
    k: usize,
    neighbours: Vec<Vec<usize>>,
    distances: Vec<Vec<f64>>,
}

#[derive(Deserialize)]
struct Accuracy {
    logits: Vec<f64>,
    classes: usize,
    targets: Vec<f64>,
    labels: Vec<u32>,
    multilabel: f64,
    top1: f64,
    enc: Vec<f64>,
    class_vecs: Vec<f64>,
    cos_d: usize,
    cos_labels: Vec<u32>,
    cos_predictions: Vec<u32>,
    cos_top1: f64,
}

fn golden() -> Golden {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/metrics.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {path}: {e}"))
}

/// The golden inputs are float32 values written as float64, so this cast is exact.
fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn close(got: f64, want: f64, rel: f64, what: &str) {
    let tol = rel * want.abs().max(1.0);
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got}, want {want} (tolerance {tol})"
    );
}

fn all_close(got: &[f64], want: &[f64], rel: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        close(*g, *w, rel, &format!("{what}[{i}]"));
    }
}

#[test]
fn roc_auc_matches_sklearn() {
    for c in golden().roc_auc {
        let got = roc_auc(&c.scores, &c.positives).unwrap();
        close(got, c.auc, 1e-12, &c.name);
    }
}

#[test]
fn ledoit_wolf_matches_sklearn() {
    for c in golden().ledoit_wolf {
        let lw = ledoit_wolf(&c.x, c.n, c.d).unwrap();
        close(
            lw.shrinkage,
            c.shrinkage,
            1e-12,
            &format!("{} shrinkage", c.name),
        );
        all_close(
            &lw.location,
            &c.location,
            1e-12,
            &format!("{} location", c.name),
        );
        all_close(
            &lw.covariance,
            &c.covariance,
            1e-12,
            &format!("{} covariance", c.name),
        );
        all_close(
            &lw.precision,
            &c.precision,
            1e-9,
            &format!("{} precision", c.name),
        );
        let q = f32s(&c.queries);
        let m: Vec<f64> = q.chunks(c.d).map(|row| lw.mahalanobis(row)).collect();
        all_close(&m, &c.mahalanobis, 1e-9, &format!("{} mahalanobis", c.name));
    }
}

fn check_occ(got: &probex_stages::evaluate::OneClassResult, want: &Occ, what: &str) {
    let got_map: BTreeMap<String, f64> = got
        .per_class
        .iter()
        .map(|c| (c.class.to_string(), c.auc))
        .collect();
    assert_eq!(
        got_map.keys().collect::<Vec<_>>(),
        want.per_class.keys().collect::<Vec<_>>(),
        "{what}: evaluated classes"
    );
    for (k, w) in &want.per_class {
        close(got_map[k], *w, 1e-12, &format!("{what} class {k}"));
    }
    close(got.mean.unwrap(), want.mean, 1e-12, &format!("{what} mean"));
}

#[test]
fn one_class_and_knn_single_label_match_sklearn() {
    let g = golden().single_label;
    let (train, test) = (f32s(&g.train), f32s(&g.test));
    let train = Encodings::new(&train, g.d).unwrap();
    let test = Encodings::new(&test, g.d).unwrap();
    let tt = Targets::Single {
        labels: &g.train_labels,
        classes: g.classes,
    };
    let st = Targets::Single {
        labels: &g.test_labels,
        classes: g.classes,
    };
    let knn = one_class_auc(train, tt, test, st, OneClassMethod::Knn { k: 2 }).unwrap();
    check_occ(&knn, &g.occ_knn, "single-label occ kNN");
    // Class 4 has train models but no test models: skipped, as the official code does.
    assert_eq!(knn.skipped.iter().map(|s| s.0).collect::<Vec<_>>(), vec![4]);
    let lw = one_class_auc(train, tt, test, st, OneClassMethod::LedoitWolf).unwrap();
    check_occ(&lw, &g.occ_ledoit, "single-label occ Ledoit-Wolf");

    let r = knn_classify(train, tt, test, st, 2, TieBreak::LowestLabel).unwrap();
    let want: Vec<u32> = g.knn_predictions.iter().map(|&v| v as u32).collect();
    assert_eq!(r.predictions, Predictions::Single(want));
    close(r.accuracy, g.knn_accuracy, 1e-12, "kNN accuracy");
}

#[test]
fn one_class_and_knn_multi_label_match_sklearn() {
    let g = golden().multi_label;
    let (train, test) = (f32s(&g.train), f32s(&g.test));
    let (train_hot, test_hot) = (f32s(&g.train_hot), f32s(&g.test_hot));
    let train = Encodings::new(&train, g.d).unwrap();
    let test = Encodings::new(&test, g.d).unwrap();
    let tt = Targets::Multi {
        hot: &train_hot,
        classes: g.classes,
    };
    let st = Targets::Multi {
        hot: &test_hot,
        classes: g.classes,
    };
    let knn = one_class_auc(train, tt, test, st, OneClassMethod::Knn { k: 2 }).unwrap();
    check_occ(&knn, &g.occ_knn, "multi-label occ kNN");
    let lw = one_class_auc(train, tt, test, st, OneClassMethod::LedoitWolf).unwrap();
    check_occ(&lw, &g.occ_ledoit, "multi-label occ Ledoit-Wolf");

    let r = knn_classify(train, tt, test, st, 2, TieBreak::LowestLabel).unwrap();
    assert_eq!(r.predictions, Predictions::Multi(f32s(&g.knn_predictions)));
    close(
        r.accuracy,
        g.knn_accuracy,
        1e-12,
        "multi-label kNN accuracy",
    );
}

#[test]
fn retrieval_matches_sklearn() {
    let g = golden().retrieval;
    let pool = f32s(&g.pool);
    let pool = Encodings::new(&pool, g.d).unwrap();
    let res = retrieval_top_k(pool, &g.queries, g.k).unwrap();
    for (i, nb) in res.iter().enumerate() {
        let idx: Vec<usize> = nb.iter().map(|n| n.index).collect();
        assert_eq!(idx, g.neighbours[i], "query {}", g.queries[i]);
        let dist: Vec<f64> = nb.iter().map(|n| n.distance).collect();
        all_close(
            &dist,
            &g.distances[i],
            1e-12,
            &format!("query {} distances", g.queries[i]),
        );
    }
}

#[test]
fn accuracies_match_sklearn() {
    let g = golden().accuracy;
    let logits = f32s(&g.logits);
    close(
        multilabel_accuracy(&logits, &f32s(&g.targets)).unwrap(),
        g.multilabel,
        1e-12,
        "multilabel",
    );
    close(
        top1_accuracy(&logits, g.classes, &g.labels).unwrap(),
        g.top1,
        1e-12,
        "top1",
    );
    let (enc, vecs) = (f32s(&g.enc), f32s(&g.class_vecs));
    assert_eq!(
        predict_by_cosine(&enc, &vecs, g.cos_d).unwrap(),
        g.cos_predictions
    );
    close(
        top1_by_cosine(&enc, &vecs, g.cos_d, &g.cos_labels).unwrap(),
        g.cos_top1,
        1e-12,
        "cosine top1",
    );
}
