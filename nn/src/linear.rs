//! A PyTorch `Linear` layer as a Burn module: `y = x W^T + b`, `W` `[out, in]` in every state
//! dict and checkpoint.
//!
//! One type for every use: the probes train it, the zoo trains its nets with it, the text
//! encoders run it frozen. Whether it learns is how the module is used (an `Autodiff` backend
//! and an optimiser, or Burn's `no_grad()` / `valid()`), not what it is. What differs between
//! uses is how the weight is held ([`WeightLayout`]) and whether the layer rounds to f16
//! ([`Precision`]); both are fields, so a layer carries them wherever it goes.

use burn::module::{Module, Param};
use burn::tensor::{DataError, Tensor, TensorData, backend::Backend};

use probex_weights::rng::{Rng, StreamRng};

use crate::{Precision, transpose};

/// A host random generator a layer's initial values are drawn from.
pub trait InitRng {
    /// A draw uniform in `[-bound, bound)`.
    fn symmetric(&mut self, bound: f32) -> f32;
    /// A draw from the standard normal distribution.
    fn normal(&mut self) -> f32;
}

impl InitRng for Rng {
    fn symmetric(&mut self, bound: f32) -> f32 {
        self.uniform(bound)
    }

    fn normal(&mut self) -> f32 {
        Rng::normal(self)
    }
}

impl InitRng for StreamRng {
    fn symmetric(&mut self, bound: f32) -> f32 {
        self.range(-bound, bound)
    }

    fn normal(&mut self) -> f32 {
        StreamRng::normal(self)
    }
}

/// How a [`Linear`] holds its weight parameter. Either way the layer computes `x W^T + b` and
/// reads and writes `W` as `[out, in]` ([`LinearValues`]); the layout decides which matrix the
/// forward pass hands the matmul, and so, at the last bit, the rounding of its sums.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightLayout {
    /// The parameter is `W`, `[out, in]`, PyTorch's layout: what a module visitor sees is the
    /// `state_dict` tensor itself (the probes' checkpoints are written so). The forward pass
    /// multiplies by its transpose.
    #[default]
    OutIn,
    /// The parameter is `W^T`, `[in, out]`, Burn's own layout: the forward pass is one
    /// `x @ param`. Transposed on the host when read in or out as [`LinearValues`].
    InOut,
}

/// A layer's values on the host, in PyTorch's layout.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearValues {
    /// Input width.
    pub d_in: usize,
    /// Output width.
    pub d_out: usize,
    /// `W`, `[d_out, d_in]` row-major.
    pub weight: Vec<f32>,
    /// `b`, `[d_out]`, if the layer has one.
    pub bias: Option<Vec<f32>>,
}

impl LinearValues {
    /// PyTorch's default initialisation: weight and bias uniform in `±1/sqrt(d_in)`, drawn from
    /// `rng` weight first (row-major `[out, in]`), then bias; so a seed gives the same layer on
    /// every device.
    pub fn torch_init(d_in: usize, d_out: usize, bias: bool, rng: &mut impl InitRng) -> Self {
        let bound = 1.0 / (d_in as f32).sqrt();
        let weight = (0..d_in * d_out).map(|_| rng.symmetric(bound)).collect();
        let bias = bias.then(|| (0..d_out).map(|_| rng.symmetric(bound)).collect());
        LinearValues {
            d_in,
            d_out,
            weight,
            bias,
        }
    }

    /// Hugging Face's initialisation (ViT's `_init_weights`): weight normal(0, 0.02) drawn
    /// row-major `[out, in]`, bias zero.
    pub fn hf_init(d_in: usize, d_out: usize, rng: &mut impl InitRng) -> Self {
        LinearValues {
            d_in,
            d_out,
            weight: (0..d_in * d_out).map(|_| 0.02 * rng.normal()).collect(),
            bias: Some(vec![0.0; d_out]),
        }
    }
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>, DataError> {
    t.into_data().convert::<f32>().into_vec::<f32>()
}

/// A PyTorch `Linear` layer: `y = x W^T + b`, `b` optional.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `W` as [`Linear::layout`] holds it: `[out, in]` ([`WeightLayout::OutIn`]) or `[in, out]`
    /// ([`WeightLayout::InOut`]).
    pub weight: Param<Tensor<B, 2>>,
    /// `b`, `[out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    layout: WeightLayout,
    precision: Precision,
}

impl<B: Backend> Linear<B> {
    /// A layer from device tensors: `weight` in `layout`'s shape, `bias` `[out]`; in f32.
    pub fn new(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>, layout: WeightLayout) -> Self {
        Linear {
            weight: Param::from_tensor(weight),
            bias: bias.map(Param::from_tensor),
            layout,
            precision: Precision::F32,
        }
    }

    /// A layer holding `values` in `layout` on `device`.
    ///
    /// # Panics
    /// If `values.weight` does not hold `d_out * d_in` values or the bias `d_out`.
    pub fn from_values(values: LinearValues, layout: WeightLayout, device: &B::Device) -> Self {
        let LinearValues {
            d_in,
            d_out,
            weight,
            bias,
        } = values;
        let weight = match layout {
            WeightLayout::OutIn => TensorData::new(weight, [d_out, d_in]),
            WeightLayout::InOut => TensorData::new(transpose(&weight, d_out, d_in), [d_in, d_out]),
        };
        let bias = bias.map(|b| Tensor::from_data(TensorData::new(b, [d_out]), device));
        Self::new(Tensor::from_data(weight, device), bias, layout)
    }

    /// PyTorch's default initialisation ([`LinearValues::torch_init`]), held `[out, in]`: the
    /// probes' layers.
    pub fn init(
        d_in: usize,
        d_out: usize,
        bias: bool,
        rng: &mut impl InitRng,
        device: &B::Device,
    ) -> Self {
        Self::from_values(
            LinearValues::torch_init(d_in, d_out, bias, rng),
            WeightLayout::OutIn,
            device,
        )
    }

    /// The layer's values copied to the host, `W` as `[out, in]` whatever the layout.
    pub fn values(&self) -> Result<LinearValues, DataError> {
        let (d_in, d_out) = (self.d_in(), self.d_out());
        let w = host(self.weight.val())?;
        let weight = match self.layout {
            WeightLayout::OutIn => w,
            WeightLayout::InOut => transpose(&w, d_in, d_out),
        };
        let bias = match &self.bias {
            Some(b) => Some(host(b.val())?),
            None => None,
        };
        Ok(LinearValues {
            d_in,
            d_out,
            weight,
            bias,
        })
    }

    /// How the weight is held.
    pub fn layout(&self) -> WeightLayout {
        self.layout
    }

    /// What the layer's weights and outputs are stored in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Input width.
    pub fn d_in(&self) -> usize {
        let [a, b] = self.weight.val().dims();
        match self.layout {
            WeightLayout::OutIn => b,
            WeightLayout::InOut => a,
        }
    }

    /// Output width.
    pub fn d_out(&self) -> usize {
        let [a, b] = self.weight.val().dims();
        match self.layout {
            WeightLayout::OutIn => a,
            WeightLayout::InOut => b,
        }
    }

    /// The layer in precision `p`: its weights rounded now, its outputs rounded from now on.
    pub fn with_precision(self, p: Precision) -> Self {
        Linear {
            weight: self.weight.map(|w| p.round(w)),
            bias: self.bias.map(|b| b.map(|b| p.round(b))),
            layout: self.layout,
            precision: p,
        }
    }

    /// `W^T` restricted to outputs `start..start + len`, `[in, len]`, as the matmul reads it.
    fn weight_t(&self, start: usize, len: usize) -> Tensor<B, 2> {
        let w = self.weight.val();
        let whole = start == 0 && len == self.d_out();
        match (self.layout, whole) {
            (WeightLayout::OutIn, true) => w.transpose(),
            (WeightLayout::OutIn, false) => w.narrow(0, start, len).transpose(),
            (WeightLayout::InOut, true) => w,
            (WeightLayout::InOut, false) => w.narrow(1, start, len),
        }
    }

    fn apply(&self, x: Tensor<B, 2>, start: usize, len: usize) -> Tensor<B, 2> {
        let y = x.matmul(self.weight_t(start, len));
        let y = match &self.bias {
            Some(b) if start == 0 && len == self.d_out() => y + b.val().unsqueeze_dim(0),
            Some(b) => y + b.val().narrow(0, start, len).unsqueeze_dim(0),
            None => y,
        };
        self.precision.round(y)
    }

    /// `x W^T + b` for `x` `[n, in]`: `[n, out]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.apply(x, 0, self.d_out())
    }

    /// The layer over a sequence, `x` `[batch, seq, in]`: `[batch, seq, out]`.
    pub fn forward_seq(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, d_in] = x.dims();
        let y = self.forward(x.reshape([b * s, d_in]));
        y.reshape([b, s, self.d_out()])
    }

    /// Outputs `start..start + len` of [`Linear::forward`] alone, `[n, len]`, computed from
    /// those rows of `W` and `b` only (one attention head of a fused projection).
    pub fn forward_outputs(&self, x: Tensor<B, 2>, start: usize, len: usize) -> Tensor<B, 2> {
        self.apply(x, start, len)
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::module::{ModuleVisitor, ParamId};

    use super::*;

    type Cpu = Flex;

    /// `W` `[2, 3]` and `b` `[2]` with values that sum exactly in f32.
    fn small() -> LinearValues {
        LinearValues {
            d_in: 3,
            d_out: 2,
            weight: vec![1.0, -2.0, 0.5, 0.25, 3.0, -1.0],
            bias: Some(vec![0.5, -4.0]),
        }
    }

    fn rows<const D: usize>(t: Tensor<Cpu, D>) -> Vec<f32> {
        host(t).unwrap()
    }

    #[test]
    fn forward_is_x_times_w_transposed_plus_b_in_both_layouts() {
        let dev = Default::default();
        let x = [1.0f32, 2.0, -4.0, 0.5, 0.0, 2.0];
        // Row n, output o: sum_i x[n, i] W[o, i] + b[o].
        let v = small();
        let want: Vec<f32> = (0..2)
            .flat_map(|n| {
                let v = &v;
                (0..2).map(move |o| {
                    (0..3)
                        .map(|i| x[n * 3 + i] * v.weight[o * 3 + i])
                        .sum::<f32>()
                        + v.bias.as_ref().unwrap()[o]
                })
            })
            .collect();
        assert_eq!(want, vec![-4.5, 6.25, 2.0, -5.875]);
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            let lin = Linear::<Cpu>::from_values(small(), layout, &dev);
            assert_eq!((lin.d_in(), lin.d_out()), (3, 2));
            let xt = || Tensor::<Cpu, 2>::from_data(TensorData::new(x.to_vec(), [2, 3]), &dev);
            assert_eq!(rows(lin.forward(xt())), want, "{layout:?}");
            let seq = lin.forward_seq(xt().reshape([1, 2, 3]));
            assert_eq!(seq.dims(), [1, 2, 2]);
            assert_eq!(rows(seq), want, "{layout:?}");
            // Output 1 alone.
            assert_eq!(rows(lin.forward_outputs(xt(), 1, 1)), vec![6.25, -5.875]);
        }
        let no_bias = LinearValues {
            bias: None,
            ..small()
        };
        let lin = Linear::<Cpu>::from_values(no_bias, WeightLayout::InOut, &dev);
        let x = Tensor::<Cpu, 2>::from_data(TensorData::new(vec![1.0f32, 0.0, 0.0], [1, 3]), &dev);
        assert_eq!(rows(lin.forward(x)), vec![1.0, 0.25]);
    }

    #[test]
    fn init_draws_weight_row_major_then_bias_from_the_rng() {
        let dev = Default::default();
        let bound = 1.0 / 3f32.sqrt();
        let mut rng = Rng::new(7, 1);
        let lin = Linear::<Cpu>::init(3, 2, true, &mut rng, &dev);
        let mut again = Rng::new(7, 1);
        let w: Vec<f32> = (0..6).map(|_| again.uniform(bound)).collect();
        let b: Vec<f32> = (0..2).map(|_| again.uniform(bound)).collect();
        assert_eq!(lin.layout(), WeightLayout::OutIn);
        assert_eq!(lin.weight.val().dims(), [2, 3]);
        assert_eq!(rows(lin.weight.val()), w);
        assert_eq!(rows(lin.bias.as_ref().unwrap().val()), b);
        // The generator is left where the layer's draws end.
        assert_eq!(rng, again);
        // Without a bias only the weight is drawn.
        let mut rng = Rng::new(7, 1);
        let lin = Linear::<Cpu>::init(3, 2, false, &mut rng, &dev);
        assert!(lin.bias.is_none());
        assert_eq!(rng.state(), {
            let mut r = Rng::new(7, 1);
            (0..6).for_each(|_| {
                r.uniform(bound);
            });
            r.state()
        });

        // The zoo's generator: the same order, its own uniform.
        let mut s = StreamRng::new(3);
        let v = LinearValues::torch_init(3, 2, true, &mut s);
        let mut t = StreamRng::new(3);
        let w: Vec<f32> = (0..6).map(|_| t.range(-bound, bound)).collect();
        let b: Vec<f32> = (0..2).map(|_| t.range(-bound, bound)).collect();
        assert_eq!((v.weight, v.bias), (w, Some(b)));
        let mut s = StreamRng::new(3);
        let v = LinearValues::hf_init(3, 2, &mut s);
        let mut t = StreamRng::new(3);
        let w: Vec<f32> = (0..6).map(|_| 0.02 * t.normal()).collect();
        assert_eq!((v.weight, v.bias), (w, Some(vec![0.0; 2])));
    }

    /// Every float parameter's shape and values, as a checkpoint writer visits them.
    struct Shapes(Vec<(Vec<usize>, Vec<f32>)>);

    impl ModuleVisitor<Cpu> for Shapes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Cpu, D>>) {
            let t = param.val();
            self.0.push((t.dims().to_vec(), rows(t)));
        }
    }

    #[test]
    fn values_round_trip_and_out_in_holds_the_pytorch_tensor() {
        let dev = Default::default();
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            let lin = Linear::<Cpu>::from_values(small(), layout, &dev);
            assert_eq!(lin.values().unwrap(), small(), "{layout:?}");
            let mut seen = Shapes(Vec::new());
            lin.visit(&mut seen);
            let w = &seen.0[0];
            match layout {
                // The parameter is the `[out, in]` tensor a state dict holds, as is.
                WeightLayout::OutIn => assert_eq!(w, &(vec![2, 3], small().weight)),
                WeightLayout::InOut => {
                    assert_eq!(w, &(vec![3, 2], vec![1.0, 0.25, -2.0, 3.0, 0.5, -1.0]))
                }
            }
            assert_eq!(seen.0[1], (vec![2], vec![0.5, -4.0]));
            assert_eq!(seen.0.len(), 2);
        }
        // The same from device tensors, and without a bias.
        let w = Tensor::<Cpu, 2>::from_data(TensorData::new(small().weight, [2, 3]), &dev);
        let lin = Linear::new(w, None, WeightLayout::OutIn);
        let v = lin.values().unwrap();
        assert_eq!((v.d_in, v.d_out, v.bias), (3, 2, None));
        assert_eq!(lin.num_params(), 6);
        // A module record keeps the parameter ids across a clone.
        let ids: Vec<ParamId> = burn::module::list_param_ids(&lin);
        assert_eq!(burn::module::list_param_ids(&lin.clone()), ids);
    }

    #[test]
    fn f16_rounds_weights_and_outputs() {
        let dev = Default::default();
        let third = LinearValues {
            d_in: 1,
            d_out: 1,
            weight: vec![1.0 / 3.0],
            bias: Some(vec![0.1]),
        };
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            let lin = Linear::<Cpu>::from_values(third.clone(), layout, &dev)
                .with_precision(Precision::F16);
            assert_eq!(lin.precision(), Precision::F16);
            let v = lin.values().unwrap();
            let f16 = |x: f32| Precision::F16.round(Tensor::<Cpu, 1>::from_floats([x], &dev));
            assert_eq!(v.weight, rows(f16(1.0 / 3.0)));
            assert_eq!(v.bias.unwrap(), rows(f16(0.1)));
            let x = Tensor::<Cpu, 2>::from_floats([[3.0]], &dev);
            let y = rows(lin.forward(x))[0];
            // f16(3 * f16(1/3) + f16(0.1)): representable in f16, and not the f32 result.
            assert_eq!(rows(f16(y))[0], y);
            assert_ne!(y, 3.0 * (1.0f32 / 3.0) + 0.1);
        }
    }
}
