"""Every path of the fused CPU forward this CPU can run (MISTRALRS_SERVE_CPU_PATH:
avx512, avx2, neon-dotprod, neon, portable: the fused forward on its plain Rust
loops) against the portable one, on the default model: the agreement
`cpu_path_probe.disagreements` checks (the same greedy tokens on two prompts,
the first step's logits close). The native library picks its path once per
process, so each path runs in a process of its own (`cpu_path_probe.py`, which
ci/aarch64.sh also runs on the aarch64 wheel under qemu-user); a path this CPU
lacks is skipped, saying so."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cpu_path_probe import disagreements

PROBE = Path(__file__).with_name("cpu_path_probe.py")


@cache
def run_path(name: str) -> dict[str, Any]:
    env = {**os.environ, "MISTRALRS_SERVE_CPU_PATH": name}
    out = subprocess.run([sys.executable, str(PROBE)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("name", ["avx512", "avx2", "neon-dotprod", "neon"])
def test_each_path_agrees_with_portable(name: str) -> None:
    from mistralrs_serve import _native

    if name not in _native.QuantMatrix.supported_paths():
        pytest.skip(f"this CPU does not run the {name} path ({_native.QuantMatrix.supported_paths()})")
    got = run_path(name)
    assert got["path"] == name
    portable = run_path("portable")
    assert portable["path"] == "portable"
    assert disagreements(got, portable) == []


def test_a_path_of_the_other_architecture_caps_nothing() -> None:
    """MISTRALRS_SERVE_CPU_PATH naming the other architecture's path is ignored, as an
    unknown name is: the fastest path runs (not the portable loops, nor torch)."""
    other = "avx2" if platform.machine() in ("aarch64", "arm64") else "neon"
    code = (
        "from mistralrs_serve import _native as n; "
        "print(n.QuantMatrix.kernel_path(), n.QuantMatrix.supported_paths()[0])"
    )
    env = {**os.environ, "MISTRALRS_SERVE_CPU_PATH": other}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    chosen, best = out.stdout.split()
    assert chosen == best
