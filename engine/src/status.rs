//! What `probex plan` shows (each node: cached or will run, and why) and the run's
//! `report.md`, rendered from the [`crate::report`] schema.

use std::fmt::Write as _;

use probex_cache::Store;
use serde::Serialize;

use crate::experiment::Experiment;
use crate::history::{History, Status};
use crate::plan::{Node, Pending, Plan};
use crate::report::{NodeState, RunReport};

/// One node of a plan as shown to users.
#[derive(Clone, Debug, Serialize)]
pub struct PlanRow {
    /// Node name.
    pub node: String,
    /// Declared stage.
    pub stage: String,
    /// Stage kind.
    pub kind: String,
    /// Key.
    pub key: String,
    /// Cached, or why it will run.
    #[serde(flatten)]
    pub status: Status,
}

impl PlanRow {
    /// Node `n` of `exp`: its names, key, and whether it is cached or why it will run.
    pub fn of(n: &Node, exp: &Experiment, store: &Store, history: &History) -> PlanRow {
        let decl = &exp.stages[n.stage];
        PlanRow {
            node: n.name.clone(),
            stage: decl.name.clone(),
            kind: decl.kind.clone(),
            key: n.key.to_string(),
            status: history.status(store, n),
        }
    }
}

/// A whole plan as shown to users.
#[derive(Clone, Debug, Serialize)]
pub struct PlanView {
    /// The experiment's name.
    pub experiment: String,
    /// Known nodes.
    pub nodes: Vec<PlanRow>,
    /// Stages whose fan-out is known only once their inputs exist.
    pub pending: Vec<Pending>,
}

impl PlanView {
    /// Number of nodes that will run.
    pub fn to_run(&self) -> usize {
        self.nodes
            .iter()
            .filter(|r| r.status != Status::Cached)
            .count()
    }
}

/// Status of every node of `plan`.
pub fn rows(plan: &Plan, exp: &Experiment, store: &Store, history: &History) -> PlanView {
    PlanView {
        experiment: exp.name.clone(),
        nodes: plan
            .nodes
            .iter()
            .map(|n| PlanRow::of(n, exp, store, history))
            .collect(),
        pending: plan.pending.clone(),
    }
}

/// The plan as a text table, one node per line.
pub fn render_plan(view: &PlanView) -> String {
    let mut out = String::new();
    let width = view
        .nodes
        .iter()
        .map(|r| r.node.len())
        .chain(view.pending.iter().map(|p| p.stage.len() + 3))
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(
        out,
        "{:<width$}  {:<9}  {:<12}  {:<8}  why",
        "node", "kind", "key", "status"
    );
    for r in &view.nodes {
        let (status, why) = match &r.status {
            Status::Cached => ("cached", String::new()),
            Status::Run(reason) => ("run", reason.to_string()),
        };
        let _ = writeln!(
            out,
            "{:<width$}  {:<9}  {:<12}  {:<8}  {why}",
            r.node,
            r.kind,
            &r.key[..12],
            status
        );
    }
    for p in &view.pending {
        let why = match &p.unresolved {
            Some(reason) => format!("sources not identified: {reason}"),
            None => format!("fan-out known once {} ran", p.waits_for.join(", ")),
        };
        let _ = writeln!(
            out,
            "{:<width$}  {:<9}  {:<12}  {:<8}  {why}",
            format!("{}[*]", p.stage),
            "",
            "",
            "pending",
        );
    }
    let cached = view.nodes.len() - view.to_run();
    let _ = writeln!(
        out,
        "\n{} nodes: {cached} cached, {} to run{}",
        view.nodes.len(),
        view.to_run(),
        if view.pending.is_empty() {
            String::new()
        } else {
            format!(", {} stages pending", view.pending.len())
        }
    );
    out
}

/// The run's `report.md`: outcome, summaries of reporting stages, expectations, failures.
pub fn markdown_report(exp: &Experiment, report: &RunReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# {}\n", exp.name);
    if !exp.description.is_empty() {
        let _ = writeln!(out, "{}\n", exp.description);
    }
    let ran = report
        .nodes
        .iter()
        .filter(|n| n.state == NodeState::Ran)
        .count();
    let cached = report
        .nodes
        .iter()
        .filter(|n| n.state == NodeState::Cached)
        .count();
    let _ = writeln!(
        out,
        "Outcome: **{}** ({} nodes: {ran} computed, {cached} cached; {:.1} s)\n",
        if report.success() {
            "success"
        } else if report.cancelled && report.record_errors.is_empty() {
            "interrupted"
        } else {
            "FAILED"
        },
        report.nodes.len(),
        report.seconds
    );
    for (node, summary) in &report.summaries {
        let _ = writeln!(out, "## {node}\n\n{}\n", summary.trim_end());
    }
    if !report.expectations.is_empty() {
        let _ = writeln!(
            out,
            "## Expectations\n\n| path | expected | actual | |\n|---|---|---|---|"
        );
        for c in &report.expectations {
            let actual = c
                .actual
                .map_or_else(|| "missing".to_string(), |a| format!("{a:.4}"));
            let mark = if c.pass {
                "ok".to_string()
            } else {
                format!("**MISSED** {}", c.note.clone().unwrap_or_default())
            };
            let _ = writeln!(out, "| `{}` | {} | {actual} | {mark} |", c.path, c.expected);
        }
        let _ = writeln!(out);
    }
    if !report.warnings.is_empty() {
        let _ = writeln!(out, "## Warnings\n");
        for w in &report.warnings {
            let nodes: Vec<String> = w.nodes.iter().map(|n| format!("`{n}`")).collect();
            let _ = write!(out, "- {}: {}", nodes.join(", "), w.message);
            match w.files.as_ref().and_then(|f| f.file_name()) {
                Some(dir) => {
                    let _ = writeln!(out, " (files: `{}/`)", dir.to_string_lossy());
                }
                None => {
                    let _ = writeln!(out);
                }
            }
        }
        let _ = writeln!(out);
    }
    let failures: Vec<_> = report.failures().collect();
    if !failures.is_empty() {
        let _ = writeln!(out, "## Failures\n");
        for f in failures {
            if let NodeState::Failed(e) = &f.state {
                // The whole error: its first line is often only a summary ("1 model(s)
                // failed:") of the lines that say which file.
                let _ = writeln!(
                    out,
                    "- `{}`: {}",
                    f.node,
                    e.trim_end().replace('\n', "\n  ")
                );
                let with: Vec<String> = report
                    .failed_with(&f.node)
                    .map(|n| format!("`{}`", n.node))
                    .collect();
                if !with.is_empty() {
                    let _ = writeln!(
                        out,
                        "  - {} more node(s) computed in the same pass failed with it: {}",
                        with.len(),
                        with.join(", ")
                    );
                }
            }
        }
    }
    out
}

/// `1.5 MiB`: a byte count for people.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
