//! The stage kinds at the edges (issue 23): a bad model file on a layer sweep is one error,
//! said once; a write that fails is about the output, not the models, and says its cause once.
//!
//! Full disks: without root, a file-size limit (`RLIMIT_FSIZE`, `SIGXFSZ` ignored so a write
//! past it fails with `EFBIG`) on a child process (this test binary, run again on one test that
//! only works when `PROBEX_EDGES_CHILD` names its directory); as root, also a 256 KiB tmpfs,
//! the only way to fail the row writes of a pre-sized (sparse) layer file.

mod experiment;
mod planted;

use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use probex_engine::run::NodeState;

const SWEEP: &str = r#"
[experiment]
name = "sweep"

[stage.models]
kind = "fetch"
source = "dir"
path = "models"

[stage.layers]
kind = "extract"
from = "models"
layers = "all"
splits = { metadata = { key = "split" } }
label = { key = "dataset_chosen_targets", kind = "multi_label", vocab = "cifar100" }
"#;

#[test]
fn a_bad_model_file_fails_a_layer_sweep_once() {
    let dir = tempfile::tempdir().unwrap();
    let models = planted::planted_tree(&dir.path().join("models"), 20, 8, 6, 1);
    // Cut short after its header: every layer read from it fails, in one pass over the files.
    let bad = &models[5].0;
    let bytes = std::fs::read(bad).unwrap();
    std::fs::write(bad, &bytes[..bytes.len() - 10]).unwrap();
    std::fs::write(dir.path().join("sweep.toml"), SWEEP).unwrap();

    let report = experiment::run(
        &dir.path().join("sweep.toml"),
        &dir.path().join("cache"),
        None,
        true,
    );
    assert!(!report.success());
    let layers: Vec<_> = report
        .nodes
        .iter()
        .filter(|n| n.stage == "layers")
        .collect();
    // The planted tree's two weight matrices (its bias is in no layer list).
    assert_eq!(layers.len(), 2, "{:?}", report.nodes);
    let failed: Vec<_> = report.failures().collect();
    assert_eq!(failed.len(), 1, "one error, said once: {:?}", report.nodes);
    let NodeState::Failed(e) = &failed[0].state else {
        unreachable!()
    };
    let name = bad.file_name().unwrap().to_string_lossy();
    assert!(e.contains(&*name), "the error names the bad file: {e}");
    let with: Vec<_> = report.failed_with(&failed[0].node).collect();
    assert_eq!(with.len(), 1, "{:?}", report.nodes);
    // The record says it once too.
    let md = std::fs::read_to_string(report.run_dir.join("report.md")).unwrap();
    assert_eq!(md.matches(&*name).count(), 1, "{md}");
    assert!(
        md.contains("1 more node(s) computed in the same pass failed with it"),
        "{md}"
    );
}

/// The error of the `layers` node when the sweep of `dir` runs with its cache at `cache`.
fn sweep_error(dir: &Path, cache: &Path) -> String {
    let report = experiment::run(&dir.join("sweep.toml"), cache, None, true);
    let failed: Vec<_> = report.failures().collect();
    match failed.as_slice() {
        [f] => match &f.state {
            NodeState::Failed(e) => e.clone(),
            _ => unreachable!(),
        },
        _ => panic!("expected one failure: {:?}", report.nodes),
    }
}

/// A sweep whose layer files (20 models of 64x64 f32, 320 KiB each, copied: read in place
/// they would write next to nothing) outgrow what a small disk or file-size limit allows,
/// while the collection and the run record fit.
fn big_sweep(dir: &Path) {
    planted::planted_tree(&dir.join("models"), 20, 64, 64, 1);
    std::fs::write(dir.join("sweep.toml"), format!("{SWEEP}copy = true\n")).unwrap();
}

/// Runs only as the child of `a_write_error_says_the_output_and_its_cause_once`.
#[test]
fn child_runs_the_sweep_under_a_file_size_limit() {
    let Some(dir) = std::env::var_os("PROBEX_EDGES_CHILD") else {
        return;
    };
    let dir = Path::new(&dir);
    println!(
        "RESULT {}",
        sweep_error(dir, &dir.join("cache")).replace('\n', " | ")
    );
}

#[test]
fn a_write_error_says_the_output_and_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    big_sweep(dir.path());
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "child_runs_the_sweep_under_a_file_size_limit",
        "--exact",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env("PROBEX_EDGES_CHILD", dir.path());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: 64 * 1024,
                rlim_max: 64 * 1024,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let result = text
        .lines()
        .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
        .unwrap_or_else(|| {
            panic!(
                "the child said nothing: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    // The output's folder in the staging area (the file is created in it).
    assert!(
        result.contains("cache/tmp/stage-"),
        "names the output: {result}"
    );
    assert!(!result.contains("model(s) failed"), "{result}");
    assert_eq!(
        result.matches("File too large").count(),
        1,
        "the cause once: {result}"
    );
}

/// A small tmpfs mounted for the test and unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    /// `None` where this process may not mount (not root): the caller skips, saying why.
    fn mount(at: &Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallDisk(at.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_under_extract_is_an_output_error_not_the_models() {
    let dir = tempfile::tempdir().unwrap();
    big_sweep(dir.path());
    // A layer file is created at its full (sparse) size, so only a really full file system
    // fails its rows: a file-size limit fails its creation instead (the test above).
    let Some(disk) = SmallDisk::mount(&dir.path().join("small"), "256k") else {
        eprintln!("skipped: mounting a 256 KiB tmpfs needs root (CAP_SYS_ADMIN)");
        return;
    };
    let e = sweep_error(dir.path(), &disk.0.join("cache"));
    assert!(e.contains("layer.safetensors"), "names the output: {e}");
    assert!(e.contains("No space left on device"), "{e}");
    assert!(!e.contains("model(s) failed"), "{e}");
    assert_eq!(e.matches("No space left on device").count(), 1, "{e}");
}

#[test]
fn dangling_and_looping_model_links_are_warned_about() {
    use probex_stages::extract::{Layout, discover};
    use std::os::unix::fs::symlink;

    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    planted::planted_tree(&models, 6, 4, 3, 1);
    symlink(models.join("gone.bin"), models.join("dangling.safetensors")).unwrap();
    symlink(models.join("b.safetensors"), models.join("a.safetensors")).unwrap();
    symlink(models.join("a.safetensors"), models.join("b.safetensors")).unwrap();

    let found = discover(&Layout::Folder {
        root: models.clone(),
        recursive: false,
    })
    .unwrap();
    assert_eq!(found.models.len(), 6);
    assert_eq!(found.problems.len(), 3, "{:?}", found.problems);
    let all = found.problems.join("\n");
    assert!(
        all.contains("dangling.safetensors: is a symbolic link to"),
        "{all}"
    );
    assert!(all.contains("does not exist (dangling)"), "{all}");
    assert!(all.contains("Too many levels of symbolic links"), "{all}");

    // Through a run: the terminal summary and the report say it.
    std::fs::write(
        dir.path().join("links.toml"),
        "[stage.models]\nkind = \"fetch\"\nsource = \"dir\"\npath = \"models\"\nlayout = \"folder\"\n",
    )
    .unwrap();
    let report = experiment::run(
        &dir.path().join("links.toml"),
        &dir.path().join("cache"),
        None,
        true,
    );
    assert!(report.success(), "{:?}", report.nodes);
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    let w = &report.warnings[0];
    assert!(
        w.message
            .starts_with("passed over 3 file(s) named like models"),
        "{w:?}"
    );
    let md = std::fs::read_to_string(report.run_dir.join("report.md")).unwrap();
    assert!(
        md.contains("## Warnings") && md.contains("passed over 3 file(s)"),
        "{md}"
    );
}

#[test]
fn models_left_out_are_counted_in_the_summary_and_the_report_with_their_list() {
    let dir = tempfile::tempdir().unwrap();
    let models = planted::planted_tree(&dir.path().join("models"), 20, 8, 6, 1);
    let bad = &models[5].0;
    let bytes = std::fs::read(bad).unwrap();
    std::fs::write(bad, &bytes[..bytes.len() - 10]).unwrap();
    std::fs::write(
        dir.path().join("sweep.toml"),
        format!("{SWEEP}on_bad_file = \"skip\"\n"),
    )
    .unwrap();
    let cache = dir.path().join("cache");
    for (run, fresh) in [("r1", true), ("r2", false)] {
        let report = experiment::run(
            &dir.path().join("sweep.toml"),
            &cache,
            Some(&dir.path().join(run)),
            true,
        );
        assert!(report.success(), "{:?}", report.nodes);
        // Said again by a run that finds the layers cached.
        let computed = report.nodes.iter().any(|n| n.state == NodeState::Ran);
        assert_eq!(computed, fresh);
        assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
        let w = &report.warnings[0];
        assert!(w.message.starts_with("left out 1 of 20 models"), "{w:?}");
        assert_eq!(w.nodes.len(), 2, "{w:?}");
        let files = w.files.as_ref().expect("the list is published");
        let list = std::fs::read_to_string(files.join("skipped.json")).unwrap();
        let name = bad.file_name().unwrap().to_string_lossy();
        assert!(list.contains(&*name), "{list}");
        let md = std::fs::read_to_string(report.run_dir.join("report.md")).unwrap();
        assert!(md.contains("left out 1 of 20 models"), "{md}");
        assert!(md.contains("(files: `layers_layer=0_/`)"), "{md}");
    }
}

#[test]
fn train_range_errors_point_at_the_value_and_counts_have_an_upper_bound() {
    let dir = tempfile::tempdir().unwrap();
    let base = "[stage.models]\nkind = \"fetch\"\nsource = \"dir\"\npath = \"models\"\n\n\
                [stage.layers]\nkind = \"extract\"\nfrom = \"models\"\nlayers = \"all\"\n\
                label = { key = \"dataset_chosen_targets\", kind = \"multi_label\", vocab = \"cifar100\" }\n\n\
                [stage.probe]\nkind = \"train\"\nfrom = \"layers\"\nfor_each = \"layer\"\nmodel = \"probex\"\n";
    // (line, column, what it says) of the error for each bad line appended at line 17.
    for (bad, col, says) in [
        (
            "epochs = 9223372036854775807",
            10,
            "`epochs` = 9223372036854775807 is too large",
        ),
        ("epochs = 0", 10, "`epochs` must be at least 1"),
        ("batch_size = 0", 14, "`batch_size` must be at least 1"),
        ("lr = -0.001", 6, "`lr` must be a positive number"),
    ] {
        assert_load_error_at(dir.path(), &format!("{base}{bad}\n"), (17, col), says);
    }
}

/// Writes `text` as `bad.toml` in `dir`, loads it, and checks the error says `says` with a caret
/// at `line:col` of that file.
fn assert_load_error_at(
    dir: &std::path::Path,
    text: &str,
    (line, col): (usize, usize),
    says: &str,
) {
    let path = dir.join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let err = match probex_engine::load(&path, &probex_stages::registry(probex_hub::connect)) {
        Ok(_) => panic!("{text}: loaded"),
        Err(d) => d.to_string(),
    };
    assert!(err.contains(says), "{text}: {err}");
    assert!(
        err.contains(&format!("bad.toml:{line}:{col}\n")),
        "{text}: {err}"
    );
    assert!(err.contains('^'), "{text}: {err}");
}

#[test]
fn an_empty_model_folder_is_described_in_words() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("models")).unwrap();
    let e = probex_stages::extract::discover(&probex_stages::extract::Layout::Folder {
        root: dir.path().join("models"),
        recursive: false,
    })
    .unwrap_err();
    assert!(
        matches!(&e, probex_stages::extract::DiscoverError::NoModels { passed, .. } if passed.is_empty()),
        "{e:?}"
    );
    let e = e.to_string();
    assert!(!e.contains("Folder {") && !e.contains("root:"), "{e}");
    assert!(e.contains("no *.safetensors files in the folder"), "{e}");
}

/// A kind's objection names the key it blames ([`probex_engine::ParamError::at`]); the
/// diagnostic points at that value, inside a table or an array where the key is a path, and
/// for the objections found only once the inputs' facts are known (`select`'s `by`).
#[test]
fn param_errors_point_at_the_value_they_blame_nested_or_found_at_plan_time() {
    let dir = tempfile::tempdir().unwrap();
    let base = "[stage.emoji]\nkind = \"fetch\"\nsource = \"npm\"\npackage = \"emoji-datasource\"\n\
                version = \"16.0.0\"\n\
                sha256 = \"2006725061dc0098daa832d65f854a7bec0740af2eb47cb5b23d89f7e2c849f9\"\n\n";
    // (stage table, line, column, what it says): the stage table starts at line 8.
    let cases = [
        (
            "[stage.tree]\nkind = \"zoo\"\nfrom = \"emoji\"\nname = \"t\"\n\
             finetune = { samples_per_class = 8, epochs = [] }\n",
            12,
            46,
            "`finetune.epochs` is empty",
        ),
        (
            "[stage.tree]\nkind = \"zoo\"\nfrom = \"emoji\"\nname = \"t\"\nmodels = 0\n",
            12,
            10,
            "`models` must be at least 1",
        ),
        (
            "[stage.text]\nkind = \"embed\"\nfrom = \"emoji\"\nencoder = \"clip-text\"\n\
             classes = [\"cat\", \" \"]\n",
            12,
            19,
            "`classes[1]` is empty",
        ),
        (
            "[stage.tree]\nkind = \"zoo\"\nfrom = \"emoji\"\nname = \"t\"\nmodels = 10\n\n\
             [stage.layers]\nkind = \"extract\"\nfrom = \"tree\"\nlayers = \"all\"\n\
             label = { key = \"dataset_chosen_targets\", kind = \"multi_label\", vocab = \"cifar100\" }\n\n\
             [stage.probe]\nkind = \"train\"\nfrom = \"layers\"\nfor_each = \"layer\"\nmodel = \"dense\"\n\n\
             [stage.best]\nkind = \"select\"\nfrom = \"probe\"\nby = \"val.top1\"\n",
            29,
            6,
            "`by = \"val.top1\"` names no metric its probes report",
        ),
    ];
    for (stage, line, col, says) in cases {
        assert_load_error_at(dir.path(), &format!("{base}{stage}"), (line, col), says);
    }
}
