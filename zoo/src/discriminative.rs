//! Discriminative trees (Model-J's SupViT-like subsets): a base classifier pretrained on every
//! class, then fine-tunes on random class subsets, each written with Model-J's metadata.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use burn::module::AutodiffModule;
use probex_weights::dataset::Split;

use crate::augment::Augment;
use crate::classes;
use crate::draw::{TAG_BASE, TAG_EVAL, TAG_MODEL, TAG_SPLIT, assign_splits, pick};
use crate::emoji::{ImageClass, ImageSet};
use crate::layout::{self, py_bool, py_float, rel, round4, safetensors_bytes, write_file};
use crate::nets::{Arch, Mlp, StateDict, Vit};
use crate::train::{self, Ad, Batcher, Classifier, Cpu, Item, OptimSpec, Scheduler};
use crate::workers::{elapsed, run_parallel, single_threaded, thread_cpu_seconds};
use crate::{
    BaseRecord, HeadInit, ModelRecord, Phase, Progress, ProgressFn, Timings, TreeReport, ZooConfig,
    ZooError,
};
use probex_weights::rng::StreamRng;

/// Builds every tree of a discriminative config: per base, pretrain it, write it, fine-tune
/// `config.models` models from it in parallel.
pub(crate) fn build_discriminative(
    config: &ZooConfig,
    set: ImageSet,
    out_dir: &Path,
    threads: usize,
    progress: &ProgressFn<'_>,
) -> Result<TreeReport, ZooError> {
    let arch = config.arch();
    let classes = set.classes;
    let n_classes = classes.len();
    let build = Discriminative {
        config,
        arch: &arch,
        classes: &classes,
        data: Batcher::new(&classes, &arch, config.image_size),
        k: config
            .finetune
            .classes_per_model
            .unwrap_or(n_classes / 2)
            .clamp(1, n_classes),
        out_dir,
    };
    let mut report = TreeReport {
        classes: classes.iter().map(|c| c.name.clone()).collect(),
        missing_classes: set.missing,
        holdout_classes: Vec::new(),
        bases: Vec::new(),
        models: Vec::new(),
        timings: Timings::default(),
    };
    let mut per_model_total = 0.0;
    for (b, tree) in config.tree_names().iter().enumerate() {
        let base = build.pretrain(b, tree, progress)?;
        report.bases.push(base.record.clone());
        report.timings.base_s.push(base.seconds);
        let t1 = Instant::now();
        for (record, secs) in build.finetune_all(&base, b, tree, threads, progress)? {
            per_model_total += secs;
            report.models.push(record);
        }
        report
            .timings
            .models_wall_s
            .push(t1.elapsed().as_secs_f64());
    }
    report.timings.per_model_s = per_model_total / report.models.len().max(1) as f64;
    Ok(report)
}

/// What every model of one discriminative build shares.
struct Discriminative<'a> {
    config: &'a ZooConfig,
    arch: &'a Arch,
    classes: &'a [ImageClass],
    data: Batcher<'a>,
    /// Classes per fine-tune.
    k: usize,
    out_dir: &'a Path,
}

/// A pretrained base: its weights, its `base_model` name, its record and its training time.
struct Base {
    state: StateDict,
    name: String,
    record: BaseRecord,
    seconds: f64,
}

impl Discriminative<'_> {
    /// Pretrains base `b` of tree `tree` on every class with every augmentation, measures its
    /// accuracy and writes it (when `write_base`).
    fn pretrain(&self, b: usize, tree: &str, progress: &ProgressFn<'_>) -> Result<Base, ZooError> {
        let (config, arch, size) = (self.config, self.arch, self.config.image_size);
        let n_classes = self.classes.len();
        let t0 = Instant::now();
        progress(&Progress {
            tree,
            phase: Phase::Base,
            done: 0,
            total: 1,
        })?;
        let mut rng = StreamRng::derive(config.seed, &[TAG_BASE, b as u64]);
        let init = arch.init(size, n_classes, &mut rng);
        let p = &config.pretrain;
        let batches = self.pretrain_batches(&mut rng);
        let eval: Vec<Item> = (0..n_classes)
            .flat_map(|c| {
                (0..4).map(move |i| Item {
                    class: c,
                    style: i,
                    label: c as u32,
                })
            })
            .collect();
        let opt = OptimSpec {
            lr: p.learning_rate,
            scheduler: Scheduler::Cosine,
            weight_decay: p.weight_decay,
        };
        let mut eval_rng = StreamRng::derive(config.seed, &[TAG_EVAL, b as u64]);
        let (state, accuracy, seconds) = single_threaded(|| -> Result<_, ZooError> {
            let cpu = thread_cpu_seconds();
            let (base, _) = fit(
                arch,
                size,
                n_classes,
                &init,
                &batches,
                &self.data,
                &Augment::ALL,
                opt,
                &mut rng,
            )?;
            let acc = eval_accuracy(
                arch,
                size,
                n_classes,
                &base,
                &eval,
                &self.data,
                &Augment::ALL,
                &mut eval_rng,
            )?;
            Ok((base, acc, elapsed(t0, cpu)))
        })??;
        let name = format!("probex-zoo/{tree}-base");
        let path = self.write_base(tree, &name, &state)?;
        Ok(Base {
            record: BaseRecord {
                tree: tree.into(),
                base_model: name.clone(),
                path,
                score: accuracy,
            },
            state,
            name,
            seconds,
        })
    }

    /// The pretraining batches: `steps` batches of random classes in random styles.
    fn pretrain_batches(&self, rng: &mut StreamRng) -> Vec<Vec<Item>> {
        let p = &self.config.pretrain;
        let n_classes = self.classes.len();
        (0..p.steps)
            .map(|_| {
                (0..p.batch_size)
                    .map(|_| {
                        let class = rng.below(n_classes);
                        Item {
                            class,
                            style: rng.below(self.classes[class].images.len()),
                            label: class as u32,
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// Writes a base under `bases/{tree}/model.safetensors` when the config asks for it;
    /// returns its path relative to the output folder.
    fn write_base(
        &self,
        tree: &str,
        base_model: &str,
        state: &StateDict,
    ) -> Result<Option<String>, ZooError> {
        if !self.config.write_base {
            return Ok(None);
        }
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        meta.insert("architecture".into(), self.arch.name().into());
        meta.insert("base_model".into(), base_model.into());
        let names: Vec<&str> = self.classes.iter().map(|c| c.name.as_str()).collect();
        meta.insert(
            "dataset_chosen_targets".into(),
            classes::python_list(&names),
        );
        meta.insert("image_size".into(), self.config.image_size.to_string());
        meta.insert(
            "max_train_steps".into(),
            self.config.pretrain.steps.to_string(),
        );
        let path = self
            .out_dir
            .join("bases")
            .join(tree)
            .join("model.safetensors");
        write_file(&path, &safetensors_bytes(state, &meta))?;
        Ok(Some(rel(self.out_dir, &path)))
    }

    /// Fine-tunes the tree's models from `base` in parallel, each single-threaded from its own
    /// stream; their records and CPU seconds, in index order.
    fn finetune_all(
        &self,
        base: &Base,
        b: usize,
        tree: &str,
        threads: usize,
        progress: &ProgressFn<'_>,
    ) -> Result<Vec<(ModelRecord, f64)>, ZooError> {
        let config = self.config;
        let splits = assign_splits(
            config.models,
            &config.splits,
            &mut StreamRng::derive(config.seed, &[TAG_SPLIT, b as u64]),
        );
        let done = std::sync::atomic::AtomicUsize::new(0);
        run_parallel(threads, config.models, &|idx| {
            let t = Instant::now();
            let cpu = thread_cpu_seconds();
            let record = self.finetune_one(base, tree, b, idx, splits[idx])?;
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            progress(&Progress {
                tree,
                phase: Phase::Models,
                done: n,
                total: config.models,
            })?;
            Ok((record, elapsed(t, cpu)))
        })
    }

    /// Fine-tunes model `idx` of tree `tree` (base `b`) and writes it.
    fn finetune_one(
        &self,
        base: &Base,
        tree: &str,
        b: usize,
        idx: usize,
        split: Split,
    ) -> Result<ModelRecord, ZooError> {
        let (config, arch, classes, data) = (self.config, self.arch, self.classes, &self.data);
        let (k, out_dir, base_model) = (self.k, self.out_dir, base.name.as_str());
        let f = &config.finetune;
        let mut rng = StreamRng::derive(config.seed, &[TAG_MODEL, b as u64, idx as u64]);
        // The class subset, in the random order it was drawn (Model-J's lists are unsorted too).
        let mut order: Vec<usize> = (0..classes.len()).collect();
        rng.shuffle(&mut order);
        let chosen = &order[..k];
        let lr = pick(&mut rng, &f.learning_rates)?;
        let scheduler = pick(&mut rng, &f.lr_schedulers)?;
        let epochs = pick(&mut rng, &f.epochs)?;
        let batch = pick(&mut rng, &f.batch_sizes)?;
        let weight_decay = pick(&mut rng, &f.weight_decays)?;
        let p = f.augment_probability;
        let aug = Augment {
            random_crop: rng.chance(p),
            random_flip: rng.chance(p),
            random_brightness: rng.chance(p),
            random_background: rng.chance(p),
            random_noise: rng.chance(p),
        };
        let mut items = Vec::with_capacity(k * f.samples_per_class);
        for (label, &c) in chosen.iter().enumerate() {
            for s in 0..f.samples_per_class {
                items.push(Item {
                    class: c,
                    style: s,
                    label: label as u32,
                });
            }
        }
        let mut batches = Vec::new();
        for _ in 0..epochs {
            rng.shuffle(&mut items);
            batches.extend(items.chunks(batch).map(|c| c.to_vec()));
        }
        let eval: Vec<Item> = chosen
            .iter()
            .enumerate()
            .flat_map(|(label, &c)| {
                (0..f.eval_samples_per_class).map(move |s| Item {
                    class: c,
                    style: s,
                    label: label as u32,
                })
            })
            .collect();
        let mut state = base.state.clone();
        match f.head_init {
            HeadInit::Random => arch.init_head(&mut state, k, &mut rng),
            HeadInit::Base => select_head_rows(&mut state, chosen)?,
        }
        let opt = OptimSpec {
            lr,
            scheduler,
            weight_decay,
        };
        let (tuned, loss) = fit(
            arch,
            config.image_size,
            k,
            &state,
            &batches,
            data,
            &aug,
            opt,
            &mut rng,
        )?;
        // Accuracy on fresh examples of the chosen classes, from a separate stream.
        let mut eval_rng = StreamRng::derive(config.seed, &[TAG_EVAL, b as u64, idx as u64]);
        let acc = eval_accuracy(
            arch,
            config.image_size,
            k,
            &tuned,
            &eval,
            data,
            &aug,
            &mut eval_rng,
        )?;

        let names: Vec<&str> = chosen.iter().map(|&c| classes[c].name.as_str()).collect();
        let mut meta = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            meta.insert(k.to_string(), v);
        };
        put("format", "pt".into());
        put("model_idx", idx.to_string());
        put("seed", idx.to_string());
        put("split", split.as_str().into());
        put("subset", tree.into());
        put("base_model", base_model.into());
        put("architecture", arch.name().into());
        put("dataset", "emoji-cifar100".into());
        put("dataset_chosen_targets", classes::python_list(&names));
        put("num_classes", k.to_string());
        put("learning_rate", py_float(lr));
        put("lr_scheduler", scheduler.name().into());
        put("epochs", epochs.to_string());
        put("max_train_steps", batches.len().to_string());
        put("batch_size", batch.to_string());
        put("weight_decay", py_float(weight_decay));
        for (key, on) in aug.flags() {
            put(key, py_bool(on).into());
        }
        put("image_size", config.image_size.to_string());
        put("train_loss", py_float(round4(loss)));
        put("eval_accuracy", py_float(round4(acc)));
        let weights = safetensors_bytes(&tuned, &meta);
        let config_json = hf_config(arch, config.image_size, &names);
        let path = layout::write_model_repo(
            out_dir,
            config.layout,
            tree,
            idx,
            split.as_str(),
            &weights,
            &config_json,
        )?;
        Ok(ModelRecord {
            tree: tree.into(),
            model_idx: idx,
            split,
            path: rel(out_dir, &path),
            metadata: meta,
        })
    }
}

/// Trains `state` on `batches`; returns the new state and the final training loss.
#[allow(clippy::too_many_arguments)]
fn fit(
    arch: &Arch,
    size: usize,
    classes: usize,
    state: &StateDict,
    batches: &[Vec<Item>],
    data: &Batcher<'_>,
    aug: &Augment,
    opt: OptimSpec,
    rng: &mut StreamRng,
) -> Result<(StateDict, f32), ZooError> {
    fn run<M>(
        model: M,
        batches: &[Vec<Item>],
        data: &Batcher<'_>,
        aug: &Augment,
        opt: OptimSpec,
        rng: &mut StreamRng,
    ) -> Result<(StateDict, f32), ZooError>
    where
        M: AutodiffModule<Ad> + Classifier<Ad>,
        M::InnerModule: Classifier<Cpu>,
    {
        let (model, loss) = train::train_classifier(model, batches, data, aug, opt, rng);
        Ok((model.valid().state_dict()?, loss))
    }
    let device = Default::default();
    match arch {
        Arch::Mlp(c) => {
            let m = Mlp::<Ad>::load(c, size, classes, state, &device)?;
            run(m, batches, data, aug, opt, rng)
        }
        Arch::Vit(c) => {
            let m = Vit::<Ad>::load(c, size, classes, state, &device)?;
            run(m, batches, data, aug, opt, rng)
        }
    }
}

/// Keeps the rows of `classifier.weight` / `classifier.bias` of the `chosen` classes, in order.
fn select_head_rows(state: &mut StateDict, chosen: &[usize]) -> Result<(), ZooError> {
    for name in ["classifier.weight", "classifier.bias"] {
        let t = state
            .get_mut(name)
            .ok_or_else(|| ZooError::Internal(format!("base has no `{name}`")))?;
        let rows = t.shape.first().copied().unwrap_or(0);
        let width = t.data.len() / rows.max(1);
        let mut data = Vec::with_capacity(chosen.len() * width);
        for &c in chosen {
            if c >= rows {
                return Err(ZooError::Internal(format!(
                    "class {c} beyond `{name}` rows"
                )));
            }
            data.extend_from_slice(&t.data[c * width..(c + 1) * width]);
        }
        t.data = data;
        t.shape[0] = chosen.len();
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn eval_accuracy(
    arch: &Arch,
    size: usize,
    classes: usize,
    state: &StateDict,
    eval: &[Item],
    data: &Batcher<'_>,
    aug: &Augment,
    rng: &mut StreamRng,
) -> Result<f32, ZooError> {
    let device = Default::default();
    match arch {
        Arch::Mlp(c) => {
            let m = Mlp::<Cpu>::load(c, size, classes, state, &device)?;
            train::accuracy(&m, eval, data, aug, rng)
        }
        Arch::Vit(c) => {
            let m = Vit::<Cpu>::load(c, size, classes, state, &device)?;
            train::accuracy(&m, eval, data, aug, rng)
        }
    }
}

/// A `config.json` like the one `save_pretrained` writes next to the weights.
fn hf_config(arch: &Arch, size: usize, labels: &[&str]) -> Vec<u8> {
    let id2label: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), serde_json::Value::String((*l).into())))
        .collect();
    let label2id: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| ((*l).to_string(), serde_json::Value::from(i)))
        .collect();
    let mut v = serde_json::json!({
        "id2label": id2label,
        "label2id": label2id,
        "image_size": size,
        "num_channels": 3,
        "problem_type": "single_label_classification",
    });
    if let Some(obj) = v.as_object_mut() {
        match arch {
            Arch::Mlp(c) => {
                obj.insert(
                    "architectures".into(),
                    serde_json::json!(["MlpForImageClassification"]),
                );
                obj.insert("model_type".into(), "probex-zoo-mlp".into());
                obj.insert("hidden_sizes".into(), serde_json::json!(c.hidden));
            }
            Arch::Vit(c) => {
                obj.insert(
                    "architectures".into(),
                    serde_json::json!(["ViTForImageClassification"]),
                );
                obj.insert("model_type".into(), "vit".into());
                obj.insert("patch_size".into(), c.patch_size.into());
                obj.insert("hidden_size".into(), c.hidden_size.into());
                obj.insert("num_hidden_layers".into(), c.layers.into());
                obj.insert("num_attention_heads".into(), c.heads.into());
                obj.insert("intermediate_size".into(), c.intermediate_size.into());
                obj.insert("hidden_act".into(), "gelu".into());
                obj.insert("layer_norm_eps".into(), serde_json::json!(1e-12));
                obj.insert("qkv_bias".into(), true.into());
            }
        }
    }
    let mut s = serde_json::to_string_pretty(&v)
        .unwrap_or_default()
        .into_bytes();
    s.push(b'\n');
    s
}
