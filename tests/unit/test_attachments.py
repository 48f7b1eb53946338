"""Attachments: file parts into the text the model sees, over a scratch store."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from mistralrs_serve.entrypoints.openai.attachments import (
    Attachments,
    FileLimits,
    has_file_parts,
)
from mistralrs_serve.errors import InvalidRequestError, NotFoundError, PayloadTooLargeError
from mistralrs_serve.store.db import SqliteDatabase
from mistralrs_serve.store.files import SqlFileStore, read_all
from pdf_builder import minimal_pdf


@pytest.fixture
def store(tmp_path: Path) -> SqlFileStore:
    return SqlFileStore(SqliteDatabase(tmp_path))


def attachments(store: SqlFileStore | None, **limits: Any) -> Attachments:
    return Attachments(store, FileLimits(**{"max_file_bytes": 10_000, **limits}))


def user(*parts: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


def by_id(file_id: str) -> dict[str, Any]:
    return {"type": "file", "file": {"file_id": file_id}}


def inline(data: bytes, filename: str | None = None, mime: str | None = "text/plain") -> dict[str, Any]:
    encoded = base64.b64encode(data).decode()
    file = {"file_data": f"data:{mime};base64,{encoded}" if mime else encoded}
    if filename:
        file["filename"] = filename
    return {"type": "file", "file": file}


def texts(messages: list[dict[str, Any]]) -> list[str]:
    return [p["text"] for p in messages[0]["content"]]


def test_text_file_by_id_whole(store: SqlFileStore) -> None:
    f = store.create(b"alpha\nbeta\n", filename="notes.txt", purpose="user_data")
    out = attachments(store).expand(user({"type": "text", "text": "read"}, by_id(f.id)))
    assert texts(out) == [
        "read",
        '<file name="notes.txt" type="text/plain" bytes="11">\nalpha\nbeta\n\n</file>',
    ]


def test_preview_cut_per_file_and_per_request(store: SqlFileStore) -> None:
    ids = [store.create(b"0123456789" * 3, filename=f"{i}.txt", purpose="user_data").id for i in range(3)]
    out = texts(
        attachments(store, file_preview_chars=12, request_file_chars=20).expand(user(*map(by_id, ids)))
    )
    assert "\n012345678901\n[cut: only the first 12 characters of this file are shown]\n" in out[0]
    assert "\n01234567\n[cut: only the first 8 characters of this file are shown]\n" in out[1]
    assert "[not shown: this request's file text limit of 20 characters is used up]" in out[2]


def test_utf8_cut_on_a_character(store: SqlFileStore) -> None:
    f = store.create("é€😀".encode() * 50, filename="u.txt", purpose="user_data")
    (text,) = texts(attachments(store, file_preview_chars=7).expand(user(by_id(f.id))))
    assert "\né€😀é€😀é\n[cut: only the first 7 characters" in text


def test_binary_file_is_a_line(store: SqlFileStore) -> None:
    f = store.create(bytes(range(256)), filename="blob.bin", purpose="user_data")
    (text,) = texts(attachments(store).expand(user(by_id(f.id))))
    assert text == (
        '<file name="blob.bin" type="application/octet-stream" bytes="256">\n'
        "[binary content, not shown]\n</file>"
    )


def test_pdf_text_stored_and_cut(store: SqlFileStore) -> None:
    pdf = minimal_pdf([["The zebra report"], ["Page two quokka"]])
    (text,) = texts(attachments(store).expand(user(inline(pdf, "r.pdf", "application/pdf"))))
    assert text.startswith(f'<file name="r.pdf" type="application/pdf" bytes="{len(pdf)}">\n')
    assert "The zebra report" in text and "Page two quokka" in text and "[cut" not in text
    (stored,) = store.list().data
    assert (stored.filename, stored.purpose, stored.content_type) == ("r.pdf", "user_data", "application/pdf")
    assert read_all(store, stored.id)[1] == pdf
    (cut,) = texts(attachments(store, file_preview_chars=9).expand(user(by_id(stored.id))))
    assert "\nThe zebra\n[cut: only the first 9 characters" in cut and "quokka" not in cut
    (damaged,) = texts(attachments(store).expand(user(inline(b"%PDF-1.4 junk", "d.pdf", None))))
    assert "[a PDF with no text to extract]" in damaged


def test_inline_forms_and_what_is_kept(store: SqlFileStore) -> None:
    a = attachments(store)
    (text,) = texts(a.expand(user(inline(b"a,b\n1,2\n", "t.csv", mime=None))))  # bare base64
    assert text.startswith('<file name="t.csv" type="text/csv" bytes="8">\na,b\n1,2\n')
    (unnamed,) = texts(a.expand(user(inline(b"hi"))))
    assert unnamed.startswith('<file name="file" type="text/plain" bytes="2">')
    assert len(store.list().data) == 2
    a.expand(user(inline(b"only looked at", "x.txt")), persist=False)
    assert len(store.list().data) == 2


def test_responses_input_file_part(store: SqlFileStore) -> None:
    f = store.create(b"flat form", filename="f.txt", purpose="user_data")
    out = attachments(store).expand(user({"type": "input_file", "file_id": f.id}), param="input")
    assert "\nflat form\n" in texts(out)[0]


def test_messages_without_files_untouched(store: SqlFileStore) -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "user", "content": [{"type": "text", "text": "x"}]},
    ]
    assert not has_file_parts(messages) and not has_file_parts("templated")
    out = attachments(store).expand(messages)
    assert all(a is b for a, b in zip(out, messages, strict=True))
    assert has_file_parts([{"role": "user", "content": [{"type": "input_file"}]}])


@pytest.mark.parametrize(
    ("part", "param", "match"),
    [
        ({"type": "file", "file": "file-x"}, "messages[0].content[0].file", "must be an object"),
        ({"type": "file", "file": {}}, "messages[0].content[0].file", "exactly one of"),
        (
            {"type": "file", "file": {"file_id": "file-x", "file_data": "aGk="}},
            "messages[0].content[0].file",
            "got file_id, file_data",
        ),
        ({"type": "file", "file": {"file_id": 3}}, "messages[0].content[0].file.file_id", "non-empty string"),
        (
            {"type": "file", "file": {"file_data": "not base64!"}},
            "messages[0].content[0].file.file_data",
            "base64",
        ),
        (
            {"type": "file", "file": {"file_data": "data:text/plain,abc"}},
            "messages[0].content[0].file.file_data",
            "data URL",
        ),
        (
            {"type": "file", "file": {"file_data": "aGk=", "filename": 5}},
            "messages[0].content[0].file.filename",
            "string",
        ),
        (
            {"type": "file", "file": {"file_url": "https://example.com/a.pdf"}},
            "messages[0].content[0].file.file_url",
            "upload the file first",
        ),
    ],
)
def test_bad_parts_name_the_field(store: SqlFileStore, part: Any, param: str, match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match) as e:
        attachments(store).expand(user(part))
    assert e.value.param == param
    assert store.list().data == []


def test_unknown_id_and_too_large(store: SqlFileStore) -> None:
    with pytest.raises(NotFoundError) as e:
        attachments(store).expand(
            [{"role": "system", "content": "s"}, *user({"type": "text", "text": "t"}, by_id("file-nope"))]
        )
    assert e.value.param == "messages[1].content[1].file.file_id"
    for size in (10_001, 30_000):  # just over, and over before decoding
        with pytest.raises(PayloadTooLargeError) as e2:
            attachments(store).expand(user(inline(b"x" * size)))
        assert e2.value.param == "messages[0].content[0].file.file_data"
    assert store.list().data == []


def test_without_a_store(store: SqlFileStore) -> None:
    a = attachments(None)
    assert "\nno store\n" in texts(a.expand(user(inline(b"no store"))))[0]
    with pytest.raises(InvalidRequestError, match="data_dir") as e:
        a.expand(user(by_id("file-x")))
    assert e.value.param == "messages[0].content[0].file.file_id"
