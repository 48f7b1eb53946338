"""The engine on a background thread, and the client that talks to it.

One thread owns the LLMEngine (and so the scheduler); callers on any thread
check a prompt with `EngineLoop.info` (so bad input raises on their thread),
submit it, and get their outputs through callbacks, which the blocking,
iterator and asyncio helpers below turn into what each caller wants.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import queue
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Iterator

from mistralrs_serve.engine.engine_info import CheckedPrompt, EngineInfo
from mistralrs_serve.engine.llm_engine import LLMEngine
from mistralrs_serve.engine.sequence import CompletionOutput, OutputCallback, Request, StepOutput
from mistralrs_serve.errors import EngineError
from mistralrs_serve.sampling_params import SamplingParams

__all__ = ["EngineError", "EngineLoop"]

logger = logging.getLogger(__name__)

# What the helpers take: a prompt EngineInfo.check_prompt accepted, or raw ids
# (then with their params; checked on the caller's thread before submitting).
PromptInput = CheckedPrompt | list[int]


class EngineLoop:
    """The client of one engine thread. Other threads use only `info`, `submit`
    (or the helpers `generate`, `stream`, `stream_async`), `abort`,
    `add_finished_hook`, `stats` and `shutdown`; `engine` belongs to the engine
    thread (tests and benchmarks may look at it).

    Pass an LLMEngine, or a function that builds one: then the model is loaded
    on the engine thread too. Prefer the latter. libgomp gives every thread that
    runs torch ops its own OpenMP team; once the main thread has one, the engine
    thread's team is throttled (more threads than cores) and each op waits on a
    futex wake: decode ran at 29 instead of 57 tok/s here."""

    engine: LLMEngine
    info: EngineInfo  # the tokenizer, template, limits and grammar compiler; read-only

    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine]) -> None:
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopped = False
        self._ids = itertools.count()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        build = (lambda: engine) if isinstance(engine, LLMEngine) else engine
        self._thread = threading.Thread(target=self._run, args=(build,), name="mistralrs-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error
        # A daemon thread still inside torch when the interpreter tears down
        # aborts the process ("terminate called without an active exception").
        atexit.register(self.shutdown)

    def submit(self, prompt: CheckedPrompt, on_output: OutputCallback) -> str:
        """Queue a checked prompt; its outputs go to `on_output`, on the engine thread."""
        request_id = f"req-{next(self._ids)}"

        def add() -> None:
            try:
                self.engine.add_checked(request_id, prompt, on_output)
            except Exception as e:  # reported to its caller, never kills the loop
                for index in range(prompt.params.n):
                    on_output(StepOutput(index, -1, "", finish_reason="abort", error=str(e)))

        self._post(add)
        return request_id

    def check(
        self, prompt: PromptInput, params: SamplingParams | None, param: str = "prompt"
    ) -> CheckedPrompt:
        """`prompt` if already checked, else `info.check_prompt(prompt, params, param)`."""
        if isinstance(prompt, CheckedPrompt):
            return prompt
        if params is None:
            raise TypeError("raw prompt ids need their SamplingParams")
        return self.info.check_prompt(prompt, params, param)

    def add_finished_hook(self, hook: Callable[[Request], None]) -> None:
        """Call `hook` with every request that finishes (not aborted) from now on.
        It runs on the engine thread, between steps: keep it quick."""
        self._post(lambda: self.engine.finished_hooks.append(hook))

    def abort(self, request_id: str) -> None:
        def abort() -> None:
            self.engine.abort_request(request_id)

        self._post(abort)

    def stats(self) -> dict[str, int]:
        """Scheduler counters for metrics. Safe from any thread: the scheduler's
        methods never release the GIL, so a read cannot interleave with a step's update."""
        sched = self.engine.scheduler
        return {
            "num_running": sched.num_running,
            "num_waiting": sched.num_waiting,
            "num_blocks": sched.num_blocks,
            "num_used_blocks": sched.num_used_blocks,
            "prefix_cache_queries": sched.prefix_cache_queries,
            "prefix_cache_hits": sched.prefix_cache_hits,
            "num_preemptions": sched.num_preemptions,
        }

    def shutdown(self) -> None:
        """Stop the engine thread after its current step (idempotent)."""
        self._stopped = True
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _post(self, command: Callable[[], None]) -> None:
        self._inbox.put(command)
        self._wake.set()

    def _run(self, build: Callable[[], LLMEngine]) -> None:
        try:
            self.engine = build()
            self.info = self.engine.info
        except BaseException as e:  # re-raised on the constructing thread
            self._startup_error = e
            return
        finally:
            self._ready.set()
        while not self._stopped:
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception as e:
                logger.exception("engine step failed; ending the running requests")
                self.engine.fail_all(f"internal engine error ({type(e).__name__})")

    def _drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            command()

    # --- caller-side helpers -------------------------------------------

    def generate(
        self, prompt: PromptInput, params: SamplingParams | None = None, param: str = "prompt"
    ) -> list[CompletionOutput]:
        """Block until every choice is finished."""
        prompt = self.check(prompt, params, param)
        outputs = [CompletionOutput(i) for i in range(prompt.params.n)]
        for step in self.stream(prompt):
            outputs[step.index].add(step)
        return outputs

    def stream(
        self, prompt: PromptInput, params: SamplingParams | None = None, param: str = "prompt"
    ) -> Iterator[StepOutput]:
        """Step outputs of all choices as they come; closing the iterator aborts the request.
        A bad prompt raises here, before the iterator is returned."""
        return self._stream(self.check(prompt, params, param))

    def _stream(self, prompt: CheckedPrompt) -> Iterator[StepOutput]:
        inbox: queue.SimpleQueue[StepOutput] = queue.SimpleQueue()
        request_id = self.submit(prompt, inbox.put)
        remaining = prompt.params.n
        try:
            while remaining:
                step = inbox.get()
                if step.error is not None:
                    raise EngineError(step.error)
                remaining -= step.finish_reason is not None
                yield step
        finally:
            if remaining:
                self.abort(request_id)

    async def stream_async(
        self,
        prompt: PromptInput,
        params: SamplingParams | None = None,
        param: str = "prompt",
        idle_s: float | None = None,
    ) -> AsyncGenerator[StepOutput | None, None]:
        """As `stream`, for asyncio; cancelling or closing the consumer aborts the request.
        With idle_s, None is yielded whenever no output came for that long (SSE keep-alives)."""
        prompt = self.check(prompt, params, param)
        inbox: asyncio.Queue[StepOutput] = asyncio.Queue()
        deliver = _LoopMailbox.of(asyncio.get_running_loop()).sender(inbox)
        request_id = self.submit(prompt, deliver)
        remaining = prompt.params.n
        try:
            while remaining:
                try:
                    step = await asyncio.wait_for(inbox.get(), idle_s)
                except asyncio.TimeoutError:  # Queue.get loses nothing when cancelled
                    yield None
                    continue
                if step.error is not None:
                    raise EngineError(step.error)
                remaining -= step.finish_reason is not None
                yield step
        finally:
            if remaining:
                self.abort(request_id)


class _LoopMailbox:
    """Hands engine outputs to one asyncio loop with one wake-up per burst.

    A step ends with an output for every running request; waking the loop
    once per output (call_soon_threadsafe each) costs a context switch per
    request per step, and on a small machine every switch stalls the
    engine's OpenMP threads. Outputs queue here and the first of a burst
    schedules the one flush that delivers them all."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: list[tuple[asyncio.Queue[StepOutput], StepOutput]] = []
        self.scheduled = False
        self.lock = threading.Lock()

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _LoopMailbox:
        with _MAILBOXES_LOCK:
            box = _MAILBOXES.get(loop)
            if box is None:
                box = _MAILBOXES[loop] = cls(loop)
            return box

    def sender(self, inbox: asyncio.Queue[StepOutput]) -> OutputCallback:
        def send(step: StepOutput) -> None:
            with self.lock:
                self.pending.append((inbox, step))
                if self.scheduled:
                    return
                self.scheduled = True
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody listens any more
                self.loop.call_soon_threadsafe(self._flush)

        return send

    def _flush(self) -> None:
        with self.lock:
            batch, self.pending, self.scheduled = self.pending, [], False
        for inbox, step in batch:
            inbox.put_nowait(step)


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopMailbox] = weakref.WeakKeyDictionary()
_MAILBOXES_LOCK = threading.Lock()
