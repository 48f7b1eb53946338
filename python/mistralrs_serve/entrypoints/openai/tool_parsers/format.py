"""`ToolCallFormat`: one family's tool-call format (parse, stream, constrain with a grammar), and, as
the base class itself, the plain-JSON fallback format and the grammar builder every format shares.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from mistralrs_serve.entrypoints.openai.tool_parsers.calls import ToolCall, random_alphanumerics
from mistralrs_serve.entrypoints.openai.tool_parsers.grammar import (
    ANY,
    LINE_SPACE_CLASS,
    SPACE_CLASS,
    function_specs,
    json_rule,
    lark_text,
)
from mistralrs_serve.entrypoints.openai.tool_parsers.json_output import JsonOutputScanner
from mistralrs_serve.entrypoints.openai.tool_parsers.scanner import Scanner
from mistralrs_serve.entrypoints.openai.tool_parsers.streamer import ToolCallStreamer


class ToolCallFormat:
    """One family's tool-call format; stateless, so one instance serves every request.

    The base class is the plain-JSON fallback ("json"): the whole output is a call object
    `{"name": ..., "arguments": {...}}` or a list of them, possibly in a ```json fence.

    Markup that does not parse as a call is content, verbatim. Whitespace that only separates content
    from calls (or calls from each other) is dropped; content that is only whitespace is no content.
    `parse` is the streamer run over the whole text, so both always agree (see `ToolCallStreamer` for
    when a streamed call commits).

    A call's `arguments` is the JSON text of its arguments object exactly as the model wrote it, in
    the formats that write that object as JSON: a Hermes JSON block, Llama 3 and plain JSON, Mistral
    (both styles), Granite and DeepSeek (both styles): whenever a call object starts `{"name": ...,
    "arguments"` (or `"parameters"`): `{`, and in the styles that write the name before the object
    (Mistral's `name[ARGS]{...}`, DeepSeek's) whenever a `{` opens the arguments. Other calls
    (arguments before the name, arguments written as a JSON string, Qwen3-Coder's XML parameters) get
    `json.dumps` of the arguments and stream as one delta when the call closes.
    """

    name = "json"
    #: keyword that holds the arguments in the JSON this format's grammar writes
    arguments_key = "arguments"

    def parse(
        self, text: str, *, tools: Sequence[Mapping[str, Any]] | None = None
    ) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a complete output; content is None when empty or only whitespace."""
        streamer = self.streamer(tools=tools)
        content = streamer.feed(text).content + streamer.finish().content
        return (content if content.strip() else None), streamer.calls

    def streamer(self, *, tools: Sequence[Mapping[str, Any]] | None = None) -> ToolCallStreamer:
        """A streamer for one output. `tools` (the request's) lets formats that write arguments
        as text (Qwen3-Coder) type them by schema; the others ignore it."""
        return ToolCallStreamer(self, self._scanner(tools))

    def new_call_id(self) -> str:
        return "call_" + random_alphanumerics(24)

    def call_grammar(self, tools: Sequence[Mapping[str, Any]], *, parallel: bool) -> str:
        """An llguidance Lark grammar for exactly one call (or one or more, with `parallel`) to one of
        `tools`, arguments constrained by the tool's `parameters` schema. Markers are plain strings,
        each a literal of its own (see `TOKEN_MARKERS`)."""
        calls, rules = self._calls_grammar(tools, parallel=parallel)
        return self._complete_grammar(["start: " + calls, *rules])

    def auto_grammar(self, tools: Sequence[Mapping[str, Any]], *, parallel: bool) -> str:
        """An llguidance Lark grammar for what the model may write when it may call `tools`: text
        that does not open like a call (here, after whitespace, `{`, `[` or a ```json fence that
        opens JSON), or the calls exactly as `call_grammar` has them."""
        calls, rules = self._calls_grammar(tools, parallel=parallel)
        return self._complete_grammar(
            [
                "start: TEXT | calls",
                f"TEXT: /{ANY}/ & ~/{self._call_opening()}{ANY}/",
                "calls: " + calls,
                *rules,
            ]
        )

    # --- for subclasses ---

    def _scanner(self, tools: Sequence[Mapping[str, Any]] | None) -> Scanner:
        return JsonOutputScanner(tag=None, fences=True)

    def _grammar_frame(self, parallel: bool) -> tuple[str, str, str]:
        """The text before the calls, between two calls, and after them, in the grammar."""
        return ("[", ", ", "]") if parallel else ("", "", "")

    def _call_text(self, name: str) -> tuple[str, str]:
        """The text before and after the arguments JSON of a call to `name`, in the grammar."""
        return '{"name": ' + json.dumps(name, ensure_ascii=False) + f', "{self.arguments_key}": ', "}"

    def _call_parts(self, index: int, name: str, schema: Mapping[str, Any]) -> tuple[str, str, list[str]]:
        """A call to `name`, the `index`th tool, in the grammar: the text that opens it, the rest
        of its expansion, and the rules that expansion needs (their names end in `_{index}...`)."""
        before, after = self._call_text(name)
        rest = f"args_{index} {lark_text(after)}" if after else f"args_{index}"
        return before, rest, [f"args_{index}: {json_rule(schema)}"]

    def _call_opening(self) -> str:
        """A regex for the start of an output that is calls (text must not start so)."""
        space, line_space = SPACE_CLASS + "*", LINE_SPACE_CLASS + "*"
        fence = f"```{line_space}([jJ][sS][oO][nN])?{line_space}\\n{space}"
        return f"{space}({fence})?[\\[{{]"

    def _complete_grammar(self, lines: list[str]) -> str:
        """The grammar of `lines`, with any rules they need besides those of `_calls_grammar`."""
        return "\n".join(lines) + "\n"

    # --- grammar helpers ---

    def _calls_grammar(
        self, tools: Sequence[Mapping[str, Any]], *, parallel: bool, opened: str = ""
    ) -> tuple[str, list[str]]:
        """(expansion, rules) for exactly the calls of `call_grammar`; with `opened`, the calls less
        that text at their start (a marker the output already has)."""
        specs = function_specs(tools)
        if not specs:
            raise ValueError("a tool-call grammar needs at least one tool")
        prefix, separator, suffix = self._grammar_frame(parallel)
        rules = ["call: " + " | ".join(f"call_{index}" for index in range(len(specs)))]
        parts = [self._call_parts(index, name, schema) for index, (name, schema) in enumerate(specs)]
        for index, (head, rest, needed) in enumerate(parts):
            rules.append(f"call_{index}: {lark_text(head)} {rest}")
            rules.extend(needed)
        first = "call"
        if opened and prefix.startswith(opened):  # the marker opens the calls
            prefix = prefix[len(opened) :]
        elif opened:  # the marker opens each call: the first one without it
            if not all(head.startswith(opened) for head, _, _ in parts):
                raise ValueError(f"{self.name}: the calls do not open with {opened!r}")
            first = "first_call"
            rules.append("first_call: " + " | ".join(f"first_call_{index}" for index in range(len(specs))))
            for index, (head, rest, _) in enumerate(parts):
                rules.append(f"first_call_{index}: {lark_text(head[len(opened) :])} {rest}".rstrip())
        calls = first
        if parallel:
            calls = f"{first} ({lark_text(separator)} call)*" if separator else f"{first} call*"
        body = " ".join(part for part in (lark_text(prefix), calls, lark_text(suffix)) if part)
        if parallel and self.name == "json":
            body = f"call | {body}"  # one call may stay a bare object, as the fallback prompt asks
        return body, rules

    def __repr__(self) -> str:
        return f"<ToolCallFormat {self.name}>"
