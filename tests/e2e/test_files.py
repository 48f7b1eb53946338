"""The Files API and file parts over real HTTP with the official openai client
(sync and async): round trips validated against OpenAI's schema, what of a file
reaches the prompt (text, PDF, inline, fetched), and every bad input answered
in OpenAI's envelope while the server keeps serving."""

from __future__ import annotations

import asyncio
import base64
import http.server
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from live_server import LiveServer, start_server, stop_server
from mistralrs_serve.config import ServerConfig
from mistralrs_serve.entrypoints.openai.protocol import ChatCompletionRequest
from mistralrs_serve.errors import InvalidRequestError
from openai_schema import check
from pdf_builder import minimal_pdf

LIMIT = 256 << 10  # the small server's --max-file-mb, in bytes


@pytest.fixture(scope="module")
def small(default_runner: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A second server: its own data directory, a small file limit, private file URLs allowed."""
    config = ServerConfig(
        data_dir=str(tmp_path_factory.mktemp("files-data")),
        max_file_bytes=LIMIT,
        file_preview_chars=40,
        request_file_chars=60,
        allow_private_file_urls=True,
    )
    live = start_server(config, lambda: default_runner.client)
    yield live
    stop_server(live)


class FileHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"fetched over loopback: walrus\n"
        if self.path != "/docs/walrus.txt":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def file_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FileHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def wire(model: Any) -> Any:
    return model.model_dump(mode="json", exclude_unset=True)


def file_part(**file: Any) -> dict[str, Any]:
    return {"type": "file", "file": file}


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def rendered_prompt(live: LiveServer, messages: list[dict[str, Any]]) -> tuple[int, str]:
    """The number of prompt tokens and the prompt text the server renders for messages."""
    with live.http() as http:
        ids = http.post("/tokenize", json={"messages": messages}).json()
        text = http.post("/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"]
    return ids["count"], text


# --- round trips -----------------------------------------------------------


def test_upload_list_retrieve_content_delete(live_server: LiveServer, client: openai.OpenAI) -> None:
    data = b"first line\nsecond line\n"
    created = client.files.create(file=("notes.txt", data), purpose="user_data")
    check("OpenAIFile", wire(created))
    assert (created.filename, created.bytes, created.purpose, created.status) == (
        "notes.txt",
        len(data),
        "user_data",
        "processed",
    )
    assert wire(client.files.retrieve(created.id)) == wire(created)
    with live_server.http() as http:
        listed = http.get("/v1/files", params={"purpose": "user_data"}).json()
        check("ListFilesResponse", listed)
        assert listed["data"][0] == wire(created) and listed["first_id"] == created.id
        content = client.files.content(created.id)
        assert content.content == data
        assert content.response.headers["content-type"].startswith("text/plain")
        deleted = http.delete(f"/v1/files/{created.id}").json()
        check("DeleteFileResponse", deleted)
        assert deleted == {"id": created.id, "object": "file", "deleted": True}
    with pytest.raises(openai.NotFoundError) as e:
        client.files.retrieve(created.id)
    assert e.value.body["param"] == "file_id"
    assert created.id not in {f.id for f in client.files.list()}


def test_binary_type_expiry_and_pagination(client: openai.OpenAI) -> None:
    data = bytes(range(256)) * 4
    blob = client.files.create(
        file=("x.bin", data, "application/x-custom"),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    check("OpenAIFile", wire(blob))
    assert blob.expires_at == blob.created_at + 3600
    download = client.files.content(blob.id)
    assert download.content == data and download.response.headers["content-type"] == "application/x-custom"
    ids = [client.files.create(file=(f"{i}.txt", b"x"), purpose="vision").id for i in range(3)]
    first = client.files.list(purpose="vision", limit=2)
    assert [f.id for f in first.data] == ids[:0:-1] and first.has_more
    assert [f.id for f in client.files.list(purpose="vision", limit=2, order="asc")] == ids  # follows pages
    assert [f.id for f in client.files.list(purpose="vision", order="asc", after=ids[0])] == ids[1:]
    for file_id in [blob.id, *ids]:
        client.files.delete(file_id)


def test_async_client_round_trip(live_server: LiveServer) -> None:
    async def run() -> None:
        async with openai.AsyncOpenAI(base_url=f"{live_server.base_url}/v1", api_key="x", max_retries=0) as c:
            made = await asyncio.gather(
                *(
                    c.files.create(file=(f"a{i}.md", f"# {i}\n".encode()), purpose="user_data")
                    for i in range(4)
                )
            )
            listed = [f.id async for f in c.files.list(purpose="user_data", limit=1)]
            assert {f.id for f in made} <= set(listed)
            for f in made:
                check("OpenAIFile", wire(await c.files.retrieve(f.id)))
                assert (await c.files.content(f.id)).content == f"# {f.filename[1]}\n".encode()
                assert (await c.files.delete(f.id)).deleted
            with pytest.raises(openai.NotFoundError):
                await c.files.content(made[0].id)

    asyncio.run(run())


def test_32_clients_at_once(live_server: LiveServer) -> None:
    def one(i: int) -> None:
        c = live_server.client()
        for j in range(4):
            data = f"client {i} file {j}\n".encode() * (i + 1)
            f = c.files.create(file=(f"{i}-{j}.txt", data), purpose="user_data")
            assert c.files.retrieve(f.id).bytes == len(data)
            assert c.files.content(f.id).content == data
            c.files.delete(f.id)

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(one, range(32)))


# --- what reaches the prompt ----------------------------------------------


def test_pdf_text_reaches_the_prompt(live_server: LiveServer, client: openai.OpenAI) -> None:
    pdf = minimal_pdf([["Quarterly zebra census"], ["Total: 42 zebras"]])
    f = client.files.create(file=("census.pdf", pdf, "application/pdf"), purpose="user_data")
    assert client.files.content(f.id).content == pdf
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Summarize."}, file_part(file_id=f.id)]}
    ]
    count, prompt = rendered_prompt(live_server, messages)
    assert f'<file name="census.pdf" type="application/pdf" bytes="{len(pdf)}">' in prompt
    assert "Quarterly zebra census" in prompt and "Total: 42 zebras" in prompt
    res = client.chat.completions.create(model="default", messages=messages, max_tokens=1)
    check("CreateChatCompletionResponse", wire(res))
    assert res.usage is not None and res.usage.prompt_tokens == count
    client.files.delete(f.id)


def test_file_data_part_is_stored_and_seen(live_server: LiveServer, client: openai.OpenAI) -> None:
    data = b"name,legs\nheron,2\n"
    part = file_part(filename="birds.csv", file_data=data_url(data, "text/csv"))
    messages = [{"role": "user", "content": [part]}]
    before = {f.id for f in client.files.list()}
    count, prompt = rendered_prompt(live_server, messages)
    assert f'<file name="birds.csv" type="text/csv" bytes="{len(data)}">\nname,legs\nheron,2\n' in prompt
    assert {f.id for f in client.files.list()} == before, "/tokenize only looks"
    res = client.chat.completions.create(model="default", messages=messages, max_tokens=1)
    assert res.usage is not None and res.usage.prompt_tokens == count
    (new,) = [f for f in client.files.list() if f.id not in before]
    assert (new.filename, new.purpose, new.bytes) == ("birds.csv", "user_data", len(data))
    assert client.files.content(new.id).content == data
    stream = client.chat.completions.create(
        model="default",
        messages=messages,
        max_tokens=2,
        stream=True,
    )
    assert sum(1 for _ in stream) >= 2


def test_previews_are_bounded(small: LiveServer) -> None:
    c = small.client()
    ids = [c.files.create(file=(f"{i}.txt", b"abcdefghij" * 10), purpose="user_data").id for i in range(3)]
    messages = [{"role": "user", "content": [file_part(file_id=i) for i in ids]}]
    _, prompt = rendered_prompt(small, messages)
    assert "[cut: only the first 40 characters of this file are shown]" in prompt
    assert "[cut: only the first 20 characters of this file are shown]" in prompt  # 60 per request
    assert "[not shown: this request's file text limit of 60 characters is used up]" in prompt


def test_file_url_through_the_attachments_entry_point(
    small: LiveServer, live_server: LiveServer, file_server: str
) -> None:
    url = f"{file_server}/docs/walrus.txt"
    req = ChatCompletionRequest(messages=[{"role": "user", "content": [file_part(file_url=url)]}])
    chat = small.app.state.server.chat
    before = {f.id for f in small.client().files.list()}
    prep = chat.prepare(req, allow_file_urls=True)
    assert "fetched over loopback: walrus" in prep.prompt_text
    (fetched,) = [f for f in small.client().files.list() if f.id not in before]
    assert (fetched.filename, fetched.purpose) == ("walrus.txt", "user_data")
    with pytest.raises(InvalidRequestError, match="upload the file first") as e:
        chat.prepare(req)  # as chat completions calls it
    assert e.value.param == "messages[0].content[0].file.file_url"
    # the default server refuses loopback addresses
    with pytest.raises(InvalidRequestError, match="refuses those") as e:
        live_server.app.state.server.chat.attach_files(req, allow_file_urls=True)
    assert e.value.param == "messages[0].content[0].file.file_url"
    with pytest.raises(InvalidRequestError, match="HTTP 404"):
        chat.attach_files(
            ChatCompletionRequest(messages=[{"role": "user", "content": [file_part(file_url=file_server)]}]),
            allow_file_urls=True,
        )


# --- bad input -------------------------------------------------------------


def error_of(res: httpx.Response, status: int, param: str | None) -> str:
    assert res.status_code == status, res.text
    error = res.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    return str(error["message"])


@pytest.mark.parametrize(
    ("kwargs", "param", "match"),
    [
        ({"data": {"purpose": "user_data"}, "files": {"note": (None, b"x")}}, "file", "'file' is required"),
        ({"data": {"purpose": "user_data"}}, "file", "multipart/form-data"),
        ({"files": {"file": ("a.txt", b"a")}}, "purpose", "'purpose' is required"),
        ({"files": {"file": ("a.txt", b"a")}, "data": {"purpose": "nope"}}, "purpose", "must be one of"),
        ({"content": b"{}", "headers": {"content-type": "application/json"}}, "file", "multipart/form-data"),
        (
            {"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=b"}},
            "file",
            "malformed",
        ),
        ({"content": b"x", "headers": {"content-type": "multipart/form-data"}}, "file", "malformed"),
        (
            {
                "content": b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc',
                "headers": {"content-type": "multipart/form-data; boundary=b"},
            },
            "file",
            "closing boundary",
        ),
        (
            {
                "files": {"file": ("a.txt", b"a")},
                "data": {
                    "purpose": "user_data",
                    "expires_after[anchor]": "now",
                    "expires_after[seconds]": "3600",
                },
            },
            "expires_after.anchor",
            "created_at",
        ),
        (
            {
                "files": {"file": ("a.txt", b"a")},
                "data": {
                    "purpose": "user_data",
                    "expires_after[anchor]": "created_at",
                    "expires_after[seconds]": "9",
                },
            },
            "expires_after.seconds",
            "between 3600",
        ),
        (
            {
                "files": {"file": ("a.txt", b"a")},
                "data": {"purpose": "user_data", "expires_after[anchor]": "created_at"},
            },
            "expires_after.seconds",
            "required",
        ),
    ],
)
def test_bad_uploads(small: LiveServer, kwargs: dict[str, Any], param: str, match: str) -> None:
    with small.http() as http:
        before = http.get("/v1/files").json()["data"]
        assert match in error_of(http.post("/v1/files", **kwargs), 400, param)
        assert http.get("/v1/files").json()["data"] == before


@pytest.mark.parametrize("size", [LIMIT + 1, 2 * LIMIT, 64 * LIMIT])
def test_over_the_file_limit_is_413(small: LiveServer, size: int) -> None:
    c = small.client()
    with pytest.raises(openai.APIStatusError) as e:
        c.files.create(file=("big.bin", b"x" * size), purpose="user_data")
    assert e.value.status_code == 413 and e.value.body["param"] == "file"
    assert e.value.body["code"] == "file_too_large"
    assert c.files.create(file=("max.bin", b"x" * LIMIT), purpose="user_data").bytes == LIMIT


def test_unknown_ids_and_bad_list_queries(small: LiveServer) -> None:
    with small.http() as http:
        for method, path in [("GET", ""), ("GET", "/content"), ("DELETE", "")]:
            error_of(http.request(method, f"/v1/files/file-nope{path}"), 404, "file_id")
        for params, param in [({"limit": 0}, "limit"), ({"limit": "x"}, "limit"), ({"order": "up"}, "order")]:
            error_of(http.get("/v1/files", params=params), 400, param)
        error_of(http.get("/v1/files", params={"after": "file-nope"}), 400, "after")


@pytest.mark.parametrize(
    ("part", "status", "param"),
    [
        (file_part(file_id="file-nope"), 404, "messages[0].content[1].file.file_id"),
        (file_part(file_url="http://example.com/a.txt"), 400, "messages[0].content[1].file.file_url"),
        (file_part(file_data="not base64!", filename="a.txt"), 400, "messages[0].content[1].file.file_data"),
        (
            file_part(file_data=data_url(b"x" * (LIMIT + 1), "text/plain")),
            413,
            "messages[0].content[1].file.file_data",
        ),
        (file_part(), 400, "messages[0].content[1].file"),
        ({"type": "file"}, 400, "messages[0].content[1].file"),
    ],
)
def test_bad_file_parts_in_chat(small: LiveServer, part: dict[str, Any], status: int, param: str) -> None:
    body = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}],
        "max_tokens": 1,
    }
    with httpx.Client(base_url=small.base_url, timeout=60) as http:
        error_of(http.post("/v1/chat/completions", json=body), status, param)
        error_of(http.post("/v1/chat/completions", json={**body, "stream": True}), status, param)
        ok = http.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        )
        assert ok.status_code == 200


# --- served while the model loads, behind the API key ----------------------


def test_files_while_loading_and_behind_the_key(default_runner: Any, tmp_path: Path) -> None:
    from mistralrs_serve.entrypoints.openai.api_server import build_app
    from starlette.testclient import TestClient

    gate = threading.Event()

    def slow_load() -> Any:
        gate.wait(30)
        return default_runner.client

    app = build_app(ServerConfig(api_key="sekrit", data_dir=str(tmp_path)), slow_load)
    auth = {"authorization": "Bearer sekrit"}
    with TestClient(app) as http:
        assert http.get("/health").status_code == 503
        up = http.post(
            "/v1/files", files={"file": ("a.txt", b"early")}, data={"purpose": "user_data"}, headers=auth
        )
        assert up.status_code == 200, up.text
        assert http.get(f"/v1/files/{up.json()['id']}/content", headers=auth).content == b"early"
        assert http.get("/v1/files").status_code == 401
        assert (
            http.post("/v1/files", files={"file": ("a.txt", b"x")}, data={"purpose": "user_data"}).status_code
            == 401
        )
        gate.set()


def test_runner_without_a_data_dir(default_runner: Any) -> None:
    """The in-process Runner has no file store unless given data_dir: inline files work, file ids do not."""
    inline = file_part(filename="n.txt", file_data=data_url(b"runner notes", "text/plain"))
    req = ChatCompletionRequest(messages=[{"role": "user", "content": [inline]}], max_tokens=1)
    res = default_runner.send_chat_completion_request(req)
    assert res.usage.prompt_tokens == len(default_runner._chat.prompt_ids(req))
    by_id = ChatCompletionRequest(messages=[{"role": "user", "content": [file_part(file_id="file-x")]}])
    with pytest.raises(InvalidRequestError, match="data_dir") as e:
        default_runner.send_chat_completion_request(by_id)
    assert e.value.param == "messages[0].content[0].file.file_id"
