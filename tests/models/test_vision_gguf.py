"""Vision-language models from GGUF: a text GGUF plus llama.cpp's multimodal
projector GGUF (`mmproj`), written from the tiny checkpoints the way llama.cpp's
converter writes them (gguf_vlms.py), found side by side in a directory and
loaded through models/mmproj.py. With images, the logits equal transformers' on
the original checkpoint (fp32, max abs diff <= 1e-4), as for the Hugging Face
directories (test_vision_prompts.py, whose checks these are). Wrong pairings
and unknown projectors are load errors that say why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf_vlms
import pytest
import tiny_vlms
from mistralrs_serve.errors import ModelLoadError, UnsupportedModelError
from mistralrs_serve.models.loader import ModelSource, load_model
from test_vision_prompts import ONE, RED, TALL, THREE, WIDE, Family, check, run

# llama.cpp's Gemma 3 GGUFs make every sixth layer global: two sliding layers, as the file reads
BUILDERS = {
    "gemma3": lambda d: tiny_vlms.gemma3(d, layer_types=("sliding_attention", "sliding_attention")),
    "qwen_vl": tiny_vlms.qwen_vl,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Path]]:
    """Per family: transformers' model and a directory holding model.gguf and mmproj-model.gguf."""
    out = {}
    for name, build in BUILDERS.items():
        hf_dir = tmp_path_factory.mktemp(f"{name}-hf")
        hf = build(hf_dir)
        gguf_dir = tmp_path_factory.mktemp(f"{name}-gguf")
        gguf_vlms.write_text_gguf(hf_dir, gguf_dir / "model.gguf")
        gguf_vlms.write_mmproj(hf_dir, gguf_dir / "mmproj-model.gguf")
        out[name] = (hf, gguf_dir)
    return out


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request: pytest.FixtureRequest, files: dict[str, tuple[Any, Path]]) -> Family:
    hf, directory = files[request.param]
    source = ModelSource.parse(str(directory))
    assert source.kind == "gguf" and source.mmproj is not None and source.mmproj.endswith("mmproj-model.gguf")
    return Family(request.param, source, hf)


@pytest.mark.parametrize(
    ("messages", "pictures"), [(ONE, [RED]), (THREE, [WIDE, TALL, RED])], ids=["one", "three"]
)
def test_logits_match_transformers(family: Family, messages: list[Any], pictures: list[Any]) -> None:
    engine = family.engine()
    prompt = family.prompt(engine, messages)
    assert prompt.media is not None and len(prompt.media.images) == len(pictures)
    check(family, prompt, run(engine, {"r": prompt})["r"], pictures)


def test_the_mmproj_flag_pairs_files(files: dict[str, tuple[Any, Path]], tmp_path: Path) -> None:
    _, gemma_dir = files["gemma3"]
    _, qwen_dir = files["qwen_vl"]
    source = ModelSource.parse(str(gemma_dir / "model.gguf"), mmproj=str(gemma_dir / "mmproj-model.gguf"))
    assert source.mmproj is not None
    with pytest.raises(ModelLoadError, match="no such file"):
        ModelSource.parse(str(gemma_dir / "model.gguf"), mmproj=str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="GGUF text model"):
        ModelSource.parse("default", mmproj=str(gemma_dir / "mmproj-model.gguf"))
    # Qwen's projector makes 48-wide embeddings for a 48-wide Gemma: the family decides, by its tokens
    wrong = ModelSource.parse(str(gemma_dir / "model.gguf"), mmproj=str(qwen_dir / "mmproj-model.gguf"))
    with pytest.raises(ModelLoadError, match="<\\|image_pad\\|>"):
        load_model(wrong)
    with pytest.raises(ModelLoadError, match="not a multimodal projector"):
        load_model(ModelSource.parse(str(gemma_dir / "model.gguf"), mmproj=str(qwen_dir / "model.gguf")))


def test_an_unknown_projector_is_refused(files: dict[str, tuple[Any, Path]], tmp_path: Path) -> None:
    import gguf

    _, gemma_dir = files["gemma3"]
    path = tmp_path / "mmproj-other.gguf"
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_string("clip.projector_type", "ldp")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="'ldp' is not supported"):
        load_model(ModelSource.parse(str(gemma_dir / "model.gguf"), mmproj=str(path)))


def test_two_projectors_in_a_directory_are_ambiguous(tmp_path: Path) -> None:
    for name in ("model.gguf", "mmproj-a.gguf", "mmproj-b.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ModelLoadError, match="1 model and 2 projector files"):
        ModelSource.parse(str(tmp_path))


def test_the_cli_flag_goes_to_the_first_chat_model(files: dict[str, tuple[Any, Path]]) -> None:
    from mistralrs_serve.cli import build_parser, model_specs

    _, gemma_dir = files["gemma3"]
    text, mmproj = str(gemma_dir / "model.gguf"), str(gemma_dir / "mmproj-model.gguf")
    args = build_parser().parse_args(
        ["serve", "-m", text, "-m", "embedding:all-minilm-l6-v2", "--mmproj", mmproj]
    )
    specs = model_specs(args)
    assert specs[0].kind == "chat" and specs[0].options["mmproj"] == mmproj
    assert "mmproj" not in specs[1].options
