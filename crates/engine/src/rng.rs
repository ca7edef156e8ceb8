//! A small, deterministic pseudo-random number generator.
//!
//! [`Rng`] is **xoshiro256\*\*** (Blackman & Vigna, 2018) whose 256-bit state is
//! filled from the 64-bit seed by four successive outputs of **splitmix64**
//! (the seeding procedure recommended by the xoshiro authors).
//!
//! # Stability guarantee
//!
//! The output stream for a given seed is part of specswarm's reproducibility
//! contract: it is identical on every platform (pure integer arithmetic, no
//! endianness or floating-point dependence in [`Rng::next_u64`]) and it must
//! **never change** across versions. The float helpers are fixed functions of
//! `next_u64` (top 53 / 24 bits scaled by 2^-53 / 2^-24) and are covered by the
//! same guarantee. The integration tests pin the first outputs for seed 42;
//! if they ever fail, the change is a breaking one and must be reverted.
//!
//! This generator is *not* cryptographically secure.

/// xoshiro256** seeded through splitmix64. See the [module docs](self).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

/// One step of splitmix64: advances `state` and returns the next output.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// Creates a generator whose state is four consecutive splitmix64 outputs
    /// starting from `seed`. Every seed (including 0) gives a valid, non-zero state.
    pub fn new(seed: u64) -> Rng {
        let mut sm = seed;
        let s = [splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm)];
        Rng { s }
    }

    /// The generator for counter `index` of stream `seed`: a fresh state derived from both, for
    /// draws that must not depend on how many came before (positional sampling).
    pub fn at(seed: u64, index: u64) -> Rng {
        let mut sm = seed ^ 0x5350_4543_5357_524D; // "SPECSWRM": keeps `at(s, 0)` apart from `new(s)`
        let a = splitmix64(&mut sm);
        Rng::new(a ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03))
    }

    /// Next 64 uniformly distributed bits (xoshiro256** output function).
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform double in `[0, 1)` with 53 random bits: `(next_u64() >> 11) * 2^-53`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform float in `[0, 1)` with 24 random bits: `(next_u64() >> 40) * 2^-24`.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
    }
}
