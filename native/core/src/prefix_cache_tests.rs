//! The prefix cache: chained hashes, and lookups that check the tokens.

use super::*;

#[test]
fn hashes_chain_over_parents_and_salt() {
    let a = block_hash(None, 0, &[1, 2]);
    assert_eq!(a, block_hash(None, 0, &[1, 2]));
    assert_ne!(a, block_hash(None, 1, &[1, 2]));
    assert_ne!(
        block_hash(Some(a), 0, &[3, 4]),
        block_hash(None, 0, &[3, 4])
    );
}

#[test]
fn lookup_checks_tokens() {
    let mut cache = PrefixCache::default();
    cache.insert(7, 3, &[1, 2]);
    assert_eq!(cache.lookup(7, &[1, 2]), Some(3));
    assert_eq!(cache.lookup(7, &[1, 9]), None, "a collision is not a hit");
    cache.evict(7, 4);
    assert_eq!(cache.len(), 1, "evicting another block keeps the entry");
    cache.evict(7, 3);
    assert!(cache.is_empty());
}
