"""Driving an ASGI app without a socket: one HTTP request given as a scope and
a body, answered as a head (status, headers) and body chunks as the app sends
them; and the app's lifespan (startup before the first request, shutdown at
the end). The replicas use it so the app they run is the single server's."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]


@dataclass(frozen=True)
class Head:
    status: int
    headers: list[tuple[bytes, bytes]]


async def call(app: Any, scope: Scope, body: bytes) -> AsyncIterator[Head | bytes]:
    """The app's answer to one request: its Head, then the body's chunks. Closing the
    iterator early is the client leaving: the app sees `http.disconnect` and is stopped."""
    out: asyncio.Queue[Message | BaseException | None] = asyncio.Queue()
    left = asyncio.Event()
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await out.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
            await out.put(None)
        except BaseException as e:  # handed to the reader, which raises it
            await out.put(e)

    task = asyncio.get_running_loop().create_task(run())
    try:
        while True:
            message = await out.get()
            if message is None:
                return
            if isinstance(message, BaseException):
                raise message
            if message["type"] == "http.response.start":
                yield Head(message["status"], [(bytes(k), bytes(v)) for k, v in message.get("headers", [])])
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    return
    finally:
        left.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), 5)
            task.cancel()


class Lifespan:
    """An app's lifespan protocol: `start()` runs its startup, `stop()` its shutdown."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._outbox: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        async def receive() -> Message:
            return await self._inbox.get()

        async def send(message: Message) -> None:
            await self._outbox.put(message)

        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self._task = asyncio.get_running_loop().create_task(self.app(scope, receive, send))
        await self._inbox.put({"type": "lifespan.startup"})
        reply = await self._outbox.get()
        if reply["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"the app failed to start: {reply.get('message', reply['type'])}")

    async def stop(self) -> None:
        if self._task is None or self._task.done():
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._outbox.get(), 30)
