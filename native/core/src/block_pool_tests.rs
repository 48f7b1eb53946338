//! The block pool: allocation order, shared blocks, kept hashes, the free list.

use super::*;

#[test]
fn allocates_in_order_and_frees_to_the_back() {
    let mut pool = BlockPool::new(3);
    assert_eq!(pool.allocate(), Some((0, None)));
    assert_eq!(pool.allocate(), Some((1, None)));
    assert!(pool.free(0));
    assert_eq!(pool.free_order(), vec![2, 0]);
    assert_eq!(pool.allocate().map(|b| b.0), Some(2));
    assert_eq!(pool.allocate().map(|b| b.0), Some(0));
    assert_eq!(pool.allocate(), None);
    assert_eq!(pool.num_free(), 0);
}

#[test]
fn shared_blocks_free_at_zero_only() {
    let mut pool = BlockPool::new(2);
    let (b, _) = pool.allocate().unwrap();
    pool.share(b);
    assert_eq!(pool.ref_count(b), 2);
    assert!(pool.free(b));
    assert_eq!(pool.num_free(), 1);
    assert!(pool.free(b));
    assert_eq!(pool.num_free(), 2);
    assert!(!pool.free(b), "double free is reported");
}

#[test]
fn a_freed_block_keeps_its_hash_until_reused() {
    let mut pool = BlockPool::new(1);
    let (b, _) = pool.allocate().unwrap();
    pool.set_hash(b, 42);
    pool.free(b);
    assert_eq!(pool.hash(b), Some(42));
    pool.share(b); // a cache hit takes it back from the free queue
    assert_eq!(pool.num_free(), 0);
    pool.free(b);
    assert_eq!(pool.allocate(), Some((b, Some(42))));
    assert_eq!(pool.hash(b), None);
}

#[test]
fn unlink_from_the_middle_keeps_the_list_whole() {
    let mut pool = BlockPool::new(4);
    let ids: Vec<_> = (0..4).map(|_| pool.allocate().unwrap().0).collect();
    for &id in &ids {
        pool.free(id);
    }
    pool.share(2);
    assert_eq!(pool.free_order(), vec![0, 1, 3]);
    pool.share(0);
    pool.share(3);
    assert_eq!(pool.free_order(), vec![1]);
    pool.free(3);
    pool.free(0);
    assert_eq!(pool.free_order(), vec![1, 3, 0]);
}
