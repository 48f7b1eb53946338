"""Each Triton kernel against its torch reference (reference.py).

Here (no GPU) they run under Triton's interpreter in fp32 and fp16 on CPU
tensors (tests/conftest.py sets TRITON_INTERPRET=1 before Triton loads);
the interpreter's bf16 arithmetic is wrong, so bf16 runs only on a GPU
(marker `gpu`, `pytest -m gpu`), where the same tests run on CUDA tensors.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from mistralrs_kernels import reference as ref
from mistralrs_kernels import triton_ops as ops

ON_GPU = os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
# (atol, rtol) per dtype: the kernels compute in fp32 and round once at the end
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), atol=atol * scale, rtol=rtol * scale)


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "n"), [(1, 576), (7, 37), (3, 1024), (2, 1)])
def test_rms_norm(dtype: torch.dtype, rows: int, n: int) -> None:
    x, w = randn(rows, n, dtype=dtype, seed=1), randn(n, dtype=dtype, seed=2)
    close(ops.rms_norm(x, w, 1e-5), ref.rms_norm(x.cpu(), w.cpu(), 1e-5), dtype)
    res = randn(rows, n, dtype=dtype, seed=3)
    out, h = ops.rms_norm(x, w, 1e-6, residual=res)
    want_out, want_h = ref.rms_norm_residual(x.cpu(), res.cpu(), w.cpu(), 1e-6)
    close(out, want_out, dtype)
    close(h, want_h, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_rms_norm_same_dtype_fast_path_is_exact(dtype: torch.dtype) -> None:
    """reference.rms_norm skips the upcast when x and weight share a dtype: same bits."""
    x, w = randn(33, 576, dtype=dtype, seed=11).cpu(), (1 + 0.1 * randn(576, seed=12)).to(dtype).cpu()
    upcast = torch.nn.functional.rms_norm(x.float(), (576,), w.float(), 1e-5).to(dtype)
    assert torch.equal(ref.rms_norm(x, w, 1e-5), upcast)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize(("tokens", "heads", "d"), [(1, 1, 64), (5, 9, 64), (3, 7, 10), (2, 3, 128)])
def test_rope(dtype: torch.dtype, neox: bool, tokens: int, heads: int, d: int) -> None:
    x = randn(tokens, heads, d, dtype=dtype, seed=4)
    max_pos = 50
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    angles = torch.arange(max_pos).float()[:, None] * inv[None, :]
    cache = torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype).to(DEVICE)
    positions = torch.tensor([(7 * i + 3) % max_pos for i in range(tokens)], device=DEVICE)
    got = ops.rope(x, positions, cache, neox=neox)
    close(got, ref.rope(x.cpu(), positions.cpu(), cache.cpu(), neox=neox), dtype)


def test_rope_neox_matches_the_models_rope() -> None:
    """The kernel's neox layout is the one the CPU model uses (reference.rope_neox)."""
    x = randn(4, 3, 8, seed=5)
    angles = torch.arange(4).float()[:, None] * torch.tensor([1.0, 0.5, 0.25, 0.125])[None, :]
    cache = torch.cat((angles.cos(), angles.sin()), dim=-1).to(DEVICE)
    want = ref.rope_neox(x.cpu(), angles.cos()[:, None, :], angles.sin()[:, None, :])
    close(ops.rope(x, torch.arange(4, device=DEVICE), cache), want, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3072), (5, 2 * 1537), (2, 3, 8)])
def test_silu_mul(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = randn(*shape, dtype=dtype, seed=6)
    close(ops.silu_mul(x), ref.silu_mul(x.cpu().float()).to(dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv(dtype: torch.dtype) -> None:
    blocks, bs, kv, d = 6, 4, 3, 16
    k, v = randn(7, kv, d, dtype=dtype, seed=7), randn(7, kv, d, dtype=dtype, seed=8)
    slots = torch.tensor([0, 3, 4, -1, 23, 9, -1], device=DEVICE)  # block edges, padding, the last slot
    caches = [torch.full((blocks, bs, kv, d), 7.0, dtype=dtype, device=DEVICE) for _ in range(4)]
    ops.store_kv(k, v, caches[0], caches[1], slots)
    want_k, want_v = caches[2].cpu(), caches[3].cpu()
    ref.store_kv(k.cpu(), v.cpu(), want_k, want_v, slots.cpu())
    assert torch.equal(caches[0].cpu(), want_k) and torch.equal(caches[1].cpu(), want_v)


def paged_case(
    dtype: torch.dtype, heads: int, kv_heads: int, d: int, block_size: int, contexts: list[int], seed: int
) -> tuple[torch.Tensor, ...]:
    max_blocks = max(-(-c // block_size) for c in contexts) + 1
    num_blocks = max_blocks * len(contexts) + 2
    k_cache = randn(num_blocks, block_size, kv_heads, d, dtype=dtype, seed=seed)
    v_cache = randn(num_blocks, block_size, kv_heads, d, dtype=dtype, seed=seed + 1)
    q = randn(len(contexts), heads, d, dtype=dtype, seed=seed + 2)
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    tables = torch.zeros(len(contexts), max_blocks, dtype=torch.int32)
    used = 0
    for s, c in enumerate(contexts):
        n = -(-c // block_size)
        tables[s, :n] = perm[used : used + n]
        used += n
    return q, k_cache, v_cache, tables.to(DEVICE), torch.tensor(contexts, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "d", "block_size", "contexts", "partition"),
    [
        (9, 3, 64, 16, [1], None),  # batch 1, one position, partition size picked for the device
        (9, 3, 64, 16, [15, 16, 17, 32, 33], 512),  # block boundary +-1, full and partial blocks
        (7, 7, 48, 8, [100, 3], 32),  # prime heads, head_dim not a power of 2, split into partitions
        (4, 1, 64, 16, [97, 64, 1], 64),  # MQA, partitions exactly full and nearly empty
    ],
)
def test_paged_decode_attention(
    dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    d: int,
    block_size: int,
    contexts: list[int],
    partition: int | None,
) -> None:
    q, k_cache, v_cache, tables, ctxs = paged_case(
        dtype, heads, kv_heads, d, block_size, contexts, seed=len(contexts)
    )
    scale = d**-0.5
    got = ops.paged_decode_attention(q, k_cache, v_cache, tables, ctxs, scale, partition_size=partition)
    want = ref.paged_decode_attention(q.cpu(), k_cache.cpu(), v_cache.cpu(), tables.cpu(), ctxs.cpu(), scale)
    close(got, want, dtype, scale=5.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "d", "block_size", "seqs"),
    [
        (4, 2, 64, 16, [(17, 17)]),  # one fresh prefill, block boundary + 1
        (9, 3, 64, 16, [(16, 40), (1, 33), (5, 5), (1, 1)]),  # cached prefix, decodes and a prefill mixed
        (7, 7, 48, 8, [(13, 13), (31, 97)]),  # prime heads and lengths, head_dim not a power of 2
        (4, 1, 32, 16, [(33, 33), (2, 64)]),  # MQA; query rows past one BLOCK_M
    ],
)
def test_paged_prefill_attention(
    dtype: torch.dtype, heads: int, kv_heads: int, d: int, block_size: int, seqs: list[tuple[int, int]]
) -> None:
    """seqs: (query rows, context length) per sequence; two padding rows at the end."""
    contexts = [c for _, c in seqs]
    _, k_cache, v_cache, tables, ctxs = paged_case(
        dtype, heads, kv_heads, d, block_size, contexts, seed=len(seqs)
    )
    q_lens = [n for n, _ in seqs]
    cu = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=DEVICE)
    q = randn(sum(q_lens) + 2, heads, d, dtype=dtype, seed=5)
    scale = d**-0.5
    got = ops.paged_prefill_attention(q, k_cache, v_cache, tables, cu, ctxs, scale, max_query_len=max(q_lens))
    want = ref.paged_prefill_attention(
        q.cpu(), k_cache.cpu(), v_cache.cpu(), tables.cpu(), cu.cpu(), ctxs.cpu(), scale
    )
    close(got, want, dtype, scale=5.0)
    assert not got[-2:].any()  # padding rows untouched
    decodes = [i for i, (n, _) in enumerate(seqs) if n == 1]
    if decodes:  # a decode row equals the decode kernel's answer
        rows = torch.tensor([cu[i].item() for i in decodes], device=DEVICE)
        dec = ops.paged_decode_attention(
            q.index_select(0, rows).contiguous(), k_cache, v_cache, tables[decodes], ctxs[decodes], scale
        )
        close(got.index_select(0, rows), dec.cpu(), dtype, scale=5.0)


def test_paged_prefill_attention_rejects_bad_arguments() -> None:
    _, k_cache, v_cache, tables, ctxs = paged_case(torch.float32, 4, 2, 16, 16, [5], seed=1)
    q = randn(5, 4, 16)
    cu = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="cu_query_lens"):
        ops.paged_prefill_attention(q, k_cache, v_cache, tables, cu[:1], ctxs, 1.0, max_query_len=5)
    with pytest.raises(ValueError, match="multiple"):
        ops.paged_prefill_attention(randn(5, 3, 16), k_cache, v_cache, tables, cu, ctxs, 1.0, max_query_len=5)
    with pytest.raises(ValueError, match="dtype"):
        ops.paged_prefill_attention(q.half(), k_cache, v_cache, tables, cu, ctxs, 1.0, max_query_len=5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [31, 32, 33, 1000])
def test_apply_token_bitmask(dtype: torch.dtype, vocab: int) -> None:
    rows = 3
    gen = torch.Generator().manual_seed(vocab)
    allowed = torch.rand(rows, vocab, generator=gen) < 0.4
    allowed[0] = True  # all allowed
    words = (vocab + 31) // 32
    bits = torch.zeros(rows, words * 32, dtype=torch.int64)
    bits[:, :vocab] = allowed.long()
    packed = (bits.view(rows, words, 32) << torch.arange(32)).sum(-1)
    bitmask = packed.where(packed < 2**31, packed - 2**32).to(torch.int32)  # u32 bits in i32
    logits = randn(rows, vocab, dtype=dtype, seed=9)
    want = logits.cpu().clone()
    ref.apply_token_bitmask(want, bitmask)
    ops.apply_token_bitmask(logits, bitmask.to(DEVICE))
    assert torch.equal(logits.cpu(), want)
    assert torch.isinf(want[~allowed]).all() and not torch.isinf(want[allowed]).any()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: ops.rms_norm(randn(2, 4), randn(5), 1e-5), "differ in N"),
        (lambda: ops.rms_norm(randn(2, 4).t(), randn(2), 1e-5), "contiguous"),
        (lambda: ops.rms_norm(randn(2, 4), randn(4), 0.0), "eps"),
        (lambda: ops.silu_mul(randn(2, 5)), "even"),
        (lambda: ops.rope(randn(2, 3, 8), torch.tensor([0, 99], device=DEVICE), randn(10, 8)), "positions"),
        (
            lambda: ops.rope(randn(2, 3, 8), torch.tensor([0], device=DEVICE), randn(10, 8)),
            "one entry per token",
        ),
        (
            lambda: ops.store_kv(
                randn(2, 1, 4),
                randn(2, 1, 4),
                randn(2, 2, 1, 4),
                randn(2, 2, 1, 4),
                torch.tensor([0, 4], device=DEVICE),
            ),
            "slot_mapping",
        ),
        (
            lambda: ops.paged_decode_attention(
                randn(1, 3, 8),
                randn(2, 4, 2, 8),
                randn(2, 4, 2, 8),
                torch.zeros(1, 2, dtype=torch.int32, device=DEVICE),
                torch.tensor([3], device=DEVICE),
                1.0,
            ),
            "multiple",
        ),
        (
            lambda: ops.paged_decode_attention(
                randn(1, 2, 8),
                randn(2, 4, 2, 8),
                randn(2, 4, 2, 8),
                torch.zeros(1, 2, dtype=torch.int32, device=DEVICE),
                torch.tensor([9], device=DEVICE),
                1.0,
            ),
            "blocks",
        ),
        (
            lambda: ops.paged_decode_attention(
                randn(1, 2, 8),
                randn(2, 3, 2, 8),
                randn(2, 3, 2, 8),
                torch.zeros(1, 2, dtype=torch.int32, device=DEVICE),
                torch.tensor([3], device=DEVICE),
                1.0,
            ),
            "power of 2",
        ),
        (
            lambda: ops.apply_token_bitmask(
                randn(2, 40), torch.zeros(2, 1, dtype=torch.int32, device=DEVICE)
            ),
            "bitmask",
        ),
    ],
)
def test_launchers_reject_bad_arguments(call, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("vocab", [7, 1024, 1025])
def test_apply_penalties_matches_the_sampler_order(vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    prompts, outputs = [ids(5), [], ids(40), ids(1)], [ids(9), ids(3), [], []]
    biases = [{0: 2.5, vocab - 1: -100.0}, {}, {3 % vocab: 1.0}, {}]
    rep, pres, freq = [1.3, 1.0, 0.7, 2.0], [0.5, -0.4, 0.0, 1.0], [0.25, 1.5, 0.0, -0.5]
    logits = randn(4, vocab, seed=3).float()
    want = logits.cpu().clone()
    ref.apply_penalties(want, prompts, outputs, biases, rep, pres, freq)
    counts, seen, bias = ops.penalty_tensors(prompts, outputs, biases, vocab, torch.device(DEVICE))

    def col(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=DEVICE)

    ops.apply_penalties(logits, counts, seen, bias, col(rep), col(pres), col(freq))
    close(logits.cpu(), want, torch.float32)


def test_apply_penalties_rejects_bad_arguments() -> None:
    logits = randn(2, 8).float()
    ok = ops.penalty_tensors([[1], [2]], [[3], []], [{}, {}], 8, torch.device(DEVICE))
    col = torch.ones(2, device=DEVICE)
    with pytest.raises(ValueError, match="output_counts"):
        ops.apply_penalties(logits, ok[0][:, :4], ok[1], ok[2], col, col, col)
    with pytest.raises(ValueError, match="repetition"):
        ops.apply_penalties(logits, *ok, torch.ones(3, device=DEVICE), col, col)
    with pytest.raises(ValueError, match="logits"):
        ops.apply_penalties(logits.half(), *ok, col, col, col)


@pytest.mark.gpu
def test_gpu_is_used() -> None:
    """Under -m gpu: the kernels above ran compiled on CUDA, bf16 included."""
    assert ON_GPU and torch.bfloat16 in DTYPES


def sample_args(rows: int, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):  # type: ignore[no-untyped-def]
    def full(value: float | int, dtype: torch.dtype) -> torch.Tensor:
        return torch.full((rows,), value, dtype=dtype, device=DEVICE)

    return (
        full(temperature, torch.float32),
        full(top_k, torch.int32),
        full(top_p, torch.float32),
        full(min_p, torch.float32),
        torch.arange(rows, dtype=torch.int64, device=DEVICE) * 7919 + 1,  # a seed per row
        torch.zeros(rows, dtype=torch.int64, device=DEVICE),
    )


@pytest.mark.parametrize("vocab", [7, 50, 300])
def test_sample_greedy_is_argmax_with_its_logprob(vocab: int) -> None:
    logits = randn(5, vocab, seed=vocab) * 3
    tokens, logprobs = ops.sample(logits, *sample_args(5, 0.0, top_k=3, top_p=0.5))
    want = logits.cpu().argmax(-1)
    assert torch.equal(tokens.cpu(), want)
    lsm = torch.log_softmax(logits.cpu().float(), -1)
    close(logprobs, lsm.gather(1, want[:, None])[:, 0], torch.float32, scale=10)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "min_p"),
    [(1.0, 3, 1.0, 0.0), (1.5, 0, 0.8, 0.0), (1.3, 0, 1.0, 0.3), (1.0, 5, 0.7, 0.05)],
)
def test_sample_never_draws_a_truncated_token(
    temperature: float, top_k: int, top_p: float, min_p: float
) -> None:
    rows, vocab = 64, 24
    row = randn(vocab, seed=5) * 2
    logits = row.expand(rows, vocab).contiguous()
    tokens, logprobs = ops.sample(logits, *sample_args(rows, temperature, top_k, top_p, min_p))
    probs = ref.sample_probs(row.cpu(), temperature, top_k, top_p, min_p)
    assert (probs[tokens.cpu()] > 0).all()
    if probs.sort(descending=True).values[1] > 0.1:
        assert len(set(tokens.tolist())) > 1  # it does sample
    lsm = torch.log_softmax(row.cpu().float() / temperature, -1)
    close(logprobs, lsm[tokens.cpu()], torch.float32, scale=10)


def test_sample_frequencies_match_the_distribution() -> None:
    """256 seeds of one row (temperature 0.7, top-p 0.9): frequencies within 5 sigma of the probabilities."""
    rows, vocab = 256, 6
    row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -3.0], device=DEVICE)
    probs = ref.sample_probs(row.cpu(), 0.7, top_p=0.9)
    tokens, _ = ops.sample(row.expand(rows, vocab).contiguous(), *sample_args(rows, 0.7, top_p=0.9))
    freq = torch.bincount(tokens.cpu(), minlength=vocab).float() / rows
    sigma = (probs * (1 - probs) / rows).sqrt()
    assert ((freq - probs).abs() <= 5 * sigma + 1e-6).all(), (freq, probs)
    assert freq[probs == 0].sum() == 0


def test_sample_is_reproducible_and_batch_independent() -> None:
    logits = randn(6, 40, seed=8)
    args = sample_args(6, 1.0)
    a, _ = ops.sample(logits, *args)
    b, _ = ops.sample(logits, *args)
    assert torch.equal(a, b)
    c, _ = ops.sample(logits[2:3].contiguous(), *(t[2:3].contiguous() for t in args))
    assert c.item() == a[2].item()  # a row's draw depends on its seed and step only
    later = list(args)
    later[5] = later[5] + 1
    d, _ = ops.sample(logits, *later)
    assert not torch.equal(a, d)  # the next step draws anew


def test_sample_rejects_bad_arguments() -> None:
    logits = randn(2, 10)
    args = list(sample_args(2, 1.0))
    with pytest.raises(ValueError, match="top_k"):
        ops.sample(logits, args[0], args[1].long(), *args[2:])
    with pytest.raises(ValueError, match="one entry per row"):
        ops.sample(logits, args[0][:1], *args[1:])
