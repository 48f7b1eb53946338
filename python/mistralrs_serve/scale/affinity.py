"""Which replica a request should go to, before load is considered.

A request's routing key names the KV blocks it would reuse:
- a stored response's own routes (`/v1/responses/{id}...`) and a request
  continuing one (`previous_response_id`) take the key of the request that
  created it, remembered from its answer (`ResponseOwners`);
- a request naming an agent `session_id` takes the session;
- otherwise the prompt's start: a long system prompt (shared by many
  conversations) alone, else the messages up to the first user turn, which
  every later turn of the same conversation repeats; a completion prompt's
  first characters.
An answer to a tool approval (`/v1/agent/approvals/{id}`) goes to the replica
holding it, named in its id (`approval_holder`): it waits in that process's
memory. A key goes to the replica with the highest rendezvous score, so keys spread
evenly and only the keys of a replica that leaves or joins move. Requests
without a key (embeddings, files, models) go to the least-loaded replica.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

LONG_SYSTEM_CHARS = 1024  # a system prompt at least this long is a prefix many requests share
PROMPT_KEY_CHARS = 2048  # how much of a completion prompt decides its key
_RESPONSE_PATH = re.compile(r"^/v1/responses/(resp_[A-Za-z0-9_-]+)")
_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"(resp_[A-Za-z0-9_-]+)"')
_APPROVAL_PATH = re.compile(r"^/v1/agent/approvals/appr_([0-9a-f]{8})_[0-9a-f]+$")
REPLICA_PREFIX = "replica-"  # an engine replica's id: this, then the tag its approval ids carry


def approval_holder(path: str) -> str | None:
    """The id of the engine replica holding the approval a path answers, when its id names one."""
    found = _APPROVAL_PATH.match(path)
    return REPLICA_PREFIX + found.group(1) if found else None


class ResponseOwners:
    """Response id -> the routing key of the request that made it (least recently used go)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[str, str] = OrderedDict()

    def remember(self, response_id: str, key: str) -> None:
        self._keys[response_id] = key
        self._keys.move_to_end(response_id)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def key_of(self, response_id: str) -> str:
        key = self._keys.get(response_id)
        if key is None:
            return f"response:{response_id}"  # made before this ingress started: any fixed replica
        self._keys.move_to_end(response_id)
        return key

    def __len__(self) -> int:
        return len(self._keys)


def response_id_in(first_bytes: bytes) -> str | None:
    """The id of the response an answer carries (a Response object or its first stream event)."""
    found = _RESPONSE_ID.search(first_bytes)
    return found.group(1).decode() if found else None


def routing_key(method: str, path: str, body: bytes, owners: ResponseOwners) -> str | None:
    found = _RESPONSE_PATH.match(path)
    if found:
        return owners.key_of(found.group(1))
    if method != "POST" or not body or not path.startswith("/v1/"):
        return None
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None  # multipart uploads and bad JSON: no affinity (the replica answers the error)
    if not isinstance(request, dict):
        return None
    previous = request.get("previous_response_id")
    if isinstance(previous, str) and previous:
        return owners.key_of(previous)
    session = request.get("session_id")
    if isinstance(session, str) and session:
        return f"session:{session}"
    if path.startswith("/v1/chat/completions"):
        return _messages_key(request.get("messages"))
    if path.startswith("/v1/responses"):
        return _responses_key(request)
    if path.startswith("/v1/completions"):
        prompt = request.get("prompt")
        if isinstance(prompt, str) and prompt:
            return "prompt:" + _digest(prompt[:PROMPT_KEY_CHARS])
    return None


def _messages_key(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return None
    first = messages[0]
    system = isinstance(first, Mapping) and first.get("role") in ("system", "developer")
    if system and len(_text(first.get("content"))) >= LONG_SYSTEM_CHARS:
        return "prefix:" + _digest(first)
    upto: list[Any] = []
    for message in messages:
        upto.append(message)
        if isinstance(message, Mapping) and message.get("role") == "user":
            break
    return "prefix:" + _digest(upto)


def _responses_key(request: Mapping[str, Any]) -> str | None:
    instructions = request.get("instructions")
    if isinstance(instructions, str) and len(instructions) >= LONG_SYSTEM_CHARS:
        return "prefix:" + _digest({"role": "system", "content": instructions})
    given = request.get("input")
    if isinstance(given, str):
        items: list[Any] = [{"role": "user", "content": given}]
    elif isinstance(given, list):
        items = given
    else:
        return None
    head = [{"role": "system", "content": instructions}] if instructions else []
    return _messages_key(head + items)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)
        )
    return ""


def _digest(value: Any) -> str:
    return hashlib.blake2b(orjson.dumps(value, option=orjson.OPT_SORT_KEYS), digest_size=12).hexdigest()


def rendezvous(key: str, replica_ids: Iterable[str]) -> str | None:
    """The replica a key belongs to: the highest hash of (key, replica)."""
    best, best_score = None, b""
    for replica in replica_ids:
        score = hashlib.blake2b(f"{key}\x00{replica}".encode(), digest_size=8).digest()
        if best is None or score > best_score:
            best, best_score = replica, score
    return best


def rank(
    key: str | None, queues: Mapping[str, int | None], imbalance: int, holder: str | None = None
) -> tuple[list[str], bool]:
    """Replica ids in the order to try them, and whether the first is the one asked for:
    the holder, or else the key's own.

    A `holder` (the replica a request must reach, whatever its load) comes first while it
    is there. Otherwise the key's replica comes first unless its queue is more than `imbalance` requests
    longer than the shortest (then affinity costs more than the prefix saves); the rest
    follow by queue depth (unknown depths count as empty: the router probes them), ties
    in random order so that requests without a key spread."""
    by_load = sorted(queues, key=lambda r: (queues[r] or 0, random.random()))
    if holder is not None and holder in queues:
        return [holder, *(r for r in by_load if r != holder)], True
    if key is None or not by_load:
        return by_load, False
    owner = rendezvous(key, by_load)
    assert owner is not None
    shortest = queues[by_load[0]] or 0
    if (queues[owner] or 0) - shortest > imbalance:
        return by_load, False
    return [owner, *(r for r in by_load if r != owner)], True
