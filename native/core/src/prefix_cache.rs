//! Prefix cache: chained hashes of full KV blocks -> block ids.
//!
//! A block's hash covers its parent's hash, a salt (model/adapter) and its
//! own token ids, so equal hashes mean equal prefixes up to collisions; the
//! stored token ids are compared on every hit to rule those out.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::block_pool::BlockId;

/// Hash of a full block given its parent's hash (None for the first block).
pub fn block_hash(parent: Option<u64>, salt: u64, token_ids: &[u32]) -> u64 {
    // DefaultHasher::new() uses fixed keys: equal inputs hash equally for the
    // life of the process, which is all a cache in memory needs.
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    salt.hash(&mut h);
    token_ids.hash(&mut h);
    h.finish()
}

#[derive(Debug, Default, Clone)]
pub struct PrefixCache {
    by_hash: HashMap<u64, (BlockId, Vec<u32>)>,
}

impl PrefixCache {
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The block holding exactly `token_ids` under `hash`, if any.
    pub fn lookup(&self, hash: u64, token_ids: &[u32]) -> Option<BlockId> {
        match self.by_hash.get(&hash) {
            Some((id, tokens)) if tokens == token_ids => Some(*id),
            _ => None,
        }
    }

    pub fn insert(&mut self, hash: u64, id: BlockId, token_ids: &[u32]) {
        self.by_hash.insert(hash, (id, token_ids.to_vec()));
    }

    /// Forget `hash` if it still points at `id` (the block is being reused).
    pub fn evict(&mut self, hash: u64, id: BlockId) {
        if self.by_hash.get(&hash).is_some_and(|(b, _)| *b == id) {
            self.by_hash.remove(&hash);
        }
    }
}

#[cfg(test)]
#[path = "prefix_cache_tests.rs"]
mod tests;
