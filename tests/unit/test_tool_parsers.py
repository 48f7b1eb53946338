"""Tool-call parsing: every family's format, whole and streamed at every split, detection from
the chat templates, and calls rendered by a template parsing back."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from mistralrs_serve.entrypoints.openai.reasoning import reasoning_markers, split_reasoning
from mistralrs_serve.entrypoints.openai.tool_parsers import (
    FORMATS,
    ToolCallDelta,
    detect_format,
    get_format,
)
from mistralrs_serve.errors import ChatTemplateError
from mistralrs_serve.tokenizer.chat_template import ChatTemplate
from template_data import needs_templates, read_template
from tool_call_cases import (
    CASES,
    EXPECTED_FORMATS,
    HISTORY_CALLS,
    ROUND_TRIP,
    ROUND_TRIP_TOOLS,
    Case,
    assemble,
    assistant_output,
    check_streaming,
    decoded,
    told,
)

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
    ("phi4_mini", '<|tool_call|>[{"name": "write", "arguments": ', "}]<|/tool_call|>", "}]<|/tool_call|>"),
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


@needs_templates
@pytest.mark.parametrize("filename", sorted(EXPECTED_FORMATS))
def test_detect_format(filename: str) -> None:
    assert detect_format(read_template(filename)).name == EXPECTED_FORMATS[filename]


def test_detect_format_without_template() -> None:
    assert detect_format(None).name == "json"
    assert detect_format("{{ messages }}").name == "json"


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
