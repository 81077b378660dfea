use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use super::augment::Augment;
use super::classes::{CIFAR100, cifar_index, mapping};
use super::fixture::write_fixture_package;
use super::layout::Layout;
use super::nets::{
    Arch, Denoiser, DenoiserConfig, HostTensor, Lora, Mlp, MlpConfig, StateDict, Vit, VitConfig,
};
use super::train::{Batcher, Cpu, Item};
use super::*;
use probex_weights::dataset::Split;
use probex_weights::rng::StreamRng;

/// A Python list literal of strings (`['a', 'b']`), parsed without evaluating anything.
fn parse_py_list(s: &str) -> Vec<String> {
    let inner = s
        .trim()
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .expect("a list literal");
    if inner.trim().is_empty() {
        return Vec::new();
    }
    inner
        .split(',')
        .map(|p| {
            p.trim()
                .strip_prefix('\'')
                .and_then(|r| r.strip_suffix('\''))
                .expect("a quoted name")
                .to_string()
        })
        .collect()
}

/// Reads a safetensors header the way a remote reader does: 8-byte length, then JSON.
fn header(bytes: &[u8]) -> serde_json::Map<String, serde_json::Value> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let v: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    v.as_object().unwrap().clone()
}

fn tensor(st: &safetensors::SafeTensors<'_>, name: &str) -> HostTensor {
    let t = st.tensor(name).unwrap();
    HostTensor {
        shape: t.shape().to_vec(),
        data: t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
    }
}

fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.insert(p.strip_prefix(base).unwrap().into(), fs::read(&p).unwrap());
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

fn tiny() -> ZooConfig {
    ZooConfig {
        name: "Tiny".into(),
        models: 6,
        image_size: 8,
        threads: 2,
        mlp: MlpConfig {
            hidden: vec![24, 12],
        },
        pretrain: PretrainConfig {
            steps: 60,
            batch_size: 32,
            learning_rate: 3e-3,
            weight_decay: 0.0,
        },
        finetune: FinetuneConfig {
            samples_per_class: 8,
            epochs: vec![6],
            batch_sizes: vec![16],
            learning_rates: vec![3e-3],
            ..FinetuneConfig::default()
        },
        ..ZooConfig::default()
    }
}

fn fixture(n: usize) -> (tempfile::TempDir, Vec<String>) {
    let t = tempfile::tempdir().unwrap();
    let names = write_fixture_package(t.path(), n).unwrap();
    (t, names)
}

fn quiet(_: &Progress<'_>) -> Result<(), ZooError> {
    Ok(())
}

#[test]
fn discriminative_tree_is_model_j_shaped_and_labelled_by_what_it_learned() {
    let (emoji, fixture_classes) = fixture(8);
    let out = tempfile::tempdir().unwrap();
    let config = tiny();
    let report = build_tree(&config, emoji.path(), None, out.path(), &quiet).unwrap();
    assert_eq!(report.classes, fixture_classes);
    assert_eq!(report.models.len(), 6);
    let splits: BTreeSet<_> = report.models.iter().map(|m| m.split).collect();
    assert_eq!(splits, [Split::Train, Split::Val, Split::Test].into());

    let k = 4;
    let mut expected_names = vec![
        "classifier.bias",
        "classifier.weight",
        "mlp.encoder.layer.0.dense.bias",
        "mlp.encoder.layer.0.dense.weight",
        "mlp.encoder.layer.1.dense.bias",
        "mlp.encoder.layer.1.dense.weight",
    ];
    expected_names.sort();
    let mut correct = 0usize;
    let mut shown = 0usize;
    for m in &report.models {
        // HF cache layout: refs/main names the snapshot holding the file.
        let repo = format!(
            "models--ProbeX--Model-J__Tiny__model_idx_{:04}",
            m.model_idx
        );
        let sha = fs::read_to_string(out.path().join(&repo).join("refs/main")).unwrap();
        assert_eq!(sha.len(), 40);
        assert_eq!(m.path, format!("{repo}/snapshots/{sha}/model.safetensors"));
        let bytes = fs::read(out.path().join(&m.path)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
        names.sort();
        assert_eq!(names, expected_names);
        assert_eq!(
            tensor(&st, "mlp.encoder.layer.0.dense.weight").shape,
            [24, 192]
        );
        assert_eq!(
            tensor(&st, "mlp.encoder.layer.1.dense.weight").shape,
            [12, 24]
        );
        assert_eq!(tensor(&st, "classifier.weight").shape, [k, 12]);

        // Metadata: what the index says, parseable, consistent with the training.
        let h = header(&bytes);
        let meta: BTreeMap<String, String> =
            serde_json::from_value(h["__metadata__"].clone()).unwrap();
        assert_eq!(meta, m.metadata);
        assert_eq!(meta["format"], "pt");
        assert_eq!(meta["split"], m.split.as_str());
        assert_eq!(meta["seed"], m.model_idx.to_string());
        let chosen = parse_py_list(&meta["dataset_chosen_targets"]);
        assert_eq!(chosen.len(), k);
        assert_eq!(meta["num_classes"], k.to_string());
        assert_eq!(chosen.iter().collect::<BTreeSet<_>>().len(), k);
        assert!(chosen.iter().all(|c| fixture_classes.contains(c)));
        let multi_hot: Vec<f32> = CIFAR100
            .iter()
            .map(|n| {
                if chosen.iter().any(|c| c == n) {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        assert_eq!(multi_hot.iter().sum::<f32>(), k as f32);
        assert_eq!(
            meta["max_train_steps"],
            (6 * (k * 8).div_ceil(16)).to_string()
        );
        assert_eq!(meta["epochs"], "6");
        for key in [
            "learning_rate",
            "lr_scheduler",
            "weight_decay",
            "batch_size",
            "random_crop",
            "random_flip",
            "base_model",
        ] {
            assert!(meta.contains_key(key), "{key}");
        }
        let cfg: serde_json::Value = serde_json::from_slice(
            &fs::read(out.path().join(&m.path).with_file_name("config.json")).unwrap(),
        )
        .unwrap();
        for (i, c) in chosen.iter().enumerate() {
            assert_eq!(cfg["id2label"][i.to_string()], c.as_str());
        }

        // The label list is what the model learned: its classifier, fed clean images of the
        // listed classes, answers with the listed positions (chance: 1 in k).
        let mut state = StateDict::new();
        for n in &names {
            state.insert(n.clone(), tensor(&st, n));
        }
        let net = Mlp::<Cpu>::load(&config.mlp, 8, k, &state, &Default::default()).unwrap();
        let arch = Arch::Mlp(config.mlp.clone());
        let set = emoji::load_cifar_classes(emoji.path(), &config.styles).unwrap();
        let data = Batcher::new(&set.classes, &arch, 8);
        let items: Vec<Item> = chosen
            .iter()
            .enumerate()
            .flat_map(|(label, c)| {
                let class = set.classes.iter().position(|x| &x.name == c).unwrap();
                (0..2).map(move |style| Item {
                    class,
                    style,
                    label: label as u32,
                })
            })
            .collect();
        let acc = train::accuracy(
            &net,
            &items,
            &data,
            &Augment::default(),
            &mut StreamRng::new(0),
        )
        .unwrap();
        correct += (acc * items.len() as f32).round() as usize;
        shown += items.len();
    }
    let acc = correct as f32 / shown as f32;
    assert!(acc >= 2.0 / k as f32, "accuracy {acc} is not above chance");

    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(out.path().join(INDEX_FILE)).unwrap()).unwrap();
    assert_eq!(index["models"].as_array().unwrap().len(), 6);
    assert!(out.path().join("bases/Tiny/model.safetensors").is_file());
}

#[test]
fn same_seed_gives_identical_files_whatever_the_thread_count() {
    let (emoji, _) = fixture(6);
    let config = ZooConfig {
        models: 4,
        pretrain: PretrainConfig {
            steps: 10,
            ..tiny().pretrain
        },
        finetune: FinetuneConfig {
            epochs: vec![1, 2],
            batch_sizes: vec![8, 16],
            ..tiny().finetune
        },
        ..tiny()
    };
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let c = tempfile::tempdir().unwrap();
    build_tree(
        &ZooConfig {
            threads: 1,
            ..config.clone()
        },
        emoji.path(),
        None,
        a.path(),
        &quiet,
    )
    .unwrap();
    build_tree(
        &ZooConfig {
            threads: 3,
            ..config.clone()
        },
        emoji.path(),
        None,
        b.path(),
        &quiet,
    )
    .unwrap();
    let fa = files(a.path());
    let fb = files(b.path());
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (k, v) in &fa {
        assert!(v == &fb[k], "{} differs between runs", k.display());
    }
    build_tree(
        &ZooConfig {
            seed: 1,
            ..config.clone()
        },
        emoji.path(),
        None,
        c.path(),
        &quiet,
    )
    .unwrap();
    let fc = files(c.path());
    let differs = fa
        .iter()
        .filter(|(k, _)| k.extension().is_some_and(|e| e == "safetensors"))
        .any(|(k, v)| fc.get(k) != Some(v));
    assert!(differs, "another seed must give other models");
}

#[test]
fn vit_tree_has_hugging_face_vit_names_in_the_split_layout() {
    let (emoji, _) = fixture(6);
    let out = tempfile::tempdir().unwrap();
    let config = ZooConfig {
        name: "TinyViT".into(),
        architecture: Architecture::Vit,
        layout: Layout::Splits,
        models: 3,
        vit: VitConfig {
            patch_size: 4,
            hidden_size: 16,
            layers: 2,
            heads: 2,
            intermediate_size: 32,
        },
        pretrain: PretrainConfig {
            steps: 5,
            ..tiny().pretrain
        },
        finetune: FinetuneConfig {
            epochs: vec![1],
            ..tiny().finetune
        },
        ..tiny()
    };
    let report = build_tree(&config, emoji.path(), None, out.path(), &quiet).unwrap();
    for m in &report.models {
        assert_eq!(
            m.path,
            format!(
                "{}/Model-J__TinyViT__model_idx_{:04}/model.safetensors",
                m.split, m.model_idx
            )
        );
        let bytes = fs::read(out.path().join(&m.path)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let all: BTreeSet<String> = st.names().into_iter().map(String::from).collect();
        assert_eq!(all.len(), 4 + 16 * 2 + 2 + 2);
        assert!(all.contains("vit.embeddings.cls_token"));
        assert!(all.contains("vit.layernorm.bias"));
        // Layer indexing as on real ViTs: sorted names of the weight matrices.
        let layers: Vec<&String> = all
            .iter()
            .filter(|n| n.ends_with(".weight") && st.tensor(n).unwrap().shape().len() >= 2)
            .collect();
        let expect = [
            "classifier.weight",
            "vit.embeddings.patch_embeddings.projection.weight",
            "vit.encoder.layer.0.attention.attention.key.weight",
            "vit.encoder.layer.0.attention.attention.query.weight",
            "vit.encoder.layer.0.attention.attention.value.weight",
            "vit.encoder.layer.0.attention.output.dense.weight",
            "vit.encoder.layer.0.intermediate.dense.weight",
            "vit.encoder.layer.0.output.dense.weight",
        ];
        assert_eq!(layers.len(), 2 + 6 * 2);
        assert_eq!(&layers[..8], &expect);
        let shape = |n: &str| st.tensor(n).unwrap().shape().to_vec();
        assert_eq!(
            shape("vit.embeddings.patch_embeddings.projection.weight"),
            [16, 3, 4, 4]
        );
        assert_eq!(shape("vit.embeddings.position_embeddings"), [1, 5, 16]);
        assert_eq!(
            shape("vit.encoder.layer.1.intermediate.dense.weight"),
            [32, 16]
        );
        assert_eq!(shape("vit.encoder.layer.1.output.dense.weight"), [16, 32]);
        assert_eq!(shape("classifier.weight"), [3, 16]);
    }
}

#[test]
fn lora_tree_has_seen_and_held_out_splits_and_diffusers_names() {
    let (emoji, _) = fixture(8);
    let out = tempfile::tempdir().unwrap();
    let mut config = tiny_lora("TinyLoRA");
    config.bases = 2;
    config.lora.loras_per_class = 3;
    let report = build_tree(&config, emoji.path(), None, out.path(), &quiet).unwrap();
    assert_eq!(report.models.len(), 8 * 3);
    assert_eq!(report.holdout_classes.len(), 2);
    assert_eq!(report.bases.len(), 2);
    let sha = fs::read_to_string(
        out.path()
            .join("models--ProbeX--Model-J__TinyLoRA/refs/main"),
    )
    .unwrap();
    let table: BTreeMap<&str, &str> = mapping()
        .unwrap()
        .into_iter()
        .map(|m| (m.cifar, m.unified))
        .collect();
    let order = [
        Split::Train,
        Split::Val,
        Split::Test,
        Split::ValHoldout,
        Split::TestHoldout,
    ];
    // Every seen class has LoRAs to train on (splits are stratified by class).
    let trained: BTreeSet<&str> = report
        .models
        .iter()
        .filter(|m| m.split == Split::Train)
        .map(|m| m.metadata["class_name"].as_str())
        .collect();
    for c in &report.classes {
        assert_eq!(
            trained.contains(c.as_str()),
            !report.holdout_classes.contains(c),
            "class {c}"
        );
    }
    let mut last_rank = 0;
    let mut bases_used = BTreeSet::new();
    for m in &report.models {
        let rank = order.iter().position(|s| *s == m.split).unwrap();
        assert!(rank >= last_rank, "indices run through the splits in order");
        last_rank = rank;
        assert_eq!(
            m.path,
            format!(
                "models--ProbeX--Model-J__TinyLoRA/snapshots/{sha}/{}/model_idx_{:04}/pytorch_lora_weights.safetensors",
                m.split, m.model_idx
            )
        );
        let name = &m.metadata["class_name"];
        let held = report.holdout_classes.contains(name);
        assert_eq!(
            held,
            matches!(m.split, Split::ValHoldout | Split::TestHoldout)
        );
        assert_eq!(m.metadata["class_id"], table[name.as_str()]);
        bases_used.insert(m.metadata["base_model"].clone());

        let bytes = fs::read(out.path().join(&m.path)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut downs: Vec<String> = st
            .names()
            .into_iter()
            .filter(|n| n.contains(".lora.down.weight"))
            .map(String::from)
            .collect();
        downs.sort();
        assert_eq!(
            downs,
            [
                "unet.down_blocks.0.proj.lora.down.weight",
                "unet.down_blocks.1.proj.lora.down.weight",
                "unet.up_blocks.0.proj.lora.down.weight",
                "unet.up_blocks.1.proj.lora.down.weight",
            ]
        );
        assert_eq!(st.len(), 8);
        assert_eq!(
            tensor(&st, "unet.down_blocks.0.proj.lora.down.weight").shape,
            [2, 192]
        );
        assert_eq!(
            tensor(&st, "unet.down_blocks.0.proj.lora.up.weight").shape,
            [16, 2]
        );
        assert_eq!(
            tensor(&st, "unet.up_blocks.1.proj.lora.up.weight").shape,
            [192, 2]
        );
        // Trained: B starts at zero and must have moved.
        let up = tensor(&st, "unet.up_blocks.1.proj.lora.up.weight");
        assert!(up.data.iter().any(|v| *v != 0.0));
        assert_eq!(header(&bytes)["__metadata__"]["split"], m.split.as_str());
    }
    for s in order {
        assert!(report.models.iter().any(|m| m.split == s), "no {s} LoRA");
    }
    assert_eq!(bases_used.len(), 2, "both bases are used");
}

#[test]
fn configs_are_strict_and_explain_themselves() {
    let err = serde_json::from_str::<ZooConfig>(r#"{"modles": 3}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("modles"), "{err}");
    let cfg: ZooConfig =
        serde_json::from_str(r#"{"models": 3, "finetune": {"epochs": [1]}}"#).unwrap();
    assert_eq!(cfg.models, 3);
    assert_eq!(cfg.finetune.epochs, [1]);
    assert_eq!(
        cfg.finetune.batch_sizes,
        FinetuneConfig::default().batch_sizes
    );
    for (bad, word) in [
        (
            ZooConfig {
                name: "a__b".into(),
                ..ZooConfig::default()
            },
            "name",
        ),
        (
            ZooConfig {
                styles: vec!["apple".into()],
                ..ZooConfig::default()
            },
            "licensed",
        ),
        (
            ZooConfig {
                image_size: 12,
                ..ZooConfig::default()
            },
            "image_size",
        ),
        (
            ZooConfig {
                finetune: FinetuneConfig {
                    learning_rates: vec![],
                    ..FinetuneConfig::default()
                },
                ..ZooConfig::default()
            },
            "learning_rates",
        ),
    ] {
        let (emoji, _) = fixture(3);
        let err = build_tree(&bad, emoji.path(), None, emoji.path(), &quiet)
            .unwrap_err()
            .to_string();
        assert!(err.contains(word), "{err}");
    }
    let nowhere = tempfile::tempdir().unwrap();
    let err = build_tree(&tiny(), nowhere.path(), None, nowhere.path(), &quiet)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("emoji.json") && err.contains("npm pack"),
        "{err}"
    );
}

#[test]
fn state_dicts_round_trip_through_burn_modules() {
    let mut rng = StreamRng::new(9);
    let device = Default::default();
    let mlp = MlpConfig { hidden: vec![5, 4] };
    let s = Arch::Mlp(mlp.clone()).init(8, 3, &mut rng);
    let back = Mlp::<Cpu>::load(&mlp, 8, 3, &s, &device)
        .unwrap()
        .state()
        .unwrap();
    assert_eq!(back, s);
    let vit = VitConfig {
        patch_size: 4,
        hidden_size: 8,
        layers: 1,
        heads: 2,
        intermediate_size: 6,
    };
    let s = Arch::Vit(vit.clone()).init(8, 3, &mut rng);
    let back = Vit::<Cpu>::load(&vit, 8, 3, &s, &device)
        .unwrap()
        .state()
        .unwrap();
    assert_eq!(back, s);
    // The PyTorch layout is [out, in]: a Linear(192 -> 5) weight is [5, 192].
    assert_eq!(s["classifier.weight"].shape, [3, 8]);
    for text_dim in [0, 5] {
        let d = DenoiserConfig { hidden: vec![6] }.shape(8, text_dim);
        let s = d.init(&mut rng);
        let back = Denoiser::<Cpu>::load(&d, &s, &device)
            .unwrap()
            .state(&d)
            .unwrap();
        assert_eq!(back, s);
        // Two blocks, each with a bias-free text layer when conditioned.
        assert_eq!(s.len(), 4 + 2 * usize::from(text_dim > 0));
    }
}

/// Checks the shipped mapping table against a real emoji-datasource package:
/// `PROBEX_EMOJI_DIR=/path/to/unpacked cargo test -p probex-zoo mapping_matches_real -- --ignored`.
#[test]
#[ignore = "needs the real emoji-datasource package (PROBEX_EMOJI_DIR)"]
fn mapping_matches_real_emoji_datasource() {
    let Ok(dir) = std::env::var("PROBEX_EMOJI_DIR") else {
        panic!("set PROBEX_EMOJI_DIR to the unpacked emoji-datasource@16.0.0");
    };
    let root = emoji::package_root(Path::new(&dir)).unwrap();
    let index = emoji::read_index(&root).unwrap();
    let mut by_short = BTreeMap::new();
    for e in &index {
        for s in &e.short_names {
            by_short.insert(s.as_str(), e);
        }
    }
    let table = mapping().unwrap();
    for m in &table {
        let e = by_short[m.short_name];
        assert_eq!(e.unified, m.unified, "{m:?}");
        assert!(e.has_img_google && e.has_img_twitter, "{m:?}");
    }
    // Exact rows are exactly the CIFAR names that are emoji short names.
    let exact: BTreeSet<&str> = table
        .iter()
        .filter(|m| m.matched == classes::Match::Exact)
        .map(|m| m.cifar)
        .collect();
    let real_exact: BTreeSet<&str> = CIFAR100
        .iter()
        .copied()
        .filter(|c| by_short.contains_key(c))
        .collect();
    assert_eq!(exact, real_exact);
    let set =
        emoji::load_cifar_classes(Path::new(&dir), &["google".into(), "twitter".into()]).unwrap();
    assert_eq!(set.classes.len(), 84, "{:?}", set.missing);
    assert!(set.classes.iter().all(|c| c.images.len() == 2));
    assert!(set.classes.iter().all(|c| cifar_index(&c.name).is_some()));
}

/// Width of [`fake_embed`]'s vectors.
const FAKE_TEXT_DIM: usize = 6;

/// A stand-in text encoder: a fixed unit vector per prompt, seeded by the prompt's bytes, so
/// conditioning is tested without a model.
fn fake_embed(texts: &[String]) -> Result<Vec<Vec<f32>>, String> {
    Ok(texts
        .iter()
        .map(|t| {
            let seed = t
                .bytes()
                .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
            let mut rng = StreamRng::derive(seed, &[]);
            let v: Vec<f32> = (0..FAKE_TEXT_DIM).map(|_| rng.normal()).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / norm).collect()
        })
        .collect())
}

/// A LoRA tree small enough to build in a test: 2 LoRAs per class, a quarter of the classes
/// held out, rank 2, a 16-8 denoiser, a few steps.
fn tiny_lora(name: &str) -> ZooConfig {
    ZooConfig {
        name: name.into(),
        kind: TreeKind::Lora,
        image_size: 8,
        threads: 2,
        lora: LoraConfig {
            loras_per_class: 2,
            holdout_fraction: 0.25,
            rank: 2,
            denoiser: DenoiserConfig {
                hidden: vec![16, 8],
            },
            base_steps: 10,
            base_batch_size: 16,
            steps: vec![8],
            n_training_samples: vec![3],
            batch_size: 8,
            ..LoraConfig::default()
        },
        ..ZooConfig::default()
    }
}

fn tiny_text_lora() -> ZooConfig {
    let mut c = tiny_lora("TinyText");
    c.lora.text = Some(LoraText {
        from: "encoder".into(),
        encoder: probex_text::EncoderKind::Minilm,
        model_subdir: None,
        template: "an emoji of a {}".into(),
    });
    c
}

#[test]
fn text_conditioned_lora_tree_adapts_text_layers_trained_on_each_class_prompt() {
    let (emoji, _) = fixture(8);
    let config = tiny_text_lora();
    let out = tempfile::tempdir().unwrap();
    let report = build_tree(&config, emoji.path(), Some(&fake_embed), out.path(), &quiet).unwrap();
    let base_path = out.path().join(report.bases[0].path.as_ref().unwrap());
    let base_bytes = fs::read(&base_path).unwrap();
    let base = safetensors::SafeTensors::deserialize(&base_bytes).unwrap();
    assert_eq!(
        tensor(&base, "unet.down_blocks.1.attn2.to_v.weight").shape,
        [8, FAKE_TEXT_DIM]
    );
    assert_eq!(
        header(&base_bytes)["__metadata__"]["text_encoder"],
        "minilm"
    );
    for m in &report.models {
        let prompt = format!(
            "an emoji of a {}",
            m.metadata["class_name"].replace('_', " ")
        );
        assert_eq!(m.metadata["instance_prompt"], prompt);
        let bytes = fs::read(out.path().join(&m.path)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        // Four image layers and four text layers, each with down and up.
        assert_eq!(st.len(), 16);
        assert_eq!(
            tensor(&st, "unet.up_blocks.1.attn2.to_v.lora.down.weight").shape,
            [2, FAKE_TEXT_DIM]
        );
        let up = tensor(&st, "unet.up_blocks.1.attn2.to_v.lora.up.weight");
        assert_eq!(up.shape, [192, 2]);
        assert!(
            up.data.iter().any(|v| *v != 0.0),
            "the text adapter trained"
        );
    }

    // The prompts' vectors shape the LoRAs: other vectors, other text adapters.
    let shifted = |texts: &[String]| -> Result<Vec<Vec<f32>>, String> {
        let t: Vec<String> = texts.iter().map(|t| format!("{t}!")).collect();
        fake_embed(&t)
    };
    let other = tempfile::tempdir().unwrap();
    let again = build_tree(&config, emoji.path(), Some(&shifted), other.path(), &quiet).unwrap();
    let name = "unet.down_blocks.0.attn2.to_v.lora.up.weight";
    let read = |dir: &Path, m: &ModelRecord| {
        let bytes = fs::read(dir.join(&m.path)).unwrap();
        tensor(
            &safetensors::SafeTensors::deserialize(&bytes).unwrap(),
            name,
        )
    };
    assert_ne!(
        read(out.path(), &report.models[0]),
        read(other.path(), &again.models[0])
    );
}

#[test]
fn text_conditioned_trees_do_not_depend_on_the_thread_count() {
    let (emoji, _) = fixture(4);
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    for (threads, dir) in [(1, &a), (3, &b)] {
        let config = ZooConfig {
            threads,
            ..tiny_text_lora()
        };
        build_tree(&config, emoji.path(), Some(&fake_embed), dir.path(), &quiet).unwrap();
    }
    assert_eq!(files(a.path()), files(b.path()));
}

#[test]
fn text_conditioning_needs_an_encoder_exactly_when_configured() {
    let (emoji, _) = fixture(4);
    let out = tempfile::tempdir().unwrap();
    let err = build_tree(&tiny_text_lora(), emoji.path(), None, out.path(), &quiet)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no text encoder was given"), "{err}");

    let mut plain = tiny_text_lora();
    plain.lora.text = None;
    let err = build_tree(&plain, emoji.path(), Some(&fake_embed), out.path(), &quiet)
        .unwrap_err()
        .to_string();
    assert!(err.contains("only a LoRA tree with `lora.text`"), "{err}");

    let failing = |_: &[String]| -> Result<Vec<Vec<f32>>, String> { Err("tokenizer broke".into()) };
    let err = build_tree(
        &tiny_text_lora(),
        emoji.path(),
        Some(&failing),
        out.path(),
        &quiet,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("tokenizer broke"), "{err}");

    let short = |t: &[String]| -> Result<Vec<Vec<f32>>, String> { fake_embed(&t[1..]) };
    let err = build_tree(
        &tiny_text_lora(),
        emoji.path(),
        Some(&short),
        out.path(),
        &quiet,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("vectors for 4 prompts"), "{err}");

    let mut bad = tiny_text_lora();
    if let Some(t) = &mut bad.lora.text {
        t.template = "an emoji".into();
    }
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("placeholders"), "{err}");
}

/// `Lora::forward` against the same network computed by hand: each block adds `W h + b`, its
/// image adapter `B A h`, its text layer `T c` and its text adapter `B_t A_t c`.
#[test]
fn lora_forward_adds_each_blocks_text_path() {
    let shape = DenoiserConfig { hidden: vec![2] }.shape(1, 2);
    let mut rng = StreamRng::derive(11, &[]);
    let state = shape.init(&mut rng);
    let device = Default::default();
    let base = Denoiser::<train::Cpu>::load(&shape, &state, &device).unwrap();
    let mut lora = Lora::<train::Cpu>::init(&shape, 1, &mut rng, &device);
    // Fresh `B`s are zero: give them values so every adapter counts.
    for (k, up) in lora.up.iter_mut().enumerate() {
        let [r, o] = up.val().dims();
        let v: Vec<f32> = (0..r * o).map(|j| 0.1 * (k + j + 1) as f32).collect();
        *up = burn::module::Param::from_tensor(burn::tensor::Tensor::from_data(
            burn::tensor::TensorData::new(v, [r, o]),
            &device,
        ));
    }
    let adapters = lora.state(&shape).unwrap();
    let x = [0.3f32, -0.7, 1.1];
    let c = [0.6f32, -0.8];
    let got = lora
        .forward(
            &base,
            burn::tensor::Tensor::from_data(
                burn::tensor::TensorData::new(x.to_vec(), [1, 3]),
                &device,
            ),
            Some(burn::tensor::Tensor::from_data(
                burn::tensor::TensorData::new(c.to_vec(), [1, 2]),
                &device,
            )),
        )
        .into_data()
        .to_vec::<f32>()
        .unwrap();

    // y = M v for M [out, in] row-major.
    let mv = |m: &HostTensor, v: &[f32]| -> Vec<f32> {
        m.data
            .chunks(v.len())
            .map(|row| row.iter().zip(v).map(|(a, b)| a * b).sum())
            .collect()
    };
    let adapted = |name: &str, v: &[f32]| {
        let a = &adapters[&format!("{name}.lora.down.weight")];
        let b = &adapters[&format!("{name}.lora.up.weight")];
        mv(b, &mv(a, v))
    };
    let mut h = x.to_vec();
    for (k, block) in ["unet.down_blocks.0", "unet.up_blocks.0"]
        .iter()
        .enumerate()
    {
        let proj = format!("{block}.proj");
        let text = format!("{block}.attn2.to_v");
        let terms = [
            mv(&state[&format!("{proj}.weight")], &h),
            state[&format!("{proj}.bias")].data.clone(),
            adapted(&proj, &h),
            mv(&state[&format!("{text}.weight")], &c),
            adapted(&text, &c),
        ];
        h = (0..terms[0].len())
            .map(|i| terms.iter().map(|t| t[i]).sum::<f32>())
            .map(|v| if k == 0 { v.max(0.0) } else { v })
            .collect();
    }
    assert_eq!(got.len(), h.len());
    for (g, w) in got.iter().zip(&h) {
        assert!((g - w).abs() < 1e-5, "{got:?} vs {h:?}");
    }
}
