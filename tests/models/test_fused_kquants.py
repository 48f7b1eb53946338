"""GGUF block types on the fused CPU forward, read straight from the file's blocks.

`QuantMatrix.from_gguf` (Rust) decodes each type into the kernels' layout; its rows are held
to the torch decoder of models/gguf_quants.py (itself bit-exact with the `gguf` package). Then a
tiny Llama written as a Q4_K_M-like mix (Q4_K and Q6_K in one fused q/k/v, Q5_0, Q8_0 head) runs on
the fused forward and on the torch path from the same blocks: the fused forward quantizes
activations to 8 bits per 32 (as llama.cpp does), so the two agree closely, not exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_models as tm
import torch
from mistralrs_serve import _native
from mistralrs_serve.config import EngineConfig
from mistralrs_serve.engine.forward_paths import FusedPath
from mistralrs_serve.engine.llm_engine import LLMEngine
from mistralrs_serve.layers.block_weight import FUSED_TYPES, BlockWeight
from mistralrs_serve.models.loader import ModelSource, load_model

pytestmark = pytest.mark.skipif(
    not _native.QuantMatrix.has_fast_kernel(), reason="the fused forward needs AVX-512 VNNI or AVX2"
)

# (block weights, block bytes, [(byte offset, magnitude) of each f16 field])
LAYOUT: dict[str, tuple[int, int, list[tuple[int, float]]]] = {
    "Q4_0": (32, 18, [(0, 0.01)]),
    "Q4_1": (32, 20, [(0, 0.01), (2, 0.1)]),
    "Q5_0": (32, 22, [(0, 0.005)]),
    "Q5_1": (32, 24, [(0, 0.005), (2, 0.1)]),
    "Q8_0": (32, 34, [(0, 0.001)]),
    "Q4_K": (256, 144, [(0, 2e-4), (2, 4e-4)]),
    "Q5_K": (256, 176, [(0, 1e-4), (2, 2e-4)]),
    "Q6_K": (256, 210, [(208, 5e-5)]),
}


def blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random (rows, cols) blocks of a type: random codes, f16 scales of a sane size."""
    per, size, fields = LAYOUT[type_name]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows * cols // per, size), dtype=np.uint8)
    for at, mag in fields:
        values = (mag * (0.5 + rng.random(len(data)))).astype(np.float16)
        data[:, at : at + 2] = values.view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, -1)


def test_every_type_decodes_as_the_torch_decoder() -> None:
    assert set(FUSED_TYPES) == set(LAYOUT)
    rows, cols = 20, 512
    for i, t in enumerate(FUSED_TYPES):
        w = BlockWeight.of(t, blocks(t, rows, cols, seed=i), rows, cols)
        want = w.dequantize(torch.float32)
        m = w.quant_matrix()
        assert m is not None
        got = torch.from_numpy(m.dequantize_rows(np.arange(rows, dtype=np.int64)))
        # the one rounding: a k-quant's sub-block scale (f16 x 6/8-bit integer) kept as f16
        tol = 1e-3 if t.endswith("_K") else 1e-6
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item(), msg=t)


def test_mixed_types_stack_and_bad_input_is_refused() -> None:
    parts = [BlockWeight.of(t, blocks(t, r, 256, seed=r), r, 256) for t, r in (("Q4_K", 24), ("Q6_K", 8))]
    stacked = BlockWeight.concat(parts)
    m = stacked.quant_matrix()
    assert m is not None and m.shape == (32, 256)
    got = m.dequantize_rows(np.array([0, 23, 24, 31], dtype=np.int64))
    want = stacked.dequantize(torch.float32)[[0, 23, 24, 31]]
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-3, atol=1e-4)
    assert BlockWeight.of("Q2_K", np.zeros((1, 84), np.uint8), 1, 256).quant_matrix() is None
    with pytest.raises(ValueError, match="IQ4_XS"):
        _native.QuantMatrix.from_gguf("IQ4_XS", np.zeros(136, np.uint8), 1, 256)
    with pytest.raises(ValueError, match="bytes"):
        _native.QuantMatrix.from_gguf("Q4_K", np.zeros(143, np.uint8), 1, 256)
    with pytest.raises(ValueError, match="row"):
        m.dequantize_rows(np.array([32], dtype=np.int64))


def test_applies_builds_every_matrix_or_none() -> None:
    """The fused step's check repacks the layers' matrices (side by side, in threads),
    but only once it knows that every one of them has a kernel: a Q2_K layer leaves
    the others unbuilt, not repacked for nothing and kept."""
    from mistralrs_serve.layers.linear import Linear
    from mistralrs_serve.models.llama_native import applies

    if not _native.QuantMatrix.has_fast_kernel():
        pytest.skip("no vector kernel on this CPU")

    def linear(t: str, seed: int) -> Linear:
        data = np.zeros((16, 84), np.uint8) if t == "Q2_K" else blocks(t, 16, 256, seed=seed)
        return Linear(BlockWeight.of(t, data, 16, 256), None, torch.float32)

    kv = np.zeros(1, np.float32)
    fused = [linear(t, i) for i, t in enumerate(("Q4_K", "Q6_K", "Q5_0", "Q8_0"))]
    mixed = [linear("Q4_K", 9), linear("Q2_K", 10)]
    assert not applies(torch.device("cpu"), kv, mixed)
    assert mixed[0]._quant is None  # not built: the Q2_K layer rules the step out first
    assert not applies(torch.device("meta"), kv, fused) and fused[0]._quant is None
    assert applies(torch.device("cpu"), kv, fused)
    for lin in fused:
        assert lin._quant is not None and lin._quant.shape == (16, 256)


# a Q4_K_M-like mix of a tiny Llama (hidden 256, so that k-quant blocks fit its rows)
MIX = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q5_0"}
MIX |= {"ffn_gate": "Q4_K", "ffn_up": "Q5_K", "ffn_down": "Q6_K"}


def _write_mixed_gguf(tmp: Path) -> Path:
    import gguf
    import transformers

    tok = tm.build_tokenizer()
    vocab = tok.get_vocab_size()
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model_dir = tmp / "hf"
    transformers.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": tm.EOS_TOKEN}))
    seeds = iter(range(1000))

    def mixed_blocks(qtype: Any, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
        return blocks(gguf.GGMLQuantizationType(qtype).name, shape[0], shape[1], next(seeds))

    raw = {
        f"blk.{i}.{n}.weight": getattr(gguf.GGMLQuantizationType, t) for i in range(2) for n, t in MIX.items()
    }
    raw["token_embd.weight"] = gguf.GGMLQuantizationType.Q8_0
    original, tm.random_blocks = tm.random_blocks, mixed_blocks
    try:
        return tm.write_gguf_from_hf(model_dir, tmp / "mixed.gguf", raw_types=raw)
    finally:
        tm.random_blocks = original


def test_a_q4_k_m_mix_runs_fused_as_the_torch_path_does(tmp_path: Path) -> None:
    path = _write_mixed_gguf(tmp_path)
    loaded = load_model(ModelSource.parse(str(path)), dtype=torch.float32)
    qkv = loaded.model.layers[0].qkv.source
    assert isinstance(qkv, BlockWeight) and qkv.type_names == ("Q4_K", "Q4_K", "Q6_K")
    engine = LLMEngine(loaded, EngineConfig(kv_cache_mb=16))
    path_ = engine.runner.path
    assert isinstance(path_, FusedPath)
    assert all(lin._weight is None for lin in loaded.model.linears())  # no dense copy was made
    ids = tm.prompt_ids(48, loaded.config.vocab_size, seed=3)
    bs = engine.runner.cache.block_size
    pos = np.arange(len(ids))
    table = np.arange(len(ids) // bs + 1, dtype=np.int64)[None]
    fused = path_.fused.forward(
        np.asarray(ids, dtype=np.int64),
        pos,
        table[0, pos // bs] * bs + pos % bs,
        np.repeat(table, len(ids), 0),
        pos + 1,
        pos,
    )
    dense = tm.run_ours(loaded.model, ids)  # the torch path decodes the same blocks now
    corr = tm.row_correlations(fused, dense)
    # the k-quant matrices' inputs are quantized to 8 bits per 256 (llama.cpp's Q8_K), coarser than per 32
    assert corr.min().item() >= 0.995, corr.min().item()
    assert (fused.argmax(-1) == dense.argmax(-1)).float().mean().item() >= 0.9


def test_the_fused_forward_lets_the_mapped_file_go(tmp_path: Path) -> None:
    """Once repacked, the blocks' file pages leave the resident set (and come back if read)."""
    path = _write_mixed_gguf(tmp_path)
    loaded = load_model(ModelSource.parse(str(path)), dtype=torch.float32)
    raw = loaded.model.layers[1].gate_up.source
    assert isinstance(raw, BlockWeight)
    part = raw.parts[0].raw
    before = part.sum()  # reads (faults in) every page
    resident = _mapped_rss_kb(part)
    assert resident * 1024 >= part.nbytes // 2
    engine = LLMEngine(loaded, EngineConfig(kv_cache_mb=16))
    assert isinstance(engine.runner.path, FusedPath)
    assert _mapped_rss_kb(part) < resident / 4, (resident, _mapped_rss_kb(part))
    assert part.sum() == before  # the bytes are still there to read


def _mapped_rss_kb(a: np.ndarray) -> int:
    """Resident kB of the mapping holding `a` (the mapped GGUF file), from /proc/self/smaps."""
    addr = a.__array_interface__["data"][0]
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "Rss:":
            return int(line.split()[1])
    raise AssertionError("no mapping holds the array")
