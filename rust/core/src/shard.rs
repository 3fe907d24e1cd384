//! One shard of the store: the buckets under one level-1 tree node, their subtree of digests,
//! and the code that applies a shard's share of a batch. Shards own disjoint keys, so a batch
//! is applied by all shards at once (rayon), each in the batch's order.

use std::sync::Arc;

use crate::hashing::{element_hash_with, Lanes, Lattice};
use crate::key::Key;
use crate::store::{alloc_size, prefetch_slice, Op, Value};
use crate::tree::SubTree;
use crate::{Digest, BUCKETS, FANOUT};

pub const SHARDS: usize = FANOUT;
pub const SHARD_BUCKETS: usize = BUCKETS / SHARDS;

/// Prefetch distance. A random overwrite costs dependent cache misses (~0.5 µs each measured
/// here): the bucket's shared header, its entries, then the old value they point to, which
/// the lattice must hash. So the header is prefetched 3·D ops ahead, the entries 2·D ahead
/// and, once they have arrived, the old value D ops ahead; perf showed the value miss as a
/// quarter of a batch's time.
const PREFETCH_AHEAD: usize = 8;

pub fn shard_of(bucket: usize) -> (usize, usize) {
    (bucket / SHARD_BUCKETS, bucket % SHARD_BUCKETS)
}

/// An entry with its element hash, kept so that removing it needs neither its value's bytes
/// (a cache miss) nor rehashing them (rust/DESIGN.md, "Element").
#[derive(Clone)]
pub struct Entry {
    pub key: Key,
    pub value: Value,
    pub element: Digest,
}

/// A bucket's entries, sorted by key. Shared copy-on-write (`Arc::make_mut`), so a frozen
/// view of the store (`Contents::clone`) costs one pointer per bucket, and a write afterwards
/// copies only the bucket it touches (rust/DESIGN.md, "Frozen views").
pub type Bucket = Arc<Vec<Entry>>;

#[derive(Clone)]
pub struct Shard {
    pub buckets: Vec<Bucket>,
    pub tree: SubTree,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { buckets: vec![Arc::new(Vec::new()); SHARD_BUCKETS], tree: SubTree::default() }
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
            if let Some(Some((ahead, _))) = ops.get(i + 3 * PREFETCH_AHEAD) {
                prefetch_slice(std::slice::from_ref::<Vec<Entry>>(&self.buckets[*ahead]));
            }
            if let Some(Some((ahead, _))) = ops.get(i + 2 * PREFETCH_AHEAD) {
                prefetch_slice(&self.buckets[*ahead][..]);
                self.tree.prefetch_bucket(*ahead);
            }
            // The replaced value is freed below, and free() reads its chunk header.
            if let Some(Some((ahead, op))) = ops.get(i + PREFETCH_AHEAD) {
                if let Some(old) = self.get(*ahead, op.key.as_slice()) {
                    prefetch_slice(&old[..old.len().min(1)]);
                }
            }
            let (local, op) = ops[i].take().expect("each op is taken once");
            let new_element = op.value.as_ref().map(|v| element_hash_with(&mut hasher, op.key.as_slice(), v));
            if let Some(e) = &new_element {
                delta.lattice.mix_element(&mut hasher, e, false);
                self.tree.update(local, &Lanes::from_digest(e), false);
            }
            if let Some(old) = self.mutate(local, op, new_element, &mut delta) {
                delta.lattice.mix_element(&mut hasher, &old, true);
                self.tree.update(local, &Lanes::from_digest(&old), true);
            }
        }
        delta
    }

    /// Puts or deletes one entry in its bucket; returns the element hash of the entry that left.
    fn mutate(&mut self, local: usize, op: Op, element: Option<Digest>, delta: &mut ShardDelta) -> Option<Digest> {
        let entries = Arc::make_mut(&mut self.buckets[local]);
        let found = entries.binary_search_by(|e| e.key.as_slice().cmp(op.key.as_slice()));
        match (op.value.zip(element), found) {
            (Some((value, element)), Ok(i)) => {
                let old_len = entries[i].value.len();
                delta.value_bytes += value.len() as isize - old_len as isize;
                delta.heap_bytes += alloc_size(value.len()) as isize - alloc_size(old_len) as isize;
                entries[i].value = value;
                Some(std::mem::replace(&mut entries[i].element, element))
            }
            (Some((value, element)), Err(i)) => {
                delta.len += 1;
                delta.key_bytes += op.key.as_slice().len() as isize;
                delta.value_bytes += value.len() as isize;
                delta.heap_bytes += (alloc_size(value.len()) + 2 * op.key.heap_bytes()) as isize;
                delta.key_events.push((op.key.clone(), true));
                entries.insert(i, Entry { key: op.key, value, element });
                None
            }
            (None, Ok(i)) => {
                let old = entries.remove(i);
                delta.len -= 1;
                delta.key_bytes -= old.key.as_slice().len() as isize;
                delta.value_bytes -= old.value.len() as isize;
                delta.heap_bytes -= (alloc_size(old.value.len()) + 2 * old.key.heap_bytes()) as isize;
                delta.key_events.push((old.key, false));
                Some(old.element)
            }
            (None, Err(_)) => None,
        }
    }

    pub fn get(&self, local: usize, key: &[u8]) -> Option<&[u8]> {
        let entries = &self.buckets[local];
        entries.binary_search_by(|e| e.key.as_slice().cmp(key)).ok().map(|i| &entries[i].value[..])
    }

    /// This shard's lattice recomputed from its keys and values (not from the stored element
    /// hashes, so a value changed behind the store's back shows). Values are scattered over
    /// the heap, so the next ones are prefetched while one is hashed.
    pub fn recompute(&self) -> Lattice {
        let mut lattice = Lattice::default();
        let mut hasher = blake3::Hasher::new();
        let entries: Vec<&Entry> = self.buckets.iter().flat_map(|b| b.iter()).collect();
        for (i, e) in entries.iter().enumerate() {
            if let Some(ahead) = entries.get(i + 4) {
                prefetch_slice(&ahead.value);
            }
            lattice.mix_entry(&mut hasher, e.key.as_slice(), &e.value, false);
        }
        lattice
    }

    /// Fills an empty shard from (local bucket, key, value) in key order.
    pub fn load(&mut self, entries: Vec<(usize, Key, Value)>) -> ShardDelta {
        let mut delta = ShardDelta::default();
        let mut hasher = blake3::Hasher::new();
        for (local, key, value) in entries {
            let element = delta.lattice.mix_entry(&mut hasher, key.as_slice(), &value, false);
            self.tree.update(local, &Lanes::from_digest(&element), false);
            delta.len += 1;
            delta.key_bytes += key.as_slice().len() as isize;
            delta.value_bytes += value.len() as isize;
            delta.heap_bytes += (alloc_size(value.len()) + 2 * key.heap_bytes()) as isize;
            Arc::make_mut(&mut self.buckets[local]).push(Entry { key, value, element });
        }
        delta
    }
}
