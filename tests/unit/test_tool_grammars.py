"""Tool-call grammars: the call and auto grammars of every format, what they accept and reject
(llguidance over a byte vocabulary), and markers the vocabulary holds as special tokens."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from typing import Any

import jsonschema
import numpy as np
import pytest
from mistralrs_serve.entrypoints.openai.reasoning import reasoning_markers, split_reasoning
from mistralrs_serve.entrypoints.openai.tool_parsers import (
    FORMATS,
    detect_format,
    get_format,
)
from mistralrs_serve.errors import ChatTemplateError
from mistralrs_serve.tokenizer.chat_template import ChatTemplate
from template_data import needs_templates, read_template
from tool_call_cases import (
    CASES,
    HISTORY_CALLS,
    ROUND_TRIP,
    ROUND_TRIP_TOOLS,
    Case,
    assistant_output,
    check_streaming,
    decoded,
)

try:
    from mistralrs_serve import _native

    HAVE_NATIVE = True
except ImportError:  # the Rust extension is not built here
    HAVE_NATIVE = False
needs_native = pytest.mark.skipif(
    not HAVE_NATIVE, reason="the Rust extension mistralrs_serve._native is not built"
)


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
    "phi4_mini": '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Zürich"}}]<|/tool_call|>',
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
    "phi4_mini": '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Zürich"}}, '
    '{"name": "get_time", "arguments": {}}]<|/tool_call|>',
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
    "phi4_mini": ["<|tool_call|>", "[", '{"name": "get_time", "arguments": ', ", ", "]", "<|/tool_call|>"],
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
            # objects with properties are closed; {"type": "object"} names none and stays open
            closed = {**SCHEMAS["get_weather"], "additionalProperties": False}
            assert json_rules(grammar) == [closed, SCHEMAS["get_time"]]


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


# --- The auto grammar: text, or text and then the calls (llguidance over a byte vocabulary) ---

EOS = 256
# Formats whose calls follow free text after a marker, and those whose calls are the whole output.
AFTER_TEXT = (
    "hermes",
    "qwen3_coder",
    "mistral",
    "mistral_v11",
    "granite",
    "phi4_mini",
    "deepseek",
    "deepseek_r1",
)
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
    "<|/tool_call|>",
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
    if name == "phi4_mini":
        return "<|tool_call|>[" + ", ".join(objects) + "]<|/tool_call|>"
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
def test_schema_that_says_additional_properties_true_stays_open() -> None:
    """The way out of closed objects: say `additionalProperties: true`."""
    fmt, model = get_format("hermes"), ByteModel()
    parameters = {**SCHEMAS["get_weather"], "additionalProperties": True}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": parameters}}]
    extra = render("hermes", [("get_weather", {"city": "Paris", "input": 3})])
    assert model.accepts(fmt.call_grammar(tools, parallel=False), extra)
    assert not model.accepts(fmt.call_grammar(TOOLS[:1], parallel=False), extra)


@needs_native
@pytest.mark.parametrize("parallel", [False, True], ids=["single", "parallel"])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_auto_grammar_rejects(name: str, parallel: bool) -> None:
    fmt, model = get_format(name), ByteModel()
    grammar = fmt.auto_grammar(TOOLS, parallel=parallel)
    rejected = [
        render(name, [("get_weather", {"city": "Paris", "unit": "kelvin"})]),  # not in the enum
        render(name, [("get_weather", {"unit": "celsius"})]),  # a required argument missing
        render(name, [("get_weather", {"city": "Paris", "input": 3})]),  # a key the schema never named
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
    "phi4-mini-call",
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
    "phi4_mini": "]",
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
    "phi4_mini": ("<|tool_call|>", "<|/tool_call|>"),
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
