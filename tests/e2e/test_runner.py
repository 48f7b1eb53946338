"""The in-process SDK on the default model, as a user would call it."""

from __future__ import annotations

import json
import math
import re

import pytest
from mistralrs_serve import ChatCompletionRequest, CompletionRequest, InvalidRequestError, Runner
from mistralrs_serve.config import EngineConfig

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def chat(runner, **kwargs):  # type: ignore[no-untyped-def]
    fields = {"model": "default", "messages": QUESTION, "max_tokens": 24, "temperature": 0.0, **kwargs}
    return runner.send_chat_completion_request(ChatCompletionRequest(**fields))


def test_greedy_chat_answers_and_counts_tokens(default_runner) -> None:  # type: ignore[no-untyped-def]
    res = chat(default_runner)
    choice = res.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens
    assert res.object == "chat.completion" and res.id.startswith("chatcmpl-")


def test_greedy_is_repeatable_bit_for_bit(default_runner) -> None:  # type: ignore[no-untyped-def]
    assert chat(default_runner).choices[0].message.content == chat(default_runner).choices[0].message.content


def test_seed_makes_sampling_reproducible(default_runner) -> None:  # type: ignore[no-untyped-def]
    runs = [
        chat(default_runner, temperature=1.0, seed=s, max_tokens=16).choices[0].message.content
        for s in (7, 7, 8)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_max_tokens_gives_length(default_runner) -> None:  # type: ignore[no-untyped-def]
    res = chat(default_runner, max_tokens=3)
    assert res.choices[0].finish_reason == "length"
    assert res.usage.completion_tokens == 3


def test_stop_string_cuts_the_text(default_runner) -> None:  # type: ignore[no-untyped-def]
    full = chat(default_runner).choices[0].message.content
    word = full.split()[2]
    res = chat(default_runner, stop=[word])
    assert res.choices[0].finish_reason == "stop"
    assert word not in res.choices[0].message.content
    assert full.startswith(res.choices[0].message.content)


def test_logprobs_shape_and_values(default_runner) -> None:  # type: ignore[no-untyped-def]
    res = chat(default_runner, logprobs=True, top_logprobs=3, max_tokens=5)
    content = res.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.token == entry.top_logprobs[0].token
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def test_n_choices_have_indices(default_runner) -> None:  # type: ignore[no-untyped-def]
    """Each of the n choices is generated in full and counted: with EOS ignored every
    choice runs to max_tokens, so usage holds n * max_tokens and each choice's logprobs
    hold max_tokens entries."""
    res = chat(default_runner, n=2, temperature=0.8, seed=3, max_tokens=8, ignore_eos=True, logprobs=True)
    assert [c.index for c in res.choices] == [0, 1]
    assert [c.finish_reason for c in res.choices] == ["length", "length"]
    assert [len(c.logprobs.content) for c in res.choices] == [8, 8]
    assert res.usage.completion_tokens == 2 * 8


def test_mistralrs_names_are_accepted(default_runner) -> None:  # type: ignore[no-untyped-def]
    req = ChatCompletionRequest(
        model="default", messages=QUESTION, max_tokens=4, temperature=0.0, n_choices=2, stop_seqs=["zzz"]
    )
    assert req.n == 2 and req.stop == ["zzz"]


def test_mistralrs_grammar_fields(default_runner) -> None:  # type: ignore[no-untyped-def]
    """The mistral.rs SDK's `grammar` + `grammar_type`, on chat and legacy completions."""
    res = chat(default_runner, grammar="(yes|no)[.!]", grammar_type="regex", temperature=1.0, seed=3)
    assert res.choices[0].message.content in ("yes.", "yes!", "no.", "no!")
    schema = '{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}'
    res = chat(default_runner, grammar=schema, grammar_type="json_schema", max_tokens=40)
    assert isinstance(json.loads(res.choices[0].message.content)["ok"], bool)
    req = CompletionRequest(
        model="default", prompt="Yes or no?", grammar=" [0-9]{3}", grammar_type="regex", max_tokens=8
    )
    assert re.fullmatch(" [0-9]{3}", default_runner.send_completion_request(req).choices[0].text)
    with pytest.raises(InvalidRequestError) as info:
        chat(default_runner, grammar="a+")
    assert info.value.param == "grammar_type"


def test_tokenize_roundtrip(default_runner) -> None:  # type: ignore[no-untyped-def]
    ids = default_runner.tokenize_text("hello world", add_special_tokens=False)
    assert ids and all(isinstance(i, int) for i in ids)
    assert default_runner.detokenize_text(ids, skip_special_tokens=True) == "hello world"
    im_end = default_runner.tokenize_text("<|im_end|>", add_special_tokens=False)
    assert len(im_end) == 1
    assert default_runner.detokenize_text(ids + im_end, skip_special_tokens=True) == "hello world"


def test_legacy_completion(default_runner) -> None:  # type: ignore[no-untyped-def]
    prompt = "The capital of France is"
    req = CompletionRequest(model="default", prompt=prompt, max_tokens=4, temperature=0.0, echo=True)
    text = default_runner.send_completion_request(req).choices[0].text
    assert text.startswith(prompt) and len(text) > len(prompt)
    req = CompletionRequest(model="default", prompt=prompt, max_tokens=4, temperature=0.0, logprobs=2)
    res = default_runner.send_completion_request(req)
    assert len(res.choices[0].logprobs.tokens) == 4
    assert "".join(res.choices[0].logprobs.tokens) == res.choices[0].text
    # OpenAI answers echo + logprobs with the prompt's logprobs too, which are not computed here
    with pytest.raises(InvalidRequestError) as err:
        default_runner.send_completion_request(req.model_copy(update={"echo": True}))
    assert err.value.param == "echo"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0]",
        ),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logit_bias": {10**9: 1.0}}, "logit_bias"),
        ({"logit_bias": {1: 500.0}}, "logit_bias"),
        ({"stop": [""]}, "stop"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"grammar": {"type": "regex", "value": "a["}}, "grammar.value"),
    ],
)
def test_bad_input_names_the_field(default_runner, fields, param) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError) as info:
        chat(default_runner, **fields)
    assert info.value.param == param
    # the runner still serves afterwards
    assert chat(default_runner, max_tokens=2).usage.completion_tokens == 2


def test_prompt_longer_than_context_is_rejected_or_truncated() -> None:
    runner = Runner(engine_config=EngineConfig(max_model_len=300, kv_cache_mb=16))
    try:
        assert runner.info.max_model_len == 300
        long_text = "hello " * 400
        with pytest.raises(InvalidRequestError) as info:
            chat(runner, messages=[{"role": "user", "content": long_text}], max_tokens=2)
        assert info.value.param == "messages"
        res = chat(
            runner,
            messages=[{"role": "user", "content": long_text}],
            max_tokens=2,
            truncate_sequence=True,
        )
        assert res.usage.prompt_tokens == runner.info.max_model_len - 2
    finally:
        runner.close()


def test_stream_iterator_matches_the_full_response(default_runner) -> None:  # type: ignore[no-untyped-def]
    full = chat(default_runner, max_tokens=20)
    chunks = list(chat(default_runner, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert len({c.id for c in chunks}) == 1


def test_concurrent_callers_from_many_threads(default_runner) -> None:  # type: ignore[no-untyped-def]
    from concurrent.futures import ThreadPoolExecutor

    questions = [f"Name a colour, number {i}." for i in range(6)]

    def ask(q: str) -> str:
        return (
            chat(default_runner, messages=[{"role": "user", "content": q}], max_tokens=8)
            .choices[0]
            .message.content
        )

    alone = [ask(q) for q in questions]
    with ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(ask, questions))
    assert together == alone


def test_a_request_is_checked_once_at_the_edge(default_runner, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Serving checks each prompt once, on the caller's thread; the engine loop and the
    engine run the CheckedPrompt as it is."""
    from mistralrs_serve.engine.engine_info import EngineInfo

    params: list[str] = []
    real = EngineInfo.check_prompt

    def counting(self, prompt_ids, sampling, param="prompt", media=None):  # type: ignore[no-untyped-def]
        params.append(param)
        return real(self, prompt_ids, sampling, param, media)

    monkeypatch.setattr(EngineInfo, "check_prompt", counting)
    chat(default_runner, max_tokens=2)
    list(chat(default_runner, max_tokens=2, stream=True))
    req = CompletionRequest(model="default", prompt=["a", "b"], max_tokens=2)
    default_runner.send_completion_request(req)
    assert params == ["messages", "messages", "prompt", "prompt"]
