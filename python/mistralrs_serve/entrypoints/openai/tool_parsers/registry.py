"""The tool-call formats by name, and how one is chosen from the markers a chat template uses."""

from __future__ import annotations

from mistralrs_serve.entrypoints.openai.tool_parsers.deepseek import DeepSeekFormat
from mistralrs_serve.entrypoints.openai.tool_parsers.format import ToolCallFormat
from mistralrs_serve.entrypoints.openai.tool_parsers.grammar import DS_CALLS_BEGIN
from mistralrs_serve.entrypoints.openai.tool_parsers.hermes import HermesFormat, Qwen3CoderFormat
from mistralrs_serve.entrypoints.openai.tool_parsers.llama3 import Llama3JsonFormat
from mistralrs_serve.entrypoints.openai.tool_parsers.mistral import MarkerJsonFormat, MistralFormat
from mistralrs_serve.entrypoints.openai.tool_parsers.phi4_mini import Phi4MiniFormat

JSON = ToolCallFormat()
HERMES = HermesFormat()
QWEN3_CODER = Qwen3CoderFormat()
LLAMA3_JSON = Llama3JsonFormat()
MISTRAL = MistralFormat("mistral", named=False)
MISTRAL_V11 = MistralFormat("mistral_v11", named=True)
GRANITE = MarkerJsonFormat("granite", "<|tool_call|>")
PHI4_MINI = Phi4MiniFormat()
DEEPSEEK = DeepSeekFormat("deepseek", fenced=False)
DEEPSEEK_R1 = DeepSeekFormat("deepseek_r1", fenced=True)

FORMATS: dict[str, ToolCallFormat] = {
    fmt.name: fmt
    for fmt in (
        JSON,
        HERMES,
        QWEN3_CODER,
        LLAMA3_JSON,
        MISTRAL,
        MISTRAL_V11,
        GRANITE,
        PHI4_MINI,
        DEEPSEEK,
        DEEPSEEK_R1,
    )
}


def get_format(name: str) -> ToolCallFormat:
    """The format with this name (see FORMATS)."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call format {name!r}; known: {sorted(FORMATS)}") from None


def detect_format(template_source: str | None) -> ToolCallFormat:
    """The tool-call format a chat template teaches, judged by the markers in its source."""
    source = template_source or ""
    if "<tool_call>" in source:
        return QWEN3_CODER if "<function=" in source else HERMES
    if DS_CALLS_BEGIN in source:
        return DEEPSEEK_R1 if "```json" in source else DEEPSEEK
    if "[TOOL_CALLS]" in source:
        return MISTRAL_V11 if "[ARGS]" in source else MISTRAL
    if "<|/tool_call|>" in source or "<|/tool|>" in source:  # Phi-4-mini declares tools in <|tool|>
        return PHI4_MINI
    if "<|tool_call|>" in source:
        return GRANITE
    if "<|python_tag|>" in source or '"parameters"' in source:
        return LLAMA3_JSON
    return JSON
