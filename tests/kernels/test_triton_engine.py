"""The engine on the Triton path (paged decode attention, RMSNorm and SwiGLU
kernels) generates greedily exactly what the torch path does, on a tiny
random Llama. Here the kernels run under Triton's interpreter on CPU tensors
in fp32; with a GPU (ci/gpu_check.sh) the same test runs compiled on CUDA."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mistralrs_serve._native", reason="the Rust extension is not built here")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import tiny_models as tm
from mistralrs_serve.config import EngineConfig
from mistralrs_serve.engine.forward_paths import GraphPath
from mistralrs_serve.engine.llm_engine import LLMEngine
from mistralrs_serve.models.loader import ModelSource, load_model
from mistralrs_serve.sampling_params import Grammar, SamplingParams

ON_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = tm.TinySpec("llama-triton", "llama", num_layers=2)
    return tm.save_tiny_model(spec, tmp_path_factory.mktemp("tiny") / spec.name, seed=3)


def generate(
    model_dir: Path,
    *,
    triton: bool,
    device: str,
    params: SamplingParams | None = None,
    cuda_graphs: bool | None = False,
) -> list[list[int]]:
    loaded = load_model(ModelSource.parse(str(model_dir)), dtype=torch.float32)
    config = EngineConfig(kv_cache_mb=4, block_size=16, device=device, triton=triton, cuda_graphs=cuda_graphs)
    engine = LLMEngine(loaded, config)
    vocab = loaded.config.vocab_size
    prompts = [tm.prompt_ids(n, vocab, seed=n) for n in (5, 17, 33)]  # under, over and across blocks
    params = params or SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outputs = [engine.generate(p, params)[0].token_ids for p in prompts[:1]]  # alone
    # the rest together: mixed prefill/decode steps over the paged cache
    outs: dict[int, list[int]] = {1: [], 2: []}
    for i in (1, 2):
        engine.add_request(f"r{i}", prompts[i], params, lambda o, i=i: outs[i].append(o.token_id))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.num_used_blocks == 0
    return [*outputs, outs[1], outs[2]]


def test_triton_path_generates_what_the_torch_path_does(tiny_dir: Path) -> None:
    device = "cuda" if ON_GPU else "cpu"
    torch_tokens = generate(tiny_dir, triton=False, device="cpu")
    triton_tokens = generate(tiny_dir, triton=True, device=device)
    assert triton_tokens == torch_tokens
    assert all(len(t) == 12 for t in torch_tokens)


def test_decode_graph_path_generates_what_the_eager_path_does(tiny_dir: Path) -> None:
    """Decode steps through the static buffers of the CUDA-graph path (captured
    and replayed on a GPU, run eagerly here) give the eager path's tokens, at
    batch 1 and 2 (a padded bucket: 3 sequences would use 4)."""
    device = "cuda" if ON_GPU else "cpu"
    eager = generate(tiny_dir, triton=True, device=device, cuda_graphs=False)
    graphs = generate(tiny_dir, triton=True, device=device, cuda_graphs=True)
    assert graphs == eager


def test_graph_buckets_pad_and_fall_back(tiny_dir: Path) -> None:
    loaded = load_model(ModelSource.parse(str(tiny_dir)), dtype=torch.float32)
    config = EngineConfig(
        kv_cache_mb=4, max_num_seqs=5, triton=True, cuda_graphs=True, cuda_graph_max_context=64
    )
    engine = LLMEngine(loaded, config)
    assert isinstance(engine.runner.path, GraphPath)
    graphs = engine.runner.path.graphs
    assert graphs.buckets == [1, 2, 4, 5] and graphs.max_context == 64
    assert graphs.bucket(3, 10, 1) == 4 and graphs.bucket(5, 64, 4) == 5
    assert graphs.bucket(6, 10, 1) is None and graphs.bucket(1, 65, 5) is None  # too many, too long
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    prompt = tm.prompt_ids(40, loaded.config.vocab_size, seed=4)  # decodes cross the 64-position limit
    assert len(engine.generate(prompt, params)[0].token_ids) == 40
    no_triton = LLMEngine(loaded, EngineConfig(kv_cache_mb=4, triton=False, cuda_graphs=True))
    assert not isinstance(no_triton.runner.path, GraphPath)


@pytest.mark.gpu
def test_decode_graphs_are_captured_on_cuda(tiny_dir: Path) -> None:
    loaded = load_model(ModelSource.parse(str(tiny_dir)), dtype=torch.bfloat16)
    engine = LLMEngine(loaded, EngineConfig(kv_cache_mb=64, device="cuda"))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine.generate(tm.prompt_ids(9, loaded.config.vocab_size), params)
    path = engine.runner.path
    assert isinstance(path, GraphPath) and 1 in path.graphs.graphs


def test_triton_path_applies_penalties_bias_and_grammars_as_the_host_does(tiny_dir: Path) -> None:
    """Greedy with repetition/presence/frequency penalties, a logit bias and a
    regex: the Triton path (penalty and bitmask kernels) picks what the Rust
    sampler picks."""
    device = "cuda" if ON_GPU else "cpu"
    params = SamplingParams(
        max_tokens=12,
        temperature=0.0,
        ignore_eos=True,
        repetition_penalty=1.5,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        logit_bias={5: 3.0, 6: -50.0},
        grammar=Grammar("regex", "[a-z ]{1,40}"),
    )
    torch_tokens = generate(tiny_dir, triton=False, device="cpu", params=params)
    triton_tokens = generate(tiny_dir, triton=True, device=device, params=params)
    assert triton_tokens == torch_tokens
    assert all(t for t in torch_tokens)


def test_triton_sampler_is_seeded_and_reports_logprobs(tiny_dir: Path) -> None:
    """Sampled rows go through the Triton sampler: a seed reproduces the
    tokens, the n choices differ, and logprobs come with their top entries."""
    device = "cuda" if ON_GPU else "cpu"
    loaded = load_model(ModelSource.parse(str(tiny_dir)), dtype=torch.float32)
    engine = LLMEngine(loaded, EngineConfig(kv_cache_mb=4, device=device, triton=True))
    prompt = tm.prompt_ids(9, loaded.config.vocab_size, seed=9)
    params = SamplingParams(
        max_tokens=10,
        temperature=1.5,
        top_p=0.95,
        seed=5,
        n=3,
        ignore_eos=True,
        logprobs=True,
        top_logprobs=3,
    )
    first = engine.generate(prompt, params)
    again = engine.generate(prompt, params)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert len({tuple(o.token_ids) for o in first}) > 1
    for out in first:
        assert len(out.logprobs) == 10
        for lp in out.logprobs:
            assert len(lp.top) == 3 and lp.logprob <= 0
            assert lp.top[0][1] >= lp.logprob - 1e-4  # the best logprob bounds the chosen one
    assert engine.scheduler.num_used_blocks == 0


def test_a_windowed_model_decodes_eagerly_beside_the_graphs(tmp_path: Path) -> None:
    """Sliding-window layers have no captured decode kernel: the graph path says so
    once (NotCapturable) and every decode runs on the eager path, with its tokens."""
    from test_mistral_smollm3 import save_model  # a tiny Mistral with a window of 8

    model_dir = save_model("mistral-w8", tmp_path / "mistral-w8")
    eager = generate(model_dir, triton=True, device="cpu", cuda_graphs=False)
    loaded = load_model(ModelSource.parse(str(model_dir)), dtype=torch.float32)
    engine = LLMEngine(loaded, EngineConfig(kv_cache_mb=4, block_size=16, triton=True, cuda_graphs=True))
    assert isinstance(engine.runner.path, GraphPath)
    graphs = generate(model_dir, triton=True, device="cpu", cuda_graphs=True)
    assert graphs == eager and all(len(t) == 12 for t in graphs)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine.generate(tm.prompt_ids(20, loaded.config.vocab_size), params)
    assert engine.runner.path.graphs.not_capturable
