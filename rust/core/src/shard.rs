//! One shard of the store: the buckets under one level-1 tree node, their subtree of digests,
//! and the code that applies a shard's share of a batch. Shards own disjoint keys, so a batch
//! is applied by all shards at once (rayon), each in the batch's order.

use crate::hashing::{Lanes, Lattice};
use crate::key::Key;
use crate::store::{alloc_size, prefetch_slice, Op, Value};
use crate::tree::SubTree;
use crate::{BUCKETS, FANOUT};

pub const SHARDS: usize = FANOUT;
pub const SHARD_BUCKETS: usize = BUCKETS / SHARDS;

/// Prefetch distance. A random overwrite costs two dependent cache misses (~0.5 µs each
/// measured here): the bucket's entries, then the old value they point to, which the lattice
/// must hash. So the bucket is prefetched 2·D ops ahead and, once it has arrived, the old
/// value D ops ahead; perf showed the value miss as a quarter of a batch's time.
const PREFETCH_AHEAD: usize = 8;

pub fn shard_of(bucket: usize) -> (usize, usize) {
    (bucket / SHARD_BUCKETS, bucket % SHARD_BUCKETS)
}

#[derive(Clone)]
pub struct Shard {
    /// Each bucket's entries, sorted by key.
    pub buckets: Vec<Vec<(Key, Value)>>,
    pub tree: SubTree,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { buckets: vec![Vec::new(); SHARD_BUCKETS], tree: SubTree::default() }
    }
}

/// What one shard's share of a batch changed, for the store to fold in.
#[derive(Default)]
pub struct ShardDelta {
    pub lattice: Lattice,
    /// Keys that entered (true) or left (false) the key set, in batch order.
    pub key_events: Vec<(Key, bool)>,
    pub len: isize,
    pub key_bytes: isize,
    pub value_bytes: isize,
    pub heap_bytes: isize,
}

impl Shard {
    /// Applies ops (local bucket, op) in order: mutates buckets, updates the subtree, and
    /// returns the lattice change and key-set events.
    pub fn apply(&mut self, ops: Vec<(usize, Op)>) -> ShardDelta {
        let mut delta = ShardDelta::default();
        let mut hasher = blake3::Hasher::new();
        let mut ops: Vec<Option<(usize, Op)>> = ops.into_iter().map(Some).collect();
        for i in 0..ops.len() {
            if let Some(Some((ahead, _))) = ops.get(i + 2 * PREFETCH_AHEAD) {
                prefetch_slice(&self.buckets[*ahead]);
                self.tree.prefetch_bucket(*ahead);
            }
            if let Some(Some((ahead, op))) = ops.get(i + PREFETCH_AHEAD) {
                if let Some(old) = self.get(*ahead, op.key.as_slice()) {
                    prefetch_slice(old);
                }
            }
            let (local, op) = ops[i].take().expect("each op is taken once");
            if let Some(value) = &op.value {
                let e = delta.lattice.mix_entry(&mut hasher, op.key.as_slice(), value, false);
                self.tree.update(local, &Lanes::from_digest(&e), false);
            }
            if let Some((key, old)) = self.mutate(local, op, &mut delta) {
                let e = delta.lattice.mix_entry(&mut hasher, key.as_slice(), &old, true);
                self.tree.update(local, &Lanes::from_digest(&e), true);
            }
        }
        delta
    }

    /// Puts or deletes one entry in its bucket; returns the entry that left the map.
    fn mutate(&mut self, local: usize, op: Op, delta: &mut ShardDelta) -> Option<(Key, Value)> {
        let entries = &mut self.buckets[local];
        let found = entries.binary_search_by(|(k, _)| k.as_slice().cmp(op.key.as_slice()));
        match (op.value, found) {
            (Some(value), Ok(i)) => {
                let old_len = entries[i].1.len();
                delta.value_bytes += value.len() as isize - old_len as isize;
                delta.heap_bytes += alloc_size(value.len()) as isize - alloc_size(old_len) as isize;
                let old = std::mem::replace(&mut entries[i].1, value);
                Some((op.key, old))
            }
            (Some(value), Err(i)) => {
                delta.len += 1;
                delta.key_bytes += op.key.as_slice().len() as isize;
                delta.value_bytes += value.len() as isize;
                delta.heap_bytes += (alloc_size(value.len()) + 2 * op.key.heap_bytes()) as isize;
                delta.key_events.push((op.key.clone(), true));
                entries.insert(i, (op.key, value));
                None
            }
            (None, Ok(i)) => {
                let (key, old) = entries.remove(i);
                delta.len -= 1;
                delta.key_bytes -= key.as_slice().len() as isize;
                delta.value_bytes -= old.len() as isize;
                delta.heap_bytes -= (alloc_size(old.len()) + 2 * key.heap_bytes()) as isize;
                delta.key_events.push((key.clone(), false));
                Some((key, old))
            }
            (None, Err(_)) => None,
        }
    }

    pub fn get(&self, local: usize, key: &[u8]) -> Option<&[u8]> {
        let entries = &self.buckets[local];
        entries.binary_search_by(|(k, _)| k.as_slice().cmp(key)).ok().map(|i| &entries[i].1[..])
    }

    /// This shard's lattice recomputed from its contents.
    pub fn recompute(&self) -> Lattice {
        let mut lattice = Lattice::default();
        let mut hasher = blake3::Hasher::new();
        for (k, v) in self.buckets.iter().flatten() {
            lattice.mix_entry(&mut hasher, k.as_slice(), v, false);
        }
        lattice
    }

    /// Fills an empty shard from (local bucket, entry) pairs in key order.
    pub fn load(&mut self, entries: Vec<(usize, Key, Value)>) -> ShardDelta {
        let mut delta = ShardDelta::default();
        let mut hasher = blake3::Hasher::new();
        for (local, key, value) in entries {
            let e = delta.lattice.mix_entry(&mut hasher, key.as_slice(), &value, false);
            self.tree.update(local, &Lanes::from_digest(&e), false);
            delta.len += 1;
            delta.key_bytes += key.as_slice().len() as isize;
            delta.value_bytes += value.len() as isize;
            delta.heap_bytes += (alloc_size(value.len()) + 2 * key.heap_bytes()) as isize;
            self.buckets[local].push((key, value));
        }
        delta
    }
}
