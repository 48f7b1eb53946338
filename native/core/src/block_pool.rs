//! A fixed pool of KV-cache blocks: reference counts and a free queue that
//! doubles as the LRU of cached blocks.
//!
//! A block whose count drops to zero goes to the back of the free queue and
//! keeps its content hash, so a later prompt with the same prefix can take
//! it back (`share`) until `allocate` reuses it from the front. The queue is
//! an intrusive doubly linked list over block ids: push, pop and unlink are
//! O(1) with no allocation.

pub type BlockId = u32;

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
pub struct BlockPool {
    ref_counts: Vec<u32>,
    hashes: Vec<Option<u64>>,
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    num_free: usize,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        let n = num_blocks as u32;
        let mut pool = Self {
            ref_counts: vec![0; num_blocks],
            hashes: vec![None; num_blocks],
            prev: vec![NIL; num_blocks],
            next: vec![NIL; num_blocks],
            head: NIL,
            tail: NIL,
            num_free: 0,
        };
        for id in 0..n {
            pool.push_back(id);
        }
        pool
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    pub fn num_free(&self) -> usize {
        self.num_free
    }

    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free
    }

    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.ref_counts[id as usize]
    }

    pub fn hash(&self, id: BlockId) -> Option<u64> {
        self.hashes[id as usize]
    }

    pub fn set_hash(&mut self, id: BlockId, hash: u64) {
        self.hashes[id as usize] = Some(hash);
    }

    /// Take the least recently freed block. Returns it with the content hash
    /// it held, which the caller must drop from the prefix cache.
    pub fn allocate(&mut self) -> Option<(BlockId, Option<u64>)> {
        let id = self.head;
        if id == NIL {
            return None;
        }
        self.unlink(id);
        self.ref_counts[id as usize] = 1;
        Some((id, self.hashes[id as usize].take()))
    }

    /// One more owner of a block; a free block leaves the free queue.
    pub fn share(&mut self, id: BlockId) {
        if self.ref_counts[id as usize] == 0 {
            self.unlink(id);
        }
        self.ref_counts[id as usize] += 1;
    }

    /// One owner fewer; at zero the block joins the back of the free queue.
    /// Freeing a free block is an invariant violation, reported as `false`.
    pub fn free(&mut self, id: BlockId) -> bool {
        let count = &mut self.ref_counts[id as usize];
        if *count == 0 {
            return false;
        }
        *count -= 1;
        if *count == 0 {
            self.push_back(id);
        }
        true
    }

    fn push_back(&mut self, id: BlockId) {
        let i = id as usize;
        self.prev[i] = self.tail;
        self.next[i] = NIL;
        if self.tail == NIL {
            self.head = id;
        } else {
            self.next[self.tail as usize] = id;
        }
        self.tail = id;
        self.num_free += 1;
    }

    fn unlink(&mut self, id: BlockId) {
        let i = id as usize;
        let (p, n) = (self.prev[i], self.next[i]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[i] = NIL;
        self.next[i] = NIL;
        self.num_free -= 1;
    }

    /// Ids in the free queue, front first (for tests and debugging).
    pub fn free_order(&self) -> Vec<BlockId> {
        let mut out = Vec::with_capacity(self.num_free);
        let mut id = self.head;
        while id != NIL {
            out.push(id);
            id = self.next[id as usize];
        }
        out
    }
}

#[cfg(test)]
#[path = "block_pool_tests.rs"]
mod tests;
