"""Permission to run server-side tools: the `auto < ask < deny` rule and the
approvals that `ask` waits for.

Under `ask` the loop creates an `Approval` (id `appr_...`), streams it to the
client and awaits `ApprovalRegistry.wait`; the client answers with
`POST /v1/agent/approvals/{id}`, which calls `resolve`. An approval nobody
answers is denied once `timeout_s` has passed since it was created. The answer
lives in a `concurrent.futures.Future`, so `resolve` may run on any thread
while the waiting request awaits it on the event loop.

Answering an approval that does not exist, timed out or whose request ended
is a 404 (NotFoundError); answering one a second time is a 400 naming
`approval_id` (the first answer stands).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from mistralrs_serve.errors import InvalidRequestError, NotFoundError

PERMISSIONS = ("auto", "ask", "deny")  # in order: a request may move right, never left
_RANK = {p: i for i, p in enumerate(PERMISSIONS)}


def effective_permission(server: str, request: str | None) -> str:
    """The stricter of the server's `--agent-permission` and the request's own."""
    if request is None:
        return server
    return max(server, request, key=_RANK.__getitem__)


def request_permission(agent_permission: Any, code_execution_permission: Any) -> str | None:
    """The request's permission from `agent_permission` or its alias
    `code_execution_permission`; None when neither is set."""
    for name, value in (
        ("agent_permission", agent_permission),
        ("code_execution_permission", code_execution_permission),
    ):
        if value is not None and value not in PERMISSIONS:
            raise InvalidRequestError(f"{name} must be one of {', '.join(PERMISSIONS)}; got {value!r}", name)
    if (
        None not in (agent_permission, code_execution_permission)
        and agent_permission != code_execution_permission
    ):
        raise InvalidRequestError(
            "code_execution_permission is an alias of agent_permission; they differ "
            f"({code_execution_permission!r} and {agent_permission!r}): send one",
            "code_execution_permission",
        )
    result: str | None = agent_permission if agent_permission is not None else code_execution_permission
    return result


@dataclass(frozen=True)
class Decision:
    approved: bool
    remember_for_session: bool = False
    reason: str = ""  # "approved", "denied", "timed_out" or "cancelled" (the waiting request ended)


@dataclass(frozen=True)
class Approval:
    id: str
    session_id: str
    tool_name: str
    arguments: Any  # as the model wrote them (JSON text) or parsed
    created_at: int  # seconds since the epoch
    expires_at: int  # unanswered by then: denied

    def to_openai(self) -> dict[str, Any]:
        """What the stream shows the client: enough to decide, and the id to answer."""
        return {
            "id": self.id,
            "object": "agent.approval_request",
            "session_id": self.session_id,
            "tool_name": self.tool_name,
            "arguments": self.arguments,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
        }


@dataclass
class _Entry:
    approval: Approval
    deadline: float  # on the registry's monotonic clock
    future: Future[Decision]


class ApprovalRegistry:
    """Pending approvals by id. Thread-safe; `wait` runs on an event loop."""

    MAX_FINISHED = 4096  # how many ended approvals are remembered, for clear answers to late calls

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        self._lock = threading.Lock()
        self._pending: dict[str, _Entry] = {}
        self._finished: OrderedDict[str, str] = OrderedDict()  # id -> Decision.reason
        # names the process holding these approvals in their ids (`appr_{tag}_...`), so that
        # an ingress in front of many replicas sends each answer to the one waiting for it
        # (scale/affinity.approval_holder); empty for a single server
        self.tag = ""

    def create(self, session_id: str, tool_name: str, arguments: Any) -> Approval:
        now = time.time()
        approval = Approval(
            id=f"appr_{self.tag}_{uuid.uuid4().hex}" if self.tag else f"appr_{uuid.uuid4().hex}",
            session_id=session_id,
            tool_name=tool_name,
            arguments=arguments,
            created_at=int(now),
            expires_at=int(now + self.timeout_s),
        )
        with self._lock:
            self._sweep()
            self._pending[approval.id] = _Entry(approval, self.clock() + self.timeout_s, Future())
        return approval

    def get(self, approval_id: str) -> Approval:
        """A pending (unanswered or answered but not yet collected) approval."""
        with self._lock:
            entry = self._pending.get(approval_id)
            if entry is None:
                raise self._gone(approval_id)
            return entry.approval

    async def wait(self, approval_id: str) -> Decision:
        """The answer, or a deny once the timeout has passed since `create`."""
        with self._lock:
            entry = self._pending.get(approval_id)
        if entry is None:
            raise self._gone(approval_id)
        waiter = asyncio.wrap_future(entry.future)
        outcome = Decision(False, reason="cancelled")  # what stands if this task is cancelled
        try:
            remaining = max(0.0, entry.deadline - self.clock())
            done, _ = await asyncio.wait({waiter}, timeout=remaining)
            if not done:
                outcome = Decision(False, reason="timed_out")
        finally:
            decision = self._finish(entry, outcome)
        return decision

    def resolve(self, approval_id: str, decision: str, remember_for_session: bool = False) -> Decision:
        """Answer an approval: `decision` is "approve" or "deny"."""
        if decision not in ("approve", "deny"):
            raise InvalidRequestError(f"decision must be 'approve' or 'deny'; got {decision!r}", "decision")
        approved = decision == "approve"
        answer = Decision(approved, remember_for_session, "approved" if approved else "denied")
        with self._lock:
            entry = self._pending.get(approval_id)
            if entry is not None and not entry.future.done() and self.clock() >= entry.deadline:
                self._close(entry, Decision(False, reason="timed_out"))
                entry = None
            if entry is None:
                raise self._gone(approval_id)
            if entry.future.done():
                raise _answered(approval_id, entry.future.result().reason)
            entry.future.set_result(answer)
        return answer

    def _finish(self, entry: _Entry, outcome: Decision) -> Decision:
        """The entry's decision (`outcome` unless it was answered first); it is no longer pending."""
        with self._lock:
            return self._close(entry, outcome)

    def _close(self, entry: _Entry, outcome: Decision) -> Decision:
        if not entry.future.done():
            entry.future.set_result(outcome)
        decision = entry.future.result()
        approval_id = entry.approval.id
        self._pending.pop(approval_id, None)
        self._finished[approval_id] = decision.reason
        while len(self._finished) > self.MAX_FINISHED:
            self._finished.popitem(last=False)
        return decision

    def _sweep(self) -> None:
        """Close what was never waited for (its request went away) once its deadline has passed."""
        now = self.clock()
        for entry in [e for e in self._pending.values() if now >= e.deadline]:
            self._close(entry, Decision(False, reason="timed_out"))

    def _gone(self, approval_id: str) -> Exception:
        """Called with the lock held."""
        reason = self._finished.get(approval_id)
        if reason in ("approved", "denied"):
            return _answered(approval_id, reason)
        if reason == "timed_out":
            return NotFoundError(
                f"The approval {approval_id!r} has expired: unanswered for {self.timeout_s:g} s, "
                "its call was denied",
                "approval_id",
            )
        if reason == "cancelled":
            return NotFoundError(
                f"The approval {approval_id!r} has expired: its request ended", "approval_id"
            )
        return NotFoundError(f"No such approval: {approval_id!r}", "approval_id")


def _answered(approval_id: str, reason: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"The approval {approval_id!r} was already answered ({reason}); the first answer stands",
        "approval_id",
    )
