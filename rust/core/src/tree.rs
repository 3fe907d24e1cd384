//! The bucket tree: additive digests of the 65,536 buckets and of their ancestors. They
//! locate differences between replicas; the LtHash digest proves equality.
//!
//! The tree is stored as FANOUT subtrees, one per level-1 node (each owned by a store shard,
//! so shards update their digests in parallel); the root is the sum of the subtrees' roots.
//! `Tree` gives the global view (level, index) that the diff protocol speaks.

use crate::hashing::Lanes;
use crate::{CoreError, Result, BUCKETS, FANOUT, TREE_DEPTH};

/// The levels 1..=TREE_DEPTH below one level-1 node.
#[derive(Clone)]
pub struct SubTree {
    /// `levels[l - 1]` holds FANOUT^(l-1) nodes of global level `l`.
    levels: Vec<Vec<Lanes>>,
}

impl Default for SubTree {
    fn default() -> Self {
        let levels = (1..=TREE_DEPTH).map(|l| vec![Lanes::default(); FANOUT.pow(l as u32 - 1)]).collect();
        SubTree { levels }
    }
}

impl SubTree {
    /// Adds (or subtracts) an element hash to a local bucket and its ancestors: O(depth).
    pub fn update(&mut self, local_bucket: usize, element: &Lanes, subtract: bool) {
        let mut index = local_bucket;
        for level in self.levels.iter_mut().rev() {
            if subtract {
                level[index].sub(element)
            } else {
                level[index].add(element)
            }
            index /= FANOUT;
        }
    }

    /// Global level `level` (1..=TREE_DEPTH), restricted to this subtree.
    pub fn level(&self, level: usize) -> &[Lanes] {
        &self.levels[level - 1]
    }

    pub fn root(&self) -> Lanes {
        self.levels[0][0]
    }

    /// Starts loading a bucket's digest into cache (see `store::prefetch_slice`).
    pub fn prefetch_bucket(&self, local_bucket: usize) {
        crate::store::prefetch_slice(std::slice::from_ref(&self.levels[TREE_DEPTH - 1][local_bucket]));
    }
}

/// The global view of a bucket tree.
pub trait Tree {
    /// The digest of node `index` at `level`; both already checked.
    fn node(&self, level: usize, index: usize) -> Lanes;
}

pub fn level_size(level: usize) -> usize {
    FANOUT.pow(level as u32)
}

pub fn check_level(level: usize) -> Result<()> {
    if level > TREE_DEPTH {
        return Err(CoreError::InvalidArgument(format!(
            "tree level {level} does not exist: levels are 0 (root) to {TREE_DEPTH} (buckets)"
        )));
    }
    Ok(())
}

/// The children's digests of each parent at `level`, concatenated (FANOUT × 32 bytes each).
pub fn children_digests(tree: &impl Tree, level: usize, parents: &[usize]) -> Result<Vec<u8>> {
    check_parent_level(level)?;
    let mut out = Vec::with_capacity(parents.len() * FANOUT * 32);
    for &p in parents {
        check_index(level, p)?;
        for child in p * FANOUT..(p + 1) * FANOUT {
            out.extend_from_slice(&tree.node(level + 1, child).to_bytes());
        }
    }
    Ok(out)
}

/// The children (indexes at level+1) whose digests differ from a peer's, ascending.
pub fn compare_children(tree: &impl Tree, level: usize, parents: &[usize], remote: &[u8]) -> Result<Vec<usize>> {
    check_parent_level(level)?;
    if remote.len() != parents.len() * FANOUT * 32 {
        return Err(CoreError::InvalidArgument(format!(
            "remote children digests are {} bytes; {} parents need {} bytes (FANOUT {FANOUT} × 32 each)",
            remote.len(),
            parents.len(),
            parents.len() * FANOUT * 32
        )));
    }
    let mut out = Vec::new();
    for (i, &p) in parents.iter().enumerate() {
        check_index(level, p)?;
        for c in 0..FANOUT {
            let child = p * FANOUT + c;
            let off = (i * FANOUT + c) * 32;
            if tree.node(level + 1, child).to_bytes()[..] != remote[off..off + 32] {
                out.push(child);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Buckets whose digests differ between two trees, found top-down.
pub fn differing_buckets(a: &impl Tree, b: &impl Tree) -> Vec<usize> {
    let mut frontier: Vec<usize> = if a.node(0, 0) != b.node(0, 0) { vec![0] } else { vec![] };
    for level in 1..=TREE_DEPTH {
        frontier = frontier
            .iter()
            .flat_map(|&p| (p * FANOUT..(p + 1) * FANOUT).filter(|&c| a.node(level, c) != b.node(level, c)))
            .collect();
    }
    frontier
}

fn check_parent_level(level: usize) -> Result<()> {
    if level >= TREE_DEPTH {
        return Err(CoreError::InvalidArgument(format!(
            "level {level} has no children: parents are at levels 0 to {}",
            TREE_DEPTH - 1
        )));
    }
    Ok(())
}

fn check_index(level: usize, index: usize) -> Result<()> {
    let size = level_size(level);
    if index >= size {
        return Err(CoreError::InvalidArgument(format!(
            "node {index} does not exist at level {level}: it has nodes 0 to {}",
            size - 1
        )));
    }
    Ok(())
}

pub fn check_bucket(bucket: usize) -> Result<()> {
    if bucket >= BUCKETS {
        return Err(CoreError::InvalidArgument(format!(
            "bucket {bucket} does not exist: buckets are 0 to {}",
            BUCKETS - 1
        )));
    }
    Ok(())
}
