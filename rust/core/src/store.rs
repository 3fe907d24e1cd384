//! The state store: entries partitioned into the tree's buckets (each a small vector sorted by
//! key, so a point lookup is one hash and a short binary search) and grouped into shards (one
//! per level-1 tree node) that apply a batch in parallel; an ordered key index for scans; the
//! LtHash lattice. All are updated together by `apply`.

use std::collections::BTreeSet;
use std::ops::Bound;

use rayon::prelude::*;

use crate::diff::{merge_sorted, Change, DiffRecord, StateDiff};
use crate::hashing::{bucket_of, Lanes, Lattice};
use crate::key::Key;
use crate::shard::{shard_of, Entry, Shard, ShardDelta, SHARDS};
use crate::tree::{check_bucket, Tree};
use crate::{hex, CoreError, Digest, Result};

pub type Value = Box<[u8]>;

/// One mutation of a batch: `value: None` deletes.
pub struct Op {
    pub key: Key,
    pub value: Option<Value>,
}

impl Op {
    pub fn put(key: &[u8], value: &[u8]) -> Op {
        Op { key: Key::new(key), value: Some(value.into()) }
    }
    pub fn delete(key: &[u8]) -> Op {
        Op { key: Key::new(key), value: None }
    }
}

/// Below this many ops a batch is applied on the calling thread. At 64 (the first setting),
/// entries of 13+ puts (~5 ops each) went to rayon on every node of a loaded 2-core cluster:
/// its workers woke, spun (~1,000 `sched_yield`/s each, strace) and slept again, taking CPU
/// from the tick thread and the event loop. At 1,024, one A/B run (`scripts/bench-ab
/// --target spread`, 6 rounds): writes 1.036x, CPU per write 0.98x; and 128-put transactions
/// through a follower (~650 ops a batch) loaded 26.3K/26.0K keys/s against 23.8K/25.7K.
/// The largest entries (up to 1,024 commands) and bulk loads still use every core.
pub(crate) const PARALLEL_MIN: usize = 1024;

/// Asks the CPU to start loading a slice's cache lines; never faults, changes nothing.
pub(crate) fn prefetch_slice<T>(items: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let start = items.as_ptr() as *const i8;
        let bytes = std::mem::size_of_val(items);
        let mut off = 0;
        while off < bytes {
            // SAFETY: a prefetch is a hint that never faults, and the addresses lie inside a
            // live allocation.
            unsafe { std::arch::x86_64::_mm_prefetch(start.add(off), std::arch::x86_64::_MM_HINT_T0) };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = items;
}

/// glibc's usable chunk size for a request of `n` bytes (16-byte granularity, 8-byte header).
pub(crate) fn alloc_size(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        ((n + 8 + 15) / 16 * 16).max(32)
    }
}

/// The entries in their buckets, the bucket tree and the lattice: everything but the ordered
/// key index. Cloning it is cheap (buckets are shared copy-on-write; the tree, ~2 MiB, is
/// copied), so `StateStore::freeze` hands out an immutable view of the state at one log
/// index that other threads read — write a snapshot, serve a peer's repair — while the store
/// goes on applying.
#[derive(Clone)]
pub struct Contents {
    shards: Vec<Shard>,
    lattice: Lattice,
    len: usize,
    key_bytes: usize,
    value_bytes: usize,
    heap_bytes: usize,
}

impl Default for Contents {
    fn default() -> Self {
        Contents {
            shards: vec![Shard::default(); SHARDS],
            lattice: Lattice::default(),
            len: 0,
            key_bytes: 0,
            value_bytes: 0,
            heap_bytes: 0,
        }
    }
}

#[derive(Clone, Default)]
pub struct StateStore {
    contents: Contents,
    /// Every key, ordered, for scans; the shards hold the values.
    order: BTreeSet<Key>,
}

/// Reads that need no key order (lookups, digests, the tree, bucket contents, snapshots)
/// work the same on the live store and on a frozen view.
impl std::ops::Deref for StateStore {
    type Target = Contents;
    fn deref(&self) -> &Contents {
        &self.contents
    }
}

impl Tree for Contents {
    fn node(&self, level: usize, index: usize) -> Lanes {
        if level == 0 {
            let mut root = Lanes::default();
            for s in &self.shards {
                root.add(&s.tree.root());
            }
            return root;
        }
        let per_shard = crate::tree::level_size(level - 1);
        self.shards[index / per_shard].tree.level(level)[index % per_shard]
    }
}

impl Tree for StateStore {
    fn node(&self, level: usize, index: usize) -> Lanes {
        self.contents.node(level, index)
    }
}

impl StateStore {
    pub fn new() -> StateStore {
        StateStore::default()
    }

    /// An immutable view of the state now, for other threads (see `Contents`).
    pub fn freeze(&self) -> Contents {
        self.contents.clone()
    }

    /// A store over a frozen view's contents (the key index rebuilt on all cores).
    pub fn thaw(contents: Contents) -> StateStore {
        let mut keys: Vec<Key> = contents.all_entries_raw().map(|e| e.key.clone()).collect();
        keys.par_sort_unstable();
        StateStore { order: keys.into_iter().collect(), contents }
    }

    /// Applies a batch in order. Validation happens before the first mutation. Each shard
    /// applies its share on its own (all cores); a key's ops all land in one shard, in order.
    pub fn apply(&mut self, ops: Vec<Op>) -> Result<()> {
        for op in &ops {
            check_len("key", op.key.as_slice().len())?;
            if let Some(v) = &op.value {
                check_len("value", v.len())?;
            }
        }
        let parallel = ops.len() >= PARALLEL_MIN;
        // Sequential on purpose: waking a rayon worker for ~70 ns of hashing per op cost more
        // (measured ~190 ns/op in batches of 1,000) than it saved.
        let buckets: Vec<usize> = ops.iter().map(|op| bucket_of(op.key.as_slice())).collect();
        let mut per_shard: Vec<Vec<(usize, Op)>> = (0..SHARDS).map(|_| Vec::new()).collect();
        for (op, bucket) in ops.into_iter().zip(buckets) {
            let (shard, local) = shard_of(bucket);
            per_shard[shard].push((local, op));
        }
        let shards = &mut self.contents.shards;
        let deltas: Vec<ShardDelta> = if parallel {
            shards.par_iter_mut().zip(per_shard).map(|(s, ops)| s.apply(ops)).collect()
        } else {
            shards.iter_mut().zip(per_shard).filter(|(_, ops)| !ops.is_empty()).map(|(s, ops)| s.apply(ops)).collect()
        };
        for d in deltas {
            self.fold(d);
        }
        Ok(())
    }

    fn fold(&mut self, d: ShardDelta) {
        for (key, entered) in d.key_events {
            if entered {
                self.order.insert(key);
            } else {
                self.order.remove(&key);
            }
        }
        let c = &mut self.contents;
        c.lattice.add(&d.lattice);
        c.len = (c.len as isize + d.len) as usize;
        c.key_bytes = (c.key_bytes as isize + d.key_bytes) as usize;
        c.value_bytes = (c.value_bytes as isize + d.value_bytes) as usize;
        c.heap_bytes = (c.heap_bytes as isize + d.heap_bytes) as usize;
    }

    /// Entries with start <= key < end, in key order.
    pub fn scan(&self, start: &[u8], end: Option<&[u8]>, limit: usize) -> Vec<(&[u8], &[u8])> {
        // No key satisfies start <= key < end when end <= start (and BTreeSet::range panics).
        if end.is_some_and(|end| end <= start) {
            return Vec::new();
        }
        let upper = end.map_or(Bound::Unbounded, Bound::Excluded);
        self.order
            .range::<[u8], _>((Bound::Included(start), upper))
            .take(limit)
            .map(|k| (k.as_slice(), self.get(k.as_slice()).expect("ordered index and buckets agree")))
            .collect()
    }

    pub fn scan_prefix(&self, prefix: &[u8], limit: usize) -> Vec<(&[u8], &[u8])> {
        self.order
            .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|k| k.as_slice().starts_with(prefix))
            .take(limit)
            .map(|k| (k.as_slice(), self.get(k.as_slice()).expect("ordered index and buckets agree")))
            .collect()
    }

    /// Estimated heap bytes: bucket vectors, ordered index nodes, value and long-key buffers,
    /// and the tree. (The benchmark measures resident memory for real.)
    pub fn memory_usage(&self) -> usize {
        // BTreeSet leaves hold up to 11 keys and run about 2/3 full after random inserts.
        let order_bytes = self.len() * std::mem::size_of::<Key>() * 3 / 2;
        self.contents.memory_usage() + order_bytes
    }

    pub fn differing_buckets(&self, other: &StateStore) -> Vec<usize> {
        crate::tree::differing_buckets(self, other)
    }

    /// The diff that takes `self` to `other`, found through the bucket tree.
    pub fn diff(&self, other: &StateStore) -> StateDiff {
        self.contents.diff(&other.contents)
    }

    /// Applies a diff atomically: refuses one that does not start from this state, and undoes
    /// one that does not reach the digest it promises.
    pub fn apply_diff(&mut self, diff: &StateDiff) -> Result<()> {
        let here = self.digest();
        if here != diff.from_digest {
            return Err(CoreError::DigestMismatch(format!(
                "the diff applies to state {} but this store is at {}",
                hex(&diff.from_digest),
                hex(&here)
            )));
        }
        let mut undo = Vec::with_capacity(diff.records.len());
        for r in &diff.records {
            let current = self.get(&r.key);
            match (&r.change, current) {
                (Change::Added(_), None) => undo.push(Op::delete(&r.key)),
                (Change::Changed(_) | Change::Removed, Some(old)) => undo.push(Op::put(&r.key, old)),
                (change, _) => {
                    return Err(CoreError::DigestMismatch(format!(
                        "the diff says key {:?} was {} but this store {} it; the diff is inconsistent \
                         with its from_digest",
                        String::from_utf8_lossy(&r.key),
                        change.verb(),
                        if current.is_some() { "has" } else { "lacks" }
                    )))
                }
            }
        }
        self.apply(diff.to_ops())?;
        let reached = self.digest();
        if reached != diff.to_digest {
            self.apply(undo)?;
            return Err(CoreError::DigestMismatch(format!(
                "the diff promised state {} but applying it gave {}; nothing was changed",
                hex(&diff.to_digest),
                hex(&reached)
            )));
        }
        Ok(())
    }

    /// Builds a store from entries in strictly increasing key order (snapshot loading), on
    /// all cores. The caller has already checked the order.
    pub fn from_sorted(entries: Vec<(Key, Value)>) -> StateStore {
        let mut store = StateStore::default();
        let buckets: Vec<usize> = entries.par_iter().map(|(k, _)| bucket_of(k.as_slice())).collect();
        let mut per_shard: Vec<Vec<(usize, Key, Value)>> = (0..SHARDS).map(|_| Vec::new()).collect();
        let mut keys = Vec::with_capacity(entries.len());
        for ((key, value), bucket) in entries.into_iter().zip(buckets) {
            let (shard, local) = shard_of(bucket);
            keys.push(key.clone());
            per_shard[shard].push((local, key, value));
        }
        let shards = &mut store.contents.shards;
        let (order, deltas) = rayon::join(
            // Keys arrive sorted, so the set is bulk-built.
            || keys.into_iter().collect::<BTreeSet<Key>>(),
            || shards.par_iter_mut().zip(per_shard).map(|(s, e)| s.load(e)).collect::<Vec<_>>(),
        );
        for d in deltas {
            store.fold(d);
        }
        store.order = order;
        store
    }
}

impl Contents {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn digest(&self) -> Digest {
        self.lattice.digest()
    }

    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        let (shard, local) = shard_of(bucket_of(key));
        self.shards[shard].get(local, key)
    }

    fn all_entries_raw(&self) -> impl Iterator<Item = &Entry> {
        self.shards.iter().flat_map(|s| s.buckets.iter().flat_map(|b| b.iter()))
    }

    fn all_entries(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.all_entries_raw().map(|e| (e.key.as_slice(), &e.value[..]))
    }

    /// All entries in key order (for snapshots): gathered from the buckets, sorted on all cores.
    pub fn sorted_entries(&self) -> Vec<(&[u8], &[u8])> {
        let mut all: Vec<(&[u8], &[u8])> = self.all_entries().collect();
        all.par_sort_unstable_by(|a, b| a.0.cmp(b.0));
        all
    }

    /// The digest recomputed from the contents alone, on all cores.
    pub fn recompute_digest(&self) -> Digest {
        let mut total = Lattice::default();
        for l in self.shards.par_iter().map(Shard::recompute).collect::<Vec<_>>() {
            total.add(&l);
        }
        total.digest()
    }

    /// Heap bytes of the buckets, values, long keys and tree (without the key index).
    fn memory_usage(&self) -> usize {
        let slot = std::mem::size_of::<Entry>();
        let bucket_bytes: usize = self
            .shards
            .iter()
            .flat_map(|s| s.buckets.iter())
            .map(|b| b.capacity() * slot + std::mem::size_of::<Vec<Entry>>() + 16)
            .sum();
        let tree_bytes = (0..=crate::TREE_DEPTH).map(|l| crate::FANOUT.pow(l as u32) * 32).sum::<usize>();
        bucket_bytes + tree_bytes + self.heap_bytes + 2048
    }

    pub fn key_bytes(&self) -> usize {
        self.key_bytes
    }

    pub fn value_bytes(&self) -> usize {
        self.value_bytes
    }

    /// Every entry of the given buckets, in key order.
    pub fn bucket_entries(&self, buckets: &[usize]) -> Result<Vec<(&[u8], &[u8])>> {
        let buckets = sorted_buckets(buckets)?;
        let mut out: Vec<(&[u8], &[u8])> = buckets
            .iter()
            .flat_map(|&b| {
                let (shard, local) = shard_of(b);
                self.shards[shard].buckets[local].iter().map(|e| (e.key.as_slice(), &e.value[..]))
            })
            .collect();
        out.sort_unstable_by(|a, b| a.0.cmp(b.0));
        Ok(out)
    }

    /// Every key of the given buckets with its element hash (rust/DESIGN.md, "Element"), in
    /// key order: what a peer compares, key by key, to find which entries of a differing
    /// bucket differ without receiving their values.
    pub fn bucket_element_hashes(&self, buckets: &[usize]) -> Result<Vec<(&[u8], &Digest)>> {
        let buckets = sorted_buckets(buckets)?;
        let mut out: Vec<(&[u8], &Digest)> = buckets
            .iter()
            .flat_map(|&b| {
                let (shard, local) = shard_of(b);
                self.shards[shard].buckets[local].iter().map(|e| (e.key.as_slice(), &e.element))
            })
            .collect();
        out.sort_unstable_by(|a, b| a.0.cmp(b.0));
        Ok(out)
    }

    /// The diff that takes `self` to `other`, found through the bucket tree.
    pub fn diff(&self, other: &Contents) -> StateDiff {
        let buckets = crate::tree::differing_buckets(self, other);
        let mine = self.bucket_entries(&buckets).expect("buckets from the tree are valid");
        let theirs = other.bucket_entries(&buckets).expect("buckets from the tree are valid");
        let records = merge_sorted(mine.into_iter().map(Ok), theirs.into_iter().map(Ok))
            .expect("in-memory entries cannot fail");
        StateDiff { from_digest: self.digest(), to_digest: other.digest(), records }
    }

    /// The diff to a peer's state, given the peer's entries of exactly `buckets`.
    pub fn diff_buckets(&self, buckets: &[usize], remote: Vec<(Vec<u8>, Vec<u8>)>) -> Result<StateDiff> {
        let requested = sorted_buckets(buckets)?;
        let mut remote = remote;
        for (k, _) in &remote {
            let b = bucket_of(k);
            if requested.binary_search(&b).is_err() {
                return Err(CoreError::InvalidArgument(format!(
                    "remote entry {:?} belongs to bucket {b}, which was not requested; pass the \
                     peer's bucket_entries() for exactly the same buckets",
                    String::from_utf8_lossy(k)
                )));
            }
        }
        remote.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        if let Some(w) = remote.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(CoreError::InvalidArgument(format!(
                "remote entries name key {:?} twice",
                String::from_utf8_lossy(&w[0].0)
            )));
        }
        let mine = self.bucket_entries(&requested)?;
        let records = merge_sorted(
            mine.into_iter().map(Ok),
            remote.iter().map(|(k, v)| Ok((k.as_slice(), v.as_slice()))),
        )?;
        let mut lattice = self.lattice.clone();
        let h = &mut blake3::Hasher::new();
        for r in &records {
            if let Change::Changed(_) | Change::Removed = r.change {
                let old = self.get(&r.key).expect("merge saw this key here");
                lattice.mix_entry(h, &r.key, old, true);
            }
            if let Change::Added(v) | Change::Changed(v) = &r.change {
                lattice.mix_entry(h, &r.key, v, false);
            }
        }
        Ok(StateDiff { from_digest: self.digest(), to_digest: lattice.digest(), records })
    }
}

impl Change {
    fn verb(&self) -> &'static str {
        match self {
            Change::Added(_) => "added",
            Change::Changed(_) => "changed",
            Change::Removed => "removed",
        }
    }
}

impl DiffRecord {
    fn to_op(&self) -> Op {
        match &self.change {
            Change::Added(v) | Change::Changed(v) => Op::put(&self.key, v),
            Change::Removed => Op::delete(&self.key),
        }
    }
}

impl StateDiff {
    pub fn to_ops(&self) -> Vec<Op> {
        self.records.iter().map(DiffRecord::to_op).collect()
    }
}

fn check_len(what: &str, len: usize) -> Result<()> {
    if len > u32::MAX as usize {
        return Err(CoreError::InvalidArgument(format!(
            "a {what} of {len} bytes exceeds the 4 GiB limit of the snapshot format"
        )));
    }
    Ok(())
}

fn sorted_buckets(buckets: &[usize]) -> Result<Vec<usize>> {
    for &b in buckets {
        check_bucket(b)?;
    }
    let mut v = buckets.to_vec();
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn store_of(pairs: &[(&[u8], &[u8])]) -> StateStore {
        let mut s = StateStore::new();
        s.apply(pairs.iter().map(|(k, v)| Op::put(k, v)).collect()).expect("the operation under test succeeds");
        s
    }

    #[test]
    fn incremental_equals_recomputed_over_history() {
        let mut s = StateStore::new();
        let mut ops = Vec::new();
        for i in 0..500u32 {
            ops.push(Op::put(&i.to_le_bytes(), &[i as u8; 7]));
        }
        s.apply(ops).expect("the operation under test succeeds");
        let mut ops = Vec::new();
        for i in (0..500u32).step_by(3) {
            ops.push(Op::delete(&i.to_le_bytes()));
            ops.push(Op::put(&(i + 1).to_le_bytes(), b"over"));
            ops.push(Op::put(&(i + 1).to_le_bytes(), b"twice"));
        }
        s.apply(ops).expect("the operation under test succeeds");
        assert_eq!(s.digest(), s.recompute_digest());
        assert_eq!(s.len(), s.sorted_entries().len());
    }

    #[test]
    fn a_batch_applied_on_all_cores_equals_the_same_ops_applied_one_by_one() {
        // Overwrites and deletes of the same keys inside one batch: their order must hold.
        let ops = |n: u32| -> Vec<Op> {
            (0..n).map(|i| match i % 4 {
                3 => Op::delete(&(i / 2).to_le_bytes()),
                _ => Op::put(&(i / 2).to_le_bytes(), &[i as u8; 9]),
            }).collect()
        };
        let n = 3 * PARALLEL_MIN as u32;
        let mut parallel = StateStore::new();
        parallel.apply(ops(n)).expect("the operation under test succeeds");
        let mut sequential = StateStore::new();
        for op in ops(n) {
            sequential.apply(vec![op]).expect("the operation under test succeeds");
        }
        assert_eq!(parallel.digest(), sequential.digest());
        assert_eq!(parallel.digest(), parallel.recompute_digest());
        assert_eq!(parallel.sorted_entries(), sequential.sorted_entries());
        assert_eq!(parallel.scan(b"", None, usize::MAX), sequential.scan(b"", None, usize::MAX));
    }

    #[test]
    fn same_contents_same_digest_whatever_the_history() {
        let a = store_of(&[(b"a", b"1"), (b"b", b"2")]);
        let mut b = store_of(&[(b"b", b"0"), (b"c", b"3")]);
        b.apply(vec![Op::put(b"b", b"2"), Op::delete(b"c"), Op::put(b"a", b"1")]).expect("the operation under test succeeds");
        assert_eq!(a.digest(), b.digest());
        assert!(a.differing_buckets(&b).is_empty());
    }

    #[test]
    fn diff_then_apply_reaches_the_other_state() {
        let a = store_of(&[(b"a", b"1"), (b"b", b"2"), (b"c", b"3")]);
        let b = store_of(&[(b"a", b"1"), (b"b", b"22"), (b"d", b"4")]);
        let d = a.diff(&b);
        assert_eq!(d.records.len(), 3);
        let mut c = a.clone();
        c.apply_diff(&d).expect("the operation under test succeeds");
        assert_eq!(c.digest(), b.digest());
        assert_eq!(c.sorted_entries(), b.sorted_entries());
    }

    #[test]
    fn diff_from_another_state_is_refused_and_changes_nothing() {
        let a = store_of(&[(b"a", b"1")]);
        let b = store_of(&[(b"a", b"2")]);
        let d = a.diff(&b);
        let mut other = store_of(&[(b"z", b"9")]);
        let before = other.digest();
        assert!(matches!(other.apply_diff(&d), Err(CoreError::DigestMismatch(_))));
        assert_eq!(other.digest(), before);
    }

    #[test]
    fn tampered_diff_is_undone() {
        let a = store_of(&[(b"a", b"1")]);
        let b = store_of(&[(b"a", b"2")]);
        let mut d = a.diff(&b);
        d.records[0].change = Change::Changed(b"3".to_vec());
        let mut c = a.clone();
        assert!(matches!(c.apply_diff(&d), Err(CoreError::DigestMismatch(_))));
        assert_eq!(c.digest(), a.digest());
        assert_eq!(c.get(b"a"), Some(&b"1"[..]));
    }

    #[test]
    fn remote_bucket_protocol_matches_in_memory_diff() {
        let a = store_of(&[(b"k1", b"1"), (b"k2", b"2"), (b"k3", b"3")]);
        let b = store_of(&[(b"k1", b"1"), (b"k2", b"x"), (b"k4", b"4")]);
        let buckets = a.differing_buckets(&b);
        let remote: Vec<(Vec<u8>, Vec<u8>)> =
            b.bucket_entries(&buckets).expect("the operation under test succeeds").into_iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        let d = a.diff_buckets(&buckets, remote).expect("the operation under test succeeds");
        assert_eq!(d, a.diff(&b));
    }

    #[test]
    fn scans_are_ordered_and_bounded() {
        let s = store_of(&[(b"b", b"2"), (b"a", b"1"), (b"ab", b"x"), (b"c", b"3")]);
        let keys: Vec<&[u8]> = s.scan(b"a", Some(b"c"), usize::MAX).into_iter().map(|e| e.0).collect();
        assert_eq!(keys, vec![&b"a"[..], b"ab", b"b"]);
        let keys: Vec<&[u8]> = s.scan_prefix(b"a", 1).into_iter().map(|e| e.0).collect();
        assert_eq!(keys, vec![&b"a"[..]]);
        assert!(s.scan(b"c", Some(b"a"), usize::MAX).is_empty());
        assert!(s.scan(b"b", Some(b"b"), usize::MAX).is_empty());
    }

    #[test]
    fn a_frozen_view_keeps_its_state_while_the_store_moves_on() {
        let mut s = store_of(&[(b"a", b"1"), (b"b", b"2"), (b"c", b"3")]);
        let frozen = s.freeze();
        let (digest, entries): (Digest, Vec<(Vec<u8>, Vec<u8>)>) =
            (s.digest(), s.sorted_entries().into_iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect());
        s.apply(vec![Op::put(b"a", b"changed"), Op::delete(b"b"), Op::put(b"d", b"4")]).expect("the operation under test succeeds");
        assert_eq!(frozen.digest(), digest);
        assert_eq!(frozen.recompute_digest(), digest);
        let now: Vec<(Vec<u8>, Vec<u8>)> = frozen.sorted_entries().into_iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        assert_eq!(now, entries);
        assert_eq!(frozen.get(b"a"), Some(&b"1"[..]));
        // The diff between the frozen view and the store is exactly what changed since.
        let d = frozen.diff(&s.freeze());
        assert_eq!(d.records.len(), 3);
        let thawed = StateStore::thaw(frozen);
        assert_eq!(thawed.digest(), digest);
        assert_eq!(thawed.scan(b"", None, usize::MAX).len(), 3);
    }

    #[test]
    fn writes_after_a_freeze_copy_only_the_buckets_they_touch() {
        let mut s = StateStore::new();
        s.apply((0..10_000u32).map(|i| Op::put(&i.to_le_bytes(), b"v")).collect()).expect("the operation under test succeeds");
        let frozen = s.freeze();
        s.apply(vec![Op::put(&7u32.to_le_bytes(), b"w")]).expect("the operation under test succeeds");
        let shared = s
            .contents
            .shards
            .iter()
            .zip(&frozen.shards)
            .flat_map(|(a, b)| a.buckets.iter().zip(&b.buckets))
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        assert_eq!(shared, crate::BUCKETS - 1);
    }
}
