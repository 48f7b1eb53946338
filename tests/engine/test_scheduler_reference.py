"""The Rust scheduler (`_native.Scheduler`) against a small pure-Python reference of the
same policy (native/core/src/scheduler.rs), step by step over seeded random traces.

Policy, in brief:
- Each `schedule()` first walks the running sequences, oldest first (a fork sits right
  after its parent). Each wants all its uncomputed tokens, capped by the token budget
  left. When the blocks run out, the newest running sequence is preempted by recompute:
  its blocks are freed in reverse order (their hashes stay cached) and it goes to the
  front of the waiting queue. If the one being scheduled is itself the newest, it is
  preempted and the walk ends.
- Then waiting sequences are admitted FIFO while the budget lasts and the seats allow
  (running sequences plus the seats they keep for forks). A new admission first reuses
  cached full blocks of its prompt, never the block holding the last token; its chunk's
  blocks are reserved all or nothing, and on failure it gives back the cached blocks and
  admission stops.
- Blocks: the free queue is an LRU list, freed blocks go to the back, allocation takes
  the front (and drops the block's old hash from the cache); a cache hit on a free block
  takes it out of the queue. A shared, partial last block is copied before a write
  (copy-on-write).

Only hit/miss behaviour of the hashes matters, so the reference hashes with Python's
`hash`; block ids, and so every array of the plan, must still match exactly.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from mistralrs_serve._native import Scheduler

PLAN_FIELDS = (
    "seq_ids",
    "query_lens",
    "context_lens",
    "sample",
    "input_ids",
    "positions",
    "slot_mapping",
    "block_tables",
    "copy_ops",
    "preempted",
    "logit_rows",
    "sampled_seq_ids",
)
STATS = (
    "num_free_blocks",
    "num_used_blocks",
    "num_running",
    "num_waiting",
    "has_work",
    "prefix_cache_queries",
    "prefix_cache_hits",
    "num_preemptions",
)


# --- the reference -------------------------------------------------------------------


@dataclass
class RefSeq:
    tokens: list[int]
    reserved_forks: int
    num_computed: int = 0  # counting the tokens of the last plan
    table: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # of the full blocks at the front


class RefScheduler:
    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        cache_salt: int = 0,
    ) -> None:
        if min(num_blocks, block_size, max_num_seqs, max_num_batched_tokens) <= 0:
            raise ValueError("every size must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.caching = enable_prefix_caching
        self.salt = cache_salt
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front first
        self.cache: dict[int, tuple[int, tuple[int, ...]]] = {}  # hash -> (block, its tokens)
        self.seqs: dict[int, RefSeq] = {}
        self.waiting: deque[int] = deque()
        self.running: list[int] = []  # oldest first
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_preemptions = 0

    # block pool

    def allocate(self) -> int:
        b, _ = self.free_queue.popitem(last=False)
        self.ref_counts[b] = 1
        old, self.block_hash[b] = self.block_hash[b], None
        if old is not None and self.cache.get(old, (None,))[0] == b:
            del self.cache[old]
        return b

    def share(self, b: int) -> None:
        if self.ref_counts[b] == 0:
            del self.free_queue[b]
        self.ref_counts[b] += 1

    def free(self, b: int) -> None:
        assert self.ref_counts[b] > 0, f"block {b} freed twice"
        self.ref_counts[b] -= 1
        if self.ref_counts[b] == 0:
            self.free_queue[b] = None  # to the back

    def release(self, blocks: list[int]) -> None:
        for b in reversed(blocks):
            self.free(b)

    def hash_block(self, parent: int | None, tokens: tuple[int, ...]) -> int:
        return hash((parent, self.salt, tokens))

    # API of _native.Scheduler

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def add(self, seq_id: int, prompt_ids: Any, num_forks: int = 0) -> None:
        prompt = [int(t) for t in prompt_ids]
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id} already exists")
        if not prompt:
            raise ValueError("empty prompt")
        if -(-(len(prompt) + 1) // self.block_size) > self.num_blocks:
            raise ValueError("too long")
        if num_forks + 1 > self.max_num_seqs:
            raise ValueError("too many choices")
        self.seqs[seq_id] = RefSeq(prompt, num_forks)
        self.waiting.append(seq_id)

    def append_token(self, seq_id: int, token_id: int) -> None:
        if seq_id not in self.seqs:
            raise KeyError(seq_id)
        self.seqs[seq_id].tokens.append(token_id)

    def fork(self, parent_id: int, child_id: int) -> None:
        if child_id in self.seqs:
            raise ValueError(f"sequence {child_id} already exists")
        if parent_id not in self.running:
            raise KeyError(parent_id)
        parent = self.seqs[parent_id]
        if parent.reserved_forks == 0:
            raise ValueError("no reserved seat")
        parent.reserved_forks -= 1
        for b in parent.table:
            self.share(b)
        self.seqs[child_id] = RefSeq(
            list(parent.tokens), 0, parent.num_computed, list(parent.table), list(parent.hashes)
        )
        self.running.insert(self.running.index(parent_id) + 1, child_id)

    def finish(self, seq_id: int) -> None:
        if seq_id not in self.seqs:
            raise KeyError(seq_id)
        seq = self.seqs.pop(seq_id)
        if seq_id in self.waiting:
            self.waiting.remove(seq_id)
        if seq_id in self.running:
            self.running.remove(seq_id)
        self.release(seq.table)

    def schedule(self) -> dict[str, np.ndarray]:
        plan: dict[str, list[Any]] = {f: [] for f in PLAN_FIELDS}
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            sid = self.running[i]
            seq = self.seqs[sid]
            want = len(seq.tokens) - seq.num_computed
            if want == 0:  # its sampled token is not appended yet
                i += 1
                continue
            n = min(want, budget)
            while not self.try_reserve(sid, n, plan):  # preempt the newest until it fits
                victim = self.running[-1]
                self.preempt(victim, plan)
                if victim == sid:
                    break
            else:
                self.emit(sid, n, plan)
                budget -= n
                i += 1
        if not plan["preempted"]:  # no admissions in a step that had to preempt
            self.admit_waiting(budget, plan)
        return self.to_arrays(plan)

    # scheduling steps

    def preempt(self, sid: int, plan: dict[str, list[Any]]) -> None:
        self.running.remove(sid)
        seq = self.seqs[sid]
        self.release(seq.table)
        seq.table, seq.hashes, seq.num_computed = [], [], 0
        self.waiting.appendleft(sid)
        self.num_preemptions += 1
        plan["preempted"].append(sid)

    def admit_waiting(self, budget: int, plan: dict[str, list[Any]]) -> None:
        while budget > 0 and self.waiting:
            sid = self.waiting[0]
            seq = self.seqs[sid]
            seats = len(self.running) + sum(self.seqs[r].reserved_forks for r in self.running)
            if seats + 1 + seq.reserved_forks > self.max_num_seqs:
                return
            queried, hit = self.take_cached_prefix(seq)
            n = min(len(seq.tokens) - seq.num_computed, budget)
            if not self.try_reserve(sid, n, plan):
                self.release(seq.table)  # give back what the prefix cache lent
                seq.table, seq.hashes, seq.num_computed = [], [], 0
                return
            self.prefix_cache_queries += queried  # counted on admission only
            self.prefix_cache_hits += hit
            self.running.append(self.waiting.popleft())
            self.emit(sid, n, plan)
            budget -= n

    def take_cached_prefix(self, seq: RefSeq) -> tuple[int, int]:
        if not self.caching:
            return 0, 0
        bs = self.block_size
        max_full = (len(seq.tokens) - 1) // bs  # the last token is always computed
        parent = None
        for i in range(max_full):
            tokens = tuple(seq.tokens[i * bs : (i + 1) * bs])
            h = self.hash_block(parent, tokens)
            hit = self.cache.get(h)
            if hit is None or hit[1] != tokens:
                break
            self.share(hit[0])
            seq.table.append(hit[0])
            seq.hashes.append(h)
            parent = h
        seq.num_computed = len(seq.table) * bs
        return max_full * bs, seq.num_computed

    def try_reserve(self, sid: int, n: int, plan: dict[str, list[Any]]) -> bool:
        """Blocks for `n` more tokens (and a private copy of a shared partial last block),
        all or nothing."""
        seq = self.seqs[sid]
        bs = self.block_size
        new_blocks = max(0, -(-(seq.num_computed + n) // bs) - len(seq.table))
        copy_last = seq.num_computed % bs != 0 and bool(seq.table) and self.ref_counts[seq.table[-1]] > 1
        if self.num_free_blocks < new_blocks + copy_last:
            return False
        if copy_last:
            old, new = seq.table[-1], self.allocate()
            plan["copy_ops"].append((old, new))
            self.free(old)
            seq.table[-1] = new
        seq.table.extend(self.allocate() for _ in range(new_blocks))
        return True

    def emit(self, sid: int, n: int, plan: dict[str, list[Any]]) -> None:
        seq = self.seqs[sid]
        bs = self.block_size
        for pos in range(seq.num_computed, seq.num_computed + n):
            plan["input_ids"].append(seq.tokens[pos])
            plan["positions"].append(pos)
            plan["slot_mapping"].append(seq.table[pos // bs] * bs + pos % bs)
        seq.num_computed += n
        plan["seq_ids"].append(sid)
        plan["query_lens"].append(n)
        plan["context_lens"].append(seq.num_computed)
        plan["sample"].append(seq.num_computed == len(seq.tokens))
        if self.caching:  # register the blocks that just became full
            while len(seq.hashes) < seq.num_computed // bs:
                i = len(seq.hashes)
                tokens = tuple(seq.tokens[i * bs : (i + 1) * bs])
                h = self.hash_block(seq.hashes[-1] if seq.hashes else None, tokens)
                self.block_hash[seq.table[i]] = h
                self.cache[h] = (seq.table[i], tokens)
                seq.hashes.append(h)

    def to_arrays(self, plan: dict[str, list[Any]]) -> dict[str, np.ndarray]:
        tables = [self.seqs[sid].table for sid in plan["seq_ids"]]
        width = max(map(len, tables), default=0)
        block_tables = np.full((len(tables), width), -1, dtype=np.int32)
        for row, table in enumerate(tables):
            block_tables[row, : len(table)] = table
        out = {f: np.array(plan[f], dtype=np.int64) for f in PLAN_FIELDS}
        out["sample"] = np.array(plan["sample"], dtype=bool)
        out["block_tables"] = block_tables
        out["copy_ops"] = np.array(plan["copy_ops"], dtype=np.int64).reshape(-1, 2)
        out["logit_rows"] = (np.cumsum(out["query_lens"]) - 1)[out["sample"]]
        out["sampled_seq_ids"] = out["seq_ids"][out["sample"]]
        return out


# --- a few fixed cases of the reference itself (same as scheduler_tests.rs) ----------


def test_reference_prefill_decode_and_prefix_cache() -> None:
    s = RefScheduler(num_blocks=8, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    s.add(1, range(10, 16))
    plan = s.schedule()
    assert plan["slot_mapping"].tolist() == [0, 1, 2, 3, 4, 5]
    assert plan["block_tables"].tolist() == [[0, 1]]
    s.append_token(1, 99)
    assert s.schedule()["slot_mapping"].tolist() == [6]
    s.finish(1)  # blocks 1 then 0 go to the back of the queue: [2..7, 1, 0]
    s.add(2, [*range(10, 14), 7, 7])
    plan = s.schedule()
    assert plan["query_lens"].tolist() == [2], "the first block hits"
    assert plan["block_tables"].tolist() == [[0, 2]]
    assert (s.prefix_cache_hits, s.prefix_cache_queries) == (4, 8), "seq 1 missed its 4"


def test_reference_preempts_the_newest_and_copies_on_write() -> None:
    s = RefScheduler(num_blocks=3, block_size=2, max_num_batched_tokens=64, enable_prefix_caching=False)
    s.add(1, [1, 2, 3])
    s.add(2, [4])
    s.schedule()
    for _ in range(2):
        s.append_token(1, 9)
        s.append_token(2, 9)
        plan = s.schedule()
    assert plan["preempted"].tolist() == [2]
    assert plan["seq_ids"].tolist() == [1]
    s.finish(1)
    assert s.schedule()["query_lens"].tolist() == [3], "recomputes prompt and output"

    s = RefScheduler(num_blocks=8, block_size=4)
    s.add(1, [1, 2, 3, 4, 5, 6], num_forks=1)
    s.schedule()
    s.fork(1, 2)
    with pytest.raises(ValueError):
        s.fork(1, 3)
    s.append_token(1, 7)
    s.append_token(2, 8)
    plan = s.schedule()
    assert plan["copy_ops"].tolist() == [[1, 2]]
    assert plan["block_tables"].tolist() == [[0, 2], [0, 1]]


# --- differential traces -------------------------------------------------------------


def first_difference(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> str | None:
    if set(got) != set(want):
        return f"keys: rust {sorted(got)} != reference {sorted(want)}"
    for f in PLAN_FIELDS:
        g, w = got[f], want[f]
        if g.dtype != w.dtype or g.shape != w.shape or not np.array_equal(g, w):
            rust = f"rust      {g.dtype} {g.shape} {g.tolist()}"
            return f"{f}:\n  {rust}\n  reference {w.dtype} {w.shape} {w.tolist()}"
    return None


class Trace:
    """Drives the Rust scheduler and the reference with the same calls."""

    def __init__(self, seed: int, cfg: dict[str, Any]) -> None:
        self.context = f"seed {seed} {cfg}"
        self.rust = Scheduler(**cfg)
        self.ref = RefScheduler(**cfg)
        self.block_size = cfg["block_size"]
        self.log: list[str] = []
        self.kv: dict[int, int] = {}  # slot -> token whose KV it holds
        # "readmitted": preempted and admitted again in the same step; the policy
        # admits nothing in a step that preempted, so this must stay 0.
        self.counts = {"preempted": 0, "copies": 0, "readmitted": 0}

    def fail(self, what: str) -> None:
        recent = "\n  ".join(self.log[-25:])
        steps = self.log.count("schedule()")
        pytest.fail(
            f"{self.context}\ncall {len(self.log)} (schedule() #{steps}): {what}\nlast calls:\n  {recent}",
            pytrace=False,
        )

    def call(self, name: str, *args: Any) -> bool:
        """Both sides must succeed, or both raise the same exception type."""
        self.log.append(f"{name}{args}")
        outcomes = []
        for side in (self.rust, self.ref):
            side_args = args
            if name == "add" and side is self.rust:
                side_args = (args[0], np.array(args[1], dtype=np.uint32), *args[2:])
            try:
                getattr(side, name)(*side_args)
                outcomes.append(None)
            except (KeyError, ValueError) as e:
                outcomes.append(type(e).__name__)
        if outcomes[0] != outcomes[1]:
            self.fail(f"{name}{args}: rust -> {outcomes[0] or 'ok'}, reference -> {outcomes[1] or 'ok'}")
        self.check_stats(f"after {name}")
        return outcomes[0] is None

    def check_stats(self, when: str) -> None:
        for stat in STATS:
            got, want = getattr(self.rust, stat), getattr(self.ref, stat)
            if got != want:
                self.fail(f"{when}: {stat}: rust {got} != reference {want}")

    def schedule(self) -> dict[str, np.ndarray]:
        self.log.append("schedule()")
        plan, want = self.rust.schedule(), self.ref.schedule()
        got = {f: getattr(plan, f) for f in PLAN_FIELDS}
        diff = first_difference(got, want)
        if diff is not None:
            self.fail(f"schedule() plans differ in {diff}")
        self.check_stats("after schedule()")
        is_decode_only = bool((want["query_lens"] == 1).all() and want["sample"].all())
        counts = (plan.num_seqs, plan.num_tokens, plan.is_decode_only)
        if counts != (len(want["seq_ids"]), len(want["input_ids"]), is_decode_only):
            self.fail(f"num_seqs, num_tokens, is_decode_only: {counts}")
        if len(want["input_ids"]) > self.ref.max_num_batched_tokens:
            self.fail("the token budget is exceeded")
        if self.ref.num_running > self.ref.max_num_seqs:
            self.fail("more sequences run than max_num_seqs")
        self.check_kv(want)
        self.counts["preempted"] += len(want["preempted"])
        self.counts["copies"] += len(want["copy_ops"])
        self.counts["readmitted"] += len(set(want["preempted"].tolist()) & set(want["seq_ids"].tolist()))
        return want

    def check_kv(self, plan: dict[str, np.ndarray]) -> None:
        """Simulated KV memory: copies, then writes; every sequence then reads its own tokens."""
        bs = self.block_size
        for src, dst in plan["copy_ops"].tolist():
            for k in range(bs):
                if src * bs + k in self.kv:
                    self.kv[dst * bs + k] = self.kv[src * bs + k]
        slots = plan["slot_mapping"].tolist()
        if len(set(slots)) != len(slots):
            self.fail("two tokens write one slot")
        self.kv.update(zip(slots, plan["input_ids"].tolist(), strict=True))
        for row, sid in enumerate(plan["seq_ids"].tolist()):
            tokens = self.ref.seqs[sid].tokens
            for pos in range(int(plan["context_lens"][row])):
                slot = int(plan["block_tables"][row, pos // bs]) * bs + pos % bs
                if self.kv.get(slot) != tokens[pos]:
                    self.fail(f"seq {sid} position {pos} reads slot {slot} holding another token's KV")


def run_trace(seed: int, block_size: int, caching: bool) -> dict[str, int]:
    rng = random.Random(f"{seed}/{block_size}/{caching}")
    max_prompt = rng.choice([3, 8, 20, 40])
    blocks_needed = -(-(max_prompt + 1) // block_size)
    cfg = {
        "num_blocks": max(1, blocks_needed + rng.choice([-1, 0, 0, 1, 2, 4, 8])),
        "block_size": block_size,
        "max_num_seqs": rng.randint(1, 6),
        "max_num_batched_tokens": rng.choice([1, 3, 7, 16, 40, 128]),
        "enable_prefix_caching": caching,
        "cache_salt": rng.randrange(3),
    }
    t = Trace(seed, cfg)
    vocab = rng.choice([2, 5, 50])
    prefixes = [[rng.randrange(vocab) for _ in range(max_prompt)] for _ in range(3)]
    prompts: list[list[int]] = []
    # Finish a sequence at this length: within the KV cache, as the engine's max_tokens
    # check makes it, or now and then beyond it, where it preempts itself until aborted.
    capacity = cfg["num_blocks"] * block_size
    targets: dict[int, int] = {}
    next_id = 0
    deferred: list[int] = []  # sampled sequences whose token comes a step late
    for _ in range(rng.randint(30, 90)):
        while rng.random() < 0.4:
            if prompts and rng.random() < 0.2:
                prompt = list(rng.choice(prompts))  # the same prompt again
            else:
                prompt = rng.choice(prefixes)[: rng.randint(0, max_prompt)]
                prompt += [rng.randrange(vocab) for _ in range(rng.randint(0, 6))]
            seq_id = next_id if rng.random() < 0.95 else rng.randrange(next_id + 1)  # maybe a duplicate
            prompt = prompt[: max_prompt + 2]
            if t.call("add", seq_id, prompt, rng.choice([0, 0, 0, 1, 2, 3])):
                prompts.append(prompt)
                targets[seq_id] = rng.randint(len(prompt) + 1, capacity + 3 * (rng.random() < 0.05))
            next_id = max(next_id, seq_id + 1)

        plan = t.schedule()
        for sid in deferred:
            if sid in t.ref.seqs:
                t.call("append_token", sid, rng.randrange(vocab))
        deferred = []
        for sid in plan["seq_ids"][plan["sample"]].tolist():
            if sid not in t.ref.seqs:
                continue
            r = rng.random()
            if r < 0.05 or len(t.ref.seqs[sid].tokens) >= targets[sid]:
                t.call("finish", sid)
                continue
            if r < 0.2:
                deferred.append(sid)
                continue
            fork_first = rng.random() < 0.5
            if not fork_first:
                t.call("append_token", sid, rng.randrange(vocab))
            while rng.random() < 0.6 and t.call("fork", sid, next_id):
                t.call("append_token", next_id, rng.randrange(vocab))
                targets[next_id] = targets[sid]
                next_id += 1
            if fork_first:
                t.call("append_token", sid, rng.randrange(vocab))

        r = rng.random()
        live = sorted(t.ref.seqs)
        if r < 0.1 and live:
            t.call("finish", rng.choice(live))  # abort, waiting or running
        elif r < 0.15 and live:
            parent = rng.choice(live)
            if t.call("fork", parent, next_id):  # mid-prefill, or waiting (KeyError)
                targets[next_id] = targets[parent]
            next_id += 1
        elif r < 0.17:
            t.call("finish", next_id + 1000)  # unknown: KeyError
        elif r < 0.18:
            t.call("append_token", next_id + 1000, 1)

    for sid in sorted(t.ref.seqs):
        t.call("finish", sid)
    assert t.rust.num_free_blocks == cfg["num_blocks"], t.context
    assert not t.rust.has_work
    return {**t.counts, "hits": t.ref.prefix_cache_hits}


@pytest.mark.parametrize("caching", [True, False], ids=["caching", "no-caching"])
@pytest.mark.parametrize("block_size", [1, 2, 4, 16])
def test_rust_scheduler_matches_reference(block_size: int, caching: bool) -> None:
    totals = {"preempted": 0, "copies": 0, "readmitted": 0, "hits": 0}
    for seed in range(60):
        for k, v in run_trace(seed, block_size, caching).items():
            totals[k] += v
    # The traces must reach preemption, prefix cache hits, and copy-on-write where a
    # block can be partial.
    assert totals["preempted"] > 0, totals
    assert totals["hits"] > 0 or not caching, totals
    assert totals["copies"] > 0 or block_size == 1, totals
    assert totals["readmitted"] == 0, totals


def test_kv_groups_through_the_binding() -> None:
    """A hybrid model's two KV groups (global, window 8): a slot per token and a table per
    sequence in each; the windowed group's table frees behind its window, the global one's
    never; the first group's arrays are the plain `slot_mapping`/`block_tables`."""
    s = Scheduler(num_blocks=32, block_size=4, kv_groups=[None, 8])
    assert s.kv_groups == [None, 8] and s.sliding_window is None
    s.add(1, np.arange(10, dtype=np.uint32))
    plan = s.schedule()
    assert plan.num_groups == 2
    assert plan.group_slot_mapping.shape == (2, 10) and plan.group_block_tables.shape == (2, 3)
    np.testing.assert_array_equal(plan.slot_mapping, plan.group_slot_mapping[0])
    np.testing.assert_array_equal(plan.block_tables, plan.group_block_tables[:1])
    assert not set(plan.group_slot_mapping[0]) & set(plan.group_slot_mapping[1])
    for pos in range(10, 40):
        s.append_token(1, pos)
        plan = s.schedule()
    global_table, windowed = plan.group_block_tables
    assert (global_table >= 0).all()
    assert (windowed[: (40 - 8) // 4] == -1).all() and (windowed[(40 - 8) // 4 :] >= 0).all()
    assert s.num_used_blocks == 10 + 10 - (40 - 8) // 4
    assert Scheduler(num_blocks=8).kv_groups == [None]


@pytest.mark.parametrize("kwargs", [{"kv_groups": [None, 0]}, {"kv_groups": [None, 4], "sliding_window": 4}])
def test_bad_kv_groups_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="window"):
        Scheduler(num_blocks=8, **kwargs)
