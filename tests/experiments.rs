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

/// The planted experiment runs end to end through the binary with its expectations met (exit
/// 0), and the same file with an impossible expectation exits 1, reusing every cached node.
#[test]
fn planted_experiment_passes_and_an_impossible_expectation_exits_1() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let data = root.join("experiments/data/planted");
    let text = std::fs::read_to_string(root.join("experiments/planted.toml"))
        .unwrap()
        .replace(
            "path = \"data/planted\"",
            &format!("path = {:?}", data.display().to_string()),
        );
    let run = |name: &str, text: &str| {
        let file = tmp.path().join(name);
        std::fs::write(&file, text).unwrap();
        Command::new(env!("CARGO_BIN_EXE_probex"))
            .args(["run", "--progress", "plain", "--cache"])
            .arg(tmp.path().join("cache"))
            .arg("--out")
            .arg(tmp.path().join(name).with_extension("run"))
            .arg(&file)
            .output()
            .unwrap()
    };
    let ok = run("planted.toml", &text);
    let out =
        String::from_utf8_lossy(&ok.stdout).to_string() + &String::from_utf8_lossy(&ok.stderr);
    assert_eq!(ok.status.code(), Some(0), "{out}");
    assert!(
        out.contains("best_probex") && out.contains("| Method"),
        "{out}"
    );
    let impossible = text.replace(
        "\"report.best_probex.test.accuracy\" = \"> 0.6\"",
        "\"report.best_probex.test.accuracy\" = \">= 1.01\"",
    );
    assert_ne!(impossible, text);
    let missed = run("impossible.toml", &impossible);
    let out = String::from_utf8_lossy(&missed.stdout).to_string()
        + &String::from_utf8_lossy(&missed.stderr);
    assert_eq!(missed.status.code(), Some(1), "{out}");
    assert!(out.contains("1.01"), "{out}");
}
