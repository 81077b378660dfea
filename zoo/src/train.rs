//! Training loops: classifier pretraining and fine-tuning (AdamW, cross-entropy, Hugging Face
//! learning-rate schedules) and LoRA fine-tuning of the denoiser (Adam, MSE).
//!
//! Everything runs on Burn's `flex` CPU backend in the calling thread; randomness comes only
//! from the [`StreamRng`] passed in, so a run is reproducible bit for bit.

use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor, TensorData, activation, backend::Backend};
use serde::{Deserialize, Serialize};

use super::ZooError;
use super::augment::{Augment, Prepared, prepare, render};
use super::emoji::{ImageClass, SHEET_EMOJI_SIZE};
use super::nets::{Arch, Denoiser, Lora, Mlp, StateDict, StateError, Vit};
use probex_weights::rng::StreamRng;

/// The plain CPU backend (inference, weight export).
pub type Cpu = Flex;
/// The CPU backend with autodiff (training).
pub type Ad = Autodiff<Flex>;

/// Learning-rate schedules, named as `transformers` names them (`lr_scheduler_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    /// Fixed rate.
    Constant,
    /// Linear warm-up over the first 10% of steps, then fixed.
    ConstantWithWarmup,
    /// Linear decay to zero.
    Linear,
    /// Half-cosine decay to zero.
    Cosine,
}

impl Scheduler {
    /// The metadata value (`constant_with_warmup`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Scheduler::Constant => "constant",
            Scheduler::ConstantWithWarmup => "constant_with_warmup",
            Scheduler::Linear => "linear",
            Scheduler::Cosine => "cosine",
        }
    }

    /// The rate at `step` (0-based) of `total`.
    pub fn lr(self, base: f64, step: usize, total: usize) -> f64 {
        let total = total.max(1) as f64;
        let s = step as f64;
        match self {
            Scheduler::Constant => base,
            Scheduler::ConstantWithWarmup => {
                let warmup = (total / 10.0).ceil().max(1.0);
                base * ((s + 1.0) / warmup).min(1.0)
            }
            Scheduler::Linear => base * (1.0 - s / total),
            Scheduler::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * s / total).cos()),
        }
    }
}

/// A classifier the zoo can train and export.
pub trait Classifier<B: Backend>: Module<B> {
    /// Logits `[n, classes]` for input vectors `[n, features]`.
    fn logits(&self, x: Tensor<B, 2>) -> Tensor<B, 2>;
    /// The weights under Hugging Face names and layouts.
    fn state_dict(&self) -> Result<StateDict, StateError>;
}

impl<B: Backend> Classifier<B> for Mlp<B> {
    fn logits(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.forward(x)
    }
    fn state_dict(&self) -> Result<StateDict, StateError> {
        self.state()
    }
}

impl<B: Backend> Classifier<B> for Vit<B> {
    fn logits(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.forward(x)
    }
    fn state_dict(&self) -> Result<StateDict, StateError> {
        self.state()
    }
}

/// One training example: class (index into the dataset's classes), style (index into that
/// class's images) and the target label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Item {
    /// Index into the classes.
    pub class: usize,
    /// Index into the class's images.
    pub style: usize,
    /// Target.
    pub label: u32,
}

/// Renders items into network inputs.
pub struct Batcher<'a> {
    /// Per class, its images prepared at `size`.
    pub images: Vec<Vec<Prepared>>,
    /// Network input layout.
    pub arch: &'a Arch,
    /// Side of the rendered image.
    pub size: usize,
}

/// Every image of every class, prepared for rendering at side `size`.
pub fn prepare_all(classes: &[ImageClass], size: usize) -> Vec<Vec<Prepared>> {
    classes
        .iter()
        .map(|c| {
            c.images
                .iter()
                .map(|(_, rgba)| prepare(rgba, SHEET_EMOJI_SIZE, size))
                .collect()
        })
        .collect()
}

impl<'a> Batcher<'a> {
    /// A batcher over `classes` rendered at `size` for `arch`.
    pub fn new(classes: &[ImageClass], arch: &'a Arch, size: usize) -> Batcher<'a> {
        Batcher {
            images: prepare_all(classes, size),
            arch,
            size,
        }
    }

    /// Features per input.
    pub fn features(&self) -> usize {
        self.arch.input_len(self.size)
    }

    /// Inputs `[n * features]` and labels for `items`, augmented with `aug`.
    pub fn batch(
        &self,
        items: &[Item],
        aug: &Augment,
        rng: &mut StreamRng,
    ) -> (Vec<f32>, Vec<i32>) {
        let f = self.features();
        let mut x = vec![0.0f32; items.len() * f];
        let mut chw = vec![0.0f32; f];
        let mut y = Vec::with_capacity(items.len());
        for (i, it) in items.iter().enumerate() {
            let imgs = &self.images[it.class];
            render(&imgs[it.style % imgs.len()], aug, rng, &mut chw);
            self.arch
                .layout_input(&chw, self.size, &mut x[i * f..(i + 1) * f]);
            y.push(it.label as i32);
        }
        (x, y)
    }
}

fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let logp = activation::log_softmax(logits, 1);
    logp.gather(1, targets.unsqueeze_dim(1)).mean().neg()
}

/// Optimiser settings of one training run.
#[derive(Clone, Copy, Debug)]
pub struct OptimSpec {
    /// Peak learning rate.
    pub lr: f64,
    /// Schedule.
    pub scheduler: Scheduler,
    /// Decoupled weight decay (AdamW, as the `transformers` Trainer).
    pub weight_decay: f64,
}

/// Trains a classifier on the given batches (one optimiser step each) and returns it with the
/// mean loss of the last 10% of steps.
pub fn train_classifier<M>(
    mut model: M,
    batches: &[Vec<Item>],
    data: &Batcher<'_>,
    aug: &Augment,
    opt: OptimSpec,
    rng: &mut StreamRng,
) -> (M, f32)
where
    M: AutodiffModule<Ad> + Classifier<Ad>,
{
    let device = Default::default();
    let mut optim = AdamWConfig::new()
        .with_weight_decay(opt.weight_decay as f32)
        .with_epsilon(1e-8)
        .init::<Ad, M>();
    let total = batches.len();
    let tail_from = total - total.div_ceil(10);
    let mut tail = Vec::new();
    for (step, items) in batches.iter().enumerate() {
        let (x, y) = data.batch(items, aug, rng);
        let n = items.len();
        let xt = Tensor::<Ad, 2>::from_data(TensorData::new(x, [n, data.features()]), &device);
        let yt = Tensor::<Ad, 1, Int>::from_data(TensorData::new(y, [n]), &device);
        let loss = cross_entropy(model.logits(xt), yt);
        if step >= tail_from {
            tail.push(loss.clone().into_scalar());
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(opt.scheduler.lr(opt.lr, step, total), model, grads);
    }
    let mean = tail.iter().sum::<f32>() / tail.len().max(1) as f32;
    (model, mean)
}

/// Top-1 accuracy of `model` on `items` rendered with `aug`.
pub fn accuracy<M: Classifier<Cpu>>(
    model: &M,
    items: &[Item],
    data: &Batcher<'_>,
    aug: &Augment,
    rng: &mut StreamRng,
) -> Result<f32, ZooError> {
    let device = Default::default();
    let mut right = 0usize;
    for chunk in items.chunks(256) {
        let (x, y) = data.batch(chunk, aug, rng);
        let xt = Tensor::<Cpu, 2>::from_data(
            TensorData::new(x, [chunk.len(), data.features()]),
            &device,
        );
        let pred = model
            .logits(xt)
            .argmax(1)
            .into_data()
            .convert::<i32>()
            .to_vec::<i32>()
            .map_err(|e| ZooError::Internal(format!("reading predictions: {e:?}")))?;
        right += pred.iter().zip(&y).filter(|(p, t)| p == t).count();
    }
    Ok(right as f32 / items.len().max(1) as f32)
}

/// Trains the denoiser (all weights) to recover images from noisy copies: `steps` steps of
/// `batch` random examples of every class, all augmentations on, cosine schedule. A
/// text-conditioned denoiser gets `text`, one prompt vector per class, each example its own.
#[allow(clippy::too_many_arguments)]
pub fn train_denoiser(
    mut model: Denoiser<Ad>,
    images: &[Vec<Prepared>],
    text: Option<&[Vec<f32>]>,
    size: usize,
    steps: usize,
    batch: usize,
    lr: f64,
    rng: &mut StreamRng,
) -> (Denoiser<Ad>, f32) {
    let device = Default::default();
    let f = 3 * size * size;
    let mut optim = AdamWConfig::new()
        .with_weight_decay(0.0)
        .with_epsilon(1e-8)
        .init::<Ad, Denoiser<Ad>>();
    let mut chw = vec![0.0f32; f];
    let mut last = 0.0;
    for step in 0..steps {
        let mut clean = vec![0.0f32; batch * f];
        let mut prompts = Vec::new();
        for i in 0..batch {
            let k = rng.below(images.len());
            let c = &images[k];
            render(&c[rng.below(c.len())], &Augment::ALL, rng, &mut chw);
            clean[i * f..(i + 1) * f].copy_from_slice(&chw);
            if let Some(t) = text {
                prompts.extend_from_slice(&t[k]);
            }
        }
        let noisy = add_noise(&clean, f, rng);
        let xt = Tensor::<Ad, 2>::from_data(TensorData::new(noisy, [batch, f]), &device);
        let target = Tensor::<Ad, 2>::from_data(TensorData::new(clean, [batch, f]), &device);
        let text = text_batch(prompts, batch, &device);
        let loss = (model.forward(xt, text) - target).powi_scalar(2).mean();
        last = loss.clone().into_scalar();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let rate = Scheduler::Cosine.lr(lr, step, steps);
        model = optim.step(rate, model, grads);
    }
    (model, last)
}

/// The `[batch, text_dim]` tensor of concatenated prompt vectors; none when there are none.
fn text_batch<B: Backend>(
    values: Vec<f32>,
    batch: usize,
    device: &B::Device,
) -> Option<Tensor<B, 2>> {
    if values.is_empty() {
        return None;
    }
    let dim = values.len() / batch;
    Some(Tensor::from_data(
        TensorData::new(values, [batch, dim]),
        device,
    ))
}

/// Noisy copies of `clean` rows: each row gets Gaussian noise of a level drawn in [0.1, 0.8],
/// as a diffusion model sees many noise levels.
fn add_noise(clean: &[f32], f: usize, rng: &mut StreamRng) -> Vec<f32> {
    let mut out = clean.to_vec();
    for row in out.chunks_mut(f) {
        let sigma = rng.range(0.1, 0.8);
        for v in row.iter_mut() {
            *v += sigma * rng.normal();
        }
    }
    out
}

/// Fine-tunes LoRA adapters on `samples` (pre-rendered images of one class, `[n * f]`) for
/// `steps` steps of `batch` examples; the base stays frozen. A text-conditioned tree passes
/// the LoRA's prompt vector as `text`, as a DreamBooth LoRA is trained on its instance prompt.
#[allow(clippy::too_many_arguments)]
pub fn train_lora(
    base: &Denoiser<Ad>,
    mut lora: Lora<Ad>,
    samples: &[f32],
    text: Option<&[f32]>,
    f: usize,
    steps: usize,
    batch: usize,
    lr: f64,
    rng: &mut StreamRng,
) -> (Lora<Ad>, f32) {
    let device = Default::default();
    let n = samples.len() / f.max(1);
    let mut optim = AdamWConfig::new()
        .with_weight_decay(0.0)
        .with_epsilon(1e-8)
        .init::<Ad, Lora<Ad>>();
    let mut last = 0.0;
    for _ in 0..steps {
        let mut clean = vec![0.0f32; batch * f];
        for i in 0..batch {
            let j = rng.below(n);
            clean[i * f..(i + 1) * f].copy_from_slice(&samples[j * f..(j + 1) * f]);
        }
        let noisy = add_noise(&clean, f, rng);
        let xt = Tensor::<Ad, 2>::from_data(TensorData::new(noisy, [batch, f]), &device);
        let target = Tensor::<Ad, 2>::from_data(TensorData::new(clean, [batch, f]), &device);
        let prompts = text.map_or_else(Vec::new, |t| t.repeat(batch));
        let text = text_batch(prompts, batch, &device);
        let loss = (lora.forward(base, xt, text) - target)
            .powi_scalar(2)
            .mean();
        last = loss.clone().into_scalar();
        let grads = GradientsParams::from_grads(loss.backward(), &lora);
        lora = optim.step(lr, lora, grads);
    }
    (lora, last)
}
