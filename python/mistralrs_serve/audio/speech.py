"""Text to speech with Piper voices (`piper-tts`, ONNX Runtime).

A speech model is one or more voices: each a Piper `.onnx` file with its
`.onnx.json` beside it. A directory holding one voice loads as that voice,
named after the file (`en_US-joe-medium`); a config can name several. Piper
synthesizes sentence by sentence, which is what `stream_format: "audio"`
streams. `speed` maps to Piper's length scale (1 / speed)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mistralrs_serve.errors import InvalidRequestError, ModelLoadError

MAX_INPUT_CHARS = 4096  # OpenAI's limit for one request's text
SPEED_RANGE = (0.25, 4.0)
# OpenAI's built-in voices: a client written for OpenAI sends one of these; it gets the default voice
OPENAI_VOICES = frozenset(
    [
        "alloy",
        "ash",
        "ballad",
        "coral",
        "echo",
        "fable",
        "onyx",
        "nova",
        "sage",
        "shimmer",
        "verse",
        "marin",
        "cedar",
    ]
)


@dataclass(frozen=True)
class SpeechChunk:
    samples: np.ndarray  # int16 mono
    rate: int


def find_voice(path: Path) -> Path:
    """The `.onnx` file of a voice given as the file or as a directory holding one."""
    if path.is_file() and path.suffix == ".onnx":
        return path
    if path.is_dir():
        found = sorted(path.glob("*.onnx"))
        if len(found) == 1:
            return found[0]
        raise ModelLoadError(f"{path}: expected one Piper voice (*.onnx), found {len(found)}")
    raise ModelLoadError(f"{path}: not a Piper voice (an .onnx file with its .onnx.json, or their directory)")


class PiperSpeech:
    """Several Piper voices behind one model name; `default` is the first."""

    def __init__(self, voices: dict[str, Path], max_input_chars: int = MAX_INPUT_CHARS) -> None:
        from piper import PiperVoice

        if not voices:
            raise ModelLoadError("a speech model needs at least one voice")
        self.voices: dict[str, Any] = {}
        for name, path in voices.items():
            onnx = find_voice(path)
            config = onnx.with_name(onnx.name + ".json")
            if not config.is_file():
                raise ModelLoadError(f"{onnx}: its config {config.name} is missing")
            self.voices[name] = PiperVoice.load(onnx, config_path=config)
        self.default = next(iter(voices))
        self.max_input_chars = max_input_chars

    def voice_of(self, voice: str | None) -> str:
        if voice is None or voice in OPENAI_VOICES:
            return self.default
        if voice not in self.voices:
            raise InvalidRequestError(
                f"voice {voice!r} is not configured; this model's voices: {', '.join(self.voices)}", "voice"
            )
        return voice

    def sample_rate(self, voice: str) -> int:
        return int(self.voices[voice].config.sample_rate)

    def check(self, text: str, speed: float) -> None:
        if not text.strip():
            raise InvalidRequestError("input is empty", "input")
        if len(text) > self.max_input_chars:
            raise InvalidRequestError(
                f"input has {len(text)} characters; this voice takes at most {self.max_input_chars}", "input"
            )
        low, high = SPEED_RANGE
        if not low <= speed <= high:
            raise InvalidRequestError(f"speed must be in [{low}, {high}], got {speed}", "speed")

    def synthesize(self, text: str, voice: str, speed: float = 1.0) -> Iterator[SpeechChunk]:
        """The speech of `text`, a chunk per sentence, as it is made."""
        from piper import SynthesisConfig

        self.check(text, speed)
        model = self.voices[voice]
        config = SynthesisConfig(length_scale=float(model.config.length_scale) / speed)
        for chunk in model.synthesize(text, syn_config=config):
            yield SpeechChunk(chunk.audio_int16_array, chunk.sample_rate)
