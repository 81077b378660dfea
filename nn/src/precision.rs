//! The precision a layer stores its weights and outputs in.

use std::fmt;

use burn::prelude::Backend;
use burn::tensor::{FloatDType, Tensor};
use serde::{Deserialize, Serialize};

/// The precision weights and activations are stored in (a text encoder's, and each of its
/// [`Linear`](crate::Linear) layers').
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32 (the default).
    #[default]
    F32,
    /// Weights and every op's output rounded to f16 (round to nearest even, overflow to
    /// infinity), computed in f32 in between: the authors' fp16 CLIP on a GPU.
    F16,
}

impl Precision {
    /// The name used in TOML.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
        }
    }

    /// Whether this is the default, f32 (for `skip_serializing_if`, so keys of experiments that
    /// do not set it stay what they were).
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    /// `t` as this precision stores it: unchanged in f32, rounded to the nearest f16 value
    /// (and back to f32, so the next op computes in f32) in f16.
    pub fn round<B: Backend, const D: usize>(self, t: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Precision::F32 => t,
            Precision::F16 => t.cast(FloatDType::F16).cast(FloatDType::F32),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
