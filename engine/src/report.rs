//! The schema of a run record's `status.json`: how every node of a run ended, the
//! expectations checked, what the stages warned about. The run loop (`run.rs`) writes it;
//! readers (`probex search`, `describe` and `route` find their artifacts through it) read it
//! back with [`RunReport::read`], so writer and reader cannot disagree on a field.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::expect::Checked;
use crate::record::files;

/// How one node ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", content = "detail", rename_all = "snake_case")]
pub enum NodeState {
    /// Found in the cache.
    Cached,
    /// Computed in this run.
    Ran,
    /// Failed, with the error.
    Failed(String),
    /// Failed because the node named here failed: they were computed in one pass (a batching
    /// stage such as `extract`), and that node's error says why.
    FailedWith(String),
    /// Not run because an upstream node failed.
    Skipped(String),
    /// Not run because the run stopped first (or stopped before it finished, because another
    /// node failed).
    NotRun,
    /// Running when the run was interrupted (Ctrl-C, SIGTERM): not failed, not finished; the
    /// next run computes it again, resuming from its checkpoint where the kind keeps one.
    Interrupted,
}

impl NodeState {
    /// Whether the node's artifact is in the cache: it was found there or computed.
    pub fn finished(&self) -> bool {
        matches!(self, NodeState::Cached | NodeState::Ran)
    }
}

/// One node of a finished run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeReport {
    /// Node name.
    pub node: String,
    /// Declared stage.
    pub stage: String,
    /// Stage kind.
    pub kind: String,
    /// Key.
    pub key: String,
    /// How it ended.
    #[serde(flatten)]
    pub state: NodeState,
    /// Seconds spent computing it in this run (0 when cached).
    #[serde(default)]
    pub seconds: f64,
    /// Its log, if it ran.
    #[serde(default)]
    pub log: Option<PathBuf>,
    /// The GPU it ran on in this run, when the executor gave it one (`cuda:1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// One warning of the nodes a run used, with every node that gave it (a layer sweep leaves
/// the same models out of every layer).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Warning {
    /// What the stage said.
    pub message: String,
    /// The nodes that said it, in plan order.
    pub nodes: Vec<String>,
    /// Where the first of them published its files in the run record, if it published any
    /// (a list of what was left out).
    pub files: Option<PathBuf>,
}

/// The outcome of a run: what `status.json` holds.
///
/// Fields beyond the nodes and the cache read as empty when absent, so that records written
/// before a field existed still read.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunReport {
    /// The run directory.
    #[serde(default)]
    pub run_dir: PathBuf,
    /// The cache the run read and wrote, so a run record names where its artifacts are
    /// (`probex search`, `describe` and `report` follow it from a run directory).
    pub cache: PathBuf,
    /// Every node, in plan order.
    pub nodes: Vec<NodeReport>,
    /// Stages that never expanded (their inputs failed).
    #[serde(default)]
    pub never_planned: Vec<String>,
    /// Expectations checked.
    #[serde(default)]
    pub expectations: Vec<Checked>,
    /// Summaries of reporting nodes: (node, text).
    #[serde(default)]
    pub summaries: Vec<(String, String)>,
    /// Whether the user stopped the run.
    #[serde(default)]
    pub cancelled: bool,
    /// Wall time in seconds.
    #[serde(default)]
    pub seconds: f64,
    /// What the stages of the nodes used warned about, one entry per distinct message.
    #[serde(default)]
    pub warnings: Vec<Warning>,
    /// Parts of the run record that could not be written (a full disk, a vanished directory):
    /// a run with an incomplete record has failed, whatever its nodes did.
    #[serde(default)]
    pub record_errors: Vec<String>,
}

/// Why a run record's `status.json` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// There is no `status.json` (not a run directory).
    #[error("{}: not a run directory (no {})", .0.display(), files::STATUS)]
    Missing(PathBuf),
    /// It could not be read.
    #[error("reading {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not a run record.
    #[error("{}: not a probex run record: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
}

impl RunReport {
    /// Reads the `status.json` of the run directory `run`.
    pub fn read(run: &Path) -> Result<RunReport, ReadError> {
        let path = run.join(files::STATUS);
        if !path.is_file() {
            return Err(ReadError::Missing(run.to_path_buf()));
        }
        let bytes = std::fs::read(&path).map_err(|source| ReadError::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| ReadError::Parse { path, source })
    }

    /// True when every node finished and every expectation held.
    pub fn success(&self) -> bool {
        !self.cancelled
            && self.record_errors.is_empty()
            && self.never_planned.is_empty()
            && self.nodes.iter().all(|n| n.state.finished())
            && self.expectations.iter().all(|c| c.pass)
    }

    /// Nodes that failed with an error of their own.
    pub fn failures(&self) -> impl Iterator<Item = &NodeReport> {
        self.nodes
            .iter()
            .filter(|n| matches!(n.state, NodeState::Failed(_)))
    }

    /// The nodes that failed with `node` (computed in the same pass), in plan order.
    pub fn failed_with<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a NodeReport> {
        self.nodes
            .iter()
            .filter(move |n| matches!(&n.state, NodeState::FailedWith(w) if w == node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every state, and every field of a report, survives writing and reading back.
    #[test]
    fn a_report_reads_back_as_written() {
        let states = [
            NodeState::Cached,
            NodeState::Ran,
            NodeState::Failed("boom".into()),
            NodeState::FailedWith("a".into()),
            NodeState::Skipped("input a failed".into()),
            NodeState::NotRun,
            NodeState::Interrupted,
        ];
        let report = RunReport {
            run_dir: "runs/x/1".into(),
            cache: "/cache".into(),
            nodes: states
                .iter()
                .enumerate()
                .map(|(i, s)| NodeReport {
                    node: format!("n[i={i}]"),
                    stage: "n".into(),
                    kind: "k".into(),
                    key: "0".repeat(64),
                    state: s.clone(),
                    seconds: i as f64,
                    log: (i % 2 == 0).then(|| format!("logs/{i}.log").into()),
                    device: (i == 1).then(|| "cuda:1".into()),
                })
                .collect(),
            never_planned: vec!["later".into()],
            expectations: vec![Checked {
                path: "n.value".into(),
                expected: "> 1".into(),
                actual: Some(0.5),
                pass: false,
                note: Some("too small".into()),
            }],
            summaries: vec![("n".into(), "| a |".into())],
            cancelled: true,
            seconds: 1.5,
            warnings: vec![Warning {
                message: "2 models left out".into(),
                nodes: vec!["n[i=0]".into()],
                files: Some("runs/x/1/n".into()),
            }],
            record_errors: vec!["disk full".into()],
        };
        let json = serde_json::to_string(&report).unwrap();
        let back: RunReport = serde_json::from_str(&json).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
        let got: Vec<&NodeState> = back.nodes.iter().map(|n| &n.state).collect();
        assert_eq!(got, states.iter().collect::<Vec<_>>());
        // The state is flattened into the node, as readers of status.json expect.
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["nodes"][2]["state"], "failed");
        assert_eq!(v["nodes"][2]["detail"], "boom");
        assert_eq!(v["nodes"][0]["state"], "cached");
        assert_eq!(v["nodes"][1]["device"], "cuda:1");
        assert!(v["nodes"][0].get("device").is_none(), "absent, not null");
    }

    /// Records with only the nodes and the cache (older probex, hand-written fixtures) read.
    #[test]
    fn a_minimal_record_reads() {
        let r: RunReport = serde_json::from_str(
            r#"{"cache": "/c", "nodes": [{"node": "b", "stage": "b", "kind": "select",
                "key": "k", "state": "cached"}]}"#,
        )
        .unwrap();
        assert_eq!(r.nodes[0].state, NodeState::Cached);
        assert!(r.success());
    }
}
