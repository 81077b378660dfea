//! Turning one RGBA emoji into a training image, with the augmentations a fine-tune may use.
//!
//! Output is CHW f32 normalised to `[-1, 1]` ((x - 0.5) / 0.5, as a ViT image processor does),
//! at the sheet's 32 px or average-pooled to a smaller side.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use probex_weights::rng::StreamRng;

/// Standard normal draws, made once from a fixed seed: per-pixel Box-Muller would cost more
/// than the whole network's training step, and pixel noise needs no fresh entropy per value.
const NOISE_TABLE: usize = 1 << 16;

fn noise_table() -> &'static [f32] {
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut rng = StreamRng::new(0x006e_6f69_7365);
        (0..NOISE_TABLE).map(|_| rng.normal()).collect()
    })
}

/// Which augmentations are on. `random_crop` and `random_flip` are Model-J's own metadata keys;
/// the other three are the zoo's additions, recorded under the same naming.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Augment {
    /// Shift by up to 1/8 of the side each way (pad-and-crop, as CIFAR's RandomCrop(32,
    /// padding=4)).
    pub random_crop: bool,
    /// Mirror left-right with probability 1/2.
    pub random_flip: bool,
    /// Scale intensities by a factor in [0.7, 1.3].
    pub random_brightness: bool,
    /// Composite onto a random colour instead of white.
    pub random_background: bool,
    /// Add Gaussian noise (sigma 0.05 of the range).
    pub random_noise: bool,
}

impl Augment {
    /// Every augmentation on (used for base pretraining).
    pub const ALL: Augment = Augment {
        random_crop: true,
        random_flip: true,
        random_brightness: true,
        random_background: true,
        random_noise: true,
    };

    /// `(metadata key, value)` pairs.
    pub fn flags(&self) -> [(&'static str, bool); 5] {
        [
            ("random_crop", self.random_crop),
            ("random_flip", self.random_flip),
            ("random_brightness", self.random_brightness),
            ("random_background", self.random_background),
            ("random_noise", self.random_noise),
        ]
    }
}

/// One image ready for fast rendering at its final side: premultiplied colour (CHW) and
/// alpha, average-pooled from the sheet's 32 px. Compositing is linear in premultiplied colour,
/// so pooling first and compositing later gives the same pixels as the other way round.
#[derive(Clone, Debug, PartialEq)]
pub struct Prepared {
    /// Side in pixels.
    pub size: usize,
    /// `alpha * rgb`, `[3, size, size]`, in `[0, 1]`.
    pub premul: Vec<f32>,
    /// Coverage, `[size, size]`, in `[0, 1]`.
    pub alpha: Vec<f32>,
}

/// Prepares `rgba` (`src` x `src` pixels) for rendering at side `dst` (`dst` must divide `src`).
pub fn prepare(rgba: &[u8], src: usize, dst: usize) -> Prepared {
    let factor = (src / dst.max(1)).max(1);
    let area = (factor * factor) as f32;
    let plane = dst * dst;
    let mut premul = vec![0.0f32; 3 * plane];
    let mut alpha = vec![0.0f32; plane];
    for y in 0..src {
        for x in 0..src {
            let p = (y * src + x) * 4;
            let a = rgba[p + 3] as f32 / 255.0;
            let o = (y / factor) * dst + x / factor;
            alpha[o] += a / area;
            for c in 0..3 {
                premul[c * plane + o] += a * (rgba[p + c] as f32 / 255.0) / area;
            }
        }
    }
    Prepared {
        size: dst,
        premul,
        alpha,
    }
}

/// Renders a prepared image into `out` (`3 * size * size`, CHW, normalised to `[-1, 1]`),
/// drawing the augmentations that are on from `rng`. The shift is up to `size / 8` pixels
/// each way (4 at 32 px, as CIFAR's RandomCrop(32, padding=4)); uncovered pixels show the
/// background.
pub fn render(img: &Prepared, aug: &Augment, rng: &mut StreamRng, out: &mut [f32]) {
    let s = img.size;
    let plane = s * s;
    let bg = if aug.random_background {
        [rng.uniform(), rng.uniform(), rng.uniform()]
    } else {
        [1.0, 1.0, 1.0]
    };
    let m = (s / 8) as isize;
    let (dx, dy) = if aug.random_crop {
        (
            rng.below(2 * m as usize + 1) as isize - m,
            rng.below(2 * m as usize + 1) as isize - m,
        )
    } else {
        (0, 0)
    };
    let flip = aug.random_flip && rng.chance(0.5);
    let gain = if aug.random_brightness {
        rng.range(0.7, 1.3)
    } else {
        1.0
    };
    for c in 0..3 {
        let src = &img.premul[c * plane..(c + 1) * plane];
        let dst = &mut out[c * plane..(c + 1) * plane];
        let b = bg[c];
        for y in 0..s {
            let row = &mut dst[y * s..(y + 1) * s];
            let sy = y as isize - dy;
            if sy < 0 || sy >= s as isize {
                row.fill(b);
                continue;
            }
            let sy = sy as usize * s;
            for (x, v) in row.iter_mut().enumerate() {
                let sx = if flip { s - 1 - x } else { x } as isize - dx;
                *v = if sx < 0 || sx >= s as isize {
                    b
                } else {
                    let i = sy + sx as usize;
                    src[i] + (1.0 - img.alpha[i]) * b
                };
            }
        }
    }
    let out = &mut out[..3 * plane];
    if aug.random_noise {
        // A random window of the table, read with a random odd stride, per image.
        let table = noise_table();
        let mut at = rng.below(NOISE_TABLE);
        let stride = 2 * rng.below(NOISE_TABLE / 2) + 1;
        for v in out.iter_mut() {
            *v = (*v * gain).clamp(0.0, 1.0) + 0.05 * table[at];
            at = (at + stride) % NOISE_TABLE;
        }
    } else {
        for v in out.iter_mut() {
            *v = (*v * gain).clamp(0.0, 1.0);
        }
    }
    for v in out.iter_mut() {
        *v = 2.0 * *v - 1.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn red_square() -> Vec<u8> {
        // 8x8: opaque red 4x4 square at the top-left, transparent elsewhere.
        let mut img = vec![0u8; 8 * 8 * 4];
        for y in 0..4 {
            for x in 0..4 {
                let p = (y * 8 + x) * 4;
                img[p..p + 4].copy_from_slice(&[255, 0, 0, 255]);
            }
        }
        img
    }

    #[test]
    fn plain_render_composites_on_white_and_normalises() {
        let mut out = vec![0.0; 3 * 64];
        let img = prepare(&red_square(), 8, 8);
        render(&img, &Augment::default(), &mut StreamRng::new(1), &mut out);
        // Red pixel: (1, 0, 0) -> (1, -1, -1); transparent pixel: white -> (1, 1, 1).
        assert_eq!([out[0], out[64], out[128]], [1.0, -1.0, -1.0]);
        assert_eq!([out[63], out[64 + 63], out[128 + 63]], [1.0, 1.0, 1.0]);
    }

    #[test]
    fn flip_mirrors_and_pooling_averages() {
        let aug = Augment {
            random_flip: true,
            ..Augment::default()
        };
        // Find a seed that flips, then check the red square moved to the right edge.
        let mut flipped = false;
        let img = prepare(&red_square(), 8, 8);
        for seed in 0..16 {
            let mut out = vec![0.0; 3 * 64];
            render(&img, &aug, &mut StreamRng::new(seed), &mut out);
            if out[64 + 7] == -1.0 {
                assert_eq!(out[64], 1.0);
                flipped = true;
            }
        }
        assert!(flipped);
        let mut small = vec![0.0; 3 * 16];
        let pooled = prepare(&red_square(), 8, 4);
        render(
            &pooled,
            &Augment::default(),
            &mut StreamRng::new(1),
            &mut small,
        );
        // 2x2 pooling: the top-left 2x2 output block is all red.
        assert_eq!(small[16], -1.0);
        assert_eq!(small[16 + 15], 1.0);
    }

    #[test]
    fn augmentations_change_the_image_and_are_seeded() {
        let mut a = vec![0.0; 3 * 64];
        let mut b = vec![0.0; 3 * 64];
        let mut c = vec![0.0; 3 * 64];
        let img = prepare(&red_square(), 8, 8);
        render(&img, &Augment::ALL, &mut StreamRng::new(5), &mut a);
        render(&img, &Augment::ALL, &mut StreamRng::new(5), &mut b);
        render(&img, &Augment::ALL, &mut StreamRng::new(6), &mut c);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
