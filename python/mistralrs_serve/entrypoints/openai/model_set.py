"""The models one server serves, by name and kind.

Each model (models/model_specs.ModelSpec) loads on its own thread when the
server starts and then answers on its own workers: chat models on their
engine thread, embedders on their EmbeddingEngine's thread, voices and
transcribers on a one-thread executor each, so a long transcription does not
hold up an embedding or a chat stream.

`resolve(model, kind)` is how a route finds its model: by served name, by
its kind's default alias (`default`, `default-embedding`, `default-speech`,
`default-transcription`) or by OpenAI's model names for the kind
(`whisper-1`, `tts-1`, `text-embedding-3-small`, ...). A model of another
kind is a 400 naming `model`; an unknown one a 404; one still loading a 503."""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mistralrs_serve.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError, ServerBusyError
from mistralrs_serve.models.model_specs import DEFAULT_ALIASES, KINDS, OPENAI_NAMES, ModelSpec

logger = logging.getLogger("mistralrs_serve.models")


@dataclass(eq=False)
class ServedModel:
    spec: ModelSpec
    load: Callable[[], Any]
    name: str = ""
    serving: Any = None  # chat: a ChatModel (api_server); else Embedding/Speech/TranscriptionServing
    error: str | None = None
    executor: ThreadPoolExecutor | None = None

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def status(self) -> str:
        return "ready" if self.serving is not None else "failed" if self.error else "loading"


class ModelSet:
    def __init__(self) -> None:
        self.models: list[ServedModel] = []

    def add(self, spec: ModelSpec, load: Callable[[], Any]) -> ServedModel:
        entry = ServedModel(spec, load, name=spec.served_name())
        if spec.kind in ("speech", "transcription", "image"):
            entry.executor = ThreadPoolExecutor(1, thread_name_prefix=f"{spec.kind}-{entry.name}")
        self.models.append(entry)
        return entry

    def start(self, wrap: Callable[[ServedModel, Any], Any] = lambda e, loaded: loaded) -> None:
        """Load every model, each on its own thread; `wrap` makes what was loaded its serving."""
        for entry in self.models:
            threading.Thread(
                target=self._load, args=(entry, wrap), name=f"load-{entry.spec.kind}", daemon=True
            ).start()

    def _load(self, entry: ServedModel, wrap: Callable[[ServedModel, Any], Any]) -> None:
        try:
            start = time.perf_counter()
            entry.serving = wrap(entry, entry.load())
            logger.info("%s model %s loaded in %.1f s", entry.kind, entry.name, time.perf_counter() - start)
        except Exception as e:
            logger.exception("the %s model %s failed to load", entry.kind, entry.name or entry.spec.source)
            entry.error = f"{type(e).__name__}: {e}"

    def default_of(self, kind: str) -> ServedModel | None:
        of_kind = [m for m in self.models if m.kind == kind]
        return next((m for m in of_kind if m.spec.default), of_kind[0] if of_kind else None)

    def find(self, model: str) -> ServedModel | None:
        """The model a request's `model` names: a served name, or an alias of a kind's default."""
        for m in self.models:
            if m.name and m.name == model:
                return m
        for kind in KINDS:
            if model == DEFAULT_ALIASES[kind] or model in OPENAI_NAMES.get(kind, ()):
                return self.default_of(kind)
        return None

    def resolve(self, model: str, kind: str) -> ServedModel:
        """The ready model of `kind` that `model` names (see the module's note for the errors)."""
        entry = self.find(model)
        if entry is None and any(m.name == "" and m.status == "loading" for m in self.models):
            raise ServerBusyError("the models are still loading", retry_after_s=5)
        if entry is None:
            raise ModelNotFoundError(model, self.names(kind) or self.names())
        if entry.kind != kind:
            raise InvalidRequestError(
                f"model {model!r} is {_a(entry.kind)} model; this endpoint needs {_a(kind)} model"
                + (
                    f" ({', '.join(self.names(kind))})"
                    if self.names(kind)
                    else ", and this server serves none"
                ),
                "model",
            )
        if entry.serving is None:
            if entry.error is not None:
                raise ServerBusyError(
                    f"the {entry.kind} model {entry.name or model!r} failed to load: {entry.error}",
                    retry_after_s=60,
                )
            raise ServerBusyError(f"model {entry.name} is still loading", retry_after_s=5)
        return entry

    def names(self, kind: str | None = None) -> list[str]:
        return [m.name for m in self.models if kind is None or m.kind == kind]

    def aliases(self) -> list[tuple[str, ServedModel]]:
        """(alias, model) for each kind's default alias."""
        out = []
        for kind in KINDS:
            entry = self.default_of(kind)
            if entry is not None:
                out.append((DEFAULT_ALIASES[kind], entry))
        return out

    def health(self) -> dict[str, dict[str, Any]]:
        return {m.name: {"kind": m.kind, "status": m.status, "error": m.error} for m in self.models}

    def shutdown(self) -> None:
        for m in self.models:
            if m.executor is not None:
                m.executor.shutdown(wait=False, cancel_futures=True)
            stop = getattr(getattr(m.serving, "engine", None), "shutdown", None)
            if callable(stop):
                stop()


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def model_dir(source: str) -> Path:
    """A non-chat model's directory (or file): packaged name, local path or hub repo id."""
    from mistralrs_serve.models import hub
    from mistralrs_serve.models.packaged import PACKAGED_DIRS, packaged_directory

    if source in PACKAGED_DIRS:
        return packaged_directory(source)
    path = Path(source).expanduser()
    if path.exists():
        return path
    if hub.is_repo_id(source):
        return hub.download_model_dir(source)
    raise ModelLoadError(f"{source}: no such file or directory, not a packaged model, nor a hub repo id")


def build_serving(spec: ModelSpec) -> Any:
    """The serving object of a non-chat model (what `ServedModel.serving` holds)."""
    library = {"speech": "piper", "transcription": "faster_whisper"}.get(spec.kind)
    if library is not None and importlib.util.find_spec(library) is None:
        raise ModelLoadError(
            f"{spec.kind} models need the audio extra ({library} is missing): "
            "pip install 'mistralrs-serve[audio]'"
        )
    name, opts = spec.served_name(), spec.options
    if spec.kind == "embedding":
        from mistralrs_serve.engine.embedding_engine import EmbeddingEngine
        from mistralrs_serve.entrypoints.openai.serving_embedding import EmbeddingServing
        from mistralrs_serve.models.sentence_embedder import load_sentence_embedder

        embedder = load_sentence_embedder(model_dir(spec.source), **_embedder_options(opts))
        engine = EmbeddingEngine(embedder, name)
        return EmbeddingServing(engine, name, embedder.vocab_size, opts.get("matryoshka_dimensions", ()))
    if spec.kind == "speech":
        from mistralrs_serve.audio.speech import MAX_INPUT_CHARS, PiperSpeech, find_voice
        from mistralrs_serve.entrypoints.openai.serving_audio import SpeechServing

        sources = opts.get("voices") or {find_voice(model_dir(spec.source)).stem: spec.source}
        voices = {str(v): model_dir(str(src)) for v, src in sources.items()}
        return SpeechServing(PiperSpeech(voices, int(opts.get("max_input_chars", MAX_INPUT_CHARS))), name)
    if spec.kind == "transcription":
        from mistralrs_serve.audio.transcription import WhisperTranscriber
        from mistralrs_serve.entrypoints.openai.serving_audio import TranscriptionServing

        model = WhisperTranscriber(
            model_dir(spec.source),
            compute_type=str(opts.get("compute_type", "int8")),
            threads=int(opts.get("threads", 0)),
            beam_size=int(opts.get("beam_size", 1)),
        )
        return TranscriptionServing(model, name)
    if spec.kind == "image":
        try:
            import diffusers  # noqa: F401
        except ImportError:
            raise ModelLoadError(
                "image models need the image extra: pip install 'mistralrs-serve[image]'"
            ) from None
        from mistralrs_serve.entrypoints.openai.serving_images import ImageServing
        from mistralrs_serve.images.diffusion import DiffusionModel

        return ImageServing(
            DiffusionModel(
                model_dir(spec.source),
                dtype=str(opts.get("dtype", "float32")),
                max_pixels=int(opts.get("max_pixels", 2048 * 2048)),
                default_steps=opts.get("steps"),
            ),
            name,
        )
    raise ModelLoadError(f"build_serving: {spec.kind} models load through the engine")


def _embedder_options(opts: Any) -> dict[str, Any]:
    keys = ("max_batch_tokens", "max_seq_length", "pooling", "normalize")
    return {k: opts[k] for k in keys if k in opts}
