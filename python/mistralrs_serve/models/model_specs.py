"""What a server serves: one `ModelSpec` per model, from `-m` flags (repeatable,
`-m [KIND:]SOURCE`), from a `--models-config` TOML file, and from
`--with-defaults`.

Kinds: chat (the LLM engine), embedding (sentence-transformers directories,
BERT encoders or decoders with last-token pooling), speech (Piper voices),
transcription (CTranslate2 Whisper) and image (a diffusers pipeline
directory). A `-m` without a kind gets one from what the source is: a
packaged name's kind, a directory with `model_index.json` (image), one with
`modules.json` (embedding), an `.onnx` voice (speech), a CTranslate2
`model.bin` (transcription), anything else chat.

The TOML file:

    [[models]]
    kind = "embedding"                  # chat, embedding, speech, transcription
    source = "all-minilm-l6-v2"         # a path, a hub id, a packaged name or "default"
    name = "minilm"                     # optional: the id clients send as `model`
    default = true                      # optional: this kind's default (else its first)
    [models.options]                    # optional, by kind (OPTIONS)
    matryoshka_dimensions = [384, 256, 128]

A speech model's `voices` table maps voice names to sources; its first voice is
the default voice."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from mistralrs_serve.errors import ModelLoadError
from mistralrs_serve.models.packaged import PACKAGED, PACKAGED_DIRS

KINDS = ("chat", "embedding", "speech", "transcription", "image")
# each kind's alias for its default model, and OpenAI's model names that mean it
DEFAULT_ALIASES = {
    "chat": "default",
    "embedding": "default-embedding",
    "speech": "default-speech",
    "transcription": "default-transcription",
    "image": "default-image",
}
OPENAI_NAMES = {
    "embedding": ("text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002"),
    "speech": ("tts-1", "tts-1-hd", "gpt-4o-mini-tts"),
    "transcription": ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe"),
    "image": ("dall-e-2", "dall-e-3", "gpt-image-1"),
}
# what --with-defaults adds: the packaged embedder, voice and transcriber
DEFAULT_SOURCES = {
    "embedding": "all-minilm-l6-v2",
    "speech": "en_US-joe-medium",
    "transcription": "whisper-tiny.en",
}
# the options each kind takes in a config file, and their types
OPTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "chat": {
        "chat_template": str,
        "mmproj": str,
        "dtype": str,
        "kv_cache_mb": int,
        "max_seqs": int,
        "max_seq_len": int,
        "block_size": int,
        "max_num_batched_tokens": int,
        "prefix_cache": bool,
        "device": str,
    },
    "embedding": {
        "matryoshka_dimensions": list,
        "max_batch_tokens": int,
        "max_seq_length": int,
        "pooling": str,
        "normalize": bool,
    },
    "speech": {"voices": dict, "max_input_chars": int},
    "transcription": {"compute_type": str, "beam_size": int, "threads": int},
    "image": {"dtype": str, "max_pixels": int, "steps": int},
}


@dataclass(frozen=True)
class ModelSpec:
    kind: str
    source: str
    name: str | None = None  # None: the name the loaded model reports
    default: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ModelLoadError(f"model kind {self.kind!r}: one of {', '.join(KINDS)}")
        allowed = OPTIONS[self.kind]
        for key, value in self.options.items():
            if key not in allowed:
                raise ModelLoadError(
                    f"{self.source}: option {key!r} is not one a {self.kind} model takes "
                    f"({', '.join(sorted(allowed))})"
                )
            if not isinstance(value, allowed[key]) or (allowed[key] is int and isinstance(value, bool)):
                raise ModelLoadError(f"{self.source}: option {key!r} has the wrong type ({value!r})")

    def served_name(self) -> str:
        """The id clients send: the configured name, else a packaged model's id, else the source."""
        if self.name:
            return self.name
        packaged = PACKAGED_DIRS.get(self.source) or PACKAGED.get(self.source)
        if packaged is not None:
            return packaged.model_id
        path = Path(self.source).expanduser()
        return path.name if path.exists() else self.source


def infer_kind(source: str) -> str:
    """The kind of a source given without one (see the module's note)."""
    if source in PACKAGED_DIRS:
        return PACKAGED_DIRS[source].kind
    path = Path(source).expanduser()
    if path.is_file():
        return "speech" if path.suffix == ".onnx" else "chat"
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return "image"
        if (path / "modules.json").is_file() or (path / "sentence_bert_config.json").is_file():
            return "embedding"
        if any(path.glob("*.onnx.json")):
            return "speech"
        vocabulary = any((path / f).exists() for f in ("vocabulary.txt", "vocabulary.json"))
        if (path / "model.bin").is_file() and vocabulary:
            return "transcription"
    return "chat"


def parse_model_arg(value: str) -> ModelSpec:
    """A `-m` value: `SOURCE` or `KIND:SOURCE`."""
    kind, sep, rest = value.partition(":")
    if sep and kind in KINDS:
        return ModelSpec(kind, rest)
    return ModelSpec(infer_kind(value), value)


def load_models_config(path: str | Path) -> list[ModelSpec]:
    """The `[[models]]` of a TOML file; errors name the file and the entry."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ModelLoadError(f"{p}: {e}") from None
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise ModelLoadError(f"{p}: expected one or more [[models]] tables")
    specs = []
    for i, entry in enumerate(entries):
        unknown = set(entry) - {"kind", "source", "name", "default", "options"}
        if unknown or "source" not in entry:
            raise ModelLoadError(
                f"{p}: models[{i}] needs 'source' and takes kind, name, default and options"
                + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else "")
            )
        source = str(entry["source"])
        specs.append(
            ModelSpec(
                kind=str(entry.get("kind") or infer_kind(source)),
                source=source,
                name=entry.get("name"),
                default=bool(entry.get("default", False)),
                options=dict(entry.get("options", {})),
            )
        )
    return specs


def with_defaults(specs: Sequence[ModelSpec]) -> list[ModelSpec]:
    """`specs` plus the packaged default of every kind they lack."""
    have = {s.kind for s in specs}
    return list(specs) + [ModelSpec(k, src) for k, src in DEFAULT_SOURCES.items() if k not in have]


def check_names(specs: Sequence[ModelSpec]) -> None:
    """Served names (and aliases) must be unique, and each kind has at most one marked default."""
    seen: dict[str, str] = {}
    reserved = set(DEFAULT_ALIASES.values()) | {n for names in OPENAI_NAMES.values() for n in names}
    for s in specs:
        if s.name is not None and s.name in reserved:
            raise ModelLoadError(f"model name {s.name!r} is reserved as an alias")
        if s.name is not None and s.name in seen:
            raise ModelLoadError(f"two models are named {s.name!r}")
        if s.name is not None:
            seen[s.name] = s.kind
    for kind in KINDS:
        if sum(1 for s in specs if s.kind == kind and s.default) > 1:
            raise ModelLoadError(f"more than one {kind} model is marked default")
