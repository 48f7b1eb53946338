"""Image parts of chat messages (`image_url`) and Responses input (`input_image`)
for a vision-language model: read once (images/inputs.py), processed and
encoded together on the request's worker thread, and carried in the messages
as `{"type": "image", "encoded": EncodedImage}` parts until the prompt is
rendered. Then the chat template writes a marker per image part, the family
expands each into its image tokens, and the tokenized prompt gets the
embeddings placed (`PromptMedia`, engine/media.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mistralrs_serve.engine.media import PromptMedia
from mistralrs_serve.errors import InvalidRequestError
from mistralrs_serve.images.inputs import ImageInput, ImageLoader
from mistralrs_serve.images.processors import ProcessedImage
from mistralrs_serve.models.vision import VisionModel
from mistralrs_serve.tokenizer.tokenizer import Tokenizer

IMAGE_PART_TYPES = ("image_url", "input_image")


@dataclass(frozen=True)
class EncodedImage:
    image: ImageInput
    processed: ProcessedImage
    embeddings: torch.Tensor  # (image tokens, text hidden)


def _parts(messages: Any) -> list[tuple[int, int, Any]]:
    if not isinstance(messages, list):
        return []
    return [
        (i, j, part)
        for i, message in enumerate(messages)
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for j, part in enumerate(message["content"])
    ]


def has_image_parts(messages: Any) -> bool:
    return any(isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES for _, _, p in _parts(messages))


class ImageParts:
    """Reads and encodes the image parts of messages for one vision-language model."""

    def __init__(self, vision: VisionModel, loader: ImageLoader) -> None:
        self.vision, self.loader = vision, loader

    def encode(self, messages: list[Any], param: str = "messages") -> list[Any]:
        """Copies of `messages` with every image part an encoded `image` part; every
        image of the request goes through the encoder in one call. Blocking."""
        found = [
            (i, j, p)
            for i, j, p in _parts(messages)
            if isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES
        ]
        if not found:
            return messages
        images = []
        for i, j, part in found:
            where = f"{param}[{i}].content[{j}]"
            read = self.loader.chat_part if part["type"] == "image_url" else self.loader.responses_part
            images.append(read(part, where))
        processed = []
        for (i, j, _), image in zip(found, images, strict=True):
            try:
                processed.append(self.vision.process(image))
            except ValueError as e:  # a picture the processor cannot size (aspect ratio)
                raise InvalidRequestError(
                    f"{param}[{i}].content[{j}]: {e}", f"{param}[{i}].content[{j}]"
                ) from e
        embeddings = self.vision.encode(processed)
        out = [dict(m) if isinstance(m, dict) else m for m in messages]
        for (i, j, _), image, proc, emb in zip(found, images, processed, embeddings, strict=True):
            content = list(out[i]["content"])
            content[j] = {"type": "image", "encoded": EncodedImage(image, proc, emb)}
            out[i]["content"] = content
        return out


def template_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[EncodedImage]]:
    """Messages for the chat template (each encoded image part a bare `{"type": "image"}`,
    as templates expect) and the encoded images in prompt order."""
    encoded: list[EncodedImage] = []
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list) and any(is_encoded_image(p) for p in content):
            parts = []
            for p in content:
                if is_encoded_image(p):
                    encoded.append(p["encoded"])
                    parts.append({"type": "image"})
                else:
                    parts.append(p)
            message = {**message, "content": parts}
        out.append(message)
    return out, encoded


def is_encoded_image(part: Any) -> bool:
    """An image part `ImageParts.encode` made."""
    return (
        isinstance(part, dict)
        and part.get("type") == "image"
        and isinstance(part.get("encoded"), EncodedImage)
    )


def place_images(
    vision: VisionModel, tokenizer: Tokenizer, text: str, images: Sequence[EncodedImage]
) -> tuple[list[int], str, PromptMedia]:
    """The rendered prompt with its images' tokens (ids and text) and their placed embeddings."""
    processed = [im.processed for im in images]
    expanded = vision.expand(text, processed)
    ids = tokenizer.encode(expanded, add_special_tokens=False)
    media = vision.place(ids, [im.image for im in images], processed, [im.embeddings for im in images])
    return ids, expanded, media
