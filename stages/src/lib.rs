//! The stage kinds of probex and the Burn models they use.

pub mod dataset;
pub mod evaluate;
pub mod select;

use probex_engine::Registry;

/// Every stage kind of this build.
pub fn registry() -> Registry {
    Registry::new()
}
