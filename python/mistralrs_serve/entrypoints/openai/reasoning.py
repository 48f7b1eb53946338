"""Reasoning ("thinking") in model output: split it from the answer, whole or as it streams.

Thinking models write their reasoning first, between a start and an end marker (`<think>` and
`</think>` for Qwen3, QwQ, DeepSeek-R1, SmolLM3, Granite; Gemma 4 uses a "thought" channel).
"""

from __future__ import annotations

import enum

__all__ = [
    "REASONING_MARKERS",
    "ReasoningParser",
    "reasoning_markers",
    "reasoning_parser_for",
    "split_reasoning",
]

# (start, end) marker pairs, tried in order against a chat template's source.
REASONING_MARKERS: tuple[tuple[str, str], ...] = (
    ("<think>", "</think>"),
    ("<|channel>thought", "<channel|>"),  # Gemma 4
)


def split_reasoning(
    text: str, start: str = "<think>", end: str = "</think>", *, inside: bool = False
) -> tuple[str | None, str]:
    """(reasoning or None, content) of a complete output."""
    if not inside:
        stripped = text.lstrip()
        if not stripped.startswith(start):
            return None, text
        text = stripped[len(start) :]
    closing = text.find(end)
    if closing < 0:
        reasoning, content = text, ""
    else:
        reasoning, content = text[:closing], text[closing + len(end) :].lstrip()
    return reasoning.strip() or None, content


class _State(enum.Enum):
    OPENING = enum.auto()  # before the output shows whether it starts with the start marker
    REASONING_LEAD = enum.auto()  # whitespace right after the start marker
    REASONING = enum.auto()
    CONTENT_LEAD = enum.auto()  # whitespace right after the end marker
    CONTENT = enum.auto()


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


class ReasoningParser:
    """Splits streamed output into reasoning and content deltas, holding back partial markers.

    A block is recognised only at the start of the output (after whitespace); markers later in
    the answer are text, and the markers themselves are never returned. The whitespace after the
    start marker, before the end marker and after it is dropped, as templates render the block
    as `<think>\\n...\\n</think>\\n\\n`. An output that ends inside the block is all reasoning.

    `inside=True`: the prompt ended with the start marker (DeepSeek-R1 distills end the generation
    prompt with `<think>\\n`), so the output begins inside the block and only the end marker appears.
    """

    def __init__(self, start: str = "<think>", end: str = "</think>", *, inside: bool = False) -> None:
        if not start or not end:
            raise ValueError("reasoning markers must not be empty")
        self.start = start
        self.end = end
        self.inside = inside
        self._state = _State.REASONING_LEAD if inside else _State.OPENING
        self._buffer = ""
        self._held_space = ""  # whitespace at the end of the reasoning so far

    def feed(self, delta: str) -> tuple[str, str]:
        """(reasoning delta, content delta) for the next piece of output."""
        self._buffer += delta
        return self._drain(final=False)

    def finish(self) -> tuple[str, str]:
        """(reasoning delta, content delta) for what was held back, at the end of the output."""
        return self._drain(final=True)

    def _drain(self, *, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            state = self._state
            self._step(final, reasoning, content)
            if self._state is state:
                return "".join(reasoning), "".join(content)

    def _step(self, final: bool, reasoning: list[str], content: list[str]) -> None:
        """Moves on as far as the buffer allows within the current state, or to the next state."""
        if self._state is _State.OPENING:
            self._opening(final, content)
        elif self._state is _State.REASONING_LEAD:
            self._skip_space(_State.REASONING)
        elif self._state is _State.REASONING:
            self._reasoning(final, reasoning)
        elif self._state is _State.CONTENT_LEAD:
            self._skip_space(_State.CONTENT)
        else:
            content.append(self._buffer)
            self._buffer = ""

    def _opening(self, final: bool, content: list[str]) -> None:
        stripped = self._buffer.lstrip()
        if stripped.startswith(self.start):
            self._buffer = stripped[len(self.start) :]
            self._state = _State.REASONING_LEAD
        elif final or not self.start.startswith(stripped):
            self._state = _State.CONTENT  # no thinking block: all of it is content, as it is

    def _skip_space(self, following: _State) -> None:
        stripped = self._buffer.lstrip()
        self._buffer = stripped
        if stripped:
            self._state = following

    def _reasoning(self, final: bool, reasoning: list[str]) -> None:
        closing = self._buffer.find(self.end)
        if closing >= 0:
            reasoning.append(self._reasoning_text(self._buffer[:closing], last=True))
            self._buffer = self._buffer[closing + len(self.end) :]
            self._state = _State.CONTENT_LEAD
            return
        keep = 0 if final else _partial_suffix(self._buffer, self.end)
        text, self._buffer = (
            self._buffer[: len(self._buffer) - keep],
            self._buffer[len(self._buffer) - keep :],
        )
        reasoning.append(self._reasoning_text(text, last=final))

    def _reasoning_text(self, text: str, *, last: bool) -> str:
        """Reasoning to emit now: trailing whitespace waits until more reasoning follows it."""
        text = self._held_space + text
        body = text.rstrip()
        self._held_space = "" if last else text[len(body) :]
        return body


def reasoning_markers(template_source: str | None) -> tuple[str, str] | None:
    """The (start, end) thinking markers a chat template uses, or None."""
    source = template_source or ""
    for start, end in REASONING_MARKERS:
        if start in source and end in source:
            return start, end
    return None


def reasoning_parser_for(template_source: str | None, prompt_text: str) -> ReasoningParser | None:
    """A parser for output that follows `prompt_text` (rendered by this template); None when the
    template has no thinking markers. The output starts inside the block when the prompt ends with
    the start marker (DeepSeek-R1 distills, QwQ, Qwen3.5, DeepSeek V3.1 with thinking on)."""
    markers = reasoning_markers(template_source)
    if markers is None:
        return None
    start, end = markers
    return ReasoningParser(start, end, inside=prompt_text.rstrip().endswith(start))
