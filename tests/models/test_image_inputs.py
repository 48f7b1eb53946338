"""Image inputs: decoding (PNG, JPEG, WebP, GIF's first frame; anything else a 400
naming the part), the loader's sources (data URLs, http(s) through the fetcher,
stored files), and the vision families' image processors against transformers'
own on real pictures drawn here."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mistralrs_serve.errors import InvalidRequestError
from mistralrs_serve.images.inputs import ImageLoader, decode_image
from mistralrs_serve.images.processors import Gemma3ImageProcessor, QwenVLImageProcessor, smart_resize
from mistralrs_serve.store.db import SqliteDatabase
from mistralrs_serve.store.files import SqlFileStore
from PIL import Image, ImageDraw


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A picture with gradients, shapes, text and noise: real edges for the resamplers."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], -1)
    noisy = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(noisy, "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 5, height // 5, width // 2, height // 2), fill=(250, 30, 30))
    draw.rectangle((width // 2, height // 3, width - 3, height - 3), outline=(10, 200, 40), width=3)
    draw.text((4, 4), "mistralrs", fill=(255, 255, 255))
    return image


def encoded(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_formats_decode_to_rgb(fmt: str) -> None:
    image = picture(40, 30)
    got = decode_image(encoded(image, fmt), "part")
    assert got.image.mode == "RGB" and got.size == (40, 30)
    if fmt == "PNG":  # lossless: the same pixels, the same digest as the picture itself
        assert np.array_equal(np.asarray(got.image), np.asarray(image))
        assert got.digest == decode_image(encoded(image, "PNG"), "x").digest


def test_gif_first_frame_and_distinct_digests() -> None:
    frames = [picture(20, 20, seed=1), picture(20, 20, seed=2)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    first = decode_image(buf.getvalue(), "p")
    assert first.digest == decode_image(encoded(frames[0], "GIF"), "p").digest
    assert first.digest != decode_image(encoded(frames[1], "GIF"), "p").digest


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not an image",
        encoded(picture(8, 8), "BMP"),
        encoded(picture(8, 8), "TIFF"),
        encoded(picture(64, 64), "PNG")[:60],
    ],
)
def test_bad_bytes_are_a_400_naming_the_part(data: bytes) -> None:
    with pytest.raises(InvalidRequestError) as err:
        decode_image(data, "messages[0].content[1]")
    assert err.value.param == "messages[0].content[1]"


@pytest.fixture
def loader(tmp_path: Path) -> ImageLoader:
    return ImageLoader(SqlFileStore(SqliteDatabase(tmp_path)), max_bytes=1 << 20, allow_private_urls=True)


@pytest.fixture
def http_image() -> Iterator[str]:
    body = encoded(picture(24, 16), "JPEG")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/cat.jpg" else 404)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_loader_sources(loader: ImageLoader, http_image: str) -> None:
    png = encoded(picture(24, 16), "PNG")
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    by_data = loader.chat_part({"type": "image_url", "image_url": {"url": url, "detail": "low"}}, "p")
    assert by_data.size == (24, 16)
    assert loader.chat_part({"type": "image_url", "image_url": url}, "p").digest == by_data.digest
    by_http = loader.chat_part({"type": "image_url", "image_url": {"url": http_image + "/cat.jpg"}}, "p")
    assert by_http.size == (24, 16)
    assert loader.store is not None
    stored = loader.store.create(png, filename="cat.png", purpose="vision")
    by_file = loader.responses_part({"type": "input_image", "file_id": stored.id}, "input[0].content[0]")
    assert by_file.digest == by_data.digest
    by_url = loader.responses_part({"type": "input_image", "image_url": url, "detail": "auto"}, "q")
    assert by_url.digest == by_data.digest


@pytest.mark.parametrize(
    ("part", "param"),
    [
        ({"type": "image_url"}, "p.image_url"),
        ({"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}, "p.image_url.url"),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}, "p.image_url.url"),
        (
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "max"}},
            "p.image_url.detail",
        ),
        ({"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/none.png"}}, "p.image_url.url"),
    ],
)
def test_bad_chat_parts(loader: ImageLoader, part: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        loader.chat_part(part, "p")
    assert err.value.param == param


def test_bad_responses_parts_and_limits(loader: ImageLoader, http_image: str) -> None:
    with pytest.raises(InvalidRequestError, match="exactly one"):
        loader.responses_part({"type": "input_image"}, "q")
    with pytest.raises(Exception, match="file"):
        loader.responses_part({"type": "input_image", "file_id": "file-missing"}, "q")
    with pytest.raises(InvalidRequestError) as err:
        loader.chat_part({"type": "image_url", "image_url": {"url": http_image + "/missing.jpg"}}, "p")
    assert "404" in str(err.value)
    private = ImageLoader(None, max_bytes=1 << 20, allow_private_urls=False)
    with pytest.raises(InvalidRequestError):
        private.chat_part({"type": "image_url", "image_url": {"url": http_image + "/cat.jpg"}}, "p")
    small = ImageLoader(None, max_bytes=100)
    big = "data:image/png;base64," + base64.b64encode(encoded(picture(64, 64), "PNG")).decode()
    with pytest.raises(InvalidRequestError):
        small.chat_part({"type": "image_url", "image_url": {"url": big}}, "p")


SIZES = [(300, 200), (37, 91), (1000, 40), (896, 896), (57, 56)]


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_gemma3_processor_matches_transformers(width: int, height: int) -> None:
    import transformers

    image = picture(width, height, seed=width)
    theirs = transformers.Gemma3ImageProcessor(size={"height": 896, "width": 896})  # as Gemma 3 ships
    want = theirs(images=[image], return_tensors="np")["pixel_values"][0]
    ours = Gemma3ImageProcessor(theirs.to_dict())(image)
    assert ours.pixel_values.shape == want.shape == (3, 896, 896) and ours.num_tokens == 256
    assert np.abs(ours.pixel_values - want).max() <= 1e-5


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_qwen_vl_processor_matches_transformers(width: int, height: int) -> None:
    import transformers

    image = picture(width, height, seed=height)
    theirs = transformers.Qwen2VLImageProcessor()
    out = theirs(images=[image], return_tensors="np")
    ours = QwenVLImageProcessor(theirs.to_dict())(image)
    assert ours.grid_thw == tuple(int(v) for v in out["image_grid_thw"][0])
    assert ours.pixel_values.shape == out["pixel_values"].shape
    assert np.abs(ours.pixel_values - out["pixel_values"]).max() <= 1e-5
    t, h, w = ours.grid_thw
    assert ours.num_tokens == t * h * w // 4


def test_smart_resize_bounds() -> None:
    assert smart_resize(1000, 40, 28, 56 * 56, 28 * 28 * 1280) == (1008, 28)
    h, w = smart_resize(4000, 3000, 28, 56 * 56, 28 * 28 * 1280)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 28 * 28 * 1280
    with pytest.raises(ValueError, match="aspect"):
        smart_resize(10, 4000, 28, 56 * 56, 28 * 28 * 1280)
