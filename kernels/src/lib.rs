//! Host CPU kernels of probex's training step, on plain `f32` slices: ProbeX's encoder
//! ([`encoder`]) and Adam's update ([`adam`]).
//!
//! They are a crate of their own so that they are optimised even in the dev profile (see the
//! workspace `Cargo.toml`), where probex's own crates are not: `cargo test` and `cargo run`
//! train at release speed only if the loops that train are compiled like the dependencies.
//! The Burn side (which tensors reach these kernels, and when) is `probex-probes`.

pub mod adam;
pub mod encoder;
