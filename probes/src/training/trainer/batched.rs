//! A gang of ProbeX members trained as one batched problem: the tensor path (what CUDA runs)
//! with a leading gang axis `G`.
//!
//! Each parameter is stacked from the members' as `[G, n]` (member `g`'s row is its own
//! parameter, flattened), each step's inputs as `X [G, B, d_H, d_W]` (member `g`'s rows of
//! its own layer, in its own order) and targets as `[G, B, d_Y]`; every product is a batched
//! matmul over `G`. The loss is the sum of the members' losses, and no product mixes two
//! members, so each member's gradient is exactly its solo gradient (up to the order of float
//! additions inside the GEMMs). Adam is element-wise with one step count (equal for the
//! members of a sub-gang: they resume from one epoch and take the same steps), so the update
//! of the stacked parameters is every member's own update. There is no gradient clipping to
//! keep per member.
//!
//! Each member keeps its own [`Member`]: data, targets, shuffle, metrics, best epochs,
//! checkpoints and resume state. Before a member ends an epoch ([`Member::end_epoch`]), its
//! model, Adam moments and epoch loss are sliced back out of the stacked ones ([`Lockstep::sync`]),
//! so validation, checkpoints and resume states are those of a solo run, in its layout and
//! names.
//!
//! Batched: ProbeX, discriminative (classification head) or zero-shot (cosines against each
//! member's class texts through its `regression_head`), on matrices (a standardised layer's
//! batches are standardised as they are read, per member) or on LoRA factors of one rank
//! (each member's mean and scale stacked, applied inside the factored products as a solo run
//! does). [`batchable`] says which gangs qualify; the others step member by member.

use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::tensor::activation::{log_softmax, relu};

use super::*;
use crate::cpu_buffers::Host;
use crate::models::ModelKind;
use crate::training::data::HostInputs;
use crate::training::optim::{Coeffs, update};

/// Whether the members of `jobs` train as one batched problem: on the tensor path (asked
/// for, or any backend but the CPU's), for ProbeX (either kind), when every member has the
/// same model, inputs (matrices, or factors of one rank), shapes, task, text classes and
/// number of training rows (the gang key makes them so; this guards a direct caller).
pub(crate) fn batchable<AB: AutodiffBackend>(jobs: &[Job]) -> bool {
    let Some(first) = jobs.first() else {
        return false;
    };
    let tensors = first.path == StepPath::Tensors || Host::<AB::InnerBackend>::of().is_none();
    let train_rows = |j: &Job| j.prep.rows.get(&Split::Train).map_or(0, Vec::len);
    tensors
        && jobs.iter().all(|j| {
            matches!(j.cfg.model, ModelKind::Probex | ModelKind::ProbexZeroshot)
                && j.cfg.model == first.cfg.model
                && j.prep.text_train.as_ref().map(|t| (t.rows, t.dim))
                    == first.prep.text_train.as_ref().map(|t| (t.rows, t.dim))
                && same_inputs(&j.prep.inputs, &first.prep.inputs)
                && j.prep.spec == first.prep.spec
                && j.prep.task.kind == first.prep.task.kind
                && j.prep.target_width == first.prep.target_width
                && train_rows(j) == train_rows(first)
                && j.cfg.batch_size == first.cfg.batch_size
                && j.cfg.epochs == first.cfg.epochs
        })
}

/// Whether two members' inputs batch together: matrices, or LoRA factors of one rank.
fn same_inputs(a: &HostInputs, b: &HostInputs) -> bool {
    match (a, b) {
        (HostInputs::Rows { .. }, HostInputs::Rows { .. }) => true,
        (
            HostInputs::Factored {
                rank: r, dims: d, ..
            },
            HostInputs::Factored {
                rank: r2, dims: d2, ..
            },
        ) => r == r2 && d[1..] == d2[1..],
        _ => false,
    }
}

/// [`run_gang`] for ProbeX members (`M`: discriminative or zero-shot) that are
/// [`batchable`]: each sub-gang steps as one batched problem.
pub(crate) fn run_gang_batched<AB, M>(
    jobs: &[Job],
    device: &AB::Device,
    progress: &mut dyn FnMut(usize, &TrainProgress) -> ControlFlow<()>,
) -> Vec<Result<TrainOutcome, TrainError>>
where
    AB: AutodiffBackend,
    M: Net<AB> + AutodiffModule<AB>,
    M::InnerModule: Net<AB::InnerBackend>,
{
    run_lockstep::<AB, M, _>(jobs, device, progress, |gang| {
        Stacked::<AB>::new(gang, device)
    })
}

/// Adam's first and second moments of a stacked parameter, `[G, n]` each.
type Moments<B> = (Tensor<B, 2>, Tensor<B, 2>);

/// The stacked state of a batched (sub-)gang.
struct Stacked<AB: AutodiffBackend> {
    /// Per parameter (module visit order), `[G, n]`: row `g` is member `g`'s, flattened.
    params: Vec<Tensor<AB::InnerBackend, 2>>,
    /// Adam's first and second moments of each parameter, stacked alike.
    moments: Vec<Moments<AB::InnerBackend>>,
    /// The hyperparameters and the step count, shared by every member.
    adam: Adam<AB::InnerBackend>,
    /// Each member's epoch loss so far, weighted by batch size, `[G]`.
    loss_sum: Option<Tensor<AB::InnerBackend, 1>>,
    spec: crate::models::ModelSpec,
    kind: TaskKind,
    /// Zero-shot: each member's training classes' text `[G, C, d_text]`.
    text: Option<Tensor<AB::InnerBackend, 3>>,
    /// The members read LoRA factors.
    factored: bool,
    /// LoRA factors of standardised members: their means and scales, stacked.
    standardize: Option<StackedStandardize<AB::InnerBackend>>,
}

/// The members' standardisations (`(X - mean) / scale`), stacked.
struct StackedStandardize<B: Backend> {
    /// `[G, d_H, d_W]`.
    mean: Tensor<B, 3>,
    /// `[G]`.
    scale: Tensor<B, 1>,
}

/// What the encoder's gradients need of its forward pass: the inputs `[G, B*d_H, d_W]`,
/// `R^T` `[G, B*r_U, d_H]` and `H` `[G, B, r_U*r_V]`.
struct Saved<AB: AutodiffBackend> {
    x: Tensor<AB::InnerBackend, 3>,
    rt: Tensor<AB::InnerBackend, 3>,
    h: Tensor<AB::InnerBackend, 3>,
}

/// A module's parameters as flat values of the inner backend, in visit order.
struct Flatten<B: Backend>(Vec<Tensor<B, 1>>);

impl<AB: AutodiffBackend> ModuleVisitor<AB> for Flatten<AB::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        let t = param.val().inner();
        let n = t.dims().iter().product::<usize>();
        self.0.push(t.reshape([n]));
    }
}

/// Replaces a module's parameters, in visit order, by flat values (keeping ids and shapes).
struct Unflatten<B: Backend>(std::vec::IntoIter<Tensor<B, 1>>);

impl<AB: AutodiffBackend> ModuleMapper<AB> for Unflatten<AB::InnerBackend> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        match self.0.next() {
            Some(v) => {
                let new = Tensor::<AB, D>::from_inner(v.reshape(tensor.dims())).require_grad();
                Param::from_mapped_value(id, new, mapper)
            }
            None => Param::from_mapped_value(id, tensor, mapper),
        }
    }
}

/// The standardisations of factored members, stacked: `None` when none standardises; an
/// error when only some do (the gang key, which holds the params, keeps them apart).
fn stacked_standardize<'a, B: Backend>(
    jobs: impl Iterator<Item = &'a Job<'a>>,
    device: &B::Device,
) -> Result<Option<StackedStandardize<B>>, TrainError> {
    let mut parts = Vec::new();
    for job in jobs {
        let HostInputs::Factored {
            standardize, dims, ..
        } = &job.prep.inputs
        else {
            return Err(GangError::MixedInputs.into());
        };
        parts.push((standardize.clone(), [dims[1], dims[2]]));
    }
    if parts.iter().all(|(s, _)| s.is_none()) {
        return Ok(None);
    }
    let (mut means, mut scales) = (Vec::new(), Vec::new());
    for (s, [d_h, d_w]) in parts {
        let Some((mean, scale)) = s else {
            return Err(GangError::MixedStandardization.into());
        };
        means.push(Tensor::<B, 2>::from_data(
            TensorData::new(mean, [d_h, d_w]),
            device,
        ));
        scales.push(scale);
    }
    let n = scales.len();
    Ok(Some(StackedStandardize {
        mean: Tensor::stack::<3>(means, 0),
        scale: Tensor::from_data(TensorData::new(scales, [n]), device),
    }))
}

/// Row `g` of `[G, n]`, as `[n]`.
fn row<B: Backend>(t: &Tensor<B, 2>, g: usize) -> Tensor<B, 1> {
    let [_, n] = t.dims();
    t.clone().slice([g..g + 1, 0..n]).reshape([n])
}

impl<AB: AutodiffBackend> Stacked<AB> {
    /// Stacks the members' models and optimisers.
    fn new<M: Module<AB>>(
        gang: &mut [(usize, Member<'_, AB, M>)],
        device: &AB::Device,
    ) -> Result<Self, TrainError> {
        let Some((_, first)) = gang.first() else {
            return Err(GangError::Empty.into());
        };
        let (job, steps) = (first.job, first.adam.steps);
        if gang.iter().any(|(_, m)| m.adam.steps != steps) {
            return Err(GangError::StepCounts.into());
        }
        let cfg = job.cfg;
        let mut per_member: Vec<Vec<Tensor<AB::InnerBackend, 1>>> = Vec::new();
        let mut moments_of = Vec::new();
        for (_, m) in gang.iter_mut() {
            let mut flat = Flatten(Vec::new());
            m.model.as_ref().ok_or_else(lost_model)?.visit(&mut flat);
            let zeros = |t: &Tensor<AB::InnerBackend, 1>| Tensor::zeros(t.dims(), device);
            // A parameter without moments yet (before the first step) starts from zeros: the
            // same bits as Adam's first step, `b * 0 + (1 - b) * g`.
            let moments: Vec<_> = m.adam.take_moments();
            let moments = flat
                .0
                .iter()
                .enumerate()
                .map(|(k, p)| match moments.get(k).cloned().flatten() {
                    Some(mv) => mv,
                    None => (zeros(p), zeros(p)),
                })
                .collect::<Vec<_>>();
            per_member.push(flat.0);
            moments_of.push(moments);
        }
        let count = per_member[0].len();
        let stack = |get: &dyn Fn(usize) -> Tensor<AB::InnerBackend, 1>| {
            Tensor::stack::<2>((0..gang.len()).map(get).collect(), 0)
        };
        let params = (0..count)
            .map(|k| stack(&|g| per_member[g][k].clone()))
            .collect();
        let moments = (0..count)
            .map(|k| {
                (
                    stack(&|g| moments_of[g][k].0.clone()),
                    stack(&|g| moments_of[g][k].1.clone()),
                )
            })
            .collect();
        let mut adam = Adam::new(cfg.lr, cfg.weight_decay, cfg.beta1, cfg.beta2, cfg.eps);
        adam.steps = steps;
        let texts: Option<Vec<_>> = gang.iter().map(|(_, m)| m.text_train.clone()).collect();
        let text = match job.prep.spec.kind {
            ModelKind::ProbexZeroshot => match texts {
                Some(t) => Some(Tensor::stack::<3>(t, 0)),
                None => return Err(GangError::NoText.into()),
            },
            _ => None,
        };
        let factored = matches!(job.prep.inputs, HostInputs::Factored { .. });
        let standardize = if factored {
            stacked_standardize(gang.iter().map(|(_, m)| m.job), device)?
        } else {
            None
        };
        Ok(Stacked {
            factored,
            standardize,
            text,
            params,
            moments,
            adam,
            loss_sum: None,
            spec: job.prep.spec.clone(),
            kind: job.prep.task.kind,
        })
    }

    /// The members' encodings `e` `[G, B, r_T]` for inputs `x` `[G, B, d_H, d_W]`, outside
    /// the autodiff graph as in a solo run (`encoder::forward_tensors`), with what
    /// [`Stacked::encoder_gradients`] needs.
    fn encode(&self, x: Tensor<AB::InnerBackend, 4>) -> (Tensor<AB::InnerBackend, 3>, Saved<AB>) {
        let s = &self.spec;
        let [g, b, d_h, d_w] = x.dims();
        let (r_u, r_v, r_t) = (s.r_u, s.r_v, s.r_t);
        let p = &self.params;
        let x = x.reshape([g, b * d_h, d_w]);
        let u = p[0].clone().reshape([g, d_w, r_u]);
        let v = p[1].clone().reshape([g, r_v, d_h]);
        let m = p[2].clone().reshape([g, r_t, r_u * r_v]);
        let bias = p[3].clone().reshape([g, 1, r_t]);
        // R_b = X_b @ U: every member's B*d_H rows in one GEMM per member.
        let r = x.clone().matmul(u); // [G, B*d_H, r_U]
        // R_b^T @ V^T, the batch folded into rows: [G, B*r_U, d_H] @ [G, d_H, r_V].
        let rt = r
            .reshape([g * b, d_h, r_u])
            .swap_dims(1, 2)
            .reshape([g, b * r_u, d_h]);
        let h = relu(rt.clone().matmul(v.swap_dims(1, 2))).reshape([g, b, r_u * r_v]);
        let e = h.clone().matmul(m.swap_dims(1, 2)) + bias; // [G, B, r_T]
        (e, Saved { x, rt, h })
    }

    /// The encoder's gradients, stacked like its parameters (`[G, n]` each), from `de`, the
    /// loss gradient of the encodings `[G, B, r_T]`: the solo run's formulas
    /// (`Encoding::gradients`) with a leading gang axis, every sum over the batch only.
    fn encoder_gradients(
        &self,
        saved: Saved<AB>,
        de: Tensor<AB::InnerBackend, 3>,
    ) -> Vec<Tensor<AB::InnerBackend, 2>> {
        let Saved { x, rt, h } = saved;
        let s = &self.spec;
        let [g, b, _] = de.dims();
        let [_, _, d_w] = x.dims();
        let d_h = s.d_h;
        let (r_u, r_v, r_t) = (s.r_u, s.r_v, s.r_t);
        let v = self.params[1].clone().reshape([g, r_v, d_h]);
        let m = self.params[2].clone().reshape([g, r_t, r_u * r_v]);
        let flat = |t: Tensor<AB::InnerBackend, 3>| {
            let [g, a, c] = t.dims();
            t.reshape([g, a * c])
        };
        let dm = de.clone().swap_dims(1, 2).matmul(h.clone()); // [G, r_T, r_U*r_V]
        let dbias = de.clone().sum_dim(1).reshape([g, r_t]);
        let dpre = de
            .matmul(m)
            .mask_fill(h.lower_equal_elem(0.0), 0.0)
            .reshape([g, b * r_u, r_v]);
        // dV^T = sum_b R_b @ dPre_b: the batch folded into the contraction.
        let dv = dpre.clone().swap_dims(1, 2).matmul(rt); // [G, r_V, d_H]
        // dU^T = dR^T @ X with dR_b = (dPre_b @ V)^T, over all B*d_H rows at once.
        let dr = dpre
            .matmul(v)
            .reshape([g * b, r_u, d_h])
            .swap_dims(1, 2)
            .reshape([g, b * d_h, r_u]);
        let du = dr.swap_dims(1, 2).matmul(x).swap_dims(1, 2); // [G, d_W, r_U]
        let du = du.reshape([g, d_w * r_u]);
        vec![du, flat(dv), flat(dm), dbias]
    }

    /// The members' scores `[G, B, d_Y]` from their encodings `e` `[G, B, r_T]` and their
    /// heads' parameters (stacked, flat): the classification head `e @ T^T + b`, or
    /// (zero-shot) the cosines between `e` and `regression_head(text)`, as
    /// `models::text_cosines` gives them.
    fn head_scores(&self, e: Tensor<AB, 3>, head: &[Tensor<AB, 2>]) -> Tensor<AB, 3> {
        let [g, _, r_t] = e.dims();
        let normalize = |x: Tensor<AB, 3>| {
            let norm = x.clone().powi_scalar(2).sum_dim(2).sqrt().clamp_min(1e-12);
            x / norm
        };
        match &self.text {
            None => {
                let d_y = self.spec.d_y;
                let t = head[0].clone().reshape([g, d_y, r_t]);
                e.matmul(t.swap_dims(1, 2)) + head[1].clone().reshape([g, 1, d_y])
            }
            Some(text) => {
                let d_text = self.spec.d_text;
                let w = head[0].clone().reshape([g, r_t, d_text]);
                let t = Tensor::<AB, 3>::from_inner(text.clone()).matmul(w.swap_dims(1, 2))
                    + head[1].clone().reshape([g, 1, r_t]);
                normalize(e).matmul(normalize(t).swap_dims(1, 2))
            }
        }
    }

    /// Each member's loss `[G]`, as [`task_loss`] gives it for the member alone.
    fn losses(&self, s: Tensor<AB, 3>, y: Tensor<AB, 3>) -> Tensor<AB, 1> {
        let [g, b, w] = s.dims();
        let per_member = |t: Tensor<AB, 3>| t.reshape([g, b * w]).mean_dim(1).reshape([g]);
        match self.kind {
            TaskKind::MultiLabel => {
                per_member(s.clone().clamp_min(0.0) - s.clone() * y + s.abs().neg().exp().log1p())
            }
            TaskKind::Class | TaskKind::ZeroShot => (log_softmax(s, 2) * y)
                .sum_dim(2)
                .reshape([g, b])
                .mean_dim(1)
                .reshape([g])
                .neg(),
            TaskKind::Regression => per_member((s - y).powi_scalar(2)),
        }
    }

    /// The stacked gradients of every parameter for matrices `x` `[G, B, d_H, d_W]` and
    /// targets `y` (`b` rows each), adding each member's loss to its epoch's.
    fn gradients(
        &mut self,
        x: Tensor<AB::InnerBackend, 4>,
        y: Tensor<AB, 3>,
        b: usize,
    ) -> Vec<Tensor<AB::InnerBackend, 2>> {
        let (e, saved) = self.encode(x);
        // As in a solo run, `e` is a gradient leaf of the graph of the head and the loss.
        let leaf = Tensor::<AB, 3>::from_inner(e).require_grad();
        let head: Vec<Tensor<AB, 2>> = self.params[4..]
            .iter()
            .map(|p| Tensor::from_inner(p.clone()).require_grad())
            .collect();
        let scores = self.head_scores(leaf.clone(), &head);
        let losses = self.losses(scores, y);
        self.add_losses(&losses, b);
        let grads = losses.sum().backward();
        let zeros = |p: &Tensor<AB::InnerBackend, 2>| Tensor::zeros(p.dims(), &p.device());
        let mut all = match leaf.grad(&grads) {
            Some(de) => self.encoder_gradients(saved, de),
            None => self.params[..4].iter().map(zeros).collect(),
        };
        for (t, p) in head.iter().zip(&self.params[4..]) {
            all.push(t.grad(&grads).unwrap_or_else(|| zeros(p)));
        }
        all
    }

    /// [`Stacked::gradients`] for LoRA factors `up_t` (`B^T`) `[G, B, r, d_H]` and `down`
    /// `[G, B, r, d_W]`: the factored encoder (`encoder::factored` with a gang axis, each
    /// member's standardisation inside its products) is a few small products, differentiated
    /// by autodiff as in a solo run.
    fn factored_gradients(
        &mut self,
        up_t: Tensor<AB::InnerBackend, 4>,
        down: Tensor<AB::InnerBackend, 4>,
        y: Tensor<AB, 3>,
        b: usize,
    ) -> Vec<Tensor<AB::InnerBackend, 2>> {
        let s = &self.spec;
        let [g, _, r, d_h] = up_t.dims();
        let d_w = down.dims()[3];
        let (r_u, r_v, r_t) = (s.r_u, s.r_v, s.r_t);
        let p: Vec<Tensor<AB, 2>> = self
            .params
            .iter()
            .map(|p| Tensor::from_inner(p.clone()).require_grad())
            .collect();
        let u = p[0].clone().reshape([g, d_w, r_u]);
        let vt = p[1].clone().reshape([g, r_v, d_h]).swap_dims(1, 2); // [G, d_H, r_V]
        let m = p[2].clone().reshape([g, r_t, r_u * r_v]);
        let down = Tensor::<AB, 3>::from_inner(down.reshape([g, b * r, d_w]));
        let up = Tensor::<AB, 4>::from_inner(up_t).reshape([g, b * r, d_h]);
        let pa = down.matmul(u.clone()).reshape([g * b, r, r_u]); // A U
        let qb = up.matmul(vt.clone()).reshape([g * b, r, r_v]); // B^T V^T
        let mut pre = pa.swap_dims(1, 2).matmul(qb).reshape([g, b, r_u, r_v]);
        if let Some(std) = &self.standardize {
            let mean_t = Tensor::<AB, 3>::from_inner(std.mean.clone()).swap_dims(1, 2);
            let shift = u.swap_dims(1, 2).matmul(mean_t.matmul(vt)); // [G, r_U, r_V]
            let scale = Tensor::<AB, 1>::from_inner(std.scale.clone()).reshape([g, 1, 1, 1]);
            pre = (pre - shift.unsqueeze_dim(1)) / scale;
        }
        let e = relu(pre)
            .reshape([g, b, r_u * r_v])
            .matmul(m.swap_dims(1, 2))
            + p[3].clone().reshape([g, 1, r_t]);
        let losses = self.losses(self.head_scores(e, &p[4..]), y);
        self.add_losses(&losses, b);
        let grads = losses.sum().backward();
        p.iter()
            .zip(&self.params)
            .map(|(t, q)| {
                t.grad(&grads)
                    .unwrap_or_else(|| Tensor::zeros(q.dims(), &q.device()))
            })
            .collect()
    }

    /// Adds the members' losses `[G]` of a step of `b` rows to their epoch's.
    fn add_losses(&mut self, losses: &Tensor<AB, 1>, b: usize) {
        let weighted = losses.clone().inner().mul_scalar(b as f64);
        self.loss_sum = Some(match self.loss_sum.take() {
            Some(s) => s + weighted,
            None => weighted,
        });
    }

    /// Keeps only the members at positions `kept` (ascending) of the stacked state.
    fn keep(&mut self, kept: &[usize]) {
        let Some(g) = self.params.first().map(|p| p.dims()[0]) else {
            return;
        };
        if kept.len() == g {
            return;
        }
        if kept.is_empty() {
            // Nothing left to step (a selection of no rows is not every backend's case).
            self.params.clear();
            self.moments.clear();
            self.loss_sum = None;
            self.text = None;
            self.standardize = None;
            return;
        }
        let Some(device) = self.params.first().map(|p| p.device()) else {
            return;
        };
        let idx = index_tensor::<AB::InnerBackend>(kept, &device);
        let keep = |t: &Tensor<AB::InnerBackend, 2>| t.clone().select(0, idx.clone());
        self.params = self.params.iter().map(keep).collect();
        self.moments = self
            .moments
            .iter()
            .map(|(a, b)| (keep(a), keep(b)))
            .collect();
        self.loss_sum = self.loss_sum.take().map(|s| s.select(0, idx.clone()));
        self.text = self.text.take().map(|t| t.select(0, idx.clone()));
        self.standardize = self.standardize.take().map(|s| StackedStandardize {
            mean: s.mean.select(0, idx.clone()),
            scale: s.scale.select(0, idx.clone()),
        });
    }

    /// The Adam update of every stacked parameter.
    fn adam_step(&mut self, grads: Vec<Tensor<AB::InnerBackend, 2>>) {
        self.adam.steps += 1;
        let c = Coeffs::new(&self.adam);
        for (k, grad) in grads.into_iter().enumerate() {
            let [g, n] = grad.dims();
            let (m, v) = self.moments[k].clone();
            let flat = |t: Tensor<AB::InnerBackend, 2>| t.reshape([g * n]);
            let (p, m, v) = update(
                flat(self.params[k].clone()),
                flat(grad),
                Some((flat(m), flat(v))),
                &c,
            );
            self.params[k] = p.reshape([g, n]);
            self.moments[k] = (m.reshape([g, n]), v.reshape([g, n]));
        }
    }
}

impl<'j, AB, M> Lockstep<'j, AB, M> for Stacked<AB>
where
    AB: AutodiffBackend,
    M: Net<AB> + AutodiffModule<AB>,
    M::InnerModule: Net<AB::InnerBackend>,
{
    fn step(
        &mut self,
        gang: &mut [(usize, Member<'j, AB, M>)],
        chunks: &[&[usize]],
        device: &AB::Device,
    ) -> Vec<(usize, TrainError)> {
        let mut failed = Vec::new();
        let (mut xs, mut ups, mut downs, mut ys, mut ok) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (g, (_, m)) in gang.iter().enumerate() {
            let chunk = chunks[g];
            match m.inputs.batch(chunk, device) {
                Ok(x) => {
                    let idx = index_tensor::<AB::InnerBackend>(chunk, device);
                    match x {
                        Batch::Factored { up_t, down, .. } if self.factored => {
                            ups.push(up_t);
                            downs.push(down);
                        }
                        x => xs.push(x.stacked()),
                    }
                    ys.push(m.targets.clone().select(0, idx));
                    ok.push(g);
                }
                Err(e) => failed.push((g, TrainError::Data(e))),
            }
        }
        if !failed.is_empty() {
            self.keep(&ok);
        }
        let Some(b) = ok.first().map(|&g| chunks[g].len()) else {
            return failed;
        };
        if ok.iter().any(|&g| chunks[g].len() != b) {
            failed.extend(ok.iter().map(|&g| (g, GangError::BatchSizes.into())));
            self.keep(&[]);
            return failed;
        }
        let y = Tensor::<AB, 3>::from_inner(Tensor::stack::<3>(ys, 0));
        let grads = if self.factored {
            let up = Tensor::stack::<4>(ups, 0);
            self.factored_gradients(up, Tensor::stack::<4>(downs, 0), y, b)
        } else {
            self.gradients(Tensor::stack::<4>(xs, 0), y, b)
        };
        self.adam_step(grads);
        failed
    }

    fn sync(&mut self, gang: &mut [(usize, Member<'j, AB, M>)]) -> Result<(), TrainError> {
        let loss_sum = self.loss_sum.take();
        for (g, (_, m)) in gang.iter_mut().enumerate() {
            let values: Vec<_> = self.params.iter().map(|p| row(p, g)).collect();
            let model = m.model.take().ok_or_else(lost_model)?;
            m.model = Some(model.map(&mut Unflatten(values.into_iter())));
            let moments = self
                .moments
                .iter()
                .map(|(a, b)| Some((row(a, g), row(b, g))))
                .collect();
            m.adam.set_moments(moments, self.adam.steps);
            m.loss_sum = loss_sum.clone().map(|s| s.narrow(0, g, 1));
        }
        Ok(())
    }

    fn retain(&mut self, kept: &[usize]) {
        self.keep(kept);
    }
}
