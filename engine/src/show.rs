//! `probex show EXPERIMENT NODE`: one node of an experiment as the engine sees it: its key,
//! whether it is cached (and if not, why it would run: the same reasoning as `probex plan`),
//! where its artifact is in the cache, its files and its results. It answers "where is the
//! output of `probex[layer=5]`?" without digging through the cache by hand.

use std::fmt::Write as _;
use std::path::PathBuf;

use probex_cache::Store;
use serde::Serialize;
use serde_json::Value;

use crate::history::{History, Status};
use crate::plan::{Plan, StoredOutcome};
use crate::status::{PlanRow, human};

/// What `probex show` says about one node.
#[derive(Clone, Debug, Serialize)]
pub struct NodeView {
    /// The experiment's name.
    pub experiment: String,
    /// The node's name, stage, kind, key, and whether it is cached or why it would run: its
    /// row of `probex plan`.
    #[serde(flatten)]
    pub row: PlanRow,
    /// The upstream nodes it reads, in input order.
    pub inputs: Vec<String>,
    /// Its params as they enter the key (canonical JSON, defaults filled in).
    pub params: Value,
    /// The directory holding its files in the cache, when it is cached.
    pub artifact: Option<PathBuf>,
    /// Its files (paths relative to `artifact`), when it is cached.
    pub files: Vec<FileView>,
    /// The results it reported, when it is cached and reported any.
    pub results: Option<Value>,
    /// What its stage warned about when it was computed.
    pub warnings: Vec<String>,
}

/// One file of a node's artifact.
#[derive(Clone, Debug, Serialize)]
pub struct FileView {
    /// Path relative to the artifact directory.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// Why `probex show` has nothing to show.
#[derive(Debug, thiserror::Error)]
pub enum ShowError {
    /// No node of that name, with the closest names.
    #[error("no node `{name}` in {experiment}{}", suggest(.closest))]
    Unknown {
        /// The name asked for.
        name: String,
        /// The experiment's name.
        experiment: String,
        /// Node names close to it, closest first.
        closest: Vec<String>,
    },
    /// The node's stage fans out only once its inputs exist, which they do not yet.
    #[error(
        "stage `{stage}` has no nodes yet: {why}\n  = help: `probex run` the experiment, then show one of its nodes"
    )]
    Pending {
        /// The stage.
        stage: String,
        /// What it waits for.
        why: String,
    },
}

fn suggest(closest: &[String]) -> String {
    match closest {
        [] => "\n  = help: `probex plan` lists every node".to_string(),
        names => format!(
            "\n  = help: did you mean {}?",
            names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// How many close names an unknown node's error offers.
const SUGGESTIONS: usize = 5;

/// Describes the node `name` of `plan`.
pub fn show(
    plan: &Plan,
    exp: &crate::Experiment,
    store: &Store,
    name: &str,
) -> Result<NodeView, ShowError> {
    let Some(node) = plan.nodes.iter().find(|n| n.name == name) else {
        return Err(not_found(plan, exp, name));
    };
    let history = History::open(store, &exp.path);
    let row = PlanRow::of(node, exp, store, &history);
    let entry = match row.status {
        Status::Cached => store.get(&node.key).ok().flatten(),
        Status::Run(_) => None,
    };
    let stored = entry.as_ref().map(StoredOutcome::of);
    Ok(NodeView {
        experiment: exp.name.clone(),
        row,
        inputs: node
            .inputs
            .iter()
            .flat_map(|(_, ids)| ids.iter().map(|&u| plan.nodes[u].name.clone()))
            .collect(),
        params: node.params.canonical().clone(),
        artifact: entry.as_ref().map(|e| e.dir.clone()),
        files: entry
            .as_ref()
            .map(|e| {
                e.manifest
                    .files
                    .iter()
                    .map(|f| FileView {
                        path: f.path.clone(),
                        bytes: f.size,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        results: stored.as_ref().and_then(|s| s.results.clone()),
        warnings: stored.map(|s| s.warnings).unwrap_or_default(),
    })
}

/// The error for a name that is no node of `plan`: a stage still waiting for its inputs, or a
/// name with the closest ones (a stage's own name offers its nodes).
fn not_found(plan: &Plan, exp: &crate::Experiment, name: &str) -> ShowError {
    let stage = name.split('[').next().unwrap_or(name);
    if let Some(p) = plan.pending.iter().find(|p| p.stage == stage) {
        return ShowError::Pending {
            stage: p.stage.clone(),
            why: match &p.unresolved {
                Some(reason) => format!("its sources are not identified: {reason}"),
                None => format!("its fan-out is known once {} ran", p.waits_for.join(", ")),
            },
        };
    }
    let names: Vec<&str> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
    let of_stage: Vec<String> = names
        .iter()
        .filter(|n| n.split('[').next() == Some(stage))
        .take(SUGGESTIONS)
        .map(|n| n.to_string())
        .collect();
    let closest = if of_stage.is_empty() {
        crate::experiment::closest_n(name, names.iter().copied(), SUGGESTIONS)
    } else {
        of_stage
    };
    ShowError::Unknown {
        name: name.to_string(),
        experiment: exp.path.display().to_string(),
        closest,
    }
}

/// The node as text: one fact per line, then its files and results.
pub fn render(v: &NodeView) -> String {
    let mut out = String::new();
    let row = &v.row;
    let _ = writeln!(out, "node      {}", row.node);
    let _ = writeln!(out, "stage     {} ({})", row.stage, row.kind);
    let _ = writeln!(out, "key       {}", row.key);
    match &row.status {
        Status::Cached => {
            let _ = writeln!(out, "state     cached");
        }
        Status::Run(why) => {
            let _ = writeln!(out, "state     would run: {why}");
        }
    }
    if !v.inputs.is_empty() {
        let _ = writeln!(out, "inputs    {}", v.inputs.join(", "));
    }
    let _ = writeln!(out, "params    {}", v.params);
    match &v.artifact {
        Some(dir) => {
            let _ = writeln!(out, "artifact  {}", dir.display());
        }
        None => {
            let _ = writeln!(
                out,
                "artifact  none (not in the cache: `probex run` computes it)"
            );
        }
    }
    if !v.files.is_empty() {
        let total: u64 = v.files.iter().map(|f| f.bytes).sum();
        let _ = writeln!(out, "files     {} ({})", v.files.len(), human(total));
        let width = v.files.iter().map(|f| f.path.len()).max().unwrap_or(0);
        for f in &v.files {
            let _ = writeln!(out, "  {:<width$}  {:>10}", f.path, human(f.bytes));
        }
    }
    if let Some(results) = &v.results {
        let mut flat = Vec::new();
        flatten("", results, &mut flat);
        if !flat.is_empty() {
            let _ = writeln!(out, "results");
            let width = flat.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
            for (k, x) in flat {
                let _ = writeln!(out, "  {k:<width$}  {x}");
            }
        }
    }
    for w in &v.warnings {
        let _ = writeln!(out, "warning   {w}");
    }
    out
}

/// `a.b.c = value` lines of a JSON tree, in order.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&path, x, out);
            }
        }
        Value::Null => {}
        other => out.push((prefix.to_string(), other.to_string())),
    }
}
