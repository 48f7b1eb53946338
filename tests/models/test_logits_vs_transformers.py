"""Our Llama/Qwen2/Qwen3 forward against transformers' on tiny random models in Hugging Face layout.

fp32 tolerance: the two implementations compute the same function with different op order (fused
q/k/v and gate/up matmuls, SDPA vs eager softmax, RoPE tables from fp64 vs fp32 angles). Over 2-3 layers
of width 64-128 with logits of magnitude < 10 that rounding stays near 1e-5 (measured: at most 8e-6);
FP32_ATOL = 1e-4 leaves 10x headroom yet is ~1000x below what any wrong weight, bias, mask or RoPE
frequency produces (dropping the o_proj bias alone gave 2.0).

bf16: weights and activations rounded to 8 mantissa bits move logits by ~1e-2, enough to swap near-tied
top tokens but not to decorrelate rows (measured: top-1 agreement >= 0.97, row correlation >= 0.9997).
"""

from __future__ import annotations

from typing import Any

import pytest
import tiny_models as tm
import torch
from mistralrs_serve.models.loader import ModelSource, load_model

FP32_ATOL = 1e-4
BF16_MIN_TOP1 = 0.90
BF16_MIN_CORR = 0.99
PROMPT_LEN = tm.PROMPT_LEN


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    # Tiny matmuls: thread hand-offs cost more than they save, badly so on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tm.TinyReference]:
    root = tmp_path_factory.mktemp("tiny_hf")
    return {name: tm.TinyReference(tm.save_tiny_model(spec, root / name)) for name, spec in tm.SPECS.items()}


@pytest.fixture(params=sorted(tm.SPECS))
def ref(request: pytest.FixtureRequest, references: dict[str, tm.TinyReference]) -> tm.TinyReference:
    return references[request.param]


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, what
    diff = (got - want).abs()
    worst = int(diff.max(dim=-1).values.argmax())
    assert diff.max().item() <= FP32_ATOL, (
        f"{what}: max |ours - transformers| = {diff.max().item():.3g} at position {worst} (atol {FP32_ATOL})"
    )


def test_config_read_from_config_json(ref: tm.TinyReference) -> None:
    spec = tm.SPECS[ref.directory.name]
    cfg = ref.ours(torch.float32).config
    assert cfg.architecture == spec.architecture
    assert cfg.vocab_size == ref.vocab_size
    assert cfg.num_layers == spec.num_layers
    assert (cfg.num_heads, cfg.num_kv_heads) == (tm.HEADS, tm.KV_HEADS)
    assert cfg.head_dim == (spec.head_dim or tm.HIDDEN // tm.HEADS)
    assert cfg.tie_word_embeddings == spec.tie_word_embeddings
    assert cfg.rope_scaling.rope_type == spec.rope_parameters["rope_type"]
    assert cfg.qk_norm == (spec.architecture == "qwen3")
    assert cfg.attention_bias == (spec.attention_bias or spec.architecture == "qwen2")


def test_fp32_prefill_matches_transformers(ref: tm.TinyReference) -> None:
    got = tm.run_ours(ref.ours(torch.float32).model, ref.ids)
    _assert_close(got, ref.logits, "one-step prefill")


def test_fp32_prefill_then_decode_matches_transformers(ref: tm.TinyReference) -> None:
    prefill = 16
    chunks = [prefill] + [1] * (PROMPT_LEN - prefill)
    got = tm.run_ours(ref.ours(torch.float32).model, ref.ids, chunks)
    _assert_close(got, ref.logits, f"prefill of {prefill} then token-by-token decode")


def test_fp32_chunked_prefill_matches_transformers(ref: tm.TinyReference) -> None:
    # Uneven chunks: 1 token first (decode-shaped start), then chunks that straddle each other's ends.
    chunks = [1, 5, 7, 13, 17, 21]
    got = tm.run_ours(ref.ours(torch.float32).model, ref.ids, chunks)
    _assert_close(got, ref.logits, f"prefill in chunks of {chunks}")


def test_logits_indices_select_rows(ref: tm.TinyReference) -> None:
    model = ref.ours(torch.float32).model
    cache = tm.ContiguousKVCache(model.config, PROMPT_LEN, torch.float32)
    cache.begin_step(PROMPT_LEN)
    rows = torch.tensor([PROMPT_LEN - 1, 0, 31])
    got = model.forward(torch.tensor(ref.ids), torch.arange(PROMPT_LEN), cache, rows)
    _assert_close(got, ref.logits[rows], "selected rows")


def test_bf16_agrees_loosely(ref: tm.TinyReference) -> None:
    loaded = ref.ours(torch.bfloat16)
    assert loaded.model.dtype == torch.bfloat16
    for chunks in (None, [PROMPT_LEN - 8] + [1] * 8):
        got = tm.run_ours(loaded.model, ref.ids, chunks)
        assert got.dtype == torch.float32
        top1 = (got.argmax(-1) == ref.logits.argmax(-1)).float().mean().item()
        corr = tm.row_correlations(got, ref.logits)
        assert top1 >= BF16_MIN_TOP1, f"bf16 top-1 agreement {top1:.3f} (chunks {chunks})"
        assert corr.min().item() >= BF16_MIN_CORR, (
            f"bf16 row correlation {corr.min().item():.5f} at position {int(corr.argmin())}"
        )


def test_llama3_rope_scaling_is_applied(references: dict[str, tm.TinyReference]) -> None:
    """The llama3 variant's prompt reaches the scaled frequencies: plain RoPE would not match."""
    ref = references["llama-tied-llama3"]
    loaded = ref.ours(torch.float32)
    assert loaded.config.rope_scaling.factor == tm.LLAMA3_ROPE["factor"]
    from mistralrs_serve.config import RopeScaling
    from mistralrs_serve.layers.rotary import RotaryTable

    cfg = loaded.config
    model: Any = load_model(ModelSource.parse(str(ref.directory)), dtype=torch.float32).model
    model.rotary = RotaryTable(
        cfg.head_dim, cfg.rope_theta, RopeScaling(), cfg.max_position_embeddings, torch.float32
    )
    unscaled = tm.run_ours(model, ref.ids)
    assert (unscaled - ref.logits).abs().max().item() > 100 * FP32_ATOL


def test_tokenizer_and_chat_template_load(references: dict[str, tm.TinyReference]) -> None:
    tok = references["llama"].ours(torch.float32).tokenizer
    assert tok.vocab_size == references["llama"].vocab_size
    eos = tok.backend.token_to_id(tm.EOS_TOKEN)
    assert eos in tok.eos_token_ids
    text = "hello world, the quick brown fox"
    assert tok.decode(tok.encode(text)) == text
    rendered = tok.render_chat([{"role": "user", "content": "hi"}])
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
