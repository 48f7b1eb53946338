"""Reasoning parsing: split whole outputs, stream them at every split, pick parsers by chat template."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from mistralrs_serve.entrypoints.openai.reasoning import (
    ReasoningParser,
    reasoning_markers,
    reasoning_parser_for,
    split_reasoning,
)
from mistralrs_serve.tokenizer.chat_template import ChatTemplate
from template_data import needs_templates, read_template

THINK = ("<think>", "</think>")
GEMMA4 = ("<|channel>thought", "<channel|>")


@dataclass(frozen=True)
class Case:
    id: str
    text: str
    reasoning: str | None
    content: str
    inside: bool = False
    markers: tuple[str, str] = THINK


CASES = [
    Case(
        "qwen3-thinking",
        "<think>\nThe user asks for the capital of France. That is Paris.\n</think>\n\n"
        "The capital of France is **Paris**.",
        "The user asks for the capital of France. That is Paris.",
        "The capital of France is **Paris**.",
    ),
    Case(
        "multiline-unicode-reasoning",
        "<think>\nFirst, 2 + 2 = 4.\n\nThen check: 4 × 3 = 12 — correct. Überprüft ✓\n</think>\n\n"
        "The answer is 12.\n\nDetails follow.",
        "First, 2 + 2 = 4.\n\nThen check: 4 × 3 = 12 — correct. Überprüft ✓",
        "The answer is 12.\n\nDetails follow.",
    ),
    Case(
        "r1-distill-starts-inside",
        "Okay, so the user wants 6 × 7. That's 42.\n</think>\n\nThe answer is 42.",
        "Okay, so the user wants 6 × 7. That's 42.",
        "The answer is 42.",
        inside=True,
    ),
    Case(
        "deepseek-v31-no-whitespace",
        "Quick check: yes.</think>Yes, it is.",
        "Quick check: yes.",
        "Yes, it is.",
        inside=True,
    ),
    Case(
        "empty-think-block",
        "<think>\n\n</think>\n\nHello! How can I help?",
        None,
        "Hello! How can I help?",
    ),
    Case(
        "no-think-block",
        "  Hello! A plain answer, with trailing space. ",
        None,
        "  Hello! A plain answer, with trailing space. ",
    ),
    Case(
        "think-marker-later-is-content",
        "Use <think> tags to reason, then close with </think>.",
        None,
        "Use <think> tags to reason, then close with </think>.",
    ),
    Case(
        "leading-whitespace-before-marker",
        "\n\n<think>\nhmm\n</think>\n\nok",
        "hmm",
        "ok",
    ),
    Case(
        "ends-inside-block",
        "<think>\nLet me think about this carefully. First",
        "Let me think about this carefully. First",
        "",
    ),
    Case(
        "ends-inside-when-started-inside",
        "Still thinking </thi",
        "Still thinking </thi",
        "",
        inside=True,
    ),
    Case(
        "second-end-marker-stays-in-content",
        "<think>a</think>\n\nb </think> c",
        "a",
        "b </think> c",
    ),
    Case(
        "tool-call-after-reasoning",
        '<think>\nI should call the weather tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Paris"}}\n</tool_call>',
        "I should call the weather tool.",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    ),
    Case(
        "gemma4-thought-channel",
        "<|channel>thought\nThe user greets me.<channel|>Hello there!",
        "The user greets me.",
        "Hello there!",
        markers=GEMMA4,
    ),
    Case("empty-output", "", None, ""),
    Case("empty-output-inside", "", None, "", inside=True),
]


def stream(parser: ReasoningParser, pieces: list[str]) -> tuple[list[str], list[str]]:
    reasoning: list[str] = []
    content: list[str] = []
    for r, c in [*(parser.feed(piece) for piece in pieces), parser.finish()]:
        reasoning.append(r)
        content.append(c)
    return reasoning, content


def splits(text: str) -> list[list[str]]:
    """Every two-piece split of `text`, and one character at a time."""
    return [[text[:cut], text[cut:]] for cut in range(len(text) + 1)] + [list(text)]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_split_reasoning(case: Case) -> None:
    assert split_reasoning(case.text, *case.markers, inside=case.inside) == (case.reasoning, case.content)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_streaming_matches_split_at_every_split(case: Case) -> None:
    start, end = case.markers
    marker_in_text = (
        start in (case.reasoning or "") + case.content or end in (case.reasoning or "") + case.content
    )
    for pieces in splits(case.text):
        reasoning, content = stream(ReasoningParser(start, end, inside=case.inside), pieces)
        where = f"split {[len(piece) for piece in pieces][:3]}"
        assert "".join(reasoning) == (case.reasoning or ""), where
        assert "".join(content) == case.content, where
        if not marker_in_text:  # markers are never emitted
            assert not any(start in piece or end in piece for piece in reasoning + content), where


def test_partial_end_marker_is_held_back() -> None:
    parser = ReasoningParser()
    assert parser.feed("<think>\nabc </thi") == ("abc", "")
    assert parser.feed("nk>\n\nHi") == ("", "Hi")
    assert parser.finish() == ("", "")


def test_partial_start_marker_is_held_back() -> None:
    parser = ReasoningParser()
    assert parser.feed("  <thi") == ("", "")
    assert parser.feed("nk>x") == ("x", "")

    parser = ReasoningParser()
    assert parser.feed("<thi") == ("", "")
    assert parser.feed("s is content") == ("", "<this is content")


def test_whitespace_before_end_marker_waits() -> None:
    parser = ReasoningParser(inside=True)
    assert parser.feed("step one\n\n") == ("step one", "")
    assert parser.feed("step two\n") == ("\n\nstep two", "")
    assert parser.feed("</think>\n\nDone") == ("", "Done")


def test_ends_inside_block_is_all_reasoning() -> None:
    parser = ReasoningParser(inside=True)
    assert parser.feed("thinking and thinking ") == ("thinking and thinking", "")
    assert parser.finish() == ("", "")


def test_markers_must_not_be_empty() -> None:
    with pytest.raises(ValueError):
        ReasoningParser("", "</think>")


# --- Choosing a parser from the real chat templates ---

# Template -> markers, and whether the output starts inside the block for each enable_thinking value.
EXPECTED = {
    "HuggingFaceTB-SmolLM3-3B.jinja": (THINK, {None: False, True: False, False: False}),
    "Qwen-QwQ-32B.jinja": (THINK, {None: False, True: True, False: False}),
    "Qwen-Qwen3-0.6B.jinja": (THINK, {None: False, True: False, False: False}),
    "Qwen3.5-4B.jinja": (THINK, {None: True, True: True, False: False}),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja": (THINK, {None: False, True: True, False: False}),
    "deepseek-ai-DeepSeek-V3.1.jinja": (THINK, {None: False, True: True, False: False}),
    "google-gemma-4-31B-it.jinja": (GEMMA4, {None: False, True: False, False: False}),
    "ibm-granite-granite-3.3-2B-Instruct.jinja": (THINK, {None: False, True: False, False: False}),
}
WITHOUT_MARKERS = [
    "Mistral-Small-3.2-24B-Instruct-2506.jinja",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
    "Qwen-Qwen2.5-7B-Instruct.jinja",
    "Qwen3-Coder.jinja",
    "google-gemma-2-2b-it.jinja",
    "meta-llama-Llama-3.1-8B-Instruct.jinja",
    "meta-llama-Llama-3.2-3B-Instruct.jinja",
    "microsoft-Phi-3.5-mini-instruct.jinja",
    "mistralai-Mistral-Nemo-Instruct-2407.jinja",
    "openai-gpt-oss-120b.jinja",
]


@needs_templates
@pytest.mark.parametrize("filename", sorted(EXPECTED))
def test_reasoning_parser_for_thinking_templates(filename: str) -> None:
    source = read_template(filename)
    markers, inside_by_setting = EXPECTED[filename]
    assert reasoning_markers(source) == markers
    template = ChatTemplate(source, origin=filename, bos_token="<s>", eos_token="</s>")
    for enable_thinking, inside in inside_by_setting.items():
        prompt = template.render([{"role": "user", "content": "Hi"}], enable_thinking=enable_thinking)
        parser = reasoning_parser_for(source, prompt)
        assert parser is not None
        assert (parser.start, parser.end, parser.inside) == (*markers, inside), enable_thinking


@needs_templates
@pytest.mark.parametrize("filename", WITHOUT_MARKERS)
def test_no_reasoning_parser_without_markers(filename: str) -> None:
    source = read_template(filename)
    assert reasoning_markers(source) is None
    assert reasoning_parser_for(source, "any prompt <think>\n") is None


def test_reasoning_parser_for_without_template() -> None:
    assert reasoning_parser_for(None, "<think>\n") is None


def test_think_in_an_earlier_message_does_not_open_the_block() -> None:
    source = "{{ '<think>' }}{{ '</think>' }}"
    prompt = "<|user|>what does <think> mean?<|assistant|>\n"
    parser = reasoning_parser_for(source, prompt)
    assert parser is not None and not parser.inside


@needs_templates
def test_qwen3_5_prompt_then_output() -> None:
    """The whole path: Qwen3.5 opens the block in the prompt; the output carries only the end marker."""
    source = read_template("Qwen3.5-4B.jinja")
    prompt = ChatTemplate(source, origin="Qwen3.5").render([{"role": "user", "content": "2+2?"}])
    output = "The user wants 2+2, which is 4.\n</think>\n\n2 + 2 = **4**."
    parser = reasoning_parser_for(source, prompt)
    assert parser is not None
    for pieces in splits(output):
        reasoning, content = stream(reasoning_parser_for(source, prompt) or parser, pieces)
        assert ("".join(reasoning), "".join(content)) == ("The user wants 2+2, which is 4.", "2 + 2 = **4**.")
