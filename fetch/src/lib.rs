//! Finding and fetching model files, without Burn: where the models come from.
//!
//! - [`discover`]: model files in a local folder, in the layouts Model-J and the Hugging Face
//!   cache use ([`discover::ModelSource`]: a file, its id and its split).
//! - [`collection`]: the `models` artifact that lists them.
//! - [`hub`]: the Hugging Face Hub client (whole files into the shared cache, or only the
//!   tensors a probe needs through Range requests).
//! - [`packages`]: pinned archives from npm, PyPI and Debian, fetched through their own clients
//!   and unpacked safely.
//!
//! It is a crate of its own so that the network and archive code (and its dependencies:
//! reqwest, hf-hub, parquet, the archive formats) builds apart from the probe models: an edit to
//! the Hub client rebuilds this crate and the stage kinds, never Burn's models.

pub mod collection;
pub mod discover;
pub mod hub;
pub mod packages;
