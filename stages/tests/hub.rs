//! `fetch` from the Hub, against a mock Hub on 127.0.0.1 serving fixture models in both
//! Model-J layouts: whole files and tensors, exact bytes, keys that follow commits, retries
//! and failures, offline runs, and fetch -> extract through the engine.

mod experiment;
// The fixture writer the weights tests use, shared rather than copied.
#[path = "../../weights/tests/files/mod.rs"]
mod files;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use files::*;
use probex_engine::digest::FileDigests;
use probex_engine::{PlanContext, Stage};
use probex_hub::RetryPolicy;
use probex_hub::mock::{Fault, MockHub, MockRepo, commit_id};
use probex_hub::{Auth, Hub, HubConfig, Mode, Quiet, Request, TensorSelection};
use probex_stages::fetch::{Fetch, FetchParams};
use probex_weights::dataset::{LayerDataset, Split};
use probex_weights::reader::parse_bytes;
use probex_weights::shapes;
use probex_weights::{Architecture, LayerMode, LayerSelector, layer_index, layer_rows};

/// The fetch kind with the real client (here against the mock Hub).
const FETCH: Fetch = Fetch {
    hub: probex_hub::connect,
};

const TARGETS: [&str; 3] = [
    "['apple', 'worm']",
    "['maple_tree', 'bee']",
    "['bee', 'apple', 'tulip']",
];

/// A ViT with Hugging Face's names and every tensor of `ViTForImageClassification` (biases,
/// norms, `cls_token`, the patch conv), at small shapes: 2 blocks, so 14 layers in the paper's
/// ViT list among 40 tensors.
fn vit_model(seed: u64) -> Vec<u8> {
    let specs = shapes::vit(&shapes::VitConfig {
        hidden: 8,
        blocks: 2,
        intermediate: 16,
        patch: 2,
        image: 4,
        channels: 1,
        classes: 3,
    });
    let t = TARGETS[(seed % 3) as usize];
    let meta = BTreeMap::from([("dataset_chosen_targets".to_string(), t.to_string())]);
    let mut out = Vec::new();
    shapes::safetensors_to(&mut out, &specs, safetensors::Dtype::F32, &meta, seed).unwrap();
    out
}

/// The name of layer `index` (the paper's ViT list) of a model file.
fn layer_name(file: &[u8], index: usize) -> String {
    layer_rows(&parse_bytes(file).unwrap(), LayerMode::Auto).unwrap()[index]
        .name
        .clone()
}

/// A LoRA file with 3 layers (down [2, 8], up [8, 2]).
fn lora_model(seed: u64, class: &str) -> Vec<u8> {
    let mut ts = Vec::new();
    for b in ["down_blocks.0", "mid_block", "up_blocks.1"] {
        let base = format!("unet.{b}.attentions.0.transformer_blocks.0.attn2.to_q");
        ts.push(f32t(
            &format!("{base}.lora.down.weight"),
            &[2, 8],
            &values(seed + 7, 16),
        ));
        ts.push(f32t(
            &format!("{base}.lora.up.weight"),
            &[8, 2],
            &values(seed + 9, 16),
        ));
    }
    serialize(&ts, &[("imagenet_class_id", class)])
}

fn serialize(ts: &[T], meta: &[(&str, &str)]) -> Vec<u8> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = ts
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    let meta: std::collections::HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    safetensors::serialize(views, Some(meta)).unwrap()
}

fn repo(seed: &str, files: &[(&str, Vec<u8>)]) -> MockRepo {
    MockRepo {
        commit: commit_id(seed),
        files: files
            .iter()
            .map(|(p, b)| (p.to_string(), b.clone()))
            .collect(),
        private: false,
    }
}

/// A mock with three discriminative model repos and one SD_200-style bundled repo.
fn mock() -> MockHub {
    let hub = MockHub::start().unwrap();
    for i in 0..3u64 {
        hub.put_model(
            &format!("ProbeX/Model-J__SupViT__model_idx_000{i}"),
            repo(
                &format!("vit{i}"),
                &[
                    ("model.safetensors", vit_model(i)),
                    ("config.json", b"{}".to_vec()),
                ],
            ),
        );
    }
    let mut files = Vec::new();
    for (i, split) in ["train", "train", "val", "test"].iter().enumerate() {
        files.push((
            format!("{split}/model_idx_000{i}/pytorch_lora_weights.safetensors"),
            lora_model(i as u64, ["n01440764", "n02102040"][i % 2]),
        ));
    }
    hub.put_model(
        "ProbeX/Model-J__SD_200",
        MockRepo {
            commit: commit_id("sd200"),
            files: files.into_iter().collect(),
            private: false,
        },
    );
    hub
}

struct World {
    dir: tempfile::TempDir,
}

impl World {
    fn new() -> Self {
        World {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    fn config(&self, hub: &MockHub) -> HubConfig {
        HubConfig {
            endpoint: Some(hub.endpoint().to_string()),
            auth: Auth::Anonymous,
            cache_dir: Some(self.path("hf/hub")),
            tensor_cache: Some(self.path("tensors")),
            offline: false,
            concurrency: 4,
            retry: RetryPolicy {
                attempts: 4,
                base_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(50),
                max_retry_after: Duration::from_secs(5),
            },
        }
    }
    fn hub(&self, mock: &MockHub) -> Hub {
        Hub::new(&self.config(mock)).unwrap()
    }
}

fn vit_repos() -> Request {
    Request::Repos {
        repos: (0..3)
            .map(|i| format!("ProbeX/Model-J__SupViT__model_idx_000{i}"))
            .collect(),
        file: "model.safetensors".into(),
    }
}

fn layers(sel: &str) -> Mode {
    Mode::Tensors(TensorSelection {
        tensors: vec![],
        layers: Some(sel.parse::<LayerSelector>().unwrap()),
        layer_mode: LayerMode::Auto,
    })
}

/// The bytes of tensor `name` in a complete safetensors buffer.
fn tensor_bytes(file: &[u8], name: &str) -> Vec<u8> {
    let h = parse_bytes(file).unwrap();
    let (_, e) = h.find(name).unwrap();
    file[e.span.clone()].to_vec()
}

#[test]
fn tensors_mode_fetches_exact_bytes_of_only_the_asked_layers() {
    let mock = mock();
    let w = World::new();
    let hub = w.hub(&mock);
    let name = "vit.encoder.layer.1.attention.output.dense.weight";
    let original = vit_model(1);
    // In the ViT list: classifier, position embeddings, block 0 (2-7), block 1: key, query,
    // value, then this one.
    let index = 11;
    assert_eq!(layer_name(&original, index), name);

    let out = w.path("out1");
    let report = hub
        .fetch_request(
            &vit_repos(),
            "main",
            &layers(&index.to_string()),
            &out,
            &Quiet,
        )
        .unwrap();
    assert_eq!(report.models.len(), 3);
    let m1 = &report.models[1];
    assert_eq!(m1.id, "ProbeX/Model-J__SupViT__model_idx_0001");
    let got = std::fs::read(&m1.path).unwrap();
    // The tensor's bytes are the original's, exactly; the metadata is kept.
    assert_eq!(tensor_bytes(&got, name), tensor_bytes(&original, name));
    let h = parse_bytes(&got).unwrap();
    assert_eq!(h.tensors.len(), 1);
    assert_eq!(h.metadata["dataset_chosen_targets"], TARGETS[1]);
    // The paper's index survives: counted in the original list, not the partial one.
    assert_eq!(
        layer_index(&h, name, Architecture::Vit).unwrap(),
        Some(index)
    );
    let rows = layer_rows(&h, LayerMode::Auto).unwrap();
    assert_eq!(rows.len(), 14);
    assert!(rows[index].matrix.is_some());
    assert!(rows[0].matrix.is_none() && rows[0].note.as_ref().unwrap().contains("fetch"));

    // Only Range GETs for the header and the span went out; never the whole file.
    let gets: Vec<_> = mock
        .seen()
        .into_iter()
        .filter(|s| s.method == "GET" && s.path.contains("/resolve/"))
        .collect();
    assert_eq!(gets.len(), 6, "one header + one span per model: {gets:?}");
    assert!(gets.iter().all(|s| s.range.is_some()));
    // Per model: the first 64 KB (the header; these fixtures are smaller, so the whole file)
    // and the tensor's span.
    let span = tensor_bytes(&original, name).len() as u64;
    let want: u64 = (0..3)
        .map(|i| (vit_model(i).len() as u64).min(64 * 1024) + span)
        .sum();
    assert_eq!(report.bytes_transferred, want);

    // Again: everything from the tensor cache, nothing over the network.
    mock.reset_counts();
    let again = hub
        .fetch_request(
            &vit_repos(),
            "main",
            &layers(&index.to_string()),
            &w.path("out2"),
            &Quiet,
        )
        .unwrap();
    assert_eq!(again.bytes_transferred, 0);
    assert!(mock.seen().iter().all(|s| !s.path.contains("/resolve/")));

    // Another layer: only that layer's span per model (the header is cached).
    mock.reset_counts();
    let other = "vit.encoder.layer.0.attention.attention.query.weight";
    let more = hub
        .fetch_request(
            &vit_repos(),
            "main",
            &layers(other),
            &w.path("out3"),
            &Quiet,
        )
        .unwrap();
    let span = tensor_bytes(&original, other).len() as u64;
    assert_eq!(more.bytes_transferred, 3 * span);
    let got = std::fs::read(&more.models[2].path).unwrap();
    assert_eq!(
        tensor_bytes(&got, other),
        tensor_bytes(&vit_model(2), other)
    );
}

#[test]
fn files_mode_fills_the_hugging_face_cache_in_pythons_layout() {
    let mock = mock();
    let w = World::new();
    let hub = w.hub(&mock);
    let report = hub
        .fetch_request(&vit_repos(), "main", &Mode::Files, &w.path("out"), &Quiet)
        .unwrap();
    let commit = commit_id("vit2");
    let snap = w.path(&format!(
        "hf/hub/models--ProbeX--Model-J__SupViT__model_idx_0002/snapshots/{commit}/model.safetensors"
    ));
    assert_eq!(report.models[2].path, snap);
    assert_eq!(std::fs::read(&snap).unwrap(), vit_model(2));
    let link = std::fs::read_link(&snap).unwrap();
    assert!(link.starts_with("../../blobs"), "{link:?}");
    let refs = w.path("hf/hub/models--ProbeX--Model-J__SupViT__model_idx_0002/refs/main");
    assert_eq!(std::fs::read_to_string(refs).unwrap(), commit);
    // The local-folder source reads what files mode wrote.
    let found = probex_stages::extract::discover(&probex_stages::extract::Layout::HfCache {
        root: w.path("hf/hub"),
        repos: None,
        file: "model.safetensors".into(),
        revision: "main".into(),
    })
    .unwrap();
    assert_eq!(found.models.len(), 3);
}

#[test]
fn generative_bundle_fetches_lora_pairs_with_splits_from_paths() {
    let mock = mock();
    let w = World::new();
    let hub = w.hub(&mock);
    let req = Request::ModelJGenerative {
        repo: "ProbeX/Model-J__SD_200".into(),
        file: "pytorch_lora_weights.safetensors".into(),
    };
    let report = hub
        .fetch_request(&req, "main", &layers("1"), &w.path("out"), &Quiet)
        .unwrap();
    let ids: Vec<(&str, Option<Split>)> = report
        .models
        .iter()
        .map(|m| (m.id.as_str(), m.split))
        .collect();
    assert_eq!(
        ids,
        vec![
            ("model_idx_0000", Some(Split::Train)),
            ("model_idx_0001", Some(Split::Train)),
            ("model_idx_0002", Some(Split::Val)),
            ("model_idx_0003", Some(Split::Test)),
        ]
    );
    let got = std::fs::read(&report.models[2].path).unwrap();
    let h = parse_bytes(&got).unwrap();
    // LoRA layer 1 (sorted down factors: down_blocks, mid_block, up_blocks) and its up factor.
    let base = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_q";
    let names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        vec![
            format!("{base}.lora.down.weight").as_str(),
            format!("{base}.lora.up.weight").as_str()
        ]
    );
    let original = lora_model(2, "n01440764");
    for n in &names {
        assert_eq!(tensor_bytes(&got, n), tensor_bytes(&original, n));
    }
    let rows = layer_rows(&h, LayerMode::Auto).unwrap();
    assert_eq!(rows.len(), 3);
    assert!(rows[1].matrix.is_some() && rows[0].matrix.is_none());
}

fn write_index_parquet(rows: &[(&str, &str)]) -> Vec<u8> {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    let schema = Arc::new(
        parse_message_type(
            "message schema { REQUIRED BYTE_ARRAY hf_model_id (UTF8); REQUIRED BYTE_ARRAY split (UTF8); REQUIRED BYTE_ARRAY dataset_chosen_targets (UTF8); }",
        )
        .unwrap(),
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build(),
    );
    let mut buf = Vec::new();
    {
        let mut w = SerializedFileWriter::new(&mut buf, schema, props).unwrap();
        let mut rg = w.next_row_group().unwrap();
        let cols: [Vec<ByteArray>; 3] = [
            rows.iter().map(|r| ByteArray::from(r.0)).collect(),
            rows.iter().map(|r| ByteArray::from(r.1)).collect(),
            rows.iter().map(|_| ByteArray::from("['apple']")).collect(),
        ];
        let mut i = 0;
        while let Some(mut col) = rg.next_column().unwrap() {
            col.typed::<ByteArrayType>()
                .write_batch(&cols[i], None, None)
                .unwrap();
            col.close().unwrap();
            i += 1;
        }
        rg.close().unwrap();
        w.close().unwrap();
    }
    buf
}

fn put_index(mock: &MockHub) {
    let train = write_index_parquet(&[
        ("ProbeX/Model-J__SupViT__model_idx_0000", "train"),
        ("ProbeX/Model-J__SupViT__model_idx_0002", "train"),
    ]);
    let test = write_index_parquet(&[("ProbeX/Model-J__SupViT__model_idx_0001", "test")]);
    let other = write_index_parquet(&[("ProbeX/Model-J__DINO__model_idx_0000", "train")]);
    mock.put_dataset(
        "ProbeX/Model-J",
        repo(
            "index",
            &[
                ("SupViT/train-00000-of-00001.parquet", train),
                ("SupViT/test-00000-of-00001.parquet", test),
                ("DINO/train-00000-of-00001.parquet", other),
                ("README.md", b"# Model-J".to_vec()),
            ],
        ),
    );
}

#[test]
fn discriminative_subset_takes_repos_and_splits_from_the_index_dataset() {
    let mock = mock();
    put_index(&mock);
    let w = World::new();
    let hub = w.hub(&mock);
    let req = Request::ModelJIndex {
        subset: probex_hub::ModelJ::SupViT,
        index: "ProbeX/Model-J".into(),
        file: "model.safetensors".into(),
    };
    let plan = hub.plan(&req, "main", &Quiet).unwrap();
    let got: Vec<(&str, Option<Split>, &str)> = plan
        .models
        .iter()
        .map(|m| (m.id.as_str(), m.split, m.commit.as_str()))
        .collect();
    let (c0, c1, c2) = (commit_id("vit0"), commit_id("vit1"), commit_id("vit2"));
    assert_eq!(
        got,
        vec![
            (
                "ProbeX/Model-J__SupViT__model_idx_0000",
                Some(Split::Train),
                c0.as_str()
            ),
            (
                "ProbeX/Model-J__SupViT__model_idx_0001",
                Some(Split::Test),
                c1.as_str()
            ),
            (
                "ProbeX/Model-J__SupViT__model_idx_0002",
                Some(Split::Train),
                c2.as_str()
            ),
        ]
    );
    assert_eq!(
        plan.index,
        Some(("ProbeX/Model-J".to_string(), commit_id("index")))
    );
    // The index parquet went into the Hugging Face cache, usable by `datasets`.
    assert!(
        w.path(&format!(
            "hf/hub/datasets--ProbeX--Model-J/snapshots/{}/SupViT/test-00000-of-00001.parquet",
            commit_id("index")
        ))
        .is_file()
    );
}

fn hub_params(mock: &MockHub, w: &World, extra: &str) -> FetchParams {
    let text = format!(
        "source = \"hub\"\nendpoint = \"{}\"\ncache_dir = \"{}\"\ntensor_cache = \"{}\"\n{extra}",
        mock.endpoint(),
        w.path("hf/hub").display(),
        w.path("tensors").display()
    );
    toml::from_str(&text).unwrap()
}

fn identity(p: &FetchParams, base: &Path, offline: bool) -> Result<String, String> {
    let digests = FileDigests::in_memory();
    let cx = PlanContext {
        base_dir: base,
        digests: &digests,
        offline,
    };
    FETCH.check(p).map_err(|e| e.to_string())?;
    FETCH
        .identity(p, &cx)
        .map(|i| i.unwrap_or_default())
        .map_err(|e| format!("{e:#}"))
}

#[test]
fn the_key_follows_the_commit_and_leaves_out_how_the_hub_is_reached() {
    let mock = mock();
    let w = World::new();
    let p = hub_params(
        &mock,
        &w,
        "repo = \"ProbeX/Model-J__SupViT__model_idx_0001\"\nlayers = 3\n",
    );
    let a = identity(&p, w.dir.path(), false).unwrap();
    assert_eq!(a, identity(&p, w.dir.path(), false).unwrap());
    // Where the Hub is and how many transfers run are not part of what is fetched.
    let canonical = serde_json::to_value(&p).unwrap();
    for k in ["endpoint", "cache_dir", "tensor_cache", "concurrency"] {
        assert!(canonical.get(k).is_none(), "{k} in {canonical}");
    }
    // A new commit on the Hub: a new identity.
    mock.edit_model("ProbeX/Model-J__SupViT__model_idx_0001", |r| {
        r.commit = commit_id("vit1-v2");
        r.files.insert("model.safetensors".into(), vit_model(7));
    });
    let b = identity(&p, w.dir.path(), false).unwrap();
    assert_ne!(a, b);
    // Offline, the identity comes from the refs recorded while online.
    assert_eq!(identity(&p, w.dir.path(), true).unwrap(), b);
}

#[test]
fn transient_failures_are_retried_honouring_retry_after() {
    let mock = mock();
    let w = World::new();
    let hub = w.hub(&mock);
    let f = "model_idx_0000/resolve";
    mock.fault(f, [Fault::Status(429, Some(1)), Fault::Status(500, None)]);
    let t = Instant::now();
    let r = hub
        .fetch_request(&vit_repos(), "main", &layers("2"), &w.path("out"), &Quiet)
        .unwrap();
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "Retry-After not honoured"
    );
    assert_eq!(r.retries, 2);
    let got = std::fs::read(&r.models[0].path).unwrap();
    let name = &layer_name(&vit_model(0), 2);
    assert_eq!(tensor_bytes(&got, name), tensor_bytes(&vit_model(0), name));
    let statuses: Vec<u16> = mock
        .seen()
        .iter()
        .filter(|s| s.path.contains(f))
        .map(|s| s.status)
        .collect();
    assert_eq!(&statuses[..2], &[429, 500]);
}

#[test]
fn cut_bodies_and_wrong_lengths_are_retried_and_downloads_resume() {
    let mock = mock();
    let w = World::new();
    let hub = w.hub(&mock);
    let size = vit_model(1).len();
    // Files mode: the first GET is cut after 100 bytes; the retry resumes at byte 100.
    mock.fault("model_idx_0001/resolve", [Fault::CutBody(100)]);
    // A Content-Length 10 bytes short ends the body early (retried, resuming 10 bytes before
    // the end); then one that overstates the body: the client stops at the size it expects.
    mock.fault(
        "model_idx_0002/resolve",
        [
            Fault::ShorterContentLength(10),
            Fault::LongerContentLength(10),
        ],
    );
    let r = hub
        .fetch_request(&vit_repos(), "main", &Mode::Files, &w.path("out"), &Quiet)
        .unwrap();
    for i in 0..3u64 {
        assert_eq!(
            std::fs::read(&r.models[i as usize].path).unwrap(),
            vit_model(i)
        );
    }
    let ranges: Vec<Option<String>> = mock
        .seen()
        .iter()
        .filter(|s| s.method == "GET" && s.path.contains("model_idx_0001/resolve"))
        .map(|s| s.range.clone())
        .collect();
    assert_eq!(ranges, vec![None, Some("bytes=100-".to_string())]);
    let size2 = vit_model(2).len();
    let ranges2: Vec<Option<String>> = mock
        .seen()
        .iter()
        .filter(|s| s.method == "GET" && s.path.contains("model_idx_0002/resolve"))
        .map(|s| s.range.clone())
        .collect();
    assert_eq!(ranges2, vec![None, Some(format!("bytes={}-", size2 - 10))]);
    assert_eq!(r.retries, 2);
    assert!(r.bytes_transferred < 2 * (size as u64) * 3);

    // Tensors mode on the same faults.
    let w2 = World::new();
    let hub2 = w2.hub(&mock);
    mock.fault(
        "model_idx_0000/resolve",
        [Fault::CutBody(5), Fault::ShorterContentLength(3)],
    );
    let r = hub2
        .fetch_request(&vit_repos(), "main", &layers("4"), &w2.path("out"), &Quiet)
        .unwrap();
    let name = layer_name(&vit_model(0), 4);
    let got = std::fs::read(&r.models[0].path).unwrap();
    assert_eq!(
        tensor_bytes(&got, &name),
        tensor_bytes(&vit_model(0), &name)
    );
}

#[test]
fn a_server_that_ignores_range_still_gives_the_right_bytes() {
    let mock = mock();
    mock.ignore_range
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let w = World::new();
    let hub = w.hub(&mock);
    let r = hub
        .fetch_request(&vit_repos(), "main", &layers("5"), &w.path("out"), &Quiet)
        .unwrap();
    assert!(r.range_ignored >= 3);
    for i in 0..3u64 {
        let name = layer_name(&vit_model(i), 5);
        let got = std::fs::read(&r.models[i as usize].path).unwrap();
        assert_eq!(
            tensor_bytes(&got, &name),
            tensor_bytes(&vit_model(i), &name)
        );
    }
}

#[test]
fn missing_private_and_persistently_failing_repos_are_explained() {
    let mock = mock();
    let w = World::new();
    let hub = w.hub(&mock);
    let one = |id: &str, file: &str| Request::Repos {
        repos: vec![id.into()],
        file: file.into(),
    };
    let e = hub
        .fetch_request(
            &one("ProbeX/nope", "model.safetensors"),
            "main",
            &Mode::Files,
            &w.path("o"),
            &Quiet,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("ProbeX/nope") && e.contains("not found"), "{e}");
    let e = hub
        .fetch_request(
            &one(
                "ProbeX/Model-J__SupViT__model_idx_0000",
                "missing.safetensors",
            ),
            "main",
            &Mode::Files,
            &w.path("o"),
            &Quiet,
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("missing.safetensors") && e.contains("no such file"),
        "{e}"
    );

    // A private repo: 401 without a token, explained; with the token it works, and the token
    // is in no file written.
    mock.put_model("ProbeX/private", {
        let mut r = repo("private", &[("model.safetensors", vit_model(2))]);
        r.private = true;
        r
    });
    let e = hub
        .fetch_request(
            &one("ProbeX/private", "model.safetensors"),
            "main",
            &layers("1"),
            &w.path("o"),
            &Quiet,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("401") && e.contains("HF_TOKEN"), "{e}");
    let mut cfg = w.config(&mock);
    cfg.auth = Auth::Token(mock.token.clone());
    let authed = Hub::new(&cfg).unwrap();
    let out = w.path("authed");
    authed
        .fetch_request(
            &one("ProbeX/private", "model.safetensors"),
            "main",
            &layers("1"),
            &out,
            &Quiet,
        )
        .unwrap();
    assert!(mock.seen().iter().any(|s| s.auth.is_some()));
    for dir in [out, w.path("tensors"), w.path("hf")] {
        for f in walk(&dir) {
            let bytes = std::fs::read(&f).unwrap();
            assert!(
                !bytes
                    .windows(mock.token.len())
                    .any(|x| x == mock.token.as_bytes()),
                "token in {}",
                f.display()
            );
        }
    }

    // A repo whose file always answers 500: the error says so after the retries.
    mock.fault(
        "model_idx_0001/resolve",
        std::iter::repeat_n(Fault::Status(500, None), 20),
    );
    let e = hub
        .fetch_request(
            &one(
                "ProbeX/Model-J__SupViT__model_idx_0001",
                "model.safetensors",
            ),
            "main",
            &layers("0"),
            &w.path("o2"),
            &Quiet,
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("500") && e.contains("gave up after 4 attempts"),
        "{e}"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&p));
        } else if e.file_type().unwrap().is_file() {
            out.push(p);
        }
    }
    out
}

#[test]
fn hostile_headers_and_paths_are_refused_without_big_allocations() {
    let mock = mock();
    let w = World::new();
    let hub = w.hub(&mock);
    // A header length of 2^60: refused before any allocation.
    let mut evil = (1u64 << 60).to_le_bytes().to_vec();
    evil.extend_from_slice(b"{}");
    // A header of ~100 KB (big metadata): fetched in two requests and parsed.
    let big_meta = "x".repeat(100_000);
    let big = serialize(
        &[f32t("w", &[2, 2], &[1.0, 2.0, 3.0, 4.0])],
        &[("notes", &big_meta)],
    );
    assert!(parse_bytes(&big).unwrap().data_start > 100_000);
    mock.put_model("ProbeX/evil", repo("evil", &[("model.safetensors", evil)]));
    mock.put_model(
        "ProbeX/big",
        repo("big", &[("model.safetensors", big.clone())]),
    );
    let one = |id: &str| Request::Repos {
        repos: vec![id.into()],
        file: "model.safetensors".into(),
    };
    let e = hub
        .fetch_request(
            &one("ProbeX/evil"),
            "main",
            &layers("0"),
            &w.path("o"),
            &Quiet,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("header length"), "{e}");
    let r = hub
        .fetch_request(
            &one("ProbeX/big"),
            "main",
            &layers("0"),
            &w.path("o"),
            &Quiet,
        )
        .unwrap();
    let got = std::fs::read(&r.models[0].path).unwrap();
    assert_eq!(tensor_bytes(&got, "w"), tensor_bytes(&big, "w"));
    assert_eq!(parse_bytes(&got).unwrap().metadata["notes"], big_meta);

    // A listing with a path that climbs out of the repo: refused, nothing written outside.
    mock.put_model(
        "ProbeX/climb",
        repo(
            "climb",
            &[(
                "train/../../../escape/pytorch_lora_weights.safetensors",
                lora_model(1, "n01440764"),
            )],
        ),
    );
    let e = hub
        .fetch_request(
            &Request::ModelJGenerative {
                repo: "ProbeX/climb".into(),
                file: "pytorch_lora_weights.safetensors".into(),
            },
            "main",
            &Mode::Files,
            &w.path("o"),
            &Quiet,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("leaves the repo"), "{e}");
    assert!(!w.dir.path().parent().unwrap().join("escape").exists());
}

#[test]
fn offline_uses_only_what_is_cached() {
    let mock = mock();
    let w = World::new();
    let online = w.hub(&mock);
    online
        .fetch_request(&vit_repos(), "main", &layers("3"), &w.path("o1"), &Quiet)
        .unwrap();
    drop(mock); // No Hub at all from here on.
    let mut cfg = HubConfig {
        endpoint: Some("http://127.0.0.1:9".into()),
        ..w.config(&MockHub::start().unwrap())
    };
    cfg.offline = true;
    let offline = Hub::new(&cfg).unwrap();
    let plan = offline.plan(&vit_repos(), "main", &Quiet).unwrap();
    let r = offline
        .fetch(&plan, &layers("3"), &w.path("o2"), &Quiet)
        .unwrap();
    assert_eq!(r.bytes_transferred, 0);
    assert_eq!(
        std::fs::read(&r.models[0].path).unwrap(),
        std::fs::read(
            w.path("o1")
                .join(r.models[0].path.strip_prefix(w.path("o2")).unwrap())
        )
        .unwrap()
    );
    let e = offline
        .fetch(&plan, &layers("4"), &w.path("o3"), &Quiet)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not in the local caches") && e.contains("--offline"),
        "{e}"
    );
}

#[test]
fn fetch_then_extract_through_the_engine() {
    let mock = mock();
    put_index(&mock);
    let w = World::new();
    let exp = w.path("exp.toml");
    let layer = "vit.encoder.layer.1.attention.attention.query.weight";
    // The paper's ViT list: classifier, position embeddings, block 0's six, then block 1's
    // key and query.
    let index = 9;
    assert_eq!(layer_name(&vit_model(0), index), layer);
    std::fs::write(
        &exp,
        format!(
            r#"
[experiment]
name = "hub-mini"

[stage.models]
kind = "fetch"
source = "hub"
model_j = "SupViT"
layers = {index}
endpoint = "{}"
cache_dir = "hf/hub"
tensor_cache = "tensors"

[stage.layers]
kind = "extract"
from = "models"
layers = "all"
label = {{ key = "dataset_chosen_targets", kind = "multi_label", vocab = "cifar100" }}
"#,
            mock.endpoint()
        ),
    )
    .unwrap();
    let report = experiment::run(&exp, &w.path("cache"), Some(&w.path("run")), false);
    assert!(report.success(), "{:?}", report.nodes);
    let names: Vec<&str> = report.nodes.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(
        names,
        vec!["models".to_string(), format!("layers[layer={index}]")]
    );
    // The layer dataset holds the original bytes of each model's tensor, in id order, with
    // the index dataset's splits.
    let store = probex_cache::Store::open(w.path("cache")).unwrap();
    let node = &report.nodes[1];
    let entry = store
        .get(&probex_cache::Key::parse(&node.key).unwrap())
        .unwrap()
        .unwrap();
    let ds = LayerDataset::load(&entry.dir).unwrap();
    assert_eq!(ds.layer.index, index);
    assert_eq!(ds.layer.name, layer);
    let splits: BTreeMap<String, Split> =
        ds.models.iter().map(|m| (m.id.clone(), m.split)).collect();
    assert_eq!(
        splits["ProbeX/Model-J__SupViT__model_idx_0001"],
        Split::Test
    );
    assert_eq!(
        splits["ProbeX/Model-J__SupViT__model_idx_0002"],
        Split::Train
    );
    for (row, i) in (0..3u64).enumerate() {
        let want: Vec<f32> = tensor_bytes(&vit_model(i), layer)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(ds.matrix(row).unwrap(), want.as_slice());
    }
    // A second run is all cached.
    let again = experiment::run(&exp, &w.path("cache"), Some(&w.path("run2")), false);
    assert!(
        again
            .nodes
            .iter()
            .all(|n| serde_json::to_value(&n.state).unwrap()["state"] == "cached")
    );
}

/// The whole pipeline on a Model-J-shaped subset served by the mock: the 160 committed planted
/// models (experiments/data/planted, layer 0 carries each model's classes) as one repo per
/// model, splits in the index dataset, fetched in tensors mode (only layer 0 of each), then
/// extract -> train -> select -> evaluate, with the same qualitative result as
/// experiments/planted.toml reading the files from disk.
#[test]
fn model_j_shaped_experiment_runs_end_to_end_through_the_mock_hub() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/data/planted");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 160);
    let hub = MockHub::start().unwrap();
    let mut rows: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        let split = parse_bytes(&bytes).unwrap().metadata["split"].clone();
        let stem = f.file_stem().unwrap().to_str().unwrap();
        let id = format!("ProbeX/Model-J__SupViT__{stem}");
        hub.put_model(&id, repo(stem, &[("model.safetensors", bytes)]));
        rows.entry(split.clone()).or_default().push((id, split));
    }
    let mut index = Vec::new();
    for (split, r) in &rows {
        let r: Vec<(&str, &str)> = r.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        index.push((
            format!("SupViT/{split}-00000-of-00001.parquet"),
            write_index_parquet(&r),
        ));
    }
    let index: Vec<(&str, Vec<u8>)> = index.iter().map(|(p, b)| (p.as_str(), b.clone())).collect();
    hub.put_dataset("ProbeX/Model-J", repo("index", &index));

    let w = World::new();
    let exp = w.path("mini-hub.toml");
    std::fs::write(
        &exp,
        format!(
            r#"
[experiment]
name = "mini-hub"

[stage.models]
kind = "fetch"
source = "hub"
model_j = "SupViT"
layers = 0
endpoint = "{}"
cache_dir = "hf/hub"
tensor_cache = "tensors"

[stage.layers]
kind = "extract"
from = "models"
layers = "all"
label = {{ key = "dataset_chosen_targets", kind = "multi_label", vocab = "cifar100" }}

[stage.probex]
kind = "train"
from = "layers"
for_each = "layer"
model = "probex"
epochs = 150
batch_size = 32
validate_every = 10
r_u = 16
r_v = 16
r_t = 32

[stage.best]
kind = "select"
from = "probex"
by = "val.accuracy"

[stage.report]
kind = "evaluate"
from = "best"

[expect]
"best.layer" = "0 +- 0"
"report.best.test.accuracy" = "> 0.6"
"#,
            hub.endpoint()
        ),
    )
    .unwrap();
    let report = experiment::run(&exp, &w.path("cache"), Some(&w.path("run")), false);
    assert!(report.success(), "{:#?}", report.nodes);
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.path("run/results.json")).unwrap()).unwrap();
    let acc = results["results"]["report"]["best"]["test"]["accuracy"]
        .as_f64()
        .unwrap();
    assert!(acc > 0.6, "test accuracy {acc}");
}

/// The text encoder of a zero-shot experiment comes from the Hub like the models: only the
/// text tower's tensors (tensors mode) plus the repo's config and tokenizer (`extra_files`),
/// and `embed` reads that folder. Served here: the tiny CLIP fixture under the real repo id.
#[test]
fn embed_reads_a_text_encoder_fetched_from_the_hub() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/clip-tiny");
    let hub = MockHub::start().unwrap();
    let files: Vec<(&str, Vec<u8>)> = ["model.safetensors", "config.json", "tokenizer.json"]
        .iter()
        .map(|f| (*f, std::fs::read(golden.join(f)).unwrap()))
        .collect();
    hub.put_model("openai/clip-vit-large-patch14", repo("clip", &files));
    let w = World::new();
    let exp = w.path("text.toml");
    std::fs::write(
        &exp,
        format!(
            r#"
[experiment]
name = "hub-text"

[stage.clip]
kind = "fetch"
source = "hub"
repo = "openai/clip-vit-large-patch14"
tensors = ["text_model.*", "text_projection.weight"]
extra_files = ["config.json", "tokenizer.json"]
endpoint = "{}"
cache_dir = "hf/hub"
tensor_cache = "tensors"

[stage.text]
kind = "embed"
from = "clip"
encoder = "clip-text"
classes = ["apple", "maple_tree"]
"#,
            hub.endpoint()
        ),
    )
    .unwrap();
    let report = experiment::run(&exp, &w.path("cache"), Some(&w.path("run")), false);
    assert!(report.success(), "{:#?}", report.nodes);
    let store = probex_cache::Store::open(w.path("cache")).unwrap();
    let entry = store
        .get(&probex_cache::Key::parse(&report.nodes[1].key).unwrap())
        .unwrap()
        .unwrap();
    let table = probex_weights::embeddings::TextTable::load(&entry.dir).unwrap();
    type B = burn::backend::Flex;
    use probex_text::{self as text, Encoder, EncoderKind};
    let enc = Encoder::<B>::load(EncoderKind::ClipText, &golden, &Default::default()).unwrap();
    let prompts: Vec<String> = ["apple", "maple_tree"]
        .iter()
        .map(|c| text::prompt(text::DEFAULT_TEMPLATE, c))
        .collect();
    let want = text::embed_texts(&enc, &prompts).unwrap();
    for (i, row) in want.iter().enumerate() {
        let d = row
            .iter()
            .zip(table.row(i))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(d < 1e-6, "row {i} differs by {d}");
    }
}
