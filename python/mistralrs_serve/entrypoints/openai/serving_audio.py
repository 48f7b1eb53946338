"""POST /v1/audio/speech, /v1/audio/transcriptions and /v1/audio/translations
(and the SDK's speech and transcription calls): requests checked, run on the
model (audio/speech.py, audio/transcription.py), answers shaped as OpenAI's.

Speech: `response_format` wav (the default here: what Piper makes), pcm, and
beyond the spec flac and mp3; `speed` 0.25-4; `voice` one of the model's
voices (OpenAI's built-in names mean the default voice). With
`stream_format: "audio"` given, the bytes stream as each sentence is made (a
streamed wav has the open-ended header); `"sse"` sends OpenAI's
`speech.audio.delta` events.

Transcriptions: `response_format` json, text, srt, vtt or verbose_json
(segments; words with `timestamp_granularities[]=word`); `stream` sends
`transcript.text.delta` per segment and `transcript.text.done`."""

from __future__ import annotations

import base64
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mistralrs_serve.audio.codecs import AudioEncoder, check_format, decode_audio
from mistralrs_serve.audio.speech import PiperSpeech
from mistralrs_serve.audio.transcription import (
    LANGUAGE_NAMES,
    Segment,
    TranscribeOptions,
    Transcript,
    WhisperTranscriber,
)
from mistralrs_serve.entrypoints.openai.http_errors import sse_data
from mistralrs_serve.entrypoints.openai.protocol import SpeechRequest
from mistralrs_serve.errors import InvalidRequestError

TRANSCRIPT_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("segment", "word")


@dataclass(frozen=True)
class SpeechPlan:
    voice: str
    fmt: str
    streaming: bool  # stream_format "audio" given: bytes as they are made
    sse: bool


class SpeechServing:
    def __init__(self, model: PiperSpeech, name: str) -> None:
        self.model, self.name = model, name

    def plan(self, req: SpeechRequest) -> SpeechPlan:
        voice = req.voice.get("id") if isinstance(req.voice, dict) else req.voice
        check_format(req.response_format)
        self.model.check(req.input, req.speed)
        sse = req.stream_format == "sse"
        streaming = sse or "stream_format" in req.model_fields_set
        return SpeechPlan(self.model.voice_of(voice), req.response_format, streaming, sse)

    def chunks(self, req: SpeechRequest, plan: SpeechPlan) -> Generator[bytes]:
        """The audio's bytes as they are made (SSE events with `plan.sse`)."""
        encoder = AudioEncoder(plan.fmt, self.model.sample_rate(plan.voice), streaming=plan.streaming)
        for chunk in self.model.synthesize(req.input, plan.voice, req.speed):
            data = encoder.feed(chunk.samples)
            if data:
                yield _delta(data) if plan.sse else data
        tail = encoder.finish()
        if tail:
            yield _delta(tail) if plan.sse else tail
        if plan.sse:
            done = {
                "type": "speech.audio.done",
                "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
            }
            yield sse_data(done)

    def create(self, req: SpeechRequest) -> bytes:
        """The whole file."""
        plan = self.plan(req)
        return b"".join(self.chunks(req, SpeechPlan(plan.voice, plan.fmt, False, False)))


def _delta(data: bytes) -> bytes:
    return sse_data({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})


@dataclass
class TranscriptionRequest:
    """The multipart form of /v1/audio/transcriptions (and translations)."""

    file: bytes
    model: str
    filename: str = "audio"
    language: str | None = None
    prompt: str | None = None
    response_format: str = "json"
    temperature: float = 0.0
    timestamp_granularities: list[str] = field(default_factory=lambda: ["segment"])
    stream: bool = False
    task: str = "transcribe"


class TranscriptionServing:
    def __init__(self, model: WhisperTranscriber, name: str) -> None:
        self.model, self.name = model, name

    def options(self, req: TranscriptionRequest) -> TranscribeOptions:
        if req.response_format not in TRANSCRIPT_FORMATS:
            raise InvalidRequestError(
                f"response_format must be one of {', '.join(TRANSCRIPT_FORMATS)}", "response_format"
            )
        bad = [g for g in req.timestamp_granularities if g not in GRANULARITIES]
        if bad:
            raise InvalidRequestError(
                f"timestamp_granularities: {bad[0]!r} is not one of segment, word", "timestamp_granularities"
            )
        if req.stream and req.response_format not in ("json", "text"):
            raise InvalidRequestError("stream needs response_format json or text", "stream")
        options = TranscribeOptions(
            language=req.language or None,
            prompt=req.prompt,
            temperature=req.temperature,
            task=req.task,
            word_timestamps="word" in req.timestamp_granularities,
        )
        self.model.check(options)
        return options

    def audio(self, req: TranscriptionRequest) -> np.ndarray:
        return decode_audio(req.file, "file")

    def transcript(self, req: TranscriptionRequest) -> Transcript:
        options = self.options(req)
        return self.model.transcript(self.audio(req), options)

    def hear(self, data: bytes, where: str) -> str:
        """The text of audio bytes (chat `input_audio` parts)."""
        return self.model.transcript(decode_audio(data, where), TranscribeOptions()).text

    def body(self, req: TranscriptionRequest, t: Transcript) -> tuple[bytes | dict[str, Any], str]:
        """The answer in `response_format`, and its media type."""
        fmt = req.response_format
        if fmt == "text":
            return (t.text + "\n").encode(), "text/plain; charset=utf-8"
        if fmt == "srt":
            return srt(t.segments).encode(), "text/plain; charset=utf-8"
        if fmt == "vtt":
            return vtt(t.segments).encode(), "text/vtt; charset=utf-8"
        if fmt == "json":
            usage = {"type": "duration", "seconds": round(t.duration, 3)}
            return ({"text": t.text, "usage": usage} if req.task == "transcribe" else {"text": t.text}), ""
        out: dict[str, Any] = {
            "task": req.task,
            "language": "english" if req.task == "translate" else LANGUAGE_NAMES.get(t.language, t.language),
            "duration": t.duration,
            "text": t.text,
            "segments": [_segment(s) for s in t.segments],
        }
        if "word" in req.timestamp_granularities and req.task == "transcribe":
            out["words"] = [
                {"word": w.word.strip(), "start": w.start, "end": w.end} for s in t.segments for w in s.words
            ]
        if req.task == "transcribe":
            out["usage"] = {"type": "duration", "seconds": round(t.duration, 3)}
        return out, ""

    def events(self, req: TranscriptionRequest) -> Generator[bytes]:
        """SSE: a `transcript.text.delta` per segment as it is decoded, then `transcript.text.done`."""
        options = self.options(req)
        _, _, segments = self.model.transcribe(self.audio(req), options)
        texts: list[str] = []
        for s in segments:
            delta = s.text if texts else s.text.lstrip()
            texts.append(delta)
            yield sse_data({"type": "transcript.text.delta", "delta": delta})
        yield sse_data({"type": "transcript.text.done", "text": "".join(texts).strip()})
        yield b"data: [DONE]\n\n"


def _segment(s: Segment) -> dict[str, Any]:
    return {
        "id": s.id,
        "seek": s.seek,
        "start": s.start,
        "end": s.end,
        "text": s.text,
        "tokens": s.tokens,
        "temperature": s.temperature,
        "avg_logprob": s.avg_logprob,
        "compression_ratio": s.compression_ratio,
        "no_speech_prob": s.no_speech_prob,
    }


def _clock(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def srt(segments: list[Segment]) -> str:
    return "".join(
        f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text.strip()}\n\n"
        for i, s in enumerate(segments, 1)
    )


def vtt(segments: list[Segment]) -> str:
    return "WEBVTT\n\n" + "".join(
        f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text.strip()}\n\n" for s in segments
    )
