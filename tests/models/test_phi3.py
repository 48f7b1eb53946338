"""Phi-3 / Phi-3.5 / Phi-4-mini (models/phi3.py) against transformers' Phi3ForCausalLM on tiny random
models, from Hugging Face directories and from GGUF files written the way llama.cpp's converter writes
"phi3"; the Phi-3.5 chat template.

Variants (hidden 64, 4 heads of 16, 2 KV heads, 2 layers, a 64-token prompt):
- phi3-window: default RoPE, `sliding_window` 24 (Phi-3-mini-4k's 2047, scaled down), on every layer
  as transformers 5 masks it.
- phi4mini-longrope: Phi-4-mini's shape: rotary over 12 of 16 features (partial_rotary_factor 0.75),
  LongRoPE with original context 32 and context 256 (so the long factor set, and the multiplier
  derived from 256 / 32), tied embeddings.
- phi35-longrope-short: full rotary, LongRoPE whose context is the original one (128: the short
  factor set) with an explicit attention_factor, and a window longer than the context (Phi-3.5's
  262144), which changes nothing.

fp32 tolerance as in test_logits_vs_transformers.py (same network shape and op-order differences).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_models as tm
import torch
from mistralrs_serve.config import ModelConfig
from mistralrs_serve.errors import ModelLoadError
from mistralrs_serve.models.loader import ModelSource, load_model

FP32_ATOL = 1e-4
SHORT = [1.0, 1.1, 1.3, 1.7, 2.4, 3.0, 3.5, 4.0]
LONG = [1.0, 1.5, 2.5, 4.0, 8.0, 16.0, 24.0, 32.0]


def _longrope(rotary_dim: int, **more: Any) -> dict[str, Any]:
    half = rotary_dim // 2
    return {"rope_type": "longrope", "short_factor": SHORT[:half], "long_factor": LONG[:half], **more}


VARIANTS: dict[str, dict[str, Any]] = {
    "phi3-window": {"sliding_window": 24},
    "phi4mini-longrope": {
        "rope_parameters": {**_longrope(12), "partial_rotary_factor": 0.75},
        "original_max_position_embeddings": 32,
        "tie_word_embeddings": True,
    },
    "phi35-longrope-short": {
        "rope_parameters": _longrope(16, attention_factor=1.25),
        "original_max_position_embeddings": 128,
        "max_position_embeddings": 128,
        "sliding_window": 262144,
    },
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_phi3(vocab_size: int, seed: int = 0, **overrides: Any) -> Any:
    """transformers' Phi3ForCausalLM, fp32, eager, with weights spread as tiny_models spreads them."""
    import transformers

    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=tm.HIDDEN,
        intermediate_size=tm.INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=tm.HEADS,
        num_key_value_heads=tm.KV_HEADS,
        max_position_embeddings=tm.MAX_POSITIONS,
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=vocab_size - 1,
        pad_token_id=None,
    )
    kwargs.update(overrides)
    rope = kwargs.pop("rope_parameters", {"rope_type": "default"})
    kwargs["rope_parameters"] = {"rope_theta": tm.ROPE_THETA, **rope}
    config = transformers.Phi3Config(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 2:
                fan_in = p.shape[1] if "embed" not in name else 16
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return model


def save_phi3(directory: Path, **overrides: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tok = tm.build_tokenizer()
    model = make_phi3(tok.get_vocab_size(), **overrides)
    model.config.eos_token_id = tok.token_to_id(tm.EOS_TOKEN)
    model.save_pretrained(directory, safe_serialization=True)
    tok.save(str(directory / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tm.EOS_TOKEN,
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "chat_template": tm.CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return directory


# --- GGUF, as convert_hf_to_gguf.py's Phi3MiniModel writes it ---

_GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_up_proj": "ffn_up",  # gate and up, fused as transformers stores them
    "mlp.down_proj": "ffn_down",
}


def _gguf_tensor_name(hf_name: str) -> str:
    if hf_name in tm.GGUF_GLOBAL_NAMES:
        return tm.GGUF_GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".")  # model.layers.N.<module...>.weight
    return f"blk.{parts[2]}.{_GGUF_LAYER['.'.join(parts[3:-1])]}.{parts[-1]}"


def write_phi3_gguf(model_dir: Path, path: Path, quant: Any = None) -> Path:
    """The converter's metadata (no head_dim or vocab_size keys; the rotated width; the original
    context; the window, 0 for none; for LongRoPE its multiplier from context / original context, and
    the two factor lists as tensors) and tensors (q/k/v and gate/up fused, no row permutation)."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    rope = cfg["rope_parameters"]
    hidden, heads, max_pos = cfg["hidden_size"], cfg["num_attention_heads"], cfg["max_position_embeddings"]
    original = rope.get("original_max_position_embeddings", cfg["original_max_position_embeddings"])
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_name(model_dir.name)
    writer.add_context_length(max_pos)
    writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * hidden) // heads)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_sliding_window(cfg.get("sliding_window") or 0)
    tm.add_tokenizer_metadata(writer, tm.build_tokenizer())
    tensors = dict(load_file(str(model_dir / "model.safetensors")))
    if rope.get("long_factor"):
        scale = max_pos / original
        writer.add_rope_scaling_attn_factors(
            math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
        )
        tensors["rope_factors_long.weight"] = np.array(rope["long_factor"], dtype=np.float32)
        tensors["rope_factors_short.weight"] = np.array(rope["short_factor"], dtype=np.float32)
    for name, w in tensors.items():
        target = name if name.startswith("rope_factors") else _gguf_tensor_name(name)
        w = np.ascontiguousarray(w, dtype=np.float32)
        if quant is not None and w.ndim == 2 and "embed" not in name:
            writer.add_tensor(target, gguf.quants.quantize(w, quant), raw_dtype=quant)
        else:
            writer.add_tensor(target, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- Fixtures and helpers ---


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tm.TinyReference]:
    root = tmp_path_factory.mktemp("tiny_phi3")
    return {name: tm.TinyReference(save_phi3(root / name, **kw)) for name, kw in VARIANTS.items()}


@pytest.fixture(params=sorted(VARIANTS))
def ref(request: pytest.FixtureRequest, references: dict[str, tm.TinyReference]) -> tm.TinyReference:
    return references[request.param]


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, what
    diff = (got - want).abs().max().item()
    assert diff <= FP32_ATOL, f"{what}: max |ours - transformers| = {diff:.3g} (atol {FP32_ATOL})"


def _model(ref: tm.TinyReference) -> Any:
    return ref.ours(torch.float32).model


# --- Hugging Face directories ---


def test_config_read_from_config_json(references: dict[str, tm.TinyReference]) -> None:
    window = references["phi3-window"].ours(torch.float32).config
    assert (window.architecture, window.sliding_window, window.extra["rotary_dim"]) == ("phi3", 24, 16)
    assert window.rope_scaling.rope_type == "default"
    phi4 = references["phi4mini-longrope"].ours(torch.float32).config
    assert phi4.extra["rotary_dim"] == 12 and phi4.tie_word_embeddings and phi4.sliding_window is None
    s = phi4.rope_scaling
    assert (s.rope_type, s.original_max_position_embeddings, s.factor) == ("longrope", 32, 256 / 32)
    assert s.long_factor == tuple(LONG[:6]) and s.short_factor == tuple(SHORT[:6])
    short = references["phi35-longrope-short"].ours(torch.float32).config
    assert short.sliding_window is None  # longer than the context: nothing to slide
    assert short.rope_scaling.attention_factor == 1.25


def test_longrope_factor_set_and_multiplier(references: dict[str, tm.TinyReference]) -> None:
    """Context beyond the original one: the long set and sqrt(1 + ln 8 / ln 32); within it: the
    short set and the configured attention_factor (cos at position 0 is the multiplier)."""
    long_model = _model(references["phi4mini-longrope"])
    assert long_model.rotary.cos.shape[-1] == 6
    torch.testing.assert_close(
        long_model.rotary.cos[0], torch.full((6,), math.sqrt(1 + math.log(8) / math.log(32)))
    )
    # angle at position 1 = inv_freq: base frequencies divided by the long factors
    base = 1.0 / tm.ROPE_THETA ** (torch.arange(0, 12, 2, dtype=torch.float64) / 12)
    mult = long_model.rotary.cos[0, 0].item()
    angle = torch.atan2(long_model.rotary.sin[1].double() / mult, long_model.rotary.cos[1].double() / mult)
    torch.testing.assert_close(
        angle, base / torch.tensor(LONG[:6], dtype=torch.float64), atol=1e-6, rtol=1e-5
    )
    short_model = _model(references["phi35-longrope-short"])
    torch.testing.assert_close(short_model.rotary.cos[0], torch.full((8,), 1.25))


def test_fp32_prefill_matches_transformers(ref: tm.TinyReference) -> None:
    _assert_close(tm.run_ours(_model(ref), ref.ids), ref.logits, "one-step prefill")


def test_fp32_prefill_then_decode_matches_transformers(ref: tm.TinyReference) -> None:
    chunks = [16] + [1] * (tm.PROMPT_LEN - 16)
    _assert_close(tm.run_ours(_model(ref), ref.ids, chunks), ref.logits, "prefill of 16 then decode")


def test_fp32_chunked_prefill_matches_transformers(ref: tm.TinyReference) -> None:
    chunks = [1, 5, 7, 13, 17, 21]
    _assert_close(tm.run_ours(_model(ref), ref.ids, chunks), ref.logits, f"chunks {chunks}")


def test_window_rotary_width_and_factors_all_matter(references: dict[str, tm.TinyReference]) -> None:
    """Each feature under test changes the logits far beyond the tolerance when left out."""
    from dataclasses import replace

    from mistralrs_serve.layers.attention import PLAIN
    from mistralrs_serve.layers.rotary import RotaryTable

    window_ref = references["phi3-window"]
    model = load_model(ModelSource.parse(str(window_ref.directory)), dtype=torch.float32).model
    for layer in model.layers:
        layer.how = PLAIN
    assert (tm.run_ours(model, window_ref.ids) - window_ref.logits).abs().max().item() > 100 * FP32_ATOL

    phi4_ref = references["phi4mini-longrope"]
    model = load_model(ModelSource.parse(str(phi4_ref.directory)), dtype=torch.float32).model
    cfg: ModelConfig = model.config
    short_set = replace(cfg.rope_scaling, long_factor=cfg.rope_scaling.short_factor)
    model.rotary = RotaryTable(12, cfg.rope_theta, short_set, cfg.max_position_embeddings, torch.float32)
    assert (tm.run_ours(model, phi4_ref.ids) - phi4_ref.logits).abs().max().item() > 100 * FP32_ATOL


def test_paged_cache_with_window_shorter_than_prompt(references: dict[str, tm.TinyReference]) -> None:
    """The window-24 model over the paged cache (blocks of 4, chunks of 16 then decodes, shuffled
    block table): transformers' logits at every position."""
    from mistralrs_serve.engine.kv_cache import PagedKVCache
    from mistralrs_serve.layers.attention import PagedAttention

    ref = references["phi3-window"]
    model = _model(ref)
    block_size, ids = 4, ref.ids
    cache = PagedKVCache(model.config, 32, block_size, torch.float32)
    table = np.random.default_rng(0).permutation(32)[: len(ids) // block_size].astype(np.int32)[None, :]
    chunks = [16, 16, 16] + [1] * 16
    rows, start = [], 0
    for n in chunks:
        pos = np.arange(start, start + n)
        slots = table[0, pos // block_size].astype(np.int64) * block_size + pos % block_size
        attn = PagedAttention(cache, np.array([n]), np.array([start + n]), slots, table)
        ids_t, pos_t = torch.tensor(ids[start : start + n]), torch.from_numpy(pos)
        rows.append(model.forward(ids_t, pos_t, attn, torch.arange(n)))
        start += n
    _assert_close(torch.cat(rows), ref.logits, "paged cache, window 24 < prompt 64")


def test_bf16_agrees_loosely(ref: tm.TinyReference) -> None:
    got = tm.run_ours(ref.ours(torch.bfloat16).model, ref.ids, [48] + [1] * 16)
    top1 = (got.argmax(-1) == ref.logits.argmax(-1)).float().mean().item()
    assert top1 >= 0.9, f"bf16 top-1 agreement {top1:.3f}"
    assert tm.row_correlations(got, ref.logits).min().item() >= 0.99


@pytest.mark.parametrize("name", ["phi3-window", "phi4mini-longrope"])
def test_engine_greedy_matches_transformers_generate(
    name: str, references: dict[str, tm.TinyReference]
) -> None:
    """Through the engine (blocks of 4, prefill chunks of 16) a 40-token prompt and 12 greedy tokens:
    transformers' generate, token for token (over a window of 24; with the long factor set)."""
    from mistralrs_serve.config import EngineConfig
    from mistralrs_serve.engine.llm_engine import LLMEngine
    from mistralrs_serve.sampling_params import SamplingParams

    ref = references[name]
    prompt, new = tm.prompt_ids(40, ref.vocab_size, seed=3), 12
    hf = tm.load_hf_model(ref.directory)
    hf.generation_config.eos_token_id = None  # as ignore_eos
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=0)
    engine = LLMEngine(
        ref.ours(torch.float32),
        EngineConfig(kv_cache_mb=4, block_size=4, max_num_batched_tokens=16, device="cpu"),
    )
    got = engine.generate(prompt, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
    assert got[0].token_ids == out[0, len(prompt) :].tolist()
    assert engine.scheduler.num_used_blocks == 0


def test_longrope_config_without_long_factor_names_file(tmp_path: Path) -> None:
    directory = save_phi3(tmp_path / "bad", **VARIANTS["phi4mini-longrope"])
    config_path = directory / "config.json"
    raw = json.loads(config_path.read_text())
    del raw["rope_parameters"]["long_factor"]
    config_path.write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match=r"config\.json.*long_factor"):
        load_model(ModelSource.parse(str(directory)), dtype=torch.float32)


# --- GGUF ---

GGUF_VARIANTS = ("phi3-window", "phi4mini-longrope")  # the converter ignores an explicit attention_factor


@pytest.mark.parametrize("name", GGUF_VARIANTS)
def test_gguf_matches_transformers(
    name: str, references: dict[str, tm.TinyReference], tmp_path: Path
) -> None:
    ref = references[name]
    path = write_phi3_gguf(ref.directory, tmp_path / f"{name}.gguf")
    loaded = load_model(ModelSource.parse(str(path)), dtype=torch.float32)
    hf_cfg = ref.ours(torch.float32).config
    for field in ("sliding_window", "extra", "num_heads", "num_kv_heads", "head_dim", "tie_word_embeddings"):
        assert getattr(loaded.config, field) == getattr(hf_cfg, field), field
    _assert_close(tm.run_ours(loaded.model, ref.ids), ref.logits, f"GGUF {name}, one-step prefill")
    chunks = [16] + [1] * (tm.PROMPT_LEN - 16)
    _assert_close(tm.run_ours(loaded.model, ref.ids, chunks), ref.logits, f"GGUF {name}, decode")


def test_gguf_q4_0_keeps_fused_weights_4bit(references: dict[str, tm.TinyReference], tmp_path: Path) -> None:
    """Q4_0 fused qkv and gate/up stay 4-bit, and the logits are transformers' on the same weights
    quantized and dequantized (per row, so fusing commutes with it)."""
    import gguf
    from mistralrs_serve.layers.block_weight import BlockWeight

    ref = references["phi4mini-longrope"]
    quant = gguf.GGMLQuantizationType.Q4_0
    path = write_phi3_gguf(ref.directory, tmp_path / "phi4-q4_0.gguf", quant=quant)
    model = load_model(ModelSource.parse(str(path)), dtype=torch.float32).model
    layer = model.layers[0]
    for fused in (layer.qkv, layer.gate_up):
        assert isinstance(fused.source, BlockWeight) and set(fused.source.type_names) == {"Q4_0"}
    want = tm.hf_logits(tm.load_hf_model_quant_roundtrip(ref.directory, quant), ref.ids)
    _assert_close(tm.run_ours(model, ref.ids), want, "GGUF Q4_0 against the round-tripped weights")


# --- Chat template and tool-call format ---

TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "chat_templates"


def test_phi35_chat_template_renders() -> None:
    from mistralrs_serve.tokenizer.chat_template import ChatTemplate

    source = (TEMPLATES / "microsoft-Phi-3.5-mini-instruct.jinja").read_text(encoding="utf-8")
    template = ChatTemplate(source, origin="Phi-3.5", bos_token="<s>", eos_token="<|endoftext|>")
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye?"},
    ]
    turns = (
        "<|system|>\nBe terse.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n"
        "<|user|>\nBye?<|end|>\n"
    )
    assert template.render(messages) == turns + "<|assistant|>\n"
    assert template.render(messages, add_generation_prompt=False) == turns + "<|endoftext|>"
    # an empty system message is left out
    assert template.render([{"role": "system", "content": ""}, *messages[1:2]]) == (
        "<|user|>\nHi<|end|>\n<|assistant|>\n"
    )


# Phi-4-mini's template (written here in its shape): tools in the system message between <|tool|> and
# <|/tool|>; the model answers `<|tool_call|>[...]<|/tool_call|>`.
PHI4_STYLE_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'system' and m['tools'] is defined %}<|tool|>{{ m['tools'] }}<|/tool|>{% endif %}"
    "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_phi4_mini_tool_calls_detected_and_parsed() -> None:
    from mistralrs_serve.entrypoints.openai.tool_parsers import detect_format

    fmt = detect_format(PHI4_STYLE_TEMPLATE)
    assert fmt.name == "phi4_mini"
    output = (
        'Let me look.<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_time", "arguments": {"tz": "CET"}}]<|/tool_call|>'
    )
    content, calls = fmt.parse(output)
    assert content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"tz": "CET"}),
    ]
    # streamed a character at a time: the same calls, and no markup in the content
    streamer = fmt.streamer()
    streamed = "".join(streamer.feed(ch).content for ch in output) + streamer.finish().content
    assert streamed == "Let me look." and [c.name for c in streamer.calls] == ["get_weather", "get_time"]
