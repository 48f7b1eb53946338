"""A real server (uvicorn on a free loopback port) over a running engine, for e2e tests."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import uvicorn
from mistralrs_serve.config import ServerConfig
from mistralrs_serve.entrypoints.openai.api_server import build_app


@dataclass
class LiveServer:
    base_url: str  # http://127.0.0.1:PORT
    app: Any
    server: uvicorn.Server

    @property
    def engine(self) -> Any:
        """The engine itself, for tests that inject faults or wait for it to be idle."""
        return self.app.state.server.client.engine

    @property
    def info(self) -> Any:
        """What the server knows of the engine (EngineInfo)."""
        return self.app.state.server.client.info

    def client(self, api_key: str = "unused", **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, **kwargs)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60)

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Until the engine holds no request and no KV block (aborts are asynchronous)."""
        deadline = time.monotonic() + timeout_s
        engine = self.engine
        while time.monotonic() < deadline:
            if not engine.requests and engine.scheduler.num_used_blocks == 0:
                return
            time.sleep(0.02)
        raise AssertionError(
            f"engine not idle: {len(engine.requests)} requests, {engine.scheduler.num_used_blocks} blocks"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(config: ServerConfig, load: Any, models: Any = ()) -> LiveServer:
    """A server over `load`'s chat engine (None: no chat model) and `models`, (spec, loader)
    pairs of the others; healthy once every model has loaded."""
    app = build_app(config, load, models)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True).start()
    live = LiveServer(f"http://127.0.0.1:{port}", app, server)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{live.base_url}/health", timeout=2).status_code == 200:
                return live
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    server.should_exit = True
    raise RuntimeError("the test server did not become healthy in 60 s")


def stop_server(live: LiveServer) -> None:
    live.server.should_exit = True
