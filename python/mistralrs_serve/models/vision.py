"""The vision half of a vision-language model, as the engine uses it: pictures in,
a prompt with their placeholder tokens and the embeddings that replace them out.

A chat template writes one marker per image part (Gemma 3 `<start_of_image>`,
Qwen2.5-VL `<|image_pad|>` between its vision start and end tokens);
`VisionModel.expand` replaces each marker in the rendered text with the
family's run of image tokens, as transformers' processors do, and `place`
finds those runs in the tokenized prompt and pairs them with the encoded
images into the engine's `PromptMedia` (engine/media.py).

- Gemma 3: "\\n\\n", begin-of-image, `mm_tokens_per_image` image tokens,
  end-of-image, "\\n\\n"; the image tokens attend to each other both ways.
- Qwen2.5-VL: one image-pad token per merged patch; the text model turns by
  three rotary positions (temporal, row, column), equal for text tokens, the
  image's grid for its tokens, and text after an image goes on from past the
  image's largest position (transformers' get_rope_index).

Both encoders run in float32 on the CPU thread that prepares the request.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mistralrs_serve.engine.media import PlacedImage, PromptMedia
from mistralrs_serve.errors import InvalidRequestError, ModelLoadError
from mistralrs_serve.images.inputs import ImageInput
from mistralrs_serve.images.processors import (
    Gemma3ImageProcessor,
    ProcessedImage,
    QwenVLImageProcessor,
)
from mistralrs_serve.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

VISION_ARCHITECTURES = ("Gemma3ForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")


def _key(digest: str) -> int:
    """The prefix cache's 64-bit key of a picture's digest."""
    return int.from_bytes(hashlib.sha256(digest.encode()).digest()[:8], "little")


def _token(tokenizer: Tokenizer, token_id: int, what: str) -> str:
    text = tokenizer.backend.id_to_token(token_id)
    if text is None:
        raise ModelLoadError(f"the tokenizer has no {what} token (id {token_id} from config.json)")
    return str(text)


class VisionModel:
    """What the families share; a family sets the fields and `expansion`."""

    marker: str  # what the chat template writes for one image
    image_token_id: int
    bidirectional: bool = False
    processor: Gemma3ImageProcessor | QwenVLImageProcessor

    def process(self, image: ImageInput) -> ProcessedImage:
        return self.processor(image.image)

    def encode(self, processed: Sequence[ProcessedImage]) -> list[torch.Tensor]:
        """Per image, its (tokens, text hidden) float32 embeddings."""
        raise NotImplementedError

    def expansion(self, processed: ProcessedImage) -> str:
        """The text that stands for one image in the prompt."""
        raise NotImplementedError

    def expand(self, text: str, processed: Sequence[ProcessedImage]) -> str:
        """The rendered prompt with each image marker replaced by its image's tokens;
        raises when the markers and the images disagree in number."""
        pieces = text.split(self.marker)
        if len(pieces) - 1 != len(processed):
            raise InvalidRequestError(
                f"the prompt has {len(pieces) - 1} image markers ({self.marker!r}) for "
                f"{len(processed)} images: a text part may not write the marker, and the chat "
                "template must place every image part",
                "messages",
            )
        out = [pieces[0]]
        for image, piece in zip(processed, pieces[1:], strict=True):
            out += [self.expansion(image), piece]
        return "".join(out)

    def place(
        self,
        prompt_ids: list[int],
        images: Sequence[ImageInput],
        processed: Sequence[ProcessedImage],
        embeddings: Sequence[torch.Tensor],
    ) -> PromptMedia:
        """The runs of image tokens in the prompt, one per image in order, with their embeddings."""
        runs = image_runs(prompt_ids, self.image_token_id)
        sizes = [len(e) for e in embeddings]
        if [end - start for start, end in runs] != sizes:
            raise InvalidRequestError(
                f"the prompt's image tokens ({[e - s for s, e in runs]}) do not match its images' "
                f"({sizes}); a text part may not write image tokens",
                "messages",
            )
        placed = tuple(
            PlacedImage(start, emb, _key(image.digest), self.bidirectional)
            for (start, _), emb, image in zip(runs, embeddings, images, strict=True)
        )
        return self.media(prompt_ids, placed, processed)

    def media(
        self, prompt_ids: list[int], placed: tuple[PlacedImage, ...], processed: Sequence[ProcessedImage]
    ) -> PromptMedia:
        return PromptMedia(placed)


def image_runs(ids: Sequence[int], token_id: int) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of `token_id` in ids."""
    is_image = np.asarray(ids) == token_id
    edges = np.flatnonzero(np.diff(np.concatenate(([0], is_image.astype(np.int8), [0]))))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


class Gemma3Vision(VisionModel):
    bidirectional = True

    def __init__(
        self,
        cfg: Mapping[str, Any],
        weights: Mapping[str, torch.Tensor],
        tokenizer: Tokenizer,
        preprocessor: Mapping[str, Any],
    ) -> None:
        from mistralrs_serve.models.gemma3_vision import Gemma3ImageEncoder

        self.encoder = Gemma3ImageEncoder(cfg, weights)
        self.image_token_id = self.encoder.image_token_id
        self.marker = _token(tokenizer, int(cfg.get("boi_token_index", 255999)), "begin-of-image")
        self.end = _token(tokenizer, int(cfg.get("eoi_token_index", 256000)), "end-of-image")
        self.image_token = _token(tokenizer, self.image_token_id, "image")
        self.processor = Gemma3ImageProcessor({"image_seq_length": self.encoder.tokens, **preprocessor})
        if self.processor.tokens != self.encoder.tokens:
            raise ModelLoadError(
                f"Gemma 3: the processor gives {self.processor.tokens} image tokens, the model "
                f"takes {self.encoder.tokens}"
            )

    def encode(self, processed: Sequence[ProcessedImage]) -> list[torch.Tensor]:
        pixels = torch.from_numpy(np.stack([p.pixel_values for p in processed]))
        return list(self.encoder.encode(pixels))

    def expansion(self, processed: ProcessedImage) -> str:
        return f"\n\n{self.marker}{self.image_token * processed.num_tokens}{self.end}\n\n"


class QwenVLVision(VisionModel):
    def __init__(
        self,
        cfg: Mapping[str, Any],
        weights: Mapping[str, torch.Tensor],
        tokenizer: Tokenizer,
        preprocessor: Mapping[str, Any],
    ) -> None:
        from mistralrs_serve.models.qwen_vl_vision import QwenVisionConfig, QwenVLVisionEncoder

        vision = cfg.get("vision_config")
        if not isinstance(vision, dict):
            raise ModelLoadError("Qwen2.5-VL: config.json has no vision_config")
        self.encoder = QwenVLVisionEncoder(QwenVisionConfig.from_hf(vision), weights)
        self.image_token_id = int(cfg.get("image_token_id", 151655))
        self.marker = _token(tokenizer, self.image_token_id, "image pad")
        self.processor = QwenVLImageProcessor(preprocessor)
        self.merge = self.encoder.config.merge

    def encode(self, processed: Sequence[ProcessedImage]) -> list[torch.Tensor]:
        pixels = torch.from_numpy(np.concatenate([p.pixel_values for p in processed]))
        grids = [p.grid_thw for p in processed]
        assert all(g is not None for g in grids)
        return self.encoder.encode(pixels, grids)  # type: ignore[arg-type]

    def expansion(self, processed: ProcessedImage) -> str:
        return self.marker * processed.num_tokens

    def media(
        self, prompt_ids: list[int], placed: tuple[PlacedImage, ...], processed: Sequence[ProcessedImage]
    ) -> PromptMedia:
        """Three rotary positions per prompt token: text counts on from the last
        position, an image's tokens take (start, start + row, start + column) of its
        merged grid, and the text after it starts past its largest."""
        positions = np.zeros((3, len(prompt_ids)), dtype=np.int64)
        done, next_pos = 0, 0
        for im, proc in zip(placed, processed, strict=True):
            assert proc.grid_thw is not None
            text = im.start - done
            positions[:, done : im.start] = np.arange(next_pos, next_pos + text)
            next_pos += text
            _, gh, gw = proc.grid_thw
            h, w = gh // self.merge, gw // self.merge
            rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            positions[0, im.start : im.end] = next_pos
            positions[1, im.start : im.end] = next_pos + rows.reshape(-1)
            positions[2, im.start : im.end] = next_pos + cols.reshape(-1)
            next_pos += max(h, w)
            done = im.end
        tail = len(prompt_ids) - done
        positions[:, done:] = np.arange(next_pos, next_pos + tail)
        delta = int(positions.max()) + 1 - len(prompt_ids)
        return PromptMedia(placed, positions, delta)


def load_vision(model_dir: Path, raw: Mapping[str, Any], tokenizer: Tokenizer) -> VisionModel | None:
    """The vision model of a vision-language checkpoint (config.json `raw`), None for a text one."""
    names = raw.get("architectures") or []
    if not names or names[0] not in VISION_ARCHITECTURES:
        return None
    if not isinstance(raw.get("vision_config"), dict):
        logger.warning("%s: %s without vision_config: served for text only", model_dir, names[0])
        return None
    from mistralrs_serve.models.hf_loader import is_vision_weight, load_safetensors, read_json

    weights = load_safetensors(model_dir, torch.float32, only=is_vision_weight)
    preprocessor = read_json(model_dir / "preprocessor_config.json", required=False)
    family = Gemma3Vision if names[0] == "Gemma3ForConditionalGeneration" else QwenVLVision
    return family(raw, weights, tokenizer, preprocessor)
