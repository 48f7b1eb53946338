"""Special tokens of a model, gathered from whichever files describe them."""

from __future__ import annotations

from dataclasses import dataclass, field

# Tokens that end a turn in popular chat formats. GGUF files often name only
# one EOS (SmolLM2's says <|im_end|>, Llama 3's <|end_of_text|> while chat
# turns end with <|eot_id|>), so any of these present in the vocabulary also
# stops generation, as llama.cpp does.
END_OF_GENERATION_TEXTS = (
    "</s>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|return|>",
    "<|call|>",
    "<｜end▁of▁sentence｜>",
    "<|end_of_role|>",
)


@dataclass(frozen=True)
class SpecialTokens:
    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # Every id that ends generation (includes eos_token_id).
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)
    add_bos_token: bool = False
    add_eos_token: bool = False
