"""From a model reference (path, hub id, or the default) to a runnable model."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import torch

from mistralrs_serve.config import ModelConfig
from mistralrs_serve.errors import ModelLoadError
from mistralrs_serve.models import gguf_loader, hf_loader, hub
from mistralrs_serve.models.default_model import DEFAULT_MODEL_ID, default_model_path
from mistralrs_serve.models.interface import CausalLM
from mistralrs_serve.models.packaged import PACKAGED, packaged_model_path
from mistralrs_serve.models.registry import find_architecture
from mistralrs_serve.models.vision import VisionModel, load_vision
from mistralrs_serve.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


# A name with one of these endings means a local file, never a repo id.
LOCAL_SUFFIXES = (".gguf", ".safetensors", ".json", ".bin")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. `kind`: default, packaged (a name in
    packaged.PACKAGED), gguf, hf_dir or hub."""

    kind: str
    location: str | None = None  # file, directory or repo id
    filename: str | None = None  # a GGUF inside `location` (directory or repo)
    revision: str | None = None
    tokenizer_location: str | None = None  # HF-layout dir or repo id to take the tokenizer from
    chat_template: str | None = None
    mmproj: str | None = None  # a GGUF text model's llama.cpp multimodal projector (models/mmproj.py)

    @classmethod
    def parse(
        cls, model: str | None, chat_template: str | None = None, mmproj: str | None = None
    ) -> ModelSource:
        """Resolve a CLI `-m` value: nothing/"default", a GGUF file, a directory, or a hub id."""
        source = cls._parse(model, chat_template)
        if mmproj is None:
            return source
        if source.kind != "gguf":
            raise ModelLoadError(f"--mmproj {mmproj}: a projector goes with a GGUF text model, not {model!r}")
        if not Path(mmproj).expanduser().is_file():
            raise ModelLoadError(f"--mmproj {mmproj}: no such file")
        return replace(source, mmproj=str(Path(mmproj).expanduser()))

    @classmethod
    def _parse(cls, model: str | None, chat_template: str | None) -> ModelSource:
        if model is None or model in ("", "default"):
            return cls("default", chat_template=chat_template)
        if model in PACKAGED:
            return cls("packaged", model, chat_template=chat_template)
        path = Path(model).expanduser()
        if path.is_file():
            return cls("gguf", str(path), chat_template=chat_template)
        if path.is_dir():
            return cls._from_dir(path, chat_template)
        if hub.is_repo_id(model) and path.suffix not in LOCAL_SUFFIXES:
            return cls("hub", model, chat_template=chat_template)
        raise ModelLoadError(f"{model}: no such file or directory, and not a Hugging Face repo id")

    @classmethod
    def _from_dir(cls, path: Path, chat_template: str | None) -> ModelSource:
        """A Hugging Face directory, or one GGUF text model (with its `mmproj*.gguf`
        projector beside it, if there is one)."""
        if (path / "config.json").exists():
            return cls("hf_dir", str(path), chat_template=chat_template)
        ggufs = sorted(path.glob("*.gguf"))
        projectors = [g for g in ggufs if g.name.lower().startswith("mmproj")]
        models = [g for g in ggufs if g not in projectors]
        if len(models) == 1 and len(projectors) <= 1:
            mmproj = str(projectors[0]) if projectors else None
            return cls("gguf", str(models[0]), chat_template=chat_template, mmproj=mmproj)
        raise ModelLoadError(
            f"{path}: expected config.json (Hugging Face layout) or exactly one .gguf file (and at most "
            f"one mmproj*.gguf projector), found {len(models)} model and {len(projectors)} projector files"
        )


@dataclass
class LoadedModel:
    name: str  # the id /v1/models reports
    model: CausalLM
    tokenizer: Tokenizer
    config: ModelConfig
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    load_time_s: float = 0.0
    vision: VisionModel | None = None  # a vision-language checkpoint's image side


def load_model(source: ModelSource, dtype: torch.dtype = torch.bfloat16) -> LoadedModel:
    start = time.perf_counter()
    if source.kind == "default":
        loaded = _load_gguf(default_model_path(), source, dtype, name=DEFAULT_MODEL_ID)
    elif source.kind == "packaged" and source.location in PACKAGED:
        path = packaged_model_path(source.location)
        loaded = _load_gguf(path, source, dtype, name=PACKAGED[source.location].model_id)
    elif source.kind == "gguf":
        loaded = _load_gguf(_gguf_path(source), source, dtype, name=None)
    elif source.kind in ("hf_dir", "hub"):
        loaded = _load_hf(source, dtype)
    else:
        raise ModelLoadError(f"unknown model source kind {source.kind!r}")
    loaded.load_time_s = time.perf_counter() - start
    logger.info(
        "loaded %s (%s, %d layers) in %.2f s",
        loaded.name,
        loaded.config.architecture,
        loaded.config.num_layers,
        loaded.load_time_s,
    )
    return loaded


def _gguf_path(source: ModelSource) -> Path:
    if source.location is None:
        raise ModelLoadError("a GGUF model needs a file, directory or repo id")
    if source.filename is None:
        return Path(source.location)
    local = Path(source.location).expanduser() / source.filename
    if local.exists():
        return local
    if Path(source.location).expanduser().is_dir() or not hub.is_repo_id(source.location):
        raise ModelLoadError(f"{local}: no such file")
    return hub.download_file(source.location, source.filename, source.revision)


def _load_gguf(path: Path, source: ModelSource, dtype: torch.dtype, name: str | None) -> LoadedModel:
    gguf, arch, cfg = gguf_loader.read_gguf(path)
    if source.tokenizer_location:
        tokenizer = hf_loader.load_hf_tokenizer(
            _model_dir(source.tokenizer_location, None), source.chat_template
        )
    else:
        tokenizer = gguf_loader.load_gguf_tokenizer(gguf, source.chat_template)
    try:
        model = arch.model(cfg, gguf_loader.load_gguf_weights(gguf, arch, cfg, dtype), dtype)
    except ModelLoadError as e:
        _raise_naming(path, e)
    vision = None
    if source.mmproj is not None:
        from mistralrs_serve.models.mmproj import load_mmproj

        vision = load_mmproj(Path(source.mmproj), tokenizer, cfg)
    return LoadedModel(name or path.name, model, tokenizer, cfg, vision=vision)


def _raise_naming(path: Path, e: ModelLoadError) -> NoReturn:
    """Re-raise `e`, with `path` in front of its message unless it names the file already."""
    if str(path) in str(e):
        raise e
    raise type(e)(f"{path}: {e}") from e


def _model_dir(location: str, revision: str | None) -> Path:
    path = Path(location).expanduser()
    if path.is_dir():
        return path
    if hub.is_repo_id(location):
        return hub.download_model_dir(location, revision)
    raise ModelLoadError(f"{location}: no such directory, and not a Hugging Face repo id")


def _load_hf(source: ModelSource, dtype: torch.dtype) -> LoadedModel:
    if source.location is None:
        raise ModelLoadError("a Hugging Face model needs a directory or repo id")
    model_dir = _model_dir(source.location, source.revision)
    cfg = hf_loader.read_hf_config(model_dir)
    tokenizer = hf_loader.load_hf_tokenizer(model_dir, source.chat_template)
    try:
        arch = find_architecture(name=cfg.architecture)
        # a vision-language checkpoint's text model (a text checkpoint is left as it is)
        weights = hf_loader.text_weights(hf_loader.load_safetensors(model_dir, dtype))
        model = arch.model(cfg, weights, dtype)
        del weights
        raw = hf_loader.read_json(model_dir / "config.json", required=True)
        vision = load_vision(model_dir, raw, tokenizer)
    except ModelLoadError as e:
        _raise_naming(model_dir, e)
    defaults = hf_loader.generation_defaults(model_dir)
    return LoadedModel(source.location, model, tokenizer, cfg, defaults, vision=vision)
