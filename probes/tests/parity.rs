//! Forward-pass parity with an independent PyTorch implementation (probes/python/probex_ref.py),
//! both directions, through golden files written by probes/python/parity.py:
//! - probex writes checkpoints, PyTorch loads them with a strict `load_state_dict` and computes
//!   the logits; probex must reproduce them;
//! - PyTorch initialises and writes state dicts (no probex metadata); probex loads them and must
//!   reproduce PyTorch's logits and encodings.

use std::path::{Path, PathBuf};

use probex_probes::models::checkpoint::{
    Checkpoint, CheckpointMeta, TaskInfo, TaskKind, deserialize_named, serialize_named,
};
use probex_probes::models::{NamedTensor, ProbexConfig, ProbexZeroshotConfig, named_tensors};
use probex_probes::training::{encode, predict};
use probex_weights::dataset::{
    Class, Labels, LayerDataset, LayerInfo, Matrices, ModelRecord, Split,
};
use probex_weights::embeddings::TextTable;
use probex_weights::rng::Rng;

type Cpu = burn::backend::Flex;

/// CPU parity tolerance. CUDA matmuls run on tensor cores in TF32 (10-bit mantissa), measured
/// at up to 3.2e-4 on an H200 for these fixtures, hence the looser CUDA bound.
const TOL: f32 = 1e-5;
const TOL_CUDA: f32 = 1e-3;

/// The device tests run on: `$PROBEX_TEST_DEVICE` (`cpu`, `cuda`, `cuda:N`), default the CPU
/// (as the stage tests' `common::device`).
fn device() -> probex_probes::training::DeviceSpec {
    match std::env::var("PROBEX_TEST_DEVICE") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|e| panic!("PROBEX_TEST_DEVICE: {e}")),
        Err(_) => probex_probes::training::DeviceSpec::Cpu,
    }
}

fn tolerance() -> f32 {
    match device() {
        probex_probes::training::DeviceSpec::Cpu => TOL,
        _ => TOL_CUDA,
    }
}
const B: usize = 4;
const D_H: usize = 12;
const D_W: usize = 10;
const D_TEXT: usize = 7;
const CLASSES: usize = 5;

fn data_dir() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/parity");
    if built.exists() {
        return built;
    }
    // A test binary copied to another machine runs from the repository root.
    PathBuf::from("probes/tests/data/parity")
}

fn task(kind: TaskKind, classes: Vec<String>) -> TaskInfo {
    TaskInfo {
        kind,
        classes,
        target_mean: 0.0,
        target_std: 1.0,
        feature_mean: vec![],
        feature_std: vec![],
        input_scale: None,
    }
}

/// The probex-side fixtures: two seeded checkpoints and the inputs.
fn fixtures() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let dev = Default::default();
    let p = ProbexConfig::new(D_H, D_W, 3)
        .with_r_u(4)
        .with_r_v(5)
        .with_r_t(6);
    let z = ProbexZeroshotConfig::new(D_H, D_W, D_TEXT)
        .with_r_u(4)
        .with_r_v(5)
        .with_r_t(6);
    let pm = p.init::<Cpu>(&mut Rng::new(42, 0), &dev);
    let zm = z.init::<Cpu>(&mut Rng::new(43, 0), &dev);
    let ck = |spec, task, tensors| {
        Checkpoint {
            meta: Some(CheckpointMeta {
                format: CheckpointMeta::FORMAT,
                spec,
                task,
                epoch: None,
            }),
            tensors,
        }
        .to_bytes()
        .unwrap()
    };
    let classes: Vec<String> = (0..3).map(|c| format!("c{c}")).collect();
    let pb = ck(
        p.spec(),
        task(TaskKind::MultiLabel, classes),
        named_tensors(&pm),
    );
    let zb = ck(
        z.spec(),
        task(TaskKind::ZeroShot, class_names()),
        named_tensors(&zm),
    );
    let mut rng = Rng::new(44, 0);
    let x: Vec<f32> = (0..B * D_H * D_W).map(|_| rng.normal()).collect();
    let text: Vec<f32> = (0..CLASSES * D_TEXT).map(|_| rng.normal()).collect();
    let inputs = serialize_named(
        &[
            NamedTensor {
                name: "x".into(),
                shape: vec![B, D_H, D_W],
                values: x,
            },
            NamedTensor {
                name: "text".into(),
                shape: vec![CLASSES, D_TEXT],
                values: text,
            },
        ],
        Default::default(),
    )
    .unwrap();
    (pb, zb, inputs)
}

fn class_names() -> Vec<String> {
    (0..CLASSES).map(|c| format!("class {c}")).collect()
}

/// Writes the probex-side fixtures (then run probes/python/parity.py).
#[test]
#[ignore]
fn regenerate() {
    let (p, z, i) = fixtures();
    std::fs::create_dir_all(data_dir()).unwrap();
    std::fs::write(data_dir().join("rust_probex.safetensors"), p).unwrap();
    std::fs::write(data_dir().join("rust_zeroshot.safetensors"), z).unwrap();
    std::fs::write(data_dir().join("inputs.safetensors"), i).unwrap();
}

fn read(name: &str) -> Vec<NamedTensor> {
    let path = data_dir().join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    deserialize_named(&bytes, name).unwrap().1
}

fn tensor<'a>(ts: &'a [NamedTensor], name: &str) -> &'a NamedTensor {
    ts.iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
}

/// A layer dataset holding the parity inputs, with labels that fit each model.
fn dataset(labels: Labels) -> LayerDataset {
    let inputs = read("inputs.safetensors");
    LayerDataset {
        layer: LayerInfo {
            index: 0,
            name: "parity".into(),
            source_shape: vec![D_H, D_W],
            transform: "squeeze".into(),
            list: None,
        },
        n: B,
        d_h: D_H,
        d_w: D_W,
        weights: Matrices::Stacked(tensor(&inputs, "x").values.clone()),
        models: (0..B)
            .map(|i| ModelRecord {
                id: format!("m{i}"),
                split: Split::Test,
                source_digest: String::new(),
            })
            .collect(),
        label_key: "k".into(),
        labels,
        skipped: vec![],
    }
}

fn multi() -> Labels {
    Labels::MultiLabel {
        classes: (0..3).map(|c| format!("c{c}")).collect(),
        targets: vec![0.0; B * 3],
    }
}

fn single() -> Labels {
    Labels::Class {
        classes: class_names()
            .into_iter()
            .map(|n| Class {
                id: n.clone(),
                name: n,
            })
            .collect(),
        targets: vec![0; B],
    }
}

fn text() -> TextTable {
    let inputs = read("inputs.safetensors");
    TextTable {
        names: class_names(),
        dim: D_TEXT,
        vectors: tensor(&inputs, "text").values.clone(),
    }
}

fn assert_close(what: &str, got: &[f32], want: &NamedTensor) -> f32 {
    assert_eq!(got.len(), want.values.len(), "{what}: length");
    let err = got
        .iter()
        .zip(&want.values)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    println!(
        "{what}: max |probex - pytorch| = {err:.2e} over {} values",
        got.len()
    );
    let tol = tolerance();
    assert!(err <= tol, "{what}: max abs difference {err} > {tol}");
    err
}

#[test]
fn rust_fixtures_are_what_the_code_writes() {
    let (p, z, i) = fixtures();
    let stale = "parity fixtures changed: run `cargo test -p probex-probes --test parity -- \
                 --ignored regenerate` then `python probes/python/parity.py`";
    assert!(
        std::fs::read(data_dir().join("rust_probex.safetensors")).unwrap() == p,
        "{stale}"
    );
    assert!(
        std::fs::read(data_dir().join("rust_zeroshot.safetensors")).unwrap() == z,
        "{stale}"
    );
    assert!(
        std::fs::read(data_dir().join("inputs.safetensors")).unwrap() == i,
        "{stale}"
    );
}

fn check(dir_file: (&str, &str), golden: &str) {
    let want = read(golden);
    let dir = tempfile::tempdir().unwrap();
    let copy = |name: &str| {
        let p = dir.path().join(name);
        std::fs::copy(data_dir().join(name), &p).unwrap();
        p
    };
    let (pp, zp) = (copy(dir_file.0), copy(dir_file.1));
    let ds = dataset(multi());
    let logits = predict(&pp, &ds, None, &device()).unwrap();
    assert_close(
        &format!("{golden} probex logits"),
        &logits.scores,
        tensor(&want, "probex_logits"),
    );
    let e = encode(&pp, &ds, &device()).unwrap();
    assert_close(
        &format!("{golden} probex e"),
        &e.values,
        tensor(&want, "probex_e"),
    );
    let zs = dataset(single());
    let cos = predict(&zp, &zs, Some(&text()), &device()).unwrap();
    assert_eq!(cos.task, TaskKind::ZeroShot);
    assert_close(
        &format!("{golden} zero-shot cosine logits"),
        &cos.scores,
        tensor(&want, "zeroshot_logits"),
    );
    let e = encode(&zp, &zs, &device()).unwrap();
    assert_close(
        &format!("{golden} zero-shot e"),
        &e.values,
        tensor(&want, "zeroshot_e"),
    );
}

#[test]
fn probex_checkpoints_give_pytorch_logits() {
    check(
        ("rust_probex.safetensors", "rust_zeroshot.safetensors"),
        "torch_on_rust.safetensors",
    );
}

#[test]
fn pytorch_state_dicts_give_pytorch_logits() {
    // Written by safetensors.torch: no probex metadata, shapes are read off the tensors.
    let sd = Checkpoint::from_bytes(
        &std::fs::read(data_dir().join("torch_probex.safetensors")).unwrap(),
        "t",
    )
    .unwrap();
    assert!(sd.meta.is_none());
    check(
        ("torch_probex.safetensors", "torch_zeroshot.safetensors"),
        "torch_outputs.safetensors",
    );
}
