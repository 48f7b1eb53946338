"""`ask` approvals (approve, deny, time-out, remember, late and double answers,
answers from another thread, a waiter cancelled) and the permission rule."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from mistralrs_serve.agent.approvals import (
    ApprovalRegistry,
    Decision,
    effective_permission,
    request_permission,
)
from mistralrs_serve.errors import InvalidRequestError, NotFoundError

T = TypeVar("T")


def test_effective_permission_only_tightens() -> None:
    order = ["auto", "ask", "deny"]
    for server in order:
        assert effective_permission(server, None) == server
        for request in order:
            expected = order[max(order.index(server), order.index(request))]
            assert effective_permission(server, request) == expected


def test_request_permission_validates_and_merges_the_alias() -> None:
    assert request_permission(None, None) is None
    assert request_permission("ask", None) == "ask"
    assert request_permission(None, "deny") == "deny"
    assert request_permission("ask", "ask") == "ask"
    for args, param in (
        (("always", None), "agent_permission"),
        ((None, 1), "code_execution_permission"),
        (("auto", "deny"), "code_execution_permission"),
    ):
        with pytest.raises(InvalidRequestError) as e:
            request_permission(*args)
        assert e.value.param == param


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_approve_and_remember() -> None:
    registry = ApprovalRegistry(timeout_s=30)

    async def scenario() -> Decision:
        approval = registry.create("sess_1", "python", '{"code": "1"}')
        assert approval.id.startswith("appr_") and approval.to_openai()["tool_name"] == "python"
        asyncio.get_running_loop().call_later(0.01, registry.resolve, approval.id, "approve", True)
        return await registry.wait(approval.id)

    assert run(scenario()) == Decision(True, True, "approved")


def test_deny() -> None:
    registry = ApprovalRegistry(timeout_s=30)

    async def scenario() -> Decision:
        approval = registry.create("sess_1", "shell", "{}")
        registry.resolve(approval.id, "deny")  # answered before anyone waits: kept
        return await registry.wait(approval.id)

    assert run(scenario()) == Decision(False, False, "denied")


def test_unanswered_is_denied_after_the_timeout() -> None:
    registry = ApprovalRegistry(timeout_s=0.05)

    async def scenario() -> tuple[Decision, float]:
        approval = registry.create("sess_1", "python", "{}")
        loop = asyncio.get_running_loop()
        start = loop.time()
        decision = await registry.wait(approval.id)
        return decision, loop.time() - start

    decision, waited = run(scenario())
    assert decision == Decision(False, False, "timed_out") and 0.04 <= waited < 2


def test_answers_after_the_end_and_unknown_ids() -> None:
    registry = ApprovalRegistry(timeout_s=0.02)

    async def scenario() -> str:
        approval = registry.create("sess_1", "python", "{}")
        await registry.wait(approval.id)
        return approval.id

    expired = run(scenario())
    with pytest.raises(NotFoundError, match="expired"):
        registry.resolve(expired, "approve")
    with pytest.raises(NotFoundError, match="No such approval"):
        registry.resolve("appr_unknown", "approve")
    with pytest.raises(NotFoundError):
        run(registry.wait("appr_unknown"))


def test_a_second_answer_is_refused_and_the_first_stands() -> None:
    registry = ApprovalRegistry(timeout_s=30)

    async def scenario() -> Decision:
        approval = registry.create("sess_1", "python", "{}")
        registry.resolve(approval.id, "deny")
        with pytest.raises(InvalidRequestError, match="already answered") as e:
            registry.resolve(approval.id, "approve")
        assert e.value.param == "approval_id"
        decision = await registry.wait(approval.id)
        with pytest.raises(InvalidRequestError, match="already answered"):
            registry.resolve(approval.id, "approve")  # after the waiter collected it too
        return decision

    assert run(scenario()).approved is False


def test_bad_decision_value() -> None:
    registry = ApprovalRegistry(timeout_s=30)
    approval = registry.create("s", "python", "{}")
    with pytest.raises(InvalidRequestError) as e:
        registry.resolve(approval.id, "yes")
    assert e.value.param == "decision"
    registry.resolve(approval.id, "approve")  # still pending: a bad answer changed nothing


def test_resolve_from_another_thread() -> None:
    registry = ApprovalRegistry(timeout_s=30)

    async def scenario() -> Decision:
        approval = registry.create("sess_1", "python", "{}")

        def answer() -> None:
            threading.Event().wait(0.05)  # the loop is already waiting
            registry.resolve(approval.id, "approve", remember_for_session=False)

        thread = threading.Thread(target=answer)
        thread.start()
        try:
            return await asyncio.wait_for(registry.wait(approval.id), 5)
        finally:
            thread.join()

    assert run(scenario()) == Decision(True, False, "approved")


def test_a_cancelled_waiter_ends_the_approval() -> None:
    registry = ApprovalRegistry(timeout_s=30)

    async def scenario() -> str:
        approval = registry.create("sess_1", "python", "{}")
        task = asyncio.ensure_future(registry.wait(approval.id))
        await asyncio.sleep(0.01)
        task.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await task
        return approval.id

    approval_id = run(scenario())
    with pytest.raises(NotFoundError, match="request ended"):
        registry.resolve(approval_id, "approve")


def test_never_waited_approvals_expire() -> None:
    now = [0.0]
    registry = ApprovalRegistry(timeout_s=10, clock=lambda: now[0])
    forgotten = registry.create("s", "python", "{}")
    now[0] = 11
    with pytest.raises(NotFoundError, match="expired"):
        registry.resolve(forgotten.id, "approve")
    other = registry.create("s", "python", "{}")
    now[0] = 30
    registry.create("s", "python", "{}")  # creating sweeps the dead ones
    with pytest.raises(NotFoundError, match="expired"):
        registry.get(other.id)
