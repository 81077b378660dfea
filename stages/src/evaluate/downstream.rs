//! The downstream tasks on probe encodings, as the official `downstream_generative.py` runs them:
//! the train split is the reference set, the test split the queries.
//!
//! - one-class classification: for each class, score test models by their distance to that
//!   class's train encodings (mean squared L2 distance to the k nearest, or the squared
//!   Ledoit-Wolf Mahalanobis distance); anomalies (other classes) are the positives of a
//!   ROC-AUC; the AUCs are averaged over classes;
//! - kNN classification: majority vote of the k nearest train encodings;
//! - retrieval: the k nearest models of a query model.
//!
//! Distances are squared Euclidean, as FAISS `IndexFlatL2` (used by the official code) returns
//! them; neighbours are ordered by (distance, row index), so results are deterministic.

use rayon::prelude::*;

use super::EvalError;
use super::linalg::matmul;
use super::metrics::{ledoit_wolf, roc_auc};
use crate::csv::csv_record;

/// A row-major `[n, d]` matrix of encodings, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct Encodings<'a> {
    data: &'a [f32],
    n: usize,
    d: usize,
}

impl<'a> Encodings<'a> {
    /// Views `data` as rows of `d` values; errors unless `d > 0` and `d` divides the length.
    pub fn new(data: &'a [f32], d: usize) -> Result<Self, EvalError> {
        if d == 0 || !data.len().is_multiple_of(d) {
            return Err(EvalError::Input(format!(
                "encodings: {} values are not whole rows of d={d}",
                data.len()
            )));
        }
        Ok(Encodings {
            data,
            n: data.len() / d,
            d,
        })
    }

    /// Number of rows (models).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Width of a row (encoding dimension).
    pub fn d(&self) -> usize {
        self.d
    }

    /// Row `i`; panics if out of range, like slice indexing (callers iterate `0..n()`).
    pub fn row(&self, i: usize) -> &'a [f32] {
        &self.data[i * self.d..(i + 1) * self.d]
    }
}

/// Class labels of the rows of an [`Encodings`]: one class per model, or a multi-hot row per
/// model (Model-J's CIFAR-100 targets). "Member of class c" means `label == c` for the former
/// and `hot[c] > 0.5` for the latter.
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a> {
    /// One class id per row, each below `classes`.
    Single {
        /// Class id per row.
        labels: &'a [u32],
        /// Number of classes.
        classes: usize,
    },
    /// Row-major multi-hot `[n, classes]`, each 0.0 or 1.0.
    Multi {
        /// The multi-hot rows.
        hot: &'a [f32],
        /// Number of classes (columns).
        classes: usize,
    },
}

impl Targets<'_> {
    /// Number of classes.
    pub fn classes(&self) -> usize {
        match *self {
            Targets::Single { classes, .. } | Targets::Multi { classes, .. } => classes,
        }
    }

    /// Number of labelled rows.
    pub fn n(&self) -> usize {
        match *self {
            Targets::Single { labels, .. } => labels.len(),
            Targets::Multi { hot, classes } => hot.len().checked_div(classes).unwrap_or(0),
        }
    }

    /// Whether row `i` belongs to class `c` (false for a row or class out of range).
    pub fn is_member(&self, i: usize, c: usize) -> bool {
        match *self {
            Targets::Single { labels, .. } => labels.get(i).is_some_and(|&y| y as usize == c),
            Targets::Multi { hot, classes } => {
                c < classes && hot.get(i * classes + c).is_some_and(|&v| v > 0.5)
            }
        }
    }

    /// Checks the labels against the encodings they describe; `what` names them in errors.
    fn check(&self, enc: &Encodings, what: &str) -> Result<(), EvalError> {
        match *self {
            Targets::Single { labels, classes } => {
                if let Some((i, &y)) = labels
                    .iter()
                    .enumerate()
                    .find(|(_, y)| **y as usize >= classes)
                {
                    return Err(EvalError::Input(format!(
                        "{what} labels: row {i} has class {y}, but there are only {classes} classes"
                    )));
                }
            }
            Targets::Multi { hot, classes } => {
                if classes == 0 || !hot.len().is_multiple_of(classes) {
                    return Err(EvalError::Input(format!(
                        "{what} multi-hot targets: {} values are not whole rows of {classes} classes",
                        hot.len()
                    )));
                }
            }
        }
        if self.n() != enc.n() {
            return Err(EvalError::Shape {
                what: format!("{what}: number of label rows (one per encoding)"),
                expected: enc.n(),
                got: self.n(),
            });
        }
        Ok(())
    }
}

/// One neighbour of a query: the row in the reference set and its squared L2 distance.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Neighbour {
    /// Row index in the reference (or pool) encodings.
    pub index: usize,
    /// Squared Euclidean distance to the query.
    pub distance: f64,
}

/// Rows converted to `f64` once, with their squared norms: what every distance computation
/// needs, shared across classes and query blocks.
struct Prepared {
    x: Vec<f64>,
    norms: Vec<f64>,
    n: usize,
    d: usize,
}

impl Prepared {
    fn new(e: &Encodings) -> Self {
        Self::from_f64(e.data.iter().map(|&v| v as f64).collect(), e.d)
    }

    fn from_f64(x: Vec<f64>, d: usize) -> Self {
        let norms = x
            .chunks_exact(d)
            .map(|r| r.iter().map(|v| v * v).sum())
            .collect();
        Prepared {
            n: x.len() / d,
            x,
            norms,
            d,
        }
    }

    /// The listed rows only.
    fn subset(&self, rows: &[usize]) -> Self {
        let d = self.d;
        let x = rows
            .iter()
            .flat_map(|&i| self.x[i * d..(i + 1) * d].iter().copied())
            .collect();
        Prepared {
            x,
            norms: rows.iter().map(|&i| self.norms[i]).collect(),
            n: rows.len(),
            d,
        }
    }

    fn row(&self, i: usize) -> &[f64] {
        &self.x[i * self.d..(i + 1) * self.d]
    }
}

/// Exact squared distance, summed in f64 in index order (so equal inputs give equal distances).
fn sq_dist(a: &[f64], b: &[f64]) -> f64 {
    let mut s = 0.0;
    for (x, y) in a.iter().zip(b) {
        let t = x - y;
        s += t * t;
    }
    s
}

fn by_distance_then_index(a: &Neighbour, b: &Neighbour) -> std::cmp::Ordering {
    a.distance
        .total_cmp(&b.distance)
        .then(a.index.cmp(&b.index))
}

/// The `k` nearest `reference` rows of each query row, ordered by (exact squared distance,
/// index). With `exclude`, query `a` never gets reference row `exclude[a]` (its own row, when a
/// pool is searched by its own members).
///
/// Candidates come from `|q|^2 + |r|^2 - 2 q.r` with the products as one matrix multiplication
/// per block of queries; every candidate within a rounding margin of the k-th is then rescored
/// exactly, so the result is the exact k nearest, ties included, at matrix-product speed.
fn k_nearest(
    reference: &Prepared,
    queries: &Prepared,
    k: usize,
    exclude: Option<&[usize]>,
) -> Vec<Vec<Neighbour>> {
    let (d, n_ref) = (reference.d, reference.n);
    let rn_max = reference.norms.iter().fold(0.0f64, |m, &v| m.max(v));
    // Blocks keep the product buffer near 16 MB whatever the reference size.
    let block = ((1usize << 21) / n_ref.max(1)).clamp(1, 1024);
    let rows: Vec<usize> = (0..queries.n).collect();
    let per_block: Vec<Vec<Vec<Neighbour>>> = rows
        .par_chunks(block)
        .map(|qs| {
            let (first, m) = (qs[0], qs.len());
            let q64 = &queries.x[first * d..(first + m) * d];
            let g = matmul(q64, false, &reference.x, true, m, d, n_ref);
            let mut kbest: Vec<f64> = Vec::with_capacity(k + 1);
            qs.iter()
                .map(|&q| {
                    let qn = queries.norms[q];
                    let g_row = &g[(q - first) * n_ref..(q - first + 1) * n_ref];
                    let approx = |i: usize| qn + reference.norms[i] - 2.0 * g_row[i];
                    let skip = exclude.map_or(usize::MAX, |e| e[q]);
                    // Pass 1: the k smallest approximate distances (a small sorted buffer).
                    kbest.clear();
                    for i in (0..n_ref).filter(|&i| i != skip) {
                        let v = approx(i);
                        if kbest.len() < k || v < kbest[kbest.len() - 1] {
                            let at = kbest.partition_point(|&b| b <= v);
                            kbest.insert(at, v);
                            kbest.truncate(k);
                        }
                    }
                    let Some(&kth) = kbest.last() else {
                        return Vec::new();
                    };
                    // Pass 2: everything within the Gram form's rounding (about
                    // d * eps * (|q|^2 + |r|^2); 1e-9 is a wide margin) of the k-th, rescored.
                    let threshold = kth + 1e-9 * (qn + rn_max);
                    let mut cand: Vec<Neighbour> = (0..n_ref)
                        .filter(|&i| i != skip && approx(i) <= threshold)
                        .map(|i| Neighbour {
                            index: i,
                            distance: sq_dist(reference.row(i), queries.row(q)),
                        })
                        .collect();
                    cand.sort_by(by_distance_then_index);
                    cand.truncate(k);
                    cand
                })
                .collect()
        })
        .collect();
    per_block.into_iter().flatten().collect()
}

/// Mean distance of each query to its (up to) `k` nearest reference rows.
fn mean_knn_distance(reference: &Prepared, queries: &Prepared, k: usize) -> Vec<f64> {
    k_nearest(reference, queries, k, None)
        .into_iter()
        .map(|nb| nb.iter().map(|x| x.distance).sum::<f64>() / nb.len().max(1) as f64)
        .collect()
}

fn check_dims(a: &Encodings, b: &Encodings, what: &str) -> Result<(), EvalError> {
    if a.d() != b.d() {
        return Err(EvalError::Shape {
            what: format!("{what}: encoding width of the queries (must match the reference)"),
            expected: a.d(),
            got: b.d(),
        });
    }
    Ok(())
}

fn check_finite(e: &Encodings, what: &str) -> Result<(), EvalError> {
    if e.data.iter().any(|v| !v.is_finite()) {
        return Err(EvalError::NaN(format!(
            "{what} encodings (NaN or infinite values)"
        )));
    }
    Ok(())
}

/// For each query row, its `k` nearest `reference` rows (fewer when the reference is smaller),
/// ordered by (squared distance, index).
pub fn nearest(
    reference: Encodings,
    queries: Encodings,
    k: usize,
) -> Result<Vec<Vec<Neighbour>>, EvalError> {
    check_dims(&reference, &queries, "nearest")?;
    if k == 0 {
        return Err(EvalError::Param("k must be at least 1".into()));
    }
    check_finite(&reference, "reference")?;
    check_finite(&queries, "query")?;
    Ok(k_nearest(
        &Prepared::new(&reference),
        &Prepared::new(&queries),
        k,
        None,
    ))
}

/// kNN anomaly score of each query: the mean squared distance to its `k` nearest `reference`
/// rows (all of them when the reference has fewer than `k`), as the official `knn_anomaly_score`.
pub fn knn_scores(
    reference: Encodings,
    queries: Encodings,
    k: usize,
) -> Result<Vec<f64>, EvalError> {
    if reference.n() == 0 {
        return Err(EvalError::Undefined(
            "kNN score against an empty reference set".into(),
        ));
    }
    check_dims(&reference, &queries, "knn_scores")?;
    if k == 0 {
        return Err(EvalError::Param("k must be at least 1".into()));
    }
    check_finite(&reference, "reference")?;
    check_finite(&queries, "query")?;
    Ok(mean_knn_distance(
        &Prepared::new(&reference),
        &Prepared::new(&queries),
        k,
    ))
}

/// Squared Mahalanobis distance of each query to a Ledoit-Wolf Gaussian fitted on `reference`
/// (`LedoitWolf().fit(reference).mahalanobis(queries)` in scikit-learn).
pub fn mahalanobis_scores(reference: Encodings, queries: Encodings) -> Result<Vec<f64>, EvalError> {
    check_dims(&reference, &queries, "mahalanobis_scores")?;
    let r = Prepared::new(&reference);
    let lw = ledoit_wolf(&r.x, r.n, r.d)?;
    lw.mahalanobis_rows(queries.data)
}

/// How one-class classification scores a test model against a class's train models.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OneClassMethod {
    /// Mean squared L2 distance to the `k` nearest train encodings of the class (paper: k = 2).
    Knn {
        /// Number of neighbours.
        k: usize,
    },
    /// Squared Mahalanobis distance under a Ledoit-Wolf Gaussian of the class's train encodings.
    LedoitWolf,
}

impl OneClassMethod {
    /// Short name for reports and CSV columns (`occ_knn`, `occ_ledoit`).
    pub fn name(&self) -> &'static str {
        match self {
            OneClassMethod::Knn { .. } => "occ_knn",
            OneClassMethod::LedoitWolf => "occ_ledoit",
        }
    }
}

/// A class either evaluated or skipped with a reason.
type ClassOutcome = Result<ClassAuc, (usize, String)>;

/// ROC-AUC of one class in one-class classification.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassAuc {
    /// Class id (column of the targets).
    pub class: usize,
    /// ROC-AUC with anomalies (test models outside the class) as positives.
    pub auc: f64,
    /// Train models of the class (the reference set).
    pub train: usize,
    /// Test models of the class (normal queries).
    pub normal: usize,
    /// Test models outside the class (anomalous queries).
    pub anomalous: usize,
}

/// Result of [`one_class_auc`]: per-class AUCs, their mean, and the classes left out and why.
#[derive(Clone, Debug, PartialEq)]
pub struct OneClassResult {
    /// Evaluated classes, ascending.
    pub per_class: Vec<ClassAuc>,
    /// Mean AUC over `per_class`; `None` when no class could be evaluated.
    pub mean: Option<f64>,
    /// Classes not evaluated: (class id, reason).
    pub skipped: Vec<(usize, String)>,
}

impl OneClassResult {
    /// The per-class table as CSV (`class,auc,train,normal,anomalous`), with `names` (by class
    /// id) used for the class column when given.
    pub fn csv(&self, names: Option<&[String]>) -> String {
        let mut out = csv_record(&["class", "auc", "train", "normal", "anomalous"]);
        for c in &self.per_class {
            let name = names
                .and_then(|n| n.get(c.class))
                .cloned()
                .unwrap_or_else(|| c.class.to_string());
            out.push_str(&csv_record(&[
                &name,
                &c.auc.to_string(),
                &c.train.to_string(),
                &c.normal.to_string(),
                &c.anomalous.to_string(),
            ]));
        }
        out
    }
}

/// One-class classification ROC-AUC per class, averaged: for each class `c` with train models,
/// the test models in `c` are normal, the others anomalous, and each test model is scored by
/// `method` against the train models of `c`. Classes with no train model, no normal or no
/// anomalous test model are skipped (and listed), as the official code skips classes without
/// test models.
pub fn one_class_auc(
    train: Encodings,
    train_targets: Targets,
    test: Encodings,
    test_targets: Targets,
    method: OneClassMethod,
) -> Result<OneClassResult, EvalError> {
    check_dims(&train, &test, "one_class_auc")?;
    train_targets.check(&train, "train")?;
    test_targets.check(&test, "test")?;
    if train_targets.classes() != test_targets.classes() {
        return Err(EvalError::Shape {
            what: "one_class_auc: number of classes of the test targets (must match train)".into(),
            expected: train_targets.classes(),
            got: test_targets.classes(),
        });
    }
    if let OneClassMethod::Knn { k: 0 } = method {
        return Err(EvalError::Param("one-class kNN needs k >= 1".into()));
    }
    check_finite(&train, "train")?;
    check_finite(&test, "test")?;
    let (train64, test64) = (Prepared::new(&train), Prepared::new(&test));
    let outcomes: Vec<Result<ClassOutcome, EvalError>> = (0..train_targets.classes())
        .into_par_iter()
        .map(|c| {
            let members: Vec<usize> = (0..train.n())
                .filter(|&i| train_targets.is_member(i, c))
                .collect();
            let truth: Vec<bool> = (0..test.n())
                .map(|i| !test_targets.is_member(i, c))
                .collect();
            let anomalous = truth.iter().filter(|&&t| t).count();
            let normal = truth.len() - anomalous;
            let why = if members.is_empty() {
                Some("no train models")
            } else if normal == 0 {
                Some("no test models in the class")
            } else if anomalous == 0 {
                Some("no test models outside the class")
            } else {
                None
            };
            if let Some(why) = why {
                return Ok(Err((c, why.to_string())));
            }
            let reference = train64.subset(&members);
            let scores = match method {
                OneClassMethod::Knn { k } => mean_knn_distance(&reference, &test64, k),
                OneClassMethod::LedoitWolf => {
                    ledoit_wolf(&reference.x, reference.n, reference.d)?.mahalanobis_f64(&test64.x)
                }
            };
            let auc = roc_auc(&scores, &truth)?;
            Ok(Ok(ClassAuc {
                class: c,
                auc,
                train: members.len(),
                normal,
                anomalous,
            }))
        })
        .collect();
    let mut per_class = Vec::new();
    let mut skipped = Vec::new();
    for o in outcomes {
        match o? {
            Ok(c) => per_class.push(c),
            Err(s) => skipped.push(s),
        }
    }
    let mean = if per_class.is_empty() {
        None
    } else {
        Some(per_class.iter().map(|c| c.auc).sum::<f64>() / per_class.len() as f64)
    };
    Ok(OneClassResult {
        per_class,
        mean,
        skipped,
    })
}

/// How a kNN vote with several equally popular answers is decided.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TieBreak {
    /// The smallest class id wins (for multi-label columns: absent, 0). This is what the official
    /// code does (`np.unique` sorts, `argmax` takes the first); with k = 2 it means two
    /// disagreeing neighbours always give the smaller id.
    #[default]
    LowestLabel,
    /// The answer of the nearest neighbour among the tied answers.
    Nearest,
}

/// Predictions of [`knn_classify`].
#[derive(Clone, Debug, PartialEq)]
pub enum Predictions {
    /// One class id per test row.
    Single(Vec<u32>),
    /// Row-major multi-hot `[n, classes]` (0.0 or 1.0).
    Multi(Vec<f32>),
}

/// Result of [`knn_classify`].
#[derive(Clone, Debug, PartialEq)]
pub struct KnnClassification {
    /// Predicted labels of the test rows.
    pub predictions: Predictions,
    /// Top-1 accuracy (single label) or element-wise binary accuracy (multi-label).
    pub accuracy: f64,
}

/// kNN classification: each test row gets the majority label of its `k` nearest train rows
/// (per class column for multi-hot targets), ties decided by `tie`; accuracy against the test
/// targets. Both targets must be of the same kind.
pub fn knn_classify(
    train: Encodings,
    train_targets: Targets,
    test: Encodings,
    test_targets: Targets,
    k: usize,
    tie: TieBreak,
) -> Result<KnnClassification, EvalError> {
    check_dims(&train, &test, "knn_classify")?;
    train_targets.check(&train, "train")?;
    test_targets.check(&test, "test")?;
    if train.n() == 0 {
        return Err(EvalError::Undefined(
            "kNN classification with no train models".into(),
        ));
    }
    if test.n() == 0 {
        return Err(EvalError::Undefined(
            "kNN classification with no test models".into(),
        ));
    }
    check_finite(&train, "train")?;
    check_finite(&test, "test")?;
    let neighbours = nearest(train, test, k)?;
    match (train_targets, test_targets) {
        (Targets::Single { labels, classes }, Targets::Single { labels: truth, .. }) => {
            let pred: Vec<u32> = neighbours
                .iter()
                .map(|nb| {
                    let mut votes = vec![0usize; classes];
                    for x in nb {
                        votes[labels[x.index] as usize] += 1;
                    }
                    let top = votes.iter().copied().max().unwrap_or(0);
                    match tie {
                        TieBreak::LowestLabel => {
                            votes.iter().position(|&v| v == top).unwrap_or(0) as u32
                        }
                        TieBreak::Nearest => nb
                            .iter()
                            .map(|x| labels[x.index])
                            .find(|&y| votes[y as usize] == top)
                            .unwrap_or(0),
                    }
                })
                .collect();
            let hits = pred.iter().zip(truth).filter(|(p, y)| p == y).count();
            Ok(KnnClassification {
                accuracy: hits as f64 / truth.len() as f64,
                predictions: Predictions::Single(pred),
            })
        }
        (
            Targets::Multi { hot, classes },
            Targets::Multi {
                hot: truth,
                classes: tc,
            },
        ) => {
            if classes != tc {
                return Err(EvalError::Shape {
                    what: "knn_classify: number of classes of the test targets (must match train)"
                        .into(),
                    expected: classes,
                    got: tc,
                });
            }
            let mut pred = Vec::with_capacity(test.n() * classes);
            for nb in &neighbours {
                for c in 0..classes {
                    let ones = nb
                        .iter()
                        .filter(|x| hot[x.index * classes + c] > 0.5)
                        .count();
                    let zeros = nb.len() - ones;
                    let on = if ones != zeros {
                        ones > zeros
                    } else {
                        match tie {
                            TieBreak::LowestLabel => false,
                            TieBreak::Nearest => {
                                nb.first().is_some_and(|x| hot[x.index * classes + c] > 0.5)
                            }
                        }
                    };
                    pred.push(if on { 1.0 } else { 0.0 });
                }
            }
            let hits = pred
                .iter()
                .zip(truth)
                .filter(|&(&p, &t)| (p > 0.5) == (t > 0.5))
                .count();
            Ok(KnnClassification {
                accuracy: hits as f64 / pred.len().max(1) as f64,
                predictions: Predictions::Multi(pred),
            })
        }
        _ => Err(EvalError::Input(
            "knn_classify: train and test targets must both be single-label or both multi-label"
                .into(),
        )),
    }
}

/// The first row of each class, in row order: the queries of the official retrieval (one query
/// model per class).
pub fn one_query_per_class(labels: &[u32]) -> Vec<usize> {
    let mut seen = std::collections::HashSet::new();
    (0..labels.len())
        .filter(|&i| seen.insert(labels[i]))
        .collect()
}

/// Retrieval: for each query (a row of `pool`), its `k` nearest other rows of `pool`, ordered by
/// (squared distance, index). The query itself is excluded by index (the official code drops the
/// first hit, which is the query unless an exact duplicate sorts first).
pub fn retrieval_top_k(
    pool: Encodings,
    queries: &[usize],
    k: usize,
) -> Result<Vec<Vec<Neighbour>>, EvalError> {
    if k == 0 {
        return Err(EvalError::Param("retrieval needs k >= 1".into()));
    }
    if let Some(&q) = queries.iter().find(|&&q| q >= pool.n()) {
        return Err(EvalError::Input(format!(
            "retrieval query row {q} is outside the pool of {} models",
            pool.n()
        )));
    }
    check_finite(&pool, "retrieval pool")?;
    let all = Prepared::new(&pool);
    Ok(k_nearest(&all, &all.subset(queries), k, Some(queries)))
}

/// Retrieval results as CSV in the official layout: `query_id,query_class`, then for each rank
/// `j` = 1..=k `{j}nn_id,{j}nn_class,{j}nn_distance` (squared L2; empty when a query has fewer
/// neighbours). `ids` and `classes` name the pool rows.
pub fn retrieval_csv(
    ids: &[String],
    classes: &[String],
    queries: &[usize],
    results: &[Vec<Neighbour>],
    k: usize,
) -> Result<String, EvalError> {
    if ids.len() != classes.len() {
        return Err(EvalError::Shape {
            what: "retrieval_csv: number of class names (one per pool row)".into(),
            expected: ids.len(),
            got: classes.len(),
        });
    }
    if queries.len() != results.len() {
        return Err(EvalError::Shape {
            what: "retrieval_csv: number of results (one per query)".into(),
            expected: queries.len(),
            got: results.len(),
        });
    }
    let out_of_range = queries
        .iter()
        .copied()
        .chain(results.iter().flatten().map(|n| n.index))
        .find(|&i| i >= ids.len());
    if let Some(i) = out_of_range {
        return Err(EvalError::Input(format!(
            "retrieval_csv: row {i} has no id (pool of {})",
            ids.len()
        )));
    }
    let mut header: Vec<String> = vec!["query_id".into(), "query_class".into()];
    for j in 1..=k {
        header.extend([
            format!("{j}nn_id"),
            format!("{j}nn_class"),
            format!("{j}nn_distance"),
        ]);
    }
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut out = csv_record(&header);
    for (&q, nb) in queries.iter().zip(results) {
        let mut fields: Vec<String> = vec![ids[q].clone(), classes[q].clone()];
        for j in 0..k {
            match nb.get(j) {
                Some(n) => fields.extend([
                    ids[n.index].clone(),
                    classes[n.index].clone(),
                    n.distance.to_string(),
                ]),
                None => fields.extend([String::new(), String::new(), String::new()]),
            }
        }
        let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
        out.push_str(&csv_record(&fields));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(data: &[f32], d: usize) -> Encodings<'_> {
        Encodings::new(data, d).unwrap()
    }

    #[test]
    fn encodings_reject_ragged_data() {
        assert!(Encodings::new(&[1.0, 2.0, 3.0], 2).is_err());
        assert!(Encodings::new(&[1.0], 0).is_err());
        assert_eq!(enc(&[1.0, 2.0, 3.0, 4.0], 2).n(), 2);
    }

    #[test]
    fn nearest_orders_by_distance_then_index() {
        // Rows 0 and 2 are equally far from the query; the lower index comes first.
        let reference = [1.0, -1.0, 5.0, 1.0];
        let nb = nearest(enc(&reference, 1), enc(&[0.0], 1), 3).unwrap();
        let idx: Vec<usize> = nb[0].iter().map(|n| n.index).collect();
        assert_eq!(idx, vec![0, 1, 3]);
        assert_eq!(nb[0][0].distance, 1.0);
        // k larger than the reference returns every row.
        assert_eq!(
            nearest(enc(&reference, 1), enc(&[0.0], 1), 10).unwrap()[0].len(),
            4
        );
        assert!(nearest(enc(&reference, 1), enc(&[0.0, 0.0], 2), 1).is_err());
    }

    #[test]
    fn knn_scores_use_every_row_of_a_small_reference() {
        // k = 2 against a single reference row: the mean is over the one neighbour there is.
        let s = knn_scores(enc(&[1.0, 1.0], 2), enc(&[4.0, 5.0, 1.0, 1.0], 2), 2).unwrap();
        assert_eq!(s, vec![25.0, 0.0]);
        assert!(knn_scores(enc(&[], 2), enc(&[0.0, 0.0], 2), 2).is_err());
        assert!(knn_scores(enc(&[0.0, 0.0], 2), enc(&[0.0, 0.0], 2), 0).is_err());
    }

    #[test]
    fn knn_vote_ties() {
        // Query at 0: nearest train row is class 2 (distance 1), then class 1 (distance 4).
        let train = [1.0, -2.0, 10.0];
        let labels = [2u32, 1, 0];
        let test = [0.0];
        let t_train = Targets::Single {
            labels: &labels,
            classes: 3,
        };
        let t_test = Targets::Single {
            labels: &[2],
            classes: 3,
        };
        let low = knn_classify(
            enc(&train, 1),
            t_train,
            enc(&test, 1),
            t_test,
            2,
            TieBreak::LowestLabel,
        )
        .unwrap();
        assert_eq!(low.predictions, Predictions::Single(vec![1]));
        assert_eq!(low.accuracy, 0.0);
        let near = knn_classify(
            enc(&train, 1),
            t_train,
            enc(&test, 1),
            t_test,
            2,
            TieBreak::Nearest,
        )
        .unwrap();
        assert_eq!(near.predictions, Predictions::Single(vec![2]));
        assert_eq!(near.accuracy, 1.0);
        // A clear majority is not a tie.
        let maj = knn_classify(
            enc(&train, 1),
            t_train,
            enc(&test, 1),
            t_test,
            3,
            TieBreak::Nearest,
        )
        .unwrap();
        assert!(matches!(maj.predictions, Predictions::Single(ref p) if p.len() == 1));
    }

    #[test]
    fn knn_multi_label_votes_per_column() {
        let train = [1.0, -2.0];
        let hot = [1.0, 1.0, 0.0, /* row 1 */ 1.0, 0.0, 0.0];
        let truth = [1.0, 1.0, 1.0];
        let t_train = Targets::Multi {
            hot: &hot,
            classes: 3,
        };
        let t_test = Targets::Multi {
            hot: &truth,
            classes: 3,
        };
        let low = knn_classify(
            enc(&train, 1),
            t_train,
            enc(&[0.0], 1),
            t_test,
            2,
            TieBreak::LowestLabel,
        )
        .unwrap();
        assert_eq!(low.predictions, Predictions::Multi(vec![1.0, 0.0, 0.0]));
        assert!((low.accuracy - 1.0 / 3.0).abs() < 1e-12);
        let near = knn_classify(
            enc(&train, 1),
            t_train,
            enc(&[0.0], 1),
            t_test,
            2,
            TieBreak::Nearest,
        )
        .unwrap();
        assert_eq!(near.predictions, Predictions::Multi(vec![1.0, 1.0, 0.0]));
        let mixed = knn_classify(
            enc(&train, 1),
            t_train,
            enc(&[0.0], 1),
            Targets::Single {
                labels: &[0],
                classes: 3,
            },
            2,
            TieBreak::Nearest,
        );
        assert!(matches!(mixed, Err(EvalError::Input(_))));
    }

    #[test]
    fn one_class_skips_classes_without_data() {
        // Class 0: 2 train, 1 normal test; class 1: no train; class 2: train but no test.
        let train = [0.0, 0.1, 5.0];
        let train_labels = [0u32, 0, 2];
        let test = [0.05, 4.0];
        let test_labels = [0u32, 1];
        let r = one_class_auc(
            enc(&train, 1),
            Targets::Single {
                labels: &train_labels,
                classes: 3,
            },
            enc(&test, 1),
            Targets::Single {
                labels: &test_labels,
                classes: 3,
            },
            OneClassMethod::Knn { k: 2 },
        )
        .unwrap();
        assert_eq!(r.per_class.len(), 1);
        assert_eq!(r.per_class[0].class, 0);
        assert_eq!(r.per_class[0].auc, 1.0);
        assert_eq!(r.mean, Some(1.0));
        let skipped: Vec<usize> = r.skipped.iter().map(|s| s.0).collect();
        assert_eq!(skipped, vec![1, 2]);
        assert!(
            r.csv(None)
                .starts_with("class,auc,train,normal,anomalous\n0,1,2,1,1\n")
        );
    }

    #[test]
    fn one_class_rejects_bad_labels() {
        let r = one_class_auc(
            enc(&[0.0, 1.0], 1),
            Targets::Single {
                labels: &[0, 5],
                classes: 3,
            },
            enc(&[0.0], 1),
            Targets::Single {
                labels: &[0],
                classes: 3,
            },
            OneClassMethod::LedoitWolf,
        );
        assert!(matches!(r, Err(EvalError::Input(ref m)) if m.contains("row 1 has class 5")));
        let r = one_class_auc(
            enc(&[0.0, f32::NAN], 1),
            Targets::Single {
                labels: &[0, 1],
                classes: 2,
            },
            enc(&[0.0], 1),
            Targets::Single {
                labels: &[0],
                classes: 2,
            },
            OneClassMethod::LedoitWolf,
        );
        assert!(matches!(r, Err(EvalError::NaN(_))));
    }

    #[test]
    fn retrieval_excludes_the_query_and_writes_csv() {
        // Rows 0 and 1 are duplicates: each must retrieve the other, not itself.
        let pool = [0.0, 0.0, 3.0, 1.0];
        let res = retrieval_top_k(enc(&pool, 1), &[0, 1], 2).unwrap();
        assert_eq!(
            res[0][0],
            Neighbour {
                index: 1,
                distance: 0.0
            }
        );
        assert_eq!(
            res[1][0],
            Neighbour {
                index: 0,
                distance: 0.0
            }
        );
        assert_eq!(res[0][1].index, 3);
        let ids: Vec<String> = ["a", "b", "c", "d,e"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let classes: Vec<String> = ["x", "x", "y", "y"].iter().map(|s| s.to_string()).collect();
        let csv = retrieval_csv(&ids, &classes, &[0], &res[..1], 3).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "query_id,query_class,1nn_id,1nn_class,1nn_distance,2nn_id,2nn_class,2nn_distance,3nn_id,3nn_class,3nn_distance"
        );
        assert_eq!(lines[1], "a,x,b,x,0,\"d,e\",y,1,,,");
        assert!(retrieval_top_k(enc(&pool, 1), &[4], 1).is_err());
        assert_eq!(one_query_per_class(&[3, 1, 3, 0, 1]), vec![0, 1, 3]);
    }
}
