"""The fused CPU decode step's binding: quantized matrices, a tiny random
decoder against a torch f32 reference of the same network, and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mistralrs_serve import _native

H, KV, D, HIDDEN, INTER, VOCAB, LAYERS = 4, 2, 16, 64, 96, 50, 2
BLOCK_SIZE, NUM_BLOCKS = 4, 6


def q4_parts(rng: np.random.Generator, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = rng.integers(0, 16, (rows, cols), dtype=np.uint8)
    scale = (rng.random((rows, cols // 32), dtype=np.float32) * 0.02 + 0.01).astype(np.float32)
    return q, scale, (-7.5 * scale).astype(np.float32)


def dequant(q: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> torch.Tensor:
    # the matrix keeps scales as f16
    s, o = (torch.from_numpy(a).half().float().repeat_interleave(32, dim=1) for a in (scale, offset))
    return torch.from_numpy(q).float() * s + o


class Tiny:
    """Random weights, the binding's decoder over them, and a torch reference."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.dense: list[dict[str, torch.Tensor]] = []
        layers = []
        for _ in range(LAYERS):
            parts = {
                n: q4_parts(rng, r, c)
                for n, r, c in [
                    ("qkv", (H + 2 * KV) * D, HIDDEN),
                    ("o", HIDDEN, H * D),
                    ("gate_up", 2 * INTER, HIDDEN),
                    ("down", HIDDEN, INTER),
                ]
            }
            norms = {n: (1 + 0.2 * rng.standard_normal(HIDDEN)).astype(np.float32) for n in ("attn", "ffn")}
            self.dense.append(
                {n: dequant(*p) for n, p in parts.items()}
                | {n: torch.from_numpy(v) for n, v in norms.items()}
            )
            m = {n: _native.QuantMatrix.from_q4(*p) for n, p in parts.items()}
            layers.append(
                (
                    norms["attn"].tolist(),
                    m["qkv"],
                    None,
                    None,
                    None,
                    m["o"],
                    None,
                    norms["ffn"].tolist(),
                    m["gate_up"],
                    m["down"],
                )
            )
        head = (0.3 * rng.standard_normal((VOCAB, HIDDEN))).astype(np.float32)
        self.head = torch.from_numpy(head)
        self.final = np.ones(HIDDEN, dtype=np.float32)
        self.decoder = _native.NativeDecoder(
            hidden=HIDDEN,
            num_heads=H,
            num_kv_heads=KV,
            head_dim=D,
            intermediate=INTER,
            vocab=VOCAB,
            eps=1e-6,
            layers=layers,
            final_norm=self.final.tolist(),
            lm_head=_native.QuantMatrix.quantize_q8(head),
        )

    def reference(self, embeds: torch.Tensor) -> torch.Tensor:
        """Causal f32 forward over a whole sequence: logits per position."""
        n = embeds.shape[0]
        x = embeds.clone()
        cos, sin = rotary(np.arange(n))
        cos, sin = torch.from_numpy(cos)[:, None], torch.from_numpy(sin)[:, None]

        def rope(t: torch.Tensor) -> torch.Tensor:
            a, b = t.chunk(2, dim=-1)
            return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

        for w in self.dense:
            qkv = torch.rms_norm(x, (HIDDEN,), w["attn"], 1e-6) @ w["qkv"].T
            q, k, v = qkv.split([H * D, KV * D, KV * D], dim=1)
            q, k, v = rope(q.view(n, H, D)), rope(k.view(n, KV, D)), v.view(n, KV, D)
            k, v = (t.to(torch.bfloat16).float() for t in (k, v))  # the cache holds bf16
            att = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1),
                k.transpose(0, 1).repeat_interleave(H // KV, 0),
                v.transpose(0, 1).repeat_interleave(H // KV, 0),
                is_causal=True,
            )
            x = x + att.transpose(0, 1).reshape(n, H * D) @ w["o"].T
            gu = torch.rms_norm(x, (HIDDEN,), w["ffn"], 1e-6) @ w["gate_up"].T
            g, u = gu.split([INTER, INTER], dim=1)
            x = x + (torch.nn.functional.silu(g) * u) @ w["down"].T
        return torch.rms_norm(x, (HIDDEN,), torch.from_numpy(self.final), 1e-6) @ self.head.T


def rotary(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / 10000 ** (np.arange(0, D, 2) / D)
    angles = positions[:, None] * inv[None]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def cache() -> np.ndarray:
    return np.zeros((2, LAYERS, NUM_BLOCKS, BLOCK_SIZE, KV, D), dtype=np.int16)


def step(
    tiny: Tiny, kv: np.ndarray, x: np.ndarray, positions: list[int], tables: np.ndarray, threads: int = 2
) -> np.ndarray:
    pos = np.asarray(positions)
    cos, sin = rotary(pos)
    slots = np.array([tables[r, p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for r, p in enumerate(pos)])
    logits = np.zeros((len(pos), VOCAB), dtype=np.float32)
    tiny.decoder.forward(
        x.copy(),
        cos,
        sin,
        slots.astype(np.int64),
        tables,
        (pos + 1).astype(np.int64),
        np.arange(len(pos), dtype=np.int64),
        kv,
        logits,
        threads,
    )
    return logits


def test_decode_matches_a_torch_reference() -> None:
    tiny = Tiny()
    embeds = torch.randn(9, HIDDEN, generator=torch.Generator().manual_seed(1))
    want = tiny.reference(embeds)
    kv, tables = cache(), np.array([[5, 2, 3]], dtype=np.int64)
    for p in range(9):
        got = torch.from_numpy(step(tiny, kv, embeds[p : p + 1].numpy(), [p], tables))
        err = (got[0] - want[p]).abs().max().item()
        assert err <= 0.05 * want[p].abs().max().item(), (p, err)
        assert got[0].argmax() == want[p].argmax()
    assert tiny.decoder.weight_bytes > 0


def test_rows_are_independent_of_batch_and_threads() -> None:
    tiny = Tiny()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, HIDDEN)).astype(np.float32)
    tables = np.array([[0, 1], [2, 3], [4, 5]], dtype=np.int64)
    together = step(tiny, cache(), x, [0, 0, 0], tables, threads=3)
    for r in range(3):
        alone = step(tiny, cache(), x[r : r + 1], [0], tables[r : r + 1], threads=1)
        assert np.array_equal(alone[0], together[r])


def test_bad_inputs_are_errors() -> None:
    tiny = Tiny()
    kv, tables = cache(), np.array([[0, 1]], dtype=np.int64)
    x = np.zeros((1, HIDDEN), dtype=np.float32)
    cos, sin = rotary(np.array([0]))
    logits = np.zeros((1, VOCAB), dtype=np.float32)
    i64 = np.int64

    def run(**over: object) -> None:
        args = dict(
            x=x,
            cos=cos,
            sin=sin,
            slots=np.array([0], i64),
            block_tables=tables,
            context_lens=np.array([1], i64),
            logit_rows=np.array([0], i64),
            kv=kv,
            logits=logits,
        )
        tiny.decoder.forward(**(args | over))

    run()
    for over, exc in [
        ({"slots": np.array([NUM_BLOCKS * BLOCK_SIZE], i64)}, ValueError),  # past the cache
        ({"slots": np.array([-1], i64)}, ValueError),
        ({"context_lens": np.array([9], i64)}, ValueError),  # more blocks than the table has
        ({"logit_rows": np.array([1], i64)}, ValueError),
        ({"logit_rows": np.array([-1], i64)}, ValueError),
        ({"x": np.zeros((1, HIDDEN + 1), np.float32)}, ValueError),
        ({"x": np.zeros((1, HIDDEN), np.float64)}, ValueError),
        ({"kv": kv[:, :1]}, ValueError),  # one layer, not two
        ({"kv": np.zeros(kv.shape, np.float16)}, ValueError),
        ({"logits": np.zeros((1, VOCAB), np.float32)[:, ::-1]}, ValueError),
        ({"x": [[0.0] * HIDDEN]}, TypeError),
    ]:
        with pytest.raises(exc):
            run(**over)


def test_bad_matrices_are_errors() -> None:
    q, s, o = q4_parts(np.random.default_rng(3), 4, 64)
    with pytest.raises(ValueError, match="over 15"):
        _native.QuantMatrix.from_q4(q + 16, s, o)
    with pytest.raises(ValueError):
        _native.QuantMatrix.from_q4(q[:, :48], s, o)  # not whole blocks
    with pytest.raises(ValueError):
        _native.QuantMatrix.quantize_q8(np.zeros((2, 40), np.float32))
    m = _native.QuantMatrix.from_q4(q, s, o)
    assert m.shape == (4, 64)
    norms = [1.0] * 64
    with pytest.raises(ValueError, match="qkv"):  # 4 rows is not (H + 2 KV) * D
        _native.NativeDecoder(
            hidden=64,
            num_heads=H,
            num_kv_heads=KV,
            head_dim=D,
            intermediate=INTER,
            vocab=4,
            eps=1e-6,
            layers=[(norms, m, None, None, None, m, None, norms, m, m)],
            final_norm=norms,
            lm_head=m,
        )
