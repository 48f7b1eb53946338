"""The Rust paged decode-attention kernel against torch SDPA over gathered keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mistralrs_kernels import reference as ref
from mistralrs_serve import _native


def run(q, k_cache, v_cache, tables, ctxs, scale):  # type: ignore[no-untyped-def]
    def bits(t):  # type: ignore[no-untyped-def]
        return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()

    out = torch.full_like(q, float("nan"))
    _native.paged_decode_attention(q.numpy(), bits(k_cache), bits(v_cache), tables, ctxs, scale, out.numpy())
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size", "contexts"),
    [
        (9, 3, 64, 16, [1, 15, 16, 17, 300]),  # SmolLM2 shapes, block edges, a split context
        (8, 8, 128, 16, [700, 3]),  # MHA, head_dim 128, > 16 blocks
        (7, 1, 48, 5, [1, 11, 24]),  # MQA, the portable (non-AVX-512-tile) path
        (4, 2, 64, 1, [9, 2]),  # block size 1
    ],
)
def test_matches_sdpa(dtype, heads, kv_heads, head_dim, block_size, contexts) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(sum(contexts))
    max_blocks = max(-(-c // block_size) for c in contexts)
    num_blocks = max_blocks * len(contexts) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(len(contexts), heads, head_dim, generator=gen) * 2
    perm = torch.randperm(num_blocks, generator=gen).numpy()
    tables = np.full((len(contexts), max_blocks + 2), -1, dtype=np.int64)  # spare columns unused
    used = 0
    for s, c in enumerate(contexts):
        n = -(-c // block_size)
        tables[s, :n] = perm[used : used + n]
        used += n
    ctxs = np.array(contexts, dtype=np.int64)
    scale = head_dim**-0.5
    got = run(q, k_cache, v_cache, tables, ctxs, scale)
    torch.testing.assert_close(
        got,
        ref.paged_decode_attention(
            q, k_cache, v_cache, torch.from_numpy(tables), torch.from_numpy(ctxs), scale
        ),
        atol=2e-5,
        rtol=1e-4,
    )


def _args(**overrides):  # type: ignore[no-untyped-def]
    args = {
        "q": np.zeros((1, 2, 4), np.float32),
        "k_cache": np.zeros((3, 2, 1, 4), np.float32),
        "v_cache": np.zeros((3, 2, 1, 4), np.float32),
        "block_tables": np.array([[0, 1]], np.int64),
        "context_lens": np.array([4], np.int64),
        "scale": 0.5,
        "out": np.zeros((1, 2, 4), np.float32),
    }
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"block_tables": np.array([[0, 3]], np.int64)}, ValueError, "block 3"),
        ({"block_tables": np.array([[0, -1]], np.int64)}, ValueError, "block -1"),
        ({"context_lens": np.array([0], np.int64)}, ValueError, "context length 0"),
        ({"context_lens": np.array([5], np.int64)}, ValueError, "3 blocks"),
        ({"context_lens": np.array([4, 4], np.int64)}, ValueError, "context lengths"),
        ({"q": np.zeros((1, 2, 4), np.float64)}, ValueError, "float32"),
        ({"q": [[0.0]]}, TypeError, "q must be"),
        ({"out": np.zeros((1, 2, 3), np.float32)}, ValueError, "out has"),
        ({"k_cache": np.zeros((3, 2, 1, 5), np.float32)}, ValueError, "head_dim"),
        ({"k_cache": np.zeros((3, 2, 1, 4), np.float64)}, ValueError, "k_cache must be"),
        ({"v_cache": np.zeros((2, 2, 1, 4), np.float32)}, ValueError, "whole blocks"),
        ({"v_cache": np.zeros((3, 2, 1, 4), np.int16)}, ValueError, "v_cache must be"),
        ({"k_cache": np.zeros((3, 2, 4), np.float32)}, ValueError, "4-D"),
        (
            {
                "q": np.zeros((1, 3, 4), np.float32),
                "out": np.zeros((1, 3, 4), np.float32),
                "k_cache": np.zeros((3, 2, 2, 4), np.float32),
                "v_cache": np.zeros((3, 2, 2, 4), np.float32),
            },
            ValueError,
            "multiple",
        ),
    ],
)
def test_bad_input_is_rejected(overrides, error, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        _native.paged_decode_attention(**_args(**overrides))
    _native.paged_decode_attention(**_args())  # still fine afterwards


def test_out_of_order_rows_and_fortran_out_rejected() -> None:
    out = np.zeros((4, 2, 1), np.float32).transpose(2, 1, 0)  # (1, 2, 4), not C-contiguous
    with pytest.raises(ValueError, match="out must be"):
        _native.paged_decode_attention(**_args(out=out))
