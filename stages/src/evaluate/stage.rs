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
//! and retrieval (CSV). Results are keyed by the selection's stage name, e.g.
//! `report.best_probex.test.accuracy` in an `[expect]` table.
//!
//! A selection that fans out over model trees (`select` with `for_each = "tree"`) is one
//! method, a mixture of tree experts: its test metrics are those of every tree's test models,
//! each predicted by its own tree's expert. With a routing in `from` (a `route` stage), the
//! report also shows the routing (true against assigned tree) and each method's test metric
//! per true tree.

use std::collections::{BTreeMap, BTreeSet};

use probex_engine::{
    Artifact, InputSlot, Inputs, Outcome, ParamError, PlanFacts, PlanInput, RunContext, Shape,
    Stage, StageResult,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::experts::{ByTree, TestRows, weighted_means};
use super::report::{Block, Column, MethodRow, Report, Section, format_params, table_csv};
use super::{
    Encodings, OneClassMethod, Targets, TieBreak, knn_classify, one_class_auc, one_query_per_class,
    retrieval_csv, retrieval_top_k,
};
use crate::routing::{self as route, Routing};
use crate::select::stage::ARTIFACT as SELECTION;
use crate::train::{read_outputs, read_rows};
use probex_weights::dataset::{Labels, Split};

/// The artifact type of an evaluation.
pub const ARTIFACT: &str = "evaluation";

/// Parameters of `evaluate`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateParams {
    /// Neighbours for one-class kNN scores and kNN classification (the paper's k = 2).
    #[serde(default = "default_k")]
    pub k: usize,
    /// Neighbours listed per query in the retrieval CSV, and scored as `precision@N`. Default:
    /// `k`, as the authors' `downstream_generative.py` retrieves with its one `--k` (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retrieve: Option<usize>,
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
impl EvaluateParams {
    /// Neighbours retrieved per query: `retrieve`, else `k`.
    pub fn retrieve(&self) -> usize {
        self.retrieve.unwrap_or(self.k)
    }
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
        // 2: zero-shot probes also report the held-out metrics of their val_holdout-chosen
        // checkpoint (the paper's); retrieval defaults to k neighbours (was 5).
        2
    }
    fn about(&self) -> &'static str {
        "test metrics, downstream tasks (one-class, kNN, retrieval) and the paper's tables for selected probes"
    }
    fn params_doc(&self) -> probex_engine::ParamsDoc {
        crate::params_doc::EVALUATE
    }
    fn output(&self) -> &'static str {
        ARTIFACT
    }
    fn inputs(&self) -> Vec<InputSlot> {
        vec![
            InputSlot::many(SELECTION).gathered(),
            InputSlot::optional(route::ARTIFACT),
        ]
    }

    fn check(&self, p: &EvaluateParams) -> Result<(), ParamError> {
        if p.k == 0 {
            return Err(ParamError::at("k", "`k` must be at least 1"));
        }
        if p.retrieve() == 0 {
            return Err(ParamError::at("retrieve", "`retrieve` must be at least 1"));
        }
        Ok(())
    }

    /// Results by method (selection stage): what the selection reports, plus the model, the
    /// downstream tasks, per-tree scores and, for tree experts, their pooled test metrics.
    fn plan_facts(
        &self,
        _p: &EvaluateParams,
        inputs: &[PlanInput<'_>],
    ) -> Result<PlanFacts, ParamError> {
        let methods = inputs.iter().filter(|i| i.ty == SELECTION).map(|i| {
            let shape = i
                .facts
                .results
                .clone()
                .with("model", Shape::Value)
                .with("downstream", Shape::Any)
                .with("by_tree", Shape::Any)
                .with(PAPER_ZERO_SHOT, Shape::Value)
                .with("trees", Shape::Value)
                .with("experts", Shape::Any);
            (i.stage, shape)
        });
        Ok(PlanFacts {
            results: Shape::object(methods),
            facts: Value::Null,
        })
    }

    fn run(&self, p: &EvaluateParams, inputs: &Inputs, cx: &RunContext) -> StageResult<Outcome> {
        let out = cx.out_dir();
        let mut results = serde_json::Map::new();
        let mut rows = Vec::new();
        let mut downstream_rows = Vec::new();
        let mut publish = vec!["report.md".to_string(), "methods.csv".to_string()];
        let routing = match inputs.optional(route::ARTIFACT)? {
            Some(a) => Some(Routing::load(&a.dir)?),
            None => None,
        };
        let truth = routing.as_ref().map(Routing::truths).unwrap_or_default();
        let mut per_tree: Vec<(String, ByTree)> = Vec::new();
        for group in by_stage(inputs.all(SELECTION)) {
            let method = group[0].stage.clone();
            let (row, mut r, test_rows) = if let [sel] = group.as_slice()
                && !sel.coords.iter().any(|(d, _)| d == "tree")
            {
                let (row, mut r) = single_row(sel);
                if p.downstream {
                    match downstream(sel, p, cx, &method) {
                        Ok((values, files)) => {
                            let mut drow = MethodRow::new(row.method.clone(), row.params);
                            for (k, v) in &values {
                                drow = drow.with(k.clone(), *v);
                            }
                            downstream_rows.push(drow);
                            publish.extend(files);
                            r = with(r, "downstream", json!(values));
                        }
                        Err(e) => cx.log(format!("{method}: downstream tasks skipped: {e:#}")),
                    }
                }
                let test_rows = if truth.is_empty() {
                    None
                } else {
                    TestRows::read(&sel.dir)?
                };
                (row, r, test_rows)
            } else {
                cx.log(format!(
                    "{method}: {} experts pooled; downstream tasks run on single probes only",
                    group.len()
                ));
                experts_row(&group)?
            };
            if let Some(rows) = &test_rows
                && !truth.is_empty()
            {
                let b = rows.by_truth(&truth);
                let by_tree: serde_json::Map<String, Value> = b
                    .iter()
                    .map(|(t, (n, v))| (t.clone(), json!({ "models": n, rows.headline(): v })))
                    .collect();
                r = with(r, "by_tree", Value::Object(by_tree));
                per_tree.push((row.method.clone(), b));
            }
            rows.push(row);
            results.insert(method, r);
        }

        // The printed summary, the CSV and report.md show the same columns, labelled.
        let columns = label_checkpoints(columns_of(&rows));
        let main = super::report::render_table(&rows, &columns);
        std::fs::write(out.join("methods.csv"), table_csv(&rows, &columns))?;
        let mut sections = vec![test_section(&rows, columns)];
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
        if let Some(routing) = &routing {
            sections.push(routing_section(routing));
        }
        if !per_tree.is_empty() {
            sections.push(per_tree_section(&per_tree));
        }
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
            references: Vec::new(),
        })
    }
}

/// Selections grouped by declared stage, in the order they came: a stage that fans out over
/// trees is one method.
fn by_stage(selections: &[Artifact]) -> Vec<Vec<&Artifact>> {
    let mut groups: Vec<Vec<&Artifact>> = Vec::new();
    for sel in selections {
        match groups.iter_mut().find(|g| g[0].stage == sel.stage) {
            Some(g) => g.push(sel),
            None => groups.push(vec![sel]),
        }
    }
    groups
}

fn with(mut r: Value, key: &str, v: Value) -> Value {
    if let Some(obj) = r.as_object_mut() {
        obj.insert(key.into(), v);
    }
    r
}

fn model_of(sel: &Artifact) -> String {
    sel.meta
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string()
}

fn layer_of(sel: &Artifact) -> String {
    sel.meta
        .get("chosen_layer")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string()
}

/// The chosen layer and, when the selection was over a grid, the setting that won
/// (`2, lr=0.002, standardize=true`).
fn layer_and_setting(sel: &Artifact) -> String {
    match sel.meta.get("chosen_setting").and_then(Value::as_str) {
        Some(s) if !s.is_empty() => format!("{}, {s}", layer_of(sel)),
        _ => layer_of(sel),
    }
}

/// The row and results of one selected probe.
fn single_row(sel: &Artifact) -> (MethodRow, Value) {
    let model = model_of(sel);
    let params = sel.meta.get("params").and_then(Value::as_u64);
    let mut row = MethodRow::new(
        format!(
            "{model} (`{}`, layer {})",
            sel.stage,
            layer_and_setting(sel)
        ),
        params,
    );
    let mut r = sel.results.clone().unwrap_or_else(|| json!({}));
    for split in ["test", "test_holdout"] {
        if let Some(Value::Object(m)) = r.get(split) {
            for (k, v) in m {
                if let (Some(v), true) = (v.as_f64(), k != "loss") {
                    row = row.with(format!("{split}.{k}"), v);
                }
            }
        }
    }
    // Zero-shot: the held-out metrics of the second checkpoint, chosen on val_holdout.
    let holdout = r
        .get(HOLDOUT_CHECKPOINT)
        .and_then(|h| h.get("test_holdout"))
        .and_then(Value::as_object);
    if let Some(m) = holdout {
        for (k, v) in m {
            if let (Some(v), true) = (v.as_f64(), k != "loss") {
                row = row.with(format!("{HOLDOUT_CHECKPOINT}.test_holdout.{k}"), v);
            }
        }
        r = with(
            r,
            PAPER_ZERO_SHOT,
            format!("{HOLDOUT_CHECKPOINT}.test_holdout").into(),
        );
    }
    (row, with(r, "model", model.into()))
}

/// Where a train result keeps the metrics of a zero-shot probe's best-`val_holdout`
/// checkpoint (the other results are the best-`val` checkpoint's).
const HOLDOUT_CHECKPOINT: &str = "holdout_checkpoint";

/// The result naming which of a zero-shot probe's results the paper's zero-shot column is.
const PAPER_ZERO_SHOT: &str = "paper_zero_shot";

/// The main table, its zero-shot columns labelled with the checkpoint they come from, and
/// (when there are such columns) which one the paper reports.
/// Zero-shot columns from two checkpoints: each `test_holdout` header names its checkpoint,
/// and the best-`val_holdout` checkpoint's columns come right after the best-`val` ones.
fn label_checkpoints(mut columns: Vec<Column>) -> Vec<Column> {
    let holdout_prefix = format!("{HOLDOUT_CHECKPOINT}.test_holdout.");
    if !columns.iter().any(|c| c.key.starts_with(&holdout_prefix)) {
        return columns;
    }
    // Beside the best-val checkpoint's test_holdout columns (they sort first otherwise).
    columns.sort_by_key(|c| c.key.starts_with(&holdout_prefix));
    for c in &mut columns {
        if let Some(metric) = c.key.strip_prefix(&holdout_prefix) {
            c.header = format!("test_holdout.{metric} (best val_holdout ckpt)");
        } else if c.key.starts_with("test_holdout.") {
            c.header = format!("{} (best val ckpt)", c.key);
        }
    }
    columns
}

/// The main table (columns as [`label_checkpoints`] leaves them) and, when it shows two
/// zero-shot checkpoints, which one the paper reports.
fn test_section(rows: &[MethodRow], columns: Vec<Column>) -> Section {
    let holdout_prefix = format!("{HOLDOUT_CHECKPOINT}.test_holdout.");
    let two_checkpoints = columns.iter().any(|c| c.key.starts_with(&holdout_prefix));
    let mut blocks = vec![Block::Table {
        rows: rows.to_vec(),
        columns,
    }];
    if two_checkpoints {
        blocks.push(Block::Text(format!(
            "Zero-shot probes keep two checkpoints, as the authors' training script does: the \
             one with the best `val` top-1 (every other number of the row, and the encodings \
             of the downstream tasks) and the one with the best `val_holdout` top-1. The \
             paper's zero-shot column is `test_holdout` of the best-`val_holdout` checkpoint \
             (results path `<method>.{HOLDOUT_CHECKPOINT}.test_holdout`, what the authors' \
             script reports for held-out classes); its in-distribution column is `test` of the \
             best-`val` checkpoint."
        )));
    }
    Section {
        heading: "Test metrics of the selected layer".into(),
        blocks,
    }
}

/// The row and results of one expert per tree, scored as one method over all their test
/// models, and the pooled test rows.
fn experts_row(group: &[&Artifact]) -> StageResult<(MethodRow, Value, Option<TestRows>)> {
    let stage = &group[0].stage;
    let tree = |sel: &Artifact| {
        sel.coords
            .iter()
            .find(|(d, _)| d == "tree")
            .map_or_else(|| sel.node.clone(), |(_, v)| v.clone())
    };
    let models: BTreeSet<String> = group.iter().map(|s| model_of(s)).collect();
    let model = models.into_iter().collect::<Vec<_>>().join("+");
    let params: Option<u64> = group
        .iter()
        .map(|s| s.meta.get("params").and_then(Value::as_u64))
        .sum();
    let mut parts = Vec::new();
    let mut experts = Vec::new();
    for sel in group {
        let rows = TestRows::read(&sel.dir)?;
        let test = sel.results.as_ref().and_then(|r| r.get("test")).cloned();
        experts.push(json!({
            "tree": tree(sel),
            "layer": layer_of(sel),
            "models": rows.as_ref().map_or(0, TestRows::len),
            "test": test,
        }));
        parts.push(rows);
    }
    let parts: Option<Vec<TestRows>> = parts.into_iter().collect();
    let pooled = parts.as_deref().and_then(TestRows::concat);
    let metrics = match (&pooled, &parts) {
        (Some(all), _) => all.metrics(),
        // Different vocabularies per tree: the means over rows still pool exactly.
        (None, Some(parts)) => {
            let ms: Vec<_> = parts.iter().map(TestRows::metrics).collect();
            let weighted: Vec<(usize, &_)> = parts.iter().map(TestRows::len).zip(&ms).collect();
            weighted_means(&weighted)
        }
        (None, None) => anyhow::bail!(
            "`{stage}`: experts of regression probes cannot be pooled yet; evaluate each tree's \
             selection on its own"
        ),
    };
    let layers: Vec<String> = group.iter().map(|s| layer_of(s)).collect();
    let mut row = MethodRow::new(
        format!(
            "{model} experts (`{stage}`, {} trees, layers {})",
            group.len(),
            layers.join("/")
        ),
        params,
    );
    for (k, v) in &metrics {
        if k != "loss" {
            row = row.with(format!("test.{k}"), *v);
        }
    }
    let r = json!({
        "model": model,
        "trees": group.len(),
        "test": metrics,
        "experts": experts,
    });
    Ok((row, r, pooled))
}

/// The routing: trees found, the share routed home per split, and the test confusion.
fn routing_section(routing: &Routing) -> Section {
    let mut facts: Vec<(String, String)> = routing
        .trees
        .iter()
        .map(|t| {
            (
                format!("tree {}", t.index),
                format!(
                    "{} training models{}; threshold {:.4} (radius {:.4})",
                    t.train,
                    t.truth
                        .as_ref()
                        .map(|s| format!(", mostly `{s}`"))
                        .unwrap_or_default(),
                    t.threshold,
                    t.radius
                ),
            )
        })
        .collect();
    for s in routing.score() {
        facts.push((
            format!("{} models", s.split),
            format!(
                "{}, {} to no known tree{}",
                s.models,
                s.rejected,
                s.accuracy
                    .map(|a| format!(", routed to their true tree: {a:.3}"))
                    .unwrap_or_default()
            ),
        ));
    }
    Section {
        heading: "Routing (true tree against the tree each test model was routed to)".into(),
        blocks: vec![
            Block::Facts(facts),
            Block::Markdown(routing.confusion_table(Split::Test)),
        ],
    }
}

/// Each method's headline test metric per true tree.
fn per_tree_section(per_tree: &[(String, ByTree)]) -> Section {
    let rows: Vec<MethodRow> = per_tree
        .iter()
        .map(|(method, b)| {
            b.iter()
                .fold(MethodRow::new(method.clone(), None), |row, (t, (_, v))| {
                    row.with(t.clone(), *v)
                })
        })
        .collect();
    let columns = columns_of(&rows);
    Section {
        heading: "Test metric per true tree (accuracy, or top-1 for class labels)".into(),
        blocks: vec![Block::Table { rows, columns }],
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
            let hits = retrieval_top_k(Encodings::new(&pool_enc, dim)?, &queries, p.retrieve())?;
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
                    format!("retrieval.precision@{}", p.retrieve()),
                    same as f64 / total as f64,
                );
            }
            let name = format!("{safe}.retrieval.csv");
            std::fs::write(
                cx.out_dir().join(&name),
                retrieval_csv(&ids, &cls, &queries, &hits, p.retrieve())?,
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

#[cfg(test)]
mod tests {
    use super::*;
    use probex_engine::cache::Key;

    /// Retrieval lists and scores `k` neighbours unless told otherwise, as the authors' script
    /// uses its one `--k` (default 2) for kNN and retrieval.
    #[test]
    fn retrieval_defaults_to_the_authors_k() {
        let p = |t: &str| toml::from_str::<EvaluateParams>(t).unwrap();
        assert_eq!((p("").k, p("").retrieve()), (2, 2));
        assert_eq!(p("k = 3").retrieve(), 3);
        assert_eq!(p("k = 3\nretrieve = 7").retrieve(), 7);
        assert!(Evaluate.check(&p("retrieve = 0")).is_err());
    }

    fn selection(results: Value) -> Artifact {
        Artifact {
            node: "best_probex".into(),
            stage: "best_probex".into(),
            key: Key::parse(&"0".repeat(64)).unwrap(),
            dir: std::path::PathBuf::from("/nonexistent"),
            coords: Vec::new(),
            meta: json!({ "model": "probex-zeroshot", "params": 615, "chosen_layer": "3" }),
            results: Some(results),
        }
    }

    /// A zero-shot selection reports held-out top-1 from both checkpoints, labelled, and the
    /// report says which the paper uses; a probe without the second checkpoint shows neither
    /// label nor note.
    #[test]
    fn zero_shot_rows_carry_both_checkpoints_labelled() {
        let sel = selection(json!({
            "test": { "top1": 0.98, "loss": 0.1 },
            "test_holdout": { "top1": 0.70 },
            "holdout_checkpoint": {
                "test": { "top1": 0.95 },
                "test_holdout": { "top1": 0.77, "loss": 1.0 },
                "val_holdout": { "top1": 0.80 },
            },
            "best_epoch": 40,
            "best_holdout_epoch": 30,
        }));
        let (row, r) = single_row(&sel);
        assert_eq!(row.metrics["test.top1"], 0.98);
        assert_eq!(row.metrics["test_holdout.top1"], 0.70);
        assert_eq!(row.metrics["holdout_checkpoint.test_holdout.top1"], 0.77);
        assert!(
            !row.metrics
                .contains_key("holdout_checkpoint.test_holdout.loss")
        );
        assert_eq!(r["paper_zero_shot"], "holdout_checkpoint.test_holdout");
        assert_eq!(r["holdout_checkpoint"]["test_holdout"]["top1"], 0.77);

        let columns = label_checkpoints(columns_of(std::slice::from_ref(&row)));
        let section = test_section(std::slice::from_ref(&row), columns);
        let text = Report {
            title: "t".into(),
            intro: Vec::new(),
            sections: vec![section],
        }
        .render();
        assert!(
            text.contains("| test_holdout.top1 (best val ckpt) |")
                && text.contains("| test_holdout.top1 (best val_holdout ckpt) |")
                && text.contains("| 0.700 | 0.770 |"),
            "{text}"
        );
        assert!(
            text.contains("paper's zero-shot column is `test_holdout` of the best-`val_holdout`"),
            "{text}"
        );

        let (plain, r) = single_row(&selection(json!({ "test": { "accuracy": 0.8 } })));
        assert!(r.get("paper_zero_shot").is_none());
        let text = Report {
            title: "t".into(),
            intro: Vec::new(),
            sections: vec![test_section(
                std::slice::from_ref(&plain),
                label_checkpoints(columns_of(std::slice::from_ref(&plain))),
            )],
        }
        .render();
        assert!(!text.contains("ckpt") && !text.contains("paper"), "{text}");
    }
}
