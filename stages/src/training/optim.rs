//! Adam exactly as PyTorch's `torch.optim.Adam` (L2 weight decay added to the gradient, bias
//! correction, epsilon added to the corrected root second moment), with state that can be
//! saved and restored for resuming.

use burn::module::{AutodiffModule, ModuleMapper, Param, ParamId};
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::backend::AutodiffBackend;

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
    ) -> Result<(), String> {
        self.steps = steps;
        self.moments.clear();
        for (name, shape) in params {
            let n: usize = shape.iter().product();
            let get = |prefix: &str| -> Result<Option<Tensor<B, 1>>, String> {
                match tensors.get(&format!("{prefix}.{name}")) {
                    None => Ok(None),
                    Some(t) if t.values.len() != n => Err(format!(
                        "optimiser state `{prefix}.{name}` has {} values, expected {n}",
                        t.values.len()
                    )),
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
        let p = tensor.inner().reshape([n]);
        let mut g = grad;
        if a.weight_decay != 0.0 {
            g = g + p.clone().mul_scalar(a.weight_decay);
        }
        let (m, v) = match a.moments[i].take() {
            Some((m, v)) => (
                m.mul_scalar(a.beta1) + g.clone().mul_scalar(1.0 - a.beta1),
                v.mul_scalar(a.beta2) + g.powi_scalar(2).mul_scalar(1.0 - a.beta2),
            ),
            None => (
                g.clone().mul_scalar(1.0 - a.beta1),
                g.powi_scalar(2).mul_scalar(1.0 - a.beta2),
            ),
        };
        let t = a.steps as i32;
        let bc1 = 1.0 - a.beta1.powi(t);
        let bc2_sqrt = (1.0 - a.beta2.powi(t)).sqrt();
        let denom = v.clone().sqrt().div_scalar(bc2_sqrt).add_scalar(a.eps);
        let p = p - m.clone().div(denom).mul_scalar(a.lr / bc1);
        a.moments[i] = Some((m, v));
        let new = Tensor::<AB, D>::from_inner(p.reshape(dims)).require_grad();
        Param::from_mapped_value(id, new, mapper)
    }
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
}
