//! Zero-shot ProbeX: the ProbeX encoder, and a text-side `regression_head` that maps each
//! class's text embedding into the encoding space; logits are cosines between the two.

use burn::prelude::*;

use super::encoder::EncoderLayers;
use super::probex::{encode_with, init_encoder};
use super::{Linear, ModelKind, ModelSpec, Net, ProbeEncoded, text_cosines};
use probex_weights::rng::Rng;

/// Shapes of a zero-shot ProbeX model.
#[derive(Config, Debug)]
pub struct ProbexZeroshotConfig {
    /// Rows of the input matrix.
    pub d_h: usize,
    /// Columns of the input matrix.
    pub d_w: usize,
    /// Width of the class text embeddings (768 for CLIP ViT-L/14).
    pub d_text: usize,
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

impl ProbexZeroshotConfig {
    /// The model spec stored in checkpoints.
    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            kind: ModelKind::ProbexZeroshot,
            d_h: self.d_h,
            d_w: self.d_w,
            r_u: self.r_u,
            r_v: self.r_v,
            r_t: self.r_t,
            d_y: 0,
            d_text: self.d_text,
            hidden: 0,
        }
    }

    /// A freshly initialised model.
    pub fn init<B: Backend>(&self, rng: &mut Rng, device: &B::Device) -> ProbexZeroshot<B> {
        ProbexZeroshot::init(&self.spec(), rng, device)
    }
}

/// Zero-shot ProbeX. Field names are the official `state_dict` names.
#[derive(Module, Debug)]
pub struct ProbexZeroshot<B: Backend> {
    /// `probes.weight` `[d_W, r_U]`.
    pub probes: Linear<B>,
    /// `shared_probe_proj.weight` `[r_V, d_H]`.
    pub shared_probe_proj: Linear<B>,
    /// `per_probe_encoders.{weight,bias}` `[r_T, r_U*r_V]`, `[r_T]`.
    pub per_probe_encoders: Linear<B>,
    /// `regression_head.{weight,bias}` `[r_T, d_text]`, `[r_T]`: text embedding -> `e` space.
    pub regression_head: Linear<B>,
}

impl<B: Backend> Net<B> for ProbexZeroshot<B> {
    fn init(spec: &ModelSpec, rng: &mut Rng, device: &B::Device) -> Self {
        let (probes, shared_probe_proj, per_probe_encoders) = init_encoder(spec, rng, device);
        let regression_head = Linear::init(spec.d_text, spec.r_t, true, rng, device);
        ProbexZeroshot {
            probes,
            shared_probe_proj,
            per_probe_encoders,
            regression_head,
        }
    }

    fn encode(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        encode_with(self.encoder(), x)
    }

    /// Cosine similarity `[B, C]` between each `e` and each class's projected text vector;
    /// without `text` there are no classes, and the result is `[B, 0]`.
    fn scores(&self, x: Tensor<B, 3>, text: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
        self.cosines(self.encode(x), text)
    }

    fn probe_encoded(&self) -> Option<&dyn ProbeEncoded<B>> {
        Some(self)
    }
}

impl<B: Backend> ProbeEncoded<B> for ProbexZeroshot<B> {
    fn encoder(&self) -> EncoderLayers<'_, B> {
        EncoderLayers {
            probes: &self.probes,
            shared: &self.shared_probe_proj,
            enc: &self.per_probe_encoders,
        }
    }

    fn scores_from_encoding(&self, e: Tensor<B, 2>, text: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
        self.cosines(e, text)
    }
}

impl<B: Backend> ProbexZeroshot<B> {
    /// Cosines between encodings `e` and the projected `text` rows.
    fn cosines(&self, e: Tensor<B, 2>, text: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
        text_cosines(e, &self.regression_head, text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::test_util::Cpu;
    use burn::tensor::TensorData;

    #[test]
    fn cosine_logits_are_bounded_and_follow_the_text() {
        let dev = Default::default();
        let cfg = ProbexZeroshotConfig::new(4, 3, 5)
            .with_r_u(2)
            .with_r_v(2)
            .with_r_t(3);
        let model: ProbexZeroshot<Cpu> = cfg.init(&mut Rng::new(0, 0), &dev);
        let mut rng = Rng::new(1, 0);
        let x: Vec<f32> = (0..2 * 12).map(|_| rng.normal()).collect();
        let t: Vec<f32> = (0..3 * 5).map(|_| rng.normal()).collect();
        let x = Tensor::<Cpu, 3>::from_data(TensorData::new(x, [2, 4, 3]), &dev);
        let text = Tensor::<Cpu, 2>::from_data(TensorData::new(t, [3, 5]), &dev);
        let s = model.scores(x, Some(text));
        assert_eq!(s.dims(), [2, 3]);
        let v = s.into_data().into_vec::<f32>().unwrap();
        assert!(v.iter().all(|c| c.abs() <= 1.0 + 1e-6), "{v:?}");
    }
}
