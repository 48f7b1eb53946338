"""A tiny random-weight Qwen3 (built here with transformers) behind the real
server, with Qwen3's own chat template: thinking on and off, reasoning
split from content, and Hermes-format tool calls end to end."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from live_server import LiveServer, start_server, stop_server
from mistralrs_serve.config import EngineConfig, ServerConfig
from mistralrs_serve.runner import Runner
from openai_schema import checked_chat, checked_chat_stream
from tool_specs import ADD

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import tiny_models as tm

TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "chat_templates"
QWEN3_TEMPLATE = TEMPLATES / "Qwen-Qwen3-0.6B.jinja"
R1_TEMPLATE = TEMPLATES / "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja"
ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
HELLO = [{"role": "user", "content": "hello"}]


def save_qwen3(directory: Path, template: Path = QWEN3_TEMPLATE) -> Path:
    """The tiny Qwen3 with Qwen3's markers as added (non-special) tokens and a real template."""
    tok = tm.build_tokenizer()
    tok.add_tokens(ADDED)
    spec = tm.SPECS["qwen3"]
    model = tm.make_hf_model(spec, tok.get_vocab_size())
    model.config.eos_token_id = tok.token_to_id(tm.EOS_TOKEN)
    model.config.max_position_embeddings = 4096  # the tool prompt alone is longer than the tiny default
    model.save_pretrained(directory, safe_serialization=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tm.EOS_TOKEN,
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "chat_template": template.read_text(),
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def serve_tiny(directory: Path) -> Iterator[LiveServer]:
    runner = Runner.from_model(str(directory), dtype="float32", engine_config=EngineConfig(kv_cache_mb=16))
    live = start_server(ServerConfig(), lambda: runner.client)
    yield live
    stop_server(live)
    runner.close()


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    if not QWEN3_TEMPLATE.exists():
        pytest.skip(f"{QWEN3_TEMPLATE} is absent (tests/data is part of the repository)")
    yield from serve_tiny(save_qwen3(tmp_path_factory.mktemp("qwen3")))


@pytest.fixture(scope="module")
def r1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The same tiny model with DeepSeek-R1-Distill's template, whose prompt opens the thinking block."""
    if not R1_TEMPLATE.exists():
        pytest.skip(f"{R1_TEMPLATE} is absent (tests/data is part of the repository)")
    yield from serve_tiny(save_qwen3(tmp_path_factory.mktemp("r1"), R1_TEMPLATE))


def create(client: openai.OpenAI, **kwargs: Any) -> Any:
    return checked_chat(client, **{"messages": HELLO, **kwargs})


def prompt_text(live: LiveServer, **body: Any) -> str:
    with live.http() as http:
        res = http.post("/tokenize", json={"model": "default", "messages": HELLO, **body})
        assert res.status_code == 200, res.text
        tokens = res.json()["tokens"]
        res = http.post("/detokenize", json={"model": "default", "tokens": tokens})
        return str(res.json()["prompt"])


def test_enable_thinking_reaches_the_template(qwen3: LiveServer) -> None:
    off = prompt_text(qwen3, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    for on in (prompt_text(qwen3), prompt_text(qwen3, enable_thinking=True)):
        assert on.endswith("<|im_start|>assistant\n") and "<think>" not in on


THOUGHT = {"type": "lark", "value": 'start: "<think>\\n" /[a-z]{3,8}/ "\\n</think>\\n\\n" /[a-z]{3,8}/'}


def test_thinking_goes_to_reasoning_content(qwen3: LiveServer) -> None:
    """The grammar makes the random model think; the markers never reach content."""
    client = qwen3.client()
    res = create(client, extra_body={"grammar": THOUGHT}, max_tokens=40, seed=0)
    message = res.choices[0].message
    reasoning = message.model_extra["reasoning_content"] if message.model_extra else None
    assert reasoning and reasoning.isalpha() and message.content.isalpha(), message
    assert message.model_extra["reasoning"] == reasoning  # the name newer clients read
    chunks = checked_chat_stream(
        client, messages=HELLO, extra_body={"grammar": THOUGHT}, max_tokens=40, seed=0
    )
    streamed_reasoning = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices
    )
    streamed_content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (streamed_reasoning, streamed_content) == (reasoning, message.content)
    also = "".join((c.choices[0].delta.model_extra or {}).get("reasoning") or "" for c in chunks if c.choices)
    assert also == reasoning


def test_hermes_tool_calls_end_to_end(qwen3: LiveServer) -> None:
    client = qwen3.client()
    prompt = prompt_text(qwen3, tools=[ADD])
    assert "<tools>" in prompt and '"name": "add"' in prompt  # Qwen3's template lists the tools
    for seed in range(3):
        res = create(
            client, tools=[ADD], tool_choice="required", parallel_tool_calls=False, max_tokens=200, seed=seed
        )
        choice = res.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice.message
        call = choice.message.tool_calls[0]
        assert call.function.name == "add"
        jsonschema.validate(json.loads(call.function.arguments), ADD["function"]["parameters"])
    # the call and its result render back through the template
    history = [
        *HELLO,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(mode="json")]},
        {"role": "tool", "tool_call_id": call.id, "content": "3"},
    ]
    rendered = prompt_text(qwen3, messages=history, tools=[ADD])
    assert "<tool_call>" in rendered and "<tool_response>\n3\n</tool_response>" in rendered


def test_constrained_auto_mode_allows_text_or_one_valid_call(qwen3: LiveServer) -> None:
    """parallel_tool_calls false in auto mode: the grammar lets the model answer in text or
    make one call (after text or not). A bias on <tool_call> makes the random model call."""
    client = qwen3.client()
    with qwen3.http() as http:
        marker = http.post("/tokenize", json={"prompt": "<tool_call>", "add_special_tokens": False}).json()[
            "tokens"
        ]
    assert len(marker) == 1
    for bias, seed in ((None, 0), (None, 1), ({str(marker[0]): 30}, 0), ({str(marker[0]): 30}, 1)):
        res = create(
            client,
            tools=[ADD],
            parallel_tool_calls=False,
            max_tokens=200,
            seed=seed,
            temperature=1.0,
            logit_bias=bias,
        )
        choice = res.choices[0]
        content = choice.message.content or ""
        assert "<tool_call>" not in content and "</tool_call>" not in content
        if bias is None:
            continue
        assert choice.finish_reason == "tool_calls", choice.message
        assert len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.function.name == "add"
        jsonschema.validate(json.loads(call.function.arguments), ADD["function"]["parameters"])


def test_generation_that_starts_inside_the_thinking_block(r1: LiveServer) -> None:
    """R1's prompt ends with "<think>\n" when thinking is on, so the output is reasoning up to
    </think>; with thinking off the template closes the block and the output is content."""
    client = r1.client()
    assert prompt_text(r1, enable_thinking=True).endswith("<think>\n")
    thought = {"type": "lark", "value": 'start: /[a-z]{3,8}/ "\\n</think>\\n\\n" /[a-z]{3,8}/'}
    res = create(client, extra_body={"grammar": thought, "enable_thinking": True}, max_tokens=40, seed=0)
    message = res.choices[0].message
    reasoning = (message.model_extra or {}).get("reasoning_content")
    assert reasoning and reasoning.isalpha() and message.content.isalpha(), message
    assert prompt_text(r1, enable_thinking=False).endswith("<think>\n</think>")
    plain = {"type": "regex", "value": "[a-z]{3,8}"}
    res = create(client, extra_body={"grammar": plain, "enable_thinking": False}, max_tokens=20, seed=0)
    message = res.choices[0].message
    assert message.content.isalpha() and not (message.model_extra or {}).get("reasoning_content")
