//! Continuous batching over the block pool.
//!
//! Each step: running sequences first, oldest first (a decode token, or the
//! next chunk of a prefill), then waiting ones while the token budget and
//! `max_num_seqs` allow. When blocks run out, the newest running sequence is
//! preempted by recompute: its blocks are freed (their hashes stay in the
//! prefix cache) and it waits at the front of the queue. The step goes out
//! as flat arrays (`StepPlan`).
//!
//! With a sliding window on every layer (`SchedulerConfig::sliding_window`),
//! a sequence's blocks that no later query can see go back to the pool as the
//! window moves on; their table entries stay, empty (-1 in the plan), so that
//! position p still lives in entry p / block_size. Attention must then read a
//! table from the window's first block on, never from its start.
//!
//! A model whose layers mix windows (Gemma: sliding layers and global ones)
//! splits its layers into KV groups (`SchedulerConfig::kv_groups`), each with
//! its own block table per sequence over the one pool, and a block holding one
//! group's layers: a windowed group's tables free blocks behind its window
//! while a global group's keep every one. The plan then has a table and a slot
//! per token for each group, group after group; the prefix cache keys a
//! group's blocks apart, and a prefix hit takes of a windowed group only the
//! blocks its next query sees.

use std::collections::{HashMap, VecDeque};

use crate::block_pool::{BlockId, BlockPool};
use crate::error::SchedulerError;
use crate::prefix_cache::{block_hash, PrefixCache};
use crate::sampler::TokenHistory;

#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    pub num_blocks: usize,
    pub block_size: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub enable_prefix_caching: bool,
    /// Mixed into every block hash: a different model or adapter never hits.
    pub cache_salt: u64,
    /// Keys a query sees on every layer (itself and the `w - 1` before it), or
    /// None where some layer sees them all: then nothing is freed before a
    /// sequence ends.
    pub sliding_window: Option<usize>,
    /// The KV groups' windows (None: a group of global layers), where there
    /// are several groups; empty: one group, with `sliding_window`.
    pub kv_groups: Vec<Option<usize>>,
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), SchedulerError> {
        let bad = |what: &str| Err(SchedulerError::InvalidConfig(format!("{what} must be > 0")));
        if self.num_blocks == 0 {
            return bad("num_blocks");
        }
        if self.block_size == 0 {
            return bad("block_size");
        }
        if self.max_num_seqs == 0 {
            return bad("max_num_seqs");
        }
        if self.max_num_batched_tokens == 0 {
            return bad("max_num_batched_tokens");
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window");
        }
        if self.kv_groups.contains(&Some(0)) {
            return bad("every window of kv_groups");
        }
        if !self.kv_groups.is_empty() && self.sliding_window.is_some() {
            return Err(SchedulerError::InvalidConfig(
                "sliding_window and kv_groups together: give the windows in kv_groups".into(),
            ));
        }
        Ok(())
    }

    /// Each KV group's window (one group: `sliding_window`).
    pub fn group_windows(&self) -> Vec<Option<usize>> {
        if self.kv_groups.is_empty() {
            vec![self.sliding_window]
        } else {
            self.kv_groups.clone()
        }
    }
}

/// A sequence's blocks of one KV group, one entry per block of positions.
#[derive(Debug, Clone, Default)]
struct Table {
    /// None: a block freed behind the group's window (always a leading run).
    blocks: Vec<Option<BlockId>>,
    /// Leading entries of `blocks` freed behind the window.
    num_freed: usize,
}

/// The prefix cache's key of group `g`'s block of chain hash `h`: group 0's
/// is the hash itself.
fn group_key(h: u64, g: usize) -> u64 {
    if g == 0 {
        h
    } else {
        block_hash(Some(h), g as u64, &[])
    }
}

#[derive(Debug, Clone)]
struct Sequence {
    /// The prompt, then every token appended since: the one home of a
    /// sequence's history (the sampler's penalties read it through `history`).
    token_ids: Vec<u32>,
    num_prompt_tokens: usize,
    /// Tokens whose KV is cached, counting those scheduled in the last plan.
    num_computed: usize,
    /// Per KV group, its blocks; every group's table has the same length.
    tables: Vec<Table>,
    /// Chain hashes of the full blocks at the front of the tables (freed ones too).
    block_hashes: Vec<u64>,
    /// Seats in the running batch kept for the forks this sequence will make.
    reserved_forks: usize,
    /// Prompt spans whose tokens stand for content the ids do not tell apart
    /// (an image's placeholder tokens): (start, end, key of the content).
    spans: Vec<ContentSpan>,
}

/// Prompt positions `start..end` hold content identified by `key` (a digest of
/// an image, say), not by their token ids: two prompts with the same ids and
/// different keys never share the blocks those positions touch. A `whole`
/// span is computed in one chunk (its tokens attend to each other both ways,
/// as Gemma 3's image tokens do), so it must fit the step's token budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentSpan {
    pub start: usize,
    pub end: usize,
    pub key: u64,
    pub whole: bool,
}

/// How many of `n` tokens from `start` one chunk may take so that it cuts no
/// whole span it begins: it stops before a span that would not fit, and takes
/// none when the span starts at `start` and does not fit (the next step with
/// more budget takes it). A span begun before `start` (a prefix-cache hit
/// inside it) does not bind: its cached keys were computed whole.
fn chunk_len(spans: &[ContentSpan], start: usize, n: usize) -> usize {
    let end = start + n;
    spans
        .iter()
        .filter(|s| s.whole && s.start >= start && s.start < end && s.end > end)
        .map(|s| s.start - start)
        .fold(n, usize::min)
}

/// The salt of block `i`: the cache's, mixed with the key and place of every
/// content span the block's positions touch (the chain carries it onward).
fn block_salt(salt: u64, spans: &[ContentSpan], i: usize, bs: usize) -> u64 {
    let (first, end) = (i * bs, (i + 1) * bs);
    spans
        .iter()
        .filter(|s| s.start < end && s.end > first)
        .fold(salt, |acc, s| {
            block_hash(Some(acc), s.key, &[s.start as u32, s.end as u32])
        })
}

/// One step's work as flat arrays, sequences in plan order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepPlan {
    pub seq_ids: Vec<u64>,
    pub query_lens: Vec<u32>,
    /// Cached tokens of each sequence once this step has run.
    pub context_lens: Vec<u32>,
    /// Whether the step computes a sequence's last known token, so a new one is sampled.
    pub sample: Vec<bool>,
    pub input_ids: Vec<u32>,
    pub positions: Vec<u32>,
    /// Per KV group, each token's slot (group after group).
    pub slot_mapping: Vec<i64>,
    /// Per KV group, row-major (seq_ids.len(), max_blocks), padded with -1; -1
    /// too for the blocks freed behind a sliding window (group after group).
    pub block_tables: Vec<i32>,
    pub max_blocks: usize,
    /// (source, destination) block copies to run before the model (copy-on-write).
    pub copy_ops: Vec<(BlockId, BlockId)>,
    pub preempted: Vec<u64>,
}

impl StepPlan {
    pub fn num_tokens(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seq_ids.is_empty()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub num_preemptions: u64,
}

#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    /// Each KV group's window ([`SchedulerConfig::group_windows`]).
    windows: Vec<Option<usize>>,
    /// The plan being made's slots, per group.
    slots: Vec<Vec<i64>>,
    pool: BlockPool,
    cache: PrefixCache,
    seqs: HashMap<u64, Sequence>,
    waiting: VecDeque<u64>,
    /// Oldest first.
    running: Vec<u64>,
    stats: SchedulerStats,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Result<Self, SchedulerError> {
        cfg.validate()?;
        let pool = BlockPool::new(cfg.num_blocks);
        let windows = cfg.group_windows();
        Ok(Self {
            slots: vec![vec![]; windows.len()],
            windows,
            cfg,
            pool,
            cache: PrefixCache::default(),
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats: SchedulerStats::default(),
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn stats(&self) -> SchedulerStats {
        self.stats
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.cfg.block_size)
    }

    /// Blocks of every group that a sequence of `num_tokens` holds at most
    /// while it computes them: a windowed group's, its window and a chunk.
    fn blocks_held(&self, num_tokens: usize) -> usize {
        let all = self.blocks_for(num_tokens);
        let chunk = self.cfg.max_num_batched_tokens;
        self.windows
            .iter()
            .map(|w| {
                w.map_or(all, |w| {
                    all.min((w + chunk).div_ceil(self.cfg.block_size) + 1)
                })
            })
            .sum()
    }

    /// Queue a new sequence. Its whole prompt must fit in the pool.
    pub fn add(&mut self, seq_id: u64, prompt_ids: &[u32]) -> Result<(), SchedulerError> {
        self.add_group(seq_id, prompt_ids, 0)
    }

    /// Queue a sequence that will `fork` `num_forks` times once its prompt is
    /// computed (n > 1 choices); it is admitted only with seats for all.
    pub fn add_group(
        &mut self,
        seq_id: u64,
        prompt_ids: &[u32],
        num_forks: usize,
    ) -> Result<(), SchedulerError> {
        self.add_with_spans(seq_id, prompt_ids, num_forks, &[])
    }

    /// `add_group` with content spans (see [`ContentSpan`]) for the prefix cache.
    pub fn add_with_spans(
        &mut self,
        seq_id: u64,
        prompt_ids: &[u32],
        num_forks: usize,
        spans: &[ContentSpan],
    ) -> Result<(), SchedulerError> {
        if let Some(s) = spans
            .iter()
            .find(|s| s.start >= s.end || s.end > prompt_ids.len())
        {
            return Err(SchedulerError::BadSpan {
                seq_id,
                start: s.start,
                end: s.end,
                len: prompt_ids.len(),
            });
        }
        let budget = self.cfg.max_num_batched_tokens;
        if let Some(s) = spans.iter().find(|s| s.whole && s.end - s.start > budget) {
            return Err(SchedulerError::SpanOverBudget {
                seq_id,
                len: s.end - s.start,
                budget,
            });
        }
        if self.seqs.contains_key(&seq_id) {
            return Err(SchedulerError::DuplicateSequence(seq_id));
        }
        if prompt_ids.is_empty() {
            return Err(SchedulerError::EmptyPrompt(seq_id));
        }
        let needed = self.blocks_held(prompt_ids.len() + 1);
        if needed > self.cfg.num_blocks {
            return Err(SchedulerError::TooLong {
                seq_id,
                needed,
                available: self.cfg.num_blocks,
            });
        }
        if num_forks + 1 > self.cfg.max_num_seqs {
            return Err(SchedulerError::TooManyChoices {
                seq_id,
                wanted: num_forks + 1,
                max: self.cfg.max_num_seqs,
            });
        }
        let seq = Sequence {
            token_ids: prompt_ids.to_vec(),
            num_prompt_tokens: prompt_ids.len(),
            num_computed: 0,
            tables: vec![Table::default(); self.windows.len()],
            block_hashes: vec![],
            reserved_forks: num_forks,
            spans: spans.to_vec(),
        };
        self.seqs.insert(seq_id, seq);
        self.waiting.push_back(seq_id);
        Ok(())
    }

    /// Append a sampled token; the next step computes it.
    pub fn append_token(&mut self, seq_id: u64, token_id: u32) -> Result<(), SchedulerError> {
        let seq = self
            .seqs
            .get_mut(&seq_id)
            .ok_or(SchedulerError::UnknownSequence(seq_id))?;
        seq.token_ids.push(token_id);
        Ok(())
    }

    /// A new running sequence sharing every block of `parent` (n > 1 choices).
    /// The shared partial last block is copied when either side writes to it.
    /// Blocks the parent freed behind its window stay freed in the child: its
    /// queries start where the parent's do, so they never see them either.
    pub fn fork(&mut self, parent_id: u64, child_id: u64) -> Result<(), SchedulerError> {
        if self.seqs.contains_key(&child_id) {
            return Err(SchedulerError::DuplicateSequence(child_id));
        }
        let pos = self
            .running
            .iter()
            .position(|&s| s == parent_id)
            .ok_or(SchedulerError::NotRunning(parent_id))?;
        let parent = self
            .seqs
            .get_mut(&parent_id)
            .expect("running sequences are known");
        if parent.reserved_forks == 0 {
            return Err(SchedulerError::NoReservedSeat(parent_id));
        }
        parent.reserved_forks -= 1;
        let mut child = parent.clone();
        child.reserved_forks = 0;
        for t in &child.tables {
            for &b in t.blocks.iter().flatten() {
                self.pool.share(b);
            }
        }
        self.seqs.insert(child_id, child);
        self.running.insert(pos + 1, child_id);
        Ok(())
    }

    /// End a sequence (finished or aborted) at any point and free its blocks.
    pub fn finish(&mut self, seq_id: u64) -> Result<(), SchedulerError> {
        let seq = self
            .seqs
            .remove(&seq_id)
            .ok_or(SchedulerError::UnknownSequence(seq_id))?;
        self.waiting.retain(|&s| s != seq_id);
        self.running.retain(|&s| s != seq_id);
        self.release(&seq.tables);
        Ok(())
    }

    /// Free in reverse so that a chain's deepest blocks are reused first.
    fn release(&mut self, tables: &[Table]) {
        for t in tables {
            for &b in t.blocks.iter().rev().flatten() {
                let freed = self.pool.free(b);
                debug_assert!(freed, "block {b} freed twice");
            }
        }
    }

    /// Plan the next step. The previous plan must have run: its keys are read
    /// no more, so the blocks behind every window can go back first.
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        self.slots.iter_mut().for_each(Vec::clear);
        let mut budget = self.cfg.max_num_batched_tokens;
        for i in 0..self.running.len() {
            self.free_behind_window(self.running[i]);
        }
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let want = self.seqs[&id].token_ids.len() - self.seqs[&id].num_computed;
            if want == 0 {
                i += 1; // waiting for its sampled token to be appended
                continue;
            }
            let seq = &self.seqs[&id];
            let n = chunk_len(&seq.spans, seq.num_computed, want.min(budget));
            if n == 0 {
                i += 1; // a whole span next that this step has no room left for
                continue;
            }
            if self.make_room(id, n, &mut plan) {
                self.emit(id, n, &mut plan);
                budget -= n;
                i += 1;
            }
            // else: `id` itself was preempted; running[i] is now the next one, if any.
        }
        // After a preemption, admitting waiting sequences would only hand the
        // freed blocks to work that the next step preempts again.
        if plan.preempted.is_empty() {
            self.admit_waiting(&mut budget, &mut plan);
        }
        self.fill_block_tables(&mut plan);
        plan.slot_mapping = self.slots.concat();
        plan
    }

    /// Reserve blocks for `n` more tokens of running `id`, preempting the
    /// newest running sequences as needed. False if `id` itself was preempted.
    fn make_room(&mut self, id: u64, n: usize, plan: &mut StepPlan) -> bool {
        loop {
            if self.try_reserve(id, n, plan) {
                return true;
            }
            let Some(&victim) = self.running.last() else {
                return false;
            };
            self.preempt(victim, plan);
            if victim == id {
                return false;
            }
        }
    }

    fn preempt(&mut self, id: u64, plan: &mut StepPlan) {
        self.running.retain(|&s| s != id);
        self.drop_blocks(id);
        self.waiting.push_front(id);
        self.stats.num_preemptions += 1;
        plan.preempted.push(id);
    }

    /// Give back every block of `id` and forget what it computed (preemption by
    /// recompute, or an admission that did not fit); hashes stay in the cache.
    fn drop_blocks(&mut self, id: u64) {
        let seq = self.seqs.get_mut(&id).expect("known");
        let fresh = vec![Table::default(); seq.tables.len()];
        let tables = std::mem::replace(&mut seq.tables, fresh);
        seq.block_hashes.clear();
        seq.num_computed = 0;
        self.release(&tables);
    }

    /// Free the blocks of `id` wholly before the first key its next query sees:
    /// that query is at position `num_computed` (the next chunk's first token)
    /// and sees keys from `num_computed + 1 - window` on. Front first, so the
    /// pool reuses the oldest first; hashes stay, as for any freed block.
    fn free_behind_window(&mut self, id: u64) {
        let seq = self.seqs.get_mut(&id).expect("known");
        for (t, window) in seq.tables.iter_mut().zip(&self.windows) {
            // a global group's first live block is 0: nothing to free
            let end = Self::first_live(seq.num_computed, *window, self.cfg.block_size)
                .min(t.blocks.len());
            while t.num_freed < end {
                if let Some(b) = t.blocks[t.num_freed].take() {
                    let freed = self.pool.free(b);
                    debug_assert!(freed, "block {b} freed twice");
                }
                t.num_freed += 1;
            }
        }
    }

    /// The first block a query at `position` may read under `window` (None:
    /// block 0): the blocks wholly before its first key, `position + 1 - window`,
    /// are what [`Scheduler::free_behind_window`] gives back.
    fn first_live(position: usize, window: Option<usize>, block_size: usize) -> usize {
        window.map_or(0, |w| (position + 1).saturating_sub(w) / block_size)
    }

    /// Running sequences plus the seats they keep for forks.
    fn seats_taken(&self) -> usize {
        self.running.len()
            + self
                .running
                .iter()
                .map(|id| self.seqs[id].reserved_forks)
                .sum::<usize>()
    }

    fn admit_waiting(&mut self, budget: &mut usize, plan: &mut StepPlan) {
        while *budget > 0 {
            let Some(&id) = self.waiting.front() else {
                return;
            };
            if self.seats_taken() + 1 + self.seqs[&id].reserved_forks > self.cfg.max_num_seqs {
                return;
            }
            let (queried, hit) = self.take_cached_prefix(id);
            self.free_behind_window(id);
            let seq = &self.seqs[&id];
            let n = (seq.token_ids.len() - seq.num_computed).min(*budget);
            let n = chunk_len(&seq.spans, seq.num_computed, n);
            if n == 0 || !self.try_reserve(id, n, plan) {
                self.drop_blocks(id); // leave it waiting; give back what the prefix cache lent it
                return;
            }
            self.waiting.pop_front();
            self.running.push(id);
            // Counted on admission only, so a retried admission is not counted twice.
            self.stats.prefix_cache_queries += queried as u64;
            self.stats.prefix_cache_hits += hit as u64;
            self.emit(id, n, plan);
            *budget -= n;
        }
    }

    /// Reuse cached full blocks of the prompt; the last token is always computed.
    /// The prefix is the longest that every group has cached: a global group
    /// all its blocks, a windowed one those its next query sees (the others
    /// stay freed). Returns (tokens looked up, tokens found).
    fn take_cached_prefix(&mut self, id: u64) -> (usize, usize) {
        if !self.cfg.enable_prefix_caching {
            return (0, 0);
        }
        let bs = self.cfg.block_size;
        let seq = &self.seqs[&id];
        let max_full = (seq.token_ids.len() - 1) / bs;
        let tokens = |i: usize| &seq.token_ids[i * bs..(i + 1) * bs];
        // the chain's hashes and each group's cached blocks, up to a global group's first miss
        let mut hashes: Vec<u64> = Vec::with_capacity(max_full);
        let mut found: Vec<Vec<Option<BlockId>>> = vec![vec![]; self.windows.len()];
        for i in 0..max_full {
            let salt = block_salt(self.cfg.cache_salt, &seq.spans, i, bs);
            let h = block_hash(hashes.last().copied(), salt, tokens(i));
            let cached = |g: usize| self.cache.lookup(group_key(h, g), tokens(i));
            let global_miss =
                (0..self.windows.len()).any(|g| self.windows[g].is_none() && cached(g).is_none());
            if global_miss {
                break;
            }
            hashes.push(h);
            for (g, f) in found.iter_mut().enumerate() {
                f.push(cached(g));
            }
        }
        let first = |k: usize, w: Option<usize>| Self::first_live(k * bs, w, bs);
        let hit = (0..=hashes.len())
            .rev()
            .find(|&k| {
                let served = |(f, w): (&Vec<Option<BlockId>>, &Option<usize>)| {
                    f[first(k, *w).min(k)..k].iter().all(Option::is_some)
                };
                found.iter().zip(&self.windows).all(served)
            })
            .unwrap_or(0);
        let seq = self.seqs.get_mut(&id).expect("waiting sequences are known");
        for ((t, f), w) in seq.tables.iter_mut().zip(&found).zip(&self.windows) {
            t.num_freed = first(hit, *w).min(hit);
            t.blocks = vec![None; t.num_freed];
            for &b in f[t.num_freed..hit].iter().flatten() {
                self.pool.share(b);
                t.blocks.push(Some(b));
            }
        }
        seq.block_hashes = hashes[..hit].to_vec();
        seq.num_computed = hit * bs;
        (max_full * bs, seq.num_computed)
    }

    /// Allocate the blocks `n` more tokens need in every group (and a private
    /// copy of a shared partial last block). All or nothing.
    fn try_reserve(&mut self, id: u64, n: usize, plan: &mut StepPlan) -> bool {
        let bs = self.cfg.block_size;
        let seq = &self.seqs[&id];
        let new_blocks = self
            .blocks_for(seq.num_computed + n)
            .saturating_sub(seq.tables[0].blocks.len());
        let partial = !seq.num_computed.is_multiple_of(bs);
        // per group, its shared partial last block (to copy before writing it)
        let copies: Vec<Option<BlockId>> = seq
            .tables
            .iter()
            .map(|t| t.blocks.last().copied().flatten())
            .map(|last| last.filter(|&b| partial && self.pool.ref_count(b) > 1))
            .collect();
        let wanted = new_blocks * copies.len() + copies.iter().flatten().count();
        if self.pool.num_free() < wanted {
            return false;
        }
        for (g, copy) in copies.into_iter().enumerate() {
            if let Some(old) = copy {
                let new = self.allocate_block();
                plan.copy_ops.push((old, new));
                self.pool.free(old);
                let t = &mut self.seqs.get_mut(&id).expect("known").tables[g];
                *t.blocks.last_mut().expect("has a last block") = Some(new);
            }
            for _ in 0..new_blocks {
                let b = self.allocate_block();
                let t = &mut self.seqs.get_mut(&id).expect("known").tables[g];
                t.blocks.push(Some(b));
            }
        }
        true
    }

    fn allocate_block(&mut self) -> BlockId {
        let (b, old_hash) = self
            .pool
            .allocate()
            .expect("free blocks were counted first");
        if let Some(h) = old_hash {
            self.cache.evict(h, b);
        }
        b
    }

    /// Add `n` tokens of `id` to the plan and mark them computed.
    fn emit(&mut self, id: u64, n: usize, plan: &mut StepPlan) {
        let bs = self.cfg.block_size;
        let seq = self.seqs.get_mut(&id).expect("known");
        let start = seq.num_computed;
        for pos in start..start + n {
            plan.input_ids.push(seq.token_ids[pos]);
            plan.positions.push(pos as u32);
            for (t, slots) in seq.tables.iter().zip(&mut self.slots) {
                let block = t.blocks[pos / bs].expect("blocks being written are live");
                slots.push((block as usize * bs + pos % bs) as i64);
            }
        }
        seq.num_computed += n;
        plan.seq_ids.push(id);
        plan.query_lens.push(n as u32);
        plan.context_lens.push(seq.num_computed as u32);
        plan.sample.push(seq.num_computed == seq.token_ids.len());
        self.register_full_blocks(id);
    }

    fn register_full_blocks(&mut self, id: u64) {
        if !self.cfg.enable_prefix_caching {
            return;
        }
        let bs = self.cfg.block_size;
        let seq = self.seqs.get_mut(&id).expect("known");
        while seq.block_hashes.len() < seq.num_computed / bs {
            let i = seq.block_hashes.len();
            let tokens = &seq.token_ids[i * bs..(i + 1) * bs];
            let salt = block_salt(self.cfg.cache_salt, &seq.spans, i, bs);
            let h = block_hash(seq.block_hashes.last().copied(), salt, tokens);
            // A block is full (and registered) a step before the window can pass it.
            for (g, t) in seq.tables.iter().enumerate() {
                if let Some(b) = t.blocks[i] {
                    self.pool.set_hash(b, group_key(h, g));
                    self.cache.insert(group_key(h, g), b, tokens);
                }
            }
            seq.block_hashes.push(h);
        }
    }

    fn fill_block_tables(&self, plan: &mut StepPlan) {
        let seqs: Vec<&Sequence> = plan.seq_ids.iter().map(|id| &self.seqs[id]).collect();
        plan.max_blocks = seqs
            .iter()
            .map(|s| s.tables[0].blocks.len())
            .max()
            .unwrap_or(0);
        let per_group = seqs.len() * plan.max_blocks;
        plan.block_tables = vec![-1; self.windows.len() * per_group];
        for (row, seq) in seqs.iter().enumerate() {
            for (g, t) in seq.tables.iter().enumerate() {
                for (j, &b) in t.blocks.iter().enumerate() {
                    if let Some(b) = b {
                        plan.block_tables[g * per_group + row * plan.max_blocks + j] = b as i32;
                    }
                }
            }
        }
    }

    /// Every block's owner count recomputed from the sequences (for tests).
    pub fn owner_counts(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.cfg.num_blocks];
        for seq in self.seqs.values() {
            for t in &seq.tables {
                for &b in t.blocks.iter().flatten() {
                    counts[b as usize] += 1;
                }
            }
        }
        counts
    }

    /// The number of KV groups (tables and slots per token in a plan).
    pub fn num_groups(&self) -> usize {
        self.windows.len()
    }

    /// Token ids of a sequence (prompt and generated).
    pub fn token_ids(&self, seq_id: u64) -> Option<&[u32]> {
        self.seqs.get(&seq_id).map(|s| s.token_ids.as_slice())
    }

    /// A sequence's prompt and the tokens appended since, as the sampler reads them.
    pub fn history(&self, seq_id: u64) -> Option<TokenHistory<'_>> {
        self.seqs.get(&seq_id).map(|s| {
            let (prompt_ids, output_ids) = s.token_ids.split_at(s.num_prompt_tokens);
            TokenHistory {
                prompt_ids,
                output_ids,
            }
        })
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
