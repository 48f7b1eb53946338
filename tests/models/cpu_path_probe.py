"""One run of the fused CPU forward on the path MISTRALRS_SERVE_CPU_PATH picks,
on the default model: greedy tokens for two prompts and the first step's logits,
printed as one JSON line. With `--against FILE` (another run's line) it also
checks that the two agree, and exits 1 saying how they do not; `--other-arch`
holds runs on two architectures, whose attention code differs too, to their
logits within looser bounds (the greedy tokens may part at near ties).

    MISTRALRS_SERVE_CPU_PATH=avx2 python tests/models/cpu_path_probe.py
    python tests/models/cpu_path_probe.py --against portable.json

tests/models/test_cpu_paths.py runs it once per path of this CPU; ci/aarch64.sh
runs it on the aarch64 wheel under qemu-user: its two NEON paths against each
other, and against this machine's portable run (`--other-arch`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

# The paths' integer sums are exact and their float operations the same ones in the same
# order (AVX2, NEON and the portable loops to the last bit; AVX-512 keeps Q8's offset term
# and was 7.6e-6 away on the first step's logits here), so on one machine they agree
# almost exactly. Between architectures the attention and exp code differ too, and the
# int8 activation codes amplify that through the 30 layers: aarch64's NEON against
# x86-64's portable loops were 0.73 apart at most, so the tokens may part at near ties.
TOL = 1e-3
MIN_CORRELATION = 0.9999
OTHER_ARCH_TOL = 1.5
OTHER_ARCH_MIN_CORRELATION = 0.998
PROMPTS = ("The capital of France is", "def fibonacci(n):\n    ")


def probe() -> dict[str, Any]:
    from mistralrs_serve import _native
    from mistralrs_serve.config import EngineConfig
    from mistralrs_serve.engine.llm_engine import LLMEngine
    from mistralrs_serve.models.loader import ModelSource, load_model
    from mistralrs_serve.sampling_params import SamplingParams

    engine = LLMEngine(load_model(ModelSource.parse("default")), EngineConfig(device="cpu"))
    assert type(engine.runner.path).__name__ == "FusedPath", engine.runner.path
    first: list[list[float]] = []
    execute = engine.runner.execute

    def capture(plan: Any, media: Any = None) -> Any:
        logits = execute(plan, media)
        if not first:
            first.append(logits[0].tolist())
        return logits

    engine.runner.execute = capture  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    tokens = [engine.generate(engine.tokenizer.encode(p), params)[0].token_ids for p in PROMPTS]
    return {"path": _native.QuantMatrix.kernel_path(), "tokens": tokens, "logits": first[0]}


def disagreements(got: dict[str, Any], ref: dict[str, Any], other_arch: bool = False) -> list[str]:
    """How two runs differ beyond what two correct paths may: [] when they agree. Runs on
    two architectures (`other_arch`) are held to their logits, within the looser bounds."""
    tol, min_corr = (OTHER_ARCH_TOL, OTHER_ARCH_MIN_CORRELATION) if other_arch else (TOL, MIN_CORRELATION)
    problems = []
    if not other_arch and got["tokens"] != ref["tokens"]:
        problems.append(f"greedy tokens differ: {got['tokens']} vs {ref['tokens']}")
    a, b = np.array(got["logits"]), np.array(ref["logits"])
    worst = float(np.abs(a - b).max())
    if worst > tol:
        problems.append(f"max |logit difference| {worst:.3g} > {tol}")
    corr = float(np.corrcoef(a, b)[0, 1])
    if corr < min_corr:
        problems.append(f"logit correlation {corr:.5f} < {min_corr}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", type=Path, help="another run's JSON line to agree with")
    parser.add_argument(
        "--other-arch", action="store_true", help="the other run is on another architecture: logits only"
    )
    args = parser.parse_args()
    got = probe()
    print(json.dumps(got), flush=True)
    if args.against is not None:
        ref = json.loads(args.against.read_text())
        problems = disagreements(got, ref, other_arch=args.other_arch)
        worst = float(np.abs(np.array(got["logits"]) - np.array(ref["logits"])).max())
        print(f"{got['path']} against {ref['path']}: max |logit difference| {worst:.3g}", file=sys.stderr)
        if problems:
            sys.exit(f"{got['path']} disagrees with {ref['path']}: " + "; ".join(problems))


if __name__ == "__main__":
    main()
