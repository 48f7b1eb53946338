"""Decode speed with and without a JSON-schema constraint, at batch 1 and 16.

One process, one engine, the default model (or --model):

    .venv/bin/python bench/structured.py            # full: 128 tokens per request
    .venv/bin/python bench/structured.py --smoke    # seconds: the CI smoke run

The constrained requests follow a schema that cannot end within the token
budget (an array of at least 100 objects), so both runs decode the same
number of tokens. Prints one JSON line per run: output tok/s, the mask fill
time per step (the llguidance matchers of the whole batch, in Rust), and the
constrained / unconstrained ratio per batch size. The issue's bar: >= 0.85 at
batch 16. `--serial-masks` adds a run that fills the masks after the model
step instead of while it runs, to show what the overlap buys.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import Future
from typing import Any

import numpy as np
from mistralrs_serve.engine.llm_engine import LLMEngine
from mistralrs_serve.models.loader import ModelSource, load_model
from mistralrs_serve.sampling_params import Grammar, SamplingParams

SCHEMA = {
    "type": "array",
    "minItems": 100,
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0},
            "name": {"type": "string", "maxLength": 12},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
            "ok": {"type": "boolean"},
        },
        "required": ["id", "name", "tags", "ok"],
        "additionalProperties": False,
    },
}


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


class MaskTimer:
    """Wraps GrammarCompiler.bitmask: seconds spent filling masks and calls made."""

    def __init__(self, engine: LLMEngine) -> None:
        self.inner = engine.grammars.bitmask
        self.seconds = 0.0
        self.calls = 0
        engine.grammars.bitmask = self  # type: ignore[method-assign]

    def __call__(self, matchers: list[Any]) -> tuple[np.ndarray, list[str | None]]:
        start = time.perf_counter()
        try:
            return self.inner(matchers)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def serial_masks(engine: LLMEngine) -> None:
    """Fill masks on the engine thread before the model runs (no overlap)."""

    def start(seqs: list[Any]) -> Future[Any] | None:
        matchers = [s.matcher for s in seqs if s.matcher is not None]
        if not matchers:
            return None
        done: Future[Any] = Future()
        done.set_result(engine.grammars.bitmask(matchers))
        return done

    engine._start_masks = start  # type: ignore[method-assign]


def run(engine: LLMEngine, prompt: list[int], batch: int, tokens: int, grammar: Grammar | None) -> float:
    """Output tok/s of `batch` concurrent requests of `tokens` tokens each."""
    params = SamplingParams(max_tokens=tokens, temperature=0.8, seed=0, ignore_eos=True, grammar=grammar)
    counts = [0] * batch
    for i in range(batch):

        def on_output(out: Any, i: int = i) -> None:
            counts[i] += 1

        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", prompt, params, on_output)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    elapsed = time.perf_counter() - start
    assert all(c == tokens for c in counts), counts
    return batch * tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--serial-masks", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="a few tokens, batch 1 and 4")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.batches = 8, "1,4"
    engine = LLMEngine(load_model(ModelSource.parse(args.model)))
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "List the inventory as JSON."}])
    grammar = Grammar("json_schema", json.dumps(SCHEMA))
    timer = MaskTimer(engine)
    run(engine, prompt, 1, 4, grammar)  # warm-up: builds the vocabulary and compiles the schema
    modes = [("overlapped", None)] + ([("serial", serial_masks)] if args.serial_masks else [])
    for batch in (int(b) for b in args.batches.split(",")):
        free = run(engine, prompt, batch, args.tokens, None)
        emit(metric="decode_tok_s", constrained=False, batch=batch, value=round(free, 1))
        for mode, setup in modes:
            if setup is not None:
                setup(engine)
            timer.seconds, timer.calls = 0.0, 0
            constrained = run(engine, prompt, batch, args.tokens, grammar)
            emit(
                metric="decode_tok_s",
                constrained=True,
                masks=mode,
                batch=batch,
                value=round(constrained, 1),
                mask_ms_per_step=round(1e3 * timer.seconds / max(timer.calls, 1), 3),
                ratio_vs_unconstrained=round(constrained / free, 3),
                bar=0.85 if batch >= 16 else None,
            )


if __name__ == "__main__":
    main()
