//! The probe models and their training, on Burn: ProbeX (discriminative and zero-shot) and the
//! paper's Dense and StatNN baselines ([`models`]), and the loop that trains them, with its
//! optimiser, metrics, resume and device selection ([`training`]).
//!
//! It is a crate of its own because it is the part of probex that Burn's generics make slow to
//! build: the data it reads comes from `probex-weights`, and the stage kinds that call it
//! (`train`, `evaluate`, search) build on top, so editing them (or the fetch client) does not
//! rebuild the models. The `cuda` feature selects Burn's CUDA backend here.

mod cpu_buffers;
pub mod models;
pub mod training;
