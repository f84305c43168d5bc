//! 128-bit fingerprints, for indexes that keep a fixed 16 bytes per key instead of the key.

use std::hash::BuildHasher;

/// Two fixed-seed foldhash quality hashes of `bytes`, side by side. Two different inputs share
/// a fingerprint with a chance of about 2^-128 per pair, and a fingerprint is the same in
/// every run, so it can stand for a key wherever the key itself is not needed back.
pub fn fingerprint128(bytes: &[u8]) -> u128 {
    let hash = |seed| foldhash::quality::FixedState::with_seed(seed).hash_one(bytes);
    (u128::from(hash(0x243f_6a88_85a3_08d3)) << 64) | u128::from(hash(0x1319_8a2e_0370_7344))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_stable_and_tell_near_keys_apart() {
        assert_eq!(fingerprint128(b"abc"), fingerprint128(b"abc"));
        let near = [&b"abc"[..], b"abd", b"ab", b"abc\0", b""];
        let mut seen: Vec<u128> = near.iter().map(|k| fingerprint128(k)).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), near.len());
    }
}
