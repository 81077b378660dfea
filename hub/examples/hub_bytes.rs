//! Benchmark: bytes a Hub fetch moves in `tensors` mode (one 768x768 layer) against whole
//! files, on fixture models with ViT-B's tensor names and shapes served by the mock Hub.
//!
//! `cargo run -p probex-fetch --example hub_bytes [-- MODELS]` (default 3 models of ~346 MB;
//! the mock keeps them in memory).

use std::collections::HashMap;
use std::time::Instant;

use probex_hub::RetryPolicy;
use probex_hub::mock::{MockHub, MockRepo, commit_id};
use probex_hub::{Auth, Hub, HubConfig, Mode, Quiet, Request, TensorSelection};
use probex_weights::{LayerMode, LayerSelector};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

/// ViT-B/16 (google/vit-base-patch16-224 with a 100-class head): names and shapes.
fn vit_b_shapes() -> Vec<(String, Vec<usize>)> {
    let mut v: Vec<(String, Vec<usize>)> = vec![
        ("vit.embeddings.cls_token".into(), vec![1, 1, 768]),
        (
            "vit.embeddings.position_embeddings".into(),
            vec![1, 197, 768],
        ),
        (
            "vit.embeddings.patch_embeddings.projection.weight".into(),
            vec![768, 3, 16, 16],
        ),
        (
            "vit.embeddings.patch_embeddings.projection.bias".into(),
            vec![768],
        ),
        ("vit.layernorm.weight".into(), vec![768]),
        ("vit.layernorm.bias".into(), vec![768]),
        ("classifier.weight".into(), vec![100, 768]),
        ("classifier.bias".into(), vec![100]),
    ];
    for l in 0..12 {
        let p = format!("vit.encoder.layer.{l}");
        for m in [
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
            "attention.output.dense",
        ] {
            v.push((format!("{p}.{m}.weight"), vec![768, 768]));
            v.push((format!("{p}.{m}.bias"), vec![768]));
        }
        v.push((format!("{p}.intermediate.dense.weight"), vec![3072, 768]));
        v.push((format!("{p}.intermediate.dense.bias"), vec![3072]));
        v.push((format!("{p}.output.dense.weight"), vec![768, 3072]));
        v.push((format!("{p}.output.dense.bias"), vec![768]));
        for ln in ["layernorm_before", "layernorm_after"] {
            v.push((format!("{p}.{ln}.weight"), vec![768]));
            v.push((format!("{p}.{ln}.bias"), vec![768]));
        }
    }
    v
}

fn model(seed: u64, shapes: &[(String, Vec<usize>)]) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let data: Vec<Vec<u8>> = shapes
        .iter()
        .map(|(_, shape)| {
            let n: usize = shape.iter().product();
            let mut b = Vec::with_capacity(n * 4);
            for _ in 0..n {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                b.extend_from_slice(
                    &(((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5).to_le_bytes(),
                );
            }
            b
        })
        .collect();
    let views: Vec<(String, TensorView)> = shapes
        .iter()
        .zip(&data)
        .map(|((n, shape), d)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, shape.clone(), d).unwrap(),
            )
        })
        .collect();
    let meta: HashMap<String, String> = [(
        "dataset_chosen_targets".to_string(),
        "['apple', 'bee']".to_string(),
    )]
    .into();
    safetensors::serialize(views, Some(meta)).unwrap()
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    let shapes = vit_b_shapes();
    let mock = MockHub::start().expect("mock hub");
    let t = Instant::now();
    let mut total = 0u64;
    let mut repos = Vec::new();
    for i in 0..n {
        let id = format!("ProbeX/Model-J__SupViT__model_idx_{i:04}");
        let bytes = model(i as u64 + 1, &shapes);
        total += bytes.len() as u64;
        mock.put_model(
            &id,
            MockRepo {
                commit: commit_id(&id),
                files: [("model.safetensors".to_string(), bytes)].into(),
                private: false,
            },
        );
        repos.push(id);
    }
    let mut sorted: Vec<&str> = shapes.iter().map(|(n, _)| n.as_str()).collect();
    sorted.sort();
    let layer = "vit.encoder.layer.7.attention.output.dense.weight";
    let index = sorted.iter().position(|n| *n == layer).unwrap_or(0);
    eprintln!(
        "{n} models, {} tensors each, {:.1} MB in all (made in {:.1}s); layer {index} = {layer}",
        shapes.len(),
        total as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = HubConfig {
        endpoint: Some(mock.endpoint().to_string()),
        auth: Auth::Anonymous,
        cache_dir: Some(dir.path().join("hf/hub")),
        tensor_cache: Some(dir.path().join("tensors")),
        offline: false,
        concurrency: 4,
        retry: RetryPolicy::default(),
    };
    let hub = Hub::new(&cfg).expect("hub");
    let req = Request::Repos {
        repos,
        file: "model.safetensors".into(),
    };
    let tensors = Mode::Tensors(TensorSelection {
        tensors: vec![],
        layers: Some(LayerSelector::Index(index)),
        layer_mode: LayerMode::Auto,
    });
    let t = Instant::now();
    let r = hub
        .fetch_request(&req, "main", &tensors, &dir.path().join("out"), &Quiet)
        .expect("tensors fetch");
    let tensor_secs = t.elapsed().as_secs_f64();
    let tensor_bytes = r.bytes_transferred;
    let t = Instant::now();
    let f = hub
        .fetch_request(&req, "main", &Mode::Files, &dir.path().join("out2"), &Quiet)
        .expect("files fetch");
    let file_secs = t.elapsed().as_secs_f64();
    let layer_bytes = (768 * 768 * 4 * n) as u64;
    println!("| mode | bytes transferred | requests | time |");
    println!("|---|---|---|---|");
    println!(
        "| tensors (layer {index}) | {tensor_bytes} ({:.2} MB) | {} | {tensor_secs:.2}s |",
        tensor_bytes as f64 / 1e6,
        r.requests
    );
    println!(
        "| files | {} ({:.1} MB) | {} | {file_secs:.2}s |",
        f.bytes_transferred,
        f.bytes_transferred as f64 / 1e6,
        f.requests
    );
    println!(
        "tensors/files = {:.4}% (target < 1%); layer data {layer_bytes} B, overhead (headers) {} B",
        100.0 * tensor_bytes as f64 / f.bytes_transferred.max(1) as f64,
        tensor_bytes.saturating_sub(layer_bytes)
    );
}
