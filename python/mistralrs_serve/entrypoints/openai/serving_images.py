"""POST /v1/images/generations: a request's size and options checked, its images
made by the model's diffusers pipeline (images/diffusion.py), and OpenAI's
response: `b64_json` is plain base64 of a PNG (what OpenAI sends and its client
decodes); `url` points at this server, the PNG stored through the Files store
(purpose `vision`, kept for an hour as OpenAI's image URLs are) and served by
GET /v1/files/{id}/content.

Size: OpenAI's `size` ("1024x768") or the spec's `height` and `width`
(default 720 x 1280); both given and disagreeing is a 400 naming `size`."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable
from typing import Any

from mistralrs_serve.entrypoints.openai.protocol import ImageGenerationRequest
from mistralrs_serve.errors import InvalidRequestError
from mistralrs_serve.images.diffusion import DiffusionModel, GenerateOptions

DEFAULT_HEIGHT, DEFAULT_WIDTH = 720, 1280  # the spec's defaults
URL_TTL_S = 3600


class ImageServing:
    def __init__(self, model: DiffusionModel, name: str) -> None:
        self.model, self.name = model, name

    def options(self, req: ImageGenerationRequest) -> GenerateOptions:
        width, height = req.width or DEFAULT_WIDTH, req.height or DEFAULT_HEIGHT
        if req.size not in (None, "auto"):
            match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", req.size)
            if match is None:
                raise InvalidRequestError(
                    f"size must be WIDTHxHEIGHT such as 1024x768, got {req.size!r}", "size"
                )
            width, height = int(match[1]), int(match[2])
            if (req.width not in (None, width)) or (req.height not in (None, height)):
                raise InvalidRequestError("size disagrees with width/height: give one or the other", "size")
        options = GenerateOptions(
            prompt=req.prompt,
            n=req.n,
            width=width,
            height=height,
            steps=req.steps,
            guidance_scale=req.guidance_scale,
            seed=req.seed,
        )
        self.model.check(options)
        return options

    def generate(
        self, req: ImageGenerationRequest, store: Callable[[bytes, int], str] | None = None
    ) -> dict[str, Any]:
        """The response; `store(png, index)` keeps a PNG and returns its URL (url format)."""
        options = self.options(req)
        pngs = self.model.generate(options)
        as_url = req.response_format in ("url", "Url")
        if as_url and store is None:
            raise InvalidRequestError(
                "url needs the server's file store: ask for b64_json", "response_format"
            )
        data = [
            {"url": store(png, i)}
            if as_url and store is not None
            else {"b64_json": base64.b64encode(png).decode()}
            for i, png in enumerate(pngs)
        ]
        return {"created": int(time.time()), "data": data, "output_format": "png"}
