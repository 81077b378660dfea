//! The parsers of `probex-stages` that read untrusted bytes, compiled from their source files
//! so the fuzz build does not depend on (and instrument) Burn.
#![allow(dead_code)]

#[path = "../../stages/src/dataset.rs"]
pub mod dataset;

#[path = "../../stages/src/weights/mod.rs"]
pub mod weights;

#[path = "../../stages/src/labels/pylist.rs"]
pub mod pylist;
