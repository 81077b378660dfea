//! The commands the binary adds beside the engine's: clear errors and exit code 2 on bad
//! input (their behaviour on trained probes is tested in stages/tests/text.rs).

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

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
    use probex_weights::dataset::{
        Labels, LayerDataset, LayerInfo, Matrices, ModelRecord, Precision, Split, Storage,
    };
    let tmp = tempfile::tempdir().unwrap();
    let ds = LayerDataset {
        layer: LayerInfo {
            index: 46,
            name: "unet.x.attn2.to_q.lora.down.weight".into(),
            source_shape: vec![2, 3],
            transform: "lora_product".into(),
            list: Some(probex_weights::Architecture::SdLora),
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

fn probex_stdout(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_probex"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn layers_shows_the_file_position_beside_the_papers_index() {
    use probex_weights::shapes::{self, Dtype, VitConfig};
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model.safetensors");
    // ViT-B's 200 tensor names at tiny widths.
    let specs = shapes::vit(&VitConfig {
        hidden: 4,
        intermediate: 8,
        patch: 2,
        image: 4,
        channels: 1,
        ..VitConfig::b16(3)
    });
    shapes::write_safetensors(&model, &specs, Dtype::F16, &Default::default(), 0).unwrap();
    let path = model.to_str().unwrap();

    let (code, out, err) = probex_stdout(&["layers", path]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with("layer list: vit (74 layers of 200 tensors): the paper's ViT list"),
        "{out}"
    );
    let line = |n: &str| line_of(&out, n);
    // Position among all 200 tensors, then the paper's index.
    assert_eq!(
        line("vit.encoder.layer.7.attention.output.dense.weight"),
        ["157", "59"]
    );
    assert_eq!(
        line("vit.encoder.layer.8.attention.attention.value.weight"),
        ["171", "64"]
    );
    assert_eq!(line("classifier.weight"), ["1", "0"]);
    assert_eq!(
        line("vit.encoder.layer.7.attention.output.dense.bias"),
        ["156", "-"]
    );
    assert_eq!(line("vit.embeddings.cls_token"), ["2", "-"]);

    let (code, json, err) = probex_stdout(&["layers", path, "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["architecture"], "vit");
    assert_eq!(v["layers"], 74);
    let t = &v["tensors"][157];
    assert_eq!(
        t["name"],
        "vit.encoder.layer.7.attention.output.dense.weight"
    );
    assert_eq!(
        (t["position"].as_u64(), t["layer"].as_u64()),
        (Some(157), Some(59))
    );

    // Every tensor, on request: the index is the position.
    let (code, out, err) = probex_stdout(&["layers", path, "--mode", "tensors"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with("layer list: tensors (200 layers of 200 tensors)"),
        "{out}"
    );
    assert_eq!(
        line_of(&out, "vit.encoder.layer.7.attention.output.dense.weight"),
        ["157", "157"]
    );

    // A list the file does not hold is an error naming the file and what is missing.
    let (code, _, err) = probex_stdout(&["layers", path, "--mode", "resnet"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("model.safetensors") && err.contains("classifier.1.weight"),
        "{err}"
    );
}

/// The first two columns (file position, layer index) of tensor `name`'s row.
fn line_of(out: &str, name: &str) -> Vec<String> {
    out.lines()
        .find(|l| l.split_whitespace().nth(2) == Some(name))
        .unwrap_or_else(|| panic!("no line for {name} in\n{out}"))
        .split_whitespace()
        .take(2)
        .map(String::from)
        .collect()
}

/// The write end of a pipe whose read end is already closed (`probex ... | head -1` after
/// head has read its line): every write fails with EPIPE.
fn closed_pipe() -> Stdio {
    let mut fds = [0; 2];
    // SAFETY: `pipe` fills both descriptors; the read end is closed at once and the write end
    // is owned by the returned Stdio.
    unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        libc::close(fds[0]);
        Stdio::from(OwnedFd::from_raw_fd(fds[1]))
    }
}

/// A two-tensor safetensors file.
fn tiny_model(path: &std::path::Path) {
    let header = br#"{"a.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[16,32]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 32]);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_closed_stdout_ends_the_binarys_commands_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m.safetensors");
    tiny_model(&model);
    let model = model.to_str().unwrap();
    for args in [
        vec!["kinds"],
        vec!["layers", model],
        vec!["layers", "--json", model],
    ] {
        // Readable first: the command works.
        let (code, err) = probex(&args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        let out = Command::new(env!("CARGO_BIN_EXE_probex"))
            .args(&args)
            .stdout(closed_pipe())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// `probex kinds` lists the kinds; `probex kinds KIND` shows its params with the defaults its
/// params type fills in; an unknown kind is a usage error naming the closest.
#[test]
fn kinds_lists_kinds_and_describes_one() {
    let run = probex_stdout;
    let (code, out, err) = run(&["kinds"]);
    assert_eq!(code, Some(0), "{err}");
    for kind in ["fetch", "extract", "train", "select", "evaluate"] {
        assert!(out.lines().any(|l| l.starts_with(kind)), "{out}");
    }
    let (code, out, err) = run(&["kinds", "train"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("train (version "), "{out}");
    assert!(
        out.contains("\n  model (required; e.g. \"probex\")\n"),
        "{out}"
    );
    assert!(
        out.contains("\n  lr = 0.001\n      Adam learning rate\n"),
        "{out}"
    );
    assert!(out.contains("keys every stage takes:"), "{out}");
    let (code, out, err) = run(&["kinds", "select", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["params"][0]["name"], "by");
    assert_eq!(v["params"][0]["default"], "\"val.accuracy\"");
    let (code, _, err) = run(&["kinds", "trian"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("no stage kind `trian`"), "{err}");
    assert!(err.contains("did you mean `train`?"), "{err}");
}
