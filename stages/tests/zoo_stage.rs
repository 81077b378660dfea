//! `fetch` of a pinned package -> `zoo` -> `extract` through the engine: the tree the zoo
//! writes is read by the same code as Model-J, every model's labels are the classes its
//! metadata says it was fine-tuned on, and a second run is all cached. The package is a small
//! fixture archive placed where `fetch` keeps downloads, so no client or network is needed.
//! (One test per file: it sets `PROBEX_PACKAGES` for the whole process.)

mod experiment;

use std::io::Write;
use std::path::Path;

use probex_engine::cache::{Key, Store};
use probex_engine::run::NodeState;
use probex_fetch::collection::Collection;
use probex_weights::dataset::{Labels, LayerDataset};
use probex_weights::reader::read_header;
use probex_zoo::fixture::write_fixture_package;

/// A `.tgz` of `dir`'s `package/` folder, as `npm pack` makes them.
fn tgz(dir: &Path) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.append_dir_all("package", dir.join("package")).unwrap();
    let mut gz = tar.into_inner().unwrap();
    gz.flush().unwrap();
    gz.finish().unwrap()
}

#[test]
fn zoo_tree_from_a_pinned_package_reads_back_through_extract() {
    let w = tempfile::tempdir().unwrap();
    let src = w.path().join("src");
    let classes = write_fixture_package(&src, 6).unwrap();
    let archive = tgz(&src);
    let downloads = w.path().join("packages");
    std::fs::create_dir_all(&downloads).unwrap();
    let staged = downloads.join("emoji-fixture-1.0.0.tgz");
    std::fs::write(&staged, &archive).unwrap();
    let sha = probex_fetch::packages::sha256_file(&staged).unwrap();
    std::fs::create_dir_all(downloads.join(&sha)).unwrap();
    std::fs::rename(
        &staged,
        downloads.join(&sha).join("emoji-fixture-1.0.0.tgz"),
    )
    .unwrap();
    // SAFETY: the only test in this process; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROBEX_PACKAGES", &downloads) };

    let exp = w.path().join("zoo.toml");
    std::fs::write(
        &exp,
        format!(
            r#"
[experiment]
name = "zoo"

[stage.emoji]
kind = "fetch"
source = "npm"
package = "emoji-fixture"
version = "1.0.0"
sha256 = "{sha}"

[stage.tree]
kind = "zoo"
from = "emoji"
name = "Tiny"
models = 8
image_size = 8
mlp = {{ hidden = [16, 8] }}
pretrain = {{ steps = 20, batch_size = 16 }}
finetune = {{ epochs = [2], batch_sizes = [16], samples_per_class = 4 }}

[stage.layers]
kind = "extract"
from = "tree"
layers = "*.weight"
splits = {{ metadata = {{ key = "split" }} }}
label = {{ key = "dataset_chosen_targets", kind = "multi_label", vocab = "cifar100" }}
"#
        ),
    )
    .unwrap();
    let cache = w.path().join("cache");
    let report = experiment::run(&exp, &cache, None, true);
    assert!(report.success(), "{:#?}", report.nodes);
    let store = Store::open(&cache).unwrap();
    let dir_of = |node: &str| {
        let n = report.nodes.iter().find(|n| n.node == node).unwrap();
        store
            .get(&Key::parse(&n.key).unwrap())
            .unwrap()
            .unwrap()
            .dir
    };

    // The collection lists the 8 models in the Hugging Face cache layout.
    let tree = Collection::load(&dir_of("tree")).unwrap();
    assert_eq!(tree.models.len(), 8);
    assert!(
        tree.models
            .iter()
            .all(|m| m.id.starts_with("ProbeX/Model-J__Tiny__model_idx_"))
    );
    // Each layer dataset's labels are exactly what each file's metadata says it learned.
    let layers: Vec<_> = report
        .nodes
        .iter()
        .filter(|n| n.stage == "layers")
        .collect();
    assert_eq!(
        layers.len(),
        3,
        "three weight matrices of an MLP with two hidden layers"
    );
    let ds = LayerDataset::load(&dir_of(&layers[0].node)).unwrap();
    let Labels::MultiLabel {
        classes: vocab,
        targets,
    } = &ds.labels
    else {
        panic!("{:?}", ds.labels)
    };
    for (row, m) in ds.models.iter().enumerate() {
        let file = &tree.models.iter().find(|t| t.id == m.id).unwrap().path;
        let meta = read_header(file).unwrap().metadata;
        let chosen = &meta["dataset_chosen_targets"];
        let on: Vec<&str> = vocab
            .iter()
            .enumerate()
            .filter(|(c, _)| targets[row * vocab.len() + c] > 0.5)
            .map(|(_, n)| n.as_str())
            .collect();
        assert_eq!(on.len(), 3, "half of the 6 fixture classes: {chosen}");
        for name in &on {
            assert!(classes.iter().any(|c| c == name));
            assert!(
                chosen.contains(&format!("'{name}'")),
                "{name} not in {chosen}"
            );
        }
        assert_eq!(meta["split"], m.split.as_str());
    }

    // Everything is cached the second time, offline, without the package client.
    let again = experiment::run(&exp, &cache, None, true);
    assert!(again.nodes.iter().all(|n| n.state == NodeState::Cached));
}
