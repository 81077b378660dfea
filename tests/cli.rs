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
