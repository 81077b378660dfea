//! One line per param of every stage kind, for `probex kinds KIND`. The names must be the
//! fields each kind's params accept (a test in `tests/kinds_help.rs` holds them to it), and no
//! default is written here: the engine computes them from the params types around `example`.
//! Each kind's `params_doc` returns its table from here, so the docs of all kinds read alike.

use probex_engine::ParamsDoc;

/// `fetch`.
pub const FETCH: ParamsDoc = ParamsDoc {
    example: r#"source = "dir""#,
    params: &[
        (
            "source",
            "where the models come from: dir, hub, npm, pypi or deb",
        ),
        ("path", "dir: the folder, relative to the experiment file"),
        (
            "layout",
            "how the folder (or Hub repo) is laid out: folder, hf_cache, model_j_discriminative, model_j_generative",
        ),
        (
            "file",
            "the model file inside each model's folder or repo; with hub and `repo`, a glob makes every match a model",
        ),
        (
            "repos",
            "dir (hf_cache): a glob of repo ids to keep; hub: a list of repo ids, one model each",
        ),
        (
            "revision",
            "the branch, tag or commit to read (hub: pinned to a commit sha at plan time)",
        ),
        ("recursive", "folder: also look in subfolders"),
        ("repo", "hub: one repo holding the models"),
        (
            "model_j",
            "hub: a Model-J subset (SupViT, DINO, MAE, ResNet, SD_200, SD_1k)",
        ),
        (
            "mode",
            "hub: `tensors` (only the selected tensors, by HTTP range) or `files` (whole files)",
        ),
        (
            "tensors",
            "hub, tensors mode: tensor names or globs to fetch",
        ),
        (
            "layers",
            "hub, tensors mode: layers to fetch, with extract's syntax and indexing",
        ),
        (
            "layer_mode",
            "hub, tensors mode: the layer list `layers` counts in (as extract's `mode`)",
        ),
        (
            "extra_files",
            "hub: other files of each repo fetched whole (a text encoder's config.json, tokenizer.json)",
        ),
        (
            "endpoint",
            "hub: the endpoint (default HF_ENDPOINT, else the public Hub); not part of the key",
        ),
        (
            "cache_dir",
            "hub: the Hugging Face cache (default HF_HUB_CACHE or $HF_HOME/hub); not part of the key",
        ),
        (
            "tensor_cache",
            "hub: probex's tensor cache (default PROBEX_TENSOR_CACHE); not part of the key",
        ),
        (
            "concurrency",
            "hub: transfers at once (8 when unset); not part of the key",
        ),
        (
            "package",
            "npm/pypi/deb: the package name as the registry spells it",
        ),
        ("version", "npm/pypi/deb: the exact version"),
        (
            "sha256",
            "npm/pypi/deb: sha256 of the archive; a mismatch is an error",
        ),
        (
            "unpack",
            "npm/pypi/deb: caps on unpacking (`max_total_bytes`, `max_entries`); not part of the key",
        ),
    ],
};

/// `extract`.
pub const EXTRACT: ParamsDoc = ParamsDoc {
    example: r#"layers = "all"
label = { key = "class", kind = "class" }"#,
    params: &[
        (
            "layers",
            "which layers: `all`, an index, a range, a list or a tensor-name glob; one node per layer",
        ),
        (
            "mode",
            "the layer list: auto (the paper's for a known architecture), vit, resnet, lora, matrices, tensors",
        ),
        (
            "label",
            "what the probe predicts: a `__metadata__` key and how to read it (class, multi_label, numeric)",
        ),
        (
            "splits",
            "where train/val/test splits come from (default: the layout)",
        ),
        (
            "precision",
            "on-disk precision of the matrices (default: as the model files store them)",
        ),
        (
            "non_finite",
            "NaN/Inf weights: fail, skip the model, or zero them (under fail, rows read in \
             place are checked when read: training fails naming the model)",
        ),
        (
            "on_bad_file",
            "unreadable files, missing tensors, shape mismatches: fail or skip the model",
        ),
        (
            "copy",
            "copy every layer's rows into the dataset instead of reading them in place",
        ),
        (
            "tree",
            "with a routing input: only this tree (the sweep sets it for each node)",
        ),
    ],
};

/// `embed`.
pub const EMBED: ParamsDoc = ParamsDoc {
    example: r#"encoder = "minilm""#,
    params: &[
        ("encoder", "the text encoder: minilm or clip-text"),
        ("template", "the prompt, with one `{}` for the class name"),
        (
            "classes",
            "class names to embed, when no layer dataset gives them",
        ),
        (
            "model_dir",
            "a local model folder (relative to the experiment file) instead of a `package` input",
        ),
        (
            "model_subdir",
            "the model folder inside the `package` input (default: its root)",
        ),
        (
            "precision",
            "f32, or f16 to round weights and every op's output to half precision as the authors' fp16 CLIP does",
        ),
    ],
};

/// `train`.
pub const TRAIN: ParamsDoc = ParamsDoc {
    example: r#"model = "probex""#,
    params: &[
        (
            "model",
            "the probe: probex, probex-zeroshot, dense, dense-zeroshot or statnn (the defaults follow it)",
        ),
        ("lr", "Adam learning rate"),
        (
            "weight_decay",
            "L2 weight decay added to the gradient (PyTorch Adam's `weight_decay`)",
        ),
        ("beta1", "Adam beta1"),
        ("beta2", "Adam beta2"),
        ("eps", "Adam epsilon"),
        ("batch_size", "models per optimisation step"),
        ("epochs", "training epochs"),
        ("validate_every", "validate after every this many epochs"),
        (
            "checkpoint_every",
            "save resume state after every this many epochs (0: at every validation)",
        ),
        ("r_u", "number of probes (ProbeX)"),
        ("r_v", "width of the shared projection (ProbeX)"),
        (
            "r_t",
            "width of the encoding (ProbeX; the authors' scripts use 512)",
        ),
        ("hidden", "hidden width (StatNN)"),
        (
            "standardize",
            "standardise the input matrices by the training split's mean and scale",
        ),
        ("seed", "seed of initialisation and shuffling"),
    ],
};

/// `select`.
pub const SELECT: ParamsDoc = ParamsDoc {
    example: "",
    params: &[
        (
            "by",
            "path of the metric in each probe's results (val.accuracy, val.top1, val.r2)",
        ),
        (
            "direction",
            "whether larger (max) or smaller (min) is better",
        ),
    ],
};

/// `evaluate`.
pub const EVALUATE: ParamsDoc = ParamsDoc {
    example: "",
    params: &[
        (
            "k",
            "neighbours for one-class kNN scores and kNN classification (the paper's 2)",
        ),
        (
            "retrieve",
            "neighbours listed per query in the retrieval CSV, scored as precision@N (default: k)",
        ),
        (
            "downstream",
            "run the downstream tasks on the encodings (off: test metrics only)",
        ),
        ("title", "title of the report (default: the node's name)"),
    ],
};

/// `route`.
pub const ROUTE: ParamsDoc = ParamsDoc {
    example: r#"layers = 0"#,
    params: &[
        (
            "layers",
            "the layers whose weights place a model, as extract's `layers` (several are concatenated)",
        ),
        (
            "mode",
            "the layer list `layers` counts in, as extract's `mode`",
        ),
        (
            "trees",
            "how many trees: a number, or \"auto\" (the best-separated cut)",
        ),
        (
            "min_silhouette",
            "with trees = \"auto\": the mean silhouette a cut must reach to split an architecture",
        ),
        (
            "margin",
            "a tree's threshold is `margin` times its farthest training model's distance from the centre",
        ),
        (
            "sample",
            "compare at most this many evenly spaced weights per model (0: all)",
        ),
        (
            "splits",
            "where splits come from, as in extract; training models define the trees",
        ),
        (
            "truth",
            "a metadata key holding each model's true tree, to score the routing",
        ),
    ],
};

/// `zoo`.
pub const ZOO: ParamsDoc = ParamsDoc {
    example: "",
    params: &[
        (
            "name",
            "tree name in repository ids (`Model-J__{name}__model_idx_0000`)",
        ),
        ("tree", "discriminative or lora"),
        ("architecture", "discriminative trees: mlp or vit"),
        ("models", "fine-tuned models per base (discriminative)"),
        (
            "bases",
            "number of base models (one tree each when discriminative; mixed in one repo for lora)",
        ),
        ("seed", "root seed"),
        ("layout", "on-disk layout of the models"),
        ("styles", "emoji art styles (google, twitter)"),
        ("image_size", "image side in pixels: 32, 16 or 8"),
        ("splits", "split fractions of the models"),
        (
            "write_base",
            "also write each base model under bases/{tree}/model.safetensors",
        ),
        ("mlp", "MLP shape"),
        ("vit", "ViT shape"),
        ("pretrain", "base pretraining (discriminative)"),
        (
            "finetune",
            "fine-tune hyperparameter space (discriminative)",
        ),
        ("lora", "LoRA tree settings"),
    ],
};
