"""Qwen3-MoE and Mixtral against transformers on tiny random models (8 experts, top-2, hidden 64).

Saved by transformers (which writes per-expert tensors), in transformers 5's fused in-memory layout,
and as GGUFs written the way llama.cpp's converter writes them (Qwen3-MoE as "qwen3moe"; Mixtral as
"llama" with q/k rows permuted; each projection's experts stacked into one 3-D `ffn_*_exps` tensor; the
router `ffn_gate_inp` left F32 when the rest is quantized). fp32 tolerance as in
test_logits_vs_transformers.py; routing is a discrete choice, so the test also checks that no token's
k-th and (k+1)-th expert are near-tied (a near-tie could flip between two correct implementations).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_models as tm
import torch
from gguf import GGMLQuantizationType as QT
from mistralrs_serve.errors import ModelLoadError
from mistralrs_serve.layers.moe import Routing, SparseMoE, route
from mistralrs_serve.models.loader import ModelSource, load_model

FP32_ATOL = 1e-4
NUM_EXPERTS, TOP_K, MOE_INTERMEDIATE = 8, 2, 32
# Smallest gap between a token's k-th and (k+1)-th router probability that counts as "no tie": the
# two implementations' fp32 router probabilities differ by ~1e-7, so 1e-5 cannot flip a choice
# (measured smallest gaps on these models: 1.1e-4 to 2e-3).
MIN_ROUTING_GAP = 1e-5
# bf16 (as test_logits_vs_transformers.py); rounding may also flip a close routing choice
BF16_MIN_TOP1, BF16_MIN_CORR = 0.90, 0.99


@dataclass(frozen=True)
class MoeSpec:
    name: str
    family: str  # "qwen3_moe" or "mixtral"
    num_layers: int = 3
    config: dict[str, Any] = field(default_factory=dict)


SPECS = {
    s.name: s
    for s in (
        MoeSpec("qwen3moe", "qwen3_moe", config={"norm_topk_prob": True, "mlp_only_layers": [1]}),
        MoeSpec("qwen3moe-step2", "qwen3_moe", config={"norm_topk_prob": False, "decoder_sparse_step": 2}),
        MoeSpec("mixtral", "mixtral", num_layers=2),
        MoeSpec("mixtral-window", "mixtral", num_layers=2, config={"sliding_window": 24}),
    )
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_moe_model(spec: MoeSpec, vocab_size: int, seed: int = 0) -> Any:
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=tm.HIDDEN,
        intermediate_size=tm.INTERMEDIATE,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=tm.HEADS,
        num_key_value_heads=tm.KV_HEADS,
        max_position_embeddings=tm.MAX_POSITIONS,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": tm.ROPE_THETA, "rope_type": "default"},
        num_experts_per_tok=TOP_K,
        bos_token_id=None,
        eos_token_id=vocab_size - 1,
        pad_token_id=None,
    )
    if spec.family == "qwen3_moe":
        config: Any = transformers.Qwen3MoeConfig(
            **common,
            num_experts=NUM_EXPERTS,
            moe_intermediate_size=MOE_INTERMEDIATE,
            head_dim=32,
            **spec.config,
        )
        model_cls: Any = transformers.Qwen3MoeForCausalLM
    else:
        config = transformers.MixtralConfig(**common, num_local_experts=NUM_EXPERTS, **spec.config)
        model_cls = transformers.MixtralForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "embed" in name or name == "lm_head.weight":
                p.copy_(torch.randn(p.shape, generator=gen) / 4)
            else:  # matrices, router and (3-D) experts: std 1/sqrt(fan_in), fan_in the last dim
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model


def save_moe_model(
    spec: MoeSpec, directory: Path, fused: bool = False, chat_template: str = tm.CHAT_TEMPLATE
) -> Path:
    """Model + tokenizer in Hugging Face layout. `fused`: the experts as transformers 5 holds them in
    memory (3-D gate_up_proj/down_proj) instead of the per-expert tensors save_pretrained writes."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tok = tm.build_tokenizer()
    model = make_moe_model(spec, tok.get_vocab_size())
    model.config.eos_token_id = tok.token_to_id(tm.EOS_TOKEN)
    model.save_pretrained(directory, safe_serialization=True)
    if fused:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        assert any(k.endswith("experts.gate_up_proj") for k in state), "transformers no longer fuses experts"
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(directory / "tokenizer.json"))
    tok_cfg = {"eos_token": tm.EOS_TOKEN, "add_bos_token": False, "chat_template": chat_template}
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return directory


# --- GGUF the way llama.cpp's converter writes these families ---

_MIXTRAL_EXPERT = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}
_QWEN_EXPERT = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def write_moe_gguf(model_dir: Path, path: Path, quant: QT | None = None) -> Path:
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    is_mixtral = cfg["model_type"] == "mixtral"
    arch = "llama" if is_mixtral else "qwen3moe"
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_expert_count(cfg["num_local_experts"])
    writer.add_expert_used_count(cfg["num_experts_per_tok"])
    if not is_mixtral:
        writer.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    tm.add_tokenizer_metadata(writer, tm.build_tokenizer())
    tensors: dict[str, np.ndarray] = {}
    experts: dict[str, list[tuple[int, np.ndarray]]] = {}
    for name, w in load_file(str(model_dir / "model.safetensors")).items():
        parts = name.split(".")
        if ".experts." in name:  # model.layers.N.<block>.experts.E.<proj>.weight
            names = _MIXTRAL_EXPERT if is_mixtral else _QWEN_EXPERT
            experts.setdefault(f"blk.{parts[2]}.{names[parts[6]]}.weight", []).append((int(parts[5]), w))
        elif name.endswith(".gate.weight"):  # the router
            tensors[f"blk.{parts[2]}.ffn_gate_inp.weight"] = w
        else:
            if is_mixtral and ".q_proj." in name:
                w = tm.permute_qk(w, heads)
            elif is_mixtral and ".k_proj." in name:
                w = tm.permute_qk(w, kv_heads)
            tensors[tm.gguf_name(name)] = w
    for target, per_expert in experts.items():
        tensors[target] = np.stack([w for _, w in sorted(per_expert, key=lambda e: e[0])])
    for target, w in tensors.items():
        w = np.ascontiguousarray(w, dtype=np.float32)
        if (
            quant is not None
            and w.ndim >= 2
            and target not in ("token_embd.weight",)
            and "gate_inp" not in target
        ):
            writer.add_tensor(target, gguf.quants.quantize(w, quant), raw_dtype=quant)
        else:
            writer.add_tensor(target, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quant_roundtrip_reference(model_dir: Path, quant: QT) -> Any:
    """transformers with every weight write_moe_gguf quantizes replaced by its dequantized value
    (blocks run along the last dim, so fused gate/up and q/k permutation commute with it)."""
    model = tm.load_hf_model(model_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name and not name.endswith(".gate.weight"):
                p.copy_(torch.from_numpy(tm.quantize_roundtrip(p.numpy(), quant)))
    return model


# --- fixtures and checks ---


class MoeReference(tm.TinyReference):
    """A saved tiny MoE model, transformers' logits, and its routing margins on the test prompt."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.min_routing_gap = routing_gap(tm.load_hf_model(directory), self.ids)


def routing_gap(hf: Any, ids: list[int]) -> float:
    """Smallest gap between the k-th and (k+1)-th router probability over every token and MoE layer."""
    gaps: list[float] = []

    def hook(module: Any, args: Any, output: Any) -> None:
        probs = torch.softmax(output[0].float(), dim=-1).topk(TOP_K + 1, dim=-1).values
        gaps.append((probs[:, TOP_K - 1] - probs[:, TOP_K]).min().item())

    handles = [m.register_forward_hook(hook) for n, m in hf.named_modules() if n.endswith("mlp.gate")]
    tm.hf_logits(hf, ids)
    for h in handles:
        h.remove()
    assert handles and gaps
    return min(gaps)


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, MoeReference]:
    root = tmp_path_factory.mktemp("tiny_moe")
    return {name: MoeReference(save_moe_model(spec, root / name)) for name, spec in SPECS.items()}


@pytest.fixture(params=sorted(SPECS))
def ref(request: pytest.FixtureRequest, references: dict[str, MoeReference]) -> MoeReference:
    return references[request.param]


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> float:
    assert got.shape == want.shape, what
    worst = (got - want).abs().max().item()
    assert worst <= FP32_ATOL, f"{what}: max |ours - transformers| = {worst:.3g} (atol {FP32_ATOL})"
    return worst


def test_routing_has_no_near_ties(ref: MoeReference) -> None:
    assert ref.min_routing_gap > MIN_ROUTING_GAP, f"near-tied routing ({ref.min_routing_gap:.2g})"


def test_config_read_from_config_json(ref: MoeReference) -> None:
    spec = SPECS[ref.directory.name]
    cfg = ref.ours(torch.float32).config
    assert cfg.architecture == spec.family
    assert (cfg.extra["num_experts"], cfg.extra["num_experts_per_tok"]) == (NUM_EXPERTS, TOP_K)
    want_sparse = {"qwen3moe": (0, 2), "qwen3moe-step2": (1,)}.get(spec.name, tuple(range(spec.num_layers)))
    assert cfg.extra["sparse_layers"] == want_sparse
    assert cfg.qk_norm == (spec.family == "qwen3_moe")
    assert cfg.sliding_window == spec.config.get("sliding_window")


def test_fp32_prefill_matches_transformers(ref: MoeReference) -> None:
    _assert_close(tm.run_ours(ref.ours(torch.float32).model, ref.ids), ref.logits, "one-step prefill")


def test_fp32_prefill_then_decode_matches_transformers(ref: MoeReference) -> None:
    chunks = [16] + [1] * (tm.PROMPT_LEN - 16)
    got = tm.run_ours(ref.ours(torch.float32).model, ref.ids, chunks)
    _assert_close(got, ref.logits, "prefill of 16 then token-by-token decode")


@pytest.mark.parametrize("name", ["qwen3moe", "mixtral"])
def test_bf16_agrees_loosely(references: dict[str, MoeReference], name: str) -> None:
    ref = references[name]
    loaded = ref.ours(torch.bfloat16)
    assert loaded.model.dtype == torch.bfloat16
    got = tm.run_ours(loaded.model, ref.ids, [48] + [1] * 16)
    top1 = (got.argmax(-1) == ref.logits.argmax(-1)).float().mean().item()
    corr = tm.row_correlations(got, ref.logits).min().item()
    assert top1 >= BF16_MIN_TOP1 and corr >= BF16_MIN_CORR, f"bf16 top-1 {top1:.3f}, correlation {corr:.5f}"


@pytest.mark.parametrize("name", ["qwen3moe", "mixtral"])
def test_fused_expert_layout_loads(references: dict[str, MoeReference], tmp_path: Path, name: str) -> None:
    ref = references[name]
    directory = save_moe_model(SPECS[name], tmp_path / name, fused=True)
    model = load_model(ModelSource.parse(str(directory)), dtype=torch.float32).model
    _assert_close(tm.run_ours(model, ref.ids, [20, 20] + [1] * 24), ref.logits, f"{name} fused layout")


@pytest.mark.parametrize("name", ["qwen3moe", "qwen3moe-step2", "mixtral"])
def test_f32_gguf_matches_transformers(
    references: dict[str, MoeReference], tmp_path: Path, name: str
) -> None:
    ref = references[name]
    loaded = load_model(
        ModelSource.parse(str(write_moe_gguf(ref.directory, tmp_path / "m.gguf"))), torch.float32
    )
    assert loaded.config.architecture == SPECS[name].family
    assert loaded.config.extra["sparse_layers"] == ref.ours(torch.float32).config.extra["sparse_layers"]
    want = ref.logits
    if not SPECS[name].config.get("norm_topk_prob", True):
        # The converter writes no norm_topk_prob for qwen3moe and llama.cpp always renormalises the
        # top-k weights: so do we, and so does the reference here.
        hf = tm.load_hf_model(ref.directory)
        for module in hf.modules():
            if hasattr(module, "norm_topk_prob"):
                module.norm_topk_prob = True
        want = tm.hf_logits(hf, ref.ids)
        assert (want - ref.logits).abs().max().item() > 100 * FP32_ATOL
    _assert_close(tm.run_ours(loaded.model, ref.ids, [20, 20] + [1] * 24), want, f"{name} F32 GGUF")


@pytest.mark.parametrize(
    ("name", "quant"), [("qwen3moe", QT.Q8_0), ("mixtral", QT.Q8_0), ("mixtral", QT.Q4_0)]
)
def test_quantized_gguf_matches_dequantized_reference(
    references: dict[str, MoeReference], tmp_path: Path, name: str, quant: QT
) -> None:
    ref = references[name]
    hf = quant_roundtrip_reference(ref.directory, quant)
    assert routing_gap(hf, ref.ids) > MIN_ROUTING_GAP
    path = write_moe_gguf(ref.directory, tmp_path / "m.gguf", quant=quant)
    model = load_model(ModelSource.parse(str(path)), dtype=torch.float32).model
    got = tm.run_ours(model, ref.ids, [20, 20] + [1] * 24)
    _assert_close(got, tm.hf_logits(hf, ref.ids), f"{name} {quant.name} GGUF")


def test_paged_cache_with_window_smaller_than_prompt(references: dict[str, MoeReference]) -> None:
    """Mixtral with a 24-token window over the 64-token prompt, through the paged cache (4-token
    blocks in a scattered order), in prefill chunks and then decodes."""
    from mistralrs_serve.engine.kv_cache import PagedKVCache
    from mistralrs_serve.layers.attention import PagedAttention

    ref = references["mixtral-window"]
    model = ref.ours(torch.float32).model
    block_size, num_blocks = 4, 32
    cache = PagedKVCache(model.config, num_blocks, block_size, torch.float32)
    table = np.random.default_rng(0).permutation(num_blocks)[: tm.PROMPT_LEN // block_size]
    rows, start = [], 0
    for n in [20, 20] + [1] * 24:
        positions = np.arange(start, start + n)
        slots = table[positions // block_size] * block_size + positions % block_size
        attn = PagedAttention(
            cache, np.array([n]), np.array([start + n]), slots, table[None].astype(np.int32)
        )
        ids = torch.tensor(ref.ids[start : start + n])
        rows.append(model.forward(ids, torch.from_numpy(positions), attn, torch.arange(n)))
        start += n
    _assert_close(torch.cat(rows), ref.logits, "paged cache, window 24")


@pytest.mark.parametrize("name", ["qwen3moe", "mixtral-window"])
def test_engine_greedy_matches_transformers_generate(references: dict[str, MoeReference], name: str) -> None:
    """Through the engine (paged cache in blocks of 4, prefill chunks of 16) against generate()."""
    from mistralrs_serve.config import EngineConfig
    from mistralrs_serve.engine.llm_engine import LLMEngine
    from mistralrs_serve.sampling_params import SamplingParams

    ref = references[name]
    prompt, new = tm.prompt_ids(40, ref.vocab_size, seed=3), 12
    hf = tm.load_hf_model(ref.directory)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=0)
    engine = LLMEngine(
        ref.ours(torch.float32),
        EngineConfig(kv_cache_mb=4, block_size=4, max_num_batched_tokens=16, device="cpu"),
    )
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    assert engine.generate(prompt, params)[0].token_ids == out[0, len(prompt) :].tolist()
    assert engine.scheduler.num_used_blocks == 0


def test_top_k_above_expert_count_is_refused(references: dict[str, MoeReference], tmp_path: Path) -> None:
    import shutil

    directory = shutil.copytree(references["qwen3moe"].directory, tmp_path / "bad")
    cfg = json.loads((directory / "config.json").read_text())
    cfg["num_experts_per_tok"] = NUM_EXPERTS + 1
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"config\.json.*num_experts_per_tok = 9"):
        load_model(ModelSource.parse(str(directory)), dtype=torch.float32)


def test_gguf_with_top_k_above_expert_count_is_refused(
    references: dict[str, MoeReference], tmp_path: Path
) -> None:
    import gguf

    path = write_moe_gguf(references["mixtral"].directory, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(path), "r+")
    reader.fields["llama.expert_used_count"].parts[-1][0] = NUM_EXPERTS + 1
    del reader
    with pytest.raises(ModelLoadError, match=r"m\.gguf.*expert_used_count = 9"):
        load_model(ModelSource.parse(str(path)), dtype=torch.float32)


def test_grouped_experts_equal_dense_all_expert_compute() -> None:
    """The grouped computation against every expert on every token, masked by the routing: with
    more tokens than experts (some chosen by many) and with one token (most experts idle)."""
    gen = torch.Generator().manual_seed(3)
    hidden, inter, experts, k = 16, 8, 6, 3
    gate, up = (
        torch.randn(experts, inter, hidden, generator=gen),
        torch.randn(experts, inter, hidden, generator=gen),
    )
    down = torch.randn(experts, hidden, inter, generator=gen)
    router = torch.randn(experts, hidden, generator=gen)
    for renormalize in (True, False):
        routing = Routing(experts, k, renormalize, fp32_weights=False)
        moe = SparseMoE(router, gate, up, down, routing, torch.float64)
        for tokens in (1, 25):
            x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
            weights, ids = route(x @ router.double().T, routing)
            mask = torch.zeros(tokens, experts, dtype=torch.float64).scatter_(1, ids, weights)
            h = torch.nn.functional.silu(torch.einsum("th,eih->tei", x, gate.double()))
            h = h * torch.einsum("th,eih->tei", x, up.double())
            every = torch.einsum("tei,ehi->teh", h, down.double())  # (T, E, hidden)
            want = (every * mask.unsqueeze(-1)).sum(1)
            torch.testing.assert_close(moe(x), want, rtol=1e-12, atol=1e-12)


def test_routing_rules() -> None:
    logits = torch.tensor([[2.0, 0.5, 1.0, -1.0]])
    # Mixtral: softmax over the chosen logits
    weights, ids = route(logits, Routing(4, 2, renormalize=True, fp32_weights=True))
    assert ids.tolist() == [[0, 2]]
    torch.testing.assert_close(weights, torch.softmax(torch.tensor([[2.0, 1.0]]), -1))
    # Qwen3-MoE without norm_topk_prob: the full softmax's top-k values
    weights, _ = route(logits, Routing(4, 2, renormalize=False, fp32_weights=False))
    torch.testing.assert_close(weights, torch.softmax(logits, -1)[:, [0, 2]])
    with pytest.raises(ModelLoadError, match="top_k = 5"):
        Routing(4, 5, renormalize=True, fp32_weights=True)


# --- chat templates and tool-call formats ---

TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "chat_templates"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
# family: (template, the format it teaches, the model's call of get_weather(city="Lyon") in it).
# Qwen3-MoE ships Qwen3's template; Mixtral-8x22B-Instruct teaches Mistral's v3 [AVAILABLE_TOOLS] /
# [TOOL_CALLS] markup, which Mistral-Nemo's template (the one stored here) teaches too. Mixtral-8x7B's
# template has no tools: the server adds its own JSON instructions there, as for any such template.
FAMILY_TEMPLATES = {
    "qwen3moe": (
        "Qwen-Qwen3-0.6B",
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call>',
    ),
    "mixtral": (
        "mistralai-Mistral-Nemo-Instruct-2407",
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lyon"}}]',
    ),
}


@pytest.mark.parametrize("name", sorted(FAMILY_TEMPLATES))
def test_chat_template_renders_tools_and_its_format_reads_the_call(tmp_path: Path, name: str) -> None:
    from mistralrs_serve.entrypoints.openai.tool_parsers.registry import detect_format

    stem, format_name, model_call = FAMILY_TEMPLATES[name]
    source = (TEMPLATES / f"{stem}.jinja").read_text(encoding="utf-8")
    directory = save_moe_model(SPECS[name], tmp_path / name, chat_template=source)
    template = load_model(ModelSource.parse(str(directory)), dtype=torch.float32).tokenizer.chat_template
    assert template is not None and template.supports_tools
    fmt = detect_format(template.tools_source)
    assert fmt.name == format_name
    messages = [{"role": "user", "content": "Weather in Lyon?"}]
    rendered = template.render(messages, tools=[WEATHER_TOOL], add_generation_prompt=True)
    assert '"get_weather"' in rendered and "Weather in Lyon?" in rendered
    content, calls = fmt.parse(model_call)
    assert not content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Lyon"})]
