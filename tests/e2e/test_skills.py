"""The Skills API over real HTTP, with the official openai client where it
has the call and httpx where a body must be hostile: zip and directory
uploads, versions, the default version, list pagination, content, delete,
404s, objects validated against OpenAI's schema, and every hostile upload
answered with a 400 naming `files` while nothing is written outside the
skills directory and the server keeps serving. The routes need no model:
this server never loads one."""

from __future__ import annotations

import io
import threading
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from live_server import LiveServer, free_port
from mistralrs_serve.config import AgentConfig, ServerConfig
from mistralrs_serve.entrypoints.openai import skill_routes
from mistralrs_serve.entrypoints.openai.api_server import build_app
from mistralrs_serve.store import skill_bundle
from openai_schema import check
from skill_uploads import HOSTILE, Hostile, directory, good_zip, skill_md, tree


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server whose model never loads (the Skills routes answer without one)."""
    root = tmp_path_factory.mktemp("skills-e2e")
    config = ServerConfig(data_dir=str(root / "data"), agent=AgentConfig(skills_dir=str(root / "skills")))
    release = threading.Event()

    def never_loads() -> Any:
        release.wait()
        raise RuntimeError("this test server has no model")

    app = build_app(config, never_loads)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    threading.Thread(target=uv.run, name=f"uvicorn-{port}", daemon=True).start()
    live = LiveServer(f"http://127.0.0.1:{port}", app, uv)
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield live
    release.set()
    uv.should_exit = True


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return server.client()


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with server.http() as c:
        yield c


def skills_root(server: LiveServer) -> Path:
    return Path(server.app.state.server.skills.skills_dir)


def as_files(parts: list[tuple[str, bytes]]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files[]", (name, data, "application/octet-stream")) for name, data in parts]


def test_directory_upload_and_retrieve(client: openai.OpenAI, http: httpx.Client) -> None:
    skill = client.skills.create(files=[(name, data, "text/plain") for name, data in directory()])
    assert skill.id.startswith("skill_") and skill.name == "my-skill"
    assert (skill.default_version, skill.latest_version) == ("1", "1")
    raw = http.get(f"/v1/skills/{skill.id}").json()
    check("SkillResource", raw)
    assert raw == skill.model_dump()


def zip_upload() -> list[tuple[str, bytes, str]]:
    return [("s.zip", good_zip(), "application/zip")]


def test_zip_upload_and_content(client: openai.OpenAI, http: httpx.Client, server: LiveServer) -> None:
    # openai 2.54 drops a `files` that is not a list, so a lone zip goes in a list (as `files[]`)
    skill = client.skills.create(files=[("bundle.zip", good_zip("folder"), "application/zip")])
    plain = http.post("/v1/skills", files={"files": ("bundle.zip", good_zip(), "application/zip")})
    assert plain.status_code == 200 and plain.json()["name"] == "my-skill", plain.text
    assert skill.name == "my-skill" and skill.description == "Says hello in three languages."
    archive = zipfile.ZipFile(io.BytesIO(client.skills.content.retrieve(skill.id).read()))
    assert sorted(archive.namelist()) == ["my-skill/SKILL.md", "my-skill/scripts/hello.py"]
    assert archive.read("my-skill/SKILL.md") == skill_md()
    on_disk = skills_root(server) / skill.id / "1" / "scripts" / "hello.py"
    assert on_disk.stat().st_mode & 0o111, "the zip's executable bit is kept"


def test_versions(client: openai.OpenAI, http: httpx.Client) -> None:
    skill = client.skills.create(files=zip_upload())
    renamed = directory(md=skill_md("renamed", "The second version."))
    v2 = client.skills.versions.create(skill.id, files=[(n, d) for n, d in renamed])
    check("SkillVersionResource", v2.model_dump())
    assert (v2.version, v2.name, v2.skill_id) == ("2", "renamed", skill.id)
    assert client.skills.retrieve(skill.id).default_version == "1"
    v3 = client.skills.versions.create(skill.id, files=[(n, d) for n, d in directory()], default=True)
    after = client.skills.retrieve(skill.id)
    assert (after.default_version, after.latest_version) == ("3", "3")
    assert client.skills.versions.retrieve("latest", skill_id=skill.id).id == v3.id
    page = http.get(f"/v1/skills/{skill.id}/versions", params={"order": "asc"}).json()
    check("SkillVersionListResource", page)
    assert [v["version"] for v in page["data"]] == ["1", "2", "3"]
    refused = http.delete(f"/v1/skills/{skill.id}/versions/3")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "version"
    updated = client.skills.update(skill.id, default_version="2")
    assert (updated.default_version, updated.name) == ("2", "renamed")
    deleted = http.delete(f"/v1/skills/{skill.id}/versions/3").json()
    check("DeletedSkillVersionResource", deleted)
    assert deleted == {"id": v3.id, "object": "skill.version.deleted", "deleted": True, "version": "3"}
    assert client.skills.retrieve(skill.id).latest_version == "2"
    v4 = client.skills.versions.create(skill.id, files=[(n, d) for n, d in directory()])
    assert v4.version == "4"
    content = client.skills.versions.content.retrieve("2", skill_id=skill.id).read()
    assert zipfile.ZipFile(io.BytesIO(content)).namelist()[0].startswith("renamed/")


def test_list_pagination(client: openai.OpenAI, http: httpx.Client) -> None:
    ids = [client.skills.create(files=zip_upload()).id for _ in range(5)]
    first = http.get("/v1/skills", params={"limit": 2}).json()
    check("SkillListResource", first)
    assert [s["id"] for s in first["data"]] == ids[::-1][:2] and first["has_more"]
    walked = [s.id for s in client.skills.list(limit=2)]  # the client follows after=last_id
    assert walked[:5] == ids[::-1]
    asc = http.get("/v1/skills", params={"order": "asc", "after": ids[1], "limit": 2}).json()
    assert [s["id"] for s in asc["data"]] == ids[2:4]
    for params, param in (({"limit": "x"}, "limit"), ({"limit": 101}, "limit"), ({"order": "up"}, "order")):
        bad = http.get("/v1/skills", params=params)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param


def test_delete_and_404s(client: openai.OpenAI, http: httpx.Client, server: LiveServer) -> None:
    skill = client.skills.create(files=zip_upload())
    deleted = http.delete(f"/v1/skills/{skill.id}").json()
    check("DeletedSkillResource", deleted)
    assert deleted == {"id": skill.id, "object": "skill.deleted", "deleted": True}
    assert not (skills_root(server) / skill.id).exists()
    with pytest.raises(openai.NotFoundError):
        client.skills.retrieve(skill.id)
    for method, path in (
        ("GET", f"/v1/skills/{skill.id}"),
        ("DELETE", f"/v1/skills/{skill.id}"),
        ("GET", f"/v1/skills/{skill.id}/versions"),
        ("GET", f"/v1/skills/{skill.id}/versions/1"),
        ("GET", f"/v1/skills/{skill.id}/content"),
        ("POST", f"/v1/skills/{skill.id}/versions"),
    ):
        answer = http.request(method, path, files=as_files(directory()) if method == "POST" else None)
        assert answer.status_code == 404, (method, path)
        assert answer.json()["error"]["param"] == "skill_id"
    live = client.skills.create(files=zip_upload())
    missing = http.get(f"/v1/skills/{live.id}/versions/9")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "version"
    bad = http.get(f"/v1/skills/{live.id}/versions/newest")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "version"


# httpx writes a newline in a file name as %0A, and a raw one breaks the part's headers:
# that case is unit-tested only
OVER_HTTP = [c for c in HOSTILE if c.id != "control-characters"]


@pytest.mark.parametrize("case", OVER_HTTP, ids=[c.id for c in OVER_HTTP])
def test_hostile_upload(
    case: Hostile, http: httpx.Client, server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in case.caps.items():
        monkeypatch.setattr(skill_bundle, name, value)
    root = skills_root(server).parent
    before = {p for p in tree(root) if p.startswith("skills/skill_")}
    outside = {p for p in tree(root) if not p.startswith(("skills", "data"))}
    answer = http.post("/v1/skills", files=as_files(case.parts))
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "files" and case.message in error["message"], error
    assert {p for p in tree(root) if p.startswith("skills/skill_")} == before, "a version was left"
    assert {p for p in tree(root) if not p.startswith(("skills", "data"))} == outside
    assert not list((skills_root(server) / ".staging").iterdir())
    assert http.get("/v1/skills", params={"limit": 1}).status_code == 200, "the server keeps serving"


def test_a_good_upload_after_the_hostile_ones(client: openai.OpenAI) -> None:
    assert client.skills.create(files=zip_upload()).name == "my-skill"


def test_malformed_requests(http: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    def error(answer: httpx.Response, status: int = 400) -> dict[str, Any]:
        assert answer.status_code == status, answer.text
        return dict(answer.json()["error"])

    assert error(http.post("/v1/skills", json={"files": "x"}))["param"] == "files"
    assert error(http.post("/v1/skills", data={"files": "not a file part"}))["param"] == "files"
    assert error(http.post("/v1/skills", files={"file": ("s.zip", good_zip())}))["param"] == "file"
    assert "'files' is required" in error(http.post("/v1/skills", files={"other": (None, b"x")}))["message"]
    cut = b'--b\r\nContent-Disposition: form-data; name="files"; filename="a/SKILL.md"\r\n\r\nhalf'
    headers = {"content-type": "multipart/form-data; boundary=b"}
    assert error(http.post("/v1/skills", content=cut, headers=headers))["param"] == "files"
    skill_id = http.post("/v1/skills", files=as_files(directory())).json()["id"]
    flag = http.post(
        f"/v1/skills/{skill_id}/versions", files=as_files(directory()), data={"default": "maybe"}
    )
    assert error(flag)["param"] == "default"
    assert error(http.post(f"/v1/skills/{skill_id}", json={}))["param"] == "default_version"
    assert error(http.post(f"/v1/skills/{skill_id}", json={"default_version": "7"}), 404)["param"] == (
        "default_version"
    )
    monkeypatch.setattr(skill_routes, "MAX_BODY_BYTES", 4096)
    big = http.post("/v1/skills", files=as_files(directory(extra={"big.bin": bytes(64 << 10)})))
    assert error(big, 413)["param"] == "files"
    assert http.get("/v1/skills").status_code == 200


def test_too_many_parts_is_refused_by_the_parser(http: httpx.Client) -> None:
    parts = directory(extra={f"f{i}.txt": b"x" for i in range(skill_bundle.MAX_FILES)})
    answer = http.post("/v1/skills", files=as_files(parts))
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "files"
    assert "files" in answer.json()["error"]["message"].lower()


def test_concurrent_versions_get_distinct_numbers(client: openai.OpenAI) -> None:
    skill = client.skills.create(files=zip_upload())
    with ThreadPoolExecutor(8) as pool:
        made = list(
            pool.map(
                lambda _: client.skills.versions.create(skill.id, files=zip_upload()),
                range(8),
            )
        )
    assert sorted(int(v.version) for v in made) == list(range(2, 10))
    assert client.skills.retrieve(skill.id).latest_version == "9"


def test_install_into_a_session_directory(client: openai.OpenAI, server: LiveServer, tmp_path: Path) -> None:
    skill = client.skills.create(files=[(n, d) for n, d in directory("uploaded-as")])
    store = server.app.state.server.skills
    path = store.install(skill.id, "latest", tmp_path)
    assert path == tmp_path / "skills" / "my-skill"
    assert (path / "SKILL.md").read_bytes() == skill_md()
    assert (path / "scripts" / "hello.py").read_bytes() == b"print('hello')\n"
