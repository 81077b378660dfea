//! Whole pipelines through the engine with the real stage kinds, on generated model trees.

mod experiment;
mod planted;

use std::path::Path;

use probex_engine::RunReport;
use probex_engine::cache::{Key, Store};
use probex_engine::run::NodeState;
use probex_weights::dataset::{Labels, LayerDataset, Split};

fn entry_dir(cache: &Path, report: &RunReport, node: &str) -> std::path::PathBuf {
    let n = report
        .nodes
        .iter()
        .find(|n| n.node == node)
        .unwrap_or_else(|| panic!("no node {node}"));
    let store = Store::open(cache).unwrap();
    store
        .get(&Key::parse(&n.key).unwrap())
        .unwrap()
        .unwrap()
        .dir
}

const EXTRACT: &str = r#"
[experiment]
name = "tiny"

[stage.models]
kind = "fetch"
source = "dir"
path = "models"

[stage.layers]
kind = "extract"
from = "models"
layers = "all"
splits = { metadata = { key = "split" } }
label = { key = "dataset_chosen_targets", kind = "multi_label", vocab = "cifar100" }
"#;

#[test]
fn fetch_and_extract_every_layer_with_labels_and_splits() {
    let dir = tempfile::tempdir().unwrap();
    let models = planted::planted_tree(&dir.path().join("models"), 20, 8, 6, 1);
    std::fs::write(dir.path().join("tiny.toml"), EXTRACT).unwrap();
    let cache = dir.path().join("cache");

    let report = experiment::run(&dir.path().join("tiny.toml"), &cache, None, true);
    assert!(report.success(), "{report:#?}");
    let names: Vec<&str> = report.nodes.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(names, ["models", "layers[layer=0]", "layers[layer=1]"]);

    // The weight matrices, sorted: encoder.dense.weight (0), head.weight (1); the bias
    // encoder.norm.bias (all-tensor position 1) is no layer in the fallback list.
    let l0 = LayerDataset::load(&entry_dir(&cache, &report, "layers[layer=0]")).unwrap();
    assert_eq!(
        (l0.layer.name.as_str(), l0.n, l0.d_h, l0.d_w),
        ("encoder.dense.weight", 20, 8, 6)
    );
    let l1 = LayerDataset::load(&entry_dir(&cache, &report, "layers[layer=1]")).unwrap();
    assert_eq!(l1.layer.name, "head.weight");
    assert_eq!(l1.layer.list, Some(probex_weights::Architecture::Matrices));
    let Labels::MultiLabel { classes, targets } = &l0.labels else {
        panic!("multi-label expected")
    };
    assert_eq!(classes.len(), 100);
    for (row, (_, chosen)) in models.iter().enumerate() {
        let hot: Vec<&str> = (0..100)
            .filter(|&c| targets[row * 100 + c] == 1.0)
            .map(|c| classes[c].as_str())
            .collect();
        let mut want = chosen.clone();
        want.sort();
        assert_eq!(hot, want, "row {row}");
    }
    assert_eq!(l0.rows(Split::Val).len(), 4);
    assert_eq!(l0.rows(Split::Test).len(), 4);

    // Nothing changed: everything is cached the second time.
    let again = experiment::run(&dir.path().join("tiny.toml"), &cache, None, true);
    assert!(
        again.nodes.iter().all(|n| n.state == NodeState::Cached),
        "{again:#?}"
    );

    // Editing one model reruns the source and every layer.
    let (p, _) = &models[3];
    let mut bytes = std::fs::read(p).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(p, bytes).unwrap();
    let third = experiment::run(&dir.path().join("tiny.toml"), &cache, None, true);
    assert!(
        third.nodes.iter().all(|n| n.state == NodeState::Ran),
        "{third:#?}"
    );
}

const PROBES: &str = r#"
[experiment]
name = "planted"

[stage.models]
kind = "fetch"
source = "dir"
path = "models"

[stage.layers]
kind = "extract"
from = "models"
layers = "all"
splits = { metadata = { key = "split" } }
label = { key = "dataset_chosen_targets", kind = "multi_label", vocab = ["apple", "bear", "bee", "bus", "camel", "lion", "rose", "whale"] }

[stage.probex]
kind = "train"
from = "layers"
for_each = "layer"
model = "probex"
epochs = 60
batch_size = 32
validate_every = 5
r_u = 8
r_v = 8
r_t = 16

# A grid: one probe per layer and setting; `best_dense` picks both on validation.
[stage.dense]
kind = "train"
from = "layers"
for_each = ["layer", "standardize"]
standardize = [false, true]
model = "dense"
epochs = 60
batch_size = 32
validate_every = 5

[stage.best_probex]
kind = "select"
from = "probex"

[stage.best_dense]
kind = "select"
from = "dense"

[stage.report]
kind = "evaluate"
from = ["best_probex", "best_dense"]

[expect]
"report.best_probex.test.accuracy" = "> 0.5"
"best_probex.layer" = ">= 0"
"#;

#[test]
fn train_select_evaluate_finds_the_planted_layer() {
    let dir = tempfile::tempdir().unwrap();
    planted::planted_tree(&dir.path().join("models"), 80, 8, 6, 2);
    let exp = dir.path().join("planted.toml");
    std::fs::write(&exp, PROBES).unwrap();
    let cache = dir.path().join("cache");

    let report = experiment::run(&exp, &cache, None, true);
    assert!(report.success(), "{report:#?}");
    // The class signal is planted in layer 0 only: selection must find it, and the probe read
    // from it must beat chance (0.5: each class is in half the models). How well ProbeX learns
    // is the train tests' business; this test is about the pipeline.
    let sel = report
        .expectations
        .iter()
        .find(|c| c.path == "best_probex.layer")
        .unwrap();
    assert_eq!(sel.actual, Some(0.0), "{report:#?}");
    let acc = report
        .expectations
        .iter()
        .find(|c| c.path == "report.best_probex.test.accuracy")
        .unwrap();
    assert!(acc.pass, "{acc:?}");

    // The run record holds the report, the plot and the per-method tables.
    let run_dir = dir.path().join("run");
    for f in [
        "report.md",
        "results.json",
        "best_probex/layers.svg",
        "best_probex/layers.png",
        "report/report.md",
    ] {
        assert!(run_dir.join(f).is_file(), "missing {f} in the run record");
    }
    let text = std::fs::read_to_string(run_dir.join("report/report.md")).unwrap();
    assert!(
        text.contains("best_probex") && text.contains("best_dense"),
        "{text}"
    );

    // Over the grid, selection keys rows by layer and setting: four probes, one chosen, and
    // the winner's setting is in the results and in the report's row for the method.
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("results.json")).unwrap()).unwrap();
    let dense = &results["results"]["best_dense"];
    assert_eq!(dense["layers_swept"], 4, "{dense}");
    let setting = dense["setting"].as_str().unwrap();
    assert!(
        setting == "standardize=false" || setting == "standardize=true",
        "{setting}"
    );
    let layer = dense["layer"].as_u64().unwrap();
    assert!(
        text.contains(&format!("layer {layer}, {setting}")),
        "{text}"
    );
    let csv = std::fs::read_to_string(run_dir.join("best_dense/layers.csv")).unwrap();
    assert!(
        csv.starts_with("layer,setting,val.accuracy,selected\n"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 5, "{csv}");
    assert_eq!(csv.matches(",true\n").count(), 1, "{csv}");
    // The layer-only sweep has no setting.
    assert_eq!(
        results["results"]["best_probex"]["setting"], "",
        "{results}"
    );

    // An impossible expectation fails the run, with everything else cached.
    std::fs::write(&exp, PROBES.replace("> 0.5\"", ">= 1.01\"")).unwrap();
    let strict = experiment::run(&exp, &cache, None, true);
    assert!(!strict.success());
    assert!(strict.nodes.iter().all(|n| n.state == NodeState::Cached));
}

/// A layer dataset reads its model files in place: a file rewritten with the same bytes (a
/// new modification time) makes the dataset stale, so the next run extracts again, says
/// why, and the probes downstream stay cached (the rows' content is unchanged). A file whose
/// bytes change reruns everything from the source.
#[test]
fn in_place_datasets_are_recomputed_when_their_files_change() {
    let dir = tempfile::tempdir().unwrap();
    let models = planted::planted_tree(&dir.path().join("models"), 20, 8, 6, 1);
    let toml = format!(
        "{EXTRACT}
[stage.probe]
kind = \"train\"
from = \"layers\"
for_each = \"layer\"
model = \"statnn\"
epochs = 2
"
    );
    std::fs::write(dir.path().join("tiny.toml"), toml).unwrap();
    let cache = dir.path().join("cache");
    let first = experiment::run(&dir.path().join("tiny.toml"), &cache, None, true);
    assert!(first.success(), "{first:#?}");
    let side = LayerDataset::load_sidecar(&entry_dir(&cache, &first, "layers[layer=0]")).unwrap();
    assert_eq!(
        side.storage,
        probex_weights::dataset::Storage::References { lora_rank: None }
    );

    // Same bytes, new mtime: only the datasets run again.
    let (p, _) = &models[3];
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(p, std::fs::read(p).unwrap()).unwrap();
    let second = experiment::run(&dir.path().join("tiny.toml"), &cache, None, true);
    assert!(second.success(), "{second:#?}");
    for n in &second.nodes {
        let want = if n.kind == "extract" {
            NodeState::Ran
        } else {
            NodeState::Cached
        };
        assert_eq!(n.state, want, "{}", n.node);
    }
    let store = Store::open(&cache).unwrap();
    let layer0 = first
        .nodes
        .iter()
        .find(|n| n.node == "layers[layer=0]")
        .unwrap();
    assert!(store.was_quarantined(&Key::parse(&layer0.key).unwrap()));
}
