//! Adam exactly as PyTorch's `torch.optim.Adam` (L2 weight decay added to the gradient, bias
//! correction, epsilon added to the corrected root second moment), with state that can be
//! saved and restored for resuming.

use burn::module::{AutodiffModule, ModuleMapper, Param, ParamId};
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::backend::AutodiffBackend;

use probex_kernels::adam;

use crate::cpu_buffers::{self as host, Host};
use crate::models::NamedTensor;

/// Adam state and hyperparameters over a backend `B` (the inner backend of training).
pub struct Adam<B: Backend> {
    /// Learning rate.
    pub lr: f64,
    /// L2 weight decay (added to the gradient).
    pub weight_decay: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Steps taken so far.
    pub steps: u64,
    /// Per parameter (in module visit order): flattened first and second moments.
    moments: Vec<Option<(Tensor<B, 1>, Tensor<B, 1>)>>,
}

impl<B: Backend> Adam<B> {
    /// A fresh optimiser.
    pub fn new(lr: f64, weight_decay: f64, beta1: f64, beta2: f64, eps: f64) -> Self {
        Adam {
            lr,
            weight_decay,
            beta1,
            beta2,
            eps,
            steps: 0,
            moments: Vec::new(),
        }
    }

    /// One update of every parameter of `model` that has a gradient in `grads`.
    pub fn step<AB, M>(&mut self, model: M, grads: &AB::Gradients) -> M
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        self.step_with(model, grads, Vec::new())
    }

    /// [`Adam::step`] with gradients computed outside the autodiff graph for some parameters
    /// (flattened, row-major); these take precedence over `grads`.
    pub fn step_with<AB, M>(
        &mut self,
        model: M,
        grads: &AB::Gradients,
        extra: Vec<(ParamId, Tensor<B, 1>)>,
    ) -> M
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        self.steps += 1;
        let mut mapper = StepMapper::<AB> {
            adam: self,
            grads,
            extra,
            index: 0,
        };
        model.map(&mut mapper)
    }

    /// Takes the moments out (per parameter in module visit order, `None` before the first
    /// step), for a gang that stacks its members' optimisers into one.
    pub(crate) fn take_moments(&mut self) -> Vec<Option<(Tensor<B, 1>, Tensor<B, 1>)>> {
        std::mem::take(&mut self.moments)
    }

    /// Puts moments back (a member's slice of its gang's), with the gang's step count.
    pub(crate) fn set_moments(
        &mut self,
        moments: Vec<Option<(Tensor<B, 1>, Tensor<B, 1>)>>,
        steps: u64,
    ) {
        self.moments = moments;
        self.steps = steps;
    }

    /// The moments as named tensors (`exp_avg.{name}`, `exp_avg_sq.{name}`, PyTorch's state
    /// names), given the parameters' names and shapes in visit order.
    pub fn state_tensors(&self, params: &[(String, Vec<usize>)]) -> Vec<NamedTensor> {
        let mut out = Vec::new();
        for ((name, shape), m) in params.iter().zip(&self.moments) {
            if let Some((m1, m2)) = m {
                for (prefix, t) in [("exp_avg", m1), ("exp_avg_sq", m2)] {
                    out.push(NamedTensor {
                        name: format!("{prefix}.{name}"),
                        shape: shape.clone(),
                        values: t
                            .clone()
                            .into_data()
                            .convert::<f32>()
                            .into_vec()
                            .unwrap_or_default(),
                    });
                }
            }
        }
        out
    }

    /// Restores moments saved by [`Adam::state_tensors`]; a parameter without saved moments
    /// starts from zero moments, as it would in PyTorch.
    pub fn load_state(
        &mut self,
        params: &[(String, Vec<usize>)],
        tensors: &std::collections::HashMap<String, NamedTensor>,
        steps: u64,
        device: &B::Device,
    ) -> Result<(), OptimStateError> {
        self.steps = steps;
        self.moments.clear();
        for (name, shape) in params {
            let n: usize = shape.iter().product();
            let get = |prefix: &str| -> Result<Option<Tensor<B, 1>>, OptimStateError> {
                match tensors.get(&format!("{prefix}.{name}")) {
                    None => Ok(None),
                    Some(t) if t.values.len() != n => Err(OptimStateError {
                        tensor: format!("{prefix}.{name}"),
                        values: t.values.len(),
                        expected: n,
                    }),
                    Some(t) => Ok(Some(Tensor::from_data(
                        TensorData::new(t.values.clone(), [n]),
                        device,
                    ))),
                }
            };
            self.moments
                .push(match (get("exp_avg")?, get("exp_avg_sq")?) {
                    (Some(a), Some(b)) => Some((a, b)),
                    _ => None,
                });
        }
        Ok(())
    }
}

/// A saved optimiser moment whose size does not match its parameter.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("optimiser state `{tensor}` has {values} values, expected {expected}")]
pub struct OptimStateError {
    /// The moment's tensor name (`exp_avg.<param>`).
    pub tensor: String,
    /// The values it holds.
    pub values: usize,
    /// The parameter's size.
    pub expected: usize,
}

struct StepMapper<'a, AB: AutodiffBackend> {
    adam: &'a mut Adam<AB::InnerBackend>,
    grads: &'a AB::Gradients,
    extra: Vec<(ParamId, Tensor<AB::InnerBackend, 1>)>,
    index: usize,
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for StepMapper<'_, AB> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let i = self.index;
        self.index += 1;
        let (id, tensor, mapper) = param.consume();
        let dims = tensor.dims();
        let n: usize = dims.iter().product();
        let grad = match self.extra.iter().position(|(p, _)| *p == id) {
            Some(k) => self.extra.swap_remove(k).1,
            None => match tensor.grad(self.grads) {
                Some(g) => g.reshape([n]),
                None => return Param::from_mapped_value(id, tensor, mapper),
            },
        };
        let a = &mut *self.adam;
        if a.moments.len() <= i {
            a.moments.resize_with(i + 1, || None);
        }
        let moments = a.moments[i].take();
        let coeffs = Coeffs::new(a);
        let p = tensor.inner().reshape([n]);
        let (p, m, v) = update(p, grad, moments, &coeffs);
        a.moments[i] = Some((m, v));
        let new = Tensor::<AB, D>::from_inner(p.reshape(dims)).require_grad();
        Param::from_mapped_value(id, new, mapper)
    }
}

/// The scalars of one Adam step, as the tensor ops take them.
pub(crate) struct Coeffs {
    lr: f64,
    weight_decay: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// `1 - beta1^t`.
    bc1: f64,
    /// `sqrt(1 - beta2^t)`.
    bc2_sqrt: f64,
}

impl Coeffs {
    pub(crate) fn new<B: Backend>(a: &Adam<B>) -> Self {
        let t = a.steps as i32;
        Coeffs {
            lr: a.lr,
            weight_decay: a.weight_decay,
            beta1: a.beta1,
            beta2: a.beta2,
            eps: a.eps,
            bc1: 1.0 - a.beta1.powi(t),
            bc2_sqrt: (1.0 - a.beta2.powi(t)).sqrt(),
        }
    }
}

/// One update of a flat parameter: in place on the CPU backend ([`step_host`]), through the
/// tensor API elsewhere ([`step_tensors`]); the same bits either way. Element-wise, so a
/// parameter stacked from several models' (a gang's) gets each model's own update.
pub(crate) fn update<B: Backend>(
    p: Tensor<B, 1>,
    grad: Tensor<B, 1>,
    moments: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    c: &Coeffs,
) -> Updated<B> {
    match Host::of() {
        Some(host) => step_host(host, p, grad, moments, c),
        None => step_tensors(p, grad, moments, c),
    }
}

/// A parameter, its moments: what one update reads and writes.
type Updated<B> = (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>);

/// One update through the tensor API (any backend).
fn step_tensors<B: Backend>(
    p: Tensor<B, 1>,
    grad: Tensor<B, 1>,
    moments: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    c: &Coeffs,
) -> Updated<B> {
    let mut g = grad;
    if c.weight_decay != 0.0 {
        g = g + p.clone().mul_scalar(c.weight_decay);
    }
    let (m, v) = match moments {
        Some((m, v)) => (
            m.mul_scalar(c.beta1) + g.clone().mul_scalar(1.0 - c.beta1),
            v.mul_scalar(c.beta2) + g.powi_scalar(2).mul_scalar(1.0 - c.beta2),
        ),
        None => (
            g.clone().mul_scalar(1.0 - c.beta1),
            g.powi_scalar(2).mul_scalar(1.0 - c.beta2),
        ),
    };
    let denom = v.clone().sqrt().div_scalar(c.bc2_sqrt).add_scalar(c.eps);
    let p = p - m.clone().div(denom).mul_scalar(c.lr / c.bc1);
    (p, m, v)
}

/// One update on the CPU backend, in place: the same f32 operations in the same order as
/// [`step_tensors`] (so the same bits), without its dozen full-size temporaries, which for a
/// large parameter (Dense's 25 MB weight) cost more than the rest of the training step.
fn step_host<B: Backend>(
    host: Host<B>,
    p: Tensor<B, 1>,
    grad: Tensor<B, 1>,
    moments: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    c: &Coeffs,
) -> Updated<B> {
    let first = moments.is_none();
    let n = p.dims()[0];
    let (m, v) = moments.unwrap_or_else(|| {
        let zeros = || Tensor::<B, 1>::zeros([n], &p.device());
        (zeros(), zeros())
    });
    let g = host.buffer(grad);
    let (mut p, mut m, mut v) = (host.buffer(p), host.buffer(m), host.buffer(v));
    let step = adam::Step {
        weight_decay: c.weight_decay as f32,
        beta1: (c.beta1 as f32, (1.0 - c.beta1) as f32),
        beta2: (c.beta2 as f32, (1.0 - c.beta2) as f32),
        eps: c.eps as f32,
        bc2_sqrt: c.bc2_sqrt as f32,
        step_size: (c.lr / c.bc1) as f32,
        first,
    };
    let g = host::values(&g);
    let in_place = match (
        host::values_mut(&mut p),
        host::values_mut(&mut m),
        host::values_mut(&mut v),
    ) {
        (Some(p), Some(m), Some(v)) => {
            adam::update(p, m, v, g, &step);
            true
        }
        _ => false,
    };
    if in_place {
        return (host.tensor(p), host.tensor(m), host.tensor(v));
    }
    // A buffer still held elsewhere (a parameter shared with another module): update copies.
    let (mut p, mut m, mut v) = (
        host::values(&p).to_vec(),
        host::values(&m).to_vec(),
        host::values(&v).to_vec(),
    );
    adam::update(&mut p, &mut m, &mut v, g, &step);
    (
        host.tensor_of(p, [n]),
        host.tensor_of(m, [n]),
        host.tensor_of(v, [n]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::test_util::Cpu;
    use burn::backend::Autodiff;
    use burn::module::Module;

    #[derive(Module, Debug)]
    struct One<B: Backend> {
        w: Param<Tensor<B, 1>>,
    }

    /// Two steps on loss = sum(w * c), checked against the PyTorch formulas written out.
    #[test]
    fn matches_pytorch_adam_formulas() {
        type AB = Autodiff<Cpu>;
        let dev = Default::default();
        let w0 = [0.5f32, -1.0];
        let c = [2.0f32, 0.25];
        let mut model = One::<AB> {
            w: Param::from_tensor(Tensor::from_data(TensorData::new(w0.to_vec(), [2]), &dev)),
        };
        let (lr, wd, b1, b2, eps) = (0.1, 0.01, 0.9, 0.999, 1e-8);
        let mut adam = Adam::new(lr, wd, b1, b2, eps);
        for _ in 0..2 {
            let ct = Tensor::<AB, 1>::from_data(TensorData::new(c.to_vec(), [2]), &dev);
            let grads = (model.w.val() * ct).sum().backward();
            model = adam.step(model, &grads);
        }
        let got = model.w.val().into_data().into_vec::<f32>().unwrap();
        for k in 0..2 {
            let (mut p, mut m, mut v) = (w0[k] as f64, 0.0, 0.0);
            for t in 1..=2 {
                let g = c[k] as f64 + wd * p;
                m = b1 * m + (1.0 - b1) * g;
                v = b2 * v + (1.0 - b2) * g * g;
                let denom = (v / (1.0 - b2.powi(t))).sqrt() + eps;
                p -= lr / (1.0 - b1.powi(t)) * m / denom;
            }
            assert!((got[k] as f64 - p).abs() < 1e-6, "{got:?} vs {p}");
        }
        // The state round-trips.
        let names = vec![("w".to_string(), vec![2])];
        let st = adam.state_tensors(&names);
        assert_eq!(st[0].name, "exp_avg.w");
        let map = st.iter().map(|t| (t.name.clone(), t.clone())).collect();
        let mut b = Adam::<Cpu>::new(lr, wd, b1, b2, eps);
        b.load_state(&names, &map, adam.steps, &dev).unwrap();
        assert_eq!(b.state_tensors(&names), st);
    }

    /// The in-place host update gives the tensor path's bits, step after step, with and
    /// without weight decay, and also when the parameter's buffer is shared (then it copies,
    /// and the other holder's values stay as they were).
    #[test]
    fn host_update_matches_the_tensor_path_bit_for_bit() {
        let dev = Default::default();
        let host = Host::<Cpu>::of().expect("flex is the host backend");
        let mut rng = probex_weights::rng::Rng::new(4, 0);
        let mut random = |n: usize| {
            let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            Tensor::<Cpu, 1>::from_data(TensorData::new(v, [n]), &dev)
        };
        let bits = |t: &Tensor<Cpu, 1>| -> Vec<u32> {
            let v = t.clone().into_data().into_vec::<f32>().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        for wd in [0.0, 1e-2] {
            let n = 40_000; // more than one parallel chunk
            let p0 = random(n);
            let mut a = Adam::<Cpu>::new(1e-3, wd, 0.9, 0.999, 1e-8);
            let (mut ph, mut pt) = (p0.clone(), p0.clone());
            let (mut mh, mut mt) = (None, None);
            let address = |t: &Tensor<Cpu, 1>| host::values(&host.buffer(t.clone())).as_ptr();
            for step in 0..4 {
                a.steps += 1;
                let c = Coeffs::new(&a);
                let g = random(n);
                // Step 0's parameter is shared with `p0` and `pt`; step 1's with `held`.
                let held = (step == 1).then(|| ph.clone());
                let before = held.as_ref().map(bits);
                let at = address(&ph);
                let (p, m, v) = step_host(host, ph, g.clone(), mh, &c);
                assert_eq!(
                    held.as_ref().map(bits),
                    before,
                    "a shared buffer was written"
                );
                assert_eq!(
                    address(&p) == at,
                    step >= 2,
                    "in place exactly when unshared"
                );
                drop(held);
                (ph, mh) = (p, Some((m, v)));
                let (p, m, v) = step_tensors(pt, g, mt, &c);
                (pt, mt) = (p, Some((m, v)));
                assert_eq!(bits(&ph), bits(&pt));
                let (hm, tm) = (mh.as_ref().unwrap(), mt.as_ref().unwrap());
                assert_eq!((bits(&hm.0), bits(&hm.1)), (bits(&tm.0), bits(&tm.1)));
            }
            assert_ne!(bits(&ph), bits(&p0));
        }
    }
}
