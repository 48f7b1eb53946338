"""A response's output items and OpenAI's Responses stream events, built from
the engine's StepOutputs as they come.

One builder serves every mode: a streamed response sends the events, a
background one keeps them (for `GET ?stream=true`), a plain one drops them
and returns the final object; so the three give the same output. The chat
endpoint's `ChoiceParser` splits each choice's text into reasoning, content
and tool calls; each becomes an output item, opened (`output_item.added`),
filled by deltas, and closed (`output_item.done`) when the next one starts
or the choice ends. Item ids are fixed when an item opens.
"""

from __future__ import annotations

import json
import time
from typing import Any

from mistralrs_serve.engine.sequence import StepOutput
from mistralrs_serve.entrypoints.openai import responses_protocol as wire
from mistralrs_serve.entrypoints.openai.chat_output import ChoiceParser, OutputDelta
from mistralrs_serve.entrypoints.openai.responses_seal import ReasoningSeal
from mistralrs_serve.entrypoints.openai.responses_tools import CUSTOM_INPUT, ToolSet
from mistralrs_serve.entrypoints.openai.serving_common import chat_logprob
from mistralrs_serve.tokenizer.tokenizer import Tokenizer

Event = dict[str, Any]
TERMINAL_EVENTS = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "failed": "response.failed",
    "cancelled": "response.incomplete",  # OpenAI has no cancelled event; the object says cancelled
}


class _Item:
    """One output item while it is built (text kept in pieces: joined when it is read)."""

    def __init__(self, kind: str, output_index: int, prefix: str, **call: Any) -> None:
        self.kind = kind
        self.output_index = output_index
        self.id = wire.new_id(prefix)
        self.pieces: list[str] = []
        self.logprobs: list[dict[str, Any]] = []
        self.call = call  # call_id, name, namespace for function and custom tool calls
        self.status = "in_progress"
        self.encrypted: str | None = None
        # a server-side tool's item (web_search_call, code_interpreter_call, shell_call, mcp_call, ...):
        # its fields beside id, type and status, filled by responses_agent.py as the tool runs
        self.body: dict[str, Any] | None = None
        self.annotations: list[dict[str, Any]] = []

    @property
    def text(self) -> str:
        if len(self.pieces) > 1:
            self.pieces = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""

    def part(self) -> dict[str, Any]:
        if self.kind == "reasoning":
            return {"type": "reasoning_text", "text": self.text}
        part = wire.output_text_part(self.text, self.logprobs)
        part["annotations"] = list(self.annotations)
        return part

    def to_dict(self, empty: bool = False) -> dict[str, Any]:
        """The item as OpenAI shows it (`empty`: as first announced, before any content)."""
        if self.body is not None:
            return {"id": self.id, "type": self.kind, "status": self.status, **self.body}
        if self.kind == "message":
            return wire.message_item(self.id, self.status, [] if empty else [self.part()])
        if self.kind == "reasoning":
            item = wire.reasoning_item(self.id, self.status, None if empty else self.text)
            if self.encrypted is not None:
                item["encrypted_content"] = self.encrypted
            return item
        c = self.call
        if self.kind == "function_call":
            text = "" if empty else self.text
            return wire.function_call_item(
                self.id, self.status, c["call_id"], c["name"], text, c["namespace"]
            )
        return wire.custom_call_item(
            self.id,
            self.status,
            c["call_id"],
            c["name"],
            "" if empty else _custom_input(self.text),
            c["namespace"],
        )


def _custom_input(arguments: str) -> str:
    """A custom tool's free-form input, out of the `{"input": ...}` the model wrote."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
    if isinstance(value, dict) and isinstance(value.get(CUSTOM_INPUT), str):
        return value[CUSTOM_INPUT]
    return arguments


class ResponseStream:
    """The response object and its events; `output` and `usage` grow as steps arrive."""

    def __init__(
        self,
        response: dict[str, Any],
        parsers: list[ChoiceParser],
        tools: ToolSet,
        tokenizer: Tokenizer,
        *,
        num_prompt_tokens: int,
        want_logprobs: bool,
        seal: ReasoningSeal | None,
    ) -> None:
        self.response = response
        self.tools = tools
        self.tokenizer = tokenizer
        self.want_logprobs = want_logprobs
        self.seal = seal  # set when reasoning items carry encrypted_content
        self.items: list[_Item] = []
        self.choices = [_Choice(self, parser) for parser in parsers]
        self.sequence_number = 0
        self.num_prompt_tokens = num_prompt_tokens
        self.num_cached_tokens = 0
        self.num_output_tokens = 0
        self.num_reasoning_tokens = 0
        self.has_ended = False
        # the agent loop's server-side tools (name -> its ToolSpec kind): their calls become
        # hosted items (responses_agent.py) rather than function_call items for the client
        self.server_tools: dict[str, str] = {}

    def event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return event

    def snapshot(self) -> dict[str, Any]:
        """The response object as it stands (a fresh dict: safe to serialize later)."""
        obj = dict(self.response)
        obj["output"] = [item.to_dict() for item in self.items]
        return obj

    def created(self) -> list[Event]:
        return [self.event("response.created", response=self.snapshot())]

    def in_progress(self) -> list[Event]:
        self.response["status"] = "in_progress"
        return [self.event("response.in_progress", response=self.snapshot())]

    def step(self, step: StepOutput, parsed: OutputDelta | None = None) -> list[Event]:
        self.num_output_tokens += 1
        if step.num_cached_tokens is not None:
            self.num_cached_tokens = max(self.num_cached_tokens, step.num_cached_tokens)
        return self.choices[step.index].step(step, parsed)

    def finish(self, status: str, error: str | None = None) -> list[Event]:
        """Close every open item and end the response with `status` (the one terminal event)."""
        if self.has_ended:
            return []
        self.has_ended = True
        events: list[Event] = []
        for choice in self.choices:
            events.extend(choice.close(finished=status in ("completed", "incomplete")))
        if status == "completed" and any(c.finish_reason == "length" for c in self.choices):
            status = "incomplete"
        obj = self.response
        obj["status"] = status
        if status == "completed":
            obj["completed_at"] = int(time.time())
        if status == "incomplete":
            obj["incomplete_details"] = {"reason": "max_output_tokens"}
        if error is not None:
            obj["error"] = wire.error_object(error)
        obj["usage"] = wire.usage(
            self.num_prompt_tokens, self.num_cached_tokens, self.num_output_tokens, self.num_reasoning_tokens
        )
        events.append(self.event(TERMINAL_EVENTS[status], response=self.snapshot()))
        return events

    def logprob(self, step: StepOutput) -> dict[str, Any] | None:
        if not self.want_logprobs or step.logprob is None or step.is_stop_token:
            return None
        return chat_logprob(self.tokenizer, step.logprob).model_dump()


class _Choice:
    """One choice's items: at most one open at a time."""

    def __init__(self, out: ResponseStream, parser: ChoiceParser) -> None:
        self.out = out
        self.parser = parser
        self.current: _Item | None = None
        self.calls: dict[int, _Item] = {}  # by the parser's call index
        self.num_items = 0
        self.pending_space = ""  # leading whitespace of content, kept until text follows
        self.pending_logprobs: list[dict[str, Any]] = []
        self.finish_reason: str | None = None

    def step(self, step: StepOutput, parsed: OutputDelta | None = None) -> list[Event]:
        """One engine step; `parsed`: its text already parsed (by the agent loop's parser)."""
        if self.finish_reason is not None:
            return []
        if parsed is not None:
            delta = parsed
        else:
            delta = self.parser.feed(step.text) if step.text else OutputDelta()
            if step.finish_reason is not None:
                delta.extend(self.parser.finish())
        events = self._apply(delta, self.out.logprob(step))
        if delta.reasoning or (self.current is not None and self.current.kind == "reasoning"):
            self.out.num_reasoning_tokens += 1
        if step.finish_reason is not None:
            self.finish_reason = step.finish_reason
            events.extend(self.close(finished=True))
        return events

    def _apply(self, delta: OutputDelta, logprob: dict[str, Any] | None) -> list[Event]:
        events: list[Event] = []
        if delta.reasoning:
            item = self._open(events, "reasoning") if not self._is_open("reasoning") else self.current
            assert item is not None
            item.pieces.append(delta.reasoning)
            events.append(self._text_event("response.reasoning_text.delta", item, delta=delta.reasoning))
        if delta.content:
            events.extend(self._content(delta.content, logprob))
        for call in delta.tool_calls:
            if call.name is not None:
                self.calls[call.index] = self._open_call(events, call.id or "", call.name)
            item = self.calls.get(call.index)
            if item is None or not call.arguments:
                continue
            item.pieces.append(call.arguments)
            if item.kind == "function_call":
                events.append(
                    self.out.event(
                        "response.function_call_arguments.delta",
                        item_id=item.id,
                        output_index=item.output_index,
                        delta=call.arguments,
                    )
                )
        return events

    def _content(self, text: str, logprob: dict[str, Any] | None) -> list[Event]:
        events: list[Event] = []
        if logprob is not None:
            self.pending_logprobs.append(logprob)
        if not self._is_open("message"):
            self.pending_space += text
            if not self.pending_space.strip():
                return events
            text, self.pending_space = self.pending_space, ""
            self._open(events, "message")
        item = self.current
        assert item is not None
        logprobs, self.pending_logprobs = self.pending_logprobs, []
        item.pieces.append(text)
        item.logprobs.extend(logprobs)
        events.append(self._text_event("response.output_text.delta", item, delta=text, logprobs=logprobs))
        return events

    def _is_open(self, kind: str) -> bool:
        return self.current is not None and self.current.kind == kind

    def _new_item(self, kind: str, prefix: str, **call: Any) -> _Item:
        item = _Item(kind, len(self.out.items), prefix, **call)
        self.out.items.append(item)
        self.num_items += 1
        return item

    def _open(self, events: list[Event], kind: str) -> _Item:
        events.extend(self._close_current("completed"))
        item = self._new_item(kind, "rs" if kind == "reasoning" else "msg")
        self.current = item
        events.append(self._added(item))
        events.append(self._text_event("response.content_part.added", item, part=item.part()))
        return item

    def _open_call(self, events: list[Event], call_id: str, name: str) -> _Item:
        events.extend(self._close_current("completed"))
        if name in self.out.server_tools:
            from mistralrs_serve.entrypoints.openai.responses_agent import open_hosted_item

            item = open_hosted_item(self, call_id, name, self.out.server_tools[name])
            self.current = item
            events.append(self._added(item))
            return item
        custom = name in self.out.tools.custom
        namespace = self.out.tools.namespaces.get(name)
        kind, prefix = ("custom_tool_call", "ctc") if custom else ("function_call", "fc")
        item = self._new_item(kind, prefix, call_id=call_id, name=name, namespace=namespace)
        self.current = item
        events.append(self._added(item))
        return item

    def _added(self, item: _Item) -> Event:
        return self.out.event(
            "response.output_item.added", output_index=item.output_index, item=item.to_dict(True)
        )

    def _text_event(self, kind: str, item: _Item, **fields: Any) -> Event:
        return self.out.event(
            kind, item_id=item.id, output_index=item.output_index, content_index=0, **fields
        )

    def close(self, finished: bool) -> list[Event]:
        """End the choice: close its open item (incomplete when cut short); an answer with
        no item at all still gets its (empty) message, as OpenAI's always has one."""
        status = "incomplete" if not finished or self.finish_reason == "length" else "completed"
        events = self._close_current(status)
        if finished and self.num_items == 0:
            text, self.pending_space = self.pending_space, ""
            item = self._open(events, "message")
            item.pieces.append(text)
            events.extend(self._close_current(status))
        return events

    def _close_current(self, status: str) -> list[Event]:
        item, self.current = self.current, None
        if item is None:
            return []
        if item.body is not None:
            return []  # a server-side call: it ends when its tool has run (responses_agent.py)
        item.status = status
        out = self.out
        events: list[Event] = []
        if item.kind == "message":
            events.append(
                self._text_event("response.output_text.done", item, text=item.text, logprobs=item.logprobs)
            )
            events.append(self._text_event("response.content_part.done", item, part=item.part()))
        elif item.kind == "reasoning":
            if out.seal is not None:
                item.encrypted = out.seal.seal(item.text)
            events.append(self._text_event("response.reasoning_text.done", item, text=item.text))
            events.append(self._text_event("response.content_part.done", item, part=item.part()))
        elif item.kind == "function_call":
            events.append(
                out.event(
                    "response.function_call_arguments.done",
                    item_id=item.id,
                    output_index=item.output_index,
                    name=item.call["name"],
                    arguments=item.text,
                )
            )
        else:
            tool_input = _custom_input(item.text)
            ids = {"item_id": item.id, "output_index": item.output_index}
            if tool_input:
                events.append(out.event("response.custom_tool_call_input.delta", delta=tool_input, **ids))
            events.append(out.event("response.custom_tool_call_input.done", input=tool_input, **ids))
        events.append(
            out.event("response.output_item.done", output_index=item.output_index, item=item.to_dict())
        )
        return events
