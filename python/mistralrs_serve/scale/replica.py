"""One engine replica: the app `mistralrs-serve serve` runs (cli.server_app),
served by uvicorn on a port of its own inside the replica's process.

The ingress reaches a replica in two steps. A Ray Serve call (`slot`), which
the deployment's router (router.py) sends to the replica it picks, answers
with the replica's address and a ticket, then stays open until the ticket's
HTTP request has finished, so Ray counts the request as the replica's for its
whole life (queue-length routing, `max_ongoing_requests` and autoscaling on
ongoing requests all see the real load). The request itself, and every chunk
of its answer, then travel over plain HTTP between the ingress and the
replica: no Ray message per streamed token. Not Ray-specific: app.py wraps it
in a Serve deployment, and tests may drive it directly."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from mistralrs_serve.scale.affinity import REPLICA_PREFIX

logger = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 900.0
TICKET_HEADER = b"x-mistralrs-serve-ticket"
TICKET_WAIT_S = 60.0  # a slot whose request never arrives (its ingress died) is given up after this


def quiet_server(config: Any) -> Any:
    """A uvicorn.Server that leaves the process's signal handlers alone (Ray owns them)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server(config)


def niceness() -> int:
    """This process's nice value (Ray starts its workers at RAY_worker_niceness, 15 by default)."""
    return os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else 0


class Ticket:
    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.over = asyncio.Event()


class Tickets:
    """ASGI middleware: marks a ticket when the request carrying it arrives and when it is over."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.waiting: dict[str, Ticket] = {}

    def issue(self) -> tuple[str, Ticket]:
        ticket = uuid.uuid4().hex
        self.waiting[ticket] = Ticket()
        return ticket, self.waiting[ticket]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ticket = None
        headers = []
        for key, value in scope["headers"]:
            if key == TICKET_HEADER:
                ticket = value.decode("latin-1")
            else:
                headers.append((key, value))
        found = self.waiting.get(ticket) if ticket else None
        if found is not None:
            found.arrived.set()
        try:
            await self.app({**scope, "headers": headers}, receive, send)
        finally:
            if found is not None:
                found.over.set()


class EngineReplica:
    def __init__(self, args: argparse.Namespace, host: str = "127.0.0.1") -> None:
        from mistralrs_serve.cli import configure_logging, server_app

        configure_logging(args.log_level, args.log_format)
        tag = uuid.uuid4().hex[:8]
        self.id = REPLICA_PREFIX + tag
        self.pid = os.getpid()
        self.host = host
        self.app = server_app(args)
        self.state = self.app.state.server
        self.state.approvals.tag = tag  # its approvals' ids name it (affinity.approval_holder)
        self.tickets = Tickets(self.app)
        self.started = time.time()
        self.url = ""
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None
        self._ready = False
        self.nice = niceness()
        if self.nice > 0:
            logger.warning(
                "replica %s runs at nice %d, below every process on the node at 0 (Ray's daemons "
                "among them), which take its cores first: start Ray with RAY_worker_niceness=0",
                self.id,
                self.nice,
            )

    async def start(self) -> None:
        """Open the replica's HTTP port and wait for its models: it takes traffic once loaded."""
        import uvicorn

        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.tickets,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_keep_alive=75,
            backlog=4096,
        )
        self._server = quiet_server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{port}"
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._task.done():
                raise RuntimeError(f"replica {self.id}: its HTTP server stopped: {self._task.exception()}")
            statuses = {m.status for m in self.state.models.models}
            if "failed" in statuses:
                raise RuntimeError(f"replica {self.id}: a model failed to load: {self.health()['error']}")
            if self._server.started and statuses <= {"ready"}:
                self._ready = True
                logger.info("replica %s (pid %d) is ready at %s", self.id, self.pid, self.url)
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"replica {self.id}: the models did not load in {LOAD_TIMEOUT_S:.0f} s")

    async def slot(self) -> AsyncIterator[dict[str, Any]]:
        """Where to send one request: {"url", "ticket", "replica"}; then open until it is over."""
        ticket, found = self.tickets.issue()
        try:
            yield {"url": self.url, "ticket": ticket, "replica": self.id}
            try:  # the ingress connects at once; a slot it never used (it died) is given up
                await asyncio.wait_for(found.arrived.wait(), TICKET_WAIT_S)
            except asyncio.TimeoutError:
                return
            await found.over.wait()
        finally:
            self.tickets.waiting.pop(ticket, None)

    def queue_depth(self) -> int:
        """Requests this replica holds: those its server admitted and has not answered, or the
        sequences its engines run and queue (background responses among them), the larger."""
        stats = self.state.engine_stats() if self._ready else {}
        sequences = sum(s["num_running"] + s["num_waiting"] for s in stats.values())
        return max(int(self.state.pending), sequences)

    def health(self) -> dict[str, Any]:
        models = [
            {"name": m.name or m.spec.name, "kind": m.kind, "status": m.status, "error": m.error}
            for m in self.state.models.models
        ]
        failed = [m for m in models if m["status"] == "failed"]
        status = "failed" if failed else "ok" if self._ready else "loading"
        return {
            "replica": self.id,
            "pid": self.pid,
            "url": self.url,
            "status": status,
            "uptime_s": round(time.time() - self.started, 1),
            "nice": self.nice,
            "queue_depth": self.queue_depth(),
            "models": models,
            "error": "; ".join(f"{m['name']}: {m['error']}" for m in failed) or None,
        }

    def metrics_text(self) -> str:
        """This replica's Prometheus exposition (its /metrics), for the ingress to merge."""
        from prometheus_client import generate_latest

        registry = getattr(self.state.metrics, "registry", None)
        return generate_latest(registry).decode() if registry is not None else ""

    def routing_stats(self) -> dict[str, Any]:
        return {
            "replica": self.id,
            "queue_depth": self.queue_depth(),
            "health": self.health(),
            "metrics": self.metrics_text(),
        }

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 30)
