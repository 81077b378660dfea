//! The paper's per-architecture layer lists: which tensors of a model file are layers, and in
//! what order.
//!
//! ProbeX's layer `N` is the `N`-th name of a **per-architecture list of weight tensors**,
//! sorted lexicographically (byte order, as Python's `sorted`, so `layer.10` comes before
//! `layer.2`). It is not the position among all of a file's tensors: biases, norm weights,
//! `cls_token` and the ViT patch-embedding conv are not layers. Every index the paper reports
//! (ViT 59 and 64, ResNet 59, SD LoRA 46) counts in these lists, so probex uses them too:
//!
//! - [`Architecture::Vit`] (Hugging Face `ViTForImageClassification` names: SupViT, DINO, MAE):
//!   `classifier.weight`, `vit.embeddings.position_embeddings`, and for each encoder block `N`
//!   the six matrices `vit.encoder.layer.N.attention.attention.{query,key,value}.weight`,
//!   `...attention.output.dense.weight`, `...intermediate.dense.weight`,
//!   `...output.dense.weight`: 2 + 6 x blocks names, 74 for ViT-B's 12 blocks. Index 0 is
//!   `classifier.weight`, 1 the position embeddings, 59
//!   `vit.encoder.layer.7.attention.output.dense.weight`, 64
//!   `vit.encoder.layer.8.attention.attention.value.weight`. The rule takes the blocks the file
//!   has (a ViT-L's 24 give 146 layers), but they must be blocks `0..B` with all six matrices,
//!   and the classifier and position embeddings must be there: any gap would silently shift
//!   every later index, so an incomplete ViT is an error (choose `matrices` or `tensors`).
//! - [`Architecture::Resnet`] (Hugging Face `ResNetForImageClassification` names): every
//!   `resnet.*.convolution.weight` (the embedder, three per bottleneck, the shortcuts) and
//!   `classifier.1.weight`: 105 for ResNet-101. Index 0 is `classifier.1.weight`, 1
//!   `resnet.embedder.embedder.convolution.weight`, 59
//!   `resnet.encoder.stages.2.layers.19.layer.0.convolution.weight`. Other depths follow the same
//!   rule (ResNet-50: 54).
//! - [`Architecture::SdLora`] (diffusers LoRA names): the sorted `.lora.down.weight` names, each
//!   paired with its `.lora.up.weight` (the layer is `X = B @ A`): 128 for SD1.x, 46 is
//!   `unet.down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_q`. Any file with LoRA
//!   factors follows it.
//! - [`Architecture::Matrices`], the fallback for every other file: the weight matrices, meaning
//!   floating-point tensors with two or more axes longer than one (what is left after squeezing
//!   singleton axes has two or more dimensions). Biases, norm weights and scalars are never in
//!   it; a conv kernel is. The paper does not define indices for such models, so this is
//!   probex's rule, and `probex layers` and the extract log say when it was used.
//! - [`Architecture::AllTensors`], only on request (`mode = "tensors"`): every tensor of the
//!   file, biases and norms included as `[n, 1]` columns (what probex's indices meant before it
//!   had the paper's lists).
//!
//! Architectures are recognised from tensor names ([`Architecture::detect`]): LoRA factors
//! first (a LoRA file names the layers it adapts, which may look like anything), then the
//! `vit.` and `resnet.` prefixes Hugging Face gives those models, else the fallback.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::reader::{Header, TensorEntry};

/// The marker of a LoRA down factor in a tensor name (diffusers' LoRA format).
pub const LORA_DOWN: &str = ".lora.down.weight";
/// The marker of the matching up factor.
pub const LORA_UP: &str = ".lora.up.weight";

/// Hugging Face ViT: the classifier head (a layer, index 0).
const VIT_CLASSIFIER: &str = "classifier.weight";
/// Hugging Face ViT: the learned position embeddings (a layer, index 1).
const VIT_POSITION: &str = "vit.embeddings.position_embeddings";
/// Hugging Face ViT: the prefix of encoder block `N`'s tensors (`vit.encoder.layer.N.`).
const VIT_BLOCK: &str = "vit.encoder.layer.";
/// Hugging Face ViT: the six weight matrices of one encoder block (after `vit.encoder.layer.N.`).
const VIT_BLOCK_MATRICES: [&str; 6] = [
    "attention.attention.query.weight",
    "attention.attention.key.weight",
    "attention.attention.value.weight",
    "attention.output.dense.weight",
    "intermediate.dense.weight",
    "output.dense.weight",
];
/// Hugging Face ResNet: the classifier head (`classifier` is `Sequential(Flatten, Linear)`).
const RESNET_CLASSIFIER: &str = "classifier.1.weight";
/// Hugging Face ResNet: the stem convolution, present in every ResNet.
const RESNET_STEM: &str = "resnet.embedder.embedder.convolution.weight";
/// Hugging Face ResNet: every convolution kernel ends so (biases and batch norms do not).
const RESNET_CONV: &str = ".convolution.weight";

/// Which layer list a model file's indices count in; see the module docs for each list.
///
/// Serialised as the `mode` value that selects it (`"vit"`, `"resnet"`, `"lora"`,
/// `"matrices"`, `"tensors"`), so a recorded list can be asked for again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Architecture {
    /// Hugging Face ViT: classifier, position embeddings, six matrices per block (74 for ViT-B).
    #[serde(rename = "vit")]
    Vit,
    /// Hugging Face ResNet: every convolution kernel and the classifier (105 for ResNet-101).
    #[serde(rename = "resnet")]
    Resnet,
    /// A LoRA file: the `.lora.down.weight` factors, each paired with its up factor (128 for
    /// SD1.x).
    #[serde(rename = "lora")]
    SdLora,
    /// The fallback: floating-point tensors with two or more axes longer than one.
    #[serde(rename = "matrices")]
    Matrices,
    /// Every tensor of the file (on request only).
    #[serde(rename = "tensors")]
    AllTensors,
}

impl Architecture {
    /// The list a file with this header follows when nothing is asked for: LoRA factors, else
    /// Hugging Face's `vit.` or `resnet.` names, else the weight-matrix fallback. Never
    /// [`Architecture::AllTensors`], which is only chosen explicitly.
    ///
    /// Detection only looks at names; [`Architecture::check`] then says whether the file
    /// really holds the whole list.
    pub fn detect(header: &Header) -> Architecture {
        let names = || header.tensors.iter().map(|t| t.name.as_str());
        if names().any(|n| n.contains(LORA_DOWN)) {
            Architecture::SdLora
        } else if names().any(|n| n == VIT_POSITION || n.starts_with(VIT_BLOCK)) {
            Architecture::Vit
        } else if names()
            .any(|n| n.starts_with("resnet.embedder.") || n.starts_with("resnet.encoder."))
        {
            Architecture::Resnet
        } else {
            Architecture::Matrices
        }
    }

    /// The `mode` value naming this list (`vit`, `resnet`, `lora`, `matrices`, `tensors`).
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::Vit => "vit",
            Architecture::Resnet => "resnet",
            Architecture::SdLora => "lora",
            Architecture::Matrices => "matrices",
            Architecture::AllTensors => "tensors",
        }
    }

    /// One sentence saying what the list holds, for `probex layers` and the extract log.
    pub fn rule(self) -> &'static str {
        match self {
            Architecture::Vit => {
                "the paper's ViT list (Hugging Face ViT names): classifier.weight, the position \
                 embeddings and the 6 weight matrices of each encoder block, sorted (74 for \
                 ViT-B); biases, norms, cls_token and the patch embedding are not layers"
            }
            Architecture::Resnet => {
                "the paper's ResNet list (Hugging Face ResNet names): every convolution kernel \
                 and classifier.1.weight, sorted (105 for ResNet-101); batch norms and biases \
                 are not layers"
            }
            Architecture::SdLora => {
                "the paper's LoRA list: the .lora.down.weight names, sorted, each with its up \
                 factor (X = B @ A; 128 for SD1.x)"
            }
            Architecture::Matrices => {
                "no known architecture: the fallback, weight matrices only (floating-point \
                 tensors with two or more dimensions after squeezing), sorted; biases and norms \
                 are not layers"
            }
            Architecture::AllTensors => {
                "every tensor, sorted (mode = \"tensors\"); vectors become [n, 1] columns"
            }
        }
    }

    /// Whether tensor `t` is in this list. A per-tensor test, so an index can be computed by
    /// counting the listed tensors before a name; whether the whole list is present is
    /// [`Architecture::check`]'s question.
    pub fn lists(self, t: &TensorEntry) -> bool {
        let n = t.name.as_str();
        match self {
            Architecture::Vit => n == VIT_CLASSIFIER || n == VIT_POSITION || vit_block(n).is_some(),
            Architecture::Resnet => {
                n == RESNET_CLASSIFIER || (n.starts_with("resnet.") && n.ends_with(RESNET_CONV))
            }
            Architecture::SdLora => n.contains(LORA_DOWN),
            Architecture::Matrices => {
                super::layers::is_float(t.dtype) && t.shape.iter().filter(|&&d| d > 1).count() >= 2
            }
            Architecture::AllTensors => true,
        }
    }

    /// Checks that `header` holds this architecture's whole list, so that its indices are the
    /// paper's: a ViT needs its classifier, position embeddings and all six matrices of blocks
    /// `0..B`; a ResNet its classifier and stem. The message names what is missing and what to
    /// do. The other lists have nothing to check here (LoRA pairs are checked as rows are made).
    pub fn check(self, header: &Header) -> Result<(), IncompleteArchitecture> {
        match self {
            Architecture::Vit => check_vit(header),
            Architecture::Resnet => check_resnet(header),
            Architecture::SdLora | Architecture::Matrices | Architecture::AllTensors => Ok(()),
        }
    }

    /// The tensors of `header` in this list, in index order (`header.tensors` is sorted by
    /// name, so filtering keeps the paper's order).
    pub fn list(self, header: &Header) -> Vec<&TensorEntry> {
        header.tensors.iter().filter(|t| self.lists(t)).collect()
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// For a ViT block matrix name `vit.encoder.layer.N.<one of the six>`, the block `N`.
fn vit_block(name: &str) -> Option<usize> {
    let (n, rest) = name.strip_prefix(VIT_BLOCK)?.split_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    VIT_BLOCK_MATRICES
        .contains(&rest)
        .then(|| n.parse().ok())
        .flatten()
}

/// What to say after naming what a file lacks for the list it was taken for.
const OTHER_MODES: &str = "its indices would not be the paper's; if this is not meant to be \
                           that architecture, set `mode = \"matrices\"` (weight matrices) or \
                           `mode = \"tensors\"` (every tensor)";

/// A file that lacks tensors of the list it was taken for, so its indices would not be the
/// paper's.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "this looks like a {what} but lacks {}: {OTHER_MODES}",
    lacking(missing)
)]
pub struct IncompleteArchitecture {
    /// The architecture, in words (`Hugging Face ViT (`vit.` names)`).
    pub what: &'static str,
    /// Every tensor name it lacks.
    pub missing: Vec<String>,
}

/// The first five names of `names` in backticks, and how many more.
fn lacking(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
    let more = names.len().saturating_sub(shown.len());
    format!(
        "`{}`{}",
        shown.join("`, `"),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    )
}

fn missing(what: &'static str, names: &[String]) -> IncompleteArchitecture {
    IncompleteArchitecture {
        what,
        missing: names.to_vec(),
    }
}

fn check_vit(header: &Header) -> Result<(), IncompleteArchitecture> {
    // Blocks named anywhere under `vit.encoder.layer.N.`, and the matrices each one has.
    let mut blocks: BTreeMap<usize, BTreeSet<&str>> = BTreeMap::new();
    for t in &header.tensors {
        let Some(rest) = t.name.strip_prefix(VIT_BLOCK) else {
            continue;
        };
        let Some((n, rest)) = rest.split_once('.') else {
            continue;
        };
        if let Ok(n) = n.parse::<usize>() {
            blocks.entry(n).or_default().insert(rest);
        }
    }
    let mut absent = Vec::new();
    for name in [VIT_CLASSIFIER, VIT_POSITION] {
        if header.find(name).is_none() {
            absent.push(name.to_string());
        }
    }
    let count = blocks.keys().next_back().map_or(0, |&b| b + 1);
    if count == 0 {
        absent.push(format!("{VIT_BLOCK}0.{}", VIT_BLOCK_MATRICES[0]));
    }
    for b in 0..count {
        let have = blocks.get(&b);
        for m in VIT_BLOCK_MATRICES {
            if !have.is_some_and(|s| s.contains(m)) {
                absent.push(format!("{VIT_BLOCK}{b}.{m}"));
            }
        }
    }
    if absent.is_empty() {
        Ok(())
    } else {
        Err(missing("Hugging Face ViT (`vit.` names)", &absent))
    }
}

fn check_resnet(header: &Header) -> Result<(), IncompleteArchitecture> {
    let absent: Vec<String> = [RESNET_CLASSIFIER, RESNET_STEM]
        .into_iter()
        .filter(|n| header.find(n).is_none())
        .map(String::from)
        .collect();
    if absent.is_empty() {
        Ok(())
    } else {
        Err(missing("Hugging Face ResNet (`resnet.` names)", &absent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::Dtype;

    fn header(tensors: &[(&str, &[usize])]) -> Header {
        let mut tensors: Vec<TensorEntry> = tensors
            .iter()
            .map(|(n, s)| TensorEntry {
                name: n.to_string(),
                dtype: Dtype::F32,
                shape: s.to_vec(),
                span: 0..0,
            })
            .collect();
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        Header {
            tensors,
            metadata: Default::default(),
            data_start: 0,
            file_len: 0,
        }
    }

    #[test]
    fn detection_goes_by_names() {
        let lora = header(&[
            ("vit.encoder.layer.0.x.lora.down.weight", &[2, 4]),
            ("vit.encoder.layer.0.x.lora.up.weight", &[4, 2]),
        ]);
        assert_eq!(Architecture::detect(&lora), Architecture::SdLora);
        let vit = header(&[(VIT_POSITION, &[1, 5, 4])]);
        assert_eq!(Architecture::detect(&vit), Architecture::Vit);
        let resnet = header(&[(RESNET_STEM, &[4, 3, 7, 7])]);
        assert_eq!(Architecture::detect(&resnet), Architecture::Resnet);
        let mlp = header(&[("fc.weight", &[4, 3]), ("fc.bias", &[4])]);
        assert_eq!(Architecture::detect(&mlp), Architecture::Matrices);
    }

    #[test]
    fn vit_block_names_are_exact() {
        assert_eq!(
            vit_block("vit.encoder.layer.11.attention.output.dense.weight"),
            Some(11)
        );
        assert_eq!(vit_block("vit.encoder.layer.1.output.dense.bias"), None);
        assert_eq!(
            vit_block("vit.encoder.layer.1.layernorm_before.weight"),
            None
        );
        assert_eq!(vit_block("vit.encoder.layer.x.output.dense.weight"), None);
        assert_eq!(vit_block("vit.encoder.layer..output.dense.weight"), None);
    }

    #[test]
    fn an_incomplete_vit_names_what_it_lacks() {
        let mut names: Vec<String> = vec![VIT_CLASSIFIER.into(), VIT_POSITION.into()];
        for b in [0, 2] {
            for m in VIT_BLOCK_MATRICES {
                names.push(format!("{VIT_BLOCK}{b}.{m}"));
            }
        }
        let spec: Vec<(&str, &[usize])> = names.iter().map(|n| (n.as_str(), &[4, 4][..])).collect();
        let e = Architecture::Vit.check(&header(&spec)).unwrap_err();
        assert_eq!(e.what, "Hugging Face ViT (`vit.` names)");
        assert_eq!(e.missing.len(), 6, "{e:?}");
        let e = e.to_string();
        assert!(
            e.contains("vit.encoder.layer.1.attention.attention.query.weight")
                && e.contains("and 1 more")
                && e.contains("mode = \"matrices\""),
            "{e}"
        );
        let e = Architecture::Resnet
            .check(&header(&[(RESNET_STEM, &[4, 3, 7, 7])]))
            .unwrap_err();
        assert_eq!(e.missing, [RESNET_CLASSIFIER]);
        assert!(e.to_string().contains(RESNET_CLASSIFIER), "{e}");
    }
}
