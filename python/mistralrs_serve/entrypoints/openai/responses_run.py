"""Running a prepared response: inline (whole or streamed) or as a background
job on the server's event loop, with the store kept up to date.

A stored response is written before its first event goes out (so a client
can GET it from the `response.created` on) and again before its terminal
event (so a GET after `response.completed` finds it completed). A background
job also writes its progress as it goes, keeps its events for
`GET ?stream=true&starting_after=N`, and on cancel aborts its engine request
(freeing its KV blocks) and is stored `cancelled` with its partial output.
A response left queued or in progress by a server that died is failed by
`fail_interrupted` when the next one starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from mistralrs_serve.agent.loop import AgentLoop, KeepAlive
from mistralrs_serve.engine.engine_info import EngineClient
from mistralrs_serve.entrypoints.openai import responses_protocol as wire
from mistralrs_serve.entrypoints.openai.responses_agent import AgentEvents
from mistralrs_serve.entrypoints.openai.responses_protocol import ResponsesRequest
from mistralrs_serve.entrypoints.openai.responses_stream import TERMINAL_EVENTS, Event, ResponseStream
from mistralrs_serve.entrypoints.openai.serving_chat import Prepared
from mistralrs_serve.errors import EngineError, StorageFullError
from mistralrs_serve.store.responses import UNFINISHED, InputItem, ResponseStore, StoredResponse

logger = logging.getLogger(__name__)

PERSIST_EVERY_S = 1.0  # a background job's progress reaches the store at least this often
# ...and at once on these: an item opened or closed, a server-side tool started (a poll then sees
# the call while its tool runs, however long that takes, with no event in between)
SAVED_EVENTS = frozenset(
    {
        "response.in_progress",
        "response.output_item.added",
        "response.output_item.done",
        "response.web_search_call.searching",
        "response.code_interpreter_call.interpreting",
        "response.mcp_call.in_progress",
    }
)
KEEPALIVE = b": keep-alive\n\n"
RESTARTED = "the server restarted before this response finished"
_TERMINAL = frozenset(TERMINAL_EVENTS.values())


@dataclass
class Run:
    """A checked response request, ready to run."""

    id: str
    req: ResponsesRequest
    prep: Prepared
    stream: ResponseStream
    input_items: list[dict[str, Any]]
    store: bool
    background: bool
    client: EngineClient
    # set when the request engages the agent loop: its rounds replace the one generation
    agent: AgentLoop | None = None
    agent_events: AgentEvents | None = None

    def record(self, obj: dict[str, Any], body: bytes | None = None) -> StoredResponse:
        """The stored form of `obj` (`body`: its JSON, when already made)."""
        return StoredResponse(
            self.id,
            obj["created_at"],
            obj["status"],
            self.background,
            self.req.previous_response_id,
            body if body is not None else orjson.dumps(obj),
        )

    def stored_items(self) -> list[InputItem]:
        return [InputItem(item["id"], orjson.dumps(item)) for item in self.input_items]


def sse(event: Event) -> bytes:
    return _frame(event["type"], orjson.dumps(event))


def _frame(kind: str, data: bytes) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


async def execute(run: Run, idle_s: float | None) -> AsyncGenerator[Event | None, None]:
    """The events from `response.in_progress` to the terminal one; None after idle_s
    without output. Closing or cancelling it aborts the engine request."""
    out = run.stream
    for event in out.in_progress():
        yield event
    status, error = "completed", None
    steps = _steps(run, idle_s)
    try:
        async for events in steps:
            if events is None:
                yield None
                continue
            for event in events:
                yield event
    except EngineError as e:
        logger.warning("response %s failed: %s", run.id, e)
        status, error = "failed", str(e)
    except Exception as e:  # ends as a failed response, never a cut stream
        logger.exception("response %s failed", run.id)
        status, error = "failed", f"internal error ({type(e).__name__})"
    finally:
        await steps.aclose()
    for event in out.finish(status, error):
        yield event


async def _steps(run: Run, idle_s: float | None) -> AsyncGenerator[list[Event] | None, None]:
    """Each engine step's events (None: a keep-alive); through the agent loop when it runs."""
    if run.agent is None or run.agent_events is None:
        steps = run.client.stream_async(run.prep.prompt, idle_s=idle_s)
        try:
            async for step in steps:
                yield None if step is None else run.stream.step(step)
        finally:
            await steps.aclose()
        return
    loop_events = run.agent.events()
    try:
        async for event in loop_events:
            yield None if isinstance(event, KeepAlive) else run.agent_events.handle(event)
    finally:
        await loop_events.aclose()  # stops the loop: aborts its engine request, kills a running tool


class BackgroundJob:
    """A background response running on the event loop, and the events it has sent."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.queued = run.stream.snapshot()
        self.events: list[tuple[str, bytes]] = []  # (type, JSON); event i has sequence_number i
        self.num_published = 0  # events followers may send (the rest wait for the store)
        self.wake = asyncio.Event()
        self.has_ended = False  # its terminal event is out
        self.is_done = False  # its task is over
        self.task: asyncio.Task[None] | None = None
        self.last_saved = time.monotonic()

    def keep(self, event: Event) -> None:
        self.events.append((event["type"], orjson.dumps(event)))
        self.has_ended = self.has_ended or event["type"] in _TERMINAL

    def notify(self) -> None:
        self.num_published = len(self.events)
        self.wake.set()
        self.wake = asyncio.Event()

    def state_json(self) -> bytes:
        return b'{"events":[' + b",".join(data for _, data in self.events) + b"]}"


class ResponseRunner:
    """Runs prepared responses and holds the background jobs of this server."""

    def __init__(self, store: ResponseStore) -> None:
        self.store = store
        self.jobs: dict[str, BackgroundJob] = {}

    async def run(self, run: Run) -> bytes:
        """The finished response, as the JSON it is served (and stored) as."""
        async for _ in execute(run, None):
            pass
        obj = run.stream.snapshot()
        body = orjson.dumps(obj)
        if run.store:
            await asyncio.to_thread(self.store.insert, run.record(obj, body), run.stored_items())
        return body

    async def stream(self, run: Run, idle_s: float | None) -> AsyncIterator[bytes]:
        """The SSE frames; when `store`, the response is stored (in progress) as the stream starts."""
        run.stream.response["status"] = "in_progress"
        return self._stream(run, idle_s)

    async def _stream(self, run: Run, idle_s: float | None) -> AsyncIterator[bytes]:
        out = run.stream
        finished = False
        if run.store:
            # Not awaited: no cancellation point may come between the row and the `finally` that
            # ends it, or a client gone at this moment would leave it in progress for good.
            self.store.insert(run.record(out.snapshot()), run.stored_items())
        try:
            for created in out.created():
                yield sse(created)
            async for event in execute(run, idle_s):
                if event is None:
                    yield KEEPALIVE
                    continue
                if event["type"] in _TERMINAL and run.store:
                    finished = True  # the save below is the last word, even if the client leaves now
                    await asyncio.to_thread(self._save, run, event["response"], None)
                yield sse(event)
        finally:
            if run.store and not finished:
                # The client went away: the loop may not await any more here, so this write blocks.
                out.finish("cancelled")
                self._save(run, out.snapshot(), None)

    def _save(self, run: Run, obj: dict[str, Any], state_json: bytes | None) -> bool:
        """False when the row was deleted or ended by another server (a replica's cancel)."""
        try:
            return self.store.update(run.id, obj["status"], orjson.dumps(obj), state_json)
        except StorageFullError as e:
            # the run goes on for whoever follows it; the row keeps its last saved state, and a
            # restart fails it if it was never finished
            logger.error("response %s: its progress could not be stored: %s", run.id, e)
            return True

    # --- background jobs --------------------------------------------------

    async def start_job(self, run: Run) -> BackgroundJob:
        job = BackgroundJob(run)
        await asyncio.to_thread(self.store.insert, run.record(job.queued), run.stored_items())
        for event in run.stream.created():
            job.keep(event)
        job.notify()
        self.jobs[run.id] = job
        job.task = asyncio.get_running_loop().create_task(self._job(job), name=f"response-{run.id}")
        return job

    async def _job(self, job: BackgroundJob) -> None:
        run = job.run
        try:
            # aclosing: a cancel aborts the engine request at once, wherever the job was
            async with contextlib.aclosing(execute(run, None)) as events:
                async for event in events:
                    await self._job_event(job, event)
                    job.notify()
        except asyncio.CancelledError:
            await self._end_job(job, "cancelled", None)
        except Exception as e:
            logger.exception("background response %s failed", run.id)
            await self._end_job(job, "failed", f"internal error ({type(e).__name__})")
        finally:
            self._close(job)

    def _close(self, job: BackgroundJob) -> None:
        job.is_done = True
        self.jobs.pop(job.run.id, None)
        job.notify()

    async def _job_event(self, job: BackgroundJob, event: Event | None) -> None:
        """Keep an event; store the job as it goes (its end before the end is told, so a GET agrees)."""
        assert event is not None  # no idle_s: no keep-alives
        job.keep(event)
        run = job.run
        if job.has_ended:
            await asyncio.to_thread(self._save, run, event["response"], job.state_json())
        elif event["type"] in SAVED_EVENTS or (time.monotonic() - job.last_saved > PERSIST_EVERY_S):
            job.last_saved = time.monotonic()
            if not await asyncio.to_thread(self._save, run, run.stream.snapshot(), None):
                # cancelled or deleted through another replica sharing the store: stop here
                raise asyncio.CancelledError

    async def _end_job(self, job: BackgroundJob, status: str, error: str | None) -> None:
        if job.has_ended:
            return
        for event in job.run.stream.finish(status, error):
            job.keep(event)
        await asyncio.to_thread(self._save, job.run, job.run.stream.snapshot(), job.state_json())

    async def cancel(self, response_id: str) -> None:
        """Cancel a running background job and wait until it has stored its end."""
        job = self.jobs.get(response_id)
        if job is None or job.task is None:
            return
        job.task.cancel()
        await asyncio.wait({job.task})
        if not job.is_done:  # cancelled before its first step: its coroutine never ran
            await self._end_job(job, "cancelled", None)
            self._close(job)

    async def follow(
        self, job: BackgroundJob, starting_after: int, idle_s: float | None
    ) -> AsyncIterator[bytes]:
        """A live job's events after `starting_after`, then the rest as they come."""
        position = max(0, starting_after + 1)
        while True:
            while position < job.num_published:
                yield _frame(*job.events[position])
                position += 1
            if job.is_done:
                return
            try:
                await asyncio.wait_for(job.wake.wait(), idle_s)
            except asyncio.TimeoutError:
                yield KEEPALIVE

    def end_elsewhere(self, record: StoredResponse) -> bool:
        """Cancel a background response that another replica runs: its row ends here, and its
        job stops at its next save (within PERSIST_EVERY_S) when it finds the row ended."""
        return self.store.update(record.id, "cancelled", ended_object(record, "cancelled", None))

    async def await_end(
        self, record: StoredResponse, idle_s: float | None
    ) -> AsyncIterator[bytes | StoredResponse]:
        """Keep-alives while another replica runs the response, then its stored end (polled)."""
        last_beat = time.monotonic()
        while record.status in UNFINISHED:
            await asyncio.sleep(PERSIST_EVERY_S / 2)
            found = await asyncio.to_thread(self.store.get, record.id)
            if found is None:
                return
            record = found
            if idle_s is not None and time.monotonic() - last_beat >= idle_s:
                last_beat = time.monotonic()
                yield KEEPALIVE
        yield record

    async def replay(self, record: StoredResponse, starting_after: int) -> AsyncIterator[bytes]:
        """A finished background response's stored events after `starting_after`; one that
        kept none (the server died while it ran) sends its terminal event alone."""
        if record.state_json is not None:
            for event in orjson.loads(record.state_json).get("events", []):
                if event["sequence_number"] > starting_after:
                    yield sse(event)
            return
        obj = orjson.loads(record.object_json)
        kind = TERMINAL_EVENTS.get(obj["status"], "response.failed")
        yield sse({"type": kind, "sequence_number": starting_after + 1, "response": obj})


def fail_interrupted(
    store: ResponseStore, records: list[StoredResponse] | None = None, reason: str = RESTARTED
) -> int:
    """Fail every response a dead server left queued or in progress: at startup, before serving,
    all of them (`records` None); where replicas share the store, those of replicas that died."""
    if records is None:
        records = store.unfinished()
    failed = sum(store.update(r.id, "failed", ended_object(r, "failed", reason)) for r in records)
    if failed:
        logger.warning("%d responses were running when their server stopped: marked failed", failed)
    return failed


REPLICA_DIED = "the replica running this response stopped before it finished"


class InstanceLease:
    """Where replicas share the store: this server's heartbeat, and the failing of what dead
    replicas left running. Every `every_s` a thread records the heartbeat, then fails the
    unfinished responses whose owner has been silent for `stale_s` (so each survivor may find
    them; the conditional update lets one win)."""

    def __init__(self, store: ResponseStore, *, stale_s: float, every_s: float | None = None) -> None:
        self.store = store
        self.stale_s = stale_s
        self.every_s = every_s if every_s is not None else max(0.5, stale_s / 6)
        self._stop = threading.Event()
        self.tick()  # before serving: a bad store fails the start
        self._thread = threading.Thread(target=self._run, name="instance-lease", daemon=True)
        self._thread.start()

    def tick(self) -> int:
        self.store.heartbeat()
        return fail_interrupted(self.store, self.store.orphaned(self.stale_s), REPLICA_DIED)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.tick()
            except Exception as e:  # the store is down for a while: try again next time
                logger.warning("the instance lease could not be renewed: %s", e)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def ended_object(record: StoredResponse, status: str, error: str | None) -> bytes:
    """A stored unfinished response's object, ended by someone other than its job."""
    obj = orjson.loads(record.object_json)
    obj["status"] = status
    if error is not None:
        obj["error"] = wire.error_object(error)
    for item in obj.get("output", []):
        if item.get("status") == "in_progress":
            item["status"] = "incomplete"
    return orjson.dumps(obj)
