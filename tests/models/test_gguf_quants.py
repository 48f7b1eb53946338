"""GGUF block dequantization (models/gguf_quants.py) against the gguf package's numpy reference.

Every quantized type is decoded from random blocks whose f16 scale fields are set to finite values
(random bytes there would make NaN/inf scales that compare unequal), over several shapes, and must
equal the reference bit for bit in fp32. A GGUF file with k-quant tensors is then loaded through
the real GGUF loader (q rows unpermuted included) and compared the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from mistralrs_serve.errors import ModelLoadError, UnsupportedModelError
from mistralrs_serve.models import gguf_quants
from mistralrs_serve.models.gguf_file import TensorInfo
from mistralrs_serve.models.gguf_loader import load_gguf_weights, read_gguf, unpermute_qk
from mistralrs_serve.models.gguf_quants import dequantize, dequantize_blocks

# Byte offsets of each type's f16 scale fields inside a block (ggml-common.h's block_* structs).
SCALE_FIELDS = {
    QT.Q4_0: (0,),
    QT.Q4_1: (0, 2),
    QT.Q5_0: (0,),
    QT.Q5_1: (0, 2),
    QT.Q8_0: (0,),
    QT.Q2_K: (80, 82),
    QT.Q3_K: (108,),
    QT.Q4_K: (0, 2),
    QT.Q5_K: (0, 2),
    QT.Q6_K: (208,),
}
PLAIN = {QT.F32: np.float32, QT.F16: np.float16, QT.BF16: None}
# (outer dims..., blocks per row): one block, several rows, a 3-D tensor with an odd block count
SHAPES = [(1, 1), (4, 3), (3, 2, 5)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_blocks(qtype: QT, num_blocks: int, seed: int) -> np.ndarray:
    """(num_blocks * type_size,) uint8: random bits, with finite f16 scales spanning 1e-4..10 of
    both signs and some exact zeros."""
    rng = np.random.default_rng(seed)
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (num_blocks, type_size), dtype=np.uint8)
    for offset in SCALE_FIELDS[qtype]:
        scales = rng.choice([-1.0, 1.0], (num_blocks, 1)) * 10 ** rng.uniform(-4, 1, (num_blocks, 1))
        scales[rng.random((num_blocks, 1)) < 0.05] = 0.0
        blocks[:, offset : offset + 2] = scales.astype(np.float16).view(np.uint8)
    return blocks.reshape(-1)


def _info(qtype: QT, shape: tuple[int, ...], num_bytes: int, name: str = "t") -> TensorInfo:
    return TensorInfo(name, shape, int(qtype), 0, num_bytes)


def _reference(raw: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> torch.Tensor:
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    values = gguf.quants.dequantize(raw.reshape(-1, type_size), qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def _assert_bit_exact(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape, what
    assert torch.isfinite(want).all(), what
    diff = (got - want).abs().max().item()
    assert torch.equal(got, want), f"{what}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("dims", SHAPES, ids=lambda d: "x".join(map(str, d)))
@pytest.mark.parametrize("qtype", list(SCALE_FIELDS), ids=lambda q: q.name)
def test_quantized_types_equal_gguf_package(qtype: QT, dims: tuple[int, ...]) -> None:
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    shape = (*dims[:-1], dims[-1] * block_size)
    raw = random_blocks(qtype, int(np.prod(shape)) // block_size, seed=int(qtype) * 7 + len(shape))
    want = _reference(raw, qtype, shape)
    _assert_bit_exact(dequantize(raw, _info(qtype, shape, raw.size), torch.float32), want, qtype.name)
    # other dtypes are the fp32 values rounded once
    got_bf16 = dequantize(raw, _info(qtype, shape, raw.size), torch.bfloat16)
    assert torch.equal(got_bf16, want.to(torch.bfloat16))


@pytest.mark.parametrize("qtype", list(SCALE_FIELDS), ids=lambda q: q.name)
def test_chunked_decoding_matches_one_pass(qtype: QT, monkeypatch: pytest.MonkeyPatch) -> None:
    # 3 blocks per chunk over 11 blocks: chunk edges fall inside rows and the last chunk is short
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    monkeypatch.setattr(gguf_quants, "_CHUNK_ELEMENTS", 3 * block_size)
    shape = (11, block_size)
    raw = random_blocks(qtype, 11, seed=5)
    _assert_bit_exact(
        dequantize(raw, _info(qtype, shape, raw.size), torch.float32),
        _reference(raw, qtype, shape),
        qtype.name,
    )


@pytest.mark.parametrize("qtype", list(PLAIN), ids=lambda q: q.name)
def test_plain_types_equal_gguf_package(qtype: QT) -> None:
    values = np.random.default_rng(3).standard_normal((3, 40)).astype(np.float32)
    if qtype == QT.BF16:
        raw = gguf.quants.quantize(values, qtype).reshape(-1).view(np.uint8)
    else:
        raw = values.astype(PLAIN[qtype]).reshape(-1).view(np.uint8)
    want = torch.from_numpy(np.asarray(gguf.quants.dequantize(raw.view(np.uint8), qtype), np.float32))
    got = dequantize(raw, _info(qtype, (3, 40), raw.size), torch.float32)
    _assert_bit_exact(got, want.reshape(3, 40), qtype.name)


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q8_0, QT.F16], ids=lambda q: q.name)
def test_wrong_length_buffer_is_refused(qtype: QT) -> None:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    shape = (2, 2 * block_size)
    raw = np.zeros(4 * type_size, dtype=np.uint8)
    for bad in (raw[:-1], np.zeros(raw.size + type_size, np.uint8)):
        with pytest.raises(
            ModelLoadError, match=rf"'blk\.0\.w'.*{qtype.name}.*{raw.size} bytes, got {bad.size}"
        ):
            dequantize(bad, _info(qtype, shape, bad.size, "blk.0.w"), torch.float32)
    if block_size > 1:
        with pytest.raises(ModelLoadError, match="not whole"):
            dequantize(raw, _info(qtype, (2, 2 * block_size + 1), raw.size), torch.float32)


def test_unsupported_type_is_named() -> None:
    _, type_size = gguf.GGML_QUANT_SIZES[QT.Q8_K]
    raw = np.zeros(type_size, dtype=np.uint8)
    with pytest.raises(UnsupportedModelError, match="Q8_K"):
        dequantize(raw, _info(QT.Q8_K, (1, 256), raw.size), torch.float32)
    with pytest.raises(UnsupportedModelError, match="Q8_K"):
        dequantize_blocks("Q8_K", torch.from_numpy(raw.reshape(1, -1)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("qtype", list(SCALE_FIELDS), ids=lambda q: q.name)
def test_decoding_on_cuda_equals_cpu(qtype: QT) -> None:
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    shape = (6, 3 * block_size)
    raw = random_blocks(qtype, 18, seed=9)
    got = dequantize(raw, _info(qtype, shape, raw.size), torch.float32, device="cuda")
    assert got.device.type == "cuda"
    _assert_bit_exact(got.cpu(), _reference(raw, qtype, shape), qtype.name)


# --- A GGUF file of k-quant tensors through the loader ---

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 256, 512, 4, 2, 32
K_TENSORS: dict[str, tuple[QT, tuple[int, int]]] = {
    "blk.0.attn_q.weight": (QT.Q6_K, (HIDDEN, HIDDEN)),  # permuted by the converter: unpermuted on load
    "blk.0.attn_v.weight": (QT.Q4_K, (KV_HEADS * HIDDEN // HEADS, HIDDEN)),
    "blk.0.attn_output.weight": (QT.Q5_K, (HIDDEN, HIDDEN)),
    "blk.0.ffn_gate.weight": (QT.Q4_K, (FFN, HIDDEN)),
    "blk.0.ffn_down.weight": (QT.Q6_K, (HIDDEN, FFN)),
    "output.weight": (QT.Q5_K, (VOCAB, HIDDEN)),
}


def _write_k_quant_file(path: Path) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_vocab_size(VOCAB)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(1)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_tensor(
        "token_embd.weight", np.random.default_rng(1).standard_normal((VOCAB, HIDDEN), np.float32)
    )
    for i, (name, (qtype, (rows, cols))) in enumerate(K_TENSORS.items()):
        block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
        raw = random_blocks(qtype, rows * cols // block_size, seed=100 + i)
        writer.add_tensor(name, raw.reshape(rows, -1), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _dense(w: Any, dtype: torch.dtype) -> torch.Tensor:
    # the loader keeps quantized matrices as the file's blocks (BlockWeight): decode as the torch path does
    return w if isinstance(w, torch.Tensor) else w.dequantize(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_k_quant_file_loads_with_reference_values(tmp_path: Path, dtype: torch.dtype) -> None:
    path = _write_k_quant_file(tmp_path / "k_quants.gguf")
    file, arch, cfg = read_gguf(path)
    weights = load_gguf_weights(file, arch, cfg, dtype)
    reader = gguf.GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    targets = {
        "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
        "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
        "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
        "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
        "output.weight": "lm_head.weight",
    }
    for name, target in targets.items():
        qtype, shape = K_TENSORS[name]
        assert file.tensors[name].type_name == qtype.name
        want = _reference(np.asarray(stored[name].data).reshape(-1), qtype, shape)
        if name == "blk.0.attn_q.weight":
            want = unpermute_qk(want, HEADS)
        got = _dense(weights[target], dtype)
        assert got.dtype == dtype, target
        if dtype == torch.float32:
            _assert_bit_exact(got, want, target)
        else:
            assert torch.equal(got, want.to(dtype)), target
