//! The routing artifact: which tree each model of a mixed collection belongs to, as the
//! `route` stage writes it and `extract` (one node per tree) and `evaluate` read it. Its own
//! module so that readers of a routing need not depend on how it is fitted.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

use probex_fetch::discover::ModelSource;
use probex_weights::dataset::{LayerInfo, Split};

/// The artifact type of a routing.
pub const ARTIFACT: &str = "routing";
/// The routing table inside the artifact.
pub const FILE: &str = "routing.json";
/// The tree centres inside the artifact (`tree.{k}`, one vector each).
pub const CENTROIDS: &str = "centroids.safetensors";

/// Where one model went.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    /// Its tree; `None` when it belongs to no known tree.
    pub tree: Option<usize>,
    /// The nearest tree of its architecture, if there is any.
    pub nearest: Option<usize>,
    /// The distance from that tree's centre.
    pub distance: Option<f64>,
}

/// One architecture of a routed collection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Architecture {
    /// A digest of the sorted tensor names and shapes (12 hex digits).
    pub signature: String,
    /// How many tensors a model of it has.
    pub tensors: usize,
    /// How many weights.
    pub parameters: u64,
    /// The first model of it (for messages).
    pub example: String,
    /// The layers routing reads, concatenated in this order.
    pub layers: Vec<LayerInfo>,
    /// Every `stride`-th weight of the concatenation is compared.
    pub stride: usize,
    /// The length of a feature vector (after the stride).
    pub features: usize,
}

/// One tree of a routed collection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tree {
    /// Its index (the `tree` coordinate downstream).
    pub index: usize,
    /// Index into [`Routing::architectures`].
    pub architecture: usize,
    /// Training models that define it.
    pub train: usize,
    /// The largest distance of a training model from its centre.
    pub radius: f64,
    /// Models farther than this from its centre belong to no known tree.
    pub threshold: f64,
    /// The most common true tree among its training models, where truths are known.
    pub truth: Option<String>,
}

/// One model of a routed collection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutedModel {
    /// The model file, with its split filled in.
    pub model: ModelSource,
    /// Its true tree, where known (a metadata key or the collection it came from).
    pub truth: Option<String>,
    /// Index into [`Routing::architectures`].
    pub architecture: usize,
    /// Where it went.
    pub placement: Placement,
}

/// What the `route` stage writes: the trees, and every model with its tree.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    /// Format version.
    pub format: u32,
    /// The architectures, in order of first appearance.
    pub architectures: Vec<Architecture>,
    /// The trees, in order of their first training model.
    pub trees: Vec<Tree>,
    /// Every model, in collection order.
    pub models: Vec<RoutedModel>,
}

/// Reading or writing a routing failed.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct RoutingError {
    path: String,
    message: String,
}

fn err(path: &Path, message: impl Into<String>) -> RoutingError {
    RoutingError {
        path: path.display().to_string(),
        message: message.into(),
    }
}

impl Routing {
    /// Current format version.
    pub const FORMAT: u32 = 1;

    /// The models placed in tree `k`, as a collection `extract` can read.
    pub fn members(&self, k: usize) -> Vec<ModelSource> {
        self.models
            .iter()
            .filter(|m| m.placement.tree == Some(k))
            .map(|m| m.model.clone())
            .collect()
    }

    /// The true tree of each model id, where known.
    pub fn truths(&self) -> BTreeMap<&str, &str> {
        self.models
            .iter()
            .filter_map(|m| Some((m.model.id.as_str(), m.truth.as_deref()?)))
            .collect()
    }

    /// Writes `routing.json` and the centres (`centroids[k]` for tree `k`) into `dir`.
    pub fn save(&self, dir: &Path, centroids: &[Vec<f32>]) -> Result<(), RoutingError> {
        let path = dir.join(FILE);
        let json = serde_json::to_vec_pretty(self).map_err(|e| err(&path, e.to_string()))?;
        std::fs::write(&path, json).map_err(|e| err(&path, e.to_string()))?;
        let path = dir.join(CENTROIDS);
        let bytes: Vec<Vec<u8>> = centroids
            .iter()
            .map(|c| c.iter().flat_map(|v| v.to_le_bytes()).collect())
            .collect();
        let views = bytes
            .iter()
            .enumerate()
            .map(|(k, b)| {
                let view = TensorView::new(Dtype::F32, vec![b.len() / 4], b)
                    .map_err(|e| err(&path, e.to_string()))?;
                Ok((format!("tree.{k}"), view))
            })
            .collect::<Result<Vec<_>, RoutingError>>()?;
        safetensors::serialize_to_file(views, None, &path).map_err(|e| err(&path, e.to_string()))
    }

    /// Reads the routing table in artifact directory `dir` (paths as written).
    pub fn load(dir: &Path) -> Result<Routing, RoutingError> {
        let path = dir.join(FILE);
        let bytes = std::fs::read(&path).map_err(|e| err(&path, e.to_string()))?;
        let r: Routing = serde_json::from_slice(&bytes)
            .map_err(|e| err(&path, format!("not a routing table: {e}")))?;
        if r.format != Self::FORMAT {
            return Err(err(
                &path,
                format!(
                    "routing format {} is not supported; run its stage again",
                    r.format
                ),
            ));
        }
        let bad_arch = r.models.iter().map(|m| m.architecture);
        let bad_tree = r
            .models
            .iter()
            .flat_map(|m| [m.placement.tree, m.placement.nearest])
            .flatten();
        if bad_arch
            .chain(r.trees.iter().map(|t| t.architecture))
            .any(|a| a >= r.architectures.len())
            || bad_tree.into_iter().any(|t| t >= r.trees.len())
        {
            return Err(err(
                &path,
                "refers to a tree or architecture it does not list",
            ));
        }
        Ok(r)
    }

    /// Reads the centre of every tree from artifact directory `dir`.
    pub fn load_centroids(&self, dir: &Path) -> Result<Vec<Vec<f32>>, RoutingError> {
        let path = dir.join(CENTROIDS);
        let bytes = std::fs::read(&path).map_err(|e| err(&path, e.to_string()))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| err(&path, e.to_string()))?;
        self.trees
            .iter()
            .map(|t| {
                let name = format!("tree.{}", t.index);
                let v = st
                    .tensor(&name)
                    .map_err(|e| err(&path, format!("`{name}`: {e}")))?;
                let want = self.architectures[t.architecture].features;
                if v.dtype() != Dtype::F32 || v.shape() != [want] {
                    return Err(err(&path, format!("`{name}` is not {want} f32 values")));
                }
                Ok(v.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect())
            })
            .collect()
    }

    /// How well the routing matches the true trees, per split (models with a known truth).
    pub fn score(&self) -> Vec<SplitScore> {
        let tree_truth: Vec<Option<&str>> = self.trees.iter().map(|t| t.truth.as_deref()).collect();
        Split::ALL
            .iter()
            .filter_map(|&split| {
                let models: Vec<&RoutedModel> = self
                    .models
                    .iter()
                    .filter(|m| m.model.split == Some(split))
                    .collect();
                if models.is_empty() {
                    return None;
                }
                let known: Vec<&&RoutedModel> =
                    models.iter().filter(|m| m.truth.is_some()).collect();
                let correct = known
                    .iter()
                    .filter(|m| {
                        m.placement
                            .tree
                            .is_some_and(|k| tree_truth[k] == m.truth.as_deref())
                    })
                    .count();
                Some(SplitScore {
                    split,
                    models: models.len(),
                    rejected: models.iter().filter(|m| m.placement.tree.is_none()).count(),
                    accuracy: (!known.is_empty()).then(|| correct as f64 / known.len() as f64),
                })
            })
            .collect()
    }

    /// Counts of (true tree, assigned tree or `None`) over the models of `split`.
    pub fn confusion(&self, split: Split) -> BTreeMap<(String, Option<usize>), usize> {
        let mut m = BTreeMap::new();
        for r in self.models.iter().filter(|m| m.model.split == Some(split)) {
            let truth = r.truth.clone().unwrap_or_else(|| "?".into());
            *m.entry((truth, r.placement.tree)).or_default() += 1;
        }
        m
    }

    /// The confusion of `split` as a markdown table: true trees down, assigned trees across.
    pub fn confusion_table(&self, split: Split) -> String {
        let c = self.confusion(split);
        let truths: Vec<&String> = {
            let mut t: Vec<&String> = c.keys().map(|(t, _)| t).collect();
            t.dedup();
            t
        };
        let mut cols: Vec<Option<usize>> = (0..self.trees.len()).map(Some).collect();
        if c.keys().any(|(_, k)| k.is_none()) {
            cols.push(None);
        }
        let head = |k: &Option<usize>| match k {
            Some(k) => match &self.trees[*k].truth {
                Some(t) => format!("tree {k} ({t})"),
                None => format!("tree {k}"),
            },
            None => "no known tree".to_string(),
        };
        let mut out = format!(
            "| true tree \\ routed to | {} |\n|---|{}\n",
            cols.iter().map(head).collect::<Vec<_>>().join(" | "),
            "---:|".repeat(cols.len())
        );
        for t in truths {
            let cells: Vec<String> = cols
                .iter()
                .map(|k| c.get(&(t.clone(), *k)).copied().unwrap_or(0).to_string())
                .collect();
            out.push_str(&format!("| {t} | {} |\n", cells.join(" | ")));
        }
        out
    }
}

/// The routing of one split against the true trees.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SplitScore {
    /// The split.
    pub split: Split,
    /// Its models.
    pub models: usize,
    /// How many went to no known tree.
    pub rejected: usize,
    /// The share of models with a known truth routed to the tree whose training models mostly
    /// share it (rejections count as wrong); `None` when no truth is known.
    pub accuracy: Option<f64>,
}
