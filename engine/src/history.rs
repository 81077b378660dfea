//! What each node of an experiment was last computed from, so `plan` can say *why* a node will
//! run (cargo's fingerprints do the same for rebuilds).

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use probex_cache::Store;
use serde::{Deserialize, Serialize};

use crate::key::{KeyMaterial, param_changes};
use crate::plan::Node;

/// Records of one experiment's nodes, under the cache root.
pub struct History {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Record {
    node: String,
    key: String,
    material: KeyMaterial,
}

/// Whether a node is cached, and if not, why it will run.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "status", content = "reason", rename_all = "snake_case")]
pub enum Status {
    /// The cache holds a complete entry for the node's key.
    Cached,
    /// The node will run.
    Run(Reason),
}

/// Why a node will run.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "why", content = "details", rename_all = "snake_case")]
pub enum Reason {
    /// No record of this node in this experiment.
    NeverRun,
    /// These params changed (`path: old -> new`).
    ParamsChanged(Vec<String>),
    /// What a source stage reads changed.
    SourceChanged,
    /// The kind's version changed.
    KindVersionChanged {
        /// Version of the last run.
        from: u32,
        /// Current version.
        to: u32,
    },
    /// These upstream nodes changed.
    UpstreamChanged(Vec<String>),
    /// The key is unchanged but its entry failed verification and was quarantined.
    FailedVerification,
    /// The key is unchanged but the entry is gone (removed by `cache gc`, or never committed).
    EntryMissing,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NeverRun => write!(f, "never run"),
            Reason::ParamsChanged(c) => write!(f, "params changed: {}", c.join("; ")),
            Reason::SourceChanged => write!(f, "source changed"),
            Reason::KindVersionChanged { from, to } => {
                write!(f, "kind version changed ({from} -> {to})")
            }
            Reason::UpstreamChanged(u) => write!(f, "upstream changed: {}", u.join(", ")),
            Reason::FailedVerification => write!(f, "cache entry failed verification"),
            Reason::EntryMissing => write!(f, "cache entry missing (removed?)"),
        }
    }
}

impl History {
    /// The history of the experiment at `experiment` in the cache at `store`.
    pub fn open(store: &Store, experiment: &Path) -> History {
        let canonical = fs::canonicalize(experiment).unwrap_or_else(|_| experiment.to_path_buf());
        let id = blake3::hash(canonical.to_string_lossy().as_bytes()).to_hex();
        History {
            dir: store.root().join("history").join(&id.as_str()[..16]),
        }
    }

    fn file(&self, node: &str) -> PathBuf {
        let id = blake3::hash(node.as_bytes()).to_hex();
        self.dir.join(format!("{}.json", &id.as_str()[..16]))
    }

    /// Remembers what `node` was computed from. Failures are ignored: history only explains.
    pub fn record(&self, node: &Node) {
        let rec = Record {
            node: node.name.clone(),
            key: node.key.to_string(),
            material: node.material.clone(),
        };
        let Ok(bytes) = serde_json::to_vec(&rec) else {
            return;
        };
        if fs::create_dir_all(&self.dir).is_err() {
            return;
        }
        let path = self.file(&node.name);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if fs::write(&tmp, bytes).is_ok() {
            let _ = fs::rename(&tmp, &path);
        }
    }

    fn last(&self, node: &str) -> Option<Record> {
        let bytes = fs::read(self.file(node)).ok()?;
        serde_json::from_slice::<Record>(&bytes)
            .ok()
            .filter(|r| r.node == node)
    }

    /// Whether `node` is cached in `store`, and if not, why it will run.
    pub fn status(&self, store: &Store, node: &Node) -> Status {
        if matches!(store.get(&node.key), Ok(Some(_))) {
            return Status::Cached;
        }
        let Some(last) = self.last(&node.name) else {
            return Status::Run(Reason::NeverRun);
        };
        if last.key == node.key.to_string() {
            return Status::Run(if store.was_quarantined(&node.key) {
                Reason::FailedVerification
            } else {
                Reason::EntryMissing
            });
        }
        let (old, new) = (&last.material, &node.material);
        if old.version != new.version || old.kind != new.kind {
            return Status::Run(Reason::KindVersionChanged {
                from: old.version,
                to: new.version,
            });
        }
        let changes = param_changes(&old.params, &new.params);
        if !changes.is_empty() {
            return Status::Run(Reason::ParamsChanged(changes));
        }
        if old.identity != new.identity {
            return Status::Run(Reason::SourceChanged);
        }
        let mut upstream = Vec::new();
        for (slot, nodes) in &new.inputs {
            let before = old
                .inputs
                .iter()
                .find(|(s, _)| s == slot)
                .map(|(_, n)| n.as_slice())
                .unwrap_or(&[]);
            for (name, key) in nodes {
                if !before.iter().any(|(_, k)| k == key) {
                    upstream.push(name.clone());
                }
            }
        }
        if upstream.is_empty() {
            // Same material, different key: only possible if the key's encoding changed.
            return Status::Run(Reason::NeverRun);
        }
        Status::Run(Reason::UpstreamChanged(upstream))
    }
}
