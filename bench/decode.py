"""Single-stream decode and prefill speed: mistralrs-serve vs transformers.

One run, one process, the same GGUF (the default model unless --model):

    .venv/bin/python bench/decode.py            # full: 512-token prefill, 128 decode tokens
    .venv/bin/python bench/decode.py --smoke    # seconds: the CI smoke run

Prints one JSON line per engine and metric, e.g.
{"engine": "mistralrs-serve", "metric": "decode_tok_s", "value": 65.2, ...}
and the decode ratio against transformers bf16. Achieved GB/s is the
weight bytes one decode step reads times tok/s; the roofline is those bytes
over the measured copy bandwidth of this machine.
"""

from __future__ import annotations

import argparse
import json
import os
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


def prompt_ids(vocab_size: int, n: int) -> list[int]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(100, vocab_size - 100, (n,), generator=gen).tolist()


def ours(path: Path, prompt: list[int], new_tokens: int) -> dict[str, float]:
    client = EngineLoop(lambda: LLMEngine(load_model(ModelSource("gguf", str(path)))))
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    client.generate(prompt[:32], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in client.stream(prompt, params)]
    client.shutdown()
    prefill_s = stamps[0] - start
    decode_s = stamps[-1] - stamps[0]
    return {
        "prefill_tok_s": len(prompt) / prefill_s,
        "decode_tok_s": (len(stamps) - 1) / decode_s,
        "weight_bytes": float(client.engine.decode_weight_bytes()),
    }


def transformers_engine(
    path: Path, dtype: torch.dtype, prompt: list[int], new_tokens: int
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(path, Path(tmp) / path.name)
        model = load_transformers_gguf(Path(tmp), path.name, dtype)
    ids = torch.tensor([prompt])
    kwargs = {"do_sample": False, "min_new_tokens": new_tokens, "max_new_tokens": new_tokens}
    with torch.inference_mode():
        model.generate(ids[:, :32], **{**kwargs, "min_new_tokens": 4, "max_new_tokens": 4})  # warm-up
        start = time.perf_counter()
        model(ids)
        prefill_s = time.perf_counter() - start
        # Decode after the same prompt as ours: generate's time less its prefill,
        # over the new_tokens - 1 decode steps (the first token comes from the prefill).
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        decode_s = time.perf_counter() - start - prefill_s
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "prefill_tok_s": len(prompt) / prefill_s,
        "decode_tok_s": (new_tokens - 1) / decode_s,
        "weight_bytes": float(weight_bytes),
    }


def load_transformers_gguf(model_dir: Path, filename: str, dtype: torch.dtype) -> Any:
    """transformers' model for a GGUF, dequantized at load into plain `dtype` weights."""
    from transformers import AutoModelForCausalLM, GgufConfig

    config = GgufConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(
        model_dir, gguf_file=filename, dtype=dtype, quantization_config=config
    ).eval()


def report(engine: str, r: dict[str, float], bandwidth: float) -> None:
    gb = r["weight_bytes"] / 1e9
    emit(engine, "prefill_tok_s", r["prefill_tok_s"])
    emit(
        engine,
        "decode_tok_s",
        r["decode_tok_s"],
        achieved_gb_s=round(r["decode_tok_s"] * gb, 2),
        roofline_tok_s=round(bandwidth / gb, 1),
        weight_gb_per_token=round(gb, 4),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="a GGUF file (default: the embedded default model)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, transformers bf16 only (CI)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else default_model_path()
    prompt_len, new_tokens = (64, 16) if args.smoke else (512, 128)
    prompt = prompt_ids(49152 if not args.model else 32000, prompt_len)
    # Ours first: torch work on this thread before it would slow the engine thread (see EngineLoop).
    results = {"mistralrs-serve": ours(path, prompt, new_tokens)}
    bandwidth = copy_bandwidth_gb_s()
    emit("machine", "copy_bandwidth_gb_s", bandwidth, threads=torch.get_num_threads())
    dtypes = (
        {"transformers-bf16": torch.bfloat16}
        if args.smoke
        else {"transformers-bf16": torch.bfloat16, "transformers-fp32": torch.float32}
    )
    for name, dtype in dtypes.items():
        results[name] = transformers_engine(path, dtype, prompt, new_tokens)
    for name, r in results.items():
        report(name, r, bandwidth)
    base = results["transformers-bf16"]
    for metric in ("decode_tok_s", "prefill_tok_s"):
        emit(
            "mistralrs-serve",
            f"{metric}_ratio_vs_transformers_bf16",
            results["mistralrs-serve"][metric] / base[metric],
        )


if __name__ == "__main__":
    main()
