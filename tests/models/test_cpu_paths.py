"""Every path of the fused CPU forward this CPU can run (MISTRALRS_SERVE_CPU_PATH:
avx512, avx2, portable: the fused forward on its plain Rust loops) against the
portable one, on the default model: the same greedy tokens on two prompts, and
the first step's logits within TOL and correlated above MIN_CORRELATION. The native
library picks its path once per process, so each path runs in a process of its
own (the script below); a path this CPU lacks is skipped, saying so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache
from typing import Any

import numpy as np
import pytest

# The paths quantize activations to int8 with their own rounding of ties and sum in
# other orders, so codes differ here and there and the differences grow through the
# 30 layers: each path is as far from the fp32 torch forward as the other (mean
# |diff| 0.16 and 0.17 on the first prompt here), and 0.2 apart on average, 0.98 at most.
TOL = 1.5
MIN_CORRELATION = 0.998

SCRIPT = r"""
import json, sys
import torch
from mistralrs_serve import _native
from mistralrs_serve.config import EngineConfig
from mistralrs_serve.engine.llm_engine import LLMEngine
from mistralrs_serve.models.loader import ModelSource, load_model
from mistralrs_serve.sampling_params import SamplingParams

engine = LLMEngine(load_model(ModelSource.parse("default")), EngineConfig(device="cpu"))
assert type(engine.runner.path).__name__ == "FusedPath", engine.runner.path
first = []
execute = engine.runner.execute
def capture(plan, media=None):
    logits = execute(plan, media)
    if not first:
        first.append(logits[0].tolist())
    return logits
engine.runner.execute = capture
params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
prompts = [
    engine.tokenizer.encode("The capital of France is"),
    engine.tokenizer.encode("def fibonacci(n):\n    "),
]
tokens = [engine.generate(p, params)[0].token_ids for p in prompts]
print(json.dumps({"path": _native.QuantMatrix.kernel_path(), "tokens": tokens, "logits": first[0]}))
"""


@cache
def run_path(name: str) -> dict[str, Any]:
    env = {**os.environ, "MISTRALRS_SERVE_CPU_PATH": name}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("name", ["avx512", "avx2"])
def test_each_path_agrees_with_portable(name: str) -> None:
    got = run_path(name)
    if got["path"] != name:
        pytest.skip(f"this CPU does not run the {name} path (it falls back to {got['path']})")
    portable = run_path("portable")
    assert portable["path"] == "portable"
    assert got["tokens"] == portable["tokens"]
    a, b = np.array(got["logits"]), np.array(portable["logits"])
    worst = float(np.abs(a - b).max())
    assert worst <= TOL, f"{name}: max |logit - portable| = {worst:.3g}"
    assert np.corrcoef(a, b)[0, 1] >= MIN_CORRELATION
