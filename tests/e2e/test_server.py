"""The HTTP server end to end: uvicorn on loopback, the official openai client,
every response and chunk checked against OpenAI's schema."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from live_server import LiveServer, start_server, stop_server
from mistralrs_serve.config import ServerConfig
from openai_schema import check, check_completion_chunk, checked_chat, checked_chat_stream

# greedy on the default model: "The capital of France is Paris." (8 tokens)
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    return checked_chat(client, **{"messages": QUESTION, **kwargs})


def stream_chat(client: openai.OpenAI, **kwargs: Any) -> list[Any]:
    return checked_chat_stream(client, **{"messages": QUESTION, **kwargs})


def streamed_texts(chunks: list[Any], n: int = 1) -> list[str]:
    texts = [""] * n
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    return texts


# --- chat ----------------------------------------------------------------


def test_chat_greedy_answers(client: openai.OpenAI) -> None:
    res = chat(client, max_tokens=20, temperature=0)
    assert res.choices[0].message.content == "The capital of France is Paris."
    assert res.choices[0].finish_reason == "stop"
    assert res.usage.completion_tokens == 8 and res.usage.prompt_tokens > 0
    assert res.object == "chat.completion" and res.id.startswith("chatcmpl-")


def test_stream_equals_non_stream(client: openai.OpenAI) -> None:
    whole = chat(client, max_tokens=40, temperature=0)
    chunks = stream_chat(client, max_tokens=40, temperature=0)
    assert streamed_texts(chunks) == [whole.choices[0].message.content]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked
    assert len({c.id for c in chunks}) == 1


def test_include_usage_sends_a_final_usage_chunk(client: openai.OpenAI) -> None:
    chunks = stream_chat(client, max_tokens=5, temperature=0, stream_options={"include_usage": True})
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 5
    assert chunks[-2].choices[0].finish_reason == "length"


def test_max_completion_tokens_is_max_tokens(client: openai.OpenAI) -> None:
    res = chat(client, max_completion_tokens=3, temperature=0)
    assert res.usage.completion_tokens == 3 and res.choices[0].finish_reason == "length"


def test_n_choices_streaming_and_not(client: openai.OpenAI) -> None:
    res = chat(client, n=3, max_tokens=8, temperature=1.0, seed=7)
    assert sorted(c.index for c in res.choices) == [0, 1, 2]
    chunks = stream_chat(client, n=3, max_tokens=8, temperature=1.0, seed=7)
    assert streamed_texts(chunks, 3) == [
        c.message.content for c in sorted(res.choices, key=lambda c: c.index)
    ]
    finishes = [ch.index for c in chunks for ch in c.choices if ch.finish_reason]
    assert sorted(finishes) == [0, 1, 2]


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    kwargs = {"max_tokens": 24, "temperature": 1.2, "top_p": 0.95}
    a = chat(client, seed=1234, **kwargs).choices[0].message.content
    b = chat(client, seed=1234, **kwargs).choices[0].message.content
    others = {chat(client, seed=s, **kwargs).choices[0].message.content for s in (1, 2, 3)}
    assert a == b
    assert len(others | {a}) > 1  # seeds matter


def test_stop_strings(client: openai.OpenAI) -> None:
    res = chat(client, max_tokens=20, temperature=0, stop=["Paris"])
    assert res.choices[0].message.content == "The capital of France is "
    assert res.choices[0].finish_reason == "stop"
    chunks = stream_chat(client, max_tokens=20, temperature=0, stop="France")
    assert streamed_texts(chunks) == ["The capital of "]


def test_logprobs_shapes(client: openai.OpenAI) -> None:
    res = chat(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = res.choices[0].logprobs.content
    assert len(content) == 6
    for lp in content:
        assert len(lp.top_logprobs) == 3 and lp.top_logprobs[0].token == lp.token  # greedy: the best
        assert bytes(lp.bytes).decode() == lp.token and lp.logprob <= 0
    assert "".join(lp.token for lp in content) == res.choices[0].message.content
    chunks = stream_chat(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    streamed = [lp for c in chunks for ch in c.choices if ch.logprobs for lp in ch.logprobs.content]
    assert [lp.token for lp in streamed] == [lp.token for lp in content]


def test_extensions_are_accepted(client: openai.OpenAI) -> None:
    extra = {
        "top_k": 5,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "dry_multiplier": 0.8,
        "dry_base": 1.75,
        "dry_allowed_length": 2,
        "dry_sequence_breakers": ["\n"],
        "truncate_sequence": True,
        "some_future_field": {"x": 1},  # unknown: accepted, logged at debug
    }
    res = chat(client, max_tokens=5, seed=3, user="u", metadata={"k": "v"}, extra_body=extra)
    assert res.usage.completion_tokens == 5


def test_content_parts_and_developer_role(client: openai.OpenAI) -> None:
    messages = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]},
    ]
    assert chat(client, messages=messages, max_tokens=12, temperature=0).choices[0].message.content


# --- legacy completions, models, tokenizer, health, metrics ---------------


def test_completions(client: openai.OpenAI) -> None:
    res = client.completions.create(
        model="default", prompt="The capital of France is", max_tokens=5, temperature=0
    )
    check("CreateCompletionResponse", res.model_dump(mode="json", exclude_unset=True))
    assert res.choices[0].text and res.usage.completion_tokens == 5
    many = client.completions.create(
        model="default", prompt=["One, two,", "A, B,"], max_tokens=4, temperature=0, n=2, logprobs=2
    )
    check("CreateCompletionResponse", many.model_dump(mode="json", exclude_unset=True))
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    lp = many.choices[0].logprobs
    assert len(lp.tokens) == 4 and all(len(t) >= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    echo = client.completions.create(model="default", prompt="Hello", max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("Hello")


def test_completions_stream(client: openai.OpenAI) -> None:
    kwargs = {"model": "default", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    for c in chunks:
        check_completion_chunk(c.model_dump(mode="json", exclude_unset=True))
    assert "".join(ch.text for c in chunks for ch in c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
    ],
)
def test_completions_bad_input(client: openai.OpenAI, kwargs: dict[str, Any], param: str) -> None:
    kwargs = {"model": "default", "prompt": "Hi", "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**kwargs)
    assert err.value.body["param"] == param


def test_models(client: openai.OpenAI, live_server: LiveServer) -> None:
    models = client.models.list()
    check("ListModelsResponse", models.model_dump(mode="json", exclude_unset=True))
    ids = [m.id for m in models.data]
    assert ids[0] == "default" and ids[1] == live_server.info.model_name
    assert client.models.retrieve("default").id == "default"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with pytest.raises(openai.NotFoundError) as err:
        chat(client, model="no-such-model", max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    assert chat(client, model=ids[1], max_tokens=2).usage.completion_tokens == 2


def test_tokenize_detokenize(live_server: LiveServer) -> None:
    with live_server.http() as http:
        ids = http.post("/tokenize", json={"prompt": "Hello world"}).json()
        assert ids["count"] == len(ids["tokens"]) > 0 and ids["max_model_len"] > 0
        assert (
            http.post("/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"].endswith("Hello world")
        )
        chat_ids = http.post("/tokenize", json={"messages": QUESTION}).json()
        assert chat_ids["count"] > ids["count"]
        bad = http.post("/detokenize", json={"tokens": [-1]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples (one per model) in Prometheus text."""
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + " ", name + "{"))
    ]
    if not values:
        raise AssertionError(f"{name} not in /metrics")
    return sum(values)


def test_metrics_count_requests_and_tokens(live_server: LiveServer, client: openai.OpenAI) -> None:
    with live_server.http() as http:
        before = http.get("/metrics").text
        res = chat(client, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
        live_server.wait_idle()
        after = http.get("/metrics").text
    p = "mistralrs_serve_"
    assert (
        metric(after, p + "time_to_first_token_seconds_count")
        == metric(before, p + "time_to_first_token_seconds_count") + 1
    )
    assert (
        metric(after, p + "inter_token_latency_seconds_count")
        - metric(before, p + "inter_token_latency_seconds_count")
        == 3
    )  # 4 tokens, 3 gaps
    assert metric(after, p + "generation_tokens_total") - metric(before, p + "generation_tokens_total") == 4
    assert metric(after, p + "prompt_tokens_total") - metric(before, p + "prompt_tokens_total") == (
        res.usage.prompt_tokens
    )
    assert metric(after, p + "kv_cache_blocks_used") == 0 and metric(after, p + "kv_cache_blocks_total") > 0


def test_internal_error_is_a_sanitised_500(live_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    chat_serving = live_server.app.state.server.chat

    async def broken(req: Any) -> Any:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(chat_serving, "create_async", broken)
    with live_server.http() as http:
        res = http.post("/v1/chat/completions", json={"model": "default", "messages": QUESTION})
        assert res.status_code == 500
        error = res.json()["error"]
        assert error["type"] == "server_error" and "secret" not in error["message"]
        monkeypatch.undo()
        assert (
            http.post(
                "/v1/chat/completions", json={"model": "default", "messages": QUESTION, "max_tokens": 2}
            ).status_code
            == 200
        )


def test_health_and_metrics(live_server: LiveServer, client: openai.OpenAI) -> None:
    chat(client, max_tokens=3)
    with live_server.http() as http:
        assert http.get("/health").json()["status"] == "ok"
        text = http.get("/metrics").text
    for name in (
        "mistralrs_serve_http_requests_total{",
        "mistralrs_serve_time_to_first_token_seconds_bucket",
        "mistralrs_serve_inter_token_latency_seconds_bucket",
        "mistralrs_serve_num_requests_running",
        "mistralrs_serve_kv_cache_blocks_used",
        "mistralrs_serve_kv_cache_blocks_total",
        "mistralrs_serve_prefix_cache_hits_total",
        "mistralrs_serve_prefix_cache_queries_total",
        "mistralrs_serve_generation_tokens_total",
        "mistralrs_serve_prompt_tokens_total",
    ):
        assert name in text, name
    assert 'route="/v1/chat/completions",status="200"' in text


# --- concurrency and disconnects -------------------------------------------


def untied_prefix(client: openai.OpenAI, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int]:
    """The greedy text alone, up to the first near-tie, and its token count.

    Logits are bf16 (matmul outputs in the compute dtype): a logit near 20
    moves in steps of 0.125, so the top two are often tied or one step apart.
    The projection kernels differ by batch size (4-bit for <= 8 rows, dense
    bf16 above; each row's result is independent of the others, but the two
    kernels round differently), so a batched run may resolve such a near-tie
    the other way and continue differently from there. Near-tie: the top
    two logprobs within 0.26 (two bf16 steps)."""
    res = chat(client, messages=messages, max_tokens=max_tokens, temperature=0, logprobs=True, top_logprobs=2)
    text, n = "", 0
    for lp in res.choices[0].logprobs.content:
        top = lp.top_logprobs
        if len(top) == 2 and top[0].logprob - top[1].logprob < 0.26:
            break
        text, n = text + lp.token, n + 1
    return text, n


def test_32_parallel_streams_match_running_alone(live_server: LiveServer, client: openai.OpenAI) -> None:
    topics = [f"Write a sentence about the number {i}." for i in range(32)]
    messages = [[{"role": "user", "content": t}] for t in topics]
    alone = [untied_prefix(client, m, 16) for m in messages]
    assert sum(n for _, n in alone) >= 32 * 16 // 4  # a fair share of the tokens is compared
    barrier = threading.Barrier(32)

    def run(m: list[dict[str, str]]) -> tuple[str, str | None]:
        barrier.wait()
        chunks = stream_chat(client, messages=m, max_tokens=16, temperature=0)
        return streamed_texts(chunks)[0], chunks[-1].choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(run, messages))
    for (got, finish), (want, _) in zip(together, alone, strict=True):
        assert finish in ("stop", "length")
        assert got.startswith(want)
    live_server.wait_idle()


def test_disconnect_mid_stream_frees_blocks(live_server: LiveServer) -> None:
    engine = live_server.engine
    body = {"model": "default", "messages": QUESTION, "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with live_server.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as res:
        lines = res.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert engine.scheduler.num_used_blocks > 0
    live_server.wait_idle()  # the engine aborted the request and freed every block


def test_disconnect_non_streaming_frees_blocks(live_server: LiveServer) -> None:
    body = {"model": "default", "messages": QUESTION, "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=live_server.base_url, timeout=1.0) as http:
        http.post("/v1/chat/completions", json=body)
    live_server.wait_idle()


def test_idle_streams_get_keepalives(live_server: LiveServer) -> None:
    # keepalive_s is 0.5 here; a stream waiting behind a long prompt's prefill gets comments
    long_prompt = [{"role": "user", "content": "word " * 3000}]
    body = {"model": "default", "messages": long_prompt, "max_tokens": 1, "stream": True}
    with live_server.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as res:
        assert res.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in res.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith(("data: ", ": keep-alive")) for line in lines)
    assert ": keep-alive" in lines  # ~3000 prompt tokens take seconds to prefill here


def test_engine_error_mid_stream_ends_the_stream(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = live_server.engine
    calls = {"n": 0}

    def failing(real: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("secret internal detail")
            return real(*args, **kwargs)

        return forward

    # every forward path (torch, the fused Rust step, CUDA graphs) runs under the runner's execute
    monkeypatch.setattr(engine.runner, "execute", failing(engine.runner.execute))
    body = {"model": "default", "messages": QUESTION, "max_tokens": 50, "stream": True, "ignore_eos": True}
    with live_server.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as res:
        lines = [line for line in res.iter_lines() if line]
    monkeypatch.undo()
    last = json.loads(lines[-1].removeprefix("data: "))
    assert last["error"]["type"] == "server_error" and "secret" not in last["error"]["message"]
    live_server.wait_idle()
    assert chat(live_server.client(), max_tokens=3).usage.completion_tokens == 3  # still serving


# --- bad input -------------------------------------------------------------


BAD_FIELDS = [
    ({"temperature": 3}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": "two"}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**9}, "max_tokens"),
    ({"presence_penalty": 5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"logit_bias": {"999999999": 1}}, "logit_bias"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs
    ({"logprobs": True, "top_logprobs": 99}, "top_logprobs"),
    ({"stop": 5}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"seed": -1}, "seed"),
    ({"messages": []}, "messages"),
    ({"messages": "not a list"}, None),  # a templated string is the mistral.rs SDK form: accepted
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content[0]",
    ),
    # a hosted tool this server does not run at all (web_search without --enable-search is left out)
    ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]},
        "tools[0].function.parameters",
    ),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"}, "tool_choice"),
    (
        {
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "name": "g"},
        },
        "tool_choice",
    ),
    (
        {
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {
                "type": "allowed_tools",
                "mode": "always",
                "tools": [{"type": "function", "name": "f"}],
            },
        },
        "tool_choice.mode",
    ),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
        "response_format.json_schema.schema",
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}},
        "response_format.json_schema.schema",
    ),
    ({"grammar": {"type": "regex", "value": "(a"}}, "grammar.value"),
    ({"grammar": {"type": "lark", "value": "start: missing_rule"}}, "grammar.value"),
    ({"grammar": {"type": "cfg", "value": "x"}}, "grammar.type"),
    ({"grammar": {"type": "regex"}}, "grammar.value"),
    ({"grammar": {"type": "regex", "value": "a+"}, "response_format": {"type": "json_object"}}, "grammar"),
    ({"tool_choice": "required"}, "tool_choice"),  # without tools
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),  # without tools
    ({"max_tool_calls": 3}, "max_tool_calls"),
    ({"dry_multiplier": -1}, "dry_multiplier"),
    ({"top_k": -5}, "top_k"),
    ({"min_p": 2}, "min_p"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_FIELDS)
def test_bad_fields_get_400_naming_the_field(
    live_server: LiveServer, fields: dict[str, Any], param: str | None
) -> None:
    body = {"model": "default", "messages": QUESTION, "max_tokens": 2, **fields}
    with live_server.http() as http:
        res = http.post("/v1/chat/completions", json=body)
        if param is None:
            assert res.status_code == 200
            return
        assert res.status_code == 400, res.text
        error = res.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
        assert http.get("/health").status_code == 200  # still serving


def test_malformed_bodies(live_server: LiveServer) -> None:
    with live_server.http() as http:
        for raw in (b"not json", b"[1, 2]", b"", b'{"messages": '):
            res = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
            assert res.status_code == 400 and "error" in res.json(), raw
        res = http.post("/v1/chat/completions", json={"model": "default"})  # messages missing
        assert res.status_code == 400 and res.json()["error"]["param"] == "messages"
        huge = {"model": "default", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
        res = http.post("/v1/chat/completions", json=huge)
        assert res.status_code == 400 and res.json()["error"]["code"] == "request_too_large"
        res = http.get("/v1/no/such/route")
        assert res.status_code == 404 and "error" in res.json()
        assert http.get("/health").status_code == 200


def test_prompt_longer_than_context(live_server: LiveServer, client: openai.OpenAI) -> None:
    n = live_server.info.max_model_len
    long = [{"role": "user", "content": "hello " * (n + 10)}]
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, messages=long, max_tokens=2)
    assert err.value.body["param"] == "messages"
    res = chat(client, messages=long, max_tokens=2, extra_body={"truncate_sequence": True})
    assert res.usage.prompt_tokens <= n - 2


# --- auth and capacity -----------------------------------------------------


def test_api_key(default_runner: Any) -> None:
    live = start_server(ServerConfig(api_key="sekrit"), lambda: default_runner.client)
    try:
        with pytest.raises(openai.AuthenticationError) as err:
            live.client(api_key="wrong").models.list()
        assert err.value.body["code"] == "invalid_api_key"
        with httpx.Client(base_url=live.base_url) as http:
            assert http.get("/v1/models").status_code == 401
            assert http.post("/tokenize", json={"prompt": "x"}).status_code == 401
            assert http.get("/health").status_code == 200  # open
        assert chat(live.client(api_key="sekrit"), max_tokens=2).usage.completion_tokens == 2
    finally:
        stop_server(live)


def test_over_capacity_is_503_with_retry_after(default_runner: Any) -> None:
    live = start_server(ServerConfig(max_pending_requests=1), lambda: default_runner.client)
    try:
        body = {
            "model": "default",
            "messages": QUESTION,
            "max_tokens": 300,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.Client(base_url=live.base_url, timeout=30) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as first:
                lines = first.iter_lines()  # held: a dropped iterator closes the connection
                next(lines)
                busy = http.post("/v1/chat/completions", json={**body, "stream": False})
                assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
                assert busy.json()["error"]["code"] == "server_busy"
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the slot frees when the stream closes
                ok = http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
                if ok.status_code == 200:
                    break
                time.sleep(0.05)
            assert ok.status_code == 200
    finally:
        stop_server(live)


def test_health_is_503_while_loading(default_runner: Any) -> None:
    gate = threading.Event()

    def slow_load() -> Any:
        gate.wait(30)
        return default_runner.client

    from mistralrs_serve.entrypoints.openai.api_server import build_app

    app = build_app(ServerConfig(), slow_load)
    from starlette.testclient import TestClient

    with TestClient(app) as http:
        assert http.get("/health").status_code == 503
        res = http.post("/v1/chat/completions", json={"messages": QUESTION})
        assert res.status_code == 503 and res.headers["retry-after"] == "5"
        gate.set()
        deadline = time.monotonic() + 10
        while http.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert http.get("/health").status_code == 200
