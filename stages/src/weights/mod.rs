//! Reading model weights: a hostile-input-safe safetensors reader, the paper's layer lists and
//! indexing, layer selectors, the tensor-to-matrix transforms, and the header encoder probex's
//! own safetensors files share.

pub mod arch;
pub mod layers;
pub mod partial;
pub mod reader;
pub mod select;
pub mod transform;
pub mod writer;

pub use arch::Architecture;
pub use layers::{
    LayerIndex, LayerList, LayerMode, LayerRow, Listing, TensorRow, describe_layers,
    format_layer_table, layer_index, layer_rows, list_layers, listing,
};
pub use reader::{Header, Safetensors, SafetensorsFile, TensorEntry, WeightsError};
pub use select::LayerSelector;
pub use transform::Transform;
