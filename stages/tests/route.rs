//! Tree experts through the engine: a mixed collection of generated model trees is routed,
//! one expert is trained per tree and layer, and the evaluation scores them as one method.

mod experiment;
mod planted;

use std::path::{Path, PathBuf};

use probex_engine::RunReport;
use probex_engine::cache::{Key, Store};
use probex_stages::route::{Router, Routing};
use probex_weights::dataset::{LayerDataset, Split};
use serde_json::Value;

fn entry_dir(cache: &Path, report: &RunReport, node: &str) -> PathBuf {
    let n = report
        .nodes
        .iter()
        .find(|n| n.node == node)
        .unwrap_or_else(|| panic!("no node {node} in {:?}", names(report)));
    Store::open(cache)
        .unwrap()
        .get(&Key::parse(&n.key).unwrap())
        .unwrap()
        .unwrap()
        .dir
}

fn names(report: &RunReport) -> Vec<&str> {
    report.nodes.iter().map(|n| n.node.as_str()).collect()
}

const TREES: &str = r#"
[experiment]
name = "trees"

[stage.models]
kind = "fetch"
source = "dir"
path = "models"

[stage.router]
kind = "route"
from = "models"
layers = "encoder.dense.weight"
splits = { metadata = { key = "split" } }
truth = "subset"

[stage.tree_layers]
kind = "extract"
from = "router"
layers = "encoder.dense.weight"
label = { key = "dataset_chosen_targets", kind = "multi_label", vocab = "cifar100" }

[stage.all_layers]
kind = "extract"
from = "models"
layers = "encoder.dense.weight"
splits = { metadata = { key = "split" } }
label = { key = "dataset_chosen_targets", kind = "multi_label", vocab = "cifar100" }

[stage.experts]
kind = "train"
from = "tree_layers"
for_each = ["tree", "layer"]
model = "probex"
standardize = true
epochs = 40
batch_size = 16
validate_every = 10
r_u = 8
r_v = 8
r_t = 16

[stage.across]
kind = "train"
from = "all_layers"
for_each = "layer"
model = "probex"
standardize = true
epochs = 40
batch_size = 16
validate_every = 10
r_u = 8
r_v = 8
r_t = 16

[stage.best_experts]
kind = "select"
from = "experts"
for_each = "tree"
by = "val.accuracy"

[stage.best_across]
kind = "select"
from = "across"
by = "val.accuracy"

[stage.report]
kind = "evaluate"
from = ["best_experts", "best_across", "router"]
downstream = false
"#;

/// Three trees of 40 models far apart, and 5 test models of a fourth tree.
fn write_trees(dir: &Path) {
    for (t, seed) in [(0, 11), (1, 12), (2, 13)] {
        planted::planted_tree_named(dir, &format!("tree{t}"), None, 10.0, 40, 8, 6, seed);
    }
    planted::planted_tree_named(dir, "outsider", Some("test"), 10.0, 5, 8, 6, 14);
}

#[test]
fn experts_per_tree_from_a_routed_mixed_collection() {
    let dir = tempfile::tempdir().unwrap();
    write_trees(&dir.path().join("models"));
    std::fs::write(dir.path().join("trees.toml"), TREES).unwrap();
    let cache = dir.path().join("cache");
    let report = experiment::run(&dir.path().join("trees.toml"), &cache, None, true);
    assert!(report.success(), "{report:#?}");

    // One extract node per tree and layer; the fourth tree has none.
    let routed: Vec<&str> = names(&report)
        .into_iter()
        .filter(|n| n.starts_with("tree_layers"))
        .collect();
    assert_eq!(
        routed,
        [
            "tree_layers[tree=0,layer=0]",
            "tree_layers[tree=1,layer=0]",
            "tree_layers[tree=2,layer=0]"
        ]
    );

    // The router found the three trees, sent every known model home and rejected the outsiders.
    let routing = Routing::load(&entry_dir(&cache, &report, "router")).unwrap();
    assert_eq!(routing.trees.len(), 3);
    for m in &routing.models {
        let truth = m.truth.as_deref().unwrap();
        match truth.strip_prefix("tree") {
            Some(t) => assert_eq!(
                m.placement.tree,
                Some(t.parse().unwrap()),
                "{} ({:?})",
                m.model.id,
                m.model.split
            ),
            None => {
                assert_eq!(m.placement.tree, None, "outsider {} accepted", m.model.id);
                assert_eq!(m.model.split, Some(Split::Test));
            }
        }
    }

    // Each tree's dataset holds exactly its own models, with their splits.
    for t in 0..3 {
        let ds = LayerDataset::load(&entry_dir(
            &cache,
            &report,
            &format!("tree_layers[tree={t},layer=0]"),
        ))
        .unwrap();
        assert_eq!(ds.n, 40);
        assert!(
            ds.models
                .iter()
                .all(|m| m.id.starts_with(&format!("tree{t}_")))
        );
        assert_eq!(ds.rows(Split::Train).len(), 24);
    }

    // The evaluation scores the experts as one method over every routed test model.
    let results: Value =
        serde_json::from_slice(&std::fs::read(report.run_dir.join("results.json")).unwrap())
            .unwrap();
    let results = &results["results"];
    let experts = &results["report"]["best_experts"];
    assert_eq!(experts["trees"], 3);
    let per: Vec<(f64, f64)> = experts["experts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["models"].as_f64().unwrap(),
                e["test"]["accuracy"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(per.iter().map(|p| p.0).sum::<f64>(), 24.0);
    let weighted = per.iter().map(|(n, a)| n * a).sum::<f64>() / 24.0;
    let pooled = experts["test"]["accuracy"].as_f64().unwrap();
    assert!((pooled - weighted).abs() < 1e-9, "{pooled} vs {weighted}");
    // Both methods are broken down by true tree; the probe across trees also saw the outsiders.
    assert_eq!(experts["by_tree"].as_object().unwrap().len(), 3);
    let across = &results["report"]["best_across"]["by_tree"];
    assert_eq!(across.as_object().unwrap().len(), 4, "{across}");
    assert_eq!(across["outsider"]["models"], 5);
    assert_eq!(results["router"]["test"]["rejected"], 5);
    assert_eq!(results["router"]["val"]["accuracy"], 1.0);

    // The fitted router places files it never saw: a new sibling, an outsider, another
    // architecture.
    let router = Router::locate(&report.run_dir, None).unwrap();
    let fresh = dir.path().join("fresh");
    // Tree 1's generator run one model further: the 41st sibling was never in the collection.
    planted::planted_tree_named(&fresh, "tree1", None, 10.0, 41, 8, 6, 12);
    let v = router.place(&fresh.join("tree1_0040.safetensors")).unwrap();
    assert_eq!(v.placement.tree, Some(1));
    let v = router
        .place(&dir.path().join("models/outsider_0003.safetensors"))
        .unwrap();
    assert_eq!(
        (v.placement.tree, v.placement.nearest.is_some()),
        (None, true)
    );
    planted::planted_tree_named(&fresh, "wide", None, 10.0, 1, 9, 6, 12);
    let v = router.place(&fresh.join("wide_0000.safetensors")).unwrap();
    assert_eq!((v.architecture, v.placement.tree), (None, None));
    let e = Router::locate(dir.path(), None).unwrap_err().to_string();
    assert!(e.contains("neither a run directory"), "{e}");

    let md = std::fs::read_to_string(report.run_dir.join("report/report.md")).unwrap();
    assert!(md.contains("no known tree"), "{md}");
    assert!(md.contains("| outsider | 0 | 0 | 0 | 5 |"), "{md}");
    assert!(md.contains("experts (`best_experts`, 3 trees"), "{md}");
}

#[test]
fn several_collections_mix_and_name_the_true_trees() {
    let dir = tempfile::tempdir().unwrap();
    planted::planted_tree_named(&dir.path().join("a"), "a", None, 10.0, 20, 6, 4, 1);
    planted::planted_tree_named(&dir.path().join("b"), "b", None, 10.0, 20, 6, 4, 2);
    let toml = r#"
[experiment]
name = "mix"

[stage.a]
kind = "fetch"
source = "dir"
path = "a"

[stage.b]
kind = "fetch"
source = "dir"
path = "b"

[stage.router]
kind = "route"
from = ["a", "b"]
layers = "all"
trees = 2
splits = { metadata = { key = "split" } }
"#;
    std::fs::write(dir.path().join("mix.toml"), toml).unwrap();
    let cache = dir.path().join("cache");
    let report = experiment::run(&dir.path().join("mix.toml"), &cache, None, true);
    assert!(report.success(), "{report:#?}");
    let routing = Routing::load(&entry_dir(&cache, &report, "router")).unwrap();
    let truths: Vec<Option<&str>> = routing.trees.iter().map(|t| t.truth.as_deref()).collect();
    assert_eq!(truths, [Some("a"), Some("b")]);
    assert!(routing.score().iter().all(|s| s.accuracy == Some(1.0)));
    // `layers = "all"` concatenates every layer of the architecture: its two weight matrices
    // (the fallback list; the bias is no layer).
    assert_eq!(routing.architectures[0].layers.len(), 2);
    assert_eq!(routing.architectures[0].features, 6 * 4 + 3 * 6);
}

#[test]
fn routing_errors_name_the_model_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    // The same ids twice: two folders written with the same tree name.
    planted::planted_tree_named(&dir.path().join("a"), "m", None, 10.0, 10, 6, 4, 1);
    planted::planted_tree_named(&dir.path().join("b"), "m", None, 10.0, 10, 6, 4, 2);
    let toml = |layers: &str, from: &str| {
        format!(
            "[experiment]\nname = \"bad\"\n[stage.a]\nkind = \"fetch\"\nsource = \"dir\"\npath = \"a\"\n\
             [stage.b]\nkind = \"fetch\"\nsource = \"dir\"\npath = \"b\"\n[stage.router]\nkind = \"route\"\n\
             from = {from}\nlayers = \"{layers}\"\nsplits = {{ metadata = {{ key = \"split\" }} }}\n"
        )
    };
    let run = |text: String| {
        std::fs::write(dir.path().join("bad.toml"), text).unwrap();
        let report = experiment::run(
            &dir.path().join("bad.toml"),
            &dir.path().join("cache"),
            None,
            true,
        );
        let failed = report.failures().next().expect("the router fails").clone();
        format!("{:?}", failed.state)
    };
    let e = run(toml("encoder.dense.weight", "[\"a\", \"b\"]"));
    assert!(
        e.contains("model id `m_0000` is in the collection twice"),
        "{e}"
    );
    let e = run(toml("no.such.layer", "\"a\""));
    assert!(e.contains("routing layers `no.such.layer`"), "{e}");

    // `extract` reads a collection or a routing, not both, and `tree` needs a routing.
    let extract = |from: &str, extra: &str| {
        format!(
            "{}[stage.layers]\nkind = \"extract\"\nfrom = {from}\nlayers = 0\n{extra}\
             splits = {{ metadata = {{ key = \"split\" }} }}\n\
             label = {{ key = \"dataset_chosen_targets\", kind = \"multi_label\", vocab = \"cifar100\" }}\n",
            toml("encoder.dense.weight", "\"a\"")
        )
    };
    let plan_error = |text: String| {
        std::fs::write(dir.path().join("bad.toml"), text).unwrap();
        let registry = probex_stages::registry(probex_hub::connect);
        let exp = probex_engine::load(&dir.path().join("bad.toml"), &registry).unwrap();
        let store = Store::open(dir.path().join("cache")).unwrap();
        let digests = probex_engine::digest::FileDigests::in_memory();
        let cx = probex_engine::PlanContext {
            base_dir: &exp.base_dir,
            digests: &digests,
            offline: true,
        };
        let planner =
            probex_engine::Planner::new(&exp, &store, cx, probex_engine::Overrides::default());
        format!("{}", planner.plan().unwrap_err())
    };
    // First route `a` alone (unique ids), so that planning `extract` sees its inputs.
    std::fs::write(
        dir.path().join("ok.toml"),
        toml("encoder.dense.weight", "\"a\""),
    )
    .unwrap();
    let ok = experiment::run(
        &dir.path().join("ok.toml"),
        &dir.path().join("cache"),
        None,
        true,
    );
    assert!(ok.success(), "{ok:#?}");
    let e = plan_error(extract("[\"a\", \"router\"]", ""));
    assert!(e.contains("both a model collection and a routing"), "{e}");
    let e = plan_error(extract("\"a\"", "tree = 1\n"));
    assert!(e.contains("`tree` needs a routing input"), "{e}");
}
