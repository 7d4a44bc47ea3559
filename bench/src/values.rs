//! Deterministic, incompressible values: `value_of(seed, key, version, size)`.
//!
//! Any process (loader, load generator, verifier) can recompute the value a key must hold from
//! `(seed, key index, version)` alone, so nothing but per-key version numbers needs to be kept.
//! The bytes come from a splitmix64 stream, so they do not compress: a migration that
//! compressed pages would otherwise look better on this benchmark than on real data.

/// The name of key `index` in Redis.
pub fn key_name(index: u64) -> String {
    format!("key:{index}")
}

/// The value key `index` holds at `version` (0 = as loaded, +1 per acknowledged SET).
pub fn value_of(seed: u64, index: u64, version: u32, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size);
    fill_value(seed, index, version, size, &mut out);
    out
}

/// Like [`value_of`], but appends to `out` (reuses the caller's buffer).
pub fn fill_value(seed: u64, index: u64, version: u32, size: usize, out: &mut Vec<u8>) {
    let mut words = WordStream::new(seed, index, version);
    let mut remaining = size;
    while remaining > 0 {
        let word = words.next_word();
        let take = remaining.min(8);
        out.extend_from_slice(&word[..take]);
        remaining -= take;
    }
}

/// Whether `actual` is the value of `index` at `version`, without allocating (the verifier
/// checks millions of values).
pub fn is_value_of(seed: u64, index: u64, version: u32, actual: &[u8], size: usize) -> bool {
    if actual.len() != size {
        return false;
    }
    let mut words = WordStream::new(seed, index, version);
    actual
        .chunks(8)
        .all(|chunk| words.next_word()[..chunk.len()] == *chunk)
}

/// The splitmix64 stream behind one value.
struct WordStream(u64);

impl WordStream {
    fn new(seed: u64, index: u64, version: u32) -> Self {
        // Mix the three inputs through splitmix64 one after the other so that nearby
        // (index, version) pairs start far apart in the stream.
        let mut state = splitmix64(seed ^ 0x7063_6c69_7665_6265); // "pclivebe"
        state = splitmix64(state ^ index);
        state = splitmix64(state ^ u64::from(version));
        WordStream(state)
    }

    fn next_word(&mut self) -> [u8; 8] {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        mix(self.0).to_le_bytes()
    }
}

const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

fn splitmix64(x: u64) -> u64 {
    mix(x.wrapping_add(GOLDEN_GAMMA))
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A small fast PRNG for the load generator's choices (key, read or write).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(splitmix64(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        mix(self.0)
    }

    /// Uniform in `0..n` (n > 0); the modulo bias is negligible for n far below 2^64.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn is_deterministic_and_sized() {
        assert_eq!(value_of(7, 3, 1, 1024), value_of(7, 3, 1, 1024));
        for size in [0, 1, 7, 8, 9, 1024, 1000] {
            assert_eq!(value_of(1, 2, 3, size).len(), size);
        }
        // A shorter value is a prefix of the longer one: sizes only cut the stream.
        assert_eq!(value_of(1, 2, 3, 10)[..], value_of(1, 2, 3, 20)[..10]);
    }

    #[test]
    fn differs_per_seed_key_and_version() {
        let base = value_of(1, 10, 0, 64);
        assert_ne!(base, value_of(2, 10, 0, 64));
        assert_ne!(base, value_of(1, 11, 0, 64));
        assert_ne!(base, value_of(1, 10, 1, 64));
        // Many (key, version) pairs: all distinct.
        let mut seen = HashSet::new();
        for key in 0..200 {
            for version in 0..20 {
                assert!(seen.insert(value_of(5, key, version, 16)));
            }
        }
    }

    #[test]
    fn looks_incompressible() {
        let value = value_of(42, 1, 0, 1 << 16);
        // Every byte value occurs, none much more than its share (256 per value here).
        let mut counts = [0usize; 256];
        for &b in &value {
            counts[usize::from(b)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (150..400).contains(&c)),
            "{counts:?}"
        );
        // No long runs of one byte, and no repeated 16-byte window (what a compressor exploits).
        let longest_run = value
            .windows(2)
            .fold((1, 1), |(best, run), w| {
                let run = if w[0] == w[1] { run + 1 } else { 1 };
                (best.max(run), run)
            })
            .0;
        assert!(longest_run < 6, "run of {longest_run}");
        let mut windows = HashSet::new();
        for chunk in value.windows(16).step_by(3) {
            assert!(windows.insert(chunk), "repeated 16-byte window");
        }
    }

    #[test]
    fn checks_values() {
        let v = value_of(3, 4, 5, 100);
        assert!(is_value_of(3, 4, 5, &v, 100));
        assert!(!is_value_of(3, 4, 6, &v, 100));
        assert!(!is_value_of(3, 4, 5, &v[..99], 100));
    }

    #[test]
    fn rng_is_uniform_enough() {
        let mut rng = Rng::new(1);
        let mut buckets = [0u32; 10];
        for _ in 0..100_000 {
            buckets[rng.below(10) as usize] += 1;
        }
        assert!(buckets.iter().all(|&c| (9_000..11_000).contains(&c)));
        let reads = (0..100_000).filter(|_| rng.unit() < 0.9).count();
        assert!((89_000..91_000).contains(&reads));
    }
}
