//! The stage kinds of probex: the glue between the libraries and the engine.
//!
//! Each stage kind is a module named after what it does (`fetch`, `zoo`, `extract`, `embed`,
//! `train`, `select`, `evaluate`, `route`), plus [`probe`] (a trained probe used on its own:
//! `probex search` and `probex describe`), [`routing`] (the artifact `route` writes), [`csv`]
//! and [`params_doc`] (the kinds' parameter help). Each implements the engine's `Stage` trait
//! over the libraries below it: `probex-weights` (weight files, labels, the layer dataset),
//! `probex-fetch` (folders, what a Hub fetch is, packages; the client itself is passed in),
//! `probex-probes` (the probe models and their training), `probex-text` (text encoders) and
//! `probex-zoo` (model trees). The engine knows no ML; this crate is where it meets it.

pub mod csv;
pub mod embed;
pub mod evaluate;
pub mod extract;
pub mod fetch;
pub mod params_doc;
pub mod probe;
pub mod route;
pub mod routing;
pub mod select;
pub mod train;
pub mod zoo;

use probex_engine::Registry;

/// Every stage kind of this build; `hub` opens the Hub client for `fetch` (the binary passes
/// `probex_hub::connect`).
pub fn registry(hub: probex_fetch::hub::Connect) -> Registry {
    let mut r = Registry::new();
    r.register(fetch::Fetch { hub })
        .register(extract::Extract)
        .register(embed::Embed)
        .register(train::Train)
        .register(select::stage::Select)
        .register(evaluate::stage::Evaluate)
        .register(zoo::Zoo)
        .register(route::stage::Route);
    // Counting GPUs needs the CUDA backend, which the engine does not link.
    r.set_gpu_probe(|| Ok(probex_probes::training::device::cuda_device_count()?));
    r
}
