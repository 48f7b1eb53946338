"""The batching engine on the default model: batching, prefix cache,
preemption and aborts change nothing about greedy outputs, and every KV
block comes back."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from mistralrs_serve.config import EngineConfig
from mistralrs_serve.engine.engine_loop import EngineLoop
from mistralrs_serve.engine.llm_engine import LLMEngine
from mistralrs_serve.engine.sequence import CompletionOutput, StepOutput
from mistralrs_serve.models.loader import ModelSource, load_model
from mistralrs_serve.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded():  # type: ignore[no-untyped-def]
    return load_model(ModelSource("default"))


def prompts(engine: LLMEngine, n: int) -> list[list[int]]:
    topics = ["France", "the sea", "Rust", "tea", "a cat", "rain", "music", "chess", "bread", "winter"]
    messages = [[{"role": "user", "content": f"Write one sentence about {t}."}] for t in topics]
    return [engine.tokenizer.encode_chat(m) for m in messages[:n]]


def run_batch(engine: LLMEngine, batch: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Submit every prompt at once and step until all finish."""
    outputs = [CompletionOutput(0) for _ in batch]
    for i, ids in enumerate(batch):
        engine.add_request(f"r{i}", ids, params, outputs[i].add)
    while engine.has_unfinished_requests():
        engine.step()
    return [o.token_ids for o in outputs]


def assert_all_blocks_free(engine: LLMEngine) -> None:
    assert engine.scheduler.num_used_blocks == 0
    assert engine.scheduler.num_free_blocks == engine.scheduler.num_blocks
    assert not engine.sequences and not engine.requests


def test_batched_greedy_equals_one_at_a_time(loaded) -> None:  # type: ignore[no-untyped-def]
    engine = LLMEngine(loaded, EngineConfig(kv_cache_mb=64, enable_prefix_caching=False))
    batch = prompts(engine, 6)
    alone = [engine.generate(ids, GREEDY)[0].token_ids for ids in batch]
    together = run_batch(engine, batch, GREEDY)
    assert together == alone
    assert_all_blocks_free(engine)


def test_prefix_cache_hit_gives_the_cold_tokens(loaded) -> None:  # type: ignore[no-untyped-def]
    engine = LLMEngine(loaded, EngineConfig(kv_cache_mb=64, block_size=4))
    ids = prompts(engine, 1)[0]
    cold = engine.generate(ids, GREEDY)[0].token_ids
    hits_before = engine.scheduler.prefix_cache_hits
    warm = engine.generate(ids, GREEDY)[0].token_ids
    assert engine.scheduler.prefix_cache_hits - hits_before >= (len(ids) - 1) // 4 * 4
    assert warm == cold
    assert_all_blocks_free(engine)


def untied_prefix(
    generate: Callable[[list[int], SamplingParams], list[CompletionOutput]],
    prompt: list[int],
    params: SamplingParams,
) -> list[int]:
    """Greedy tokens of prompt (run alone) before the first near-tie of the top two logits.

    Logits come out of bf16 matmuls (8 significant bits): a logit near 20
    moves in steps of 0.125, so exact ties happen (e.g. -0.7156 for two
    tokens). Which one wins then depends on the last bit of the sums before:
    recomputing a preempted sequence through the prefill path (dense
    projections and SDPA where the decode used the 4-bit kernel and the
    paged kernel) may pick the other."""
    params = SamplingParams(
        max_tokens=params.max_tokens, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2
    )
    out = generate(prompt, params)[0]
    for i, lp in enumerate(out.logprobs):
        if len(lp.top) == 2 and lp.top[0][1] - lp.top[1][1] < 1e-3:
            return out.token_ids[:i]  # the tied step may pick either
    return out.token_ids


def test_preemption_resumes_with_identical_greedy_output(loaded) -> None:  # type: ignore[no-untyped-def]
    # A cache of a few blocks cannot hold every sequence: the newest are preempted and recomputed.
    roomy = LLMEngine(loaded, EngineConfig(kv_cache_mb=64, enable_prefix_caching=False))
    batch = prompts(roomy, 5)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    expected = [untied_prefix(roomy.generate, p, params) for p in batch]
    assert sum(map(len, expected)) >= 24 * len(batch) // 2  # most tokens are compared
    tight = LLMEngine(loaded, EngineConfig(kv_cache_mb=4, block_size=4, enable_prefix_caching=False))
    capacity = tight.scheduler.num_blocks * 4
    assert max(len(p) + 24 for p in batch) <= capacity < sum(len(p) + 24 for p in batch)
    got = run_batch(tight, batch, params)
    for tokens, want in zip(got, expected, strict=True):
        assert tokens[: len(want)] == want and len(tokens) == 24
    assert tight.scheduler.num_preemptions > 0
    assert_all_blocks_free(tight)


def test_n_choices_share_the_prompt_and_are_seeded(loaded) -> None:  # type: ignore[no-untyped-def]
    # Without the prefix cache: a cache hit computes the last prompt token in a
    # smaller batch, where the 4-bit kernel replaces the dense one and logits
    # move by ~1e-3, enough to flip a sampled (not a greedy) token now and then.
    engine = LLMEngine(loaded, EngineConfig(kv_cache_mb=64, enable_prefix_caching=False))
    ids = prompts(engine, 1)[0]
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=5, n=3, ignore_eos=True)
    first = engine.generate(ids, params)
    second = engine.generate(ids, params)
    assert [o.token_ids for o in first] == [o.token_ids for o in second]
    assert len({tuple(o.token_ids) for o in first}) > 1, "choices sample independently"
    assert_all_blocks_free(engine)


def test_the_sampler_reads_each_choice_history_where_the_scheduler_keeps_it(loaded) -> None:  # type: ignore[no-untyped-def]
    """Penalties and DRY read a sequence's ids from the scheduler, not from a copy Python keeps:
    at every sampling, each choice's history there is its prompt and exactly the tokens it has
    produced so far, through the forks of n > 1 and the preemptions of a tight cache."""
    engine = LLMEngine(loaded, EngineConfig(kv_cache_mb=4, block_size=4, enable_prefix_caching=False))
    batch = prompts(engine, 3)
    params = SamplingParams(
        max_tokens=24,
        temperature=0.8,
        seed=3,
        n=2,
        ignore_eos=True,
        frequency_penalty=0.5,
        dry_multiplier=0.8,
    )
    produced: dict[tuple[str, int], list[int]] = {}
    checked = []
    sample = engine.runner.sample

    def spy(logits, rows, seqs, bitmask, histories):  # type: ignore[no-untyped-def]
        for seq in seqs:
            prompt, output = histories.history(seq.seq_id)
            key = (seq.request.request_id, seq.index)
            assert prompt.tolist() == seq.request.prompt_ids.tolist()
            assert output.tolist() == produced.get(key, []) and len(output) == seq.num_output_tokens
            checked.append(key)
        return sample(logits, rows, seqs, bitmask, histories)

    engine.runner.sample = spy  # type: ignore[method-assign]
    for i, ids in enumerate(batch):

        def record(out: StepOutput, rid: str = f"r{i}") -> None:
            produced.setdefault((rid, out.index), []).append(out.token_id)

        engine.add_request(f"r{i}", ids, params, record)
    while engine.has_unfinished_requests():
        engine.step()
    assert len(checked) == 3 * 2 * 24 and engine.scheduler.num_preemptions > 0
    assert_all_blocks_free(engine)


def test_abort_mid_prefill_and_mid_decode_frees_blocks(loaded) -> None:  # type: ignore[no-untyped-def]
    engine = LLMEngine(loaded, EngineConfig(kv_cache_mb=64, max_num_batched_tokens=8))
    ids = prompts(engine, 2)
    outputs: list[StepOutput] = []
    engine.add_request("a", ids[0], GREEDY, outputs.append)
    engine.step()  # an 8-token chunk of a longer prompt
    assert engine.scheduler.num_used_blocks > 0
    assert engine.abort_request("a")
    engine.add_request("b", ids[1], GREEDY, outputs.append)
    while not outputs:
        engine.step()
    assert engine.abort_request("b")
    assert not engine.abort_request("b")
    assert_all_blocks_free(engine)


def test_full_cache_makes_new_requests_wait(loaded) -> None:  # type: ignore[no-untyped-def]
    engine = LLMEngine(loaded, EngineConfig(kv_cache_mb=4, block_size=4, max_num_seqs=64))
    batch = prompts(engine, 10)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    results = run_batch(engine, batch, params)
    assert all(len(r) == 8 for r in results)
    assert_all_blocks_free(engine)


def test_stream_concatenates_to_the_full_text(loaded) -> None:  # type: ignore[no-untyped-def]
    client = EngineLoop(LLMEngine(loaded, EngineConfig(kv_cache_mb=64)))
    try:
        ids = prompts(client.engine, 1)[0]
        params = SamplingParams(max_tokens=30, temperature=0.0)
        streamed = "".join(step.text for step in client.stream(ids, params))
        assert streamed == client.generate(ids, params)[0].text
        assert streamed == client.engine.tokenizer.decode(client.generate(ids, params)[0].token_ids)
    finally:
        client.shutdown()


def test_many_threads_at_once_get_their_own_answers(loaded) -> None:  # type: ignore[no-untyped-def]
    client = EngineLoop(LLMEngine(loaded, EngineConfig(kv_cache_mb=64)))
    try:
        batch = prompts(client.engine, 8)
        # up to 8 sequences decode with the same kernel whatever else is in the step
        # (layers.linear.int4_rows), so each matches its run alone exactly
        alone = [client.generate(ids, GREEDY)[0].token_ids for ids in batch]
        got: dict[int, list[int]] = {}

        def worker(i: int) -> None:
            got[i] = client.generate(batch[i], GREEDY)[0].token_ids

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(batch))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [got[i] for i in range(len(batch))] == alone
    finally:
        client.shutdown()


def test_closing_a_stream_aborts_the_request(loaded) -> None:  # type: ignore[no-untyped-def]
    client = EngineLoop(LLMEngine(loaded, EngineConfig(kv_cache_mb=64)))
    try:
        ids = prompts(client.engine, 1)[0]
        stream = client.stream(ids, SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
        next(stream)
        stream.close()
        client.generate(ids, SamplingParams(max_tokens=1))  # the loop has processed the abort
        assert_all_blocks_free(client.engine)
    finally:
        client.shutdown()


def test_a_request_larger_than_the_cache_is_rejected(loaded) -> None:  # type: ignore[no-untyped-def]
    from mistralrs_serve.errors import InvalidRequestError

    engine = LLMEngine(loaded, EngineConfig(kv_cache_mb=4, block_size=4))
    ids = prompts(engine, 1)[0]
    capacity = engine.scheduler.num_blocks * 4
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("big", ids, SamplingParams(max_tokens=capacity), lambda _: None)
    assert info.value.param == "max_tokens"
    # without max_tokens the budget is what the cache can hold, and the request completes
    out = engine.generate(ids, SamplingParams(temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == capacity - len(ids) and out.finish_reason == "length"
    assert_all_blocks_free(engine)


def test_counters_can_be_read_from_other_threads_while_it_runs(loaded) -> None:  # type: ignore[no-untyped-def]
    # Regression: the scheduler used to release the GIL while mutably borrowed,
    # so a metrics read on another thread raised "Already mutably borrowed".
    client = EngineLoop(LLMEngine(loaded, EngineConfig(kv_cache_mb=64)))
    errors: list[BaseException] = []
    stop = threading.Event()

    def read_counters() -> None:
        while not stop.is_set():
            try:
                _ = (client.engine.scheduler.num_used_blocks, client.engine.scheduler.num_running)
            except BaseException as e:  # any failure is the bug
                errors.append(e)
                return
            time.sleep(0.01)  # a scraper-like rate: a spinning reader starves the engine of the GIL

    reader = threading.Thread(target=read_counters)
    reader.start()
    try:
        for ids in prompts(client.engine, 3):
            client.generate(ids, GREEDY)
    finally:
        stop.set()
        reader.join()
        client.shutdown()
    assert errors == []
