"""Hugging Face hub ids: download what we load, into the hub cache.

`HF_ENDPOINT` points huggingface_hub at a mirror (the tests serve a tiny
model from loopback); `HF_HUB_OFFLINE=1` uses the cache alone.
"""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from mistralrs_serve.errors import ModelLoadError

REPO_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What a Hugging Face layout model needs; skips other formats' weights.
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


def is_repo_id(name: str) -> bool:
    return bool(REPO_ID_RE.fullmatch(name)) and not name.startswith((".", "/"))


def download_model_dir(repo_id: str, revision: str | None = None) -> Path:
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        raise ModelLoadError(f"hub model {repo_id!r}: download failed ({_short(e)})") from e


def download_file(repo_id: str, filename: str, revision: str | None = None) -> Path:
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        raise ModelLoadError(f"hub file {repo_id}/{filename}: download failed ({_short(e)})") from e


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
