//! probex's data, read and written without Burn: model weight files, the labels in their
//! metadata, and the datasets made of them.
//!
//! - Reading model weights: a hostile-input-safe safetensors reader ([`reader`]), the paper's
//!   layer lists and indexing ([`layers`], [`arch`]), layer selectors ([`select`]), the
//!   tensor-to-matrix transforms ([`transform`]), the header encoder probex's own safetensors
//!   files share ([`writer`]) and partial files that hold a few tensors of a model ([`partial`]).
//! - [`labels`]: what a probe learns to predict, read from a model file's metadata.
//! - [`dataset`]: the layer dataset (`extract` writes it, `train` reads it) and
//!   [`embeddings`], the text-embedding table (`embed` writes it, zero-shot `train` reads it).
//! - [`shapes`]: Model-J's architectures as files of noise, for tests and benchmarks.
//! - [`gemm`] (matrix products on host slices) and [`rng`] (the seeded generator whose state
//!   is one `u64`), which the layer transforms and [`shapes`] need and the crates above share.
//!
//! It is a crate of its own because everything above it needs it and none of it needs Burn:
//! the fetch client, the probe models, the zoo and the stage kinds build on it, and an edit
//! here never waits for Burn, nor an edit there for this.

pub mod arch;
pub mod codec;
pub mod dataset;
pub mod embeddings;
pub mod gemm;
pub mod labels;
pub mod layers;
pub mod partial;
pub mod reader;
pub mod rng;
pub mod select;
pub mod shapes;
pub mod transform;
pub mod writer;

pub use arch::Architecture;
pub use layers::{
    LayerError, LayerIndex, LayerList, LayerMode, LayerRow, Listing, TensorRow, describe_layers,
    format_layer_table, layer_index, layer_rows, list_layers, listing,
};
pub use reader::{Header, Safetensors, SafetensorsFile, TensorEntry, WeightsError};
pub use select::{LayerSelector, SelectorError};
pub use transform::Transform;
