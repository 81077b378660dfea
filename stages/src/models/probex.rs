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
/// The batch is folded into rows so that `X @ U` is one `[B*d_H, d_W] @ [d_W, r_U]` GEMM (and
/// its gradient one `[d_W, B*d_H] @ [B*d_H, r_U]` GEMM), which is most of the work.
pub(crate) fn encode_with<B: Backend>(
    probes: &TorchLinear<B>,
    shared: &TorchLinear<B>,
    enc: &TorchLinear<B>,
    x: Tensor<B, 3>,
) -> Tensor<B, 2> {
    let [b, d_h, d_w] = x.dims();
    let u = probes.weight.val(); // [d_W, r_U], used as is: R = X @ probes.weight
    let r_u = u.dims()[1];
    let r = x.reshape([b * d_h, d_w]).matmul(u); // [B*d_H, r_U]
    let rt = r
        .reshape([b, d_h, r_u])
        .swap_dims(1, 2)
        .reshape([b * r_u, d_h]);
    let h = relu(shared.forward(rt)); // [B*r_U, r_V]; row (b, probe), column v
    let r_v = h.dims()[1];
    enc.forward(h.reshape([b, r_u * r_v]))
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
}
