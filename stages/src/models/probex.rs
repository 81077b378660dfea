//! ProbeX: learned probes read a weight matrix, a shared projection mixes each probe's
//! response, an encoder maps all responses to `e`, and a head maps `e` to the task.

use burn::prelude::*;
use burn::tensor::activation::relu;

use super::{ModelSpec, Net, TorchLinear};
use crate::training::rng::Rng;

/// Shapes of a ProbeX model (defaults are the paper's ranks).
#[derive(Config, Debug)]
pub struct ProbexConfig {
    /// Rows of the input matrix.
    pub d_h: usize,
    /// Columns of the input matrix.
    pub d_w: usize,
    /// Output width of the head (classes, or 1 for regression).
    pub d_y: usize,
    /// Number of probes.
    #[config(default = 128)]
    pub r_u: usize,
    /// Width of the shared probe projection.
    #[config(default = 128)]
    pub r_v: usize,
    /// Width of the encoding `e`.
    #[config(default = 128)]
    pub r_t: usize,
}

impl ProbexConfig {
    /// The model spec stored in checkpoints.
    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            kind: super::ModelKind::Probex,
            d_h: self.d_h,
            d_w: self.d_w,
            r_u: self.r_u,
            r_v: self.r_v,
            r_t: self.r_t,
            d_y: self.d_y,
            d_text: 0,
            hidden: 0,
        }
    }

    /// A freshly initialised model.
    pub fn init<B: Backend>(&self, rng: &mut Rng, device: &B::Device) -> Probex<B> {
        Probex::init(&self.spec(), rng, device)
    }
}

/// ProbeX with a task head. Field names are the official `state_dict` names.
#[derive(Module, Debug)]
pub struct Probex<B: Backend> {
    /// `probes.weight` `[d_W, r_U]` (declared as a Linear r_U -> d_W, hence its fan-in r_U).
    pub probes: TorchLinear<B>,
    /// `shared_probe_proj.weight` `[r_V, d_H]`.
    pub shared_probe_proj: TorchLinear<B>,
    /// `per_probe_encoders.{weight,bias}` `[r_T, r_U*r_V]`, `[r_T]`.
    pub per_probe_encoders: TorchLinear<B>,
    /// `classification_head.{weight,bias}` `[d_Y, r_T]`, `[d_Y]`.
    pub classification_head: TorchLinear<B>,
}

/// The three encoder layers, initialised in the official declaration order.
pub(crate) fn init_encoder<B: Backend>(
    spec: &ModelSpec,
    rng: &mut Rng,
    device: &B::Device,
) -> (TorchLinear<B>, TorchLinear<B>, TorchLinear<B>) {
    let probes = TorchLinear::init(spec.r_u, spec.d_w, false, rng, device);
    let shared = TorchLinear::init(spec.d_h, spec.r_v, false, rng, device);
    let enc = TorchLinear::init(spec.r_u * spec.r_v, spec.r_t, true, rng, device);
    (probes, shared, enc)
}

/// `e = M(flatten(relu(V((X @ U)^T))))` for `x` `[B, d_H, d_W]`.
///
/// Arranged so that no large tensor is ever transposed (a strided copy is slow on the CPU
/// backend): the batch is folded into rows so that `X @ U` is one `[B*d_H, d_W] @ [d_W, r_U]`
/// GEMM (its gradient one `[d_W, B*d_H] @ [B*d_H, r_U]` GEMM: most of the work); the shared
/// projection is applied as `V @ R_b`, giving `H^T` `[B, r_V, r_U]` directly; and instead of
/// transposing `H` back to the official flattening order (`probe * r_V + v`), the columns of the
/// small encoder weight are permuted to `v * r_U + probe`.
pub(crate) fn encode_with<B: Backend>(
    probes: &TorchLinear<B>,
    shared: &TorchLinear<B>,
    enc: &TorchLinear<B>,
    x: Tensor<B, 3>,
) -> Tensor<B, 2> {
    let [b, d_h, d_w] = x.dims();
    // R = X @ probes.weight ([d_W, r_U], used as is).
    let r = x.reshape([b * d_h, d_w]).matmul(probes.weight.val());
    encode_from_r(shared, enc, r, b)
}

/// The encoder after `R` `[B*d_H, r_U]` (see [`encode_with`]).
pub(crate) fn encode_from_r<B: Backend>(
    shared: &TorchLinear<B>,
    enc: &TorchLinear<B>,
    r: Tensor<B, 2>,
    b: usize,
) -> Tensor<B, 2> {
    let [rows, r_u] = r.dims();
    let v = shared.weight.val(); // [r_V, d_H]
    let r_v = v.dims()[0];
    let ht = relu(
        v.unsqueeze_dim::<3>(0)
            .matmul(r.reshape([b, rows / b.max(1), r_u])),
    ); // [B, r_V, r_U]
    let m = enc.weight.val(); // [r_T, r_U * r_V], column probe * r_V + v
    let r_t = m.dims()[0];
    let m_vu = m
        .reshape([r_t, r_u, r_v])
        .swap_dims(1, 2)
        .reshape([r_t, r_v * r_u]);
    let e = ht.reshape([b, r_v * r_u]).matmul(m_vu.transpose());
    match &enc.bias {
        Some(bias) => e + bias.val().unsqueeze_dim(0),
        None => e,
    }
}

/// The training form of the encoder: `R = X @ U` is computed outside the autodiff graph and
/// made a gradient leaf, so that the caller computes `dU = (dR^T @ X)^T` itself: the same
/// product as autodiff's `X^T @ dR`, but in the operand layout the CPU GEMM runs fastest.
pub(crate) fn encode_split<B: Backend>(
    probes: &TorchLinear<B>,
    shared: &TorchLinear<B>,
    enc: &TorchLinear<B>,
    x: Tensor<B, 3>,
) -> (Tensor<B, 2>, SplitLayer<B>) {
    let [b, d_h, d_w] = x.dims();
    let r = x
        .reshape([b * d_h, d_w])
        .matmul(probes.weight.val().detach())
        .detach()
        .require_grad();
    let e = encode_from_r(shared, enc, r.clone(), b);
    (
        e,
        SplitLayer {
            param: probes.weight.id,
            output: r,
        },
    )
}

/// A first layer computed outside the autodiff graph (see [`Net::scores_split`]).
pub struct SplitLayer<B: Backend> {
    /// The parameter whose gradient the caller computes: `(dR^T @ X)^T`, X folded to
    /// `[B*d_H, d_W]`.
    pub param: burn::module::ParamId,
    /// `R`, a gradient leaf: its gradient is `dR`.
    pub output: Tensor<B, 2>,
}

impl<B: Backend> Net<B> for Probex<B> {
    fn init(spec: &ModelSpec, rng: &mut Rng, device: &B::Device) -> Self {
        let (probes, shared_probe_proj, per_probe_encoders) = init_encoder(spec, rng, device);
        let classification_head = TorchLinear::init(spec.r_t, spec.d_y, true, rng, device);
        Probex {
            probes,
            shared_probe_proj,
            per_probe_encoders,
            classification_head,
        }
    }

    fn encode(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        encode_with(
            &self.probes,
            &self.shared_probe_proj,
            &self.per_probe_encoders,
            x,
        )
    }

    fn scores(&self, x: Tensor<B, 3>, _text: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
        self.classification_head.forward(self.encode(x))
    }

    fn scores_split(
        &self,
        x: Tensor<B, 3>,
        _text: Option<Tensor<B, 2>>,
    ) -> (Tensor<B, 2>, Option<SplitLayer<B>>) {
        let (e, split) = encode_split(
            &self.probes,
            &self.shared_probe_proj,
            &self.per_probe_encoders,
            x,
        );
        (self.classification_head.forward(e), Some(split))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::named_tensors;
    use crate::models::test_util::Cpu;
    use burn::tensor::TensorData;

    /// A direct, loop-based evaluation of the method page's equations.
    fn reference(
        p: &std::collections::HashMap<String, Vec<f32>>,
        x: &[f32],
        (d_h, d_w, r_u, r_v, r_t, d_y): (usize, usize, usize, usize, usize, usize),
    ) -> Vec<f32> {
        let u = &p["probes.weight"];
        let v = &p["shared_probe_proj.weight"];
        let (m, mb) = (
            &p["per_probe_encoders.weight"],
            &p["per_probe_encoders.bias"],
        );
        let (t, tb) = (
            &p["classification_head.weight"],
            &p["classification_head.bias"],
        );
        let mut r = vec![0.0f64; d_h * r_u];
        for h in 0..d_h {
            for k in 0..r_u {
                r[h * r_u + k] = (0..d_w)
                    .map(|w| (x[h * d_w + w] * u[w * r_u + k]) as f64)
                    .sum();
            }
        }
        let mut hh = vec![0.0f64; r_u * r_v];
        for k in 0..r_u {
            for j in 0..r_v {
                let s: f64 = (0..d_h)
                    .map(|h| r[h * r_u + k] * v[j * d_h + h] as f64)
                    .sum();
                hh[k * r_v + j] = s.max(0.0);
            }
        }
        let e: Vec<f64> = (0..r_t)
            .map(|o| {
                mb[o] as f64
                    + (0..r_u * r_v)
                        .map(|i| hh[i] * m[o * r_u * r_v + i] as f64)
                        .sum::<f64>()
            })
            .collect();
        (0..d_y)
            .map(|o| {
                (tb[o] as f64 + (0..r_t).map(|i| e[i] * t[o * r_t + i] as f64).sum::<f64>()) as f32
            })
            .collect()
    }

    #[test]
    fn forward_matches_the_equations_and_official_shapes() {
        let dev = Default::default();
        let cfg = ProbexConfig::new(5, 4, 3)
            .with_r_u(2)
            .with_r_v(3)
            .with_r_t(6);
        let model: Probex<Cpu> = cfg.init(&mut Rng::new(1, 0), &dev);
        let named = named_tensors(&model);
        let shapes: Vec<(&str, Vec<usize>)> = named
            .iter()
            .map(|t| (t.name.as_str(), t.shape.clone()))
            .collect();
        assert_eq!(
            shapes,
            vec![
                ("probes.weight", vec![4, 2]),
                ("shared_probe_proj.weight", vec![3, 5]),
                ("per_probe_encoders.weight", vec![6, 6]),
                ("per_probe_encoders.bias", vec![6]),
                ("classification_head.weight", vec![3, 6]),
                ("classification_head.bias", vec![3]),
            ]
        );
        // Probes' fan-in is r_U = 2: bound 1/sqrt(2).
        assert!(named[0].values.iter().all(|v| v.abs() <= 1.0 / 2f32.sqrt()));
        assert!(named[0].values.iter().any(|v| v.abs() > 0.5));
        let p = named.into_iter().map(|t| (t.name, t.values)).collect();
        let mut rng = Rng::new(9, 0);
        let x: Vec<f32> = (0..2 * 20).map(|_| rng.normal()).collect();
        let y = model
            .scores(
                Tensor::from_data(TensorData::new(x.clone(), [2, 5, 4]), &dev),
                None,
            )
            .into_data()
            .into_vec::<f32>()
            .unwrap();
        for b in 0..2 {
            let want = reference(&p, &x[b * 20..(b + 1) * 20], (5, 4, 2, 3, 6, 3));
            for o in 0..3 {
                assert!((y[b * 3 + o] - want[o]).abs() < 1e-5, "{y:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn split_first_layer_gives_autodiff_gradients() {
        use burn::backend::Autodiff;
        type AB = Autodiff<Cpu>;
        let dev = Default::default();
        let cfg = ProbexConfig::new(6, 5, 3)
            .with_r_u(4)
            .with_r_v(3)
            .with_r_t(5);
        let model: Probex<AB> = cfg.init(&mut Rng::new(2, 0), &dev);
        let mut rng = Rng::new(3, 0);
        let x: Vec<f32> = (0..3 * 30).map(|_| rng.normal()).collect();
        let x = Tensor::<Cpu, 3>::from_data(TensorData::new(x, [3, 6, 5]), &dev);
        let loss = |s: Tensor<AB, 2>| s.powi_scalar(2).sum();
        let grads = loss(model.scores(Tensor::from_inner(x.clone()), None)).backward();
        let (s, split) = model.scores_split(Tensor::from_inner(x.clone()), None);
        let grads2 = loss(s).backward();
        let want = model
            .probes
            .weight
            .val()
            .grad(&grads)
            .unwrap()
            .into_data()
            .into_vec::<f32>()
            .unwrap();
        let extra = crate::training::split_gradient::<AB>(split, x, &grads2);
        assert_eq!(extra.len(), 1);
        assert_eq!(extra[0].0, model.probes.weight.id);
        let got = extra[0].1.clone().into_data().into_vec::<f32>().unwrap();
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(&want) {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{got:?} vs {want:?}"
            );
        }
        // Every other parameter gets the same gradient either way.
        let v1 = model
            .per_probe_encoders
            .weight
            .val()
            .grad(&grads)
            .unwrap()
            .into_data()
            .into_vec::<f32>()
            .unwrap();
        let v2 = model
            .per_probe_encoders
            .weight
            .val()
            .grad(&grads2)
            .unwrap()
            .into_data()
            .into_vec::<f32>()
            .unwrap();
        for (a, b) in v1.iter().zip(&v2) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()));
        }
        assert!(model.probes.weight.val().grad(&grads2).is_none());
    }
}
