"""File parts of a request, turned into the text the model sees.

A chat `file` part (`{"type": "file", "file": {...}}`) or a Responses
`input_file` part (the same fields on the part itself) names its file by
`file_id` (a stored file), `file_data` (a data URL or bare base64, with
`filename`) or `file_url` (fetched; only where the endpoint allows it).
Inline and fetched files are stored like uploads (purpose `user_data`).

What the model sees: UTF-8 text as a preview bounded per file and per
request, PDFs as their extracted text under the same bounds, anything else
as a line with its name, type and size. A cut is said in the text.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import io
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from mistralrs_serve.config import ServerConfig
from mistralrs_serve.entrypoints.openai.file_fetch import fetch_file
from mistralrs_serve.errors import InvalidRequestError, NotFoundError, PayloadTooLargeError
from mistralrs_serve.store.files import FileStore, content_type_for, safe_filename

logger = logging.getLogger(__name__)

FILE_PART_TYPES = ("file", "input_file", "input_audio")
# audio parts: the transcript takes the part's place (a text model hears through the transcriber)
AUDIO_FORMATS = ("wav", "mp3")
_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*?);base64,(?P<data>.*)", re.DOTALL)
_SNIFF_BYTES = 4096
CHAT_FILE_URL_MESSAGE = (
    "Chat Completions does not fetch file URLs: upload the file first (POST /v1/files) and send its "
    "file_id, send its content as file_data, or use the Responses API"
)


@dataclass(frozen=True)
class FileLimits:
    """How much of a file may come in and how much of it the model sees."""

    max_file_bytes: int = ServerConfig.max_file_bytes
    file_preview_chars: int = ServerConfig.file_preview_chars
    request_file_chars: int = ServerConfig.request_file_chars
    allow_private_file_urls: bool = ServerConfig.allow_private_file_urls

    @classmethod
    def from_config(cls, config: ServerConfig) -> FileLimits:
        return cls(
            config.max_file_bytes,
            config.file_preview_chars,
            config.request_file_chars,
            config.allow_private_file_urls,
        )


class CharBudget:
    """The characters of file text one request may still show the model."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.remaining = total

    def take(self, wanted: int) -> int:
        granted = min(wanted, self.remaining)
        self.remaining -= granted
        return granted


def has_file_parts(messages: Any) -> bool:
    if not isinstance(messages, list):
        return False
    return any(
        isinstance(part, dict) and part.get("type") in FILE_PART_TYPES
        for message in messages
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"]
    )


class Attachments:
    """Resolves file parts against a FileStore (None: no store, so `file_id`
    parts are refused and inline files are shown but not kept). Blocking."""

    def __init__(
        self,
        store: FileStore | None,
        limits: FileLimits | None = None,
        listen: Callable[[bytes, str], str] | None = None,
    ) -> None:
        self.store = store
        self.limits = limits or FileLimits()
        # (audio bytes, where) -> transcript: the server's default transcriber, if it has one
        self.listen = listen

    def budget(self) -> CharBudget:
        return CharBudget(self.limits.request_file_chars)

    def expand(
        self,
        messages: list[Any],
        *,
        allow_file_urls: bool = False,
        persist: bool = True,
        param: str = "messages",
    ) -> list[Any]:
        """Copies of `messages` in which every file part is a text part holding
        what the model sees of the file; other parts and messages are left as
        they are (and checked later). Errors name `{param}[i].content[j]...`.

        allow_file_urls: fetch `file_url` (Responses); False answers the
        Chat Completions 400. persist: keep inline and fetched files in the
        store (False for a prompt that is only looked at, e.g. /tokenize)."""
        budget = self.budget()
        expanded = []
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list) and any(_is_file_part(p) for p in content):
                parts = [
                    self._expanded_part(p, f"{param}[{i}].content[{j}]", budget, allow_file_urls, persist)
                    for j, p in enumerate(content)
                ]
                message = {**message, "content": parts}
            expanded.append(message)
        return expanded

    def file_text(
        self,
        file: Mapping[str, Any],
        where: str,
        budget: CharBudget,
        *,
        allow_file_urls: bool = False,
        persist: bool = True,
    ) -> str:
        """What the model sees of one file: `file` holds `file_id`, or
        `file_data` (and `filename`), or `file_url`; `where` is its path in the
        request, for errors. For callers that build their own text parts (a
        Responses `input_file` passes the part itself)."""
        given = [key for key in ("file_id", "file_data", "file_url") if file.get(key) is not None]
        if len(given) != 1:
            raise InvalidRequestError(
                f"{where} must give exactly one of file_id, file_data and file_url"
                + (f"; got {', '.join(given)}" if given else ""),
                where,
            )
        key = given[0]
        value = file[key]
        if not isinstance(value, str) or not value:
            raise InvalidRequestError(f"{where}.{key} must be a non-empty string", f"{where}.{key}")
        if key == "file_id":
            return self._stored_text(value, f"{where}.file_id", budget)
        if key == "file_data":
            content, mime = decode_file_data(value, self.limits.max_file_bytes, f"{where}.file_data")
            name = _filename(file.get("filename"), f"{where}.filename")
        else:
            if not allow_file_urls:
                raise InvalidRequestError(CHAT_FILE_URL_MESSAGE, f"{where}.file_url")
            fetched = fetch_file(
                value,
                max_bytes=self.limits.max_file_bytes,
                allow_private=self.limits.allow_private_file_urls,
                param=f"{where}.file_url",
            )
            content, mime = fetched.content, fetched.content_type
            given_name = file.get("filename")
            name = _filename(given_name, f"{where}.filename") if given_name else fetched.filename
        content_type = content_type_for(name, mime)
        if persist and self.store is not None:
            self.store.create(content, filename=name, purpose="user_data", content_type=content_type)
        return describe(name, content_type, len(content), io.BytesIO(content), budget, self.limits)

    def _expanded_part(
        self, part: Any, where: str, budget: CharBudget, allow_file_urls: bool, persist: bool
    ) -> Any:
        if not _is_file_part(part):
            return part
        if part["type"] == "input_audio":
            return {"type": "text", "text": self._heard(part, f"{where}.input_audio")}
        if part["type"] == "file":
            file = part.get("file")
            where = f"{where}.file"
            if not isinstance(file, dict):
                raise InvalidRequestError(f"{where} must be an object", where)
        else:
            file = part
        text = self.file_text(file, where, budget, allow_file_urls=allow_file_urls, persist=persist)
        return {"type": "text", "text": text}

    def _heard(self, part: Mapping[str, Any], where: str) -> str:
        """The transcript of an `input_audio` part ({"data": base64, "format": "wav" | "mp3"})."""
        audio = part.get("input_audio")
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
            raise InvalidRequestError(f"{where} must be an object with base64 'data' and a 'format'", where)
        if audio.get("format") not in AUDIO_FORMATS:
            raise InvalidRequestError(
                f"{where}.format must be one of {', '.join(AUDIO_FORMATS)}, got {audio.get('format')!r}",
                f"{where}.format",
            )
        if self.listen is None:
            raise InvalidRequestError(
                f"{where}: this server has no transcription model to hear audio with; start it with "
                "--with-defaults or add a transcription model (-m transcription:SOURCE)",
                where,
            )
        content, _ = decode_file_data(audio["data"], self.limits.max_file_bytes, f"{where}.data")
        return self.listen(content, f"{where}.data")

    def _stored_text(self, file_id: str, where: str, budget: CharBudget) -> str:
        if self.store is None:
            raise InvalidRequestError(
                "file_id parts need a file store, and this server has none (an in-process Runner "
                "made without data_dir): send the file as file_data instead",
                where,
            )
        try:
            stored, stream = self.store.open(file_id)
        except NotFoundError as e:  # named by the request's field, not the store's
            raise NotFoundError(str(e), where) from None
        with stream:
            return describe(stored.filename, stored.content_type, stored.bytes, stream, budget, self.limits)


def decode_file_data(value: str, max_bytes: int, where: str) -> tuple[bytes, str | None]:
    """The bytes and declared type of a `data:<mime>;base64,...` URL (or bare base64)."""
    match = _DATA_URL.fullmatch(value) if value.startswith("data:") else None
    if value.startswith("data:") and match is None:
        raise InvalidRequestError(f"{where} must be a base64 data URL: data:<mime type>;base64,<data>", where)
    data = match["data"] if match else value
    if len(data) > (max_bytes + 2) // 3 * 4 + 4:  # before decoding: base64 is 4 characters per 3 bytes
        raise PayloadTooLargeError(f"{where} is over the server's file limit of {max_bytes} bytes", where)
    try:
        content = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{where} is not valid base64", where) from None
    if len(content) > max_bytes:
        raise PayloadTooLargeError(f"{where} is over the server's file limit of {max_bytes} bytes", where)
    return content, (match["mime"] or None) if match else None


def describe(
    name: str, content_type: str, size: int, stream: BinaryIO, budget: CharBudget, limits: FileLimits
) -> str:
    """The text part for one file: a header line, then its text (bounded) or a note."""
    header = f'<file name="{_attr(name)}" type="{_attr(content_type)}" bytes="{size}">'
    wanted = min(limits.file_preview_chars, budget.remaining)
    head = stream.read(max(4 * wanted + 4, _SNIFF_BYTES))
    complete = len(head) >= size
    if head.startswith(b"%PDF-") or content_type.split(";")[0].strip() == "application/pdf":
        text, complete = pdf_text(head + stream.read(), 4 * wanted + 4)
        missing = "[a PDF with no text to extract]"
    else:
        text, missing = _utf8_prefix(head, complete), "[binary content, not shown]"
    body = _bounded(text, complete, budget, limits) if text is not None else missing
    return f"{header}\n{body}\n</file>"


def pdf_text(content: bytes, max_chars: int) -> tuple[str | None, bool]:
    """The text of a PDF's pages (joined by blank lines), stopping past max_chars;
    (None, True) when the PDF has none or cannot be read. The bool: all pages read."""
    from pypdf import PdfReader  # imported on use: most requests carry no PDF

    try:
        reader = PdfReader(io.BytesIO(content))
        pages: list[str] = []
        num_chars = 0
        for page in reader.pages:
            if num_chars > max_chars:
                return "\n\n".join(pages), False
            pages.append(page.extract_text() or "")
            num_chars += len(pages[-1]) + 2
    except Exception as e:  # pypdf raises many kinds on damaged or encrypted files
        logger.info("no text from a PDF: %s: %s", type(e).__name__, e)
        return None, True
    text = "\n\n".join(pages)
    return (text if text.strip() else None), True


def _bounded(text: str, complete: bool, budget: CharBudget, limits: FileLimits) -> str:
    if budget.remaining == 0 and text:
        return f"[not shown: this request's file text limit of {budget.total} characters is used up]"
    shown = budget.take(min(len(text), limits.file_preview_chars))
    if shown == len(text) and complete:
        return text
    return f"{text[:shown]}\n[cut: only the first {shown} characters of this file are shown]"


def _utf8_prefix(head: bytes, complete: bool) -> str | None:
    """head decoded as UTF-8 (a character split by the read's end dropped); None if it is not text."""
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=complete)
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text.removeprefix("\ufeff")


def _is_file_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in FILE_PART_TYPES


def _filename(value: Any, where: str) -> str:
    if value is None:
        return "file"
    if not isinstance(value, str):
        raise InvalidRequestError(f"{where} must be a string", where)
    return safe_filename(value)


def _attr(value: str) -> str:
    return value.replace("&", "&amp;").replace('"', "&quot;").replace("\n", " ")
