"""Tool calls in model output: parse them, stream them, and constrain them with a grammar.

A `ToolCallFormat` knows one model family's format (`format.py`; the base class is the plain-JSON
fallback) and `detect_format` picks one from a chat template's markers (`registry.py`). One module per
family of formats: `hermes.py` (`<tool_call>`, with Qwen3-Coder's XML), `llama3.py`, `mistral.py` (with
Granite), `phi4_mini.py`, `deepseek.py`. Shared by all: `json_scan.py` and `scanner.py` read the
output, `streamer.py` turns decisions into deltas, `grammar.py` holds the pieces of the Lark grammars.
"""

from mistralrs_serve.entrypoints.openai.tool_parsers.calls import ParsedDelta, ToolCall, ToolCallDelta
from mistralrs_serve.entrypoints.openai.tool_parsers.format import ToolCallFormat
from mistralrs_serve.entrypoints.openai.tool_parsers.grammar import TOKEN_MARKERS
from mistralrs_serve.entrypoints.openai.tool_parsers.registry import FORMATS, detect_format, get_format
from mistralrs_serve.entrypoints.openai.tool_parsers.streamer import ToolCallStreamer

__all__ = [
    "FORMATS",
    "TOKEN_MARKERS",
    "ParsedDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallFormat",
    "ToolCallStreamer",
    "detect_format",
    "get_format",
]
