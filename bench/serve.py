"""Serving benchmark over HTTP (like `vllm bench serve` with random prompts).

Starts `mistralrs-serve` in a subprocess (or uses --url), then for each
concurrency level keeps that many streaming /v1/completions requests in
flight (token-id prompts of seeded random lengths 32-512, outputs 32-256,
EOS ignored, greedy) and reports per level: TTFT, TPOT, ITL and end-to-end
latency percentiles, requests/s, output tok/s and errors. The offline engine
runs the same jobs at the bar's concurrency in this process first, so the
HTTP/offline ratio compares like with like.

    .venv/bin/python bench/serve.py                      # concurrency 1 8 32 64
    .venv/bin/python bench/serve.py --smoke              # seconds: CI
    .venv/bin/python bench/serve.py --url http://127.0.0.1:1234 --concurrency 8

One JSON line per level, then {"metric": "http_vs_offline_output_tok_s", ...}
with the bar (0.9: the server must not be the bottleneck).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import Job, workload

BAR = 0.9


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0


async def one_request(http: httpx.AsyncClient, job: Job) -> Result:
    body = {
        "model": "default",
        "prompt": job.prompt_ids,
        "max_tokens": job.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    res = Result()
    start = last = time.perf_counter()
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                res.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return res
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"]["message"]
                    return res
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", [])):
                    now = time.perf_counter()
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e = time.perf_counter() - start
    res.ok = res.output_tokens > 0
    return res


async def run_level(url: str, jobs: list[Job], concurrency: int) -> tuple[list[Result], float]:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def gated(job: Job) -> Result:
            async with gate:
                return await one_request(http, job)

        start = time.perf_counter()
        results = await asyncio.gather(*(gated(j) for j in jobs))
        return list(results), time.perf_counter() - start


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)

    def at(p: float) -> float:
        return round(values[min(len(values) - 1, int(p * len(values)))] * scale, 2)

    return {
        "mean": round(statistics.fmean(values) * scale, 2),
        "p50": at(0.5),
        "p90": at(0.9),
        "p99": at(0.99),
    }


def report(results: list[Result], elapsed: float, concurrency: int) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    errors = [r.error for r in results if not r.ok]
    return {
        "engine": "mistralrs-serve",
        "workload": f"http_concurrency_{concurrency}",
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "request_s": round(len(ok) / elapsed, 3),
        "output_tok_s": round(out_tokens / elapsed, 1),
        "ttft_ms": percentiles([r.ttft for r in ok]),
        "tpot_ms": percentiles(tpot),
        "itl_ms": percentiles([x for r in ok for x in r.itl]),
        "e2e_ms": percentiles([r.e2e for r in ok]),
    }


class Offline:
    """The engine in this process, no HTTP: the baseline for the same jobs."""

    def __init__(self, model: str | None, engine_args: dict[str, int]) -> None:
        from mistralrs_serve.config import EngineConfig
        from mistralrs_serve.engine.llm_engine import LLMEngine
        from mistralrs_serve.models.loader import ModelSource, load_model

        self.engine = LLMEngine(load_model(ModelSource.parse(model)), EngineConfig(**engine_args))
        self.run(workload(2, (16, 32), (4, 4), self.engine.model.config.vocab_size, 99), 2)  # warm-up

    def run(self, jobs: list[Job], concurrency: int) -> float:
        from throughput import run

        return float(run(self.engine, jobs, concurrency)["output_tok_s"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: str | None, engine_args: dict[str, int]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "mistralrs_serve.cli", "serve", "-p", str(port), "--log-level", "warning"]
    cmd += ["--kv-cache-mb", str(engine_args["kv_cache_mb"]), "--max-seqs", str(engine_args["max_num_seqs"])]
    cmd += ["--max-num-batched-tokens", str(engine_args["max_num_batched_tokens"])]
    cmd += ["--max-pending-requests", "1024"]
    if model:
        cmd += ["-m", model]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url)
    return proc, url


def wait_healthy(proc: subprocess.Popen[bytes], url: str) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become healthy in 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=None, help="a running server (default: start one)")
    parser.add_argument("--model", default=None, help="model reference (default: the embedded default)")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32, 64])
    parser.add_argument(
        "--bar-concurrency", type=int, default=32, help="level compared with the offline engine"
    )
    parser.add_argument("--requests-per-level", type=int, default=0, help="default: max(2 x concurrency, 8)")
    parser.add_argument("--smoke", action="store_true", help="short requests at concurrency 1 and 4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="offline/HTTP passes at the bar level")
    args = parser.parse_args()
    engine_args = {"kv_cache_mb": 2048, "max_num_seqs": 64, "max_num_batched_tokens": 1024}
    prompt_range, output_range = ((16, 64), (8, 16)) if args.smoke else ((32, 512), (32, 256))
    levels = [1, 4] if args.smoke else args.concurrency
    bar_level = 4 if args.smoke else args.bar_concurrency

    # the baseline takes turns with the server on fresh jobs, best of each: a
    # burst of load from elsewhere on this shared box then spoils one pass,
    # not one side (the load generator itself shares the cores with both)
    offline = Offline(args.model, engine_args) if bar_level in levels else None
    if offline is not None:
        vocab = offline.engine.model.config.vocab_size
    else:
        from mistralrs_serve.models.loader import ModelSource, load_model

        vocab = load_model(ModelSource.parse(args.model)).config.vocab_size

    def jobs_for(c: int, salt: int = 0) -> list[Job]:
        n = args.requests_per_level or max(2 * c, 8)
        return workload(n, prompt_range, output_range, vocab, args.seed + 1 + c + salt)

    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args.model, engine_args)
    try:
        asyncio.run(run_level(url, workload(2, (16, 32), (4, 4), vocab, 99), 2))  # warm-up
        by_level = {}
        for c in levels:
            results, elapsed = asyncio.run(run_level(url, jobs_for(c), c))
            row = report(results, elapsed, c)
            by_level[c] = row
            print(json.dumps(row), flush=True)
        if offline is not None:
            best_offline = best_http = 0.0
            for rep in range(args.repeats):
                jobs = jobs_for(bar_level, 1000 * (rep + 1))  # unseen by either engine's prefix cache
                best_offline = max(best_offline, offline.run(jobs, bar_level))
                results, elapsed = asyncio.run(run_level(url, jobs, bar_level))
                best_http = max(best_http, report(results, elapsed, bar_level)["output_tok_s"])
            ratio = best_http / best_offline
            row = {
                "engine": "mistralrs-serve",
                "metric": "http_vs_offline_output_tok_s",
                "concurrency": bar_level,
                "http_output_tok_s": best_http,
                "offline_output_tok_s": round(best_offline, 1),
                "value": round(ratio, 3),
                "bar": BAR,
                "meets_bar": ratio >= BAR,
                "passes": args.repeats,
            }
            print(json.dumps(row), flush=True)
        if any(row["errors"] for row in by_level.values()):
            raise SystemExit("some requests failed (see first_error)")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
