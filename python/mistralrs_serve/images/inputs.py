"""Image inputs: a chat `image_url` part (`{"url": ..., "detail": ...}`, the
url a data URL or http(s)) or a Responses `input_image` part (`image_url`, or
`file_id` of a file in the Files store), read into an RGB picture.

URLs go through the Files issue's fetcher (entrypoints/openai/file_fetch.py:
timeouts, the size cap, private addresses refused unless the server allows
them). PNG, JPEG, WebP and GIF (its first frame) are read with Pillow;
anything else, bytes that are not a picture, and pictures over the pixel cap
are a 400 naming the part. `detail` is accepted (low, high, auto) and
otherwise left to the model's image processor.

Each image carries the sha256 of its pixels, which is what tells two prompts
apart that differ only in their images (the prefix cache keys on it)."""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mistralrs_serve.errors import InvalidRequestError
from mistralrs_serve.store.files import FileStore

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
MAX_PIXELS = 64 * 1024 * 1024  # larger pictures are refused before they are decoded
DETAILS = ("low", "high", "auto")


@dataclass(frozen=True)
class ImageInput:
    image: Any  # a PIL.Image.Image in RGB
    digest: str  # sha256 of the size and the RGB pixels

    @property
    def size(self) -> tuple[int, int]:
        width, height = self.image.size
        return int(width), int(height)


def decode_image(data: bytes, where: str) -> ImageInput:
    """`data` as an RGB picture (a GIF's first frame), or a 400 naming `where`."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InvalidRequestError(f"{where}: the image is empty", where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in FORMATS:
                raise InvalidRequestError(
                    f"{where}: {image.format or 'this'} images are not supported; send PNG, JPEG, WebP "
                    "or GIF",
                    where,
                )
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise InvalidRequestError(
                    f"{where}: the image is {width}x{height}, over {MAX_PIXELS} pixels", where
                )
            image.seek(0)  # a GIF's (or animated WebP's) first frame
            rgb = image.convert("RGB")
    except InvalidRequestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombWarning) as e:
        raise InvalidRequestError(f"{where}: not a readable image ({type(e).__name__}: {e})", where) from None
    digest = hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()
    return ImageInput(rgb, digest)


class ImageLoader:
    """Reads image parts: data URLs inline, http(s) URLs through the fetcher, file ids from
    the store (None: no store, so a file_id is a 400 saying so). Blocking."""

    def __init__(self, store: FileStore | None, max_bytes: int, allow_private_urls: bool = False) -> None:
        self.store, self.max_bytes, self.allow_private_urls = store, max_bytes, allow_private_urls

    def chat_part(self, part: Mapping[str, Any], where: str) -> ImageInput:
        """A chat `{"type": "image_url", "image_url": {"url", "detail"}}` part."""
        spec = part.get("image_url")
        if isinstance(spec, str):  # some clients send the URL bare
            spec = {"url": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
            raise InvalidRequestError(
                f"{where}.image_url must be an object with a 'url'", f"{where}.image_url"
            )
        self._check_detail(spec.get("detail"), f"{where}.image_url.detail")
        return self.url(spec["url"], f"{where}.image_url.url")

    def responses_part(self, part: Mapping[str, Any], where: str) -> ImageInput:
        """A Responses `{"type": "input_image", "image_url" | "file_id", "detail"}` part."""
        self._check_detail(part.get("detail"), f"{where}.detail")
        url, file_id = part.get("image_url"), part.get("file_id")
        if isinstance(url, str) == isinstance(file_id, str):
            raise InvalidRequestError(f"{where} needs exactly one of image_url or file_id", where)
        if isinstance(url, str):
            return self.url(url, f"{where}.image_url")
        return self.stored(str(file_id), f"{where}.file_id")

    def url(self, url: str, where: str) -> ImageInput:
        from mistralrs_serve.entrypoints.openai.attachments import decode_file_data
        from mistralrs_serve.entrypoints.openai.file_fetch import fetch_file

        if url.startswith("data:"):
            content, _ = decode_file_data(url, self.max_bytes, where)
        elif url.startswith(("http://", "https://")):
            content = fetch_file(
                url, max_bytes=self.max_bytes, allow_private=self.allow_private_urls, param=where
            ).content
        else:
            raise InvalidRequestError(f"{where} must be a data URL or an http(s) URL", where)
        return decode_image(content, where)

    def stored(self, file_id: str, where: str) -> ImageInput:
        if self.store is None:
            raise InvalidRequestError(
                f"{where}: this server keeps no files; send the image as a data URL", where
            )
        stored, stream = self.store.open(file_id)
        with stream:
            if stored.bytes > self.max_bytes:
                raise InvalidRequestError(f"{where}: the file is over {self.max_bytes} bytes", where)
            return decode_image(stream.read(), where)

    @staticmethod
    def _check_detail(detail: Any, where: str) -> None:
        if detail is not None and detail not in DETAILS:
            raise InvalidRequestError(f"{where} must be one of low, high, auto", where)
