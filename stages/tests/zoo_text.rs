//! The `zoo` stage building a text-conditioned LoRA tree from two package inputs: the emoji
//! art and a text encoder (the tiny random BERT fixture in tests/golden/bert-tiny, standing in
//! for all-MiniLM-L6-v2). Checks that the encoder package is the one `lora.text.from` names,
//! that every LoRA adapts the text layers and records its prompt, and the errors for inputs
//! that do not fit.

mod stage_run;

use std::path::{Path, PathBuf};

use probex_engine::cache::Key;
use probex_engine::{Artifact, Inputs};
use probex_stages::zoo::Zoo;
use probex_weights::reader::read_header;
use probex_zoo::ZooConfig;
use probex_zoo::fixture::write_fixture_package;

fn package(stage: &str, dir: &Path) -> Artifact {
    Artifact {
        node: stage.into(),
        stage: stage.into(),
        key: Key::parse(&"0".repeat(64)).unwrap(),
        dir: dir.to_path_buf(),
        coords: Vec::new(),
        meta: serde_json::Value::Null,
        results: None,
    }
}

fn run_zoo(p: &ZooConfig, inputs: &Inputs, out: &Path) -> anyhow::Result<()> {
    stage_run::run(&Zoo, p, inputs, out, 2).map(|_| ())
}

const TREE: &str = r#"
name = "TinyText"
tree = "lora"
image_size = 8
lora = { loras_per_class = 2, rank = 2, denoiser = { hidden = [16, 8] }, base_steps = 10, base_batch_size = 16, steps = [6], n_training_samples = [3], batch_size = 8, text = { from = "encoder", encoder = "minilm", model_subdir = "pkg/model" } }
"#;

#[test]
fn zoo_stage_conditions_a_lora_tree_on_the_named_encoder_package() {
    let w = tempfile::tempdir().unwrap();
    let emoji = w.path().join("emoji");
    write_fixture_package(&emoji, 4).unwrap();
    // The encoder package: the model folder below the package root, as in the MiniLM wheel.
    let enc = w.path().join("encoder");
    let sub = enc.join("pkg/model");
    std::fs::create_dir_all(&sub).unwrap();
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/bert-tiny");
    for f in std::fs::read_dir(golden).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, sub.join(f.file_name().unwrap())).unwrap();
    }
    let config: ZooConfig = toml::from_str(TREE).unwrap();
    // Either order in `from`: the encoder is found by its stage name.
    let inputs = Inputs::new([(
        "package",
        vec![package("encoder", &enc), package("emoji", &emoji)],
    )]);
    let out = w.path().join("out");
    run_zoo(&config, &inputs, &out).unwrap();
    let loras: Vec<PathBuf> = walk(&out)
        .into_iter()
        .filter(|p| p.ends_with("pytorch_lora_weights.safetensors"))
        .collect();
    assert_eq!(loras.len(), 4 * 2);
    for path in &loras {
        let h = read_header(path).unwrap();
        let meta = &h.metadata;
        let class = meta["class_name"].replace('_', " ");
        assert_eq!(meta["instance_prompt"], format!("an emoji of a {class}"));
        // The fixture BERT is 32-wide: each text layer's adapter reads 32 values.
        let down = h
            .tensors
            .iter()
            .find(|t| t.name == "unet.down_blocks.0.attn2.to_v.lora.down.weight")
            .expect("a text-layer adapter");
        assert_eq!(down.shape, [2, 32]);
    }

    let err = |toml_text: &str, inputs: &Inputs| {
        let out = tempfile::tempdir().unwrap();
        let config: ZooConfig = toml::from_str(toml_text).unwrap();
        format!("{:#}", run_zoo(&config, inputs, out.path()).unwrap_err())
    };
    let emoji_only = Inputs::new([("package", vec![package("emoji", &emoji)])]);
    let missing = err(TREE, &emoji_only);
    assert!(
        missing.contains("not a package stage in this stage's `from`"),
        "{missing}"
    );
    let unconditioned = TREE.replace(
        ", text = { from = \"encoder\", encoder = \"minilm\", model_subdir = \"pkg/model\" }",
        "",
    );
    assert_ne!(unconditioned, TREE);
    let extra = err(&unconditioned, &inputs);
    assert!(
        extra.contains("names 2 package stages (encoder, emoji)") && !extra.contains("  "),
        "{extra}"
    );
    let no_emoji = err(
        TREE,
        &Inputs::new([("package", vec![package("encoder", &enc)])]),
    );
    assert!(no_emoji.contains("no emoji package"), "{no_emoji}");
    let wrong_dir = err(&TREE.replace("pkg/model", "pkg/nothing"), &inputs);
    assert!(
        wrong_dir.contains("pkg/nothing") && wrong_dir.contains("text encoder"),
        "{wrong_dir}"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
