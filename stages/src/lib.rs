//! The stage kinds of probex and the Burn models they use.
//!
//! Each stage kind is a module named after what it does (`fetch`, `zoo`, `route`, `extract`,
//! `embed`, `train`, `select`, `evaluate`); the libraries they share (reading weights, labels, the layer dataset,
//! models, training) are modules of their own.

pub mod collection;
pub mod dataset;
pub mod embed;
pub mod embeddings;
pub mod evaluate;
pub mod extract;
pub mod fetch;
mod gemm;
mod host;
pub mod labels;
pub mod models;
pub mod packages;
pub mod params_doc;
pub mod query;
pub mod route;
pub mod select;
pub mod shapes;
pub mod text;
pub mod train;
pub mod training;
pub mod weights;
pub mod zoo;

use probex_engine::Registry;

/// Every stage kind of this build.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(fetch::Fetch)
        .register(extract::Extract)
        .register(embed::Embed)
        .register(train::Train)
        .register(select::stage::Select)
        .register(evaluate::stage::Evaluate)
        .register(zoo::stage::Zoo)
        .register(route::stage::Route);
    // Counting GPUs needs the CUDA backend, which the engine does not link.
    r.set_gpu_probe(training::device::cuda_device_count);
    r
}
