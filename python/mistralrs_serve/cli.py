"""The `mistralrs-serve` command: `serve` runs the HTTP server, `run` answers
prompts in process through the Runner.

mistralrs-serve                                     # serve the default model on 127.0.0.1:1234
mistralrs-serve serve -m path/to/model.gguf -p 8000 --api-key KEY
mistralrs-serve run --prompt "What is the capital of France?"
mistralrs-serve run -m path/to/model.gguf          # interactive chat
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from mistralrs_serve.cli_agent import add_agent_args, agent_config
from mistralrs_serve.config import EngineConfig, ServerConfig
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
    g.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda or cuda:N; auto (the default) is cuda when torch sees a GPU. On CUDA the "
        "model runs in --dtype with Triton kernels for paged attention and norms",
    )
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="log lines as text or as one JSON object per line",
    )


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
        "--enforce-eager", action="store_true", help="no CUDA graphs: run every decode step eagerly"
    )
    g.add_argument(
        "--no-native-forward",
        action="store_true",
        help="decode 4-bit models on the CPU with torch rather than the fused Rust step",
    )
    g.add_argument(
        "--prefix-cache-n",
        type=int,
        default=None,
        metavar="N",
        help="mistral.rs's flag: 0 turns prefix caching off, any other value leaves it on "
        "(blocks are cached as long as the KV cache has room)",
    )
    g.add_argument(
        "--max-seq-len", type=int, default=None, help="cap the context length (default: the model's)"
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        block_size=args.block_size,
        kv_cache_mb=args.kv_cache_mb,
        max_num_seqs=args.max_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=not args.no_prefix_cache and args.prefix_cache_n != 0,
        max_model_len=args.max_seq_len,
        device=args.device,
        cuda_graphs=False if args.enforce_eager else None,
        native_forward=not args.no_native_forward,
    )


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None, help="make sampling reproducible")


COMMANDS = ("serve", "run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mistralrs-serve",
        description="An OpenAI-compatible LLM inference server and SDK. Without a command it "
        "serves: `mistralrs-serve -m MODEL` is `mistralrs-serve serve -m MODEL`. Try "
        "`mistralrs-serve run --prompt 'Hello'` for one answer on the terminal.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="serve the OpenAI API over HTTP (the default command)",
        description="Load a model and serve the OpenAI API (/v1/chat/completions, /v1/completions, "
        "/v1/models) plus /health, /metrics, /tokenize and /detokenize. The socket opens at once; "
        "/health answers 200 when the model is loaded. Use the official openai client with "
        "base_url='http://HOST:PORT/v1'.",
    )
    add_model_args(serve)
    add_engine_args(serve)
    add_server_args(serve)
    add_agent_args(serve)
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


def add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("-p", "--port", type=int, default=1234, help="port (default 1234)")
    g.add_argument(
        "--api-key",
        default=os.environ.get("MISTRALRS_SERVE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize "
        "(default: $MISTRALRS_SERVE_API_KEY; unset = no key needed)",
    )
    g.add_argument(
        "--cors-allowed-origins",
        nargs="*",
        default=[],
        metavar="ORIGIN",
        help="origins allowed by CORS, e.g. http://localhost:3000 or '*' (default: none)",
    )
    g.add_argument("--disable-metrics", action="store_true", help="do not serve /metrics")
    g.add_argument("--served-model-name", default=None, help="the model id in responses and /v1/models")
    g.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed the server: requests without a seed get seeds drawn from it, so the same "
        "sequence of requests gets the same answers",
    )
    g.add_argument(
        "--max-pending-requests",
        type=int,
        default=ServerConfig.max_pending_requests,
        help="requests in progress at once; more are answered 503 with Retry-After",
    )
    g.add_argument(
        "--max-body-mb", type=int, default=ServerConfig.max_body_bytes >> 20, help="largest request body"
    )
    g = p.add_argument_group("storage (stored responses and files)")
    g.add_argument(
        "--data-dir",
        default=None,
        help="where stored responses and files live: a SQLite database and a blobs/ folder "
        "(default: $MISTRALRS_SERVE_DATA_DIR, else ~/.local/share/mistralrs-serve)",
    )
    g.add_argument(
        "--max-file-mb",
        type=int,
        default=ServerConfig.max_file_bytes >> 20,
        help="largest file upload or fetch",
    )
    g.add_argument(
        "--file-preview-chars",
        type=int,
        default=ServerConfig.file_preview_chars,
        help="characters of one text file the model sees (the rest is cut, and the cut marked)",
    )
    g.add_argument(
        "--request-file-chars",
        type=int,
        default=ServerConfig.request_file_chars,
        help="characters of all the files of one request together that the model sees",
    )
    g.add_argument(
        "--default-truncation",
        choices=["disabled", "auto"],
        default=ServerConfig.default_truncation,
        help="truncation of a Responses request that does not set it: auto drops the oldest items "
        "that do not fit the context (for clients like Codex that never set it); default disabled, as OpenAI",
    )
    g.add_argument(
        "--allow-private-file-urls",
        action="store_true",
        help="let file_url fetch loopback and private-network addresses (refused by default)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        if args.command == "serve":
            return serve_command(args)
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


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    from mistralrs_serve.entrypoints.openai.api_server import build_app
    from mistralrs_serve.models.loader import ModelSource
    from mistralrs_serve.runner import start_engine

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    source = ModelSource.parse(args.model, args.chat_template)
    config = ServerConfig(
        api_key=args.api_key or None,
        cors_allowed_origins=args.cors_allowed_origins,
        enable_metrics=not args.disable_metrics,
        max_body_bytes=args.max_body_mb << 20,
        max_pending_requests=args.max_pending_requests,
        served_model_name=args.served_model_name,
        seed=args.seed,
        data_dir=args.data_dir,
        max_file_bytes=args.max_file_mb << 20,
        file_preview_chars=args.file_preview_chars,
        request_file_chars=args.request_file_chars,
        allow_private_file_urls=args.allow_private_file_urls,
        default_truncation=args.default_truncation,
        agent=agent_config(args),
    )

    def load() -> Any:
        logger.info("loading %s", args.model or "the default model")
        start = time.perf_counter()
        client = start_engine(source, args.dtype, args.threads, engine_config(args))
        logger.info("model loaded in %.1f s", time.perf_counter() - start)
        return client

    app = build_app(config, load)
    logger.info("serving the OpenAI API on http://%s:%d/v1", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False, timeout_keep_alive=30)
    return 0


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
                f"{n / elapsed:.1f} tok/s; model loaded in {runner.info.load_time_s:.2f} s]",
                file=sys.stderr,
            )
    return 0


def _stdin_lines() -> list[str]:
    if sys.stdin.isatty():
        print("Type a message and press Enter (Ctrl-D to quit).", file=sys.stderr)
    return [line.rstrip("\n") for line in sys.stdin if line.strip()]


if __name__ == "__main__":
    sys.exit(main())
