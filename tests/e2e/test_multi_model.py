"""Several models in one server: /v1/models and /health list each with its kind,
requests pick a model by name or by its kind's alias, a busy model does not
hold up another, /metrics labels by model, a model that fails to load fails
alone. The model specs (`-m [KIND:]SOURCE`, --models-config TOML) are checked
here too, and the CLI serves a config with no chat model at all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import LiveServer, free_port, start_server, stop_server
from mistralrs_serve.config import ServerConfig
from mistralrs_serve.errors import ModelLoadError
from mistralrs_serve.models.model_specs import (
    ModelSpec,
    check_names,
    infer_kind,
    load_models_config,
    parse_model_arg,
)
from mistralrs_serve.models.packaged import packaged_directory


def test_models_list_every_kind_and_alias(modal_server: LiveServer) -> None:
    with modal_server.http() as http:
        data = http.get("/v1/models").json()["data"]
        health = http.get("/health").json()
    kinds = {card["id"]: card["kind"] for card in data}
    assert kinds["default"] == "chat" and kinds["default-embedding"] == "embedding"
    assert kinds["default-speech"] == "speech" and kinds["default-transcription"] == "transcription"
    assert (
        kinds["sentence-transformers/all-MiniLM-L6-v2"] == "embedding" and kinds["minilm-mrl"] == "embedding"
    )
    assert kinds["piper/en_US-joe-medium"] == "speech" and kinds["openai/whisper-tiny.en"] == "transcription"
    by_id = {card["id"]: card for card in data}
    assert by_id["default-embedding"]["root"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert by_id["minilm-mrl"]["matryoshka_dimensions"] == [128, 256]
    assert by_id["piper/en_US-joe-medium"]["voices"] == ["en_US-joe-medium"]
    assert health["status"] == "ok" and all(m["status"] == "ready" for m in health["models"].values())
    with modal_server.http() as http:
        assert http.get("/v1/models/whisper-1").json()["root"] == "openai/whisper-tiny.en"
        assert http.get("/v1/models/nope").status_code == 404


def test_a_chat_request_to_another_kind_is_a_400_naming_model(modal_server: LiveServer) -> None:
    with modal_server.http() as http:
        res = http.post(
            "/v1/chat/completions",
            json={"model": "default-embedding", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert res.status_code == 400 and res.json()["error"]["param"] == "model"
    assert "embedding model" in res.json()["error"]["message"]


def test_a_busy_model_does_not_hold_up_the_others(
    modal_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The voice is held (its synthesis waits on an event: the only scripted part) while
    an embedding, a transcription and a chat request are answered."""
    speech = modal_server.app.state.server.models.find("default-speech").serving.model
    release, entered = threading.Event(), threading.Event()
    real = speech.synthesize

    def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(speech, "synthesize", held)
    results: dict[str, int] = {}

    def speak() -> None:
        with modal_server.http() as http:
            results["speech"] = http.post(
                "/v1/audio/speech", json={"model": "tts-1", "input": "Hi."}
            ).status_code

    thread = threading.Thread(target=speak)
    thread.start()
    try:
        assert entered.wait(10)
        with modal_server.http() as http:
            assert (
                http.post("/v1/embeddings", json={"model": "default-embedding", "input": "x"}).status_code
                == 200
            )
            chat = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            assert http.post("/v1/chat/completions", json=chat).status_code == 200
            wav = real("A test.", speech.default)  # made directly: the voice's route is held
            samples = b"".join(c.samples.tobytes() for c in wav)
            import numpy as np
            from mistralrs_serve.audio.codecs import encode_audio

            data = encode_audio(np.frombuffer(samples, dtype=np.int16), 22050, "wav")
            res = http.post(
                "/v1/audio/transcriptions", files={"file": ("a.wav", data)}, data={"model": "whisper-1"}
            )
            assert res.status_code == 200
        assert "speech" not in results  # still held
    finally:
        release.set()
        thread.join(30)
    assert results["speech"] == 200


def test_requests_to_every_model_at_once(modal_server: LiveServer, speech_wav_bytes: bytes) -> None:
    """Two requests to each kind, all in flight together: every one answered."""
    chat = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    calls: list[tuple[str, dict[str, Any]]] = [
        ("/v1/chat/completions", {"json": chat}),
        ("/v1/embeddings", {"json": {"model": "default-embedding", "input": ["a", "b", "c"]}}),
        ("/v1/embeddings", {"json": {"model": "minilm-mrl", "input": "d", "dimensions": 128}}),
        ("/v1/audio/speech", {"json": {"model": "tts-1", "input": "In parallel."}}),
        (
            "/v1/audio/transcriptions",
            {"files": {"file": ("a.wav", speech_wav_bytes)}, "data": {"model": "whisper-1"}},
        ),
    ]
    results: dict[int, int] = {}

    def call(i: int, path: str, kwargs: dict[str, Any]) -> None:
        with modal_server.http() as http:
            results[i] = http.post(path, **kwargs).status_code

    threads = [
        threading.Thread(target=call, args=(i, path, kwargs)) for i, (path, kwargs) in enumerate(calls * 2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {i: 200 for i in range(len(calls) * 2)}


@pytest.fixture(scope="module")
def speech_wav_bytes() -> bytes:
    return _spoken("Requests to every model at once.")


def test_metrics_are_labelled_by_model(modal_server: LiveServer) -> None:
    with modal_server.http() as http:
        http.post("/v1/embeddings", json={"model": "minilm-mrl", "input": "x"})
        http.post("/v1/embeddings", json={"model": "minilm-mrl", "input": ""})
        http.post(
            "/v1/chat/completions",
            json={"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        text = http.get("/metrics").text
    assert 'mistralrs_serve_model_requests_total{kind="embedding",model="minilm-mrl",status="200"}' in text
    assert 'mistralrs_serve_model_requests_total{kind="embedding",model="minilm-mrl",status="400"}' in text
    assert 'mistralrs_serve_model_request_seconds_count{kind="embedding",model="minilm-mrl"}' in text
    assert 'mistralrs_serve_generation_tokens_total{model="HuggingFaceTB/SmolLM2-135M-Instruct"}' in text
    assert 'mistralrs_serve_kv_cache_blocks_total{model="HuggingFaceTB/SmolLM2-135M-Instruct"}' in text


def test_a_model_that_fails_to_load_fails_alone(default_runner: Any) -> None:
    def broken() -> Any:
        raise ModelLoadError("the voice file is corrupt")

    config = ServerConfig()
    app_models = [(ModelSpec("speech", "broken-voice", name="broken"), broken)]
    from mistralrs_serve.entrypoints.openai.api_server import build_app

    app = build_app(config, lambda: default_runner.client, app_models)
    port = free_port()
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    threading.Thread(target=server.run, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"{base}/health")
                if health.json()["models"].get("broken", {}).get("status") == "failed":
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        assert health.status_code == 503 and "corrupt" in health.json()["error"]
        res = httpx.post(f"{base}/v1/audio/speech", json={"model": "broken", "input": "hi"})
        assert res.status_code == 503 and "corrupt" in res.json()["error"]["message"]
        chat = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=60).status_code == 200
    finally:
        server.should_exit = True


def test_model_args_and_kinds(tmp_path: Path) -> None:
    assert parse_model_arg("embedding:some/hub-id") == ModelSpec("embedding", "some/hub-id")
    assert parse_model_arg("default").kind == "chat"
    assert parse_model_arg("whisper-base").kind == "transcription"
    assert parse_model_arg("all-minilm-l6-v2").kind == "embedding"
    assert infer_kind(str(packaged_directory("all-minilm-l6-v2"))) == "embedding"
    assert infer_kind(str(packaged_directory("en_US-joe-medium"))) == "speech"
    assert infer_kind(str(packaged_directory("whisper-tiny.en"))) == "transcription"
    assert infer_kind(str(tmp_path)) == "chat"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[models]]\nkind = 'video'\nsource = 'x'\n", "model kind"),
        ("[[models]]\nkind = 'embedding'\n", "needs 'source'"),
        ("[[models]]\nsource = 'x'\nflavour = 1\n", "unknown: flavour"),
        ("[[models]]\nkind = 'embedding'\nsource = 'x'\n[models.options]\nvoices = {}\n", "option 'voices'"),
        (
            "[[models]]\nkind = 'transcription'\nsource = 'x'\n[models.options]\nbeam_size = 'wide'\n",
            "wrong type",
        ),
        ("models = 3\n", "[[models]]"),
        ("[[models\n", "models.toml"),
    ],
)
def test_bad_models_config_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(ModelLoadError, match=None) as err:
        load_models_config(path)
    assert message in str(err.value)


def test_names_must_be_unique_and_not_aliases() -> None:
    with pytest.raises(ModelLoadError, match="two models"):
        check_names([ModelSpec("embedding", "a", name="x"), ModelSpec("speech", "b", name="x")])
    with pytest.raises(ModelLoadError, match="reserved"):
        check_names([ModelSpec("embedding", "a", name="whisper-1")])
    with pytest.raises(ModelLoadError, match="marked default"):
        check_names([ModelSpec("embedding", "a", default=True), ModelSpec("embedding", "b", default=True)])


def test_cli_serves_a_config_without_a_chat_model(tmp_path: Path) -> None:
    """`mistralrs-serve --models-config` with an embedder and the multilingual Whisper base
    (its model.bin joined from two wheels): no chat model, so chat is a 404."""
    config = tmp_path / "models.toml"
    config.write_text(
        "[[models]]\nkind = 'embedding'\nsource = 'all-minilm-l6-v2'\nname = 'mini'\n"
        "[[models]]\nsource = 'whisper-base'\n[models.options]\nbeam_size = 2\n"
    )
    port = free_port()
    cmd = [sys.executable, "-m", "mistralrs_serve.cli", "--models-config", str(config), "-p", str(port)]
    cmd += ["--data-dir", str(tmp_path / "data")]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = httpx.get(f"{base}/health").status_code
                if status == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert status == 200, proc.stderr.read() if proc.poll() is not None else "not healthy"
        ids = [c["id"] for c in httpx.get(f"{base}/v1/models").json()["data"]]
        assert ids == ["default-embedding", "default-transcription", "mini", "openai/whisper-base"]
        chat = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
        res = httpx.post(f"{base}/v1/chat/completions", json=chat)
        assert res.status_code == 404 and res.json()["error"]["param"] == "model"
        assert httpx.post(f"{base}/v1/embeddings", json={"model": "mini", "input": "x"}).status_code == 200
        wav = _spoken("Good morning, how are you?")
        res = httpx.post(
            f"{base}/v1/audio/translations",
            files={"file": ("a.wav", wav)},
            data={"model": "whisper-1"},
            timeout=60,
        )
        assert res.status_code == 200 and "morning" in res.json()["text"].lower()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def _spoken(text: str) -> bytes:
    import numpy as np
    from mistralrs_serve.audio.codecs import encode_audio
    from mistralrs_serve.audio.speech import PiperSpeech

    voice = PiperSpeech({"joe": packaged_directory("en_US-joe-medium")})
    samples = np.concatenate([c.samples for c in voice.synthesize(text, "joe")])
    return encode_audio(samples, voice.sample_rate("joe"), "wav")


def test_runner_for_each_kind() -> None:
    import base64

    from mistralrs_serve import (
        ChatCompletionRequest,
        EmbeddingRequest,
        Runner,
        SpeechRequest,
        TranscriptionRequest,
        Which,
    )
    from mistralrs_serve.errors import InvalidRequestError

    embedder = Runner(Which.Embedding(matryoshka_dimensions=(64,)))
    res = embedder.send_embedding_request(EmbeddingRequest(input=["hello", "world"], dimensions=64))
    assert len(res.data) == 2 and len(res.data[0].embedding) == 64 and res.usage.prompt_tokens == 6
    with pytest.raises(InvalidRequestError):
        embedder.generate_speech(SpeechRequest(input="x"))
    embedder.close()
    wav = Runner(Which.Speech()).generate_speech(SpeechRequest(input="Testing the runner."))
    transcriber = Runner(Which.Transcription())
    text = transcriber.send_transcription_request(
        TranscriptionRequest(file=wav, model="x", response_format="text")
    )
    assert isinstance(text, str) and "runner" in text.lower()
    # a chat Runner that hears input_audio parts through a transcriber of its own
    chat = Runner(Which.Default(), transcriber=Which.Transcription())
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}
    ids = chat._chat.prompt_ids(ChatCompletionRequest(messages=[{"role": "user", "content": [part]}]))
    assert "runner" in chat.detokenize_text(ids).lower()
    chat.close()


def test_a_second_chat_model(default_runner: Any) -> None:
    """Two chat models (the session's engine under two names): chat, completions and
    /tokenize reach the one named; Responses run on the primary only, and naming the other
    is a 400 naming `model`, not an answer from the wrong model."""
    second = ModelSpec("chat", "default", name="second-chat")
    live = start_server(
        ServerConfig(), lambda: default_runner.client, [(second, lambda: default_runner.client)]
    )
    try:
        with live.http() as http:
            chat = {"model": "second-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            res = http.post("/v1/chat/completions", json=chat)
            assert res.status_code == 200 and res.json()["model"] == "second-chat"
            assert http.post("/tokenize", json={"model": "second-chat", "prompt": "hi"}).json()["count"] > 0
            bad = http.post("/v1/responses", json={"model": "second-chat", "input": "hi"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"
            ok = http.post("/v1/responses", json={"model": "default", "input": "hi", "max_output_tokens": 2})
            assert ok.status_code == 200
    finally:
        stop_server(live)
