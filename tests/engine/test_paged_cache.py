"""PagedKVCache / PagedAttention against contiguous per-sequence attention."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from mistralrs_kernels import reference as ops
from mistralrs_serve.config import ModelConfig
from mistralrs_serve.engine.kv_cache import PagedKVCache
from mistralrs_serve.layers.attention import LayerAttention, PagedAttention

# "group" tuned to its two extremes, the baselines bench/paged_attention.py compares with:
# one SDPA call per sequence, and one call padded to the longest context
DECODE_MODES = {
    "native": {"decode_mode": "native"},
    "group": {"decode_mode": "group"},
    "pad": {"decode_mode": "group", "call_cost_tokens": 1 << 30, "max_call_bytes": 1 << 60},
    "loop": {"decode_mode": "group", "call_cost_tokens": -1},
}


def make_config(
    num_heads: int = 6, num_kv_heads: int = 2, head_dim: int = 16, num_layers: int = 3
) -> ModelConfig:
    return ModelConfig(
        architecture="llama",
        vocab_size=32,
        hidden_size=num_heads * head_dim,
        intermediate_size=64,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
    )


@dataclass
class Seq:
    context_len: int  # after the step
    query_len: int
    blocks: list[int]  # block table
    keys: torch.Tensor  # (num_layers, context_len, K, D), every position's k
    values: torch.Tensor


@dataclass
class Plan:
    query_lens: np.ndarray
    context_lens: np.ndarray
    slot_mapping: np.ndarray
    block_tables: np.ndarray


def setup_step(
    cache: PagedKVCache,
    specs: list[tuple[int, int]],
    rng: np.random.Generator,
    num_padding: int = 0,
    extra_columns: int = 1,
    consecutive: bool = False,
) -> tuple[list[Seq], Plan]:
    """Shuffled (or consecutive) block tables for (context_len, query_len)
    specs; the cached prefix of each sequence is written into the cache directly."""
    cfg, bs = cache.config, cache.block_size
    needed = [-(-c // bs) for c, _ in specs]
    assert sum(needed) <= cache.num_blocks
    pool = np.arange(cache.num_blocks) if consecutive else rng.permutation(cache.num_blocks)
    seqs, offset = [], 0
    for (ctx, q_len), nb in zip(specs, needed, strict=True):
        blocks = [int(b) for b in pool[offset : offset + nb]]
        offset += nb
        shape = (cfg.num_layers, ctx, cfg.num_kv_heads, cfg.head_dim)
        seq = Seq(ctx, q_len, blocks, torch.randn(shape), torch.randn(shape))
        cached = ctx - q_len
        slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(cached)], dtype=torch.long)
        for layer in range(cfg.num_layers):
            cache.k[layer].view(-1, cfg.num_kv_heads, cfg.head_dim)[slots] = seq.keys[layer, :cached]
            cache.v[layer].view(-1, cfg.num_kv_heads, cfg.head_dim)[slots] = seq.values[layer, :cached]
        seqs.append(seq)
    width = max(needed) + extra_columns
    tables = np.full((len(specs), width), -1, dtype=np.int32)
    slot_mapping = []
    for i, s in enumerate(seqs):
        tables[i, : len(s.blocks)] = s.blocks
        slot_mapping += [
            s.blocks[p // bs] * bs + p % bs for p in range(s.context_len - s.query_len, s.context_len)
        ]
    slot_mapping += [-1] * num_padding
    plan = Plan(
        np.array([q for _, q in specs], dtype=np.int32),
        np.array([c for c, _ in specs], dtype=np.int32),
        np.array(slot_mapping, dtype=np.int64),
        tables,
    )
    return seqs, plan


def step_tensors(
    cfg: ModelConfig, seqs: list[Seq], layer: int, num_padding: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_tokens = sum(s.query_len for s in seqs) + num_padding
    q = torch.randn(num_tokens, cfg.num_heads, cfg.head_dim, generator=gen)
    pad = torch.randn(num_padding, cfg.num_kv_heads, cfg.head_dim, generator=gen)
    k = torch.cat([s.keys[layer, s.context_len - s.query_len :] for s in seqs] + [pad])
    v = torch.cat([s.values[layer, s.context_len - s.query_len :] for s in seqs] + [pad])
    return q, k, v


def reference(q: torch.Tensor, seqs: list[Seq], layer: int) -> torch.Tensor:
    """Contiguous per-sequence causal attention; padding rows are zero."""
    out = torch.zeros(q.shape[0], q.shape[1] * q.shape[2])
    row = 0
    for s in seqs:
        q_s = q[row : row + s.query_len].float().transpose(0, 1)
        o = ops.attention(
            q_s,
            s.keys[layer].transpose(0, 1),
            s.values[layer].transpose(0, 1),
            s.context_len - s.query_len,
        )
        out[row : row + s.query_len] = o.transpose(0, 1).reshape(s.query_len, -1)
        row += s.query_len
    return out


def run_and_check(
    cfg: ModelConfig,
    block_size: int,
    specs: list[tuple[int, int]],
    seed: int = 0,
    num_padding: int = 0,
    decode_mode: str = "group",
    q_dtype: torch.dtype = torch.float32,
    atol: float = 1e-5,
    consecutive: bool = False,
    **attn_kwargs: int,
) -> PagedAttention:
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // block_size) for c, _ in specs) + 5
    cache = PagedKVCache(cfg, num_blocks, block_size, torch.float32)
    seqs, plan = setup_step(cache, specs, rng, num_padding, consecutive=consecutive)
    attn = PagedAttention(
        cache,
        plan.query_lens,
        plan.context_lens,
        plan.slot_mapping,
        plan.block_tables,
        **{**DECODE_MODES[decode_mode], **attn_kwargs},  # type: ignore[arg-type]
    )
    for layer in range(cfg.num_layers):
        q, k, v = step_tensors(cfg, seqs, layer, num_padding, gen)
        q, k, v = q.to(q_dtype), k.to(q_dtype), v.to(q_dtype)
        if q_dtype != torch.float32:
            # the reference sees what the cache stores: the step's k/v rounded
            for s in seqs:
                new = slice(s.context_len - s.query_len, s.context_len)
                s.keys[layer, new] = s.keys[layer, new].to(q_dtype).float()
                s.values[layer, new] = s.values[layer, new].to(q_dtype).float()
        out = attn.attend(layer, q, k, v)
        assert out.dtype == q_dtype
        assert out.shape == (q.shape[0], cfg.num_heads * cfg.head_dim)
        expected = reference(q, seqs, layer)
        torch.testing.assert_close(out.float(), expected, atol=atol, rtol=atol if atol > 1e-4 else 1e-5)
        # the step's keys/values landed in the cache where the table says
        kv, d = cfg.num_kv_heads, cfg.head_dim
        for s in seqs:
            slots = torch.tensor(
                [s.blocks[p // block_size] * block_size + p % block_size for p in range(s.context_len)]
            )
            torch.testing.assert_close(cache.k[layer].view(-1, kv, d)[slots], s.keys[layer], atol=0, rtol=0)
            torch.testing.assert_close(cache.v[layer].view(-1, kv, d)[slots], s.values[layer], atol=0, rtol=0)
    return attn


def mixed_specs(bs: int) -> list[tuple[int, int]]:
    """(context_len, query_len): prefills from 0 and mid-sequence, decodes around block boundaries."""
    return [
        (bs + 1, 1),  # decode, one past a boundary
        (23, 23),  # prefill chunk from position 0
        (bs, 1),  # decode exactly at a boundary
        (3 * bs + 5, 7),  # prefill chunk mid-sequence
        (bs - 1 if bs > 1 else 1, 1),  # decode one short of a boundary (bs 1: first token)
        (2 * bs + 1, 1),
        (2 * bs + 1, 1),  # equal contexts
        (1, 1),  # a one-token prompt
        (4 * bs, 2 * bs),  # mid-sequence chunk ending on a boundary
        (90, 1),
        (5, 5),
        (bs + 2, bs + 1),  # chunk starting at position 1
    ]


@pytest.mark.parametrize("block_size", [1, 16, 7])
@pytest.mark.parametrize("decode_mode", ["native", "group", "pad", "loop"])
def test_mixed_batch_matches_reference(block_size: int, decode_mode: str) -> None:
    run_and_check(
        make_config(), block_size, mixed_specs(block_size), seed=block_size, decode_mode=decode_mode
    )


@pytest.mark.parametrize("block_size", [1, 16, 7])
def test_consecutive_block_tables(block_size: int) -> None:
    specs = [*mixed_specs(block_size), (300, 1), (200, 1), (130, 40)]
    run_and_check(make_config(), block_size, specs, seed=4, consecutive=True)


def test_decode_grouping_limits() -> None:
    """Groups split where padding would cost more than a call, and where the
    gathered k/v would exceed max_call_bytes; rows come back in order."""
    cfg = make_config()
    contexts = [100, 40, 97, 45, 300, 99, 41, 98]
    specs = [(c, 1) for c in contexts]
    attn = run_and_check(cfg, 16, specs, seed=7, call_cost_tokens=8)
    assert sorted(sorted(g.length for _ in range(g.num_seqs)) for g in attn.decode_groups) == [
        [45, 45, 45],
        [100, 100, 100, 100],
        [300],
    ]
    # one position of k+v is 2 * 2 heads * 16 dims * 4 bytes = 256 B: at most 200 positions a call
    attn = run_and_check(cfg, 16, specs, seed=7, call_cost_tokens=8, max_call_bytes=256 * 200)
    assert sorted(g.num_seqs for g in attn.decode_groups) == [1, 2, 2, 3]
    # mixed with prefills and padding, so the groups' rows are scattered
    specs = [(c, 1) if i % 2 else (c, 5) for i, c in enumerate(contexts)] + [(77, 1), (78, 1)]
    run_and_check(cfg, 16, specs, seed=8, num_padding=2, call_cost_tokens=8, max_call_bytes=256 * 200)


@pytest.mark.parametrize("heads", [(6, 2), (4, 4), (9, 3)])
def test_head_layouts(heads: tuple[int, int]) -> None:
    cfg = make_config(num_heads=heads[0], num_kv_heads=heads[1], head_dim=64 if heads == (9, 3) else 8)
    run_and_check(cfg, 16, mixed_specs(16), seed=3)


def test_padding_rows_are_zero_and_unwritten() -> None:
    cfg = make_config()
    run_and_check(cfg, 16, [(40, 1), (17, 17), (33, 1)], num_padding=3)

    cache = PagedKVCache(cfg, 8, 4, torch.float32)
    cache.kv.fill_(7.0)
    tables = np.array([[5, 2, -1]], dtype=np.int32)
    slots = np.array([5 * 4 + 0, 5 * 4 + 1, 5 * 4 + 2, -1, -1], dtype=np.int64)
    attn = PagedAttention(cache, np.array([3]), np.array([3]), slots, tables)
    q = torch.randn(5, cfg.num_heads, cfg.head_dim)
    k = torch.randn(5, cfg.num_kv_heads, cfg.head_dim)
    v = torch.randn(5, cfg.num_kv_heads, cfg.head_dim)
    out = attn.attend(1, q, k, v)
    assert out[3:].abs().max() == 0
    k_flat = cache.k[1].view(-1, cfg.num_kv_heads, cfg.head_dim)
    torch.testing.assert_close(k_flat[20:23], k[:3])
    written = torch.zeros(cache.num_blocks * 4, dtype=torch.bool)
    written[20:23] = True
    assert (k_flat[~written] == 7.0).all()  # padding rows went nowhere
    assert (cache.v[1].view(-1, cfg.num_kv_heads, cfg.head_dim)[~written] == 7.0).all()
    assert (cache.kv[:, [0, 2]] == 7.0).all()  # other layers untouched


def test_decode_only_batches() -> None:
    cfg = make_config()
    rng = np.random.default_rng(1)
    contexts = [int(c) for c in rng.integers(1, 200, size=20)]
    for mode in ("native", "group", "pad", "loop"):
        run_and_check(cfg, 16, [(c, 1) for c in contexts], seed=5, decode_mode=mode)
        run_and_check(cfg, 16, [(64, 1)] * 5, seed=6, decode_mode=mode)  # one unmasked group, direct path


def test_bf16_inputs_fp32_cache() -> None:
    run_and_check(make_config(), 16, mixed_specs(16), seed=2, q_dtype=torch.bfloat16, atol=2e-2)


def test_multi_step_prefill_then_decode() -> None:
    """Chunked prefill then decodes, each step's k/v read back by later steps."""
    cfg = make_config(num_layers=2)
    bs, gen = 16, torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    cache = PagedKVCache(cfg, 40, bs, torch.float32)
    prompt_lens, total = [37, 5, 64], 96
    pool = [int(b) for b in rng.permutation(40)]
    tables = np.full((3, 8), -1, dtype=np.int32)
    for i in range(3):
        tables[i, :6] = pool[6 * i : 6 * i + 6]
    keys = torch.randn(cfg.num_layers, 3, total, cfg.num_kv_heads, cfg.head_dim, generator=gen)
    values = torch.randn(cfg.num_layers, 3, total, cfg.num_kv_heads, cfg.head_dim, generator=gen)
    done = [0, 0, 0]
    for _ in range(20):
        # prefill in 24-token chunks, then decode one token a step
        q_lens = [min(24, prompt_lens[i] - done[i]) if done[i] < prompt_lens[i] else 1 for i in range(3)]
        ctxs = [done[i] + q_lens[i] for i in range(3)]
        slots = [int(tables[i, p // bs]) * bs + p % bs for i in range(3) for p in range(done[i], ctxs[i])]
        attn = PagedAttention(cache, np.array(q_lens), np.array(ctxs), np.array(slots), tables)
        for layer in range(cfg.num_layers):
            q = torch.randn(sum(q_lens), cfg.num_heads, cfg.head_dim, generator=gen)
            k = torch.cat([keys[layer, i, done[i] : ctxs[i]] for i in range(3)])
            v = torch.cat([values[layer, i, done[i] : ctxs[i]] for i in range(3)])
            with torch.inference_mode():  # as the model calls it
                out = attn.attend(layer, q, k, v)
            row = 0
            for i in range(3):
                q_s = q[row : row + q_lens[i]].transpose(0, 1)
                k_s = keys[layer, i, : ctxs[i]].transpose(0, 1)
                v_s = values[layer, i, : ctxs[i]].transpose(0, 1)
                expected = ops.attention(q_s, k_s, v_s, done[i]).transpose(0, 1).reshape(q_lens[i], -1)
                torch.testing.assert_close(out[row : row + q_lens[i]], expected, atol=1e-5, rtol=1e-5)
                row += q_lens[i]
        done = ctxs


def test_copy_blocks_copies_every_layer() -> None:
    cfg = make_config()
    cache = PagedKVCache(cfg, 6, 4, torch.float32)
    cache.kv.copy_(torch.randn(cache.kv.shape))
    before = cache.kv.clone()
    # 1 -> 3 and a swap 0 <-> 5: sources are read before destinations are written
    cache.copy_blocks(np.array([[1, 3], [0, 5], [5, 0]]))
    for layer in range(cfg.num_layers):
        for t_after, t_before in ((cache.k, before[0]), (cache.v, before[1])):
            assert torch.equal(t_after[layer, 3], t_before[layer, 1])
            assert torch.equal(t_after[layer, 5], t_before[layer, 0])
            assert torch.equal(t_after[layer, 0], t_before[layer, 5])
            for b in (1, 2, 4):
                assert torch.equal(t_after[layer, b], t_before[layer, b])
    cache.copy_blocks(np.zeros((0, 2), dtype=np.int64))  # no-op
    with pytest.raises(ValueError):
        cache.copy_blocks(np.array([[0, 6]]))
    with pytest.raises(ValueError):
        cache.copy_blocks(np.array([[0, 2], [1, 2]]))


def test_layout_and_budget() -> None:
    cfg = make_config(num_heads=9, num_kv_heads=3, head_dim=64, num_layers=30)  # SmolLM2 shapes
    per_block = PagedKVCache.bytes_per_block(cfg, 16, torch.float32)
    assert per_block == 2 * 30 * 16 * 3 * 64 * 4  # 737,280 bytes
    assert PagedKVCache.bytes_per_block(cfg, 16, torch.bfloat16) == per_block // 2
    assert PagedKVCache.num_blocks_for_budget(cfg, 16, torch.float32, 1 << 30) == (1 << 30) // per_block
    assert PagedKVCache.num_blocks_for_budget(cfg, 16, torch.float32, per_block - 1) == 0
    assert PagedKVCache.num_blocks_for_budget(cfg, 16, torch.float32, 3 * per_block) == 3
    cache = PagedKVCache(make_config(), 10, 16, torch.float32)
    assert cache.kv.numel() * 4 == 10 * PagedKVCache.bytes_per_block(make_config(), 16, torch.float32)
    for layer in range(3):
        assert cache.k[layer].shape == (10, 16, 2, 16) and cache.k[layer].is_contiguous()
        assert cache.v[layer].shape == (10, 16, 2, 16) and cache.v[layer].is_contiguous()


def test_rejects_inconsistent_plans() -> None:
    cfg = make_config()
    cache = PagedKVCache(cfg, 8, 4, torch.float32)
    tables = np.array([[3, 1, -1]], dtype=np.int32)
    ok_slots = np.array([3 * 4 + 3, 1 * 4 + 0])  # positions 3, 4
    PagedAttention(cache, np.array([2]), np.array([5]), ok_slots, tables)
    with pytest.raises(ValueError, match="slot_mapping"):
        PagedAttention(cache, np.array([2]), np.array([5]), np.array([3 * 4 + 3, 2 * 4]), tables)
    with pytest.raises(ValueError, match="slot_mapping"):
        PagedAttention(cache, np.array([2]), np.array([5]), np.array([-1, 1 * 4]), tables)
    with pytest.raises(ValueError, match="block"):
        PagedAttention(cache, np.array([1]), np.array([9]), np.array([5]), tables)  # needs 3 blocks
    with pytest.raises(ValueError):
        PagedAttention(cache, np.array([3]), np.array([2]), np.array([0, 1, 2]), tables)


def test_model_batched_matches_single_sequence() -> None:
    """A random tiny Llama: a batched paged schedule (chunked prefills mixed
    with decodes) gives each sequence the logits it gets alone."""
    from mistralrs_serve.models.llama import LlamaForCausalLM, required_weight_names

    from tests.models.tiny_models import ContiguousKVCache

    cfg = ModelConfig(
        architecture="llama",
        vocab_size=50,
        hidden_size=48,
        intermediate_size=64,
        num_layers=2,
        num_heads=6,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=128,
    )
    gen = torch.Generator().manual_seed(0)
    shapes = {
        "q_proj": (48, 48),
        "k_proj": (16, 48),
        "v_proj": (16, 48),
        "o_proj": (48, 48),
        "gate_proj": (64, 48),
        "up_proj": (64, 48),
        "down_proj": (48, 64),
    }
    weights = {}
    for name in required_weight_names(cfg):
        if name.endswith("norm.weight"):
            weights[name] = 1 + 0.1 * torch.randn(48, generator=gen)
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            weights[name] = torch.randn(50, 48, generator=gen)
        else:
            weights[name] = 0.3 * torch.randn(shapes[name.split(".")[-2]], generator=gen)
    model = LlamaForCausalLM(cfg, weights, torch.float32)
    prompts = [[int(t) for t in torch.randint(0, 50, (n,), generator=gen)] for n in (21, 7, 40)]
    num_decode = 6
    decode_tokens = [[int(t) for t in torch.randint(0, 50, (num_decode,), generator=gen)] for _ in prompts]

    # alone: whole prompt, then one token a step; logits of every step's last token
    alone = []
    for prompt, extra in zip(prompts, decode_tokens, strict=True):
        cache = ContiguousKVCache(cfg, 64, torch.float32)
        rows: list[torch.Tensor] = []
        start = 0
        for chunk in [prompt, *[[t] for t in extra]]:
            cache.begin_step(len(chunk))
            positions = torch.arange(start, start + len(chunk))
            rows.append(
                model.forward(torch.tensor(chunk), positions, cache, torch.tensor([len(chunk) - 1]))[0]
            )
            cache.end_step()
            start += len(chunk)
        alone.append(rows)

    # batched: prompts in chunks of at most 16 tokens, mixed with other sequences' decodes
    bs = 4
    paged = PagedKVCache(cfg, 64, bs, torch.float32)
    tables = np.full((3, 12), -1, dtype=np.int32)
    tables[:] = np.random.default_rng(0).permutation(64)[:36].reshape(3, 12)
    streams = [
        [prompt[i : i + 16] for i in range(0, len(prompt), 16)] + [[t] for t in extra]
        for prompt, extra in zip(prompts, decode_tokens, strict=True)
    ]
    done = [0, 0, 0]
    got: list[list[torch.Tensor]] = [[], [], []]
    while any(streams):
        active = [i for i in range(3) if streams[i]]
        chunks = [streams[i].pop(0) for i in active]
        q_lens = [len(c) for c in chunks]
        ctxs = [done[i] + n for i, n in zip(active, q_lens, strict=True)]
        pos = [p for i, c in zip(active, ctxs, strict=True) for p in range(done[i], c)]
        seq_rows = [i for i, n in zip(active, q_lens, strict=True) for _ in range(n)]
        slots = [int(tables[s, p // bs]) * bs + p % bs for s, p in zip(seq_rows, pos, strict=True)]
        attn = PagedAttention(paged, np.array(q_lens), np.array(ctxs), np.array(slots), tables[active])
        last = torch.tensor(np.cumsum(q_lens) - 1)
        logits = model.forward(torch.tensor([t for c in chunks for t in c]), torch.tensor(pos), attn, last)
        for j, i in enumerate(active):
            # a sequence's logits count once its prompt is complete
            if ctxs[j] >= len(prompts[i]):
                got[i].append(logits[j])
            done[i] = ctxs[j]
    for i in range(3):
        assert len(got[i]) == num_decode + 1
        for a, b in zip(alone[i], got[i], strict=True):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def _loop_reference(q: torch.Tensor, seqs: list[Seq], layer: int, how: LayerAttention) -> torch.Tensor:
    """Query by query and head by head, in float64: the keys it sees, softmax, values."""
    heads, d = q.shape[1], q.shape[2]
    out = torch.zeros(q.shape[0], heads * d, dtype=torch.float64)
    row = 0
    for s in seqs:
        groups = heads // s.keys.shape[2]
        for i in range(s.query_len):
            pos = s.context_len - s.query_len + i
            lo = 0 if how.window is None else max(0, pos - how.window + 1)
            for h in range(heads):
                keys = s.keys[layer, lo : pos + 1, h // groups].double()
                scores = keys @ q[row + i, h].double() * (how.scale or d**-0.5)
                if how.softcap is not None:
                    scores = how.softcap * torch.tanh(scores / how.softcap)
                weights = torch.softmax(scores, dim=0)
                out[row + i, h * d : (h + 1) * d] = (
                    weights @ s.values[layer, lo : pos + 1, h // groups].double()
                )
        row += s.query_len
    return out


@pytest.mark.parametrize(
    "how",
    [
        LayerAttention(window=20),
        LayerAttention(window=16, scale=0.09),
        LayerAttention(scale=0.4, softcap=2.0),
        LayerAttention(window=7, softcap=5.0),
        LayerAttention(scale=0.2),  # scale alone: the batched paths
        LayerAttention(window=10_000),  # a window wider than every context: the batched paths
    ],
)
@pytest.mark.parametrize("decode_mode", ["native", "group"])
def test_layer_attention_window_scale_softcap(how: LayerAttention, decode_mode: str) -> None:
    """Sliding windows (not block-aligned, over chunk boundaries), scales and soft-caps
    over mixed steps against a query-by-query reference."""
    cfg = make_config()
    specs = [(45, 1), (30, 30), (70, 19), (9, 1), (33, 1), (64, 40)]
    rng, gen = np.random.default_rng(4), torch.Generator().manual_seed(4)
    cache = PagedKVCache(cfg, sum(-(-c // 16) for c, _ in specs) + 3, 16, torch.float32)
    seqs, plan = setup_step(cache, specs, rng, num_padding=2)
    attn = PagedAttention(
        cache,
        plan.query_lens,
        plan.context_lens,
        plan.slot_mapping,
        plan.block_tables,
        decode_mode=decode_mode,
    )
    for layer in range(cfg.num_layers):
        q, k, v = step_tensors(cfg, seqs, layer, 2, gen)
        out = attn.attend(layer, q, k, v, how)
        torch.testing.assert_close(out.double(), _loop_reference(q, seqs, layer, how), atol=2e-5, rtol=1e-5)
        assert out[-2:].abs().max() == 0  # padding rows
