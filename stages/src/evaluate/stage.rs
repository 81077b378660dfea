//! The `evaluate` stage kind: the paper's tables for one or more selected probes.
//!
//! ```toml
//! [stage.report]
//! kind = "evaluate"
//! from = ["best_probex", "best_dense", "best_statnn"]   # one selection per method (row)
//! k = 2                                                 # neighbours for kNN tasks
//! ```
//! For every method: test-split metrics of the selected probe (and zero-shot metrics on held-out
//! classes where the probe has them), and the downstream tasks on its encodings with train
//! models as reference and test models as queries: one-class classification by kNN distance
//! and by Ledoit-Wolf Mahalanobis distance (ROC-AUC averaged over classes), kNN classification,
//! and retrieval (CSV). Results are keyed by the selection's node name, e.g.
//! `report.best_probex.test.accuracy` in an `[expect]` table.

use std::collections::{BTreeMap, BTreeSet};

use probex_engine::{Artifact, InputSlot, Inputs, Outcome, RunContext, Stage, StageResult};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::report::{Block, Column, MethodRow, Report, Section, format_params, table_csv};
use super::{
    Encodings, OneClassMethod, Targets, TieBreak, knn_classify, one_class_auc, one_query_per_class,
    retrieval_csv, retrieval_top_k,
};
use crate::dataset::{Labels, Split};
use crate::select::stage::ARTIFACT as SELECTION;
use crate::train::{read_outputs, read_rows};

/// The artifact type of an evaluation.
pub const ARTIFACT: &str = "evaluation";

/// Parameters of `evaluate`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateParams {
    /// Neighbours for one-class kNN scores and kNN classification (the paper's k = 2).
    #[serde(default = "default_k")]
    pub k: usize,
    /// Neighbours listed per query in the retrieval CSV.
    #[serde(default = "default_retrieve")]
    pub retrieve: usize,
    /// Run the downstream tasks on the encodings (off: test metrics only).
    #[serde(default = "yes")]
    pub downstream: bool,
    /// Title of the report (default: the experiment's node name).
    #[serde(default)]
    pub title: Option<String>,
}

fn default_k() -> usize {
    2
}
fn default_retrieve() -> usize {
    5
}
fn yes() -> bool {
    true
}

/// The `evaluate` stage kind.
pub struct Evaluate;

impl Stage for Evaluate {
    type Params = EvaluateParams;

    fn kind(&self) -> &'static str {
        "evaluate"
    }
    fn version(&self) -> u32 {
        1
    }
    fn about(&self) -> &'static str {
        "test metrics, downstream tasks (one-class, kNN, retrieval) and the paper's tables for selected probes"
    }
    fn output(&self) -> &'static str {
        ARTIFACT
    }
    fn inputs(&self) -> Vec<InputSlot> {
        vec![InputSlot::many(SELECTION)]
    }

    fn check(&self, p: &EvaluateParams) -> Result<(), String> {
        if p.k == 0 || p.retrieve == 0 {
            return Err("`k` and `retrieve` must be at least 1".into());
        }
        Ok(())
    }

    fn run(&self, p: &EvaluateParams, inputs: &Inputs, cx: &RunContext) -> StageResult<Outcome> {
        let out = cx.out_dir();
        let mut results = serde_json::Map::new();
        let mut rows = Vec::new();
        let mut downstream_rows = Vec::new();
        let mut publish = vec!["report.md".to_string(), "methods.csv".to_string()];
        for sel in inputs.all(SELECTION) {
            let method = sel.node.clone();
            let model = sel
                .meta
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string();
            let params = sel.meta.get("params").and_then(Value::as_u64);
            let layer = sel
                .meta
                .get("chosen_layer")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string();
            let mut r = sel.results.clone().unwrap_or_else(|| json!({}));
            let mut row = MethodRow::new(format!("{model} (`{method}`, layer {layer})"), params);
            for split in ["test", "test_holdout"] {
                if let Some(Value::Object(m)) = r.get(split) {
                    for (k, v) in m {
                        if let (Some(v), true) = (v.as_f64(), k != "loss") {
                            row = row.with(format!("{split}.{k}"), v);
                        }
                    }
                }
            }
            rows.push(row);
            if p.downstream {
                match downstream(sel, p, cx, &method) {
                    Ok((values, files)) => {
                        let mut drow = MethodRow::new(format!("{model} (`{method}`)"), params);
                        for (k, v) in &values {
                            drow = drow.with(k.clone(), *v);
                        }
                        downstream_rows.push(drow);
                        publish.extend(files);
                        if let Some(obj) = r.as_object_mut() {
                            obj.insert("downstream".into(), json!(values));
                        }
                    }
                    Err(e) => cx.log(format!("{method}: downstream tasks skipped: {e:#}")),
                }
            }
            if let Some(obj) = r.as_object_mut() {
                obj.insert("model".into(), model.clone().into());
            }
            results.insert(method, r);
        }

        let columns = columns_of(&rows);
        let main = super::report::render_table(&rows, &columns);
        std::fs::write(out.join("methods.csv"), table_csv(&rows, &columns))?;
        let mut sections = vec![Section {
            heading: "Test metrics of the selected layer".into(),
            blocks: vec![Block::Table {
                rows: rows.clone(),
                columns,
            }],
        }];
        if !downstream_rows.is_empty() {
            let dcols = columns_of(&downstream_rows);
            sections.push(Section {
                heading: format!("Downstream tasks on probe encodings (train = reference, test = queries, k = {})", p.k),
                blocks: vec![Block::Table { rows: downstream_rows, columns: dcols }],
            });
        }
        let facts = rows
            .iter()
            .map(|r| {
                (
                    r.method.clone(),
                    r.params.map_or_else(|| "-".into(), format_params),
                )
            })
            .collect();
        sections.push(Section {
            heading: "Parameters".into(),
            blocks: vec![Block::Facts(facts)],
        });
        let report = Report {
            title: p.title.clone().unwrap_or_else(|| cx.node().to_string()),
            intro: Vec::new(),
            sections,
        };
        std::fs::write(out.join("report.md"), report.render())?;
        Ok(Outcome {
            meta: json!({ "methods": results.keys().collect::<Vec<_>>() }),
            results: Some(Value::Object(results)),
            summary: Some(main),
            publish,
        })
    }
}

/// Numeric columns present in any row, `test.*` first, in a stable order.
fn columns_of(rows: &[MethodRow]) -> Vec<Column> {
    let keys: BTreeSet<&String> = rows
        .iter()
        .flat_map(|r| r.metrics.keys())
        .filter(|k| !k.ends_with(".std"))
        .collect();
    keys.into_iter()
        .map(|k| Column::new(k.clone(), k.clone()))
        .collect()
}

/// One-class AUCs, kNN accuracy and the retrieval CSV for one selected probe.
fn downstream(
    sel: &Artifact,
    p: &EvaluateParams,
    cx: &RunContext,
    method: &str,
) -> StageResult<(BTreeMap<String, f64>, Vec<String>)> {
    let rows = read_rows(&sel.dir)?;
    let (enc, dim, _, _) = read_outputs(&sel.dir)?;
    let split_rows = |s: Split| -> Vec<usize> {
        (0..rows.models.len())
            .filter(|&i| rows.models[i].split == s)
            .collect()
    };
    let (train, test) = (split_rows(Split::Train), split_rows(Split::Test));
    if train.is_empty() || test.is_empty() {
        anyhow::bail!(
            "needs train and test models ({} train, {} test)",
            train.len(),
            test.len()
        );
    }
    let gather = |idx: &[usize]| -> Vec<f32> {
        idx.iter()
            .flat_map(|&i| enc[i * dim..(i + 1) * dim].iter().copied())
            .collect()
    };
    let (tr_enc, te_enc) = (gather(&train), gather(&test));
    let (tr, te) = (Encodings::new(&tr_enc, dim)?, Encodings::new(&te_enc, dim)?);

    let mut values = BTreeMap::new();
    let mut files = Vec::new();
    let safe = crate::evaluate::stage::file_safe(method);
    match &rows.labels {
        Labels::MultiLabel { classes, targets } => {
            let c = classes.len();
            let pick = |idx: &[usize]| -> Vec<f32> {
                idx.iter()
                    .flat_map(|&i| targets[i * c..(i + 1) * c].iter().copied())
                    .collect()
            };
            let (trh, teh) = (pick(&train), pick(&test));
            let (tt, et) = (
                Targets::Multi {
                    hot: &trh,
                    classes: c,
                },
                Targets::Multi {
                    hot: &teh,
                    classes: c,
                },
            );
            one_class(
                &mut values,
                &mut files,
                out_csv(cx, &safe),
                tr,
                tt,
                te,
                et,
                p.k,
                classes,
            )?;
            let knn = knn_classify(tr, tt, te, et, p.k, TieBreak::LowestLabel)?;
            values.insert("knn.accuracy".into(), knn.accuracy);
        }
        Labels::Class { classes, targets } => {
            let c = classes.len();
            let pick = |idx: &[usize]| -> Vec<u32> { idx.iter().map(|&i| targets[i]).collect() };
            let (trl, tel) = (pick(&train), pick(&test));
            let (tt, et) = (
                Targets::Single {
                    labels: &trl,
                    classes: c,
                },
                Targets::Single {
                    labels: &tel,
                    classes: c,
                },
            );
            let names: Vec<String> = classes.iter().map(|c| c.name.clone()).collect();
            one_class(
                &mut values,
                &mut files,
                out_csv(cx, &safe),
                tr,
                tt,
                te,
                et,
                p.k,
                &names,
            )?;
            let knn = knn_classify(tr, tt, te, et, p.k, TieBreak::LowestLabel)?;
            values.insert("knn.top1".into(), knn.accuracy);
            // Retrieval as the official code: the pool is train + test, one query per class.
            let pool_idx: Vec<usize> = train.iter().chain(&test).copied().collect();
            let pool_enc = gather(&pool_idx);
            let pool_labels: Vec<u32> = pool_idx.iter().map(|&i| targets[i]).collect();
            let queries = one_query_per_class(&pool_labels);
            let hits = retrieval_top_k(Encodings::new(&pool_enc, dim)?, &queries, p.retrieve)?;
            let ids: Vec<String> = pool_idx
                .iter()
                .map(|&i| rows.models[i].id.clone())
                .collect();
            let cls: Vec<String> = pool_labels
                .iter()
                .map(|&l| names[l as usize].clone())
                .collect();
            let same: usize = queries
                .iter()
                .zip(&hits)
                .map(|(&q, h)| {
                    h.iter()
                        .filter(|n| pool_labels[n.index] == pool_labels[q])
                        .count()
                })
                .sum();
            let total: usize = hits.iter().map(Vec::len).sum();
            if total > 0 {
                values.insert(
                    format!("retrieval.precision@{}", p.retrieve),
                    same as f64 / total as f64,
                );
            }
            let name = format!("{safe}.retrieval.csv");
            std::fs::write(
                cx.out_dir().join(&name),
                retrieval_csv(&ids, &cls, &queries, &hits, p.retrieve)?,
            )?;
            files.push(name);
        }
        Labels::Numeric { .. } => anyhow::bail!("downstream tasks need class labels"),
    }
    Ok((values, files))
}

fn out_csv(cx: &RunContext, safe: &str) -> impl Fn(&str) -> (std::path::PathBuf, String) + use<> {
    let dir = cx.out_dir().to_path_buf();
    let safe = safe.to_string();
    move |what: &str| {
        let name = format!("{safe}.{what}.csv");
        (dir.join(&name), name)
    }
}

#[allow(clippy::too_many_arguments)]
fn one_class(
    values: &mut BTreeMap<String, f64>,
    files: &mut Vec<String>,
    path: impl Fn(&str) -> (std::path::PathBuf, String),
    tr: Encodings,
    tt: Targets,
    te: Encodings,
    et: Targets,
    k: usize,
    names: &[String],
) -> StageResult<()> {
    for method in [OneClassMethod::Knn { k }, OneClassMethod::LedoitWolf] {
        let r = one_class_auc(tr, tt, te, et, method)?;
        if let Some(mean) = r.mean {
            values.insert(format!("{}.auc", method.name()), mean);
        }
        let (p, name) = path(method.name());
        std::fs::write(p, r.csv(Some(names)))?;
        files.push(name);
    }
    Ok(())
}

/// A node name as a file name.
pub(crate) fn file_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}
