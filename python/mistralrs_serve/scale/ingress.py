"""The HTTP ingress of a Ray Serve deployment (app.py wraps `Ingress` in a
Serve deployment; Ray's proxy hands it each request).

It reads the body (bounded), works out the routing key (affinity.py), and
calls the engine deployment, whose router (router.py) picks the replica. The
replica's head and body chunks pass straight through, so streams are not
buffered and the bytes are the single server's. When a replica dies before
its answer began, the request goes to another one; when it dies mid-stream,
the stream ends with an error event in the endpoint's own format. `/health`
and `/metrics` answer for every replica, from the routing stats the replicas
report (and the ingress's own counters)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator
from typing import Any, cast

import aiohttp
import orjson
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from mistralrs_serve.entrypoints.openai.http_errors import error_event, error_response, json_response
from mistralrs_serve.entrypoints.openai.http_security import read_body
from mistralrs_serve.errors import ReplicaUnavailableError, RequestTooLargeError
from mistralrs_serve.scale.affinity import ResponseOwners, approval_holder, response_id_in, routing_key
from mistralrs_serve.scale.replica import TICKET_HEADER

logger = logging.getLogger(__name__)

PREFIX = "mistralrs_serve_ingress"
RETRIES = 5  # how many times a request not yet begun may be sent again when its replica died
RETRY_PAUSE_S = 0.1  # doubled at each retry
LEARN_BYTES = 8192  # how much of an answer is searched for the id of the response it made
# hop-by-hop headers, and what the client side recomputes
_NOT_FORWARDED = {b"host", b"content-length", b"connection", b"keep-alive", b"transfer-encoding", b"upgrade"}
_NOT_RETURNED = {b"connection", b"keep-alive", b"transfer-encoding", b"date", b"server"}
_SEQUENCE = re.compile(rb'"sequence_number"\s*:\s*(\d+)')


class Ingress:
    def __init__(self, engine: Any, *, max_body_bytes: int, retries: int = RETRIES) -> None:
        self.engine = engine.options(stream=True, method_name="slot")
        self.max_body_bytes = max_body_bytes
        self.retries = retries
        self.owners = ResponseOwners()
        self._http: aiohttp.ClientSession | None = None
        self.registry = CollectorRegistry()
        self.routed = Counter(
            f"{PREFIX}_requests", "requests passed to a replica", ["keyed"], registry=self.registry
        )
        self.retried = Counter(
            f"{PREFIX}_retries",
            "requests sent again after their replica died before answering",
            registry=self.registry,
        )
        self.cut = Counter(
            f"{PREFIX}_streams_cut",
            "streams ended with an error event when their replica died",
            registry=self.registry,
        )
        self.replicas_gauge = Gauge(
            f"{PREFIX}_replicas", "replicas by reported status", ["status"], registry=self.registry
        )
        self.registry.register(_AffinityRoutes())

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if request.method == "GET" and path == "/health":
            return self.health()
        if request.method == "GET" and path == "/metrics":
            return Response(self.metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")
        try:
            body = await read_body(request, self.max_body_bytes)
        except RequestTooLargeError as e:
            return error_response(e)
        key = routing_key(request.method, path, body, self.owners)
        holder = approval_holder(path)  # an approval's answer goes where the approval waits
        self.routed.labels(keyed=str(key is not None).lower()).inc()
        target = request.scope.get("raw_path") or path.encode()
        if request.scope.get("query_string"):
            target += b"?" + request.scope["query_string"]
        headers = CIMultiDict(
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in request.headers.raw
            if k.lower() not in _NOT_FORWARDED
        )
        avoid: list[str] = []  # replicas that failed this request: the router passes them over
        for attempt in range(self.retries + 1):
            slot = self.engine.remote(affinity=key, avoid=avoid, holder=holder)
            found: dict[str, Any] = {}
            try:
                found = await slot.__anext__()
                headers[TICKET_HEADER.decode()] = found["ticket"]
                answer = await self.http().request(
                    request.method,
                    found["url"] + target.decode("latin-1"),
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                )
            except Exception as e:
                slot.cancel()
                if not _replica_gone(e) or attempt == self.retries:
                    logger.error("request %s %s: no replica answered: %s", request.method, path, e)
                    return error_response(ReplicaUnavailableError(_gone_message(e)))
                self.retried.inc()
                if "ray_replica" in found:
                    avoid.append(found["ray_replica"])
                logger.warning(
                    "%s %s: its replica died before answering (%s); trying another", request.method, path, e
                )
                await asyncio.sleep(RETRY_PAUSE_S * 2**attempt)  # Ray learns of the death meanwhile
                continue
            return PassThrough(answer, slot, self, key, path)
        raise AssertionError("unreachable")

    def http(self) -> aiohttp.ClientSession:
        """The client to the replicas' own ports (made in the serving loop): kept-alive
        connections, no timeout on a long stream, the bytes as sent (no decompression, no
        cookies, no headers of its own). aiohttp's parser is C: the ingress's work per
        streamed chunk is a large part of its cost."""
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0),
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            )
        return self._http

    # --- every replica's health and metrics ---------------------------------

    def replica_stats(self) -> list[dict[str, Any]]:
        from mistralrs_serve.scale.router import ROUTERS

        seen: dict[str, dict[str, Any]] = {}
        for router in list(ROUTERS):
            for stats in router.replica_stats():
                seen[stats["ray_replica_id"]] = stats
        return list(seen.values())

    def replicas(self, reports: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Each replica's health as it last reported it (in `reports`, the replicas' routing
        stats, when the caller has them); the replica gauge follows."""
        replicas = []
        for stats in self.replica_stats() if reports is None else reports:
            health = stats.get("health") or {"status": "starting"}
            replicas.append({"ray_replica_id": stats["ray_replica_id"], **health})
        for status in ("ok", "loading", "failed", "starting"):
            self.replicas_gauge.labels(status=status).set(sum(r["status"] == status for r in replicas))
        return replicas

    def health(self) -> Response:
        replicas = self.replicas()
        ok = sum(r["status"] == "ok" for r in replicas)
        status = "ok" if ok else "loading" if replicas else "starting"
        body = {"status": status, "replicas_ready": ok, "replicas": replicas}
        return json_response(body, 200 if ok else 503)

    def metrics(self) -> bytes:
        """The ingress's counters, then every replica's metrics with a `replica` label."""
        reports = self.replica_stats()
        self.replicas(reports)  # the replica gauge, as of the replicas' last reports
        texts = [
            (str(stats.get("replica", stats["ray_replica_id"])), stats["metrics"])
            for stats in reports
            if isinstance(stats.get("metrics"), str)
        ]
        merged = CollectorRegistry()
        merged.register(_Merged(texts))
        return generate_latest(self.registry) + generate_latest(merged)


class PassThrough(Response):
    """A replica's answer as it comes: its status and headers as sent, its body chunk by chunk."""

    def __init__(
        self, answer: aiohttp.ClientResponse, slot: Any, ingress: Ingress, key: str | None, path: str
    ) -> None:
        self.answer = answer
        self.slot = slot
        self.ingress = ingress
        self.key = key
        self.path = path
        self.status_code = answer.status
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(k, v) for k, v in self.answer.raw_headers if k.lower() not in _NOT_RETURNED]
        is_sse = self.answer.headers.get("content-type", "").startswith("text/event-stream")
        # a Responses stream's error event continues its sequence numbers
        numbered = is_sse and self.path.startswith("/v1/responses")
        learning = self.key is not None  # until the id of the response it made is seen
        seen = b""
        last_sequence = -1
        whole = False
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": headers})
            async for chunk in self.answer.content.iter_any():
                if learning:
                    seen = (seen + chunk)[:LEARN_BYTES]
                    found = response_id_in(seen) if b"resp_" in seen else None
                    if found is not None:
                        self.ingress.owners.remember(found, cast(str, self.key))
                    learning = found is None and len(seen) < LEARN_BYTES
                if numbered:
                    for number in _SEQUENCE.findall(chunk):
                        last_sequence = int(number)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            whole = True
        except aiohttp.ClientError as e:
            if not is_sse:
                raise  # a body cut short: the connection is dropped, the client sees it incomplete
            self.ingress.cut.inc()
            logger.error("a stream of %s ended: its replica died: %s", self.path, e)
            await send(
                {"type": "http.response.body", "body": self._error_frame(e, last_sequence), "more_body": True}
            )
        finally:
            if whole:
                self.answer.release()  # its connection back to the pool
            else:
                self.answer.close()
            self.slot.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _error_frame(self, e: Exception, last_sequence: int) -> bytes:
        error = ReplicaUnavailableError(
            "the replica serving this stream stopped before it finished; nothing after this "
            f"point was generated ({type(e).__name__})"
        )
        if self.path.startswith("/v1/responses"):
            event = {
                "type": "error",
                "code": "replica_unavailable",
                "message": str(error),
                "param": None,
                "sequence_number": last_sequence + 1,
            }
            return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"
        return error_event(error)


def _replica_gone(e: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(
        e, (ActorDiedError, ActorUnavailableError, RayActorError, aiohttp.ClientConnectionError)
    )


def _gone_message(e: BaseException) -> str:
    return f"no replica could take the request ({type(e).__name__}); retry later"


class _AffinityRoutes:
    """The routers' counts of keyed requests: sent to their key's replica (hit), or elsewhere,
    its queue being too long or the replica gone (miss)."""

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily

        from mistralrs_serve.scale.router import ROUTERS

        routers = list(ROUTERS)
        family = CounterMetricFamily(
            f"{PREFIX}_affinity_routes",
            "keyed requests routed to their key's replica (hit) or to another (miss)",
            labels=["outcome"],
        )
        family.add_metric(["hit"], sum(getattr(r, "affinity_hits", 0) for r in routers))
        family.add_metric(["miss"], sum(getattr(r, "affinity_misses", 0) for r in routers))
        yield family


class _Merged:
    """The replicas' metric families, each sample labelled with its replica."""

    def __init__(self, texts: list[tuple[str, str]]) -> None:
        self.texts = texts

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for replica, text in self.texts:
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                merged.samples += [
                    s._replace(labels={**s.labels, "replica": replica}) for s in family.samples
                ]
        yield from families.values()
