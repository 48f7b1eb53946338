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
