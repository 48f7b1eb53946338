"""Servers for the agent loop's end-to-end tests: the real HTTP server over
the scripted model (scripted_model.py), with the agentic runtime turned on
and its web pointed at a fake one on loopback (fake_web.py).

What is scripted is only the model's choice of tokens: which tool it calls
with which arguments, and what it answers. Tokenization, the chat template,
constrained decoding, call parsing, the engine, HTTP, the tools, the sandbox
and the store all run for real.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from mistralrs_serve.config import AgentConfig, ServerConfig

from agent.scripted_model import Script, ScriptedLM, scripted_engine

sys.path.insert(0, str(Path(__file__).parent.parent / "e2e"))
from live_server import LiveServer, start_server, stop_server

KETTLE = """<html><head><title>Kettles</title></head><body><nav>Home | Shop</nav>
<article><h1>How kettles work</h1><p>A kettle boils water with a heating element under its base.
The element warms the water until it reaches one hundred degrees and a switch turns it off.</p>
</article><footer>Copyright</footer></body></html>"""
CODE_TOOL = {"type": "code_interpreter", "container": {"type": "auto"}}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


TOOLS_MARKER = "You can call these functions"  # the system prompt's tool list (SmolLM2 has no tool template)


def call(name: str, **arguments: Any) -> str:
    """A tool call as the default model's family writes one (the plain JSON format)."""
    return json.dumps({"name": name, "arguments": arguments})


def offered(prompt: str) -> list[str]:
    """The names of the tools a rendered prompt offers the model."""
    if TOOLS_MARKER not in prompt:
        return []
    system = prompt[: prompt.find("<|im_end|>", prompt.find(TOOLS_MARKER))]
    names = []
    for line in system.splitlines():
        if line.startswith("{"):
            try:
                names.append(json.loads(line)["name"])
            except (ValueError, KeyError):
                continue
    return names


@dataclass
class AgentServer:
    live: LiveServer
    model: ScriptedLM
    data_dir: Path

    def use(self, script: Script) -> None:
        self.model.set_script(script)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.live.base_url, timeout=120)

    def chat(self, **body: Any) -> httpx.Response:
        body.setdefault("model", "default")
        with self.http() as h:
            return h.post("/v1/chat/completions", json=body)

    def chat_stream(self, **body: Any) -> list[dict[str, Any]]:
        """The streamed chunks (parsed), [DONE] excluded."""
        body.setdefault("model", "default")
        chunks = []
        with self.http() as h, h.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        return chunks

    @property
    def runtime(self) -> Any:
        return self.live.app.state.server.agent

    def stop(self) -> None:
        stop_server(self.live)


def agent_server(
    data_dir: Path, script: Script, max_model_len: int | None = None, **agent: Any
) -> AgentServer:
    engine, model = scripted_engine(script, max_model_len)
    config = ServerConfig(data_dir=str(data_dir), keepalive_s=0.5, agent=AgentConfig(**agent))
    return AgentServer(start_server(config, lambda: engine), model, data_dir)


@dataclass
class DispatchServer:
    """A --tool-dispatch-url on loopback: answers each POST {name, arguments} with a reply the
    test chose, and records the calls."""

    base_url: str
    calls: list[dict[str, Any]] = field(default_factory=list)
    reply: Any = "ok"  # a function of (name, arguments), or a fixed reply


def dispatch_server() -> Iterator[DispatchServer]:
    state = DispatchServer("")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.calls.append(body)
            reply = state.reply(body["name"], body["arguments"]) if callable(state.reply) else state.reply
            data = json.dumps({"content": reply}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
