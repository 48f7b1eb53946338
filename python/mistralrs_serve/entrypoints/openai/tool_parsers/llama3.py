"""Llama 3.1 / 3.2: `{"name": ..., "parameters": {...}}` calls joined by `;`, optionally after
`<|python_tag|>`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mistralrs_serve.entrypoints.openai.tool_parsers.format import ToolCallFormat
from mistralrs_serve.entrypoints.openai.tool_parsers.grammar import SPACE_CLASS
from mistralrs_serve.entrypoints.openai.tool_parsers.json_output import JsonOutputScanner
from mistralrs_serve.entrypoints.openai.tool_parsers.scanner import Scanner


class Llama3JsonFormat(ToolCallFormat):
    """Llama 3.1 / 3.2: the output is `{"name": ..., "parameters": {...}}` (calls joined by `;`),
    optionally after `<|python_tag|>`."""

    name = "llama3_json"
    arguments_key = "parameters"

    def _scanner(self, tools: Sequence[Mapping[str, Any]] | None) -> Scanner:
        return JsonOutputScanner(tag="<|python_tag|>", fences=False)

    def _grammar_frame(self, parallel: bool) -> tuple[str, str, str]:
        return "", "; ", ""

    def _call_opening(self) -> str:
        return f"{SPACE_CLASS}*(<\\|python_tag\\|>|[\\[{{])"
