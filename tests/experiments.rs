//! Every experiment file in `experiments/` loads and plans, offline and from an empty cache:
//! the paper's experiments (which need the Hub to run) show their Hub stages as pending with
//! the reason, the offline ones plan every node.

use std::path::Path;
use std::process::Command;

#[test]
fn every_experiment_file_plans_offline() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let mut files: Vec<_> = std::fs::read_dir(root.join("experiments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 9, "{files:?}");
    for f in &files {
        let out = Command::new(env!("CARGO_BIN_EXE_probex"))
            .args(["plan", "--offline", "--cache"])
            .arg(tmp.path().join("cache"))
            .arg(f)
            .env("HF_HOME", tmp.path().join("hf"))
            .env_remove("HF_HUB_CACHE")
            .env("PROBEX_PACKAGES", tmp.path().join("packages"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{}: exit {:?}\n{stdout}\n{stderr}",
            f.display(),
            out.status
        );
        let uses_hub = std::fs::read_to_string(f)
            .unwrap()
            .contains("source = \"hub\"");
        if uses_hub {
            assert!(
                stdout.contains("sources not identified") && stdout.contains("--offline"),
                "{}: {stdout}",
                f.display()
            );
        } else {
            assert!(stdout.contains("to run"), "{}: {stdout}", f.display());
        }
    }
}
