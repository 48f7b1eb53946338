"""Turns a scanner's decisions into OpenAI-style deltas: content text and tool-call pieces, for one
output as it arrives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mistralrs_serve.entrypoints.openai.tool_parsers.calls import ParsedDelta, ToolCall, ToolCallDelta
from mistralrs_serve.entrypoints.openai.tool_parsers.scanner import Scanner

if TYPE_CHECKING:
    from mistralrs_serve.entrypoints.openai.tool_parsers.format import ToolCallFormat


class _ContentFilter:
    """Content text on its way out: drops whitespace that only separates content from calls.

    Whitespace right before a call, at the end of an output that has calls, at the start of content
    that follows a call, and in an output that is only whitespace is dropped. Trailing whitespace is
    therefore held back until it is known which case applies.
    """

    def __init__(self) -> None:
        self._pending = ""
        self._emitted = False
        self._calls_seen = False

    def text(self, text: str) -> str:
        text = self._pending + text
        body = text.rstrip()
        self._pending = text[len(body) :]
        if not body:
            return ""
        if not self._emitted and self._calls_seen:
            body = body.lstrip()
        self._emitted = True
        return body

    def call(self) -> None:
        self._pending = ""
        self._calls_seen = True

    def finish(self) -> str:
        pending, self._pending = self._pending, ""
        return pending if self._emitted and not self._calls_seen else ""


class ToolCallStreamer:
    """Splits model output into content and tool-call deltas as it arrives.

    A call whose arguments are raw text streams as OpenAI does: a first delta with its index, id and
    name (and `arguments: ""`) as soon as its block's opening markup, its name and the `{` that opens
    its arguments have been read; then pieces of argument text as they arrive, whose concatenation is
    the call's final `arguments`. Only what may still turn out not to belong to the arguments is held
    back: a partial end marker, or an end marker met while the brackets are still open (it may be
    inside a string).

    Once a call's first delta has gone out it is a call, whatever follows (the rule that keeps
    streamed and final calls equal without buffering whole calls): its arguments run from that `{` to
    the matching `}` — or, when the brackets never match, to the first of the format's markers (or the
    end of the output) — and are kept even when they are not valid JSON, as OpenAI's own arguments may
    not be. If the rest of its block does not read as calls, the block still ends as calls: the calls
    that began streaming, and the block's remaining text dropped up to where the block ends (its
    closing marker, the end of its JSON value, the next opening marker, or the end of the output).
    Until that `{`, nothing is committed: a block that does not read as calls is content, verbatim.
    """

    def __init__(self, fmt: ToolCallFormat, scanner: Scanner) -> None:
        self._format = fmt
        self._scanner = scanner
        self._buffer = ""
        self._filter = _ContentFilter()
        self._calls: list[ToolCall] = []
        # (id, argument characters streamed) of each call of the undecided block that began streaming
        self._streaming: list[tuple[str, int]] = []
        self._finished = False

    @property
    def calls(self) -> list[ToolCall]:
        """The complete calls so far, with the ids their deltas carried."""
        return list(self._calls)

    def feed(self, delta: str) -> ParsedDelta:
        """Takes the next piece of model output; returns what can be told of it already."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buffer += delta
        return self._drain(final=False)

    def finish(self) -> ParsedDelta:
        """The end of the output: decides whatever was held back."""
        if self._finished:
            return ParsedDelta()
        self._finished = True
        out = self._drain(final=True)
        out.content += self._filter.finish()
        return out

    def _drain(self, *, final: bool) -> ParsedDelta:
        out = ParsedDelta()
        pieces = []
        while self._buffer:
            step = self._scanner.step(self._buffer, final)
            if step is None:
                self._stream_open(out.tool_calls)
                break
            size = max(step.size, 1)  # a scanner bug must not loop forever
            text, self._buffer = self._buffer[:size], self._buffer[size:]
            if step.calls is None:
                pieces.append(self._filter.text(text))
            elif step.calls:
                self._filter.call()
                for number, (name, arguments) in enumerate(step.calls):
                    self._close_call(out.tool_calls, number, name, arguments)
            self._streaming = []
        out.content = "".join(pieces)
        return out

    def _stream_open(self, deltas: list[ToolCallDelta]) -> None:
        """Deltas for the calls of the undecided block: first deltas, then new argument text."""
        for number, call in enumerate(self._scanner.open):
            index = len(self._calls) + number
            if number == len(self._streaming):
                self._filter.call()
                self._streaming.append((self._format.new_call_id(), 0))
                deltas.append(ToolCallDelta(index, self._streaming[number][0], call.name))
            call_id, streamed = self._streaming[number]
            if call.end > call.start + streamed:
                _add_arguments(deltas, index, self._buffer[call.start + streamed : call.end])
                self._streaming[number] = (call_id, call.end - call.start)

    def _close_call(self, deltas: list[ToolCallDelta], number: int, name: str, arguments: str) -> None:
        index = len(self._calls)
        if number < len(self._streaming):  # began streaming: the rest of its arguments
            call_id, streamed = self._streaming[number]
            if arguments[streamed:]:
                _add_arguments(deltas, index, arguments[streamed:])
        else:
            call_id = self._format.new_call_id()
            deltas.append(ToolCallDelta(index, call_id, name, arguments))
        self._calls.append(ToolCall(call_id, name, arguments))


def _add_arguments(deltas: list[ToolCallDelta], index: int, text: str) -> None:
    """Argument text for call `index`, joined to the last delta when that is the same call's."""
    if deltas and deltas[-1].index == index:
        deltas[-1].arguments += text
    else:
        deltas.append(ToolCallDelta(index, arguments=text))
