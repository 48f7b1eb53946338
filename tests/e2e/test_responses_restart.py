"""Stored responses survive `kill -9`: the real CLI server as a subprocess,
killed and started again over the same --data-dir."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from live_server import free_port
from openai_schema import check
from server_process import kill_hard, start, stop

QUESTION = "What is the capital of France? Answer in one sentence."


def test_responses_survive_kill_9(tmp_path: Path) -> None:
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    port = free_port()
    proc = start(data_dir, port, log)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            body = {"input": QUESTION, "temperature": 0, "max_output_tokens": 20, "metadata": {"k": "v"}}
            stored = http.post("/v1/responses", json=body)
            assert stored.status_code == 200, stored.text
            response_id = stored.json()["id"]
            items = http.get(f"/v1/responses/{response_id}/input_items").content
            running = http.post(
                "/v1/responses",
                json={
                    "input": "Count to a thousand.",
                    "background": True,
                    "max_output_tokens": 4000,
                    "ignore_eos": True,
                },
            ).json()
            deadline = time.monotonic() + 60
            while http.get(f"/v1/responses/{running['id']}").json()["status"] != "in_progress":
                assert time.monotonic() < deadline
                time.sleep(0.05)
        kill_hard(proc)
        proc = start(data_dir, port, log)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            again = http.get(f"/v1/responses/{response_id}")
            assert again.status_code == 200 and again.content == stored.content  # byte for byte
            assert http.get(f"/v1/responses/{response_id}/input_items").content == items
            failed = http.get(f"/v1/responses/{running['id']}").json()
            check("Response", failed)
            assert failed["status"] == "failed" and "restarted" in failed["error"]["message"]
            follow = http.post(
                "/v1/responses", json={"input": "And Germany?", "previous_response_id": response_id}
            )
            assert follow.status_code == 200, follow.text  # the stored conversation goes on
    finally:
        stop(proc)
