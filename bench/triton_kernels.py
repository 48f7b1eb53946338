"""The Triton kernels on a CUDA GPU: each against torch eager doing the same
work, with achieved GB/s; paged decode attention also against torch SDPA
over gathered KV (the bar: at least as fast).

    python bench/triton_kernels.py            # needs CUDA (ci/gpu_check.sh runs it on a lent GPU)

One JSON line per kernel and shape.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

DEV, DT = "cuda", torch.bfloat16


def bench_ms(fn: Callable[[], Any]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100))


def emit(
    kernel: str, triton_fn: Callable[[], Any], eager_fn: Callable[[], Any], nbytes: int, **shape: Any
) -> None:
    """Time both; GB/s counts the bytes the op must move once."""
    t, e = bench_ms(triton_fn), bench_ms(eager_fn)
    row = {"kernel": kernel, "device": torch.cuda.get_device_name(), **shape}
    row |= {"triton_ms": round(t, 4), "baseline_ms": round(e, 4), "speedup": round(e / t, 2)}
    row |= {"gb_s": round(nbytes / t / 1e6, 1)}
    print(json.dumps(row), flush=True)


def elementwise(tokens: int, hidden: int) -> None:
    from mistralrs_kernels import reference as ref
    from mistralrs_kernels import triton_ops as ops

    x = torch.randn(tokens, hidden, device=DEV, dtype=DT)
    res = torch.randn(tokens, hidden, device=DEV, dtype=DT)
    w = torch.randn(hidden, device=DEV, dtype=DT)
    emit(
        "rms_norm_residual",
        lambda: ops.rms_norm(x, w, 1e-5, residual=res),
        lambda: ref.rms_norm_residual(x, res, w, 1e-5),
        4 * x.numel() * 2,  # read x, residual; write out, h
        tokens=tokens,
        hidden=hidden,
    )
    gu = torch.randn(tokens, 2 * hidden, device=DEV, dtype=DT)
    emit(
        "silu_mul",
        lambda: ops.silu_mul(gu),
        lambda: ref.silu_mul(gu),
        3 * tokens * hidden * 2,
        tokens=tokens,
        hidden=hidden,
    )
    heads, d = hidden // 128, 128
    q = torch.randn(tokens, heads, d, device=DEV, dtype=DT)
    cache = torch.randn(8192, d, device=DEV, dtype=DT)
    pos = torch.randint(0, 8192, (tokens,), device=DEV)
    emit(
        "rope_neox",
        lambda: ops.rope(q, pos, cache, check_positions=False),
        lambda: ref.rope(q, pos, cache),
        2 * q.numel() * 2,
        tokens=tokens,
        heads=heads,
    )


def paged(batch: int, ctx: int) -> None:
    """GQA 32/8 heads, head_dim 128, block 16, shuffled tables: vs SDPA over gathered blocks."""
    from mistralrs_kernels import triton_ops as ops

    heads, kv, d, bs = 32, 8, 128, 16
    nb = batch * (ctx // bs)
    kc = torch.randn(nb, bs, kv, d, device=DEV, dtype=DT)
    vc = torch.randn_like(kc)
    q = torch.randn(batch, heads, d, device=DEV, dtype=DT)
    tables = torch.randperm(nb, device=DEV, dtype=torch.int32).view(batch, ctx // bs)
    ctxs = torch.full((batch,), ctx, device=DEV, dtype=torch.int32)
    scale = d**-0.5

    def gathered() -> torch.Tensor:
        k = kc[tables.long()].view(batch, -1, kv, d).transpose(1, 2)
        v = vc[tables.long()].view(batch, -1, kv, d).transpose(1, 2)
        return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=scale, enable_gqa=True)

    emit(
        "paged_decode_attention",
        lambda: ops.paged_decode_attention(q, kc, vc, tables, ctxs, scale, max_context_len=ctx),
        gathered,
        2 * batch * ctx * kv * d * 2,
        batch=batch,
        context=ctx,
        baseline="sdpa_over_gathered_kv",
    )


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench/triton_kernels.py needs a CUDA GPU")
    torch.manual_seed(0)
    for tokens, hidden in [(1, 2048), (256, 2048), (4096, 4096)]:
        elementwise(tokens, hidden)
    for batch, ctx in [(1, 4096), (1, 32768), (32, 1024), (64, 4096)]:
        paged(batch, ctx)


if __name__ == "__main__":
    main()
