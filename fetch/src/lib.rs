//! Finding and fetching model files, without Burn: where the models come from.
//!
//! - [`discover`]: model files in a local folder, in the layouts Model-J and the Hugging Face
//!   cache use ([`discover::ModelSource`]: a file, its id and its split).
//! - [`collection`]: the `models` artifact that lists them.
//! - [`hub`]: what a fetch from the Hugging Face Hub is (request, plan, report, accepted names)
//!   and the [`hub::HubClient`] trait; the client itself is the `probex-hub` crate.
//! - [`packages`]: pinned archives from npm, PyPI and Debian, fetched through their own clients
//!   and unpacked safely.
//!
//! It is a crate of its own so that the archive code (and its formats) builds apart from the
//! probe models: an edit here rebuilds this crate and the stage kinds, never Burn's models.

pub mod collection;
pub mod discover;
pub mod hub;
pub mod packages;
