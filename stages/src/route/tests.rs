//! Clustering and routing on constructed trees: bases far apart, fine-tunes near their base.

use super::*;
use probex_weights::rng::StreamRng;

/// `per` models of each base: `base + spread * noise`, with splits cycling train x3, val, test.
struct Trees {
    vectors: Vec<Vec<f32>>,
    splits: Vec<Split>,
    truth: Vec<usize>,
    archs: Vec<usize>,
}

fn base(rng: &mut StreamRng, d: usize, scale: f32) -> Vec<f32> {
    (0..d).map(|_| scale * rng.normal()).collect()
}

fn tune(rng: &mut StreamRng, base: &[f32], spread: f32) -> Vec<f32> {
    base.iter().map(|&b| b + spread * rng.normal()).collect()
}

fn trees(bases: &[Vec<f32>], per: usize, spread: f32, seed: u64) -> Trees {
    let mut rng = StreamRng::new(seed);
    let cycle = [
        Split::Train,
        Split::Train,
        Split::Train,
        Split::Val,
        Split::Test,
    ];
    let mut t = Trees {
        vectors: Vec::new(),
        splits: Vec::new(),
        truth: Vec::new(),
        archs: Vec::new(),
    };
    for (b, v) in bases.iter().enumerate() {
        for i in 0..per {
            t.vectors.push(tune(&mut rng, v, spread));
            t.splits.push(cycle[i % cycle.len()]);
            t.truth.push(b);
            t.archs.push(v.len());
        }
    }
    t
}

fn points(t: &Trees) -> Vec<Point<'_>> {
    t.vectors
        .iter()
        .zip(&t.splits)
        .zip(&t.archs)
        .map(|((v, &split), &arch)| Point {
            arch,
            split,
            features: v,
        })
        .collect()
}

fn settings(trees: TreeCount) -> Settings {
    Settings {
        trees,
        min_silhouette: DEFAULT_MIN_SILHOUETTE,
        margin: 1.5,
    }
}

fn three_bases(d: usize) -> Vec<Vec<f32>> {
    let mut rng = StreamRng::new(7);
    (0..3).map(|_| base(&mut rng, d, 1.0)).collect()
}

#[test]
fn auto_finds_three_trees_and_routes_every_test_model_home() {
    let t = trees(&three_bases(400), 30, 0.05, 1);
    let fit = fit(&points(&t), &settings(TreeCount::Auto)).unwrap();
    assert_eq!(fit.trees.len(), 3);
    // Trees are numbered by their first training model: tree k is base k here.
    for (i, p) in fit.placements.iter().enumerate() {
        assert_eq!(p.tree, Some(t.truth[i]), "model {i} ({:?})", t.splits[i]);
    }
    for tree in &fit.trees {
        assert_eq!(tree.members.len(), 18);
        assert!(tree.threshold >= 1.5 * tree.radius);
    }
}

#[test]
fn a_fixed_count_merges_the_closest_trees_first() {
    // Base 2 is a small step from base 0: asked for two trees, those two become one.
    let mut bases = three_bases(200);
    bases[2] = bases[0].iter().map(|v| v + 0.3).collect();
    let t = trees(&bases, 20, 0.02, 2);
    let three = fit(&points(&t), &settings(TreeCount::Fixed(3))).unwrap();
    assert_eq!(three.trees.len(), 3);
    let two = fit(&points(&t), &settings(TreeCount::Fixed(2))).unwrap();
    assert_eq!(two.trees.len(), 2);
    for (i, p) in two.placements.iter().enumerate() {
        let want = if t.truth[i] == 1 { 1 } else { 0 };
        assert_eq!(p.tree, Some(want), "model {i}");
    }
}

#[test]
fn a_model_from_an_unseen_tree_is_rejected() {
    let bases = three_bases(300);
    let t = trees(&bases, 25, 0.05, 3);
    let mut rng = StreamRng::new(99);
    let outsider_base = base(&mut rng, 300, 1.0);
    let outsiders: Vec<Vec<f32>> = (0..5)
        .map(|_| tune(&mut rng, &outsider_base, 0.05))
        .collect();
    // A sibling of tree 1 that was not in the collection is accepted.
    let sibling = tune(&mut rng, &bases[1], 0.05);
    let mut pts = points(&t);
    for o in &outsiders {
        pts.push(Point {
            arch: 300,
            split: Split::Test,
            features: o,
        });
    }
    pts.push(Point {
        arch: 300,
        split: Split::Test,
        features: &sibling,
    });
    let fit = fit(&pts, &settings(TreeCount::Auto)).unwrap();
    assert_eq!(fit.trees.len(), 3);
    let n = t.vectors.len();
    for p in &fit.placements[n..n + 5] {
        assert_eq!(p.tree, None, "an outsider was accepted: {p:?}");
        let k = p.nearest.expect("a nearest tree is still reported");
        assert!(p.distance.unwrap() > fit.trees[k].threshold);
    }
    assert_eq!(fit.placements[n + 5].tree, Some(1));
}

#[test]
fn validation_models_widen_the_threshold() {
    let bases = three_bases(100);
    let mut t = trees(&bases, 15, 0.05, 4);
    let first = fit(&points(&t), &settings(TreeCount::Auto)).unwrap();
    // Push one validation model of tree 0 further out than any training model.
    let v = t.splits.iter().position(|&s| s == Split::Val).unwrap();
    let mut rng = StreamRng::new(5);
    t.vectors[v] = tune(&mut rng, &bases[0], 0.15);
    let second = fit(&points(&t), &settings(TreeCount::Auto)).unwrap();
    let d = second.placements[v].distance.unwrap();
    assert!(
        d > first.trees[0].threshold / 1.5,
        "the test needs a far validation model"
    );
    assert!((second.trees[0].threshold - 1.5 * d).abs() < 1e-9);
    assert_eq!(second.placements[v].tree, Some(0));
}

#[test]
fn auto_keeps_one_tree_whole() {
    let mut rng = StreamRng::new(11);
    let t = trees(&[base(&mut rng, 60, 1.0)], 40, 0.05, 12);
    let fit = fit(&points(&t), &settings(TreeCount::Auto)).unwrap();
    assert_eq!(fit.trees.len(), 1);
    assert!(fit.placements.iter().all(|p| p.tree == Some(0)));
}

#[test]
fn architectures_never_share_a_tree() {
    // Two architectures (feature lengths 50 and 80), one tree each, close in value.
    let mut rng = StreamRng::new(8);
    let a = base(&mut rng, 50, 0.01);
    let b = base(&mut rng, 80, 0.01);
    let t = trees(&[a, b], 20, 0.05, 6);
    let fit_auto = fit(&points(&t), &settings(TreeCount::Auto)).unwrap();
    assert_eq!(fit_auto.trees.len(), 2);
    assert_eq!(fit_auto.trees[0].arch, 50);
    assert_eq!(fit_auto.trees[1].arch, 80);
    for (i, p) in fit_auto.placements.iter().enumerate() {
        assert_eq!(p.tree, Some(t.truth[i]));
    }
    let e = fit(&points(&t), &settings(TreeCount::Fixed(1))).unwrap_err();
    assert_eq!(
        e,
        FitError::FewerTreesThanArchitectures { trees: 1, archs: 2 }
    );
    assert!(e.to_string().contains("2 architectures"), "{e}");
}

#[test]
fn a_model_of_an_architecture_without_training_models_goes_nowhere() {
    let t = trees(&three_bases(60), 10, 0.05, 9);
    let mut pts = points(&t);
    let odd = vec![0.0f32; 7];
    pts.push(Point {
        arch: 7,
        split: Split::Test,
        features: &odd,
    });
    let fit = fit(&pts, &settings(TreeCount::Auto)).unwrap();
    let last = fit.placements.last().unwrap();
    assert_eq!((last.tree, last.nearest, last.distance), (None, None, None));
}

#[test]
fn bad_settings_and_counts_are_errors() {
    let t = trees(&three_bases(20), 5, 0.05, 10);
    let pts = points(&t);
    let mut s = settings(TreeCount::Auto);
    s.margin = 0.5;
    assert_eq!(fit(&pts, &s).unwrap_err(), FitError::Margin(0.5));
    for bad in [0.0, 1.0, f64::NAN] {
        let mut s = settings(TreeCount::Auto);
        s.min_silhouette = bad;
        let e = fit(&pts, &s).unwrap_err();
        assert!(matches!(e, FitError::MinSilhouette(_)), "{bad}: {e}");
        assert!(e.to_string().contains("min_silhouette"), "{e}");
    }
    let e = fit(&pts, &settings(TreeCount::Fixed(100))).unwrap_err();
    assert_eq!(
        e,
        FitError::MoreTreesThanModels {
            trees: 100,
            models: 9
        }
    );
    assert!(e.to_string().contains("only 9 training models"), "{e}");
    let only_tests: Vec<Point> = pts
        .iter()
        .map(|p| Point {
            split: Split::Test,
            ..*p
        })
        .collect();
    let e = fit(&only_tests, &settings(TreeCount::Auto)).unwrap_err();
    assert_eq!(e, FitError::NoTraining);
}

#[test]
fn tree_counts_parse_from_toml() {
    #[derive(Deserialize)]
    struct T {
        trees: TreeCount,
    }
    let p = |s: &str| toml::from_str::<T>(s).map(|t| t.trees);
    assert_eq!(p("trees = 3").unwrap(), TreeCount::Fixed(3));
    assert_eq!(p("trees = \"auto\"").unwrap(), TreeCount::Auto);
    assert!(
        p("trees = 0")
            .unwrap_err()
            .to_string()
            .contains("at least 1")
    );
    assert!(
        p("trees = -2")
            .unwrap_err()
            .to_string()
            .contains("at least 1")
    );
    assert!(
        p("trees = \"five\"")
            .unwrap_err()
            .to_string()
            .contains("\"auto\"")
    );
    assert_eq!(serde_json::to_string(&TreeCount::Fixed(4)).unwrap(), "4");
    assert_eq!(serde_json::to_string(&TreeCount::Auto).unwrap(), "\"auto\"");
}

#[test]
fn strides_keep_at_most_the_sample() {
    assert_eq!(stride_for(10, 0), 1);
    assert_eq!(stride_for(10, 10), 1);
    assert_eq!(stride_for(11, 10), 2);
    assert_eq!(stride_for(589_824, 65_536), 9);
    assert!(589_824usize.div_ceil(stride_for(589_824, 65_536)) <= 65_536);
}
