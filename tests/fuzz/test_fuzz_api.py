"""Fuzzing every route of a real server (the default model, loopback) from its
own OpenAPI document (GET /openapi.json) with schemathesis: valid and invalid
bodies, path parameters and methods. Whatever comes in, no 5xx, no hang (each
call under CALL_TIMEOUT_S), no crash (the server is healthy at the end and its
engine idle), and every error in OpenAI's envelope.

Generation is bounded so that the run takes a fixed time: token limits and
`n` are clamped before each call. MISTRALRS_SERVE_FUZZ_EXAMPLES sets the
examples per operation (CI: the default below; longer on demand, e.g. 500)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from mistralrs_serve.config import ServerConfig
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))  # the loopback server helper
from live_server import LiveServer, start_server, stop_server

EXAMPLES = int(os.environ.get("MISTRALRS_SERVE_FUZZ_EXAMPLES", "25"))
CALL_TIMEOUT_S = 60.0
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


@pytest.fixture(scope="module")
def server(default_runner: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    config = ServerConfig(data_dir=str(tmp_path_factory.mktemp("fuzz-data")), max_body_bytes=1 << 20)
    live = start_server(config, lambda: default_runner.client)
    yield live
    with live.http() as http:  # no crash: still answering, nothing left running
        assert http.get("/health").status_code == 200
    live.wait_idle(timeout_s=30)
    stop_server(live)


def _document() -> dict[str, Any]:
    """The document the server serves, built here too so that operations are test ids."""
    import tempfile

    from mistralrs_serve.entrypoints.openai.api_server import build_app
    from mistralrs_serve.entrypoints.openai.openapi_doc import openapi_document

    return openapi_document(build_app(ServerConfig(data_dir=tempfile.mkdtemp()), None))


SCHEMA = schemathesis.openapi.from_dict(_document())
OPERATIONS = {result.ok().label: result.ok() for result in SCHEMA.get_all_operations()}
# invalid data needs something to make invalid: a body (any string is a valid path parameter)
CASES = [(label, GenerationMode.POSITIVE) for label in sorted(OPERATIONS)] + [
    (label, GenerationMode.NEGATIVE) for label, op in sorted(OPERATIONS.items()) if op.body
]


def bounded(body: Any, mode: GenerationMode) -> Any:
    """Token limits at most 4, one choice, no waiting in the background; valid bodies
    name the served model (a random name is only a 404)."""
    if isinstance(body, dict):
        if mode == GenerationMode.POSITIVE and isinstance(body.get("model"), str):
            body["model"] = "default"
        for field in TOKEN_FIELDS:
            if not isinstance(body.get(field), int) or body[field] > 4:
                body[field] = 4
        if body.get("n") is not None:
            body["n"] = 1
        body.pop("background", None)
    return body


def check_envelope(response: Any) -> None:
    content_type = response.headers.get("content-type") or [""]  # schemathesis keeps each header's values
    if isinstance(content_type, list):
        content_type = content_type[0]
    if 400 <= response.status_code < 600 and content_type.startswith("application/json"):
        error = response.json().get("error")
        assert isinstance(error, dict), response.text[:300]
        assert {"message", "type", "param", "code"} <= set(error), response.text[:300]


def test_the_served_document_is_the_one_fuzzed(server: LiveServer) -> None:
    with server.http() as http:
        served = http.get("/openapi.json").json()
    assert sorted(served["paths"]) == sorted(_document()["paths"])
    assert "requestBody" in served["paths"]["/v1/chat/completions"]["post"]


@pytest.mark.parametrize(
    ("label", "mode"),
    CASES,
    ids=[f"{label}-{'valid' if m == GenerationMode.POSITIVE else 'invalid'}" for label, m in CASES],
)
def test_no_route_fails(label: str, mode: GenerationMode, server: LiveServer) -> None:
    operation = OPERATIONS[label]
    seen: list[str] = []

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        case.body = bounded(case.body, mode)
        try:
            response = case.call(base_url=server.base_url, timeout=CALL_TIMEOUT_S)
        except requests.exceptions.Timeout as e:  # a hang
            raise AssertionError(f"{label}: no answer in {CALL_TIMEOUT_S} s") from e
        seen.append(str(response.status_code))
        case.validate_response(response, checks=[not_a_server_error])
        check_envelope(response)

    run()
    assert seen
