//! The lattice expansion of an element: the first 2,048 bytes of BLAKE3's extendable output for
//! the 40-byte seed `"SYNLANE1" ‖ element hash` (rust/DESIGN.md, "State digest").
//!
//! Every state op pays one or two of these (a put over an existing key: the old element out,
//! the new one in), and `perf` put them at ~39% of a whole-entry apply. The blake3 crate makes
//! the 32 output blocks one at a time unless the CPU has AVX-512; the blocks are independent
//! (the same compression input but for the block counter), so with AVX2 this file computes
//! eight at once. The crate stays the definition: the tests compare both on random seeds, and
//! a CPU without AVX2, or with AVX-512 (where the crate is faster), uses the crate.

pub const SEED_BYTES: usize = 40;
pub const EXPANSION_BYTES: usize = 2048;

/// BLAKE3's XOF of `seed`, the first `EXPANSION_BYTES` bytes.
pub fn expand(seed: &[u8; SEED_BYTES], out: &mut [u8; EXPANSION_BYTES], hasher: &mut blake3::Hasher) {
    #[cfg(target_arch = "x86_64")]
    {
        // With AVX-512 the crate makes sixteen blocks at once itself, and beats this file
        // (measured on one Xeon: 312 ns against 697 ns per expansion); it needs both features.
        let crate_is_wider =
            std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512vl");
        if !crate_is_wider && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            unsafe { avx2::expand(seed, out) };
            return;
        }
    }
    by_crate(seed, out, hasher);
}

fn by_crate(seed: &[u8; SEED_BYTES], out: &mut [u8; EXPANSION_BYTES], hasher: &mut blake3::Hasher) {
    hasher.reset();
    hasher.update(seed);
    hasher.finalize_xof().fill(out);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{EXPANSION_BYTES, SEED_BYTES};

    // The BLAKE3 specification's constants.
    const IV: [u32; 8] = [0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19];
    const MSG_PERMUTATION: [usize; 16] = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8];
    // A seed shorter than one block is one chunk of one block, and the root: its output blocks
    // are compress(IV, block, counter = output block number, block_len, these flags).
    const CHUNK_START: u32 = 1;
    const CHUNK_END: u32 = 2;
    const ROOT: u32 = 8;
    const LANES: usize = 8;

    #[inline(always)]
    unsafe fn rotr16(x: __m256i) -> __m256i {
        _mm256_shuffle_epi8(
            x,
            _mm256_set_epi8(13, 12, 15, 14, 9, 8, 11, 10, 5, 4, 7, 6, 1, 0, 3, 2, 13, 12, 15, 14, 9, 8, 11, 10, 5, 4, 7, 6, 1, 0, 3, 2),
        )
    }

    #[inline(always)]
    unsafe fn rotr8(x: __m256i) -> __m256i {
        _mm256_shuffle_epi8(
            x,
            _mm256_set_epi8(12, 15, 14, 13, 8, 11, 10, 9, 4, 7, 6, 5, 0, 3, 2, 1, 12, 15, 14, 13, 8, 11, 10, 9, 4, 7, 6, 5, 0, 3, 2, 1),
        )
    }

    #[inline(always)]
    unsafe fn rotr12(x: __m256i) -> __m256i {
        _mm256_or_si256(_mm256_srli_epi32(x, 12), _mm256_slli_epi32(x, 20))
    }

    #[inline(always)]
    unsafe fn rotr7(x: __m256i) -> __m256i {
        _mm256_or_si256(_mm256_srli_epi32(x, 7), _mm256_slli_epi32(x, 25))
    }

    #[inline(always)]
    unsafe fn g(v: &mut [__m256i; 16], a: usize, b: usize, c: usize, d: usize, mx: __m256i, my: __m256i) {
        v[a] = _mm256_add_epi32(_mm256_add_epi32(v[a], v[b]), mx);
        v[d] = rotr16(_mm256_xor_si256(v[d], v[a]));
        v[c] = _mm256_add_epi32(v[c], v[d]);
        v[b] = rotr12(_mm256_xor_si256(v[b], v[c]));
        v[a] = _mm256_add_epi32(_mm256_add_epi32(v[a], v[b]), my);
        v[d] = rotr8(_mm256_xor_si256(v[d], v[a]));
        v[c] = _mm256_add_epi32(v[c], v[d]);
        v[b] = rotr7(_mm256_xor_si256(v[b], v[c]));
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn expand(seed: &[u8; SEED_BYTES], out: &mut [u8; EXPANSION_BYTES]) {
        let mut block = [0u8; 64];
        block[..SEED_BYTES].copy_from_slice(seed);
        let mut words = [0u32; 16];
        for (w, bytes) in words.iter_mut().zip(block.chunks_exact(4)) {
            *w = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        // The message is the same in every lane: its seven rounds' schedules, broadcast once.
        let mut schedule = [[_mm256_setzero_si256(); 16]; 7];
        for round in schedule.iter_mut() {
            for (m, w) in round.iter_mut().zip(words) {
                *m = _mm256_set1_epi32(w as i32);
            }
            let prev = words;
            for (i, w) in words.iter_mut().enumerate() {
                *w = prev[MSG_PERMUTATION[i]];
            }
        }
        let iv: [__m256i; 8] = IV.map(|w| _mm256_set1_epi32(w as i32));
        let block_len = _mm256_set1_epi32(SEED_BYTES as i32);
        let flags = _mm256_set1_epi32((CHUNK_START | CHUNK_END | ROOT) as i32);
        let mut lanes = [[0u32; LANES]; 16];
        for first in (0..EXPANSION_BYTES / 64).step_by(LANES) {
            let f = first as i32;
            let counter = _mm256_setr_epi32(f, f + 1, f + 2, f + 3, f + 4, f + 5, f + 6, f + 7);
            let mut v = [
                iv[0], iv[1], iv[2], iv[3], iv[4], iv[5], iv[6], iv[7],
                iv[0], iv[1], iv[2], iv[3], counter, _mm256_setzero_si256(), block_len, flags,
            ];
            for m in &schedule {
                g(&mut v, 0, 4, 8, 12, m[0], m[1]);
                g(&mut v, 1, 5, 9, 13, m[2], m[3]);
                g(&mut v, 2, 6, 10, 14, m[4], m[5]);
                g(&mut v, 3, 7, 11, 15, m[6], m[7]);
                g(&mut v, 0, 5, 10, 15, m[8], m[9]);
                g(&mut v, 1, 6, 11, 12, m[10], m[11]);
                g(&mut v, 2, 7, 8, 13, m[12], m[13]);
                g(&mut v, 3, 4, 9, 14, m[14], m[15]);
            }
            // The XOF's output block: the state's halves folded together, then the second
            // half folded with the input chaining value (here the IV).
            for i in 0..8 {
                let low = _mm256_xor_si256(v[i], v[i + 8]);
                let high = _mm256_xor_si256(v[i + 8], iv[i]);
                _mm256_storeu_si256(lanes[i].as_mut_ptr() as *mut __m256i, low);
                _mm256_storeu_si256(lanes[i + 8].as_mut_ptr() as *mut __m256i, high);
            }
            for lane in 0..LANES {
                let base = (first + lane) * 64;
                for (w, word) in lanes.iter().enumerate() {
                    out[base + 4 * w..base + 4 * w + 4].copy_from_slice(&word[lane].to_le_bytes());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 lanes themselves, whichever path `expand` picks on this CPU (with AVX-512 it
    /// picks the crate, and comparing `expand` with the crate would test nothing).
    fn simd(seed: &[u8; SEED_BYTES], out: &mut [u8; EXPANSION_BYTES]) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 (checked just above).
                unsafe { avx2::expand(seed, out) };
                return true;
            }
        }
        let _ = (seed, out);
        false
    }

    #[test]
    fn the_simd_expansion_equals_the_blake3_crates_for_random_seeds() {
        let mut hasher = blake3::Hasher::new();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut seeds = vec![[0u8; SEED_BYTES]];
        for _ in 0..2_000 {
            let mut seed = [0u8; SEED_BYTES];
            for b in seed.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = state as u8;
            }
            seeds.push(seed);
        }
        for seed in &seeds {
            let (mut chosen, mut lanes, mut slow) =
                ([0u8; EXPANSION_BYTES], [0u8; EXPANSION_BYTES], [0u8; EXPANSION_BYTES]);
            by_crate(seed, &mut slow, &mut hasher);
            expand(seed, &mut chosen, &mut hasher);
            assert!(chosen == slow, "seed {seed:?}");
            if simd(seed, &mut lanes) {
                assert!(lanes == slow, "seed {seed:?}");
            }
        }
    }
}
