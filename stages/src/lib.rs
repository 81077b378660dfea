//! The stage kinds of probex and the Burn models they use.

pub mod dataset;
pub mod packages;
pub mod zoo;
