"""What a server-side tool call costs outside the model: the sandboxed Python
interpreter (a session's first call starts its process; later calls reuse
it), a shell command, each in bubblewrap and, as the baseline in the same
run, with --sandbox off. The ratio sandboxed/unsandboxed says what the
sandbox adds to a call.

    .venv/bin/python bench/agent_tools.py             # 20 calls of each
    .venv/bin/python bench/agent_tools.py --smoke     # seconds: CI

One JSON line per case ({"case", "sandbox", "calls", "ms": {"p50", "p90", "mean"}}),
then one per tool with "sandbox_over_off" (the ratio of the p50s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mistralrs_serve.agent.code_interpreter import CodeInterpreter
from mistralrs_serve.agent.sandbox import Sandbox
from mistralrs_serve.agent.shell import ShellExecutor
from mistralrs_serve.agent.tool import ToolContext
from mistralrs_serve.config import AgentConfig


@dataclass
class Session:
    id: str
    workdir: Path


def summary(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples_s)
    return {
        "p50": round(statistics.median(ms), 1),
        "p90": round(ms[min(len(ms) - 1, int(0.9 * len(ms)))], 1),
        "mean": round(statistics.fmean(ms), 1),
    }


async def timed(tool: Any, arguments: dict[str, Any], ctx: ToolContext) -> float:
    start = time.perf_counter()
    out = await tool.run(arguments, ctx)
    if out.is_error:
        raise RuntimeError(out.text[:300])
    return time.perf_counter() - start


async def measure(mode: str, calls: int, root: Path) -> dict[str, list[float]]:
    cfg = AgentConfig(enable_code_execution=True, enable_shell=True, sandbox=mode)
    sandbox = Sandbox.from_config(cfg)
    if mode == "on" and not sandbox.is_isolated:
        raise RuntimeError("bubblewrap does not work here")
    interpreter, shell = CodeInterpreter(cfg, sandbox), ShellExecutor(cfg, sandbox)
    python = interpreter.tools()[0]
    samples: dict[str, list[float]] = {"python_first_call": [], "python_next_call": [], "shell_command": []}
    try:
        for i in range(calls):
            workdir = root / f"{mode}-{i}"
            workdir.mkdir()
            ctx = ToolContext(Session(f"{mode}-{i}", workdir), asyncio.Event())
            samples["python_first_call"].append(await timed(python, {"code": "x = 1"}, ctx))
            samples["python_next_call"].append(await timed(python, {"code": "print(x + 1)"}, ctx))
            samples["shell_command"].append(await timed(shell.tools()[0], {"commands": ["echo hi"]}, ctx))
            await interpreter.close_session(ctx.session.id)
    finally:
        await interpreter.aclose()
    return samples


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="3 calls of each: a CI check that it runs")
    args = p.parse_args()
    calls = 3 if args.smoke else args.calls
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("off", "on"):
            results[mode] = asyncio.run(measure(mode, calls, Path(tmp)))
    for mode, samples in results.items():
        for case, values in samples.items():
            print(json.dumps({"case": case, "sandbox": mode, "calls": calls, "ms": summary(values)}))
    for case in results["on"]:
        ratio = statistics.median(results["on"][case]) / statistics.median(results["off"][case])
        print(json.dumps({"metric": "sandbox_over_off", "case": case, "value": round(ratio, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
