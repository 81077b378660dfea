//! Learning, determinism, resume and inference tests of the training API on generated data.
//! Small layers and few epochs: these run in CI on 2 cores in the dev profile.

mod common;
mod stage_run;

use std::ops::ControlFlow;

use probex_probes::models::ModelKind;
use probex_probes::models::checkpoint::{Checkpoint, STANDARDIZE_FILE, Standardization, TaskKind};
use probex_probes::training::{
    DataError, TrainConfig, TrainError, TrainOutcome, TrainProgress, encode, predict, train,
};
#[cfg(not(feature = "cuda"))]
use probex_probes::training::{DeviceError, DeviceSpec};
use probex_weights::dataset::{LayerDataset, Matrices, Split};
use probex_weights::embeddings::TextTable;

fn go(ds: &LayerDataset, text: Option<&TextTable>, cfg: &TrainConfig) -> TrainOutcome {
    train(ds, text, cfg, &common::device(), None, &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap()
}

fn small(model: ModelKind, epochs: usize) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 32,
        validate_every: 5,
        r_u: 8,
        r_v: 8,
        r_t: 16,
        hidden: 32,
        threads: 1,
        ..TrainConfig::new(model)
    }
}

fn metric(out: &TrainOutcome, split: &str, name: &str) -> f64 {
    out.report.metrics[split][name]
}

const COUNTS: [usize; 5] = [320, 64, 128, 0, 0];

#[test]
fn probex_learns_planted_multilabel_structure() {
    let ds = common::multilabel(COUNTS, 16, 12, 6, 0.3, 1);
    let out = go(&ds, None, &small(ModelKind::Probex, 40));
    let acc = metric(&out, "test", "accuracy");
    assert!(acc > 0.95, "ProbeX test binary accuracy {acc}");
    assert!(metric(&out, "test", "map") > 0.95);
    assert_eq!(out.report.task, TaskKind::MultiLabel);
    assert_eq!(out.report.selection_metric, "accuracy");
    // Validation ran after epochs 0, 5, ..., 35 and the kept epoch is one of them.
    let evals: Vec<usize> = out.report.curves.evals.iter().map(|e| e.epoch).collect();
    assert_eq!(evals, vec![0, 5, 10, 15, 20, 25, 30, 35]);
    assert!(evals.contains(&out.report.best_epoch));
    assert_eq!(out.report.curves.train_loss.len(), 40);
    let first = out.report.curves.train_loss[0];
    let last = *out.report.curves.train_loss.last().unwrap();
    assert!(last < first * 0.5, "loss {first} -> {last}");
    // Parameter count: U 12x8, V 8x16, M 16x64 + 16, head 6x16 + 6.
    assert_eq!(out.report.params, 96 + 128 + 1024 + 16 + 96 + 6);
}

#[test]
fn dense_learns_linear_structure() {
    let ds = common::multilabel(COUNTS, 16, 12, 6, 0.3, 2);
    let dense = go(&ds, None, &small(ModelKind::Dense, 40));
    let acc = metric(&dense, "test", "accuracy");
    // The planted structure is linear in the weights: the linear probe finds it.
    assert!(acc > 0.9, "Dense test accuracy {acc}");
    assert_eq!(dense.report.params, 16 * 12 * 6 + 6);
}

#[test]
fn statnn_is_at_chance_when_statistics_carry_no_signal() {
    let ds = common::sign_blocks(COUNTS, 2, 12, 6, 0.3, 2);
    let stat = go(&ds, None, &small(ModelKind::Statnn, 40));
    let acc = metric(&stat, "test", "accuracy");
    assert!(
        acc < 0.6,
        "StatNN test accuracy {acc} on statistics-free structure"
    );
    // The same data is easy for a probe that reads directions.
    let probex = go(&ds, None, &small(ModelKind::Probex, 20));
    let acc = metric(&probex, "test", "accuracy");
    assert!(acc > 0.95, "ProbeX test accuracy {acc}");
}

#[test]
fn statnn_learns_what_statistics_reveal() {
    let ds = common::scale_classes([240, 60, 90, 0, 0], 16, 12, &[0.5, 1.0, 2.0], 3);
    let out = go(&ds, None, &small(ModelKind::Statnn, 40));
    let top1 = metric(&out, "test", "top1");
    assert!(
        top1 > 0.95,
        "StatNN top1 {top1} when the class sets the weight scale"
    );
    assert_eq!(out.report.selection_metric, "top1");
    assert_eq!(metric(&out, "test", "top5"), 1.0);
}

#[test]
fn zero_shot_recovers_held_out_classes() {
    let (ds, text) = common::zero_shot(12, 4, [25, 5, 5, 10, 10], 16, 12, 8, 0.3, 4);
    let mut cfg = small(ModelKind::ProbexZeroshot, 60);
    cfg.validate_every = 10;
    let out = go(&ds, Some(&text), &cfg);
    assert_eq!(out.report.task, TaskKind::ZeroShot);
    let in_dist = metric(&out, "test", "top1");
    assert!(in_dist > 0.9, "in-distribution top1 {in_dist}");
    let hm = out.report.holdout_metrics.as_ref().unwrap();
    let zs = hm["test_holdout"]["top1"];
    // 4 held-out candidates: chance is 0.25.
    assert!(zs > 0.8, "zero-shot top1 {zs} (report: {:?})", hm);
    assert!(out.holdout_checkpoint.is_some());
    // The zero-shot checkpoint has the text-side head and no classification head.
    let ck = Checkpoint::from_bytes(&out.checkpoint, "best").unwrap();
    let names: Vec<&str> = ck.tensors.iter().map(|t| t.name.as_str()).collect();
    assert!(names.contains(&"regression_head.weight"), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("classification_head")));
    // Without the text table, zero-shot training is a clear error.
    let err = train(&ds, None, &cfg, &common::device(), None, &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err();
    assert!(
        matches!(
            err,
            TrainError::Data(DataError::NeedsTextTable(ModelKind::ProbexZeroshot))
        ) && err.to_string().contains("text table"),
        "{err:?}"
    );
    // A table missing a class names it.
    let mut partial = text.clone();
    partial.names[13] = "something else".into();
    let err = train(
        &ds,
        Some(&partial),
        &cfg,
        &common::device(),
        None,
        &mut |_| ControlFlow::Continue(()),
    )
    .unwrap_err();
    assert!(
        matches!(&err, TrainError::Data(DataError::MissingText { missing }) if missing.len() == 1),
        "{err:?}"
    );
    assert!(err.to_string().contains("thing 13"), "{err}");
}

#[test]
fn same_seed_same_result_different_seed_different_init() {
    let ds = common::multilabel([64, 16, 16, 0, 0], 8, 6, 3, 0.3, 5);
    let mut cfg = small(ModelKind::Probex, 3);
    cfg.validate_every = 1;
    cfg.threads = 2;
    let a = go(&ds, None, &cfg);
    let b = go(&ds, None, &cfg);
    assert_eq!(a.checkpoint, b.checkpoint);
    assert_eq!(a.report.curves, b.report.curves);
    cfg.seed = 1;
    let c = go(&ds, None, &cfg);
    assert_ne!(a.checkpoint, c.checkpoint);
    let mut cfg0 = cfg.clone();
    cfg0.epochs = 1;
    cfg0.lr = 1e-12;
    let p0 = Checkpoint::from_bytes(&go(&ds, None, &cfg0).checkpoint, "s1").unwrap();
    cfg0.seed = 0;
    let p1 = Checkpoint::from_bytes(&go(&ds, None, &cfg0).checkpoint, "s0").unwrap();
    assert_ne!(
        p0.tensors[0].values, p1.tensors[0].values,
        "different seeds, same init"
    );
}

#[test]
fn a_killed_training_resumes_where_it_stopped() {
    let ds = common::multilabel([64, 16, 16, 0, 0], 8, 6, 3, 0.3, 6);
    let mut cfg = small(ModelKind::Probex, 6);
    cfg.validate_every = 2;
    cfg.checkpoint_every = 1;
    let straight = go(&ds, None, &cfg);

    let dir = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    let err = train(
        &ds,
        None,
        &cfg,
        &common::device(),
        Some(dir.path()),
        &mut |p: &TrainProgress| {
            seen.push(p.epoch);
            if p.epoch == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    )
    .unwrap_err();
    assert!(matches!(err, TrainError::Cancelled { epoch: 2 }), "{err}");
    assert_eq!(seen, vec![0, 1, 2]);
    let mut later = Vec::new();
    let resumed = train(
        &ds,
        None,
        &cfg,
        &common::device(),
        Some(dir.path()),
        &mut |p: &TrainProgress| {
            later.push((p.epoch, p.resumed_from));
            ControlFlow::Continue(())
        },
    )
    .unwrap();
    assert_eq!(later.first(), Some(&(3, Some(3))));
    assert_eq!(resumed.report.resumed_from, Some(3));
    let (a, b) = (
        Checkpoint::from_bytes(&resumed.checkpoint, "resumed").unwrap(),
        Checkpoint::from_bytes(&straight.checkpoint, "straight").unwrap(),
    );
    assert_eq!(a.meta, b.meta);
    for (x, y) in a.tensors.iter().zip(&b.tensors) {
        assert_eq!(x, y, "{}", x.name);
    }
    assert_eq!(resumed.checkpoint, straight.checkpoint);
    assert_eq!(resumed.report.curves, straight.report.curves);
    assert_eq!(resumed.report.metrics, straight.report.metrics);

    // A finished work dir returns the same result without training again.
    let again = train(
        &ds,
        None,
        &cfg,
        &common::device(),
        Some(dir.path()),
        &mut |_| panic!("no epoch should run"),
    )
    .unwrap();
    assert_eq!(again.checkpoint, straight.checkpoint);

    // Another config does not resume from this state.
    let mut other = cfg.clone();
    other.lr = 2e-3;
    let fresh = train(
        &ds,
        None,
        &other,
        &common::device(),
        Some(dir.path()),
        &mut |_| ControlFlow::Continue(()),
    )
    .unwrap();
    assert_eq!(fresh.report.resumed_from, None);
}

#[test]
fn predict_and_encode_reproduce_the_reported_metrics() {
    let ds = common::multilabel([96, 32, 32, 0, 0], 8, 6, 4, 0.3, 7);
    let out = go(&ds, None, &small(ModelKind::Probex, 10));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("best.safetensors");
    std::fs::write(&path, &out.checkpoint).unwrap();
    let p = predict(&path, &ds, None, &common::device()).unwrap();
    assert_eq!(p.task, TaskKind::MultiLabel);
    assert_eq!(p.columns.len(), 4);
    let rows = ds.rows(Split::Test);
    let Labels4 { targets } = labels(&ds);
    let mut correct = 0;
    for &r in &rows {
        for c in 0..4 {
            correct += ((p.scores[r * 4 + c] > 0.0) == (targets[r * 4 + c] > 0.5)) as usize;
        }
    }
    let acc = correct as f64 / (rows.len() * 4) as f64;
    assert!((acc - metric(&out, "test", "accuracy")).abs() < 1e-9);
    let e = encode(&path, &ds, &common::device()).unwrap();
    assert_eq!(e.dim, 16);
    assert_eq!(e.values.len(), ds.n * 16);
    // Wrong layer shape is a clear error.
    let other = common::multilabel([8, 0, 0, 0, 0], 6, 6, 4, 0.3, 7);
    let err = predict(&path, &other, None, &common::device())
        .unwrap_err()
        .to_string();
    assert!(err.contains("[8, 6]") && err.contains("[6, 6]"), "{err}");
}

struct Labels4 {
    targets: Vec<f32>,
}

fn labels(ds: &LayerDataset) -> Labels4 {
    match &ds.labels {
        probex_weights::dataset::Labels::MultiLabel { targets, .. } => Labels4 {
            targets: targets.clone(),
        },
        _ => unreachable!(),
    }
}

#[test]
fn regression_predicts_on_the_original_scale() {
    // Target = a linear read-out of the weights, on a scale far from 0 and 1.
    let mut ds = common::multilabel([160, 40, 40, 0, 0], 8, 6, 1, 0.3, 8);
    let t: Vec<f32> = (0..ds.n)
        .map(|i| 100.0 + 10.0 * ds.matrix(i).unwrap().iter().take(12).sum::<f32>())
        .collect();
    ds.labels = probex_weights::dataset::Labels::Numeric {
        targets: t.clone(),
        transform: "identity".into(),
    };
    let out = go(&ds, None, &small(ModelKind::Probex, 40));
    let r2 = metric(&out, "test", "r2");
    assert!(r2 > 0.8, "regression R2 {r2}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("best.safetensors");
    std::fs::write(&path, &out.checkpoint).unwrap();
    let p = predict(&path, &ds, None, &common::device()).unwrap();
    let rows = ds.rows(Split::Test);
    let mae: f64 = rows
        .iter()
        .map(|&r| (p.scores[r] - t[r]).abs() as f64)
        .sum::<f64>()
        / rows.len() as f64;
    assert!((mae - metric(&out, "test", "mae")).abs() < 1e-4, "{mae}");
}

#[test]
fn requests_that_cannot_run_are_clear_errors() {
    let ds = common::multilabel([8, 0, 0, 0, 0], 4, 4, 2, 0.3, 9);
    let cfg = small(ModelKind::Probex, 1);
    #[cfg(not(feature = "cuda"))]
    {
        let err = train(&ds, None, &cfg, &DeviceSpec::Cuda(0), None, &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap_err();
        assert!(
            matches!(err, TrainError::Device(DeviceError::NoCudaBuild(0)))
                && err.to_string().contains("--features cuda")
        );
    }
    let mut bad = cfg.clone();
    bad.lr = -1.0;
    let err = train(&ds, None, &bad, &common::device(), None, &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err();
    assert!(err.to_string().contains("`lr`"), "{err}");
    let no_train = common::multilabel([0, 4, 0, 0, 0], 4, 4, 2, 0.3, 9);
    let err = train(&no_train, None, &cfg, &common::device(), None, &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err();
    assert!(err.to_string().contains("train split"), "{err}");
    // Without a val split the last epoch is kept.
    let out = go(&ds, None, &cfg);
    assert_eq!(out.report.best_epoch, 0);
    assert!(out.report.metrics.contains_key("train"));
}

/// Writes a training's files as the `train` stage does (the checkpoint, and with standardised
/// inputs the standardisation beside it); returns the checkpoint's path.
fn save(out: &TrainOutcome, dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("checkpoint.safetensors");
    std::fs::write(&path, &out.checkpoint).unwrap();
    if let Some(s) = &out.standardize {
        std::fs::write(dir.join(STANDARDIZE_FILE), s).unwrap();
    }
    path
}

/// The tensor names of the authors' `ProbeXClassification` state_dict: a strict
/// `load_state_dict` accepts exactly these.
const PROBEX_STATE_DICT: [&str; 6] = [
    "classification_head.bias",
    "classification_head.weight",
    "per_probe_encoders.bias",
    "per_probe_encoders.weight",
    "probes.weight",
    "shared_probe_proj.weight",
];

/// Standardised inputs remove what every model shares: adding one base matrix to every model
/// (a model tree's base) changes nothing a standardised probe computes, while the raw probe
/// sees different inputs. The checkpoint stays exactly the authors' state dict; the mean and
/// scale lie beside it in `standardize.safetensors`, and inference applies them.
#[test]
fn standardized_probe_ignores_a_shared_base_and_keeps_its_mean_beside_the_checkpoint() {
    let ds = common::multilabel(COUNTS, 8, 6, 4, 0.3, 5);
    let mut shifted = ds.clone();
    let base: Vec<f32> = (0..48)
        .map(|i| 3.0 + (i as f32 * 0.37).sin() * 5.0)
        .collect();
    let Matrices::Stacked(weights) = &mut shifted.weights else {
        unreachable!("generated stacked")
    };
    for row in weights.chunks_exact_mut(48) {
        row.iter_mut().zip(&base).for_each(|(v, b)| *v += b);
    }
    let cfg = TrainConfig {
        standardize: true,
        ..small(ModelKind::Probex, 10)
    };
    let a = go(&ds, None, &cfg);
    let b = go(&shifted, None, &cfg);
    let la = &a.report.curves.train_loss;
    let lb = &b.report.curves.train_loss;
    let worst = la
        .iter()
        .zip(lb)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    assert!(
        worst < 1e-4,
        "loss curves differ by {worst}: {la:?} vs {lb:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = save(&b, dir.path());
    let ckpt = Checkpoint::read(&path).unwrap();
    // Nothing but the module's parameters: a strict load_state_dict takes it as it is.
    let names: Vec<&str> = ckpt.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, PROBEX_STATE_DICT);
    let scale = ckpt.meta.as_ref().unwrap().task.input_scale.unwrap();
    let side = Standardization::read(&dir.path().join(STANDARDIZE_FILE)).unwrap();
    assert_eq!((side.d_h, side.d_w, side.scale), (8, 6, scale));
    // The stored mean is the training rows' mean, so it carries the base.
    let avg = side.mean.iter().zip(&base).map(|(m, b)| m - b).sum::<f32>() / 48.0;
    assert!(avg.abs() < 0.5, "{avg}");
    // A raw probe writes no standardisation.
    assert!(
        go(&ds, None, &small(ModelKind::Probex, 1))
            .standardize
            .is_none()
    );
    // Inference standardises too: the shifted data under the shifted model's checkpoint scores
    // as well as training measured.
    let pred = predict(&path, &shifted, None, &common::device()).unwrap();
    let test: Vec<usize> = (0..shifted.n)
        .filter(|&i| shifted.models[i].split == Split::Test)
        .collect();
    let probex_weights::dataset::Labels::MultiLabel { targets, .. } = &shifted.labels else {
        unreachable!()
    };
    let right = test
        .iter()
        .flat_map(|&i| (0..4).map(move |c| (i, c)))
        .filter(|&(i, c)| (pred.scores[i * 4 + c] > 0.0) == (targets[i * 4 + c] > 0.5))
        .count();
    let acc = right as f64 / (test.len() * 4) as f64;
    let want = metric(&b, "test", "accuracy");
    assert!(
        (acc - want).abs() < 1e-9,
        "predict {acc} vs training's {want}"
    );

    // The standardisation of another training (another scale) is refused ...
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let mut foreign = side.clone();
    foreign.scale *= 2.0;
    std::fs::write(other.join(STANDARDIZE_FILE), foreign.to_bytes().unwrap()).unwrap();
    std::fs::write(other.join("checkpoint.safetensors"), &b.checkpoint).unwrap();
    let e = predict(
        &other.join("checkpoint.safetensors"),
        &shifted,
        None,
        &common::device(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("another training"), "{e}");
    // ... and so is a standardised checkpoint without its file, saying what to copy.
    std::fs::remove_file(dir.path().join(STANDARDIZE_FILE)).unwrap();
    let e = predict(&path, &shifted, None, &common::device())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(STANDARDIZE_FILE) && e.contains("missing") && e.contains("standardize = true"),
        "{e}"
    );
    // A checkpoint of the old layout (the mean inside it) is named as such.
    let mut legacy = ckpt.clone();
    legacy.tensors.push(probex_probes::models::NamedTensor {
        name: "input_mean".into(),
        shape: vec![8, 6],
        values: side.mean.clone(),
    });
    legacy.write(&path).unwrap();
    let e = predict(&path, &shifted, None, &common::device())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("input_mean") && e.contains("run its experiment again"),
        "{e}"
    );
    // StatNN standardises its statistics itself; asking for more is an error.
    let c: TrainConfig = toml::from_str("model = \"statnn\"\nstandardize = true").unwrap();
    let e = c.validate().unwrap_err();
    assert_eq!(e.key(), "standardize");
    assert!(e.to_string().contains("statnn"), "{e}");
}

/// A standardised training resumed from a work dir ends with the checkpoint of a straight run:
/// the module's parameters only, even when the best-so-far file there was written in the old
/// layout (the training mean inside it), and the same standardisation.
#[test]
fn a_resumed_standardised_training_keeps_its_checkpoint_a_plain_state_dict() {
    let ds = common::multilabel([64, 16, 16, 0, 0], 8, 6, 3, 0.3, 6);
    // Validation after epochs 0 and 2 only: the kept checkpoint is the one read back from
    // the work dir after the resume.
    let mut cfg = small(ModelKind::Probex, 4);
    cfg.standardize = true;
    cfg.validate_every = 2;
    cfg.checkpoint_every = 1;
    let straight = go(&ds, None, &cfg);
    let dir = tempfile::tempdir().unwrap();
    let stop_at_2 = &mut |p: &TrainProgress| {
        if p.epoch == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let err = train(
        &ds,
        None,
        &cfg,
        &common::device(),
        Some(dir.path()),
        stop_at_2,
    )
    .unwrap_err();
    assert!(matches!(err, TrainError::Cancelled { epoch: 2 }), "{err}");
    let best = dir.path().join("best.safetensors");
    let mut old = Checkpoint::read(&best).unwrap();
    old.tensors.push(probex_probes::models::NamedTensor {
        name: "input_mean".into(),
        shape: vec![8, 6],
        values: vec![0.5; 48],
    });
    old.write(&best).unwrap();
    let resumed = train(
        &ds,
        None,
        &cfg,
        &common::device(),
        Some(dir.path()),
        &mut |_| ControlFlow::Continue(()),
    )
    .unwrap();
    assert_eq!(resumed.report.resumed_from, Some(3));
    assert_eq!(resumed.checkpoint, straight.checkpoint);
    assert!(resumed.standardize.is_some());
    assert_eq!(resumed.standardize, straight.standardize);
}

/// The Python that runs docs/load_in_pytorch.py (`PROBEX_PYTHON`, else `python3`) if it has
/// NumPy; `None` (the test skips) otherwise, unless `PROBEX_REQUIRE_PYTHON` is set (CI), when
/// its absence fails the test.
fn python_with_numpy() -> Option<String> {
    let python = std::env::var("PROBEX_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = std::process::Command::new(&python)
        .args(["-c", "import numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    assert!(
        std::env::var_os("PROBEX_REQUIRE_PYTHON").is_none(),
        "PROBEX_REQUIRE_PYTHON is set but `{python} -c 'import numpy'` fails: pip install numpy"
    );
    eprintln!("skipped: `{python}` has no NumPy (pip install numpy, or set PROBEX_PYTHON)");
    None
}

/// The documented way to use a standardised probe outside probex works: the `train` stage's
/// artifact, read by docs/load_in_pytorch.py (a strict state dict plus `(W - mean) / scale`
/// from standardize.safetensors, the forward pass in NumPy), gives the scores probex stored,
/// on a layer as `probex export` writes it. A raw probe of the same layer does too, and the
/// script fails when the standardisation is left out.
#[test]
fn the_python_snippet_reproduces_probex_scores_from_a_standardised_checkpoint() {
    use probex_engine::cache::Key;
    use probex_engine::{Artifact, Inputs};
    use probex_stages::train::{Train, files};
    use probex_weights::dataset::Precision;

    let Some(python) = python_with_numpy() else {
        return;
    };
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/load_in_pytorch.py");
    let mut ds = common::multilabel(COUNTS, 8, 6, 4, 0.3, 21);
    // A shared base far from zero, as a model tree has: unstandardised inputs would score
    // differently, so the check sees whether the standardisation was applied.
    if let Matrices::Stacked(w) = &mut ds.weights {
        w.iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v += 2.0 + (i % 48) as f32 * 0.1);
    }
    let tmp = tempfile::tempdir().unwrap();
    let (layer_dir, export) = (tmp.path().join("layer"), tmp.path().join("export"));
    ds.save(&layer_dir, Precision::F32).unwrap();
    ds.save_stacked(&export, Precision::F32).unwrap();
    let inputs = Inputs::new([(
        probex_stages::extract::ARTIFACT,
        vec![Artifact {
            node: "layers".into(),
            stage: "layers".into(),
            key: Key::parse(&"0".repeat(64)).unwrap(),
            dir: layer_dir,
            coords: Vec::new(),
            meta: serde_json::Value::Null,
            results: None,
        }],
    )]);
    let run_script = |probe: &std::path::Path| {
        std::process::Command::new(&python)
            .arg(&script)
            .arg(probe)
            .arg(export.join("layer.safetensors"))
            .args(["--check", "--numpy"])
            .output()
            .unwrap()
    };
    for standardize in [true, false] {
        let probe = tmp.path().join(format!("probe-{standardize}"));
        let cfg = TrainConfig {
            standardize,
            ..small(ModelKind::Probex, 6)
        };
        stage_run::run(&Train, &cfg, &inputs, &probe, 1).unwrap();
        assert_eq!(probe.join(files::STANDARDIZE).is_file(), standardize);
        let out = run_script(&probe);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "standardize={standardize}: {text}");
        assert!(text.contains("max |logit - probex score|"), "{text}");
        assert_eq!(text.contains("standardised inputs"), standardize, "{text}");
        if standardize {
            // Without the standardisation (what loading the checkpoint alone gives), the
            // logits are not probex's: the check catches it.
            std::fs::remove_file(probe.join(files::STANDARDIZE)).unwrap();
            let out = run_script(&probe);
            assert!(!out.status.success(), "raw inputs passed the check");
        }
    }
}

/// Training on a LoRA layer's factors (ProbeX's encoder reads them without forming `B @ A`;
/// Dense and StatNN form it per batch) gives what training on the stacked products gives,
/// within float tolerance: every epoch's loss, the kept epoch, the metrics, the checkpoint's
/// parameters, and inference through `encode` and `predict`. Standardised inputs too.
#[test]
fn factored_and_materialised_lora_layers_train_alike() {
    let (factored, stacked) = common::factored_multilabel(COUNTS, 12, 10, 4, 0.3, 9);
    let close = |a: f64, b: f64, tol: f64, what: &str| {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{what}: factored {a} vs stacked {b}"
        );
    };
    for (model, standardize) in [
        (ModelKind::Probex, false),
        (ModelKind::Probex, true),
        (ModelKind::Dense, true),
        (ModelKind::Statnn, false),
    ] {
        let what = format!("{model} standardize={standardize}");
        let cfg = TrainConfig {
            standardize,
            ..small(model, 20)
        };
        let f = go(&factored, None, &cfg);
        let s = go(&stacked, None, &cfg);
        let (fl, sl) = (&f.report.curves.train_loss, &s.report.curves.train_loss);
        assert_eq!(fl.len(), sl.len());
        for (e, (a, b)) in fl.iter().zip(sl).enumerate() {
            close(*a, *b, 1e-3, &format!("{what} epoch {e} loss"));
        }
        assert_eq!(f.report.best_epoch, s.report.best_epoch, "{what}");
        for split in ["train", "val", "test"] {
            close(
                metric(&f, split, "accuracy"),
                metric(&s, split, "accuracy"),
                0.005,
                &format!("{what} {split} accuracy"),
            );
        }
        assert!(metric(&f, "test", "accuracy") > 0.8, "{what}: learns");
        let (cf, cs) = (
            Checkpoint::from_bytes(&f.checkpoint, "factored").unwrap(),
            Checkpoint::from_bytes(&s.checkpoint, "stacked").unwrap(),
        );
        for (a, b) in cf.tensors.iter().zip(&cs.tensors) {
            assert_eq!(a.name, b.name);
            for (x, y) in a.values.iter().zip(&b.values) {
                close(
                    f64::from(*x),
                    f64::from(*y),
                    1e-3,
                    &format!("{what} {}", a.name),
                );
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let ckpt = save(&f, dir.path());
        let device = common::device();
        let (ef, es) = (
            encode(&ckpt, &factored, &device).unwrap(),
            encode(&ckpt, &stacked, &device).unwrap(),
        );
        for (a, b) in ef.values.iter().zip(&es.values) {
            close(
                f64::from(*a),
                f64::from(*b),
                1e-4,
                &format!("{what} encoding"),
            );
        }
        let (pf, ps) = (
            predict(&ckpt, &factored, None, &device).unwrap(),
            predict(&ckpt, &stacked, None, &device).unwrap(),
        );
        for (a, b) in pf.scores.iter().zip(&ps.scores) {
            close(f64::from(*a), f64::from(*b), 1e-4, &format!("{what} score"));
        }
    }
}

/// A layer left on disk (opened with a memory budget smaller than it) trains exactly as the
/// same layer in memory: batches are read from the file as they are needed, standardised
/// then, and nothing else changes.
#[test]
fn a_layer_read_from_disk_batch_by_batch_trains_as_in_memory() {
    let ds = common::multilabel(COUNTS, 8, 6, 4, 0.3, 11);
    let dir = tempfile::tempdir().unwrap();
    ds.save(dir.path(), probex_weights::dataset::Precision::F32)
        .unwrap();
    let on_disk = LayerDataset::open(dir.path(), 1024).unwrap();
    assert!(matches!(on_disk.weights, Matrices::OnDisk(_)));
    let in_memory = LayerDataset::open(dir.path(), u64::MAX).unwrap();
    assert_eq!(in_memory.weights, ds.weights);
    for (model, standardize) in [(ModelKind::Probex, true), (ModelKind::Statnn, false)] {
        let cfg = TrainConfig {
            standardize,
            ..small(model, 6)
        };
        let a = go(&on_disk, None, &cfg);
        let b = go(&in_memory, None, &cfg);
        assert_eq!(a.checkpoint, b.checkpoint, "{model}");
        assert_eq!(a.report.curves, b.report.curves, "{model}");
    }
}

/// Collects what a stage shows the person running it.
#[derive(Default)]
struct Notes(std::sync::Mutex<Vec<String>>);

impl probex_engine::ProgressSink for Notes {
    fn progress(&self, _: &str, _: u64, _: u64, _: &str) {}
    fn note(&self, _: &str, message: &str) {
        self.0.lock().unwrap().push(message.to_string());
    }
}

#[test]
fn the_train_stage_stops_with_the_engines_cancelled_and_says_when_it_resumes() {
    use probex_engine::{Artifact, Cancelled, Inputs, RunContext, Stage};
    use std::sync::atomic::AtomicBool;

    let tmp = tempfile::tempdir().unwrap();
    let layer = tmp.path().join("layer");
    std::fs::create_dir_all(&layer).unwrap();
    let ds = common::multilabel([64, 16, 16, 0, 0], 8, 6, 3, 0.3, 6);
    ds.save(&layer, Default::default()).unwrap();
    let inputs = Inputs::new([(
        "layer",
        vec![Artifact {
            node: "layers[layer=0]".into(),
            stage: "layers".into(),
            key: probex_engine::cache::Key::parse(&"a".repeat(64)).unwrap(),
            dir: layer,
            coords: Vec::new(),
            meta: serde_json::Value::Null,
            results: None,
        }],
    )]);
    let mut cfg = small(ModelKind::Probex, 6);
    cfg.checkpoint_every = 1;
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let notes = Notes::default();
    let run = |cancel: &AtomicBool, out: &str| {
        let out = tmp.path().join(out);
        std::fs::create_dir_all(&out).unwrap();
        let cx = RunContext::new(
            "probe".into(),
            out,
            work.clone(),
            tmp.path().to_path_buf(),
            None,
            1,
            true,
            None,
            &notes,
            cancel,
        );
        probex_stages::train::Train.run(&cfg, &inputs, &cx)
    };
    // Interrupted after its first epoch: the engine's typed `Cancelled`, not a failure.
    let err = run(&AtomicBool::new(true), "out1").unwrap_err();
    assert!(err.chain().any(|c| c.is::<Cancelled>()), "{err:#}");
    assert!(notes.0.lock().unwrap().is_empty());
    // The next run resumes, and says so.
    run(&AtomicBool::new(false), "out2").unwrap();
    let said = notes.0.lock().unwrap().join("\n");
    assert!(said.contains("resumed from the checkpoint"), "{said}");
}

// ---------------------------------------------------------------------------------------------
// Sweep mode: a gang of equal-shape layers trains together, each as it trains alone.

/// Three layers of one shape and row set (other weights, other labels): what a sweep gangs.
fn gang_layers() -> Vec<LayerDataset> {
    (1..=3)
        .map(|seed| common::multilabel([64, 16, 16, 0, 0], 16, 12, 3, 0.3, seed))
        .collect()
}

fn gang_cfg() -> TrainConfig {
    let mut cfg = small(ModelKind::Probex, 6);
    cfg.validate_every = 1;
    cfg.checkpoint_every = 1;
    cfg
}

/// `got` equals `want` as a solo training: train loss per epoch within 1e-5 relative, same
/// best epoch, checkpoint tensors within 1e-5, same metrics and curves of evaluations.
fn assert_as_solo(what: &str, got: &TrainOutcome, want: &TrainOutcome) {
    let (g, w) = (&got.report.curves, &want.report.curves);
    assert_eq!(g.train_loss.len(), w.train_loss.len(), "{what}");
    for (e, (a, b)) in g.train_loss.iter().zip(&w.train_loss).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1e-12),
            "{what}: epoch {e} train loss {a} vs {b}"
        );
    }
    assert_eq!(got.report.best_epoch, want.report.best_epoch, "{what}");
    // Metrics to the last bits but one: a resume state keeps its curves as JSON, whose float
    // printing may round the last bit.
    let close = |a: &serde_json::Value, b: &serde_json::Value| -> bool {
        fn walk(a: &serde_json::Value, b: &serde_json::Value) -> bool {
            match (a, b) {
                (serde_json::Value::Number(x), serde_json::Value::Number(y)) => {
                    let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(0.0));
                    (x - y).abs() <= 1e-12 * y.abs().max(1.0)
                }
                (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                    x.len() == y.len()
                        && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| walk(v, w)))
                }
                (serde_json::Value::Array(x), serde_json::Value::Array(y)) => {
                    x.len() == y.len() && x.iter().zip(y).all(|(v, w)| walk(v, w))
                }
                _ => a == b,
            }
        }
        walk(a, b)
    };
    assert!(
        close(&json(&got.report.metrics), &json(&want.report.metrics)),
        "{what}: metrics {:?} vs {:?}",
        got.report.metrics,
        want.report.metrics
    );
    assert!(
        close(&json(&g.evals), &json(&w.evals)),
        "{what}: evaluations"
    );
    assert_eq!(got.report.params, want.report.params, "{what}");
    common::assert_checkpoints_close(&got.checkpoint, &want.checkpoint, 1e-5, what);
}

#[test]
fn a_gang_trains_each_member_as_it_trains_alone() {
    use probex_probes::training::{GangMember, train_gang};
    let layers = gang_layers();
    let cfg = gang_cfg();
    let solo: Vec<TrainOutcome> = layers.iter().map(|ds| go(ds, None, &cfg)).collect();
    // The members are different problems: a gang that mixed them up would not match.
    assert_ne!(solo[0].checkpoint, solo[1].checkpoint);
    let members: Vec<GangMember> = layers
        .iter()
        .map(|ds| GangMember {
            ds,
            text: None,
            cfg: &cfg,
            work_dir: None,
        })
        .collect();
    let mut epochs = vec![Vec::new(); 3];
    let gang = train_gang(&members, &common::device(), &mut |m, p| {
        epochs[m].push(p.epoch);
        ControlFlow::Continue(())
    });
    // Lockstep: every member hears every epoch.
    assert!(
        epochs.iter().all(|e| *e == (0..6).collect::<Vec<_>>()),
        "{epochs:?}"
    );
    for (i, (g, s)) in gang.iter().zip(&solo).enumerate() {
        let g = g.as_ref().unwrap_or_else(|e| panic!("member {i}: {e}"));
        assert_as_solo(&format!("member {i}"), g, s);
    }
}

#[test]
fn a_killed_gang_resumes_each_member_from_its_own_state() {
    use probex_probes::training::{GangMember, train_gang};
    let layers = gang_layers();
    let cfg = gang_cfg();
    let solo: Vec<TrainOutcome> = layers.iter().map(|ds| go(ds, None, &cfg)).collect();
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<std::path::PathBuf> = (0..3).map(|i| tmp.path().join(format!("w{i}"))).collect();
    let members: Vec<GangMember> = layers
        .iter()
        .zip(&dirs)
        .map(|(ds, dir)| GangMember {
            ds,
            text: None,
            cfg: &cfg,
            work_dir: Some(dir),
        })
        .collect();
    // Stopped at different epochs (member 1 earlier), as a kill between saves leaves them.
    let stop_at = [3, 1, 3];
    let first = train_gang(&members, &common::device(), &mut |m, p| {
        if p.epoch == stop_at[m] {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    for (m, r) in first.iter().enumerate() {
        assert!(
            matches!(r, Err(TrainError::Cancelled { epoch }) if *epoch == stop_at[m]),
            "member {m}: {:?}",
            r.as_ref().err()
        );
    }
    // The rerun resumes each member where it stopped (sub-gangs by resume epoch).
    let mut resumed = vec![None; 3];
    let again = train_gang(&members, &common::device(), &mut |m, p| {
        resumed[m].get_or_insert(p.resumed_from);
        ControlFlow::Continue(())
    });
    assert_eq!(resumed, vec![Some(Some(4)), Some(Some(2)), Some(Some(4))]);
    for (i, (g, s)) in again.iter().zip(&solo).enumerate() {
        let g = g.as_ref().unwrap_or_else(|e| panic!("member {i}: {e}"));
        assert_as_solo(&format!("resumed member {i}"), g, s);
    }
}

#[test]
fn the_train_stage_gangs_probex_layers_of_one_shape_and_rows_and_writes_solo_artifacts() {
    use probex_engine::{Artifact, Inputs, RunContext, Stage};
    use std::sync::atomic::AtomicBool;

    let tmp = tempfile::tempdir().unwrap();
    let input = |name: &str, ds: &LayerDataset| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        ds.save(&dir, Default::default()).unwrap();
        Inputs::new([(
            "layer",
            vec![Artifact {
                node: format!("layers[layer={name}]"),
                stage: "layers".into(),
                key: probex_engine::cache::Key::parse(&"a".repeat(64)).unwrap(),
                dir,
                coords: Vec::new(),
                meta: serde_json::Value::Null,
                results: None,
            }],
        )])
    };
    let layers = gang_layers();
    let inputs: Vec<Inputs> = layers
        .iter()
        .enumerate()
        .map(|(i, ds)| input(&format!("l{i}"), ds))
        .collect();
    let cfg = gang_cfg();
    let key = |cfg: &TrainConfig, inputs: &Inputs| probex_stages::train::Train.gang(cfg, inputs);
    // Equal shape and rows: one gang. Another shape, other rows, or a Dense probe: not.
    let k0 = key(&cfg, &inputs[0]).expect("probex gangs");
    assert!(inputs.iter().all(|i| key(&cfg, i).as_ref() == Some(&k0)));
    let wide = input(
        "wide",
        &common::multilabel([64, 16, 16, 0, 0], 16, 10, 3, 0.3, 1),
    );
    assert_ne!(key(&cfg, &wide).as_ref(), Some(&k0));
    let fewer = input(
        "fewer",
        &common::multilabel([60, 16, 16, 0, 0], 16, 12, 3, 0.3, 1),
    );
    assert_ne!(key(&cfg, &fewer).as_ref(), Some(&k0));
    let mut lr = cfg.clone();
    lr.lr *= 2.0;
    assert_ne!(key(&lr, &inputs[0]).as_ref(), Some(&k0));
    assert_eq!(key(&small(ModelKind::Dense, 2), &inputs[0]), None);
    // The CPU computes a gang member by member: it gangs nothing; a GPU does.
    let train = probex_stages::train::Train;
    assert_eq!(train.gang_limit(&cfg, &inputs[0], None), 1);
    assert!(train.gang_limit(&cfg, &inputs[0], Some("cuda:0")) > 1);

    let notes = Notes::default();
    let cancel = AtomicBool::new(false);
    let cx = |name: &str| {
        let out = tmp.path().join(name);
        let work = tmp.path().join(format!("{name}-work"));
        std::fs::create_dir_all(&out).unwrap();
        std::fs::create_dir_all(&work).unwrap();
        RunContext::new(
            name.into(),
            out,
            work,
            tmp.path().to_path_buf(),
            None,
            1,
            true,
            None,
            &notes,
            &cancel,
        )
    };
    let solo_cx: Vec<RunContext> = (0..3).map(|i| cx(&format!("solo{i}"))).collect();
    let gang_cx: Vec<RunContext> = (0..3).map(|i| cx(&format!("gang{i}"))).collect();
    let solo: Vec<_> = inputs
        .iter()
        .zip(&solo_cx)
        .map(|(i, c)| train.run(&cfg, i, c).unwrap())
        .collect();
    let jobs: Vec<(&TrainConfig, &Inputs, &RunContext)> = inputs
        .iter()
        .zip(&gang_cx)
        .map(|(i, c)| (&cfg, i, c))
        .collect();
    let gang = train.run_gang(&jobs);
    for (m, (g, s)) in gang.into_iter().zip(solo).enumerate() {
        let mut g = g.unwrap_or_else(|e| panic!("member {m}: {e:#}"));
        let mut s = s;
        // Seconds differ; everything else is the solo run's.
        for o in [&mut g, &mut s] {
            if let Some(r) = o.results.as_mut().and_then(|r| r.as_object_mut()) {
                r.remove("seconds");
            }
        }
        assert_eq!(g.results, s.results, "member {m}");
        assert_eq!(g.meta, s.meta, "member {m}");
        assert_eq!(g.publish, s.publish, "member {m}");
        let (gd, sd) = (gang_cx[m].out_dir(), solo_cx[m].out_dir());
        let report = |d: &std::path::Path| {
            let mut v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(d.join("report.json")).unwrap()).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v
        };
        assert_eq!(report(gd), report(sd), "member {m}");
        for f in ["checkpoint.safetensors", "outputs.safetensors", "rows.json"] {
            assert_eq!(
                std::fs::read(gd.join(f)).unwrap(),
                std::fs::read(sd.join(f)).unwrap(),
                "member {m}: {f}"
            );
        }
        // Each member kept its own resume state in its own work dir.
        assert!(
            gang_cx[m]
                .work_dir()
                .unwrap()
                .join("state.safetensors")
                .is_file()
        );
    }
}

fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap()
}
