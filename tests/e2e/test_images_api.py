"""POST /v1/images/generations on a real server with two tiny random diffusers
pipelines built in the test (tiny_diffusion.py): Stable Diffusion (a UNet
pipeline) and FLUX, through the official openai client and raw HTTP; responses
validated against OpenAI's schema, images decoded and their sizes checked, and
a seeded image compared with the same pipeline called directly."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import tiny_diffusion
from live_server import LiveServer, start_server, stop_server
from mistralrs_serve.config import ServerConfig
from mistralrs_serve.entrypoints.openai.model_set import build_serving
from mistralrs_serve.models.model_specs import ModelSpec, infer_kind
from openai_schema import check
from PIL import Image


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {"sd": tiny_diffusion.stable_diffusion(root / "sd"), "flux": tiny_diffusion.flux(root / "flux")}


@pytest.fixture(scope="module")
def image_server(
    pipelines: dict[str, Path], default_runner: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    specs = [
        ModelSpec("image", str(pipelines["sd"]), name="tiny-sd", options={"steps": 2}),
        ModelSpec(
            "image", str(pipelines["flux"]), name="tiny-flux", options={"steps": 2, "max_pixels": 64 * 64}
        ),
    ]
    config = ServerConfig(data_dir=str(tmp_path_factory.mktemp("data")))
    live = start_server(
        config, lambda: default_runner.client, [(s, lambda s=s: build_serving(s)) for s in specs]
    )
    yield live
    stop_server(live)


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def post(server: LiveServer, body: dict[str, Any]) -> Any:
    with server.http() as http:
        return http.post("/v1/images/generations", json=body)


def test_b64_json_through_the_openai_client(image_server: LiveServer) -> None:
    client = image_server.client()
    res = client.images.generate(
        model="tiny-sd", prompt="a red cat", n=2, size="48x32", response_format="b64_json"
    )
    body = res.model_dump(exclude_none=True)
    check("ImagesResponse", body)
    assert len(res.data) == 2
    for item in res.data:
        assert item.b64_json is not None and png(base64.b64decode(item.b64_json)).size == (48, 32)


def test_url_points_at_the_stored_png(image_server: LiveServer) -> None:
    client = image_server.client()
    res = client.images.generate(model="tiny-flux", prompt="a blue dog", size="32x24")
    check("ImagesResponse", res.model_dump(exclude_none=True))
    url = res.data[0].url
    assert url is not None and url.startswith(image_server.base_url + "/v1/files/")
    with image_server.http() as http:
        got = http.get(url)
        assert got.status_code == 200 and png(got.content).size == (32, 24)
        file_id = url.split("/")[-2]
        meta = http.get(f"/v1/files/{file_id}").json()
    assert meta["purpose"] == "vision" and meta["filename"] == "image-0.png"


def test_the_spec_spellings_and_height_width(image_server: LiveServer) -> None:
    body = post(
        image_server,
        {"model": "tiny-sd", "prompt": "x", "height": 16, "width": 24, "response_format": "B64Json"},
    ).json()
    check("ImagesResponse", body)
    assert png(base64.b64decode(body["data"][0]["b64_json"])).size == (24, 16)
    body = post(
        image_server, {"model": "dall-e-3", "prompt": "x", "size": "16x16", "response_format": "Url"}
    ).json()
    assert body["data"][0]["url"].startswith(image_server.base_url)  # dall-e-3: the kind's default, tiny-sd


def test_a_seeded_image_is_the_pipelines_own(image_server: LiveServer, pipelines: dict[str, Path]) -> None:
    import torch
    from diffusers import DiffusionPipeline

    body = {
        "model": "tiny-flux",
        "prompt": "a tree",
        "size": "32x32",
        "seed": 7,
        "steps": 3,
        "response_format": "b64_json",
    }
    first = post(image_server, body).json()["data"][0]["b64_json"]
    assert post(image_server, body).json()["data"][0]["b64_json"] == first  # the same seed, the same image
    other = post(image_server, {**body, "seed": 8}).json()["data"][0]["b64_json"]
    assert other != first
    pipe = DiffusionPipeline.from_pretrained(str(pipelines["flux"]))
    direct = pipe(
        prompt="a tree",
        width=32,
        height=32,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(7),
    ).images[0]
    assert png(base64.b64decode(first)).tobytes() == direct.tobytes()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"size": "36x32"}, "width"),  # not a multiple of 8 (a UNet pipeline)
        ({"size": "32x20"}, "height"),
        ({"size": "big"}, "size"),
        ({"size": "32x32", "width": 64}, "size"),
        ({"size": "4096x4096"}, "size"),  # over the pixel cap
        ({"n": 11}, "n"),
        ({"n": 0}, "n"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"response_format": "jpeg"}, "response_format"),
        ({"steps": 0}, "steps"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"model": "default"}, "model"),  # a chat model
    ],
)
def test_bad_image_request_is_a_400(image_server: LiveServer, body: dict[str, Any], param: str) -> None:
    res = post(image_server, {"model": "tiny-sd", "prompt": "x", "size": "16x16", **body})
    assert res.status_code == 400, res.text
    assert res.json()["error"]["param"] == param


def test_flux_sizes_and_pixel_cap(image_server: LiveServer) -> None:
    ok = post(
        image_server, {"model": "tiny-flux", "prompt": "x", "size": "34x18", "response_format": "b64_json"}
    )
    assert ok.status_code == 200  # FLUX here: multiples of 2 (a VAE of scale 1, 2x2 patches)
    odd = post(image_server, {"model": "tiny-flux", "prompt": "x", "size": "33x18"})
    assert odd.status_code == 400 and odd.json()["error"]["param"] == "width"
    big = post(image_server, {"model": "tiny-flux", "prompt": "x", "size": "128x64"})
    assert big.status_code == 400 and big.json()["error"]["param"] == "size"


def test_models_and_kind(image_server: LiveServer, pipelines: dict[str, Path]) -> None:
    assert infer_kind(str(pipelines["sd"])) == "image"
    with image_server.http() as http:
        cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
    assert cards["tiny-sd"]["kind"] == "image" and cards["tiny-sd"]["pipeline"] == "StableDiffusionPipeline"
    assert cards["tiny-flux"]["pipeline"] == "FluxPipeline" and cards["default-image"]["root"] == "tiny-sd"
    with pytest.raises(openai.BadRequestError):
        image_server.client().chat.completions.create(
            model="tiny-sd", messages=[{"role": "user", "content": "hi"}]
        )
