"""Offline throughput of the batching engine (nano-vllm style).

N requests with seeded random prompt lengths and output lengths, EOS
ignored, all submitted at once; then the same workload at fixed concurrency
levels (a new request enters as one finishes).

    .venv/bin/python bench/throughput.py                 # 64 requests, prompts 32-512, outputs 32-256
    .venv/bin/python bench/throughput.py --smoke         # seconds: CI
    .venv/bin/python bench/throughput.py --concurrency 1 8 32
    python bench/throughput.py --device cuda --model random:1b   # a GPU, a random Llama-3.2-1B shape

One JSON line per workload and metric. `decode_batch_1` is one request's
decode alone (first to last token), with the GB/s it achieves (weight bytes
per token times tok/s) next to the roofline: the measured copy bandwidth on
the CPU, HBM peak bandwidth on a known GPU (H100 SXM 3.35 TB/s).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from mistralrs_serve.config import EngineConfig
from mistralrs_serve.engine.forward_paths import GraphPath
from mistralrs_serve.engine.llm_engine import LLMEngine
from mistralrs_serve.models.loader import ModelSource, load_model
from mistralrs_serve.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import copy_bandwidth_gb_s
from random_model import save_random_llama

# HBM peak bandwidth by device name (bytes/s): the roofline of a bandwidth-bound decode.
GPU_PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


@dataclass(frozen=True)
class Job:
    prompt_ids: list[int]
    max_tokens: int


def workload(
    n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], vocab: int, seed: int
) -> list[Job]:
    rng = random.Random(seed)
    return [
        Job(
            [rng.randrange(100, vocab - 100) for _ in range(rng.randint(*prompt_range))],
            rng.randint(*output_range),
        )
        for _ in range(n)
    ]


def run(engine: LLMEngine, jobs: list[Job], concurrency: int) -> dict[str, float]:
    """Keep `concurrency` requests in flight until all jobs are done."""
    pending = deque(enumerate(jobs))
    generated = [0] * len(jobs)
    done: set[int] = set()

    def submit() -> None:
        i, job = pending.popleft()
        params = SamplingParams(max_tokens=job.max_tokens, temperature=0.0, ignore_eos=True)

        def on_output(out, i=i):  # type: ignore[no-untyped-def]
            generated[i] += 1
            if out.finish_reason is not None:
                done.add(i)

        engine.add_request(f"job-{i}", job.prompt_ids, params, on_output)

    start = time.perf_counter()
    while len(done) < len(jobs):
        while pending and len(engine.requests) < concurrency:
            submit()
        engine.step()
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(j.prompt_ids) for j in jobs)
    out_tokens = sum(generated)
    return {
        "output_tok_s": out_tokens / elapsed,
        "total_tok_s": (out_tokens + prompt_tokens) / elapsed,
        "elapsed_s": elapsed,
        "output_tokens": out_tokens,
        "prompt_tokens": prompt_tokens,
    }


def decode_batch_1(engine: LLMEngine, vocab: int, new_tokens: int) -> dict[str, float]:
    """One request alone: decode tok/s from its first token to its last."""
    prompt = workload(1, (128, 128), (1, 1), vocab, 7)[0].prompt_ids
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    stamps: list[float] = []
    engine.add_request("decode-b1", prompt, params, lambda out: stamps.append(time.perf_counter()))
    while engine.has_unfinished_requests():
        engine.step()
    tok_s = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    weight_bytes = float(engine.decode_weight_bytes())
    device = engine.runner.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((bw for key, bw in GPU_PEAK_BANDWIDTH.items() if key in name), None)
        roof_source = name
    else:
        peak, roof_source = copy_bandwidth_gb_s() * 1e9, "cpu copy bandwidth"
    out = {
        "decode_tok_s": tok_s,
        "achieved_gb_s": tok_s * weight_bytes / 1e9,
        "weight_gb": weight_bytes / 1e9,
    }
    if peak:
        out |= {"roofline_tok_s": peak / weight_bytes, "fraction_of_roofline": tok_s * weight_bytes / peak}
    return out | {"roofline_source": roof_source}  # type: ignore[dict-item]


def load(model: str | None, tmp: Path) -> ModelSource:
    """`random:SIZE` builds a random Llama (see random_model.py) in `tmp`."""
    if model and model.startswith("random:"):
        return ModelSource.parse(str(save_random_llama(tmp / model[7:], model[7:])))
    return ModelSource.parse(model)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=None,
        help="model reference (default: the embedded default), or random:1b / random:tiny",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu or cuda[:N]")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
    parser.add_argument("--kv-cache-mb", type=int, default=2048)
    parser.add_argument("--smoke", action="store_true", help="8 short requests, concurrency 8 only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(load(args.model, Path(tmp)))
    config = EngineConfig(
        kv_cache_mb=args.kv_cache_mb,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        device=args.device,
        cuda_graphs=False if args.enforce_eager else None,
    )
    engine = LLMEngine(loaded, config)
    vocab = loaded.config.vocab_size
    if args.smoke:
        cases = [("smoke", workload(8, (16, 64), (8, 16), vocab, args.seed), 8)]
    else:
        jobs = workload(args.num_requests, (32, 512), (32, 256), vocab, args.seed)
        cases = [("all_at_once", jobs, args.max_num_seqs)]
        # Fresh prompts per case: reusing them would measure the prefix cache, not batching.
        cases += [
            (f"concurrency_{c}", workload(max(c * 2, 8), (32, 512), (32, 256), vocab, args.seed + 1 + c), c)
            for c in args.concurrency
        ]
    run(engine, workload(2, (16, 32), (4, 4), vocab, 99), 2)  # warm-up
    b1 = decode_batch_1(engine, vocab, 16 if args.smoke else 256)
    print(
        json.dumps(
            {
                "engine": "mistralrs-serve",
                "workload": "decode_batch_1",
                "device": str(engine.runner.device),
                "cuda_graphs": isinstance(engine.runner.path, GraphPath),
            }
            | {k: round(v, 3) if isinstance(v, float) else v for k, v in b1.items()}
        ),
        flush=True,
    )
    for name, jobs, concurrency in cases:
        r = run(engine, jobs, concurrency)
        for metric in ("output_tok_s", "total_tok_s"):
            print(
                json.dumps(
                    {
                        "engine": "mistralrs-serve",
                        "workload": name,
                        "metric": metric,
                        "value": round(r[metric], 1),
                        "requests": len(jobs),
                        "concurrency": concurrency,
                        "threads": torch.get_num_threads(),
                    }
                ),
                flush=True,
            )
    print(
        json.dumps(
            {
                "engine": "mistralrs-serve",
                "metric": "prefix_cache_hit_tokens",
                "value": engine.scheduler.prefix_cache_hits,
                "preemptions": engine.scheduler.num_preemptions,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
