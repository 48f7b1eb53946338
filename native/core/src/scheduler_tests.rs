use super::*;
use crate::rng::uniform;

fn config(num_blocks: usize, block_size: usize) -> SchedulerConfig {
    SchedulerConfig {
        num_blocks,
        block_size,
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        enable_prefix_caching: true,
        cache_salt: 0,
        sliding_window: None,
        kv_groups: vec![],
    }
}

#[test]
fn prefill_then_decode() {
    let mut s = Scheduler::new(config(8, 4)).unwrap();
    s.add(1, &[10, 11, 12, 13, 14, 15]).unwrap();
    let plan = s.schedule();
    assert_eq!(plan.seq_ids, vec![1]);
    assert_eq!(plan.query_lens, vec![6]);
    assert_eq!(plan.context_lens, vec![6]);
    assert_eq!(plan.sample, vec![true]);
    assert_eq!(plan.positions, (0..6).collect::<Vec<_>>());
    assert_eq!(plan.slot_mapping, vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(
        (plan.max_blocks, plan.block_tables.clone()),
        (2, vec![0, 1])
    );
    s.append_token(1, 99).unwrap();
    let plan = s.schedule();
    assert_eq!(
        (
            plan.input_ids.clone(),
            plan.positions.clone(),
            plan.slot_mapping.clone()
        ),
        (vec![99], vec![6], vec![6])
    );
    s.finish(1).unwrap();
    assert_eq!(s.pool().num_free(), 8);
}

#[test]
fn long_prompts_are_chunked_by_the_token_budget() {
    let mut cfg = config(16, 4);
    cfg.max_num_batched_tokens = 5;
    let mut s = Scheduler::new(cfg).unwrap();
    s.add(1, &(0..12).collect::<Vec<_>>()).unwrap();
    let lens: Vec<(u32, bool)> = (0..3)
        .map(|_| {
            let p = s.schedule();
            (p.query_lens[0], p.sample[0])
        })
        .collect();
    assert_eq!(lens, vec![(5, false), (5, false), (2, true)]);
}

#[test]
fn chunks_never_cut_a_whole_span() {
    let mut cfg = config(16, 4);
    cfg.max_num_batched_tokens = 6;
    let whole = |start, end| ContentSpan {
        start,
        end,
        key: 9,
        whole: true,
    };
    let chunks = |spans: &[ContentSpan]| {
        let mut s = Scheduler::new(cfg.clone()).unwrap();
        s.add_with_spans(1, &(0..14).collect::<Vec<_>>(), 0, spans)
            .unwrap();
        (0..3)
            .map(|_| s.schedule().query_lens[0])
            .collect::<Vec<_>>()
    };
    // the span 4..9 would be cut at 6: the first chunk stops before it, the next takes it
    assert_eq!(chunks(&[whole(4, 9)]), vec![4, 6, 4]);
    // a span that is not whole is cut by the budget as before
    assert_eq!(
        chunks(&[ContentSpan {
            whole: false,
            ..whole(4, 9)
        }]),
        vec![6, 6, 2]
    );
    // a span of the whole budget starting a chunk takes it all
    assert_eq!(chunks(&[whole(0, 6)]), vec![6, 6, 2]);
    let err = Scheduler::new(cfg.clone())
        .unwrap()
        .add_with_spans(1, &[1; 10], 0, &[whole(1, 8)])
        .unwrap_err();
    assert!(matches!(
        err,
        SchedulerError::SpanOverBudget {
            len: 7,
            budget: 6,
            ..
        }
    ));
}

#[test]
fn a_whole_span_waits_for_a_step_with_room() {
    let mut cfg = config(32, 4);
    cfg.max_num_batched_tokens = 6;
    let mut s = Scheduler::new(cfg).unwrap();
    s.add(1, &[1, 2, 3, 4]).unwrap();
    let span = ContentSpan {
        start: 0,
        end: 5,
        key: 3,
        whole: true,
    };
    s.add_with_spans(2, &[7, 7, 7, 7, 7, 8], 0, &[span])
        .unwrap();
    // 4 tokens of sequence 1 leave 2: too few for the span, so 2 waits
    assert_eq!(s.schedule().query_lens, vec![4]);
    s.append_token(1, 5).unwrap();
    assert_eq!(s.schedule().query_lens, vec![1, 5]);
}

#[test]
fn decodes_and_prefills_share_a_step() {
    let mut s = Scheduler::new(config(16, 4)).unwrap();
    s.add(1, &[1, 2, 3]).unwrap();
    s.schedule();
    s.append_token(1, 4).unwrap();
    s.add(2, &[5, 6, 7, 8, 9]).unwrap();
    let plan = s.schedule();
    assert_eq!(plan.seq_ids, vec![1, 2]);
    assert_eq!(plan.query_lens, vec![1, 5]);
}

#[test]
fn prefix_cache_reuses_full_blocks_but_not_the_last_token() {
    let mut s = Scheduler::new(config(16, 4)).unwrap();
    let prompt: Vec<u32> = (100..110).collect();
    s.add(1, &prompt).unwrap();
    s.schedule();
    s.finish(1).unwrap();
    s.add(2, &prompt).unwrap();
    let plan = s.schedule();
    assert_eq!(plan.query_lens, vec![2], "two full blocks (8 tokens) hit");
    assert_eq!(s.stats().prefix_cache_hits, 8);
    // A prompt that is exactly two blocks recomputes its last block's last token.
    s.add(3, &prompt[..8]).unwrap();
    let plan = s.schedule();
    assert_eq!(
        plan.query_lens.last(),
        Some(&4),
        "only the first block hits; the last token is computed"
    );
}

#[test]
fn different_salt_or_prefix_does_not_hit() {
    let mut s = Scheduler::new(config(16, 4)).unwrap();
    s.add(1, &[1, 2, 3, 4, 5, 6, 7, 8, 9]).unwrap();
    s.schedule();
    s.add(2, &[0, 2, 3, 4, 5, 6, 7, 8, 9]).unwrap();
    let plan = s.schedule();
    assert_eq!(plan.query_lens.last(), Some(&9));
}

#[test]
fn preemption_frees_the_newest_and_it_resumes() {
    let mut cfg = config(3, 2);
    cfg.enable_prefix_caching = false;
    let mut s = Scheduler::new(cfg).unwrap();
    s.add(1, &[1, 2, 3]).unwrap(); // 2 blocks
    s.add(2, &[4]).unwrap(); // 1 block
    let plan = s.schedule();
    assert_eq!(plan.seq_ids, vec![1, 2]);
    s.append_token(1, 9).unwrap(); // fits in block 2 of seq 1 (position 3)
    s.append_token(2, 9).unwrap(); // position 1: fits too
    s.schedule();
    s.append_token(1, 9).unwrap(); // position 4: needs a third block for seq 1
    s.append_token(2, 9).unwrap();
    let plan = s.schedule();
    assert_eq!(plan.preempted, vec![2]);
    assert_eq!(plan.seq_ids, vec![1]);
    assert_eq!(s.num_waiting(), 1);
    s.finish(1).unwrap();
    let plan = s.schedule();
    assert_eq!(plan.seq_ids, vec![2]);
    assert_eq!(
        plan.query_lens,
        vec![3],
        "recomputes its prompt and generated tokens"
    );
    assert_eq!(plan.sample, vec![true]);
}

#[test]
fn fork_shares_blocks_and_copies_the_partial_block_on_write() {
    let mut s = Scheduler::new(config(8, 4)).unwrap();
    s.add_group(1, &[1, 2, 3, 4, 5, 6], 1).unwrap();
    s.schedule();
    s.fork(1, 2).unwrap();
    assert_eq!(s.fork(1, 3), Err(SchedulerError::NoReservedSeat(1)));
    assert_eq!(s.pool().ref_count(0), 2);
    s.append_token(1, 7).unwrap();
    s.append_token(2, 8).unwrap();
    let plan = s.schedule();
    assert_eq!(
        plan.copy_ops.len(),
        1,
        "one side copies the shared partial block"
    );
    let rows: Vec<&[i32]> = plan.block_tables.chunks(plan.max_blocks).collect();
    assert_eq!(rows[0][0], rows[1][0], "the full block stays shared");
    assert_ne!(rows[0][1], rows[1][1]);
}

#[test]
fn history_splits_prompt_from_appended_tokens_through_forks_and_preemption() {
    let mut cfg = config(3, 2);
    cfg.enable_prefix_caching = false;
    let mut s = Scheduler::new(cfg).unwrap();
    s.add_group(1, &[1, 2, 3], 1).unwrap(); // 2 blocks
    s.add(3, &[4]).unwrap(); // 1 block
    s.schedule();
    s.fork(1, 2).unwrap();
    s.append_token(1, 7).unwrap();
    s.append_token(2, 8).unwrap();
    let h = s.history(2).unwrap();
    assert_eq!((h.prompt_ids, h.output_ids), (&[1, 2, 3][..], &[8][..]));
    s.append_token(3, 9).unwrap();
    let plan = s.schedule(); // seq 1 copies the shared block: the newest are preempted
    assert!(!plan.preempted.is_empty());
    for (id, prompt, output) in [
        (1, &[1, 2, 3][..], &[7][..]),
        (2, &[1, 2, 3], &[8]),
        (3, &[4], &[9]),
    ] {
        let h = s.history(id).unwrap();
        assert_eq!(
            (h.prompt_ids, h.output_ids),
            (prompt, output),
            "sequence {id}"
        );
    }
    s.finish(1).unwrap();
    assert!(s.history(1).is_none());
}

#[test]
fn errors_are_reported() {
    let mut s = Scheduler::new(config(2, 4)).unwrap();
    assert_eq!(s.add(1, &[]), Err(SchedulerError::EmptyPrompt(1)));
    assert!(matches!(
        s.add(1, &[0; 8]),
        Err(SchedulerError::TooLong { .. })
    ));
    s.add(1, &[1]).unwrap();
    assert_eq!(s.add(1, &[1]), Err(SchedulerError::DuplicateSequence(1)));
    assert_eq!(s.finish(7), Err(SchedulerError::UnknownSequence(7)));
    assert_eq!(s.fork(1, 2), Err(SchedulerError::NotRunning(1)));
    assert!(Scheduler::new(config(0, 4)).is_err());
}

/// A tiny deterministic trace generator.
struct Trace {
    seed: u64,
    step: u64,
}

impl Trace {
    fn below(&mut self, n: usize) -> usize {
        self.step += 1;
        (uniform(self.seed, self.step) * n as f64) as usize
    }
}

/// Simulated KV memory: which group's KV of which token each slot holds.
/// Every position a query of the plan may see in a group (all before it, or
/// the group's window) must hold that group's KV of its token.
fn check_kv(kv: &mut [Option<(usize, u32)>], s: &Scheduler, plan: &StepPlan, bs: usize) {
    for &(src, dst) in &plan.copy_ops {
        let (src, dst) = (src as usize * bs, dst as usize * bs);
        let block: Vec<_> = kv[src..src + bs].to_vec();
        kv[dst..dst + bs].copy_from_slice(&block);
    }
    let windows = s.config().group_windows();
    let t = plan.num_tokens();
    for g in 0..windows.len() {
        for (&slot, &tok) in plan.slot_mapping[g * t..(g + 1) * t]
            .iter()
            .zip(&plan.input_ids)
        {
            kv[slot as usize] = Some((g, tok));
        }
    }
    for (g, window) in windows.iter().enumerate() {
        for (row, &id) in plan.seq_ids.iter().enumerate() {
            let tokens = s.token_ids(id).unwrap();
            let table = group_table(plan, g, row);
            let first_query = (plan.context_lens[row] - plan.query_lens[row]) as usize;
            let first_key = window.map_or(0, |w| (first_query + 1).saturating_sub(w));
            for pos in first_key..plan.context_lens[row] as usize {
                let slot = table[pos / bs] as usize * bs + pos % bs;
                assert_eq!(
                    kv[slot],
                    Some((g, tokens[pos])),
                    "seq {id} group {g} position {pos} reads another token's KV"
                );
            }
        }
    }
}

/// Group `g`'s table of plan row `row`.
fn group_table(plan: &StepPlan, g: usize, row: usize) -> &[i32] {
    let per_group = plan.seq_ids.len() * plan.max_blocks;
    &plan.block_tables[g * per_group + row * plan.max_blocks..][..plan.max_blocks]
}

fn check_invariants(s: &Scheduler, plan: &StepPlan) {
    let cfg = s.config();
    assert!(
        plan.num_tokens() <= cfg.max_num_batched_tokens,
        "token budget exceeded"
    );
    assert!(s.num_running() <= cfg.max_num_seqs);
    let owners = s.owner_counts();
    for (b, &count) in owners.iter().enumerate() {
        assert_eq!(
            s.pool().ref_count(b as u32),
            count,
            "block {b} ref count != owners"
        );
    }
    assert_eq!(
        s.pool().num_free(),
        owners.iter().filter(|&&c| c == 0).count()
    );
    // A block can be written and shared in the same step (its KV is stored
    // before any attention reads it); what must never happen is two writes to
    // one slot. Reads of stale KV are caught by check_kv.
    let mut slots = plan.slot_mapping.clone();
    slots.sort_unstable();
    assert!(
        slots.windows(2).all(|w| w[0] != w[1]),
        "two tokens write one slot"
    );
}

/// With a sliding window, exactly the blocks before the window of a row's
/// first query are freed (-1) in that group; every block from there to its
/// context is live.
fn check_freed_entries(s: &Scheduler, plan: &StepPlan) {
    let bs = s.config().block_size;
    for (g, window) in s.config().group_windows().iter().enumerate() {
        for row in 0..plan.seq_ids.len() {
            let table = group_table(plan, g, row);
            let (ctx, first_query) = first_query(plan, row);
            let first_live = window.map_or(0, |w| (first_query + 1).saturating_sub(w) / bs);
            assert!(
                table[..first_live].iter().all(|&b| b == -1),
                "a block behind group {g}'s window is still held"
            );
            assert!(
                table[first_live..ctx.div_ceil(bs)].iter().all(|&b| b >= 0),
                "a block the step reads in group {g} was freed"
            );
        }
    }
}

/// (context length, position of the first query) of a plan row.
fn first_query(plan: &StepPlan, row: usize) -> (usize, usize) {
    let ctx = plan.context_lens[row] as usize;
    (ctx, ctx - plan.query_lens[row] as usize)
}

/// The traces' config: one KV group per window of `windows`.
fn trace_config(
    num_blocks: usize,
    block_size: usize,
    caching: bool,
    windows: &[Option<usize>],
) -> SchedulerConfig {
    let (sliding_window, kv_groups) = match windows {
        [one] => (*one, vec![]),
        many => (None, many.to_vec()),
    };
    SchedulerConfig {
        num_blocks,
        block_size,
        max_num_seqs: 6,
        max_num_batched_tokens: 40,
        enable_prefix_caching: caching,
        cache_salt: 3,
        sliding_window,
        kv_groups,
    }
}

/// A random trace of adds, forks, finishes and aborts over `windows` (one
/// KV group per window), checking every plan.
fn run_trace(
    seed: u64,
    num_blocks: usize,
    block_size: usize,
    caching: bool,
    windows: &[Option<usize>],
) -> SchedulerStats {
    let mut s = Scheduler::new(trace_config(num_blocks, block_size, caching, windows)).unwrap();
    let mut t = Trace { seed, step: 0 };
    let mut kv = vec![None; num_blocks * block_size];
    let mut targets: HashMap<u64, usize> = HashMap::new();
    let shared_prefix: Vec<u32> = (0..24).map(|i| 1000 + i).collect();
    let mut next_id = 0u64;
    for _ in 0..400 {
        if t.below(3) == 0 && next_id < 60 {
            let prefix = t.below(shared_prefix.len());
            let mut prompt = shared_prefix[..prefix].to_vec();
            prompt.extend((0..1 + t.below(20)).map(|_| t.below(50) as u32));
            if s.add_group(next_id, &prompt, t.below(3)).is_ok() {
                targets.insert(next_id, prompt.len() + 1 + t.below(12));
            }
            next_id += 1;
        }
        let plan = s.schedule();
        check_invariants(&s, &plan);
        check_kv(&mut kv, &s, &plan, block_size);
        check_freed_entries(&s, &plan);
        for (row, &id) in plan.seq_ids.iter().enumerate() {
            if !plan.sample[row] {
                continue;
            }
            let len = s.token_ids(id).unwrap().len();
            if len >= targets[&id] || t.below(40) == 0 {
                s.finish(id).unwrap(); // finished, or aborted mid-decode
            } else {
                s.append_token(id, t.below(50) as u32).unwrap();
                while t.below(2) == 0 {
                    let child = next_id;
                    next_id += 1;
                    if s.fork(id, child).is_err() {
                        break;
                    }
                    targets.insert(child, targets[&id]);
                    s.append_token(child, t.below(50) as u32).unwrap();
                }
            }
        }
        // Abort a waiting or mid-prefill sequence now and then.
        if t.below(25) == 0 {
            if let Some(&id) = targets.keys().find(|id| s.token_ids(**id).is_some()) {
                s.finish(id).unwrap();
            }
        }
    }
    let alive: Vec<u64> = targets
        .keys()
        .copied()
        .filter(|id| s.token_ids(*id).is_some())
        .collect();
    for id in alive {
        s.finish(id).unwrap();
    }
    assert!(!s.has_work());
    assert_eq!(
        s.pool().num_free(),
        num_blocks,
        "every ref count returns to zero"
    );
    assert!((0..num_blocks as u32).all(|b| s.pool().ref_count(b) == 0));
    s.stats()
}

#[test]
fn random_traces_keep_every_invariant() {
    for seed in 0..40 {
        run_trace(
            seed,
            12 + (seed as usize % 5) * 6,
            [1, 2, 4, 16][seed as usize % 4],
            seed % 3 != 0,
            &[None],
        );
    }
}

#[test]
fn random_traces_with_a_sliding_window_keep_every_invariant() {
    let mut preemptions = 0;
    for seed in 0..40 {
        let stats = run_trace(
            seed,
            12 + (seed as usize % 5) * 6,
            [1, 2, 4, 16][seed as usize % 4],
            seed % 3 != 0,
            &[Some([1, 3, 5, 8, 17][seed as usize % 5])],
        );
        preemptions += stats.num_preemptions;
    }
    assert!(preemptions > 0, "the traces exercise preemption");
}

// --- sliding window: blocks behind every layer's window go back to the pool ---

fn windowed(num_blocks: usize, block_size: usize, window: usize) -> SchedulerConfig {
    SchedulerConfig {
        sliding_window: Some(window),
        ..config(num_blocks, block_size)
    }
}

fn table(plan: &StepPlan, row: usize) -> &[i32] {
    group_table(plan, 0, row)
}

fn checked_schedule(s: &mut Scheduler, kv: &mut [Option<(usize, u32)>]) -> StepPlan {
    let plan = s.schedule();
    check_invariants(s, &plan);
    check_kv(kv, s, &plan, s.config().block_size);
    check_freed_entries(s, &plan);
    plan
}

#[test]
fn decode_frees_the_blocks_behind_the_window() {
    let (bs, w) = (4, 8);
    let mut s = Scheduler::new(windowed(16, bs, w)).unwrap();
    let mut kv = vec![None; 16 * bs];
    s.add(1, &(0..10).collect::<Vec<_>>()).unwrap();
    let plan = checked_schedule(&mut s, &mut kv);
    assert_eq!(plan.block_tables, vec![0, 1, 2]);
    for pos in 10..70u32 {
        s.append_token(1, 100 + pos).unwrap();
        let plan = checked_schedule(&mut s, &mut kv);
        let freed = (pos as usize + 1).saturating_sub(w) / bs;
        let row = table(&plan, 0);
        assert_eq!(
            row.len(),
            pos as usize / bs + 1,
            "positions keep their table entries"
        );
        assert_eq!(row.iter().filter(|&&b| b == -1).count(), freed);
        assert_eq!(s.pool().num_used(), row.len() - freed);
        assert!(s.pool().num_used() <= w / bs + 1);
    }
    s.finish(1).unwrap();
    assert_eq!(s.pool().num_free(), 16);
}

#[test]
fn chunked_prefill_frees_behind_each_chunk_s_window() {
    let (bs, w, chunk) = (4, 8, 5);
    let mut cfg = windowed(16, bs, w);
    cfg.max_num_batched_tokens = chunk;
    let mut s = Scheduler::new(cfg).unwrap();
    let mut kv = vec![None; 16 * bs];
    s.add(1, &(0..30).collect::<Vec<_>>()).unwrap();
    let mut freed_per_chunk = vec![];
    loop {
        let plan = checked_schedule(&mut s, &mut kv);
        let (_, start) = first_query(&plan, 0);
        freed_per_chunk.push((start, table(&plan, 0).iter().filter(|&&b| b == -1).count()));
        // the chunk's own blocks plus the window before its first query
        assert!(s.pool().num_used() <= (w - 1 + chunk).div_ceil(bs) + 1);
        if plan.sample[0] {
            break;
        }
    }
    // a chunk starting at p needs keys from p - 7: blocks wholly before that are gone
    assert_eq!(
        freed_per_chunk,
        vec![(0, 0), (5, 0), (10, 0), (15, 2), (20, 3), (25, 4)]
    );
}

#[test]
fn prefix_cache_hits_the_freed_blocks_of_a_whole_chain() {
    let (bs, w) = (4, 8);
    let mut s = Scheduler::new(windowed(16, bs, w)).unwrap();
    let mut kv = vec![None; 16 * bs];
    let prompt: Vec<u32> = (100..120).collect(); // 5 blocks
    s.add(1, &prompt).unwrap();
    let first = checked_schedule(&mut s, &mut kv).block_tables;
    for t in 0..4 {
        s.append_token(1, t).unwrap();
        checked_schedule(&mut s, &mut kv);
    }
    assert!(
        s.pool().ref_count(first[0] as u32) == 0,
        "freed behind the window while running"
    );
    s.finish(1).unwrap();
    s.add(2, &prompt).unwrap();
    let plan = checked_schedule(&mut s, &mut kv);
    assert_eq!(
        (plan.query_lens.clone(), s.stats().prefix_cache_hits),
        (vec![4], 16),
        "four full blocks hit, the last token is computed"
    );
    // its first query (position 16) sees keys from 9 on: blocks 0 and 1 go back at once
    assert_eq!(&table(&plan, 0)[..4], &[-1, -1, first[2], first[3]]);
    assert_eq!(s.pool().num_used(), 3);
    s.finish(2).unwrap();
    assert_eq!(s.pool().num_free(), 16);
}

#[test]
fn a_chain_whose_front_block_was_reused_does_not_hit() {
    let (bs, w) = (4, 8);
    let mut s = Scheduler::new(windowed(7, bs, w)).unwrap();
    let mut kv = vec![None; 7 * bs];
    let prompt: Vec<u32> = (100..112).collect(); // 3 blocks
    s.add(1, &prompt).unwrap();
    let first = checked_schedule(&mut s, &mut kv).block_tables;
    s.append_token(1, 7).unwrap();
    checked_schedule(&mut s, &mut kv); // position 12 sees keys from 5: block 0 freed
    assert_eq!(s.pool().ref_count(first[0] as u32), 0);
    s.add(2, &(200..216).collect::<Vec<_>>()).unwrap(); // takes every free block
    let plan = checked_schedule(&mut s, &mut kv);
    assert_eq!(plan.seq_ids, vec![2]);
    assert!(
        table(&plan, 0).contains(&first[0]),
        "block 0 reused by another prompt"
    );
    s.finish(1).unwrap();
    s.finish(2).unwrap();
    s.add(3, &prompt).unwrap();
    let plan = checked_schedule(&mut s, &mut kv);
    assert_eq!(
        (plan.query_lens.clone(), s.stats().prefix_cache_hits),
        (vec![12], 0),
        "blocks 1 and 2 are intact but the chain starts at block 0"
    );
}

#[test]
fn a_preempted_windowed_sequence_recomputes_from_the_start() {
    let (bs, w) = (2, 4);
    let mut cfg = windowed(5, bs, w);
    cfg.enable_prefix_caching = false;
    let mut s = Scheduler::new(cfg).unwrap();
    let mut kv = vec![None; 5 * bs];
    s.add(1, &[1, 2]).unwrap();
    s.add(2, &[3, 4, 5, 6, 7, 8]).unwrap();
    let mut held_freed = false;
    let mut preempted_at = None;
    for step in 0..20u32 {
        let plan = checked_schedule(&mut s, &mut kv);
        if plan.preempted.contains(&2) {
            preempted_at = Some(s.token_ids(2).unwrap().len());
            break;
        }
        if let Some(row) = plan.seq_ids.iter().position(|&id| id == 2) {
            held_freed |= table(&plan, row).contains(&-1);
        }
        for (row, &id) in plan.seq_ids.iter().enumerate() {
            if plan.sample[row] {
                s.append_token(id, 50 + step).unwrap();
            }
        }
    }
    let len = preempted_at.expect("the newest sequence is preempted");
    assert!(held_freed, "it had freed blocks behind its window");
    s.finish(1).unwrap();
    let plan = checked_schedule(&mut s, &mut kv);
    assert_eq!(plan.seq_ids, vec![2]);
    assert_eq!(
        (first_query(&plan, 0).1, plan.query_lens[0] as usize),
        (0, len),
        "every token computed again, from position 0"
    );
    s.append_token(2, 9).unwrap();
    let plan = checked_schedule(&mut s, &mut kv);
    assert_eq!(
        table(&plan, 0).iter().filter(|&&b| b == -1).count(),
        (len + 1 - w) / bs,
        "and its window moves on again"
    );
    s.finish(2).unwrap();
    assert_eq!(s.pool().num_free(), 5);
}

#[test]
fn fork_keeps_the_freed_entries_and_shares_the_live_blocks() {
    let (bs, w) = (4, 8);
    let mut cfg = windowed(16, bs, w);
    cfg.max_num_batched_tokens = 8;
    let mut s = Scheduler::new(cfg).unwrap();
    let mut kv = vec![None; 16 * bs];
    s.add_group(1, &(0..21).collect::<Vec<_>>(), 1).unwrap();
    while !checked_schedule(&mut s, &mut kv).sample[0] {}
    // the last chunk started at 16, seeing keys from 9: blocks 0 and 1 were freed
    s.fork(1, 2).unwrap();
    let owners = s.owner_counts();
    assert_eq!(
        owners.iter().filter(|&&c| c == 2).count(),
        4,
        "blocks 2-5 shared"
    );
    assert_eq!(s.pool().num_used(), 4);
    s.append_token(1, 7).unwrap();
    s.append_token(2, 8).unwrap();
    let plan = checked_schedule(&mut s, &mut kv);
    assert_eq!(plan.copy_ops.len(), 1, "the shared partial block is copied");
    for row in 0..2 {
        assert_eq!(&table(&plan, row)[..2], &[-1, -1]);
    }
    for t in 0..12 {
        for id in [1, 2] {
            s.append_token(id, 60 + t).unwrap();
        }
        checked_schedule(&mut s, &mut kv);
    }
    s.finish(1).unwrap();
    s.finish(2).unwrap();
    assert_eq!(s.pool().num_free(), 16);
}

#[test]
fn a_zero_window_is_refused() {
    assert!(Scheduler::new(windowed(4, 4, 0)).is_err());
}

// --- KV groups: a windowed group's tables free, a global group's keep ---

fn grouped(num_blocks: usize, block_size: usize, groups: &[Option<usize>]) -> SchedulerConfig {
    SchedulerConfig {
        kv_groups: groups.to_vec(),
        ..config(num_blocks, block_size)
    }
}

#[test]
fn random_traces_with_kv_groups_keep_every_invariant() {
    let mut preemptions = 0;
    for seed in 0..40 {
        let w = Some([1, 3, 5, 8, 17][seed as usize % 5]);
        let groups = [vec![None, w], vec![w, None, w], vec![w, w]][seed as usize % 3].clone();
        let stats = run_trace(
            seed,
            (24 + (seed as usize % 5) * 8) * groups.len(),
            [1, 2, 4, 16][seed as usize % 4],
            seed % 3 != 1,
            &groups,
        );
        preemptions += stats.num_preemptions;
    }
    assert!(preemptions > 0, "the traces exercise preemption");
}

#[test]
fn a_global_group_keeps_its_blocks_while_a_windowed_one_frees() {
    let (bs, w) = (4, 8);
    let mut s = Scheduler::new(grouped(32, bs, &[None, Some(w)])).unwrap();
    let mut kv = vec![None; 32 * bs];
    s.add(1, &(0..10).collect::<Vec<_>>()).unwrap();
    let plan = checked_schedule(&mut s, &mut kv);
    assert_eq!(
        plan.slot_mapping.len(),
        2 * 10,
        "a slot per token and group"
    );
    assert_eq!(
        plan.block_tables,
        vec![0, 1, 2, 3, 4, 5],
        "group after group"
    );
    for pos in 10..70u32 {
        s.append_token(1, 100 + pos).unwrap();
        let plan = checked_schedule(&mut s, &mut kv);
        let blocks = pos as usize / bs + 1;
        let freed = (pos as usize + 1).saturating_sub(w) / bs;
        assert!(group_table(&plan, 0, 0).iter().all(|&b| b >= 0));
        let windowed = group_table(&plan, 1, 0);
        assert_eq!(windowed.iter().filter(|&&b| b == -1).count(), freed);
        assert_eq!(s.pool().num_used(), 2 * blocks - freed);
    }
    s.finish(1).unwrap();
    assert_eq!(s.pool().num_free(), 32);
}

#[test]
fn a_prefix_hit_takes_a_windowed_group_s_window_only() {
    let (bs, w) = (4, 8);
    let mut s = Scheduler::new(grouped(32, bs, &[None, Some(w)])).unwrap();
    let mut kv = vec![None; 32 * bs];
    let prompt: Vec<u32> = (100..120).collect(); // 5 blocks
    s.add(1, &prompt).unwrap();
    let first = checked_schedule(&mut s, &mut kv);
    let (global, windowed) = (
        group_table(&first, 0, 0).to_vec(),
        group_table(&first, 1, 0).to_vec(),
    );
    for t in 0..4 {
        s.append_token(1, t).unwrap();
        checked_schedule(&mut s, &mut kv);
    }
    s.finish(1).unwrap();
    s.add(2, &prompt).unwrap();
    let plan = checked_schedule(&mut s, &mut kv);
    assert_eq!(
        (plan.query_lens.clone(), s.stats().prefix_cache_hits),
        (vec![4], 16)
    );
    // the global group takes its whole chain; the windowed one the blocks position 16 sees (9 on)
    assert_eq!(&group_table(&plan, 0, 0)[..4], &global[..4]);
    assert_eq!(
        &group_table(&plan, 1, 0)[..4],
        &[-1, -1, windowed[2], windowed[3]]
    );
    s.finish(2).unwrap();
    assert_eq!(s.pool().num_free(), 32);
}

#[test]
fn kv_groups_are_checked_and_size_the_longest_prompt() {
    assert!(Scheduler::new(grouped(8, 4, &[None, Some(0)])).is_err());
    let both = SchedulerConfig {
        sliding_window: Some(4),
        ..grouped(8, 4, &[None, Some(4)])
    };
    assert!(Scheduler::new(both).is_err());
    // 20 tokens and the first sampled: 6 blocks globally, the window's (4 + a chunk of 8) in the other
    let mut cfg = grouped(10, 4, &[None, Some(4)]);
    cfg.max_num_batched_tokens = 8;
    assert!(Scheduler::new(cfg.clone())
        .unwrap()
        .add(1, &[7; 20])
        .is_ok());
    cfg.num_blocks = 9;
    assert!(matches!(
        Scheduler::new(cfg).unwrap().add(1, &[7; 20]),
        Err(SchedulerError::TooLong { needed: 10, .. })
    ));
}

#[test]
fn content_spans_keep_prompts_with_other_images_apart() {
    // 16 tokens, blocks of 4: an "image" of placeholder id 7 at positions 5..9
    let prompt: Vec<u32> = vec![1, 2, 3, 4, 5, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6];
    let span = |key| {
        [ContentSpan {
            start: 5,
            end: 9,
            key,
            whole: false,
        }]
    };
    let hits_after = |second: &[ContentSpan]| {
        let mut s = Scheduler::new(config(32, 4)).unwrap();
        s.add_with_spans(1, &prompt, 0, &span(0xA)).unwrap();
        s.schedule();
        s.finish(1).unwrap();
        s.add_with_spans(2, &prompt, 0, second).unwrap();
        s.schedule();
        s.stats().prefix_cache_hits
    };
    assert_eq!(
        hits_after(&span(0xA)),
        12,
        "the same image: every full block but the last hits"
    );
    assert_eq!(
        hits_after(&span(0xB)),
        4,
        "another image: only the block before it hits"
    );
    assert_eq!(
        hits_after(&[]),
        4,
        "no image key: the same as another image"
    );
    let moved = [ContentSpan {
        start: 4,
        end: 8,
        key: 0xA,
        whole: false,
    }];
    assert_eq!(
        hits_after(&moved),
        4,
        "the same key elsewhere is other content past block 0"
    );
}

#[test]
fn bad_content_spans_are_errors() {
    let mut s = Scheduler::new(config(8, 4)).unwrap();
    for (start, end) in [(2, 2), (3, 1), (0, 6)] {
        let err = s
            .add_with_spans(
                1,
                &[1, 2, 3, 4, 5],
                0,
                &[ContentSpan {
                    start,
                    end,
                    key: 1,
                    whole: false,
                }],
            )
            .unwrap_err();
        assert!(
            matches!(err, SchedulerError::BadSpan { .. }),
            "{start}..{end}"
        );
    }
    s.add_with_spans(
        1,
        &[1, 2, 3, 4, 5],
        0,
        &[ContentSpan {
            start: 0,
            end: 5,
            key: 1,
            whole: false,
        }],
    )
    .unwrap();
}
