"""Audio speed: the real-time factor (processing seconds per second of audio; below 1
is faster than real time) of speech synthesis with the packaged Piper voice
(en_US-joe-medium) and of transcription with Whisper tiny.en and base, each called
directly on its library (piper-tts, faster-whisper) and through this server's HTTP
routes (/v1/audio/speech, /v1/audio/transcriptions) in the same process: the ratio
is what the server's decoding, encoding and HTTP add.

    .venv/bin/python bench/audio.py            # full: a paragraph, tiny.en and base, best of 3
    .venv/bin/python bench/audio.py --smoke    # seconds: one sentence, tiny.en, one round (CI)

Prints one JSON line per engine and model: x_realtime (audio seconds per second) with
its rtf, then the ratio served / direct.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
from decode import emit
from mistralrs_serve.audio.codecs import decode_audio
from mistralrs_serve.config import ServerConfig
from mistralrs_serve.entrypoints.openai.model_set import build_serving
from mistralrs_serve.models.model_specs import ModelSpec

PARAGRAPH = (
    "Local inference servers let a small team run language models on their own machines. "
    "They answer chat requests, turn documents into vectors for search, and read text aloud. "
    "A good server keeps every model busy without letting one slow request hold up the others. "
    "This paragraph is long enough to measure how fast speech is made and heard again."
)
SENTENCE = "The quick brown fox jumps over the lazy dog."


def best(call: Callable[[], Any], rounds: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
    return min(times), out


def start(specs: list[ModelSpec]) -> tuple[str, Any, Any]:
    """A server on a free loopback port with these models; (base url, app, uvicorn server)."""
    import socket
    import threading

    import uvicorn
    from mistralrs_serve.entrypoints.openai.api_server import build_app

    app = build_app(ServerConfig(), None, [(s, lambda s=s: build_serving(s)) for s in specs])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    threading.Thread(target=server.run, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                return base, app, server
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def report(engine: str, seconds: float, audio_s: float, **extra: object) -> None:
    """x_realtime (audio seconds made or heard per second), with the rtf (its inverse)."""
    emit(
        engine,
        "x_realtime",
        audio_s / seconds,
        rtf=round(seconds / audio_s, 4),
        audio_s=round(audio_s, 2),
        **extra,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    text, rounds = (SENTENCE, 1) if args.smoke else (PARAGRAPH, 3)
    whispers = ["whisper-tiny.en"] if args.smoke else ["whisper-tiny.en", "whisper-base"]
    specs = [ModelSpec("speech", "en_US-joe-medium")] + [
        ModelSpec("transcription", w, name=w) for w in whispers
    ]
    base_url, app, server = start(specs)
    models = app.state.server.models
    voice = models.find("default-speech").serving.model
    http = httpx.Client(base_url=base_url, timeout=600)

    def direct_speech() -> np.ndarray:
        return np.concatenate([c.samples for c in voice.synthesize(text, voice.default)])

    def served_speech() -> bytes:
        body = {"model": "tts-1", "input": text, "response_format": "wav"}
        return http.post("/v1/audio/speech", json=body).content

    best(direct_speech, 1)  # warm-up
    t_direct, samples = best(direct_speech, rounds)
    t_served, wav = best(served_speech, rounds)
    audio_s = len(samples) / voice.sample_rate(voice.default)
    report("piper-direct", t_direct, audio_s, model="en_US-joe-medium")
    report("mistralrs-serve", t_served, audio_s, model="en_US-joe-medium", route="/v1/audio/speech")
    emit("mistralrs-serve", "speech_ratio_vs_direct", t_direct / t_served)
    audio = decode_audio(wav, "file")
    for name in whispers:
        whisper = models.find(name).serving.model

        def direct(whisper: Any = whisper) -> str:
            return str(whisper.transcript(audio, _options()).text)

        def served(name: str = name) -> str:
            files = {"file": ("speech.wav", wav)}
            return str(
                http.post("/v1/audio/transcriptions", files=files, data={"model": name}).json()["text"]
            )

        best(direct, 1)
        t_direct, heard = best(direct, rounds)
        t_served, heard_served = best(served, rounds)
        assert heard_served == heard, (heard_served, heard)  # the same audio, the same words
        report("faster-whisper-direct", t_direct, audio_s, model=name, text=heard[:60])
        report("mistralrs-serve", t_served, audio_s, model=name, route="/v1/audio/transcriptions")
        emit("mistralrs-serve", "transcription_ratio_vs_direct", t_direct / t_served, model=name)
    server.should_exit = True


def _options() -> Any:
    from mistralrs_serve.audio.transcription import TranscribeOptions

    return TranscribeOptions()


if __name__ == "__main__":
    main()
