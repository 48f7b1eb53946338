"""KV groups (engine/kv_cache.KVLayout): a model whose layers mix windows keeps its
sliding layers' keys in groups of their own, whose blocks go back to the pool behind
the window while the global layers' stay. A tiny Gemma 3 (five layers with a window of
8, then a global one) through the real engine, on the fused CPU forward (Q8_0 GGUF) and
on the torch path (config.json): the same greedy tokens as with one group and every
block kept, in fewer layer-blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import pytest
import test_gemma as tg
import tiny_models as tm
import torch
from mistralrs_serve.config import EngineConfig
from mistralrs_serve.engine.forward_paths import FusedPath, TorchPath
from mistralrs_serve.engine.kv_cache import KVLayout
from mistralrs_serve.engine.llm_engine import LLMEngine
from mistralrs_serve.layers.block_weight import BlockWeight
from mistralrs_serve.models.loader import LoadedModel, ModelSource, load_model
from mistralrs_serve.sampling_params import SamplingParams

PROMPT_LEN, NEW_TOKENS, CHUNK = 40, 48, 16


def test_layers_group_by_window() -> None:
    # Gemma-3-270M: five sliding layers, then a global one, three times
    windows = ([512] * 5 + [None]) * 3
    layout = KVLayout.by_window(windows)
    assert layout.windows == (512,) * 5 + (None,) and layout.cache_layers == 3
    # sliding layers 0-2 in group 0, 3, 4 and 6 in group 1...; the global 5, 11 and 17 in group 5
    want = [(0, 0), (0, 1), (5, 0), (1, 2), (5, 1), (5, 2)]
    assert [layout.places[i] for i in (0, 1, 5, 6, 11, 17)] == want
    assert len(set(layout.places)) == 18
    # Gemma 2 alternates: two groups of the 13 layers each
    gemma2 = KVLayout.by_window([4096, None] * 13)
    assert gemma2.windows == (4096, None) and gemma2.cache_layers == 13
    # one window (or none) for every layer: one group, the layers in order
    assert KVLayout.by_window([8] * 4) == KVLayout(((0, 0), (0, 1), (0, 2), (0, 3)), (8,))
    assert KVLayout.by_window([None] * 2) == KVLayout.single(2)
    # what one sequence can hold: the global group's blocks after the windowed ones' share
    assert layout.max_tokens(1000, 16, 64) == (1000 - 5 * ((512 + 64) // 16 + 1)) * 16
    assert KVLayout.by_window([8, 8]).max_tokens(10, 4, 8) == 40


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tg.save_gemma(tg.SPECS["gemma3"], tmp_path_factory.mktemp("kvg") / "gemma3")


@pytest.fixture(scope="module", params=["fused", "torch"])
def loaded(request: pytest.FixtureRequest, directory: Path) -> LoadedModel:
    if request.param == "torch":
        return load_model(ModelSource.parse(str(directory)), dtype=torch.float32)
    path = tg.write_gemma_gguf(directory, directory.parent / "gemma3-q8.gguf", gguf.GGMLQuantizationType.Q8_0)
    return load_model(ModelSource.parse(str(path)), dtype=torch.float32)


def _engine(loaded: LoadedModel, groups: bool) -> LLMEngine:
    config = EngineConfig(
        kv_cache_mb=4, block_size=16, max_num_batched_tokens=CHUNK, free_kv_behind_window=groups
    )
    return LLMEngine(loaded, config)


def _run(engine: LLMEngine, prompts: list[list[int]]) -> tuple[list[list[int]], int]:
    """Greedy tokens of each prompt (all at once), and the most layer-blocks held."""
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    tokens: list[list[int]] = [[] for _ in prompts]
    for i, prompt in enumerate(prompts):

        def collect(out: Any, i: int = i) -> None:
            if out.token_id >= 0:
                tokens[i].append(out.token_id)

        engine.add_request(f"r{i}", prompt, params, collect)
    most = 0
    while engine.has_unfinished_requests():
        engine.step()
        most = max(most, engine.scheduler.num_used_blocks * engine.runner.cache.layout.cache_layers)
    return tokens, most


def test_grouped_blocks_give_the_same_tokens_in_fewer_layer_blocks(loaded: LoadedModel) -> None:
    grouped, single = _engine(loaded, True), _engine(loaded, False)
    # the GGUF's Q8_0 blocks run fused, config.json's float weights on torch
    want_path = FusedPath if isinstance(loaded.model.layers[0].qkv.source, BlockWeight) else TorchPath
    assert isinstance(grouped.runner.path, want_path) and isinstance(single.runner.path, want_path)
    assert grouped.runner.kv_layout.num_groups == 6 and grouped.scheduler.kv_groups == [8] * 5 + [None]
    assert single.runner.kv_layout.num_groups == 1
    prompts = [tm.prompt_ids(PROMPT_LEN, 200, seed=s) for s in (3, 4)]
    got, held = _run(grouped, prompts)
    want, held_single = _run(single, prompts)
    assert got == want
    # two sequences of 88 positions: 6 blocks of 6 layers each kept, against 6 of the global
    # layer and at most 2 (the window and the next position) of each sliding one
    assert held_single == 2 * 6 * 6
    assert held <= 2 * (6 + 5 * 2)
    # a repeated prompt hits the prefix cache in every group and decodes the same
    again, _ = _run(grouped, prompts[:1])
    assert again[0] == want[0] and grouped.scheduler.prefix_cache_hits > 0
    assert grouped.scheduler.num_used_blocks == 0


def test_groups_only_where_a_sequence_can_grow_as_long(loaded: LoadedModel) -> None:
    """Chunks of 2048 tokens would have each sliding group hold 130 blocks at once: in a
    1 MiB cache that leaves the global group nothing, so the engine keeps one group."""
    config = EngineConfig(kv_cache_mb=1, block_size=16, max_num_batched_tokens=2048)
    engine = LLMEngine(loaded, config)
    assert engine.runner.kv_layout.num_groups == 1 and engine.scheduler.kv_groups == [None]
    assert engine.num_kv_tokens == engine.runner.cache.num_blocks * 16
    roomy = LLMEngine(loaded, EngineConfig(kv_cache_mb=1, block_size=16, max_num_batched_tokens=64))
    assert roomy.runner.kv_layout.num_groups == 6 and roomy.num_kv_tokens > engine.num_kv_tokens


def test_blocks_for_is_what_max_tokens_gives_back() -> None:
    layout = KVLayout.by_window(([512] * 5 + [None]) * 3)
    # past a window and a chunk the sliding groups hold their most, and the two agree
    for tokens in (4096, 5000, 10_000):
        blocks = layout.blocks_for(tokens, 16, 2048)
        assert layout.max_tokens(blocks, 16, 2048) >= tokens > layout.max_tokens(blocks - 1, 16, 2048)
    # 4096 tokens: 256 global blocks and each sliding group its window and a chunk (161)
    assert layout.blocks_for(4096, 16, 2048) == 256 + 5 * 161
    assert KVLayout.single(4).blocks_for(4096, 16, 2048) == 256
