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
