//! How one tensor becomes the matrix a probe reads, exactly as the official ProbeX code does it.
//!
//! Squeeze singleton axes; a tensor with three or more remaining axes (a conv weight
//! `[out, in, kh, kw]`) is reinterpreted row-major as `[in*kh*kw, out]` (a reshape, not a
//! permute: `reshape(-1, out)`); a vector becomes a column `[n, 1]`. All three keep the bytes in
//! file order, so the matrix of a plain tensor is its decoded data. LoRA pairs are the product
//! `B @ A` of the up and down factors.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The transform that turned a tensor into a matrix (recorded in [`crate::dataset::LayerInfo`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    /// Singleton axes dropped; two axes remain.
    Squeeze,
    /// Three or more axes after squeezing, reshaped row-major to `[numel / out, out]`.
    ConvReshape,
    /// One axis (or none) after squeezing, made a column `[n, 1]`.
    Column,
    /// LoRA: `up [out, r] @ down [r, in]` (extra axes of a conv LoRA flattened row-major).
    LoraProduct,
}

impl Transform {
    /// The name stored in `LayerInfo.transform`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transform::Squeeze => "squeeze",
            Transform::ConvReshape => "conv_reshape",
            Transform::Column => "column",
            Transform::LoraProduct => "lora_product",
        }
    }
}

impl fmt::Display for Transform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a tensor (or a LoRA pair) has no matrix a probe can read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransformError {
    /// A tensor with a zero-length axis.
    #[error("shape {0:?} has no elements")]
    NoElements(Vec<usize>),
    /// A shape whose element count overflows.
    #[error("shape {0:?} overflows")]
    Overflows(Vec<usize>),
    /// A LoRA factor without axes.
    #[error("LoRA factors must have at least one axis (up {up:?}, down {down:?})")]
    LoraNoAxis {
        /// The up factor's shape.
        up: Vec<usize>,
        /// The down factor's shape.
        down: Vec<usize>,
    },
    /// A LoRA factor that is a vector.
    #[error("LoRA factors must be matrices (up {up:?}, down {down:?})")]
    LoraNotMatrices {
        /// The up factor's shape.
        up: Vec<usize>,
        /// The down factor's shape.
        down: Vec<usize>,
    },
    /// LoRA factor shapes whose element counts overflow.
    #[error("LoRA factor shapes overflow (up {up:?}, down {down:?})")]
    LoraOverflows {
        /// The up factor's shape.
        up: Vec<usize>,
        /// The down factor's shape.
        down: Vec<usize>,
    },
    /// Factors of different ranks.
    #[error(
        "LoRA rank mismatch: up {up:?} has {up_rank} columns, down {down:?} has {down_rank} rows"
    )]
    LoraRank {
        /// The up factor's shape.
        up: Vec<usize>,
        /// Its columns.
        up_rank: usize,
        /// The down factor's shape.
        down: Vec<usize>,
        /// Its rows.
        down_rank: usize,
    },
    /// A LoRA pair with a zero-length axis.
    #[error("LoRA pair has no elements (up {up:?}, down {down:?})")]
    LoraEmpty {
        /// The up factor's shape.
        up: Vec<usize>,
        /// The down factor's shape.
        down: Vec<usize>,
    },
    /// A LoRA product past [`MAX_LORA_ELEMENTS`].
    #[error("LoRA product [{rows}, {cols}] has more than {MAX_LORA_ELEMENTS} elements")]
    LoraTooLarge {
        /// Its rows.
        rows: usize,
        /// Its columns.
        cols: usize,
    },
}

/// The transform and matrix shape `[d_H, d_W]` of a plain tensor of shape `shape`.
///
/// A tensor with no elements has no matrix: that is an error, since a probe cannot read it.
pub fn plan(shape: &[usize]) -> Result<(Transform, [usize; 2]), TransformError> {
    if shape.contains(&0) {
        return Err(TransformError::NoElements(shape.to_vec()));
    }
    let squeezed: Vec<usize> = shape.iter().copied().filter(|&d| d != 1).collect();
    Ok(match squeezed.as_slice() {
        [] => (Transform::Column, [1, 1]),
        [n] => (Transform::Column, [*n, 1]),
        [h, w] => (Transform::Squeeze, [*h, *w]),
        [out, rest @ ..] => {
            let rows =
                checked_product(rest).ok_or_else(|| TransformError::Overflows(shape.to_vec()))?;
            (Transform::ConvReshape, [rows, *out])
        }
    })
}

fn checked_product(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Largest LoRA product accepted, in elements (256 MB of f32). The product of two small factors
/// can be huge (`[n, 1] @ [1, n]`), so a hostile file could otherwise ask for any allocation;
/// real LoRAs stay far below (SDXL's largest is 10240 x 1280 = 13M).
pub const MAX_LORA_ELEMENTS: usize = 1 << 26;

/// The matrix shape of a LoRA pair: `up` is `[out, r, ...]`, `down` is `[r, ...]`.
pub fn plan_lora(up: &[usize], down: &[usize]) -> Result<[usize; 2], TransformError> {
    let shapes = || (up.to_vec(), down.to_vec());
    let (Some(&out), Some(&r_down)) = (up.first(), down.first()) else {
        let (up, down) = shapes();
        return Err(TransformError::LoraNoAxis { up, down });
    };
    if up.len() < 2 || down.len() < 2 {
        let (up, down) = shapes();
        return Err(TransformError::LoraNotMatrices { up, down });
    }
    let overflow = || {
        let (up, down) = shapes();
        TransformError::LoraOverflows { up, down }
    };
    let r_up = checked_product(&up[1..]).ok_or_else(overflow)?;
    let cols = checked_product(&down[1..]).ok_or_else(overflow)?;
    if r_up != r_down {
        let (up, down) = shapes();
        return Err(TransformError::LoraRank {
            up,
            up_rank: r_up,
            down,
            down_rank: r_down,
        });
    }
    if out == 0 || cols == 0 || r_down == 0 {
        let (up, down) = shapes();
        return Err(TransformError::LoraEmpty { up, down });
    }
    if out.saturating_mul(cols) > MAX_LORA_ELEMENTS {
        return Err(TransformError::LoraTooLarge { rows: out, cols });
    }
    Ok([out, cols])
}

/// `X = B @ A` for `b` row-major `[out, r]` and `a` row-major `[r, cols]`, written into `x`
/// (`[out, cols]`), f32 accumulation as PyTorch's f32 matmul.
pub fn lora_product(b: &[f32], a: &[f32], out: usize, r: usize, cols: usize, x: &mut Vec<f32>) {
    x.clear();
    x.resize(out * cols, 0.0);
    crate::gemm::add_product(b, false, a, false, [out, r, cols], x);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_follow_the_official_rules() {
        assert_eq!(plan(&[768, 768]).unwrap(), (Transform::Squeeze, [768, 768]));
        assert_eq!(
            plan(&[1, 197, 768]).unwrap(),
            (Transform::Squeeze, [197, 768])
        );
        // 1x1 convs squeeze to a plain matrix, not a conv reshape.
        assert_eq!(
            plan(&[256, 64, 1, 1]).unwrap(),
            (Transform::Squeeze, [256, 64])
        );
        assert_eq!(
            plan(&[64, 3, 7, 7]).unwrap(),
            (Transform::ConvReshape, [147, 64])
        );
        assert_eq!(plan(&[768]).unwrap(), (Transform::Column, [768, 1]));
        assert_eq!(plan(&[1, 1, 768]).unwrap(), (Transform::Column, [768, 1]));
        assert_eq!(plan(&[1]).unwrap(), (Transform::Column, [1, 1]));
        assert!(plan(&[0, 5]).is_err());
    }

    #[test]
    fn lora_plan_checks_rank() {
        assert_eq!(plan_lora(&[320, 4], &[4, 768]).unwrap(), [320, 768]);
        assert_eq!(
            plan_lora(&[320, 4, 1, 1], &[4, 320, 3, 3]).unwrap(),
            [320, 2880]
        );
        let e = plan_lora(&[320, 4], &[8, 768]).unwrap_err();
        assert!(
            matches!(
                e,
                TransformError::LoraRank {
                    up_rank: 4,
                    down_rank: 8,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("rank"), "{e}");
        assert!(matches!(
            plan_lora(&[320], &[4, 768]),
            Err(TransformError::LoraNotMatrices { .. })
        ));
        let e = plan_lora(&[1 << 20, 1], &[1, 1 << 20]).unwrap_err();
        assert!(matches!(e, TransformError::LoraTooLarge { .. }), "{e:?}");
        assert!(e.to_string().contains("more than"), "{e}");
    }
}
