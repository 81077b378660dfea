//! ProbeX: learned probes read a weight matrix, a shared projection mixes each probe's
//! response, an encoder maps all responses to `e`, and a head maps `e` to the task.

use burn::prelude::*;

use super::encoder::{self, EncoderLayers, Scratch};
use super::{Linear, ModelSpec, Net, ProbeEncoded};
use probex_weights::rng::Rng;

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
    pub probes: Linear<B>,
    /// `shared_probe_proj.weight` `[r_V, d_H]`.
    pub shared_probe_proj: Linear<B>,
    /// `per_probe_encoders.{weight,bias}` `[r_T, r_U*r_V]`, `[r_T]`.
    pub per_probe_encoders: Linear<B>,
    /// `classification_head.{weight,bias}` `[d_Y, r_T]`, `[d_Y]`.
    pub classification_head: Linear<B>,
}

/// The three encoder layers, initialised in the official declaration order.
pub(crate) fn init_encoder<B: Backend>(
    spec: &ModelSpec,
    rng: &mut Rng,
    device: &B::Device,
) -> (Linear<B>, Linear<B>, Linear<B>) {
    let probes = Linear::init(spec.r_u, spec.d_w, false, rng, device);
    let shared = Linear::init(spec.d_h, spec.r_v, false, rng, device);
    let enc = Linear::init(spec.r_u * spec.r_v, spec.r_t, true, rng, device);
    (probes, shared, enc)
}

/// `e = M(flatten(relu(V((X @ U)^T))))` for `x` `[B, d_H, d_W]` (see [`encoder`]).
pub(crate) fn encode_with<B: Backend>(
    layers: EncoderLayers<'_, B>,
    x: Tensor<B, 3>,
) -> Tensor<B, 2> {
    encoder::forward(x, layers.weights(), &mut Scratch::default()).e
}

impl<B: Backend> Net<B> for Probex<B> {
    fn init(spec: &ModelSpec, rng: &mut Rng, device: &B::Device) -> Self {
        let (probes, shared_probe_proj, per_probe_encoders) = init_encoder(spec, rng, device);
        let classification_head = Linear::init(spec.r_t, spec.d_y, true, rng, device);
        Probex {
            probes,
            shared_probe_proj,
            per_probe_encoders,
            classification_head,
        }
    }

    fn encode(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        encode_with(self.encoder(), x)
    }

    fn scores(&self, x: Tensor<B, 3>, _text: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
        self.classification_head.forward(self.encode(x))
    }

    fn probe_encoded(&self) -> Option<&dyn ProbeEncoded<B>> {
        Some(self)
    }
}

impl<B: Backend> ProbeEncoded<B> for Probex<B> {
    fn encoder(&self) -> EncoderLayers<'_, B> {
        EncoderLayers {
            probes: &self.probes,
            shared: &self.shared_probe_proj,
            enc: &self.per_probe_encoders,
        }
    }

    fn scores_from_encoding(&self, e: Tensor<B, 2>, _text: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
        self.classification_head.forward(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::named_tensors;
    use crate::models::test_util::Cpu;
    use burn::tensor::TensorData;
    use burn::tensor::backend::AutodiffBackend;

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

    /// Training's split step (the encoder outside the graph, on the host buffers) gives every
    /// parameter the gradient that autodiff through the whole model gives; a batch larger
    /// than one chunk of the host backward pass covers its chunk edges.
    #[test]
    fn split_step_gives_autodiff_gradients() {
        use crate::models::encoder::Scratch;
        use crate::training::{split_gradients, train_scores};
        use burn::backend::Autodiff;
        use burn::module::Param;
        type AB = Autodiff<Cpu>;
        type Grads = <AB as AutodiffBackend>::Gradients;
        let dev = Default::default();
        let cfg = ProbexConfig::new(6, 5, 3)
            .with_r_u(4)
            .with_r_v(3)
            .with_r_t(5);
        let model: Probex<AB> = cfg.init(&mut Rng::new(2, 0), &dev);
        let mut rng = Rng::new(3, 0);
        let b = 37;
        let x: Vec<f32> = (0..b * 30).map(|_| rng.normal()).collect();
        let x = Tensor::<Cpu, 3>::from_data(TensorData::new(x, [b, 6, 5]), &dev);
        let loss = |s: Tensor<AB, 2>| s.powi_scalar(2).sum();
        let grads = loss(model.scores(Tensor::from_inner(x.clone()), None)).backward();
        let mut scratch = Scratch::default();
        let (s, split) = train_scores(&model, x.into(), None, &mut scratch);
        let grads2 = loss(s).backward();
        let extra = split_gradients(split, &grads2, &mut scratch);

        let values = |t: Tensor<Cpu, 1>| t.into_data().into_vec::<f32>().unwrap();
        let close = |got: &[f32], want: &[f32]| {
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(want) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{got:?} vs {want:?}"
                );
            }
        };
        fn grad<const D: usize>(p: &Param<Tensor<AB, D>>, g: &Grads) -> Option<Vec<f32>> {
            let t = p.val().grad(g)?;
            let n = t.dims().iter().product::<usize>();
            Some(t.reshape([n]).into_data().into_vec::<f32>().unwrap())
        }
        let enc = &model.per_probe_encoders;
        let bias = enc.bias.as_ref().unwrap();
        let split_params = [
            (model.probes.weight.id, grad(&model.probes.weight, &grads)),
            (
                model.shared_probe_proj.weight.id,
                grad(&model.shared_probe_proj.weight, &grads),
            ),
            (enc.weight.id, grad(&enc.weight, &grads)),
            (bias.id, grad(bias, &grads)),
        ];
        assert_eq!(extra.len(), split_params.len());
        for ((id, got), (want_id, want)) in extra.into_iter().zip(split_params) {
            assert_eq!(id, want_id);
            close(&values(got), &want.unwrap());
        }
        assert!(
            grad(&model.probes.weight, &grads2).is_none(),
            "the encoder is outside the graph"
        );
        assert!(grad(bias, &grads2).is_none());
        // The head is differentiated by autodiff either way.
        let head = &model.classification_head.weight;
        close(&grad(head, &grads2).unwrap(), &grad(head, &grads).unwrap());
    }
}
