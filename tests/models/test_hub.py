"""Hub ids: a tiny model served from loopback by a fake Hugging Face hub; ModelSource.parse rules.

The fake hub implements what huggingface_hub 2.x's snapshot_download / hf_hub_download call:
GET /api/models/{repo}/revision/{rev} (repo info: sha, siblings), GET /api/models/{repo}/tree/{rev}
(the file listing, one page), and HEAD/GET /{repo}/resolve/{rev}/{file} with ETag, X-Repo-Commit and
Content-Length. An unknown repo answers 404 with X-Error-Code: RepoNotFound, as the Hub does.
huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE into huggingface_hub.constants at import,
so the tests set both the environment and those constants.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import tiny_models as tm
import torch
from mistralrs_serve.errors import ModelLoadError
from mistralrs_serve.models import hub
from mistralrs_serve.models.loader import ModelSource, load_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "tiny-org/tiny-llama"
GGUF_REPO = "tiny-org/tiny-gguf"


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """A threaded HTTP server holding repos (repo id -> directory); records request paths."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.requests: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo: str) -> dict[str, Path]:
        root = self.repos[repo]
        return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
                self.send_response(status)
                for key, value in {"Content-Length": str(len(data)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _json(self, value: Any, body: bool, status: int = 200, **headers: str) -> None:
                self._send(
                    status, json.dumps(value).encode(), {"Content-Type": "application/json", **headers}, body
                )

            def _not_found(self, body: bool, code: str) -> None:
                self._json({"error": f"{code}: {self.path}"}, body, 404, **{"X-Error-Code": code})

            def _serve(self, body: bool) -> None:
                fake.requests.append(f"{self.command} {self.path}")
                parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
                if parts[:2] == ["api", "models"] and len(parts) >= 6:
                    repo, action = "/".join(parts[2:4]), parts[4]
                    if repo not in fake.repos:
                        return self._not_found(body, "RepoNotFound")
                    files = fake.files(repo)
                    if action == "revision":
                        siblings = [{"rfilename": name} for name in files]
                        return self._json(
                            {"id": repo, "sha": COMMIT, "siblings": siblings, "private": False}, body
                        )
                    if action == "tree":
                        tree = [
                            {
                                "type": "file",
                                "path": name,
                                "size": p.stat().st_size,
                                "oid": _git_blob_sha1(p.read_bytes()),
                            }
                            for name, p in files.items()
                        ]
                        return self._json(tree, body)
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
                    if repo not in fake.repos:
                        return self._not_found(body, "RepoNotFound")
                    path = fake.files(repo).get(filename)
                    if path is None:
                        return self._not_found(body, "EntryNotFound")
                    data = path.read_bytes()
                    headers = {
                        "ETag": f'"{_git_blob_sha1(data)}"',
                        "X-Repo-Commit": COMMIT,
                        "Content-Type": "application/octet-stream",
                    }
                    return self._send(200, data, headers, body)
                return self._not_found(body, "RepoNotFound")

        return Handler


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub_repos")
    llama = tm.save_tiny_model(tm.SPECS["llama"], root / "tiny-llama")
    (llama / "README.md").write_text("# tiny llama\n")
    (llama / "other-format.gguf").write_bytes(b"not for us")  # outside hub.MODEL_FILES: never fetched
    gguf_dir = root / "tiny-gguf"
    gguf_dir.mkdir()
    tm.write_gguf_from_hf(llama, gguf_dir / "tiny.gguf")
    return {REPO: llama, GGUF_REPO: gguf_dir}


@pytest.fixture(scope="module")
def server(repos: dict[str, Path]) -> Iterator[FakeHub]:
    fake = FakeHub(repos)
    yield fake
    fake.close()


@pytest.fixture
def fake_hub(server: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """Point huggingface_hub at the fake hub with an empty cache under tmp_path."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server.requests.clear()
    return server


def _go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _logits(loaded: Any) -> torch.Tensor:
    return tm.run_ours(loaded.model, tm.prompt_ids(24, loaded.config.vocab_size))


@pytest.fixture(scope="module")
def local_logits(repos: dict[str, Path]) -> torch.Tensor:
    return _logits(load_model(ModelSource.parse(str(repos[REPO])), dtype=torch.float32))


def test_hub_model_downloads_and_matches_local_dir(
    fake_hub: FakeHub, local_logits: torch.Tensor, tmp_path: Path
) -> None:
    source = ModelSource.parse(REPO)
    assert source == ModelSource("hub", REPO)
    loaded = load_model(source, dtype=torch.float32)
    assert loaded.name == REPO
    assert torch.equal(_logits(loaded), local_logits)
    assert loaded.tokenizer.render_chat([{"role": "user", "content": "hi"}]).startswith("<|im_start|>user")
    fetched = {r.split("/resolve/")[1].split("/", 1)[1] for r in fake_hub.requests if "/resolve/" in r}
    assert fetched == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    snapshot = tmp_path / "hf_home" / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    assert (snapshot / "model.safetensors").is_file()


def test_unknown_repo_is_a_model_load_error(fake_hub: FakeHub) -> None:
    with pytest.raises(ModelLoadError, match="tiny-org/no-such-model"):
        load_model(ModelSource.parse("tiny-org/no-such-model"), dtype=torch.float32)
    assert any("/api/models/tiny-org/no-such-model" in r for r in fake_hub.requests)


def test_offline_mode_uses_the_cache(
    fake_hub: FakeHub, local_logits: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_model(ModelSource.parse(REPO), dtype=torch.float32)
    _go_offline(monkeypatch)
    fake_hub.requests.clear()
    loaded = load_model(ModelSource.parse(REPO), dtype=torch.float32)
    assert fake_hub.requests == []
    assert torch.equal(_logits(loaded), local_logits)


def test_offline_mode_without_cache_fails_cleanly(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    _go_offline(monkeypatch)
    with pytest.raises(ModelLoadError, match=REPO):
        load_model(ModelSource.parse(REPO), dtype=torch.float32)
    assert fake_hub.requests == []


def test_gguf_file_from_a_hub_repo(fake_hub: FakeHub, local_logits: torch.Tensor) -> None:
    loaded = load_model(ModelSource("gguf", GGUF_REPO, filename="tiny.gguf"), dtype=torch.float32)
    assert loaded.name == "tiny.gguf"
    torch.testing.assert_close(_logits(loaded), local_logits, rtol=0, atol=1e-4)
    with pytest.raises(ModelLoadError, match=r"missing\.gguf"):
        load_model(ModelSource("gguf", GGUF_REPO, filename="missing.gguf"), dtype=torch.float32)


def test_tokenizer_from_a_hub_repo(fake_hub: FakeHub, repos: dict[str, Path], tmp_path: Path) -> None:
    path = tm.write_gguf_from_hf(repos[REPO], tmp_path / "bare.gguf", tokenizer=False)
    loaded = load_model(ModelSource("gguf", str(path), tokenizer_location=REPO), dtype=torch.float32)
    assert loaded.tokenizer.vocab_size == loaded.config.vocab_size


# --- ModelSource.parse ---


def test_parse_default() -> None:
    for value in (None, "", "default"):
        assert ModelSource.parse(value) == ModelSource("default")
    assert ModelSource.parse(None, chat_template="t.jinja") == ModelSource("default", chat_template="t.jinja")


def test_parse_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    assert ModelSource.parse(str(path)) == ModelSource("gguf", str(path))
    assert ModelSource.parse(str(path), "x").chat_template == "x"


def test_parse_hf_dir(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "also.gguf").write_bytes(b"")  # config.json wins
    assert ModelSource.parse(str(tmp_path)) == ModelSource("hf_dir", str(tmp_path))


def test_parse_dir_with_one_gguf(tmp_path: Path) -> None:
    (tmp_path / "only.gguf").write_bytes(b"")
    (tmp_path / "README.md").write_text("")
    assert ModelSource.parse(str(tmp_path)) == ModelSource("gguf", str(tmp_path / "only.gguf"))


@pytest.mark.parametrize("ggufs", [0, 2])
def test_parse_dir_without_a_single_model(tmp_path: Path, ggufs: int) -> None:
    for i in range(ggufs):
        (tmp_path / f"m{i}.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=f"found {ggufs} model and 0 projector files") as info:
        ModelSource.parse(str(tmp_path))
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("value", ["/no/such/model.gguf", "./missing", "a/b/c", "not a repo/x"])
def test_parse_nonexistent_path(value: str) -> None:
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        ModelSource.parse(value)


@pytest.mark.parametrize("value", ["tiny-org/tiny-llama", "HuggingFaceTB/SmolLM2-135M-Instruct", "a/b.c_d-e"])
def test_parse_repo_id(value: str) -> None:
    assert hub.is_repo_id(value)
    assert ModelSource.parse(value) == ModelSource("hub", value)


def test_existing_path_wins_over_repo_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "org" / "name").mkdir(parents=True)
    (tmp_path / "org" / "name" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert ModelSource.parse("org/name") == ModelSource("hf_dir", "org/name")


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(__file__, tmp_path / "model.gguf")
    assert ModelSource.parse("~/model.gguf") == ModelSource("gguf", str(tmp_path / "model.gguf"))
