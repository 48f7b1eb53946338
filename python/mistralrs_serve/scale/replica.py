"""One engine replica: the app `mistralrs-serve serve` runs (cli.server_app),
driven through ASGI without a socket. The ingress calls `handle` with the
request; the answer streams back as a head and body chunks, so every replica
answers with the single server's bytes. Not Ray-specific: app.py wraps it in
a Serve deployment, and tests may drive it directly."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from mistralrs_serve.scale.asgi_bridge import Head, Lifespan, Scope, call

logger = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 900.0


class EngineReplica:
    def __init__(self, args: argparse.Namespace) -> None:
        from mistralrs_serve.cli import configure_logging, server_app

        configure_logging(args.log_level, args.log_format)
        self.id = f"replica-{uuid.uuid4().hex[:8]}"
        self.pid = os.getpid()
        self.app = server_app(args)
        self.state = self.app.state.server
        self.started = time.time()
        self.lifespan = Lifespan(self.app)
        self._ready = False

    async def start(self) -> None:
        """Run the app's startup and wait for its models: a replica takes traffic once loaded."""
        await self.lifespan.start()
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            statuses = {m.status for m in self.state.models.models}
            if "failed" in statuses:
                raise RuntimeError(f"replica {self.id}: a model failed to load: {self.health()['error']}")
            if statuses <= {"ready"}:
                self._ready = True
                logger.info("replica %s (pid %d) is ready", self.id, self.pid)
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"replica {self.id}: the models did not load in {LOAD_TIMEOUT_S:.0f} s")

    async def handle(self, scope: Scope, body: bytes) -> AsyncIterator[dict[str, Any] | bytes]:
        """The app's answer: first {"status", "headers", "replica"}, then the body's chunks."""
        scope = {**scope, "app": self.app, "state": {}}
        async for part in call(self.app, scope, body):
            if isinstance(part, Head):
                yield {"status": part.status, "headers": part.headers, "replica": self.id}
            else:
                yield part

    def queue_depth(self) -> int:
        """Requests this replica holds: admitted by the server and not finished."""
        return int(self.state.pending)

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
            "status": status,
            "uptime_s": round(time.time() - self.started, 1),
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
        await self.lifespan.stop()
