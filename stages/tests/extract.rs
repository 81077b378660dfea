//! End-to-end extraction on fixture model collections written here.

// The fixture writer the weights tests use, shared rather than copied.
#[path = "../../weights/tests/files/mod.rs"]
mod files;

use std::path::{Path, PathBuf};

use files::*;
use probex_engine::digest::{FileDigests, FileStamp};
use probex_stages::extract::{
    ExtractOptions, LayerOutput, Layout, ModelSource, NonFinitePolicy, SplitSource, discover,
    extract, extract_with_digests, resolve_layers,
};
use probex_weights::dataset::{
    Class, DatasetError, Labels, LayerDataset, Matrices, Precision, Split, Storage,
};
use probex_weights::labels::{LabelKind, LabelSpec, NameTable, OnError, Vocab};
use probex_weights::reader::read_header;
use probex_weights::{LayerMode, LayerSelector, transform};

fn cifar_spec() -> LabelSpec {
    LabelSpec {
        vocab: Some(Vocab::Cifar100),
        ..LabelSpec::new("dataset_chosen_targets", LabelKind::MultiLabel)
    }
}

fn outputs(reference: &Path, sel: &str, out: &Path, mode: LayerMode) -> Vec<LayerOutput> {
    let sel: LayerSelector = sel.parse().unwrap();
    resolve_layers(reference, &sel, mode)
        .unwrap()
        .into_iter()
        .map(|l| LayerOutput {
            dir: out.join(format!("layer-{}", l.index)),
            layer: l,
        })
        .collect()
}

fn source(id: &str, path: PathBuf, split: Split) -> ModelSource {
    ModelSource {
        id: id.into(),
        path,
        split: Some(split),
    }
}

/// A small discriminative zoo: each model has three tensors; `layer.10` differs per model.
fn zoo(dir: &Path, n: usize) -> Vec<ModelSource> {
    let targets = [
        "['apple', 'worm']",
        "['maple_tree']",
        "['bee', 'apple', 'tulip']",
    ];
    (0..n)
        .map(|i| {
            let p = dir.join(format!("m{i}.safetensors"));
            write_model(
                &p,
                &[
                    f32t("layer.2.weight", &[2, 3], &values(100 + i as u64, 6)),
                    f32t("layer.10.weight", &[3, 4], &values(i as u64, 12)),
                    f32t("conv.weight", &[4, 3, 2, 2], &values(200 + i as u64, 48)),
                ],
                &[
                    ("dataset_chosen_targets", targets[i % 3]),
                    ("lr_scheduler", ["cosine", "linear"][i % 2]),
                ],
            );
            source(&format!("m{i}"), p, Split::ALL[i % 3])
        })
        .collect()
}

#[test]
fn layer_index_and_rows_match_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let models = zoo(&dir.path().join("models"), 5);
    // Sorted: conv.weight (0), layer.10.weight (1), layer.2.weight (2).
    let outs = outputs(
        &models[0].path,
        "1",
        &dir.path().join("out"),
        LayerMode::Auto,
    );
    assert_eq!(outs[0].layer.name, "layer.10.weight");
    let report = extract(&models, &outs, &cifar_spec(), &ExtractOptions::default()).unwrap();
    assert_eq!(report.layers[0].rows, 5);
    assert!(report.skipped.is_empty() && report.non_finite.is_empty());

    let ds = LayerDataset::load(&outs[0].dir).unwrap();
    assert_eq!((ds.n, ds.d_h, ds.d_w), (5, 3, 4));
    assert_eq!(ds.layer.index, 1);
    assert_eq!(ds.layer.transform, "squeeze");
    for (i, model) in models.iter().enumerate() {
        assert_eq!(ds.models[i].id, format!("m{i}"));
        assert_eq!(ds.models[i].split, Split::ALL[i % 3]);
        assert_eq!(ds.matrix(i).unwrap(), values(i as u64, 12).as_slice());
        let digest = blake3::hash(&std::fs::read(&model.path).unwrap())
            .to_hex()
            .to_string();
        assert_eq!(ds.models[i].source_digest, digest);
    }
    let Labels::MultiLabel { classes, targets } = &ds.labels else {
        panic!("kind")
    };
    assert_eq!(classes.len(), 100);
    let col = |n: &str| classes.iter().position(|c| c == n).unwrap();
    let row0: Vec<usize> = (0..100).filter(|&c| targets[c] == 1.0).collect();
    assert_eq!(row0, [col("apple"), col("worm")]);
    assert_eq!(ds.label_key, "dataset_chosen_targets");
}

#[test]
fn conv_weights_are_a_row_major_reshape_not_a_permute() {
    let dir = tempfile::tempdir().unwrap();
    let models = zoo(&dir.path().join("models"), 2);
    let outs = outputs(
        &models[0].path,
        "conv.weight",
        &dir.path().join("out"),
        LayerMode::Auto,
    );
    extract(&models, &outs, &cifar_spec(), &ExtractOptions::default()).unwrap();
    let ds = LayerDataset::load(&outs[0].dir).unwrap();
    // [out=4, in=3, kh=2, kw=2] -> [in*kh*kw = 12, out = 4], the file's bytes in order.
    assert_eq!((ds.d_h, ds.d_w), (12, 4));
    assert_eq!(ds.layer.transform, "conv_reshape");
    assert_eq!(ds.layer.source_shape, [4, 3, 2, 2]);
    let flat = values(200, 48);
    let m = ds.matrix(0).unwrap();
    for r in 0..12 {
        for c in 0..4 {
            assert_eq!(m[r * 4 + c], flat[r * 4 + c]);
        }
    }
    // A permute to [in, kh, kw, out] would put w[o, i, y, x] at row i*4+y*2+x, column o:
    // that differs from the reshape, so the check above is not vacuous.
    let permuted_0_1 = flat[12]; // w[1, 0, 0, 0]
    assert_ne!(m[1], permuted_0_1);
}

#[test]
fn lora_layers_are_b_times_a() {
    let dir = tempfile::tempdir().unwrap();
    let mut models = Vec::new();
    for (i, split) in [(0u64, "train"), (1, "val_holdout"), (2, "test")] {
        let p = dir
            .path()
            .join(split)
            .join(format!("model_idx_{i:04}"))
            .join("pytorch_lora_weights.safetensors");
        write_model(
            &p,
            &[
                f32t(
                    "unet.x.attn2.to_q.lora.down.weight",
                    &[2, 5],
                    &values(10 + i, 10),
                ),
                f32t(
                    "unet.x.attn2.to_q.lora.up.weight",
                    &[3, 2],
                    &values(20 + i, 6),
                ),
                f32t(
                    "unet.x.attn1.to_k.lora.down.weight",
                    &[2, 4],
                    &values(30 + i, 8),
                ),
                f32t(
                    "unet.x.attn1.to_k.lora.up.weight",
                    &[4, 2],
                    &values(40 + i, 8),
                ),
            ],
            &[(
                "imagenet_class_id",
                ["n02111277", "n01440764", "n02111277"][i as usize],
            )],
        );
        models.push(p);
    }
    let found = discover(&Layout::ModelJGenerative {
        root: dir.path().to_path_buf(),
        file: "pytorch_lora_weights.safetensors".into(),
    })
    .unwrap();
    let ids: Vec<(&str, Option<Split>)> = found
        .models
        .iter()
        .map(|m| (m.id.as_str(), m.split))
        .collect();
    assert_eq!(
        ids,
        [
            ("model_idx_0000", Some(Split::Train)),
            ("model_idx_0001", Some(Split::ValHoldout)),
            ("model_idx_0002", Some(Split::Test))
        ]
    );
    // LoRA index 1 = the second sorted down name: attn2.to_q.
    let outs = outputs(
        &found.models[0].path,
        "1",
        &dir.path().join("out"),
        LayerMode::Auto,
    );
    assert_eq!(outs[0].layer.name, "unet.x.attn2.to_q.lora.down.weight");
    let spec = LabelSpec {
        names: Some(NameTable::Imagenet1k),
        ..LabelSpec::new("imagenet_class_id", LabelKind::Class)
    };
    extract(&found.models, &outs, &spec, &ExtractOptions::default()).unwrap();
    let ds = LayerDataset::load(&outs[0].dir).unwrap();
    assert_eq!((ds.d_h, ds.d_w), (3, 5));
    assert_eq!(ds.layer.transform, "lora_product");
    for i in 0..3u64 {
        let a = values(10 + i, 10); // [2, 5]
        let b = values(20 + i, 6); // [3, 2]
        let m = ds.matrix(i as usize).unwrap();
        for r in 0..3 {
            for c in 0..5 {
                let want = b[r * 2] * a[c] + b[r * 2 + 1] * a[5 + c];
                assert!(
                    (m[r * 5 + c] - want).abs() < 1e-6,
                    "({r},{c}) {} vs {want}",
                    m[r * 5 + c]
                );
            }
        }
    }
    let Labels::Class { classes, targets } = &ds.labels else {
        panic!("kind")
    };
    assert_eq!(
        classes,
        &[
            Class {
                id: "n01440764".into(),
                name: "tench".into()
            },
            Class {
                id: "n02111277".into(),
                name: "Newfoundland".into()
            }
        ]
    );
    assert_eq!(targets, &[1, 0, 1]);
    assert_eq!(ds.rows(Split::ValHoldout), [1]);
}

#[test]
fn half_precision_sources_decode_exactly() {
    let dir = tempfile::tempdir().unwrap();
    // Values exactly representable in f16 and bf16.
    let vals = [0.5f32, -1.25, 3.0, 0.0, -0.0, 1024.0, 0.09375, -2.5];
    let mut models = Vec::new();
    for (i, maker) in [f16t as fn(&str, &[usize], &[f32]) -> T, bf16t, f32t]
        .into_iter()
        .enumerate()
    {
        let p = dir.path().join(format!("m{i}.safetensors"));
        write_model(&p, &[maker("w", &[2, 4], &vals)], &[("flip", "True")]);
        models.push(source(&format!("m{i}"), p, Split::Train));
    }
    let p = dir.path().join("m3.safetensors");
    let vals64: Vec<f64> = vals.iter().map(|&v| f64::from(v)).collect();
    write_model(&p, &[f64t("w", &[2, 4], &vals64)], &[("flip", "False")]);
    models.push(source("m3", p, Split::Val));
    let outs = outputs(
        &models[0].path,
        "w",
        &dir.path().join("out"),
        LayerMode::Auto,
    );
    let spec = LabelSpec::new("flip", LabelKind::Bool);
    extract(&models, &outs, &spec, &ExtractOptions::default()).unwrap();
    let ds = LayerDataset::load(&outs[0].dir).unwrap();
    for i in 0..4 {
        assert_eq!(ds.matrix(i).unwrap(), &vals[..], "model {i}");
    }
    assert_eq!(
        ds.labels,
        Labels::Class {
            classes: vec![
                Class {
                    id: "false".into(),
                    name: "false".into()
                },
                Class {
                    id: "true".into(),
                    name: "true".into()
                }
            ],
            targets: vec![1, 1, 1, 0],
        }
    );

    // Stored as f16/bf16: the same values come back (they are representable).
    for p in [Precision::F16, Precision::Bf16] {
        let out = dir.path().join(format!("out-{p:?}"));
        let outs = outputs(&models[0].path, "w", &out, LayerMode::Auto);
        let opts = ExtractOptions {
            precision: Some(p),
            ..Default::default()
        };
        extract(&models, &outs, &spec, &opts).unwrap();
        let side = LayerDataset::load_sidecar(&outs[0].dir).unwrap();
        assert_eq!(side.precision, p);
        let ds = LayerDataset::load(&outs[0].dir).unwrap();
        assert_eq!(ds.matrix(2).unwrap(), &vals[..]);
    }
}

#[test]
fn category_and_numeric_labels_from_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let mut models = Vec::new();
    for (i, (sched, lr)) in [("cosine", "1e-3"), ("linear", "0.0001"), ("cosine", "0.01")]
        .iter()
        .enumerate()
    {
        let p = dir.path().join(format!("m{i}.safetensors"));
        write_model(
            &p,
            &[f32t("w", &[2], &[1.0, 2.0])],
            &[("lr_scheduler", sched), ("learning_rate", lr)],
        );
        models.push(source(&format!("m{i}"), p, Split::Train));
    }
    // A vector is a layer only when every tensor is (`mode = "tensors"`).
    let outs = outputs(
        &models[0].path,
        "all",
        &dir.path().join("a"),
        LayerMode::Tensors,
    );
    extract(
        &models,
        &outs,
        &LabelSpec::new("lr_scheduler", LabelKind::Category),
        &Default::default(),
    )
    .unwrap();
    let ds = LayerDataset::load(&outs[0].dir).unwrap();
    assert_eq!((ds.d_h, ds.d_w), (2, 1));
    assert_eq!(ds.layer.transform, "column");
    let Labels::Class { classes, targets } = &ds.labels else {
        panic!()
    };
    assert_eq!(
        classes.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        ["cosine", "linear"]
    );
    assert_eq!(targets, &[0, 1, 0]);

    // A vector is a layer only when every tensor is (`mode = "tensors"`).
    let outs = outputs(
        &models[0].path,
        "all",
        &dir.path().join("b"),
        LayerMode::Tensors,
    );
    let spec: LabelSpec = toml::from_str::<toml::Table>(
        "label = { key = \"learning_rate\", kind = \"numeric\", transform = \"log10\" }",
    )
    .unwrap()["label"]
        .clone()
        .try_into()
        .unwrap();
    extract(&models, &outs, &spec, &Default::default()).unwrap();
    let ds = LayerDataset::load(&outs[0].dir).unwrap();
    let Labels::Numeric { targets, transform } = &ds.labels else {
        panic!()
    };
    assert_eq!(transform, "log10");
    for (t, w) in targets.iter().zip([-3.0f32, -4.0, -2.0]) {
        assert!((t - w).abs() < 1e-6);
    }
}

#[test]
fn bad_labels_fail_or_skip_with_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut models = zoo(&dir.path().join("models"), 4);
    // m0 (the first row) gets a malformed list, m2 a missing key.
    write_model(
        &models[0].path,
        &[
            f32t("layer.2.weight", &[2, 3], &values(100, 6)),
            f32t("layer.10.weight", &[3, 4], &values(0, 12)),
            f32t("conv.weight", &[4, 3, 2, 2], &values(200, 48)),
        ],
        &[("dataset_chosen_targets", "['apple', __import__('os')]")],
    );
    write_model(
        &models[2].path,
        &[
            f32t("layer.2.weight", &[2, 3], &values(102, 6)),
            f32t("layer.10.weight", &[3, 4], &values(2, 12)),
            f32t("conv.weight", &[4, 3, 2, 2], &values(202, 48)),
        ],
        &[("other", "1")],
    );
    let outs = outputs(
        &models[1].path,
        "layer.10.weight",
        &dir.path().join("out"),
        LayerMode::Auto,
    );

    let e = extract(&models, &outs, &cifar_spec(), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("m0.safetensors") && e.contains("dataset_chosen_targets"),
        "{e}"
    );
    assert!(e.contains("__import__"), "{e}");
    assert!(e.contains("m2.safetensors") && e.contains("missing"), "{e}");
    assert!(e.starts_with("2 model(s) failed"), "{e}");

    let spec = LabelSpec {
        on_error: OnError::Skip,
        ..cifar_spec()
    };
    models.reverse(); // input order does not matter: rows follow the sorted ids
    let report = extract(&models, &outs, &spec, &Default::default()).unwrap();
    let skipped: Vec<&str> = report.skipped.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(skipped, ["m0", "m2"]);
    assert!(report.skipped[1].reason.contains("m2.safetensors"));
    let ds = LayerDataset::load(&outs[0].dir).unwrap();
    assert_eq!(ds.n, 2);
    assert_eq!(
        ds.models.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["m1", "m3"]
    );
    // Rows were compacted: each row is its own model's tensor.
    assert_eq!(ds.matrix(0).unwrap(), values(1, 12).as_slice());
    assert_eq!(ds.matrix(1).unwrap(), values(3, 12).as_slice());
    assert_eq!(ds.skipped.len(), 2);
}

/// Three models whose second has 1 NaN and 2 infinite values in `layer.10.weight`, and the
/// outputs of its two `layer.*` layers (`layer.10` first): the models, the outputs and that
/// layer's values.
fn non_finite_zoo(dir: &Path) -> (Vec<ModelSource>, Vec<LayerOutput>, Vec<f32>) {
    let models = zoo(&dir.join("models"), 3);
    let mut bad = values(1, 12);
    bad[3] = f32::NAN;
    bad[7] = f32::INFINITY;
    bad[8] = f32::NEG_INFINITY;
    write_model(
        &models[1].path,
        &[
            f32t("layer.2.weight", &[2, 3], &values(101, 6)),
            f32t("layer.10.weight", &[3, 4], &bad),
            f32t("conv.weight", &[4, 3, 2, 2], &values(201, 48)),
        ],
        &[("dataset_chosen_targets", "['apple']")],
    );
    let outs = outputs(
        &models[0].path,
        "layer.*",
        &dir.join("out"),
        LayerMode::Auto,
    );
    (models, outs, bad)
}

#[test]
fn non_finite_weights_follow_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let (models, outs, bad) = non_finite_zoo(dir.path());
    assert_eq!(outs.len(), 2);

    let e = extract(&models, &outs, &cifar_spec(), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("m1.safetensors") && e.contains("1 NaN and 2 infinite"),
        "{e}"
    );

    let opts = ExtractOptions {
        non_finite: NonFinitePolicy::Skip,
        ..Default::default()
    };
    let r = extract(&models, &outs, &cifar_spec(), &opts).unwrap();
    assert_eq!(r.non_finite.len(), 1);
    assert_eq!((r.non_finite[0].nan, r.non_finite[0].inf), (1, 2));
    assert_eq!(r.non_finite[0].action, "skipped");
    // Only the layer with bad values loses the model.
    let l10 = LayerDataset::load(&outs[0].dir).unwrap();
    let l2 = LayerDataset::load(&outs[1].dir).unwrap();
    assert_eq!(l10.layer.name, "layer.10.weight");
    assert_eq!(l10.n, 2);
    assert_eq!(l10.skipped[0].id, "m1");
    assert_eq!(l10.matrix(1).unwrap(), values(2, 12).as_slice());
    assert_eq!(l2.n, 3);

    let opts = ExtractOptions {
        non_finite: NonFinitePolicy::Zero,
        ..Default::default()
    };
    let r = extract(&models, &outs, &cifar_spec(), &opts).unwrap();
    assert_eq!(r.non_finite[0].action, "zeroed");
    let l10 = LayerDataset::load(&outs[0].dir).unwrap();
    let mut want = bad.clone();
    for v in &mut want {
        if !v.is_finite() {
            *v = 0.0;
        }
    }
    assert_eq!(l10.matrix(1).unwrap(), want.as_slice());
}

/// Rows left in the model files are not read by extraction under `non_finite = "fail"`: every
/// read of the dataset checks their values instead and fails naming the model and layer (in
/// memory and on disk alike). Under `"skip"` extraction reads them, to leave the model out.
#[test]
fn in_place_rows_are_checked_for_non_finite_values_when_read() {
    let dir = tempfile::tempdir().unwrap();
    let (models, outs, _) = non_finite_zoo(dir.path());
    let opts = ExtractOptions {
        in_place: true,
        ..Default::default()
    };
    let r = extract(&models, &outs, &cifar_spec(), &opts).unwrap();
    assert!(r.non_finite.is_empty(), "{:?}", r.non_finite);
    let l2 = LayerDataset::load(&outs[1].dir).unwrap();
    assert_eq!(l2.n, 3);
    let e = LayerDataset::load(&outs[0].dir).unwrap_err();
    assert!(
        matches!(&e, DatasetError::NonFinite { model, layer, .. }
            if model == "m1" && layer == "layer.10.weight"),
        "{e:?}"
    );
    let message = e.to_string();
    assert!(
        message.contains("m1.safetensors")
            && message.contains("1 NaN and 2 infinite")
            && message.contains("non_finite = \"skip\""),
        "{message}"
    );
    // On disk (a budget smaller than the layer): the rows of other models still read, the
    // bad one fails the same way.
    let on_disk = LayerDataset::open(&outs[0].dir, 1).unwrap();
    assert!(matches!(on_disk.weights, Matrices::OnDisk(_)));
    assert_eq!(
        on_disk.matrix(0).unwrap().as_ref(),
        values(0, 12).as_slice()
    );
    assert!(matches!(
        on_disk.matrix(1).unwrap_err(),
        DatasetError::NonFinite { .. }
    ));
    let mut out = Vec::new();
    assert!(matches!(
        on_disk.read_rows(&[0, 1, 2], &mut out).unwrap_err(),
        DatasetError::NonFinite { .. }
    ));

    let opts = ExtractOptions {
        in_place: true,
        non_finite: NonFinitePolicy::Skip,
        ..Default::default()
    };
    let r = extract(&models, &outs, &cifar_spec(), &opts).unwrap();
    assert_eq!(r.non_finite.len(), 1);
    assert_eq!((r.non_finite[0].nan, r.non_finite[0].inf), (1, 2));
    let l10 = LayerDataset::load(&outs[0].dir).unwrap();
    assert_eq!((l10.n, l10.skipped[0].id.as_str()), (2, "m1"));
    assert!(matches!(l10.weights, Matrices::Stacked(_)));
}

#[test]
fn structural_mismatches_name_the_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let mut models = zoo(&dir.path().join("models"), 3);
    // m1: a different shape; m2: the layer is missing (so indices shift too).
    write_model(
        &models[1].path,
        &[
            f32t("layer.2.weight", &[2, 3], &values(101, 6)),
            f32t("layer.10.weight", &[4, 3], &values(1, 12)),
            f32t("conv.weight", &[4, 3, 2, 2], &values(201, 48)),
        ],
        &[("dataset_chosen_targets", "['apple']")],
    );
    write_model(
        &models[2].path,
        &[
            f32t("layer.2.weight", &[2, 3], &values(102, 6)),
            f32t("conv.weight", &[4, 3, 2, 2], &values(202, 48)),
        ],
        &[("dataset_chosen_targets", "['apple']")],
    );
    let outs = outputs(
        &models[0].path,
        "1",
        &dir.path().join("out"),
        LayerMode::Auto,
    );
    let e = extract(&models, &outs, &cifar_spec(), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("m1.safetensors") && e.contains("[4, 3]") && e.contains("[3, 4]"),
        "{e}"
    );
    assert!(
        e.contains("m2.safetensors") && e.contains("`layer.10.weight`"),
        "{e}"
    );

    // With on_bad_file = skip, both are left out and listed.
    let opts = ExtractOptions {
        on_bad_file: OnError::Skip,
        ..Default::default()
    };
    let r = extract(&models, &outs, &cifar_spec(), &opts).unwrap();
    assert_eq!(r.layers[0].rows, 1);
    assert_eq!(r.skipped.len(), 2);

    // A truncated file is an error naming it, not a crash.
    let bytes = std::fs::read(&models[0].path).unwrap();
    std::fs::write(&models[1].path, &bytes[..bytes.len() - 10]).unwrap();
    let e = extract(&models, &outs, &cifar_spec(), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("m1.safetensors") && e.contains("truncated"),
        "{e}"
    );
    models.truncate(1);
}

#[test]
fn splits_from_layout_metadata_or_table() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("folder");
    for (i, split) in ["train", "val", "test", "train"].iter().enumerate() {
        write_model(
            &folder.join(format!("model_{i}.safetensors")),
            &[f32t("w", &[2, 2], &values(i as u64, 4))],
            &[("split", split), ("flip", "1")],
        );
    }
    std::fs::write(folder.join("notes.txt"), "not a model").unwrap();
    let found = discover(&Layout::Folder {
        root: folder.clone(),
        recursive: false,
    })
    .unwrap();
    assert_eq!(found.models.len(), 4);
    assert!(found.models.iter().all(|m| m.split.is_none()));
    let outs = outputs(
        &found.models[0].path,
        "w",
        &dir.path().join("out"),
        LayerMode::Auto,
    );
    let spec = LabelSpec::new("flip", LabelKind::Bool);

    // The folder layout has no splits: the default (layout) fails clearly.
    let e = extract(&found.models, &outs, &spec, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("has no split"), "{e}");

    let opts = ExtractOptions {
        splits: SplitSource::Metadata {
            key: "split".into(),
        },
        ..Default::default()
    };
    extract(&found.models, &outs, &spec, &opts).unwrap();
    let ds = LayerDataset::load(&outs[0].dir).unwrap();
    let splits: Vec<Split> = ds.models.iter().map(|m| m.split).collect();
    assert_eq!(
        splits,
        [Split::Train, Split::Val, Split::Test, Split::Train]
    );

    #[derive(serde::Deserialize)]
    struct W {
        splits: SplitSource,
    }
    let w: W = toml::from_str(
        "[splits.table]\ntrain = [\"model_0\", \"model_3\"]\nval = [\"model_1\"]\ntest_holdout = [\"model_2*\"]",
    )
    .unwrap();
    let opts = ExtractOptions {
        splits: w.splits.clone(),
        ..Default::default()
    };
    extract(&found.models, &outs, &spec, &opts).unwrap();
    let ds = LayerDataset::load(&outs[0].dir).unwrap();
    let splits: Vec<Split> = ds.models.iter().map(|m| m.split).collect();
    assert_eq!(
        splits,
        [Split::Train, Split::Val, Split::TestHoldout, Split::Train]
    );
    assert_eq!(ds.rows(Split::Train), [0, 3]);

    let w: W =
        toml::from_str("[splits.table]\ntrain = [\"model_*\"]\nval = [\"model_1\"]").unwrap();
    let opts = ExtractOptions {
        splits: w.splits,
        ..Default::default()
    };
    let e = extract(&found.models, &outs, &spec, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model_1") && e.contains("two splits"), "{e}");
    let w: W = toml::from_str("[splits.table]\ntrain = [\"model_0\"]").unwrap();
    let opts = ExtractOptions {
        splits: w.splits,
        ..Default::default()
    };
    let e = extract(&found.models, &outs, &spec, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model_1") && e.contains("no split"), "{e}");
    let w: W = toml::from_str("splits = { metadata = { key = \"flip\" } }").unwrap();
    let opts = ExtractOptions {
        splits: w.splits,
        ..Default::default()
    };
    let e = extract(&found.models, &outs, &spec, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`flip`") && e.contains("not a split"), "{e}");
}

#[test]
fn hub_cache_layouts_are_discovered() {
    let dir = tempfile::tempdir().unwrap();
    let make_repo = |cache: &Path, repo: &str, commit: &str, seed: u64| {
        let base = cache.join(format!("models--{}", repo.replace('/', "--")));
        std::fs::create_dir_all(base.join("refs")).unwrap();
        std::fs::write(base.join("refs/main"), format!("{commit}\n")).unwrap();
        write_model(
            &base
                .join("snapshots")
                .join(commit)
                .join("model.safetensors"),
            &[f32t("w", &[2, 2], &values(seed, 4))],
            &[("dataset_chosen_targets", "['apple']")],
        );
    };
    let hub = dir.path().join("hub");
    make_repo(&hub, "ProbeX/Model-J__DINO__model_idx_0002", "abc123", 2);
    make_repo(&hub, "ProbeX/Model-J__DINO__model_idx_0001", "def456", 1);
    make_repo(&hub, "other/model", "0f0f", 9);
    // An incomplete download: no refs/main.
    std::fs::create_dir_all(hub.join("models--ProbeX--Model-J__DINO__model_idx_0003/blobs"))
        .unwrap();
    let found = discover(&Layout::HfCache {
        root: hub.clone(),
        repos: Some("ProbeX/Model-J__DINO__*".into()),
        file: "model.safetensors".into(),
        revision: "main".into(),
    })
    .unwrap();
    let ids: Vec<&str> = found.models.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "ProbeX/Model-J__DINO__model_idx_0001",
            "ProbeX/Model-J__DINO__model_idx_0002"
        ]
    );
    assert!(found.notes.iter().any(|n| n.contains("model_idx_0003")));

    // Model-J's download script: one hub cache per split directory.
    let mj = dir.path().join("mj");
    make_repo(
        &mj.join("train"),
        "ProbeX/Model-J__DINO__model_idx_0001",
        "aa",
        1,
    );
    make_repo(
        &mj.join("train"),
        "ProbeX/Model-J__DINO__model_idx_0002",
        "bb",
        2,
    );
    make_repo(
        &mj.join("val"),
        "ProbeX/Model-J__DINO__model_idx_0005",
        "cc",
        5,
    );
    // And plain repo directories in another split.
    write_model(
        &mj.join("test/ProbeX/Model-J__DINO__model_idx_0007/model.safetensors"),
        &[f32t("w", &[2, 2], &values(7, 4))],
        &[("dataset_chosen_targets", "['worm']")],
    );
    let found = discover(&Layout::ModelJDiscriminative {
        root: mj.clone(),
        file: "model.safetensors".into(),
    })
    .unwrap();
    let got: Vec<(&str, Option<Split>)> = found
        .models
        .iter()
        .map(|m| (m.id.as_str(), m.split))
        .collect();
    assert_eq!(
        got,
        [
            ("ProbeX/Model-J__DINO__model_idx_0001", Some(Split::Train)),
            ("ProbeX/Model-J__DINO__model_idx_0002", Some(Split::Train)),
            ("ProbeX/Model-J__DINO__model_idx_0005", Some(Split::Val)),
            ("ProbeX/Model-J__DINO__model_idx_0007", Some(Split::Test)),
        ]
    );
    let outs = outputs(
        &found.models[0].path,
        "0",
        &dir.path().join("out"),
        LayerMode::Auto,
    );
    let r = extract(&found.models, &outs, &cifar_spec(), &Default::default()).unwrap();
    assert_eq!(r.layers[0].rows, 4);
    let ds = LayerDataset::load(&outs[0].dir).unwrap();
    assert_eq!(ds.matrix(3).unwrap(), values(7, 4).as_slice());

    // Duplicated ids across splits are an error naming both files.
    make_repo(
        &mj.join("val"),
        "ProbeX/Model-J__DINO__model_idx_0001",
        "dd",
        1,
    );
    let e = discover(&Layout::ModelJDiscriminative {
        root: mj,
        file: "model.safetensors".into(),
    })
    .unwrap_err();
    assert!(
        matches!(&e, probex_stages::extract::DiscoverError::DuplicateId { id, .. }
            if id == "ProbeX/Model-J__DINO__model_idx_0001"),
        "{e:?}"
    );
    assert!(e.to_string().contains("two models have the id"), "{e}");
}

/// A row's source digest is its whole file's blake3. With the run's stat cache (what the
/// stage passes), it is taken from the cache while the file's stamp holds: no second read.
#[test]
fn source_digests_are_file_digests_taken_from_the_stat_cache() {
    let dir = tempfile::tempdir().unwrap();
    let models = zoo(&dir.path().join("models"), 2);
    let outs = outputs(
        &models[0].path,
        "0",
        &dir.path().join("out"),
        LayerMode::Auto,
    );
    extract(&models, &outs, &cifar_spec(), &ExtractOptions::default()).unwrap();
    let side = LayerDataset::load_sidecar(&outs[0].dir).unwrap();
    for (m, r) in models.iter().zip(&side.models) {
        let want = blake3::hash(&std::fs::read(&m.path).unwrap())
            .to_hex()
            .to_string();
        assert_eq!(r.source_digest, want, "{}", m.id);
    }

    // A stat cache that knows model 0 by its current stamp under another digest: extraction
    // records that digest, so it did not hash the file again.
    let stat = dir.path().join("stat.json");
    let digests = FileDigests::open(stat.clone());
    let real = digests.digest(&models[0].path).unwrap();
    digests.save().unwrap();
    let text = std::fs::read_to_string(&stat)
        .unwrap()
        .replace(&real, "planted");
    std::fs::write(&stat, text).unwrap();
    let digests = FileDigests::open(stat);
    let opts = ExtractOptions {
        in_place: true,
        ..Default::default()
    };
    extract_with_digests(&models, &outs, &cifar_spec(), &opts, &digests).unwrap();
    let side = LayerDataset::load_sidecar(&outs[0].dir).unwrap();
    let by_id = |id: &str| side.models.iter().find(|r| r.id == id).unwrap();
    assert_eq!(by_id(&models[0].id).source_digest, "planted");
    let other = blake3::hash(&std::fs::read(&models[1].path).unwrap());
    assert_eq!(
        by_id(&models[1].id).source_digest,
        other.to_hex().to_string()
    );
    let stamp = FileStamp::of(&std::fs::metadata(&models[0].path).unwrap());
    assert!(side.references.iter().any(|r| r.stamp == stamp));
}

/// Writes LoRA files `m{i}` with one layer `unet.b.attn1.to_q` of matrix [4, 6]: `ranks[i]`
/// is model `i`'s rank, f16 values; returns the sources and each model's (up, down) values
/// as f16 rounds them.
/// A LoRA pair's factors: (up, down).
type Factors = (Vec<f32>, Vec<f32>);

fn lora_zoo(dir: &Path, ranks: &[usize]) -> (Vec<ModelSource>, Vec<Factors>) {
    let round = |v: Vec<f32>| -> Vec<f32> {
        v.into_iter()
            .map(|x| half::f16::from_f32(x).to_f32())
            .collect()
    };
    let mut sources = Vec::new();
    let mut factors = Vec::new();
    for (i, &r) in ranks.iter().enumerate() {
        let p = dir.join(format!("m{i}.safetensors"));
        let up = round(values(50 + i as u64, 4 * r));
        let down = round(values(60 + i as u64, r * 6));
        write_model(
            &p,
            &[
                f16t("unet.b.attn1.to_q.lora.up.weight", &[4, r], &up),
                f16t("unet.b.attn1.to_q.lora.down.weight", &[r, 6], &down),
            ],
            &[("class_name", ["cat", "dog"][i % 2])],
        );
        sources.push(source(&format!("m{i}"), p, Split::ALL[i % 2]));
        factors.push((up, down));
    }
    (sources, factors)
}

fn class_spec() -> LabelSpec {
    LabelSpec::new("class_name", LabelKind::Class)
}

/// A LoRA layer keeps its factors, at the files' f16, never the product: the layer file is
/// the size of the factors, they come back exactly, and each row's matrix is `B @ A`.
#[test]
fn lora_layers_are_stored_as_their_factors_at_the_files_precision() {
    let dir = tempfile::tempdir().unwrap();
    let (models, factors) = lora_zoo(&dir.path().join("models"), &[3, 3, 3, 3]);
    let outs = outputs(
        &models[0].path,
        "0",
        &dir.path().join("out"),
        LayerMode::Auto,
    );
    let report = extract(&models, &outs, &class_spec(), &ExtractOptions::default()).unwrap();
    let side = LayerDataset::load_sidecar(&outs[0].dir).unwrap();
    assert_eq!(side.storage, Storage::LoraFactors { rank: 3 });
    assert_eq!(side.precision, Precision::F16);
    let header = read_header(&outs[0].dir.join("layer.safetensors")).unwrap();
    let shapes: Vec<(&str, &[usize], String)> = header
        .tensors
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                t.shape.as_slice(),
                format!("{:?}", t.dtype),
            )
        })
        .collect();
    assert_eq!(
        shapes,
        [
            ("down", &[4usize, 3, 6][..], "F16".to_string()),
            ("labels", &[4][..], "F32".to_string()),
            ("up", &[4, 4, 3][..], "F16".to_string()),
        ]
    );
    // 4 models x (12 + 18) f16 values: the factors' bytes, not the [4, 6] f32 products'.
    assert_eq!(
        header.tensors.iter().map(|t| t.span.len()).sum::<usize>(),
        4 * 30 * 2 + 4 * 4
    );
    assert_eq!(
        report.bytes_written,
        std::fs::metadata(outs[0].dir.join("layer.safetensors"))
            .unwrap()
            .len()
    );
    let ds = LayerDataset::load(&outs[0].dir).unwrap();
    let Matrices::Factored { rank, up, down } = &ds.weights else {
        panic!("a LoRA layer loads factored");
    };
    assert_eq!(*rank, 3);
    for (i, (b, a)) in factors.iter().enumerate() {
        assert_eq!(&up[i * 12..(i + 1) * 12], b.as_slice());
        assert_eq!(&down[i * 18..(i + 1) * 18], a.as_slice());
        let mut want = Vec::new();
        transform::lora_product(b, a, 4, 3, 6, &mut want);
        assert_eq!(&*ds.matrix(i).unwrap(), want.as_slice());
    }
    // Asking for a precision converts the factors.
    let out32 = dir.path().join("out32");
    let outs32 = outputs(&models[0].path, "0", &out32, LayerMode::Auto);
    let opts = ExtractOptions {
        precision: Some(Precision::F32),
        ..Default::default()
    };
    extract(&models, &outs32, &class_spec(), &opts).unwrap();
    let ds32 = LayerDataset::load(&outs32[0].dir).unwrap();
    assert_eq!(ds32.weights, ds.weights);
    assert_eq!(
        LayerDataset::load_sidecar(&outs32[0].dir)
            .unwrap()
            .precision,
        Precision::F32
    );
}

/// Models trained at different ranks share one layer: the rows take the largest rank, lower
/// ranks zero-padded, and every row's matrix is still its own `B @ A` (whichever model the
/// reference is).
#[test]
fn lora_models_of_different_ranks_share_a_layer() {
    let dir = tempfile::tempdir().unwrap();
    let (models, factors) = lora_zoo(&dir.path().join("models"), &[2, 4, 1, 4]);
    let outs = outputs(
        &models[0].path,
        "0",
        &dir.path().join("out"),
        LayerMode::Auto,
    );
    assert_eq!(outs[0].layer.storage, Storage::LoraFactors { rank: 2 });
    extract(&models, &outs, &class_spec(), &ExtractOptions::default()).unwrap();
    let ds = LayerDataset::load(&outs[0].dir).unwrap();
    assert_eq!(ds.weights.storage(), Storage::LoraFactors { rank: 4 });
    for (i, (b, a)) in factors.iter().enumerate() {
        let r = b.len() / 4;
        let mut want = Vec::new();
        transform::lora_product(b, a, 4, r, 6, &mut want);
        let got = ds.matrix(i).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-6 * (1.0 + w.abs()),
                "model {i}: {g} vs {w}"
            );
        }
    }
}

/// A LoRA pair that is broken in one model (a missing factor, ranks that disagree between up
/// and down, a matrix of another shape) fails the extraction naming the file and tensor, or
/// under `on_bad_file = "skip"` leaves exactly that model out, saying why.
#[test]
fn broken_lora_pairs_name_the_file_and_tensor() {
    let cases: [(&str, Vec<T>, &str); 3] = [
        (
            "missing up",
            vec![f16t(
                "unet.b.attn1.to_q.lora.down.weight",
                &[3, 6],
                &[0.5; 18],
            )],
            "up factor `unet.b.attn1.to_q.lora.up.weight`",
        ),
        (
            "rank mismatch",
            vec![
                f16t("unet.b.attn1.to_q.lora.up.weight", &[4, 2], &[0.5; 8]),
                f16t("unet.b.attn1.to_q.lora.down.weight", &[3, 6], &[0.5; 18]),
            ],
            "rank mismatch",
        ),
        (
            "other shape",
            vec![
                f16t("unet.b.attn1.to_q.lora.up.weight", &[5, 3], &[0.5; 15]),
                f16t("unet.b.attn1.to_q.lora.down.weight", &[3, 6], &[0.5; 18]),
            ],
            "forms a [5, 6] matrix",
        ),
    ];
    for (what, tensors, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (mut models, _) = lora_zoo(&dir.path().join("models"), &[3, 3, 3]);
        let bad = dir.path().join("models").join("m9.safetensors");
        write_model(&bad, &tensors, &[("class_name", "cat")]);
        models.push(source("m9", bad.clone(), Split::Train));
        let outs = outputs(
            &models[0].path,
            "0",
            &dir.path().join("out"),
            LayerMode::Auto,
        );
        let err = extract(&models, &outs, &class_spec(), &ExtractOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains(&bad.display().to_string()), "{what}: {err}");
        assert!(err.contains("unet.b.attn1.to_q"), "{what}: {err}");
        assert!(err.contains(want), "{what}: {err}");

        let skip = ExtractOptions {
            on_bad_file: OnError::Skip,
            ..Default::default()
        };
        let outs = outputs(
            &models[0].path,
            "0",
            &dir.path().join("skip"),
            LayerMode::Auto,
        );
        let report = extract(&models, &outs, &class_spec(), &skip).unwrap();
        assert_eq!(report.layers[0].rows, 3, "{what}");
        let skipped: Vec<&str> = report.skipped.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(skipped, ["m9"], "{what}");
        assert!(report.skipped[0].reason.contains(want), "{what}");
    }
}

/// In place, a plain layer's dataset holds no matrix at all: its sidecar says where each row
/// is in its model file, and loading reads them, giving what a copy gives. A model file that
/// changes or vanishes afterwards is an error naming it, never other numbers.
#[test]
fn in_place_layers_refer_to_the_model_files_and_notice_when_they_change() {
    let dir = tempfile::tempdir().unwrap();
    let models = zoo(&dir.path().join("models"), 5);
    let spec = cifar_spec();
    let copied = outputs(
        &models[0].path,
        "1",
        &dir.path().join("copy"),
        LayerMode::Auto,
    );
    let copy_report = extract(&models, &copied, &spec, &ExtractOptions::default()).unwrap();
    let in_place = outputs(
        &models[0].path,
        "1",
        &dir.path().join("ref"),
        LayerMode::Auto,
    );
    let opts = ExtractOptions {
        in_place: true,
        ..Default::default()
    };
    let report = extract(&models, &in_place, &spec, &opts).unwrap();
    let side = LayerDataset::load_sidecar(&in_place[0].dir).unwrap();
    assert_eq!(side.storage, Storage::References { lora_rank: None });
    assert_eq!(side.references.len(), 5);
    assert!(side.references.iter().all(|r| r.file.is_absolute()));
    let header = read_header(&in_place[0].dir.join("layer.safetensors")).unwrap();
    let names: Vec<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["labels"], "no copy of any matrix");
    // At least the 5 rows of [3, 4] f32 fewer bytes than the copy.
    assert!(
        report.bytes_written + 5 * 12 * 4 <= copy_report.bytes_written,
        "{} vs {}",
        report.bytes_written,
        copy_report.bytes_written
    );
    let want = LayerDataset::load(&copied[0].dir).unwrap();
    let got = LayerDataset::load(&in_place[0].dir).unwrap();
    assert_eq!(got.weights, want.weights);
    assert_eq!(got.labels, want.labels);

    // A file is trusted by its stamp, as the stat cache behind a fetch's key trusts it: any
    // write is refused, naming the file (the engine re-extracts it), other bytes or the same.
    let victim = &side.references[3].file;
    let mut bytes = std::fs::read(victim).unwrap();
    let at = side.references[3].tensors[0].offset as usize;
    bytes[at] ^= 0x40;
    std::fs::write(victim, &bytes).unwrap();
    let err = LayerDataset::load(&in_place[0].dir)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&victim.display().to_string()), "{err}");
    assert!(err.contains("changed since extraction"), "{err}");
    bytes[at] ^= 0x40;
    std::fs::write(victim, &bytes).unwrap();
    let err = LayerDataset::load(&in_place[0].dir)
        .unwrap_err()
        .to_string();
    assert!(err.contains("changed since extraction"), "{err}");
    // Appending changes the size, which the message names.
    let mut longer = bytes.clone();
    longer.push(0);
    std::fs::write(victim, &longer).unwrap();
    let err = LayerDataset::load(&in_place[0].dir)
        .unwrap_err()
        .to_string();
    assert!(err.contains("size"), "{err}");
    std::fs::remove_file(victim).unwrap();
    let err = LayerDataset::load(&in_place[0].dir)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&victim.display().to_string()), "{err}");

    // A conversion, or zeroing NaN/Inf, copies.
    for (what, opts) in [
        (
            "precision",
            ExtractOptions {
                in_place: true,
                precision: Some(Precision::F16),
                ..Default::default()
            },
        ),
        (
            "zero",
            ExtractOptions {
                in_place: true,
                non_finite: NonFinitePolicy::Zero,
                ..Default::default()
            },
        ),
    ] {
        let models = zoo(&dir.path().join(what), 3);
        let outs = outputs(
            &models[0].path,
            "1",
            &dir.path().join(format!("{what}-out")),
            LayerMode::Auto,
        );
        extract(&models, &outs, &spec, &opts).unwrap();
        let side = LayerDataset::load_sidecar(&outs[0].dir).unwrap();
        assert_eq!(side.storage, Storage::Stacked, "{what}");
        assert!(side.references.is_empty(), "{what}");
    }
}

/// In place, a LoRA layer refers to each model's up and down factors in its file (ranks may
/// differ) and loads as the same factors a copy holds.
#[test]
fn in_place_lora_layers_refer_to_both_factors() {
    let dir = tempfile::tempdir().unwrap();
    let (models, _) = lora_zoo(&dir.path().join("models"), &[2, 4, 1, 4]);
    let copied = outputs(
        &models[0].path,
        "0",
        &dir.path().join("copy"),
        LayerMode::Auto,
    );
    extract(&models, &copied, &class_spec(), &ExtractOptions::default()).unwrap();
    let in_place = outputs(
        &models[0].path,
        "0",
        &dir.path().join("ref"),
        LayerMode::Auto,
    );
    let opts = ExtractOptions {
        in_place: true,
        ..Default::default()
    };
    extract(&models, &in_place, &class_spec(), &opts).unwrap();
    let side = LayerDataset::load_sidecar(&in_place[0].dir).unwrap();
    assert_eq!(side.storage, Storage::References { lora_rank: Some(4) });
    let shapes: Vec<Vec<Vec<usize>>> = side
        .references
        .iter()
        .map(|r| r.tensors.iter().map(|t| t.shape.clone()).collect())
        .collect();
    assert_eq!(
        shapes[2],
        [vec![4, 1], vec![1, 6]],
        "model 2: rank 1, up then down"
    );
    let got = LayerDataset::load(&in_place[0].dir).unwrap();
    let want = LayerDataset::load(&copied[0].dir).unwrap();
    assert_eq!(got.weights, want.weights);
    assert!(matches!(got.weights, Matrices::Factored { rank: 4, .. }));
}
