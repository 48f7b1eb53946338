"""Sliding-window models free the KV blocks behind the window: a tiny Mistral with a
window of 8 on every layer, run through the real engine in blocks of 4, keeps a
handful of blocks per sequence however long it generates, and its tokens are the
ones it gives with every block kept and the ones transformers gives."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from mistralrs_serve import _native
from mistralrs_serve.config import EngineConfig
from mistralrs_serve.engine.llm_engine import LLMEngine
from mistralrs_serve.models.loader import LoadedModel, ModelSource, load_model
from mistralrs_serve.sampling_params import SamplingParams

from tests.models import tiny_models as tm

WINDOW, BLOCK, CHUNK = 8, 4, 16
PROMPT_LEN, NEW_TOKENS = 40, 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _save_windowed_mistral(directory: Path, window: int | None) -> Path:
    """Two layers of Mistral, every one windowed (or none), weights spread wide enough
    that the window changes the greedy tokens."""
    import transformers

    tok = tm.build_tokenizer()
    config = transformers.MistralConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=tm.HIDDEN,
        intermediate_size=tm.INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=tm.HEADS,
        num_key_value_heads=tm.KV_HEADS,
        max_position_embeddings=tm.MAX_POSITIONS,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": tm.ROPE_THETA},
        sliding_window=window,
        bos_token_id=None,
        eos_token_id=tok.token_to_id(tm.EOS_TOKEN),
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 2:
                fan_in = p.shape[1] if "embed" not in name else 16
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tok.save(str(directory / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tm.EOS_TOKEN,
        "add_bos_token": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_windowed_mistral(tmp_path_factory.mktemp("swa") / "mistral-w8", WINDOW)


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> LoadedModel:
    return load_model(ModelSource.parse(str(model_dir)), dtype=torch.float32)


def _prompt(seed: int) -> list[int]:
    return tm.prompt_ids(PROMPT_LEN, 200, seed=seed)


def _transformers_greedy(model_dir: Path, prompt: list[int], new: int) -> list[int]:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    hf.generation_config.eos_token_id = None  # as ignore_eos
    ids = torch.tensor([prompt])
    with torch.no_grad():  # the mask given: a prompt token equal to pad_token_id is no padding
        out = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def _engine(loaded: LoadedModel, free: bool) -> LLMEngine:
    config = EngineConfig(
        kv_cache_mb=4,
        block_size=BLOCK,
        max_num_batched_tokens=CHUNK,
        device="cpu",
        free_kv_behind_window=free,
    )
    return LLMEngine(loaded, config)


def _generate(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams
) -> tuple[list[list[list[int]]], list[int]]:
    """Every prompt at once, step by step: each request's choices' tokens, and the
    blocks held after each step."""
    tokens: list[list[list[int]]] = [[[] for _ in range(params.n)] for _ in prompts]
    for i, prompt in enumerate(prompts):

        def collect(out: Any, i: int = i) -> None:
            if out.token_id >= 0:
                tokens[i][out.index].append(out.token_id)

        engine.add_request(f"r{i}", prompt, params, collect)
    used = []
    while engine.has_unfinished_requests():
        engine.step()
        used.append(engine.scheduler.num_used_blocks)
    return tokens, used


def test_kv_window_is_every_layer_s_window(loaded: LoadedModel, tmp_path: Path) -> None:
    assert loaded.model.kv_window() == WINDOW
    assert _engine(loaded, True).scheduler.sliding_window == WINDOW
    assert _engine(loaded, False).scheduler.sliding_window is None
    plain = load_model(ModelSource.parse(str(_save_windowed_mistral(tmp_path / "plain", None))))
    assert plain.model.kv_window() is None


def test_greedy_tokens_are_the_same_with_blocks_freed(model_dir: Path, loaded: LoadedModel) -> None:
    """A 40-token prompt in chunks of 16, then 64 tokens: transformers' tokens with or
    without freeing, while the freeing engine holds a window's worth of blocks."""
    prompt = _prompt(3)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    want = _transformers_greedy(model_dir, prompt, NEW_TOKENS)
    freeing, kept = _engine(loaded, True), _engine(loaded, False)
    got, used = _generate(freeing, [prompt], params)
    got_kept, used_kept = _generate(kept, [prompt], params)
    assert got[0][0] == want
    assert got_kept[0][0] == want
    num_prefill_steps = -(-PROMPT_LEN // CHUNK)
    # a decode holds the blocks of its window and of its own position
    assert max(used[num_prefill_steps:-1]) <= WINDOW // BLOCK + 2
    # a prefill chunk holds its own blocks and the window before it
    assert max(used[:num_prefill_steps]) <= (WINDOW - 1 + CHUNK) // BLOCK + 2
    # kept: one block per 4 positions, to the end
    assert used_kept[-2] == -(-(PROMPT_LEN + NEW_TOKENS - 1) // BLOCK)
    assert freeing.scheduler.num_used_blocks == kept.scheduler.num_used_blocks == 0


def test_forks_and_a_second_request_agree_with_every_block_kept(loaded: LoadedModel) -> None:
    """n = 2 sampled choices fork the leader's table after a prompt longer than the window
    (its freed entries included), beside a request whose first 24 prompt tokens hit the
    prefix cache on blocks the first freed: the same draws as with every block kept."""
    shared = _prompt(5)
    prompts = [shared, shared[:24] + _prompt(6)[:20]]
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=11, n=2, ignore_eos=True)
    freeing, kept = _engine(loaded, True), _engine(loaded, False)
    got, used = _generate(freeing, prompts, params)
    want, _ = _generate(kept, prompts, params)
    assert got == want
    assert got[0][0] != got[0][1], "the two choices diverge"
    assert max(used[-20:]) <= 4 * (WINDOW // BLOCK + 2), "four sequences decoding"
    assert freeing.scheduler.prefix_cache_hits > 0


def test_preempted_windowed_sequences_recompute_to_the_same_tokens(
    model_dir: Path, loaded: LoadedModel
) -> None:
    """Six requests over a pool of 12 blocks (a prompt alone needs 11): freed blocks let
    several decode at once, and a chunk or a block boundary that finds no room preempts
    the newest, which recomputes from its start; every request gets transformers' tokens."""
    engine = _engine(loaded, True)
    engine.scheduler = _native.Scheduler(
        num_blocks=12, block_size=BLOCK, max_num_batched_tokens=CHUNK, sliding_window=WINDOW
    )
    prompts = [_prompt(seed) for seed in range(7, 13)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    got, _ = _generate(engine, prompts, params)
    assert engine.scheduler.num_preemptions > 0
    for prompt, tokens in zip(prompts, got, strict=True):
        assert tokens[0] == _transformers_greedy(model_dir, prompt, 24)
    assert engine.scheduler.num_used_blocks == 0
