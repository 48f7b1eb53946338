"""A Responses run that engages the agent loop (agent/loop.py): the loop's
events turned into OpenAI's hosted-tool items and their stream events.

A server-side call becomes the item of its tool: `web_search_call` (its
action and sources), `code_interpreter_call` (code and `outputs`),
`shell_call` followed by a `shell_call_output`, and `mcp_call` for function
tools the server executes (MCP, --tool-dispatch-url). The answer's text gets
`url_citation` annotations for the web sources it cites and
`container_file_citation` ones for the files the tools produced.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from mistralrs_serve.agent.loop import (
    AgentCall,
    AgentResult,
    ApprovalRequested,
    CallFinished,
    CallStarted,
    Delta,
    Finished,
    LoopEvent,
    RoundStarted,
)

if TYPE_CHECKING:
    from mistralrs_serve.entrypoints.openai.responses_stream import Event, ResponseStream, _Choice, _Item

# a ToolSpec kind -> (the Responses item type, its id prefix)
HOSTED_ITEMS = {
    "web_search": ("web_search_call", "ws"),
    "code_interpreter": ("code_interpreter_call", "ci"),
    "shell": ("shell_call", "sh"),
    "function": ("mcp_call", "mcp"),
}
SERVER_LABEL = "mistralrs-serve"


def open_hosted_item(choice: _Choice, call_id: str, name: str, kind: str) -> _Item:
    item_type, prefix = HOSTED_ITEMS[kind]
    item = choice._new_item(item_type, prefix, call_id=call_id, name=name, namespace=None)
    container = getattr(choice.out, "container_id", "")
    if item_type == "web_search_call":
        item.body = {"action": {"type": "search", "query": "", "sources": []}}
    elif item_type == "code_interpreter_call":
        item.body = {"container_id": container, "code": None, "outputs": None}
    elif item_type == "shell_call":
        item.body = {
            "call_id": call_id,
            "action": {"commands": [], "timeout_ms": None, "max_output_length": None},
            "environment": {"type": "container_reference", "container_id": container},
        }
    else:
        item.body = {
            "server_label": SERVER_LABEL,
            "name": name,
            "arguments": "",
            "output": None,
            "error": None,
        }
    return item


class AgentEvents:
    """Feeds one run's loop events into its ResponseStream."""

    def __init__(self, out: ResponseStream, tools: dict[str, str], container_id: str) -> None:
        self.out = out
        out.server_tools = tools
        out.container_id = container_id  # type: ignore[attr-defined]
        self.citations: list[dict[str, str]] = []
        self.files: list[dict[str, Any]] = []

    def handle(self, event: LoopEvent) -> list[Event]:
        out = self.out
        if isinstance(event, RoundStarted):
            if event.round > 0:
                from mistralrs_serve.entrypoints.openai.responses_stream import _Choice

                out.choices = [_Choice(out, event.prep.parser())]
            return []
        if isinstance(event, Delta):
            return out.step(event.step, event.delta)
        if isinstance(event, CallStarted):
            return self._started(event.call)
        if isinstance(event, ApprovalRequested):
            return self._approval(event.call, event.approval_id)
        if isinstance(event, CallFinished):
            return self._finished(event.call)
        if isinstance(event, Finished):
            self._finish(event.result)
        return []

    def _item(self, call: AgentCall) -> _Item:
        return self.out.choices[0].calls[call.index]

    def _event(self, kind: str, item: _Item) -> Event:
        return self.out.event(kind, item_id=item.id, output_index=item.output_index)

    def _started(self, call: AgentCall) -> list[Event]:
        item = self._item(call)
        assert item.body is not None
        args = _arguments(call)
        if item.kind == "web_search_call":
            query = args.get("query")
            if isinstance(query, str):
                item.body["action"] = {"type": "search", "query": query, "sources": []}
            elif isinstance(args.get("url"), str):
                item.body["action"] = {"type": "open_page", "url": args["url"]}
            return [
                self._event("response.web_search_call.in_progress", item),
                self._event("response.web_search_call.searching", item),
            ]
        if item.kind == "code_interpreter_call":
            code = args.get("code") if isinstance(args.get("code"), str) else ""
            item.body["code"] = code
            started = self._event("response.code_interpreter_call.in_progress", item)
            done = self.out.event(
                "response.code_interpreter_call_code.done",
                item_id=item.id,
                output_index=item.output_index,
                code=code,
            )
            return [
                started,
                done,
                self._event("response.code_interpreter_call.interpreting", item),
            ]
        if item.kind == "shell_call":
            commands = args.get("commands")
            item.body["action"] = {
                "commands": [c for c in commands if isinstance(c, str)] if isinstance(commands, list) else [],
                "timeout_ms": args.get("timeout_ms") if isinstance(args.get("timeout_ms"), int) else None,
                "max_output_length": None,
            }
            return []
        item.body["arguments"] = call.arguments
        return [self._event("response.mcp_call.in_progress", item)]

    def _approval(self, call: AgentCall, approval_id: str) -> list[Event]:
        """An `ask` approval: OpenAI's approval request item; POST /v1/agent/approvals/{id} answers it."""
        out = self.out
        body = {"server_label": SERVER_LABEL, "name": call.name, "arguments": call.arguments}
        item = {"id": approval_id, "type": "mcp_approval_request", **body}
        index = len(out.items)
        from mistralrs_serve.entrypoints.openai.responses_stream import _Item

        holder = _Item("mcp_approval_request", index, "mcpr")
        holder.id, holder.body, holder.status = approval_id, body, "completed"
        out.items.append(holder)
        return [
            out.event("response.output_item.added", output_index=index, item=item),
            out.event("response.output_item.done", output_index=index, item=holder.to_dict()),
        ]

    def _finished(self, call: AgentCall) -> list[Event]:
        item = self._item(call)
        assert item.body is not None
        result = call.output
        details = result.details if result is not None else {}
        failed = call.status != "completed"
        events: list[Event] = []
        if result is not None:
            self.citations.extend({"url": c.url, "title": c.title} for c in result.citations)
            self.files.extend({"file_id": f.file_id, "filename": f.filename} for f in result.files)
        if item.kind == "web_search_call":
            action = details.get("action")
            if isinstance(action, dict):
                item.body["action"] = action
            item.status = "failed" if failed else "completed"
            events.append(
                self._event("response.web_search_call.completed", item)
            )  # OpenAI has no failed event
        elif item.kind == "code_interpreter_call":
            outputs = details.get("outputs")
            if not isinstance(outputs, list):
                outputs = [{"type": "logs", "logs": result.text if result is not None else ""}]
            item.body["outputs"] = outputs
            item.status = "failed" if call.status in ("denied", "cancelled") else "completed"
            events.append(self._event("response.code_interpreter_call.completed", item))
        elif item.kind == "shell_call":
            item.status = "completed"
        else:
            text = result.text if result is not None else ""
            item.body["output"], item.body["error"] = (None, text) if failed else (text, None)
            item.status = "failed" if failed else "completed"
            events.append(self._event(f"response.mcp_call.{'failed' if failed else 'completed'}", item))
        events.append(
            self.out.event("response.output_item.done", output_index=item.output_index, item=item.to_dict())
        )
        if item.kind == "shell_call":
            events.extend(self._shell_output(call, details))
        return events

    def _shell_output(self, call: AgentCall, details: dict[str, Any]) -> list[Event]:
        from mistralrs_serve.entrypoints.openai.responses_stream import _Item

        out = self.out
        output = details.get("output")
        if not isinstance(output, list):
            text = call.output.text if call.output is not None else ""
            output = [{"stdout": "", "stderr": text, "outcome": {"type": "exit", "exit_code": 1}}]
        holder = _Item("shell_call_output", len(out.items), "sho")
        holder.body = {"call_id": call.id, "output": output, "max_output_length": None}
        holder.status = "completed"
        out.items.append(holder)
        added = {**holder.to_dict(), "status": "in_progress"}
        return [
            out.event("response.output_item.added", output_index=holder.output_index, item=added),
            out.event("response.output_item.done", output_index=holder.output_index, item=holder.to_dict()),
        ]

    def _finish(self, result: AgentResult) -> None:
        out = self.out
        out.num_prompt_tokens = result.prompt_tokens
        out.num_cached_tokens = result.cached_tokens
        if result.finish_reason == "length":  # cut short (the context filled): the response is incomplete
            out.choices[0].finish_reason = "length"
        for item in out.items:
            if item.body is not None and item.status == "in_progress":
                item.status = "incomplete"
        messages = [item for item in out.items if item.kind == "message"]
        if messages:
            messages[-1].annotations = text_annotations(
                messages[-1].text, self.citations, self.files, getattr(out, "container_id", "")
            )


def text_annotations(
    text: str, citations: list[dict[str, str]], files: list[dict[str, Any]], container_id: str
) -> list[dict[str, Any]]:
    """Where the text cites a source (its URL, its title, or its number "[n]") and names a
    produced file; a source or file it does not name is cited at the end of the text."""
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    for n, c in enumerate(citations, start=1):
        if c["url"] in seen:
            continue
        seen.add(c["url"])
        start, end = _span(text, [c["url"], c["title"], f"[{n}]"])
        found.append(
            {
                "type": "url_citation",
                "url": c["url"],
                "title": c["title"] or c["url"],
                "start_index": start,
                "end_index": end,
            }
        )
    for f in files:
        start, end = _span(text, [f["filename"]])
        found.append(
            {
                "type": "container_file_citation",
                "container_id": container_id,
                "file_id": f["file_id"],
                "filename": f["filename"],
                "start_index": start,
                "end_index": end,
            }
        )
    return found


def _span(text: str, needles: list[str]) -> tuple[int, int]:
    for needle in needles:
        if needle and (at := text.find(needle)) >= 0:
            return at, at + len(needle)
    return len(text), len(text)


def _arguments(call: AgentCall) -> dict[str, Any]:
    try:
        value = json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
