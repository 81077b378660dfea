//! The Burn building blocks probex's Burn crates share: one PyTorch-style [`Linear`] layer, used
//! by the probe models (`probes`), the text encoders (`text`) and the zoo's small nets (`zoo`),
//! one [`LayerNorm`] (the text encoders' and the zoo's ViTs'),
//! the [`Precision`] a layer can round its weights and outputs to, and the host-side
//! [`transpose`] that moves a weight between PyTorch's layout and the one a product wants.
//!
//! A crate of its own, below the three: none of them depends on another for its layers, so
//! each still builds beside the others, and a layer has one home whatever uses it.

mod linear;
mod norm;
mod precision;
mod transpose;

pub use linear::{InitRng, Linear, LinearValues, WeightLayout};
pub use norm::LayerNorm;
pub use precision::Precision;
pub use transpose::{transpose, transpose_into};
