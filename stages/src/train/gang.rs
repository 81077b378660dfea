//! Sweep mode of the `train` kind: the ProbeX probes of a layer sweep whose layers have one
//! shape and one row set train as a gang ([`probex_engine::Stage::gang`]), in lockstep, each
//! with its own data, model, optimiser, checkpoint, report and resume state. Each member's
//! result is its solo training's (same `seed`: same initial values and batch order), so the
//! engine keeps one node and one cache entry per layer and ganging only changes how they run.
//!
//! On a GPU a ProbeX gang trains as one batched problem (a leading gang axis on inputs,
//! parameters and every product: one set of kernels per step for all members, see
//! `probex_probes::training::train_gang_on`); each member's result is its solo training's
//! within float tolerance. On the CPU a gang computes what its members would one after
//! another (the host path steps each member with the kernels of its solo run, the same bits),
//! so the engine gangs GPU nodes only ([`gang_limit`]): a CPU gang would take its members'
//! worker slots and leave them idle.

use probex_engine::{Cancelled, Inputs, Outcome, RunContext, StageResult};
use probex_probes::models::ModelKind;
use probex_probes::training::{self, DeviceSpec, GangMember, TrainConfig};
use probex_weights::dataset::{LayerDataset, Sidecar, Storage};

use super::EMBEDDINGS;
use crate::extract::ARTIFACT as LAYER;

/// Device memory a gang of GPU nodes may fill with its members' data, training state
/// (models, gradients, Adam's moments) and a batched step's activations: kept well under an
/// H100's 80 GB, since the allocator's slack comes on top (a solo run's peak was 10x its data
/// on the H200, bench/GPU-NOTES.md).
pub const GPU_GANG_BYTES: u64 = 24 << 30;

/// The most members of one gang on a GPU. Past a few dozen 768x768 layers a batched step is
/// bound by its GEMMs rather than by kernel launches (the cost a gang shares), so larger gangs
/// gain little, and 24 splits a ViT's 48 layers of that shape into two gangs.
pub const GPU_GANG_MAX: usize = 24;

/// Which models gang: ProbeX's encoder is the cost a batched step shares. Dense and StatNN
/// train alone.
fn gangs(model: ModelKind) -> bool {
    matches!(model, ModelKind::Probex | ModelKind::ProbexZeroshot)
}

/// The gang key of a train node: the model and its params (a sweep's nodes differ only in the
/// layer they read, which is no param), the layer's shape, storage and precision, a digest of
/// its rows (models) and labels, and the text table it reads. Layers with other rows (models
/// skipped in one layer only) do not gang. `None` for models that train alone, or when the
/// layer's sidecar cannot be read (the node then runs alone and reports the problem itself).
pub fn gang_key(p: &TrainConfig, inputs: &Inputs) -> Option<String> {
    if !gangs(p.model) {
        return None;
    }
    let layer = inputs.one(LAYER).ok()?;
    let sidecar = LayerDataset::load_sidecar(&layer.dir).ok()?;
    let text = inputs.optional(EMBEDDINGS).ok()?.map(|a| a.key.to_string());
    // Threads are a run setting, equal across one stage anyway.
    let params = serde_json::to_value(TrainConfig {
        threads: 0,
        ..p.clone()
    })
    .ok()?;
    let key = serde_json::json!({
        "params": params,
        "shape": sidecar.shape,
        "storage": sidecar.storage,
        "precision": sidecar.precision,
        "rows": rows_digest(&sidecar),
        "text": text,
    });
    Some(key.to_string())
}

/// A digest of who a layer's rows are and what they are labelled.
fn rows_digest(s: &Sidecar) -> String {
    let mut h = blake3::Hasher::new();
    for part in [
        serde_json::to_vec(&s.models),
        serde_json::to_vec(&s.label_key),
        serde_json::to_vec(&s.labels),
    ] {
        h.update(&part.unwrap_or_default());
        h.update(b"\0");
    }
    h.finalize().to_hex().to_string()
}

/// How many members of a gang run at once: 1 on the CPU (see the module docs); on a GPU as
/// many as fit [`GPU_GANG_BYTES`] with their data (f32; a LoRA layer's factors, not their
/// products), four copies of their parameters and their share of a batched step's
/// activations, at most [`GPU_GANG_MAX`].
pub fn gang_limit(p: &TrainConfig, inputs: &Inputs, device: Option<&str>) -> usize {
    let on_gpu = matches!(
        device.map(str::trim).map(str::parse::<DeviceSpec>),
        Some(Ok(DeviceSpec::Cuda(_)))
    ) || device.map(str::trim) == Some("cuda");
    if !on_gpu {
        return 1;
    }
    let Some(s) = inputs
        .one(LAYER)
        .ok()
        .and_then(|a| LayerDataset::load_sidecar(&a.dir).ok())
    else {
        return 1;
    };
    let [d_h, d_w] = s.shape;
    let params = (d_w * p.r_u + d_h * p.r_v + p.r_u * p.r_v * p.r_t + p.r_t) as u64;
    let (n, b) = (s.models.len() as u64, p.batch_size as u64);
    let (d_h, d_w) = (d_h as u64, d_w as u64);
    let (r_u, r_v) = (p.r_u as u64, p.r_v as u64);
    // What one row takes on the device: its matrix, or a LoRA layer's two factors (plus the
    // mean matrix once, when standardised). Per step, f32: the member's batch twice (its rows,
    // then the stacked copy), R and R^T with their gradients (factors: A U and B^T V^T), and
    // H, its mask and dPre.
    let (row, per_step, once) = match s.storage {
        Storage::LoraFactors { rank } => {
            let rank = rank as u64;
            let row = rank * (d_h + d_w);
            (row, 2 * row + 4 * rank * (r_u + r_v), d_h * d_w)
        }
        _ => (d_h * d_w, 2 * d_h * d_w + 4 * d_h * r_u, 0),
    };
    let data = 4 * (n * row + once);
    let activations = 4 * b * (per_step + 3 * r_u * r_v);
    let member = data + 4 * 4 * params + activations;
    ((GPU_GANG_BYTES / member.max(1)).max(1) as usize).min(GPU_GANG_MAX)
}

/// Trains the members of a gang together and writes each one's artifact as `run` does.
pub fn run_gang(jobs: &[(&TrainConfig, &Inputs, &RunContext)]) -> Vec<StageResult<Outcome>> {
    let Some((_, _, first_cx)) = jobs.first() else {
        return Vec::new();
    };
    let device: DeviceSpec = match first_cx.device().unwrap_or("cpu").parse() {
        Ok(d) => d,
        Err(e) => {
            return jobs.iter().map(|_| Err(e.clone().into())).collect();
        }
    };
    // The members share the memory budget for layers held in memory: a member over its share
    // reads its layer from disk batch by batch, with the same result.
    let budget = match training::memory::budget() {
        Ok(b) => b / jobs.len().max(1) as u64,
        Err(e) => return jobs.iter().map(|_| Err(e.clone().into())).collect(),
    };
    let mut results: Vec<Option<StageResult<Outcome>>> = jobs.iter().map(|_| None).collect();
    let mut opened: Vec<(usize, super::Opened)> = Vec::new();
    for (i, (p, inputs, cx)) in jobs.iter().enumerate() {
        match super::open(p, inputs, cx, budget, &device, Some(jobs.len())) {
            Ok(o) => opened.push((i, o)),
            Err(e) => results[i] = Some(Err(e)),
        }
    }
    // A member whose checkpoints have nowhere to go fails alone, before the gang starts.
    let mut opened_dirs = Vec::with_capacity(opened.len());
    for (i, o) in opened {
        match jobs[i].2.work_dir() {
            Ok(dir) => opened_dirs.push((i, o, dir)),
            Err(e) => results[i] = Some(Err(e.into())),
        }
    }
    let opened: Vec<_> = opened_dirs.iter().map(|(i, o, _)| (*i, o)).collect();
    let members: Vec<GangMember> = opened_dirs
        .iter()
        .map(|(_, o, dir)| GangMember {
            ds: &o.ds,
            text: o.text.as_ref(),
            cfg: &o.cfg,
            work_dir: Some(*dir),
        })
        .collect();
    let cxs: Vec<&RunContext> = opened.iter().map(|(i, _)| jobs[*i].2).collect();
    let mut said_resumed = vec![false; cxs.len()];
    let mut on_epoch =
        |m: usize, pr: &training::TrainProgress| super::on_epoch(cxs[m], &mut said_resumed[m], pr);
    let trained = training::train_gang(&members, &device, &mut on_epoch);
    drop(members);
    for ((i, o), r) in opened.iter().zip(trained) {
        let cx = jobs[*i].2;
        results[*i] = Some(match r {
            // The engine tells a stopped node from a failed one by its typed `Cancelled`.
            Err(training::TrainError::Cancelled { epoch }) => {
                cx.log(format!(
                    "stopped after epoch {epoch}; the next run resumes from the checkpoint in the work directory"
                ));
                Err(Cancelled.into())
            }
            Err(e) => Err(e.into()),
            Ok(outcome) => super::write_trained(
                cx,
                &o.cfg,
                &o.ds,
                o.text.as_ref(),
                o.text_input,
                &outcome,
                &device,
            ),
        });
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(anyhow::anyhow!("gang member not trained"))))
        .collect()
}
