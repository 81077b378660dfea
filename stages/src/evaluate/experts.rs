//! Test predictions of one method as a whole: a single probe, or one expert per model tree.
//!
//! A mixture of tree experts is scored on the union of the trees' test models, each predicted
//! by the expert of the tree the router placed it in, with the same metric functions the train
//! stage uses, so its row reads like any single probe's. With the true trees known, every
//! method's test metric is also broken down by true tree: that is where a probe trained across
//! trees shows what it cannot do.

use std::collections::BTreeMap;

use crate::train::{read_outputs, read_rows};
use probex_probes::training::metrics::{self, Metrics};
use probex_weights::dataset::{Labels, Split};

/// A headline metric per true tree: tree name -> (test models, value).
pub type ByTree = BTreeMap<String, (usize, f64)>;

/// The test rows of one or more probes that share their score columns.
#[derive(Clone, Debug, PartialEq)]
pub struct TestRows {
    /// Model ids, one per row.
    pub ids: Vec<String>,
    /// Scores, `[rows, columns.len()]`.
    pub scores: Vec<f32>,
    /// Score column names.
    pub columns: Vec<String>,
    /// What the rows are scored against.
    pub targets: TestTargets,
}

/// Targets of test rows.
#[derive(Clone, Debug, PartialEq)]
pub enum TestTargets {
    /// Multi-hot rows, `[rows, columns.len()]`.
    Multi(Vec<f32>),
    /// One class index per row.
    Class(Vec<u32>),
}

impl TestRows {
    /// The test rows of the probe (train or select artifact) in `dir`; `None` for regression
    /// probes, which have no class columns to pool.
    pub fn read(dir: &std::path::Path) -> anyhow::Result<Option<TestRows>> {
        let rows = read_rows(dir)?;
        let (_, _, scores, w) = read_outputs(dir)?;
        if w != rows.columns.len() || scores.len() != rows.models.len() * w {
            anyhow::bail!(
                "{}: scores are {} values for {} models of {} columns",
                dir.display(),
                scores.len(),
                rows.models.len(),
                rows.columns.len()
            );
        }
        let test: Vec<usize> = (0..rows.models.len())
            .filter(|&i| rows.models[i].split == Split::Test)
            .collect();
        let targets = match &rows.labels {
            Labels::MultiLabel { classes, targets } => {
                if classes.len() != w {
                    anyhow::bail!(
                        "{}: {} label classes but {} score columns",
                        dir.display(),
                        classes.len(),
                        w
                    );
                }
                TestTargets::Multi(
                    test.iter()
                        .flat_map(|&i| targets[i * w..(i + 1) * w].iter().copied())
                        .collect(),
                )
            }
            Labels::Class { targets, .. } => {
                TestTargets::Class(test.iter().map(|&i| targets[i]).collect())
            }
            Labels::Numeric { .. } => return Ok(None),
        };
        Ok(Some(TestRows {
            ids: test.iter().map(|&i| rows.models[i].id.clone()).collect(),
            scores: test
                .iter()
                .flat_map(|&i| scores[i * w..(i + 1) * w].iter().copied())
                .collect(),
            columns: rows.columns,
            targets,
        }))
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The rows of several probes as one set; `None` when their columns or target kinds
    /// differ (experts over different label vocabularies cannot be pooled row by row).
    pub fn concat(parts: &[TestRows]) -> Option<TestRows> {
        let first = parts.first()?;
        let mut all = TestRows {
            ids: Vec::new(),
            scores: Vec::new(),
            columns: first.columns.clone(),
            targets: match first.targets {
                TestTargets::Multi(_) => TestTargets::Multi(Vec::new()),
                TestTargets::Class(_) => TestTargets::Class(Vec::new()),
            },
        };
        for p in parts {
            if p.columns != all.columns {
                return None;
            }
            match (&mut all.targets, &p.targets) {
                (TestTargets::Multi(a), TestTargets::Multi(b)) => a.extend(b),
                (TestTargets::Class(a), TestTargets::Class(b)) => a.extend(b),
                _ => return None,
            }
            all.ids.extend(p.ids.iter().cloned());
            all.scores.extend(&p.scores);
        }
        Some(all)
    }

    /// The metrics of these rows, as the train stage computes them for a split.
    pub fn metrics(&self) -> Metrics {
        self.metrics_of(&(0..self.len()).collect::<Vec<_>>())
    }

    /// The metrics of a subset of the rows.
    pub fn metrics_of(&self, rows: &[usize]) -> Metrics {
        let w = self.columns.len();
        let scores: Vec<f32> = rows
            .iter()
            .flat_map(|&i| self.scores[i * w..(i + 1) * w].iter().copied())
            .collect();
        match &self.targets {
            TestTargets::Multi(t) => {
                let t: Vec<f32> = rows
                    .iter()
                    .flat_map(|&i| t[i * w..(i + 1) * w].iter().copied())
                    .collect();
                metrics::multi_label(&scores, &t, w)
            }
            TestTargets::Class(t) => {
                let t: Vec<u32> = rows.iter().map(|&i| t[i]).collect();
                metrics::classes(&scores, &t, w)
            }
        }
    }

    /// The headline metric's name: `accuracy` (multi-label) or `top1`.
    pub fn headline(&self) -> &'static str {
        match self.targets {
            TestTargets::Multi(_) => "accuracy",
            TestTargets::Class(_) => "top1",
        }
    }

    /// The headline metric over the rows of each true tree (rows whose id has no known tree
    /// are left out), by tree name.
    pub fn by_truth(&self, truth: &BTreeMap<&str, &str>) -> ByTree {
        let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, id) in self.ids.iter().enumerate() {
            if let Some(t) = truth.get(id.as_str()) {
                groups.entry(t).or_default().push(i);
            }
        }
        groups
            .into_iter()
            .filter_map(|(t, rows)| {
                let v = *self.metrics_of(&rows).get(self.headline())?;
                Some((t.to_string(), (rows.len(), v)))
            })
            .collect()
    }
}

/// Weighted means of the metrics that are means over rows (`accuracy`, `top1`, `top5`,
/// `loss`, `mae`, `mse`): the pooled value when rows cannot be concatenated.
pub fn weighted_means(parts: &[(usize, &Metrics)]) -> Metrics {
    let mut out = Metrics::new();
    let total: usize = parts.iter().map(|(n, _)| n).sum();
    if total == 0 {
        return out;
    }
    for key in ["accuracy", "top1", "top5", "loss", "mae", "mse"] {
        if parts.iter().all(|(_, m)| m.contains_key(key)) {
            let v = parts.iter().map(|(n, m)| *n as f64 * m[key]).sum::<f64>() / total as f64;
            out.insert(key.to_string(), v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn multi(ids: &[&str], scores: Vec<f32>, targets: Vec<f32>) -> TestRows {
        TestRows {
            ids: ids.iter().map(|s| s.to_string()).collect(),
            scores,
            columns: vec!["a".into(), "b".into()],
            targets: TestTargets::Multi(targets),
        }
    }

    #[test]
    fn pooled_accuracy_is_the_row_weighted_mean_of_the_experts() {
        // Expert 1: 2 rows, 3 of 4 labels right; expert 2: 1 row, 0 of 2 right.
        let e1 = multi(
            &["m1", "m2"],
            vec![1.0, -1.0, 1.0, 1.0],
            vec![1.0, 0.0, 1.0, 0.0],
        );
        let e2 = multi(&["m3"], vec![-1.0, 1.0], vec![1.0, 0.0]);
        let all = TestRows::concat(&[e1.clone(), e2.clone()]).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all.metrics()["accuracy"], 0.5);
        let (m1, m2) = (e1.metrics(), e2.metrics());
        let w = weighted_means(&[(2, &m1), (1, &m2)]);
        assert!((w["accuracy"] - 0.5).abs() < 1e-12);
        assert!((w["loss"] - all.metrics()["loss"]).abs() < 1e-12);
    }

    #[test]
    fn different_columns_do_not_concatenate() {
        let e1 = multi(&["m1"], vec![1.0, -1.0], vec![1.0, 0.0]);
        let mut e2 = e1.clone();
        e2.columns = vec!["a".into(), "c".into()];
        assert!(TestRows::concat(&[e1, e2]).is_none());
    }

    #[test]
    fn by_truth_scores_each_true_tree_apart() {
        let rows = TestRows {
            ids: vec!["x1".into(), "x2".into(), "y1".into(), "z".into()],
            scores: vec![2.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0],
            columns: vec!["a".into(), "b".into(), "c".into()],
            targets: TestTargets::Class(vec![0, 1, 2, 0]),
        };
        let truth: BTreeMap<&str, &str> = [("x1", "X"), ("x2", "X"), ("y1", "Y")]
            .into_iter()
            .collect();
        let b = rows.by_truth(&truth);
        assert_eq!(b["X"], (2, 0.5));
        assert_eq!(b["Y"], (1, 0.0));
        assert_eq!(b.len(), 2, "rows without a known tree are left out");
    }
}
