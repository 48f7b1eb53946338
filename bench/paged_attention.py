"""Paged attention on the CPU: batched decode vs a per-sequence loop.

    .venv/bin/python bench/paged_attention.py            # batch 1/8/32 x context 64/256/1024/mixed
    .venv/bin/python bench/paged_attention.py --smoke    # seconds

SmolLM2 shapes (9 heads, 3 kv heads, head_dim 64, 30 layers), fp32 cache,
block_size 16, shuffled block tables. Every layer has its own cache and a
timed pass calls all 30 layers in turn, so KV is read from DRAM as in a real
step, not from L3. Methods take turns pass by pass and each reports its best
pass (the box is shared; load1 in each row says how busy it was). Prints one
JSON line per case:

{"batch": 8, "context": "mixed", "method": "group", "us_per_layer": ..., "gb_s": ...,
 "plan_us": ..., "load1": ..., "vs_loop": ...}

Context "mixed" draws each sequence's context from 64..1024.

us_per_layer is one `attend` call (cache write + gathers + SDPA); gb_s is the
KV bytes the step attends over (sum of contexts x kv heads x head_dim x 4 B
x 2 for k and v) per us_per_layer, counted once (the gather copy is not
counted; bf16 rows read half those bytes); plan_us is building the
PagedAttention (once per step, all layers). Methods: native (default: the
Rust kernel reading the cache through the block tables), native_bf16 (the
same over a bf16 cache, the engine's), group (sort by context, pad up to
192 positions, at most 4 MiB gathered per call, SDPA), pad (one SDPA call
padded to the longest context), loop (one SDPA call per sequence). Prefill rows: one 512-token
chunk from 0, and one at 512..1023.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np
import torch
from mistralrs_serve.config import ModelConfig
from mistralrs_serve.engine.kv_cache import PagedKVCache
from mistralrs_serve.layers.attention import PagedAttention

# each method's PagedAttention options: "pad" and "loop" are "group" tuned to its extremes
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "native": {"decode_mode": "native"},
    "group": {"decode_mode": "group"},
    "pad": {"decode_mode": "group", "call_cost_tokens": 1 << 30, "max_call_bytes": 1 << 60},
    "loop": {"decode_mode": "group", "call_cost_tokens": -1},
}

CFG = ModelConfig(
    architecture="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
)
BLOCK_SIZE = 16


def plan_for(
    ctxs: np.ndarray, qlens: np.ndarray, rng: np.random.Generator
) -> tuple[int, np.ndarray, np.ndarray]:
    """Shuffled block tables and the slots of the step's tokens."""
    needed = -(-ctxs // BLOCK_SIZE)
    num_blocks = int(needed.sum())
    pool = rng.permutation(num_blocks)
    tables = np.full((len(ctxs), int(needed.max())), -1, dtype=np.int32)
    slots: list[int] = []
    offset = 0
    for i, (c, q, n) in enumerate(zip(ctxs, qlens, needed, strict=True)):
        tables[i, :n] = pool[offset : offset + n]
        offset += n
        slots += [int(tables[i, p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE for p in range(c - q, c)]
    return num_blocks, tables, np.array(slots, dtype=np.int64)


def time_pass(attn: PagedAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
    """Mean seconds per layer call over one pass of all layers."""
    start = time.perf_counter()
    for layer in range(CFG.num_layers):
        attn.attend(layer, q, k, v)
    return (time.perf_counter() - start) / CFG.num_layers


def run_case(
    batch: int, context: str, ctxs: np.ndarray, qlens: np.ndarray, methods: list[str], passes: int
) -> None:
    rng = np.random.default_rng(0)
    num_blocks, tables, slots = plan_for(ctxs, qlens, rng)
    cache = PagedKVCache(CFG, num_blocks, BLOCK_SIZE, torch.float32)
    cache.kv.uniform_(-1, 1)
    cache_bf16 = PagedKVCache(CFG, num_blocks, BLOCK_SIZE, torch.bfloat16)
    cache_bf16.kv.copy_(cache.kv)
    gen = torch.Generator().manual_seed(0)
    num_tokens = int(qlens.sum())
    q = torch.randn(num_tokens, CFG.num_heads, CFG.head_dim, generator=gen)
    k = torch.randn(num_tokens, CFG.num_kv_heads, CFG.head_dim, generator=gen)
    v = torch.randn(num_tokens, CFG.num_kv_heads, CFG.head_dim, generator=gen)
    kv_bytes = int(ctxs.sum()) * CFG.num_kv_heads * CFG.head_dim * 4 * 2
    attns, plan_s = {}, {}
    for method in methods:
        options = METHOD_OPTIONS[method.removesuffix("_bf16") if method != "prefill" else "native"]
        on = cache_bf16 if method.endswith("_bf16") else cache
        start = time.perf_counter()
        for _ in range(10):
            attns[method] = PagedAttention(on, qlens, ctxs, slots, tables, **options)
        plan_s[method] = (time.perf_counter() - start) / 10
        time_pass(attns[method], q, k, v)  # warm-up
    # methods take turns, best pass of each: a burst of load from elsewhere
    # on this shared machine then spoils one pass, not one method
    best = dict.fromkeys(methods, float("inf"))
    for _ in range(passes):
        for method in methods:
            best[method] = min(best[method], time_pass(attns[method], q, k, v))
    for method in methods:
        row = {
            "batch": batch,
            "context": context,
            "method": method,
            "us_per_layer": round(best[method] * 1e6, 1),
            "gb_s": round(kv_bytes / best[method] / 1e9, 2),
            "plan_us": round(plan_s[method] * 1e6, 1),
            "load1": round(os.getloadavg()[0], 2),  # others' load on a shared box skews timings
        }
        if "loop" in best:
            row["vs_loop"] = round(best["loop"] / best[method], 2)
        print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="two small cases, one pass")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--context", nargs="*", default=["64", "256", "1024", "mixed"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches, contexts, passes = args.batch, args.context, args.passes
    if args.smoke:
        batches, contexts, passes = [1, 8], ["64", "mixed"], 1
    torch.manual_seed(0)
    for batch in batches:
        for context in contexts:
            if context == "mixed":
                ctxs = np.random.default_rng(batch).integers(64, 1025, size=batch)
            else:
                ctxs = np.full(batch, int(context))
            # the loop first: the other rows report their speed-up over it
            methods = ["loop", "pad", "group", "native", "native_bf16"]
            run_case(batch, context, ctxs, np.ones(batch, dtype=np.int64), methods, passes)
    if not args.smoke and args.batch == parser.get_default("batch"):
        run_case(1, "prefill 0..511", np.array([512]), np.array([512]), ["prefill"], passes)
        run_case(1, "prefill 512..1023", np.array([1024]), np.array([512]), ["prefill"], passes)


if __name__ == "__main__":
    main()
