"""Tiny random-weight models in Hugging Face layout, built with transformers, for numerics tests.

Each model is a few layers of hidden size 64 with a ~300-token byte-level BPE tokenizer, saved the way
`save_pretrained(safe_serialization=True)` saves it plus tokenizer.json and tokenizer_config.json (with a
ChatML chat template). Weights are drawn at a larger scale than transformers' init (std 0.02 gives
near-uniform logits, where a numerics bug hides under any tolerance), norm weights are moved off 1 and
biases off 0 so that every tensor matters.

Also here: writing the same model as a GGUF file the way llama.cpp's converter does (tensor names,
metadata keys, the q/k row permutation of "llama" tensors, tokenizer metadata).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import torch
from mistralrs_serve.models.loader import LoadedModel, ModelSource, load_model
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BPE_VOCAB_SIZE = 300
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "the quick brown fox jumps over the lazy dog while the cat sleeps on the mat",
    "a tiny model reads tokens and writes logits; the logits pick the next token",
    "hello world, hello there, general kenobi! numbers 0123456789 and symbols +-*/=()",
    "rotary position embeddings rotate the halves of each query and key head",
    "the server streams text back to the client, one token after another, until it stops",
] * 4


def build_tokenizer() -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) of BPE_VOCAB_SIZE tokens; deterministic."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return tok


@dataclass(frozen=True)
class TinySpec:
    """One tiny model variant."""

    name: str
    architecture: str  # "llama", "qwen2" or "qwen3"
    num_layers: int = 2
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    head_dim: int | None = None  # None: hidden // heads
    rope_parameters: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default"})


LLAMA3_ROPE = {
    # original_max_position_embeddings is small so that, with head_dim 16, some frequencies are
    # scaled, some kept and some blended inside the 64-token test prompts.
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

SPECS: dict[str, TinySpec] = {
    s.name: s
    for s in (
        TinySpec("llama", "llama"),
        TinySpec(
            "llama-tied-llama3",
            "llama",
            num_layers=3,
            tie_word_embeddings=True,
            rope_parameters=dict(LLAMA3_ROPE),
        ),
        TinySpec("llama-bias", "llama", attention_bias=True),
        TinySpec("qwen2", "qwen2", tie_word_embeddings=True),
        TinySpec("qwen2-untied", "qwen2"),
        TinySpec("qwen3", "qwen3", head_dim=32),
    )
}

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 64, 128, 4, 2
ROPE_THETA = 10000.0
MAX_POSITIONS = 256
EOS_TOKEN = "<|im_end|>"


def make_config(spec: TinySpec, vocab_size: int) -> Any:
    import transformers

    config_cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[spec.architecture]
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=spec.tie_word_embeddings,
        rope_parameters={"rope_theta": ROPE_THETA, **spec.rope_parameters},
        bos_token_id=None,
        eos_token_id=vocab_size - 1,
        pad_token_id=None,
    )
    if spec.architecture == "llama":
        kwargs["attention_bias"] = spec.attention_bias
    if spec.head_dim is not None:
        kwargs["head_dim"] = spec.head_dim
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    return config


def make_hf_model(spec: TinySpec, vocab_size: int, seed: int = 0) -> Any:
    """The transformers model, fp32, eval mode, with well-spread random weights."""
    import transformers

    model_cls = {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
    }[spec.architecture]
    torch.manual_seed(seed)
    model = model_cls(make_config(spec, vocab_size)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 2:
                # std 1/sqrt(fan_in) keeps activations O(1); embeddings get std 0.25, so tied heads
                # give logits of std ~2 (std 1 would give ~8 and loosen an absolute tolerance)
                fan_in = p.shape[1] if "embed" not in name else 16
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return model


def save_tiny_model(spec: TinySpec, directory: Path, seed: int = 0) -> Path:
    """Save model + tokenizer in Hugging Face layout into `directory`; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    vocab_size = tok.get_vocab_size()
    model = make_hf_model(spec, vocab_size, seed)
    model.config.eos_token_id = tok.token_to_id(EOS_TOKEN)
    model.save_pretrained(directory, safe_serialization=True)
    tok.save(str(directory / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": MAX_POSITIONS,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return directory


def load_hf_model(directory: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The saved model back through transformers (the reference), eager attention."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation="eager"
    ).eval()


@torch.no_grad()
def hf_logits(model: Any, ids: list[int]) -> torch.Tensor:
    """fp32 logits (T, vocab) of transformers' forward over the whole prompt."""
    return model(torch.tensor([ids])).logits[0].float()


def prompt_ids(length: int, vocab_size: int, seed: int = 1) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=gen).tolist()


# --- GGUF, the way llama.cpp's convert_hf_to_gguf.py writes it ---

GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GGUF_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter reorders q/k rows of llama models for its interleaved RoPE."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".")  # model.layers.N.<module...>.(weight|bias)
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{GGUF_LAYER_NAMES[module]}.{parts[-1]}"


def add_tokenizer_metadata(
    writer: Any,
    tok: tokenizers.Tokenizer,
    eos_token: str = EOS_TOKEN,
    chat_template: str | None = CHAT_TEMPLATE,
) -> None:
    """tokenizer.ggml.* keys for a byte-level BPE tokenizer ("gpt2" model), as the converter writes them."""
    import gguf

    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for added in spec["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == max(vocab.values()) + 1
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    specials = {added["content"] for added in spec["added_tokens"]}
    token_types = [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in token_types])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(vocab[eos_token])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def random_blocks(qtype: Any, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random bytes for a (rows, cols) tensor of a block type, as the (rows, bytes) uint8 array
    GGUFWriter takes (fp16 scale fields are not made finite: callers that dequantize fix them)."""
    import gguf

    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    return np.random.default_rng(seed).integers(
        0, 256, (rows, cols // block_size * type_size), dtype=np.uint8
    )


def quantize_roundtrip(w: np.ndarray, quant: Any) -> np.ndarray:
    """What a weight becomes after quantizing to `quant` and back (the gguf package both ways)."""
    import gguf

    return gguf.quants.dequantize(gguf.quants.quantize(w, quant), quant).reshape(w.shape)


def write_gguf_from_hf(
    model_dir: Path,
    path: Path,
    *,
    tokenizer: bool = True,
    quant: Any = None,
    arch_name: str | None = None,
    raw_types: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    tok: tokenizers.Tokenizer | None = None,
    eos_token: str = EOS_TOKEN,
    chat_template: str | None = CHAT_TEMPLATE,
) -> Path:
    """Convert a saved tiny model to GGUF like llama.cpp does.

    Tensors are F32 unless `quant` (a GGMLQuantizationType) is given, which applies to 2-D weights other
    than the embedding. `raw_types` maps GGUF tensor names to a type written as random bytes (for types
    gguf cannot quantize to); `drop` lists GGUF tensor names or metadata keys to leave out.
    """
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    arch = arch_name or cfg["model_type"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(model_dir.name)
    if "vocab_size" not in drop:
        writer.add_vocab_size(cfg["vocab_size"])
    writer.add_context_length(cfg["max_position_embeddings"])
    if "embedding_length" not in drop:
        writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if tokenizer:
        add_tokenizer_metadata(writer, tok or build_tokenizer(), eos_token, chat_template)
    rope = cfg["rope_parameters"]
    if rope.get("mrope_section"):  # Qwen2-VL's text model ("qwen2vl"): four sections, the last 0
        writer.add_rope_dimension_sections([*rope["mrope_section"], 0])
    weights = load_file(str(model_dir / "model.safetensors"))
    if rope.get("rope_type") == "llama3":
        # The converter stores Llama 3.1 scaling as per-frequency divisors.
        from mistralrs_serve.config import RopeScaling
        from mistralrs_serve.layers.rotary import inverse_frequencies

        base = inverse_frequencies(head_dim, rope["rope_theta"], RopeScaling())
        scaled = inverse_frequencies(head_dim, rope["rope_theta"], RopeScaling.from_dict(rope))
        weights["rope_freqs.weight"] = (base / scaled).float().numpy()
    for name, w in weights.items():
        if name == "rope_freqs.weight":
            target = name
        else:
            target = gguf_name(name)
            if arch == "llama" and ".q_proj." in name:
                w = permute_qk(w, heads)
            elif arch == "llama" and ".k_proj." in name:
                w = permute_qk(w, kv_heads)
        w = np.ascontiguousarray(w, dtype=np.float32)
        if target in drop:
            continue
        if raw_types and target in raw_types:
            writer.add_tensor(target, random_blocks(raw_types[target], w.shape), raw_dtype=raw_types[target])
        elif quant is not None and w.ndim == 2 and "embed" not in name:
            writer.add_tensor(target, gguf.quants.quantize(w, quant), raw_dtype=quant)
        else:
            writer.add_tensor(target, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- Running our model ---


class ContiguousKVCache:
    """The attention backend of one sequence in contiguous tensors, (num_kv_heads, max_len,
    head_dim) per layer: the plain reference the paged cache is tested against."""

    def __init__(self, cfg: Any, max_len: int, dtype: torch.dtype) -> None:
        shape = (cfg.num_layers, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.max_len = max_len
        self.num_cached = 0  # positions filled before the current step
        self.num_new = 0  # tokens of the current step

    def begin_step(self, num_new: int) -> None:
        if self.num_cached + num_new > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; the step needs more")
        self.num_new = num_new

    def end_step(self) -> None:
        self.num_cached += self.num_new
        self.num_new = 0

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, how: Any = None
    ) -> torch.Tensor:
        from mistralrs_kernels import reference
        from mistralrs_serve.layers.attention import PLAIN, windowed_softmax_attention

        start, end = self.num_cached, self.num_cached + self.num_new
        self.k[layer_idx, :, start:end] = k.transpose(0, 1)
        self.v[layer_idx, :, start:end] = v.transpose(0, 1)
        if how is not None and how != PLAIN:  # a window, scale or soft-cap: the explicit fp32 softmax
            k_all, v_all = (
                self.k[layer_idx, :, :end].transpose(0, 1),
                self.v[layer_idx, :, :end].transpose(0, 1),
            )
            return windowed_softmax_attention(q, k_all, v_all, start, 0, how).to(q.dtype)
        q_t = q.transpose(0, 1).to(self.k.dtype)  # (H, T, D)
        out = reference.attention(q_t, self.k[layer_idx, :, :end], self.v[layer_idx, :, :end], start)
        return out.transpose(0, 1).reshape(q.shape[0], -1).to(q.dtype)  # (T, H * D)


def run_ours(model: Any, ids: list[int], chunks: list[int] | None = None, max_len: int = 256) -> torch.Tensor:
    """Logits (T, vocab) of every position from our model, fed through a ContiguousKVCache in steps
    of `chunks` tokens (default: the whole prompt at once)."""
    chunks = chunks or [len(ids)]
    assert sum(chunks) == len(ids)
    cache = ContiguousKVCache(model.config, max_len, model.dtype)
    out, start = [], 0
    for n in chunks:
        cache.begin_step(n)
        rows = torch.arange(n)
        out.append(
            model.forward(torch.tensor(ids[start : start + n]), torch.arange(start, start + n), cache, rows)
        )
        cache.end_step()
        start += n
    return torch.cat(out)


def row_correlations(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b."""
    a = a.double() - a.double().mean(-1, keepdim=True)
    b = b.double() - b.double().mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def load_hf_model_quant_roundtrip(model_dir: Path, quant: Any) -> Any:
    """The transformers reference with every weight `write_gguf_from_hf(quant=...)` quantizes replaced
    by its dequantized value (quantization works per row, so llama's q/k row permutation commutes)."""
    model = load_hf_model(model_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.copy_(torch.from_numpy(quantize_roundtrip(p.numpy(), quant)))
    return model


PROMPT_LEN = 64


class TinyReference:
    """One saved tiny model and transformers' logits for the test prompt."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        hf = load_hf_model(directory)
        self.vocab_size = hf.config.vocab_size
        self.ids = prompt_ids(PROMPT_LEN, self.vocab_size)
        self.logits = hf_logits(hf, self.ids)
        self._loaded: dict[torch.dtype, LoadedModel] = {}

    def ours(self, dtype: torch.dtype) -> LoadedModel:
        if dtype not in self._loaded:
            self._loaded[dtype] = load_model(ModelSource.parse(str(self.directory)), dtype=dtype)
        return self._loaded[dtype]

    def gguf(self, tmp: Path, **kwargs: Any) -> Path:
        """The same weights written as a GGUF the way llama.cpp's converter does."""
        suffix = "-".join(f"{k}={getattr(v, 'name', v)}" for k, v in sorted(kwargs.items()))
        return write_gguf_from_hf(self.directory, tmp / f"{self.directory.name}{suffix}.gguf", **kwargs)


def fused_step_arrays(
    num_groups: int, pos: np.ndarray, block_size: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Slots and block tables of one sequence's rows at positions `pos` for a fused
    forward over a cache in `num_groups` KV groups: group g holds the sequence in
    blocks g * width .. (g + 1) * width, in order, and its arrays follow group g - 1's."""
    tables = [np.arange(g * width, (g + 1) * width, dtype=np.int64)[None] for g in range(num_groups)]
    slots = np.concatenate([t[0, pos // block_size] * block_size + pos % block_size for t in tables])
    return slots, np.concatenate([np.repeat(t, len(pos), 0) for t in tables])


def save_tokenizer_files(directory: Path, tok: tokenizers.Tokenizer) -> None:
    """The test tokenizer and its tokenizer_config.json (EOS, chat template) beside a saved model."""
    tok.save(str(directory / "tokenizer.json"))
    tok_cfg = {"eos_token": EOS_TOKEN, "bos_token": None, "chat_template": CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_cfg))


def assert_text_model_matches(hf: Any, directory: Path, length: int = 20) -> None:
    """The directory served as a chat model gives `hf`'s logits (fp32) on a text prompt."""
    loaded = load_model(ModelSource.parse(str(directory)), dtype=torch.float32)
    ids = prompt_ids(length, 200)
    got = run_ours(loaded.model, ids)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([ids])).logits[0]
    assert (got - want).abs().max().item() <= 1e-4
