"""Tool-call parsing: every family's format, whole and streamed at every split, grammars, detection."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema
import numpy as np
import pytest
from mistralrs_serve.entrypoints.openai.reasoning import reasoning_markers, split_reasoning
from mistralrs_serve.entrypoints.openai.tool_parsers import (
    FORMATS,
    ToolCall,
    ToolCallDelta,
    ToolCallFormat,
    detect_format,
    get_format,
)
from mistralrs_serve.errors import ChatTemplateError
from mistralrs_serve.tokenizer.chat_template import ChatTemplate
from template_data import needs_templates, read_template

try:
    from mistralrs_serve import _native

    HAVE_NATIVE = True
except ImportError:  # the Rust extension is not built here
    HAVE_NATIVE = False
needs_native = pytest.mark.skipif(
    not HAVE_NATIVE, reason="the Rust extension mistralrs_serve._native is not built"
)


# Tool markup that must never reach a content delta when it belongs to a valid call.
MARKUP = (
    "<tool_call>",
    "</tool_call>",
    "<function=",
    "[TOOL_CALLS]",
    "[ARGS]",
    "<|python_tag|>",
    "<|tool_call|>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁sep｜>",
)

# --- Recorded-style outputs: (format, output, expected content, expected [(name, arguments)]) ---
# Expected arguments are the decoded object, or the exact text where the model wrote invalid JSON.


@dataclass(frozen=True)
class Case:
    id: str
    format: str
    text: str
    content: str | None
    calls: list[tuple[str, Any]]

    @property
    def valid(self) -> bool:
        """Whether all markup in the output forms calls (else it is content, verbatim)."""
        return not any(marker in (self.content or "") for marker in MARKUP)


WEATHER_PARIS = ("get_weather", {"city": "Paris", "unit": "celsius"})
NESTED_BOOKING = (
    "book_table",
    {
        "restaurant": "Café de Flore — 東京",
        "party": {"adults": 2, "children": [{"age": 7}]},
        "notes": 'window seat, "quiet" please',
    },
)

CASES = [
    # Hermes / Qwen2.5 / Qwen3 / QwQ
    Case(
        "hermes-plain",
        "hermes",
        "The capital of France is Paris. It has about 2.1 million inhabitants.",
        "The capital of France is Paris. It has about 2.1 million inhabitants.",
        [],
    ),
    Case(
        "hermes-one-call",
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
        "</tool_call>",
        None,
        [WEATHER_PARIS],
    ),
    Case(
        "hermes-text-two-calls-unicode-nested",
        "hermes",
        "I'll check the weather and book a table for you.\n\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "book_table", "arguments": {"restaurant": "Café de Flore — 東京", '
        '"party": {"adults": 2, "children": [{"age": 7}]}, "notes": "window seat, \\"quiet\\" please"}}\n'
        "</tool_call>",
        "I'll check the weather and book a table for you.",
        [("get_weather", {"city": "Zürich", "unit": "celsius"}), NESTED_BOOKING],
    ),
    Case(
        "hermes-text-after-call",
        "hermes",
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\nI asked for the current time.',
        "I asked for the current time.",
        [("get_time", {})],
    ),
    Case(
        "hermes-arguments-as-json-string",
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n</tool_call>',
        None,
        [("get_weather", {"city": "Paris"})],
    ),
    Case(
        "hermes-close-tag-inside-string",
        "hermes",
        '<tool_call>\n{"name": "echo", "arguments": {"text": "the tag is </tool_call>"}}\n</tool_call>',
        None,
        [("echo", {"text": "the tag is </tool_call>"})],
    ),
    Case(
        "hermes-unterminated-valid",
        "hermes",
        'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
        "Checking.",
        [WEATHER_PARIS],
    ),
    Case(  # the arguments began (and streamed): a call, though the object around them is unclosed
        "hermes-call-object-unclosed",
        "hermes",
        'Calling now.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n'
        "</tool_call>\nDone.",
        "Calling now.\nDone.",
        [("get_weather", {"city": "Paris"})],
    ),
    Case(  # the brackets of the arguments never match: they run to the closing marker
        "hermes-arguments-unclosed",
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>\nDone.',
        "Done.",
        [("get_weather", '{"city": "Paris"\n')],
    ),
    Case(  # not JSON before any arguments began: text, verbatim
        "hermes-bad-json",
        "hermes",
        'Calling now.\n<tool_call>\n{"name": "get_weather", "arguments" {"city": "Paris"}}\n</tool_call>',
        'Calling now.\n<tool_call>\n{"name": "get_weather", "arguments" {"city": "Paris"}}\n</tool_call>',
        [],
    ),
    Case(
        "hermes-wrong-structure",
        "hermes",
        '<tool_call>\n{"function": "get_weather", "city": "Paris"}\n</tool_call>',
        '<tool_call>\n{"function": "get_weather", "city": "Paris"}\n</tool_call>',
        [],
    ),
    Case(
        "hermes-prose-mention",
        "hermes",
        "Wrap each call in <tool_call> tags, like <tool_call>this</tool_call>; a <tool> is not one.",
        "Wrap each call in <tool_call> tags, like <tool_call>this</tool_call>; a <tool> is not one.",
        [],
    ),
    Case(
        "hermes-reads-xml-block",
        "hermes",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=unit>\ncelsius\n</parameter>\n</function>\n</tool_call>",
        None,
        [WEATHER_PARIS],
    ),
    # Qwen3-Coder / Qwen3.5
    Case(
        "qwen3-coder-text-and-call",
        "qwen3_coder",
        "I will look at the file first.\n\n<tool_call>\n<function=read_file>\n<parameter=path>\n"
        "src/main.py\n</parameter>\n<parameter=start_line>\n10\n</parameter>\n</function>\n</tool_call>",
        "I will look at the file first.",
        [("read_file", {"path": "src/main.py", "start_line": 10})],
    ),
    Case(
        "qwen3-coder-two-calls-multiline-nested",
        "qwen3_coder",
        "<tool_call>\n<function=write_file>\n<parameter=path>\nhello.py\n</parameter>\n<parameter=content>\n"
        'def greet(name):\n    print(f"Grüß dich, {name}!")\n</parameter>\n</function>\n</tool_call>\n'
        '<tool_call>\n<function=run>\n<parameter=argv>\n["python", "hello.py"]\n</parameter>\n'
        '<parameter=env>\n{"LANG": "de_DE.UTF-8", "DEBUG": false}\n</parameter>\n</function>\n</tool_call>',
        None,
        [
            (
                "write_file",
                {"path": "hello.py", "content": 'def greet(name):\n    print(f"Grüß dich, {name}!")'},
            ),
            ("run", {"argv": ["python", "hello.py"], "env": {"LANG": "de_DE.UTF-8", "DEBUG": False}}),
        ],
    ),
    Case(
        "qwen3-coder-reads-json-block",
        "qwen3_coder",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
        "</tool_call>",
        None,
        [WEATHER_PARIS],
    ),
    Case(
        "qwen3-coder-unclosed-parameter",
        "qwen3_coder",
        "<tool_call>\n<function=read_file>\n<parameter=path>\nsrc/main.py\n</function>\n</tool_call>",
        "<tool_call>\n<function=read_file>\n<parameter=path>\nsrc/main.py\n</function>\n</tool_call>",
        [],
    ),
    # Llama 3.1 / 3.2 JSON
    Case(
        "llama3-one-call",
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "San Francisco, CA", "unit": "fahrenheit"}}',
        None,
        [("get_weather", {"city": "San Francisco, CA", "unit": "fahrenheit"})],
    ),
    Case(
        "llama3-python-tag-nested-unicode",
        "llama3_json",
        '<|python_tag|>{"name": "search", "parameters": {"query": "Tōkyō population", '
        '"filters": {"year": 2024, "sources": ["wiki", "census"]}}}',
        None,
        [("search", {"query": "Tōkyō population", "filters": {"year": 2024, "sources": ["wiki", "census"]}})],
    ),
    Case(
        "llama3-two-calls",
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
        '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}',
        None,
        [WEATHER_PARIS, ("get_time", {"timezone": "Europe/Paris"})],
    ),
    Case(
        "llama3-arguments-key-leading-space",
        "llama3_json",
        '\n\n{"name": "get_time", "arguments": {}}',
        None,
        [("get_time", {})],
    ),
    Case(
        "llama3-call-then-text",
        "llama3_json",
        '{"name": "get_time", "parameters": {}}\nLet me know if you need anything else.',
        "Let me know if you need anything else.",
        [("get_time", {})],
    ),
    Case(
        "llama3-text-first",
        "llama3_json",
        'It is sunny in Paris, 24 °C. {"name": "get_weather", "parameters": {"city": "Paris"}}',
        'It is sunny in Paris, 24 °C. {"name": "get_weather", "parameters": {"city": "Paris"}}',
        [],
    ),
    Case(
        "llama3-json-answer",
        "llama3_json",
        '{"answer": 42, "unit": "meters"}',
        '{"answer": 42, "unit": "meters"}',
        [],
    ),
    Case(  # cut off (max_tokens) after the arguments began: a call with the text it has
        "llama3-truncated",
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Par',
        None,
        [("get_weather", '{"city": "Par')],
    ),
    Case(  # cut off before the arguments began: text
        "llama3-truncated-before-arguments",
        "llama3_json",
        '{"name": "get_weather", "parame',
        '{"name": "get_weather", "parame',
        [],
    ),
    Case(
        "llama3-builtin-tool-call",
        "llama3_json",
        '<|python_tag|>brave_search.call(query="weather Paris")',
        '<|python_tag|>brave_search.call(query="weather Paris")',
        [],
    ),
    # Mistral Nemo and Mistral Small 3.2
    Case(
        "mistral-list-two-calls",
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
        '{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}, "id": "a1B2c3D4e"}]',
        None,
        [WEATHER_PARIS, ("get_weather", {"city": "Zürich", "unit": "celsius"})],
    ),
    Case(
        "mistral-text-before",
        "mistral",
        'Sure, let me check. [TOOL_CALLS][{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}]',
        "Sure, let me check.",
        [("get_time", {"tz": "Europe/Paris"})],
    ),
    Case(  # the arguments began: a call; the mismatched rest is dropped
        "mistral-mismatched-brackets",
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}]',
        None,
        [("get_weather", {"city": "Paris"})],
    ),
    Case(
        "mistral-mismatched-brackets-before-arguments",
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather"]',
        '[TOOL_CALLS][{"name": "get_weather"]',
        [],
    ),
    Case(  # arguments that are not JSON, and the next call after them
        "mistral-v11-bad-arguments",
        "mistral_v11",
        '[TOOL_CALLS]get_weather[ARGS]{city: Paris}[TOOL_CALLS]get_time[ARGS]{"tz": "UTC"}',
        None,
        [("get_weather", "{city: Paris}"), ("get_time", {"tz": "UTC"})],
    ),
    Case(
        "mistral-v11-unclosed-arguments",
        "mistral_v11",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"[TOOL_CALLS]get_time[ARGS]{"tz": "UTC"}',
        None,
        [("get_weather", '{"city": "Paris"'), ("get_time", {"tz": "UTC"})],
    ),
    Case(
        "mistral-v11-two-calls",
        "mistral_v11",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
        '[TOOL_CALLS]get_time[ARGS]{"tz": "Europe/Paris"}',
        None,
        [WEATHER_PARIS, ("get_time", {"tz": "Europe/Paris"})],
    ),
    Case(
        "mistral-v11-call-id-nested",
        "mistral_v11",
        "Je vérifie.[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]"
        '{"city": "Zürich", "details": {"hourly": true}}',
        "Je vérifie.",
        [("get_weather", {"city": "Zürich", "details": {"hourly": True}})],
    ),
    Case(
        "mistral-v11-reads-list-style",
        "mistral_v11",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
        None,
        [WEATHER_PARIS],
    ),
    Case(
        "mistral-v11-bad-name",
        "mistral_v11",
        '[TOOL_CALLS]get weather[ARGS]{"city": "Paris"}',
        '[TOOL_CALLS]get weather[ARGS]{"city": "Paris"}',
        [],
    ),
    Case(  # a new block before the first one closed: the first call stands, then the next block
        "hermes-next-block-before-close",
        "hermes",
        '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n'
        '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>',
        None,
        [("a", {"x": 1}), ("b", {})],
    ),
    Case(  # the first value is no JSON, a second one follows in the block: both calls stand
        "hermes-bad-value-then-another",
        "hermes",
        '<tool_call>\n{"name": "a", "arguments": {{"x": 1}}\n<tool_call>}\n{"name": "b", "arguments": {}}\n'
        "</tool_call>",
        None,
        [("a", '{{"x": 1}}'), ("b", {})],
    ),
    Case(  # cut off in the closing fence: still the fence
        "json-fence-cut-off",
        "json",
        '```json\n[{"name": "get_weather", "arguments": {"city": "Paris"}}]\n``',
        None,
        [("get_weather", {"city": "Paris"})],
    ),
    Case(  # after ";", a marker that only starts like the tag: text
        "llama3-separator-then-other-marker",
        "llama3_json",
        '{"name": "get_time", "parameters": {}};<|tool_call|> x',
        ";<|tool_call|> x",
        [("get_time", {})],
    ),
    Case(
        "json-fenced-extra-key",
        "json",
        '```json\n{"name": "a", "arguments": {"x": 1}, "why": "?"}\n```\nThat is all.',
        "That is all.",
        [("a", {"x": 1})],
    ),
    Case(
        "llama3-unclosed-then-tag",
        "llama3_json",
        '{"name": "a", "parameters": {"x": [1}<|python_tag|>{"name": "b", "parameters": {}}',
        None,
        [("a", '{"x": [1}'), ("b", {})],
    ),
    Case(
        "granite-extra-key",
        "granite",
        '<|tool_call|>[{"name": "a", "arguments": {"x": 1}, "why": "?"}] Thanks.',
        "Thanks.",
        [("a", {"x": 1})],
    ),
    # Granite 3.3
    Case(
        "granite-list",
        "granite",
        '<|tool_call|>[{"name": "get_stock_price", "arguments": {"ticker": "IBM"}}, '
        '{"name": "get_stock_price", "arguments": {"ticker": "RHT"}}]',
        None,
        [("get_stock_price", {"ticker": "IBM"}), ("get_stock_price", {"ticker": "RHT"})],
    ),
    # DeepSeek V3.1 and R1 / V3
    Case(
        "deepseek-v31-two-calls",
        "deepseek",
        "Let me check both.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
        '{"city": "Zürich"}<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>'
        '{"tz": "Europe/Zurich", "format": {"hour12": false}}<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
        "Let me check both.",
        [
            ("get_weather", {"city": "Zürich"}),
            ("get_time", {"tz": "Europe/Zurich", "format": {"hour12": False}}),
        ],
    ),
    Case(
        "deepseek-r1-fenced-two-calls",
        "deepseek_r1",
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
        '{"city": "Paris", "unit": "celsius"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function'
        '<｜tool▁sep｜>book_table\n```json\n{"restaurant": "Café de Flore — 東京", "party": {"adults": 2, '
        '"children": [{"age": 7}]}, "notes": "window seat, \\"quiet\\" please"}\n```<｜tool▁call▁end｜>'
        "<｜tool▁calls▁end｜>",
        None,
        [WEATHER_PARIS, NESTED_BOOKING],
    ),
    Case(  # the arguments began: a call, with the (invalid) text up to the call's end marker
        "deepseek-broken-json",
        "deepseek",
        '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": <｜tool▁call▁end｜>'
        "<｜tool▁calls▁end｜>",
        None,
        [("get_weather", '{"city": ')],
    ),
    Case(  # no arguments object: text
        "deepseek-no-arguments-object",
        "deepseek",
        "Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>city=Paris<｜tool▁call▁end｜>"
        "<｜tool▁calls▁end｜>",
        "Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>city=Paris<｜tool▁call▁end｜>"
        "<｜tool▁calls▁end｜>",
        [],
    ),
    Case(  # a call, then one that is unreadable: the first stands, the rest of the block is dropped
        "deepseek-second-call-unreadable",
        "deepseek",
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{}<｜tool▁call▁end｜>"
        "<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>city=Paris<｜tool▁call▁end｜><｜tool▁calls▁end｜>Done.",
        "Done.",
        [("get_time", {})],
    ),
    # Plain JSON fallback
    Case(
        "json-object",
        "json",
        '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
        None,
        [WEATHER_PARIS],
    ),
    Case(
        "json-fenced-list",
        "json",
        '```json\n[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
        '{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}]\n```',
        None,
        [WEATHER_PARIS, ("get_time", {"tz": "Europe/Paris"})],
    ),
    Case(
        "json-fence-after-text",
        "json",
        'Here you go:\n```json\n{"name": "get_time", "arguments": {}}\n```',
        'Here you go:\n```json\n{"name": "get_time", "arguments": {}}\n```',
        [],
    ),
    Case(
        "json-other-fence",
        "json",
        '```python\nprint("hello")\n```',
        '```python\nprint("hello")\n```',
        [],
    ),
    Case(
        "json-not-a-call",
        "json",
        '{"name": "Alice", "age": 30}',
        '{"name": "Alice", "age": 30}',
        [],
    ),
]


# --- Helpers ---


def stream(
    fmt: ToolCallFormat, pieces: list[str], tools: list[dict[str, Any]] | None = None
) -> tuple[list[str], list[ToolCallDelta], list[ToolCall]]:
    """Feeds `pieces`, then finishes: (content deltas, tool-call deltas, the streamer's calls)."""
    streamer = fmt.streamer(tools=tools)
    contents: list[str] = []
    deltas: list[ToolCallDelta] = []
    for out in [*(streamer.feed(piece) for piece in pieces), streamer.finish()]:
        contents.append(out.content)
        deltas.extend(out.tool_calls)
    return contents, deltas, streamer.calls


def assemble(deltas: list[ToolCallDelta]) -> list[ToolCall]:
    """The calls the deltas describe, checking their shape as an OpenAI client would rely on it."""
    calls: list[dict[str, str]] = []
    for delta in deltas:
        if delta.index == len(calls):
            assert delta.id and delta.name, f"the first delta of call {delta.index} lacks id or name"
            calls.append({"id": delta.id, "name": delta.name, "arguments": delta.arguments})
        else:
            assert delta.index == len(calls) - 1, "deltas must come call after call, indices from 0"
            assert delta.id is None and delta.name is None, "only a call's first delta names it"
            calls[-1]["arguments"] += delta.arguments
    return [ToolCall(call["id"], call["name"], call["arguments"]) for call in calls]


def decoded(calls: list[ToolCall]) -> list[tuple[str, Any]]:
    """(name, decoded arguments) of each call; arguments that are not JSON stay text."""
    out: list[tuple[str, Any]] = []
    for call in calls:
        try:
            out.append((call.name, json.loads(call.arguments)))
        except ValueError:
            out.append((call.name, call.arguments))
    return out


def told(calls: list[ToolCall]) -> list[tuple[str, str]]:
    """(name, arguments text) of each call: what a client sees, ids aside."""
    return [(call.name, call.arguments) for call in calls]


def splits(text: str) -> list[list[str]]:
    """Every two-piece split of `text`, and one character at a time."""
    return [[text[:cut], text[cut:]] for cut in range(len(text) + 1)] + [list(text)]


def check_streaming(
    fmt: ToolCallFormat, text: str, *, valid: bool, tools: list[dict[str, Any]] | None = None
) -> None:
    content, calls = fmt.parse(text, tools=tools)
    for pieces in splits(text):
        contents, deltas, streamed_calls = stream(fmt, pieces, tools)
        assembled = assemble(deltas)
        where = f"split {[len(piece) for piece in pieces][:3]}"
        assert "".join(contents) == (content or ""), where
        assert told(assembled) == told(calls), where  # the very text parse() gives
        assert assembled == streamed_calls, f"{where}: the streamer's calls differ from its deltas"
        if valid:
            for piece in contents:
                assert not any(marker in piece for marker in MARKUP), f"{where}: markup in {piece!r}"


# --- Parsing and streaming recorded outputs ---


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_parse(case: Case) -> None:
    content, calls = get_format(case.format).parse(case.text)
    assert content == case.content
    assert decoded(calls) == case.calls
    for call, (_, expected) in zip(calls, case.calls, strict=True):
        if isinstance(expected, dict):
            assert isinstance(json.loads(call.arguments), dict)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_streaming_matches_parse_at_every_split(case: Case) -> None:
    check_streaming(get_format(case.format), case.text, valid=case.valid)


def test_cases_cover_every_format() -> None:
    assert {case.format for case in CASES} == set(FORMATS)


def test_call_ids() -> None:
    _, calls = get_format("hermes").parse(CASES[2].text)
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id) for call in calls)
    assert len({call.id for call in calls}) == len(calls)
    # Mistral's templates reject tool-call ids other than 9 alphanumerics when a client sends them back.
    _, calls = get_format("mistral_v11").parse('[TOOL_CALLS]a[ARGS]{}[TOOL_CALLS]b[ARGS]{"x": 1}')
    assert [call.name for call in calls] == ["a", "b"]
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", call.id) for call in calls)


def test_partial_marker_is_held_back() -> None:
    streamer = get_format("hermes").streamer()
    assert streamer.feed("Let me check. <tool_").content == "Let me check."
    assert streamer.feed('call>\n{"name": "get_time", ').content == ""
    out = streamer.feed('"arguments": {}}\n</tool_call>')
    assert (out.content, [(d.index, d.name, d.arguments) for d in out.tool_calls]) == (
        "",
        [(0, "get_time", "{}")],
    )
    assert streamer.finish().content == ""

    streamer = get_format("hermes").streamer()
    assert streamer.feed("a <tool").content == "a"
    assert streamer.feed("box> b").content == " <toolbox> b"


def test_partial_marker_at_the_end_is_content() -> None:
    for name, text in [
        ("hermes", "See the <tool_ca"),
        ("mistral", "Done [TOOL_"),
        ("deepseek", "x <｜tool▁"),
    ]:
        streamer = get_format(name).streamer()
        held = streamer.feed(text).content
        assert held + streamer.finish().content == text


def test_llama3_output_starting_with_brace_is_held_until_decided() -> None:
    streamer = get_format("llama3_json").streamer()
    assert streamer.feed('{"name": "get_weather", ').content == ""
    out = streamer.feed('"parameters": {"city": "Paris"}}')
    assert [(d.name, json.loads(d.arguments)) for d in out.tool_calls] == [("get_weather", {"city": "Paris"})]

    streamer = get_format("llama3_json").streamer()
    assert streamer.feed('{"answer"').content == ""
    assert streamer.feed(": 42}").content == '{"answer": 42}'
    assert streamer.feed(" and more").content == " and more"

    streamer = get_format("llama3_json").streamer()
    assert streamer.feed("Sure").content == "Sure"  # not a call: streams at once


def test_whitespace_only_output_is_no_content() -> None:
    for fmt in FORMATS.values():
        assert fmt.parse("  \n\n ") == (None, [])
        check_streaming(fmt, " \n ", valid=True)


def test_finish_is_idempotent_and_feed_after_finish_fails() -> None:
    streamer = get_format("hermes").streamer()
    assert streamer.feed("Hello <tool_call>").content == "Hello"
    assert streamer.finish().content == " <tool_call>"
    assert streamer.finish().content == ""
    with pytest.raises(RuntimeError):
        streamer.feed("more")


@pytest.mark.parametrize("name", ["mistral", "hermes", "deepseek_r1"])
def test_long_arguments_stream_in_reasonable_time(name: str) -> None:
    body = json.dumps({"path": "big.txt", "content": "x" * 20_000 + ' "quoted" {braces} ' * 500})
    before, after, _ = next((b, a, c) for fmt, b, a, c in INCREMENTAL if fmt == name)
    text = before + body + after
    streamer = get_format(name).streamer()
    deltas: list[ToolCallDelta] = []
    for start in range(0, len(text), 3):  # ~10k small deltas
        deltas.extend(streamer.feed(text[start : start + 3]).tool_calls)
    deltas.extend(streamer.finish().tool_calls)
    assert told(streamer.calls) == [("write", body)]
    assert len(deltas) > len(body) // 4  # nearly one delta per piece of output
    assert told(assemble(deltas)) == [("write", body)]


# --- Arguments stream as they arrive ---

# Arguments long enough to arrive in many pieces, written the way no json.dumps would write them.
LONG_ARGUMENTS = (
    '{"path":"notes/today.md" , "content": "Line one.\\nLine two, with \\"quotes\\", {braces}, '
    '[brackets] and a }.", "overwrite": true,\n "tags": ["a", "b"], "limits": {"lines": 200}}'
)
# (format, text before the arguments, text after them, the closing markup at the end of that): each
# writes one call to `write` with LONG_ARGUMENTS.
INCREMENTAL = [
    (
        "hermes",
        'Let me write it.\n<tool_call>\n{"name": "write", "arguments": ',
        "}\n</tool_call>",
        "</tool_call>",
    ),
    ("qwen3_coder", '<tool_call>\n{"name": "write", "arguments": ', "}\n</tool_call>", "</tool_call>"),
    ("llama3_json", '<|python_tag|>{"name": "write", "parameters": ', "}", "}"),
    ("llama3_json", '{"name": "write", "parameters": ', "}", "}"),
    ("json", '{"name": "write", "arguments": ', "}", "}"),
    ("json", '```json\n[{"name": "write", "arguments": ', "}]\n```", "]\n```"),
    ("mistral", 'Writing.[TOOL_CALLS][{"name": "write", "arguments": ', "}]", "}]"),
    ("mistral", "[TOOL_CALLS]write[ARGS]", "", ""),
    ("mistral_v11", "[TOOL_CALLS]write[CALL_ID]a1B2c3D4e[ARGS]", "", ""),
    ("granite", '<|tool_call|>[{"name": "write", "arguments": ', "}]", "}]"),
    (
        "deepseek",
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>write<｜tool▁sep｜>",
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        "<｜tool▁calls▁end｜>",
    ),
    (
        "deepseek_r1",
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>write\n```json\n",
        "\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        "```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    ),
]
INCREMENTAL_IDS = [f"{name}-{number}" for number, (name, *_) in enumerate(INCREMENTAL)]


def feed_all(streamer: Any, pieces: list[str]) -> tuple[str, list[ToolCallDelta]]:
    content, deltas = "", []
    for piece in pieces:
        out = streamer.feed(piece)
        content += out.content
        deltas.extend(out.tool_calls)
    return content, deltas


def test_incremental_cases_cover_every_json_format() -> None:
    assert {name for name, *_ in INCREMENTAL} == set(FORMATS)


@pytest.mark.parametrize(("name", "before", "after", "closing"), INCREMENTAL, ids=INCREMENTAL_IDS)
def test_arguments_stream_as_they_arrive(name: str, before: str, after: str, closing: str) -> None:
    fmt = get_format(name)
    text = before + LONG_ARGUMENTS + after
    _, calls = fmt.parse(text)
    assert told(calls) == [("write", LONG_ARGUMENTS)]  # the arguments as the model wrote them

    streamer = fmt.streamer()
    _, deltas = feed_all(streamer, list(text))
    deltas.extend(streamer.finish().tool_calls)
    assert deltas[0].id and deltas[0].name == "write"
    pieces = [delta.arguments for delta in deltas if delta.arguments]
    assert len(pieces) > 10, "one character at a time, the arguments come in many deltas"
    assert "".join(pieces) == LONG_ARGUMENTS
    assert assemble(deltas) == streamer.calls
    check_streaming(fmt, text, valid=True)


@pytest.mark.parametrize(("name", "before", "after", "closing"), INCREMENTAL, ids=INCREMENTAL_IDS)
def test_call_is_told_before_its_closing_markup(name: str, before: str, after: str, closing: str) -> None:
    fmt = get_format(name)
    half = len(LONG_ARGUMENTS) // 2
    streamer = fmt.streamer()
    # Halfway through the arguments: the call is named, and all its argument text so far is out.
    _, deltas = feed_all(streamer, list(before + LONG_ARGUMENTS[:half]))
    assert [(d.index, d.name) for d in deltas if d.id] == [(0, "write")]
    assert "".join(d.arguments for d in deltas) == LONG_ARGUMENTS[:half]
    # Up to the closing markup: all the arguments are out, but the call is not closed yet.
    text = before + LONG_ARGUMENTS + after
    rest = text[len(before) + half : len(text) - len(closing)]
    _, more = feed_all(streamer, list(rest))
    assert all(d.id is None and d.name is None for d in more)
    if closing:
        assert "".join(d.arguments for d in deltas + more) == LONG_ARGUMENTS
        assert streamer.calls == []
    out = streamer.feed(closing)
    tail = streamer.finish()
    assert out.content + tail.content == ""
    calls = assemble(deltas + more + out.tool_calls + tail.tool_calls)
    assert told(calls) == told(streamer.calls) == [("write", LONG_ARGUMENTS)]


def test_content_before_a_call_is_not_held_back() -> None:
    streamer = get_format("hermes").streamer()
    content, deltas = feed_all(
        streamer, ["I will write it.", "\n<tool_call>\n", '{"name": "write", "arguments": {"p']
    )
    assert content == "I will write it."
    assert [(d.index, d.id is not None, d.name, d.arguments) for d in deltas] == [(0, True, "write", '{"p')]


def test_several_calls_stream_one_after_another() -> None:
    text = (
        '[TOOL_CALLS][{"name": "a", "arguments": {"x": [1, 2, 3]}}, {"name": "b", "arguments": {"y": "z"}, '
        '"id": "a1B2c3D4e"}]'
    )
    streamer = get_format("mistral").streamer()
    _, deltas = feed_all(streamer, list(text))
    deltas.extend(streamer.finish().tool_calls)
    assert [d.index for d in deltas if d.id] == [0, 1]
    assert sum(1 for d in deltas if d.index == 1 and d.arguments) > 1  # the second call streams too
    assert told(assemble(deltas)) == [("a", '{"x": [1, 2, 3]}'), ("b", '{"y": "z"}')]
    check_streaming(get_format("mistral"), text, valid=True)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        # The arguments before the name: the name is not known until the object closes.
        (
            "hermes",
            '<tool_call>\n{"arguments": {"city":"Paris"}, "name": "get_weather"}\n</tool_call>',
            [("get_weather", '{"city": "Paris"}')],
        ),
        (
            "json",
            '{"arguments": {"city":"Paris"}, "name": "get_weather"}',
            [("get_weather", '{"city": "Paris"}')],
        ),
        # The arguments as a JSON string.
        (
            "mistral",
            '[TOOL_CALLS][{"name": "get_weather", "arguments": "{\\"city\\":\\"Paris\\"}"}]',
            [("get_weather", '{"city": "Paris"}')],
        ),
        # Qwen3-Coder's XML: the parameters become JSON at the end.
        (
            "qwen3_coder",
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
            [("get_weather", '{"city": "Paris"}')],
        ),
    ],
)
def test_calls_without_raw_arguments_come_whole_at_their_close(name: str, text: str, expected: Any) -> None:
    fmt = get_format(name)
    assert told(fmt.parse(text)[1]) == expected  # json.dumps of the arguments
    streamer = fmt.streamer()
    _, deltas = feed_all(streamer, list(text))
    deltas.extend(streamer.finish().tool_calls)
    assert len(deltas) == 1 and deltas[0].id and told(assemble(deltas)) == expected
    check_streaming(fmt, text, valid=True)


def test_list_with_a_call_that_has_no_head() -> None:
    """Calls stream up to the first one whose name comes after its arguments; later ones come whole."""
    text = (
        '<|tool_call|>[{"name": "a", "arguments": {"n":1}}, {"arguments": {"n":2}, "name": "b"}, '
        '{"name": "c", "arguments": {"n":3}}]'
    )
    fmt = get_format("granite")
    assert told(fmt.parse(text)[1]) == [("a", '{"n":1}'), ("b", '{"n": 2}'), ("c", '{"n":3}')]
    streamer = fmt.streamer()
    _, deltas = feed_all(streamer, list(text[:-1]))
    assert [d.name for d in deltas if d.name] == ["a"]
    check_streaming(fmt, text, valid=True)


def test_end_marker_inside_a_string_is_held_back_until_the_brackets_tell() -> None:
    streamer = get_format("hermes").streamer()
    _, deltas = feed_all(streamer, ['<tool_call>\n{"name": "echo", "arguments": {"text": "a </tool_call> b'])
    assert "".join(d.arguments for d in deltas) == '{"text": "a '
    _, more = feed_all(streamer, ['"}}\n</tool_call>'])
    assert "".join(d.arguments for d in deltas + more) == '{"text": "a </tool_call> b"}'
    assert told(streamer.calls) == [("echo", '{"text": "a </tool_call> b"}')]


# --- Qwen3-Coder values typed by the tools' schemas ---

CODER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "set_zip",
            "parameters": {
                "type": "object",
                "properties": {"zip": {"type": "string"}, "count": {"type": "integer"}, "note": {}},
                "required": ["zip"],
            },
        },
    }
]
CODER_OUTPUT = (
    "<tool_call>\n<function=set_zip>\n<parameter=zip>\n12345\n</parameter>\n<parameter=count>\n3\n"
    "</parameter>\n<parameter=note>\nnull\n</parameter>\n</function>\n</tool_call>"
)


def test_qwen3_coder_types_values_by_schema() -> None:
    fmt = get_format("qwen3_coder")
    _, calls = fmt.parse(CODER_OUTPUT, tools=CODER_TOOLS)
    assert decoded(calls) == [("set_zip", {"zip": "12345", "count": 3, "note": None})]
    check_streaming(fmt, CODER_OUTPUT, valid=True, tools=CODER_TOOLS)
    # Without the schema, text that is JSON (other than a JSON string) is taken as JSON.
    _, calls = fmt.parse(CODER_OUTPUT)
    assert decoded(calls) == [("set_zip", {"zip": 12345, "count": 3, "note": None})]
    _, calls = fmt.parse(CODER_OUTPUT.replace("12345", '"02139"').replace("\n3\n", "\n02139\n"))
    assert decoded(calls) == [("set_zip", {"zip": '"02139"', "count": "02139", "note": None})]


# --- Grammars ---

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
            "strict": True,
        },
    },
    {"type": "function", "function": {"name": "get_time", "description": "Current time"}},
]
SCHEMAS = {"get_weather": TOOLS[0]["function"]["parameters"], "get_time": {"type": "object"}}

# What each format's grammar writes for the calls get_weather(city="Zürich") and get_time():
# the text of one call, of two, and the pieces that must appear in the grammar as literals.
ONE = {
    "json": '{"name": "get_weather", "arguments": {"city": "Zürich"}}',
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>',
    "llama3_json": '{"name": "get_weather", "parameters": {"city": "Zürich"}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Zürich"}}]',
    "mistral_v11": '[TOOL_CALLS]get_weather[ARGS]{"city": "Zürich"}',
    "granite": '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Zürich"}}]',
    "deepseek": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
    '{"city": "Zürich"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
    "deepseek_r1": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
    '{"city": "Zürich"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
    "qwen3_coder": "<tool_call>\n<function=get_weather>\n<parameter=city>\nZürich\n</parameter>\n"
    "</function>\n</tool_call>",
}
TWO = {
    "json": '[{"name": "get_weather", "arguments": {"city": "Zürich"}}, '
    '{"name": "get_time", "arguments": {}}]',
    "hermes": ONE["hermes"] + '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
    "llama3_json": ONE["llama3_json"] + '; {"name": "get_time", "parameters": {}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Zürich"}}, '
    '{"name": "get_time", "arguments": {}}]',
    "mistral_v11": ONE["mistral_v11"] + "[TOOL_CALLS]get_time[ARGS]{}",
    "granite": '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Zürich"}}, '
    '{"name": "get_time", "arguments": {}}]',
    "deepseek": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
    '{"city": "Zürich"}<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{}<｜tool▁call▁end｜>'
    "<｜tool▁calls▁end｜>",
    "deepseek_r1": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
    '{"city": "Zürich"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n'
    "```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    "qwen3_coder": ONE["qwen3_coder"] + "\n<tool_call>\n<function=get_time>\n</function>\n</tool_call>",
}
LITERALS = {
    "json": [
        '{"name": "get_weather", "arguments": ',
        '{"name": "get_time", "arguments": ',
        "}",
        "[",
        ", ",
        "]",
    ],
    "hermes": ["<tool_call>", '\n{"name": "get_weather", "arguments": ', "}\n", "</tool_call>", "\n"],
    "llama3_json": ['{"name": "get_weather", "parameters": ', "}", "; "],
    "mistral": ["[TOOL_CALLS]", "[", '{"name": "get_weather", "arguments": ', ", ", "]"],
    "mistral_v11": ["[TOOL_CALLS]", "get_weather", "[ARGS]", "get_time"],
    "granite": ["<|tool_call|>", "[", '{"name": "get_time", "arguments": ', ", ", "]"],
    "deepseek": [
        "<｜tool▁calls▁begin｜>",
        "<｜tool▁call▁begin｜>",
        "get_weather",
        "<｜tool▁sep｜>",
        "<｜tool▁call▁end｜>",
        "<｜tool▁calls▁end｜>",
    ],
    "deepseek_r1": [
        "<｜tool▁call▁begin｜>",
        "function",
        "<｜tool▁sep｜>",
        "get_weather\n```json\n",
        "\n```",
        "<｜tool▁call▁end｜>",
        "\n",
    ],
    "qwen3_coder": [
        "<tool_call>",
        "\n<function=get_weather>\n",
        "<parameter=city>\n",
        "<parameter=unit>\n",
        "celsius",
        "fahrenheit",
        "\n</parameter>\n",
        "</function>\n",
        "</tool_call>",
    ],
}


def json_rules(grammar: str) -> list[dict[str, Any]]:
    """The schemas of the grammar's `%json` rules, without llguidance's layout options."""
    schemas = []
    for line in grammar.splitlines():
        if "%json " in line:
            schema = json.loads(line.split("%json ", 1)[1])
            assert schema.pop("x-guidance")["whitespace_flexible"] is False
            schemas.append(schema)
    return schemas


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_call_grammar_shape(name: str) -> None:
    fmt = get_format(name)
    for parallel in (False, True):
        grammar = fmt.call_grammar(TOOLS, parallel=parallel)
        start = grammar.splitlines()[0]
        assert start.startswith("start: ")
        assert ("*" in start or "+" in start) == parallel
        for literal in LITERALS[name] if parallel else ():  # separators appear only when parallel
            assert json.dumps(literal, ensure_ascii=False) in grammar, literal
        if name != "qwen3_coder":  # Qwen3-Coder writes each parameter on its own
            assert json_rules(grammar) == [SCHEMAS["get_weather"], SCHEMAS["get_time"]]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_grammar_output_parses_back(name: str) -> None:
    """The text each grammar writes (see ONE and TWO) parses back into the calls."""
    fmt = get_format(name)
    for text, expected in [
        (ONE[name], [("get_weather", {"city": "Zürich"})]),
        (TWO[name], [("get_weather", {"city": "Zürich"}), ("get_time", {})]),
    ]:
        content, calls = fmt.parse(text, tools=TOOLS)
        assert content is None
        assert decoded(calls) == expected
        check_streaming(fmt, text, valid=True, tools=TOOLS)


def test_qwen3_coder_grammar_types() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "s": {"type": "string"},
                        "n": {"type": "integer"},
                        "o": {"type": "object"},
                        "e": {"enum": ["on", "off"]},
                        "any": {"description": "untyped: free text, read back as JSON where it is"},
                    },
                    "required": ["n"],
                },
            },
        },
        {"type": "function", "function": {"name": "free"}},
    ]
    grammar = get_format("qwen3_coder").call_grammar(tools, parallel=False)
    # Schema order; optional unless required. Strings and untyped values are free text.
    assert "param_0_0? param_0_1 param_0_2? param_0_3? param_0_4?" in grammar
    assert json_rules(grammar) == [{"type": "integer"}, {"type": "object"}]
    assert 'param_0_3: "<parameter=e>\\n" ("on" | "off") "\\n</parameter>\\n"' in grammar
    assert 'param_0_4: "<parameter=any>\\n" xml_text' in grammar
    assert "xml_text[lazy]" in grammar and "XML_TEXT:" in grammar


def test_call_grammar_needs_tools() -> None:
    with pytest.raises(ValueError):
        get_format("hermes").call_grammar([], parallel=False)
    with pytest.raises(ValueError):
        get_format("hermes").call_grammar([{"type": "function", "function": {}}], parallel=False)


# --- Detection from the real chat templates ---

EXPECTED_FORMATS = {
    "HuggingFaceTB-SmolLM3-3B.jinja": "json",  # this template renders no tool calls
    "Mistral-Small-3.2-24B-Instruct-2506.jinja": "mistral_v11",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja": "hermes",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja": "hermes",
    "Qwen-QwQ-32B.jinja": "hermes",
    "Qwen-Qwen2.5-7B-Instruct.jinja": "hermes",
    "Qwen-Qwen3-0.6B.jinja": "hermes",
    "Qwen3-Coder.jinja": "qwen3_coder",
    "Qwen3.5-4B.jinja": "qwen3_coder",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja": "deepseek_r1",
    "deepseek-ai-DeepSeek-V3.1.jinja": "deepseek",
    "google-gemma-2-2b-it.jinja": "json",
    "google-gemma-4-31B-it.jinja": "json",  # Gemma 4's own call syntax is not supported
    "ibm-granite-granite-3.3-2B-Instruct.jinja": "granite",
    "meta-llama-Llama-3.1-8B-Instruct.jinja": "llama3_json",
    "meta-llama-Llama-3.2-3B-Instruct.jinja": "llama3_json",
    "microsoft-Phi-3.5-mini-instruct.jinja": "json",
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": "mistral",
    "openai-gpt-oss-120b.jinja": "json",  # Harmony is not supported
}


@needs_templates
@pytest.mark.parametrize("filename", sorted(EXPECTED_FORMATS))
def test_detect_format(filename: str) -> None:
    assert detect_format(read_template(filename)).name == EXPECTED_FORMATS[filename]


def test_detect_format_without_template() -> None:
    assert detect_format(None).name == "json"
    assert detect_format("{{ messages }}").name == "json"


# --- Round trip: the calls a template renders into history parse back ---

ROUND_TRIP_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]
HISTORY_CALLS: list[dict[str, Any]] = [
    {
        "id": "Abc123XyZ",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": "Zürich", "days": 3})},
    },
    {
        "id": "Bcd234YzA",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": "São Paulo"})},
    },
]
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "</s>", "<｜end▁of▁sentence｜>")
ROUND_TRIP = sorted(name for name, fmt in EXPECTED_FORMATS.items() if fmt not in ("json", "granite"))


def common_prefix(a: str, b: str) -> str:
    size = 0
    while size < min(len(a), len(b)) and a[size] == b[size]:
        size += 1
    return a[:size]


def assistant_output(template: ChatTemplate, calls: list[dict[str, Any]]) -> tuple[str, str]:
    """(prompt, what the model would have written): the rendered assistant turn after the prompt."""
    user = [{"role": "user", "content": "What's the weather in Zürich and São Paulo?"}]
    turn = {"role": "assistant", "content": "Let me check.", "tool_calls": calls}
    prompt = template.render(user, tools=ROUND_TRIP_TOOLS)
    full = template.render([*user, turn], tools=ROUND_TRIP_TOOLS, add_generation_prompt=False)
    if full.startswith(prompt):
        output = full[len(prompt) :]
    else:  # the generation prompt differs from the rendered turn's header (e.g. an empty think block)
        bare = template.render(user, tools=ROUND_TRIP_TOOLS, add_generation_prompt=False)
        header = common_prefix(prompt[len(bare) :], full[len(bare) :])
        header = header[: max(header.rfind(">"), header.rfind("\n")) + 1]
        prompt, output = bare + header, full[len(bare) + len(header) :]
    ends = [output.find(marker) for marker in END_OF_TURN if marker in output]
    return prompt, output[: min(ends)] if ends else output


@needs_templates
@pytest.mark.parametrize("filename", ROUND_TRIP)
def test_rendered_tool_calls_parse_back(filename: str) -> None:
    source = read_template(filename)
    template = ChatTemplate(source, origin=filename, bos_token="<s>", eos_token="</s>")
    try:
        calls = HISTORY_CALLS
        prompt, output = assistant_output(template, calls)
    except ChatTemplateError:  # Llama 3.x renders a single call only
        calls = HISTORY_CALLS[:1]
        prompt, output = assistant_output(template, calls)
    markers = reasoning_markers(source)
    if markers is not None:
        _, output = split_reasoning(output, *markers, inside=prompt.rstrip().endswith(markers[0]))
    fmt = detect_format(source)
    content, parsed = fmt.parse(output, tools=ROUND_TRIP_TOOLS)
    assert content in (None, "Let me check.")
    assert decoded(parsed) == [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    check_streaming(fmt, output, valid=True, tools=ROUND_TRIP_TOOLS)


# --- The auto grammar: text, or text and then the calls (llguidance over a byte vocabulary) ---

EOS = 256
# Formats whose calls follow free text after a marker, and those whose calls are the whole output.
AFTER_TEXT = ("hermes", "qwen3_coder", "mistral", "mistral_v11", "granite", "deepseek", "deepseek_r1")
WHOLE_OUTPUT = ("json", "llama3_json")
# Markers that vocabularies hold as one token: grammars write each as a literal of its own.
TOKEN_MARKERS = (
    "<tool_call>",
    "</tool_call>",
    "[TOOL_CALLS]",
    "[ARGS]",
    "[CALL_ID]",
    "<|python_tag|>",
    "<|tool_call|>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
)


class ByteModel:
    """A vocabulary of the 256 bytes, EOS, and special tokens for some markers (after EOS)."""

    def __init__(self, special: Sequence[str] = ()) -> None:
        self.special = {marker: EOS + 1 + number for number, marker in enumerate(special)}
        tokens = [bytes([b]) for b in range(256)] + [b"\xff<|endoftext|>"]
        tokens += [b"\xff" + marker.encode() for marker in special]
        self.vocab = _native.GrammarVocabulary(tokens, [EOS])
        self._row = np.zeros((1, self.vocab.words_per_row), dtype=np.uint32)

    def tokens(self, text: str) -> list[int]:
        """`text` as tokens: its special markers as their tokens, the rest as bytes."""
        if not self.special:
            return list(text.encode())
        pattern = "(" + "|".join(map(re.escape, self.special)) + ")"
        ids: list[int] = []
        for piece in re.split(pattern, text):
            ids.extend([self.special[piece]] if piece in self.special else piece.encode())
        return ids

    def allowed(self, matcher: Any) -> list[int]:
        assert _native.fill_token_bitmasks([matcher], self._row) == [None]
        return np.flatnonzero(np.unpackbits(self._row[0].view(np.uint8), bitorder="little")).tolist()

    def accepts(self, grammar: str, text: str) -> bool:
        """Whether `grammar` lets the model write `text` and then end."""
        matcher = self.vocab.compile("lark", grammar)
        try:
            for token in self.tokens(text):
                matcher.consume(token)
        except RuntimeError:
            return False
        return bool(matcher.is_accepting())


def render(name: str, calls: list[tuple[str, dict[str, Any]]]) -> str:
    """`calls` written the way the grammar of format `name` has them (see ONE and TWO)."""

    def dump(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    objects = [f'{{"name": {dump(call)}, "arguments": {dump(arguments)}}}' for call, arguments in calls]
    if name == "json":
        return objects[0] if len(objects) == 1 else "[" + ", ".join(objects) + "]"
    if name == "hermes":
        return "\n".join(f"<tool_call>\n{obj}\n</tool_call>" for obj in objects)
    if name == "llama3_json":
        return "; ".join(obj.replace('"arguments": ', '"parameters": ', 1) for obj in objects)
    if name in ("mistral", "granite"):
        return ("[TOOL_CALLS]" if name == "mistral" else "<|tool_call|>") + "[" + ", ".join(objects) + "]"
    if name == "mistral_v11":
        return "".join(f"[TOOL_CALLS]{call}[ARGS]{dump(arguments)}" for call, arguments in calls)
    if name == "deepseek":
        body = "".join(
            f"<｜tool▁call▁begin｜>{call}<｜tool▁sep｜>{dump(arguments)}<｜tool▁call▁end｜>"
            for call, arguments in calls
        )
        return f"<｜tool▁calls▁begin｜>{body}<｜tool▁calls▁end｜>"
    if name == "deepseek_r1":
        body = "\n".join(
            f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{call}\n```json\n{dump(arguments)}\n```<｜tool▁call▁end｜>"
            for call, arguments in calls
        )
        return f"<｜tool▁calls▁begin｜>{body}<｜tool▁calls▁end｜>"
    assert name == "qwen3_coder"
    blocks = []
    for call, arguments in calls:
        parameters = "".join(
            f"<parameter={key}>\n{value if isinstance(value, str) else dump(value)}\n</parameter>\n"
            for key, value in arguments.items()
        )
        blocks.append(f"<tool_call>\n<function={call}>\n{parameters}</function>\n</tool_call>")
    return "\n".join(blocks)


def marker_of(name: str) -> str:
    (marker,) = get_format(name).starts  # type: ignore[attr-defined]
    return marker


ZURICH = ("get_weather", {"city": "Zürich"})
TIME: tuple[str, dict[str, Any]] = ("get_time", {})
PLAIN_TEXTS = [
    "",
    "The capital of France is Paris.",
    'Use `a < b` and {braces} or [brackets] later; "quotes" too.\n\nBye.\n',
    "naïve café — 東京 ✓ 🙂",
    "```python\nprint(1)\n```",
    "Sure",
]


def test_auto_grammar_formats_are_classified() -> None:
    assert sorted(AFTER_TEXT + WHOLE_OUTPUT) == sorted(FORMATS)
    assert all(hasattr(get_format(name), "starts") for name in AFTER_TEXT)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_render_writes_what_the_grammar_writes(name: str) -> None:
    assert render(name, [ZURICH]) == ONE[name]
    assert render(name, [ZURICH, TIME]) == TWO[name]


def lark_literals(grammar: str) -> list[str]:
    """The string literals of a grammar's rules (its %json schemas and regexes aside)."""
    literals: list[str] = []
    for line in grammar.splitlines():
        if "%json" not in line:
            literals.extend(json.loads(quoted) for quoted in re.findall(r'"(?:[^"\\]|\\.)*"', line))
    return literals


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_markers_are_literals_of_their_own(name: str) -> None:
    """A server swaps a literal that is a special token's text for the token (serving_chat's
    `_special_markers`): that needs every marker as a literal of its own."""
    fmt = get_format(name)
    for parallel in (False, True):
        for grammar in (
            fmt.call_grammar(TOOLS, parallel=parallel),
            fmt.auto_grammar(TOOLS, parallel=parallel),
        ):
            literals = lark_literals(grammar)
            assert literals
            for literal in literals:
                if literal not in TOKEN_MARKERS:
                    assert not any(marker in literal for marker in TOKEN_MARKERS), literal


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_auto_grammar_shape(name: str) -> None:
    fmt = get_format(name)
    for parallel in (False, True):
        grammar = fmt.auto_grammar(TOOLS, parallel=parallel)
        lines = grammar.splitlines()
        assert lines[1].startswith("TEXT: /(?s:.*)/ & ~/")
        if name in AFTER_TEXT:  # text ends at the marker; the calls follow without it
            marker = json.dumps(marker_of(name), ensure_ascii=False)
            assert lines[0] == f"start: TEXT | text_to_marker opened_calls | TEXT? {marker} opened_calls"
            assert lines[2].startswith("text_to_marker[suffix=/")
        else:
            assert lines[0] == "start: TEXT | calls"
        assert json_rules(grammar) == json_rules(fmt.call_grammar(TOOLS, parallel=parallel))


@needs_native
@pytest.mark.parametrize("parallel", [False, True], ids=["single", "parallel"])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_auto_grammar_accepts(name: str, parallel: bool) -> None:
    fmt, model = get_format(name), ByteModel()
    grammar = fmt.auto_grammar(TOOLS, parallel=parallel)
    model.vocab.compile("lark", fmt.call_grammar(TOOLS, parallel=parallel))  # compiles too
    texts = list(PLAIN_TEXTS)
    if name in AFTER_TEXT:
        texts.append("Almost a call: " + marker_of(name)[:-1])
    for text in texts:  # text alone is content, verbatim
        assert model.accepts(grammar, text), text
        assert fmt.parse(text, tools=TOOLS) == ((text if text.strip() else None), [])
    outputs: list[tuple[str, str | None, list[tuple[str, Any]]]] = [(ONE[name], None, [ZURICH])]
    if parallel:
        outputs.append((TWO[name], None, [ZURICH, TIME]))
    if name in AFTER_TEXT:  # text and then the calls
        outputs += [("Let me check.\n\n" + text, "Let me check.", calls) for text, _, calls in outputs]
        outputs.append(("  " + ONE[name], None, [ZURICH]))
    for text, content, calls in outputs:
        assert model.accepts(grammar, text), text
        parsed_content, parsed = fmt.parse(text, tools=TOOLS)
        assert (parsed_content, decoded(parsed)) == (content, calls)
    # Every enum value and optional argument, for each call.
    for unit in ("celsius", "fahrenheit"):
        assert model.accepts(grammar, render(name, [("get_weather", {"city": "Köln", "unit": unit})]))
    assert model.accepts(grammar, render(name, [TIME]))


@needs_native
@pytest.mark.parametrize("parallel", [False, True], ids=["single", "parallel"])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_auto_grammar_rejects(name: str, parallel: bool) -> None:
    fmt, model = get_format(name), ByteModel()
    grammar = fmt.auto_grammar(TOOLS, parallel=parallel)
    rejected = [
        render(name, [("get_weather", {"city": "Paris", "unit": "kelvin"})]),  # not in the enum
        render(name, [("get_weather", {"unit": "celsius"})]),  # a required argument missing
        render(name, [("get_stock", {"symbol": "ACME"})]),  # no such tool
        render(name, [("get_weather", {"city": "Paris"}), ("get_stock", {})]),
        ONE[name] + " Done.",  # text after the calls
        ONE[name] + "\n",
    ]
    if not parallel:
        rejected += [TWO[name], ONE[name] + ONE[name]]  # a second call
    if name in AFTER_TEXT:
        marker = marker_of(name)
        rejected = rejected + ["Let me check.\n" + text for text in rejected]
        rejected += [
            f"Write {marker} to call a tool.",  # the marker opens calls, and only calls
            f"Let me check. {marker}",
            f"{marker}{marker}",
        ]
    else:  # text must not open like the calls
        rejected += [
            '{"answer": 42}',
            "  [1, 2]",
            "\n{",
            "{" + ONE[name][1:].replace("get_weather", "get_stock"),
        ]
        if name == "json":  # nor a ```json fence that opens JSON
            rejected += ["```json\n{}\n```", "``` JSON \n [", "```\n{"]
        else:  # nor Llama's tag
            rejected += ["<|python_tag|>" + ONE[name], " <|python_tag|>print(1)"]
    for text in rejected:
        assert not model.accepts(grammar, text), text


# Mistral's templates render the call ids of history, which the models do not write.
RENDERED_WITH_IDS = {
    "Mistral-Small-3.2-24B-Instruct-2506.jinja",
    "mistralai-Mistral-Nemo-Instruct-2407.jinja",
}


@needs_native
@needs_templates
@pytest.mark.parametrize("filename", ROUND_TRIP)
def test_auto_grammar_accepts_what_templates_render(filename: str) -> None:
    """The assistant turns that real templates render (text, then two calls) are accepted."""
    source = read_template(filename)
    template = ChatTemplate(source, origin=filename, bos_token="<s>", eos_token="</s>")
    try:
        prompt, output = assistant_output(template, HISTORY_CALLS)
    except ChatTemplateError:  # Llama 3.x renders a single call only
        prompt, output = assistant_output(template, HISTORY_CALLS[:1])
    markers = reasoning_markers(source)
    if markers is not None:
        _, output = split_reasoning(output, *markers, inside=prompt.rstrip().endswith(markers[0]))
    grammar = detect_format(source).auto_grammar(ROUND_TRIP_TOOLS, parallel=True)
    assert ByteModel().accepts(grammar, output) == (filename not in RENDERED_WITH_IDS), output


# Recorded outputs that a model writes as the grammar has them (text, if any, then calls).
RECORDED_AS_GRAMMAR = {
    "hermes-one-call",
    "hermes-text-two-calls-unicode-nested",
    "hermes-close-tag-inside-string",
    "qwen3-coder-text-and-call",
    "qwen3-coder-two-calls-multiline-nested",
    "llama3-one-call",
    "llama3-two-calls",
    "mistral-text-before",
    "mistral-v11-two-calls",
    "granite-list",
    "deepseek-v31-two-calls",
    "deepseek-r1-fenced-two-calls",
    "json-object",
}


@needs_native
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_auto_grammar_on_recorded_outputs(case: Case) -> None:
    """With the recorded calls' functions as tools: what the grammar accepts reads back as the
    recorded calls (or as content), and the outputs written as the grammar has them are accepted."""
    names = list(dict.fromkeys(name for name, _ in case.calls)) or ["get_weather"]
    tools = [{"type": "function", "function": {"name": name}} for name in names]
    fmt = get_format(case.format)
    accepted = ByteModel().accepts(fmt.auto_grammar(tools, parallel=True), case.text)
    assert accepted == (case.id in RECORDED_AS_GRAMMAR) or (accepted and not case.calls)
    if accepted:
        content, calls = fmt.parse(case.text, tools=tools)
        assert (content, decoded(calls)) == (case.content, case.calls)


# --- Random walks: whatever the grammar lets a model write parses as content or as valid calls ---

WALK_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 14},
                },
                "required": ["city", "days"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"utc": {"type": "boolean"}},
                "additionalProperties": False,
            },
        },
    },
]
WALK_SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in WALK_TOOLS}
WALKS = 18  # per format and parallel setting
# What ends a format's calls (or a Qwen3-Coder text parameter), besides '"' (a JSON string).
WALK_CLOSERS = {
    "qwen3_coder": "\n</parameter>\n",
    "json": "]",
    "mistral": "]",
    "granite": "]",
    "deepseek": "<｜tool▁calls▁end｜>",
    "deepseek_r1": "<｜tool▁calls▁end｜>",
}
WALK_STEPS = 1500


def _steered(
    out: bytes,
    choices: set[int],
    openers: Sequence[bytes],
    closers: Sequence[bytes],
    rng: random.Random,
    *,
    aim: float,
    late: bool,
) -> int | None:
    """A byte that steers a walk, or None for a uniform choice: mostly (always when `late` or `aim`
    is 1) the next byte of a steer string the output is in the middle of, an opener's before a
    closer's unless `late`; else, with probability `aim`, the first byte of an opener (markers:
    towards calls), and now and then (always when `late`) that of a closer (towards the end)."""
    for target in (*closers, *openers) if late else (*openers, *closers):
        for size in range(min(len(target) - 1, len(out)), 0, -1):
            if (
                out.endswith(target[:size])
                and target[size] in choices
                and (late or rng.random() < max(aim, 0.97))
            ):
                return target[size]
    for targets, chance in ((closers, 1.0 if late else 0.05), (openers, 0.0 if late else aim)):
        starts = [target[0] for target in targets if target[0] in choices]
        if starts and rng.random() < chance:
            return rng.choice(starts)
    return None


def random_walk(
    model: ByteModel,
    grammar: str,
    seed: int,
    openers: Sequence[bytes],
    closers: Sequence[bytes],
    *,
    aim: float,
) -> str:
    """What a model that picks uniformly among the allowed bytes writes, steered (see `_steered`)
    so that walks reach calls and end; in its second half a walk ends as soon as it may."""
    rng = random.Random(seed)
    matcher = model.vocab.compile("lark", grammar)
    out = bytearray()
    for step in range(WALK_STEPS):
        allowed = model.allowed(matcher)
        assert allowed, f"nothing allowed after {bytes(out)!r}"
        late = step >= WALK_STEPS // 2
        if EOS in allowed and (len(allowed) == 1 or late or rng.random() < 0.02):
            return out.decode("utf-8")
        choices = [token for token in allowed if token != EOS]
        token = _steered(bytes(out), set(choices), openers, closers, rng, aim=aim, late=late)
        if token is None:
            token = rng.choice(choices)
        matcher.consume(token)
        out.append(token)
    pytest.fail(f"the walk did not end: {bytes(out)!r}")


@needs_native
@pytest.mark.parametrize("parallel", [False, True], ids=["single", "parallel"])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_auto_grammar_random_walks(name: str, parallel: bool) -> None:
    """A third of the walks aim at text, a third at calls after a while, a third at calls from the
    start; every one reads back as content only, or as calls to the tools with arguments that
    their schemas validate (at most one call unless `parallel`), the text before them content."""
    fmt, model = get_format(name), ByteModel()
    grammar = fmt.auto_grammar(WALK_TOOLS, parallel=parallel)
    opening = marker_of(name) if name in AFTER_TEXT else "{"
    closers = [b'"', *([WALK_CLOSERS[name].encode()] if name in WALK_CLOSERS else [])]
    schemas = dict(WALK_SCHEMAS)
    if name == "qwen3_coder":  # its text parameters are free text: no maxLength
        weather = schemas["get_weather"]
        schemas["get_weather"] = {
            **weather,
            "properties": {**weather["properties"], "city": {"type": "string"}},
        }
    kinds = set()
    for seed in range(WALKS):
        aim = (0.002, 0.5 if name in WHOLE_OUTPUT else 0.1, 1.0)[seed % 3]
        text = random_walk(model, grammar, seed, [opening.encode()], closers, aim=aim)
        content, calls = fmt.parse(text, tools=WALK_TOOLS)
        where = f"seed {seed}: {text!r}"
        kinds.add((bool(calls), content is not None))
        if not calls:
            assert content == (text if text.strip() else None), where
            continue
        assert parallel or len(calls) == 1, where
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
        before = text[: text.index(opening)] if name in AFTER_TEXT else ""
        assert content == (before.rstrip() if before.strip() else None), where
    expected = {(False, True), (True, False)} | ({(True, True)} if name in AFTER_TEXT else set())
    # (calls?, content?): text, calls alone, text and calls (and maybe no output at all)
    assert expected <= kinds <= expected | {(False, False)}, sorted(kinds)


# --- The server's constraint, with markers that the vocabulary holds as special tokens ---


class _AddedToken:
    def __init__(self, content: str) -> None:
        self.content = content
        self.special = True


class _Tokenizer:
    """What `_special_markers` reads of a tokenizer: its added tokens."""

    def __init__(self, model: ByteModel) -> None:
        self.backend = self
        self._added = {token_id: _AddedToken(marker) for marker, token_id in model.special.items()}

    def get_added_tokens_decoder(self) -> dict[int, _AddedToken]:
        return self._added


SPECIAL_CASES = {
    "hermes": ("<tool_call>", "</tool_call>"),
    "mistral": ("[TOOL_CALLS]",),
    "mistral_v11": ("[TOOL_CALLS]", "[ARGS]"),
    "granite": ("<|tool_call|>",),
    "deepseek": tuple(marker for marker in TOKEN_MARKERS if "｜" in marker),
    "deepseek_r1": tuple(marker for marker in TOKEN_MARKERS if "｜" in marker),
    "llama3_json": ("<|python_tag|>",),
}


@needs_native
@pytest.mark.parametrize("name", sorted(SPECIAL_CASES))
def test_tool_grammar_with_special_token_markers(name: str) -> None:
    """`serving_chat._tool_grammar` puts special tokens in the markers' place: the model writes
    them as those tokens (never as text), before and between calls alike."""
    from mistralrs_serve.entrypoints.openai.serving_chat import _tool_grammar
    from mistralrs_serve.entrypoints.openai.tools import ToolPlan

    fmt, model = get_format(name), ByteModel(SPECIAL_CASES[name])
    tokenizer = _Tokenizer(model)
    auto = _tool_grammar(ToolPlan(TOOLS, "auto", parallel=False), fmt, tokenizer)
    required = _tool_grammar(ToolPlan(TOOLS, "required", parallel=True), fmt, tokenizer)
    assert auto is not None and required is not None
    assert (auto.param, required.param) == ("tools", "tool_choice")
    for marker in SPECIAL_CASES[name]:
        if marker in TWO[name]:
            assert f"<[{model.special[marker]}]>" in required.source
    for text in ["Paris.", ONE[name], *(["Let me check.\n" + ONE[name]] if name in AFTER_TEXT else [])]:
        assert model.accepts(auto.source, text), text
    assert model.accepts(required.source, TWO[name])
    assert not model.accepts(auto.source, TWO[name])
    marker = SPECIAL_CASES[name][0]
    assert not model.accepts(auto.source, f"Hi {marker} there")
    assert not model.accepts(auto.source, ONE[name] + " Done.")
