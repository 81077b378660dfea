//! The parsers of probex that read untrusted bytes. They live in `probex-weights`, which has no
//! Burn, so the sanitizer build instruments them and their few dependencies only.

pub use probex_weights as weights;
pub use probex_weights::labels::pylist;
