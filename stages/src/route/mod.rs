//! Tree experts: finding the model trees in a mixed collection and routing models to them.
//!
//! Learning on weights works within one model tree (models fine-tuned from one base) and fails
//! across trees, so a mixed collection is first split into its trees, and each tree gets its
//! own expert probes. The router works in two steps, as the paper's does: architectures
//! separate first (models with other tensors cannot share a tree), then, within one
//! architecture, average-linkage clustering of the training models' weights finds the trees.
//! A new model goes to the tree whose centre (the mean of its training models) is nearest, or
//! to no known tree when it is farther from every centre than that tree's threshold, which is
//! calibrated on validation models.
//!
//! [`fit`] is the algorithm on plain vectors; [`Routing`] is the artifact the `route` stage
//! writes and `extract` and `evaluate` read.

pub mod cluster;
pub mod stage;

use std::path::Path;

use sha2::{Digest, Sha256};

use probex_engine::cache::hex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use crate::routing::{
    ARTIFACT, Architecture, CENTROIDS, FILE, Placement, RoutedModel, Routing, RoutingError,
    SplitScore, Tree,
};
use probex_weights::Header;
use probex_weights::dataset::Split;

/// The most trees `trees = "auto"` considers in one architecture.
pub const MAX_AUTO_TREES: usize = 32;

/// The default [`Settings::min_silhouette`]: "strong structure" on Kaufman and Rousseeuw's
/// scale. Three mini trees mixed score 0.84-0.85; the best split of one mini tree, whose
/// fine-tunes spread unevenly around their base, 0.49-0.54.
pub const DEFAULT_MIN_SILHOUETTE: f64 = 0.7;

/// Why trees cannot be fitted: settings out of range, or points that give nothing to fit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FitError {
    /// `min_silhouette` outside (0, 1).
    #[error(
        "`min_silhouette` = {0}: use a number between 0 and 1 (default {DEFAULT_MIN_SILHOUETTE})"
    )]
    MinSilhouette(f64),
    /// `margin` below 1 (or not a number).
    #[error("`margin` = {0}: use a number >= 1")]
    Margin(f64),
    /// No point in the training split.
    #[error("no training models: the trees are found among the training split")]
    NoTraining,
    /// Points of one architecture with different feature lengths.
    #[error("point {point} has {found} features where its architecture has {expected}")]
    FeatureLength {
        /// The point's position.
        point: usize,
        /// Its feature count.
        found: usize,
        /// Its architecture's.
        expected: usize,
    },
    /// `trees = k` with fewer trees than architectures.
    #[error(
        "`trees` = {trees}, but the training models have {archs} architectures and each is at \
         least one tree"
    )]
    FewerTreesThanArchitectures {
        /// The requested count.
        trees: usize,
        /// The architectures among the training models.
        archs: usize,
    },
    /// `trees = k` with more trees than training models.
    #[error("`trees` = {trees}, but there are only {models} training models")]
    MoreTreesThanModels {
        /// The requested count.
        trees: usize,
        /// The training models.
        models: usize,
    },
}

/// Checks a [`Settings::min_silhouette`].
pub fn check_min_silhouette(v: f64) -> Result<(), FitError> {
    if v.is_finite() && v > 0.0 && v < 1.0 {
        Ok(())
    } else {
        Err(FitError::MinSilhouette(v))
    }
}

/// How many trees to find.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TreeCount {
    /// Within each architecture, cut the dendrogram where the clusters are best separated (the
    /// highest mean silhouette over 2 to [`MAX_AUTO_TREES`] clusters); one tree when even that
    /// cut scores below [`Settings::min_silhouette`].
    #[default]
    Auto,
    /// Exactly this many trees in all (each architecture is at least one).
    Fixed(usize),
}

impl Serialize for TreeCount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TreeCount::Auto => s.serialize_str("auto"),
            TreeCount::Fixed(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for TreeCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = TreeCount;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number of trees (at least 1) or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<TreeCount, E> {
                match usize::try_from(v) {
                    Ok(n) if n >= 1 => Ok(TreeCount::Fixed(n)),
                    _ => Err(E::custom(format!(
                        "{v} trees: give at least 1, or \"auto\""
                    ))),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<TreeCount, E> {
                match u64::try_from(v) {
                    Ok(u) => self.visit_u64(u),
                    Err(_) => Err(E::custom(format!(
                        "{v} trees: give at least 1, or \"auto\""
                    ))),
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TreeCount, E> {
                if v == "auto" {
                    Ok(TreeCount::Auto)
                } else {
                    Err(E::custom(format!(
                        "`{v}`: expected a number of trees or \"auto\""
                    )))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// The clustering and calibration settings of [`fit`].
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// How many trees.
    pub trees: TreeCount,
    /// With [`TreeCount::Auto`]: the mean silhouette a cut must reach to split an
    /// architecture into several trees.
    pub min_silhouette: f64,
    /// A tree's threshold is `margin` times the distance of its farthest training or
    /// validation model from its centre.
    pub margin: f64,
}

/// One model as [`fit`] sees it.
#[derive(Clone, Copy, Debug)]
pub struct Point<'a> {
    /// Its architecture (an index; models of different architectures never share a tree).
    pub arch: usize,
    /// Its split: training models define the trees, validation models calibrate thresholds.
    pub split: Split,
    /// Its weights (the routing layers, concatenated and sampled).
    pub features: &'a [f32],
}

/// A tree found by [`fit`].
#[derive(Clone, Debug, PartialEq)]
pub struct FittedTree {
    /// Its architecture.
    pub arch: usize,
    /// The mean of its training models.
    pub centroid: Vec<f32>,
    /// The largest distance of one of its training models from the centroid.
    pub radius: f64,
    /// Models farther than this from the centroid are not of this tree.
    pub threshold: f64,
    /// Its training models (point indices).
    pub members: Vec<usize>,
}

/// The trees of a set of points and the placement of every point.
#[derive(Clone, Debug)]
pub struct Fit {
    /// Trees in order of their first training model.
    pub trees: Vec<FittedTree>,
    /// One placement per point, in input order.
    pub placements: Vec<Placement>,
    /// With [`TreeCount::Auto`], per architecture (in order of first training model): the
    /// best cut's mean silhouette, `None` when there were too few models to judge one.
    pub silhouettes: Vec<Option<f64>>,
}

/// Finds trees among the training points and places every point.
///
/// Training points go to the tree their cluster became; every other point goes to the nearest
/// tree centre of its architecture if it lies within that tree's threshold. Deterministic.
pub fn fit(points: &[Point], s: &Settings) -> Result<Fit, FitError> {
    if !(s.margin.is_finite() && s.margin >= 1.0) {
        return Err(FitError::Margin(s.margin));
    }
    check_min_silhouette(s.min_silhouette)?;
    let archs = training_by_arch(points)?;
    let (distances, dendrograms) = dendrograms(points, &archs, s.trees == TreeCount::Auto);
    let mut silhouettes = Vec::new();
    let applied = match s.trees {
        TreeCount::Auto => auto_cuts(&distances, &dendrograms, s, &mut silhouettes),
        TreeCount::Fixed(k) => fixed_cuts(k, &archs, &dendrograms)?,
    };
    let mut trees = cut_trees(points, &archs, &dendrograms, &applied);
    let mut tree_of = vec![None; points.len()];
    for (k, t) in trees.iter().enumerate() {
        for &i in &t.members {
            tree_of[i] = Some(k);
        }
    }
    let nearest = |p: &Point| -> Option<(usize, f64)> {
        trees
            .iter()
            .enumerate()
            .filter(|(_, t)| t.arch == p.arch && t.centroid.len() == p.features.len())
            .map(|(k, t)| (k, distance(p.features, &t.centroid)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
    };
    let near: Vec<Option<(usize, f64)>> = points.iter().map(nearest).collect();
    calibrate(&mut trees, points, &near, s.margin);
    let placements = place(points, &trees, &tree_of, &near);
    Ok(Fit {
        trees,
        placements,
        silhouettes,
    })
}

/// Training points by architecture, architectures in order of first appearance; an error when
/// there are none, or when one architecture's points differ in length.
fn training_by_arch(points: &[Point]) -> Result<Vec<(usize, Vec<usize>)>, FitError> {
    let mut archs: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, p) in points.iter().enumerate() {
        if p.split != Split::Train {
            continue;
        }
        match archs.iter_mut().find(|(a, _)| *a == p.arch) {
            Some((_, m)) => m.push(i),
            None => archs.push((p.arch, vec![i])),
        }
    }
    if archs.is_empty() {
        return Err(FitError::NoTraining);
    }
    for (_, members) in &archs {
        let d = points[members[0]].features.len();
        if let Some(&bad) = members.iter().find(|&&i| points[i].features.len() != d) {
            return Err(FitError::FeatureLength {
                point: bad,
                found: points[bad].features.len(),
                expected: d,
            });
        }
    }
    Ok(archs)
}

/// The pairwise distances (kept only with `auto`, which judges cuts by them) and the dendrogram
/// of each architecture's training points.
type Dendrograms = (Vec<Option<Vec<f64>>>, Vec<Vec<cluster::Merge>>);

/// The dendrogram of each architecture, and with `auto` the distances that judge its cuts.
fn dendrograms(points: &[Point], archs: &[(usize, Vec<usize>)], auto: bool) -> Dendrograms {
    archs
        .iter()
        .map(|(_, members)| {
            let d = points[members[0]].features.len();
            let rows: Vec<f32> = members
                .iter()
                .flat_map(|&i| points[i].features.iter().copied())
                .collect();
            let n = members.len();
            let dist = cluster::pairwise_distances(&rows, n, d);
            (
                auto.then(|| dist.clone()),
                cluster::average_linkage(dist, n),
            )
        })
        .unzip()
}

/// With `trees = "auto"`: how many merges each architecture applies (the best silhouette cut
/// when it reaches `min_silhouette`, else all: one tree); each best score goes to
/// `silhouettes`.
fn auto_cuts(
    distances: &[Option<Vec<f64>>],
    dendrograms: &[Vec<cluster::Merge>],
    s: &Settings,
    silhouettes: &mut Vec<Option<f64>>,
) -> Vec<usize> {
    distances
        .iter()
        .zip(dendrograms)
        .map(|(dist, m)| {
            let n = m.len() + 1;
            let best = dist
                .as_deref()
                .and_then(|d| cluster::best_silhouette_cut(d, m, n, MAX_AUTO_TREES));
            silhouettes.push(best.map(|(_, score)| score));
            match best {
                Some((apply, score)) if score >= s.min_silhouette => apply,
                _ => m.len(),
            }
        })
        .collect()
}

/// With `trees = k`: how many merges each architecture applies so that `k` trees remain, the
/// globally lowest merges first.
fn fixed_cuts(
    k: usize,
    archs: &[(usize, Vec<usize>)],
    dendrograms: &[Vec<cluster::Merge>],
) -> Result<Vec<usize>, FitError> {
    let total: usize = archs.iter().map(|(_, m)| m.len()).sum();
    if k < archs.len() {
        return Err(FitError::FewerTreesThanArchitectures {
            trees: k,
            archs: archs.len(),
        });
    }
    if k > total {
        return Err(FitError::MoreTreesThanModels {
            trees: k,
            models: total,
        });
    }
    // The globally lowest merges, architecture by architecture (each list is sorted).
    let mut all: Vec<(f64, usize)> = dendrograms
        .iter()
        .enumerate()
        .flat_map(|(a, m)| m.iter().map(move |m| (m.height, a)))
        .collect();
    all.sort_by(|x, y| x.0.total_cmp(&y.0));
    let mut applied = vec![0; archs.len()];
    for &(_, a) in all.iter().take(total - k) {
        applied[a] += 1;
    }
    Ok(applied)
}

/// The trees the cuts leave, ordered by their first training point; each threshold is still its
/// radius ([`calibrate`] sets it).
fn cut_trees(
    points: &[Point],
    archs: &[(usize, Vec<usize>)],
    dendrograms: &[Vec<cluster::Merge>],
    applied: &[usize],
) -> Vec<FittedTree> {
    let mut trees: Vec<FittedTree> = Vec::new();
    for (((arch, members), merges), &apply) in archs.iter().zip(dendrograms).zip(applied) {
        let labels = cluster::cut(members.len(), merges, apply);
        let count = labels.iter().max().map_or(0, |&l| l + 1);
        for c in 0..count {
            let m: Vec<usize> = members
                .iter()
                .zip(&labels)
                .filter(|&(_, &l)| l == c)
                .map(|(&i, _)| i)
                .collect();
            let centroid = mean(points, &m);
            let radius = m
                .iter()
                .map(|&i| distance(points[i].features, &centroid))
                .fold(0.0, f64::max);
            trees.push(FittedTree {
                arch: *arch,
                centroid,
                radius,
                threshold: radius,
                members: m,
            });
        }
    }
    trees.sort_by_key(|t| t.members[0]);
    trees
}

/// Thresholds: the farthest training or validation model of each tree (validation models by
/// their nearest tree, `near`), times `margin`.
fn calibrate(
    trees: &mut [FittedTree],
    points: &[Point],
    near: &[Option<(usize, f64)>],
    margin: f64,
) {
    let mut reach: Vec<f64> = trees.iter().map(|t| t.radius).collect();
    for (p, n) in points.iter().zip(near) {
        if matches!(p.split, Split::Val | Split::ValHoldout)
            && let Some((k, d)) = n
        {
            reach[*k] = reach[*k].max(*d);
        }
    }
    for (t, r) in trees.iter_mut().zip(&reach) {
        t.threshold = margin * r;
    }
}

/// Every point's placement: training points in their own tree, the others in their nearest
/// tree when within its threshold.
fn place(
    points: &[Point],
    trees: &[FittedTree],
    tree_of: &[Option<usize>],
    near: &[Option<(usize, f64)>],
) -> Vec<Placement> {
    points
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if let Some(k) = tree_of[i] {
                let d = distance(p.features, &trees[k].centroid);
                return Placement {
                    tree: Some(k),
                    nearest: Some(k),
                    distance: Some(d),
                };
            }
            match near[i] {
                Some((k, d)) => Placement {
                    tree: (d <= trees[k].threshold).then_some(k),
                    nearest: Some(k),
                    distance: Some(d),
                },
                None => Placement {
                    tree: None,
                    nearest: None,
                    distance: None,
                },
            }
        })
        .collect()
}

fn mean(points: &[Point], members: &[usize]) -> Vec<f32> {
    let d = points[members[0]].features.len();
    let mut acc = vec![0.0f64; d];
    for &i in members {
        for (a, &v) in acc.iter_mut().zip(points[i].features) {
            *a += v as f64;
        }
    }
    acc.iter()
        .map(|&a| (a / members.len() as f64) as f32)
        .collect()
}

/// The Euclidean distance of two equally long vectors.
pub fn distance(a: &[f32], b: &[f32]) -> f64 {
    cluster::squared_distance(a, b).sqrt()
}

/// Every `stride`-th of `features`: the coordinates routing compares when `sample` is smaller
/// than the routing layers. The stride is `ceil(len / sample)`, so at most `sample` remain.
pub fn stride_for(len: usize, sample: usize) -> usize {
    if sample == 0 || len <= sample {
        1
    } else {
        len.div_ceil(sample)
    }
}

/// A digest of the sorted tensor names and shapes: equal for models of one architecture
/// whatever their dtype or metadata.
pub(crate) fn signature(h: &Header) -> (String, usize, u64) {
    let mut hasher = Sha256::new();
    let mut parameters = 0u64;
    for t in &h.tensors {
        hasher.update(t.name.as_bytes());
        hasher.update(format!("{:?};", t.shape).as_bytes());
        parameters += t.numel() as u64;
    }
    (
        hex::encode(&hasher.finalize()[..6]),
        h.tensors.len(),
        parameters,
    )
}

/// A router read back from a `route` artifact: it places model files that were not in the
/// collection it was fitted on (`probex route`).
#[derive(Debug)]
pub struct Router {
    /// Where it came from, for messages (`router` in a run, or the directory).
    pub name: String,
    /// The routing it was fitted as.
    pub routing: Routing,
    centroids: Vec<Vec<f32>>,
}

/// Where [`Router::place`] put a model file.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// Its architecture among the router's, if it has one of them.
    pub architecture: Option<usize>,
    /// Its tree (or none), the nearest tree and the distance from its centre.
    pub placement: Placement,
}

impl Router {
    /// Opens the `route` artifact in `dir`.
    pub fn open(dir: &Path, name: impl Into<String>) -> anyhow::Result<Router> {
        let routing = Routing::load(dir)?;
        let centroids = routing.load_centroids(dir)?;
        Ok(Router {
            name: name.into(),
            routing,
            centroids,
        })
    }

    /// Finds a router at `path`: a `route` artifact directory (or a cache entry holding one in
    /// `data/`), or a run directory with one `route` node (`stage` picks one of several).
    pub fn locate(path: &Path, stage: Option<&str>) -> anyhow::Result<Router> {
        for dir in [path.to_path_buf(), path.join("data")] {
            if dir.join(FILE).is_file() {
                return Router::open(&dir, dir.display().to_string());
            }
        }
        let found = crate::probe::finished_nodes(path, &["route"], stage)?;
        let (n, dir) =
            crate::probe::only_one(found, path, stage, "`route` node", |(n, _)| n.node.as_str())?;
        Router::open(&dir, n.node)
    }

    /// Places the model file at `model`: the nearest tree of its architecture if it lies within
    /// that tree's threshold, else no known tree.
    pub fn place(&self, model: &Path) -> anyhow::Result<Verdict> {
        let header = probex_weights::reader::read_header(model)?;
        let full = probex_weights::partial::original(&header)
            .map_err(|m| anyhow::anyhow!("{}: {m}", model.display()))?
            .unwrap_or(header);
        let (sig, _, _) = signature(&full);
        let Some(a) = self
            .routing
            .architectures
            .iter()
            .position(|x| x.signature == sig)
        else {
            return Ok(Verdict {
                architecture: None,
                placement: Placement {
                    tree: None,
                    nearest: None,
                    distance: None,
                },
            });
        };
        let features = features_of(&self.routing.architectures[a], model)?;
        let nearest = self
            .routing
            .trees
            .iter()
            .filter(|t| t.architecture == a)
            .map(|t| (t, distance(&features, &self.centroids[t.index])))
            .min_by(|x, y| x.1.total_cmp(&y.1));
        Ok(Verdict {
            architecture: Some(a),
            placement: match nearest {
                Some((t, d)) => Placement {
                    tree: (d <= t.threshold).then_some(t.index),
                    nearest: Some(t.index),
                    distance: Some(d),
                },
                None => Placement {
                    tree: None,
                    nearest: None,
                    distance: None,
                },
            },
        })
    }
}

/// The feature vector of the model file at `path` for architecture `arch`: its routing
/// layers, concatenated, every `stride`-th weight. What the trees were fitted on, and what
/// places a new model.
pub fn features_of(
    arch: &Architecture,
    path: &Path,
) -> Result<Vec<f32>, probex_weights::WeightsError> {
    let mut v = Vec::new();
    for layer in &arch.layers {
        v.extend(crate::extract::read_matrix(path, layer)?);
    }
    Ok(v.into_iter().step_by(arch.stride).collect())
}

#[cfg(test)]
mod tests;
