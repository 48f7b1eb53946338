"""Streamed Responses against streamed Chat Completions, on one server.

Starts `mistralrs-serve` in a subprocess (or uses --url) with a fresh
--data-dir, then at one concurrency sends the same chat prompts (seeded
random words, greedy, EOS ignored, a fixed number of output tokens each) to
`POST /v1/chat/completions` and to `POST /v1/responses` with `store: true`,
taking turns pass by pass on fresh prompts (so no prefix cache favours
either), best pass of each. The bar: Responses output tok/s at least 0.95 of
Chat Completions' (the store and the event stream must not be the bottleneck).

    .venv/bin/python bench/responses_api.py                  # concurrency 32
    .venv/bin/python bench/responses_api.py --smoke          # seconds: CI

One JSON line per case and pass, then
{"metric": "responses_vs_chat_output_tok_s", "value": ..., "bar": 0.95, ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import free_port, percentiles, wait_healthy

BAR = 0.95
WORDS = (
    "river",
    "stone",
    "light",
    "garden",
    "market",
    "window",
    "paper",
    "music",
    "orange",
    "winter",
    "signal",
    "forest",
    "letter",
    "engine",
    "bridge",
    "silver",
    "cloud",
    "number",
    "story",
    "harbor",
    "planet",
    "circle",
    "yellow",
    "morning",
    "basket",
    "candle",
    "mirror",
)


def prompts(n: int, words: tuple[int, int], seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        "Continue this list: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))
        for _ in range(n)
    ]


def chat_body(text: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": "default",
        "messages": [{"role": "user", "content": text}],
        "max_completion_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def responses_body(text: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": "default",
        "input": text,
        "max_output_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "store": True,
    }


def chat_tokens(event: dict[str, Any]) -> int | None:
    usage = event.get("usage")
    return int(usage["completion_tokens"]) if usage else None


def responses_tokens(event: dict[str, Any]) -> int | None:
    if event.get("type") in ("response.completed", "response.incomplete"):
        return int(event["response"]["usage"]["output_tokens"])
    if event.get("type") == "response.failed" or ("error" in event and "type" not in event):
        raise RuntimeError(json.dumps(event)[:300])
    return None


CASES: dict[str, tuple[str, Callable[[str, int], dict[str, Any]], Callable[[dict[str, Any]], int | None]]] = {
    "chat_completions_stream": ("/v1/chat/completions", chat_body, chat_tokens),
    "responses_stream_store": ("/v1/responses", responses_body, responses_tokens),
}


async def one(http: httpx.AsyncClient, case: str, text: str, max_tokens: int) -> tuple[int, float, str]:
    """(output tokens, time to the first event, error)."""
    path, body, tokens_of = CASES[case]
    start = time.perf_counter()
    first, tokens = 0.0, 0
    try:
        async with http.stream("POST", path, json=body(text, max_tokens)) as res:
            if res.status_code != 200:
                return 0, 0.0, f"HTTP {res.status_code}: {(await res.aread())[:200]!r}"
            async for line in res.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if first == 0.0:
                    first = time.perf_counter() - start
                found = tokens_of(json.loads(line[6:]))
                tokens = found if found is not None else tokens
    except (httpx.HTTPError, RuntimeError) as e:
        return 0, 0.0, f"{type(e).__name__}: {e}"
    return tokens, first, ""


async def run_pass(
    url: str, case: str, texts: list[str], max_tokens: int, concurrency: int
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as http:

        async def gated(text: str) -> tuple[int, float, str]:
            async with gate:
                return await one(http, case, text, max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(gated(t) for t in texts))
        elapsed = time.perf_counter() - start
    errors = [e for _, _, e in results if e]
    return {
        "engine": "mistralrs-serve",
        "case": case,
        "concurrency": concurrency,
        "requests": len(texts),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "output_tok_s": round(sum(t for t, _, _ in results) / elapsed, 1),
        # the first event: the chat role chunk, response.created (not a token)
        "first_event_ms": percentiles([t for _, t, e in results if not e]),
    }


def start_server(data_dir: str) -> tuple[Any, str]:
    import subprocess

    port = free_port()
    cmd = [sys.executable, "-m", "mistralrs_serve.cli", "serve", "-p", str(port), "--log-level", "warning"]
    cmd += ["--max-pending-requests", "1024", "--data-dir", data_dir]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url)
    return proc, url


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=None, help="a running server (default: start one)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=0, help="per pass (default: the concurrency)")
    parser.add_argument("--max-tokens", type=int, default=96, help="output tokens of each request")
    parser.add_argument("--passes", type=int, default=2, help="passes of each case, taking turns")
    parser.add_argument("--smoke", action="store_true", help="concurrency 4, short outputs: CI")
    args = parser.parse_args()
    concurrency = 4 if args.smoke else args.concurrency
    max_tokens = 8 if args.smoke else args.max_tokens
    n = 4 if args.smoke else args.requests or concurrency
    words = (8, 32) if args.smoke else (32, 384)
    proc, url = None, args.url
    with tempfile.TemporaryDirectory(prefix="bench-responses-") as data_dir:
        if url is None:
            proc, url = start_server(data_dir)
        try:
            for case in CASES:  # warm-up: compile, first store writes
                asyncio.run(run_pass(url, case, prompts(2, (4, 8), 99), 4, 2))
            best = dict.fromkeys(CASES, 0.0)
            for p in range(args.passes):
                for case in CASES:
                    texts = prompts(n, words, seed=1000 * (p + 1) + len(case))
                    row = asyncio.run(run_pass(url, case, texts, max_tokens, concurrency))
                    print(json.dumps({**row, "pass": p}), flush=True)
                    if row["errors"]:
                        raise SystemExit(f"{case}: {row['first_error']}")
                    best[case] = max(best[case], row["output_tok_s"])
            ratio = best["responses_stream_store"] / best["chat_completions_stream"]
            print(
                json.dumps(
                    {
                        "engine": "mistralrs-serve",
                        "metric": "responses_vs_chat_output_tok_s",
                        "concurrency": concurrency,
                        "responses_output_tok_s": best["responses_stream_store"],
                        "chat_output_tok_s": best["chat_completions_stream"],
                        "value": round(ratio, 3),
                        "bar": BAR,
                        "meets_bar": ratio >= BAR,
                        "passes": args.passes,
                    }
                ),
                flush=True,
            )
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)


if __name__ == "__main__":
    main()
