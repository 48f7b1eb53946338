"""Mistral and Ministral (sliding-window layers) and SmolLM3 (layers without rotary) against transformers.

Tiny random models as in tiny_models.py (hidden 64, byte-level BPE vocabulary), built here with each
family's transformers config. Windows are 8 keys against 64-token prompts, so the window changes every
logit past position 8: running without it (or with rotary on SmolLM3's no-rope layers) misses by far more
than the fp32 tolerance, which the tests check too. GGUF files are written the way llama.cpp's converter
writes these families (Mistral as "llama", SmolLM3 as "smollm3", both with q/k rows permuted).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_models as tm
import torch
from mistralrs_serve.config import EngineConfig
from mistralrs_serve.engine.llm_engine import LLMEngine
from mistralrs_serve.errors import ModelLoadError, UnsupportedModelError
from mistralrs_serve.layers.attention import PLAIN
from mistralrs_serve.models.loader import ModelSource, load_model
from mistralrs_serve.sampling_params import SamplingParams

FP32_ATOL = 1e-4
WINDOW = 8
SLIDING, FULL = "sliding_attention", "full_attention"

# name: (transformers config class, model class, config settings beyond tiny_models' common ones)
SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mistral-w8": ("MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}),
    "mistral-nowindow": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "ministral": (
        "MinistralConfig",
        "MinistralForCausalLM",
        {
            "num_hidden_layers": 3,
            "sliding_window": WINDOW,
            "layer_types": [SLIDING, FULL, SLIDING],
            # transformers 5.25's MinistralConfig leaves head_dim None unless given
            "head_dim": tm.HIDDEN // tm.HEADS,
        },
    ),
    "ministral3": (
        "Ministral3Config",
        "Ministral3ForCausalLM",
        {
            "head_dim": tm.HIDDEN // tm.HEADS,
            # a short original context, so that 64-token prompts reach YaRN's scaled frequencies
            # and Llama 4's query scale (1 up to position 15, then growing)
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": tm.ROPE_THETA,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "beta_fast": 8.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 0.5,
                "llama_4_scaling_beta": 0.1,
            },
        },
    ),
    "smollm3": (
        "SmolLM3Config",
        "SmolLM3ForCausalLM",
        {"num_hidden_layers": 4, "no_rope_layers": [1, 0, 1, 0], "tie_word_embeddings": False},
    ),
    "smollm3-default": ("SmolLM3Config", "SmolLM3ForCausalLM", {"num_hidden_layers": 4}),
    "smollm3-window": (
        "SmolLM3Config",
        "SmolLM3ForCausalLM",
        {
            "num_hidden_layers": 4,
            "no_rope_layers": [0, 1, 1, 0],
            "use_sliding_window": True,
            "sliding_window": WINDOW,
        },
    ),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_model(name: str, directory: Path, seed: int = 0) -> Path:
    """A tiny model of spec `name` with well-spread weights, saved with tiny_models' tokenizer."""
    import transformers

    config_cls, model_cls, settings = SPECS[name]
    tok = tm.build_tokenizer()
    vocab = tok.get_vocab_size()
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=tm.HIDDEN,
        intermediate_size=tm.INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=tm.HEADS,
        num_key_value_heads=tm.KV_HEADS,
        max_position_embeddings=tm.MAX_POSITIONS,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": tm.ROPE_THETA},
        bos_token_id=None,
        eos_token_id=tok.token_to_id(tm.EOS_TOKEN),
        pad_token_id=None,
    )
    config = getattr(transformers, config_cls)(**{**kwargs, **settings})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 2:
                fan_in = p.shape[1] if "embed" not in pname else 16
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    directory.mkdir(parents=True, exist_ok=True)
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


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tm.TinyReference]:
    root = tmp_path_factory.mktemp("mistral_smollm3")
    return {name: tm.TinyReference(save_model(name, root / name)) for name in SPECS}


@pytest.fixture(params=sorted(SPECS))
def ref(request: pytest.FixtureRequest, refs: dict[str, tm.TinyReference]) -> tm.TinyReference:
    return refs[request.param]


def max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape
    return (got - want).abs().max().item()


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    diff = max_diff(got, want)
    assert diff <= FP32_ATOL, f"{what}: max |ours - transformers| = {diff:.3g} (atol {FP32_ATOL})"


# --- Hugging Face directories ---


EXPECTED_LAYERS = {
    # name: (architecture, window per layer (None: full), rotary per layer)
    "mistral-w8": ("mistral", [WINDOW] * 2, [True] * 2),
    "mistral-nowindow": ("mistral", [None] * 2, [True] * 2),
    "ministral": ("ministral", [WINDOW, None, WINDOW], [True] * 3),
    "ministral3": ("ministral3", [None] * 2, [True] * 2),
    "smollm3": ("smollm3", [None] * 4, [True, False, True, False]),
    "smollm3-default": ("smollm3", [None] * 4, [True, True, True, False]),
    "smollm3-window": ("smollm3", [WINDOW, None, None, WINDOW], [False, True, True, False]),
}


def test_config_gives_each_layer_its_window_and_rotary(ref: tm.TinyReference) -> None:
    arch, windows, rope = EXPECTED_LAYERS[ref.directory.name]
    model: Any = ref.ours(torch.float32).model
    assert model.config.architecture == arch
    assert [layer.how.window for layer in model.layers] == windows
    assert [layer.use_rope for layer in model.layers] == rope
    plain = all(w is None for w in windows) and all(rope)
    # the fused Rust forward computes plain layers only
    assert model.is_plain() == plain
    if not plain:
        assert model.fused_forward(np.zeros(1, dtype=np.float32)) is None


@pytest.mark.parametrize(
    "chunks", [None, [16] + [1] * 48, [1, 5, 7, 13, 17, 21]], ids=["one", "decode", "chunked"]
)
def test_fp32_logits_match_transformers(ref: tm.TinyReference, chunks: list[int] | None) -> None:
    got = tm.run_ours(ref.ours(torch.float32).model, ref.ids, chunks)
    assert_close(got, ref.logits, f"{ref.directory.name}, chunks {chunks}")


def test_selected_rows_match(refs: dict[str, tm.TinyReference]) -> None:
    ref = refs["ministral"]
    model = ref.ours(torch.float32).model
    cache = tm.ContiguousKVCache(model.config, tm.PROMPT_LEN, torch.float32)
    cache.begin_step(tm.PROMPT_LEN)
    rows = torch.tensor([tm.PROMPT_LEN - 1, 3, 40])
    got = model.forward(torch.tensor(ref.ids), torch.arange(tm.PROMPT_LEN), cache, rows)
    assert_close(got, ref.logits[rows], "selected rows")


@pytest.mark.parametrize("name", ["mistral-w8", "ministral", "smollm3", "smollm3-window"])
def test_the_window_and_the_missing_rotary_matter(refs: dict[str, tm.TinyReference], name: str) -> None:
    """Plain layers (window dropped, rotary everywhere) miss transformers by far: the tests above bite."""
    ref = refs[name]
    model: Any = load_model(ModelSource.parse(str(ref.directory)), dtype=torch.float32).model
    for layer in model.layers:
        layer.how, layer.use_rope = PLAIN, True
    assert max_diff(tm.run_ours(model, ref.ids), ref.logits) > 100 * FP32_ATOL


def test_ministral3_yarn_and_query_scale_matter(refs: dict[str, tm.TinyReference]) -> None:
    """Plain rotary, or no query scale, misses transformers by far; the fused forward knows neither."""
    from mistralrs_serve.config import RopeScaling
    from mistralrs_serve.layers.rotary import RotaryTable

    ref = refs["ministral3"]
    model: Any = load_model(ModelSource.parse(str(ref.directory)), dtype=torch.float32).model
    assert model.fused_forward(np.zeros(1, dtype=np.float32)) is None
    model.query_beta = 0.0
    assert max_diff(tm.run_ours(model, ref.ids), ref.logits) > 100 * FP32_ATOL
    model = load_model(ModelSource.parse(str(ref.directory)), dtype=torch.float32).model
    cfg = model.config
    model.rotary = RotaryTable(
        cfg.head_dim, cfg.rope_theta, RopeScaling(), cfg.max_position_embeddings, torch.float32
    )
    assert max_diff(tm.run_ours(model, ref.ids), ref.logits) > 100 * FP32_ATOL


def test_bf16_agrees_loosely(refs: dict[str, tm.TinyReference]) -> None:
    for name in ("mistral-w8", "smollm3-window"):
        ref = refs[name]
        got = tm.run_ours(ref.ours(torch.bfloat16).model, ref.ids, [48] + [1] * 16)
        top1 = (got.argmax(-1) == ref.logits.argmax(-1)).float().mean().item()
        assert top1 >= 0.9, f"{name}: bf16 top-1 agreement {top1:.3f}"
        assert tm.row_correlations(got, ref.logits).min().item() >= 0.99


def _edit_config(src: Path, dst: Path, **changes: Any) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **changes}))
    return dst


def test_bad_layer_settings_name_the_file_and_setting(
    refs: dict[str, tm.TinyReference], tmp_path: Path
) -> None:
    bad = _edit_config(refs["ministral"].directory, tmp_path / "ministral", layer_types=[SLIDING, FULL])
    with pytest.raises(ModelLoadError, match=r"config\.json.*layer_types must list 3"):
        load_model(ModelSource.parse(str(bad)), dtype=torch.float32)
    bad = _edit_config(refs["smollm3"].directory, tmp_path / "smollm3", no_rope_layers=[1, 2, 1, 0])
    with pytest.raises(ModelLoadError, match=r"config\.json.*no_rope_layers must list 4 entries of 0 or 1"):
        load_model(ModelSource.parse(str(bad)), dtype=torch.float32)
    plain_rope = {"rope_type": "default", "rope_theta": tm.ROPE_THETA}
    bad = _edit_config(refs["ministral3"].directory, tmp_path / "ministral3", rope_parameters=plain_rope)
    with pytest.raises(UnsupportedModelError, match=r"config\.json.*rope type 'default': only yarn"):
        load_model(ModelSource.parse(str(bad)), dtype=torch.float32)


def test_a_window_covering_the_context_leaves_the_layers_plain(
    refs: dict[str, tm.TinyReference], tmp_path: Path
) -> None:
    """Ministral 8B's window equals its context: nothing to mask, and the fused forward may run."""
    for window, plain in ((tm.MAX_POSITIONS - 1, False), (tm.MAX_POSITIONS, True)):
        edited = _edit_config(refs["ministral"].directory, tmp_path / str(window), sliding_window=window)
        model: Any = load_model(ModelSource.parse(str(edited)), dtype=torch.float32).model
        assert model.config.sliding_window == (None if plain else window)
        assert model.is_plain() == plain


def test_mistral_window_absent_from_config_json_is_transformers_default(
    refs: dict[str, tm.TinyReference], tmp_path: Path
) -> None:
    src = refs["mistral-w8"].directory
    shutil.copytree(src, tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["sliding_window"]
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 32768}))
    from mistralrs_serve.models.hf_loader import read_hf_config

    assert read_hf_config(tmp_path / "m").sliding_window == 4096


# --- GGUF, as llama.cpp's converter writes these families ---


def _write_permuted_gguf(ref: tm.TinyReference, tmp: Path, arch: str) -> Path:
    """write_gguf_from_hf permutes q/k only for "llama": permute a copy's weights first for `arch`."""
    from safetensors.numpy import load_file, save_file

    copy = tmp / f"{ref.directory.name}-{arch}"
    shutil.copytree(ref.directory, copy)
    weights = load_file(str(copy / "model.safetensors"))
    for name, w in weights.items():
        if ".q_proj." in name:
            weights[name] = np.ascontiguousarray(tm.permute_qk(w, tm.HEADS))
        elif ".k_proj." in name:
            weights[name] = np.ascontiguousarray(tm.permute_qk(w, tm.KV_HEADS))
    save_file(weights, str(copy / "model.safetensors"))
    return tm.write_gguf_from_hf(copy, tmp / f"{copy.name}.gguf", arch_name=arch)


def test_gguf_mistral_is_llama(refs: dict[str, tm.TinyReference], tmp_path: Path) -> None:
    """llama.cpp converts MistralForCausalLM to "llama" without a window: it loads as Llama."""
    ref = refs["mistral-nowindow"]
    loaded = load_model(ModelSource.parse(str(ref.gguf(tmp_path, arch_name="llama"))), dtype=torch.float32)
    assert loaded.config.architecture == "llama"
    assert loaded.config.sliding_window is None
    assert_close(tm.run_ours(loaded.model, ref.ids, [16] + [1] * 48), ref.logits, "Mistral GGUF")


def test_gguf_smollm3_skips_rotary_on_every_fourth_layer(
    refs: dict[str, tm.TinyReference], tmp_path: Path
) -> None:
    ref = refs["smollm3-default"]
    loaded = load_model(ModelSource.parse(str(_write_permuted_gguf(ref, tmp_path, "smollm3"))), torch.float32)
    assert loaded.config.architecture == "smollm3"
    model: Any = loaded.model
    assert [layer.use_rope for layer in model.layers] == [True, True, True, False]
    assert_close(tm.run_ours(loaded.model, ref.ids), ref.logits, "SmolLM3 GGUF, one step")
    assert_close(
        tm.run_ours(loaded.model, ref.ids, [1, 5, 7, 13, 17, 21]), ref.logits, "SmolLM3 GGUF, chunked"
    )


def _write_mistral3_gguf(ref: tm.TinyReference, path: Path) -> Path:
    """Ministral 3 as llama.cpp's converter writes it: arch "mistral3", q/k rows permuted, YaRN keys
    (mscale_all_dim as the log multiplier) and llama_4_scaling_beta as the attention temperature scale."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((ref.directory / "config.json").read_text())
    rope = cfg["rope_parameters"]
    w = gguf.GGUFWriter(str(path), "mistral3")
    w.add_vocab_size(cfg["vocab_size"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(tm.HEADS)
    w.add_head_count_kv(tm.KV_HEADS)
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
    w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    w.add_rope_scaling_yarn_log_mul(rope["mscale_all_dim"])
    w.add_attn_temperature_scale(rope["llama_4_scaling_beta"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tm.add_tokenizer_metadata(w, tm.build_tokenizer())
    for name, t in load_file(str(ref.directory / "model.safetensors")).items():
        if ".q_proj." in name or ".k_proj." in name:
            t = tm.permute_qk(t, tm.HEADS if ".q_proj." in name else tm.KV_HEADS)
        w.add_tensor(tm.gguf_name(name), np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_ministral3_keeps_yarn_and_the_query_scale(
    refs: dict[str, tm.TinyReference], tmp_path: Path
) -> None:
    ref = refs["ministral3"]
    loaded = load_model(
        ModelSource.parse(str(_write_mistral3_gguf(ref, tmp_path / "m3.gguf"))), torch.float32
    )
    assert loaded.config.architecture == "ministral3"
    assert_close(tm.run_ours(loaded.model, ref.ids, [16] + [1] * 48), ref.logits, "Ministral 3 GGUF")


# --- Through the engine's paged cache ---


@pytest.mark.parametrize("name", ["mistral-w8", "ministral", "smollm3-window", "ministral3"])
def test_engine_greedy_matches_transformers_generate(refs: dict[str, tm.TinyReference], name: str) -> None:
    """A 40-token prompt (over windows of 8 where the model has them), in blocks of 4 and prefill
    chunks of 16, then decode: the real engine's greedy tokens are transformers' generate's."""
    import transformers

    ref = refs[name]
    prompt, new = tm.prompt_ids(40, ref.vocab_size, seed=3), 12
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        ref.directory, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    # no end-of-sequence token, as ignore_eos (min_new_tokens would instead forbid it)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=0)
    want = out[0, len(prompt) :].tolist()
    engine = LLMEngine(
        ref.ours(torch.float32),
        EngineConfig(kv_cache_mb=4, block_size=4, max_num_batched_tokens=16, device="cpu"),
    )
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    got = engine.generate(prompt, params)[0].token_ids
    assert got == want
    assert engine.scheduler.num_used_blocks == 0


# --- Chat templates and tool-call formats of these families ---

TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "chat_templates"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL_ID = "abc123XYZ"  # Mistral's templates demand 9 alphanumerics
HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": CALL_ID,
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": CALL_ID, "content": "sunny, 21 C"},
    {"role": "assistant", "content": "Sunny in Paris."},
    {"role": "user", "content": "And in Lyon?"},
]
# stem: (format detected, what the model writes to call get_weather(city="Lyon") in it)
MODEL_CALLS = {
    "mistralai-Mistral-Nemo-Instruct-2407": (
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lyon"}}]',
    ),
    "Mistral-Small-3.2-24B-Instruct-2506": ("mistral_v11", '[TOOL_CALLS]get_weather[ARGS]{"city": "Lyon"}'),
    # This (Unsloth-edited) SmolLM3 template has no tool section: the server adds its own JSON instructions.
    "HuggingFaceTB-SmolLM3-3B": ("json", '{"name": "get_weather", "arguments": {"city": "Lyon"}}'),
}


def _template(stem: str) -> Any:
    from mistralrs_serve.tokenizer.chat_template import ChatTemplate

    path = TEMPLATES / f"{stem}.jinja"
    return ChatTemplate(path.read_text(encoding="utf-8"), origin=str(path), bos_token="<s>", eos_token="</s>")


def _format_for(template: Any) -> Any:
    """As ChatServing.prepare picks it."""
    from mistralrs_serve.entrypoints.openai.tool_parsers.registry import detect_format

    return detect_format(template.tools_source if template.supports_tools else None)


@pytest.mark.parametrize("stem", sorted(MODEL_CALLS))
def test_template_renders_tools_and_its_format_reads_the_model_call(stem: str) -> None:
    from mistralrs_serve.entrypoints.openai.tools import with_tool_prompt

    template = _template(stem)
    fmt_name, model_output = MODEL_CALLS[stem]
    fmt = _format_for(template)
    assert fmt.name == fmt_name
    if template.supports_tools:
        text = template.render(HISTORY, tools=[WEATHER_TOOL])
        assert "[AVAILABLE_TOOLS]" in text and '"get_weather"' in text
        assert "[TOOL_CALLS]" in text and "sunny, 21 C" in text
    else:
        text = template.render(with_tool_prompt(HISTORY, [WEATHER_TOOL]))
        assert '"name": "get_weather"' in text and "Custom Instructions" in text
    content, calls = fmt.parse(model_output)
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Lyon"})]


@pytest.mark.parametrize(
    "stem", ["mistralai-Mistral-Nemo-Instruct-2407", "Mistral-Small-3.2-24B-Instruct-2506"]
)
def test_mistral_calls_rendered_into_history_parse_back(stem: str) -> None:
    """The call as the template writes it in history (with its id) reads back through the format."""
    template = _template(stem)
    text = template.render(HISTORY[:2], tools=[WEATHER_TOOL], add_generation_prompt=False)
    written = text[text.index("[TOOL_CALLS]") : text.rindex("</s>")]
    _, calls = _format_for(template).parse(written)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]


def test_smollm3_tool_call_markup_is_read_as_hermes() -> None:
    """SmolLM3's own template (on the model's Hub page, not the edited one above) asks for
    `<tool_call>{"name": ..., "arguments": ...}</tool_call>`: a template teaching that is read as Hermes."""
    from mistralrs_serve.entrypoints.openai.tool_parsers.registry import detect_format

    teaching = (
        "{%- if xml_tools %}Functions are listed in <tools></tools>; answer each call as "
        '<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call>'
        "{%- endif %}"
    )
    fmt = detect_format(teaching)
    assert fmt.name == "hermes"
    output = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call>'
    content, calls = fmt.parse(output)
    assert content is not None and content.strip() == "Checking."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Lyon"})]
