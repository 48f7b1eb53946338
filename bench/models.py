"""The models people run, ours against llama.cpp on the same GGUF file: batch-1
decode (128 tokens after a 512-token prompt) and 512-token prefill, with the
memory roofline and the resident memory after load at equal context length.

    .venv/bin/python bench/models.py                    # every model, llama.cpp where installed
    .venv/bin/python bench/models.py --with-peers       # installs llama.cpp first if missing
    .venv/bin/python bench/models.py --models gemma     # some of: gemma, llama1b, default
    .venv/bin/python bench/models.py --smoke            # seconds, ours only, default model (CI)

Models: "gemma" is Gemma-3-270M Q4_K_M (the packaged `-m gemma-3-270m`);
"llama1b" random weights of Llama-3.2-1B's shape with Llama 3's tokenizer,
written as F16 with `gguf` and quantized to Q4_K_M by llama.cpp's own
quantizer (so it needs the peer; cached under ~/.cache/mistralrs-serve/bench);
"default" the default model (SmolLM2-135M Q4_1).

Each engine runs in a fresh process of its own, one after the other: ours
(`LLMEngine` on the path it picks for the model, as bench/decode.py times it)
and llama.cpp (bench/llama_cpp_worker.py in its own environment, see
bench/peers.py), on the same threads, the same warm-up prompt (not a timed
one), the same prompts (distinct, so no prefix-cache hit) and a KV cache for
the same number of tokens (--context). Prints one JSON line per engine and
metric: tok/s; for decode the achieved GB/s (weight bytes one decode step
reads x tok/s) and the roofline (those bytes over the measured copy
bandwidth, measured before each model's runs); resident memory after load
(and after import and after the run); and the ratios ours/llama.cpp. With
--repeat N the engines take turns N times and each keeps its best speed.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from decode import (
    PREFILL_RUNS,
    WARM_UP_NEW,
    WARM_UP_SEED,
    WARM_UP_TOKENS,
    copy_bandwidth_gb_s,
    emit,
    prompt_ids,
    time_ours,
)
from llama_cpp_worker import memory_mb
from peers import CACHE, llama_cpp_python, quantize_gguf, run_llama_cpp
from random_model import SIZES

REPO = Path(__file__).resolve().parents[1]
LLAMA3_VOCAB = REPO / "tests" / "data" / "tokenizers" / "ggml-vocab-llama-bpe.gguf"
MODELS = ("gemma", "llama1b", "default")
# Prompt ids are drawn below this, valid in every model's vocabulary (speed does not depend on which ids)
PROMPT_VOCAB = 32000
# Llama 3.2's rope scaling ("llama3"): factor, low and high frequency factors, original context
LLAMA3_ROPE = (32.0, 1.0, 4.0, 8192)


def model_path(name: str, peer: str | None, threads: int) -> Path | None:
    """The GGUF file of a bench model; None for llama1b when there is no llama.cpp to quantize it."""
    if name == "gemma":
        from mistralrs_serve.models.packaged import packaged_model_path

        return packaged_model_path("gemma-3-270m")
    if name == "default":
        from mistralrs_serve.models.default_model import default_model_path

        return default_model_path()
    target = CACHE / "random-llama-3.2-1b-shape-q4_k_m.gguf"
    if target.exists():
        return target
    if peer is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        f16 = Path(tmp) / "f16.gguf"
        write_random_llama_gguf(f16, SIZES["1b"], LLAMA3_VOCAB)
        quantize_gguf(peer, f16, target, "Q4_K_M", threads)
    return target


# --- the random Llama-3.2-1B-shaped GGUF -----------------------------------------


def llama3_rope_factors(head_dim: int, theta: float) -> np.ndarray:
    """Llama 3's rope scaling as GGUF stores it (rope_freqs.weight): a divisor per
    frequency, 1 for short wavelengths, `factor` for long ones, a blend between."""
    factor, low, high, original = LLAMA3_ROPE
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ratio = original * inv_freq / (2 * math.pi)  # original context over wavelength
    smooth = np.clip((ratio - low) / (high - low), 0.0, 1.0)
    return (1.0 / ((1.0 - smooth) / factor + smooth)).astype(np.float32)


def llama_tensors(shape: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...], type]]:
    """(GGUF name, numpy shape (rows, columns), dtype) of each tensor, in file order."""
    hidden, inter, heads, kv = (
        shape["hidden_size"],
        shape["intermediate_size"],
        shape["num_attention_heads"],
        shape["num_key_value_heads"],
    )
    head_dim = hidden // heads
    yield "token_embd.weight", (shape["vocab_size"], hidden), np.float16  # tied: also the LM head
    yield "rope_freqs.weight", (head_dim // 2,), np.float32
    for i in range(shape["num_hidden_layers"]):
        blk = f"blk.{i}"
        yield f"{blk}.attn_norm.weight", (hidden,), np.float32
        yield f"{blk}.attn_q.weight", (heads * head_dim, hidden), np.float16
        yield f"{blk}.attn_k.weight", (kv * head_dim, hidden), np.float16
        yield f"{blk}.attn_v.weight", (kv * head_dim, hidden), np.float16
        yield f"{blk}.attn_output.weight", (hidden, heads * head_dim), np.float16
        yield f"{blk}.ffn_norm.weight", (hidden,), np.float32
        yield f"{blk}.ffn_gate.weight", (inter, hidden), np.float16
        yield f"{blk}.ffn_up.weight", (inter, hidden), np.float16
        yield f"{blk}.ffn_down.weight", (hidden, inter), np.float16
    yield "output_norm.weight", (hidden,), np.float32


def write_random_llama_gguf(path: Path, shape: dict[str, Any], vocab_gguf: Path, seed: int = 0) -> None:
    """An F16 GGUF (F32 norms) of a Llama with random weights (std 0.02, norms 1) and
    the tokenizer of `vocab_gguf` (its tokenizer.* keys), written a tensor at a time."""
    import gguf

    hidden, heads = shape["hidden_size"], shape["num_attention_heads"]
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("random Llama-3.2-1B shape")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(131072)
    writer.add_embedding_length(hidden)
    writer.add_block_count(shape["num_hidden_layers"])
    writer.add_feed_forward_length(shape["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(shape["num_key_value_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(shape["rope_theta"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(shape["vocab_size"])
    reader = gguf.GGUFReader(str(vocab_gguf))
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    tensors = list(llama_tensors(shape))
    for name, dims, dtype in tensors:
        writer.add_tensor_info(name, dims, np.dtype(dtype), math.prod(dims) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, dims, dtype in tensors:
        if name == "rope_freqs.weight":
            data = llama3_rope_factors(head_dim, shape["rope_theta"])
        elif len(dims) == 1:
            data = np.ones(dims, dtype=np.float32)
        else:
            data = (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(dtype)
        writer.write_tensor_data(data)
    writer.close()


# --- ours, in a process of its own ------------------------------------------------


def ours_worker(task_file: Path, result_file: Path) -> None:
    """Our engine on one task (the same fields as llama_cpp_worker.py's), in this process
    alone, so that its resident memory is its own. Its KV cache holds `n_ctx` tokens."""
    from mistralrs_serve.config import EngineConfig
    from mistralrs_serve.engine.engine_loop import EngineLoop
    from mistralrs_serve.engine.kv_cache import KVLayout, PagedKVCache
    from mistralrs_serve.engine.llm_engine import LLMEngine
    from mistralrs_serve.models.loader import ModelSource, load_model

    task = json.loads(task_file.read_text())
    torch.set_num_threads(task["threads"])
    after_import = memory_mb()

    def build() -> LLMEngine:  # on the engine thread (EngineLoop says why)
        loaded = load_model(ModelSource("gguf", task["gguf"]))
        # whole MiB for n_ctx tokens: where the layers mix windows (Gemma), the KV groups'
        # blocks (the sliding layers keep their window and a chunk), as llama.cpp sizes its
        # sliding-window cache apart
        cfg, default = loaded.model.config, EngineConfig()
        layout = KVLayout.by_window(loaded.model.layer_windows())
        bs, chunk = default.block_size, default.max_num_batched_tokens
        blocks = layout.blocks_for(task["n_ctx"], bs, chunk)
        kv_bytes = blocks * PagedKVCache.bytes_per_block(cfg, bs, loaded.model.dtype, layout.cache_layers)
        kv_mb = -(-kv_bytes // (1 << 20))
        return LLMEngine(loaded, EngineConfig(kv_cache_mb=kv_mb, max_model_len=task["n_ctx"]))

    client = EngineLoop(build)
    after_load = memory_mb()
    engine = client.engine
    cache = engine.runner.cache
    facts = {
        "path": type(engine.runner.path).__name__,
        "kv_cache_tokens": engine.num_kv_tokens,
        "kv_cache_mb": round(cache.kv.numel() * cache.kv.element_size() / 1e6, 1),
        "kv_cache_dtype": str(cache.dtype).removeprefix("torch."),
    }
    timed = time_ours(client, task["prompts"], task["new_tokens"], task["warm"])
    after_run = memory_mb()
    result = {
        **timed,
        **facts,
        **{f"{key}_after_import_mb": v for key, v in after_import.items()},
        **{f"{key}_after_load_mb": v for key, v in after_load.items()},
        **{f"{key}_after_run_mb": v for key, v in after_run.items()},
    }
    result_file.write_text(json.dumps(result))


def run_ours(task: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        task_file, result_file = Path(tmp) / "task.json", Path(tmp) / "result.json"
        task_file.write_text(json.dumps(task))
        proc = subprocess.run(
            [sys.executable, __file__, "--ours-worker", str(task_file), str(result_file)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0 or not result_file.exists():
            raise RuntimeError(f"ours failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(result_file.read_text())
    return result


# --- the run -------------------------------------------------------------------


def report(model: str, engine: str, r: dict[str, Any], bandwidth: float, n_ctx: int) -> None:
    gb = r["weight_bytes"] / 1e9
    extra = {"path": r["path"]} if "path" in r else {}
    emit(engine, "prefill_tok_s", r["prefill_tok_s"], model=model, **extra)
    emit(
        engine,
        "decode_tok_s",
        r["decode_tok_s"],
        model=model,
        **extra,
        achieved_gb_s=round(r["decode_tok_s"] * gb, 2),
        roofline_tok_s=round(bandwidth / gb, 1),
        roofline_fraction=round(r["decode_tok_s"] * gb / bandwidth, 3),
        weight_gb_per_token=round(gb, 4),
    )
    details = ("kv_cache_tokens", "kv_cache_mb", "kv_cache_dtype", "kv_cache_log", "llama_cpp_version")
    emit(
        engine,
        "rss_after_load_mb",
        r["VmRSS_after_load_mb"],
        model=model,
        context=n_ctx,
        **{k: round(v, 1) for k, v in r.items() if "_after_" in k and k != "VmRSS_after_load_mb"},
        **{k: r[k] for k in details if k in r},
    )


def run_model(model: str, path: Path, args: argparse.Namespace, peer: str | None) -> None:
    prompt_len, new_tokens = (64, 16) if args.smoke else (512, 128)
    task = {
        "gguf": str(path),
        "threads": args.threads,
        "n_ctx": args.context,
        "flash_attn": args.llama_cpp_flash_attn == "on",
        "prompts": [prompt_ids(PROMPT_VOCAB, prompt_len, seed) for seed in range(PREFILL_RUNS)],
        "new_tokens": new_tokens,
        "warm": prompt_ids(PROMPT_VOCAB, WARM_UP_TOKENS, WARM_UP_SEED),
        "warm_new": WARM_UP_NEW,
    }
    # Engines take turns, each run in a fresh process; each engine's best run (and the
    # best bandwidth) is kept: on a shared machine a busy neighbour only ever slows a run.
    runs: dict[str, list[dict[str, Any]]] = {"mistralrs-serve": []}
    bandwidths = []
    for _ in range(args.repeat):
        bandwidths.append(copy_bandwidth_gb_s())
        runs["mistralrs-serve"].append(run_ours(task))
        if peer is not None and not args.smoke:
            runs.setdefault("llama.cpp", []).append(run_llama_cpp(peer, task))
    bandwidth = max(bandwidths)
    emit("machine", "copy_bandwidth_gb_s", bandwidth, model=model, threads=args.threads, runs=args.repeat)
    results = {engine: best_of(rs) for engine, rs in runs.items()}
    for engine, r in results.items():
        report(model, engine, r, bandwidth, args.context)
    if "llama.cpp" in results:
        for metric in ("decode_tok_s", "prefill_tok_s", "VmRSS_after_load_mb"):
            ratio = results["mistralrs-serve"][metric] / results["llama.cpp"][metric]
            name = "rss_after_load" if metric.startswith("VmRSS") else metric
            emit("mistralrs-serve", f"{name}_ratio_vs_llama.cpp", ratio, model=model)


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first run's facts and memory, with the best speed of all runs."""
    best = dict(runs[0])
    for metric in ("prefill_tok_s", "decode_tok_s"):
        best[metric] = max(r[metric] for r in runs)
    return best


def main() -> None:
    if sys.argv[1:2] == ["--ours-worker"]:
        ours_worker(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(MODELS), help=f"some of {', '.join(MODELS)}")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, ours only, default model (CI)")
    parser.add_argument("--with-peers", action="store_true", help="install llama.cpp first if missing")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=1, help="runs per engine, the best kept")
    parser.add_argument("--context", type=int, default=None, help="KV cache tokens, both engines (4096)")
    parser.add_argument(
        "--llama-cpp-flash-attn",
        choices=("on", "off"),
        default="on",
        help="llama.cpp's flash attention: on is what its own default (auto) picks on a CPU",
    )
    args = parser.parse_args()
    args.context = args.context or (256 if args.smoke else 4096)
    models = ["default"] if args.smoke else args.models.split(",")
    unknown = set(models) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}: pick from {', '.join(MODELS)}")
    torch.set_num_threads(args.threads)
    peer = None if args.smoke else llama_cpp_python(install=args.with_peers)
    if peer is None and not args.smoke:
        emit("llama.cpp", "skipped", 0, reason="no LLAMA_CPP_PYTHON nor peer environment: --with-peers")
    for model in models:
        path = model_path(model, peer, args.threads)
        if path is None:
            emit("mistralrs-serve", "skipped", 0, model=model, reason="quantizing it needs llama.cpp")
            continue
        run_model(model, path, args, peer)


if __name__ == "__main__":
    main()
