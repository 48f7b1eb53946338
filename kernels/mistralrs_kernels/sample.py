"""Token sampling on the GPU: one program per row of logits.

Per row: temperature (0: greedy), top-k (0: off), then top-p (1: off) over
what top-k kept, then min-p (0: off), in the CPU sampler's order; a seed
and a step fix the random draw (Philox counters: the draw does not depend
on the batch). The truncation thresholds are found by bisection in logit
space (no sort): 32 halvings per rule, each a pass over the row, which stays
in L2. The draw is the exponential race (Gumbel-max): argmax over kept
tokens of x/T - log(-log U). The chosen token's logprob is its log-softmax
after temperature (1 when greedy) and before truncation, as the CPU sampler
reports it. Penalties and logit bias are applied to the logits before.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mistralrs_kernels._checks import FLOAT_DTYPES, check_tensor, need, same_device

BISECTION_STEPS = 32


@triton.jit
def _sample_kernel(
    logits_ptr,
    temperature_ptr,
    top_k_ptr,
    top_p_ptr,
    min_p_ptr,
    seed_ptr,
    step_ptr,
    token_ptr,
    logprob_ptr,
    vocab,
    BLOCK: tl.constexpr,
    STEPS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * vocab
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature <= 0.0
    inv_t = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, temperature))
    offs = tl.arange(0, BLOCK)
    # pass 1: max, min and log-sum-exp of the scaled row
    hi = float("-inf")
    lo = float("inf")
    for start in range(0, vocab, BLOCK):
        idx = start + offs
        x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32) * inv_t
        hi = tl.maximum(hi, tl.max(x, axis=0))
        lo = tl.minimum(lo, tl.min(tl.where(idx < vocab, x, float("inf")), axis=0))
    z = 0.0
    for start in range(0, vocab, BLOCK):
        idx = start + offs
        x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32) * inv_t
        z += tl.sum(tl.exp(x - hi), axis=0)
    log_z = hi + tl.log(z)

    # thresholds (a kept token has x >= thr)
    thr = lo
    top_k = tl.load(top_k_ptr + row)
    if top_k > 0:
        # the largest t with count(x >= t) >= k
        a = lo
        b = hi
        for _ in range(STEPS):
            mid = (a + b) * 0.5
            count = 0
            for start in range(0, vocab, BLOCK):
                idx = start + offs
                x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32) * inv_t
                count += tl.sum((x >= mid).to(tl.int32), axis=0)
            ok = count >= top_k
            a = tl.where(ok, mid, a)
            b = tl.where(ok, b, mid)
        thr = tl.maximum(thr, a)
    top_p = tl.load(top_p_ptr + row)
    if top_p < 1.0:
        # over the tokens top-k kept, renormalised: the largest t whose kept
        # mass sum(p[x >= t]) / sum(p[x >= thr]) is still >= top_p
        kept_z = 0.0
        for start in range(0, vocab, BLOCK):
            idx = start + offs
            x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32) * inv_t
            kept_z += tl.sum(tl.where(x >= thr, tl.exp(x - hi), 0.0), axis=0)
        a = thr
        b = hi
        for _ in range(STEPS):
            mid = (a + b) * 0.5
            mass = 0.0
            for start in range(0, vocab, BLOCK):
                idx = start + offs
                x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32) * inv_t
                mass += tl.sum(tl.where(x >= mid, tl.exp(x - hi), 0.0), axis=0)
            ok = mass >= top_p * kept_z
            a = tl.where(ok, mid, a)
            b = tl.where(ok, b, mid)
        thr = tl.maximum(thr, a)
    min_p = tl.load(min_p_ptr + row)
    if min_p > 0.0:
        thr = tl.maximum(thr, hi + tl.log(min_p))
    thr = tl.minimum(thr, hi)  # the best token is always kept

    # the race over kept tokens (greedy: plain argmax)
    seed = tl.load(seed_ptr + row)
    step = tl.load(step_ptr + row)
    best = float("-inf")
    best_idx = 0
    best_x = float("-inf")
    for start in range(0, vocab, BLOCK):
        idx = start + offs
        inside = idx < vocab
        x = tl.load(base + idx, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
        u = tl.rand(seed, ((step * vocab + idx) % 2147483647).to(tl.int32))
        u = tl.minimum(tl.maximum(u, 1e-10), 1.0 - 1e-7)
        gumbel = -tl.log(-tl.log(u))
        score = tl.where(greedy, x, x + gumbel)
        score = tl.where(inside & (x >= thr), score, float("-inf"))
        block_best = tl.max(score, axis=0)
        block_idx = tl.argmax(score, axis=0)
        take = block_best > best
        best_idx = tl.where(take, start + block_idx, best_idx)
        best_x = tl.where(take, tl.max(tl.where(offs == block_idx, x, float("-inf")), axis=0), best_x)
        best = tl.maximum(best, block_best)
    tl.store(token_ptr + row, best_idx)  # stored as int64 (the pointer's type)
    tl.store(logprob_ptr + row, best_x - log_z)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V); per-row temperature/top_p/min_p float32, top_k int32,
    seeds/steps int64 -> (token ids (B,) int64, their logprobs (B,) float32)."""
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    rows, vocab = logits.shape
    for name, t, dt in (
        ("temperature", temperature, torch.float32),
        ("top_p", top_p, torch.float32),
        ("min_p", min_p, torch.float32),
        ("top_k", top_k, torch.int32),
        ("seeds", seeds, torch.int64),
        ("steps", steps, torch.int64),
    ):
        check_tensor(name, t, ndim=1, dtypes=(dt,))
        need(
            t.shape[0] == rows,
            f"{name} {tuple(t.shape)} needs one entry per row of logits {tuple(logits.shape)}",
        )
    same_device(logits=logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seeds=seeds)
    need(vocab > 0, f"logits {tuple(logits.shape)} has no columns")
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _sample_kernel[(rows,)](
            logits,
            temperature,
            top_k,
            top_p,
            min_p,
            seeds,
            steps,
            tokens,
            logprobs,
            vocab,
            BLOCK=min(4096, triton.next_power_of_2(vocab)),
            STEPS=BISECTION_STEPS,
        )
    return tokens, logprobs
