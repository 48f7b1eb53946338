"""Speech and transcription on a real server (the `modal_server` fixture: the
packaged Piper voice en_US-joe-medium and Whisper tiny.en beside the default
chat model), through the official openai client and raw HTTP. Nothing is
scripted: the speech is played back through the transcriber to get the words
back."""

from __future__ import annotations

import base64
import io
import re
import wave
from typing import Any

import numpy as np
import openai
import pytest
from live_server import LiveServer
from mistralrs_serve.audio.codecs import decode_audio, encode_audio
from openai_schema import check

SENTENCE = "The quick brown fox jumps over the lazy dog."


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


@pytest.fixture(scope="module")
def speech_wav(modal_client: openai.OpenAI) -> bytes:
    return modal_client.audio.speech.create(
        model="tts-1", voice="alloy", input=SENTENCE, response_format="wav"
    ).read()


def test_speech_comes_back_as_the_same_words(modal_client: openai.OpenAI, speech_wav: bytes) -> None:
    with wave.open(io.BytesIO(speech_wav)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 22050)
        assert 1.0 < w.getnframes() / w.getframerate() < 8.0
    text = modal_client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", speech_wav)).text
    assert words(text) == words(SENTENCE)


@pytest.mark.parametrize("fmt", ["mp3", "flac", "pcm"])
def test_other_formats_carry_the_same_speech(
    modal_client: openai.OpenAI, speech_wav: bytes, fmt: str
) -> None:
    """Piper draws noise on every call, so the samples differ between calls: the
    length and the words heard back are what must agree (Whisper may mishear one
    word of a noisier draw: "jumped" for "jumps" was seen once in CI)."""
    data = modal_client.audio.speech.create(
        model="tts-1", voice="alloy", input=SENTENCE, response_format=fmt
    ).read()
    reference = decode_audio(speech_wav, "x", rate=22050)
    if fmt == "pcm":  # raw 16-bit little-endian, no header
        samples = np.frombuffer(data, dtype="<i2")
        got = samples.astype(np.float32) / 32768
        data = encode_audio(samples, 22050, "wav")
    else:
        got = decode_audio(data, "x", rate=22050)
    assert abs(len(got) - len(reference)) < 0.25 * len(reference)
    text = modal_client.audio.transcriptions.create(model="whisper-1", file=(f"speech.{fmt}", data)).text
    assert word_errors(words(text), words(SENTENCE)) <= 1, text


def test_speed_changes_the_length(modal_client: openai.OpenAI) -> None:
    def seconds(speed: float) -> float:
        data = modal_client.audio.speech.create(
            model="tts-1", voice="alloy", input=SENTENCE, response_format="pcm", speed=speed
        ).read()
        return len(data) / 2 / 22050

    assert seconds(2.0) < 0.7 * seconds(1.0)


def test_stream_format_audio_streams_sentence_by_sentence(modal_server: LiveServer) -> None:
    text = "One sentence here. Another sentence there. And a third one."
    with (
        modal_server.http() as http,
        http.stream(
            "POST",
            "/v1/audio/speech",
            json={
                "model": "default-speech",
                "input": text,
                "stream_format": "audio",
                "response_format": "wav",
            },
        ) as res,
    ):
        assert res.status_code == 200 and res.headers["content-type"] == "audio/wav"
        pieces = list(res.iter_raw())
    assert len(pieces) >= 3  # one write per sentence at least
    assert len(decode_audio(b"".join(pieces), "x")) > 16000  # a streamed wav (open-ended header) plays


def test_stream_format_sse_sends_openai_events(modal_server: LiveServer) -> None:
    with modal_server.http() as http:
        res = http.post(
            "/v1/audio/speech",
            json={
                "model": "tts-1",
                "input": "Hello there. Goodbye.",
                "stream_format": "sse",
                "response_format": "pcm",
            },
        )
    events = [line.removeprefix("data: ") for line in res.text.splitlines() if line.startswith("data: ")]
    import json

    parsed = [json.loads(e) for e in events]
    for e in parsed[:-1]:
        check("SpeechAudioDeltaEvent", e)
    check("SpeechAudioDoneEvent", parsed[-1])
    audio = b"".join(base64.b64decode(e["audio"]) for e in parsed[:-1])
    assert len(audio) > 22050  # over half a second of 16-bit samples


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": "ogg"}, "response_format"),
        ({"response_format": "opus"}, "response_format"),
        ({"input": ""}, "input"),
        ({"input": "   "}, "input"),
        ({"input": "x" * 4097}, "input"),  # over the voice's limit (OpenAI's 4096 characters)
        ({"speed": 10.0}, "speed"),
        ({"voice": "no-such-voice"}, "voice"),
        ({"stream_format": "video"}, "stream_format"),
        ({"model": "default-embedding"}, "model"),  # the wrong kind
    ],
)
def test_bad_speech_request_is_a_400(modal_server: LiveServer, body: dict[str, Any], param: str) -> None:
    with modal_server.http() as http:
        res = http.post("/v1/audio/speech", json={"model": "tts-1", "input": "Hello.", **body})
    assert res.status_code == 400, res.text
    assert res.json()["error"]["param"] == param


def test_transcription_formats(modal_client: openai.OpenAI, speech_wav: bytes) -> None:
    verbose = modal_client.audio.transcriptions.create(
        model="whisper-1",
        file=("speech.wav", speech_wav),
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    body = verbose.model_dump(exclude_none=True)
    check("CreateTranscriptionResponseVerboseJson", body)
    assert body["language"] == "english" and 1.0 < body["duration"] < 8.0
    assert [w["word"].lower().strip(".,") for w in body["words"]] == words(SENTENCE)
    starts = [w["start"] for w in body["words"]]
    assert starts == sorted(starts) and body["segments"][0]["end"] <= body["duration"] + 0.5
    as_json = modal_client.audio.transcriptions.create(model="whisper-1", file=("s.wav", speech_wav))
    check("CreateTranscriptionResponseJson", as_json.model_dump(exclude_none=True))
    text = modal_client.audio.transcriptions.create(
        model="whisper-1", file=("s.wav", speech_wav), response_format="text"
    )
    assert words(str(text)) == words(SENTENCE)
    srt = str(
        modal_client.audio.transcriptions.create(
            model="whisper-1", file=("s.wav", speech_wav), response_format="srt"
        )
    )
    assert re.match(r"1\n00:00:00,\d{3} --> 00:00:0\d,\d{3}\n", srt)
    vtt = str(
        modal_client.audio.transcriptions.create(
            model="whisper-1", file=("s.wav", speech_wav), response_format="vtt"
        )
    )
    assert vtt.startswith("WEBVTT\n\n00:00:00.")


def test_streamed_transcription_events(modal_client: openai.OpenAI, speech_wav: bytes) -> None:
    events = list(
        modal_client.audio.transcriptions.create(model="whisper-1", file=("s.wav", speech_wav), stream=True)
    )
    for e in events[:-1]:
        check("TranscriptTextDeltaEvent", e.model_dump(exclude_none=True))
    done = events[-1].model_dump(exclude_none=True)
    check("TranscriptTextDoneEvent", done)
    assert words(done["text"]) == words(SENTENCE)
    assert "".join(e.delta for e in events[:-1]).strip() == done["text"]


def test_translation_needs_a_multilingual_model(modal_client: openai.OpenAI, speech_wav: bytes) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        modal_client.audio.translations.create(model="whisper-1", file=("s.wav", speech_wav))
    assert err.value.body["param"] == "model"  # type: ignore[index]


def post_audio(server: LiveServer, data: bytes, **fields: Any) -> Any:
    form = {"model": "whisper-1", **fields}
    with server.http() as http:
        return http.post("/v1/audio/transcriptions", files={"file": ("a.wav", data)}, data=form)


@pytest.mark.parametrize(
    ("data", "fields", "param"),
    [
        (b"this is not audio at all", {}, "file"),
        (b"", {}, "file"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", {}, "file"),  # a header and nothing after it
        (None, {"response_format": "xml"}, "response_format"),
        (None, {"temperature": "warm"}, "temperature"),
        (None, {"temperature": "3"}, "temperature"),
        (None, {"language": "xx"}, "language"),
        (None, {"language": "de"}, "language"),  # tiny.en knows English only
        (None, {"timestamp_granularities[]": "phoneme"}, "timestamp_granularities"),
        (None, {"model": "default"}, "model"),
        (None, {"stream": "maybe"}, "stream"),
    ],
)
def test_bad_transcription_request_is_a_400(
    modal_server: LiveServer, speech_wav: bytes, data: bytes | None, fields: dict[str, str], param: str
) -> None:
    res = post_audio(modal_server, speech_wav if data is None else data, **fields)
    assert res.status_code == 400, res.text
    assert res.json()["error"]["param"] == param


def test_upload_over_the_limit_is_a_413_and_json_is_a_400(
    modal_server: LiveServer, speech_wav: bytes
) -> None:
    res = post_audio(modal_server, b"\0" * (3 << 20))  # the fixture's limit is 2 MiB
    assert res.status_code == 413 and res.json()["error"]["param"] == "file"
    with modal_server.http() as http:
        res = http.post("/v1/audio/transcriptions", json={"model": "whisper-1", "file": "abc"})
        assert res.status_code == 400 and res.json()["error"]["param"] == "file"
        res = http.post("/v1/audio/transcriptions", files={"file": ("a.wav", speech_wav)})
        assert res.status_code == 400 and res.json()["error"]["param"] == "model"
    assert post_audio(modal_server, speech_wav).status_code == 200  # still serving


def audio_part(data: bytes, fmt: str = "wav") -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def test_chat_audio_part_becomes_its_transcript(modal_server: LiveServer, speech_wav: bytes) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "Repeat:"}, audio_part(speech_wav)]}]
    with modal_server.http() as http:
        ids = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
        prompt = http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert "Repeat:" in prompt and "quick brown fox jumps over the lazy dog" in prompt.lower()
    client = modal_server.client()
    res = client.chat.completions.create(model="default", messages=messages, max_tokens=4)  # type: ignore[arg-type]
    assert res.choices[0].message.content


@pytest.mark.parametrize(
    ("part", "param"),
    [
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "ogg"}}, "input_audio.format"),
        (
            {"type": "input_audio", "input_audio": {"data": "not base64!!", "format": "wav"}},
            "input_audio.data",
        ),
        (
            {
                "type": "input_audio",
                "input_audio": {"data": base64.b64encode(b"noise").decode(), "format": "wav"},
            },
            "input_audio.data",
        ),
        ({"type": "input_audio", "input_audio": "wav"}, "input_audio"),
    ],
)
def test_bad_audio_part_is_a_400(modal_server: LiveServer, part: dict[str, Any], param: str) -> None:
    messages = [{"role": "user", "content": [part]}]
    with modal_server.http() as http:
        res = http.post("/v1/chat/completions", json={"model": "default", "messages": messages})
    assert res.status_code == 400, res.text
    assert res.json()["error"]["param"] == f"messages[0].content[0].{param}"


def test_audio_part_without_a_transcriber_is_a_400(live_server: LiveServer, speech_wav: bytes) -> None:
    messages = [{"role": "user", "content": [audio_part(speech_wav)]}]
    with live_server.http() as http:
        res = http.post("/v1/chat/completions", json={"model": "default", "messages": messages})
    assert res.status_code == 400
    assert "transcription model" in res.json()["error"]["message"]


def word_errors(heard: list[str], said: list[str]) -> int:
    """Word-level edit distance (substitutions, insertions, deletions)."""
    row = list(range(len(said) + 1))
    for i, h in enumerate(heard, 1):
        prev, row[0] = row[0], i
        for j, s in enumerate(said, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (h != s))
    return row[-1]
