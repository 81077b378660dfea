//! probex's two seeded random generators, and the SplitMix64 step they share.
//!
//! Both are probex's own rather than a crate's or Burn's backend seed, so that the same seed
//! gives the same numbers on any run and machine, whatever the thread scheduling, and upgrading
//! a dependency cannot change a result. There are two because they are asked for different
//! things, and neither can become the other without changing every published number (the
//! zoo's trees and every probe's initialisation; the golden tests below pin both):
//!
//! - [`Rng`] (SplitMix64) keeps its whole state in one `u64`, so that training can save it in
//!   its resume file and continue the very same stream after a restart. Probe initialisation
//!   and shuffling use it, one stream per purpose.
//! - [`StreamRng`] (xoshiro256**, seeded through SplitMix64) derives independent streams from
//!   `(seed, path)` ([`StreamRng::derive`]), so that each of a zoo's thousands of models draws
//!   from its own stream, whatever the other models drew and in whatever order they ran. Its
//!   256-bit state is not meant to be saved.

/// One SplitMix64 step: advances `state` and returns the next 64 random bits. [`Rng`] is this
/// step on its own; [`StreamRng`] seeds its state and derives its streams with it.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64 generator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator for `seed` and an independent `stream` (init and shuffling use different
    /// streams so that changing one does not shift the other).
    pub fn new(seed: u64, stream: u64) -> Rng {
        let mut r = Rng {
            state: seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03),
        };
        // Decorrelate nearby seeds before first use.
        r.next_u64();
        r
    }

    /// Restores a generator from [`Rng::state`].
    pub fn from_state(state: u64) -> Rng {
        Rng { state }
    }

    /// The whole state, for saving.
    pub fn state(&self) -> u64 {
        self.state
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        splitmix64(&mut self.state)
    }

    /// Uniform in `[0, 1)` with 24 random bits (every value exactly representable in f32).
    pub fn unit_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in `[-bound, bound)`, PyTorch's default Linear initialisation.
    pub fn uniform(&mut self, bound: f32) -> f32 {
        (2.0 * self.unit_f32() - 1.0) * bound
    }

    /// Standard normal (Box-Muller), for generated test data.
    pub fn normal(&mut self) -> f32 {
        let u1 = (self.unit_f32() as f64).max(1e-12);
        let u2 = self.unit_f32() as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// Uniform integer in `0..n` (`n > 0`), by 128-bit multiply (bias < 2^-64 * n).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Fisher-Yates shuffle in place.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// xoshiro256** generator with independent derived streams ([`StreamRng::derive`]): the
/// zoo's randomness.
#[derive(Clone, Debug)]
pub struct StreamRng {
    s: [u64; 4],
}

impl StreamRng {
    /// A generator for one seed.
    pub fn new(seed: u64) -> StreamRng {
        let mut x = seed;
        StreamRng {
            s: [
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
            ],
        }
    }

    /// An independent stream for `(seed, path...)`, e.g. `(tree_seed, [PURPOSE, model_idx])`,
    /// so each model's randomness does not depend on how many draws other models made.
    pub fn derive(seed: u64, path: &[u64]) -> StreamRng {
        let mut x = seed;
        let mut h = splitmix64(&mut x);
        for &p in path {
            let mut y = h ^ p.wrapping_mul(0xD6E8_FEB8_6659_FD93);
            h = splitmix64(&mut y);
        }
        StreamRng::new(h)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 24 bits of precision.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in `0..n` (`n > 0`), without modulo bias.
    pub fn below(&mut self, n: usize) -> usize {
        let n = n.max(1) as u64;
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let v = self.next_u64();
            if v < zone {
                return (v % n) as usize;
            }
        }
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f32) -> bool {
        self.uniform() < p
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 1.0) * (1.0 / (1u64 << 53) as f64);
        let u2 = (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }

    /// A uniformly chosen element (`None` for an empty slice).
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        if v.is_empty() {
            None
        } else {
            v.get(self.below(v.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact numbers both generators give today: a change here changes every tree and
    /// every probe's initialisation, so it must be deliberate.
    #[test]
    fn golden_values_of_both_generators() {
        let mut w = Rng::new(7, 3);
        let words: Vec<u64> = (0..3).map(|_| w.next_u64()).collect();
        assert_eq!(
            words,
            [0xa503ef88e857d4c3, 0x7bf0ffc2ab3b7e72, 0x8c34ef3b3681d0ad]
        );
        let mut z = StreamRng::derive(7, &[1, 2]);
        let words: Vec<u64> = (0..3).map(|_| z.next_u64()).collect();
        assert_eq!(
            words,
            [0x378e8b5539f20571, 0x872a9723e88ceaa6, 0x57297714cf8bf578]
        );
        let mut z = StreamRng::derive(7, &[1, 2]);
        assert_eq!(z.below(1000), 73);
        assert_eq!(z.uniform(), 0.5279936);
        assert_eq!(z.normal(), -1.4660779);
        let mut w = Rng::new(7, 3);
        assert_eq!(w.below(1000), 644);
        assert_eq!(w.unit_f32(), 0.48414606);
        assert_eq!(w.normal(), 1.0423999);
    }

    #[test]
    fn reproducible_and_seed_dependent() {
        let a: Vec<u64> = {
            let mut r = Rng::new(7, 0);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Rng::new(7, 0);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let c: Vec<u64> = {
            let mut r = Rng::new(8, 0);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let d: Vec<u64> = {
            let mut r = Rng::new(7, 1);
            (0..4).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }

    #[test]
    fn state_round_trip_continues_the_stream() {
        let mut r = Rng::new(3, 0);
        r.next_u64();
        let mut s = Rng::from_state(r.state());
        assert_eq!(r.next_u64(), s.next_u64());
    }

    #[test]
    fn uniform_stays_in_bounds_and_shuffle_permutes() {
        let mut r = Rng::new(1, 0);
        for _ in 0..1000 {
            let x = r.uniform(0.5);
            assert!((-0.5..0.5).contains(&x));
        }
        let mut v: Vec<usize> = (0..50).collect();
        r.shuffle(&mut v);
        assert_ne!(v, (0..50).collect::<Vec<_>>());
        v.sort();
        assert_eq!(v, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4)
            .map(|_| StreamRng::derive(7, &[1, 2]).next_u64())
            .collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(
            StreamRng::derive(7, &[1, 2]).next_u64(),
            StreamRng::derive(7, &[2, 1]).next_u64()
        );
        let mut r = StreamRng::new(3);
        let n = 20_000;
        let mean = (0..n).map(|_| r.uniform() as f64).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
        let m2 = (0..n).map(|_| (r.normal() as f64).powi(2)).sum::<f64>() / n as f64;
        assert!((m2 - 1.0).abs() < 0.05, "{m2}");
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            counts[r.below(3)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 900), "{counts:?}");
    }
}
