"""Validated sampling options of one request, and their native counterpart."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any

from mistralrs_serve import _native
from mistralrs_serve.errors import InvalidRequestError

MAX_TOP_LOGPROBS = 20
DEFAULT_DRY_BREAKERS = ("\n", ":", '"', "*")


GRAMMAR_KINDS = ("regex", "json_schema", "json_object", "lark", "llguidance")


@dataclass(frozen=True)
class Grammar:
    """A constraint on the whole output: `source` in the language `kind`."""

    kind: str
    source: str = ""
    param: str = "grammar"  # the request field it came from, for errors

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise InvalidRequestError(
                f"{self.param}.type must be one of {', '.join(GRAMMAR_KINDS)}; got {self.kind!r}",
                f"{self.param}.type",
            )


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(f"{param} {message}", param)


@dataclass(frozen=True)
class SamplingParams:
    """What to sample and when to stop; `validate()` runs on construction."""

    max_tokens: int | None = None  # None: until EOS or the context is full
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no cap
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_sequence_breakers: tuple[str, ...] = DEFAULT_DRY_BREAKERS
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    grammar: Grammar | None = None  # constrain the output (llguidance)
    skip_special_tokens: bool = True  # False keeps special tokens (tool-call markers) in the text

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be >= 1")
        _check(0.0 <= self.temperature <= 2.0, "temperature", "must be between 0 and 2")
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _check(self.top_k >= -1, "top_k", "must be -1, 0 (no cap) or positive")
        _check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        _check(0.0 < self.repetition_penalty <= 10.0, "repetition_penalty", "must be in (0, 10]")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be between -2 and 2")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be between -2 and 2")
        _check(
            all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()),
            "logit_bias",
            "values must be between -100 and 100",
        )
        _check(
            math.isfinite(self.dry_multiplier) and self.dry_multiplier >= 0.0,
            "dry_multiplier",
            "must be a finite number >= 0",
        )
        _check(
            math.isfinite(self.dry_base) and self.dry_base >= 1.0, "dry_base", "must be a finite number >= 1"
        )
        _check(self.dry_allowed_length >= 1, "dry_allowed_length", "must be >= 1")
        _check(self.seed is None or 0 <= self.seed < 2**64, "seed", "must be in [0, 2**64)")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "entries must be non-empty strings")
        _check(len(self.stop) <= 16, "stop", "may hold at most 16 sequences")
        _check(
            0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]"
        )
        _check(1 <= self.n <= 128, "n", "must be in [1, 128]")

    def check_vocab(self, vocab_size: int) -> None:
        """The checks that need the model: logit_bias ids must be in the vocabulary."""
        bad = [i for i in self.logit_bias if not 0 <= i < vocab_size]
        _check(not bad, "logit_bias", f"has token ids outside the vocabulary (size {vocab_size}): {bad[:5]}")

    def to_native(self, encode: Any, choice_index: int = 0) -> _native.SamplingParams:
        """The Rust-side params of a request checked at the edge (`check_vocab` included);
        `encode(text)` tokenizes DRY breakers."""
        breakers = sorted({t for s in self.dry_sequence_breakers for t in encode(s)})
        seed = secrets.randbits(64) if self.seed is None else (self.seed + choice_index) % 2**64
        return _native.SamplingParams(
            temperature=self.temperature,
            top_k=max(self.top_k, 0),
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=list(self.logit_bias.items()),
            dry_multiplier=self.dry_multiplier,
            dry_base=self.dry_base,
            dry_allowed_length=self.dry_allowed_length,
            dry_sequence_breakers=breakers,
            seed=seed,
            return_logprob=self.logprobs,
            num_top_logprobs=self.top_logprobs if self.logprobs else 0,
        )
