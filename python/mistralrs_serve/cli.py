"""The `mistralrs-serve` command.

mistralrs-serve run --prompt "What is the capital of France?"
mistralrs-serve run -m path/to/model.gguf          # interactive chat
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from mistralrs_serve.config import EngineConfig
from mistralrs_serve.errors import MistralrsServeError

logger = logging.getLogger("mistralrs_serve")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "-m",
        "--model",
        default=None,
        metavar="MODEL",
        help="a GGUF file, a directory in Hugging Face layout (config.json, *.safetensors, "
        "tokenizer.json), a Hugging Face repo id, or 'default' (SmolLM2-135M-Instruct, "
        "fetched once into ~/.cache/mistralrs-serve). Default: default",
    )
    g.add_argument(
        "-c",
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template file (or literal template) to use instead of the model's",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bf16", "f32", "f16"],
        help="compute dtype; auto = bf16 (4-bit GGUF weights stay 4-bit)",
    )
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    d = EngineConfig()
    g.add_argument("--kv-cache-mb", type=int, default=d.kv_cache_mb, help="KV cache memory budget in MiB")
    g.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV cache block")
    g.add_argument("--max-seqs", type=int, default=d.max_num_seqs, help="most sequences running at once")
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=d.max_num_batched_tokens,
        help="most tokens per step (bounds a prefill chunk)",
    )
    g.add_argument("--no-prefix-cache", action="store_true", help="turn off prefix caching")
    g.add_argument(
        "--max-seq-len", type=int, default=None, help="cap the context length (default: the model's)"
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        block_size=args.block_size,
        kv_cache_mb=args.kv_cache_mb,
        max_num_seqs=args.max_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=not args.no_prefix_cache,
        max_model_len=args.max_seq_len,
    )


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None, help="make sampling reproducible")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mistralrs-serve",
        description="An OpenAI-compatible LLM inference server and SDK. "
        "Start with: mistralrs-serve run --prompt 'Hello'",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="answer one prompt (--prompt) or chat interactively",
        description="Load a model and answer a prompt with its chat template.",
    )
    add_model_args(run)
    add_engine_args(run)
    add_sampling_args(run)
    run.add_argument(
        "--prompt", "-p", default=None, help="the user message; without it, read lines from stdin"
    )
    run.add_argument("--system", default=None, help="an optional system message")
    run.add_argument("--stats", action="store_true", help="print load time, tokens and tok/s to stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return run_command(args)
    except (MistralrsServeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # the CLI never ends on a bare traceback
        logger.debug("unexpected error", exc_info=True)
        print(
            f"internal error: {type(e).__name__}: {e} (run with --log-level debug for details)",
            file=sys.stderr,
        )
        return 2


def run_command(args: argparse.Namespace) -> int:
    from mistralrs_serve import Runner

    runner = Runner.from_model(
        args.model,
        chat_template=args.chat_template,
        dtype=args.dtype,
        num_threads=args.threads,
        engine_config=engine_config(args),
    )
    try:
        return _answer(runner, args)
    finally:
        runner.close()


def _answer(runner: Any, args: argparse.Namespace) -> int:
    from mistralrs_serve import ChatCompletionRequest, ChatCompletionResponse

    prompts = [args.prompt] if args.prompt is not None else _stdin_lines()
    for prompt in prompts:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": prompt})
        req = ChatCompletionRequest(
            messages=messages,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
        )
        start = time.perf_counter()
        res = runner.send_chat_completion_request(req)
        assert isinstance(res, ChatCompletionResponse)  # stream=False
        print(res.choices[0].message.content, flush=True)
        if args.stats:
            n = res.usage.completion_tokens
            elapsed = time.perf_counter() - start
            print(
                f"[{res.usage.prompt_tokens} prompt tokens, {n} generated in {elapsed:.2f} s, "
                f"{n / elapsed:.1f} tok/s; model loaded in {runner.loaded.load_time_s:.2f} s]",
                file=sys.stderr,
            )
    return 0


def _stdin_lines() -> list[str]:
    if sys.stdin.isatty():
        print("Type a message and press Enter (Ctrl-D to quit).", file=sys.stderr)
    return [line.rstrip("\n") for line in sys.stdin if line.strip()]


if __name__ == "__main__":
    sys.exit(main())
