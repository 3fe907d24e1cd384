//! The bucket tree: additive digests of the 65,536 buckets and of their ancestors.
//! They locate differences between replicas; the LtHash digest proves equality.

use crate::hashing::Lanes;
use crate::{CoreError, Result, BUCKETS, FANOUT, TREE_DEPTH};

#[derive(Clone)]
pub struct BucketTree {
    /// `levels[l]` holds FANOUT^l nodes; `levels[TREE_DEPTH]` are the buckets.
    levels: Vec<Vec<Lanes>>,
}

impl Default for BucketTree {
    fn default() -> Self {
        let levels = (0..=TREE_DEPTH).map(|l| vec![Lanes::default(); FANOUT.pow(l as u32)]).collect();
        BucketTree { levels }
    }
}

impl BucketTree {
    /// Adds (or subtracts) an element hash to a bucket and every ancestor: O(depth).
    pub fn update(&mut self, bucket: usize, element: &Lanes, subtract: bool) {
        let mut index = bucket;
        for level in (0..=TREE_DEPTH).rev() {
            let node = &mut self.levels[level][index];
            if subtract {
                node.sub(element)
            } else {
                node.add(element)
            }
            index /= FANOUT;
        }
    }

    /// Starts loading a bucket's digest into cache (see `store::prefetch_slice`).
    pub fn prefetch_bucket(&self, bucket: usize) {
        crate::store::prefetch_slice(std::slice::from_ref(&self.levels[TREE_DEPTH][bucket]));
    }

    pub fn level(&self, level: usize) -> Result<&[Lanes]> {
        self.levels.get(level).map(|v| v.as_slice()).ok_or_else(|| {
            CoreError::InvalidArgument(format!(
                "tree level {level} does not exist: levels are 0 (root) to {TREE_DEPTH} (buckets)"
            ))
        })
    }

    /// The children's digests of each parent at `level`, concatenated (FANOUT × 32 bytes each).
    pub fn children_digests(&self, level: usize, parents: &[usize]) -> Result<Vec<u8>> {
        check_parent_level(level)?;
        let children = &self.levels[level + 1];
        let mut out = Vec::with_capacity(parents.len() * FANOUT * 32);
        for &p in parents {
            check_index(level, p)?;
            for child in &children[p * FANOUT..(p + 1) * FANOUT] {
                out.extend_from_slice(&child.to_bytes());
            }
        }
        Ok(out)
    }

    /// The children (indexes at level+1) whose digests differ from a peer's, ascending.
    pub fn compare_children(&self, level: usize, parents: &[usize], remote: &[u8]) -> Result<Vec<usize>> {
        check_parent_level(level)?;
        if remote.len() != parents.len() * FANOUT * 32 {
            return Err(CoreError::InvalidArgument(format!(
                "remote children digests are {} bytes; {} parents need {} bytes (FANOUT {FANOUT} × 32 each)",
                remote.len(),
                parents.len(),
                parents.len() * FANOUT * 32
            )));
        }
        let children = &self.levels[level + 1];
        let mut out = Vec::new();
        for (i, &p) in parents.iter().enumerate() {
            check_index(level, p)?;
            for c in 0..FANOUT {
                let child = p * FANOUT + c;
                let off = (i * FANOUT + c) * 32;
                if children[child].to_bytes()[..] != remote[off..off + 32] {
                    out.push(child);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// Buckets whose digests differ between two trees, found top-down.
    pub fn differing_buckets(&self, other: &BucketTree) -> Vec<usize> {
        let mut frontier: Vec<usize> = if self.levels[0][0] != other.levels[0][0] { vec![0] } else { vec![] };
        for level in 0..TREE_DEPTH {
            let (mine, theirs) = (&self.levels[level + 1], &other.levels[level + 1]);
            frontier = frontier
                .iter()
                .flat_map(|&p| (p * FANOUT..(p + 1) * FANOUT).filter(|&c| mine[c] != theirs[c]))
                .collect();
        }
        frontier
    }
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
    let size = FANOUT.pow(level as u32);
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
