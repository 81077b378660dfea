//! LoRA trees (SD_200-like): denoising bases trained on every class, then rank-r LoRAs, each
//! fine-tuned on one class (and, with `lora.text`, on that class's prompt), seen classes split
//! train/val/test and held-out ones val_holdout/test_holdout.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use probex_weights::dataset::Split;

use crate::augment::{self, Augment, Prepared};
use crate::draw::{TAG_BASE, TAG_CLASSES, TAG_HOLDOUT, TAG_MODEL, TAG_SPLIT, assign_splits, pick};
use crate::emoji::{ImageClass, ImageSet};
use crate::layout::{LoraRepo, py_float, rel, round4, safetensors_bytes, write_file};
use crate::nets::{Denoiser, DenoiserShape, Lora, StateDict};
use crate::train::{self, Ad};
use crate::workers::{elapsed, run_parallel, single_threaded, thread_cpu_seconds};
use crate::{
    BaseRecord, LoraText, ModelRecord, Phase, Progress, ProgressFn, TextEmbedder, Timings,
    TreeReport, ZooConfig, ZooError,
};
use probex_weights::rng::StreamRng;

/// Builds a LoRA tree: picks its classes and held-out classes, trains the bases, then trains
/// the LoRAs in parallel and writes them as one repository.
pub(crate) fn build_lora(
    config: &ZooConfig,
    set: ImageSet,
    text: Option<&TextEmbedder<'_>>,
    out_dir: &Path,
    threads: usize,
    progress: &ProgressFn<'_>,
) -> Result<TreeReport, ZooError> {
    let l = &config.lora;
    let classes = choose_classes(config, set.classes);
    let (seen, holdout) = hold_out(config, classes.len());
    let mut report = TreeReport {
        classes: classes.iter().map(|c| c.name.clone()).collect(),
        missing_classes: set.missing,
        holdout_classes: holdout.iter().map(|&c| classes[c].name.clone()).collect(),
        bases: Vec::new(),
        models: Vec::new(),
        timings: Timings::default(),
    };
    let prompts = match (&l.text, text) {
        (Some(t), Some(embed)) => Some(class_prompts(t, &classes, embed)?),
        _ => None,
    };
    let width = prompts.as_ref().map_or(0, |p| p.vectors[0].len());
    let tree = Denoising {
        config,
        shape: l.denoiser.shape(config.image_size, width),
        // Bases see every class (held-out ones included, as SD saw ImageNet).
        images: train::prepare_all(&classes, config.image_size),
        classes: &classes,
        prompts: prompts.as_ref(),
        out_dir,
    };
    let bases = tree.train_bases(&mut report, progress)?;
    let jobs = lora_jobs(config, &seen, &holdout);
    let t1 = Instant::now();
    tree.train_loras(&jobs, &bases, threads, progress, &mut report)?;
    report
        .timings
        .models_wall_s
        .push(t1.elapsed().as_secs_f64());
    Ok(report)
}

/// The tree's classes: all the package gave, or a seeded subset of `max_classes` (at least 2)
/// in name order.
fn choose_classes(config: &ZooConfig, mut classes: Vec<ImageClass>) -> Vec<ImageClass> {
    if let Some(max) = config.lora.max_classes
        && max < classes.len()
    {
        let mut rng = StreamRng::derive(config.seed, &[TAG_CLASSES]);
        rng.shuffle(&mut classes);
        classes.truncate(max.max(2));
        classes.sort_by(|a, b| a.name.cmp(&b.name));
    }
    classes
}

/// Splits class indices `0..n_classes` into seen and held-out ones (a seeded draw of
/// `holdout_fraction` of them, at least one class seen); both sorted.
fn hold_out(config: &ZooConfig, n_classes: usize) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..n_classes).collect();
    StreamRng::derive(config.seed, &[TAG_HOLDOUT]).shuffle(&mut order);
    let n_holdout =
        ((n_classes as f64 * config.lora.holdout_fraction).round() as usize).min(n_classes - 1);
    let mut holdout: Vec<usize> = order[..n_holdout].to_vec();
    holdout.sort_unstable();
    let seen: Vec<usize> = (0..n_classes).filter(|c| !holdout.contains(c)).collect();
    (seen, holdout)
}

/// The LoRA list, `(class, split)` per LoRA: seen classes split train/val/test, held-out ones
/// val_holdout/test_holdout; indices run through the splits in Model-J's order.
fn lora_jobs(config: &ZooConfig, seen: &[usize], holdout: &[usize]) -> Vec<(usize, Split)> {
    let l = &config.lora;
    let mut rng = StreamRng::derive(config.seed, &[TAG_SPLIT]);
    // Stratified by class: every seen class has training LoRAs (a seen class with none would
    // be neither trainable nor a held-out class), in the split fractions as near as counts
    // allow.
    let mut seen_jobs: Vec<(usize, Split)> = Vec::new();
    for &c in seen {
        let mut splits = assign_splits(l.loras_per_class, &config.splits, &mut rng);
        if !splits.contains(&Split::Train) {
            splits[0] = Split::Train;
        }
        seen_jobs.extend(splits.into_iter().map(|split| (c, split)));
    }
    let mut hold_jobs: Vec<(usize, usize)> = holdout
        .iter()
        .flat_map(|&c| (0..l.loras_per_class).map(move |j| (c, j)))
        .collect();
    rng.shuffle(&mut hold_jobs);
    let n_val_hold = (hold_jobs.len() as f64 * l.holdout_val_fraction).round() as usize;
    let mut jobs: Vec<(usize, Split)> = Vec::new();
    for split in [Split::Train, Split::Val, Split::Test] {
        jobs.extend(seen_jobs.iter().filter(|j| j.1 == split));
    }
    for (i, &(c, _)) in hold_jobs.iter().enumerate() {
        if i < n_val_hold {
            jobs.push((c, Split::ValHoldout));
        }
    }
    for (i, &(c, _)) in hold_jobs.iter().enumerate() {
        if i >= n_val_hold {
            jobs.push((c, Split::TestHoldout));
        }
    }
    jobs
}

/// What the bases and LoRAs of one LoRA tree share.
struct Denoising<'a> {
    config: &'a ZooConfig,
    shape: DenoiserShape,
    /// Per class, its images prepared at the tree's size.
    images: Vec<Vec<Prepared>>,
    classes: &'a [ImageClass],
    prompts: Option<&'a ClassPrompts>,
    out_dir: &'a Path,
}

impl Denoising<'_> {
    /// Trains the `bases` denoisers on every class, writes them (when `write_base`) and records
    /// them in `report`; returns their weights.
    fn train_bases(
        &self,
        report: &mut TreeReport,
        progress: &ProgressFn<'_>,
    ) -> Result<Vec<StateDict>, ZooError> {
        let (config, l) = (self.config, &self.config.lora);
        let tree = config.name.as_str();
        let mut bases: Vec<StateDict> = Vec::new();
        for b in 0..config.bases {
            let t0 = Instant::now();
            progress(&Progress {
                tree,
                phase: Phase::Base,
                done: b,
                total: config.bases,
            })?;
            let mut rng = StreamRng::derive(config.seed, &[TAG_BASE, b as u64]);
            let init = self.shape.init(&mut rng);
            let (state, loss, base_s) = single_threaded(|| -> Result<_, ZooError> {
                let cpu = thread_cpu_seconds();
                let device = Default::default();
                let model = Denoiser::<Ad>::load(&self.shape, &init, &device)?;
                let (model, loss) = train::train_denoiser(
                    model,
                    &self.images,
                    self.prompts.map(|p| p.vectors.as_slice()),
                    config.image_size,
                    l.base_steps,
                    l.base_batch_size,
                    l.base_learning_rate,
                    &mut rng,
                );
                let state = model.valid().state(&self.shape)?;
                Ok((state, loss, elapsed(t0, cpu)))
            })??;
            let base_model = format!("probex-zoo/{tree}-base-{b}");
            report.bases.push(BaseRecord {
                tree: tree.into(),
                path: self.write_base(b, &base_model, &state)?,
                base_model,
                score: loss,
            });
            bases.push(state);
            report.timings.base_s.push(base_s);
        }
        Ok(bases)
    }

    /// Writes base `b` under `bases/{tree}-base-{b}/model.safetensors` when the config asks for
    /// it; returns its path relative to the output folder.
    fn write_base(
        &self,
        b: usize,
        base_model: &str,
        state: &StateDict,
    ) -> Result<Option<String>, ZooError> {
        let (config, l) = (self.config, &self.config.lora);
        if !config.write_base {
            return Ok(None);
        }
        let tree = config.name.as_str();
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        meta.insert("base_model".into(), base_model.into());
        meta.insert("max_train_steps".into(), l.base_steps.to_string());
        meta.insert("image_size".into(), config.image_size.to_string());
        if let Some(t) = &l.text {
            meta.insert("text_encoder".into(), t.encoder.as_str().into());
        }
        let p = self
            .out_dir
            .join("bases")
            .join(format!("{tree}-base-{b}"))
            .join("model.safetensors");
        write_file(&p, &safetensors_bytes(state, &meta))?;
        Ok(Some(rel(self.out_dir, &p)))
    }

    /// Trains the LoRAs of `jobs` in parallel, writes them as one repository and records them
    /// (with their mean CPU time) in `report`.
    fn train_loras(
        &self,
        jobs: &[(usize, Split)],
        bases: &[StateDict],
        threads: usize,
        progress: &ProgressFn<'_>,
        report: &mut TreeReport,
    ) -> Result<(), ZooError> {
        let config = self.config;
        let tree = config.name.as_str();
        let done = std::sync::atomic::AtomicUsize::new(0);
        let total = jobs.len();
        let results = run_parallel(threads, total, &|idx| {
            let (c, split) = jobs[idx];
            let t = Instant::now();
            let cpu = thread_cpu_seconds();
            let job = LoraJob {
                class: &self.classes[c],
                images: &self.images[c],
                prompt: self
                    .prompts
                    .map(|p| (p.texts[c].as_str(), p.vectors[c].as_slice())),
                idx,
                split,
            };
            let out = lora_one(config, &self.shape, &job, bases, tree)?;
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            progress(&Progress {
                tree,
                phase: Phase::Models,
                done: n,
                total,
            })?;
            Ok((out.0, out.1, out.2, elapsed(t, cpu)))
        })?;
        let mut repo = LoraRepo::new(self.out_dir, config.layout, tree);
        let mut records = Vec::new();
        let mut per_model_total = 0.0;
        for (rel_path, bytes, record, secs) in results {
            repo.add(rel_path, bytes);
            records.push(record);
            per_model_total += secs;
        }
        let dir = repo.finish()?;
        for mut r in records {
            r.path = rel(self.out_dir, &dir.join(&r.path));
            report.models.push(r);
        }
        report.timings.per_model_s = per_model_total / report.models.len().max(1) as f64;
        Ok(())
    }
}

/// The prompts of a text-conditioned tree, per class in class order.
struct ClassPrompts {
    texts: Vec<String>,
    vectors: Vec<Vec<f32>>,
}

/// Embeds every class's instance prompt; checks the encoder gave one finite vector of one
/// width per prompt.
fn class_prompts(
    t: &LoraText,
    classes: &[ImageClass],
    embed: &TextEmbedder<'_>,
) -> Result<ClassPrompts, ZooError> {
    let texts: Vec<String> = classes
        .iter()
        .map(|c| probex_text::prompt(&t.template, &c.name))
        .collect();
    let vectors = single_threaded(|| embed(&texts))?
        .map_err(|e| ZooError::Config(format!("lora.text: {e}")))?;
    let dim = vectors.first().map_or(0, Vec::len);
    if vectors.len() != texts.len()
        || dim == 0
        || vectors
            .iter()
            .any(|v| v.len() != dim || v.iter().any(|x| !x.is_finite()))
    {
        return Err(ZooError::Internal(format!(
            "the text encoder gave {} vectors for {} prompts, not one finite vector of one \
             width each",
            vectors.len(),
            texts.len()
        )));
    }
    Ok(ClassPrompts { texts, vectors })
}

/// One LoRA to train: its class, that class's prepared images, its prompt and vector (text-
/// conditioned trees), its index and split.
struct LoraJob<'a> {
    class: &'a ImageClass,
    images: &'a [Prepared],
    prompt: Option<(&'a str, &'a [f32])>,
    idx: usize,
    split: Split,
}

/// Trains one LoRA; returns its path inside the repository, its bytes and record (with that
/// repository-relative path).
fn lora_one(
    config: &ZooConfig,
    shape: &DenoiserShape,
    job: &LoraJob<'_>,
    bases: &[StateDict],
    tree: &str,
) -> Result<(String, Vec<u8>, ModelRecord), ZooError> {
    let LoraJob {
        class,
        images,
        prompt,
        idx,
        split,
    } = *job;
    let l = &config.lora;
    let f = 3 * shape.size * shape.size;
    let mut rng = StreamRng::derive(config.seed, &[TAG_MODEL, idx as u64]);
    let b = rng.below(bases.len());
    let steps = pick(&mut rng, &l.steps)?;
    let lr = pick(&mut rng, &l.learning_rates)?;
    let n_samples = pick(&mut rng, &l.n_training_samples)?;
    // The training images: fixed augmented renderings of the class (few, like the handful of
    // photos a LoRA is trained on).
    let aug = Augment {
        random_noise: false,
        ..Augment::ALL
    };
    let mut samples = vec![0.0f32; n_samples * f];
    for i in 0..n_samples {
        augment::render(
            &images[i % images.len()],
            &aug,
            &mut rng,
            &mut samples[i * f..(i + 1) * f],
        );
    }
    let device = Default::default();
    let base = Denoiser::<Ad>::load(shape, &bases[b], &device)?.no_grad();
    let lora = Lora::<Ad>::init(shape, l.rank, &mut rng, &device);
    let (lora, loss) = train::train_lora(
        &base,
        lora,
        &samples,
        prompt.map(|p| p.1),
        f,
        steps,
        l.batch_size,
        lr,
        &mut rng,
    );
    let state = lora.valid().state(shape)?;

    let mut meta = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        meta.insert(k.to_string(), v);
    };
    put("format", "pt".into());
    put("model_idx", idx.to_string());
    put("seed", idx.to_string());
    put("split", split.as_str().into());
    put("subset", tree.into());
    put("base_model", format!("probex-zoo/{tree}-base-{b}"));
    put("class_id", class.id.clone());
    put("class_name", class.name.clone());
    put("learning_rate", py_float(lr));
    put("max_train_steps", steps.to_string());
    put("lora_rank", l.rank.to_string());
    put("n_training_samples", n_samples.to_string());
    put("batch_size", l.batch_size.to_string());
    put("image_size", shape.size.to_string());
    if let Some((text, _)) = prompt {
        put("instance_prompt", text.into());
    }
    put("train_loss", py_float(round4(loss)));
    let rel_path = LoraRepo::rel_path(split.as_str(), idx);
    let bytes = safetensors_bytes(&state, &meta);
    Ok((
        rel_path.clone(),
        bytes,
        ModelRecord {
            tree: tree.into(),
            model_idx: idx,
            split,
            path: rel_path,
            metadata: meta,
        },
    ))
}
