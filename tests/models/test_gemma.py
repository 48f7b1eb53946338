"""Gemma 2 and Gemma 3 against transformers on tiny random models, from config.json and from GGUF
written as llama.cpp's converter writes them; the engine over the paged cache with a window shorter
than the prompt; config reading (both config.json layouts, llama.cpp's layer pattern, bad settings);
Gemma's chat template and tool-call format; and the real Gemma-3-270M Q4_K_M file where it is present.

Tolerances are test_logits_vs_transformers.py's (FP32_ATOL 1e-4; the bf16 bounds); the tiny models
are built so that each Gemma feature moves logits far beyond them: a window of 8 keys under 64-token
prompts, soft-caps near the scores' and logits' size, a global RoPE with linear scaling.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_models as tm
import torch
from mistralrs_serve import _native
from mistralrs_serve.config import EngineConfig, RopeScaling
from mistralrs_serve.engine.forward_paths import FusedPath
from mistralrs_serve.engine.llm_engine import LLMEngine
from mistralrs_serve.engine.sequence import CompletionOutput
from mistralrs_serve.errors import ChatTemplateError, ModelLoadError, UnsupportedModelError
from mistralrs_serve.models import gemma_config
from mistralrs_serve.models.loader import ModelSource, load_model
from mistralrs_serve.sampling_params import SamplingParams

FP32_ATOL = 1e-4
BF16_MIN_TOP1 = 0.90
BF16_MIN_CORR = 0.99
WINDOW = 8


@dataclass(frozen=True)
class GemmaSpec:
    name: str
    model_type: str  # "gemma2" or "gemma3_text"
    num_layers: int
    settings: dict[str, Any] = field(default_factory=dict)  # config kwargs beyond the common ones
    gguf: bool = True  # llama.cpp's scale rule (1/sqrt(head_dim)) holds, so GGUF can match


SPECS = {
    s.name: s
    for s in (
        # soft-caps near the scores' (~1-3) and logits' (~2-6) sizes, so both bend them
        GemmaSpec("gemma2", "gemma2", 4, {"attn_logit_softcapping": 2.0, "final_logit_softcapping": 4.0}),
        # six layers: llama.cpp's fixed pattern (five sliding, then a global) is transformers' default
        GemmaSpec(
            "gemma3",
            "gemma3_text",
            6,
            {
                "rope_parameters": {
                    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                }
            },
        ),
        # query_pre_attn_scalar apart from head_dim, an untied head, biases, explicit layer types
        GemmaSpec(
            "gemma3-scaled-untied",
            "gemma3_text",
            3,
            {
                "query_pre_attn_scalar": 24,
                "tie_word_embeddings": False,
                "attention_bias": True,
                "final_logit_softcapping": 6.0,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            },
            gguf=False,
        ),
    )
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- building the tiny models ---


def make_hf_model(spec: GemmaSpec, vocab_size: int, seed: int = 0) -> Any:
    import transformers

    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=tm.HIDDEN,
        intermediate_size=tm.INTERMEDIATE,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=tm.HEADS,
        num_key_value_heads=tm.KV_HEADS,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=tm.MAX_POSITIONS,
        sliding_window=WINDOW,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        pad_token_id=None,
        eos_token_id=vocab_size - 1,
    )
    kwargs.update(spec.settings)
    classes: tuple[Any, Any] = (
        (transformers.Gemma2Config, transformers.Gemma2ForCausalLM)
        if spec.model_type == "gemma2"
        else (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM)
    )
    config_cls, model_cls = classes
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Gemma norms scale by 1 + weight: their weights spread around 0, as biases do
            if name.endswith(("norm.weight", ".bias")):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            else:  # see tiny_models.make_hf_model for the scales
                fan_in = p.shape[1] if "embed" not in name else 16
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return model


def save_gemma(spec: GemmaSpec, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tok = tm.build_tokenizer()
    model = make_hf_model(spec, tok.get_vocab_size())
    model.config.eos_token_id = tok.token_to_id(tm.EOS_TOKEN)
    model.save_pretrained(directory, safe_serialization=True)
    tok.save(str(directory / "tokenizer.json"))
    tok_cfg = {"eos_token": tm.EOS_TOKEN, "bos_token": None, "chat_template": tm.CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return directory


def write_gemma_gguf(
    model_dir: Path,
    path: Path,
    quant: Any = None,
    tok: Any = None,
    eos_token: str = tm.EOS_TOKEN,
    chat_template: str = tm.CHAT_TEMPLATE,
) -> Path:
    """The saved model as llama.cpp's converter writes gemma2/gemma3: the gguf package's tensor
    names, every norm weight stored as 1 + weight, no q/k permutation, no lm_head (tied)."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    arch = "gemma2" if cfg["model_type"] == "gemma2" else "gemma3"
    names = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH.GEMMA2 if arch == "gemma2" else gguf.MODEL_ARCH.GEMMA3, 64
    )
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_sliding_window(cfg["sliding_window"])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    else:
        full = cfg["rope_parameters"]["full_attention"]
        w.add_rope_freq_base(full["rope_theta"])
        if full["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full["factor"])
        if cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    tm.add_tokenizer_metadata(w, tok or tm.build_tokenizer(), eos_token, chat_template)
    for name, t in load_file(str(model_dir / "model.safetensors")).items():
        if name == "lm_head.weight":
            continue
        t = np.ascontiguousarray(t + 1 if name.endswith("norm.weight") else t, dtype=np.float32)
        module = names.get_name(name.removesuffix(".weight"))
        assert module is not None, name
        target = module + ".weight"
        if quant is not None and t.ndim == 2 and "embed" not in name:
            w.add_tensor(target, gguf.quants.quantize(t, quant), raw_dtype=quant)
        else:
            w.add_tensor(target, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tm.TinyReference]:
    root = tmp_path_factory.mktemp("tiny_gemma")
    return {name: tm.TinyReference(save_gemma(spec, root / name)) for name, spec in SPECS.items()}


@pytest.fixture(params=sorted(SPECS))
def ref(request: pytest.FixtureRequest, references: dict[str, tm.TinyReference]) -> tm.TinyReference:
    return references[request.param]


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> float:
    assert got.shape == want.shape, what
    worst = (got - want).abs().max().item()
    assert worst <= FP32_ATOL, f"{what}: max |ours - transformers| = {worst:.3g} (atol {FP32_ATOL})"
    return worst


# --- logits against transformers, from config.json ---


def test_config_read_from_config_json(ref: tm.TinyReference) -> None:
    spec = SPECS[ref.directory.name]
    cfg = ref.ours(torch.float32).config
    hf = json.loads((ref.directory / "config.json").read_text())
    assert cfg.architecture == ("gemma2" if spec.model_type == "gemma2" else "gemma3")
    assert cfg.sliding_window == WINDOW
    assert cfg.extra["sliding_layers"] == tuple(t == "sliding_attention" for t in hf["layer_types"])
    assert cfg.extra["attn_scale"] == pytest.approx(hf["query_pre_attn_scalar"] ** -0.5)
    assert cfg.qk_norm == (spec.model_type == "gemma3_text")
    assert cfg.tie_word_embeddings == hf.get("tie_word_embeddings", True)
    if spec.name == "gemma3":
        assert (cfg.rope_theta, cfg.extra["local_rope_theta"]) == (1_000_000.0, 10_000.0)
        assert cfg.rope_scaling == RopeScaling(rope_type="linear", factor=8.0)


def test_fp32_prefill_matches_transformers(ref: tm.TinyReference) -> None:
    got = tm.run_ours(ref.ours(torch.float32).model, ref.ids)
    _assert_close(got, ref.logits, "one-step prefill")


def test_fp32_prefill_then_decode_matches_transformers(ref: tm.TinyReference) -> None:
    chunks = [16] + [1] * (tm.PROMPT_LEN - 16)
    got = tm.run_ours(ref.ours(torch.float32).model, ref.ids, chunks)
    _assert_close(got, ref.logits, "prefill of 16 then token-by-token decode")


def test_fp32_chunked_prefill_matches_transformers(ref: tm.TinyReference) -> None:
    chunks = [1, 5, 7, 13, 17, 21]
    got = tm.run_ours(ref.ours(torch.float32).model, ref.ids, chunks)
    _assert_close(got, ref.logits, f"prefill in chunks of {chunks}")


def test_bf16_agrees_loosely(ref: tm.TinyReference) -> None:
    loaded = ref.ours(torch.bfloat16)
    got = tm.run_ours(loaded.model, ref.ids, [tm.PROMPT_LEN - 8] + [1] * 8)
    top1 = (got.argmax(-1) == ref.logits.argmax(-1)).float().mean().item()
    corr = tm.row_correlations(got, ref.logits).min().item()
    assert top1 >= BF16_MIN_TOP1 and corr >= BF16_MIN_CORR, f"bf16 top-1 {top1:.3f}, correlation {corr:.5f}"


def _without(model: Any, **changes: Any) -> Any:
    """The same model with every layer's LayerAttention fields replaced (window=None: no window)."""
    from dataclasses import replace

    for layer in model.layers:
        layer.how = replace(layer.how, **{k: v for k, v in changes.items() if hasattr(layer.how, k)})
    return model


@pytest.mark.parametrize("feature", ["window", "softcap", "final_softcap", "local_rope"])
def test_each_gemma_feature_moves_logits(references: dict[str, tm.TinyReference], feature: str) -> None:
    """Without each feature the logits leave the tolerance: the parity tests above cannot pass by
    accident of a feature too weak to show."""
    ref = references["gemma2" if feature in ("softcap", "final_softcap") else "gemma3"]
    model: Any = load_model(ModelSource.parse(str(ref.directory)), dtype=torch.float32).model
    if feature in ("window", "softcap"):
        _without(model, **{feature: None})
    elif feature == "final_softcap":
        model.final_softcap = None
    else:
        model.local_rotary = model.global_rotary
    assert (tm.run_ours(model, ref.ids) - ref.logits).abs().max().item() > 100 * FP32_ATOL


# --- GGUF, as llama.cpp's converter writes it ---


@pytest.mark.parametrize("name", [n for n, s in SPECS.items() if s.gguf])
def test_gguf_matches_transformers(
    references: dict[str, tm.TinyReference], name: str, tmp_path: Path
) -> None:
    ref = references[name]
    path = write_gemma_gguf(ref.directory, tmp_path / f"{name}.gguf")
    loaded = load_model(ModelSource.parse(str(path)), dtype=torch.float32)
    hf_cfg = loaded.config
    ours_from_hf = ref.ours(torch.float32).config
    assert hf_cfg.extra["sliding_layers"] == ours_from_hf.extra["sliding_layers"]
    assert hf_cfg.sliding_window == WINDOW and hf_cfg.tie_word_embeddings
    _assert_close(tm.run_ours(loaded.model, ref.ids), ref.logits, f"{name} GGUF prefill")
    _assert_close(tm.run_ours(loaded.model, ref.ids, [40] + [1] * 24), ref.logits, f"{name} GGUF decode")


@pytest.mark.skipif(
    not _native.QuantMatrix.has_fast_kernel(), reason="the fused forward needs AVX-512 VNNI or AVX2"
)
@pytest.mark.parametrize("name", ["gemma3", "gemma2"])
def test_q8_0_runs_fused_as_the_torch_path_does(
    references: dict[str, tm.TinyReference], tmp_path: Path, name: str
) -> None:
    """Gemma 3 and 2 on the fused CPU step (GELU-tanh, post norms, windows of 8 under a longer
    prompt; Gemma 3's local layers' own RoPE, Gemma 2's scores soft-capped at 2) against the torch
    path on the same GGUF blocks: the fused step quantizes activations to 8 bits, so close, not
    equal."""
    import gguf

    ref = references[name]
    path = write_gemma_gguf(ref.directory, tmp_path / f"{name}-q8.gguf", quant=gguf.GGMLQuantizationType.Q8_0)
    loaded = load_model(ModelSource.parse(str(path)), dtype=torch.float32)
    engine = LLMEngine(loaded, EngineConfig(kv_cache_mb=16, block_size=4))
    fused = engine.runner.path
    assert isinstance(fused, FusedPath)
    ids = ref.ids
    assert len(ids) > 3 * WINDOW
    pos = np.arange(len(ids))
    table = np.arange(len(ids) // 4 + 1, dtype=np.int64)[None]
    args = (pos, table[0, pos // 4] * 4 + pos % 4, np.repeat(table, len(ids), 0), pos + 1, pos)
    got = fused.fused.forward(np.asarray(ids, dtype=np.int64), *args)
    want = tm.run_ours(loaded.model, ids)
    corr = tm.row_correlations(got, want)
    assert corr.min().item() >= 0.999, corr.min().item()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9
    # and the tokens a step makes do not depend on how the prompt was cut
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    whole = engine.generate(ids, params)[0].token_ids
    chunked = LLMEngine(loaded, EngineConfig(kv_cache_mb=16, block_size=4, max_num_batched_tokens=7))
    assert chunked.generate(ids, params)[0].token_ids == whole


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0"])
def test_quantized_gguf_matches_quantized_reference(
    references: dict[str, tm.TinyReference], tmp_path: Path, quant: str
) -> None:
    """Quantized linear weights (Q4_0 loads as 4-bit Linear weights): against transformers with the
    same weights quantized and dequantized by the gguf package."""
    import gguf

    qtype = gguf.GGMLQuantizationType[quant]
    ref = references["gemma3"]
    path = write_gemma_gguf(ref.directory, tmp_path / f"gemma3-{quant}.gguf", quant=qtype)
    want = tm.hf_logits(tm.load_hf_model_quant_roundtrip(ref.directory, qtype), ref.ids)
    got = tm.run_ours(load_model(ModelSource.parse(str(path)), dtype=torch.float32).model, ref.ids)
    _assert_close(got, want, f"{quant} GGUF")


def test_gguf_norms_are_stored_plus_one_and_undone(references: dict[str, tm.TinyReference]) -> None:
    cfg = references["gemma3"].ours(torch.float32).config
    norm = torch.tensor([1.25, 0.5, 1.0])
    fixup = gemma_config.gguf_fixup
    for name in ("model.norm.weight", "model.layers.0.self_attn.q_norm.weight"):
        assert torch.equal(fixup(name, norm, cfg), norm - 1)  # type: ignore[arg-type]
    assert fixup("model.layers.0.mlp.up_proj.weight", norm, cfg) is norm


def test_gguf_layer_patterns_follow_llama_cpp() -> None:
    assert gemma_config.sliding_by_pattern(12, 6) == (True,) * 5 + (False,) + (True,) * 5 + (False,)
    assert gemma_config.sliding_by_pattern(4, 2) == (True, False, True, False)
    meta = {
        "block_count": 18,
        "embedding_length": 640,
        "attention.head_count": 4,
        "attention.key_length": 256,
    }
    extra = gemma_config.gemma3_gguf_extra(meta.get, [])
    assert extra["sliding_window"] is None and not any(extra["extra"]["sliding_layers"])  # no window key
    meta["attention.sliding_window"] = 512
    extra = gemma_config.gemma3_gguf_extra(meta.get, [])
    assert [i for i, s in enumerate(extra["extra"]["sliding_layers"]) if not s] == [5, 11, 17]
    assert extra["extra"]["attn_scale"] == 256**-0.5 and extra["extra"]["local_rope_theta"] == 10_000.0
    meta |= {
        "block_count": 62,
        "embedding_length": 5376,
        "attention.head_count": 32,
        "attention.key_length": 128,
    }
    big = gemma_config.gemma3_gguf_extra(meta.get, [])
    assert big["extra"]["attn_scale"] == 168**-0.5  # 27B: hidden / heads, as llama.cpp


# --- config.json layouts and bad settings ---


def test_gemma3_legacy_config_keys() -> None:
    """transformers 4.x configs (rope_theta, rope_local_base_freq, rope_scaling, sliding_window_pattern)
    read as their 5.x form does."""
    legacy = {
        "num_hidden_layers": 8,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "sliding_window": 1024,
        "sliding_window_pattern": 4,
        "query_pre_attn_scalar": 256,
    }
    out = gemma_config.gemma3_hf_extra(legacy)
    assert out["rope_theta"] == 1_000_000.0 and out["rope_scaling"].factor == 8.0
    assert out["extra"]["local_rope_theta"] == 10_000.0
    assert out["extra"]["local_rope_scaling"].rope_type == "default"
    assert out["extra"]["sliding_layers"] == (True, True, True, False) * 2
    assert out["sliding_window"] == 1024 and out["tie_word_embeddings"]


def _edit_config(ref: tm.TinyReference, tmp_path: Path, **changes: Any) -> Path:
    import shutil

    target = tmp_path / ref.directory.name
    shutil.copytree(ref.directory, target)
    cfg = json.loads((target / "config.json").read_text()) | changes
    (target / "config.json").write_text(json.dumps(cfg))
    return target


def test_unsupported_activation_names_file_and_setting(
    references: dict[str, tm.TinyReference], tmp_path: Path
) -> None:
    directory = _edit_config(references["gemma2"], tmp_path, hidden_activation="relu")
    with pytest.raises(UnsupportedModelError) as err:
        load_model(ModelSource.parse(str(directory)), dtype=torch.float32)
    assert "config.json" in str(err.value) and "hidden_activation='relu'" in str(err.value)


def test_bad_layer_types_are_refused(references: dict[str, tm.TinyReference], tmp_path: Path) -> None:
    directory = _edit_config(references["gemma3"], tmp_path, layer_types=["chunked_attention"] * 6)
    with pytest.raises(ModelLoadError, match="layer_types"):
        load_model(ModelSource.parse(str(directory)), dtype=torch.float32)


def test_vision_gemma3_directory_serves_its_text_model(
    references: dict[str, tm.TinyReference], tmp_path: Path
) -> None:
    """A Gemma3ForConditionalGeneration config (the text settings in text_config) over the
    text model's weights, without vision_config, loads as that text model, for text only."""
    text = json.loads((references["gemma3"].directory / "config.json").read_text())
    directory = _edit_config(
        references["gemma3"],
        tmp_path,
        architectures=["Gemma3ForConditionalGeneration"],
        model_type="gemma3",
        text_config=text,
    )
    loaded = load_model(ModelSource.parse(str(directory)), dtype=torch.float32)
    assert loaded.vision is None
    _assert_close(
        tm.run_ours(loaded.model, references["gemma3"].ids), references["gemma3"].logits, "text model"
    )


# --- the engine over the paged cache, window shorter than the prompt ---


def test_engine_greedy_matches_transformers(references: dict[str, tm.TinyReference]) -> None:
    """Chunked prefill (8-token steps) and decode through the paged cache, block size 4, a window
    of 8 under 40-token prompts: greedy tokens equal transformers' greedy continuation."""
    ref = references["gemma3"]
    engine = LLMEngine(
        ref.ours(torch.float32), EngineConfig(kv_cache_mb=4, block_size=4, max_num_batched_tokens=8)
    )
    prompts = [ref.ids[:40], ref.ids[10:50]]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outputs = [CompletionOutput(0) for _ in prompts]
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, params, outputs[i].add)
    while engine.has_unfinished_requests():
        engine.step()
    hf = tm.load_hf_model(ref.directory)
    for prompt, out in zip(prompts, outputs, strict=True):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt) :]
        assert out.token_ids == want.tolist()


# --- chat template and tool-call format ---


def test_gemma_chat_template_renders_turns() -> None:
    from mistralrs_serve.tokenizer.chat_template import ChatTemplate

    from tests.unit.template_data import read_template

    template = ChatTemplate(read_template("google-gemma-2-2b-it.jinja"), origin="gemma-2", bos_token="<bos>")
    messages = [
        {"role": "user", "content": "Hi "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of France?"},
    ]
    assert template.render(messages) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n"
    )
    # Gemma 2's template refuses a system turn (it raises, as under transformers): a 400, not a crash
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        template.render([{"role": "system", "content": "Be brief."}, *messages])


def test_gemma_gets_the_generic_json_tool_format() -> None:
    from mistralrs_serve.entrypoints.openai.tool_parsers.registry import JSON, detect_format

    from tests.unit.template_data import read_template

    assert detect_format(read_template("google-gemma-2-2b-it.jinja")) is JSON


# --- the real file ---


def test_real_gemma3_270m_q4_k_m_greedy_text() -> None:
    """Gemma-3-270M (base), Q4_K_M: llama.cpp's layer pattern and window, "Paris" among the five likeliest
    next tokens (transformers, loading the same file, ranks " the", " a", " Paris" first: measured),
    and a greedy continuation in words."""
    start = time.perf_counter()
    loaded = load_model(ModelSource.parse("gemma-3-270m"), dtype=torch.bfloat16)  # the packaged model
    load_s = time.perf_counter() - start
    cfg = loaded.config
    assert (cfg.architecture, cfg.num_layers, cfg.sliding_window) == ("gemma3", 18, 512)
    assert [i for i, s in enumerate(cfg.extra["sliding_layers"]) if not s] == [5, 11, 17]
    tok = loaded.tokenizer
    ids = tok.encode("The capital of France is")
    top5 = tm.run_ours(loaded.model, ids)[-1].topk(5).indices.tolist()
    assert " Paris" in [tok.decode([t]) for t in top5]
    engine = LLMEngine(loaded, EngineConfig(kv_cache_mb=64))
    out = CompletionOutput(0)
    engine.add_request("r", ids, SamplingParams(max_tokens=16, temperature=0.0), out.add)
    while engine.has_unfinished_requests():
        engine.step()
    text = tok.decode(out.token_ids)
    print(f"load {load_s:.1f} s; greedy: {text!r}")
    assert len(text.split()) >= 8 and all(w.strip(".,;:'\"()").isalpha() for w in text.split()), text
