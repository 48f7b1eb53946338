"""The session's server over the default model, and the official openai
client pointed at it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from live_server import LiveServer, start_server, stop_server
from mistralrs_serve.config import ServerConfig


@pytest.fixture(scope="session")
def live_server(default_runner: Any) -> Iterator[LiveServer]:
    """The server shares the session runner's engine (one model load per session)."""
    live = start_server(ServerConfig(max_body_bytes=1 << 20, keepalive_s=0.5), lambda: default_runner.client)
    yield live
    stop_server(live)


@pytest.fixture(scope="session")
def client(live_server: LiveServer) -> openai.OpenAI:
    return live_server.client()


@pytest.fixture(scope="session")
def modal_server(default_runner: Any) -> Iterator[LiveServer]:
    """The default chat model with the packaged embedder, voice and transcriber (what
    `--with-defaults` serves), and a second embedder name over MiniLM that declares
    Matryoshka sizes."""
    from mistralrs_serve.entrypoints.openai.model_set import build_serving
    from mistralrs_serve.models.model_specs import ModelSpec, with_defaults

    specs = with_defaults([])
    specs.append(
        ModelSpec(
            "embedding", "all-minilm-l6-v2", name="minilm-mrl", options={"matryoshka_dimensions": [128, 256]}
        )
    )
    models = [(s, lambda s=s: build_serving(s)) for s in specs]
    config = ServerConfig(max_body_bytes=4 << 20, max_audio_bytes=2 << 20, keepalive_s=0.5)
    live = start_server(config, lambda: default_runner.client, models)
    yield live
    stop_server(live)


@pytest.fixture(scope="session")
def modal_client(modal_server: LiveServer) -> openai.OpenAI:
    return modal_server.client()
