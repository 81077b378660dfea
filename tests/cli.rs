//! The commands the binary adds beside the engine's: clear errors and exit code 2 on bad
//! input (their behaviour on trained probes is tested in stages/tests/text.rs).

use std::process::Command;

fn probex(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_probex"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn search_and_describe_explain_what_is_wrong_and_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let (code, err) = probex(&["search", "a photo of a dog", "--index", dir]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("neither a run directory"), "{err}");

    let model = tmp.path().join("m.safetensors");
    std::fs::write(&model, b"not a safetensors file").unwrap();
    let (code, err) = probex(&["describe", model.to_str().unwrap(), "--probe", dir]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("neither a run directory"), "{err}");

    // A run record whose cache is gone says so.
    let status = serde_json::json!({
        "cache": tmp.path().join("cache"),
        "nodes": [{"node": "best", "stage": "best", "kind": "select",
                   "key": "a".repeat(64), "state": "cached"}],
    });
    std::fs::write(tmp.path().join("status.json"), status.to_string()).unwrap();
    let (code, err) = probex(&["search", "dog", "--index", dir]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no longer in the cache"), "{err}");
}

/// `probex export` writes a factored (or in-place) layer dataset as one stacked file that
/// loads back with every row's matrix, and refuses what is not a layer dataset.
#[test]
fn export_writes_the_plain_stacked_form() {
    use probex_stages::dataset::{
        Labels, LayerDataset, LayerInfo, Matrices, ModelRecord, Precision, Split, Storage,
    };
    let tmp = tempfile::tempdir().unwrap();
    let ds = LayerDataset {
        layer: LayerInfo {
            index: 46,
            name: "unet.x.attn2.to_q.lora.down.weight".into(),
            source_shape: vec![2, 3],
            transform: "lora_product".into(),
        },
        n: 2,
        d_h: 2,
        d_w: 3,
        weights: Matrices::Factored {
            rank: 2,
            up: vec![1.0, 2.0, 3.0, 4.0, 1.0, 0.0, -1.0, 0.0],
            down: vec![1.0, 0.0, 2.0, 0.0, 1.0, -1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0],
        },
        models: (0..2)
            .map(|i| ModelRecord {
                id: format!("m{i}"),
                split: Split::Train,
                source_digest: String::new(),
            })
            .collect(),
        label_key: "k".into(),
        labels: Labels::Numeric {
            targets: vec![0.5, 1.5],
            transform: "identity".into(),
        },
        skipped: vec![],
    };
    let src = tmp.path().join("factored");
    std::fs::create_dir_all(&src).unwrap();
    ds.save(&src, Precision::F32).unwrap();
    let out = tmp.path().join("out");
    let (code, err) = probex(&["export", src.to_str().unwrap(), out.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let back = LayerDataset::load(&out).unwrap();
    assert_eq!(
        LayerDataset::load_sidecar(&out).unwrap().storage,
        Storage::Stacked
    );
    assert_eq!(
        back.weights,
        Matrices::Stacked(vec![
            1.0, 2.0, 0.0, 3.0, 4.0, 2.0, 2.0, 3.0, 4.0, -2.0, -3.0, -4.0
        ])
    );
    assert_eq!(back.labels, ds.labels);

    let (code, err) = probex(&["export", src.to_str().unwrap(), src.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("the dataset itself"), "{err}");
    let (code, err) = probex(&[
        "export",
        tmp.path().to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("holds no layer dataset"), "{err}");
    let cache = tmp.path().join("cache");
    let (code, err) = probex(&[
        "export",
        "abc123",
        out.to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no cache entry's key starts with"), "{err}");
}
