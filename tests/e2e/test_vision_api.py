"""Image inputs on a real server whose chat model is a tiny random Gemma 3
vision-language checkpoint (tests/models/tiny_vlms.py, fp32), through the
official openai client: chat with image_url parts (data URLs, stream and not),
Responses with input_image by data URL and by file_id from the Files API, every
response and chunk validated against OpenAI's schema. The image reaches the
model: the same picture gives the same first-token logprob, another picture of
the same size another one. Bad image parts are 400s naming the part; the
numerics against transformers are in tests/models/test_vision_prompts.py."""

from __future__ import annotations

import base64
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from live_server import LiveServer, start_server, stop_server
from mistralrs_serve import Runner, Which
from mistralrs_serve.config import EngineConfig, ServerConfig
from openai_schema import check, checked_chat, checked_chat_stream
from PIL import Image
from responses_checks import created

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))  # the tiny checkpoints' builders
import tiny_vlms
from test_image_inputs import picture


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    directory = tmp_path_factory.mktemp("gemma3-vlm")
    tiny_vlms.gemma3(directory)
    runner = Runner(
        Which.Plain(str(directory)),
        dtype="float32",
        engine_config=EngineConfig(device="cpu", kv_cache_mb=8, block_size=8),
    )
    config = ServerConfig(data_dir=str(tmp_path_factory.mktemp("data")))
    live = start_server(config, lambda: runner.client)
    yield live
    stop_server(live)


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def ask(image_url: str, **kwargs: Any) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is in the picture?"},
                {"type": "image_url", "image_url": {"url": image_url, **kwargs}},
            ],
        }
    ]


def first_logprob(client: openai.OpenAI, image: Image.Image) -> float:
    res = checked_chat(client, messages=ask(data_url(image)), max_tokens=1, temperature=0, logprobs=True)
    assert res.choices[0].logprobs is not None
    return res.choices[0].logprobs.content[0].logprob


def test_chat_with_an_image(vision_server: LiveServer) -> None:
    client = vision_server.client()
    res = checked_chat(
        client, messages=ask(data_url(picture(64, 48)), detail="low"), max_tokens=6, temperature=0
    )
    assert res.choices[0].finish_reason in ("stop", "length")
    # the text, the begin/end of image, 16 image tokens and the "\n\n" around them
    assert res.usage is not None and res.usage.prompt_tokens > 20


def test_the_picture_reaches_the_model(vision_server: LiveServer) -> None:
    client = vision_server.client()
    a, b = picture(64, 48, seed=1), picture(64, 48, seed=2)
    assert first_logprob(client, a) == pytest.approx(first_logprob(client, a), abs=1e-5)
    assert abs(first_logprob(client, a) - first_logprob(client, b)) > 1e-6


def test_stream_equals_non_stream(vision_server: LiveServer) -> None:
    client = vision_server.client()
    messages = ask(data_url(picture(40, 70, seed=5)))
    whole = checked_chat(client, messages=messages, max_tokens=8, temperature=0)
    chunks = checked_chat_stream(client, messages=messages, max_tokens=8, temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content


def test_two_images_in_two_messages(vision_server: LiveServer) -> None:
    client = vision_server.client()
    messages = [
        *ask(data_url(picture(30, 30, seed=3))),
        {"role": "assistant", "content": "a picture"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(picture(50, 20))}}]},
    ]
    one = checked_chat(client, messages=ask(data_url(picture(30, 30, seed=3))), max_tokens=1)
    two = checked_chat(client, messages=messages, max_tokens=1)
    assert one.usage is not None and two.usage is not None
    assert two.usage.prompt_tokens - one.usage.prompt_tokens > 16  # the second image's tokens and more


def test_responses_with_input_image(vision_server: LiveServer) -> None:
    client = vision_server.client()
    image = picture(64, 48, seed=4)
    stored = client.files.create(file=("cat.png", png_bytes(image)), purpose="vision")
    texts = []
    for part in ({"image_url": data_url(image)}, {"file_id": stored.id}):
        content = [{"type": "input_text", "text": "what is in the picture?"}, {"type": "input_image", **part}]
        res, body = created(
            client, input=[{"role": "user", "content": content}], max_output_tokens=6, temperature=0
        )
        assert body["status"] in ("completed", "incomplete")
        texts.append(res.output_text)
        with vision_server.http() as http:  # the input kept as given, a valid item list
            items = http.get(f"/v1/responses/{res.id}/input_items").json()
        check("ResponseItemList", items)
        assert items["data"][0]["content"][1] == {"type": "input_image", **part, "detail": "auto"}
    assert texts[0] == texts[1]  # the same picture by URL and by file id
    # a follow-up turn reads the stored image again
    follow, _ = created(
        client, previous_response_id=res.id, input="and its colours?", max_output_tokens=4, temperature=0
    )
    assert follow.usage is not None and res.usage is not None
    assert follow.usage.input_tokens > res.usage.input_tokens + 16


@pytest.mark.parametrize(
    ("url", "param", "message"),
    [
        (
            "data:image/png;base64," + base64.b64encode(b"not an image").decode(),
            "messages[0].content[1]",
            "readable",
        ),
        ("ftp://example.com/cat.png", "messages[0].content[1]", "data URL"),
        ("http://127.0.0.1:9/cat.png", "messages[0].content[1]", ""),
    ],
)
def test_bad_image_parts_are_400s(vision_server: LiveServer, url: str, param: str, message: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        vision_server.client().chat.completions.create(model="default", messages=ask(url), max_tokens=1)
    error = e.value.body
    assert isinstance(error, dict) and str(error["param"]).startswith(param) and message in error["message"]


def test_unsupported_format_and_detail(vision_server: LiveServer) -> None:
    client = vision_server.client()
    bmp = "data:image/bmp;base64," + base64.b64encode(png_bytes(picture(8, 8), "BMP")).decode()
    for messages, param in (
        (ask(bmp), "messages[0].content[1].image_url.url"),
        (ask(data_url(picture(8, 8)), detail="huge"), "messages[0].content[1].image_url.detail"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="default", messages=messages, max_tokens=1)
        assert isinstance(e.value.body, dict) and e.value.body["param"] == param


def test_responses_image_without_a_source(vision_server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        vision_server.client().responses.create(
            model="default", input=[{"role": "user", "content": [{"type": "input_image", "detail": "auto"}]}]
        )
    assert isinstance(e.value.body, dict) and e.value.body["param"] == "input[0].content[0]"


def test_a_text_only_model_refuses_image_parts(client: openai.OpenAI) -> None:
    """The session's default model (SmolLM2, text only)."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=ask(data_url(picture(8, 8))), max_tokens=1)
    assert isinstance(e.value.body, dict) and e.value.body["param"] == "messages[0].content[1]"
    assert "text only" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(
            model="default",
            input=[
                {"role": "user", "content": [{"type": "input_image", "image_url": data_url(picture(8, 8))}]}
            ],
        )
    assert isinstance(e.value.body, dict) and e.value.body["param"] == "input[0].content[0]"
