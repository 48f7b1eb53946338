"""llama.cpp (llama-cpp-python) on one benchmark task, in an interpreter of its
own: llama-cpp-python is a benchmark peer, never a dependency of this
project, so bench/peers.py runs this script in the peer's environment and it
imports nothing of ours.

    <python with llama_cpp> bench/llama_cpp_worker.py run TASK.json RESULT.json
    <python with llama_cpp> bench/llama_cpp_worker.py quantize SRC.gguf DST.gguf Q4_K_M THREADS

"run": TASK.json holds {"gguf", "threads", "n_ctx", "flash_attn", "prompts":
[[ids], ...], "new_tokens", "warm", "warm_new"}; it does what bench/models.py
has our engine do: the warm-up prompt prefilled and `warm_new` tokens made
greedily; each prompt prefilled from an empty cache (the best is reported,
logits of the last row only); then the first prompt prefilled again
(untimed) and `new_tokens` greedy tokens after it, timed from the first to
the last. RESULT.json gets prefill_tok_s, decode_tok_s and VmRSS/RssAnon/
RssFile (MB) after import, after load and after the run. llama.cpp's load
log (stderr) is left to the caller: it names the KV cache's size.

"quantize": llama.cpp's own quantizer (what `llama-quantize` runs) on an
F16/F32 GGUF.

llama_cpp is imported where it is used: bench/models.py takes `memory_mb` from here.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def memory_mb() -> dict[str, float]:
    """Resident memory of this process, in MB: all of it, anonymous and file-backed (mapped weights)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024 / 1e6  # kB
    return fields


def run(task: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp
    import numpy as np

    after_import = memory_mb()
    llm = llama_cpp.Llama(
        task["gguf"],
        n_ctx=task["n_ctx"],
        n_batch=max(len(p) for p in task["prompts"]),  # each prompt in one batch, as ours does
        n_threads=task["threads"],
        n_threads_batch=task["threads"],
        flash_attn=task["flash_attn"],
        verbose=True,  # the load log names the KV cache size
    )
    after_load = memory_mb()
    vocab = llm.n_vocab()

    def greedy() -> int:  # from the last evaluated row's logits, as ours samples
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(vocab,))))

    def generate(prompt: list[int], new_tokens: int) -> list[float]:
        """Prefill `prompt` on an empty cache, then greedy tokens; the time of each token."""
        llm.reset()  # the next eval drops every cached position
        llm.eval(prompt)
        token, stamps = greedy(), [time.perf_counter()]
        for _ in range(new_tokens - 1):
            llm.eval([token])
            token = greedy()
            stamps.append(time.perf_counter())
        return stamps

    generate(task["warm"], task["warm_new"])
    prefill_s = []
    for prompt in task["prompts"]:
        start = time.perf_counter()
        generate(prompt, 1)
        prefill_s.append(time.perf_counter() - start)
    stamps = generate(task["prompts"][0], task["new_tokens"])
    after_run = memory_mb()
    llm.close()
    return {
        "prefill_tok_s": len(task["prompts"][0]) / min(prefill_s),
        "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        "weight_bytes": float(Path(task["gguf"]).stat().st_size),
        "llama_cpp_version": llama_cpp.__version__,
        **{f"{key}_after_import_mb": v for key, v in after_import.items()},
        **{f"{key}_after_load_mb": v for key, v in after_load.items()},
        **{f"{key}_after_run_mb": v for key, v in after_run.items()},
    }


def quantize(src: str, dst: str, ftype: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if status != 0:
        raise SystemExit(f"llama_model_quantize({src} -> {dst}, {ftype}) failed: {status}")


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "run":
        task = json.loads(Path(args[0]).read_text())
        Path(args[1]).write_text(json.dumps(run(task)))
    elif mode == "quantize":
        quantize(args[0], args[1], args[2], int(args[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}: run or quantize")


if __name__ == "__main__":
    main()
