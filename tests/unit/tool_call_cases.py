"""Shared by the tool-call tests: recorded-style outputs of every format, the helpers that stream
them at every split, and the chat templates' expected formats and rendered calls."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mistralrs_serve.entrypoints.openai.tool_parsers import (
    ToolCall,
    ToolCallDelta,
    ToolCallFormat,
)
from mistralrs_serve.tokenizer.chat_template import ChatTemplate

# Tool markup that must never reach a content delta when it belongs to a valid call.
MARKUP = (
    "<tool_call>",
    "</tool_call>",
    "<function=",
    "[TOOL_CALLS]",
    "[ARGS]",
    "<|python_tag|>",
    "<|tool_call|>",
    "<|/tool_call|>",
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
    # Phi-4-mini
    Case(
        "phi4-mini-call",
        "phi4_mini",
        '<|tool_call|>[{"name": "get_weather_updates", "arguments": {"city": "Paris"}}]<|/tool_call|>',
        None,
        [("get_weather_updates", {"city": "Paris"})],
    ),
    Case(
        "phi4-mini-text-two-calls-text",
        "phi4_mini",
        'Checking both.<|tool_call|>[{"name": "a", "arguments": {"x": [1, 2]}}, '
        '{"name": "b", "arguments": {}}]\n<|/tool_call|> Done.',
        "Checking both. Done.",
        [("a", {"x": [1, 2]}), ("b", {})],
    ),
    Case(
        "phi4-mini-unclosed-list",
        "phi4_mini",
        '<|tool_call|>[{"name": "a", "arguments": {"x": 1}}',
        None,
        [("a", {"x": 1})],
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
