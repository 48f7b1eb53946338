"""Speech to text with Whisper through faster-whisper (CTranslate2).

A transcription model is a CTranslate2 Whisper directory (`model.bin`,
`config.json`, `tokenizer.json`, `vocabulary.txt`): tiny.en and base come
packaged (models/packaged.py). `transcribe` takes 16 kHz mono samples
(audio/codecs.decode_audio) and yields segments as they are decoded, so a
stream can send each one when it is ready; `task="translate"` gives English
from any language the model knows."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mistralrs_serve.errors import InvalidRequestError, ModelLoadError

# ISO 639-1 codes Whisper knows and their English names (verbose_json names the language)
LANGUAGE_NAMES = dict(
    pair.split(":")
    for pair in [
        "en:english",
        "zh:chinese",
        "de:german",
        "es:spanish",
        "ru:russian",
        "ko:korean",
        "fr:french",
        "ja:japanese",
        "pt:portuguese",
        "tr:turkish",
        "pl:polish",
        "ca:catalan",
        "nl:dutch",
        "ar:arabic",
        "sv:swedish",
        "it:italian",
        "id:indonesian",
        "hi:hindi",
        "fi:finnish",
        "vi:vietnamese",
        "he:hebrew",
        "uk:ukrainian",
        "el:greek",
        "ms:malay",
        "cs:czech",
        "ro:romanian",
        "da:danish",
        "hu:hungarian",
        "ta:tamil",
        "no:norwegian",
        "th:thai",
        "ur:urdu",
        "hr:croatian",
        "bg:bulgarian",
        "lt:lithuanian",
        "la:latin",
        "mi:maori",
        "ml:malayalam",
        "cy:welsh",
        "sk:slovak",
        "te:telugu",
        "fa:persian",
        "lv:latvian",
        "bn:bengali",
        "sr:serbian",
        "az:azerbaijani",
        "sl:slovenian",
        "kn:kannada",
        "et:estonian",
        "mk:macedonian",
        "br:breton",
        "eu:basque",
        "is:icelandic",
        "hy:armenian",
        "ne:nepali",
        "mn:mongolian",
        "bs:bosnian",
        "kk:kazakh",
        "sq:albanian",
        "sw:swahili",
        "gl:galician",
        "mr:marathi",
        "pa:punjabi",
        "si:sinhala",
        "km:khmer",
        "sn:shona",
        "yo:yoruba",
        "so:somali",
        "af:afrikaans",
        "oc:occitan",
        "ka:georgian",
        "be:belarusian",
        "tg:tajik",
        "sd:sindhi",
        "gu:gujarati",
        "am:amharic",
        "yi:yiddish",
        "lo:lao",
        "uz:uzbek",
        "fo:faroese",
        "ht:haitian",
        "ps:pashto",
        "tk:turkmen",
        "nn:nynorsk",
        "mt:maltese",
        "sa:sanskrit",
        "lb:luxembourgish",
        "my:myanmar",
        "bo:tibetan",
        "tl:tagalog",
        "mg:malagasy",
        "as:assamese",
        "tt:tatar",
        "haw:hawaiian",
        "ln:lingala",
        "ha:hausa",
        "ba:bashkir",
        "jw:javanese",
        "su:sundanese",
        "yue:cantonese",
    ]
)


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float


@dataclass(frozen=True)
class Segment:
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[Word] = field(default_factory=list)


@dataclass
class Transcript:
    language: str  # ISO 639-1 code
    duration: float  # seconds of input audio
    segments: list[Segment]

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments).strip()


@dataclass(frozen=True)
class TranscribeOptions:
    language: str | None = None
    prompt: str | None = None
    temperature: float = 0.0  # 0: greedy, with faster-whisper's fallback to higher ones
    task: str = "transcribe"
    word_timestamps: bool = False


class WhisperTranscriber:
    def __init__(self, directory: Path, compute_type: str = "int8", threads: int = 0, beam_size: int = 1):
        from faster_whisper import WhisperModel

        if not (directory / "model.bin").is_file():
            raise ModelLoadError(f"{directory}: not a CTranslate2 Whisper model (no model.bin)")
        self.model = WhisperModel(
            str(directory), device="cpu", compute_type=compute_type, cpu_threads=threads
        )
        self.beam_size = beam_size
        self.languages = set(self.model.supported_languages)
        self.multilingual = bool(self.model.model.is_multilingual)

    def check(self, options: TranscribeOptions) -> None:
        if options.language is not None and options.language not in self.languages:
            known = "en only" if not self.multilingual else "ISO 639-1 codes such as en, de, fr"
            raise InvalidRequestError(
                f"language {options.language!r} is not one this model knows ({known})", "language"
            )
        if options.task == "translate" and not self.multilingual:
            raise InvalidRequestError("this model is English-only: it cannot translate", "model")
        if not 0.0 <= options.temperature <= 1.0:
            raise InvalidRequestError(
                f"temperature must be in [0, 1], got {options.temperature}", "temperature"
            )

    def transcribe(
        self, audio: np.ndarray, options: TranscribeOptions
    ) -> tuple[str, float, Iterator[Segment]]:
        """(language, duration, segments as they are decoded)."""
        self.check(options)
        temperature: Any = options.temperature if options.temperature > 0 else [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
        segments, info = self.model.transcribe(
            audio,
            language=options.language,
            task=options.task,
            beam_size=self.beam_size,
            temperature=temperature,
            initial_prompt=options.prompt or None,
            word_timestamps=options.word_timestamps,
            vad_filter=False,
        )

        def ours() -> Iterator[Segment]:
            for s in segments:
                yield Segment(
                    id=s.id,
                    seek=s.seek,
                    start=float(s.start),
                    end=float(s.end),
                    text=s.text,
                    tokens=list(s.tokens),
                    temperature=float(s.temperature or 0.0),
                    avg_logprob=float(s.avg_logprob),
                    compression_ratio=float(s.compression_ratio),
                    no_speech_prob=float(s.no_speech_prob),
                    words=[Word(w.word, float(w.start), float(w.end)) for w in s.words or []],
                )

        return info.language, float(info.duration), ours()

    def transcript(self, audio: np.ndarray, options: TranscribeOptions) -> Transcript:
        language, duration, segments = self.transcribe(audio, options)
        return Transcript(language, duration, list(segments))
