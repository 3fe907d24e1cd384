//! The hash functions every replica must compute identically (rust/DESIGN.md, "Algorithms").

use crate::{Digest, BUCKETS, DIGEST_SIZE};

pub const LANES: usize = 1024;
const EXPANSION_BYTES: usize = crate::expand::EXPANSION_BYTES;
const _: () = assert!(EXPANSION_BYTES == LANES * 2);

const ELEMENT_TAG: &[u8; 8] = b"SYNELEM1";
const LANES_TAG: &[u8; 8] = b"SYNLANE1";
const STATE_TAG: &[u8; 8] = b"SYNSTAT1";
const KEY_TAG: &[u8; 8] = b"SYNKEY01";
const CHAIN_TAG: &[u8; 8] = b"SYNCHAIN";

/// The LtHash16 lattice of a multiset of entries: 1024 u16 lanes, wrapping arithmetic.
#[derive(Clone, PartialEq, Eq)]
pub struct Lattice(Box<[u16; LANES]>);

impl Default for Lattice {
    fn default() -> Self {
        Lattice(Box::new([0u16; LANES]))
    }
}

impl std::fmt::Debug for Lattice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lattice({})", crate::error::hex(&self.digest()))
    }
}

impl Lattice {
    pub fn add(&mut self, other: &Lattice) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a = a.wrapping_add(*b);
        }
    }

    pub fn sub(&mut self, other: &Lattice) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a = a.wrapping_sub(*b);
        }
    }

    /// Adds (or subtracts) the expansion of an element hash. `hasher` is scratch space reused
    /// across calls: a fresh `blake3::Hasher` is ~1.9 KB, and building and moving one per
    /// entry showed up as 15% of a batch in `perf`.
    pub fn mix_element(&mut self, hasher: &mut blake3::Hasher, element: &Digest, subtract: bool) {
        let mut seed = [0u8; 8 + DIGEST_SIZE];
        seed[..8].copy_from_slice(LANES_TAG);
        seed[8..].copy_from_slice(element);
        let mut expansion = [0u8; EXPANSION_BYTES];
        crate::expand::expand(&seed, &mut expansion, hasher);
        let lanes = expansion.chunks_exact(2).map(|p| u16::from_le_bytes([p[0], p[1]]));
        // Two loops rather than a branch per lane, so each one vectorizes.
        if subtract {
            self.0.iter_mut().zip(lanes).for_each(|(a, x)| *a = a.wrapping_sub(x));
        } else {
            self.0.iter_mut().zip(lanes).for_each(|(a, x)| *a = a.wrapping_add(x));
        }
    }

    /// Hashes an entry, mixes its expansion in (or out) and returns its element hash.
    pub fn mix_entry(&mut self, hasher: &mut blake3::Hasher, key: &[u8], value: &[u8], subtract: bool) -> Digest {
        let element = element_hash_with(hasher, key, value);
        self.mix_element(hasher, &element, subtract);
        element
    }

    pub fn digest(&self) -> Digest {
        let mut bytes = [0u8; EXPANSION_BYTES];
        for (lane, out) in self.0.iter().zip(bytes.chunks_exact_mut(2)) {
            out.copy_from_slice(&lane.to_le_bytes());
        }
        let mut h = blake3::Hasher::new();
        h.update(STATE_TAG);
        h.update(&bytes);
        *h.finalize().as_bytes()
    }
}

/// `B3(elem)`, with a caller's scratch hasher.
pub fn element_hash_with(h: &mut blake3::Hasher, key: &[u8], value: &[u8]) -> Digest {
    h.reset();
    h.update(ELEMENT_TAG);
    h.update(&(key.len() as u32).to_le_bytes());
    h.update(key);
    h.update(value);
    *h.finalize().as_bytes()
}

/// `B3(elem)`: what buckets add up, and the seed of the entry's lattice expansion.
pub fn element_hash(key: &[u8], value: &[u8]) -> Digest {
    element_hash_with(&mut blake3::Hasher::new(), key, value)
}

/// The bucket (tree leaf) of a key: depends on the key alone, so a key never moves.
pub fn bucket_of(key: &[u8]) -> usize {
    // Short keys (the common case) are hashed from one stack buffer, avoiding the Hasher.
    let mut buf = [0u8; 64];
    let b = if key.len() <= buf.len() - KEY_TAG.len() {
        buf[..8].copy_from_slice(KEY_TAG);
        buf[8..8 + key.len()].copy_from_slice(key);
        blake3::hash(&buf[..8 + key.len()])
    } else {
        let mut h = blake3::Hasher::new();
        h.update(KEY_TAG);
        h.update(key);
        h.finalize()
    };
    let x = u32::from_le_bytes([b.as_bytes()[0], b.as_bytes()[1], b.as_bytes()[2], b.as_bytes()[3]]);
    (x as usize) % BUCKETS
}

/// Four u64 lanes, summed with wrap-around: the additive digest of a bucket or tree node.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Lanes(pub [u64; 4]);

impl Lanes {
    pub fn from_digest(d: &Digest) -> Lanes {
        let mut l = [0u64; 4];
        for (i, chunk) in d.chunks_exact(8).enumerate() {
            l[i] = u64::from_le_bytes(chunk.try_into().expect("8-byte chunk"));
        }
        Lanes(l)
    }

    pub fn add(&mut self, o: &Lanes) {
        for i in 0..4 {
            self.0[i] = self.0[i].wrapping_add(o.0[i]);
        }
    }

    pub fn sub(&mut self, o: &Lanes) {
        for i in 0..4 {
            self.0[i] = self.0[i].wrapping_sub(o.0[i]);
        }
    }

    pub fn to_bytes(self) -> Digest {
        let mut out = [0u8; DIGEST_SIZE];
        for (i, l) in self.0.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&l.to_le_bytes());
        }
        out
    }
}

/// One link of the audit chain: `B3("SYNCHAIN" ‖ prev ‖ u64 index ‖ entry)`.
pub fn chain(prev: &Digest, index: u64, entry: &[u8]) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(CHAIN_TAG);
    h.update(prev);
    h.update(&index.to_le_bytes());
    h.update(entry);
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_then_sub_is_identity() {
        let mut l = Lattice::default();
        let h = &mut blake3::Hasher::new();
        let empty = l.digest();
        l.mix_entry(h, b"k", b"v", false);
        assert_ne!(l.digest(), empty);
        l.mix_entry(h, b"k", b"v", true);
        assert_eq!(l.digest(), empty);
    }

    #[test]
    fn order_independent() {
        let mut a = Lattice::default();
        let mut b = Lattice::default();
        let h = &mut blake3::Hasher::new();
        a.mix_entry(h, b"x", b"1", false);
        a.mix_entry(h, b"y", b"2", false);
        b.mix_entry(h, b"y", b"2", false);
        b.mix_entry(h, b"x", b"1", false);
        assert_eq!(a, b);
    }

    #[test]
    fn mixing_an_entry_is_mixing_its_element_hash() {
        let h = &mut blake3::Hasher::new();
        let (mut a, mut b) = (Lattice::default(), Lattice::default());
        let e = a.mix_entry(h, b"key", b"value", false);
        assert_eq!(e, element_hash(b"key", b"value"));
        b.mix_element(h, &e, false);
        assert_eq!(a, b);
    }

    #[test]
    fn key_length_prefix_separates_key_and_value() {
        assert_ne!(element_hash(b"ab", b"c"), element_hash(b"a", b"bc"));
    }

    #[test]
    fn long_and_short_keys_bucket_like_the_spec() {
        for len in [0usize, 1, 55, 56, 57, 200] {
            let key = vec![7u8; len];
            let mut h = blake3::Hasher::new();
            h.update(KEY_TAG);
            h.update(&key);
            let b = h.finalize();
            let want = u32::from_le_bytes(b.as_bytes()[..4].try_into().expect("the operation under test succeeds")) as usize % BUCKETS;
            assert_eq!(bucket_of(&key), want, "key length {len}");
        }
    }

    #[test]
    fn lanes_roundtrip() {
        let d = element_hash(b"a", b"b");
        assert_eq!(Lanes::from_digest(&d).to_bytes(), d);
    }

    #[test]
    fn chain_depends_on_every_input() {
        let z = [0u8; 32];
        let a = chain(&z, 1, b"e");
        assert_ne!(a, chain(&z, 2, b"e"));
        assert_ne!(a, chain(&a, 1, b"e"));
        assert_ne!(a, chain(&z, 1, b"f"));
    }
}
