"""A scripted test model: the default model's tokenizer and chat template,
with weights replaced by a script that decides the next token.

It plugs in where a real model does (a `CausalLM` whose fused forward the
engine's runner picks on the CPU), so tokenization, the chat template, the
scheduler, the paged KV cache, sampling, constrained decoding, tool-call
parsing and HTTP all run for real; only the choice of the next token is
scripted. The model keeps each cache slot's token id (the cache is its
memory), reads a row's whole history through the row's block table, splits
it at the last assistant header into prompt and reply so far, asks the
script for the reply to that prompt, and puts all the probability on the
reply's next token (then end of sequence).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from mistralrs_serve.config import EngineConfig
from mistralrs_serve.engine.engine_loop import EngineLoop
from mistralrs_serve.engine.llm_engine import LLMEngine
from mistralrs_serve.models import gguf_loader
from mistralrs_serve.models.default_model import default_model_path
from mistralrs_serve.models.loader import LoadedModel

ASSISTANT_HEADER = "<|im_start|>assistant\n"  # SmolLM2's ChatML: where a reply starts
TOOL_HEADER = "<|im_start|>tool\n"
USER_HEADER = "<|im_start|>user\n"
SCRIPTED_LOGIT = 100.0  # every other token 0: one-hot at any temperature a test uses

Script = Callable[[str], str]  # the rendered prompt -> the whole reply


def by_round(*replies: str) -> Script:
    """Reply i after the i-th tool result of the current user turn (the last reply repeats)."""

    def script(prompt: str) -> str:
        turn = prompt[prompt.rfind(USER_HEADER) :]
        return replies[min(turn.count(TOOL_HEADER), len(replies) - 1)]

    return script


class ScriptedForward:
    """The whole step (FusedForward): store each row's token, answer each logit row."""

    weight_bytes = 0

    def __init__(self, model: ScriptedLM, kv: np.ndarray) -> None:
        self.model = model
        self.vocab = model.config.vocab_size
        _, _, num_blocks, self.block_size = kv.shape[:4]
        self.slot_tokens = np.full(num_blocks * self.block_size, -1, dtype=np.int64)

    def forward(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        slots: np.ndarray,
        block_tables: np.ndarray,
        context_lens: np.ndarray,
        logit_rows: np.ndarray,
        out: np.ndarray | None = None,
    ) -> torch.Tensor:
        written = slots >= 0
        self.slot_tokens[slots[written]] = input_ids[written]
        if out is None:
            logits = torch.zeros((len(logit_rows), self.vocab), dtype=torch.float32)
        else:
            logits = torch.from_numpy(out)
            logits.zero_()
        for i, row in enumerate(logit_rows):
            pos = np.arange(int(positions[row]) + 1)
            history = self.slot_tokens[
                block_tables[row][pos // self.block_size] * self.block_size + pos % self.block_size
            ]
            logits[i, self.model.next_token(history.tolist())] = SCRIPTED_LOGIT
        return logits


class ScriptedLM:
    def __init__(self, config: Any, tokenizer: Any, script: Script) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.script = script
        self.dtype = torch.float32
        self.device = torch.device("cpu")
        self.header = tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False)
        self.eos = min(tokenizer.eos_token_ids)
        self.replies: dict[tuple[int, ...], list[int]] = {}
        self.prompts: list[str] = []  # every prompt the script answered, for tests to inspect

    def set_script(self, script: Script) -> None:
        """Answer from now on by `script` (replies already chosen are forgotten)."""
        self.script = script
        self.replies.clear()
        self.prompts.clear()

    def next_token(self, history: list[int]) -> int:
        split = _last_index(history, self.header)
        if split < 0:
            return self.eos
        prompt, generated = tuple(history[:split]), history[split:]
        reply = self.replies.get(prompt)
        if reply is None:
            text = self.tokenizer.decode(list(prompt), skip_special_tokens=False)
            self.prompts.append(text)
            reply = [*self.tokenizer.encode(self.script(text), add_special_tokens=False), self.eos]
            self.replies[prompt] = reply
        return reply[len(generated)] if len(generated) < len(reply) else self.eos

    # what the engine asks of any CausalLM

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("the scripted model runs only through its fused forward (a CPU engine)")

    def to(self, device: Any) -> ScriptedLM:
        return self

    def use_triton(self) -> None:
        raise AssertionError("the scripted model has no Triton path")

    def decode_weight_bytes(self) -> int:
        return 0

    def fused_forward(self, kv: np.ndarray | None, kv_layout: Any = None) -> ScriptedForward | None:
        return ScriptedForward(self, kv) if kv is not None else None

    def kv_window(self) -> int | None:
        return None

    def layer_windows(self) -> list[int | None]:
        return [None] * self.config.num_layers


def _last_index(seq: list[int], sub: list[int]) -> int:
    """The index just past the last occurrence of sub in seq, or -1."""
    n = len(sub)
    for start in range(len(seq) - n, -1, -1):
        if seq[start : start + n] == sub:
            return start + n
    return -1


def scripted_engine(script: Script, max_model_len: int | None = None) -> tuple[EngineLoop, ScriptedLM]:
    """An engine over the scripted model (one small cache, the CPU)."""
    gguf, _, cfg = gguf_loader.read_gguf(default_model_path())
    tokenizer = gguf_loader.load_gguf_tokenizer(gguf, None)
    small = dataclasses.replace(cfg, num_layers=1, num_kv_heads=1, num_heads=1, head_dim=8, hidden_size=8)
    model = ScriptedLM(small, tokenizer, script)
    loaded = LoadedModel("scripted", model, tokenizer, small)  # type: ignore[arg-type]
    config = EngineConfig(
        device="cpu", kv_cache_mb=8, max_num_seqs=8, native_forward=True, max_model_len=max_model_len
    )
    return EngineLoop(lambda: LLMEngine(loaded, config)), model
