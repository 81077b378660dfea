//! ProbeX's encoder, `e = M flatten(relu((X_b @ U)^T @ V^T)) + b`, computed outside the
//! autodiff graph for training.
//!
//! The encoder holds nearly all of a training step's arithmetic. Training computes it here
//! ([`forward`]), makes `e` a gradient leaf of the graph that holds the head and the loss,
//! and turns that leaf's gradient into the encoder's gradients itself
//! ([`Encoding::gradients`]). On the CPU backend both passes run on its host buffers
//! ([`probex_kernels::encoder`]); on any other backend they are the same products through
//! the tensor API.

use burn::module::ParamId;
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::backend::AutodiffBackend;
use burn_flex::FlexTensor;

use super::Linear;
use super::batch::Standardize;

use probex_kernels::encoder as kernels;

pub use kernels::Scratch;

use crate::cpu_buffers::{self as host, Host};

/// The encoder's layers: `probes` (`U^T`), `shared_probe_proj` (`V`), `per_probe_encoders`
/// (`M`, bias).
#[derive(Clone, Copy)]
pub struct EncoderLayers<'a, B: Backend> {
    /// `probes.weight` `[d_W, r_U]`.
    pub probes: &'a Linear<B>,
    /// `shared_probe_proj.weight` `[r_V, d_H]`.
    pub shared: &'a Linear<B>,
    /// `per_probe_encoders.{weight,bias}` `[r_T, r_U*r_V]`, `[r_T]`.
    pub enc: &'a Linear<B>,
}

/// The encoder's weights as values.
pub struct Weights<B: Backend> {
    /// `probes.weight` `[d_W, r_U]` (`U`).
    pub u: Tensor<B, 2>,
    /// `shared_probe_proj.weight` `[r_V, d_H]` (`V`).
    pub v: Tensor<B, 2>,
    /// `per_probe_encoders.weight` `[r_T, r_U*r_V]` (`M`), columns `probe * r_V + v`.
    pub m: Tensor<B, 2>,
    /// `per_probe_encoders.bias` `[r_T]`.
    pub bias: Option<Tensor<B, 1>>,
}

impl<B: AutodiffBackend> Weights<B> {
    /// The same values on the inner backend, outside the autodiff graph.
    pub fn inner(self) -> Weights<B::InnerBackend> {
        Weights {
            u: self.u.inner(),
            v: self.v.inner(),
            m: self.m.inner(),
            bias: self.bias.map(Tensor::inner),
        }
    }
}

/// The encoder's weights as the CPU backend's buffers.
struct HostWeights {
    u: FlexTensor,
    v: FlexTensor,
    m: FlexTensor,
    bias: Option<FlexTensor>,
}

impl HostWeights {
    fn of<B: Backend>(host: Host<B>, w: &Weights<B>) -> Self {
        HostWeights {
            u: host.buffer(w.u.clone()),
            v: host.buffer(w.v.clone()),
            m: host.buffer(w.m.clone()),
            bias: w.bias.clone().map(|b| host.buffer(b)),
        }
    }

    fn slices(&self) -> kernels::Weights<'_> {
        kernels::Weights {
            u: host::values(&self.u),
            v: host::values(&self.v),
            m: host::values(&self.m),
            bias: self.bias.as_ref().map(host::values),
        }
    }
}

/// The encodings of one batch, and what their gradient needs.
pub struct Encoding<B: Backend> {
    /// `e` `[B, r_T]`.
    pub e: Tensor<B, 2>,
    saved: Saved<B>,
}

enum Saved<B: Backend> {
    /// Any backend: the inputs, `R = X @ U` `[B, d_H, r_U]` and `H` `[B, r_U, r_V]`.
    Tensors {
        x: Tensor<B, 3>,
        w: Weights<B>,
        r: Tensor<B, 3>,
        h: Tensor<B, 3>,
    },
    /// The CPU backend: its buffers, and the host forward pass.
    Host(Box<HostSaved<B>>),
}

struct HostSaved<B> {
    host: Host<B>,
    x: FlexTensor,
    w: HostWeights,
    fwd: kernels::Forward,
    dims: kernels::Dims,
}

/// The encodings of `x` `[B, d_H, d_W]`.
///
/// On the CPU backend, nothing is tracked for autodiff: training calls this on the inner
/// backend and differentiates with [`Encoding::gradients`]. Elsewhere these are ordinary
/// tensor operations, tracked like any other.
pub fn forward<B: Backend>(x: Tensor<B, 3>, w: Weights<B>, scratch: &mut Scratch) -> Encoding<B> {
    let [b, d_h, d_w] = x.dims();
    let [d_w_u, r_u] = w.u.dims();
    let [r_v, d_h_v] = w.v.dims();
    let [r_t, m_in] = w.m.dims();
    assert!(
        d_w_u == d_w && d_h_v == d_h && m_in == r_u * r_v,
        "encoder weights do not fit a [{b}, {d_h}, {d_w}] input"
    );
    let dims = kernels::Dims {
        b,
        d_h,
        d_w,
        r_u,
        r_v,
        r_t,
    };
    if let Some(host) = Host::<B>::of() {
        let hx = host.buffer(x);
        let hw = HostWeights::of(host, &w);
        let (e, fwd) = kernels::forward(host::values(&hx), &hw.slices(), dims, scratch);
        return Encoding {
            e: host.tensor_of(e, [b, r_t]),
            saved: Saved::Host(Box::new(HostSaved {
                host,
                x: hx,
                w: hw,
                fwd,
                dims,
            })),
        };
    }
    forward_tensors(x, w)
}

/// [`forward`] through the tensor API on every backend, the CPU's included: what CUDA runs,
/// so that the CPU can train on exactly that path (gangs are checked against it).
pub fn forward_tensors<B: Backend>(x: Tensor<B, 3>, w: Weights<B>) -> Encoding<B> {
    let [b, d_h, d_w] = x.dims();
    let [_, r_u] = w.u.dims();
    let [r_v, _] = w.v.dims();
    let r = x
        .clone()
        .reshape([b * d_h, d_w])
        .matmul(w.u.clone())
        .reshape([b, d_h, r_u]);
    let h = relu(
        r.clone()
            .swap_dims(1, 2)
            .matmul(w.v.clone().transpose().unsqueeze_dim::<3>(0)),
    ); // [B, r_U, r_V]
    let mut e = h
        .clone()
        .reshape([b, r_u * r_v])
        .matmul(w.m.clone().transpose());
    if let Some(bias) = &w.bias {
        e = e + bias.clone().unsqueeze_dim(0);
    }
    Encoding {
        e,
        saved: Saved::Tensors { x, w, r, h },
    }
}

/// The encodings of LoRA layers given by their factors, `X_b = up_t_b^T @ down_b`
/// (standardised as `(X_b - mean) / scale` when `standardize` is set), without forming `X_b`.
/// `up_t` is `B^T` `[N, r, d_H]`, so both large products read their operand in place.
///
/// The probes' responses before the ReLU are `U^T X^T V^T`, which for `X = B A` is
/// `(A U)^T (B^T V^T)`: two rank-`r` products instead of a `d_H x d_W` one, ~40x fewer
/// operations for an SD LoRA's 1280x1280 layer at rank 16, forward and backward. The mean
/// matrix adds one `U^T mean^T V^T` per batch. These are ordinary tensor operations, so
/// autodiff differentiates them on every backend.
pub fn factored<B: Backend>(
    w: Weights<B>,
    up_t: Tensor<B, 3>,
    down: Tensor<B, 3>,
    standardize: Option<Standardize<B>>,
) -> Tensor<B, 2> {
    let [b, r, d_h] = up_t.dims();
    let [b_a, r_a, d_w] = down.dims();
    let [d_w_u, r_u] = w.u.dims();
    let [r_v, d_h_v] = w.v.dims();
    assert!(
        b_a == b && r_a == r && d_w_u == d_w && d_h_v == d_h,
        "encoder weights do not fit factors [{b}, {d_h}, {r}] @ [{b_a}, {r_a}, {d_w}]"
    );
    let vt = w.v.transpose(); // [d_H, r_V]
    // The two large products with the batch folded into rows: one GEMM each, of B*r rows.
    let p = down
        .reshape([b * r, d_w])
        .matmul(w.u.clone())
        .reshape([b, r, r_u]); // A U
    let q = up_t
        .reshape([b * r, d_h])
        .matmul(vt.clone())
        .reshape([b, r, r_v]); // B^T V^T
    let mut pre = p.swap_dims(1, 2).matmul(q); // [B, r_U, r_V]
    if let Some(s) = standardize {
        let shift = w.u.transpose().matmul(s.mean.transpose().matmul(vt)); // [r_U, r_V]
        pre = (pre - shift.unsqueeze_dim(0)).div_scalar(s.scale);
    }
    let mut e = relu(pre).reshape([b, r_u * r_v]).matmul(w.m.transpose());
    if let Some(bias) = w.bias {
        e = e + bias.unsqueeze_dim(0);
    }
    e
}

/// Gradients of the encoder's weights: `probes`, `shared_probe_proj`, `per_probe_encoders`
/// weight and bias, in that order, each flattened row-major.
pub struct EncoderGradients<B: Backend>(pub Vec<Tensor<B, 1>>);

impl<B: Backend> Encoding<B> {
    /// The encoder's gradients from `de`, the loss gradient of [`Encoding::e`] `[B, r_T]`.
    pub fn gradients(self, de: Tensor<B, 2>, scratch: &mut Scratch) -> EncoderGradients<B> {
        match self.saved {
            Saved::Host(saved) => {
                let HostSaved {
                    host,
                    x,
                    w,
                    fwd,
                    dims,
                } = *saved;
                let de = host.buffer(de);
                let g = kernels::backward(
                    host::values(&x),
                    &w.slices(),
                    fwd,
                    host::values(&de),
                    dims,
                    scratch,
                );
                let mut out = vec![g.u, g.v, g.m];
                if w.bias.is_some() {
                    out.push(g.bias);
                }
                EncoderGradients(
                    out.into_iter()
                        .map(|values| {
                            let n = values.len();
                            host.tensor_of(values, [n])
                        })
                        .collect(),
                )
            }
            Saved::Tensors { x, w, r, h } => {
                let [b, r_u, r_v] = h.dims();
                let dm = de
                    .clone()
                    .transpose()
                    .matmul(h.clone().reshape([b, r_u * r_v]));
                let dpre = de
                    .clone()
                    .matmul(w.m)
                    .reshape([b, r_u, r_v])
                    .mask_fill(h.lower_equal_elem(0.0), 0.0);
                // dV = sum_b dPre_b^T @ R_b^T = (sum_b R_b @ dPre_b)^T.
                let dv = r
                    .matmul(dpre.clone())
                    .sum_dim(0)
                    .squeeze_dim::<2>(0)
                    .transpose();
                // dU^T = G^T @ X with G_b = V^T @ dPre_b^T, the batch folded into rows: one
                // GEMM over all B*d_H rows, as in the forward pass.
                let [_, d_h, d_w] = x.dims();
                let g =
                    w.v.transpose()
                        .unsqueeze_dim::<3>(0)
                        .matmul(dpre.swap_dims(1, 2)); // [B, d_H, r_U]
                let du_t = g
                    .reshape([b * d_h, r_u])
                    .transpose()
                    .matmul(x.reshape([b * d_h, d_w])); // [r_U, d_W]
                let mut out = vec![flat(du_t.transpose()), flat(dv), flat(dm)];
                if w.bias.is_some() {
                    out.push(de.sum_dim(0).reshape([-1]));
                }
                EncoderGradients(out)
            }
        }
    }
}

impl<B: Backend> EncoderLayers<'_, B> {
    /// The current values of the layers' parameters.
    pub fn weights(&self) -> Weights<B> {
        Weights {
            u: self.probes.weight.val(),
            v: self.shared.weight.val(),
            m: self.enc.weight.val(),
            bias: self.enc.bias.as_ref().map(|b| b.val()),
        }
    }

    /// The parameters [`Encoding::gradients`] returns gradients for, in its order.
    pub fn param_ids(&self) -> Vec<ParamId> {
        let mut ids = vec![
            self.probes.weight.id,
            self.shared.weight.id,
            self.enc.weight.id,
        ];
        ids.extend(self.enc.bias.as_ref().map(|b| b.id));
        ids
    }
}

fn flat<B: Backend>(t: Tensor<B, 2>) -> Tensor<B, 1> {
    let [a, b] = t.dims();
    t.reshape([a * b])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::test_util::Cpu;
    use burn::backend::Autodiff;
    use burn::tensor::TensorData;
    use probex_weights::rng::Rng;

    fn random<const D: usize>(shape: [usize; D], rng: &mut Rng) -> Tensor<Cpu, D> {
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
    }

    fn close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(want) {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{got:?} vs {want:?}"
            );
        }
    }

    /// Random weights for `[_, d_h, d_w]` inputs, `U` given as a transposed view.
    fn weights(d_h: usize, d_w: usize, r: [usize; 3], rng: &mut Rng) -> Weights<Cpu> {
        let [r_u, r_v, r_t] = r;
        Weights {
            u: random([r_u, d_w], rng).transpose(),
            v: random([r_v, d_h], rng),
            m: random([r_t, r_u * r_v], rng),
            bias: Some(random([r_t], rng)),
        }
    }

    fn on_autodiff(w: &Weights<Cpu>) -> Weights<Autodiff<Cpu>> {
        Weights {
            u: Tensor::from_inner(w.u.clone()),
            v: Tensor::from_inner(w.v.clone()),
            m: Tensor::from_inner(w.m.clone()),
            bias: w.bias.clone().map(Tensor::from_inner),
        }
    }

    /// The host kernels (the CPU backend) and the tensor-API products (every other backend,
    /// here the autodiff backend) agree on the encodings and on every gradient, for a batch
    /// that spans several backward chunks.
    #[test]
    fn host_and_tensor_paths_agree() {
        let mut rng = Rng::new(5, 0);
        let (b, d_h, d_w) = (37, 7, 5);
        let x = random([b, d_h, d_w], &mut rng);
        let w = weights(d_h, d_w, [3, 4, 6], &mut rng);
        let de = random([b, 6], &mut rng);
        let mut scratch = Scratch::default();

        let tensors = forward(Tensor::from_inner(x.clone()), on_autodiff(&w), &mut scratch);
        assert!(matches!(tensors.saved, Saved::Tensors { .. }));
        let host = forward(x, w, &mut scratch);
        assert!(matches!(host.saved, Saved::Host(_)));
        close(&values(host.e.clone()), &values(tensors.e.clone()));

        let got = host.gradients(de.clone(), &mut scratch).0;
        let want = tensors.gradients(Tensor::from_inner(de), &mut scratch).0;
        let sizes: Vec<usize> = got.iter().map(|g| g.dims()[0]).collect();
        assert_eq!(sizes, [5 * 3, 4 * 7, 6 * 12, 6]);
        for (g, w) in got.into_iter().zip(want) {
            close(&values(g), &values(w));
        }
    }

    /// The tensor path's gradients are autodiff's own (the host path's are checked against
    /// them above), with some ReLU inputs negative so the mask matters.
    #[test]
    fn tensor_path_gradients_are_autodiffs() {
        type AB = Autodiff<Cpu>;
        let mut rng = Rng::new(7, 0);
        let (b, d_h, d_w) = (4, 5, 6);
        let x = random([b, d_h, d_w], &mut rng);
        let w = weights(d_h, d_w, [2, 3, 4], &mut rng);
        let de = random([b, 4], &mut rng);
        let tracked = Weights::<AB> {
            u: Tensor::from_inner(w.u.clone()).require_grad(),
            v: Tensor::from_inner(w.v.clone()).require_grad(),
            m: Tensor::from_inner(w.m.clone()).require_grad(),
            bias: w.bias.clone().map(|b| Tensor::from_inner(b).require_grad()),
        };
        let (u, v, m) = (tracked.u.clone(), tracked.v.clone(), tracked.m.clone());
        let bias = tracked.bias.clone();
        let mut scratch = Scratch::default();
        let enc = forward(
            Tensor::<AB, 3>::from_inner(x.clone()),
            on_autodiff(&w),
            &mut scratch,
        );
        let reference = forward(Tensor::<AB, 3>::from_inner(x), tracked, &mut scratch);
        let Saved::Tensors { h, .. } = &reference.saved else {
            panic!("the autodiff backend takes the tensor path");
        };
        let h = values(h.clone());
        assert!(h.contains(&0.0) && h.iter().any(|&v| v > 0.0));
        let grads = (reference.e.clone() * Tensor::from_inner(de.clone()))
            .sum()
            .backward();
        let got = enc.gradients(Tensor::from_inner(de), &mut scratch).0;
        let flat_grad = |t: Tensor<AB, 2>| values(t.grad(&grads).unwrap().reshape([-1]));
        let want = [
            flat_grad(u),
            flat_grad(v),
            flat_grad(m),
            values(bias.unwrap().grad(&grads).unwrap()),
        ];
        for (g, w) in got.into_iter().zip(want) {
            close(&values(g), &w);
        }
    }

    /// A second call reuses the scratch buffers and gives the same result as the first.
    #[test]
    fn repeated_calls_give_identical_results() {
        let mut rng = Rng::new(6, 0);
        let x = random([20, 6, 4], &mut rng);
        let w = weights(6, 4, [3, 2, 5], &mut rng);
        let de = random([20, 5], &mut rng);
        let mut scratch = Scratch::default();
        let mut run = || {
            let w = Weights {
                u: w.u.clone(),
                v: w.v.clone(),
                m: w.m.clone(),
                bias: w.bias.clone(),
            };
            let enc = forward(x.clone(), w, &mut scratch);
            let e = values(enc.e.clone());
            let g: Vec<Vec<f32>> = enc
                .gradients(de.clone(), &mut scratch)
                .0
                .into_iter()
                .map(values)
                .collect();
            (e, g)
        };
        assert_eq!(run(), run());
    }
}
