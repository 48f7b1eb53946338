"""Routing keys and replica choice of the Ray deployment (python/mistralrs_serve/scale/affinity.py)."""

from __future__ import annotations

import orjson
from mistralrs_serve.agent.approvals import ApprovalRegistry
from mistralrs_serve.scale.affinity import (
    LONG_SYSTEM_CHARS,
    ResponseOwners,
    approval_holder,
    rank,
    rendezvous,
    response_id_in,
    routing_key,
)


def key(path: str, body: dict[str, object], owners: ResponseOwners | None = None) -> str | None:
    return routing_key("POST", path, orjson.dumps(body), owners or ResponseOwners())


def chat(*messages: tuple[str, str]) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": r, "content": c} for r, c in messages]}


def test_every_turn_of_a_conversation_has_the_first_turns_key() -> None:
    first = key("/v1/chat/completions", chat(("system", "be brief"), ("user", "hi")))
    later = key(
        "/v1/chat/completions",
        chat(("system", "be brief"), ("user", "hi"), ("assistant", "hello"), ("user", "more")),
    )
    other = key("/v1/chat/completions", chat(("system", "be brief"), ("user", "bye")))
    assert first is not None and first == later and first != other


def test_a_long_system_prompt_is_the_key_of_every_conversation_under_it() -> None:
    system = "You are a support agent. " * (LONG_SYSTEM_CHARS // 20)
    one = key("/v1/chat/completions", chat(("system", system), ("user", "my printer")))
    two = key("/v1/chat/completions", chat(("system", system), ("user", "my router")))
    assert one == two
    text_parts = {"role": "system", "content": [{"type": "text", "text": system}]}
    assert (
        key("/v1/chat/completions", {"messages": [text_parts, {"role": "user", "content": "x"}]}) is not None
    )


def test_responses_sessions_and_completions() -> None:
    owners = ResponseOwners()
    made = key("/v1/responses", {"input": "tell me a story"}, owners)
    assert made is not None and made == key(
        "/v1/responses", {"input": [{"role": "user", "content": "tell me a story"}]}
    )
    owners.remember("resp_abc", made)
    assert key("/v1/responses", {"input": "go on", "previous_response_id": "resp_abc"}, owners) == made
    assert routing_key("GET", "/v1/responses/resp_abc", b"", owners) == made
    assert routing_key("POST", "/v1/responses/resp_abc/cancel", b"", owners) == made
    assert routing_key("GET", "/v1/responses/resp_unknown", b"", owners) == "response:resp_unknown"
    assert key("/v1/chat/completions", {"session_id": "s1", "messages": []}) == "session:s1"
    prompt = key("/v1/completions", {"prompt": "x" * 5000 + "a"})
    assert prompt == key("/v1/completions", {"prompt": "x" * 5000 + "b"}), "only the prompt's start counts"


def test_no_key_for_what_has_no_prefix_or_is_not_json() -> None:
    owners = ResponseOwners()
    assert routing_key("GET", "/v1/models", b"", owners) is None
    assert routing_key("POST", "/v1/files", b"--boundary\r\n", owners) is None
    assert routing_key("POST", "/v1/chat/completions", b"{not json", owners) is None
    assert routing_key("POST", "/v1/chat/completions", b"[1, 2]", owners) is None
    assert key("/v1/embeddings", {"input": "x"}) is None


def test_response_ids_are_found_in_objects_and_first_events() -> None:
    assert response_id_in(b'{"id":"resp_12ab","object":"response"}') == "resp_12ab"
    event = b'event: response.created\ndata: {"type":"response.created","response":{"id": "resp_x9"}}'
    assert response_id_in(event) == "resp_x9"
    assert response_id_in(b'{"id":"chatcmpl-1"}') is None


def test_owners_forget_the_least_recently_used() -> None:
    owners = ResponseOwners(capacity=2)
    owners.remember("resp_a", "k1")
    owners.remember("resp_b", "k2")
    owners.key_of("resp_a")
    owners.remember("resp_c", "k3")
    assert (
        len(owners) == 2 and owners.key_of("resp_b") == "response:resp_b" and owners.key_of("resp_a") == "k1"
    )


def test_keys_spread_and_move_only_from_a_replica_that_leaves() -> None:
    keys = [f"prefix:{i}" for i in range(2000)]
    three = ["r1", "r2", "r3"]
    owner = {k: rendezvous(k, three) for k in keys}
    counts = {r: sum(1 for o in owner.values() if o == r) for r in three}
    assert all(550 < c < 780 for c in counts.values()), counts
    two = ["r1", "r3"]
    moved = [k for k in keys if owner[k] != "r2" and rendezvous(k, two) != owner[k]]
    assert moved == [], "keys of the replicas that stayed did not move"


def test_rank_prefers_the_keys_replica_unless_it_is_much_busier() -> None:
    k = "prefix:abc"
    own = rendezvous(k, ["r1", "r2"])
    assert own is not None
    other = "r2" if own == "r1" else "r1"
    order, owned = rank(k, {own: 3, other: 0}, imbalance=8)
    assert order == [own, other] and owned
    order, owned = rank(k, {own: 20, other: 2}, imbalance=8)
    assert order == [other, own] and not owned
    order, owned = rank(None, {own: 5, other: None}, imbalance=8)
    assert order == [other, own] and not owned, "unknown depth counts as empty"
    assert rank(k, {}, imbalance=8) == ([], False)


def test_an_approvals_answer_goes_to_the_replica_holding_it() -> None:
    """A replica's approvals carry its tag; the answer's path names that replica, which
    comes first whatever its load, and the others follow while it is gone."""
    registry = ApprovalRegistry(timeout_s=30)
    registry.tag = "0a1b2c3d"
    approval = registry.create("sess_1", "python", "{}")
    assert approval.id.startswith("appr_0a1b2c3d_")
    holder = approval_holder(f"/v1/agent/approvals/{approval.id}")
    assert holder == "replica-0a1b2c3d"
    order, owned = rank("prefix:abc", {"replica-ffffffff": 0, holder: 50}, imbalance=8, holder=holder)
    assert order[0] == holder and owned, "the holder comes first however busy"
    order, _ = rank(None, {"replica-ffffffff": 3, "replica-eeeeeeee": 0}, imbalance=8, holder=holder)
    assert order == ["replica-eeeeeeee", "replica-ffffffff"], "a holder that is gone: by load"
    untagged = ApprovalRegistry(timeout_s=30).create("sess_1", "python", "{}")  # a single server's
    assert approval_holder(f"/v1/agent/approvals/{untagged.id}") is None
    for path in (
        "/v1/agent/approvals/appr_nope",
        f"/v1/agent/approvals/{approval.id}/extra",
        f"/v1/responses/{approval.id}",
    ):
        assert approval_holder(path) is None, path
