"""The `mistralrs-serve` command: `serve` runs the HTTP server, `run` answers
prompts in process through the Runner.

mistralrs-serve                                     # serve the default model on 127.0.0.1:1234
mistralrs-serve serve -m path/to/model.gguf -p 8000 --api-key KEY
mistralrs-serve run --prompt "What is the capital of France?"
mistralrs-serve run -m path/to/model.gguf          # interactive chat
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
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
        action="append",
        default=None,
        metavar="MODEL",
        help="a GGUF file, a directory in Hugging Face layout (config.json, *.safetensors, "
        "tokenizer.json), a Hugging Face repo id, or 'default' (SmolLM2-135M-Instruct, "
        "fetched once into ~/.cache/mistralrs-serve). Default: default. `serve` takes it "
        "more than once, each [KIND:]SOURCE with KIND chat, embedding, speech or transcription "
        "(guessed from the source when left out: a sentence-transformers directory is an "
        "embedder, a Piper .onnx voice speech, a CTranslate2 Whisper directory transcription; "
        "packaged names: all-minilm-l6-v2, en_US-joe-medium, whisper-tiny.en, whisper-base)",
    )
    g.add_argument(
        "-c",
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template file (or literal template) to use instead of the model's",
    )
    g.add_argument(
        "--mmproj",
        default=None,
        metavar="FILE",
        help="llama.cpp's multimodal projector GGUF for a GGUF chat model (Gemma 3, Qwen2.5-VL): "
        "it then takes image parts; found by itself as mmproj*.gguf beside the model in a directory",
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


COMMANDS = ("serve", "run", "ray")


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
    ray = sub.add_parser(
        "ray",
        help="serve the same API from many engine replicas on a Ray cluster (Ray Serve)",
        description="Deploy the server as a Ray Serve application: an ingress that routes each "
        "request by prefix affinity (falling back to the least-loaded replica) to N engine "
        "replicas, each running what `serve` runs. Replicas share their state through --store "
        "postgresql://... and --blob-store. /health and /metrics at the ingress report every replica.",
    )
    add_model_args(ray)
    add_engine_args(ray)
    add_server_args(ray)
    add_agent_args(ray)
    from mistralrs_serve.scale.options import add_ray_args

    add_ray_args(ray)
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
    g.add_argument(
        "--models-config",
        default=None,
        metavar="FILE",
        help="a TOML file of [[models]] (kind, source, name, default, options) to serve with "
        "any -m models; see models/model_specs.py",
    )
    g.add_argument(
        "--with-defaults",
        action="store_true",
        help="also serve the packaged default embedder (all-MiniLM-L6-v2), voice (Piper "
        "en_US-joe-medium) and transcriber (Whisper tiny.en) for the kinds not given",
    )
    g.add_argument(
        "--max-audio-mb",
        type=int,
        default=ServerConfig.max_audio_bytes >> 20,
        help="largest audio upload to /v1/audio/transcriptions and translations",
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
    g.add_argument("--no-ui", action="store_true", help="leave out the chat page at GET /ui")
    g.add_argument(
        "--body-timeout-s",
        type=float,
        default=ServerConfig.body_timeout_s,
        help="a request body must arrive within this many seconds (else a 408)",
    )
    add_storage_args(p)


def add_storage_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("storage (stored responses and files)")
    g.add_argument(
        "--data-dir",
        default=None,
        help="where stored responses and files live: a SQLite database and a blobs/ folder "
        "(default: $MISTRALRS_SERVE_DATA_DIR, else ~/.local/share/mistralrs-serve)",
    )
    g.add_argument(
        "--store",
        default=os.environ.get("MISTRALRS_SERVE_STORE") or None,
        help="where stored responses, files' metadata, sessions and skills live: 'sqlite' (the "
        "default, in --data-dir) or a postgresql:// URL shared by every replica "
        "(default: $MISTRALRS_SERVE_STORE)",
    )
    g.add_argument(
        "--blob-store",
        default=os.environ.get("MISTRALRS_SERVE_BLOB_STORE") or None,
        help="where stored files' bytes live: a directory (shared by replicas over a network "
        "file system) or s3://bucket/prefix[?endpoint=URL] (default: --data-dir/blobs)",
    )
    g.add_argument(
        "--replica-lease-s",
        type=float,
        default=ServerConfig.replica_lease_s,
        help="with a shared --store: a replica whose heartbeat is this old is dead, and the "
        "background responses it ran are marked failed by the others",
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
        if args.command == "ray":
            from mistralrs_serve.scale.app import ray_command

            return ray_command(args)
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

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    app = server_app(args)
    logger.info("serving the OpenAI API on http://%s:%d/v1", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False, timeout_keep_alive=30)
    return 0


def server_app(args: argparse.Namespace) -> Any:
    """The FastAPI app `serve` runs, from its parsed arguments (Ray replicas run the same one)."""
    from mistralrs_serve.entrypoints.openai.api_server import build_app
    from mistralrs_serve.entrypoints.openai.model_set import build_serving

    specs = model_specs(args)
    config = ServerConfig(
        api_key=args.api_key or None,
        cors_allowed_origins=args.cors_allowed_origins,
        enable_metrics=not args.disable_metrics,
        max_body_bytes=args.max_body_mb << 20,
        body_timeout_s=args.body_timeout_s,
        ui=not args.no_ui,
        max_pending_requests=args.max_pending_requests,
        served_model_name=args.served_model_name,
        seed=args.seed,
        data_dir=args.data_dir,
        store=args.store,
        blob_store=args.blob_store,
        replica_lease_s=args.replica_lease_s,
        max_file_bytes=args.max_file_mb << 20,
        max_audio_bytes=args.max_audio_mb << 20,
        file_preview_chars=args.file_preview_chars,
        request_file_chars=args.request_file_chars,
        allow_private_file_urls=args.allow_private_file_urls,
        default_truncation=args.default_truncation,
        agent=agent_config(args),
    )

    chats = [s for s in specs if s.kind == "chat"]
    primary = next((s for s in chats if s.default), chats[0]) if chats else None
    others = [(s, chat_loader(s, args) if s.kind == "chat" else partial(build_serving, s)) for s in specs]
    load = chat_loader(primary, args) if primary is not None else None
    return build_app(config, load, [o for o in others if o[0] is not primary], primary=primary)


def model_specs(args: argparse.Namespace) -> list[Any]:
    """The models `serve` serves: -m flags, then --models-config's, then --with-defaults;
    nothing given is the default chat model."""
    from mistralrs_serve.models.model_specs import (
        ModelSpec,
        check_names,
        load_models_config,
        parse_model_arg,
        with_defaults,
    )

    specs = [parse_model_arg(m) for m in args.model or []]
    if args.models_config:
        specs += load_models_config(args.models_config)
    if not specs or (args.with_defaults and not any(s.kind == "chat" for s in specs) and not args.model):
        specs.insert(0, ModelSpec("chat", "default"))
    if args.with_defaults:
        specs = with_defaults(specs)
    if getattr(args, "mmproj", None):  # the projector of the first chat model
        i = next(i for i, s in enumerate(specs) if s.kind == "chat")
        specs[i] = dataclasses.replace(specs[i], options={**specs[i].options, "mmproj": args.mmproj})
    check_names(specs)
    return specs


def chat_loader(spec: Any, args: argparse.Namespace) -> Callable[[], Any]:
    """Loads a chat model's engine: the CLI's settings, with the spec's options over them."""
    from mistralrs_serve.models.loader import ModelSource
    from mistralrs_serve.runner import start_engine

    opts: dict[str, Any] = dict(spec.options)
    source = ModelSource.parse(
        spec.source, opts.pop("chat_template", None) or args.chat_template, opts.pop("mmproj", None)
    )
    dtype = opts.pop("dtype", args.dtype)
    config = engine_config(args)
    if "prefix_cache" in opts:
        opts["enable_prefix_caching"] = opts.pop("prefix_cache")
    renames = {"max_seqs": "max_num_seqs", "max_seq_len": "max_model_len"}
    config = dataclasses.replace(config, **{renames.get(k, k): v for k, v in opts.items()})

    def load() -> Any:
        logger.info("loading %s", spec.source)
        start = time.perf_counter()
        client = start_engine(source, dtype, args.threads, config)
        logger.info("model %s loaded in %.1f s", spec.source, time.perf_counter() - start)
        return client

    return load


def run_command(args: argparse.Namespace) -> int:
    from mistralrs_serve import Runner

    if args.model and len(args.model) > 1:
        raise ValueError("run answers with one model: give -m once")
    runner = Runner.from_model(
        args.model[0] if args.model else None,
        chat_template=args.chat_template,
        dtype=args.dtype,
        num_threads=args.threads,
        engine_config=engine_config(args),
        mmproj=args.mmproj,
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
