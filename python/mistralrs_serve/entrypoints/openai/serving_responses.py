"""POST /v1/responses and the stored responses behind the other routes.

A request becomes a chat request (responses_input.py, responses_tools.py)
that `ChatServing.prepare` checks, renders and constrains, exactly as the
chat endpoint does; `ResponseStream` turns the engine's outputs into output
items and events; `responses_run.py` runs it (inline, streamed, or as a
background job) and keeps the store up to date.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from mistralrs_serve.agent.hosted_tools import HostedTools, read_hosted_tools
from mistralrs_serve.agent.loop import AgentLoop
from mistralrs_serve.agent.runtime import AgentRuntime
from mistralrs_serve.config import AgentConfig
from mistralrs_serve.entrypoints.openai import responses_protocol as wire
from mistralrs_serve.entrypoints.openai.protocol import ChatCompletionRequest
from mistralrs_serve.entrypoints.openai.responses_agent import AgentEvents
from mistralrs_serve.entrypoints.openai.responses_input import (
    MessageBuilder,
    has_files,
    instruction_items,
    normalize_input,
    with_file_texts,
    without_orphans,
)
from mistralrs_serve.entrypoints.openai.responses_protocol import ResponsesRequest
from mistralrs_serve.entrypoints.openai.responses_run import (
    InstanceLease,
    ResponseRunner,
    Run,
    fail_interrupted,
)
from mistralrs_serve.entrypoints.openai.responses_seal import ReasoningSeal
from mistralrs_serve.entrypoints.openai.responses_stream import ResponseStream
from mistralrs_serve.entrypoints.openai.responses_tools import (
    ToolSet,
    convert_text_format,
    convert_tool_choice,
    convert_tools,
)
from mistralrs_serve.entrypoints.openai.serving_chat import ChatServing, Prepared
from mistralrs_serve.errors import InvalidRequestError, NotFoundError, ServerBusyError
from mistralrs_serve.store.responses import UNFINISHED, ResponseStore, StoredResponse

__all__ = ["InstanceLease", "ResponsesServing", "fail_interrupted"]

logger = logging.getLogger(__name__)

MAX_CHAIN = 10_000  # previous_response_id hops followed before giving up (a cycle cannot happen)
_CHAT_PARAMS = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "reasoning_effort": "reasoning.effort",
    "enable_thinking": "reasoning.effort",
}
_TOOL_PARAM = re.compile(r"^tools\[(\d+)\](?:\.function)?(.*)$")


@dataclass
class _Items:
    """The conversation as items, with what to call each in an error."""

    instructions: list[dict[str, Any]]
    history: list[dict[str, Any]]  # from previous_response_id
    input: list[dict[str, Any]]

    def labelled(self) -> tuple[list[dict[str, Any]], list[str]]:
        labels = ["instructions"] * len(self.instructions) + ["previous_response_id"] * len(self.history)
        labels += [f"input[{i}]" for i in range(len(self.input))]
        return [*self.instructions, *self.history, *self.input], labels


class ResponsesServing:
    """The Responses endpoints. The store works from the start; creating a
    response needs the chat serving, attached once the model has loaded."""

    def __init__(
        self, store: ResponseStore, seal: ReasoningSeal, default_truncation: str = "disabled"
    ) -> None:
        self.store = store
        self.seal = seal
        # what a request without `truncation` gets (--default-truncation: for clients such as
        # Codex that never send it, on a model whose context their prompt outgrows)
        self.default_truncation = default_truncation
        self.chat: ChatServing | None = None
        self.agent: AgentRuntime | None = None
        self.runner = ResponseRunner(store)

    def attach(self, chat: ChatServing, agent: AgentRuntime | None = None) -> None:
        self.chat = chat
        self.agent = agent

    # --- POST /v1/responses --------------------------------------------

    async def create(self, req: ResponsesRequest, keepalive_s: float | None) -> bytes | AsyncIterator[bytes]:
        """The response body (JSON), or its SSE stream when `stream` is set."""
        run = await self.prepare(req)
        if run.store:  # a full disk is a 507 now, not after the run (or in its stream)
            await asyncio.to_thread(self.store.check_room)
        if run.background:
            job = await self.runner.start_job(run)
            if req.stream:
                return self.runner.follow(job, -1, keepalive_s)
            return orjson.dumps(job.queued)
        if req.stream:
            return await self.runner.stream(run, keepalive_s)
        return await self.runner.run(run)

    async def prepare(self, req: ResponsesRequest) -> Run:
        """Everything checked (a 4xx raises here, before any output); nothing runs yet."""
        chat = self.chat
        if chat is None:
            raise ServerBusyError("the model is still loading", retry_after_s=5)
        if req.truncation is None and self.default_truncation != "disabled":
            req = req.model_copy(update={"truncation": self.default_truncation})
        _check_request(req)
        history, root_id = await asyncio.to_thread(self._history, req.previous_response_id)
        earlier = {item["id"]: item for item in history if "id" in item}
        if req.input is None:
            raise InvalidRequestError("input is required", "input")
        stored_input = normalize_input(req.input, earlier)
        items = _Items(instruction_items(req.instructions), history, stored_input)
        images = chat.images is not None
        if has_files(items.history, images) or has_files(items.input, images):
            items = await asyncio.to_thread(_read_files, chat, items)
        tools = convert_tools(req.tools)
        hosted, _ = read_hosted_tools(req.tools, self.agent.cfg if self.agent is not None else AgentConfig())
        chat_format, text_format = convert_text_format(req.text, req.response_format)
        fields = _chat_fields(req, tools, chat_format)
        messages = self._fit(req, fields, items, tools, chat)
        response_id = wire.new_id("resp")
        loop = None
        if self.agent is not None and self.agent.engages_responses(hosted, tools.chat_tools):
            loop = await self._agent_loop(req, fields, messages, tools, hosted, root_id or response_id)
            prep = loop.first
            assert prep is not None
        else:
            prep = self._chat_prepare(fields, messages, tools, req, chat)
        params = prep.prompt.params
        response = wire.response_object(
            req,
            response_id=response_id,
            created_at=wire.now_s(),
            model=chat.model_name,
            tools=tools.echo,
            text_format=text_format,
            temperature=params.temperature,
            top_p=params.top_p,
        )
        include = req.include or []
        stream = ResponseStream(
            response,
            [prep.parser() for _ in range(params.n)],
            tools,
            chat.info.tokenizer,
            num_prompt_tokens=len(prep.prompt.prompt_ids),
            want_logprobs=bool(fields.get("logprobs")),
            seal=self.seal if wire.INCLUDE_ENCRYPTED_REASONING in include else None,
        )
        run = Run(
            response["id"],
            req,
            prep,
            stream,
            stored_input,
            req.store is not False,
            bool(req.background),
            chat.client,
        )
        if loop is not None:
            run.agent = loop
            kinds: dict[str, str] = {name: tool.spec.kind for name, tool in loop.plan.tools.items()}
            run.agent_events = AgentEvents(stream, kinds, loop.plan.session.id)
        return run

    async def _agent_loop(
        self,
        req: ResponsesRequest,
        fields: dict[str, Any],
        messages: list[dict[str, Any]],
        tools: ToolSet,
        hosted: HostedTools,
        root_id: str,
    ) -> AgentLoop:
        """The agent loop of a request with server-side tools. Its session (the interpreter's
        state, the shell's directory) is the conversation's: one per previous_response_id chain."""
        agent, chat = self.agent, self.chat
        assert agent is not None and chat is not None
        permission = agent.effective_permission(None, None)
        if permission == "ask" and not req.stream:
            raise InvalidRequestError(
                "this server asks for approval before it runs a tool (--agent-permission ask): "
                "use stream: true to receive the approval requests",
                "stream",
            )
        if (req.n or 1) != 1:
            raise InvalidRequestError("n must be 1 when the server runs tools (the agent loop)", "n")
        plan = await agent.plan(
            hosted,
            tools.chat_tools,
            messages=messages,
            session_id="sess_" + root_id.removeprefix("resp_"),
            max_rounds=None,
            permission=permission,
            required_files=[],
            history=False,
        )
        chat_req = ChatCompletionRequest.model_validate({**fields, "messages": messages})

        def prepare(r: ChatCompletionRequest) -> Prepared:
            with _chat_params(
                tools, "text.format" if (req.text or {}).get("format") is not None else "response_format"
            ):
                return chat.prepare(r)

        return await asyncio.to_thread(lambda: AgentLoop(chat, agent, chat_req, plan, prepare=prepare))

    def _history(self, response_id: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """The items of a stored conversation that ends with `response_id`: each
        response's input, then its output, oldest first (instructions are not carried);
        and the id of the conversation's first response."""
        if response_id is None:
            return [], None
        chain: list[StoredResponse] = []
        current: str | None = response_id
        while current is not None and len(chain) < MAX_CHAIN:
            record = self.store.get(current)
            if record is None:
                if current == response_id:
                    raise NotFoundError(
                        f"Response with id '{response_id}' not found.", "previous_response_id"
                    )
                raise NotFoundError(
                    f"response {current}, earlier in the conversation of {response_id}, was deleted",
                    "previous_response_id",
                )
            chain.append(record)
            current = record.previous_response_id
        if chain[0].status in ("queued", "in_progress"):
            raise InvalidRequestError(
                f"response {response_id} has not finished; wait for it (or cancel it) before continuing it",
                "previous_response_id",
            )
        items: list[dict[str, Any]] = []
        for record in reversed(chain):
            items.extend(orjson.loads(raw) for raw in self.store.input_items(record.id))
            items.extend(orjson.loads(record.object_json)["output"])
        return items, chain[-1].id

    def _messages(self, items: _Items, drop: set[int] | None = None) -> list[dict[str, Any]]:
        all_items, labels = items.labelled()
        if drop:
            kept = [
                (x, label)
                for j, (x, label) in enumerate(zip(all_items, labels, strict=True))
                if j not in drop
            ]
            all_items = without_orphans([x for x, _ in kept])
            survivors = {id(x) for x in all_items}
            labels = [label for x, label in kept if id(x) in survivors]
        builder = MessageBuilder(self.seal, labels.__getitem__)
        return builder.build(all_items)

    def _fit(
        self, req: ResponsesRequest, fields: dict[str, Any], items: _Items, tools: ToolSet, chat: ChatServing
    ) -> list[dict[str, Any]]:
        """The messages; with `truncation: auto`, without the oldest items the context cannot hold
        (from the beginning of the conversation, as OpenAI's; never the instructions or the last item)."""
        messages = self._messages(items)
        if req.truncation != "auto":
            return messages
        info = chat.info
        # Room for the answer: max_output_tokens, else an eighth of the context.
        reserve = req.max_output_tokens or max(1, info.max_model_len // 8)
        limit = min(info.max_model_len, info.num_kv_tokens) - reserve

        def fits(msgs: list[dict[str, Any]]) -> bool:
            with _chat_params(tools):
                ids = chat.prompt_ids(ChatCompletionRequest.model_validate({**fields, "messages": msgs}))
            return len(ids) <= limit

        if fits(messages):
            return messages
        start = len(items.instructions)
        order = list(range(start, start + len(items.history) + len(items.input) - 1))  # oldest first
        low, high = 1, len(order)  # the fewest dropped items that fit lies in [low, high]
        if not order or not fits(self._messages(items, set(order))):
            raise InvalidRequestError(
                f"the input does not fit this model's context of {info.max_model_len} tokens even after "
                "truncation dropped every earlier item",
                "input",
            )
        while low < high:
            mid = (low + high) // 2
            if fits(self._messages(items, set(order[:mid]))):
                high = mid
            else:
                low = mid + 1
        logger.info("truncation: dropped the %d oldest of %d items to fit the context", low, len(order) + 1)
        return self._messages(items, set(order[:low]))

    def _chat_prepare(
        self,
        fields: dict[str, Any],
        messages: list[dict[str, Any]],
        tools: ToolSet,
        req: ResponsesRequest,
        chat: ChatServing,
    ) -> Prepared:
        text_param = "text.format" if (req.text or {}).get("format") is not None else "response_format"
        with _chat_params(tools, text_param):
            return chat.prepare(ChatCompletionRequest.model_validate({**fields, "messages": messages}))

    # --- stored responses ------------------------------------------------

    async def retrieve(self, response_id: str) -> bytes:
        record = await asyncio.to_thread(self.store.get, response_id)
        if record is None:
            raise _not_found(response_id)
        return record.object_json

    async def follow(
        self, response_id: str, starting_after: int, keepalive_s: float | None
    ) -> AsyncIterator[bytes]:
        """GET ?stream=true: the events of a background response after `starting_after`."""
        job = self.runner.jobs.get(response_id)
        if job is not None:
            return self.runner.follow(job, starting_after, keepalive_s)
        record = await asyncio.to_thread(self.store.get, response_id)
        if record is None:
            raise _not_found(response_id)
        if not record.background:
            raise InvalidRequestError("only background responses can be streamed again", "stream")
        if record.status in UNFINISHED:  # another replica sharing the store runs it
            return self._follow_elsewhere(record, starting_after, keepalive_s)
        return self.runner.replay(record, starting_after)

    async def _follow_elsewhere(
        self, record: StoredResponse, starting_after: int, keepalive_s: float | None
    ) -> AsyncIterator[bytes]:
        """Keep-alives until the replica running it has stored its end, then its events."""
        async for found in self.runner.await_end(record, keepalive_s):
            if isinstance(found, bytes):
                yield found
                continue
            async for frame in self.runner.replay(found, starting_after):
                yield frame

    async def cancel(self, response_id: str) -> bytes:
        """Stop a background response (its KV blocks are freed); a finished one comes back unchanged."""
        await self.runner.cancel(response_id)
        record = await asyncio.to_thread(self.store.get, response_id)
        if record is None:
            raise _not_found(response_id)
        if record.status in UNFINISHED:
            if not record.background:
                raise InvalidRequestError("only background responses can be cancelled", "response_id")
            # another replica sharing the store runs it: end the row; that job stops when it sees it
            await asyncio.to_thread(self.runner.end_elsewhere, record)
            record = await asyncio.to_thread(self.store.get, response_id)
            if record is None:
                raise _not_found(response_id)
        return record.object_json

    async def delete(self, response_id: str) -> dict[str, Any]:
        await self.runner.cancel(response_id)
        if not await asyncio.to_thread(self.store.delete, response_id):
            raise _not_found(response_id)
        return wire.deleted_object(response_id)

    async def input_items(
        self, response_id: str, *, limit: int, order: str, after: str | None
    ) -> dict[str, Any]:
        if not 1 <= limit <= 100:
            raise InvalidRequestError("limit must be between 1 and 100", "limit")
        if order not in ("asc", "desc"):
            raise InvalidRequestError("order must be asc or desc", "order")

        def page() -> dict[str, Any]:
            if self.store.get(response_id) is None:
                raise _not_found(response_id)
            rows, has_more = self.store.page_input_items(
                response_id, limit=limit, descending=order == "desc", after=after
            )
            return wire.item_list([orjson.loads(row.item_json) for row in rows], has_more)

        return await asyncio.to_thread(page)


def _read_files(chat: ChatServing, items: _Items) -> _Items:
    """Items whose input_file parts are the text the model sees of them, and whose input_image
    parts are encoded images for a model that takes them (blocking: reads the store, may
    fetch, runs the encoder). New files are stored as uploads; those of earlier turns are
    only read again."""
    images = chat.images is not None

    def read(part_items: list[dict[str, Any]], param: str, persist: bool) -> list[dict[str, Any]]:
        if not has_files(part_items, images):
            return part_items
        messages = [{"content": x["content"]} if x["type"] == "message" else {} for x in part_items]
        expanded = chat.expand_parts(messages, allow_file_urls=True, persist=persist, param=param)
        return with_file_texts(part_items, expanded)

    history = read(items.history, "previous_response_id", False)
    return _Items(items.instructions, history, read(items.input, "input", True))


def _not_found(response_id: str) -> NotFoundError:
    return NotFoundError(f"Response with id '{response_id}' not found.", "response_id")


def _check_request(req: ResponsesRequest) -> None:
    """The request's own fields (what the chat endpoint does not check for it)."""
    _check_metadata(req.metadata)
    for value in req.include or []:
        if value not in wire.INCLUDE_VALUES:
            raise InvalidRequestError(f"include: unknown value {value!r}", "include")
    if req.truncation not in (None, "auto", "disabled"):
        raise InvalidRequestError(
            f"truncation must be auto or disabled; got {req.truncation!r}", "truncation"
        )
    effort = (req.reasoning or {}).get("effort")
    if effort is not None and effort not in wire.REASONING_EFFORTS:
        raise InvalidRequestError(
            f"reasoning.effort must be one of {', '.join(wire.REASONING_EFFORTS)}; got {effort!r}",
            "reasoning.effort",
        )
    if req.background and req.store is False:
        raise InvalidRequestError("background responses must be stored: drop store: false", "store")
    if req.max_tool_calls is not None:
        raise InvalidRequestError(
            "max_tool_calls is not supported; the server caps tool rounds itself", "max_tool_calls"
        )
    if req.conversation is not None:
        raise InvalidRequestError(
            "conversation is not supported; continue with previous_response_id", "conversation"
        )
    if req.safety_identifier is not None and len(req.safety_identifier) > 64:
        raise InvalidRequestError("safety_identifier may hold at most 64 characters", "safety_identifier")
    if req.prompt is not None:
        raise InvalidRequestError("prompt templates are not supported; send input and instructions", "prompt")


def _check_metadata(metadata: dict[str, Any] | None) -> None:
    """OpenAI's limits: 16 pairs, keys up to 64 characters, string values up to 512."""
    if metadata is None:
        return
    if len(metadata) > wire.MAX_METADATA_KEYS:
        raise InvalidRequestError(f"metadata has {len(metadata)} keys; at most 16 are allowed", "metadata")
    for key, value in metadata.items():
        if len(key) > wire.MAX_METADATA_KEY_CHARS:
            raise InvalidRequestError(f"metadata key {key[:20]!r}... is over 64 characters", "metadata")
        if not isinstance(value, str):
            raise InvalidRequestError(f"metadata[{key!r}] must be a string", "metadata")
        if len(value) > wire.MAX_METADATA_VALUE_CHARS:
            raise InvalidRequestError(f"metadata[{key!r}] is over 512 characters", "metadata")


def _chat_fields(req: ResponsesRequest, tools: ToolSet, response_format: Any) -> dict[str, Any]:
    """The chat request that renders and constrains this response (messages aside)."""
    include = req.include or []
    want_logprobs = wire.INCLUDE_LOGPROBS in include or bool(req.logprobs)
    effort = (req.reasoning or {}).get("effort")
    tool_choice = convert_tool_choice(req.tool_choice, tools)
    if not tools.chat_tools and tool_choice in ("auto", "none"):
        tool_choice = None  # only hosted tools (left out), or none: nothing to choose
    fields = {
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stop": req.stop,
        "n": req.n,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "logit_bias": req.logit_bias,
        "seed": req.seed,
        "logprobs": want_logprobs,
        "top_logprobs": req.top_logprobs if want_logprobs else None,
        "tools": tools.chat_tools or None,
        "tool_choice": tool_choice,
        "parallel_tool_calls": req.parallel_tool_calls,
        "response_format": response_format,
        "reasoning_effort": effort if effort not in (None, "none") else None,
        "enable_thinking": None if effort is None else effort != "none",
        "top_k": req.top_k,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
        "dry_multiplier": req.dry_multiplier,
        "dry_base": req.dry_base,
        "dry_allowed_length": req.dry_allowed_length,
        "dry_sequence_breakers": req.dry_sequence_breakers,
        "grammar": req.grammar,
        "grammar_type": req.grammar_type,
        "ignore_eos": req.ignore_eos,
    }
    return {k: v for k, v in fields.items() if v is not None}


class _chat_params:
    """Errors of the chat request, renamed to the Responses fields they came from."""

    def __init__(self, tools: ToolSet, text_param: str = "text.format") -> None:
        self.tools = tools
        self.text_param = text_param

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, InvalidRequestError) and exc.param is not None:
            exc.param = self._rename(exc.param)

    def _rename(self, param: str) -> str:
        match = _TOOL_PARAM.match(param)
        if match and int(match[1]) < len(self.tools.origins):
            return self.tools.origins[int(match[1])] + match[2]
        head = re.split(r"[.\[]", param, maxsplit=1)[0]
        if head == "response_format":
            return self.text_param + param[len(head) :].replace(".json_schema", "", 1)
        return _CHAT_PARAMS.get(head, param) if head in _CHAT_PARAMS else param
