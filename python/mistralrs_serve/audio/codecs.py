"""Audio bytes in and out.

In: any container and codec FFmpeg reads (through PyAV, which faster-whisper
brings), decoded to 16 kHz mono float32, what Whisper takes. Bytes that are not
audio, or audio without a sample, are a 400 naming the field they came in.

Out: `wav` (16-bit PCM in RIFF), `pcm` (raw 16-bit little-endian, as OpenAI's
`pcm`: no header), and, beyond the spec, `flac` and `mp3` through PyAV's
encoders. `AudioEncoder` takes the samples in pieces and gives back the bytes
each piece makes, so speech can stream as it is synthesized."""

from __future__ import annotations

import io
import struct
from typing import Any

import numpy as np

from mistralrs_serve.errors import InvalidRequestError

WHISPER_RATE = 16_000
FORMATS = ("wav", "pcm", "flac", "mp3")
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg"}


def decode_audio(data: bytes, param: str, rate: int = WHISPER_RATE) -> np.ndarray:
    """`data` as mono float32 samples at `rate`; a 400 naming `param` if it holds no audio."""
    if not data:
        raise InvalidRequestError("the audio is empty", param)
    import av

    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise InvalidRequestError("the file has no audio stream", param)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            pieces: list[np.ndarray] = []
            for frame in container.decode(audio=0):
                pieces.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(frame))
            pieces.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(None))
    except InvalidRequestError:
        raise
    except Exception as e:  # FFmpeg's many errors for bytes it cannot read
        raise InvalidRequestError(f"the audio could not be decoded: {e}", param) from None
    samples = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    if samples.size == 0:
        raise InvalidRequestError("the audio holds no samples", param)
    return samples.astype(np.float32, copy=False)


def wav_header(rate: int, frames: int | None) -> bytes:
    """A 44-byte RIFF header for mono 16-bit PCM; `frames` None (streaming) writes the
    largest sizes, which players read as "to the end of the stream"."""
    data = 0xFFFFFFFF - 36 if frames is None else frames * 2
    return (
        b"RIFF"
        + struct.pack("<I", data + 36)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", data)
    )


def check_format(fmt: str) -> None:
    """A 400 naming `response_format` unless `fmt` is one this module writes."""
    if fmt not in FORMATS:
        raise InvalidRequestError(
            f"response_format {fmt!r} is not supported; use one of {', '.join(FORMATS)}", "response_format"
        )


class _Sink(io.RawIOBase):
    """A write-only file PyAV muxes into; `take` returns what was written since."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.parts.append(bytes(b))
        return len(b)

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


class AudioEncoder:
    """Mono 16-bit samples at `rate` into `fmt`'s bytes, piece by piece."""

    def __init__(self, fmt: str, rate: int, streaming: bool) -> None:
        check_format(fmt)
        self.fmt, self.rate, self.streaming = fmt, rate, streaming
        self._pending: list[np.ndarray] = []  # a whole wav's samples, for its exact header
        self._started = False
        self._av: Any = None
        if fmt in ("flac", "mp3"):
            self._open_av()

    def _open_av(self) -> None:
        import av

        self._sink = _Sink()
        out = av.open(self._sink, mode="w", format=self.fmt)
        stream = out.add_stream("flac" if self.fmt == "flac" else "libmp3lame", rate=self.rate)
        stream.layout = "mono"
        stream.format = "s16" if self.fmt == "flac" else "s16p"
        self._av, self._stream, self._pts = out, stream, 0

    def feed(self, samples: np.ndarray) -> bytes:
        """The bytes these samples (int16) make now; a whole (non-streaming) wav waits for `finish`."""
        samples = np.ascontiguousarray(samples, dtype=np.int16)
        if self.fmt == "pcm":
            return samples.tobytes()
        if self.fmt == "wav":
            if not self.streaming:
                self._pending.append(samples)
                return b""
            head = b"" if self._started else wav_header(self.rate, None)
            self._started = True
            return head + samples.tobytes()
        return self._encode(samples)

    def _encode(self, samples: np.ndarray | None) -> bytes:
        import av

        if samples is not None and samples.size:
            frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate, frame.pts = self.rate, self._pts
            self._pts += samples.size
            for packet in self._stream.encode(frame):
                self._av.mux(packet)
        elif samples is None:
            for packet in self._stream.encode(None):
                self._av.mux(packet)
            self._av.close()
        return self._sink.take()

    def finish(self) -> bytes:
        """The bytes that close the stream (the whole file for a non-streaming wav)."""
        if self.fmt == "pcm":
            return b""
        if self.fmt == "wav":
            if self.streaming:
                return b"" if self._started else wav_header(self.rate, None)
            data = np.concatenate(self._pending) if self._pending else np.zeros(0, np.int16)
            return wav_header(self.rate, data.size) + data.tobytes()
        return self._encode(None)


def encode_audio(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    """A whole file of `fmt` from int16 mono samples."""
    encoder = AudioEncoder(fmt, rate, streaming=False)
    return encoder.feed(samples) + encoder.finish()
