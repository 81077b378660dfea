//! Reading model weights: a hostile-input-safe safetensors reader, the paper's layer indexing,
//! layer selectors and the tensor-to-matrix transforms.

pub mod layers;
pub mod partial;
pub mod reader;
pub mod select;
pub mod transform;

pub use layers::{LayerMode, LayerRow, format_layer_table, layer_index, layer_rows, list_layers};
pub use reader::{Header, Safetensors, SafetensorsFile, TensorEntry, WeightsError};
pub use select::LayerSelector;
pub use transform::Transform;
