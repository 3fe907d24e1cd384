//! Synapse's state core: the replicated key-value state of one node and everything that must
//! be bit-for-bit identical on every replica. See `rust/DESIGN.md` for the formats.

mod codec;
pub mod diff;
mod error;
mod expand;
pub mod hashing;
pub mod key;
pub mod kv_apply;
pub mod msgpack;
pub mod snapshot;
pub mod store;
pub mod tree;
mod shard;

pub use diff::{merge_sorted, Change, DiffRecord, StateDiff};
pub use error::{CoreError, Result};
pub(crate) use error::hex;
pub use hashing::{bucket_of, chain, element_hash};
pub use kv_apply::{apply_kv_entry, KvChange, KvOutcome, KvResult};
pub use snapshot::{
    load_snapshot, load_snapshot_at, read_snapshot_info, write_snapshot, write_snapshot_with_prefix, SnapshotEntries, SnapshotInfo,
};
pub use store::{Contents, Op, StateStore};

pub type Digest = [u8; DIGEST_SIZE];

pub const DIGEST_SIZE: usize = 32;
pub const FANOUT: usize = 16;
pub const TREE_DEPTH: usize = 4;
/// FANOUT^TREE_DEPTH leaves.
pub const BUCKETS: usize = 65_536;
pub const SNAPSHOT_FORMAT: u32 = codec::FORMAT_VERSION;

/// The diff that takes `store` to the state in a snapshot file (the snapshot fully verified).
pub fn diff_store_to_snapshot(store: &Contents, path: &std::path::Path) -> Result<StateDiff> {
    let entries = SnapshotEntries::open(path)?;
    let to_digest = entries.state_digest();
    let records = merge_sorted(store.sorted_entries().into_iter().map(Ok), entries)?;
    Ok(StateDiff { from_digest: store.digest(), to_digest, records })
}

/// The diff that takes the state in `old` to the state in `new` (both fully verified).
pub fn diff_snapshots(old: &std::path::Path, new: &std::path::Path) -> Result<StateDiff> {
    let a = SnapshotEntries::open(old)?;
    let b = SnapshotEntries::open(new)?;
    let (from_digest, to_digest) = (a.state_digest(), b.state_digest());
    let records = merge_sorted(a, b)?;
    Ok(StateDiff { from_digest, to_digest, records })
}
