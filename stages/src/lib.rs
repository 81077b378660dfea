//! The stage kinds of probex and the Burn models they use.
//!
//! Each stage kind is a module named after what it does (`fetch`, `extract`, `train`, ...);
//! the libraries they share (reading weights, labels, the layer dataset, models, training) are
//! modules of their own.

pub mod collection;
pub mod dataset;
pub mod embed;
pub mod embeddings;
pub mod extract;
pub mod fetch;
pub mod labels;
pub mod text;
pub mod weights;

use probex_engine::Registry;

/// Every stage kind of this build.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(fetch::Fetch)
        .register(extract::Extract)
        .register(embed::Embed);
    r
}
