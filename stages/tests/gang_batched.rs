//! Sweep mode on the tensor path (what CUDA runs), on the CPU: a ProbeX gang (discriminative,
//! raw or standardised, on matrices or LoRA factors, and zero-shot) stepped as one batched problem gives every member what
//! it gets trained alone on the same path, within float tolerance, and a stopped batched gang
//! resumes each member from its own state.

mod common;

use std::ops::ControlFlow;

use probex_probes::models::ModelKind;
use probex_probes::training::{
    GangMember, StepPath, TrainConfig, TrainError, TrainOutcome, train_gang_on, train_on,
};
use probex_weights::dataset::{LayerDataset, Matrices};

/// Three layers of one shape and row set (other weights, other labels): what a sweep gangs.
fn layers() -> Vec<LayerDataset> {
    (1..=3)
        .map(|seed| common::multilabel([64, 16, 16, 0, 0], 16, 12, 3, 0.3, seed))
        .collect()
}

fn cfg(standardize: bool) -> TrainConfig {
    TrainConfig {
        epochs: 6,
        batch_size: 32,
        validate_every: 1,
        checkpoint_every: 1,
        r_u: 8,
        r_v: 8,
        r_t: 16,
        threads: 1,
        standardize,
        ..TrainConfig::new(ModelKind::Probex)
    }
}

fn solo(ds: &LayerDataset, cfg: &TrainConfig, path: StepPath) -> TrainOutcome {
    train_on(ds, None, cfg, &common::device(), path, None, &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap()
}

/// The largest differences seen: train loss (relative), checkpoint values, metrics.
#[derive(Debug, Default)]
struct Seen {
    loss: f64,
    params: f32,
    metrics: f64,
}

/// `got` (a batched gang member) equals `want` (the member alone on the tensor path): train
/// loss per epoch within 1e-5 relative, same best epoch, checkpoint tensors (names, shapes,
/// metadata: a solo run's layout) within 1e-5, metrics within 1e-3 (they are computed from
/// those parameters; a borderline logit may round the other way).
fn assert_as_solo(what: &str, got: &TrainOutcome, want: &TrainOutcome, seen: &mut Seen) {
    let (g, w) = (&got.report.curves, &want.report.curves);
    assert_eq!(g.train_loss.len(), w.train_loss.len(), "{what}");
    for (e, (a, b)) in g.train_loss.iter().zip(&w.train_loss).enumerate() {
        let rel = (a - b).abs() / b.abs().max(1e-12);
        seen.loss = seen.loss.max(rel);
        assert!(rel <= 1e-5, "{what}: epoch {e} train loss {a} vs {b}");
    }
    assert_eq!(got.report.best_epoch, want.report.best_epoch, "{what}");
    assert_eq!(got.report.params, want.report.params, "{what}");
    assert_eq!(got.standardize, want.standardize, "{what}: standardisation");
    for (split, m) in &want.report.metrics {
        for (k, v) in m {
            let d = (got.report.metrics[split][k] - v).abs();
            seen.metrics = seen.metrics.max(d);
            assert!(d <= 1e-3, "{what}: {split} {k} {v} vs {d}");
        }
    }
    let err = common::assert_checkpoints_close(&got.checkpoint, &want.checkpoint, 1e-5, what);
    seen.params = seen.params.max(err);
}

fn members<'a>(
    layers: &'a [LayerDataset],
    cfg: &'a TrainConfig,
    dirs: Option<&'a [std::path::PathBuf]>,
) -> Vec<GangMember<'a>> {
    layers
        .iter()
        .enumerate()
        .map(|(i, ds)| GangMember {
            ds,
            text: None,
            cfg,
            work_dir: dirs.map(|d| d[i].as_path()),
        })
        .collect()
}

#[test]
fn a_batched_gang_trains_each_member_as_it_trains_alone_on_the_tensor_path() {
    let layers = layers();
    for standardize in [false, true] {
        let cfg = cfg(standardize);
        let want: Vec<TrainOutcome> = layers
            .iter()
            .map(|ds| solo(ds, &cfg, StepPath::Tensors))
            .collect();
        // The members are different problems: a gang that mixed them up would not match.
        assert_ne!(want[0].checkpoint, want[1].checkpoint);
        let mut epochs = vec![Vec::new(); 3];
        let gang = train_gang_on(
            &members(&layers, &cfg, None),
            &common::device(),
            StepPath::Tensors,
            &mut |m, p| {
                epochs[m].push(p.epoch);
                ControlFlow::Continue(())
            },
        );
        assert!(
            epochs.iter().all(|e| *e == (0..6).collect::<Vec<_>>()),
            "{epochs:?}"
        );
        let mut seen = Seen::default();
        for (i, (g, w)) in gang.iter().zip(&want).enumerate() {
            let g = g.as_ref().unwrap_or_else(|e| panic!("member {i}: {e}"));
            assert_as_solo(
                &format!("member {i}, standardize {standardize}"),
                g,
                w,
                &mut seen,
            );
        }
        eprintln!("standardize = {standardize}: largest differences {seen:?}");
        // The gang took the batched path, not the member-by-member loop: that one gives
        // exactly the bits of the host path, which the batched products do not.
        let host = solo(&layers[0], &cfg, StepPath::Auto);
        let g0 = gang[0].as_ref().unwrap();
        assert_ne!(g0.checkpoint, host.checkpoint, "the gang ran the host loop");
    }
}

#[test]
fn a_batched_zero_shot_gang_trains_each_member_as_it_trains_alone_on_the_tensor_path() {
    // Other weights and other class texts per member, one row set.
    let data: Vec<_> = (4..7)
        .map(|seed| common::zero_shot(6, 3, [10, 4, 4, 4, 4], 16, 12, 8, 0.3, seed))
        .collect();
    let cfg = TrainConfig {
        validate_every: 1,
        ..cfg(false)
    };
    let cfg = TrainConfig {
        model: ModelKind::ProbexZeroshot,
        ..cfg
    };
    let want: Vec<TrainOutcome> = data
        .iter()
        .map(|(ds, text)| {
            train_on(
                ds,
                Some(text),
                &cfg,
                &common::device(),
                StepPath::Tensors,
                None,
                &mut |_| ControlFlow::Continue(()),
            )
            .unwrap()
        })
        .collect();
    let members: Vec<GangMember> = data
        .iter()
        .map(|(ds, text)| GangMember {
            ds,
            text: Some(text),
            cfg: &cfg,
            work_dir: None,
        })
        .collect();
    let gang = train_gang_on(
        &members,
        &common::device(),
        StepPath::Tensors,
        &mut |_, _| ControlFlow::Continue(()),
    );
    let mut seen = Seen::default();
    for (i, (g, w)) in gang.iter().zip(&want).enumerate() {
        let g = g.as_ref().unwrap_or_else(|e| panic!("member {i}: {e}"));
        assert_as_solo(&format!("zero-shot member {i}"), g, w, &mut seen);
        assert_eq!(g.report.best_holdout_epoch, w.report.best_holdout_epoch);
        let (a, b) = (g.holdout_checkpoint.as_ref(), w.holdout_checkpoint.as_ref());
        let (a, b) = (
            a.expect("a holdout checkpoint"),
            b.expect("a holdout checkpoint"),
        );
        common::assert_checkpoints_close(a, b, 1e-5, &format!("zero-shot member {i} holdout"));
    }
    eprintln!("zero-shot: largest differences {seen:?}");
    let host = train_on(
        &data[0].0,
        Some(&data[0].1),
        &cfg,
        &common::device(),
        StepPath::Auto,
        None,
        &mut |_| ControlFlow::Continue(()),
    )
    .unwrap();
    assert_ne!(gang[0].as_ref().unwrap().checkpoint, host.checkpoint);
}

#[test]
fn a_batched_gang_of_lora_factors_trains_each_member_as_it_trains_alone() {
    let layers: Vec<LayerDataset> = (7..10)
        .map(|seed| common::factored_multilabel([64, 16, 16, 0, 0], 12, 10, 4, 0.3, seed).0)
        .collect();
    assert!(matches!(layers[0].weights, Matrices::Factored { .. }));
    for standardize in [false, true] {
        let cfg = cfg(standardize);
        let want: Vec<TrainOutcome> = layers
            .iter()
            .map(|ds| solo(ds, &cfg, StepPath::Tensors))
            .collect();
        let gang = train_gang_on(
            &members(&layers, &cfg, None),
            &common::device(),
            StepPath::Tensors,
            &mut |_, _| ControlFlow::Continue(()),
        );
        let mut seen = Seen::default();
        for (i, (g, w)) in gang.iter().zip(&want).enumerate() {
            let g = g.as_ref().unwrap_or_else(|e| panic!("member {i}: {e}"));
            assert_as_solo(
                &format!("factored member {i}, standardize {standardize}"),
                g,
                w,
                &mut seen,
            );
        }
        eprintln!("factored, standardize = {standardize}: largest differences {seen:?}");
    }
}

#[test]
fn a_stopped_batched_gang_resumes_each_member_from_its_own_state() {
    let layers = layers();
    let cfg = cfg(true);
    let want: Vec<TrainOutcome> = layers
        .iter()
        .map(|ds| solo(ds, &cfg, StepPath::Tensors))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<std::path::PathBuf> = (0..3).map(|i| tmp.path().join(format!("w{i}"))).collect();
    let members = members(&layers, &cfg, Some(&dirs));
    // Stopped at different epochs (member 1 earlier), as a kill between saves leaves them;
    // member 1 leaves the batched gang mid-run, the others go on batched.
    let stop_at = [3, 1, 3];
    let first = train_gang_on(
        &members,
        &common::device(),
        StepPath::Tensors,
        &mut |m, p| {
            if p.epoch == stop_at[m] {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    );
    for (m, r) in first.iter().enumerate() {
        assert!(
            matches!(r, Err(TrainError::Cancelled { epoch }) if *epoch == stop_at[m]),
            "member {m}: {:?}",
            r.as_ref().err()
        );
    }
    // Each member's work dir holds its own resume state, in a solo run's layout.
    for d in &dirs {
        assert!(d.join("state.safetensors").is_file());
        assert!(d.join("best.safetensors").is_file());
    }
    // The rerun resumes each member where it stopped (sub-gangs by resume epoch).
    let mut resumed = vec![None; 3];
    let again = train_gang_on(
        &members,
        &common::device(),
        StepPath::Tensors,
        &mut |m, p| {
            resumed[m].get_or_insert(p.resumed_from);
            ControlFlow::Continue(())
        },
    );
    assert_eq!(resumed, vec![Some(Some(4)), Some(Some(2)), Some(Some(4))]);
    let mut seen = Seen::default();
    for (i, (g, w)) in again.iter().zip(&want).enumerate() {
        let g = g.as_ref().unwrap_or_else(|e| panic!("member {i}: {e}"));
        assert_as_solo(&format!("resumed member {i}"), g, w, &mut seen);
    }
    eprintln!("resumed: largest differences {seen:?}");
}
