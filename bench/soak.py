"""Soak: many streaming clients on one server for a set time.

Starts `mistralrs-serve` in a subprocess (or uses --url) and keeps --clients
clients busy until --duration runs out. Each client loops over a mix of
requests: streamed chat completions, streamed Responses, streams it drops
after the first few events (the server must abort them and free their KV
blocks), and bad bodies (malformed JSON, a wrong type, an unknown model: each
must be a 4xx in OpenAI's envelope). Every --window seconds it prints one JSON
line: requests done, errors (a 5xx, a transport error, a bad request answered
other than 4xx), p50/p99 latency of the whole requests that finished in the
window, and the server's resident memory. After the load: the KV blocks in use
(from /metrics; must be 0) and the memory growth from the first window to the
last (must stay under 5%).

    .venv/bin/python bench/soak.py                    # 64 clients, 10 minutes
    .venv/bin/python bench/soak.py --smoke            # 16 clients, 60 seconds: CI
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import start_server

MEMORY_GROWTH_BAR = 0.05
QUESTION = [{"role": "user", "content": "Tell me about the sea, in a few sentences."}]


@dataclass
class Window:
    done: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.examples) < 3:
            self.examples.append(what[:200])


async def stream_chat(http: httpx.AsyncClient, rng: random.Random, drop: bool) -> str | None:
    body = {"model": "default", "messages": QUESTION, "max_tokens": rng.randint(8, 48), "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as res:
        if res.status_code != 200:
            return f"chat {res.status_code}: {(await res.aread())[:200]!r}"
        seen = 0
        async for line in res.aiter_lines():
            seen += line.startswith("data:")
            if drop and seen >= 3:
                return None  # leaving the block closes the connection mid-stream
        return None if seen else "chat: no events"


async def stream_responses(http: httpx.AsyncClient, rng: random.Random, drop: bool) -> str | None:
    body = {"model": "default", "input": "Name three colours.", "max_output_tokens": rng.randint(8, 32)}
    async with http.stream("POST", "/v1/responses", json={**body, "stream": True, "store": False}) as res:
        if res.status_code != 200:
            return f"responses {res.status_code}: {(await res.aread())[:200]!r}"
        terminal = False
        async for line in res.aiter_lines():
            terminal |= '"response.completed"' in line or '"response.incomplete"' in line
            if drop and line.startswith("data:"):
                return None
        return None if terminal else "responses: no terminal event"


BAD_BODIES: list[tuple[str, bytes]] = [
    ("/v1/chat/completions", b'{"model": "default", "messages": ['),
    ("/v1/chat/completions", b'{"model": "default", "messages": "hi", "max_tokens": "many"}'),
    ("/v1/chat/completions", b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}'),
    ("/v1/responses", b'{"model": "default", "input": [{"type": "wat"}]}'),
]


async def bad_body(http: httpx.AsyncClient, rng: random.Random) -> str | None:
    path, raw = rng.choice(BAD_BODIES)
    res = await http.post(path, content=raw, headers={"content-type": "application/json"})
    if not 400 <= res.status_code < 500:
        return f"bad body answered {res.status_code}"
    error = res.json().get("error", {})
    return None if {"message", "type", "param", "code"} <= set(error) else f"no envelope: {res.text[:200]}"


async def client(
    url: str, seed: int, stop_at: float, windows: list[Window], start: float, step: float
) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while time.monotonic() < stop_at:
            kind = rng.random()
            began = time.monotonic()
            try:
                if kind < 0.4:
                    problem = await stream_chat(http, rng, drop=False)
                elif kind < 0.65:
                    problem = await stream_responses(http, rng, drop=False)
                elif kind < 0.85:
                    drop_chat = rng.random() < 0.5
                    problem = await (stream_chat if drop_chat else stream_responses)(http, rng, drop=True)
                else:
                    problem = await bad_body(http, rng)
            except httpx.HTTPError as e:
                problem = f"{type(e).__name__}: {e}"
            now = time.monotonic()
            window = windows[min(int((now - start) / step), len(windows) - 1)]
            window.done += 1
            if problem is not None:
                window.error(problem)
            elif kind < 0.65:
                window.latencies.append(now - began)


def resident_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(match[1]) / 1024 if match else float("nan")


def blocks_in_use(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = [
        float(m[1]) for m in re.finditer(r"^mistralrs_serve_kv_cache_blocks_used\{[^}]*\} (\S+)$", text, re.M)
    ]
    return sum(values)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


async def soak(url: str, pid: int | None, clients: int, duration: float, step: float) -> dict[str, Any]:
    start = time.monotonic()
    windows = [Window() for _ in range(max(1, int(duration // step)))]
    tasks = [
        asyncio.create_task(client(url, i, start + duration, windows, start, step)) for i in range(clients)
    ]
    memory: list[float] = []
    for i, window in enumerate(windows):
        await asyncio.sleep(max(0.0, start + (i + 1) * step - time.monotonic()))
        mb = resident_mb(pid) if pid is not None else float("nan")
        memory.append(mb)
        line = {
            "metric": "soak_window",
            "t_s": round((i + 1) * step),
            "requests": window.done,
            "errors": window.errors,
            "p50_ms": pct(window.latencies, 0.5),
            "p99_ms": pct(window.latencies, 0.99),
            "resident_mb": round(mb, 1),
        }
        if window.examples:
            line["error_examples"] = window.examples
        print(json.dumps(line), flush=True)
    await asyncio.gather(*tasks)
    return {"windows": windows, "memory": memory}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=None, help="a running server (default: start one)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--window", type=float, default=30.0, help="seconds per report line")
    parser.add_argument("--smoke", action="store_true", help="16 clients for 60 s (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.duration, args.window = 16, 60.0, 15.0
    proc = None
    url = args.url
    if url is None:
        engine_args = {"kv_cache_mb": 256, "max_num_seqs": 64, "max_num_batched_tokens": 1024}
        proc, url = start_server(args.model, engine_args)
    try:
        result = asyncio.run(soak(url, proc.pid if proc else None, args.clients, args.duration, args.window))
        time.sleep(2)  # aborts of dropped streams reach the engine thread
        windows, memory = result["windows"], result["memory"]
        blocks = blocks_in_use(url)
        errors = sum(w.errors for w in windows)
        growth = (memory[-1] - memory[0]) / memory[0] if len(memory) > 1 and memory[0] else 0.0
        latencies = [x for w in windows for x in w.latencies]
        summary = {
            "metric": "soak_summary",
            "clients": args.clients,
            "duration_s": args.duration,
            "requests": sum(w.done for w in windows),
            "errors": errors,
            "p50_ms": pct(latencies, 0.5),
            "p99_ms": pct(latencies, 0.99),
            "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else None,
            "kv_blocks_in_use_after": blocks,
            "memory_growth": round(growth, 4),
            "memory_growth_bar": MEMORY_GROWTH_BAR,
        }
        print(json.dumps(summary), flush=True)
        if errors or blocks or growth > MEMORY_GROWTH_BAR:
            raise SystemExit("soak: errors, KV blocks left in use, or memory growth over the bar")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
