//! A layer's values as bytes: f32 in, the stored precision out, and back.

use safetensors::Dtype;

use serde::{Deserialize, Serialize};

/// Storage precision of `weights` on disk; always `f32` in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 4 bytes per value (default, exact).
    #[default]
    F32,
    /// IEEE half: halves disk and page cache, 11-bit mantissa.
    F16,
    /// bfloat16: halves disk and page cache, 8-bit mantissa, f32 range.
    Bf16,
}

/// Encodes f32 values as little-endian bytes of the requested precision.
pub fn encode(values: &[f32], precision: Precision) -> (Dtype, Vec<u8>) {
    match precision {
        Precision::F32 => (
            Dtype::F32,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        Precision::F16 => (
            Dtype::F16,
            values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
        ),
        Precision::Bf16 => (
            Dtype::BF16,
            values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
        ),
    }
}

/// A dtype [`decode`] cannot read as weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("dtype {0:?} is not a floating-point weight type")]
pub struct NotAFloat(pub Dtype);

/// Decodes little-endian F32/F16/BF16/F64 bytes to f32; other dtypes are an error.
pub fn decode(dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, NotAFloat> {
    let out = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => return Err(NotAFloat(other)),
    };
    Ok(out)
}
