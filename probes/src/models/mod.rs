//! The probe models: ProbeX (discriminative and zero-shot) and the paper's Dense and StatNN
//! baselines, as Burn modules generic over the backend.
//!
//! Parameters are held in PyTorch's layouts (a Linear weight is `[out, in]`) and named like the
//! official PyTorch code, so a checkpoint ([`checkpoint`]) is a `state_dict` a PyTorch user can
//! load, and the other way round.

pub mod batch;
pub mod checkpoint;
pub mod dense;
pub mod encoder;
pub mod probex;
pub mod statnn;
pub mod zeroshot;

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use burn::tensor::TensorData;
use serde::{Deserialize, Serialize};

use encoder::EncoderLayers;
use probex_nn::Linear;
use probex_weights::rng::Rng;

pub use batch::{Batch, Standardize};
pub use dense::{Dense, DenseConfig, DenseZeroshot};
pub use probex::{Probex, ProbexConfig};
pub use statnn::{StatNn, StatNnConfig};
pub use zeroshot::{ProbexZeroshot, ProbexZeroshotConfig};

/// Which probe to train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// ProbeX with a task head (multi-label, single-label or regression).
    Probex,
    /// ProbeX with a text-side `regression_head`: cosine logits against class text embeddings.
    ProbexZeroshot,
    /// A linear classifier on the flattened layer (the paper's Dense baseline).
    Dense,
    /// The Dense baseline aligned with text: a linear map of the flattened layer into the
    /// encoding space, scored by cosine against `regression_head(text)` (the paper's Dense
    /// row of the zero-shot table).
    DenseZeroshot,
    /// Per-layer weight statistics and a small MLP (the StatNN baseline).
    Statnn,
}

impl ModelKind {
    /// The name used in TOML and checkpoints (`probex-zeroshot`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Probex => "probex",
            ModelKind::ProbexZeroshot => "probex-zeroshot",
            ModelKind::Dense => "dense",
            ModelKind::DenseZeroshot => "dense-zeroshot",
            ModelKind::Statnn => "statnn",
        }
    }
}

impl ModelKind {
    /// Whether the model scores classes by cosine against their text embeddings.
    pub fn is_zero_shot(self) -> bool {
        matches!(self, ModelKind::ProbexZeroshot | ModelKind::DenseZeroshot)
    }
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything needed to rebuild a model's parameter shapes (stored in every checkpoint).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The model.
    pub kind: ModelKind,
    /// Rows of the input matrix.
    pub d_h: usize,
    /// Columns of the input matrix.
    pub d_w: usize,
    /// Number of probes (ProbeX).
    pub r_u: usize,
    /// Width of the shared probe projection (ProbeX).
    pub r_v: usize,
    /// Width of the encoding `e` (ProbeX).
    pub r_t: usize,
    /// Output width of the head (classes, or 1 for regression; 0 for zero-shot).
    pub d_y: usize,
    /// Text embedding width (zero-shot; 0 otherwise).
    pub d_text: usize,
    /// Hidden width (StatNN; 0 otherwise).
    pub hidden: usize,
}

/// The models' common interface for training and inference.
///
/// Inputs are `[B, a, b]`: the layer matrices `[B, d_H, d_W]` for ProbeX and Dense, the
/// standardised statistics `[B, 1, F]` for StatNN.
pub trait Net<B: Backend>: Module<B> + Sized {
    /// A freshly initialised model (PyTorch's Linear defaults, drawn from `rng`).
    fn init(spec: &ModelSpec, rng: &mut Rng, device: &B::Device) -> Self;

    /// The representation used downstream (kNN, retrieval): ProbeX's `e` `[B, r_T]`, StatNN's
    /// hidden layer, Dense's logits.
    fn encode(&self, x: Tensor<B, 3>) -> Tensor<B, 2>;

    /// Scores `[B, d_Y]`: logits, regression outputs, or (zero-shot) cosines against `text`
    /// `[C, d_text]`.
    fn scores(&self, x: Tensor<B, 3>, text: Option<Tensor<B, 2>>) -> Tensor<B, 2>;

    /// The model as one that starts with ProbeX's encoder, which training computes outside
    /// the autodiff graph ([`encoder`]); `None` for the other models.
    fn probe_encoded(&self) -> Option<&dyn ProbeEncoded<B>> {
        None
    }
}

/// A model that starts with ProbeX's encoder ([`encoder`]): ProbeX and its zero-shot form.
pub trait ProbeEncoded<B: Backend> {
    /// The encoder's layers.
    fn encoder(&self) -> EncoderLayers<'_, B>;

    /// [`Net::scores`] from the encodings `e` `[B, r_T]` rather than the input.
    fn scores_from_encoding(&self, e: Tensor<B, 2>, text: Option<Tensor<B, 2>>) -> Tensor<B, 2>;
}

/// Scores (or, with `encode`, the encodings [`Net::encode`] gives) of a batch: ProbeX's
/// encoder reads LoRA factors as they are; every other model reads the matrices they form.
pub fn forward_batch<B: Backend, M: Net<B>>(
    model: &M,
    batch: Batch<B>,
    text: Option<Tensor<B, 2>>,
    encode: bool,
) -> Tensor<B, 2> {
    if let (
        Batch::Factored {
            up_t,
            down,
            standardize,
        },
        Some(net),
    ) = (&batch, model.probe_encoded())
    {
        let e = encoder::factored(
            net.encoder().weights(),
            up_t.clone(),
            down.clone(),
            standardize.clone(),
        );
        return if encode {
            e
        } else {
            net.scores_from_encoding(e, text)
        };
    }
    let x = batch.stacked();
    if encode {
        model.encode(x)
    } else {
        model.scores(x, text)
    }
}

/// A named parameter copied to the host: official name, shape, row-major f32 values.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    /// Official (PyTorch `state_dict`) name, e.g. `shared_probe_proj.weight`.
    pub name: String,
    /// Shape in PyTorch's layout.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

#[derive(Default)]
struct PathStack(Vec<String>);

impl PathStack {
    fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    fn exit(&mut self) {
        self.0.pop();
    }
    fn name(&self) -> String {
        self.0.join(".")
    }
}

struct Collector {
    path: PathStack,
    out: Vec<NamedTensor>,
}

impl<B: Backend> ModuleVisitor<B> for Collector {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let t = param.val();
        let shape = t.dims().to_vec();
        let values = t
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap_or_default();
        self.out.push(NamedTensor {
            name: self.path.name(),
            shape,
            values,
        });
    }
}

/// Every float parameter of `module` with its official name, in declaration order.
pub fn named_tensors<B: Backend, M: Module<B>>(module: &M) -> Vec<NamedTensor> {
    let mut c = Collector {
        path: PathStack::default(),
        out: Vec::new(),
    };
    module.visit(&mut c);
    c.out
}

/// The official parameter names of `module`, in declaration order (cheap: no data copies).
pub fn param_names<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, Vec<usize>)> {
    struct Names {
        path: PathStack,
        out: Vec<(String, Vec<usize>)>,
    }
    impl<B: Backend> ModuleVisitor<B> for Names {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.out
                .push((self.path.name(), param.lazy_shape().to_vec()));
        }
    }
    let mut n = Names {
        path: PathStack::default(),
        out: Vec::new(),
    };
    module.visit(&mut n);
    n.out
}

/// One parameter that a named tensor map cannot fill.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LoadProblem {
    /// No tensor of the parameter's name.
    #[error("tensor `{name}` is missing (expected shape {expected:?})")]
    Missing {
        /// The parameter's official name.
        name: String,
        /// Its shape.
        expected: Vec<usize>,
    },
    /// A tensor of the right name and the wrong shape.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The parameter's official name.
        name: String,
        /// The tensor's shape.
        found: Vec<usize>,
        /// The parameter's shape.
        expected: Vec<usize>,
    },
    /// A tensor no parameter has the name of.
    #[error("unexpected tensor `{0}` for this model")]
    Unexpected(String),
}

impl LoadProblem {
    /// The tensor name the problem is about.
    pub fn name(&self) -> &str {
        match self {
            LoadProblem::Missing { name, .. } | LoadProblem::Shape { name, .. } => name,
            LoadProblem::Unexpected(name) => name,
        }
    }
}

/// Why [`load_named`] failed: every problem, listed together (`; `-separated).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct LoadError(pub Vec<LoadProblem>);

struct Loader<'a, B: Backend> {
    path: PathStack,
    tensors: &'a HashMap<String, NamedTensor>,
    device: B::Device,
    errors: Vec<LoadProblem>,
    used: Vec<String>,
}

impl<B: Backend> ModuleMapper<B> for Loader<'_, B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let name = self.path.name();
        let (id, tensor, mapper) = param.consume();
        let want = tensor.dims().to_vec();
        match self.tensors.get(&name) {
            None => {
                self.errors.push(LoadProblem::Missing {
                    name,
                    expected: want,
                });
                Param::from_mapped_value(id, tensor, mapper)
            }
            Some(t) if t.shape != want => {
                self.errors.push(LoadProblem::Shape {
                    name,
                    found: t.shape.clone(),
                    expected: want,
                });
                Param::from_mapped_value(id, tensor, mapper)
            }
            Some(t) => {
                self.used.push(name);
                let data = TensorData::new(t.values.clone(), want);
                let is_rg = tensor.is_require_grad();
                let new = Tensor::<B, D>::from_data(data, &self.device).set_require_grad(is_rg);
                Param::from_mapped_value(id, new, mapper)
            }
        }
    }
}

/// Replaces every parameter of `module` by the tensor of the same official name; missing
/// names, wrong shapes and unexpected extra names are errors (listed together).
pub fn load_named<B: Backend, M: Module<B>>(
    module: M,
    tensors: &HashMap<String, NamedTensor>,
    device: &B::Device,
) -> Result<M, LoadError> {
    let mut l = Loader::<B> {
        path: PathStack::default(),
        tensors,
        device: device.clone(),
        errors: Vec::new(),
        used: Vec::new(),
    };
    let module = module.map(&mut l);
    let mut extra: Vec<&String> = tensors.keys().filter(|k| !l.used.contains(k)).collect();
    extra.sort();
    for k in extra {
        // A tensor already reported (wrong shape) is not reported again as unexpected.
        if !l.errors.iter().any(|e| e.name() == k.as_str()) {
            l.errors.push(LoadProblem::Unexpected(k.clone()));
        }
    }
    if l.errors.is_empty() {
        Ok(module)
    } else {
        Err(LoadError(l.errors))
    }
}

/// Parameter ids of a module in declaration order (used to key optimiser state).
pub fn param_ids<B: Backend, M: Module<B>>(module: &M) -> Vec<ParamId> {
    burn::module::list_param_ids(module)
}

/// Zero-shot scores `[B, C]`: cosines between encodings `e` `[B, r_T]` and the class texts
/// mapped by `head` into the same space; without `text` there are no classes (`[B, 0]`).
pub fn text_cosines<B: Backend>(
    e: Tensor<B, 2>,
    head: &Linear<B>,
    text: Option<Tensor<B, 2>>,
) -> Tensor<B, 2> {
    let e = l2_normalize(e);
    match text {
        Some(t) => e.matmul(l2_normalize(head.forward(t)).transpose()),
        None => {
            let b = e.dims()[0];
            Tensor::zeros([b, 0], &e.device())
        }
    }
}

/// L2-normalises the rows of `x` like `torch.nn.functional.normalize(x, dim=1)`.
pub fn l2_normalize<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

#[cfg(test)]
pub(crate) mod test_util {
    use burn::backend::Flex;

    /// The CPU backend used by unit tests.
    pub type Cpu = Flex;
}

#[cfg(test)]
mod tests {
    use super::test_util::Cpu;
    use super::*;

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn linear_matches_hand_computation_and_names() {
        let dev = Default::default();
        let mut rng = Rng::new(0, 0);
        let lin = Linear::<Cpu>::init(3, 2, true, &mut rng, &dev);
        let named = named_tensors(&lin);
        assert_eq!(named.len(), 2);
        assert_eq!(named[0].name, "weight");
        assert_eq!(named[0].shape, vec![2, 3]);
        assert_eq!(named[1].name, "bias");
        let bound = 1.0 / 3f32.sqrt();
        assert!(
            named
                .iter()
                .flat_map(|t| &t.values)
                .all(|v| v.abs() <= bound)
        );
        let x = [1.0f32, -2.0, 0.5];
        let y = lin
            .forward(Tensor::from_data(TensorData::new(x.to_vec(), [1, 3]), &dev))
            .into_data()
            .into_vec::<f32>()
            .unwrap();
        for o in 0..2 {
            let want: f32 = (0..3)
                .map(|i| named[0].values[o * 3 + i] * x[i])
                .sum::<f32>()
                + named[1].values[o];
            assert!((y[o] - want).abs() < 1e-6);
        }
    }

    #[test]
    fn load_named_reports_missing_wrong_and_extra() {
        let dev = Default::default();
        let mut rng = Rng::new(0, 0);
        let lin = Linear::<Cpu>::init(3, 2, true, &mut rng, &dev);
        let mut map: HashMap<String, NamedTensor> = named_tensors(&lin)
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        let ok = load_named(lin.clone(), &map, &dev).unwrap();
        assert_eq!(named_tensors(&ok), named_tensors(&lin));
        map.get_mut("weight").unwrap().shape = vec![3, 2];
        map.remove("bias");
        map.insert(
            "extra".into(),
            NamedTensor {
                name: "extra".into(),
                shape: vec![1],
                values: vec![0.0],
            },
        );
        let err = load_named(lin, &map, &dev).unwrap_err();
        assert_eq!(
            err.0,
            [
                LoadProblem::Shape {
                    name: "weight".into(),
                    found: vec![3, 2],
                    expected: vec![2, 3],
                },
                LoadProblem::Missing {
                    name: "bias".into(),
                    expected: vec![2],
                },
                LoadProblem::Unexpected("extra".into()),
            ]
        );
        let err = err.to_string();
        assert!(err.contains("`weight` has shape [3, 2]"), "{err}");
        assert!(err.contains("`bias` is missing"), "{err}");
        assert!(err.contains("unexpected tensor `extra`"), "{err}");
    }
}
