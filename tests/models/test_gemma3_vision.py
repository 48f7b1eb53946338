"""Gemma 3's image encoder (models/siglip.py, models/gemma3_vision.py) against
transformers' Gemma3ForConditionalGeneration on tiny random weights built here
and loaded from the saved directory, fp32: the image features that replace the
placeholder tokens, for several pictures in a batch and for one alone, each
processed by our Gemma 3 image processor (equal to transformers', see
tests/models/test_image_inputs.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_models as tm
import tiny_vlms
import torch
from mistralrs_serve.errors import ModelLoadError
from mistralrs_serve.images.processors import Gemma3ImageProcessor
from mistralrs_serve.models.gemma3_vision import Gemma3ImageEncoder, load_gemma3_image_encoder
from test_image_inputs import picture


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    directory = tmp_path_factory.mktemp("gemma3-vision")
    return tiny_vlms.gemma3(directory), directory


def test_image_features_match_transformers(tiny: tuple[Any, Path]) -> None:
    hf, directory = tiny
    ours = load_gemma3_image_encoder(directory)
    processor = Gemma3ImageProcessor({"size": {"height": 56, "width": 56}, "image_seq_length": 16})
    sizes = [(90, 60), (40, 120), (56, 56)]
    pixels = torch.from_numpy(np.stack([processor(picture(w, h, seed=w)).pixel_values for w, h in sizes]))
    got = ours.encode(pixels)
    with torch.no_grad():
        want = hf.model.get_image_features(pixel_values=pixels).pooler_output
    assert got.shape == want.shape == (3, 16, 48)
    assert (got - want).abs().max().item() <= 1e-4
    alone = ours.encode(pixels[1:2])  # one picture alone gives what it gives in the batch
    assert (alone[0] - got[1]).abs().max().item() <= 1e-5
    assert ours.image_token_id == hf.config.image_token_index


def test_the_text_model_loads_from_the_vision_checkpoint(tiny: tuple[Any, Path]) -> None:
    """The same directory served as a chat model: its text model (text_config, the
    language_model weights) gives transformers' logits on a prompt without images."""
    hf, directory = tiny
    tm.assert_text_model_matches(hf, directory)


def test_a_text_only_checkpoint_is_refused() -> None:
    with pytest.raises(ModelLoadError, match="vision_config"):
        Gemma3ImageEncoder({"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}, {})
